"""Services: N replicas that should always run, on the control plane's nodes.

How this runs. One ``ServiceSupervisor`` per control plane, on its event loop. A
service's replicas are basic tasks of the plane's backend (task ids
``svc-<store>-<name>:<n>``, ``<store>`` a random mark of this server's store, so that
servers of other data directories on the same machine never end each other's replicas:
the plane routes their reports here), placed on the same ledger as
environments and job units, with the service's priority class. Everything timed (a
restart due after its backoff, a health check due or overdue, an update's gate) waits
in one heap, with one timer for all services: no asyncio task or timer per replica.

- **Restarts.** A replica whose process ends (or fails its health check as many times
  in a row as its threshold) is started again after a delay that grows by ``factor``
  from ``initial`` up to ``max``; a replica that was up at least ``reset_after`` starts
  the count again. After ``crash_loop`` restarts in a row the service says crash-loop
  (and keeps trying, at the longest delay).
- **Health checks.** http (a GET; a status 200-399 is healthy) and tcp (a connection)
  checks run from the control process, non-blocking, from the same timer; an exec
  check runs on the replica's node (the backend's health loop) and reports failures.
  A check without a port checks the replica's first placed port. A replica that has
  not passed a check yet has 30 s (or threshold × interval, when longer) to come up
  before its failures count.
- **Scaling** adds or removes the highest slots only: the replicas that stay are not
  touched. **Sticky** services place a replacement on the node its slot ran on (its
  cache is there) when it fits, elsewhere otherwise.
- **Rolling updates.** A new version replaces the replicas ``max_parallel`` slots at a
  time: a new replica starts beside the old one, and the old one is stopped once the
  new one has been healthy for ``healthy_for``. A new replica that fails (exits, or
  fails its checks) or is not healthy by the deadline fails the update, and with
  ``auto_rollback`` the service goes back to the previous version the same way.
- **Preemption.** A protected service's replicas are never evicted; others are, and
  start again when there is room.
- **Its state.** STARTING until each of its replicas has been healthy once, then
  RUNNING while they all are, DEGRADED when fewer are (the reason says how many);
  UPDATING, ROLLING-BACK and CRASH-LOOP say so (see ``_judge_state``).
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from corral.control import secretfiles
from corral.control.coalesce import Coalescing
from corral.control.journal import Journal
from corral.control.launching import launch_batch
from corral.control.ledger import Ledger
from corral.jobs.spec import HealthCheck, ServiceSpec
from corral.jobs.units import DEFAULT_CPU, constraints_of
from corral.model.plan import Constraint
from corral.model.plan import HealthCheck as ExecCheck
from corral.planning.placement import Demand
from corral.ports.backend import Backend, Launch, Report
from corral.store.servicestore import ReplicaRow, ServiceStore

log = logging.getLogger("corral.services")

# replica states
PENDING = "PENDING"  # waiting for room, or for its restart delay
STARTING = "STARTING"
RUNNING = "RUNNING"
RESTARTING = "RESTARTING"  # being stopped, to start again (it failed its checks)
STOPPING = "STOPPING"  # being stopped for good (scaled down, replaced, removed)
EVICTING = "EVICTING"  # being stopped, to start again when there is room (preemption)
LIVE = frozenset({STARTING, RUNNING, RESTARTING})
DEGRADED = "DEGRADED"  # a service's state: fewer replicas healthy than it should have
GRACE = 3.0
LAUNCH_TIMEOUT = 30.0
FIRST_CHECK = 0.5  # seconds after its start, at most, a replica's first check is made
STARTUP = 30.0  # seconds a replica that never passed a check has to come up
SLACK = 0.05  # seconds early a timed item may be done, so that one wake does several
MAX_RESPONSE = 4096  # bytes of an http check's answer read


def service_id(name: str, mark: str) -> str:
    """A service's task id prefix: unique to this store (``mark``) and the name."""
    return f"svc-{mark}-{name}"


class Replica:
    __slots__ = ("checks_due", "conn", "early", "fails", "healthy_since", "in_flight", "key",
                 "n", "node", "passes", "pid", "ports", "probes", "reason", "restarts", "slot",
                 "started", "state", "svc", "version")  # fmt: skip

    def __init__(self, svc: Service, n: int, slot: int, version: int) -> None:
        self.svc = svc
        self.n = n
        self.key = f"{svc.id}:{n}"
        self.slot = slot
        self.version = version
        self.state = PENDING
        self.node: str | None = None
        self.ports: tuple[int, ...] = ()
        self.pid: int | None = None
        self.started: float | None = None  # when its current process started
        self.healthy_since: float | None = None
        self.passes = 0
        self.fails = 0
        self.restarts = 0  # in a row
        self.reason: str | None = None
        self.checks_due = 0.0
        self.in_flight: _Check | None = None
        self.early: Report | None = None
        # its http/tcp checks, made once per process: (check, host, port, request)
        self.probes: list[tuple[HealthCheck, str, int, bytes | None]] = []
        self.conn: socket.socket | None = None  # an http check's kept connection

    def summary(self, address: str | None, healthy: bool) -> dict[str, Any]:
        return {
            "slot": self.slot, "replica": self.n, "version": self.version + 1,
            "state": self.state, "node": self.node, "address": address,
            "ports": list(self.ports), "pid": self.pid, "healthy": healthy,
            "restarts": self.restarts, "reason": self.reason,
        }  # fmt: skip


