"""Attacks on the issue 11 fixes (see FINDINGS.md at the repository's root). Each test
here fails on the commit it was written against (ad1aa5d) and states what the docs
promise (docs/security.md, docs/templates.md, docs/calls.md, docs/api.md,
docs/operations.md).

"PWNED" is a file a hostile value tries to create; commands are run for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.calls import CallContext, CallError, parse_func
from corral.calls.builtin import ExecPlugin
from corral.model.plan import CallSpec
from corral.templates import DictSources, check
from tests.api.server import Server
from tests.conftest import dedent_files, expand_text
from tests.faults.test_server_kill import wait_for
from tests.issues.test_issue11_quoting import sh

# JSON text whose string escapes decode to the taint marks themselves (U+E001 ... U+E000)
ESCAPED_MARKS = "\\ue001; touch PWNED; \\ue000"


def shell_task(value: str) -> dict[str, str]:
    return {
        "wf.yaml": """
            name: w
            roles:
              - name: r
                task:
                  load: t
            """,
        "tasks/t.yaml": f"name: t\ncommand:\n  shell: true\n  value: {json.dumps(value)}\n",
    }


def run_call(spec: CallSpec) -> str | None:
    parsed = parse_func(spec.func)
    ctx = CallContext("e", "DEPLOY", "DEPLOY", spec.path, spec.func, None, {}, spec.env)
    return asyncio.run(ExecPlugin({}).call(parsed.method, parsed.args, ctx))


# -- 1. a caller's value escapes a shell script ------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    ["json.Unmarshal(hosts)[0]", "json.Unmarshal(hosts).join(' ')", "json.Unmarshal(cfg).host"],
)
def test_json_escapes_of_the_taint_marks_do_not_escape_the_value(expr: str, tmp_path: Path) -> None:
    """docs/templates.md documents ``json.Unmarshal(hosts)`` for a caller's JSON list.
    The caller's JSON may spell the private-use taint marks as ``\\ue001`` escapes:
    decoded inside the hole's result, they close the caller's bracket early, and what
    follows is pasted into the script as the template's own text."""
    files = shell_task(f"echo first {{{{ {expr} }}}}")
    variables = {"hosts": '["' + ESCAPED_MARKS + '"]', "cfg": '{"host": "' + ESCAPED_MARKS + '"}'}
    plan = expand_text(files, variables=variables)
    cmd = plan.tasks[0].command
    sh(cmd.value, cmd.env, tmp_path)
    assert not (tmp_path / "PWNED").exists(), (cmd.value, cmd.env)
    assert "touch" not in cmd.value, cmd.value  # the caller's text is not the script's


def test_json_escapes_in_a_range_built_by_the_template(tmp_path: Path) -> None:
    """The same through ``for: range`` over a JSON list the template builds around a
    caller's value (the items are parsed with json.loads, escapes decoded)."""
    files = {
        "wf.yaml": """
            name: w
            defaults:
              _hosts: '["{{ host }}", "spare"]'
            roles:
              - name: "n{{ uid.New() }}"
                for: {range: "{{ _hosts }}", var: h}
                task: {load: t}
            """,
        "tasks/t.yaml": "name: t\ncommand:\n  shell: true\n  value: 'echo {{ h }}'\n",
    }
    plan = expand_text(files, variables={"host": ESCAPED_MARKS})
    for t in plan.tasks:
        sh(t.command.value, t.command.env, tmp_path)
        assert not (tmp_path / "PWNED").exists(), t.command.value


def test_the_escaped_marks_reach_an_exec_shell_call(tmp_path: Path) -> None:
    files = {
        "wf.yaml": """
            name: w
            roles:
              - name: c
                call:
                  func: "exec.Shell('cd {{ dir }} && echo {{ json.Unmarshal(hosts)[0] }}')"
                  trigger: DEPLOY
            """
    }
    plan = expand_text(
        files, variables={"hosts": '["' + ESCAPED_MARKS + '"]'},
        global_defaults={"dir": str(tmp_path)},
    )  # fmt: skip
    with contextlib.suppress(CallError):
        run_call(plan.calls[0])
    assert not (tmp_path / "PWNED").exists(), plan.calls[0].func


