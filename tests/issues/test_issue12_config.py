"""The configuration store (issue 12, item 2): AliECS's Consul payloads and apricot's
queries, as corral's own: versioned payloads with a global revision, apricot's
resolution fallbacks, payloads rendered with Jinja2 in a sandbox with includes, the
runtime key-value table, their API (admin writes) and ``corral config``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from corral.store.sqlite import SqliteStore
from corral.templates.configpayload import (
    MAX_PAYLOAD,
    ConfigError,
    ConfigNotFound,
    ConfigTooLarge,
    RenderError,
    check_key,
    render,
    resolve,
    resolve_path,
    sources,
)
from tests.api.server import Server
from tests.conftest import ROOT

# -- the store ----------------------------------------------------------------------------------


def test_every_put_is_a_version_with_its_writer_and_a_global_revision(tmp_path: Path) -> None:
    path = str(tmp_path / "corral.db")
    store = SqliteStore(path)
    assert store.config_revision() == 0
    assert store.config_get("tpc/ANY/any/readout") is None
    assert store.config_put("tpc/ANY/any/readout", "rate = 1\n", "alice", 100.0) == 1
    assert store.config_put("its/ANY/any/readout", "its\n", "bob", 101.0) == 2
    assert store.config_put("tpc/ANY/any/readout", "rate = 2\n", "bob", 102.0) == 3
    assert store.config_revision() == 3
    assert store.config_get("tpc/ANY/any/readout") == {
        "key": "tpc/ANY/any/readout", "payload": "rate = 2\n", "revision": 3, "version": 2,
        "writer": "bob", "time": 102.0,
    }  # fmt: skip
    # as of a revision: the version current then
    assert store.config_get("tpc/ANY/any/readout", 2)["payload"] == "rate = 1\n"  # type: ignore[index]
    assert store.config_get("tpc/ANY/any/readout", 1)["writer"] == "alice"  # type: ignore[index]
    assert store.config_get("its/ANY/any/readout", 1) is None  # not written yet
    assert store.config_get("tpc/ANY/any/readout", 0) is None
    with pytest.raises(ConfigError, match="revision 4 is after the current one, 3"):
        store.config_get("tpc/ANY/any/readout", 4)
    assert [(h["revision"], h["version"], h["writer"], h["size"])
            for h in store.config_history("tpc/ANY/any/readout")] == [
        (1, 1, "alice", 9), (3, 2, "bob", 9)]  # fmt: skip
    assert store.config_history("nothing/here") == []
    assert store.config_keys() == ["its/ANY/any/readout", "tpc/ANY/any/readout"]
    assert store.config_keys("tpc/") == ["tpc/ANY/any/readout"]
    assert store.config_keys("t") == ["tpc/ANY/any/readout"]
    assert store.config_keys(revision=1) == ["tpc/ANY/any/readout"]
    assert store.config_keys("tpc/ANY/any/readout/") == []
    # runtime entries: one value each, replaced
    assert store.runtime_get("aliecs", "last_run") is None
    store.runtime_set("aliecs", "last_run", "41", "alice", 103.0)
    store.runtime_set("aliecs", "last_run", "42", "bob", 104.0)
    store.runtime_set("tpc", "flp1/state", "ok", "bob", 105.0)
    assert store.runtime_get("aliecs", "last_run") == "42"
    assert store.runtime_entry("aliecs", "last_run") == {
        "component": "aliecs", "key": "last_run", "value": "42", "writer": "bob", "time": 104.0,
    }  # fmt: skip
    store.close()
    again = SqliteStore(path)  # all of it on disk
    assert again.config_revision() == 3
    assert again.config_get("tpc/ANY/any/readout", 2)["payload"] == "rate = 1\n"  # type: ignore[index]
    assert again.runtime_get("tpc", "flp1/state") == "ok"
    # the reader a render's thread uses reads the same
    reader = again.config_reader()
    assert reader.payload("tpc/ANY/any/readout", 2) == "rate = 1\n"
    assert reader.payload("tpc/ANY/any/readout", 0) is None
    reader.close()
    again.close()


HOSTILE_KEYS = [
    ("", "is empty"),
    ("a/../b", "'..' part"),
    ("../etc/passwd", "'..' part"),
    ("a/./b", "'.' part"),
    ("/abs", "empty part"),
    ("trailing/", "empty part"),
    ("a//b", "empty part"),
    ("a\0b", "characters a key may not have"),
    ("a b", "characters a key may not have"),
    ("a\\b", "characters a key may not have"),
    ("tpc/ANY/any/entry@1700000000", "characters a key may not have"),
    ("ключ", "characters a key may not have"),
    ("x" * 513, "at most 512"),
    ("/".join(["a"] * 33), "at most 32"),
    ("a/" + "b" * 129, "at most 128"),
    (".hidden", "must start with"),
]


@pytest.mark.parametrize(("key", "why"), HOSTILE_KEYS)
def test_hostile_keys_are_refused_with_the_reason(tmp_path: Path, key: str, why: str) -> None:
    store = SqliteStore(str(tmp_path / "corral.db"))
    with pytest.raises(ConfigError, match=why):
        store.config_put(key, "x", "alice", 1.0)
    with pytest.raises(ConfigError, match=why):
        store.config_get(key)
    with pytest.raises(ConfigError, match=why):
        store.runtime_set("aliecs", key, "x", "alice", 1.0)
    assert store.config_revision() == 0
    store.close()


def test_hostile_payloads_are_refused(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "corral.db"))
    with pytest.raises(ConfigTooLarge, match=f"at most {MAX_PAYLOAD}"):
        store.config_put("a/b", "x" * (MAX_PAYLOAD + 1), "alice", 1.0)
    with pytest.raises(ConfigTooLarge):  # bytes, not characters
        store.config_put("a/b", "é" * (MAX_PAYLOAD // 2 + 1), "alice", 1.0)
    with pytest.raises(ConfigError, match="NUL character"):
        store.config_put("a/b", "ok\0no", "alice", 1.0)
    with pytest.raises(ConfigError, match="not valid text"):
        store.config_put("a/b", "\ud800", "alice", 1.0)
    with pytest.raises(ConfigError, match="writer"):
        store.config_put("a/b", "x", "", 1.0)
    with pytest.raises(ConfigError, match="component"):
        store.runtime_set("a/../b", "k", "v", "alice", 1.0)
    assert store.config_revision() == 0 and store.config_keys() == []
    # AliECS keeps component/key as one path: runtime.Get('trg/ltu', 'x') is trg/ltu/x
    store.runtime_set("trg/ltu", "x", "v", "alice", 1.0)
    assert store.runtime_get("trg", "ltu/x") == "v" == store.runtime_get("trg/ltu", "x")
    assert store.config_put("a/b", "x" * MAX_PAYLOAD, "alice", 1.0) == 1  # the limit itself
    store.close()


# The schema before the configuration store (the commit before it): a store it made.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS environments(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, source TEXT, state TEXT NOT NULL,
    variables TEXT NOT NULL, run_number INTEGER, error TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, created_by TEXT, recipe TEXT);
CREATE TABLE IF NOT EXISTS tasks(
    env TEXT NOT NULL, idx INTEGER NOT NULL, path TEXT NOT NULL, class TEXT NOT NULL,
    node TEXT NOT NULL, state TEXT NOT NULL, critical INTEGER NOT NULL,
    pid INTEGER, reason TEXT, since REAL, hook INTEGER NOT NULL DEFAULT 0, ports TEXT,
    PRIMARY KEY(env, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs(
    number INTEGER PRIMARY KEY, env TEXT NOT NULL, started REAL NOT NULL, stopped REAL);
CREATE TABLE IF NOT EXISTS transitions(
    id INTEGER PRIMARY KEY, env TEXT NOT NULL, event TEXT NOT NULL, src TEXT NOT NULL,
    dst TEXT, status TEXT NOT NULL, started REAL NOT NULL, ended REAL, error TEXT,
    actor TEXT);
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY, time REAL NOT NULL, env TEXT, kind TEXT NOT NULL,
    body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_env ON events(env, seq);
CREATE TABLE IF NOT EXISTS tokens(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, created_by TEXT, revoked REAL);
CREATE TABLE IF NOT EXISTS locks(
    detector TEXT PRIMARY KEY, holder TEXT NOT NULL, taken REAL NOT NULL);
"""


