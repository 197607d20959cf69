"""Integrated-service calls: parsing ``plugin.Method(args)`` and finding plugins.

A call's ``func`` names a plugin and a method with literal arguments:
``test.Sleep(0.5)``, ``exec.Run('/bin/echo', 'hi')``, ``http.Post('http://…/sor')``.
Plugins are found through the ``corral.calls`` entry point group, so that others can
add dcs, trigger or bookkeeping integrations without touching corral. The controller
enforces timeouts by cancelling ``invoke``: plugins must clean up on cancellation.
"""

from __future__ import annotations

import ast
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

GROUP = "corral.calls"
_LITERALS = {"true": True, "false": False, "null": None}


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a call knows of the moment it runs at."""

    environment_id: str
    event: str
    trigger: str
    path: str
    func: str
    run_number: int | None
    variables: Mapping[str, str]
    # variables the call's process reads callers' values from (``CORRAL_VALUE_n``: see
    # templates.quoting); a plugin that runs a command puts them in its environment
    env: tuple[tuple[str, str], ...] = ()


class CallError(Exception):
    """A call that failed or cannot be made; str() says why, for a person."""


@dataclass(frozen=True, slots=True)
class ParsedFunc:
    plugin: str
    method: str
    args: tuple[object, ...]


class Plugin(Protocol):
    methods: frozenset[str]

    async def call(self, method: str, args: tuple[object, ...], ctx: CallContext) -> str | None: ...


def parse_func(text: str) -> ParsedFunc:
    """``name.Method(literal, ...)`` → ParsedFunc; CallError for anything else."""
    src = text.strip()
    try:
        node = ast.parse(src, mode="eval").body
    except SyntaxError:
        raise CallError(f"bad call {text!r}: expected plugin.Method(arguments)") from None
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and not node.keywords
    ):
        raise CallError(f"bad call {text!r}: expected plugin.Method(arguments)")
    args: list[object] = []
    for a in node.args:
        if isinstance(a, ast.Name) and a.id in _LITERALS:
            args.append(_LITERALS[a.id])
            continue
        try:
            value = ast.literal_eval(a)
        except ValueError:
            raise CallError(
                f"bad call {text!r}: arguments must be literals (strings, numbers, true, "
                "false, null)"
            ) from None
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise CallError(f"bad call {text!r}: argument {ast.unparse(a)} is not a literal")
        args.append(value)
    return ParsedFunc(node.func.value.id, node.func.attr, tuple(args))


class Registry:
    """The call plugins by name: given, or loaded from the entry points."""

    def __init__(
        self, plugins: Mapping[str, Plugin] | None = None, *, extra: Mapping[str, Plugin] = {}
    ) -> None:
        """``plugins``: these only; else the entry points'. ``extra`` (the site's
        ``--call-plugin`` bridges) come on top, replacing one of the same name."""
        self._plugins: dict[str, Plugin] = {}
        self._broken: dict[str, str] = {}
        self._extra = dict(extra)
        # the entry points are read at the first call checked or made (a workflow
        # without calls never pays for the scan)
        self._loaded = plugins is not None
        if plugins is not None:
            self._plugins.update(plugins)
            self._plugins.update(extra)

    def _load(self) -> None:
        """(Expansions check calls in worker threads: two may load at once, each making
        whole mappings, the last kept; none sees a half-made one.)"""
        plugins: dict[str, Plugin] = {}
        broken: dict[str, str] = {}
        for ep in importlib.metadata.entry_points(group=GROUP):
            try:
                plugins[ep.name] = ep.load()()
            except Exception as e:  # a broken plugin is an error at its calls, not a crash
                broken[ep.name] = f"plugin {ep.name} ({ep.value}) failed to load: {e}"
        for name, plugin in self._extra.items():
            broken.pop(name, None)
            plugins[name] = plugin
        self._plugins, self._broken = plugins, broken
        self._loaded = True

    def names(self) -> list[str]:
        if not self._loaded:
            self._load()
        return sorted(self._plugins)

    def _resolve(self, func: str) -> tuple[Plugin, ParsedFunc]:
        if not self._loaded:
            self._load()
        parsed = parse_func(func)
        if parsed.plugin in self._broken:
            raise CallError(self._broken[parsed.plugin])
        plugin = self._plugins.get(parsed.plugin)
        if plugin is None:
            known = ", ".join(self.names()) or "none"
            raise CallError(f"unknown plugin {parsed.plugin!r} in {func!r} (known: {known})")
        accepts = getattr(plugin, "accepts", None)
        if not (
            parsed.method in plugin.methods or (accepts is not None and accepts(parsed.method))
        ):
            known = ", ".join(sorted(plugin.methods))
            raise CallError(
                f"plugin {parsed.plugin} has no method {parsed.method!r} (it has: {known})"
            )
        return plugin, parsed

    def check(self, func: str) -> None:
        self._resolve(func)

    async def invoke(self, func: str, ctx: CallContext) -> str | None:
        plugin, parsed = self._resolve(func)
        try:
            return await plugin.call(parsed.method, parsed.args, ctx)
        except CallError:
            raise
        except (TypeError, ValueError) as e:
            raise CallError(f"{parsed.plugin}.{parsed.method}: {e}") from None
        except Exception as e:
            raise CallError(f"{parsed.plugin}.{parsed.method}: {type(e).__name__}: {e}") from None
