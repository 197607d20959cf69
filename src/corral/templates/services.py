"""What templates read from the rest of the system: AliECS's ``inventory``, ``config``,
``runtime`` and ``dpl`` functions.

The expander stays a pure function of its inputs: everything these functions read comes
through a ``Services`` object given to it. ``Site`` is the pure one, made from data
(the nodes' labels, a snapshot of the configuration store at one revision, the runtime
table); the control plane makes one per expansion, and ``corral template validate``
makes one from the files it is given. Writes (``runtime.Set``) are collected in
``runtime_writes`` and applied by the caller after the expansion, in one transaction.

A DPL workflow is generated from its JSON description (``dpl.py``); running a DPL
command to get that description is an effect, so it goes through ``run_dpl``, a
function the caller supplies (none: a command cannot be run here, and the function says
so).

Failures are said the way AliECS says them: the function returns ``{"error":"…"}`` as
its value (so a template that prints it shows the reason), except where AliECS fails
the expansion (``dpl.*``), which raises ``ServiceError``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.templates.configpayload import ConfigError, check_key, check_payload

MAX_JIT_COMMAND = 64 * 1024  # the longest DPL command a jit file may hold


class ServiceError(Exception):
    """A template function that fails the expansion; str() says why."""


class Services(Protocol):
    def detector_for_host(self, host: str) -> str: ...
    def detectors_for_hosts(self, hosts_json: str) -> str: ...
    def cru_cards_for_host(self, host: str) -> str: ...
    def endpoints_for_cru_card(self, host: str, card: str) -> str: ...
    def config_get(self, path: str, variables: Mapping[str, str]) -> str: ...
    def config_resolve(self, component: str, run_type: str, role: str, entry: str) -> str: ...
    def config_resolve_path(self, path: str) -> str: ...
    def runtime_get(self, component: str, key: str) -> str: ...
    def runtime_set(self, component: str, key: str, value: str) -> str: ...
    def jit_command(self, uri: str) -> str | None: ...
    def dpl_dump(self, command: str, env: Mapping[str, str]) -> str: ...
    def service_endpoints(self, name: str) -> str: ...


def error_value(message: str) -> str:
    """AliECS's way to return a failure from a template function: a JSON object."""
    return json.dumps({"error": message}, separators=(",", ":"))


# A configuration store seen at one revision: get(key) -> payload or None; keys(); and
# render(key, variables) -> the payload with its includes rendered (Jinja2).
ConfigGet = Callable[[str], str | None]
ConfigRender = Callable[[str, Mapping[str, str]], str]
ConfigResolve = Callable[[str, str, str, str], str]


