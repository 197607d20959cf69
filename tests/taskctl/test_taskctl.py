"""corral.taskctl and the example programs, driven as real processes over a socketpair.

Each test plays the controller: it starts a program with sys.executable (or a compiled C
program), passes one end of a socketpair as CORRAL_CONTROL_FD, and speaks the protocol of
docs/protocol.md. Every read has a deadline (generous: it only ends a test that would
hang); every process is killed in a finally.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from corral.taskctl import MAX_LINE, Channel, Task, channels
from corral.taskctl._protocol import LineSplitter

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ROOT / "examples" / "programs"
C_SOURCE = ROOT / "examples" / "protocol" / "minimal_task.c"

SAMPLE = r"""
import json, os, sys, time
from corral.taskctl import Task, run

class Sample(Task):
    def __init__(self):
        self.ticks = 0
    def configure(self, args):
        print("configure", self.state, json.dumps(args, sort_keys=True), flush=True)
        if "fail" in args:
            raise ValueError("bad configuration: " + args["fail"])
    def start(self, args):
        self.ticks = 0
        print("start", args.get("run_number"), flush=True)
        if "eos_now" in args:
            self.end_of_stream()
    def stop(self, args):
        print("stop ticked", self.ticks > 0, flush=True)
    def reset(self, args):
        print("reset", flush=True)
    def exit(self, args):
        print("exit", self.state, flush=True)
    def tick(self):
        self.ticks += 1
        if self.ticks == 5:
            self.end_of_stream()
            self.end_of_stream()  # once per run: this one is not sent
        if self.ticks == 6 and os.environ.get("SAMPLE_TICK_ERROR"):
            raise RuntimeError("tick broke")
        time.sleep(0.005)

