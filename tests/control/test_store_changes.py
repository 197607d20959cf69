"""The store's compressed task updates (runs of indices, a JSON array of pids per run)
store what a change-by-change update would."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.lifecycle import task as tasksm
from corral.store.sqlite import SqliteStore, TaskChange, TaskChanges, TaskRow

N = 12
changes = st.lists(
    st.builds(
        TaskChange,
        st.integers(0, N - 1),
        st.sampled_from(tasksm.STATES),
        st.one_of(st.none(), st.just(0), st.integers(1, 99_999)),
        st.one_of(st.none(), st.sampled_from(["it died", "lost"])),
    ),
    max_size=N,
    unique_by=lambda c: c.idx,  # a batch changes a task once (as TaskSet.apply makes them)
)
counter = itertools.count()


@settings(max_examples=150, deadline=None)
@given(st.lists(changes, max_size=5), st.booleans())
def test_compressed_updates_store_what_each_change_says(
    batches: list[list[TaskChange]], grouped: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(str(Path(tmp) / "c.db"))
        env = f"e{next(counter)}"
        rows = [TaskRow(i, f"r.t{i}", "c", "n", tasksm.PENDING, False) for i in range(N)]
        store.create_environment(env, "wf", None, {}, rows, 1.0, [])
        model = {i: (tasksm.PENDING, None, None) for i in range(N)}
        for batch in batches:
            for c in batch:
                _, pid, _ = model[c.idx]
                if c.pid is not None:
                    pid = c.pid or None
                model[c.idx] = (c.state, pid, c.reason)
        if grouped:  # as TaskSet.apply gives them
            for batch in batches:
                store.update_tasks(env, TaskChanges.of(batch), 2.0)
        else:
            for batch in batches:
                store.update_tasks(env, batch, 2.0)
        got = {t["idx"]: (t["state"], t["pid"], t["reason"]) for t in store.tasks(env)}
        store.close()
    assert got == model
