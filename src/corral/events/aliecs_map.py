"""corral's events as AliECS's Kafka messages: which message, on which topic, with which key.

One stored corral event becomes zero or more ``events.Event`` messages (the table is in
docs/kafka.md). The topics are AliECS's: ``<prefix>.environment``, ``.task``, ``.role``,
``.call``, ``.run`` and ``.integrated_service.<plugin>``, the prefix ``aliecs`` unless
told otherwise. The keys are AliECS's too: a task event is keyed by its task id, every
other by its environment id (so each environment's events on a topic keep their order).

How this runs. ``AliecsMapper.map`` is called in the order of the events' numbers, on
the event loop of the publisher. It follows each environment's state, run number and
current transition from the events it sees (they fill fields of later messages that
corral's event does not repeat, as AliECS fills them from the environment); after a
restart, the first event of an environment replays that environment's earlier events
from the store once to learn them. Task ids and classes of the tasks a grouped event
names come from the store's task table (read once per environment, again on a miss).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from corral.events import aliecs_proto as pb

Event = dict[str, Any]

TOPICS = ("environment", "task", "role", "call", "run", "integrated_service")
ACTIVE_STATES = frozenset({"LAUNCHING", "STANDBY", "CONFIGURED", "RUNNING"})
INACTIVE_STATES = frozenset({"PENDING", "DONE", "LOST"})
MAX_TEXT = 64 * 1024  # the longest string field sent (a call's output, an error)


class StoreReader(Protocol):
    """What the mapper reads of the store (the SQLite store has these methods)."""

    def events(
        self, *, env: str | None = None, after: int = 0, limit: int | None = None
    ) -> list[Event]: ...

    def tasks(self, env_id: str) -> list[dict[str, Any]]: ...

    def environment(self, env_id: str) -> dict[str, Any] | None: ...


class Outgoing(NamedTuple):
    """One Kafka message: its topic suffix (``environment``), key and encoded value."""

    topic: str
    key: bytes | None
    value: bytes
    kind: str  # the payload's field name in Event (``environmentEvent``), for tests/logs


@dataclass
class _EnvContext:
    state: str = ""
    run_number: int = 0
    transition: str = ""
    name: str = ""
    source: str = ""
    tasks: dict[str, tuple[int, str, bool]] = field(
        default_factory=dict
    )  # path: idx, class, critical


def op_status(status: str | None, error: str | None = None) -> int:
    """corral's status word of a transition, step or call as AliECS's OpStatus."""
    if status == "STARTED":
        return pb.STARTED
    if status == "DONE":
        return pb.DONE_OK
    if status == "TIMEOUT" or (status == "FAILED" and error and "timed out" in error):
        return pb.DONE_TIMEOUT
    if status == "FAILED":
        return pb.DONE_ERROR
    return pb.NULL


def task_status(state: str, pid: int | None = None) -> str:
    """AliECS's task status (ACTIVE: its process runs) from corral's task state."""
    if state in ACTIVE_STATES:
        return "ACTIVE"
    if state in INACTIVE_STATES:
        return "INACTIVE"
    if state == "ERROR" and pid is not None:
        return "ACTIVE" if pid else "INACTIVE"
    return "UNDEFINED"


def role_status(state: str) -> str:
    """AliECS's role status from a role's aggregated state."""
    if state in ACTIVE_STATES:
        return "ACTIVE"
    if state in INACTIVE_STATES:
        return "INACTIVE"
    if state == "MIXED":
        return "PARTIAL"
    return "UNDEFINED"


def topic_word(name: str) -> str:
    """A plugin name as a Kafka topic segment (letters, digits, ``_`` and ``-``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:100] or "unknown"


def _text(value: Any) -> str:
    if value is None:
        return ""
    s = value if isinstance(value, str) else str(value)
    return s if len(s) <= MAX_TEXT else s[:MAX_TEXT] + "…"