def test_a_store_of_the_schema_before_is_upgraded_and_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "corral.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO meta VALUES ('run_number', '7')")
    db.execute(
        "INSERT INTO environments(id, name, state, variables, created, updated, created_by) "
        "VALUES ('3kq2v7b1xza', 'hello', 'DONE', '{}', 1.0, 2.0, 'alice')"
    )
    db.execute(
        'INSERT INTO events VALUES (1, 1.0, NULL, \'token\', \'{"seq": 1, "kind": "token"}\')'
    )
    db.execute("INSERT INTO tokens VALUES ('62328389', 'admin', 'admin', 'ab', 1.0, NULL, NULL)")
    db.commit()
    db.close()
    store = SqliteStore(str(path))
    assert store.environment("3kq2v7b1xza")["created_by"] == "alice"  # type: ignore[index]
    assert [e["seq"] for e in store.events()] == [1] and store.last_seq() == 1
    assert store.get_meta("run_number") == "7"
    assert [t["id"] for t in store.tokens()] == ["62328389"]
    assert store.config_revision() == 0
    assert store.config_put("tpc/ANY/any/readout", "x", "alice", 3.0) == 1
    store.runtime_set("aliecs", "k", "v", "alice", 3.0)
    store.close()
    store = SqliteStore(str(path))  # and opening it again changes nothing
    assert store.config_get("tpc/ANY/any/readout")["payload"] == "x"  # type: ignore[index]
    assert store.runtime_get("aliecs", "k") == "v"
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master")}
    assert {"config", "runtime", "environments", "events"} <= tables
    store.close()


