"""Both state machines, every event from every state, against tables written out here."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.lifecycle import environment as env
from corral.lifecycle import task as task

# The environment table as the issue states it; anything absent is refused.
ENV_EXPECTED = {
    ("STANDBY", "DEPLOY"): "DEPLOYED",
    ("DEPLOYED", "CONFIGURE"): "CONFIGURED",
    ("CONFIGURED", "START_ACTIVITY"): "RUNNING",
    ("RUNNING", "STOP_ACTIVITY"): "CONFIGURED",
    ("CONFIGURED", "RESET"): "DEPLOYED",
    ("STANDBY", "EXIT"): "DONE",
    ("DEPLOYED", "EXIT"): "DONE",
    ("CONFIGURED", "EXIT"): "DONE",
    ("ERROR", "RECOVER"): "DEPLOYED",
    **{(s, "GO_ERROR"): "ERROR" for s in ("STANDBY", "DEPLOYED", "CONFIGURED", "RUNNING", "ERROR")},
}
ENV_COMMANDS = {
    "DEPLOY": (env.Launch(),),
    "CONFIGURE": (env.Transition("CONFIGURE"),),
    "START_ACTIVITY": (env.Transition("START"),),
    "STOP_ACTIVITY": (env.Transition("STOP"),),
    "RESET": (env.Transition("RESET"),),
    "EXIT": (env.Transition("EXIT"), env.Terminate()),
    "GO_ERROR": (),
    "RECOVER": (env.CloseRun(), env.Recover()),
}


@pytest.mark.parametrize("state", [*env.STATES])
@pytest.mark.parametrize("event", [*env.EVENTS, "BOGUS"])
def test_every_environment_event_from_every_state(state: str, event: str) -> None:
    expected = ENV_EXPECTED.get((state, event))
    if expected is None:
        with pytest.raises(env.InvalidTransition) as e:
            env.step(state, event)
        msg = str(e.value)
        if event == "BOGUS":
            assert "unknown event 'BOGUS'" in msg
        else:
            assert f"{event} is not allowed in state {state}" in msg
            for allowed in env.allowed_events(state):
                assert allowed in msg
        return
    dst, commands = env.step(state, event)
    assert dst == expected
    assert commands == ENV_COMMANDS[event]


def test_the_run_spans_start_and_stop_activity() -> None:
    """The run number exists from START_ACTIVITY's first step to STOP_ACTIVITY's last, as
    in AliECS (its before_START_ACTIVITY and after_STOP_ACTIVITY calls read it)."""
    assert {"START_ACTIVITY"} == env.OPENS_RUN
    assert {"STOP_ACTIVITY"} == env.CLOSES_RUN


def test_allowed_events_and_done_is_final() -> None:
    assert env.allowed_events("STANDBY") == ["DEPLOY", "EXIT", "GO_ERROR"]
    assert env.allowed_events("RUNNING") == ["STOP_ACTIVITY", "GO_ERROR"]
    assert env.allowed_events("ERROR") == ["GO_ERROR", "RECOVER"]
    assert env.allowed_events("DONE") == []


def test_a_whole_life_by_step_alone() -> None:
    state = "STANDBY"
    for event in [
        "DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY", "RESET", "CONFIGURE",
        "START_ACTIVITY", "GO_ERROR", "RECOVER", "CONFIGURE", "EXIT",
    ]:  # fmt: skip
        state, _ = env.step(state, event)
    assert state == "DONE"
    for event in env.EVENTS:
        with pytest.raises(env.InvalidTransition):
            env.step(state, event)


# The task table: (state, event) -> next state; None where the event makes no sense.
ALIVE = ("PENDING", "LAUNCHING", "STANDBY", "CONFIGURED", "RUNNING")
ENDED = ("ERROR", "DONE", "LOST")
TASK_EXPECTED: dict[tuple[str, str], str] = {
    ("PENDING", "LAUNCH"): "LAUNCHING",
    ("LAUNCHING", "READY"): "STANDBY",
    ("STANDBY", "CONFIGURE"): "CONFIGURED",
    ("CONFIGURED", "START"): "RUNNING",
    ("RUNNING", "STOP"): "CONFIGURED",
    ("CONFIGURED", "RESET"): "STANDBY",
    ("STANDBY", "EXIT"): "DONE",
    ("CONFIGURED", "EXIT"): "DONE",
    **{(s, "LAUNCH"): "LAUNCHING" for s in ENDED},
    **{(s, "RELAUNCH"): "PENDING" for s in ENDED},
    **{(s, "FAIL"): "ERROR" for s in ALIVE},
    **{(s, "LOSE"): "LOST" for s in ALIVE},
    **{(s, "EXITED"): "DONE" for s in ALIVE},
    **{(s, e): s for s in ENDED for e in ("FAIL", "LOSE", "EXITED")},
}


@pytest.mark.parametrize("state", task.STATES)
@pytest.mark.parametrize("event", [*task.TASK_EVENTS, "BOGUS"])
def test_every_task_event_from_every_state(state: str, event: str) -> None:
    expected = TASK_EXPECTED.get((state, event))
    assert task.task_step(state, event) == expected
    if expected is None:
        with pytest.raises(
            task.IllegalTaskTransition, match=f"{event} is not allowed in state {state}"
        ):
            task.next_state(state, event)
    else:
        assert task.next_state(state, event) == expected


def test_aggregation_rules() -> None:
    agg = task.aggregate
    assert agg([]) == "STANDBY"
    assert agg([("RUNNING", True), ("RUNNING", True)]) == "RUNNING"
    assert agg([("RUNNING", True), ("CONFIGURED", True)]) == "MIXED"
    assert agg([("RUNNING", True), ("ERROR", True)]) == "ERROR"
    assert agg([("RUNNING", True), ("LOST", True)]) == "ERROR"
    # non-critical tasks are neutral when critical ones exist
    assert agg([("RUNNING", True), ("ERROR", False)]) == "RUNNING"
    assert agg([("RUNNING", True), ("STANDBY", False)]) == "RUNNING"
    # a role of non-critical tasks only takes their states
    assert agg([("RUNNING", False), ("RUNNING", False)]) == "RUNNING"
    assert agg([("RUNNING", False), ("LOST", False)]) == "ERROR"


state_st = st.sampled_from(task.STATES)
pairs = st.lists(st.tuples(state_st, st.booleans()), max_size=12)


@given(pairs, st.randoms())
def test_aggregate_ignores_order(tasks: list[tuple[str, bool]], rnd: object) -> None:
    shuffled = list(tasks)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert task.aggregate(tasks) == task.aggregate(shuffled)


@given(pairs, state_st)
def test_a_non_critical_task_never_changes_a_role_with_critical_ones(
    tasks: list[tuple[str, bool]], extra: str
) -> None:
    if not any(c for _, c in tasks):
        return
    assert task.aggregate([*tasks, (extra, False)]) == task.aggregate(tasks)


@given(pairs)
def test_a_failed_critical_task_makes_error(tasks: list[tuple[str, bool]]) -> None:
    if any(c and s in ("ERROR", "LOST") for s, c in tasks):
        assert task.aggregate(tasks) == "ERROR"
