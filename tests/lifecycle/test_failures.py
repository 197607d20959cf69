"""Collections keep their healthy count by updates, never by walking every task: the
count must equal a recount from scratch after any sequence of changes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.lifecycle.failures import Collections
from corral.model.plan import Collection

MEMBERS = ("wf.m-1", "wf.m-2", "wf.m-3", "wf.m-4")
# tasks: (member, task index within it); a member may hold several tasks
TASKS = [(m, i) for m in MEMBERS for i in range(3)]


@given(st.lists(st.tuples(st.sampled_from(range(len(TASKS))), st.booleans()), max_size=60),
       st.integers(min_value=0, max_value=4))  # fmt: skip
def test_healthy_count_equals_a_recount(changes: list[tuple[int, bool]], nmin: int) -> None:
    colls = Collections([Collection("wf.m-*", nmin, MEMBERS)])
    failed = [False] * len(TASKS)
    for k, now_failed in changes:
        member = TASKS[k][0]
        colls.changed("wf.m-*", member, failed[k], now_failed)
        failed[k] = now_failed
        bad = {TASKS[j][0] for j in range(len(TASKS)) if failed[j]}
        assert colls.healthy("wf.m-*") == len(MEMBERS) - len(bad)
        verdict = colls.verdict("wf.m-*", "last")
        assert (verdict is None) == (len(MEMBERS) - len(bad) >= nmin)
        if verdict is not None:
            assert f"{len(MEMBERS) - len(bad)} of 4 members healthy" in verdict


def test_members_are_found_from_the_task_or_its_ancestors() -> None:
    colls = Collections([Collection("wf.w-*", 1, ("wf.w-1", "wf.w-2"))])
    assert colls.member_of("wf.w-*", "wf.w-1") == "wf.w-1"  # for on the task role
    assert colls.member_of("wf.w-*", "wf.w-2.a.b") == "wf.w-2"  # for on a parent role
    assert colls.member_of("wf.w-*", "wf.other") is None
    assert colls.member_of(None, "wf.w-1") is None
