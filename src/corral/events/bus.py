"""The in-process event bus: stored events go out to whoever listens.

How this runs: ``publish`` is called by the controller on the event loop, after the
events were committed to the store (state is persisted before it is announced); it
calls each subscriber synchronously, in order. A subscriber must be quick (append to
a queue, update a counter); one that raises is dropped and the error kept, so a bad
listener cannot break the controller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Event = dict[str, Any]
Listener = Callable[[Sequence[Event]], None]


class EventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self.errors: list[str] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns the function that removes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        for listener in list(self._listeners):
            try:
                listener(events)
            except Exception as e:  # a listener's bug must not break the controller
                self.errors.append(f"{listener!r}: {type(e).__name__}: {e}")
                if listener in self._listeners:
                    self._listeners.remove(listener)