@dataclass(eq=False)
class Update:
    target: int  # the version the service goes to
    source: int  # the version it comes from
    deadline: float
    rollback: bool = False


@dataclass(eq=False)
class Service:
    name: str
    id: str
    versions: list[ServiceSpec]
    texts: list[str]
    workdir: str
    owner: str
    priority: int
    target: int = 0  # the version replicas are made of
    replicas: int = 0  # desired
    members: dict[int, Replica] = field(default_factory=dict)
    next_n: int = 0
    state: str = "STARTING"
    full: bool = False  # each of its replicas has been healthy at once (see _judge_health)
    reason: str | None = None
    sticky: dict[int, str] = field(default_factory=dict)  # slot -> the node it last ran on
    update: Update | None = None

    @property
    def spec(self) -> ServiceSpec:
        return self.versions[self.target]


class _Check:
    """One http or tcp check in flight: a non-blocking socket driven by the loop's
    reader and writer callbacks (no task, future or transport per check), and its
    deadline. ``done(why, kept)`` is called once: ``why`` None when healthy, ``kept``
    the connection to use for the next http check (HTTP/1.1 keep-alive), if any.

    An http check on a kept connection that fails before any answer (the server
    closed it while idle) is made again once on a new connection."""

    __slots__ = ("buf", "deadline", "done", "fd", "host", "loop", "over", "port", "replica",
                 "request", "reused", "sock", "timeout", "where")  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        replica: Replica,
        deadline: float,
        request: bytes | None,
        done: Callable[[str | None, socket.socket | None], None],
    ) -> None:
        self.loop = loop
        self.replica = replica
        self.deadline = deadline
        self.timeout = 0.0
        self.request = request  # None: a tcp check (connected is healthy)
        self.done = done
        self.buf = b""
        self.over = False
        self.sock: socket.socket | None = None
        self.fd = -1
        self.where = ""
        self.host = ""
        self.port = 0
        self.reused = False

    def start(self, host: str, port: int, kept: socket.socket | None = None) -> None:
        self.where = f"{host}:{port}"
        self.host, self.port = host, port
        if kept is not None:
            self.sock, self.reused = kept, True
            self._connected()
            return
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:  # a name, not an address: resolved off the loop, then here
            self._resolve(host, port)
            return
        try:
            self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                                      socket.SOCK_CLOEXEC)  # fmt: skip
            err = self.sock.connect_ex((host, port))
        except OSError as e:
            self.end(f"cannot connect to {self.where}: {e.strerror or e}")
            return
        if err == 0:
            self._connected()
        elif err == errno.EINPROGRESS:
            self.fd = self.sock.fileno()
            self.loop.add_writer(self.fd, self._on_writable)
        else:
            self.end(f"cannot connect to {self.where}: {os.strerror(err)}")

    def _resolve(self, host: str, port: int) -> None:
        async def resolve() -> None:
            try:
                infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                self.end(f"cannot resolve {host}: {e.strerror or e}")
                return
            if not self.over:
                self.start(str(infos[0][4][0]), port)
                self.where = f"{host}:{port}"

        task = asyncio.ensure_future(resolve())
        _RESOLVING.add(task)
        task.add_done_callback(_RESOLVING.discard)

    def _on_writable(self) -> None:
        self.loop.remove_writer(self.fd)
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fd = -1
            self.end(f"cannot connect to {self.where}: {os.strerror(err)}")
        else:
            self._connected()

    def _connected(self) -> None:
        if self.request is None:
            self.end(None)
            return
        assert self.sock is not None
        try:
            self.sock.send(self.request)  # a few dozen bytes: the send buffer takes them
        except OSError as e:
            self._failed(f"cannot send to {self.where}: {e.strerror or e}")
            return
        self.fd = self.sock.fileno()
        self.loop.add_reader(self.fd, self._on_readable)

    def _failed(self, why: str) -> None:
        """No answer at all: on a kept connection, try once more on a new one."""
        if self.reused and not self.buf:
            self.close()
            self.reused = False
            self.start(self.host, self.port)
        else:
            self.end(why)

    def _on_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(MAX_RESPONSE)
        except BlockingIOError:
            return
        except OSError as e:
            self._failed(f"{self.where}: {e.strerror or e}")
            return
        if not data and not self.buf:
            self._failed("the connection closed before an answer")
            return
        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        if not (sep or len(self.buf) >= MAX_RESPONSE or not data):
            return  # the headers are not all here yet
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(None, 2)
        code = parts[1] if len(parts) > 1 and parts[0].startswith(b"HTTP/") else b""
        why = None if code.isdigit() and 200 <= int(code) < 400 else (
            f"answered {line[:80].decode('latin-1')!r}")  # fmt: skip
        if not sep or not data:
            self.end(why)
            return
        length = _keep_alive(parts[0], head)
        if length is None or length > MAX_RESPONSE:
            self.end(why)
        elif len(body) >= length:
            self.end(why, keep=len(body) == length)
        # else: the rest of the body is on its way

    def close(self) -> None:
        if self.sock is not None:
            if self.fd >= 0:
                self.loop.remove_reader(self.fd)
                self.loop.remove_writer(self.fd)
                self.fd = -1
            self.sock.close()
            self.sock = None

    def end(self, why: str | None, keep: bool = False) -> None:
        kept = None
        if keep and self.sock is not None:
            if self.fd >= 0:
                self.loop.remove_reader(self.fd)
                self.fd = -1
            kept, self.sock = self.sock, None
        self.close()
        if not self.over:
            self.over = True
            self.done(why, kept)
        elif kept is not None:
            kept.close()


