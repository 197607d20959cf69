"""Secrets for jobs, encrypted at rest in the store (docs/secrets.md).

How this runs. A ``SecretStore`` sits on the server's ``SqliteStore`` and uses its
connection, on the same thread (the event loop), in its own table ``secrets``: one row
per name with the Fernet token of the value (AES-128-CBC and HMAC-SHA256, from the
``cryptography`` package), a version counted per name, the writer and the time. The
key is not in the store: it is a file of its own (``corral serve --secrets-key``),
made at the first open when missing (mode 0600, in a directory made 0700), and refused
when its group or others may use it or it is no Fernet key. A store that already holds
secrets never gets a new key made for it: a missing key file is an error, since a new
key could not read them.

The value is encrypted together with its name, so a token copied to another row does
not decrypt as that row's secret. Nothing here returns a value except ``reveal``, which
is for the job runner only: listings give names, versions, writers, times and sizes.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from corral.store.sqlite import SqliteStore

MAX_VALUE = 64 * 1024  # bytes of one secret
MAX_WRITER = 512  # characters of a writer's name
MAX_KEY_FILE = 1024  # bytes read of a key file (a Fernet key is 44)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets(
    name TEXT PRIMARY KEY, token BLOB NOT NULL, version INTEGER NOT NULL,
    writer TEXT NOT NULL, updated REAL NOT NULL, size INTEGER NOT NULL)
"""


class SecretError(ValueError):
    """A bad name, value or writer; a secret that cannot be read."""


class SecretKeyError(SecretError):
    """The key file cannot be used: missing while secrets are stored, open to others,
    or not a Fernet key."""