sys.exit(run(Sample()))
"""

# How long a read or a wait gives up after: only a hung test should ever reach it.
PATIENCE = 60.0

CYCLE = [
    ("CONFIGURE", "CONFIGURED"),
    ("START", "RUNNING"),
    ("STOP", "CONFIGURED"),
    ("RESET", "STANDBY"),
    ("CONFIGURE", "CONFIGURED"),
    ("EXIT", "DONE"),
]


class Controlled:
    """The controller's end of one task: the process, its control socket, its log file."""

    def __init__(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, fd: bool = True
    ) -> None:
        self.log = log
        full = dict(os.environ)
        full.update(
            CORRAL_ENVIRONMENT_ID="env1", CORRAL_TASK_ID="t1", CORRAL_TASK_PATH="flp.readout"
        )
        full.pop("CORRAL_CONTROL_FD", None)
        full.update(env or {})
        self.sock: socket.socket | None = None
        theirs: socket.socket | None = None
        if fd:
            self.sock, theirs = socket.socketpair()
            full["CORRAL_CONTROL_FD"] = str(theirs.fileno())
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(theirs.fileno(),) if theirs else (),
                start_new_session=True,
            )
        if theirs is not None:
            theirs.close()
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send_raw(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def recv(self, timeout: float = PATIENCE) -> dict[str, Any]:
        """The next message; fails the test on timeout or EOF."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no message within {timeout} s; log:\n{self.output()}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                pytest.fail(f"EOF on the control socket; log:\n{self.output()}")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def order(
        self, transition: str, args: dict[str, str] | None = None, timeout: float = PATIENCE
    ) -> dict[str, Any]:
        """Send one order; return its answer (events before it go to self.events)."""
        self.next_id += 1
        msg = {"id": self.next_id, "transition": transition, "args": args or {}}
        self.send_raw((json.dumps(msg, separators=(",", ":")) + "\n").encode())
        while True:
            got = self.recv(timeout)
            if "id" in got:
                assert got["id"] == self.next_id
                return got
            self.events.append(got)

    def event(self, timeout: float = PATIENCE) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        got = self.recv(timeout)
        assert "event" in got, got
        return got

    def wait(self, timeout: float = PATIENCE) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(PATIENCE)
        if self.sock is not None:
            self.sock.close()


def hello(task: Controlled) -> dict[str, Any]:
    msg = task.recv()
    assert msg["state"] == "STANDBY", msg
    assert msg.get("pid") in (None, task.proc.pid)
    assert msg.get("protocol", 1) == 1
    return msg


def cycle(task: Controlled) -> None:
    """hello → CONFIGURE → START → STOP → RESET → CONFIGURE → EXIT, then exit status 0."""
    hello(task)
    for transition, state in CYCLE:
        args = {"environment_id": "env1"}
        if transition == "START":
            args["run_number"] = "7"
        assert task.order(transition, args) == {"id": task.next_id, "state": state}
    assert task.wait() == 0


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Controlled]]:
    """Start programs through this list's owner; all are killed at the end."""
    procs: list[Controlled] = []
    yield procs
    for p in procs:
        p.kill()


def sample(tmp_path: Path, started: list[Controlled], **env: str) -> Controlled:
    prog = tmp_path / "sample.py"
    prog.write_text(SAMPLE)
    task = Controlled([sys.executable, str(prog)], tmp_path / "sample.log", env)
    started.append(task)
    return task


# -- the library, in a real process ------------------------------------------------------


def test_full_cycle_answers_and_exit_0(tmp_path: Path, started: list[Controlled]) -> None:
    task = sample(tmp_path, started)
    cycle(task)
    out = task.output()
    assert 'configure STANDBY {"environment_id": "env1"}' in out
    assert "start 7" in out and "reset" in out and "exit CONFIGURED" in out


def test_invalid_and_unknown_transitions_get_errors(
    tmp_path: Path, started: list[Controlled]
) -> None:
    task = sample(tmp_path, started)
    hello(task)
    got = task.order("START")
    assert got["id"] == 1 and "STANDBY" in got["error"] and "state" not in got
    assert "error" in task.order("STOP")
    assert task.order("JUMP")["error"] == "unknown transition 'JUMP'"
    assert "string" in task.order("CONFIGURE", {"n": 3})["error"]  # type: ignore[dict-item]
    assert task.order("CONFIGURE")["state"] == "CONFIGURED"  # nothing changed the state
    assert "CONFIGURED" in task.order("CONFIGURE")["error"]
    assert task.order("EXIT")["state"] == "DONE"
    assert task.wait() == 0


def test_a_raising_method_answers_an_error_and_keeps_the_state(
    tmp_path: Path, started: list[Controlled]
) -> None:
    task = sample(tmp_path, started)
    hello(task)
    got = task.order("CONFIGURE", {"fail": "no calibration"})
    assert got == {"id": 1, "error": "ValueError: bad configuration: no calibration"}
    assert task.order("START")["error"] == "cannot START in state STANDBY"
    assert task.order("CONFIGURE")["state"] == "CONFIGURED"
    assert task.order("EXIT")["state"] == "DONE"
    assert task.wait() == 0
    assert "Traceback" in task.output()  # the failure is in the task's log


def test_tick_events_once_per_run_and_after_the_answer(
    tmp_path: Path, started: list[Controlled]
) -> None:
    task = sample(tmp_path, started)
    hello(task)
    task.order("CONFIGURE")
    # END_OF_STREAM posted inside start() comes right after START's answer
    assert task.order("START", {"run_number": "1", "eos_now": "1"})["state"] == "RUNNING"
    assert task.event() == {"event": "END_OF_STREAM"}
    assert task.order("STOP")["state"] == "CONFIGURED"
    # a new run: tick sends END_OF_STREAM once (its second call is not sent)
    assert task.order("START", {"run_number": "2"})["state"] == "RUNNING"
    assert task.event() == {"event": "END_OF_STREAM"}
    assert task.order("STOP")["state"] == "CONFIGURED"
    assert task.events == []
    assert "stop ticked True" in task.output()
    assert task.order("EXIT")["state"] == "DONE"
    assert task.wait() == 0


def test_a_raising_tick_sends_an_error_event(tmp_path: Path, started: list[Controlled]) -> None:
    task = sample(tmp_path, started, SAMPLE_TICK_ERROR="1")
    hello(task)
    task.order("CONFIGURE")
    task.order("START")
    assert task.event() == {"event": "END_OF_STREAM"}
    assert task.event() == {"event": "ERROR", "error": "RuntimeError: tick broke"}
    assert task.order("STOP")["state"] == "CONFIGURED"


def test_partial_and_batched_lines(tmp_path: Path, started: list[Controlled]) -> None:
    task = sample(tmp_path, started)
    hello(task)
    task.send_raw(b'{"id":1,"transition":"CONF')
    time.sleep(0.1)
    task.send_raw(b'IGURE","args":{}}\n{"id":2,"transition":"START","args":{}}\n')
    assert task.recv() == {"id": 1, "state": "CONFIGURED"}
    assert task.recv() == {"id": 2, "state": "RUNNING"}
    task.next_id = 2
    assert task.event() == {"event": "END_OF_STREAM"}
    assert task.order("STOP")["state"] == "CONFIGURED"


def test_garbage_is_a_protocol_error_event(tmp_path: Path, started: list[Controlled]) -> None:
    task = sample(tmp_path, started)
    hello(task)
    task.send_raw(b"this is not json\n[1, 2]\n")
    assert "not JSON" in task.event()["error"]
    assert "not an object" in task.event()["error"]
    task.send_raw(b"x" * (MAX_LINE + 10) + b"\n")
    assert "longer than" in task.event()["error"]
    assert task.order("CONFIGURE")["state"] == "CONFIGURED"  # and it still obeys


def test_sigterm_winds_down_and_exits_0(tmp_path: Path, started: list[Controlled]) -> None:
    task = sample(tmp_path, started)
    hello(task)
    task.order("CONFIGURE")
    task.order("START")
    task.proc.send_signal(signal.SIGTERM)
    assert task.wait() == 0
    out = task.output()
    assert "stop ticked" in out and "exit CONFIGURED" in out and "SIGTERM" in out


def test_eof_ends_the_task_with_0(tmp_path: Path, started: list[Controlled]) -> None:
    task = sample(tmp_path, started)
    hello(task)
    task.order("CONFIGURE")
    assert task.sock is not None
    task.sock.close()
    task.sock = None
    assert task.wait() == 0
    assert "controller is gone" in task.output()


def test_no_control_fd_exits_2_with_a_clear_message(
    tmp_path: Path, started: list[Controlled]
) -> None:
    prog = tmp_path / "sample.py"
    prog.write_text(SAMPLE)
    task = Controlled([sys.executable, str(prog)], tmp_path / "nofd.log", fd=False)
    started.append(task)
    assert task.wait() == 2
    assert "CORRAL_CONTROL_FD is not set" in task.output()
    bad = Controlled(
        [sys.executable, str(prog)], tmp_path / "bad.log", {"CORRAL_CONTROL_FD": "99"}, fd=False
    )
    started.append(bad)
    assert bad.wait() == 2
    assert "does not name an open socket" in bad.output()


# -- the library, in this process (pure parts) ---------------------------------------------


def test_channels_from_configure_args() -> None:
    args = {
        "environment_id": "e",
        "chans.readout.address": "ipc:///tmp/x",
        "chans.readout.method": "bind",
        "chans.readout.type": "push",
        "chans.readout.transport": "zeromq",
        "chans.a.b.address": "tcp://127.0.0.1:1",
        "chans.a.b.method": "connect",
        "chans.a.b.type": "pull",
    }
    got = channels(args)
    assert got["readout"] == Channel("readout", "ipc:///tmp/x", "bind", "push", "zeromq")
    assert got["a.b"] == Channel("a.b", "tcp://127.0.0.1:1", "connect", "pull", "zeromq")
    with pytest.raises(ValueError, match=r"chans\.x\.type"):
        channels({"chans.x.address": "a", "chans.x.method": "bind"})
    with pytest.raises(ValueError, match="neither bind nor connect"):
        channels({"chans.x.address": "a", "chans.x.method": "both", "chans.x.type": "push"})


def test_line_splitter() -> None:
    s = LineSplitter(limit=10)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\nde\nf") == [b"abc", b"de"]
    assert s.feed(b"x" * 20) == [None]
    assert s.feed(b"yy\nok\n") == [b"ok"]


def test_state_is_read_only_and_events_need_run() -> None:
    t = Task()
    assert t.state == "STANDBY"
    with pytest.raises(AttributeError):
        t.state = "RUNNING"  # type: ignore[misc]
    with pytest.raises(RuntimeError, match="run"):
        t.end_of_stream()


# -- the C program --------------------------------------------------------------------------


def test_minimal_c_task(tmp_path: Path, started: list[Controlled]) -> None:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH to build minimal_task.c")
    exe = tmp_path / "minimal_task"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(C_SOURCE)], check=True, timeout=60)
    task = Controlled([str(exe)], tmp_path / "c.log")
    started.append(task)
    cycle(task)
    again = Controlled([str(exe)], tmp_path / "c2.log")
    started.append(again)
    hello(again)
    assert again.order("START")["error"] == "cannot START in state STANDBY"
    assert again.order("CONFIGURE", {"environment_id": "e"})["state"] == "CONFIGURED"
    assert again.order("EXIT")["state"] == "DONE"
    assert again.wait() == 0
    nofd = Controlled([str(exe)], tmp_path / "c3.log", fd=False)
    started.append(nofd)
    assert nofd.wait() == 2 and "CORRAL_CONTROL_FD" in nofd.output()


