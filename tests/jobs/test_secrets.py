"""Secrets for jobs (issue 13, item 4): stored encrypted under a key file of their own,
managed by admins through the API and ``corral secret``, given to a job as 0400 files
in a 0700 directory on tmpfs (or as variables when asked), never shown back.

Real SQLite files, key files and directories in tmp_path; the API and the command line
against a real ``corral serve`` on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet

from corral.cli.serve import secrets_key_file, serve
from corral.control.secretfiles import env_for, materialize, remove
from corral.jobs.spec import BatchSpec, DagSpec, SecretRef, ServiceSpec, load_job
from corral.store.secrets import MAX_VALUE, SecretError, SecretKeyError, SecretStore
from corral.store.sqlite import SqliteStore
from tests.api.server import Server
from tests.conftest import ROOT

VALUE = b"bin-\x00\xff-correct horse battery staple-5e8a"
TEXT = "s3cr3t-that-must-never-show-9f1c2d"


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(str(tmp_path / "data" / "corral.db"))
    yield store
    store.close()


def open_secrets(store: SqliteStore, key: Path) -> SecretStore:
    return SecretStore(store, str(key))


# -- the store -------------------------------------------------------------------------------


def test_round_trip_and_the_key_file_made_private(db: SqliteStore, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "secrets.key"
    s = open_secrets(db, key)
    assert mode(key) == 0o600 and mode(key.parent) == 0o700
    Fernet(key.read_bytes().strip())  # a Fernet key
    assert s.put("db-password", VALUE, "admin", 10.0) == 1
    assert s.put("db-password", b"newer", "alice", 20.0) == 2
    assert s.put("api.token", b"t", "admin", 30.0) == 1
    assert s.names() == [
        {"name": "api.token", "version": 1, "writer": "admin", "updated": 30.0, "size": 1},
        {"name": "db-password", "version": 2, "writer": "alice", "updated": 20.0, "size": 5},
    ]
    assert s.reveal(["db-password", "api.token"]) == {"db-password": b"newer", "api.token": b"t"}
    assert s.remove("api.token") and not s.remove("api.token")
    with pytest.raises(KeyError) as e:
        s.reveal(["db-password", "api.token"])
    assert e.value.args == ("api.token",)
    again = open_secrets(db, key)  # the same key, read back
    assert again.reveal(["db-password"]) == {"db-password": b"newer"}


def test_the_value_is_nowhere_in_the_store_files(db: SqliteStore, tmp_path: Path) -> None:
    s = open_secrets(db, tmp_path / "secrets.key")
    s.put("db-password", VALUE, "admin", 1.0)
    s.put("text", TEXT.encode(), "admin", 1.0)
    files = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("corral.db")]
    assert files
    for p in files:
        data = p.read_bytes()
        assert VALUE not in data and TEXT.encode() not in data
        assert base64.b64encode(TEXT.encode()) not in data
    assert TEXT not in json.dumps(s.names())


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o620, 0o700])
def test_a_key_file_others_may_use_is_refused(db: SqliteStore, tmp_path: Path, bits: int) -> None:
    key = tmp_path / "secrets.key"
    key.write_bytes(Fernet.generate_key())
    key.chmod(bits)
    if bits == 0o700:  # the owner's only: fine, whatever its bits
        open_secrets(db, key)
        return
    with pytest.raises(SecretKeyError, match=r"open to its group or others .*chmod 600"):
        open_secrets(db, key)


def test_a_key_file_that_holds_no_key_is_refused(db: SqliteStore, tmp_path: Path) -> None:
    key = tmp_path / "secrets.key"
    for text in (b"", b"not a key\n", b"A" * 5000):
        key.write_bytes(text)
        key.chmod(0o600)
        with pytest.raises(SecretKeyError, match="does not hold a Fernet key"):
            open_secrets(db, key)
    key.unlink()
    key.mkdir(mode=0o700)
    with pytest.raises(SecretKeyError, match="not a regular file"):
        open_secrets(db, key)


def test_a_replaced_key_names_the_secret(db: SqliteStore, tmp_path: Path) -> None:
    key = tmp_path / "secrets.key"
    open_secrets(db, key).put("db-password", VALUE, "admin", 1.0)
    key.unlink()
    with pytest.raises(SecretKeyError, match=r"is missing, and the store holds 1 secret"):
        open_secrets(db, key)  # never a new key for a store that has secrets
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, Fernet.generate_key())
    os.close(fd)
    s = open_secrets(db, key)
    assert s.unreadable() == ["db-password"]
    with pytest.raises(SecretError) as e:
        s.reveal(["db-password"])
    assert "secret 'db-password' cannot be decrypted with the key in" in str(e.value)
    assert str(key) in str(e.value) and e.value.__cause__ is None
    s.put("db-password", b"again", "admin", 2.0)  # putting it again mends it
    assert s.unreadable() == [] and s.reveal(["db-password"]) == {"db-password": b"again"}


def test_a_token_moved_to_another_name_does_not_decrypt(db: SqliteStore, tmp_path: Path) -> None:
    s = open_secrets(db, tmp_path / "secrets.key")
    s.put("a", b"value of a", "admin", 1.0)
    s.put("b", b"value of b", "admin", 1.0)
    with db._tx() as tx:
        tx.execute("UPDATE secrets SET token=(SELECT token FROM secrets WHERE name='a') "
                   "WHERE name='b'")  # fmt: skip
    with pytest.raises(SecretError, match="secret 'b': the stored value is another secret's"):
        s.reveal(["b"])


@pytest.mark.parametrize(
    "name", ["", "-x", ".hidden", "..", "a/b", "a b", "ü", "x" * 101, "a\0b", "a\nb"]
)
def test_names_are_checked(db: SqliteStore, tmp_path: Path, name: str) -> None:
    s = open_secrets(db, tmp_path / "secrets.key")
    with pytest.raises(SecretError, match="is not a secret's name"):
        s.put(name, b"v", "admin", 1.0)
    with pytest.raises(SecretError):
        s.reveal([name])
    with pytest.raises(SecretError):
        s.remove(name)
    assert s.names() == []


def test_the_value_is_capped_and_not_empty(db: SqliteStore, tmp_path: Path) -> None:
    s = open_secrets(db, tmp_path / "secrets.key")
    assert s.put("big", b"x" * MAX_VALUE, "admin", 1.0) == 1
    with pytest.raises(SecretError, match=r"is 65,537 bytes; at most 65,536"):
        s.put("bigger", b"x" * (MAX_VALUE + 1), "admin", 1.0)
    with pytest.raises(SecretError, match="empty"):
        s.put("empty", b"", "admin", 1.0)
    with pytest.raises(SecretError, match="writer"):
        s.put("w", b"v", "", 1.0)
    assert [r["name"] for r in s.names()] == ["big"]


# -- files and variables for a job -------------------------------------------------------------


def test_materialize_makes_private_files_and_removes_them(tmp_path: Path) -> None:
    base = tmp_path / "shm"
    base.mkdir()
    path = materialize("j0abc:3/../x", {"db-password": VALUE, "api.token": b"t"}, str(base))
    assert Path(path).parent == base and "/" not in Path(path).name
    assert Path(path).name.startswith("corral-secrets-j0abc_3_.._x-")
    assert mode(path) == 0o700
    assert sorted(os.listdir(path)) == ["api.token", "db-password"]
    for name in ("api.token", "db-password"):
        assert mode(os.path.join(path, name)) == 0o400
    assert (Path(path) / "db-password").read_bytes() == VALUE
    remove(path)
    assert not os.path.exists(path)
    remove(path)  # gone already: fine
    with pytest.raises(ValueError, match="not a directory of secrets"):
        remove(str(tmp_path))


def test_materialize_goes_to_dev_shm_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    if os.path.isdir("/dev/shm"):
        path = materialize("unit", {"a": b"1"})
        try:
            assert os.path.dirname(path) == "/dev/shm"
        finally:
            remove(path)
    base = tmp_path / "shm"
    base.mkdir()
    with pytest.raises(SecretError):
        materialize("unit", {"ok": b"1", "../escape": b"2"}, str(base))
    assert list(base.iterdir()) == [] and not (tmp_path / "escape").exists()


def test_env_for_gives_only_what_was_asked() -> None:
    secrets = {"api.token": b"tok", "bin": b"\xff\xfe", "nul": b"a\0b", "other": b"o"}
    assert env_for({"api.token": "API_TOKEN"}, secrets) == {"API_TOKEN": "tok"}
    with pytest.raises(SecretError, match="secret 'bin' is not UTF-8"):
        env_for({"bin": "BIN"}, secrets)
    with pytest.raises(SecretError, match="secret 'nul' holds a NUL"):
        env_for({"nul": "NUL"}, secrets)
    with pytest.raises(SecretError, match="not an environment variable"):
        env_for({"other": "1BAD"}, secrets)
    with pytest.raises(KeyError):
        env_for({"missing": "M"}, secrets)


# -- job files ---------------------------------------------------------------------------------


def test_jobs_declare_secrets() -> None:
    batch, diags = load_job("b.yaml", textwrap.dedent("""\
        kind: batch
        name: reco
        command: {value: /usr/bin/reco}
        secrets:
          - db-password
          - {name: api.token, env: API_TOKEN}
          - {name: cert.pem}
        """))  # fmt: skip
    assert diags == [] and isinstance(batch, BatchSpec)
    assert batch.secrets == (
        SecretRef("db-password"),
        SecretRef("api.token", "API_TOKEN"),
        SecretRef("cert.pem"),
    )
    service, diags = load_job("s.yaml", "kind: service\nname: s\ncommand: {value: x}\n"
                                        "secrets: [a]\n")  # fmt: skip
    assert diags == [] and isinstance(service, ServiceSpec)
    assert service.secrets == (SecretRef("a"),)
    dag, diags = load_job("d.yaml", "kind: dag\nname: d\nsecrets: [{name: k, env: K}]\n"
                                    "steps: [{name: s, command: {value: x}}]\n")  # fmt: skip
    assert diags == [] and isinstance(dag, DagSpec) and dag.secrets == (SecretRef("k", "K"),)
    plain, _ = load_job("p.yaml", "kind: batch\nname: p\ncommand: {value: x}\n")
    assert isinstance(plain, BatchSpec) and plain.secrets == ()


def test_bad_secret_declarations_are_errors_at_their_place() -> None:
    _, diags = load_job("j.yaml", textwrap.dedent("""\
        kind: batch
        name: b
        command: {value: /bin/true, env: ["TOKEN=x"]}
        secrets:
          - db-password
          - {name: api.token, env: API_TOKEN}
          - {name: db-password}
          - {name: other, env: TOKEN}
          - {name: x2, env: API_TOKEN}
          - {nme: x}
          - {name: "-bad"}
          - {name: y, env: "1X"}
          - {name: z, env: CORRAL_X}
          - [a]
        """))  # fmt: skip
    assert [str(d) for d in diags] == [
        "j.yaml:7:12: secret 'db-password' is declared twice (first at line 5)",
        "j.yaml:8:24: env 'TOKEN' of secret 'other' is also set by the command's env",
        "j.yaml:9:21: env 'API_TOKEN' is given two secrets (the first at line 6)",
        "j.yaml:10:5: a secret needs a name",
        "j.yaml:10:6: unknown field 'nme' in a secret; did you mean 'name'?",
        "j.yaml:11:12: secret '-bad' is not a name: letters, digits, '_', '.' and '-', "
        "starting with a letter or digit, at most 100 characters",
        "j.yaml:12:20: env '1X' of secret 'y' is not a variable's name: letters, digits and "
        "'_', not starting with a digit",
        "j.yaml:13:20: env 'CORRAL_X': CORRAL_* variables are corral's own",
        "j.yaml:14:5: a secret is a name or {name: N, env: VAR}, not a list",
    ]
    _, diags = load_job("k.yaml", "kind: service\nname: s\ncommand: {value: x}\nsecret: a\n")
    assert [str(d) for d in diags] == [
        "k.yaml:4:1: unknown field 'secret' in a service job; did you mean 'secrets'?"
    ]
    many = "".join(f"  - s{i}\n" for i in range(101))
    _, diags = load_job("m.yaml", f"kind: batch\nname: m\ncommand: {{value: x}}\nsecrets:\n{many}")
    assert [str(d) for d in diags] == ["m.yaml:5:3: secrets has more than 100 entries"]
    periodic = "kind: periodic\nname: p\nschedule: '@daily'\nsecrets: [a]\njob: {kind: batch, "
    _, diags = load_job("p.yaml", periodic + "command: {value: x}, secrets: [b]}\n")
    assert [str(d) for d in diags] == ["p.yaml:4:1: unknown field 'secrets' in a periodic job"]


# -- the API and the command line against a real server -----------------------------------------


def corral(server: Server, token: str | None, *args: str, stdin: bytes = b"") -> Any:
    env = dict(os.environ, CORRAL_SERVER=server.url)
    env.pop("CORRAL_TOKEN", None)
    if token:
        env["CORRAL_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "corral", *args], input=stdin,
                          capture_output=True, timeout=120, cwd=ROOT, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with its key outside its data directory, and tokens of each role."""
    tmp = tmp_path_factory.mktemp("secrets")
    key = tmp / "keys" / "secrets.key"
    with Server(tmp / "data", "--backend", "sim", "--secrets-key", str(key)) as s:
        TOKENS["admin"] = s.admin
        with s.client(s.admin) as c:
            for role in ("operator", "viewer"):
                r = c.post("/api/tokens", json={"role": role, "name": role})
                assert r.status_code == 201, r.text
                TOKENS[role] = r.json()["token"]
        yield s