def _keep_alive(version: bytes, head: bytes) -> int | None:
    """The body's length when the server keeps the connection open after it (HTTP/1.1
    with a Content-Length, no ``Connection: close``); None otherwise."""
    if version != b"HTTP/1.1":
        return None
    length = None
    for header in head.split(b"\r\n")[1:]:
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name == b"connection" and b"close" in value.lower():
            return None
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            v = value.strip()
            if not v.isdigit():
                return None
            length = int(v)
    return length


_RESOLVING: set[asyncio.Future[None]] = set()


class ServiceSupervisor(Coalescing):
    def __init__(
        self,
        backend: Backend,
        ledger: Ledger,
        journal: Journal,
        store: ServiceStore,
        *,
        priority_classes: Mapping[str, int],
        clock: Callable[[], float] = time.time,
        log_dir: str | None = None,
        address_of: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.ledger = ledger
        self.journal = journal
        self.store = store
        self.priority_classes = dict(priority_classes)
        self.clock = clock
        self.log_dir = log_dir
        self.address_of = address_of or (lambda node: node)
        self.services: dict[str, Service] = {}
        self._by_id: dict[str, Service] = {}
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._dirty: set[Service] = set()
        self._kicked = False
        self._jobs: set[asyncio.Future[Any]] = set()
        self._changed: set[Service] = set()
        self.checks_made = 0  # http/tcp checks started (a metric, and for benchmarks)
        self.mark = store.mark()  # this store's, in every replica's task id
        self.secrets = secretfiles.Giver()  # ``reveal`` set by a server that keeps secrets
        # the healthy endpoints of each service, for templates (service.Endpoints): a new
        # mapping after each change, never changed in place (expansions read it in threads)
        self.snapshot: Mapping[str, tuple[str, ...]] = {}
        self._healthy_said: dict[str, int] = {}  # the healthy count each service last said
        self._waiting: set[Service] = set()  # services with replicas that wait for room
        # replicas' rows to write at the next flush (None: it no longer runs)
        self._rows: dict[tuple[str, int], ReplicaRow | None] = {}
        self._closing = False
        ledger.on_free.append(self._room)

    # -- the API ------------------------------------------------------------------------

    def owns(self, prefix: str) -> bool:
        return prefix in self._by_id

    def deploy(self, spec: ServiceSpec, *, text: str, workdir: str, owner: str) -> Service:
        """Run a new service, or update one that runs (a rolling update when its
        replicas' spec changed; only their number: a scale)."""
        self._bind()
        pclass = spec.placement.priority_class
        if pclass not in self.priority_classes:
            known = ", ".join(self.priority_classes)
            raise ValueError(f"priority_class {pclass!r} is not one of {known}")
        svc = self.services.get(spec.name)
        if svc is None:
            svc = Service(spec.name, service_id(spec.name, self.mark), [spec], [text], workdir,
                          owner or "anonymous", self.priority_classes[pclass],
                          replicas=spec.replicas)  # fmt: skip
            self.services[spec.name] = svc
            self._by_id[svc.id] = svc
            self._note(svc, f"deployed: {spec.replicas} replicas", state=STARTING)
        elif _same_replicas(svc.spec, spec):
            if spec.replicas != svc.replicas:
                self.scale(spec.name, spec.replicas)
            return svc
        else:
            svc.versions.append(spec)
            svc.texts.append(text)
            svc.workdir = workdir
            source, svc.target = svc.target, len(svc.versions) - 1
            svc.replicas = spec.replicas
            svc.priority = self.priority_classes[pclass]
            deadline = self._now() + spec.update.deadline
            svc.update = Update(svc.target, source, deadline)
            self._push(deadline, "update", svc)
            self._note(svc, f"updating to version {svc.target + 1}", state="UPDATING")
        self._touch(svc)
        return svc

    def attach(
        self,
        svc: Service,
        version: int,
        live: Mapping[int, tuple[int, str | None]],
        nodes: Collection[str],
    ) -> list[str]:
        """At start, right after ``deploy``: the replicas the previous control process
        recorded running (of its ``version``) whose processes still run (``live``: by
        replica number, the pid) go on, RUNNING where they run, checked again from now;
        the service's other slots get new replicas. Returns their task ids."""
        kept: list[str] = []
        booked = []
        now = self._now()
        slots = {r.slot for r in svc.members.values()}
        # new replicas get numbers none of its processes still has (those not taken
        # over are being ended: their task ids must not be reused meanwhile)
        svc.next_n = max(svc.next_n, max(live, default=-1) + 1)
        for row in self.store.replicas(svc.name):
            svc.next_n = max(svc.next_n, row["n"] + 1)  # (its exit may still come)
            proc = live.get(row["n"])
            if (proc is None or row["version"] != version or row["node"] not in nodes
                    or row["pid"] not in (None, proc[0]) or row["slot"] >= svc.replicas
                    or row["slot"] in slots):  # fmt: skip
                self._rows[(svc.name, row["n"])] = None  # it no longer runs
                continue
            r = Replica(svc, row["n"], row["slot"], svc.target)
            r.node, r.ports, r.pid = row["node"], row["ports"], proc[0]
            r.state, r.started = RUNNING, now
            svc.members[r.n] = r
            svc.next_n = max(svc.next_n, r.n + 1)
            svc.sticky[r.slot] = r.node
            slots.add(r.slot)
            booked.append((r.key, r.node, self._demand(r, None), r.ports))
            self._up(r, now)
            kept.append(r.key)
        self.ledger.hold_each(booked, priority=svc.priority)
        self._touch(svc)
        return kept

    def lost_with_agent(self, running: Mapping[str, int], why: str) -> int:
        """A node agent died, and the replicas it ran with it (``running``: what the
        agents run now): those not running any more are started again."""
        lost = [r for svc in self.services.values() for r in svc.members.values()
                if r.state in (RUNNING, RESTARTING, STOPPING, EVICTING) and r.pid is not None
                and running.get(r.key) != r.pid]  # fmt: skip
        self.on_reports([Report(r.key, "lost", why, None, r.pid) for r in lost])
        return len(lost)

    def scale(self, name: str, replicas: int) -> Service:
        """Change the number of replicas; those that stay are not restarted (KeyError)."""
        svc = self.services[name]
        if not 0 <= replicas <= 10_000:
            raise ValueError(f"replicas {replicas} is not between 0 and 10000")
        if replicas != svc.replicas:
            self._note(svc, f"scaled from {svc.replicas} to {replicas} replicas")
            if replicas > svc.replicas:
                svc.full = False  # (RUNNING while the new ones start, not DEGRADED)
            svc.replicas = replicas
            self._touch(svc)
        return svc

    async def remove(self, name: str) -> None:
        """Stop every replica of the service and forget it (KeyError). Forgotten in the
        store first: a control process killed while the replicas stop does not bring
        it back (the next one ends what is left of it)."""
        svc = self.services.pop(name)
        svc.replicas = 0
        svc.update = None
        self.journal.write(lambda: self.store.remove(svc.name))
        await self._stop(list(svc.members.values()), STOPPING)
        for r in list(svc.members.values()):
            self._gone(r)
        del self._by_id[svc.id]
        self._note(svc, "removed", state="REMOVED")

    def endpoints(self, name: str) -> list[dict[str, Any]]:
        """The healthy replicas of a service: where each is reached (KeyError)."""
        svc = self.services[name]
        out = []
        for r in sorted(svc.members.values(), key=lambda r: (r.slot, r.n)):
            if r.state != RUNNING or not self._healthy(r) or r.node is None:
                continue
            port = r.ports[0] if r.ports else _first_port(svc.versions[r.version])
            out.append({"service": name, "slot": r.slot, "node": r.node,
                        "address": self.address_of(r.node), "port": port,
                        "version": r.version + 1})  # fmt: skip
        return out

    def show(self, name: str) -> dict[str, Any]:
        svc = self.services[name]
        return {
            "name": svc.name, "state": svc.state, "reason": svc.reason,
            "replicas": svc.replicas, "version": svc.target + 1, "owner": svc.owner,
            "protected": svc.spec.protected,
            "members": [r.summary(None if r.node is None else self.address_of(r.node),
                                  self._healthy(r))
                        for r in sorted(svc.members.values(), key=lambda r: (r.slot, r.n))],
        }  # fmt: skip

    def protected_keys(self) -> set[str]:
        return {r.key for s in self.services.values() if s.spec.protected
                for r in s.members.values() if r.state in LIVE}  # fmt: skip

    def on_reports(self, reports: Sequence[Report]) -> None:
        for rep in reports:
            prefix, _, n = rep.task_id.partition(":")
            svc = self._by_id.get(prefix)
            r = svc.members.get(int(n)) if svc is not None and n.isdigit() else None
            if r is None:
                continue
            if r.state == STARTING:
                if rep.kind != "slow":
                    r.early = rep
                continue
            if rep.pid is not None and r.pid is not None and rep.pid != r.pid:
                continue
            self._on_report(r, rep)

    async def evict(self, keys: Collection[str], why: str) -> int:
        """Preemption: end these replicas; they start again when there is room."""
        reps = []
        for key in keys:
            prefix, _, n = key.partition(":")
            svc = self._by_id.get(prefix)
            r = svc.members.get(int(n)) if svc is not None and n.isdigit() else None
            if r is not None and r.state in LIVE:
                reps.append(r)
        await self._stop(reps, EVICTING)
        for r in reps:
            self._down(r)
            r.state, r.reason = PENDING, why
            r.checks_due = 0.0
            r.restarts = 0
            self._note(r.svc, f"replica {r.slot} {why}")
            self._touch(r.svc)
        return len(reps)

    async def close(self) -> None:
        """Stop every replica (the control process stops): none is started again."""
        self._closing = True
        for svc in list(self.services.values()):
            await self._stop(list(svc.members.values()), STOPPING)
        if self._timer is not None:
            self._timer.cancel()
        for j in list(self._jobs):
            j.cancel()
        self._flush()

    # -- reconciling ----------------------------------------------------------------------

    def _room(self) -> None:
        """Room may have freed up (work ended elsewhere): place the pending replicas."""
        for svc in list(self._waiting):
            self._touch(svc)

    def _touch(self, svc: Service) -> None:
        if self._closing:
            return
        self._dirty.add(svc)
        self._changed.add(svc)
        if not self._kicked:
            self._kicked = True
            self._bind().call_soon(self._reconcile)

    def _reconcile(self) -> None:
        self._kicked = False
        dirty, self._dirty = self._dirty, set()
        now = self._now() + SLACK  # (a restart woken SLACK early is due)
        to_place: list[Replica] = []
        for svc in dirty:
            self._waiting.discard(svc)  # (added again below if a replica still waits)
            if svc.name not in self.services:
                continue
            self._converge(svc, now)
            to_place += [r for r in svc.members.values() if r.state == PENDING
                         and r.checks_due <= now]  # fmt: skip
        if to_place:
            self._place(to_place)
        self._schedule_flush()

    def _converge(self, svc: Service, now: float) -> None:
        """Make the service's replicas what it should have (see the module doc)."""
        up = svc.update
        if up is not None:
            self._judge_update(svc, up, now)
            up = svc.update
        by_slot: dict[int, list[Replica]] = {}
        for r in svc.members.values():
            if r.state != STOPPING:
                by_slot.setdefault(r.slot, []).append(r)
        stop: list[Replica] = []
        for slot, reps in by_slot.items():
            if slot >= svc.replicas:
                stop += reps
        in_progress = 0
        replace_slots = []
        for slot in range(svc.replicas):
            reps = by_slot.get(slot, [])
            new = [r for r in reps if r.version == svc.target]
            old = [r for r in reps if r.version != svc.target]
            if not new and not old:
                self._new_replica(svc, slot, svc.target)
                continue
            if not old:
                continue
            if not new:
                replace_slots.append(slot)
                continue
            ready = [r for r in new if self._ready(r, now)]
            if ready or (not svc.spec.update.health_gated and any(r.state == RUNNING for r in new)):
                stop += old
            else:
                in_progress += 1
        if up is not None:
            room = svc.spec.update.max_parallel - in_progress
            for slot in replace_slots[: max(0, room)]:
                self._new_replica(svc, slot, svc.target)
            if not replace_slots and not in_progress and not stop:
                self._finish_update(svc, up)
        for r in stop:
            if r.state in LIVE:
                self._stop_later([r])
            elif r.state == PENDING:
                self._gone(r)
        self._judge_state(svc, now)

    def _judge_update(self, svc: Service, up: Update, now: float) -> None:
        failed = None
        for r in svc.members.values():
            if r.version == up.target and (r.restarts or r.state == RESTARTING):
                failed = f"replica {r.slot} of version {up.target + 1} failed: {r.reason}"
                break
        if failed is None and now >= up.deadline:
            failed = (f"version {up.target + 1} was not healthy within "
                      f"{svc.versions[up.target].update.deadline:g} s")  # fmt: skip
        if failed is None:
            return
        if up.rollback or not svc.versions[up.target].update.auto_rollback:
            svc.update = None
            self._note(svc, f"update failed: {failed}", state="UPDATE-FAILED", reason=failed)
            return
        back = Update(up.source, up.target, now + svc.versions[up.source].update.deadline,
                      rollback=True)  # fmt: skip
        svc.target = up.source
        svc.update = back
        self._push(back.deadline, "update", svc)
        self._note(svc, f"update failed: {failed}; rolling back to version {up.source + 1}",
                   state="ROLLING-BACK", reason=failed)  # fmt: skip

    def _finish_update(self, svc: Service, up: Update) -> None:
        svc.update = None
        if up.rollback:
            why = svc.reason
            self._note(svc, f"rolled back to version {up.target + 1}", state="ROLLED-BACK",
                       reason=f"rolled back: {why}")  # fmt: skip
        else:
            self._note(svc, f"updated to version {up.target + 1}", state="RUNNING")
        self.journal.write(
            lambda: self.store.save(
                svc.name, svc.texts[svc.target], svc.workdir, svc.owner, svc.replicas
            )
        )

    def _judge_state(self, svc: Service, now: float) -> None:
        if svc.update is not None:
            return
        loop = [r for r in svc.members.values() if r.restarts >= svc.spec.restart.crash_loop]
        if loop:
            r = loop[0]
            why = (f"crash-loop: replica {r.slot} restarted {r.restarts} times in a row, each up "
                   f"less than {svc.spec.restart.reset_after:g} s; last: {r.reason}")  # fmt: skip
            if svc.state != "CRASH-LOOP":
                self._note(svc, why, state="CRASH-LOOP", reason=why)
            return
        if svc.state == "CRASH-LOOP":
            self._note(svc, "out of its crash loop", state="RUNNING")

    def _new_replica(self, svc: Service, slot: int, version: int) -> Replica:
        r = Replica(svc, svc.next_n, slot, version)
        svc.next_n += 1
        svc.members[r.n] = r
        return r

    # -- placing and launching ----------------------------------------------------------------

    def _demand(self, r: Replica, pin: str | None) -> Demand:
        spec = r.svc.versions[r.version]
        wants = spec.placement.wants
        if wants.cpu <= 0:
            wants = replace(wants, cpu=DEFAULT_CPU)
        cons = constraints_of(spec.placement)
        if pin is not None:
            cons = (*cons, Constraint("machine_id", pin))
        return Demand(r.key, wants, cons)

    def _place(self, reps: list[Replica]) -> None:
        by_priority: dict[int, list[Replica]] = {}
        for r in reps:
            by_priority.setdefault(r.svc.priority, []).append(r)
        placed: dict[str, list[Replica]] = {}
        for prio in sorted(by_priority, reverse=True):
            group = by_priority[prio]
            sticky = [r for r in group if r.svc.spec.sticky_cache and r.slot in r.svc.sticky]
            rest = [r for r in group if r not in sticky]
            if sticky:
                items = [(r.key, self._demand(r, r.svc.sticky[r.slot])) for r in sticky]
                got = self.ledger.reserve_each(items, seed=f"svc{prio}", priority=prio)
                for r, held in zip(sticky, got, strict=True):
                    if isinstance(held, str):
                        rest.append(r)  # not where its cache is: anywhere
                    else:
                        self._placed(r, held.nodes[0], held.ports[0], placed)
            items = [(r.key, self._demand(r, None)) for r in rest]
            got = self.ledger.reserve_each(items, seed=f"svc{prio}", priority=prio)
            for r, held in zip(rest, got, strict=True):
                if isinstance(held, str):
                    self._waiting.add(r.svc)
                    if r.reason != f"waiting: {held}":
                        r.reason = f"waiting: {held}"
                        self._changed.add(r.svc)
                else:
                    self._placed(r, held.nodes[0], held.ports[0], placed)
        for node, batch in placed.items():
            self._spawn(self._launch(node, batch))

    def _placed(
        self, r: Replica, node: str, ports: tuple[int, ...], placed: dict[str, list[Replica]]
    ) -> None:
        r.node, r.ports, r.state, r.reason = node, ports, STARTING, None
        r.svc.sticky[r.slot] = node
        self._row(r)  # (its launch may outlive this process: the next one finds it)
        placed.setdefault(node, []).append(r)

    def _launch_of(self, r: Replica) -> Launch:
        svc = r.svc
        spec = svc.versions[r.version]
        cmd = spec.command
        cwd = cmd.cwd if cmd.cwd and cmd.cwd.startswith("/") else (
            f"{svc.workdir}/{cmd.cwd}" if cmd.cwd else svc.workdir)  # fmt: skip
        if cwd != cmd.cwd:
            cmd = replace(cmd, cwd=cwd)
        env = [("CORRAL_ENVIRONMENT_ID", svc.id), ("CORRAL_TASK_ID", r.key),
               ("CORRAL_SERVICE", svc.name), ("CORRAL_REPLICA", str(r.slot)),
               ("CORRAL_SERVICE_VERSION", str(r.version + 1))]  # fmt: skip
        if r.node is not None:
            env.append(("CORRAL_ADDRESS", self.address_of(r.node)))  # where to listen
        if r.ports:
            env += [("CORRAL_PORT", str(r.ports[0])),
                    ("CORRAL_PORTS", ",".join(map(str, r.ports)))]  # fmt: skip
        ex = next((h for h in spec.health if h.kind == "exec"), None)
        health = None
        if ex is not None and ex.command is not None:
            argv = (ex.command.value, *ex.command.arguments)
            health = ExecCheck(argv, ex.interval, ex.timeout, ex.threshold)
        if spec.secrets:
            env += self.secrets.env(r.key, spec.secrets)
        logs = None if self.log_dir is None else f"{self.log_dir}/{svc.id}/{r.slot}.log"
        return Launch(r.key, f"{svc.name}[{r.slot}]", cmd, "basic", tuple(env), logs, health)

    async def _launch(self, node: str, reps: list[Replica]) -> None:
        outs = await launch_batch(
            self.backend, node, reps, lambda x: x.key, self._launch_of, LAUNCH_TIMEOUT
        )
        now = self._now()
        for r, out in zip(reps, outs, strict=True):
            if r.state != STARTING:
                continue
            r.pid = out.pid
            if out.error is not None:
                self._crashed(r, f"cannot start: {out.error}")
                continue
            r.state, r.started = RUNNING, now
            self._up(r, now)
            early, r.early = r.early, None
            if early is not None and (early.pid is None or early.pid == r.pid):
                self._on_report(r, early)
            self._changed.add(r.svc)
        for svc in {r.svc for r in reps}:
            self._touch(svc)

    def _up(self, r: Replica, now: float) -> None:
        """Its process runs (launched, or taken over): checked from now, and recorded."""
        r.healthy_since = None
        r.passes = r.fails = 0
        spec = r.svc.versions[r.version]
        r.probes = self._probes(r)
        if r.probes:
            first = min(FIRST_CHECK, min(h.interval for h in spec.health))
            r.checks_due = now + first
            self._push(r.checks_due, "check", r)
        else:
            self._push(now + spec.update.healthy_for, "gate", r.svc)
        self._row(r)

    def _row(self, r: Replica) -> None:
        """Record where the replica runs (written at the next flush)."""
        assert r.node is not None
        self._rows[(r.svc.name, r.n)] = (r.svc.name, r.n, r.slot, r.version + 1, r.node,
                                         ",".join(map(str, r.ports)), r.pid)  # fmt: skip
        self._schedule_flush()

    # -- reports and restarts --------------------------------------------------------------

    def _on_report(self, r: Replica, rep: Report) -> None:
        if rep.kind == "slow":
            return
        if rep.kind in ("error", "end_of_stream"):
            if r.state == RUNNING:
                r.reason = rep.reason or rep.kind
                self._stop_later([r], RESTARTING)
            return
        # exited or lost: its process is over
        if r.state == EVICTING:
            return  # queued again by evict
        if r.state == STOPPING:
            self._gone(r)
            return
        if r.state == RESTARTING:
            self._crashed(r, r.reason or "failed its health check")
            return
        if r.state == RUNNING:
            self._crashed(r, rep.reason or f"exited ({rep.code})")

    def _crashed(self, r: Replica, why: str) -> None:
        """Its process is over against our will: start it again after its backoff."""
        now = self._now()
        self._down(r)
        spec = r.svc.versions[r.version].restart
        up_for = now - r.started if r.started is not None else 0.0
        r.restarts = 1 if up_for >= spec.reset_after else r.restarts + 1
        # (the exponent is bounded: a replica that restarts forever never overflows it)
        delay = min(spec.initial * spec.factor ** min(r.restarts - 1, 64), spec.max)
        r.state, r.reason = PENDING, why
        r.checks_due = now + delay  # (a pending replica's restart time)
        self._push(r.checks_due, "restart", r)
        self._event({"kind": "service", "service": r.svc.name, "replica": r.slot,
                     "note": f"restart {r.restarts} in {delay:g} s: {why}"})  # fmt: skip
        self._touch(r.svc)

    def _down(self, r: Replica) -> None:
        c, r.in_flight = r.in_flight, None
        if c is not None:
            c.close()
        if r.conn is not None:
            r.conn.close()
            r.conn = None
        self.ledger.release_each([r.key])
        if self.secrets:
            self.secrets.forget(r.key)
        self._rows[(r.svc.name, r.n)] = None
        self._schedule_flush()
        r.pid = None
        r.healthy_since = None

    def _gone(self, r: Replica) -> None:
        if r.state != PENDING:
            self._down(r)
        r.state = STOPPING
        r.svc.members.pop(r.n, None)
        self._touch(r.svc)

    def _stop_later(self, reps: list[Replica], state: str = STOPPING) -> None:
        self._spawn(self._stop(reps, state))

    async def _stop(self, reps: list[Replica], state: str) -> None:
        per: dict[str, list[str]] = {}
        for r in reps:
            if r.state in LIVE and r.node is not None:
                r.state = state
                self._changed.add(r.svc)
                per.setdefault(r.node, []).append(r.key)
            elif r.state == PENDING and state == STOPPING:
                self._gone(r)
        await asyncio.gather(*(self.backend.stop(n, ks, GRACE) for n, ks in per.items()))

    # -- health ---------------------------------------------------------------------------

    def _ready(self, r: Replica, now: float) -> bool:
        """Healthy for the update's ``healthy_for``."""
        spec = r.svc.versions[r.version]
        if r.state != RUNNING:
            return False
        since = r.healthy_since if _checked(spec) else r.started
        return since is not None and now - since >= spec.update.healthy_for

    def _healthy(self, r: Replica) -> bool:
        if r.state != RUNNING:
            return False
        return r.healthy_since is not None if r.probes else True

    def _probes(self, r: Replica) -> list[tuple[HealthCheck, str, int, bytes | None]]:
        """The replica's http and tcp checks, with where they go and what they send."""
        assert r.node is not None
        host = self.address_of(r.node)
        out: list[tuple[HealthCheck, str, int, bytes | None]] = []
        for h in r.svc.versions[r.version].health:
            if h.kind not in ("http", "tcp"):
                continue
            port = h.port if h.port is not None else (r.ports[0] if r.ports else 0)
            request = None
            if h.kind == "http":
                shown = f"[{host}]" if ":" in host else host
                request = (f"GET {h.path} HTTP/1.1\r\nHost: {shown}:{port}\r\n"
                           "User-Agent: corral-health\r\n\r\n").encode()  # fmt: skip
            out.append((h, host, port, request))
        return out

    def _check(self, r: Replica, now: float) -> None:
        probes = r.probes
        if r.state != RUNNING or not probes:
            return
        if r.in_flight is not None:  # the last one has not answered yet: ask again later
            r.checks_due = now + probes[0][0].interval
            self._push(r.checks_due, "check", r)
            return
        h, host, port, request = probes[self.checks_made % len(probes)]
        self.checks_made += 1

        def done(why: str | None, kept: socket.socket | None) -> None:
            if r.in_flight is c:
                r.in_flight = None
                if r.state == RUNNING:
                    r.conn, kept = kept, None
                    self._checked(r, h, why)
            if kept is not None:
                kept.close()

        c = _Check(self._bind(), r, now + h.timeout, request, done)
        c.timeout = h.timeout
        kept, r.conn = r.conn, None
        r.in_flight = c
        if r.passes or r.fails:
            r.checks_due = now + h.interval
        else:  # after the first check, the replicas' checks are spread over the interval
            r.checks_due = now + h.interval * (0.5 + 0.5 * ((r.n * 0.6180339887) % 1.0))
        self._push(r.checks_due, "check", r)
        self._push(c.deadline, "deadline", c)
        c.start(host, port, kept if request is not None else None)

    def _checked(self, r: Replica, h: HealthCheck, why: str | None) -> None:
        now = self._now()
        if why is None:
            r.fails = 0
            r.passes += 1
            if r.healthy_since is None:
                r.healthy_since = now
                self._changed.add(r.svc)
                self._push(now + r.svc.versions[r.version].update.healthy_for, "gate", r.svc)
                self._touch(r.svc)
            return
        r.fails += 1
        if (
            r.passes == 0
            and r.started is not None
            and now - r.started < max(STARTUP, h.threshold * h.interval)
        ):
            return  # still starting: not yet judged
        if r.fails >= h.threshold and r.state == RUNNING:
            r.reason = f"{h.kind} health check failed {r.fails} times in a row: {why}"
            r.healthy_since = None
            self._stop_later([r], RESTARTING)
            self._touch(r.svc)
        elif r.healthy_since is not None:
            r.healthy_since = None  # not healthy now (not yet restarted)
            self._changed.add(r.svc)
            self._schedule_flush()

    # -- the one timer ------------------------------------------------------------------------

    def _push(self, when: float, kind: str, obj: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, obj))
        if when < self._timer_at:
            self._arm()

    def _arm(self) -> None:
        loop = self._bind()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
        if self._heap:
            when = self._heap[0][0]
            self._timer_at = when
            self._timer = loop.call_later(max(0.0, when - self._now()), self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        # what is due within SLACK is done now, one wake for several (a deadline only
        # once passed: a check's time to answer is never cut short)
        real = self._now()
        now = real + SLACK
        later = []
        while self._heap and self._heap[0][0] <= now:
            item = heapq.heappop(self._heap)
            _, _, kind, obj = item
            if kind == "deadline" and item[0] > real:
                later.append(item)
                continue
            if kind == "check":
                if obj.checks_due <= now and obj.state == RUNNING:
                    self._check(obj, now)
            elif kind == "deadline":
                c = obj
                r = c.replica
                if r.in_flight is c:
                    c.end(f"no answer from {c.where} within {c.timeout:g} s")
            elif kind == "restart":
                if obj.state == PENDING and obj.checks_due <= now:
                    self._touch(obj.svc)
            else:  # gate, update: judge the service again
                self._touch(obj)
        for item in later:
            heapq.heappush(self._heap, item)
        self._arm()

    def _now(self) -> float:
        return self._bind().time()

    # -- plumbing ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _note(self, svc: Service, note: str, *, state: str | None = None,
              reason: str | None = None) -> None:  # fmt: skip
        if state is not None:
            svc.state = state
            svc.reason = reason
        ev: dict[str, Any] = {"kind": "service", "service": svc.name, "note": note}
        if state is not None:
            ev["state"] = state
        self._event(ev)
        self._changed.add(svc)

    def _judge_health(self, svc: Service, healthy: int) -> None:
        """STARTING, RUNNING or DEGRADED, by how many replicas are healthy (an update or
        a crash loop says more, and is left alone)."""
        if svc.update is not None or svc.state not in (STARTING, RUNNING, DEGRADED):
            return
        if healthy >= svc.replicas:
            svc.full = True
            if svc.state != RUNNING:
                self._note(svc, f"{healthy} of {svc.replicas} replicas healthy", state=RUNNING)
        elif svc.full:
            why = f"{healthy} of {svc.replicas} replicas healthy"
            if svc.state != DEGRADED or svc.reason != why:
                self._note(svc, why, state=DEGRADED, reason=why)

    def _flush(self) -> None:
        self._flush_scheduled = False
        changed, self._changed = self._changed, set()
        if changed or len(self.snapshot) != len(self.services):
            self.snapshot = {
                name: tuple(f"{e['address']}:{e['port']}" for e in self.endpoints(name)
                            if e["port"] is not None)
                for name in self.services
            }  # fmt: skip
            for svc in changed:  # one event per service whose healthy count changed
                healthy = sum(1 for r in svc.members.values() if self._healthy(r))
                if healthy != self._healthy_said.get(svc.name):
                    self._healthy_said[svc.name] = healthy
                    self._events.append({"kind": "service", "service": svc.name,
                                         "healthy": healthy, "replicas": svc.replicas})  # fmt: skip
                if svc.name in self.services:
                    self._judge_health(svc, healthy)
        events, self._events = self._events, []
        rows = [(s.name, s.texts[s.target], s.workdir, s.owner, s.replicas, s.target + 1,
                 s.state, s.reason) for s in changed if s.name in self.services]  # fmt: skip
        reps, self._rows = self._rows, {}
        up = [row for row in reps.values() if row is not None]
        gone = [k for k, row in reps.items() if row is None]
        if not rows and not events and not reps:
            return
        now = self.clock()
        self.journal.write(lambda: self.store.write(rows, events, now, up, gone))


def _same_replicas(a: ServiceSpec, b: ServiceSpec) -> bool:
    """Do the two specs make the same replicas (they may differ in their number)?"""
    return replace(a, replicas=0, loc=b.loc) == replace(b, replicas=0)


def _checked(spec: ServiceSpec) -> bool:
    return any(h.kind in ("http", "tcp") for h in spec.health)


def _first_port(spec: ServiceSpec) -> int | None:
    return next((h.port for h in spec.health if h.port is not None), None)