@dataclass
class Site:
    """Services from data: what ``corral serve`` and ``corral template`` give templates.

    ``labels``: each node's labels by host name (``detector``, ``cards``: the JSON that
    AliECS keeps under ``o2/hardware/flps/HOST/cards``). ``config_*``: the configuration
    store at the revision current when the environment was created (None: no store).
    ``runtime``: the runtime table, ``(component, key) -> value``. ``jit``: the DPL
    command files by name (a workflow repository's ``jit/`` folder). ``run_dpl``: runs a
    DPL command (a bash script, with its environment) and returns its JSON dump.
    """

    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    config_render: ConfigRender | None = None
    config_resolve_fn: ConfigResolve | None = None
    runtime: Mapping[tuple[str, str], str] = field(default_factory=dict)
    jit: Callable[[str], str | None] | None = None
    run_dpl: Callable[[str, Mapping[str, str]], str] | None = None
    runtime_writes: dict[tuple[str, str], str] = field(default_factory=dict)
    # the healthy endpoints (``address:port``) of each service, as the catalog had them
    catalog: Mapping[str, tuple[str, ...]] | None = None

    # -- inventory ----------------------------------------------------------------

    def _detector(self, host: str) -> str | None:
        node = self.labels.get(host)
        if node is None:
            return None
        det = node.get("detector")
        return det if det else None

    def detector_for_host(self, host: str) -> str:
        det = self._detector(host)
        return det if det is not None else error_value(f"detector not found for host {host}")

    def detectors_for_hosts(self, hosts_json: str) -> str:
        try:
            hosts = json.loads(hosts_json)
        except ValueError as e:
            return error_value(f"DetectorsForHosts function: {e}")
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            return error_value("DetectorsForHosts function: expected a JSON list of host names")
        found: set[str] = set()
        for h in hosts:
            det = self._detector(h)
            if det is None:
                return error_value(f"detector not found for host {h}")
            found.add(det)
        return json.dumps(sorted(found), separators=(",", ":"))

    def _cards(self, host: str) -> list[dict[str, str]] | str:
        node = self.labels.get(host)
        raw = None if node is None else node.get("cards")
        if raw is None:
            return f"no cards known for host {host} (its node needs a 'cards' label)"
        try:
            cards = json.loads(raw)
        except ValueError as e:
            return f"host {host}: its 'cards' label is not JSON: {e}"
        items = cards.values() if isinstance(cards, dict) else cards
        if not isinstance(items, Iterable):
            return f"host {host}: its 'cards' label is not a JSON object of cards"
        out = []
        for key in sorted(cards) if isinstance(cards, dict) else range(len(cards)):
            c = cards[key]
            if isinstance(c, dict):
                out.append({str(k): str(v) for k, v in c.items()})
        return out

    def cru_cards_for_host(self, host: str) -> str:
        cards = self._cards(host)
        if isinstance(cards, str):
            return json.dumps([f"error: {cards}"])
        serials: list[str] = []
        for c in cards:
            s = c.get("serial")
            if s is not None and s not in serials:
                serials.append(s)
        return json.dumps(serials, separators=(",", ":"))

    def endpoints_for_cru_card(self, host: str, card: str) -> str:
        cards = self._cards(host)
        if isinstance(cards, str):
            return error_value(cards)
        return " ".join(c.get("endpoint", "") for c in cards if c.get("serial") == card)

    # -- configuration --------------------------------------------------------------

    def config_get(self, path: str, variables: Mapping[str, str]) -> str:
        if self.config_render is None:
            return error_value("no configuration store")
        try:
            return self.config_render(path, variables)
        except (KeyError, ValueError) as e:
            return error_value(str(e).strip("'\""))

    def config_resolve(self, component: str, run_type: str, role: str, entry: str) -> str:
        if self.config_resolve_fn is None:
            return error_value("no configuration store")
        try:
            return self.config_resolve_fn(component, run_type, role, entry)
        except (KeyError, ValueError) as e:
            return error_value(str(e).strip("'\""))

    def config_resolve_path(self, path: str) -> str:
        parts = path.split("@", 1)[0].split("/")
        if len(parts) != 4:
            want = "component/RUNTYPE/role/entry"
            return error_value(f"bad configuration path {path!r}: want {want}")
        return self.config_resolve(*parts)

    # -- runtime ----------------------------------------------------------------------

    def runtime_get(self, component: str, key: str) -> str:
        value = self.runtime_writes.get((component, key))
        if value is None:
            value = self.runtime.get((component, key))
        if value is None:
            return error_value(f"no runtime entry {component}/{key}")
        return value

    def runtime_set(self, component: str, key: str, value: str) -> str:
        try:
            check_key(f"{component}/{key}", "runtime entry")
            check_payload(value, "runtime value")
        except ConfigError as e:
            return error_value(f"runtime.Set: {e}")
        self.runtime_writes[(component, key)] = value
        return value

    # -- services ------------------------------------------------------------------

    def service_endpoints(self, name: str) -> str:
        """service.Endpoints: the healthy endpoints of a service, ``address:port``
        comma-separated (empty when none is healthy now)."""
        if self.catalog is None:
            return error_value("service.Endpoints: no service catalog is known here")
        eps = self.catalog.get(name)
        if eps is None:
            return error_value(f"service.Endpoints: no service {name!r}")
        return ",".join(eps)

    # -- DPL --------------------------------------------------------------------------

    def jit_command(self, uri: str) -> str | None:
        return None if self.jit is None else self.jit(uri)

    def dpl_dump(self, command: str, env: Mapping[str, str]) -> str:
        if self.run_dpl is None:
            raise ServiceError(
                "DPL commands run only where the site allows it: add --run-dpl "
                "(corral template, corral run, corral serve)"
            )
        return self.run_dpl(command, env)


_METHODS = (
    "detector_for_host", "detectors_for_hosts", "cru_cards_for_host", "endpoints_for_cru_card",
    "config_resolve", "config_resolve_path", "runtime_get", "runtime_set", "jit_command",
    "service_endpoints",
)  # fmt: skip


def _key(name: str, args: tuple[object, ...]) -> str:
    return json.dumps([name, *args], separators=(",", ":"), ensure_ascii=False)


def _vars_digest(variables: Mapping[str, str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(variables):
        h.update(k.encode() + b"\0" + variables[k].encode() + b"\0")
    return h.hexdigest()


class RecordingSite:
    """Answers from another site and keeps every answer, so that a later control process
    expands the same plan again (``ReplaySite``, from the environment's recipe) even when
    the inventory, the configuration or the DPL software changed since."""

    def __init__(self, inner: Services) -> None:
        self.inner = inner
        self.record: dict[str, str | None] = {}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in _METHODS:
            raise AttributeError(name)
        method = getattr(self.inner, name)

        def call(*args: str) -> str | None:
            value: str | None = method(*args)
            self.record[_key(name, args)] = value
            return value

        return call

    def config_get(self, path: str, variables: Mapping[str, str]) -> str:
        value = self.inner.config_get(path, variables)
        self.record[_key("config_get", (path, _vars_digest(variables)))] = value
        return value

    def dpl_dump(self, command: str, env: Mapping[str, str]) -> str:
        value = self.inner.dpl_dump(command, env)
        self.record[_key("dpl_dump", (command, *sorted(f"{k}={v}" for k, v in env.items())))] = (
            value
        )
        return value


class ReplaySite:
    """The answers a ``RecordingSite`` kept; a question it was not asked is an error."""

    def __init__(self, record: Mapping[str, str | None]) -> None:
        self.record = dict(record)

    def _get(self, key: str) -> str | None:
        if key not in self.record:
            raise ServiceError("the environment's recipe has no answer to this question")
        return self.record[key]

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in _METHODS:
            raise AttributeError(name)
        return lambda *args: self._get(_key(name, args))

    def config_get(self, path: str, variables: Mapping[str, str]) -> str:
        return self._get(_key("config_get", (path, _vars_digest(variables)))) or ""

    def dpl_dump(self, command: str, env: Mapping[str, str]) -> str:
        key = _key("dpl_dump", (command, *sorted(f"{k}={v}" for k, v in env.items())))
        return self._get(key) or ""
