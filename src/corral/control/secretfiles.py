"""A job's secrets as files in a private directory in memory (docs/secrets.md).

How this runs. The job runner, in the server's process, reveals the secrets a job
declares (``SecretStore.reveal``) just before it starts one of the job's processes,
calls ``materialize`` to write them, passes the directory to the process
(``CORRAL_SECRETS_DIR``) and calls ``remove`` once the process has ended. The directory
is made by ``mkdtemp`` (a fresh name, mode 0700, never one that was there before) on
tmpfs: ``/dev/shm``, else ``$XDG_RUNTIME_DIR``, else the temporary directory (on disk:
only where there is no ``/dev/shm``). Each secret is a file of mode 0400 named as the
secret, created with ``O_EXCL | O_NOFOLLOW``. Nothing here logs or returns a value.

``env_for`` gives the secrets a job asked for as environment variables. That is
weaker than a file: a process's environment is inherited by every child it starts,
shown by ``ps e`` to its user and kept in core dumps; only jobs that ask get it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence

from corral.jobs.spec import SecretRef
from corral.store.secrets import SecretError, check_name

SECRETS_DIR_ENV = "CORRAL_SECRETS_DIR"  # where a process finds its secrets' files
PREFIX = "corral-secrets-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def default_base() -> str:
    """Where the directories go: ``/dev/shm`` (tmpfs); without it ``$XDG_RUNTIME_DIR``
    (tmpfs, its user's), then the temporary directory."""
    if os.path.isdir("/dev/shm"):
        return "/dev/shm"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return runtime
    return tempfile.gettempdir()


def safe_part(unit_id: str) -> str:
    """``unit_id`` as part of a file name: other characters than letters, digits,
    ``_``, ``.`` and ``-`` become ``_``; at most 64 characters."""
    return _UNSAFE.sub("_", unit_id)[:64].lstrip(".") or "unit"


def materialize(unit_id: str, secrets: Mapping[str, bytes], base: str | None = None) -> str:
    """A new private directory (0700) under ``base`` (``default_base()`` when None)
    holding each secret as a file of mode 0400 named as the secret; its path. On any
    failure nothing is left behind."""
    names = [check_name(name) for name in secrets]
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{safe_part(unit_id)}-", dir=base or default_base())
    try:
        os.chmod(path, 0o700)
        for name in names:
            _write(os.path.join(path, name), secrets[name])
    except BaseException:
        remove(path)
        raise
    return path


def _write(path: str, value: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o400)
    try:
        os.fchmod(fd, 0o400)
        view = memoryview(value)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Delete a directory ``materialize`` made, with its files; one already gone is
    fine. A path that is not such a directory is refused (ValueError)."""
    if not os.path.basename(os.path.normpath(path)).startswith(PREFIX):
        raise ValueError(f"{path} is not a directory of secrets")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def remove_left(
    owners: Sequence[str], base: str | None = None, keep: Collection[str] = ()
) -> tuple[int, dict[str, str]]:
    """Remove the directories a control process that died left for the processes of
    these jobs or services (task id prefixes), but those of the task ids in ``keep``
    (processes that still run, taken over). Returns how many were removed, and the
    kept directories by task id."""
    where = base or default_base()
    try:
        names = os.listdir(where)
    except OSError:
        return 0, {}
    prefixes = tuple(f"{PREFIX}{safe_part(o + ':')}" for o in owners)
    kept_by = {f"{PREFIX}{safe_part(t)}-": t for t in keep}
    gone = 0
    kept: dict[str, str] = {}
    for name in names:
        if not prefixes or not name.startswith(prefixes):
            continue
        path = os.path.join(where, name)
        head = name[: name.rindex("-") + 1]
        if head in kept_by and kept_by[head] not in kept:
            kept[kept_by[head]] = path
            continue
        remove(path)
        gone += 1
    return gone, kept


def env_for(names: Mapping[str, str], secrets: Mapping[str, bytes]) -> dict[str, str]:
    """The environment variables of the secrets asked for as such: ``names`` maps a
    secret's name to its variable's; the result a variable to the secret's value.

    Weaker than a file (see the module's doc): use it only where a program reads a
    secret from nowhere else. A value that an environment cannot hold (not UTF-8, or
    with a NUL) is refused with SecretError, naming the secret."""
    out: dict[str, str] = {}
    for name, var in names.items():
        if not _ENV_NAME.fullmatch(var):
            raise SecretError(f"secret {name!r}: {var!r} is not an environment variable's name")
        if name not in secrets:
            raise KeyError(name)
        try:
            text = secrets[name].decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(
                f"secret {name!r} is not UTF-8 text: it can only be given as a file"
            ) from None
        if "\0" in text:
            raise SecretError(f"secret {name!r} holds a NUL: it can only be given as a file")
        out[var] = text
    return out


# reveals secrets by name (``SecretStore.reveal``): KeyError for a missing one
Reveal = Callable[[Sequence[str]], Mapping[str, bytes]]


class SecretUnavailable(Exception):
    """A process's secrets cannot be given to it: it does not start."""


class Giver:
    """Gives processes their secrets (job units, service replicas), one private
    directory per running process, by its task id; ``reveal`` None: no secrets here."""

    def __init__(self, reveal: Reveal | None = None) -> None:
        self.reveal = reveal
        # does a secret of this name exist (never its value): set with ``reveal``, so
        # that a job naming one that does not is refused when it is submitted
        self.exists: Callable[[str], bool] | None = None
        self._dirs: dict[str, str] = {}

    def missing(self, refs: Sequence[SecretRef]) -> list[str]:
        """The secrets of ``refs`` that are not there (all of them: no secrets here)."""
        if self.reveal is None:
            return [r.name for r in refs]
        if self.exists is None:
            return []
        return [r.name for r in refs if not self.exists(r.name)]

    def env(self, task_id: str, refs: Sequence[SecretRef]) -> list[tuple[str, str]]:
        """What the process's environment gets: its secrets' directory (files), and
        the variables asked for. Raises SecretUnavailable (it must not start)."""
        if self.reveal is None:
            raise SecretUnavailable("this server keeps no secrets (no key)")
        try:
            values = self.reveal([r.name for r in refs])
        except KeyError as e:
            raise SecretUnavailable(f"no secret {e.args[0]!r}") from None
        except ValueError as e:  # a secret the key cannot read
            raise SecretUnavailable(str(e)) from None
        out: list[tuple[str, str]] = []
        files = {r.name: values[r.name] for r in refs if r.env is None}
        if files:
            self.forget(task_id)
            try:
                path = materialize(task_id, files)
            except OSError as e:
                raise SecretUnavailable(f"cannot write its secrets' files: {e}") from None
            self._dirs[task_id] = path
            out.append((SECRETS_DIR_ENV, path))
        asked = {r.name: r.env for r in refs if r.env is not None}
        if asked:
            try:
                out += env_for(asked, values).items()
            except ValueError as e:
                self.forget(task_id)
                raise SecretUnavailable(str(e)) from None
        return out

    def adopt(self, dirs: Mapping[str, str]) -> None:
        """Directories made for processes that a previous control process ran and this
        one took over: removed when they end, as its own."""
        self._dirs.update(dirs)

    def forget(self, task_id: str) -> None:
        """The process ended: its secrets' directory goes."""
        path = self._dirs.pop(task_id, None)
        if path is not None:
            remove(path)

    def __bool__(self) -> bool:
        return bool(self._dirs)
