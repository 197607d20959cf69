"""Elastic pools: a pool grows with the queue up to its maximum, its nodes run the work
(real processes on the local backend), and idle nodes are given back after the
cool-down, down to the minimum."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.backends.local import LocalBackend
from corral.control.elastic import ElasticPools, PoolSpec, RayProvider, SimulatedProvider
from corral.control.plane import ControlPlane, install_child_watcher
from corral.jobs.spec import BatchSpec, load_job
from corral.jobs.units import units_of
from corral.model.inventory import Node
from corral.store.sqlite import SqliteStore

PY = sys.executable
PATIENCE = float(os.environ.get("CORRAL_TEST_PATIENCE", "300"))


async def until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.01)


def run(tmp: Path, body: Callable[[ControlPlane, Path], Any]) -> None:
    async def main() -> None:
        install_child_watcher()
        store = SqliteStore(str(tmp / "corral.db"))
        plane = ControlPlane(store, LocalBackend(), inventory=[Node("base", cpu=1, memory=100)],
                             log_dir=str(tmp / "logs"))  # fmt: skip
        try:
            await asyncio.wait_for(body(plane, tmp), PATIENCE)
        finally:
            await plane.close()

    asyncio.run(main())


def submit(plane: ControlPlane, tmp: Path, n: int) -> Any:
    gate = tmp / "gate"
    work = tmp / "work.py"
    work.write_text(
        "import os, sys, time\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        "open('done-' + sys.argv[1], 'w').close()\n"
    )
    text = (f"kind: batch\nname: qa\narray: {n}\npool: qa\nwants: {{cpu: 2}}\n"
            f"command: {{value: {PY}, arguments: [{work}, '{{{{ index }}}}']}}\n")  # fmt: skip
    spec, diags = load_job(str(tmp / "qa.yaml"), text)
    assert not diags and isinstance(spec, BatchSpec), diags
    return plane.jobs.submit(units_of(spec), name="qa", kind="batch", text=text,
                             workdir=str(tmp), owner="qa")  # fmt: skip


def test_a_pool_grows_with_the_queue_and_shrinks_when_idle(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, tmp: Path) -> None:
        events: list[dict[str, Any]] = []
        provider = SimulatedProvider(delay=0.05)
        pool = PoolSpec("qa", 0, 3, Node("qa", cpu=2, memory=1000), cooldown=0.3)
        pools = ElasticPools(plane.ledger, plane.jobs, plane.services, provider, [pool],
                             period=0.05, record=events.append)  # fmt: skip
        pools.start()
        try:
            job = submit(plane, tmp, 6)
            await until(lambda: job.reason is not None and "waiting" in job.reason)
            await until(lambda: job.counts.get("RUNNING") == 3)
            assert len(pools.nodes_of("qa")) == 3
            (tmp / "gate").touch()
            assert await job.done == "SUCCEEDED"
            assert sorted(os.listdir(tmp / "logs" / job.id)) == [f"{i}.log" for i in range(6)]
            assert all((tmp / f"done-{i}").exists() for i in range(6))
            await until(lambda: not pools.nodes_of("qa"))
            assert pools.high_water["qa"] == 3  # never more than the maximum
            assert sorted(provider.released) == ["qa-1", "qa-2", "qa-3"]
            assert [n.name for n in plane.ledger.nodes] == ["base"]
            notes = [e["note"] for e in events]
            assert notes[0] == "asking for 3 nodes (12 cpus wait, 0 free)", notes
            assert any(n.startswith("released") for n in notes), notes
        finally:
            await pools.close()

    run(tmp_path, body)


def test_a_pool_keeps_its_minimum(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, tmp: Path) -> None:
        provider = SimulatedProvider()
        pool = PoolSpec("qa", 1, 2, Node("qa", cpu=2, memory=1000), cooldown=0.1)
        pools = ElasticPools(plane.ledger, plane.jobs, plane.services, provider, [pool],
                             period=0.05)  # fmt: skip
        pools.start()
        try:
            await until(lambda: len(pools.nodes_of("qa")) == 1)  # the minimum, unasked
            job = submit(plane, tmp, 2)
            await until(lambda: job.counts.get("RUNNING") == 2)
            (tmp / "gate").touch()
            assert await job.done == "SUCCEEDED"
            await until(lambda: len(provider.released) == 1)
            assert len(pools.nodes_of("qa")) == 1
            assert pools.high_water["qa"] == 2
        finally:
            await pools.close()

    run(tmp_path, body)


def test_the_ray_provider_asks_the_autoscaler_for_the_pools_bundles() -> None:
    # Ray's autoscaler is outside corral: what it is asked is what is checked
    asked: list[list[dict[str, float]]] = []
    ray = RayProvider(request_resources=lambda bundles: asked.append(bundles))
    pool = PoolSpec("qa", 0, 4, Node("qa", cpu=4, memory=2048))

    async def go() -> None:
        assert await ray.request(pool, 2) == []  # its nodes join through the backend
        await ray.request(pool, 1)
        await ray.release(pool, ["n1", "n2"])

    asyncio.run(go())
    bundle = {"CPU": 4, "memory": 2048 * 1024 * 1024}
    assert asked == [[bundle] * 2, [bundle] * 3, [bundle]]


def test_a_bad_pool_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="need 0 <= min <= max"):
        PoolSpec("qa", 3, 1, Node("qa", cpu=1))
    with pytest.raises(ValueError, match="a node needs cpus"):
        PoolSpec("qa", 0, 1, Node("qa"))