@pytest.mark.parametrize(
    "hole",
    [
        "raw(strings.TrimSpace(flags))",
        "raw(flags + ' --verbose')",
        "raw(size(flags) > 0 ? flags : '--none')",
        "raw(strings.ToLower(flags))",
    ],
)
def test_a_raw_hole_over_an_expression_checks_the_callers_characters(
    hole: str, tmp_path: Path
) -> None:
    """docs/templates.md, Raw holes: a caller's value in ``{{ raw(expr) }}`` may hold
    words only; anything else is an error at the hole. Only a bare ``raw(name)`` is
    checked: any expression around the variable pastes ``;`` and the rest unchecked."""
    files = shell_task(f"o2-readout-exe {{{{ {hole} }}}}; true")
    plan, diags = check(
        "wf.yaml", DictSources(dedent_files(files)), variables={"flags": "--x; touch PWNED"}
    )
    if plan is not None:
        cmd = plan.tasks[0].command
        sh(cmd.value, cmd.env, tmp_path)
        assert not (tmp_path / "PWNED").exists(), cmd.value
    assert plan is None and "raw(" in str(diags[0]) and "';'" in str(diags[0]), plan


def test_exec_shell_with_a_triple_quoted_literal(tmp_path: Path) -> None:
    """docs/calls.md: in ``exec.Shell('…')`` a caller's value is kept out of the script.
    A func is parsed as Python literals (``ast``), which know ``'''…'''``; the quoting
    pass does not: a ``'`` inside the triple-quoted script makes it think the literal
    ended, so the value is pasted as a Python string literal, whose ``'`` then closes
    the shell's quote."""
    files = {
        "wf.yaml": """
            name: w
            roles:
              - name: say
                call:
                  func: "exec.Shell('''cd {{ dir }} && echo 'msg: {{ msg }}' ''')"
                  trigger: DEPLOY
            """
    }
    plan = expand_text(
        files, variables={"msg": "'; touch PWNED; '"}, global_defaults={"dir": str(tmp_path)}
    )
    try:
        out = run_call(plan.calls[0])
    except CallError as e:
        out = f"failed: {e}"
    assert not (tmp_path / "PWNED").exists(), plan.calls[0].func
    assert out == "msg: '; touch PWNED; '"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_arithmetic_expansion_when_sh_is_bash(tmp_path: Path) -> None:
    """``/bin/sh`` is bash on RHEL/Alma (the FLPs' systems). Bash evaluates the text of
    ``$(( "${CORRAL_VALUE_1}" ))`` as an expression, and an array subscript in it runs a
    command substitution: the value is parsed again, which docs/templates.md says never
    happens. (On dash, the same template line is a syntax error at run time.)"""
    files = shell_task("echo $(( {{ n }} + 1 ))")
    # fixed: in shell arithmetic a caller's value must be a whole number (pasted as is)
    plan, diags = check("wf.yaml", DictSources(dedent_files(files)),
                        variables={"n": "a[$(touch PWNED)]"})  # fmt: skip
    assert plan is None and "shell arithmetic must be a whole number" in str(diags[0])
    plan = expand_text(files, variables={"n": "41"})
    cmd = plan.tasks[0].command
    assert sh(cmd.value, cmd.env, tmp_path, shell="bash") == "42\n"
    assert not (tmp_path / "PWNED").exists(), cmd.value


# -- 1b. template-author-safe scripts that the quoting now breaks ------------------------------


@pytest.mark.parametrize(
    ("script", "value", "out"),
    [
        # a comment with an apostrophe: the quoting pass thinks a '...' string opened
        ("# don't forget the detector\necho {{ msg }}", "TPC", "TPC\n"),
        # arithmetic on a caller's number (dash: a syntax error at run time)
        ("echo $(( {{ n }} + 1 ))", "5", "6\n"),
    ],
    ids=["comment-with-apostrophe", "arithmetic"],
)
def test_scripts_the_quoting_must_not_break(
    script: str, value: str, out: str, tmp_path: Path
) -> None:
    """docs/templates.md: the value "is one word wherever it sits". After a comment
    holding an apostrophe the script prints the text ``"${CORRAL_VALUE_1}"`` instead of
    the value; in ``$(( ))`` the quotes around the reference make dash fail."""
    plan = expand_text(shell_task(script), variables={"msg": value, "n": value})
    cmd = plan.tasks[0].command
    assert sh(cmd.value, cmd.env, tmp_path) == out, cmd.value