def _uint32(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return 0
    return n if 0 <= n < 2**32 else 0


class AliecsMapper:
    def __init__(self, store: StoreReader) -> None:
        self.store = store
        self._envs: dict[str, _EnvContext] = {}

    def forget(self) -> None:
        """Drop what was learnt of the environments (they are learnt again)."""
        self._envs.clear()

    def map(self, ev: Event) -> list[Outgoing]:
        """The messages of one stored event (none for kinds AliECS has no message for)."""
        env_id = ev.get("env")
        kind = ev.get("kind")
        if not isinstance(env_id, str) or not env_id:
            return []  # tokens, locks, nodes: nothing AliECS says
        ctx = self._context(env_id, int(ev.get("seq", 0)))
        t = float(ev.get("time", 0.0))
        stamp = {"timestamp": int(t * 1000), "timestampNano": int(t * 1e9)}
        out = self._map(ev, kind, env_id, ctx, stamp)
        self._follow(ctx, ev)
        return out

    # -- the messages ----------------------------------------------------------------------

    def _map(
        self, ev: Event, kind: Any, env_id: str, ctx: _EnvContext, stamp: dict[str, int]
    ) -> list[Outgoing]:
        key = env_id.encode()
        if kind == "environment":
            return [self._wrap("environment", key, "environmentEvent", self._env(ev, ctx), stamp)]
        if kind == "transition":
            return [
                self._wrap("environment", key, "environmentEvent", self._transition(ev, ctx), stamp)
            ]
        if kind == "run":
            return [self._wrap("run", key, "runEvent", self._run(ev, ctx), stamp)]
        if kind == "role":
            role = str(ev.get("role", ""))
            state = str(ev.get("state", ""))
            msg = pb.Ev_RoleEvent(
                name=role.rpartition(".")[2], status=role_status(state), state=state,
                rolePath=role, environmentId=env_id,
            )  # fmt: skip
            return [self._wrap("role", key, "roleEvent", msg, stamp)]
        if kind == "call":
            return self._call(ev, env_id, key, stamp)
        if kind == "task":
            return self._tasks(ev, env_id, ctx, stamp)
        return []

    def _env(self, ev: Event, ctx: _EnvContext) -> Any:
        error = ev.get("error")
        transition = ev.get("transition")
        msg = pb.Ev_EnvironmentEvent(
            environmentId=ev["env"],
            state=str(ev.get("state") or ctx.state),
            runNumber=_uint32(ev.get("run_number") or 0),
            error=_text(error),
            message=_text(ev.get("note")),
            transition=_text(transition),
        )
        if transition:  # the state a transition reached (or ERROR, from a failure)
            msg.transitionStatus = pb.DONE_ERROR if error else pb.DONE_OK
        self._who(msg, ev, ctx)
        return msg

    def _transition(self, ev: Event, ctx: _EnvContext) -> Any:
        status = ev.get("status")
        error = ev.get("error")
        step = ev.get("step")
        event = str(ev.get("transition", ""))
        if step is not None:  # one moment of the transition: its calls, or its tasks
            state, note = ctx.state, "transition step finished"
            step = f"tasks_{event}" if step == "TASKS" else str(step)
        elif status == "STARTED":
            state, note = str(ev.get("src") or ctx.state), "transition starting"
        elif status == "DONE":
            state, note = str(ev.get("dst") or ctx.state), "transition finished"
        else:
            state, note = str(ev.get("src") or ctx.state), "transition failed"
        msg = pb.Ev_EnvironmentEvent(
            environmentId=ev["env"],
            state=state,
            runNumber=_uint32(ctx.run_number),
            error=_text(error),
            message=note,
            transition=event,
            transitionStep=_text(step),
            transitionStatus=op_status(status, error),
        )
        self._who(msg, ev, ctx)
        return msg

    def _run(self, ev: Event, ctx: _EnvContext) -> Any:
        status = ev.get("status")
        started = status == "STARTED"
        transition = ctx.transition or ("START_ACTIVITY" if started else "STOP_ACTIVITY")
        msg = pb.Ev_RunEvent(
            environmentId=ev["env"],
            runNumber=_uint32(ev.get("run_number") or ctx.run_number),
            state=ctx.state,
            error=_text(ev.get("error")),
            transition=transition,
            transitionStatus=pb.STARTED if started else pb.DONE_OK,
        )
        if ev.get("actor"):
            msg.lastRequestUser.name = str(ev["actor"])
        return msg

    def _call(self, ev: Event, env_id: str, key: bytes, stamp: dict[str, int]) -> list[Outgoing]:
        func = str(ev.get("func", ""))
        status = op_status(ev.get("status"), ev.get("error"))
        path = str(ev.get("path", ""))
        traits = pb.Traits(trigger=_text(ev.get("trigger")), critical=bool(ev.get("critical")))
        call = pb.Ev_CallEvent(
            func=func, callStatus=status, traits=traits, output=_text(ev.get("result")),
            error=_text(ev.get("error")), environmentId=env_id, path=path,
        )  # fmt: skip
        plugin, dot, _ = func.partition(".")
        service = pb.Ev_IntegratedServiceEvent(
            name=path, error=_text(ev.get("error")), operationName=func,
            operationStatus=status, environmentId=env_id, payload=_text(ev.get("result")),
        )  # fmt: skip
        out = [self._wrap("call", key, "callEvent", call, stamp)]
        if dot:  # the plugin that ran it: the integrated service
            topic = f"integrated_service.{topic_word(plugin)}"
            out.append(self._wrap(topic, key, "integratedServiceEvent", service, stamp))
        return out

    def _tasks(
        self, ev: Event, env_id: str, ctx: _EnvContext, stamp: dict[str, int]
    ) -> list[Outgoing]:
        state = str(ev.get("state", ""))
        node = str(ev.get("node") or "")
        # one task (with its id, process and criticality), or a node's tasks that
        # reached one state together
        single = "task" in ev
        paths = [str(ev["task"])] if single else [str(p) for p in ev.get("tasks") or []]
        out = []
        for path in paths:
            idx, cls, critical = self._task(ctx, env_id, path)
            task_id = str(ev["id"]) if single and ev.get("id") else f"{env_id}:{idx}"
            if "critical" in ev:
                critical = bool(ev["critical"])
            msg = pb.Ev_TaskEvent(
                name=f"{cls}#{task_id}" if cls else task_id,
                taskid=task_id,
                state=state,
                status=task_status(state, ev.get("pid") if single else None),
                hostname=node,
                className=cls,
                traits=pb.Traits(critical=critical),
                environmentId=env_id,
                path=path,
            )
            out.append(self._wrap("task", task_id.encode(), "taskEvent", msg, stamp))
        return out

    @staticmethod
    def _wrap(topic: str, key: bytes | None, field_name: str, payload: Any, stamp: Any) -> Outgoing:
        wrapper = pb.Event(**stamp)
        getattr(wrapper, field_name).CopyFrom(payload)
        return Outgoing(topic, key or None, wrapper.SerializeToString(), field_name)

    @staticmethod
    def _who(msg: Any, ev: Event, ctx: _EnvContext) -> None:
        if ev.get("actor"):
            msg.lastRequestUser.name = str(ev["actor"])
        if ctx.name:
            msg.workflowTemplateInfo.name = ctx.name
            msg.workflowTemplateInfo.path = ctx.source

    # -- what is known of each environment ---------------------------------------------------

    def _context(self, env_id: str, seq: int) -> _EnvContext:
        ctx = self._envs.get(env_id)
        if ctx is not None:
            return ctx
        ctx = self._envs[env_id] = _EnvContext()
        row = self.store.environment(env_id)
        if row is not None:
            ctx.name, ctx.source = str(row.get("name") or ""), str(row.get("source") or "")
        after = 0
        while seq > 1:  # learn the state, run and transition from the events before
            page = self.store.events(env=env_id, after=after, limit=2000)
            for e in page:
                if int(e["seq"]) >= seq:
                    return ctx
                self._follow(ctx, e)
            if len(page) < 2000:
                break
            after = int(page[-1]["seq"])
        return ctx

    def _task(self, ctx: _EnvContext, env_id: str, path: str) -> tuple[int, str, bool]:
        got = ctx.tasks.get(path)
        if got is None:
            ctx.tasks = {
                str(t["path"]): (int(t["idx"]), str(t["class"]), bool(t["critical"]))
                for t in self.store.tasks(env_id)
            }
            got = ctx.tasks.get(path, (-1, "", False))
        return got

    @staticmethod
    def _follow(ctx: _EnvContext, ev: Event) -> None:
        kind = ev.get("kind")
        if kind == "environment":
            if ev.get("state"):
                ctx.state = str(ev["state"])
            if "run_number" in ev:
                ctx.run_number = _uint32(ev["run_number"])
            if ev.get("name"):
                ctx.name = str(ev["name"])
        elif kind == "transition" and "step" not in ev:
            if ev.get("status") == "STARTED":
                ctx.transition = str(ev.get("transition", ""))
                ctx.state = str(ev.get("src") or ctx.state)
            else:
                ctx.transition = ""
                if ev.get("status") == "DONE" and ev.get("dst"):
                    ctx.state = str(ev["dst"])
        elif kind == "run":
            ctx.run_number = _uint32(ev.get("run_number")) if ev.get("status") == "STARTED" else 0


def topics(prefix: str, plugins: Sequence[str] = ()) -> list[str]:
    """The topics corral publishes on (an integrated-service topic for each plugin)."""
    out = [f"{prefix}.{t}" for t in TOPICS if t != "integrated_service"]
    out += [f"{prefix}.integrated_service.{topic_word(p)}" for p in plugins]
    return out