# -- apricot's resolution --------------------------------------------------------------------------


def test_resolve_falls_back_as_apricot_does() -> None:
    """ResolveComponentQuery: the query, then RUNTYPE -> ANY, then rolename -> any (with
    the query's run type), then both; none: an error (apricot: "could not resolve
    configuration path ...")."""
    every = {
        "tpc/PHYSICS/flp1/readout", "tpc/ANY/flp1/readout", "tpc/PHYSICS/any/readout",
        "tpc/ANY/any/readout",
    }  # fmt: skip
    assert resolve("tpc", "PHYSICS", "flp1", "readout", every) == "tpc/PHYSICS/flp1/readout"
    assert resolve("tpc", "PHYSICS", "flp1", "readout", every - {"tpc/PHYSICS/flp1/readout"}) == (
        "tpc/ANY/flp1/readout"
    )  # the run type falls back before the role name
    assert resolve("tpc", "PHYSICS", "flp2", "readout", every) == "tpc/PHYSICS/any/readout"
    assert resolve("tpc", "COSMICS", "flp2", "readout", every) == "tpc/ANY/any/readout"
    assert resolve("tpc", "COSMICS", "flp1", "readout", every) == "tpc/ANY/flp1/readout"
    assert resolve_path("tpc/TECHNICAL/flp9/readout", every) == "tpc/ANY/any/readout"
    assert resolve("tpc", "ANY", "any", "readout", every) == "tpc/ANY/any/readout"
    # entries may have parts of their own
    assert resolve("qc", "PHYSICS", "epn", "tasks/its", {"qc/ANY/any/tasks/its"}) == (
        "qc/ANY/any/tasks/its"
    )
    with pytest.raises(ConfigNotFound) as e:
        resolve("tpc", "PHYSICS", "flp1", "missing", every)
    assert str(e.value).startswith("could not resolve configuration path tpc/PHYSICS/flp1/missing")
    assert "tpc/ANY/any/missing" in str(e.value)
    for bad, why in [
        (("tpc", "physics", "flp1", "readout"), "run type 'physics'"),
        (("tp c", "PHYSICS", "flp1", "readout"), "component 'tp c'"),
        (("tpc", "PHYSICS", "flp.1", "readout"), "role name 'flp.1'"),
        (("tpc", "PHYSICS", "flp1", "../x"), "entry '../x'"),
        (("tpc", "PHYSICS", "flp1", ""), "entry ''"),
    ]:
        with pytest.raises(ConfigError, match=why):
            resolve(*bad, every)
    with pytest.raises(ConfigError, match="expected component/RUNTYPE/rolename/entry"):
        resolve_path("tpc/PHYSICS/readout", every)


