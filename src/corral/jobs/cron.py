"""Cron schedules and the periodic-job state machine (issue 13), pure: the clock is a parameter.

``Schedule`` reads a five-field cron expression in a time zone and answers the next fire
time after an instant (epoch seconds). ``Periodic`` decides, given the time and whether a run
is on, what the control plane should do: start a run, skip a fire time (and why), queue it, or
cancel the running run and start a new one. Its state is a small dict, so that a restarted
controller decides the runs missed while it was down. The semantics are in docs/cron.md.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "MAX_COUNTED",
    "Action",
    "CronError",
    "Missed",
    "Overlap",
    "Periodic",
    "Queue",
    "Replace",
    "Schedule",
    "Skip",
    "Start",
]

FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Missed fire times are counted one by one up to this many; past it the count is a lower bound
# (Skip.count_exact is False). The first and the last missed fire times are always exact.
MAX_COUNTED = 1000
# Walking wall-clock matches that map to instants already passed (the repeated hour of a
# fall-back day) is bounded by this many steps.
_MAX_STEPS = 100_000
_REFERENCE = datetime(2000, 1, 1)  # a schedule must fire after this, or it never fires

Overlap = Literal["skip", "queue", "replace"]
Missed = Literal["skip", "run-once"]


_HASHED = re.compile(r"[HR](\(.*\))?(/\d+)?")


class CronError(ValueError):
    """A bad cron expression, time zone, policy or state, said with the field it is in."""


# ---------------------------------------------------------------------------------------------
# croniter, typed


def _walls(expr: str, start: datetime, backward: bool) -> Iterator[datetime]:
    """The naive wall-clock datetimes matching ``expr`` strictly after (before) ``start``."""
    # (imported here: `corral run` and the client commands load this module, not croniter)
    from croniter import CroniterBadDateError, croniter  # type: ignore[import-untyped]

    it: Any = croniter(expr, start)
    while True:
        try:
            w = it.get_prev(datetime) if backward else it.get_next(datetime)
        except CroniterBadDateError:
            return
        if not isinstance(w, datetime):  # pragma: no cover - croniter's contract
            raise TypeError(f"croniter returned {w!r}")
        yield w


def _check_field(expr: str) -> str | None:
    """croniter's complaint about an expression, or None when it accepts it."""
    from croniter import CroniterError, croniter  # croniter 7.0.0 ships no type hints

    try:
        croniter.expand(expr)
    except (CroniterError, ValueError, TypeError, KeyError) as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------
# Schedule