# -- 2. a caller picks the file an include reads ------------------------------------------------


def test_a_callers_include_stays_in_the_workflows(tmp_path: Path) -> None:
    """``include: "{{ qc_workflow }}"``: the caller's value names any file the server can
    read (absolute, or ``../..``). Its text is then the template's own (trusted) text,
    and a file that is not a workflow is quoted back in the errors."""
    wf = tmp_path / "workflows"
    wf.mkdir()
    (wf / "inc.yaml").write_text(
        "name: inc\n"
        "defaults:\n"
        "  qc_workflow: !public {value: qc, type: string}\n"
        "roles:\n"
        "  - name: qc\n"
        '    include: "{{ qc_workflow }}"\n'
    )
    (wf / "qc.yaml").write_text(
        "name: qc\nroles:\n  - name: n\n    call: {func: test.Noop(), trigger: DEPLOY}\n"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "evil.yaml").write_text(
        "name: evil\nroles:\n  - name: pwn\n"
        "    call: {func: \"exec.Shell('touch PWNED')\", trigger: DEPLOY}\n"
    )
    (outside / "secret.env").write_text("DB_PASSWORD=s3cret-canary\n")
    from corral.store.files import DiskSources

    root = str(wf / "inc.yaml")
    plan, _ = check(root, DiskSources(), variables={"qc_workflow": str(outside / "evil.yaml")})
    assert plan is None or all("PWNED" not in c.func for c in plan.calls), plan.calls
    plan, diags = check(root, DiskSources(), variables={"qc_workflow": "../elsewhere/secret.env"})
    assert plan is None
    assert not any("s3cret-canary" in str(d) for d in diags), [str(d) for d in diags]


# -- servers ------------------------------------------------------------------------------------

MANY = """
name: many
defaults:
  workers: !public {value: "4", type: number}
roles:
  - name: "proc-{{ i }}"
    for: {begin: "1", end: "{{ workers }}", var: i}
    task: {load: worker}
"""
WORKER = """
name: worker
control: {mode: basic}
wants: {cpu: 0.0001, memory: 0}
command:
  value: /bin/sleep
  arguments: ["600"]
  env: ["WORKER_ID={{ i }}"]
"""
PICK = """
name: pick
defaults:
  nodes_regex: !public {value: ".*", type: string}
roles:
  - name: w
    constraints:
      - {attribute: machine_id, value: "{{ nodes_regex }}", operator: regex}
    vars: {i: "0"}
    task: {load: worker}
"""
INC = """
name: inc
defaults:
  qc_workflow: qc
roles:
  - name: qc
    include: "{{ qc_workflow }}"
"""
QC = """
name: qc
roles:
  - name: n
    call: {func: test.Noop(), trigger: DEPLOY}
"""
# a basic task and a call that keeps DEPLOY under way (for a crash in the middle)
SLOW_DEPLOY = """
name: slowdeploy
roles:
  - name: s
    task: {load: worker}
    vars: {i: "0"}
  - name: wait
    call: {func: test.Sleep(600), trigger: after_DEPLOY, timeout: 600s}
"""


def workflows(tmp: Path) -> Path:
    d = tmp / "workflows"
    (d / "tasks").mkdir(parents=True)
    (d / "tasks" / "worker.yaml").write_text(WORKER)
    for name, text in [("many", MANY), ("pick", PICK), ("inc", INC), ("qc", QC),
                       ("slowdeploy", SLOW_DEPLOY)]:  # fmt: skip
        (d / f"{name}.yaml").write_text(text)
    return d


def make_tokens(s: Server) -> dict[str, str]:
    out = {"admin": s.admin}
    with s.client(s.admin) as c:
        for role in ("operator", "viewer"):
            r = c.post("/api/tokens", json={"role": role, "name": f"t-{role}"})
            assert r.status_code == 201, r.text
            out[role] = r.json()["token"]
    return out


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("attacks")
    with Server(tmp / "data", "--backend", "sim", "--sim-nodes", "10",
                "--workflows", str(workflows(tmp))) as s:  # fmt: skip
        yield s, make_tokens(s)


# -- 3. time and memory ---------------------------------------------------------------------------