# -- rendering -------------------------------------------------------------------------------------


def getter(payloads: dict[str, str]) -> Callable[[str], str | None]:
    return payloads.get


def test_render_with_variables_and_nested_includes() -> None:
    payloads = {
        "tpc/ANY/any/readout": (
            '[readout]\nrate = {{ rate }}\n{% include "links" %}\n'
            '{% include "/common/ANY/any/footer" %}'
        ),
        # a name already under the directory is taken as it is (apricot's loader)
        "tpc/ANY/any/links": "links = {% for i in range(links|int) %}{{ i }},{% endfor %}\n"
        '{% include "tpc/ANY/any/sub/card" %}',
        "tpc/ANY/any/sub/card": "card = {{ card | default('none') | upper }}",
        "common/ANY/any/footer": "# {{ 'by corral' | title }}{% from 'macros' import m %}",
        # includes resolve against the directory of the key being rendered
        "tpc/ANY/any/macros": "{% macro m() %}m{% endmacro %}",
    }
    text = render("tpc/ANY/any/readout", getter(payloads), {"rate": "200", "links": "3"})
    assert text == "[readout]\nrate = 200\nlinks = 0,1,2,\ncard = NONE\n# By Corral"
    assert set(sources("tpc/ANY/any/readout", getter(payloads))) == set(payloads)
    text = render("tpc/ANY/any/links", getter(payloads), {"links": "1", "card": "cru"})
    assert text == "links = 0,\ncard = CRU"


def test_include_errors_name_the_key_and_line() -> None:
    payloads = {
        "a/x": "one\n{% include 'y' %}",
        "a/y": "two\n\n{% include 'x' %}",  # a cycle
        "b/x": "fine\n{% include 'gone' %}",
        "c/x": "{% include name %}",
        "d/x": "{% include ['gone1', 'gone2'] %}",
        "e/x": "{% include 'gone' ignore missing %}ok",
        "f/x": "{% include '../up' %}",
    }
    get = getter(payloads)
    with pytest.raises(RenderError, match=r"^a/y: include cycle: a/x -> a/y -> a/x$"):
        render("a/x", get, {})
    with pytest.raises(RenderError) as e:
        render("b/x", get, {})
    assert str(e.value) == "b/x:2: includes b/gone, which does not exist"
    assert (e.value.key, e.value.line) == ("b/x", 2)
    with pytest.raises(RenderError, match=r"^c/x:1: the name of an included payload must be"):
        render("c/x", get, {})
    with pytest.raises(RenderError, match="none of d/gone1, d/gone2"):
        render("d/x", get, {})
    assert render("e/x", get, {}) == "ok"
    with pytest.raises(ConfigError, match=r"'\.\.' part"):
        render("f/x", get, {})
    with pytest.raises(ConfigNotFound, match="no configuration payload at z/x"):
        render("z/x", get, {})


def test_include_depth_is_bounded() -> None:
    chain = {f"d/{i}": f"{i} {{% include '{i + 1}' %}}" for i in range(40)}
    chain["d/40"] = "end"
    with pytest.raises(RenderError, match="includes nested more than 16 deep"):
        render("d/0", getter(chain), {})
    assert render("d/30", getter(chain), {}) == "30 31 32 33 34 35 36 37 38 39 end"
    # a diamond is read once per payload, and its depth counted through the shared part
    wide = {f"w/{i}": f"{{% include '{i + 1}' %}}{{% include '{i + 1}' %}}" for i in range(15)}
    wide["w/15"] = "x"
    assert len(sources("w/0", getter(wide))) == 16
    assert render("w/0", getter(wide), {}) == "x" * 2**15
    wide["w/15"] = "{% include '16' %}"
    wide["w/16"] = "y"
    with pytest.raises(RenderError, match="nested more than 16 deep"):
        render("w/0", getter(wide), {})


