"""The local backend against real child processes speaking the wire protocol."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from corral.backends.local import MESSAGE_BURST, LocalBackend
from corral.model.plan import Command
from corral.ports.backend import ChannelRequest, Launch, Order, Report
from tests.fake_tasks import alive, python, write_program

NODE = "localhost"
# Launch and transition deadlines, and how long a wait gives up after, where the test
# is not about a deadline: only a hung test should ever reach them.
PATIENCE = 60.0


def launch(tmp: Path, tid: str, *args: str, control: str = "direct") -> Launch:
    prog = write_program(tmp)
    return Launch(
        tid,
        f"t.{tid}",
        Command(python(), (prog, *args)),
        control,
        log_path=str(tmp / "logs" / f"{tid}.log"),
    )


class Collector:
    def __init__(self) -> None:
        self.reports: list[Report] = []
        self.calls = 0

    def __call__(self, reports: list[Report]) -> None:
        self.calls += 1
        self.reports.extend(reports)

    def kinds(self, tid: str) -> list[str]:
        return [r.kind for r in self.reports if r.task_id == tid]


async def wait_for(pred, timeout: float = PATIENCE) -> None:  # type: ignore[no-untyped-def]
    """Wait for a condition (polled); the timeout only ends a test that would hang."""
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition never reached"
        await asyncio.sleep(0.005)


def test_full_cycle_of_a_batch(tmp_path: Path) -> None:
    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        sink = Collector()
        b.subscribe(sink)
        batch = [launch(tmp_path, f"e:{i}", "good") for i in range(5)]
        outs = await b.launch(NODE, batch, PATIENCE, 5)
        assert all(o.ok and o.state == "STANDBY" and o.pid for o in outs), outs
        for name, state in [
            ("CONFIGURE", "CONFIGURED"),
            ("START", "RUNNING"),
            ("STOP", "CONFIGURED"),
            ("RESET", "STANDBY"),
            ("EXIT", "DONE"),
        ]:
            orders = [Order(x.task_id, name) for x in batch]
            outs = await b.transition(NODE, orders, PATIENCE, 2)
            assert [o.state for o in outs] == [state] * 5, outs
        await wait_for(lambda: len([r for r in sink.reports if r.kind == "exited"]) == 5)
        assert {r.code for r in sink.reports if r.kind == "exited"} == {0}
        assert sink.calls < 5 + 1  # reports arrive coalesced, not one call per task... mostly
        await b.close()

    asyncio.run(main())


def test_kill_9_is_reported_at_once_with_its_signal(tmp_path: Path) -> None:
    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        sink = Collector()
        b.subscribe(sink)
        [out] = await b.launch(NODE, [launch(tmp_path, "e:0", "good")], PATIENCE, 5)
        assert out.pid is not None
        os.kill(out.pid, signal.SIGKILL)
        # reported by itself (nothing asked the task anything), with the signal
        await wait_for(lambda: "exited" in sink.kinds("e:0"))
        [r] = [r for r in sink.reports if r.kind == "exited"]
        assert r.code == -9 and "SIGKILL" in r.reason
        assert not alive(out.pid)  # reaped: not even a zombie
        await b.close()

    asyncio.run(main())


def test_garbage_fails_the_task_with_a_clear_reason(tmp_path: Path) -> None:
    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        sink = Collector()
        b.subscribe(sink)
        ls = [launch(tmp_path, "e:0", "garbage"), launch(tmp_path, "e:1", "good")]
        await b.launch(NODE, ls, PATIENCE, 5)
        orders = [Order(x.task_id, "CONFIGURE") for x in ls]
        outs = await b.transition(NODE, orders, PATIENCE, 2)
        assert not outs[0].ok and "not JSON" in (outs[0].error or "")
        assert outs[1].state == "CONFIGURED"
        await wait_for(lambda: "error" in sink.kinds("e:0"))
        # the other task is unaffected
        outs = await b.transition(NODE, [Order("e:1", "START")], PATIENCE, 2)
        assert outs[0].state == "RUNNING"
        await b.close()

    asyncio.run(main())


def test_an_id_that_is_not_an_integer_breaks_the_protocol(tmp_path: Path) -> None:
    """Found by an attacker (issue 12): ``"id": true`` answered order 1 (True == 1)."""

    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        await b.launch(NODE, [launch(tmp_path, "e:0", "boolid")], PATIENCE, 5)
        [out] = await b.transition(NODE, [Order("e:0", "CONFIGURE")], PATIENCE, 2)
        assert not out.ok and "an id that is not an integer: 'True'" in (out.error or "")
        await b.close()

    asyncio.run(main())


def test_a_mute_task_fails_at_the_deadline_and_is_reported_slow(tmp_path: Path) -> None:
    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        sink = Collector()
        b.subscribe(sink)
        await b.launch(NODE, [launch(tmp_path, "e:0", "mute")], PATIENCE, 5)
        t0 = time.monotonic()
        [out] = await b.transition(NODE, [Order("e:0", "CONFIGURE")], 0.5, 0.2)
        took = time.monotonic() - t0
        assert out.timed_out and "no answer to CONFIGURE within 0.5 s" in (out.error or "")
        assert took >= 0.5 - 0.01  # it waited for the answer until the deadline
        assert "slow" in sink.kinds("e:0")
        await b.close()

    asyncio.run(main())


def test_crash_during_a_transition_and_bad_commands(tmp_path: Path) -> None:
    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        b.subscribe(Collector())
        await b.launch(NODE, [launch(tmp_path, "e:0", "crash")], PATIENCE, 5)
        [out] = await b.transition(NODE, [Order("e:0", "CONFIGURE")], PATIENCE, 2)
        assert "exited with status 3 during CONFIGURE" in (out.error or "")
        missing = Launch("e:1", "t.e1", Command("/nonexistent/prog"), "basic")
        [out] = await b.launch(NODE, [missing], PATIENCE, 2)
        assert "no such file" in (out.error or "")
        [out] = await b.launch(NODE, [launch(tmp_path, "e:2", "slowhello", "600")], 0.3, 0.1)
        assert out.timed_out and "no hello" in (out.error or "")
        await b.close()

    asyncio.run(main())


def test_stop_leaves_no_orphan_and_no_zombie(tmp_path: Path) -> None:
    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        b.subscribe(Collector())
        pidfile = tmp_path / "grandchild.pid"
        [out] = await b.launch(NODE, [launch(tmp_path, "e:0", "child", str(pidfile))], PATIENCE, 5)
        grandchild = int(pidfile.read_text())
        assert out.pid is not None and alive(out.pid) and alive(grandchild)
        await b.stop(NODE, ["e:0"], 1.0)
        assert not alive(out.pid)
        await wait_for(lambda: not alive(grandchild))
        await b.close()

    asyncio.run(main())


def test_channel_addresses(tmp_path: Path) -> None:
    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        addrs = await b.allocate(
            NODE,
            "env1",
            [
                ChannelRequest("env1:0", "out", "ipc"),
                ChannelRequest("env1:1", "in", "tcp"),
                ChannelRequest("env1:2", "in", "tcp"),
            ],
        )
        assert addrs[0].startswith("ipc://") and addrs[0].endswith("0-out")
        assert addrs[1].startswith("tcp://127.0.0.1:") and addrs[1] != addrs[2]
        await b.release(NODE, "env1")
        await b.close()

    asyncio.run(main())


def test_a_flooding_task_fails_and_the_others_go_on(tmp_path: Path) -> None:
    """200,000 END_OF_STREAM messages at once: the task is failed for flooding after its
    burst (so the server's loop does bounded work for it), and the other task answers."""

    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        sink = Collector()
        b.subscribe(sink)
        ls = [launch(tmp_path, "e:0", "flood"), launch(tmp_path, "e:1", "good")]
        await b.launch(NODE, ls, PATIENCE, 5)
        for name in ("CONFIGURE", "START"):
            outs = await b.transition(NODE, [Order(x.task_id, name) for x in ls], PATIENCE, 2)
            assert all(o.ok for o in outs), outs
        await wait_for(lambda: "error" in sink.kinds("e:0"))
        [err] = [r for r in sink.reports if r.task_id == "e:0" and r.kind == "error"]
        assert "a flood" in err.reason and "10000 messages" in err.reason
        # its burst, and what the rate refilled meanwhile: nowhere near its 200,000
        assert sink.kinds("e:0").count("end_of_stream") < 2 * MESSAGE_BURST
        outs = await b.transition(NODE, [Order("e:1", "STOP")], PATIENCE, 2)
        assert outs[0].state == "CONFIGURED"
        await b.close()

    asyncio.run(main())