TOKENS: dict[str, str] = {}  # the module's server's, by role


def test_the_api_is_admin_only_and_never_shows_a_value(server: Server) -> None:
    key = server.data.parent / "keys" / "secrets.key"
    assert mode(key) == 0o600 and not (server.data / "secrets.key").exists()
    answers: list[str] = []
    with server.client(server.admin) as admin:
        r = admin.put("/api/secrets/db-password", json={"value": TEXT})
        answers.append(r.text)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "name": "db-password", "version": 1, "writer": "admin", "updated": r.json()["updated"],
            "size": len(TEXT),
        }  # fmt: skip
        r = admin.put("/api/secrets/bin", json={"base64": base64.b64encode(VALUE).decode()})
        answers.append(r.text)
        assert r.status_code == 200 and r.json()["size"] == len(VALUE)
        r = admin.put("/api/secrets/db-password", json={"value": TEXT + "2"})
        answers.append(r.text)
        assert r.json()["version"] == 2
        r = admin.get("/api/secrets")
        answers.append(r.text)
        assert [(x["name"], x["version"]) for x in r.json()] == [("bin", 1), ("db-password", 2)]
        for body, status in [
            ({}, 422), ({"value": TEXT, "base64": "AA=="}, 422), ({"base64": "not base64!"}, 422),
            ({"value": TEXT, "extra": 1}, 422), ({"value": "x" * (MAX_VALUE + 1)}, 422),
            ({"value": "é" * (MAX_VALUE // 2 + 1)}, 413), ({"value": ""}, 422),
        ]:  # fmt: skip
            r = admin.put("/api/secrets/other", json=body)
            answers.append(r.text)
            assert r.status_code == status, (body, r.text)
            assert r.headers["content-type"] == "application/problem+json"
        r = admin.put("/api/secrets/.hidden", json={"value": TEXT})
        answers.append(r.text)
        assert r.status_code == 422 and "is not a secret's name" in r.json()["detail"]
        for who in ("operator", "viewer"):
            with server.client(TOKENS[who]) as c:
                for method, path, body in [
                    ("GET", "/api/secrets", None),
                    ("PUT", "/api/secrets/db-password", {"value": "overwritten"}),
                    ("DELETE", "/api/secrets/db-password", None),
                ]:
                    r = c.request(method, path, json=body)
                    answers.append(r.text)
                    assert r.status_code == 403, (who, method, r.text)
                    assert "this needs admin" in r.json()["detail"]
        with server.client() as nobody:
            assert nobody.get("/api/secrets").status_code == 401
        r = admin.delete("/api/secrets/bin")
        assert r.status_code == 200 and r.json() == {"name": "bin", "status": "removed"}
        r = admin.delete("/api/secrets/bin")
        assert r.status_code == 404 and r.json()["title"] == "No such secret"
        r = admin.get("/api/events", params={"limit": 10_000})
        answers.append(r.text)
        secret_events = [e for e in r.json() if e["kind"] == "secret"]
        assert [(e["status"], e["name"], e.get("version")) for e in secret_events] == [
            ("PUT", "db-password", 1), ("PUT", "bin", 1), ("PUT", "db-password", 2),
            ("REMOVED", "bin", None),
        ]  # fmt: skip
        assert all(e["actor"] == "admin" for e in secret_events)
        r = admin.post("/api/config/render", json={"key": "x", "vars": {}})
        answers.append(r.text)
        r = admin.post("/api/workflows/render", json={"workflow": "hello"})
        answers.append(r.text)
        answers.append(admin.get("/openapi.json").text)
        answers.append(admin.get("/metrics").text)
    for text in answers:
        assert TEXT not in text and "correct horse" not in text
        assert base64.b64encode(VALUE).decode() not in text
    assert "correct horse" not in json.dumps(answers)


def test_the_command_line_round_trip(server: Server, tmp_path: Path) -> None:
    value = b"from-the-cli-\x01\xfe-7c3e"
    r = corral(server, server.admin, "secret", "put", "cli.one", stdin=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == f"cli.one: version 1, {len(value)} bytes"
    f = tmp_path / "value"
    f.write_bytes(value + b"\n")
    r = corral(server, server.admin, "secret", "put", "cli.two", "--from-file", str(f))
    assert r.returncode == 0 and b"version 1" in r.stdout
    r = corral(server, server.admin, "secret", "list", "-o", "json")
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows["cli.one"]["size"] == len(value) and rows["cli.two"]["size"] == len(value) + 1
    r = corral(server, server.admin, "secret", "list")
    assert r.returncode == 0 and b"cli.one" in r.stdout and b"UTC" in r.stdout
    r = corral(server, TOKENS["operator"], "secret", "put", "cli.one", stdin=b"nope")
    assert r.returncode == 1 and b"Forbidden (403)" in r.stderr
    r = corral(server, server.admin, "secret", "put", "../etc", stdin=b"x")
    assert r.returncode == 2 and b"is not a secret's name" in r.stderr
    r = corral(server, server.admin, "secret", "put", "empty", stdin=b"")
    assert r.returncode == 1 and b"empty" in r.stderr
    r = corral(server, server.admin, "secret", "rm", "cli.one")
    assert r.returncode == 0 and r.stdout.decode().strip() == "cli.one: removed"
    r = corral(server, server.admin, "secret", "rm", "cli.one")
    assert r.returncode == 1 and b"No such secret (404)" in r.stderr
    r = corral(server, server.admin, "secret", "list", "-o", "json")
    assert [x["name"] for x in json.loads(r.stdout)] == ["cli.two", "db-password"]
    with server.client(server.admin) as admin:
        everything = admin.get("/api/events", params={"limit": 10_000}).text
    assert "from-the-cli" not in everything


def test_the_server_holds_no_value_where_others_look(server: Server) -> None:
    """The server's files, log and process (after this module's other tests, if run)."""
    with server.client(server.admin) as admin:
        r = admin.put("/api/secrets/late", json={"value": TEXT})
        assert r.status_code == 200, r.text
    assert server.proc is not None
    pid = server.proc.pid
    for name in ("environ", "cmdline"):
        try:
            data = Path(f"/proc/{pid}/{name}").read_bytes()
        except PermissionError:  # non-dumpable: root only
            continue
        assert TEXT.encode() not in data and b"from-the-cli" not in data
    log = server.log.read_bytes()
    assert TEXT.encode() not in log and b"from-the-cli" not in log
    db = sqlite3.connect(f"file:{server.data / 'corral.db'}?mode=ro", uri=True)
    try:
        bodies = [row[0] for row in db.execute("SELECT body FROM events")]
    finally:
        db.close()
    assert any('"kind": "secret"' in b for b in bodies)
    assert not any(TEXT in b or "from-the-cli" in b for b in bodies)
    for p in server.data.iterdir():
        if p.is_file():
            data = p.read_bytes()
            assert TEXT.encode() not in data and b"from-the-cli" not in data, p


def test_the_key_file_is_beside_the_store_unless_given() -> None:
    assert secrets_key_file("/srv/corral") == "/srv/corral/secrets.key"
    r = CliRunner().invoke(serve, ["--help"])
    assert "--secrets-key FILE" in r.output and "Best kept elsewhere" in r.output


def test_a_key_file_others_may_read_stops_the_server(tmp_path: Path) -> None:
    key = tmp_path / "open.key"
    key.write_bytes(Fernet.generate_key())
    key.chmod(0o644)
    r = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--data", str(tmp_path / "data"),
         "--listen", "127.0.0.1:0", "--backend", "sim", "--secrets-key", str(key)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 1
    assert "secrets: the key file" in r.stderr and "chmod 600" in r.stderr
    assert "serving on" not in r.stdout


def test_the_directories_a_dead_server_left_are_removed_by_owner(tmp_path: Path) -> None:
    from corral.control.secretfiles import remove_left

    mine = materialize("jabc:0", {"a": b"x"}, base=str(tmp_path))
    also = materialize("jabc:12", {"a": b"x"}, base=str(tmp_path))
    other = materialize("jabcd:0", {"a": b"x"}, base=str(tmp_path))  # a longer id: not it
    (tmp_path / "unrelated").mkdir()
    runs = materialize("jabc:3", {"a": b"x"}, base=str(tmp_path))  # taken over: it runs
    assert remove_left(["jabc"], base=str(tmp_path), keep={"jabc:3"}) == (2, {"jabc:3": runs})
    assert not os.path.exists(mine) and not os.path.exists(also)
    assert os.path.exists(other) and (tmp_path / "unrelated").exists()
    assert os.path.exists(runs)
    assert remove_left([], base=str(tmp_path)) == (0, {})