def test_undefined_variables_and_template_errors_say_key_and_line() -> None:
    payloads = {
        "t/undefined": "line 1\nline 2 {{ detector }}",
        "t/syntax": "ok\n{% if %}",
        "t/inner": "{% include 'deep' %}",
        "t/deep": "\n\n{{ 1 // zero }}",
        "t/unclosed": "{% for x in y %}",
    }
    get = getter(payloads)
    with pytest.raises(RenderError) as e:
        render("t/undefined", get, {})
    assert str(e.value) == "t/undefined:2: undefined: 'detector' is undefined"
    with pytest.raises(RenderError, match=r"^t/syntax:2: Expected an expression"):
        render("t/syntax", get, {})
    with pytest.raises(RenderError, match=r"^t/deep:3: ZeroDivisionError"):
        render("t/inner", get, {"zero": 0})  # type: ignore[dict-item]
    with pytest.raises(RenderError, match=r"^t/unclosed:1: Unexpected end of template"):
        render("t/unclosed", get, {})


ESCAPES = [
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ range.__globals__ }}", "unsafe"),
    ("{{ self._TemplateReference__context }}", "unsafe"),
    ("{{ [].append(1) }}", "unsafe"),  # immutable
    ("{{ {}.update(a=1) }}", "unsafe"),
    ("{{ lipsum.__globals__ }}", "'lipsum' is undefined"),
    ("{{ cycler.__init__.__globals__ }}", "unsafe"),  # there is no cycler
    ("{% set ns = namespace(s='x') %}", "'namespace' is undefined"),
    ("{{ 'x'.ljust(10**9) }}", "str.ljust() is not allowed"),
    ("{{ '{0:>1000000000}'.format(1) }}", "str.format() is not allowed"),
    ("{{ 'x' * 10**10 }}", "a repetition"),
    ("{{ ['x'] * 10**10 }}", "a repetition"),
    ("{{ 2 ** 100000 }}", "a power of more than"),
    ("{% set a = 2**2000 %}{{ a * a * a }}", "a product of more than"),
    ("{{ '%0999999999d' % 1 }}", "%-format width"),
    ("{{ '%*d' % (10**9, 1) }}", "'*'"),
    ("{{ 'x'|center(10**9) }}", "center() wider"),
    ("{{ 'x'|indent(10**9) }}", "indent() of more than"),
    ("{{ '%0999999999d'|format(1) }}", "%-format width"),
    ("{{ ('x' * 10**6).replace('', 'yyyy') }}", "replace() would make"),
    ("{{ ('x' * 10**6)|replace('x', 'yyyyy') }}", "replace() would make"),
    ("{{ ('x' * 10**6).join(range(10)) }}", "join() would make"),
    ("{{ range(10)|join('x' * 10**6) }}", "join() would make"),
    ("{{ 'x'|pprint }}", "No filter named 'pprint'"),
    ("{{ [1,2]|random }}", "No filter named 'random'"),
    ("{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}", "recursive loops"),
    ("{% macro d(n) %}{{ d(n) }}{% endmacro %}{{ d(1) }}", "too deeply nested"),
    ("{% macro d(s) %}{{ d(s ~ s) }}{% endmacro %}{{ d('x') }}", "larger than"),
    ("{% set a = 'x' * 4000000 %}{{ a ~ a }}", "larger than"),
    ("{% set a = ['x' * 1000000] %}{% set b = [a, a, a, a, a] %}", "larger than"),
    ("{% set a = ['x' * 1000000] %}{{ a + a + a + a + a }}", "a sum larger"),
    # a block that repeats its literal text, captured, never output
    ("{% set a %}{% for i in range(100000) %}" + "x" * 400 + "{% endfor %}{% endset %}",
     "produced more than"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "more than 1000000 steps"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "why"), ESCAPES)
