"""A real Ray cluster of several nodes on this one machine, for tests.

Each node is a `ray start --block` process in a session of its own (so that killing
its process group kills that node, and nothing else), bound to 127.0.0.2 and up
(Ray replaces 127.0.0.1 with the machine's external address), with token auth and its
files in the test's temporary directory. Health checks are tuned so that a lost node
is noticed in about 1.5 s. Never `ray stop`: it would end anyone's Ray processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.control.harness import PATIENCE

HEALTH = {  # Ray's health checks, tuned (docs/cluster.md)
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RayCluster:
    def __init__(self, tmp: Path, head: dict[str, str], workers: list[dict[str, str]]) -> None:
        """``head``, ``workers``: each node's labels (``name`` names it for corral)."""
        self.tmp = tmp
        self.head = head
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port("127.0.0.2")
        self.address = f"127.0.0.2:{self.port}"
        token = tmp / "ray-token"
        token.write_text("corral-tests-" + os.urandom(8).hex())
        self.env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_raylet_start_wait_time_s": "120",  # a busy 2-core machine is slow
            **HEALTH,
        }
        self.ray = str(Path(sys.executable).parent / "ray")

    def _start(self, args: list[str], labels: dict[str, str], log: str) -> None:
        label_arg = ",".join(f"{k}={v}" for k, v in labels.items())
        out = open(self.tmp / log, "wb")  # noqa: SIM115 - the node's whole life
        self.procs.append(
            subprocess.Popen(
                [
                    self.ray,
                    "start",
                    "--block",
                    "--temp-dir",
                    str(self.tmp / "ray"),
                    "--num-cpus",
                    "2",
                    "--labels",
                    label_arg,
                    "--disable-usage-stats",
                    *args,
                ],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start(self) -> None:
        """The head (labelled ``head``), then each worker, one at a time: on 2 busy cores,
        nodes started together time out."""
        self._start(
            ["--head", "--node-ip-address", "127.0.0.2", "--port", str(self.port),
             "--include-dashboard", "false"],
            self.head, "ray-head.log",
        )  # fmt: skip
        self.wait_for_nodes(1)
        for i, labels in enumerate(self.workers):
            self._start(
                ["--address", self.address, "--node-ip-address", f"127.0.0.{3 + i}"],
                labels, f"ray-worker-{i}.log",
            )  # fmt: skip
            self.wait_for_nodes(2 + i)

    def add_worker(self, labels: dict[str, str], address: str) -> None:
        """One more worker node (on a loopback address not used yet)."""
        self.workers.append(labels)
        self._start(["--address", self.address, "--node-ip-address", address], labels,
                    f"ray-worker-{len(self.workers) - 1}.log")  # fmt: skip

    def alive(self) -> int:
        """How many nodes Ray says are alive (asked by a short-lived driver)."""
        code = (
            "import ray, logging;"
            f"ray.init(address='{self.address}', logging_level=logging.ERROR,"
            " log_to_driver=False);"
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        r = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **self.env},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        try:
            return int(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def wait_for_nodes(self, n: int) -> None:
        t0 = time.monotonic()
        while (got := self.alive()) < n:
            print(f"ray: {got} of {n} nodes alive", file=sys.stderr)
            if time.monotonic() - t0 > max(PATIENCE, 120):
                raise AssertionError(f"the Ray cluster never had {n} nodes alive")
            time.sleep(0.5)

    def kill_worker(self, i: int) -> None:
        """The worker node is gone, at once: every process of its session."""
        proc = self.procs[1 + i]  # (worker i; the head is procs[0])
        kill_session(proc.pid)
        proc.wait()

    def stop(self) -> None:
        """End every process of every node's session (Ray's workers lead process groups
        of their own, but stay in the session of the `ray start` that made them)."""
        for proc in reversed(self.procs):
            kill_session(proc.pid)
            proc.wait()


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (one we started: its leader's pid)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # the session id, after state, ppid and pgrp
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(d), signal.SIGKILL)
