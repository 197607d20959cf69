"""The API's routes for jobs, services and the service catalog (docs/api.md#jobs).

``mount`` adds them to the application ``create_app`` builds: viewers read, operators
submit, stop and scale. The catalog's machine formats (Prometheus ``http_sd_configs``,
Traefik's HTTP provider) are read by those tools with a viewer's token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from corral.api.auth import Operator, Viewer
from corral.control.jobservice import JobService

EXAMPLE_JOB = "jq3v5mpxk2a"
JobId = Annotated[str, Path(description="a job's id", examples=[EXAMPLE_JOB], max_length=64)]
ServiceName = Annotated[
    str, Path(description="a service's name", examples=["ci-builder"], max_length=100)
]
MAX_LOG_LINES = 10_000


class JobRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"file": "nightly-build"}, {"file": "qa.makeflow"}]},
    )
    file: str = Field(
        max_length=1000,
        description="a job file of the server's jobs directory (jobs/ beside the workflows), "
        "by name or relative path: a batch, dag or service job, or a Makeflow file",
    )


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"replicas": 3}]})
    replicas: int = Field(ge=0, le=10_000)


# a log read from where the last read ended (its ``offset``), for following it
LogAfter = Annotated[
    int | None,
    Query(ge=0, le=1 << 62, description="the lines written after this offset (the `offset` "
          "the last read answered), instead of the last `lines`", examples=[0]),
]  # fmt: skip
LogWhole = Annotated[
    bool,
    Query(description="with `after`: a last line not ended yet too (the log is final)",
          examples=[False, True]),
]  # fmt: skip


def mount(
    app: FastAPI,
    jobs: JobService,
    *,
    problems: Callable[..., dict[int | str, Any]],
    tail: Callable[[str, int, int | None, bool], Awaitable[dict[str, Any]]],
    log_dir: str | None,
) -> None:
    @app.get("/api/job-files", tags=["jobs"])
    async def job_files(who: Viewer) -> list[dict[str, str]]:
        return jobs.files()

    @app.post(
        "/api/jobs", tags=["jobs"], status_code=201,
        responses=problems(e403="the job's priority class is above the caller's",
                           e404="no such job file", e422="the job file is wrong"),
    )  # fmt: skip
    async def job_submit(req: JobRequest, who: Operator) -> dict[str, Any]:
        return await jobs.submit(req.file, who)

    @app.get("/api/jobs", tags=["jobs"])
    async def job_list(who: Viewer) -> list[dict[str, Any]]:
        return jobs.jobs()

    @app.get("/api/jobs/{job_id}", tags=["jobs"], responses=problems(e404="no such job"))
    async def job_show(job_id: JobId, who: Viewer) -> dict[str, Any]:
        return jobs.job(job_id)

    @app.delete("/api/jobs/{job_id}", tags=["jobs"], responses=problems(e404="no such job"))
    async def job_stop(job_id: JobId, who: Operator) -> dict[str, Any]:
        return await jobs.stop(job_id, who)

    @app.post(
        "/api/jobs/{job_id}/resume", tags=["jobs"],
        responses=problems(e404="no such job", e409="the job is not failed or cancelled"),
    )  # fmt: skip
    async def job_resume(job_id: JobId, who: Operator) -> dict[str, Any]:
        """Run a failed or cancelled job again: the steps that succeeded are not run again."""
        return jobs.resume(job_id, who)

    @app.get(
        "/api/jobs/{job_id}/log", tags=["jobs"],
        responses=problems(e404="no such job, or this server keeps no logs"),
    )  # fmt: skip
    async def job_log(
        job_id: JobId,
        who: Viewer,
        index: Annotated[int, Query(ge=0, le=10_000_000, examples=[0])] = 0,
        lines: Annotated[int, Query(ge=1, le=MAX_LOG_LINES, examples=[50])] = 100,
        after: LogAfter = None,
        whole: LogWhole = False,
    ) -> dict[str, Any]:
        path = jobs.log_path(job_id, index, log_dir)
        return {"job": job_id, "index": index, "path": path,
                **await tail(path, lines, after, whole)}  # fmt: skip

    @app.get("/api/services", tags=["services"])
    async def service_list(who: Viewer) -> list[dict[str, Any]]:
        return jobs.services()

    @app.get("/api/services/{name}", tags=["services"], responses=problems(e404="no such service"))
    async def service_show(name: ServiceName, who: Viewer) -> dict[str, Any]:
        return jobs.one_service(name)

    @app.get(
        "/api/services/{name}/log", tags=["services"],
        responses=problems(e404="no such service, or this server keeps no logs"),
    )  # fmt: skip
    async def service_log(
        name: ServiceName,
        who: Viewer,
        slot: Annotated[int, Query(ge=0, le=10_000, examples=[0])] = 0,
        lines: Annotated[int, Query(ge=1, le=MAX_LOG_LINES, examples=[50])] = 100,
        after: LogAfter = None,
        whole: LogWhole = False,
    ) -> dict[str, Any]:
        """The end of a replica's log (every process its slot ran, appended)."""
        path = jobs.replica_log(name, slot, log_dir)
        return {"service": name, "slot": slot, "path": path,
                **await tail(path, lines, after, whole)}  # fmt: skip

    @app.post(
        "/api/services/{name}/scale", tags=["services"],
        responses=problems(e404="no such service"),
    )  # fmt: skip
    async def service_scale(name: ServiceName, req: ScaleRequest, who: Operator) -> dict[str, Any]:
        return jobs.scale(name, req.replicas, who)

    @app.delete(
        "/api/services/{name}", tags=["services"], responses=problems(e404="no such service")
    )
    async def service_remove(name: ServiceName, who: Operator) -> dict[str, str]:
        return await jobs.remove(name, who)

    @app.get("/api/periodic", tags=["jobs"])
    async def periodic_list(who: Viewer) -> list[dict[str, Any]]:
        """The periodic jobs: schedule, next and last fire, the run on, runs queued."""
        return jobs.periodic()

    @app.delete(
        "/api/periodic/{name}", tags=["jobs"], responses=problems(e404="no such periodic job")
    )
    async def periodic_remove(name: ServiceName, who: Operator) -> dict[str, Any]:
        """Stop scheduling it (a run on goes on)."""
        return jobs.unschedule(name, who)

    @app.get("/api/catalog", tags=["catalog"])
    async def catalog(who: Viewer) -> dict[str, list[dict[str, Any]]]:
        """The healthy endpoints of every service."""
        return jobs.catalog()

    @app.get("/api/catalog/{name}", tags=["catalog"], responses=problems(e404="no such service"))
    async def catalog_one(name: ServiceName, who: Viewer) -> list[dict[str, Any]]:
        return jobs.endpoints(name)

    @app.get("/api/sd/prometheus", tags=["catalog"])
    async def prometheus_sd(who: Viewer) -> list[dict[str, Any]]:
        """Prometheus ``http_sd_configs`` target groups of the healthy endpoints."""
        return jobs.prometheus()

    @app.get("/api/sd/traefik", tags=["catalog"])
    async def traefik(who: Viewer) -> dict[str, Any]:
        """Traefik's HTTP provider dynamic configuration (routers and load balancers)."""
        return jobs.traefik()
