"""What the API asks of jobs and services: submit, list, show, stop, scale, logs, and the
service catalog in the formats real tools read.

Job files come from the server's jobs directory (``jobs/`` in the workflows
directory), by name, as workflows do: a caller names a job, never sends commands. A
caller's role bounds the priority class a job may run at, as for environments.

The catalog (the healthy endpoints of every service) is also served as Prometheus
``http_sd_configs`` target groups and as Traefik's HTTP provider dynamic configuration
(a router per service on ``PathPrefix(`/<name>`)``, a load balancer over its healthy
replicas).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

from corral.control import runner as r
from corral.control import secretfiles
from corral.control.plane import Live
from corral.control.service import ControlService, Principal, ServiceError
from corral.control.services import service_id
from corral.jobs.makeflow import MAX_FILE_CHARS, MakeflowError, parse
from corral.jobs.spec import BatchSpec, DagSpec, PeriodicSpec, ServiceSpec, load_job
from corral.jobs.units import Units, units_of, units_of_makeflow

MAKEFLOW_SUFFIXES = (".makeflow", ".mf")


class JobService:
    def __init__(self, service: ControlService) -> None:
        self.service = service
        self.plane = service.plane
        self.dir = os.path.join(service.workflows, "jobs")

    # -- files -----------------------------------------------------------------------------

    def path(self, name: str) -> str:
        """A job file of the jobs directory, by name or relative path; never outside."""
        if not name or "\0" in name or len(name) > 1000:
            raise ServiceError(422, "Bad job", "the job name is empty or too long")
        base = os.path.realpath(self.dir)
        candidates = [name] if name.endswith((".yaml", ".yml", *MAKEFLOW_SUFFIXES)) else [
            name + ".yaml", name + ".makeflow"]  # fmt: skip
        for rel in candidates:
            path = os.path.realpath(os.path.join(base, rel))
            if not path.startswith(base + os.sep):
                raise ServiceError(422, "Bad job", f"{name!r} is outside the jobs directory")
            if os.path.isfile(path):
                return path
        raise ServiceError(404, "No such job file", f"no job {name!r} in {self.dir}")

    def files(self) -> list[dict[str, str]]:
        if not os.path.isdir(self.dir):
            return []
        out = []
        for entry in sorted(os.listdir(self.dir)):
            if entry.endswith((".yaml", ".yml", *MAKEFLOW_SUFFIXES)):
                out.append({"name": entry.rsplit(".", 1)[0], "file": entry})
        return out

    def _read(self, path: str) -> str:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE_CHARS + 1)
            return raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ServiceError(422, "Bad job", f"{path}: cannot read: {e}") from None

    # -- submitting -------------------------------------------------------------------------

    async def submit(self, name: str, who: Principal) -> dict[str, Any]:
        """Run the job file ``name``: a batch job, a DAG or a Makeflow file is queued; a
        service is deployed (or updated). The file is read and parsed in a worker
        thread (a DAG of 100,000 steps takes seconds), the rest on the loop."""
        got = await asyncio.to_thread(self._prepare, name)
        kind, spec, units, text, workdir, path = got
        if spec is not None:
            pclass = spec.placement.priority_class
            rank = self.plane.priority_classes.get(pclass)
            if rank is None:
                raise ServiceError(422, "Bad job", f"priority_class {pclass!r} is not one of "
                                   f"{', '.join(self.plane.priority_classes)}")  # fmt: skip
            self.service.check_class(pclass, rank, who)
            giver = (self.plane.services if isinstance(spec, ServiceSpec) else
                     self.plane.jobs).secrets  # fmt: skip
            missing = giver.missing(spec.secrets) if spec.secrets else []
            if missing:
                why = ("this server keeps no secrets (no key)" if giver.reveal is None else
                       "no secret " + ", ".join(repr(n) for n in missing[:5]))  # fmt: skip
                raise ServiceError(422, "Bad job", f"{path}: its secrets: {why} (corral "
                                   "secret put NAME: docs/secrets.md)")  # fmt: skip
        if isinstance(spec, ServiceSpec):
            svc = self.plane.services.deploy(spec, text=text, workdir=workdir, owner=who.name)
            self.service.record({"kind": "service", "service": svc.name, "note": "deployed",
                                 "file": name}, who.name)  # fmt: skip
            return {"kind": "service", **self.plane.services.show(svc.name)}
        assert units is not None
        if isinstance(spec, BatchSpec | DagSpec):
            return await self._queue(units, spec.name, spec.kind,
                                     spec.placement.priority_class, text, workdir, path,
                                     who)  # fmt: skip
        stem = os.path.splitext(os.path.basename(path))[0]
        return await self._queue(units, stem, kind, "batch", text, workdir, path, who)

    def _prepare(
        self, name: str
    ) -> tuple[str, ServiceSpec | BatchSpec | DagSpec | None, Units | None, str, str, str]:
        """The job file read and parsed (no state is touched: a worker thread runs it)."""
        path = self.path(name)
        text = self._read(path)
        workdir = os.path.dirname(path)
        if path.endswith(MAKEFLOW_SUFFIXES):
            try:
                mf = parse(text, path, {})
            except MakeflowError as e:
                raise ServiceError(422, "Bad job", str(e),
                                   errors=[str(p) for p in e.problems]) from None  # fmt: skip
            return "makeflow", None, units_of_makeflow(mf), text, workdir, path
        spec, diags = load_job(path, text)
        if spec is None:
            raise ServiceError(422, "Bad job", "; ".join(str(d) for d in diags[:5]),
                               errors=[str(d) for d in diags])  # fmt: skip
        if isinstance(spec, PeriodicSpec):
            raise ServiceError(422, "Bad job", "periodic jobs are scheduled by the server at "
                               "start (docs/cron.md), not submitted")  # fmt: skip
        if isinstance(spec, ServiceSpec):
            return spec.kind, spec, None, text, workdir, path
        return spec.kind, spec, units_of(spec), text, workdir, path

    async def _queue(
        self, units: Units, name: str, kind: str, pclass: str, text: str, workdir: str,
        source: str, who: Principal,
    ) -> dict[str, Any]:  # fmt: skip
        try:
            job = await self.plane.jobs.submit_large(
                units, name=name, kind=kind, text=text, workdir=workdir, owner=who.name,
                priority_class=pclass, source=source,
            )  # fmt: skip
        except ValueError as e:
            raise ServiceError(422, "Bad job", str(e)) from None
        return job.summary()

    # -- after a restart ----------------------------------------------------------------------

    def restore(self, running: Live) -> tuple[list[str], set[str]]:
        """At start (ControlPlane.adopt_leftovers' ``claim``): take over the jobs a
        previous control process left unfinished, and run its services again. ``running``:
        the processes of no environment that the agents still run, by owner id. A unit
        whose process runs is re-attached, one recorded running is heard from (its exit
        may be held by the agent: see JobRunner.settle), one that had succeeded is not
        run again, the rest is queued; a service's replicas that run go on (the others
        are started again). Returns a line each, and the task ids taken over (every
        other process is ended)."""
        notes: list[str] = []
        claimed: set[str] = set()
        runner = self.plane.jobs
        # (the secrets' directories of the processes the previous control process ran)
        owners = [row["id"] for row in runner.store.jobs(unfinished=True)]
        owners += [service_id(row["name"], self.plane.services.mark)
                   for row in self.plane.services.store.services()]  # fmt: skip
        nodes = {n.name for n in self.plane.ledger.nodes}
        for row in runner.store.jobs(unfinished=True, texts=True):
            try:
                units = self._units_of(row)
                stored = runner.store.units(row["id"])
                done = {u["idx"] for u in stored if u["state"] == r.SUCCEEDED}
                live = running.get(row["id"], {})
                attached: dict[int, r.Attached] = {}
                kept: dict[int, dict[str, Any]] = {}  # failed, blocked, cancelled, retrying
                for u in stored:
                    idx, pid, state = u["idx"], u["pid"], u["state"]
                    if idx >= units.count:
                        continue
                    if state in r.KEPT:
                        kept[idx] = u
                        continue
                    if state not in r.ALIVE or u["node"] not in nodes:
                        continue
                    proc = live.get(idx)
                    if proc is not None and pid in (None, proc[0]):
                        attached[idx] = r.Attached(proc[0], u["node"], u["attempt"],
                                                   u["started"], True, state,
                                                   u["reason"])  # fmt: skip
                    elif proc is None:  # (its exit may be held by the agent; its pid too,
                        # when its launch was under way at the crash)
                        attached[idx] = r.Attached(pid, u["node"], u["attempt"],
                                                   u["started"], False, state,
                                                   u["reason"])  # fmt: skip
                again = [u["idx"] for u in stored if u["idx"] not in done
                         and u["idx"] not in attached and u["idx"] not in kept]  # fmt: skip
                runner.store.reset_units(row["id"], again)
                runner.submit(units, name=row["name"], kind=row["kind"], text=row["text"],
                              workdir=row["workdir"], owner=row["owner"] or "",
                              priority_class=row["priority_class"], source=row["source"],
                              job_id=row["id"], done=done, restored=True,
                              attached=attached, kept=kept)  # fmt: skip
                claimed.update(f"{row['id']}:{i}" for i, a in attached.items() if a.heard)
                what = "re-attached" if attached else "taken over"
                running_now = sum(1 for a in attached.values() if a.heard)
                notes.append(
                    f"job {row['id']} ({row['name']}) {what}: {len(done)} of "
                    f"{units.count} units had succeeded, {running_now} still ran"
                    + (f", {len(attached) - running_now} whose processes are gone (their "
                       "node agent may hold their exits)" if len(attached) > running_now
                       else "")
                )  # fmt: skip
            except (ValueError, ServiceError) as e:
                now = self.service.clock()
                why = f"not taken over after a restart: {e}"
                ev = {"kind": "job", "job": row["id"], "state": r.FAILED, "reason": why}
                runner.store.write([(row["id"], r.FAILED, why, row["counts"])], [], [ev], now)
                notes.append(f"job {row['id']} ({row['name']}) {why}")
        sup = self.plane.services
        for row in sup.store.services():
            spec, diags = load_job(row["workdir"] + "/" + row["name"] + ".yaml", row["text"])
            if not isinstance(spec, ServiceSpec):
                first = str(diags[0]) if diags else "not a service"
                notes.append(f"service {row['name']} not started again: {first}")
                continue
            spec = replace(spec, replicas=row["replicas"])
            svc = sup.deploy(spec, text=row["text"], workdir=row["workdir"],
                             owner=row["owner"] or "")  # fmt: skip
            reattached = sup.attach(svc, row["version"], running.get(svc.id, {}), nodes)
            claimed.update(reattached)
            if reattached:
                notes.append(f"service {row['name']} re-attached to its {len(reattached)} running "
                             f"replicas (of {row['replicas']})")  # fmt: skip
            else:
                notes.append(f"service {row['name']} started again: {row['replicas']} replicas")
        removed, dirs = secretfiles.remove_left(owners, keep=claimed)
        if removed:
            notes.append(f"{removed} secrets' directories of ended processes removed")
        runner.secrets.adopt({k: d for k, d in dirs.items() if runner.owns(k.partition(":")[0])})
        sup.secrets.adopt({k: d for k, d in dirs.items() if sup.owns(k.partition(":")[0])})
        return notes, claimed

    def _units_of(self, row: dict[str, Any]) -> Units:
        if row["kind"] == "makeflow":
            try:
                return units_of_makeflow(parse(row["text"], row["source"] or row["name"], {}))
            except MakeflowError as e:
                raise ValueError(str(e)) from None
        spec, diags = load_job(row["source"] or row["name"], row["text"])
        if not isinstance(spec, BatchSpec | DagSpec):
            raise ValueError("; ".join(str(d) for d in diags[:3]) or "not a batch or dag job")
        return units_of(spec)

    # -- periodic jobs ------------------------------------------------------------------------

    def periodic(self) -> list[dict[str, Any]]:
        return self.plane.periodic.list()

    def unschedule(self, name: str, who: Principal) -> dict[str, Any]:
        """Stop scheduling a periodic job (a run on goes on; its file stays: it is
        scheduled again at the next start while it is in the jobs directory)."""
        try:
            info = self.plane.periodic.remove(name)
        except KeyError:
            raise ServiceError(404, "No such periodic job", f"no periodic job {name!r}") from None
        self.service.record({"kind": "periodic", "name": name, "note": "unscheduled"}, who.name)
        return info

    def schedule_all(self, owner: str = "corral") -> list[str]:
        """At start: schedule each periodic job file of the jobs directory that is not
        scheduled yet (those the store holds were restored already); a line each."""
        notes: list[str] = []
        have = {p["name"] for p in self.plane.periodic.list()}
        base = os.path.realpath(self.dir)
        for f in self.files():
            path = os.path.join(self.dir, f["file"])
            real = os.path.realpath(path)
            # regular files of the directory only (not a FIFO, nor a link that leads out)
            if not f["file"].endswith((".yaml", ".yml")) or not os.path.isfile(real):
                continue
            if not real.startswith(base + os.sep):
                notes.append(f"{path}: not scheduled: it leads outside the jobs directory")
                continue
            try:
                text = self._read(real)
            except ServiceError as e:
                notes.append(f"{path}: not scheduled: {e.detail}")
                continue
            if "periodic" not in text:
                continue
            spec, diags = load_job(path, text)
            if spec is None and "kind: periodic" in text:
                first = str(diags[0]) if diags else "it does not load"
                notes.append(f"periodic job file {path} not scheduled: {first}")
                continue
            if not isinstance(spec, PeriodicSpec) or spec.name in have:
                continue
            try:
                job, kind = self._periodic_job(spec, path)
                self.plane.periodic.add(
                    spec, text=text, workdir=os.path.dirname(path), owner=owner,
                    job_units=units_of(job), kind=kind,
                    priority_class=job.placement.priority_class,
                )  # fmt: skip
            except (ValueError, ServiceError) as e:
                notes.append(f"periodic job {spec.name} ({path}) not scheduled: {e}")
                continue
            notes.append(f"periodic job {spec.name} scheduled ({spec.schedule}, {spec.timezone})")
        return notes

    def _periodic_job(self, spec: PeriodicSpec, path: str) -> tuple[BatchSpec | DagSpec, str]:
        if spec.job is not None:
            return spec.job, spec.job.kind
        target = os.path.join(os.path.dirname(path), spec.job_file or "")
        inner, diags = load_job(target, self._read(target))
        if not isinstance(inner, BatchSpec | DagSpec):
            why = "; ".join(str(d) for d in diags[:3]) or "not a batch or dag job"
            raise ServiceError(422, "Bad job", f"{spec.job_file}: {why}")
        return inner, inner.kind

    # -- reading ----------------------------------------------------------------------------

    def jobs(self) -> list[dict[str, Any]]:
        live = self.plane.jobs.jobs
        out = []
        for row in self.plane.jobs.store.jobs():
            j = live.get(row["id"])
            out.append(j.summary() if j is not None else _stored(row))
        return out

    def job(self, job_id: str) -> dict[str, Any]:
        j = self.plane.jobs.jobs.get(job_id)
        row = self.plane.jobs.store.job(job_id)
        if row is None:
            raise ServiceError(404, "No such job", f"no job {job_id!r}")
        out = j.summary() if j is not None else _stored(row)
        if j is not None:
            out["steps"] = [
                {"index": u.idx, "name": j.units.name(u.idx), "state": u.state,
                 "attempt": u.attempt, "node": u.node, "pid": u.pid, "reason": u.reason,
                 "needs": list(j.units.spec(u.idx).needs) if j.units.array is None else []}
                for u in j.members[:10_000]
            ]  # fmt: skip
        else:
            out["steps"] = [
                {"index": u["idx"], "state": u["state"], "attempt": u["attempt"],
                 "node": u["node"], "pid": u["pid"], "reason": u["reason"]}
                for u in self.plane.jobs.store.units(job_id)[:10_000]
            ]  # fmt: skip
        return out

    async def stop(self, job_id: str, who: Principal) -> dict[str, Any]:
        if job_id not in self.plane.jobs.jobs:
            raise ServiceError(404, "No such job", f"no job {job_id!r} runs here")
        job = await self.plane.jobs.cancel(job_id, actor=who.name)
        return job.summary()

    def resume(self, job_id: str, who: Principal) -> dict[str, Any]:
        """Run a failed or cancelled job again; what succeeded is not run again (a job
        an earlier server ran too: it is read back from the store)."""
        if job_id not in self.plane.jobs.jobs:
            row = self.plane.jobs.store.job(job_id)
            if row is None:
                raise ServiceError(404, "No such job", f"no job {job_id!r}")
            if row["state"] not in (r.FAILED, r.CANCELLED):
                raise ServiceError(409, "Cannot resume", f"job {job_id} is {row['state']}: "
                                   "only a failed or cancelled job resumes")  # fmt: skip
            try:
                units = self._units_of(row)
            except ValueError as e:
                raise ServiceError(409, "Cannot resume", f"its file no longer reads: {e}") from None
            runner = self.plane.jobs
            stored = runner.store.units(job_id)
            done = {u["idx"] for u in stored if u["state"] == r.SUCCEEDED}
            runner.store.reset_units(job_id, [u["idx"] for u in stored if u["idx"] not in done])
            job = runner.submit(units, name=row["name"], kind=row["kind"], text=row["text"],
                                workdir=row["workdir"], owner=row["owner"] or "",
                                priority_class=row["priority_class"], source=row["source"],
                                job_id=job_id, done=done, restored=True)  # fmt: skip
            self.service.record({"kind": "job", "job": job_id, "note": "resumed"}, who.name)
            return job.summary()
        try:
            job = self.plane.jobs.resume(job_id)
        except ValueError as e:
            raise ServiceError(409, "Cannot resume", str(e)) from None
        self.service.record({"kind": "job", "job": job_id, "note": "resumed"}, who.name)
        return job.summary()

    def replica_log(self, name: str, slot: int, log_dir: str | None) -> str:
        if log_dir is None:
            raise ServiceError(404, "No logs", "this server keeps no logs")
        svc = self.plane.services.services.get(name)
        if svc is None:
            raise ServiceError(404, "No such service", f"no service {name!r}")
        return os.path.join(log_dir, svc.id, f"{slot}.log")

    def log_path(self, job_id: str, index: int, log_dir: str | None) -> str:
        if log_dir is None:
            raise ServiceError(404, "No logs", "this server keeps no logs")
        if self.plane.jobs.store.job(job_id) is None:
            raise ServiceError(404, "No such job", f"no job {job_id!r}")
        return os.path.join(log_dir, job_id, f"{index}.log")

    # -- services ------------------------------------------------------------------------------

    def services(self) -> list[dict[str, Any]]:
        sup = self.plane.services
        return [sup.show(name) for name in sorted(sup.services)]

    def one_service(self, name: str) -> dict[str, Any]:
        try:
            return self.plane.services.show(name)
        except KeyError:
            raise ServiceError(404, "No such service", f"no service {name!r}") from None

    def scale(self, name: str, replicas: int, who: Principal) -> dict[str, Any]:
        try:
            self.plane.services.scale(name, replicas)
        except KeyError:
            raise ServiceError(404, "No such service", f"no service {name!r}") from None
        except ValueError as e:
            raise ServiceError(422, "Bad replicas", str(e)) from None
        self.service.record({"kind": "service", "service": name, "replicas": replicas,
                             "note": f"scaled to {replicas}"}, who.name)  # fmt: skip
        return self.plane.services.show(name)

    async def remove(self, name: str, who: Principal) -> dict[str, str]:
        try:
            await self.plane.services.remove(name)
        except KeyError:
            raise ServiceError(404, "No such service", f"no service {name!r}") from None
        self.service.record({"kind": "service", "service": name, "note": "removed"}, who.name)
        return {"service": name, "status": "removed"}

    # -- the catalog --------------------------------------------------------------------------

    def catalog(self) -> dict[str, list[dict[str, Any]]]:
        sup = self.plane.services
        return {name: sup.endpoints(name) for name in sorted(sup.services)}

    def endpoints(self, name: str) -> list[dict[str, Any]]:
        try:
            return self.plane.services.endpoints(name)
        except KeyError:
            raise ServiceError(404, "No such service", f"no service {name!r}") from None

    def prometheus(self) -> list[dict[str, Any]]:
        """Prometheus ``http_sd_configs`` target groups: one per service and node."""
        out = []
        for name, eps in self.catalog().items():
            groups: dict[str, list[str]] = {}
            for e in eps:
                if e["port"] is not None:
                    groups.setdefault(e["node"], []).append(f"{_host(e['address'])}:{e['port']}")
            for node, targets in sorted(groups.items()):
                out.append({"targets": targets,
                            "labels": {"corral_service": name, "corral_node": node}})  # fmt: skip
        return out

    def traefik(self) -> dict[str, Any]:
        """Traefik's HTTP provider dynamic configuration: a router and a service each."""
        routers: dict[str, Any] = {}
        services: dict[str, Any] = {}
        middlewares: dict[str, Any] = {}  # the service sees its own paths: /web/x -> /x
        for name, eps in self.catalog().items():
            servers = [{"url": f"http://{_host(e['address'])}:{e['port']}"}
                       for e in eps if e["port"] is not None]  # fmt: skip
            if not servers:
                continue
            strip = f"{name}-strip"
            routers[name] = {"rule": f"PathPrefix(`/{name}`)", "service": name,
                             "middlewares": [strip]}  # fmt: skip
            services[name] = {"loadBalancer": {"servers": servers}}
            middlewares[strip] = {"stripPrefix": {"prefixes": [f"/{name}"]}}
        if not routers:
            return {}
        return {"http": {"routers": routers, "services": services, "middlewares": middlewares}}


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _stored(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "name", "kind", "owner", "priority_class", "state", "reason", "units",
            "counts", "source", "created")  # fmt: skip
    out = {k: row.get(k) for k in keys}
    if out["state"] in (r.JOB_QUEUED, r.JOB_RUNNING):
        out["state"] = "LOST"
        out["reason"] = "its control process ended before it did"
    return out