def test_a_viewers_render_is_streamed_whole(farm: tuple[Server, dict[str, str]]) -> None:
    """A viewer's render of 150,000 tasks was turned into JSON on the event loop (11 s
    and 2.3 GB for 1,000,000 tasks: long enough to fence an environment). Fixed: the
    plan becomes a dict in a worker thread and is sent as it is encoded, a slice of
    items at a time; ``bench/render_stall.py`` measures the loop meanwhile. Here: the
    answer is the whole plan, valid JSON, as ``corral template render -o json``."""
    s, tokens = farm
    with s.client(tokens["viewer"]) as v:
        r = v.post("/api/workflows/render", json={"workflow": "many", "vars": {"workers": "3000"}})
    assert r.status_code == 200, r.text[:300]
    plan = r.json()
    assert len(plan["tasks"]) == 3000 and plan["tasks"][-1]["path"].endswith("-3000")
    assert set(plan) >= {"name", "tasks", "calls", "channels", "public"}


def test_a_callers_regex_constraint_is_matched_in_linear_time(
    farm: tuple[Server, dict[str, str]],
) -> None:
    """A public variable used as a ``regex`` constraint was matched with Python's
    backtracking ``re`` on the event loop: ``(.?){24}(.?){24}Y`` takes minutes (every
    agent lease runs out). Fixed: RE2, linear in the value; what needs backtracking
    (a backreference) is an error at its place. A hang here ends at the client's 60 s."""
    s, tokens = farm
    with s.client(tokens["operator"]) as op:
        r = op.post(
            "/api/environments",
            json={
                "workflow": "pick",
                "vars": {"nodes_regex": "(.?){24}(.?){24}Y"},
                "dry_run": True,
            },
        )
        assert r.status_code in (200, 409), r.text
        r = op.post(
            "/api/environments",
            json={"workflow": "pick", "vars": {"nodes_regex": "(a)\\1"}, "dry_run": True},
        )
        assert r.status_code == 422, r.text
        assert "RE2 syntax" in str(r.json()["errors"]), r.text


# -- 4. variables that are not public -------------------------------------------------------------


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_a_variable_that_is_not_public_is_refused_when_the_expansion_fails(
    farm: tuple[Server, dict[str, str]], role: str, tmp_path: Path
) -> None:
    """docs/security.md: an operator may set only ``!public`` variables, a viewer render
    with those only; "Anything else: 403". When the expansion fails, the variables are
    never checked: the non-public value is used, and what it did is answered (here
    the text of a file it named; with 70,000 junk variables, a 60 s expansion slot)."""
    s, tokens = farm
    secret = tmp_path / "secret.env"
    secret.write_text("DB_PASSWORD=s3cret-canary\n")
    path = "/api/workflows/validate" if role == "viewer" else "/api/environments"
    with s.client(tokens[role]) as c:
        r = c.post(path, json={"workflow": "inc", "vars": {"qc_workflow": str(secret)}})
    assert "s3cret-canary" not in r.text, r.text
    assert r.status_code == 403, r.text


# -- 5. secrets ----------------------------------------------------------------------------------


def test_the_node_agent_does_not_hold_the_servers_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/security.md: tasks and exec calls never get the server's environment. The
    node agent the server starts keeps all of it (CORRAL_TOKEN, credentials), and a
    task is the agent's child, of the same user: ``/proc/$PPID/environ`` hands it over."""
    canary = "canary-" + os.urandom(8).hex()
    monkeypatch.setenv("CORRAL_TOKEN", "crl_" + "S" * 32)
    monkeypatch.setenv("SERVICE_PASSWORD", canary)
    with Server(tmp_path / "data", "--backend", "local",
                "--workflows", str(workflows(tmp_path))) as s:  # fmt: skip
        pid = s.agent_pid()
        assert pid is not None
        # fixed: the agent starts with PATH, HOME, LANG and the like only (and, as the
        # server, is not dumpable: see the next test)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except PermissionError:  # not dumpable, and this test is not root
            environ = b""
        assert canary.encode() not in environ
        assert b"CORRAL_TOKEN=" not in environ


