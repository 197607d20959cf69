"""The task set keeps every count decisions need by updates: after any sequence of
legal task events, each count equals a recount over all tasks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.control.tasks import NO_PID, TaskSet
from corral.lifecycle import task as tasksm
from corral.templates import DictSources, expand

WF = """
name: wf
roles:
  - name: g-{{ i }}
    for: {begin: "1", end: "3", var: i, nmin: "2"}
    roles:
      - {name: d, task: {load: direct, critical: false}}
      - {name: b, task: {load: basic}}
  - {name: solo, task: {load: direct}}
"""
FILES = {
    "wf.yaml": WF,
    "tasks/direct.yaml": "name: direct\ncontrol: {mode: direct}\ncommand: {value: /bin/d}\n",
    "tasks/basic.yaml": "name: basic\ncontrol: {mode: basic}\ncommand: {value: /bin/b}\n",
}
PLAN = expand("wf.yaml", DictSources(FILES))


def recount(ts: TaskSet) -> tuple[dict[str, int], dict[str, dict[tuple[str, bool], int]], int]:
    counts: dict[str, int] = {}
    pairs: dict[str, dict[tuple[str, bool], int]] = {"": {}}
    running_no_eos = 0
    for t in ts.tasks:
        counts[t.state] = counts.get(t.state, 0) + 1
        for scope in ("", t.role):
            p = pairs.setdefault(scope, {})
            p[(t.state, t.critical)] = p.get((t.state, t.critical), 0) + 1
        if t.direct and t.state == tasksm.RUNNING and not t.eos:
            running_no_eos += 1
    return counts, pairs, running_no_eos


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(tasksm.TASK_EVENTS)), max_size=80),
       st.lists(st.integers(0, 6), max_size=10))  # fmt: skip
def test_counts_equal_a_recount(events: list[tuple[int, str]], eos: list[int]) -> None:
    ts = TaskSet("e", PLAN, ["n"] * len(PLAN.tasks))
    for k, event in events:
        t = ts.tasks[k]
        if tasksm.task_step(t.state, event) is None:
            continue  # only legal events: an illegal one raises (tested elsewhere)
        ts.apply("n", "e", [(t, event, NO_PID if event == "RELAUNCH" else None, None)])
        if k in eos:
            ts.end_of_stream(t)
        counts, pairs, running_no_eos = recount(ts)
        assert ts.counts == counts
        for scope, p in pairs.items():
            assert ts.pairs.get(scope, {}) == p
        assert ts.running_no_eos == running_no_eos
        bad = {t.member for t in ts.tasks if t.member and t.state in tasksm.FAILED}
        assert ts.collections.healthy("wf.g-*") == 3 - len(bad)
