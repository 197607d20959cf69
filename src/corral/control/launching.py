"""One node's batch of launches for the job runner and the service supervisor: each
process's Launch is made (one whose secrets cannot be given fails alone, said why),
the rest go to the backend in one call, and an Outcome comes back per process, in
order (a backend that broke fails them all)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from corral.control.secretfiles import SecretUnavailable
from corral.ports.backend import Backend, Launch, Outcome

log = logging.getLogger("corral.launching")
T = TypeVar("T")


async def launch_batch(
    backend: Backend,
    node: str,
    items: Sequence[T],
    key: Callable[[T], str],
    make: Callable[[T], Launch],
    timeout: float,
) -> list[Outcome]:
    batch: list[Launch] = []
    refused: dict[int, str] = {}  # position -> why it cannot start (its secrets)
    for pos, item in enumerate(items):
        try:
            batch.append(make(item))
        except SecretUnavailable as e:
            refused[pos] = f"its secrets: {e}"
    try:
        outs = await backend.launch(node, batch, timeout, timeout)
    except Exception as e:  # the backend broke: each launch failed
        log.exception("launching %d processes on %s", len(batch), node)
        outs = [Outcome(x.task_id, error=f"the launch failed: {e}") for x in batch]
    if not refused:
        return outs
    it = iter(outs)
    return [Outcome(key(x), error=refused[i]) if i in refused else next(it)
            for i, x in enumerate(items)]  # fmt: skip
