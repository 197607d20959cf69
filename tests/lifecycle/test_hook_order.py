"""Hook ordering: which calls start and are awaited at which slot of a transition."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from corral.lifecycle.hooks import before_tasks, schedule
from corral.model.vocabulary import Trigger, parse_trigger


@dataclass(frozen=True)
class C:
    name: str
    trigger: Trigger
    await_: Trigger


def c(name: str, trigger: str, wait: str | None = None) -> C:
    t = parse_trigger(trigger)
    return C(name, t, parse_trigger(wait) if wait else t)


def layout(calls: list[C], event: str = "CONFIGURE", src: str = "DEPLOYED",
           dst: str = "CONFIGURED") -> list[tuple[str, list[str], list[str]]]:  # fmt: skip
    return [
        (s.label, [x.name for x in s.start], [x.name for x in s.wait])
        for s in schedule(calls, event, src, dst)
    ]


def test_moments_in_order_with_weights() -> None:
    calls = [
        c("after", "after_CONFIGURE"),
        c("enter", "enter_CONFIGURED"),
        c("plus", "CONFIGURE+3"),
        c("zero", "CONFIGURE"),
        c("minus", "CONFIGURE-1"),
        c("leave", "leave_DEPLOYED"),
        c("late", "before_CONFIGURE+100"),
        c("early", "before_CONFIGURE-5"),
        c("other", "before_START_ACTIVITY"),
        c("entered-elsewhere", "enter_RUNNING"),
    ]
    assert layout(calls) == [
        ("before_CONFIGURE-5", ["early"], ["early"]),
        ("before_CONFIGURE+100", ["late"], ["late"]),
        ("leave_DEPLOYED", ["leave"], ["leave"]),
        ("CONFIGURE-1", ["minus"], ["minus"]),
        ("TASKS", [], []),
        ("CONFIGURE", ["zero"], ["zero"]),
        ("CONFIGURE+3", ["plus"], ["plus"]),
        ("enter_CONFIGURED", ["enter"], ["enter"]),
        ("after_CONFIGURE", ["after"], ["after"]),
    ]


def test_awaits_across_moments_and_transitions() -> None:
    calls = [
        c("pfr", "before_CONFIGURE", "after_CONFIGURE-1"),
        c("same", "before_CONFIGURE"),
        c("later", "before_CONFIGURE", "after_START_ACTIVITY"),
        c("backwards", "after_CONFIGURE", "before_CONFIGURE"),
    ]
    assert layout(calls) == [
        ("before_CONFIGURE", ["pfr", "same", "later"], ["same"]),
        ("TASKS", [], []),
        ("after_CONFIGURE-1", [], ["pfr"]),
        ("after_CONFIGURE", ["backwards"], ["backwards"]),
        ("END", [], ["later"]),
    ]


def test_go_error_from_error_has_no_leave_or_enter() -> None:
    calls = [c("leave", "leave_ERROR"), c("enter", "enter_ERROR"), c("b", "before_GO_ERROR")]
    assert layout(calls, "GO_ERROR", "ERROR", "ERROR") == [
        ("before_GO_ERROR", ["b"], ["b"]),
        ("TASKS", [], []),
    ]
    calls.append(c("leave-running", "leave_RUNNING"))
    assert [s.label for s in schedule(calls, "GO_ERROR", "RUNNING", "ERROR")] == [
        "before_GO_ERROR", "leave_RUNNING", "TASKS", "enter_ERROR",
    ]  # fmt: skip


def test_before_tasks() -> None:
    slots = schedule([c("a", "before_DEPLOY"), c("b", "after_DEPLOY")], "DEPLOY", "STANDBY",
                     "DEPLOYED")  # fmt: skip
    assert [before_tasks(s) for s in slots] == [True, False, False]


EVENTS = ["DEPLOY", "CONFIGURE", "START_ACTIVITY"]
STATES = ["STANDBY", "DEPLOYED", "CONFIGURED", "RUNNING"]
trigger_st = st.one_of(
    st.builds(Trigger, st.sampled_from(["before", "after", ""]), st.sampled_from(EVENTS),
              st.integers(-3, 3)),
    st.builds(Trigger, st.sampled_from(["enter", "leave"]), st.sampled_from(STATES),
              st.integers(-3, 3)),
)  # fmt: skip
calls_st = st.lists(
    st.builds(C, st.text("abc", min_size=1, max_size=3), trigger_st, trigger_st), max_size=15
)


@given(calls_st)
def test_every_included_call_starts_once_and_is_awaited_once_not_earlier(calls: list[C]) -> None:
    slots = schedule(calls, "CONFIGURE", "DEPLOYED", "CONFIGURED")
    keys = [s.key for s in slots]
    assert keys == sorted(set(keys))
    assert sum(s.tasks for s in slots) == 1
    started: dict[int, int] = {}
    waited: dict[int, int] = {}
    for i, s in enumerate(slots):
        for x in s.start:
            assert id(x) not in started
            started[id(x)] = i
        for x in s.wait:
            assert id(x) not in waited
            waited[id(x)] = i
    assert started.keys() == waited.keys()
    for k, i in started.items():
        assert waited[k] >= i
    included = {
        id(x)
        for x in calls
        if (x.trigger.name == "CONFIGURE" and x.trigger.phase in ("before", "after", ""))
        or (x.trigger.phase == "leave" and x.trigger.name == "DEPLOYED")
        or (x.trigger.phase == "enter" and x.trigger.name == "CONFIGURED")
    }
    assert set(started) == included
