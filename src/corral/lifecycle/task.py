"""The task state machine, and how role and environment states aggregate.

A task is PENDING until the controller launches it, LAUNCHING until its process
says it is ready (a direct task's first message) or is spawned (basic), then
follows the environment: STANDBY, CONFIGURED, RUNNING. ERROR is a task that
failed (answered an error, broke the protocol, died while it should live); LOST
is a task whose node is gone; DONE is a task that ended as asked.

Every change of a task's state goes through ``next_state``, which raises
``IllegalTaskTransition`` for a pair the table does not have: a controller bug shows
up as an exception in the tests, not as a task in a state it cannot be in.
"""

from __future__ import annotations

from collections.abc import Iterable

PENDING = "PENDING"
LAUNCHING = "LAUNCHING"
STANDBY = "STANDBY"
CONFIGURED = "CONFIGURED"
RUNNING = "RUNNING"
ERROR = "ERROR"
DONE = "DONE"
LOST = "LOST"
MIXED = "MIXED"

STATES: tuple[str, ...] = (PENDING, LAUNCHING, STANDBY, CONFIGURED, RUNNING, ERROR, DONE, LOST)

# Events a task's state reacts to: the controller's LAUNCH, the task's answers to the
# task transitions (by the transition's name), and what happens to it: READY (it
# answered its launch), FAIL (error, protocol break, unexpected exit), LOSE (node
# gone), EXITED (its process ended when asked, or a basic task finished; a task that
# never started ends DONE too), and RELAUNCH (RECOVER queues an ended task again).
TASK_EVENTS: tuple[str, ...] = (
    "LAUNCH",
    "READY",
    "CONFIGURE",
    "START",
    "STOP",
    "RESET",
    "EXIT",
    "FAIL",
    "LOSE",
    "EXITED",
    "RELAUNCH",
)

TRANSITIONS: dict[tuple[str, str], str] = {
    (PENDING, "LAUNCH"): LAUNCHING,
    (LAUNCHING, "READY"): STANDBY,
    (STANDBY, "CONFIGURE"): CONFIGURED,
    (CONFIGURED, "START"): RUNNING,
    (RUNNING, "STOP"): CONFIGURED,
    (CONFIGURED, "RESET"): STANDBY,
    (STANDBY, "EXIT"): DONE,
    (CONFIGURED, "EXIT"): DONE,
    # a failed, lost or finished task is launched again by RECOVER
    (ERROR, "LAUNCH"): LAUNCHING,
    (LOST, "LAUNCH"): LAUNCHING,
    (DONE, "LAUNCH"): LAUNCHING,
    # RECOVER puts a failed, lost or finished task back in the queue
    (ERROR, "RELAUNCH"): PENDING,
    (LOST, "RELAUNCH"): PENDING,
    (DONE, "RELAUNCH"): PENDING,
}
for _s in (PENDING, LAUNCHING, STANDBY, CONFIGURED, RUNNING):
    TRANSITIONS[(_s, "FAIL")] = ERROR
    TRANSITIONS[(_s, "LOSE")] = LOST
    TRANSITIONS[(_s, "EXITED")] = DONE
for _s in (ERROR, LOST, DONE):
    # news about a task that already ended changes nothing
    for _e in ("FAIL", "LOSE", "EXITED"):
        TRANSITIONS[(_s, _e)] = _s
del _s, _e

ALIVE: frozenset[str] = frozenset((LAUNCHING, STANDBY, CONFIGURED, RUNNING))
FAILED: frozenset[str] = frozenset((ERROR, LOST))


class IllegalTaskTransition(ValueError):
    """A task event that its state does not accept (a bug of the caller)."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"task event {event} is not allowed in state {state}")
        self.state = state
        self.event = event


def task_step(state: str, event: str) -> str | None:
    """The task's next state, or None when ``event`` makes no sense in ``state``."""
    return TRANSITIONS.get((state, event))


def next_state(state: str, event: str) -> str:
    """The task's next state; raises IllegalTaskTransition when the table has none."""
    nxt = TRANSITIONS.get((state, event))
    if nxt is None:
        raise IllegalTaskTransition(state, event)
    return nxt


def aggregate(states: Iterable[tuple[str, bool]]) -> str:
    """The state of a role (or environment) from its tasks' (state, critical) pairs.

    ERROR wins (a critical task in ERROR or LOST); non-critical tasks are neutral
    unless every task is non-critical; tasks that disagree make MIXED; no tasks at
    all make STANDBY.
    """
    critical_states: set[str] = set()
    other_states: set[str] = set()
    for state, critical in states:
        if critical:
            if state in FAILED:
                return ERROR
            critical_states.add(state)
        else:
            other_states.add(state)
    seen = critical_states or {s if s not in FAILED else ERROR for s in other_states}
    if not seen:
        return STANDBY
    if len(seen) == 1:
        return next(iter(seen))
    if ERROR in seen:
        return ERROR
    return MIXED
