"""Issue 14, "A newcomer's first hour": the command line as a newcomer meets it, run as
real processes (`python -m corral ...`).

- `template validate` and `corral run` count the same tasks (hook tasks apart);
- `template render` written to a pipe is not cut to 80 columns; `-o wide`;
- `template graph -o svg` draws the graph with nothing else installed;
- `corral events` prints local times, `-o json` epoch seconds;
- `corral logs ENV [TASK] [-f]`, from a data directory and through a server;
- Ctrl-C during `corral flow run`: one line, what was stopped and how to resume.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.api.server import Server
from tests.conftest import ROOT
from tests.jobs.test_jobs_api import until

DATATAKING = os.path.join(ROOT, "examples", "datataking.yaml")
HELLO = os.path.join(ROOT, "examples", "hello.yaml")
HOSTS = '["flp1","flp2"]'


def corral(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip


class Lines:
    """A child's stdout or stderr read as it comes, with a deadline that only stops a
    hung test."""

    def __init__(self, stream: object) -> None:
        self.fd = stream.fileno()  # type: ignore[attr-defined]
        self.text = ""

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text)
            if m:
                return m
            left = end - time.monotonic()
            assert left > 0, f"{pattern!r} not seen in:\n{self.text}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 65536)
                assert data, f"{pattern!r} not seen before the end:\n{self.text}"
                self.text += data.decode("utf-8", "replace")


# -- item 4: the counts agree ---------------------------------------------------------------


def test_validate_and_run_count_the_same_tasks(tmp_path: Path) -> None:
    v = corral("template", "validate", DATATAKING)
    assert v.returncode == 0, v.stderr
    said = re.search(r"datataking.yaml: (\d+) tasks \+ (\d+) hook task", v.stderr)
    assert said, v.stderr
    r = corral("run", DATATAKING, "--data", str(tmp_path / "d"), "--until", "DEPLOYED",
               "--for", "0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ran = re.search(r"\(datataking\): (\d+) tasks \+ (\d+) hook task", r.stderr)
    assert ran, r.stderr
    assert ran.groups() == said.groups() == ("7", "1")


# -- item 5: render is not cut when piped; -o wide ---------------------------------------------


def test_render_to_a_pipe_keeps_every_cell_whole() -> None:
    for output in ("table", "wide"):
        r = corral("template", "render", DATATAKING, "--var", f"hosts={HOSTS}", "-o", output)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        paths = [line.split()[0] for line in lines if line.startswith("datataking.flp-")]
        assert "datataking.flp-flp1.readout" in paths and "datataking.flp-flp2.readout" in paths
        assert not any("…" in line for line in lines)
        readout = next(line for line in lines if line.startswith("datataking.flp-flp2.readout"))
        assert readout.rstrip().endswith("--detector=TST")  # the command, to its end
        assert re.search(r"^10 tasks \+ 2 hook tasks, 7 calls", r.stdout, re.M)


def test_render_wide_is_offered() -> None:
    r = corral("template", "render", "--help")
    assert "wide" in r.stdout and "pipe" in r.stdout


# -- item 3: an SVG picture without Graphviz ------------------------------------------------


def test_graph_as_svg_needs_nothing_else() -> None:
    dot = corral("template", "graph", DATATAKING, "--var", f"hosts={HOSTS}")
    assert dot.returncode == 0 and dot.stdout.startswith("digraph")
    r = corral("template", "graph", DATATAKING, "--var", f"hosts={HOSTS}", "-o", "svg")
    assert r.returncode == 0, r.stderr
    svg = ET.fromstring(r.stdout.split("\n", 1)[1])  # (after the XML declaration)
    ns = {"s": "http://www.w3.org/2000/svg"}
    nodes = {g.get("id") for g in svg.iterfind(".//s:g[@class='node']", ns)}
    assert {"datataking.flp-flp1.readout", "datataking.flp-flp2.readout", "datataking.qc"} <= nodes
    edges = svg.findall(".//s:polyline[@class='edge']", ns)
    assert len(edges) == len(re.findall(r" -> ", dot.stdout))
    for e in edges:  # every point inside the picture
        for point in (e.get("points") or "").split():
            x, y = (float(v) for v in point.split(","))
            assert 0 <= x <= float(svg.get("width", 0)) and 0 <= y <= float(svg.get("height", 0))
    # what is needed, said in the help
    h = corral("template", "graph", "--help").stdout
    assert "-o svg" in h and "Graphviz" in h


# -- item 6: local time, and JSON for machines -------------------------------------------------


def test_events_print_local_time_and_json_has_epoch_seconds(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    r = corral("run", HELLO, "--data", data, "--until", "DEPLOYED", "--for", "0")
    assert r.returncode == 0, r.stderr
    text = corral("events", "--data", data)
    raw = corral("events", "--data", data, "-o", "json")
    assert text.returncode == raw.returncode == 0
    events = [json.loads(line) for line in raw.stdout.splitlines()]
    lines = text.stdout.splitlines()
    assert len(lines) == len(events) > 3
    for line, e in zip(lines, events, strict=True):
        seq, day, clock = line.split()[:3]
        assert int(seq) == e["seq"] and isinstance(e["time"], float)
        assert (day, clock[:8]) == tuple(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(e["time"]))).split()
        )
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", clock)
        assert f"{e['time']:.3f}" not in line


# -- item 9: corral logs ---------------------------------------------------------------------


def test_logs_from_the_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "d"
    # run until its task has said hello (a teardown at once could end it first), then Ctrl-C
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", HELLO, "--data", str(data), "--until",
         "DEPLOYED"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        until("its hello in its log", lambda: proc.poll() is not None or any(
            b"hello from corral" in f.read_bytes()
            for f in (data / "logs").glob("*/hello.greeter.log")))  # fmt: skip
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    env_id = re.search(r"environment (\w+) \(hello\)", stderr).group(1)  # type: ignore[union-attr]
    assert f"corral logs {env_id} -f --data {data}" in stderr  # said where to look
    # an earlier environment's logs are not this one's
    (data / "logs" / "older").mkdir()
    (data / "logs" / "older" / "hello.greeter.log").write_text("not this one\n")
    got = corral("logs", env_id, "--data", str(data))
    assert got.returncode == 0 and got.stdout == "hello from corral\n", got
    got = corral("logs", env_id, "greeter", "--data", str(data))
    assert got.stdout == "hello from corral\n"
    got = corral("logs", env_id, "nosuch", "--data", str(data))
    assert got.returncode == 1 and "hello.greeter" in got.stderr
    got = corral("logs", "nosuch", "--data", str(data))
    assert got.returncode == 1 and env_id in got.stderr and "Traceback" not in got.stderr


def test_logs_follow_the_data_directory(tmp_path: Path) -> None:
    """-f prints what is written, a task's log that appears later too, prefixed with
    each task's path, and ends on Ctrl-C without a traceback."""
    where = tmp_path / "logs" / "e1"
    where.mkdir(parents=True)
    a = where / "wf.a.log"
    a.write_text("first\nsecond\n")
    p = subprocess.Popen(
        [sys.executable, "-m", "corral", "logs", "e1", "-f", "--interval", "0.05",
         "--data", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        out = Lines(p.stdout)
        out.wait_for(r"first\nsecond\n")
        with a.open("a") as f:
            f.write("third, in two ")
            f.flush()
            f.write("parts\n")
        out.wait_for(r"third, in two parts\n")
        (where / "wf.b.log").write_text("from b\n")
        out.wait_for(r"wf\.b \| from b\n")
        with a.open("a") as f:
            f.write("fourth\n")
        out.wait_for(r"wf\.a \| fourth\n")
    finally:
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0 and b"Traceback" not in stderr, stderr
    assert out.text.count("first") == 1


def test_logs_through_a_server(tmp_path: Path) -> None:
    with Server(tmp_path / "data") as s:
        env = dict(os.environ, CORRAL_SERVER=s.url, CORRAL_TOKEN=s.admin)
        r = corral("env", "create", "hello", "--var", "greeting=hi from the server", env=env)
        assert r.returncode == 0, r.stderr
        env_id = r.stdout.strip()
        assert corral("env", "control", env_id, "DEPLOY", env=env).returncode == 0
        p = subprocess.Popen(
            [sys.executable, "-m", "corral", "logs", env_id, "greeter", "-f", "--interval",
             "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
        )  # fmt: skip
        try:
            Lines(p.stdout).wait_for(r"^hi from the server\n")
            # -f ends by itself once the environment is DONE
            assert corral("env", "destroy", env_id, env=env).returncode == 0
            _, stderr = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 0, stderr
        got = corral("logs", env_id, env=env)
        assert got.returncode == 0 and got.stdout == "hi from the server\n", got
        got = corral("logs", env_id, "nosuch", env=env)
        assert got.returncode == 1 and "no task 'nosuch'" in got.stderr
        got = corral("logs", "nosuchenv", env=env)
        assert got.returncode == 1 and "404" in got.stderr


def test_logs_follow_a_server_log_of_lines_all_alike(tmp_path: Path) -> None:
    # 1,200 lines "tick", then more of them: each new one is printed (a follower that
    # matched what it had seen against the log's end saw nothing new here)
    wf = tmp_path / "wf"
    (wf / "tasks").mkdir(parents=True)
    gate = tmp_path / "gate"
    (wf / "ticks.yaml").write_text("name: ticks\nroles:\n  - {name: t, task: {load: ticker}}\n")
    script = (f"import os, sys, time\nprint('tick\\n' * 1200, end='', flush=True)\n"
              f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
              "for _ in range(3): print('tick', flush=True)\n"
              "print('end', flush=True)\ntime.sleep(600)\n")  # fmt: skip
    (wf / "tasks" / "ticker.yaml").write_text(
        f"name: ticker\ncontrol: {{mode: basic}}\n"
        f"command: {{value: {sys.executable}, arguments: ['-c', {script!r}]}}\n"
    )
    with Server(tmp_path / "data", "--workflows", str(wf)) as s:
        env = dict(os.environ, CORRAL_SERVER=s.url, CORRAL_TOKEN=s.admin)
        r = corral("env", "create", "ticks", env=env)
        assert r.returncode == 0, r.stderr
        env_id = r.stdout.strip()
        assert corral("env", "control", env_id, "DEPLOY", env=env).returncode == 0
        p = subprocess.Popen(
            [sys.executable, "-m", "corral", "logs", env_id, "-f", "-n", "2", "--interval",
             "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
        )  # fmt: skip
        try:
            out = Lines(p.stdout)
            out.wait_for(r"^tick\ntick\n")
            gate.touch()
            out.wait_for(r"\nend\n")
            assert corral("env", "destroy", env_id, env=env).returncode == 0
            rest, stderr = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 0, stderr
        text = out.text + rest.decode()
        assert text == "tick\n" * 5 + "end\n", text


# -- Ctrl-C during `corral flow run` --------------------------------------------------------


def sleeping(mark: str) -> list[int]:
    want = f"sleep\0{mark}\0".encode()
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read() == want:
                        found.append(int(d))
            except OSError:
                continue
    return found


def test_ctrl_c_during_flow_run_says_what_stopped_and_how_to_resume(tmp_path: Path) -> None:
    mark = f"600.{uuid.uuid4().int % 10**9:09d}"
    flow = tmp_path / "f.makeflow"
    flow.write_text(f"a.txt:\n\techo a > a.txt\n\nb.txt: a.txt\n\tsleep {mark}\n")
    p = subprocess.Popen(
        [sys.executable, "-m", "corral", "flow", "run", str(flow), "--data",
         str(tmp_path / "d")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    try:
        Lines(p.stderr).wait_for(r"job \w+ \(f\): 2 steps")
        until("the step's sleep", lambda: p.poll() is not None or sleeping(mark))
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    said = err.decode().strip().splitlines()
    assert p.returncode == 130, err
    assert "Traceback" not in err.decode()
    assert len(said) == 1, said
    assert re.fullmatch(
        r"interrupted: job \w+ \(f\) stopped \(.*1 succeeded.*\); run the same command again "
        r"to resume \(the steps that succeeded do not run again\)",
        said[0],
    ), said
    assert not sleeping(mark)


# -- on a terminal: Rich's progress bars and styles (imported there only) ---------------------


def on_terminal(*args: str, cwd: str = ROOT) -> tuple[int, str]:
    """`corral ARGS` with a pseudo-terminal as its stdin, stdout and stderr."""
    import pty

    parent, child = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "corral", *args], stdin=child, stdout=child,
                         stderr=child, cwd=cwd, close_fds=True)  # fmt: skip
    os.close(child)
    out = b""
    end = time.monotonic() + 300  # (only stops a hung test)
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([parent], [], [], end - time.monotonic())
            try:
                data = os.read(parent, 65536) if ready else b""
            except OSError:  # (the child closed the terminal)
                break
            if not data:
                break
            out += data
        return p.wait(60), out.decode("utf-8", "replace")
    finally:
        p.kill()
        os.close(parent)


def test_run_and_flow_run_on_a_terminal(tmp_path: Path) -> None:
    code, out = on_terminal("run", HELLO, "--data", str(tmp_path / "d"), "--for", "0")
    assert code == 0 and "START_ACTIVITY" in out and "is RUNNING" in out, out
    assert "\x1b[" in out and "Traceback" not in out  # styled, by Rich
    (tmp_path / "f.makeflow").write_text("a.txt:\n\techo a > a.txt\n")
    code, out = on_terminal("flow", "run", "f.makeflow", "--data", "d", cwd=str(tmp_path))
    assert code == 0 and "SUCCEEDED" in out and "Traceback" not in out, out