def check_name(name: object) -> str:
    """``name`` if it is a secret's name (it is also a file's name), else SecretError."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SecretError(
            f"{name!r} is not a secret's name: letters, digits, '_', '.' and '-', "
            "starting with a letter or digit, at most 100 characters"
        )
    return name


class SecretStore:
    """The secrets of one store, under the key in ``key_path``. Not thread-safe: it
    uses the store's connection, as the store's owner does."""

    def __init__(self, store: SqliteStore, key_path: str) -> None:
        self.store = store
        self.key_path = os.path.abspath(key_path)
        with store._tx() as db:
            db.execute(SCHEMA)
        self._fernet = Fernet(self._key())

    # -- the key -------------------------------------------------------------------------

    def _key(self) -> bytes:
        try:
            return self._read_key()
        except FileNotFoundError:
            pass
        held = self.count()
        if held:
            raise SecretKeyError(
                f"the key file {self.key_path} is missing, and the store holds {held} "
                "secret(s) encrypted with a key: restore the key file (a new key cannot "
                "read them)"
            )
        return self._make_key()

    def _read_key(self) -> bytes:
        path = self.key_path
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SecretKeyError(f"the key file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise SecretKeyError(
                    f"the key file {path} is open to its group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}): make it its owner's only "
                    f"(chmod 600 {path})"
                )
            data = os.read(fd, MAX_KEY_FILE + 1)
        finally:
            os.close(fd)
        key = data.strip()
        try:
            Fernet(key)
        except ValueError:
            raise SecretKeyError(
                f"the key file {path} does not hold a Fernet key (32 bytes in URL-safe "
                "base64, 44 characters)"
            ) from None
        return key

    def _make_key(self) -> bytes:
        path = self.key_path
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        key = Fernet.generate_key()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another process made it first: use that one
            return self._read_key()
        try:
            os.write(fd, key + b"\n")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        return key

    # -- secrets -----------------------------------------------------------------------------

    def put(self, name: str, value: bytes, writer: str, now: float) -> int:
        """Store ``value`` as ``name`` (replacing its value); its new version."""
        check_name(name)
        if not isinstance(value, bytes | bytearray):
            raise SecretError(f"secret {name!r}: a value is bytes")
        if not value:
            raise SecretError(f"secret {name!r}: the value is empty")
        if len(value) > MAX_VALUE:
            raise SecretError(
                f"secret {name!r}: the value is {len(value):,} bytes; at most {MAX_VALUE:,}"
            )
        if not isinstance(writer, str) or not writer or len(writer) > MAX_WRITER:
            raise SecretError(f"the writer must be a name of 1 to {MAX_WRITER} characters")
        token = self._fernet.encrypt(_sealed(name, bytes(value)))
        with self.store._tx() as db:
            row = db.execute("SELECT version FROM secrets WHERE name=?", (name,)).fetchone()
            version = (int(row[0]) if row else 0) + 1
            db.execute(
                "INSERT INTO secrets(name, token, version, writer, updated, size) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "token=excluded.token, version=excluded.version, writer=excluded.writer, "
                "updated=excluded.updated, size=excluded.size",
                (name, token, version, writer, now, len(value)),
            )
        return version

    def names(self) -> list[dict[str, Any]]:
        """Every secret, by name: ``name``, ``version``, ``writer``, ``updated`` and
        ``size`` (bytes); never a value."""
        cur = self.store._db.execute(
            "SELECT name, version, writer, updated, size FROM secrets ORDER BY name"
        )
        keys = ("name", "version", "writer", "updated", "size")
        return [dict(zip(keys, row, strict=True)) for row in cur]

    def exists(self, name: str) -> bool:
        """Is there a secret of this name (a bad name: no)."""
        try:
            return self.get(name) is not None
        except ValueError:
            return False

    def get(self, name: str) -> dict[str, Any] | None:
        """One secret's entry as ``names`` gives it, or None; never its value."""
        check_name(name)
        row = self.store._db.execute(
            "SELECT name, version, writer, updated, size FROM secrets WHERE name=?", (name,)
        ).fetchone()
        keys = ("name", "version", "writer", "updated", "size")
        return None if row is None else dict(zip(keys, row, strict=True))

    def remove(self, name: str) -> bool:
        """Forget ``name``; False when there was no such secret."""
        check_name(name)
        with self.store._tx() as db:
            return db.execute("DELETE FROM secrets WHERE name=?", (name,)).rowcount > 0

    def reveal(self, names: Iterable[str]) -> dict[str, bytes]:
        """The values of ``names``, for the job runner only. KeyError (its argument the
        name) for a name with no secret; SecretError naming a secret the key cannot
        read."""
        wanted = [check_name(n) for n in names]
        out: dict[str, bytes] = {}
        for name in wanted:
            if name in out:
                continue
            row = self.store._db.execute(
                "SELECT token FROM secrets WHERE name=?", (name,)
            ).fetchone()
            if row is None:
                raise KeyError(name)
            out[name] = self._open(name, bytes(row[0]))
        return out

    def unreadable(self) -> list[str]:
        """The secrets the key cannot decrypt (the key file was replaced), by name."""
        cur = self.store._db.execute("SELECT name, token FROM secrets ORDER BY name")
        bad = []
        for name, token in cur.fetchall():
            try:
                self._open(name, bytes(token))
            except SecretError:
                bad.append(name)
        return bad

    def count(self) -> int:
        """How many secrets are stored."""
        return int(self.store._db.execute("SELECT COUNT(*) FROM secrets").fetchone()[0])

    def _open(self, name: str, token: bytes) -> bytes:
        try:
            plain = self._fernet.decrypt(token)
        except InvalidToken:
            raise SecretError(
                f"secret {name!r} cannot be decrypted with the key in {self.key_path}: the "
                "key file was replaced, or the secret was stored under another key; restore "
                "that key file, or put the secret again"
            ) from None
        owner, sep, value = plain.partition(b"\0")
        if not sep or owner != name.encode():
            raise SecretError(
                f"secret {name!r}: the stored value is another secret's (the store was "
                "changed behind corral's back); put it again"
            )
        return value


def _sealed(name: str, value: bytes) -> bytes:
    """What is encrypted: the name, a NUL (no name holds one), the value."""
    return name.encode() + b"\0" + value
