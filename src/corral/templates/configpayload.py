"""Configuration payloads: their keys, apricot's query resolution, and rendering. Pure.

The configuration store (``corral.store.sqlite``, ``corral.control.configstore``) keeps
versioned text payloads under hierarchical keys, like AliECS keeps them in Consul under
``o2/components/``. This module is what needs no I/O:

- ``check_key``, ``check_payload``: what a key and a payload may be (``ConfigError``);
- ``resolve`` / ``resolve_path``: AliECS apricot's ``ResolveComponentQuery``: the key of
  ``component/RUNTYPE/rolename/entry``, falling back to run type ``ANY``, then to role
  name ``any``, then to both; an error when none of the four exists;
- ``sources`` / ``render``: a payload rendered as a Jinja2 template (AliECS renders them
  with pongo2, Jinja-like) with the caller's variables, ``{% include "entry" %}`` (and
  ``import``, ``from``, ``extends``) reading other payloads through ``get``.

How a render is kept in bounds. Payloads are written by admins, but a render is asked
for by anyone who may read, with their variables, and runs inside the server; so it runs
in an immutable sandbox (``ImmutableSandboxedEnvironment``: no ``__class__``, no
mutation), with more limits than Jinja2's own:

- includes are found before anything renders (``sources``): their names must be string
  literals, resolved as apricot's template loader does (relative to the directory of the
  key being rendered; ``/key`` from the root); a missing one, a cycle, more than
  ``MAX_INCLUDE_DEPTH`` levels or ``MAX_INCLUDES`` payloads is an error naming the key
  and line;
- every loop iteration, call, filter and include is a step: at most ``max_steps``, and
  no longer than ``time_limit`` seconds of the ``clock`` given (the caller's: this
  module reads no clock);
- what a render produces, the literal text of loop and macro bodies as they repeat and
  every ``{{ }}`` included (in ``{% set %}`` blocks and macros too), is counted: at most
  ``MAX_PRODUCED`` characters; the output at most ``MAX_OUTPUT``;
- a value (an argument, a result, an operand) is at most ``MAX_VALUE`` characters;
  ``*``, ``**`` and ``%`` are checked before they run; the filters and ``str`` methods
  that could make a large value from a small one (``center``, ``indent``, ``replace``,
  ``join``, ``format``...) are checked, or not offered (``ljust``, ``str.format``,
  ``wordwrap``...); no ``namespace`` (state carried across loop iterations), no
  ``lipsum``, no ``random``; no recursive loops;
- an undefined variable is an error (``StrictUndefined``), naming the variable.

Every error is a ``ConfigError`` (``RenderError`` for a render) whose message names the
key and line.
"""

from __future__ import annotations

import re
from collections.abc import (
    Callable,
    Container,
    Mapping,
)

# -- keys and payloads ---------------------------------------------------------------------------

MAX_KEY = 512  # characters of a key
MAX_SEGMENT = 128  # characters of one of its parts
MAX_DEPTH = 32  # parts of a key
MAX_PAYLOAD = 1 << 20  # bytes of a payload (UTF-8)
SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
# apricot's query parts (configuration/componentcfg/query.go)
COMPONENT = re.compile(r"[a-zA-Z0-9_-]+")
RUN_TYPE = re.compile(r"[A-Z0-9_-]+")
ROLE_NAME = re.compile(r"[a-zA-Z0-9_-]+")
ENTRY = re.compile(r"[a-zA-Z0-9_-]+(/[a-zA-Z0-9_-]+)*")
FALLBACK_RUN_TYPE = "ANY"
FALLBACK_ROLE_NAME = "any"

# -- rendering limits ----------------------------------------------------------------------------

