"""``corral run`` and ``corral events`` as a user runs them: real processes, real dataflow.

The process-table checks read /proc/*/environ: every task of an environment carries
CORRAL_ENVIRONMENT_ID, so "nothing of the environment is left" is checked directly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT


def start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "corral", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=dict(os.environ, COLUMNS="120"),
    )


def corral(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def processes_of(env_id: str) -> list[int]:
    """Live processes whose environment names this corral environment."""
    needle = f"CORRAL_ENVIRONMENT_ID={env_id}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    with open(f"/proc/{d}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                            out.append(int(d))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def pid_of_task(env_id: str, path: str) -> int:
    needle = f"CORRAL_TASK_PATH={path}".encode()
    for pid in processes_of(env_id):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    return pid
        except FileNotFoundError:
            continue
    raise AssertionError(f"no process for {path}")


class Output:
    """Reads a child's merged output without blocking, line by line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.text = ""
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)

    def _read(self) -> str:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return ""
        return data.decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        end = time.monotonic() + timeout
        while True:
            chunk = self._read()
            if chunk:
                self.text += chunk
            m = re.search(pattern, self.text)
            if m:
                return m
            if time.monotonic() > end or (self.proc.poll() is not None and not chunk):
                raise AssertionError(f"{pattern!r} not seen; output:\n{self.text}")
            time.sleep(0.05)

    def finish(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.text += self._read()
            assert time.monotonic() < end, f"did not end; output:\n{self.text}"
            time.sleep(0.05)
        while chunk := self._read():
            self.text += chunk
        return self.proc.returncode


def qc_counts(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(m) for m in re.findall(r"qc: messages=(\d+)", log.read_text())]


def growing(counts: list[int]) -> bool:
    """Data arrived, and more arrived after that: QC's totals grow while RUNNING."""
    arrived = [c for c in counts if c > 0]
    return len(arrived) >= 2 and arrived[-1] > arrived[0]


def test_datataking_runs_data_flows_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = start("run", "examples/datataking.yaml", "--data", str(data),
                 "--var", "readout_rate=200")  # fmt: skip
    out = Output(proc)
    env_id = ""
    try:
        env_id = out.wait_for(r"environment (\w+) \(datataking\)", 60).group(1)
        run_number = int(out.wait_for(r"run number (\d+) is RUNNING", 60).group(1))
        assert run_number >= 1
        assert len(processes_of(env_id)) == 7  # the direct tasks; the hook task ended
        log = data / "logs" / env_id / "datataking.qc.log"
        end = time.monotonic() + 60  # only stops a hung test
        while not growing(qc_counts(log)) and time.monotonic() < end:
            time.sleep(0.2)
        counts = qc_counts(log)
        assert growing(counts) and counts == sorted(counts), log.read_text()
        hook_log = data / "logs" / env_id / "datataking.flp-localhost.log-run.log"
        assert "run started on localhost" in hook_log.read_text()
        proc.send_signal(signal.SIGINT)
        assert out.finish(60) == 0, out.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert processes_of(env_id) == [], "processes of the environment were left behind"
    assert re.search(r"run \d+ stopped", out.text)
    assert "DONE; 0 tasks alive" in out.text


def test_a_killed_critical_task_is_named_and_the_exit_is_non_zero(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = start("run", "examples/datataking.yaml", "--data", str(data))
    out = Output(proc)
    env_id = ""
    try:
        env_id = out.wait_for(r"environment (\w+) \(datataking\)", 60).group(1)
        out.wait_for(r"is RUNNING", 60)
        os.kill(pid_of_task(env_id, "datataking.dist"), signal.SIGKILL)
        assert out.finish(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert re.search(r"datataking\.dist on localhost: process \d+ killed by signal 9", out.text)
    assert processes_of(env_id) == []


def test_events_are_gap_free_and_persisted_across_restarts(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    for _ in range(2):
        r = corral("run", "examples/hello.yaml", "--data", data, "--for", "0.3")
        assert r.returncode == 0, r.stdout + r.stderr
    r = corral("events", "--data", data, "-o", "json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    envs = {e["env"] for e in events if e.get("env")}
    assert len(envs) == 2
    runs = [e["run_number"] for e in events if e["kind"] == "run" and e["status"] == "STARTED"]
    assert runs == [1, 2]
    text = corral("events", "--data", data)
    assert text.returncode == 0 and "transition" in text.stdout


def test_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    r = corral("run", "tests/templates/broken/broken.yaml", "--data", str(tmp_path))
    assert r.returncode == 1 and "broken.yaml:" in r.stderr
    r = corral("run", "examples/hello.yaml", "--timeout", "CONFIGURE=soon")
    assert r.returncode == 2 and "EVENT=SECONDS" in r.stderr
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: wf\nroles:\n  - name: dcs\n    call: {func: dcs.Prepare(), trigger: DEPLOY}\n"
    )
    r = corral("run", str(wf), "--data", str(tmp_path))
    assert r.returncode == 1 and "call wf.dcs: unknown plugin 'dcs'" in r.stderr
    r = corral("events", "--data", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "no store" in r.stderr


def test_ctrl_c_during_a_slow_deploy_tears_down(tmp_path: Path) -> None:
    from tests.fake_tasks import write_program

    program = write_program(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "slow.yaml").write_text(
        "name: slow\ncontrol: {mode: direct}\n"
        f"command: {{value: '{sys.executable}', "
        f"arguments: ['{program}', '{{{{ mode }}}}', '600']}}\n"
    )
    (tmp_path / "wf.yaml").write_text(
        "name: wf\ndefaults: {mode: good}\nroles:\n"
        "  - name: fast\n    task: {load: slow}\n"
        "  - name: slow\n    vars: {mode: slowhello}\n    task: {load: slow}\n"
    )
    proc = start("run", str(tmp_path / "wf.yaml"), "--data", str(tmp_path / "data"))
    out = Output(proc)
    try:
        env_id = out.wait_for(r"environment (\w+) \(wf\)", 60).group(1)
        out.wait_for(r"slow.*task wf\.slow on localhost: no hello after", 60)
        assert len(processes_of(env_id)) == 2
        proc.send_signal(signal.SIGINT)
        assert out.finish(60) == 0, out.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted" in out.text
    assert processes_of(env_id) == []


def test_a_restart_marks_leftovers_lost_and_ends_their_processes(tmp_path: Path) -> None:
    """The control process dies: direct tasks end themselves when their control socket
    closes (the protocol); a basic task (hello's `sleep`) lives on until the next start
    ends it, marked LOST, with its environment in ERROR; `corral run` then ends that
    environment (DONE): a one-shot command takes nothing over."""
    data = str(tmp_path / "data")
    proc = start("run", "examples/hello.yaml", "--data", data)
    out = Output(proc)
    env_id = ""
    try:
        env_id = out.wait_for(r"environment (\w+) \(hello\)", 60).group(1)
        out.wait_for(r"is RUNNING", 60)
        proc.kill()  # the control process dies; the basic task (own session) lives on
        proc.wait()
        assert len(processes_of(env_id)) == 1
        r = corral("run", "examples/hello.yaml", "--data", data, "--for", "0.2")
        assert r.returncode == 0, r.stderr
        assert f"environment {env_id} (hello) was RUNNING" in r.stderr
        assert "1 leftover processes ended" in r.stderr
        deadline = time.monotonic() + 60  # only stops a hung test
        while processes_of(env_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_of(env_id) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in processes_of(env_id) if env_id else []:
            os.killpg(pid, signal.SIGKILL)
    r = corral("events", "--data", data, "--env", env_id, "-o", "json")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["state"] == "DONE" and "restarted" in events[-1]["note"]
    [lost] = [e for e in events if e["kind"] == "task" and e["state"] == "LOST"]
    assert lost["tasks"] == ["hello.greeter"] and "restarted" in lost["reason"]
    [error] = [e for e in events if e["kind"] == "environment" and e["state"] == "ERROR"]
    assert "restarted" in error["error"] and events.index(lost) < events.index(error)
    [stopped] = [e for e in events if e["kind"] == "run" and e["status"] == "STOPPED"]
    assert events.index(stopped) < events.index(error)  # its run ends in the events too


def env_events(data: Path, env_id: str) -> list[dict[str, object]]:
    r = corral("events", "--data", str(data), "--env", env_id, "-o", "json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def env_states(events: list[dict[str, object]]) -> list[object]:
    return [e["state"] for e in events if e["kind"] == "environment" and "transition" in e]


@pytest.mark.parametrize("until", ["DEPLOYED", "CONFIGURED"])
def test_until_stays_in_that_state_until_ctrl_c(tmp_path: Path, until: str) -> None:
    """`--until CONFIGURED` (or DEPLOYED) is not a run that ended by itself: the
    environment stays there, its task alive, until Ctrl-C."""
    data = tmp_path / "data"
    proc = start("run", "examples/hello.yaml", "--data", str(data), "--until", until)
    out = Output(proc)
    env_id = ""
    try:
        env_id = out.wait_for(r"environment (\w+) \(hello\)", 60).group(1)
        out.wait_for(rf"environment {env_id} is {until}\b", 60)
        out.wait_for(r"press Ctrl-C to stop", 60)
        # Here the bug had already printed "the run stopped" and begun tearing down.
        assert env_states(env_events(data, env_id))[-1] == until
        assert len(processes_of(env_id)) == 1, out.text
        out.text += out._read()
        assert proc.poll() is None and "tearing down" not in out.text, out.text
        proc.send_signal(signal.SIGINT)
        assert out.finish(60) == 0, out.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "the run stopped" not in out.text
    assert "tearing down" in out.text and "DONE; 0 tasks alive" in out.text
    assert processes_of(env_id) == []
    states = env_states(env_events(data, env_id))
    assert states[-2:] == [until, "DONE"], states  # from there straight to the teardown


def test_until_configured_stays_until_the_end_of_for(tmp_path: Path) -> None:
    data = tmp_path / "data"
    r = corral("run", "examples/hello.yaml", "--data", str(data), "--until", "CONFIGURED",
               "--for", "2")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    env_id = re.search(r"environment (\w+) is CONFIGURED", r.stdout)
    assert env_id is not None, r.stdout + r.stderr
    assert "press Ctrl-C to stop (or wait 2 s)" in r.stderr
    assert "the run stopped" not in r.stderr, r.stderr
    assert "DONE; 0 tasks alive" in r.stderr
    events = env_events(data, env_id.group(1))
    assert env_states(events) == ["DEPLOYED", "CONFIGURED", "DONE"]
    assert not [e for e in events if e["kind"] == "run"], "no run was started"


def test_a_run_that_ends_by_itself_is_noticed(tmp_path: Path) -> None:
    """Driven to RUNNING, the environment whose tasks all report END_OF_STREAM stops its
    run by itself; `corral run` says so and tears down, without Ctrl-C or --for."""
    from tests.fake_tasks import write_program

    program = write_program(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "eos.yaml").write_text(
        "name: eos\ncontrol: {mode: direct}\n"
        f"command: {{value: '{sys.executable}', arguments: ['{program}', 'eos']}}\n"
    )
    (tmp_path / "wf.yaml").write_text(
        "name: wf\nroles:\n  - name: a\n    task: {load: eos}\n  - name: b\n    task: {load: eos}\n"
    )
    r = corral("run", str(tmp_path / "wf.yaml"), "--data", str(tmp_path / "data"), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run number 1 is RUNNING" in r.stdout
    assert "the run stopped: every task reported END_OF_STREAM" in r.stderr, r.stderr
    assert "DONE; 0 tasks alive" in r.stderr