@dataclass(frozen=True)
class Schedule:
    """A cron expression in a time zone. Build it with ``Schedule.parse``."""

    expr: str  # the five fields (an @alias expanded)
    tz: str  # an IANA zone name, e.g. "Europe/Zurich"
    source: str  # the expression as written

    @classmethod
    def parse(cls, expr: str, tz: str) -> Schedule:
        """Read ``expr`` (five fields, or @hourly/@daily/@weekly/@monthly/@yearly) in zone ``tz``.

        Raises CronError naming the bad field, an unknown zone, or a schedule that never fires.
        """
        if not isinstance(expr, str) or not isinstance(tz, str):
            raise CronError("a cron schedule and its time zone are strings")
        source = expr
        text = expr.strip()
        if text.startswith("@"):
            if text.lower() not in ALIASES:
                raise CronError(
                    f"cron {source!r}: unknown alias {text!r}; known: {', '.join(ALIASES)}"
                )
            text = ALIASES[text.lower()]
        fields = text.split()
        if len(fields) != 5:
            raise CronError(
                f"cron {source!r}: {len(fields)} fields; a schedule has 5: {' '.join(FIELDS)}"
            )
        for i, (name, value) in enumerate(zip(FIELDS, fields, strict=True)):
            if _HASHED.fullmatch(value):
                raise CronError(
                    f"cron {source!r}: {name} field {value!r}: hashed and random fields (H, R) "
                    "are not supported (a schedule must say when it fires)"
                )
            alone = ["*"] * 5
            alone[i] = value
            why = _check_field(" ".join(alone))
            if why is not None:
                raise CronError(f"cron {source!r}: bad {name} field {value!r} ({why})")
        text = " ".join(fields)
        why = _check_field(text)
        if why is not None:
            raise CronError(f"cron {source!r}: {why}")
        _zone(tz)
        if next(_walls(text, _REFERENCE, backward=False), None) is None:
            raise CronError(
                f"cron {source!r}: never fires (no date has day-of-month {fields[2]!r} "
                f"in month {fields[3]!r})"
            )
        return cls(text, tz, source)

    @property
    def zone(self) -> tzinfo:
        return _zone(self.tz)

    def next_after(self, t: float) -> float:
        """The first fire time strictly after ``t`` (epoch seconds), DST-correct in the zone.

        A wall time skipped by a spring-forward change fires at the instant of the change (once,
        however many skipped wall times match); a wall time repeated by a fall-back change fires
        once, at its first occurrence, unless the hour field is ``*`` (then the job keeps
        running every hour of real time and fires on both passes).
        """
        for u in self.fires_after(t):
            return u
        raise CronError(f"cron {self.source!r}: no fire time after {t}")

    def fires_after(self, t: float) -> Iterator[float]:
        """The fire times strictly after ``t``, in increasing order, each once (lazy)."""
        zone = self.zone
        naive = _wall(t, zone)
        # On the first pass of a repeated hour, wall times before the local reading of t fire
        # again on the second pass, after t: start the forward walk before them.
        first = naive.replace(tzinfo=zone, fold=0).utcoffset() or timedelta(0)
        second = naive.replace(tzinfo=zone, fold=1).utcoffset() or timedelta(0)
        start = naive - max(timedelta(0), first - second) - timedelta(minutes=1)
        pending: list[float] = []  # instants found, not yet known to be the next
        last = t
        steps = 0
        for w in _walls(self.expr, start, backward=False):
            instants = self._instants(w)
            for u in instants:
                if u > last:
                    heapq.heappush(pending, u)
            # Later wall times fire no earlier than this one's first instant.
            while pending and pending[0] <= instants[0]:
                u = heapq.heappop(pending)
                if u > last:
                    steps = 0
                    last = u
                    yield u
            steps += 1
            if steps > _MAX_STEPS:  # pragma: no cover - a wall clock never repeats this much
                raise CronError(f"cron {self.source!r}: no progress after {t}")
        while pending:  # pragma: no cover - croniter gave up (a rare date far away)
            u = heapq.heappop(pending)
            if u > last:
                last = u
                yield u

    def latest_at_or_before(self, t: float, *, strict: bool = False) -> float | None:
        """The last fire time at or before ``t`` (strictly before when ``strict``), or None."""
        zone = self.zone
        naive = _wall(t, zone)
        # On the second pass of a repeated hour, wall times up to the offset change later than
        # the local reading of t map to instants before t: start the backward walk there.
        actual = datetime.fromtimestamp(t, zone).utcoffset() or timedelta(0)
        first = naive.replace(tzinfo=zone, fold=0).utcoffset() or timedelta(0)
        start = naive + max(timedelta(0), first - actual) + timedelta(minutes=1)
        best: float | None = None
        for steps, w in enumerate(_walls(self.expr, start, backward=True)):
            instants = self._instants(w)
            for u in instants:
                if (u < t or (u == t and not strict)) and (best is None or u > best):
                    best = u
            # Earlier wall times fire no later than this one's last instant.
            if best is not None and instants[-1] <= best:
                return best
            if steps > _MAX_STEPS:  # pragma: no cover
                raise CronError(f"cron {self.source!r}: no progress before {t}")
        return best

    @property
    def every_hour(self) -> bool:
        """The hour field is ``*``: the repeated hour of a fall-back day fires again."""
        return self.expr.split()[1] == "*"

    def _instants(self, w: datetime) -> tuple[float, ...]:
        """The instants at which wall time ``w`` fires, increasing (see ``next_after``)."""
        zone = self.zone
        u0 = w.replace(tzinfo=zone, fold=0).timestamp()  # the first occurrence when repeated
        if _wall(u0, zone) == w:
            if self.every_hour:
                u1 = w.replace(tzinfo=zone, fold=1).timestamp()
                if u1 > u0 and _wall(u1, zone) == w:  # repeated: the second pass too
                    return (u0, u1)
            return (u0,)
        # w does not exist (spring forward): the change happened between the two readings.
        lo = math.floor(w.replace(tzinfo=zone, fold=1).timestamp())
        hi = math.ceil(u0)
        before = datetime.fromtimestamp(lo, zone).utcoffset()
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if datetime.fromtimestamp(mid, zone).utcoffset() == before:
                lo = mid
            else:
                hi = mid
        return (float(hi),)