def test_sandbox_escapes_and_bombs_are_refused(payload: str, why: str) -> None:
    with pytest.raises(RenderError) as e:
        render("evil/x", getter({"evil/x": payload}), {})
    assert why in str(e.value)
    assert str(e.value).startswith("evil/x")


def test_a_render_stops_at_its_time_limit() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 0.5  # each look at the clock: half a second later
        return now[0]

    payload = "{% for i in range(1000) %}{{ i }}{% endfor %}"
    with pytest.raises(RenderError, match="took longer than 10 s"):
        render("slow/x", getter({"slow/x": payload}), {}, clock=clock, time_limit=10.0)
    assert render("slow/x", getter({"slow/x": payload}), {}, max_steps=2000).startswith("0123")


def test_keys_are_checked_where_they_come_in() -> None:
    assert check_key("tpc/ANY/any/readout") == "tpc/ANY/any/readout"
    assert check_key("a-b_c.d/e.f") == "a-b_c.d/e.f"
    with pytest.raises(ConfigError, match="must be text"):
        check_key(None)


# -- the API, on a real server ---------------------------------------------------------------------


def tokens(s: Server) -> dict[str, str]:
    out = {"admin": s.admin}
    with s.client(s.admin) as c:
        for role in ("operator", "viewer"):
            r = c.post("/api/tokens", json={"role": role, "name": f"cfg-{role}"})
            assert r.status_code == 201, r.text
            out[role] = r.json()["token"]
    return out


