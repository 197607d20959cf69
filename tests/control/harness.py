"""A control plane on a real SQLite file and the local backend, for controller tests."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.backends.local import LocalBackend
from corral.control.environment import Environment
from corral.control.plane import ControlPlane, install_child_watcher
from corral.model.plan import Plan
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand
from tests.conftest import dedent_files
from tests.fake_tasks import write_program

# How long a test waits for a condition before it gives up (only a hung test should
# ever reach it). CORRAL_TEST_PATIENCE shortens it while developing.
PATIENCE = float(os.environ.get("CORRAL_TEST_PATIENCE", "60"))

TASK_CLASS = """
name: fake
control:
  mode: direct
command:
  value: "{{ python }}"
  arguments: ["{{ program }}", "{{ mode }}"]
"""


SHELL_CLASS = """
name: shell
control:
  mode: basic
command:
  shell: true
  value: "{{ script }}"
"""


def plan_of(
    tmp: Path, workflow: str, variables: dict[str, str] | None = None, *, shell: bool = False
) -> Plan:
    """Expand a workflow whose task roles load the class ``fake`` (tests/fake_tasks.py)
    or ``shell`` (a basic task running ``script``, by default: touch TMP/hook-ran)."""
    files = {"wf.yaml": workflow, "tasks/fake.yaml": TASK_CLASS}
    if shell:
        files["tasks/shell.yaml"] = SHELL_CLASS
    files = dedent_files(files)
    return expand(
        "wf.yaml",
        DictSources(files),
        variables=variables or {},
        global_defaults={
            "python": sys.executable,
            "program": write_program(tmp),
            "mode": "good",
            "script": f"touch {tmp}/hook-ran",
        },
    )


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = SqliteStore(str(tmp / "data" / "corral.db"))
        self.backend = LocalBackend(run_dir=str(tmp / "run"))
        self.plane = ControlPlane(self.store, self.backend, log_dir=str(tmp / "data" / "logs"))
        self.events: list[dict[str, Any]] = []
        self.plane.bus.subscribe(self.events.extend)

    def create(self, plan: Plan, **kw: Any) -> Environment:
        return self.plane.create(plan, **kw)

    async def until(self, pred: Callable[[], bool], timeout: float = 60.0) -> float:
        """Wait for a condition (polled): the timeout only ends a test that would hang,
        so it is generous; it is never a performance bound."""
        t0 = time.monotonic()
        while not pred():
            assert time.monotonic() - t0 < max(timeout, PATIENCE), "condition never reached"
            await asyncio.sleep(0.002)
        return time.monotonic() - t0

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())
        ]

    async def close(self) -> None:
        await self.plane.close()
        self.store.close()


def run(tmp: Path, body: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        install_child_watcher()
        h = Harness(tmp)
        try:
            await body(h)
        finally:
            await h.close()

    asyncio.run(main())