def _zone(tz: str) -> tzinfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as e:
        raise CronError(f"unknown time zone {tz!r} (an IANA name such as 'Europe/Zurich')") from e


def _wall(t: float, zone: tzinfo) -> datetime:
    if not math.isfinite(t):
        raise CronError(f"a time is a finite number of epoch seconds, not {t!r}")
    return datetime.fromtimestamp(t, UTC).astimezone(zone).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class Start:
    """Start a run for ``fire_time``.

    ``covers`` is how many fire times this run stands for (more than one when missed runs are
    caught up with ``missed="run-once"``); ``catch_up`` when the fire time is late by more than
    the grace; ``from_queue`` when it was queued behind an earlier run.
    """

    fire_time: float
    covers: int = 1
    catch_up: bool = False
    from_queue: bool = False
    kind: Literal["start"] = "start"


@dataclass(frozen=True)
class Skip:
    """Fire times not run: ``count`` of them, from ``first_fire_time`` to ``fire_time``.

    ``cause`` is "missed" (late by more than the grace, e.g. during downtime), "overlap" (a run
    is on and overlap is skip) or "queue-full". ``count_exact`` is False when more than
    MAX_COUNTED were missed and ``count`` is that lower bound.
    """

    fire_time: float
    cause: Literal["missed", "overlap", "queue-full"]
    reason: str
    count: int = 1
    first_fire_time: float | None = None
    count_exact: bool = True
    kind: Literal["skip"] = "skip"


@dataclass(frozen=True)
class Replace:
    """Cancel the running run, then start one for ``fire_time`` (overlap is replace)."""

    fire_time: float
    covers: int = 1
    catch_up: bool = False
    kind: Literal["replace"] = "replace"


@dataclass(frozen=True)
class Queue:
    """Queued ``fire_time`` behind the running run; ``position`` 1 is the next to start."""

    fire_time: float
    position: int
    kind: Literal["queue"] = "queue"


Action = Start | Skip | Replace | Queue


# ---------------------------------------------------------------------------------------------
# Periodic