# -- the example programs -------------------------------------------------------------------


def chan(name: str, address: str, method: str, kind: str) -> dict[str, str]:
    pre = f"chans.{name}."
    return {
        pre + "address": address,
        pre + "method": method,
        pre + "type": kind,
        pre + "transport": "zeromq",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def program(name: str, *args: str) -> list[str]:
    return [sys.executable, str(PROGRAMS / name), *args]


def short_dir(tmp_path: Path) -> Path:
    """A directory for ipc sockets whose paths stay well under the 107-byte limit."""
    d = tmp_path / "s"
    d.mkdir()
    if len(str(d)) > 70:
        pytest.skip(f"tmp_path too long for ipc socket paths: {d}")
    return d


def test_readout_frames_then_end_of_stream(tmp_path: Path, started: list[Controlled]) -> None:
    address = f"ipc://{short_dir(tmp_path)}/ro"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    try:
        task = Controlled(
            program("readout.py", "--rate=200", "--detector=TST", "--frames=3"),
            tmp_path / "readout.log",
        )
        started.append(task)
        hello(task)
        args = {"environment_id": "e", **chan("readout", address, "bind", "push")}
        assert task.order("CONFIGURE", args)["state"] == "CONFIGURED"
        pull.connect(address)
        assert task.order("START", {"run_number": "9"})["state"] == "RUNNING"
        assert task.event() == {"event": "END_OF_STREAM"}
        headers = []
        for _ in range(3):
            assert pull.poll(int(PATIENCE * 1000)), "a frame should arrive"
            header, payload = pull.recv_multipart()
            headers.append(json.loads(header))
            assert len(payload) > 0
        assert [h["sequence"] for h in headers] == [0, 1, 2]
        assert headers[0]["detector"] == "TST" and headers[0]["run_number"] == 9
        assert task.order("STOP")["state"] == "CONFIGURED"
        # no frame after END_OF_STREAM: the run's count, and nothing more on the way
        assert "readout TST: run 9 sent=3" in task.output(), task.output()
        assert not pull.poll(0), "no frame after END_OF_STREAM"
        assert task.order("EXIT")["state"] == "DONE"
        assert task.wait() == 0
    finally:
        pull.close(linger=0)
        ctx.term()


def test_readout_rejects_a_configure_without_its_channel(
    tmp_path: Path, started: list[Controlled]
) -> None:
    task = Controlled(program("readout.py", "--rate=1", "--detector=TST"), tmp_path / "r.log")
    started.append(task)
    hello(task)
    got = task.order("CONFIGURE", {"environment_id": "e"})
    assert got["error"] == "ValueError: no channel 'readout' in the CONFIGURE arguments"


def qc_counts(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^qc: messages=(\d+) bytes=\d+ run=5$", text, re.M)]


def growing(counts: list[int]) -> bool:
    """Messages arrived, and more arrived after that."""
    arrived = [c for c in counts if c > 0]
    return len(arrived) >= 2 and arrived[-1] > arrived[0]


def test_dataflow_readout_relay_qc_counter(tmp_path: Path, started: list[Controlled]) -> None:
    ipc = f"ipc://{short_dir(tmp_path)}/ro"
    tcp = f"tcp://127.0.0.1:{free_port()}"
    readout = Controlled(
        program("readout.py", "--rate=100", "--detector=TST"), tmp_path / "readout.log"
    )
    relay = Controlled(
        program("relay.py", "--input=readout", "--output=output"), tmp_path / "relay.log"
    )
    qc = Controlled(program("qc_counter.py"), tmp_path / "qc.log")
    tasks = [readout, relay, qc]
    started.extend(tasks)
    for t in tasks:
        hello(t)
    configure = {
        readout: chan("readout", ipc, "bind", "push"),
        relay: chan("readout", ipc, "connect", "pull") | chan("output", tcp, "connect", "pub"),
        qc: chan("input", tcp, "bind", "sub"),
    }
    for t in (readout, qc, relay):  # binds first, as the controller allocates them
        assert t.order("CONFIGURE", {"environment_id": "e", **configure[t]})["state"] == (
            "CONFIGURED"
        ), t.output()
    for t in (qc, relay, readout):
        assert t.order("START", {"environment_id": "e", "run_number": "5"})["state"] == "RUNNING"
    # QC reports its totals once a second while RUNNING: wait until they grow
    deadline = time.monotonic() + PATIENCE
    while not growing(qc_counts(qc.output())):
        assert time.monotonic() < deadline, qc.output()
        time.sleep(0.05)
    running = qc_counts(qc.output())
    for t in (readout, relay, qc):
        assert t.order("STOP", {"environment_id": "e"})["state"] == "CONFIGURED"
    counts = qc_counts(qc.output())
    assert len(counts) > len(running), qc.output()  # and a last report at STOP
    assert counts[-1] >= running[-1] > 0 and counts == sorted(counts), qc.output()
    for t in tasks:
        assert t.order("RESET", {"environment_id": "e"})["state"] == "STANDBY"
        assert t.order("EXIT", {"environment_id": "e"})["state"] == "DONE"
    for t in tasks:
        assert t.wait() == 0, t.output()
    assert "forwarded=" in relay.output()


def test_processing_publishes_summaries(tmp_path: Path, started: list[Controlled]) -> None:
    d = short_dir(tmp_path)
    inp, qc_addr = f"ipc://{d}/in", f"ipc://{d}/qc"
    ctx = zmq.Context()
    push, sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.SUB)
    for s in (push, sub):
        s.linger = 0
    sub.subscribe(b"")
    try:
        push.bind(inp)
        sub.bind(qc_addr)
        task = Controlled(program("processing.py", "--pipeline=2"), tmp_path / "proc.log")
        started.append(task)
        hello(task)
        args = chan("input", inp, "connect", "pull") | chan("qc", qc_addr, "connect", "pub")
        assert task.order("CONFIGURE", args)["state"] == "CONFIGURED"
        assert task.order("START", {"run_number": "3"})["state"] == "RUNNING"
        summary: dict[str, Any] = {}
        deadline = time.monotonic() + PATIENCE
        while not summary and time.monotonic() < deadline:  # pub/sub: the first may be lost
            header = json.dumps({"detector": "TST", "run_number": 3, "sequence": 1})
            push.send_multipart([header.encode(), b"abc"])
            if sub.poll(100):
                summary = json.loads(sub.recv())
        assert summary["pipeline"] == 2 and summary["run"] == "3"
        assert summary["detector"] == "TST" and summary["bytes"] == len(header) + 3
        assert task.order("STOP")["state"] == "CONFIGURED"
        assert task.order("EXIT")["state"] == "DONE"
        assert task.wait() == 0
    finally:
        push.close(linger=0)
        sub.close(linger=0)
        ctx.term()
