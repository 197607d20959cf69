"""Failure rules: which task failures fail the environment.

A critical task that fails fails the environment. A non-critical one is reported and
ignored, unless it leaves its collection (the instances of an iterator role with
``nmin``) with fewer than ``nmin`` healthy members; a member is healthy while none of
its tasks is ERROR or LOST.

The controller tells ``Collections`` every change of a member task into or out of a
failed state, so deciding costs O(1) per failure, whatever the environment's size:
430 failures among 150,000 tasks are 430 constant-time updates, not 430 walks over
every task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from corral.model.plan import Collection


@dataclass(slots=True)
class _Count:
    path: str
    nmin: int
    size: int
    bad: dict[str, int] = field(default_factory=dict)  # member path -> its failed tasks

    @property
    def healthy(self) -> int:
        return self.size - len(self.bad)


class Collections:
    """The collections of one environment and how many of their members are healthy."""

    __slots__ = ("_by_path", "_members")

    def __init__(self, collections: Sequence[Collection]) -> None:
        self._by_path = {c.path: _Count(c.path, c.nmin, len(c.members)) for c in collections}
        self._members = {c.path: frozenset(c.members) for c in collections}

    def member_of(self, collection: str | None, task_path: str) -> str | None:
        """The member (role path) of ``collection`` that holds the task at ``task_path``:
        the task's own path or the nearest ancestor that is a member."""
        members = self._members.get(collection or "")
        if not members:
            return None
        p = task_path
        while True:
            if p in members:
                return p
            if "." not in p:
                return None
            p = p.rsplit(".", 1)[0]

    def holds(self, collection: str, path: str) -> bool:
        """``path`` is a member of ``collection``."""
        return path in self._members.get(collection, ())

    def changed(self, collection: str, member: str, was_failed: bool, failed: bool) -> None:
        """One task of ``member`` went into (or out of) a failed state."""
        if was_failed == failed:
            return
        c = self._by_path[collection]
        n = c.bad.get(member, 0) + (1 if failed else -1)
        if n > 0:
            c.bad[member] = n
        else:
            c.bad.pop(member, None)

    def verdict(self, collection: str, last: str) -> str | None:
        """Why the environment fails because of this collection, or None while it has
        ``nmin`` healthy members. ``last`` names the failure that was just seen."""
        c = self._by_path[collection]
        if c.healthy >= c.nmin:
            return None
        return (
            f"collection {c.path} has {c.healthy} of {c.size} members healthy, "
            f"fewer than nmin={c.nmin} (last: {last})"
        )

    def healthy(self, collection: str) -> int:
        return self._by_path[collection].healthy

    def paths(self) -> Iterable[str]:
        return self._by_path.keys()