def test_the_server_and_the_agent_are_not_dumpable() -> None:
    """Their /proc/PID/environ (the server's holds CORRAL_TOKEN) is then root's only,
    not readable by the tasks, which run as the same user."""
    code = (
        "import ctypes; from corral.cli.hardening import private_process; "
        "libc = ctypes.CDLL(None); print(libc.prctl(3, 0, 0, 0, 0)); private_process(); "
        "print(libc.prctl(3, 0, 0, 0, 0))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["1", "0"], r.stdout + r.stderr


# -- 6. failed logins ----------------------------------------------------------------------------


def _get_from(url: str, source: str, token: str) -> int:
    """GET /api/whoami from a given local source address; the status code."""
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0)) as c:
        c.sendall(
            f"GET /api/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_loopback_aliases_share_the_failed_login_limit(tmp_path: Path) -> None:
    """docs/operations.md: at most 10 guesses a minute from one client; an IPv6 client is
    counted by its /64, "what one host usually has". A local client has all of
    127.0.0.0/8 to connect from: each of its 16 million addresses gets 10 more."""
    with Server(tmp_path / "data", "--backend", "sim") as s:
        for n in range(10):
            assert _get_from(s.url, "127.0.0.1", f"crl_{n:032d}") == 401
        assert _get_from(s.url, "127.0.0.1", "crl_" + "9" * 32) == 429
        assert _get_from(s.url, "127.0.0.2", "crl_" + "8" * 32) == 429


# -- 7. a crash in the middle of a transition ---------------------------------------------------


def test_a_crash_during_deploy_of_plain_tasks_comes_back_deployed(tmp_path: Path) -> None:
    """docs/operations.md, after a crash: "a transition that was under way is recorded
    FAILED, and the environment goes where its tasks agree (all STANDBY: DEPLOYED...)".
    Plain (basic) tasks never "say" a state, so none agree: ERROR, "its tasks disagree",
    though every task is STANDBY."""
    wf = workflows(tmp_path)
    data = tmp_path / "data"
    first = Server(data, "--backend", "local", "--workflows", str(wf), keep_agent=True)
    with first as s:
        tokens = make_tokens(s)
        with s.client(tokens["operator"]) as op:
            r = op.post("/api/environments", json={"workflow": "slowdeploy"})
            assert r.status_code == 201, r.text
            env_id = r.json()["id"]
            r = op.post(f"/api/environments/{env_id}/transitions",
                        json={"event": "DEPLOY", "wait": False})  # fmt: skip
            assert r.status_code in (200, 202), r.text
            wait_for(
                lambda: any(
                    e.get("kind") == "call" and e.get("status") == "STARTED"
                    for e in op.get("/api/events", params={"env": env_id}).json()
                ),
                "the DEPLOY hook call started",
            )
        assert s.proc is not None
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(60)
    second = Server(data, "--backend", "local", "--workflows", str(wf))
    with second as s, s.client(tokens["operator"]) as op:
        env = op.get(f"/api/environments/{env_id}").json()
        try:
            assert env["tasks"] == {"STANDBY": 1}, env
            assert env["state"] == "DEPLOYED", (env["state"], env["error"])
        finally:
            op.delete(f"/api/environments/{env_id}")


# -- 8. calls are not counted ------------------------------------------------------------------


CALLS = """
name: calls
defaults:
  n: !public {value: "2", type: number}
roles:
  - name: "a{{ i }}"
    for: {begin: "1", end: "{{ n }}", var: i}
    roles:
      - name: "b{{ j }}"
        for: {begin: "1", end: "{{ n }}", var: j}
        call: {func: "test.Echo('{{ i }}-{{ j }}')", trigger: DEPLOY}
"""


def test_a_plan_of_calls_is_bounded_too(tmp_path: Path) -> None:
    """docs/security.md, bounded expansion: the tasks of a plan are capped (1,000,000),
    its calls are not. A public count of 3000 (9 million calls) takes 2.1 GB in
    ``corral template validate`` and 1.7 GB in the server (a viewer's validate) before
    the 60 s limit ends it. In 1 GiB of address space: an error, not a MemoryError."""
    import sys
    import textwrap

    from tests.conftest import ROOT

    (tmp_path / "calls.yaml").write_text(CALLS)
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from corral.cli.main import main
        sys.argv = ["corral", "template", "validate", sys.argv[1], "--var", "n=3000"]
        main()
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "calls.yaml")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert "MemoryError" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    assert r.returncode == 1 and "limit" in r.stdout + r.stderr, r.stdout + r.stderr