def test_the_api(tmp_path: Path) -> None:
    with Server(tmp_path / "data", "--backend", "sim") as s:
        t = tokens(s)
        admin, op, viewer = (s.client(t[r]) for r in ("admin", "operator", "viewer"))
        with admin, op, viewer:
            key = "tpc/ANY/any/readout"
            r = viewer.get(f"/api/config/{key}")
            assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
            assert r.json()["detail"] == f"no configuration payload at {key}"
            r = admin.put(
                f"/api/config/{key}", json={"payload": "rate = {{ rate }}\n{% include 'links' %}"}
            )
            assert r.status_code == 200, r.text
            assert r.json() | {"time": 0} == {"key": key, "revision": 1, "version": 1,
                                              "writer": "admin", "time": 0}  # fmt: skip
            assert (
                admin.put("/api/config/tpc/ANY/any/links", json={"payload": "links = 1"}).json()[
                    "revision"
                ]
                == 2
            )
            r = admin.put(
                f"/api/config/{key}", json={"payload": "rate = {{ rate }}!\n{% include 'links' %}"}
            )
            assert r.json()["revision"] == 3 and r.json()["version"] == 2
            assert (
                admin.put("/api/config/tpc/ANY/any/links", json={"payload": "links = 2"}).json()[
                    "revision"
                ]
                == 4
            )
            # read: now, and as of a revision
            assert (
                viewer.get(f"/api/config/{key}").json()["payload"].startswith("rate = {{ rate }}!")
            )
            old = viewer.get(f"/api/config/{key}", params={"revision": 2}).json()
            assert (old["revision"], old["version"], old["payload"][:16]) == (
                1,
                1,
                "rate = {{ rate }",
            )
            assert viewer.get(f"/api/config/{key}", params={"revision": 0}).status_code == 404
            r = viewer.get(f"/api/config/{key}", params={"revision": 99})
            assert (
                r.status_code == 422
                and "revision 99 is after the current one, 4" in r.json()["detail"]
            )
            history = viewer.get(f"/api/config-history/{key}").json()
            assert [(h["revision"], h["version"], h["writer"]) for h in history] == [
                (1, 1, "admin"), (3, 2, "admin")]  # fmt: skip
            assert viewer.get("/api/config-history/no/such").status_code == 404
            # render: now, and pinned (the includes at that revision too)
            r = viewer.post("/api/config/render", json={"key": key, "vars": {"rate": "200"}})
            assert r.status_code == 200, r.text
            assert r.json() == {"key": key, "revision": 4, "text": "rate = 200!\nlinks = 2",
                                "includes": ["tpc/ANY/any/links"]}  # fmt: skip
            r = viewer.post(
                "/api/config/render", json={"key": key, "vars": {"rate": "1"}, "revision": 2}
            )
            assert r.json()["text"] == "rate = 1\nlinks = 1"
            r = viewer.post("/api/config/render", json={"key": key})
            assert r.status_code == 422
            assert r.json()["detail"] == f"{key}:1: undefined: 'rate' is undefined"
            assert (r.json()["key"], r.json()["line"]) == (key, 1)
            assert viewer.post("/api/config/render", json={"key": "no/such"}).status_code == 404
            # keys
            assert viewer.get("/api/config", params={"prefix": "tpc/"}).json() == {
                "revision": 4, "prefix": "tpc/", "keys": ["tpc/ANY/any/links", key]}  # fmt: skip
            assert viewer.get("/api/config", params={"revision": 1}).json()["keys"] == [key]
            # an operator may read, not write: 403, and nothing stored
            r = op.put("/api/config/tpc/ANY/any/new", json={"payload": "x"})
            assert r.status_code == 403 and "needs admin" in r.json()["detail"]
            r = op.put(f"/api/config/{key}", json={"payload": "overwritten"})
            assert r.status_code == 403
            assert viewer.get("/api/config/tpc/ANY/any/new").status_code == 404
            assert viewer.get("/api/config").json()["revision"] == 4
            assert op.put("/api/runtime/aliecs/last_run", json={"value": "1"}).status_code == 403
            # hostile keys and payloads
            for path, why in [
                ("/api/config/a/%2E%2E/b", "'..' part"),
                ("/api/config/a%00b", "characters a key may not have"),
                ("/api/config/a//b", "empty part"),
                ("/api/config/" + "x" * 600, "at most 512"),
            ]:
                r = admin.put(path, json={"payload": "x"})
                assert r.status_code == 422 and why in r.json()["detail"], (path, r.text)
                assert admin.get(path).status_code == 422
            r = admin.put("/api/config/a/b", json={"payload": "x\0"})
            assert r.status_code == 422 and "NUL" in r.json()["detail"]
            r = admin.put("/api/config/a/b", json={"payload": "x" * (MAX_PAYLOAD + 10)})
            assert r.status_code == 413
            r = admin.put("/api/config/evil/x", json={"payload": "{{ ''.__class__.__mro__ }}"})
            assert r.status_code == 200  # stored: it is text; rendering it is refused
            r = viewer.post("/api/config/render", json={"key": "evil/x"})
            assert r.status_code == 422 and "is unsafe" in r.json()["detail"]
            assert r.json()["line"] == 1
            assert viewer.get("/api/config").json()["revision"] == 5
            # runtime entries
            assert viewer.get("/api/runtime/aliecs/last_run").status_code == 404
            r = admin.put("/api/runtime/aliecs/last_run", json={"value": "42"})
            assert r.status_code == 200 and r.json()["writer"] == "admin"
            got = viewer.get("/api/runtime/aliecs/last_run").json()
            assert (got["value"], got["writer"]) == ("42", "admin")
            # the writes are events, with their actor, never the payload
            events = [
                e for e in admin.get("/api/events").json() if e["kind"] in ("config", "runtime")
            ]
            assert [(e["kind"], e.get("key"), e.get("revision"), e["actor"]) for e in events] == [
                ("config", key, 1, "admin"), ("config", "tpc/ANY/any/links", 2, "admin"),
                ("config", key, 3, "admin"), ("config", "tpc/ANY/any/links", 4, "admin"),
                ("config", "evil/x", 5, "admin"), ("runtime", "last_run", None, "admin"),
            ]  # fmt: skip
            assert all("payload" not in e for e in events)
            # a render that runs long runs off the loop: the server answers meanwhile,
            # and the render ends at its step limit with the reason
            bomb = "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
            assert admin.put("/api/config/slow/x", json={"payload": bomb}).status_code == 200
            result: list[httpx.Response] = []
            slow = threading.Thread(
                target=lambda: result.append(
                    viewer.post("/api/config/render", json={"key": "slow/x"})
                )
            )
            slow.start()
            answered = 0  # whoami answers while the render was under way
            while slow.is_alive():
                assert admin.get("/api/whoami").status_code == 200
                answered += slow.is_alive()
            slow.join()
            assert answered >= 5  # a render on the loop would hold every one of them
            assert result[0].status_code == 422 and "more than 1000000 steps" in result[0].text


