"""Cron schedules and the periodic-job state machine, on a fake clock (plain floats)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from corral.jobs.cron import (
    MAX_COUNTED,
    CronError,
    Periodic,
    Queue,
    Replace,
    Schedule,
    Skip,
    Start,
)

ZURICH = ZoneInfo("Europe/Zurich")
HOUR = 3600.0
DAY = 86400.0


def zurich(y: int, mo: int, d: int, h: int = 0, mi: int = 0, fold: int = 0) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=ZURICH, fold=fold).timestamp()


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp()


def fires(s: Schedule, t: float, n: int) -> list[float]:
    return list(itertools.islice(s.fires_after(t), n))


def local(u: float) -> str:
    return datetime.fromtimestamp(u, ZURICH).strftime("%H:%M%z")


# -- Schedule -------------------------------------------------------------------------------


def test_every_minute() -> None:
    s = Schedule.parse("* * * * *", "UTC")
    t0 = utc(2024, 1, 1, 12, 0)
    assert s.next_after(t0) == t0 + 60  # strictly after
    assert s.next_after(t0 + 0.5) == t0 + 60
    assert s.next_after(t0 - 0.5) == t0
    assert fires(s, t0, 3) == [t0 + 60, t0 + 120, t0 + 180]
    assert s.latest_at_or_before(t0 + 59) == t0
    assert s.latest_at_or_before(t0, strict=True) == t0 - 60


def test_hourly_in_zurich_across_spring_forward() -> None:
    # 2024-03-31: 02:00 CET becomes 03:00 CEST; the day has 23 hours and the job runs 23 times,
    # still one hour of real time apart.
    s = Schedule.parse("0 * * * *", "Europe/Zurich")
    got = fires(s, zurich(2024, 3, 31, 0, 30), 4)
    assert [local(u) for u in got] == ["01:00+0100", "03:00+0200", "04:00+0200", "05:00+0200"]
    assert {b - a for a, b in itertools.pairwise(got)} == {HOUR}
    day = [u for u in fires(s, zurich(2024, 3, 30, 23, 59), 30) if u < zurich(2024, 4, 1)]
    assert len(day) == 23


def test_hourly_in_zurich_across_fall_back() -> None:
    # 2024-10-27: 03:00 CEST becomes 02:00 CET; the hour field is *, so the repeated hour fires
    # again: 25 runs, one hour of real time apart.
    s = Schedule.parse("0 * * * *", "Europe/Zurich")
    got = fires(s, zurich(2024, 10, 27, 0, 30), 4)
    assert [local(u) for u in got] == ["01:00+0200", "02:00+0200", "02:00+0100", "03:00+0100"]
    assert {b - a for a, b in itertools.pairwise(got)} == {HOUR}
    day = [u for u in fires(s, zurich(2024, 10, 26, 23, 59), 30) if u < zurich(2024, 10, 28)]
    assert len(day) == 25
    # From inside the second pass, next and latest know which pass they are on.
    second = zurich(2024, 10, 27, 2, 10, fold=1)
    assert local(s.next_after(second)) == "03:00+0100"
    assert s.latest_at_or_before(second) == zurich(2024, 10, 27, 2, 0, fold=1)
    assert s.next_after(zurich(2024, 10, 27, 2, 0, fold=0)) == zurich(2024, 10, 27, 2, 0, fold=1)


def test_0230_on_spring_forward_runs_once_at_the_change() -> None:
    s = Schedule.parse("30 2 * * *", "Europe/Zurich")
    got = fires(s, zurich(2024, 3, 30, 12), 3)
    assert got[0] == zurich(2024, 3, 31, 3, 0)  # 02:30 does not exist: at the change
    assert got[1] == zurich(2024, 4, 1, 2, 30)
    # several skipped wall times collapse into one run
    s2 = Schedule.parse("0,15,30,45 2 * * *", "Europe/Zurich")
    day = [u for u in fires(s2, zurich(2024, 3, 31, 0), 10) if u < zurich(2024, 4, 1)]
    assert day == [zurich(2024, 3, 31, 3, 0)]


def test_0230_on_fall_back_runs_once() -> None:
    s = Schedule.parse("30 2 * * *", "Europe/Zurich")
    got = fires(s, zurich(2024, 10, 26, 12), 2)
    assert got == [zurich(2024, 10, 27, 2, 30, fold=0), zurich(2024, 10, 28, 2, 30)]
    assert local(got[0]) == "02:30+0200"  # the first pass


def test_aliases_and_names() -> None:
    assert Schedule.parse("@hourly", "UTC").expr == "0 * * * *"
    assert Schedule.parse("@DAILY", "UTC").expr == "0 0 * * *"
    s = Schedule.parse("0 3 * * mon-fri", "UTC")
    sat = utc(2024, 1, 6)  # a Saturday
    assert s.next_after(sat) == utc(2024, 1, 8, 3)


@pytest.mark.parametrize(
    ("expr", "tz", "says"),
    [
        ("61 * * * *", "UTC", "bad minute field '61'"),
        ("* 24 * * *", "UTC", "bad hour field '24'"),
        ("* * 0 * *", "UTC", "bad day-of-month field '0'"),
        ("* * * 13 *", "UTC", "bad month field '13'"),
        ("* * * * funday", "UTC", "bad day-of-week field 'funday'"),
        ("*/0 * * * *", "UTC", "bad minute field '*/0'"),
        ("* * * *", "UTC", "4 fields; a schedule has 5"),
        ("0 0 * * * *", "UTC", "6 fields"),
        ("", "UTC", "0 fields"),
        ("@reboot", "UTC", "unknown alias '@reboot'"),
        ("0 0 30 2 *", "UTC", "never fires"),
        ("* * * * *", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("* * * * *", "../../etc/passwd", "unknown time zone"),
        ("* * * * *", "", "unknown time zone"),
    ],
)
def test_bad_schedules_say_what_is_wrong(expr: str, tz: str, says: str) -> None:
    with pytest.raises(CronError, match=None) as e:
        Schedule.parse(expr, tz)
    assert says in str(e.value)


def test_bad_times() -> None:
    s = Schedule.parse("* * * * *", "UTC")
    with pytest.raises(CronError, match="finite"):
        s.next_after(float("nan"))


# -- Periodic: overlap ----------------------------------------------------------------------

T0 = utc(2024, 1, 1)  # a fire time of both schedules below
EVERY_MINUTE = Schedule.parse("* * * * *", "UTC")
HOURLY = Schedule.parse("0 * * * *", "UTC")


def test_starts_each_fire_time_once() -> None:
    p = Periodic(EVERY_MINUTE, since=T0 - 1)
    assert p.decide(T0 - 0.5, running=False) == []
    assert p.decide(T0 + 1, running=False) == [Start(T0)]
    assert p.decide(T0 + 2, running=False) == []  # already handled
    assert p.decide(T0 + 60, running=False) == [Start(T0 + 60)]


def test_new_job_anchors_at_its_first_look() -> None:
    p = Periodic(EVERY_MINUTE)
    assert p.decide(T0 + 30, running=False) == []  # T0 was before the job existed
    assert p.decide(T0 + 61, running=False) == [Start(T0 + 60)]


def test_overlap_skip_with_a_job_longer_than_the_period() -> None:
    p = Periodic(EVERY_MINUTE, "skip", since=T0 - 1)
    assert p.decide(T0, running=False) == [Start(T0)]
    # the run takes 150 s: the next two fire times find it running
    [a] = p.decide(T0 + 60, running=True)
    assert isinstance(a, Skip) and a.cause == "overlap" and a.fire_time == T0 + 60
    assert "still on" in a.reason
    [b] = p.decide(T0 + 120, running=True)
    assert isinstance(b, Skip) and b.fire_time == T0 + 120
    assert p.finished(T0 + 150) == []  # nothing kept
    assert p.decide(T0 + 180, running=False) == [Start(T0 + 180)]


def test_overlap_queue_with_a_job_longer_than_the_period() -> None:
    p = Periodic(EVERY_MINUTE, "queue", max_queue=2, since=T0 - 1)
    assert p.decide(T0, running=False) == [Start(T0)]
    assert p.decide(T0 + 60, running=True) == [Queue(T0 + 60, 1)]
    assert p.decide(T0 + 120, running=True) == [Queue(T0 + 120, 2)]
    [full] = p.decide(T0 + 180, running=True)
    assert isinstance(full, Skip) and full.cause == "queue-full" and "max_queue=2" in full.reason
    assert p.queued == (T0 + 60, T0 + 120)
    # the first run ends: the oldest queued run starts
    assert p.finished(T0 + 200) == [Start(T0 + 60, from_queue=True)]
    # at the next fire time that run is on: this one queues behind the other
    assert p.decide(T0 + 240, running=True) == [Queue(T0 + 240, 2)]
    assert p.finished(T0 + 250) == [Start(T0 + 120, from_queue=True)]
    # the queue survives a restart
    q = Periodic(EVERY_MINUTE, "queue", max_queue=2, state=p.state())
    assert q.queued == (T0 + 240,)
    assert q.finished(T0 + 260) == [Start(T0 + 240, from_queue=True)]
    assert q.decide(T0 + 300, running=True) == [Queue(T0 + 300, 1)]


def test_queue_drains_when_decide_sees_nothing_running() -> None:
    p = Periodic(EVERY_MINUTE, "queue", since=T0 - 1)
    p.decide(T0, running=False)
    p.decide(T0 + 60, running=True)
    # finished() was not called, but the next decide sees no run: the queued one starts
    # first and the new fire time queues behind it
    assert p.decide(T0 + 120, running=False) == [
        Start(T0 + 60, from_queue=True),
        Queue(T0 + 120, 1),
    ]


def test_overlap_replace_with_a_job_longer_than_the_period() -> None:
    p = Periodic(EVERY_MINUTE, "replace", since=T0 - 1)
    assert p.decide(T0, running=False) == [Start(T0)]
    assert p.decide(T0 + 60, running=True) == [Replace(T0 + 60)]
    assert p.decide(T0 + 120, running=True) == [Replace(T0 + 120)]
    assert p.finished(T0 + 150) == []
    assert p.decide(T0 + 180, running=False) == [Start(T0 + 180)]


# -- Periodic: missed runs after downtime ---------------------------------------------------


def down_for_three_days(missed: str, **kw: object) -> tuple[Periodic, float]:
    p = Periodic(HOURLY, "skip", missed, since=T0 - 1, **kw)  # type: ignore[arg-type]
    assert p.decide(T0 + 5, running=False) == [Start(T0)]
    saved = p.state()
    assert saved == {"last_fire": T0, "queue": []}
    # the controller is down for 3 days; a new one starts with the saved state
    again = Periodic(HOURLY, "skip", missed, since=None, state=saved, **kw)  # type: ignore[arg-type]
    return again, T0 + 3 * DAY + 10 * 60  # back at 00:10, three days later


def test_downtime_with_missed_skip_starts_nothing_and_says_how_many() -> None:
    p, now = down_for_three_days("skip")
    [a] = p.decide(now, running=False)
    assert isinstance(a, Skip) and a.cause == "missed"
    assert a.count == 72 and a.count_exact
    assert a.first_fire_time == T0 + HOUR and a.fire_time == T0 + 3 * DAY
    assert "72 runs missed" in a.reason
    assert p.decide(now + 1, running=False) == []  # said once
    assert p.decide(T0 + 3 * DAY + HOUR, running=False) == [Start(T0 + 3 * DAY + HOUR)]


def test_downtime_with_missed_run_once_starts_one_catch_up_run() -> None:
    p, now = down_for_three_days("run-once")
    assert p.decide(now, running=False) == [Start(T0 + 3 * DAY, covers=72, catch_up=True)]
    assert p.decide(now + 1, running=False) == []
    assert p.state()["last_fire"] == T0 + 3 * DAY


def test_back_just_in_time_the_run_due_now_is_the_catch_up() -> None:
    p, _ = down_for_three_days("run-once")
    now = T0 + 3 * DAY + 20  # within the grace of the 00:00 fire time
    assert p.decide(now, running=False) == [Start(T0 + 3 * DAY, covers=72)]
    q, _ = down_for_three_days("skip")
    [skip, start] = q.decide(now, running=False)
    assert isinstance(skip, Skip) and skip.count == 71 and skip.fire_time == T0 + 3 * DAY - HOUR
    assert start == Start(T0 + 3 * DAY)


def test_catch_up_run_meets_the_overlap_policy() -> None:
    p, now = down_for_three_days("run-once")
    [a] = p.decide(now, running=True)  # e.g. a run started before the downtime is still on
    assert isinstance(a, Skip) and a.cause == "overlap"


def test_a_year_of_downtime_every_minute_is_bounded() -> None:
    saved = {"last_fire": T0, "queue": []}
    p = Periodic(EVERY_MINUTE, missed="skip", grace=10, state=saved)
    now = T0 + 366 * DAY + 30  # 2024 is a leap year: 527,040 minutes
    [a] = p.decide(now, running=False)
    assert isinstance(a, Skip) and a.count == MAX_COUNTED and not a.count_exact
    assert a.first_fire_time == T0 + 60 and a.fire_time == T0 + 366 * DAY
    assert f"at least {MAX_COUNTED} runs missed" in a.reason
    q = Periodic(EVERY_MINUTE, missed="run-once", grace=10, state=saved)
    [b] = q.decide(now, running=False)
    assert isinstance(b, Start) and b.catch_up and b.fire_time == T0 + 366 * DAY


def test_late_tick_beyond_grace_is_missed() -> None:
    p = Periodic(HOURLY, grace=30, since=T0 - 1)
    [a] = p.decide(T0 + 31, running=False)
    assert isinstance(a, Skip) and a.cause == "missed" and a.count == 1
    p = Periodic(HOURLY, grace=30, since=T0 - 1)
    assert p.decide(T0 + 30, running=False) == [Start(T0)]


def test_clock_going_backwards_fires_nothing_twice() -> None:
    p = Periodic(EVERY_MINUTE, since=T0 - 1)
    assert p.decide(T0, running=False) == [Start(T0)]
    assert p.decide(T0 - 3600, running=False) == []
    assert p.decide(T0 + 1, running=False) == []


# -- Periodic: bad inputs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"overlap": "ignore"}, "overlap 'ignore': one of skip, queue, replace"),
        ({"missed": "all"}, "missed 'all': one of skip, run-once"),
        ({"max_queue": 0}, "max_queue 0"),
        ({"max_queue": True}, "max_queue True"),
        ({"grace": -1}, "grace -1"),
        ({"since": float("inf")}, "since"),
        ({"state": {"last_fire": "yesterday"}}, "state last_fire"),
        ({"state": {"last_fire": 1.0, "queue": "x"}}, "state queue"),
        ({"state": {"last_fire": 1.0, "queue": [None]}}, "state queue item"),
        ({"state": {"last": 1.0}}, "unknown keys ['last']"),
        ({"state": [1.0]}, "a mapping"),
    ],
)
def test_bad_periodic_inputs(kw: dict[str, object], says: str) -> None:
    with pytest.raises(CronError) as e:
        Periodic(HOURLY, **kw)  # type: ignore[arg-type]
    assert says in str(e.value)


def test_bad_now() -> None:
    p = Periodic(HOURLY, since=T0)
    with pytest.raises(CronError, match="now"):
        p.decide(float("nan"), running=False)


def test_a_queue_kept_under_another_policy_is_dropped() -> None:
    state = {"last_fire": T0, "queue": [T0 - 60, T0 - 30]}
    assert Periodic(HOURLY, "skip", state=state).queued == ()
    assert Periodic(HOURLY, "queue", max_queue=1, state=state).queued == (T0 - 60,)