MAX_INCLUDE_DEPTH = 16  # payloads including payloads, the one rendered included
MAX_INCLUDES = 256  # payloads one render reads
MAX_OUTPUT = 4 << 20  # characters of a render's output
MAX_PRODUCED = 32 << 20  # characters produced in all, captured blocks and macros included
MAX_VALUE = 4 << 20  # characters of one value (an argument, a result)
MAX_STEPS = 1_000_000  # loop iterations, calls, filters and includes
MAX_INT_BITS = 4096  # of an integer made by * or **
MAX_WIDTH = 1000  # of center(), and of a %-format's width or precision
MAX_INDENT = 100  # of indent() and tojson(indent)
MAX_COUNT = 100_000  # batch() and slice() sizes
DEFAULT_TIME_LIMIT = 10.0  # seconds, with a clock


class ConfigError(ValueError):
    """A key, payload or query refused, or a render that failed (422 at the API)."""


class ConfigNotFound(ConfigError):
    """Nothing stored at a key, or a query no key resolves (404)."""


class ConfigTooLarge(ConfigError):
    """A payload over ``MAX_PAYLOAD`` bytes (413)."""


class RenderError(ConfigError):
    """A render failed: ``key`` and ``line`` say where (either may be None)."""

    def __init__(self, message: str, key: str | None = None, line: int | None = None) -> None:
        where = f"{key}:{line}" if key and line else key or ""
        super().__init__(f"{where}: {message}" if where else message)
        self.key = key
        self.line = line
        self.reason = message


def check_key(key: object, what: str = "key") -> str:
    """``key`` if it is a valid key: parts of letters, digits, ``_``, ``-`` and ``.``
    (not first), joined by ``/``; no empty part, no ``.`` or ``..``; at most MAX_KEY
    characters and MAX_DEPTH parts. Else ConfigError saying why."""
    if not isinstance(key, str):
        raise ConfigError(f"the {what} must be text, not {type(key).__name__}")
    if not key:
        raise ConfigError(f"the {what} is empty")
    if len(key) > MAX_KEY:
        raise ConfigError(f"the {what} is {len(key)} characters long; at most {MAX_KEY}")
    bad = sorted({c for c in key if not (c.isascii() and (c.isalnum() or c in "_-./"))})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise ConfigError(
            f"the {what} {_short(key)} has characters a key may not have ({shown}): use "
            "letters, digits, '_', '-' and '.', with '/' between parts"
        )
    parts = key.split("/")
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"the {what} {_short(key)} has {len(parts)} parts; at most {MAX_DEPTH}")
    for part in parts:
        if not part:
            raise ConfigError(
                f"the {what} {_short(key)} has an empty part (a '/' at its start or end, or '//')"
            )
        if part in (".", ".."):
            raise ConfigError(f"the {what} {_short(key)} has a {part!r} part: keys are not paths")
        if len(part) > MAX_SEGMENT or not SEGMENT.fullmatch(part):
            raise ConfigError(
                f"the {what} {_short(key)}: part {_short(part)} must start with a letter, "
                f"digit, '_' or '-' and be at most {MAX_SEGMENT} characters"
            )
    return key