class Periodic:
    """What to do about a periodic job, given the time and whether its run is on.

    ``since``: fire times strictly after it are due (default: the first ``decide``'s ``now``).
    ``grace``: how late (seconds) a fire time may be decided and still be on time; later than
    that, it is missed. ``state``: a dict from ``state()`` of an earlier controller.
    """

    def __init__(
        self,
        schedule: Schedule,
        overlap: Overlap = "skip",
        missed: Missed = "skip",
        *,
        max_queue: int = 1,
        grace: float = 60.0,
        since: float | None = None,
        state: Mapping[str, object] | None = None,
    ) -> None:
        if overlap not in ("skip", "queue", "replace"):
            raise CronError(f"overlap {overlap!r}: one of skip, queue, replace")
        if missed not in ("skip", "run-once"):
            raise CronError(f"missed {missed!r}: one of skip, run-once")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise CronError(f"max_queue {max_queue!r}: an integer of at least 1")
        if not _number(grace) or grace < 0:
            raise CronError(f"grace {grace!r}: a number of seconds, at least 0")
        self.schedule = schedule
        self.overlap: Overlap = overlap
        self.missed: Missed = missed
        self.max_queue = max_queue
        self.grace = float(grace)
        self._last_fire: float | None = None if since is None else _time("since", since)
        self._queue: list[float] = []
        if state is not None:
            self._load(state)

    # -- persistent state ---------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """The state to keep across restarts: the last fire time handled and the queue."""
        return {"last_fire": self._last_fire, "queue": list(self._queue)}

    def _load(self, state: Mapping[str, object]) -> None:
        if not isinstance(state, Mapping):
            raise CronError(f"periodic state: a mapping, not {type(state).__name__}")
        unknown = set(state) - {"last_fire", "queue"}
        if unknown:
            raise CronError(f"periodic state: unknown keys {sorted(map(str, unknown))}")
        last = state.get("last_fire")
        self._last_fire = None if last is None else _time("state last_fire", last)
        queue = state.get("queue", [])
        if not isinstance(queue, list | tuple):
            raise CronError(f"periodic state queue: a list of fire times, not {queue!r}")
        fires = [_time("state queue item", q) for q in cast("list[object]", list(queue))]
        # A queue kept under an earlier policy: kept (oldest first) only while overlap is queue.
        self._queue = fires[: self.max_queue] if self.overlap == "queue" else []

    @property
    def last_fire(self) -> float | None:
        return self._last_fire

    @property
    def queued(self) -> tuple[float, ...]:
        return tuple(self._queue)

    # -- decisions ----------------------------------------------------------------------------

    def decide(self, now: float, running: bool) -> list[Action]:
        """The actions due at ``now``; ``running`` says whether a run of this job is on."""
        now = _time("now", now)
        actions: list[Action] = []
        if self._queue and not running:
            actions.append(Start(self._queue.pop(0), from_queue=True))
            running = True
        if self._last_fire is None:  # a new job: fire times after its first look are due
            self._last_fire = now
            return actions
        first = next(iter(self.schedule.fires_after(self._last_fire)), None)
        if first is None or first > now:
            return actions
        latest = self.schedule.latest_at_or_before(now)
        assert latest is not None and latest >= first
        count, exact = self._count(first, latest)
        self._last_fire = latest
        on_time = now - latest <= self.grace
        n_missed = count - 1 if on_time else count
        if self.missed == "skip":
            if n_missed:
                last_missed = (
                    latest
                    if not on_time
                    else self.schedule.latest_at_or_before(latest, strict=True)
                )
                assert last_missed is not None
                actions.append(
                    Skip(
                        last_missed,
                        "missed",
                        f"{_runs(n_missed, exact)} missed (late by more than the "
                        f"{self.grace:g}s grace) and missed is skip",
                        count=n_missed,
                        first_fire_time=first,
                        count_exact=exact,
                    )
                )
            if on_time:
                actions.append(self._fire(latest, running, covers=1, catch_up=False))
        else:  # run-once: one run for all of them, the one due now if any
            actions.append(self._fire(latest, running, covers=count, catch_up=not on_time))
        return actions

    def finished(self, now: float) -> list[Action]:
        """The run ended at ``now``: start the next queued run, and whatever else is due."""
        return self.decide(now, running=False)

    def _fire(self, fire: float, running: bool, *, covers: int, catch_up: bool) -> Action:
        if not running:
            return Start(fire, covers=covers, catch_up=catch_up)
        if self.overlap == "replace":
            return Replace(fire, covers=covers, catch_up=catch_up)
        if self.overlap == "queue":
            if len(self._queue) < self.max_queue:
                self._queue.append(fire)
                return Queue(fire, len(self._queue))
            return Skip(
                fire,
                "queue-full",
                f"the previous run is still on and {self.max_queue} already queued "
                f"(max_queue={self.max_queue})",
            )
        return Skip(fire, "overlap", "the previous run is still on and overlap is skip")

    def _count(self, first: float, latest: float) -> tuple[int, bool]:
        """How many fire times in [first, latest], counted up to MAX_COUNTED (then a bound)."""
        count = 0
        for u in self.schedule.fires_after(first - 1e-6):
            if u > latest:
                return count, True
            count += 1
            if count >= MAX_COUNTED:
                return count, u == latest
        return count, True  # pragma: no cover - latest is a fire time


def _runs(n: int, exact: bool) -> str:
    return f"{'' if exact else 'at least '}{n} run{'' if n == 1 else 's'}"


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _time(what: str, x: object) -> float:
    if not _number(x):
        raise CronError(f"{what}: a finite number of epoch seconds, not {x!r}")
    return float(cast("float", x))
