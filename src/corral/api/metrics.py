"""Prometheus metrics of the control server.

Counts by state are read at scrape time from the live environments (no bookkeeping to
drift); durations and counters are fed from the event bus as events are announced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from corral.control.service import ControlService

DURATIONS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _States(Collector):
    def __init__(self, service: ControlService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        envs = GaugeMetricFamily(
            "corral_environments", "Environments run by this server, by state", labels=["state"]
        )
        tasks = GaugeMetricFamily(
            "corral_tasks", "Tasks of the environments run by this server, by state",
            labels=["state"],
        )  # fmt: skip
        by_env: dict[str, int] = {}
        by_task: dict[str, int] = {}
        for env in self.service.plane.environments.values():
            by_env[env.state] = by_env.get(env.state, 0) + 1
            for state, n in env.counts().items():
                by_task[state] = by_task.get(state, 0) + n
        for state, n in sorted(by_env.items()):
            envs.add_metric([state], n)
        for state, n in sorted(by_task.items()):
            tasks.add_metric([state], n)
        yield envs
        yield tasks
        journal = self.service.plane.journal
        waiting = GaugeMetricFamily(
            "corral_store_writes_waiting", "Store writes waiting for the store to work again"
        )
        waiting.add_metric([], journal.behind)
        yield waiting
        errors = CounterMetricFamily("corral_store_errors", "Writes the store refused")
        errors.add_metric([], journal.failures)
        yield errors
        yield from self._jobs()

    def _jobs(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Jobs and their units by state, per priority class; services' replicas."""
        plane = self.service.plane
        jobs = GaugeMetricFamily(
            "corral_jobs", "Jobs run by this server, by state and priority class",
            labels=["state", "priority_class"],
        )  # fmt: skip
        units = GaugeMetricFamily(
            "corral_job_units", "Units (batch instances, DAG steps) by state and priority class",
            labels=["state", "priority_class"],
        )  # fmt: skip
        by_job: dict[tuple[str, str], int] = {}
        by_unit: dict[tuple[str, str], int] = {}
        for j in plane.jobs.jobs.values():
            k = (j.state, j.priority_class)
            by_job[k] = by_job.get(k, 0) + 1
            for state, n in j.counts.items():
                by_unit[(state, j.priority_class)] = by_unit.get((state, j.priority_class), 0) + n
        for (state, pc), n in sorted(by_job.items()):
            jobs.add_metric([state, pc], n)
        for (state, pc), n in sorted(by_unit.items()):
            units.add_metric([state, pc], n)
        yield jobs
        yield units
        sup = plane.services
        replicas = GaugeMetricFamily(
            "corral_service_replicas", "Replicas of each service: wanted, running, healthy",
            labels=["service", "kind"],
        )  # fmt: skip
        restarts = GaugeMetricFamily(
            "corral_service_restarts", "Restarts in a row of each service's replicas, summed",
            labels=["service"],
        )  # fmt: skip
        for name in sorted(sup.services):
            show = sup.show(name)
            members = show["members"]
            replicas.add_metric([name, "wanted"], show["replicas"])
            replicas.add_metric([name, "running"],
                                sum(1 for m in members if m["state"] == "RUNNING"))  # fmt: skip
            replicas.add_metric([name, "healthy"], len(sup.endpoints(name)))
            restarts.add_metric([name], sum(m["restarts"] for m in members))
        yield replicas
        yield restarts
        checks = CounterMetricFamily("corral_service_checks", "http and tcp health checks made")
        checks.add_metric([], sup.checks_made)
        yield checks


class Metrics:
    def __init__(self, service: ControlService) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_States(service))
        self.transitions = Histogram(
            "corral_transition_seconds", "Duration of environment transitions",
            ["event", "status"], buckets=DURATIONS, registry=self.registry,
        )  # fmt: skip
        self.calls = Histogram(
            "corral_call_seconds", "Duration of hook calls", ["status"], buckets=DURATIONS,
            registry=self.registry,
        )  # fmt: skip
        self.call_failures = Counter(
            "corral_call_failures", "Hook calls that failed or timed out", ["critical"],
            registry=self.registry,
        )  # fmt: skip
        self.events = Counter(
            "corral_events", "Events stored and announced", ["kind"], registry=self.registry
        )
        self.requests = Histogram(
            "corral_api_request_seconds", "API request latency", ["method", "route", "status"],
            buckets=DURATIONS, registry=self.registry,
        )  # fmt: skip
        service.plane.bus.subscribe(self.on_events)

    def on_events(self, events: Sequence[dict[str, Any]]) -> None:
        for e in events:
            kind = e.get("kind", "?")
            self.events.labels(kind).inc()
            if kind == "transition" and "duration" in e and "step" not in e:
                self.transitions.labels(e["transition"], e["status"]).observe(e["duration"])
            elif kind == "call" and "duration" in e:
                self.calls.labels(e["status"]).observe(e["duration"])
                if e["status"] != "DONE":
                    self.call_failures.labels(str(bool(e.get("critical"))).lower()).inc()

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
