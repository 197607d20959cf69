"""What a task's process, a health check and an ``exec`` call inherit: a minimal
environment, never the whole environment of the process that starts them (a server's
holds secrets: ``CORRAL_TOKEN``, credentials of the services it talks to).

A child gets, later entries winning:

1. ``PATH``, ``HOME`` and ``LANG`` of the starting process, or defaults when they are
   unset (``/usr/local/bin:/usr/bin:/bin``, the user's home from the password database,
   ``C.UTF-8``); a task run as another user gets that user's home;
2. the variables the administrator passes through (``--task-env NAME`` of ``corral
   serve`` and ``corral run``), with the server's values;
3. the task class's own (``command.env``);
4. the ``CORRAL_*`` variables corral sets for it (its environment's and task's ids,
   its control socket, the node agent's mark; a call's event and trigger).

It lives in the ports layer because both sides of it use it: the backends that spawn
tasks and the call plugins that run commands.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
from collections.abc import Iterable, Mapping

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"
BASE = ("PATH", "HOME", "LANG")

_default_passed: dict[str, str] = {}


def passed(names: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The named variables of ``environ`` (default: this process's) that are set: what
    ``--task-env`` passes through."""
    src = os.environ if environ is None else environ
    return {n: src[n] for n in names if n in src}


def set_default_passed(values: Mapping[str, str]) -> None:
    """What this process passes through to the commands its call plugins run (``corral
    serve`` and ``corral run`` set it from ``--task-env``; plugins are made with no
    arguments, from their entry points)."""
    _default_passed.clear()
    _default_passed.update(values)


def default_passed() -> dict[str, str]:
    return dict(_default_passed)


@functools.lru_cache(maxsize=64)
def _home_of(user: str | None) -> str:
    """A user's home directory (None: this process's user); KeyError if unknown (not
    cached: a user made later is found then)."""
    entry = pwd.getpwuid(os.getuid()) if user is None else _entry(user)
    return entry.pw_dir


def _entry(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():
            return pwd.getpwuid(int(user))
        raise


def task_environment(
    declared: Iterable[tuple[str, str]] = (),
    corral: Iterable[tuple[str, str]] = (),
    *,
    passed: Mapping[str, str] | None = None,
    user: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a child: the base (``PATH``, ``HOME``, ``LANG`` of ``environ``,
    default this process's), then ``passed`` (the ``--task-env`` values), then
    ``declared`` (the task class's ``command.env``), then ``corral`` (the ``CORRAL_*``
    variables corral sets for this child). ``user``: the user the child runs as (its
    home is that user's)."""
    src = os.environ if environ is None else environ
    home = src.get("HOME") or ""
    if user:
        with contextlib.suppress(KeyError, OverflowError):  # (the spawn says it is unknown)
            home = _home_of(user)
    if not home:
        try:
            home = _home_of(None)
        except KeyError:
            home = "/"
    env = {
        "PATH": src.get("PATH") or DEFAULT_PATH,
        "HOME": home,
        "LANG": src.get("LANG") or DEFAULT_LANG,
    }
    if passed:
        env.update(passed)
    env.update(declared)
    env.update(corral)
    return env