# -- the command line ------------------------------------------------------------------------------


def corral(
    s: Server | None, token: str | None, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("CORRAL_TOKEN", None)
    env["CORRAL_SERVER"] = s.url if s else "http://127.0.0.1:9"
    if token:
        env["CORRAL_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env, input=stdin)  # fmt: skip


def test_the_command_line(tmp_path: Path) -> None:
    payload = tmp_path / "readout.cfg"
    payload.write_text("[readout]\nrate = {{ rate }}\n{% include 'footer' %}\n")
    with Server(tmp_path / "data", "--backend", "sim") as s:
        t = tokens(s)
        key = "tpc/PHYSICS/flp1/readout"
        r = corral(s, t["admin"], "config", "put", key, str(payload))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{key}: version 1, revision 1"
        r = corral(s, t["admin"], "config", "put", "tpc/PHYSICS/flp1/footer", stdin="# end\n")
        assert r.returncode == 0 and "revision 2" in r.stdout, r.stderr
        r = corral(s, t["admin"], "config", "put", key, "-", stdin="v2 {{ rate }}\n")
        assert "version 2, revision 3" in r.stdout, r.stderr
        r = corral(s, t["viewer"], "config", "get", key)
        assert r.returncode == 0 and r.stdout == "v2 {{ rate }}\n"
        r = corral(s, t["viewer"], "config", "get", key, "--revision", "2")
        assert r.stdout == payload.read_text()
        r = corral(s, t["viewer"], "config", "get", key, "-o", "json")
        assert json.loads(r.stdout)["writer"] == "admin"
        r = corral(s, t["viewer"], "config", "history", key, "-o", "json")
        assert [(h["version"], h["revision"]) for h in json.loads(r.stdout)] == [(1, 1), (2, 3)]
        r = corral(s, t["viewer"], "config", "history", key)
        assert r.returncode == 0 and "admin" in r.stdout and "UTC" in r.stdout
        r = corral(s, t["viewer"], "config", "list", "tpc/")
        assert r.stdout.split() == ["tpc/PHYSICS/flp1/footer", key]
        r = corral(s, t["viewer"], "config", "render", key, "-r", "2", "--var", "rate=300")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "[readout]\nrate = 300\n# end\n\n"  # each keeps its newline
        # refusals: exit 1 with the server's reason
        r = corral(s, t["viewer"], "config", "render", key, "-r", "2")
        assert r.returncode == 1 and "'rate' is undefined" in r.stderr and f"{key}:2" in r.stderr
        r = corral(s, t["operator"], "config", "put", key, stdin="nope")
        assert r.returncode == 1 and "Forbidden (403)" in r.stderr
        r = corral(s, t["viewer"], "config", "get", key, "-o", "json")
        assert json.loads(r.stdout)["version"] == 2  # nothing stored
        r = corral(s, t["viewer"], "config", "get", "no/such")
        assert r.returncode == 1 and "no configuration payload at no/such" in r.stderr
        binary = tmp_path / "binary"
        binary.write_bytes(b"\xff\xfe")
        r = corral(s, t["admin"], "config", "put", key, str(binary))
        assert r.returncode == 1 and "not UTF-8 text" in r.stderr
        # a bad key is refused before anything is sent: exit 2
        r = corral(s, t["admin"], "config", "get", "a/../b")
        assert r.returncode == 2 and "'..' part" in r.stderr
    r = corral(None, "x", "config", "get", key)
    assert r.returncode == 3 and "cannot reach" in r.stderr
