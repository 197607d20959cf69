"""What the job runner and the service supervisor share: changes gathered and written
once per loop iteration.

A ``Coalescing`` object binds to the running loop on first use; ``_event`` keeps an
event and ``_schedule_flush`` asks for one call of ``_flush`` (the subclass's: one store
transaction for everything gathered) at the end of this loop iteration, however many
changes came before it.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Coalescing:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: list[dict[str, Any]] = []
        self._flush_scheduled = False

    def _bind(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _event(self, ev: dict[str, Any]) -> None:
        self._events.append(ev)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._bind().call_soon(self._flush)

    def _flush(self) -> None:
        raise NotImplementedError
