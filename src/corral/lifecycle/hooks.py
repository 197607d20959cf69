"""The order of a transition's moments, and which hook calls start and are awaited when.

A transition EVENT from SRC to DST runs through these moments, in order::

    before_EVENT (by ascending weight)
    leave_SRC    (by ascending weight)
    EVENT        with a negative weight
    TASKS        the core's own work: launch, task transitions, run numbers
    EVENT        with weight 0 or more
    enter_DST    (by ascending weight)
    after_EVENT  (by ascending weight)

A call starts at its trigger and is awaited at its ``await`` moment (its trigger
when it has none). At one slot, calls start first and are awaited after, so calls
sharing a slot run concurrently. A call whose await moment is not part of this
transition is awaited at the end of it. ``schedule`` is pure; the controller
executes the slots in order and, for a critical failure, cancels the transition
when it happens before TASKS, or sends the environment to ERROR after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from corral.model.vocabulary import Trigger


class Hooked(Protocol):
    @property
    def trigger(self) -> Trigger: ...

    @property
    def await_(self) -> Trigger: ...


H = TypeVar("H", bound=Hooked)

_END = (99, 0)
_TASKS = (3, 0)


@dataclass(slots=True)
class Slot(Generic[H]):
    """One point of the transition: start these calls, then await those.

    ``tasks`` marks the core's own work (exactly one slot per transition has it;
    it starts and awaits nothing).
    """

    key: tuple[int, int]
    label: str
    start: list[H] = field(default_factory=list)
    wait: list[H] = field(default_factory=list)
    tasks: bool = False


def _rank(t: Trigger, event: str, src: str, dst: str) -> tuple[int, int] | None:
    """The position of a trigger in this transition, or None if it is not part of it."""
    if t.phase == "before" and t.name == event:
        return (0, t.weight)
    if t.phase == "leave" and t.name == src and src != dst:
        return (1, t.weight)
    if t.phase == "" and t.name == event:
        return (2, t.weight) if t.weight < 0 else (4, t.weight)
    if t.phase == "enter" and t.name == dst and src != dst:
        return (5, t.weight)
    if t.phase == "after" and t.name == event:
        return (6, t.weight)
    return None


def _label(key: tuple[int, int], event: str, src: str, dst: str) -> str:
    moment = {
        0: f"before_{event}",
        1: f"leave_{src}",
        2: event,
        3: "TASKS",
        4: event,
        5: f"enter_{dst}",
        6: f"after_{event}",
        99: "END",
    }[key[0]]
    if key[0] in (3, 99) or key[1] == 0:
        return moment
    return f"{moment}{key[1]:+d}"


def schedule(calls: Sequence[H], event: str, src: str, dst: str) -> list[Slot[H]]:
    """The slots of transition ``event`` (``src`` → ``dst``) for these calls, in order.

    Calls whose trigger is not part of this transition are left out. The result
    always holds the TASKS slot; an END slot is added only for calls awaited there.
    """
    slots: dict[tuple[int, int], Slot[H]] = {_TASKS: Slot(_TASKS, "TASKS", tasks=True)}

    def slot(key: tuple[int, int]) -> Slot[H]:
        s = slots.get(key)
        if s is None:
            s = slots[key] = Slot(key, _label(key, event, src, dst))
        return s

    for call in calls:
        start = _rank(call.trigger, event, src, dst)
        if start is None:
            continue
        wait = _rank(call.await_, event, src, dst)
        if wait is None or wait < start:
            wait = _END if wait is None else start
        slot(start).start.append(call)
        slot(wait).wait.append(call)
    return [slots[k] for k in sorted(slots)]


def before_tasks(slot: Slot[H]) -> bool:
    """True for a slot that comes before the core's own work."""
    return slot.key < _TASKS