def check_prefix(prefix: str) -> str:
    """A key prefix to list by: empty, a key, or a key and a trailing ``/``."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix, "prefix")
    return prefix


def check_payload(payload: object, what: str = "payload") -> str:
    """``payload`` if it is text of at most MAX_PAYLOAD bytes (UTF-8) without NUL."""
    if not isinstance(payload, str):
        raise ConfigError(f"the {what} must be text, not {type(payload).__name__}")
    try:
        size = len(payload.encode("utf-8"))
    except UnicodeEncodeError as e:  # a lone surrogate
        raise ConfigError(f"the {what} is not valid text: {e.reason}") from None
    if size > MAX_PAYLOAD:
        raise ConfigTooLarge(f"the {what} is {size} bytes; at most {MAX_PAYLOAD} (1 MiB)")
    if "\0" in payload:
        raise ConfigError(f"the {what} contains a NUL character (at {payload.index(chr(0))})")
    return payload


def _short(s: str) -> str:
    return repr(s if len(s) <= 80 else s[:77] + "...")


# -- apricot's resolution --------------------------------------------------------------------------


def query_key(component: str, run_type: str, role_name: str, entry_key: str) -> str:
    """The key of one query, ``component/RUNTYPE/rolename/entry``, its parts checked as
    apricot checks them (ConfigError)."""
    for what, value, pattern in (
        ("component", component, COMPONENT),
        ("run type", run_type, RUN_TYPE),
        ("role name", role_name, ROLE_NAME),
        ("entry", entry_key, ENTRY),
    ):
        if not isinstance(value, str) or not pattern.fullmatch(value):
            hint = " (in capitals, e.g. PHYSICS or ANY)" if what == "run type" else ""
            raise ConfigError(
                f"bad component configuration query: the {what} {value!r} does not match "
                f"{pattern.pattern}{hint}"
            )
    return check_key(f"{component}/{run_type}/{role_name}/{entry_key}", "query")


def resolve(
    component: str, run_type: str, role_name: str, entry_key: str, keys: Container[str]
) -> str:
    """The key apricot's ``ResolveComponentQuery`` finds among ``keys`` (the keys that
    exist): the query itself, else with run type ANY, else with role name ``any``, else
    with both. ConfigNotFound, as apricot answers, when none of them exists."""
    tried = []
    for rt, role in (
        (run_type, role_name),
        (FALLBACK_RUN_TYPE, role_name),
        (run_type, FALLBACK_ROLE_NAME),
        (FALLBACK_RUN_TYPE, FALLBACK_ROLE_NAME),
    ):
        key = query_key(component, rt, role, entry_key)
        if key in keys:
            return key
        if key not in tried:
            tried.append(key)
    raise ConfigNotFound(
        f"could not resolve configuration path {tried[0]} (tried {', '.join(tried)})"
    )


def parse_query(path: str) -> tuple[str, str, str, str]:
    """``component/RUNTYPE/rolename/entry`` (the entry may have ``/`` in it) as its
    four parts; ConfigError when it is not of that shape."""
    parts = path.strip().split("/", 3) if isinstance(path, str) else []
    if len(parts) != 4:
        raise ConfigError(
            f"bad component configuration query {path!r}: expected component/RUNTYPE/rolename/entry"
        )
    component, run_type, role_name, entry_key = parts
    query_key(component, run_type, role_name, entry_key)
    return component, run_type, role_name, entry_key


def resolve_path(path: str, keys: Container[str]) -> str:
    """``resolve`` of a query written as one path (AliECS's ``config.ResolvePath``)."""
    return resolve(*parse_query(path), keys)


# -- includes --------------------------------------------------------------------------------------


def base_of(key: str) -> str:
    """The directory includes are resolved in: the key without its last part."""
    return key.rpartition("/")[0]


def include_key(name: str, base: str) -> str:
    """The key an include name means, as apricot's template loader (``Abs``) has it: a
    name starting with ``/`` from the root; one already under ``base`` as it is; any
    other one in ``base``. ConfigError when that is not a valid key."""
    if not isinstance(name, str):
        raise ConfigError(f"an include name must be text, not {type(name).__name__}")
    if name.startswith("/"):
        key = name[1:]
    elif not base or name.startswith(base + "/"):
        key = name
    else:
        key = f"{base}/{name}"
    return check_key(key, f"included key {name!r} (as {key!r})")


def sources(
    key: str,
    get: Callable[[str], str | None],
    *,
    max_depth: int = MAX_INCLUDE_DEPTH,
    max_includes: int = MAX_INCLUDES,
) -> dict[str, str]:
    """Every payload a render of ``key`` reads, ``key`` first (``configrender.sources``,
    with Jinja2: imported by the first render, not by what only checks keys)."""
    from corral.templates import configrender

    return configrender.sources(key, get, max_depth=max_depth, max_includes=max_includes)


def render(
    key: str,
    get: Callable[[str], str | None],
    variables: Mapping[str, str],
    *,
    max_steps: int = MAX_STEPS,
    clock: Callable[[], float] | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
) -> str:
    """The payload at ``key`` rendered with ``variables`` (``configrender.render``)."""
    from corral.templates import configrender

    return configrender.render(
        key, get, variables, max_steps=max_steps, clock=clock, time_limit=time_limit
    )
