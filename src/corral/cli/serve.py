"""``corral serve``: the control plane as a long-lived server with its HTTP API.

It opens the store in ``--data``, picks the backend, deals with what a previous server
left unfinished (its processes ended, its environments taken over in ERROR; see
docs/environments.md), prints the first admin token once (on the first start), and
serves the API with uvicorn on the same event loop as the controller. SIGINT or
SIGTERM stops it: environments are torn down, then the store is closed. (A restart
that leaves the running tasks alone needs node agents; they come next.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import sys
from collections.abc import Iterator, Sequence

import click
import uvicorn
from rich.console import Console

from corral.api.app import MAX_BODY, create_app
from corral.backends.agent import DEFAULT_LEASE, MAX_LEASE, MIN_LEASE, socket_path
from corral.backends.remote import AgentBackend, AgentUnavailable, start_agent
from corral.backends.sim import SimBackend
from corral.calls import Registry
from corral.calls.builtin import BridgePlugin
from corral.cli.hardening import private_process
from corral.cli.run import (
    Seconds,
    data_option,
    inventory_option,
    parse_priorities,
    parse_task_env,
    priority_option,
    read_inventory,
    task_env_option,
)
from corral.cli.template import call_plugin_option, load_site, parse_call_plugins
from corral.control.elastic import (
    ElasticPools,
    PoolSpec,
    Provider,
    RayProvider,
    SimulatedProvider,
)
from corral.control.jobservice import JobService
from corral.control.plane import ControlPlane, install_child_watcher
from corral.control.service import ROLES, ControlService, ServiceError
from corral.control.site import SITE_DEFAULTS_FILE
from corral.model.inventory import Node
from corral.planning.preemption import PRIORITY_CLASSES
from corral.ports.backend import Backend
from corral.store.lock import DataDirInUse, DataLock
from corral.store.sqlite import SqliteStore

err = Console(stderr=True, highlight=False, soft_wrap=True)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r}: expected HOST:PORT", param_hint="--listen")
    return host or "127.0.0.1", int(port)


def parse_tls(cert: str | None, key: str | None) -> tuple[str, str] | None:
    """``--tls-cert`` and ``--tls-key``: both (checked now: readable, and a certificate
    with its key) or neither (plain HTTP)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise click.UsageError("--tls-cert and --tls-key go together: give both, or neither")
    for path, hint in ((cert, "--tls-cert"), (key, "--tls-key")):
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as e:
            msg = f"cannot read {path}: {e.strerror or e}"
            raise click.BadParameter(msg, param_hint=hint) from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as e:
        raise click.BadParameter(
            f"{cert} and {key} are not a PEM certificate and its private key: {e}",
            param_hint="--tls-cert/--tls-key",
        ) from None
    return cert, key


SECRETS_KEY = "corral.secrets_key"  # where --secrets-key is kept, in the click context's meta


def _remember_secrets_key(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[SECRETS_KEY] = value


def secrets_key_file(data: str) -> str:
    """The key file of the jobs' secrets: ``--secrets-key``, else ``secrets.key`` beside
    the store in ``data``."""
    ctx = click.get_current_context(silent=True)
    given = ctx.meta.get(SECRETS_KEY) if ctx is not None else None
    return given or os.path.join(data, "secrets.key")


@click.command("serve")
@data_option
@click.option(
    "--secrets-key", metavar="FILE", expose_value=False, callback=_remember_secrets_key,
    help="The key the jobs' secrets are encrypted with, made (0600) when missing; default "
    "secrets.key in --data. Best kept elsewhere: a copy of --data then holds no secret.",
)  # fmt: skip
@click.option(
    "--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
    help="Address to serve the API on (port 0: any free port).",
)  # fmt: skip
@click.option(
    "--tls-cert", metavar="FILE", help="Serve HTTPS with this PEM certificate (chain); "
    "with --tls-key.",
)  # fmt: skip
@click.option("--tls-key", metavar="FILE", help="The PEM private key of --tls-cert.")
@click.option(
    "--max-body", type=click.IntRange(1), default=MAX_BODY, show_default=True,
    metavar="BYTES", help="The largest request body; a larger one is refused (413).",
)  # fmt: skip
@click.option(
    "--backend", type=click.Choice(["local", "ray", "sim"]), default="local",
    show_default=True, help="Where tasks run: this machine, a Ray cluster, or a simulated farm.",
)  # fmt: skip
@click.option(
    "--ray-address", default="auto", show_default=True, metavar="auto|HOST:PORT",
    help="The Ray cluster to join (with --backend ray).",
)  # fmt: skip
@click.option(
    "--sim-nodes", type=click.IntRange(1, 100_000), default=10, show_default=True,
    help="Nodes of the simulated farm (with --backend sim).",
)  # fmt: skip
@click.option(
    "--sim-latency", type=Seconds(0, 10), default=0.0, show_default=True,
    metavar="SECONDS", help="How long each call to a simulated node takes (with --backend "
    "sim; the round trip to a real node agent, for benchmarks).",
)  # fmt: skip
@click.option(
    "--workflows", default=".", show_default=True, metavar="DIR",
    type=click.Path(file_okay=False, exists=True),
    help="Directory of the workflow templates environments are created from.",
)  # fmt: skip
@click.option(
    "--agent-lease", type=Seconds(MIN_LEASE, MAX_LEASE), default=DEFAULT_LEASE, show_default=True,
    metavar="SECONDS", help="How long the node agent keeps the tasks running without a "
    "server (a restart within it takes them over; after it they are ended).",
)  # fmt: skip
@click.option(
    "--reconcile", "reconcile_every", type=Seconds(min=0), default=10.0,
    show_default=True, metavar="SECONDS",
    help="Compare what runs with what the store says this often (0: never).",
)  # fmt: skip
@inventory_option
@priority_option
@click.option(
    "--role-priority", "role_priority", multiple=True, metavar="ROLE=CLASS",
    help="The highest priority class a role may create environments with (repeatable; "
    "CLASS none: no class). Defaults: operator=async, admin=online, viewer=none.",
)  # fmt: skip
@task_env_option
@click.option(
    "--kafka", metavar="HOST:PORT[,HOST:PORT...]",
    help="Publish the events on these Kafka brokers, as AliECS's protobuf messages on its "
    "topics (docs/kafka.md; needs the 'kafka' extra).",
)  # fmt: skip
@click.option(
    "--kafka-topic-prefix", default="aliecs", show_default=True, metavar="PREFIX",
    help="The first segment of the Kafka topics (PREFIX.environment, PREFIX.task, ...).",
)  # fmt: skip
@click.option(
    "--kafka-option", "kafka_options", multiple=True, metavar="KEY=VALUE",
    help="A librdkafka setting of the Kafka producer (repeatable): security.protocol=SSL, "
    "message.timeout.ms=10000, ...",
)  # fmt: skip
@click.option(
    "--defaults", "defaults_file", metavar="FILE", type=click.Path(dir_okay=False),
    help="Site defaults: a YAML file of name: value under every template's own (default: "
    "site-defaults.yaml in --data, if there is one).",
)  # fmt: skip
@click.option("--run-dpl", is_flag=True, help="dpl.Generate* may run DPL commands.")
@click.option(
    "--pool", "pools", multiple=True, metavar="NAME=MIN:MAX:CPUS[:MEMORY_MB]",
    help="An elastic pool (repeatable): nodes of that size, between MIN and MAX, asked for "
    "when jobs of pool NAME wait and given back when idle (Ray's autoscaler with --backend "
    "ray; simulated nodes on this machine otherwise). docs/jobs.md#elastic-pools",
)  # fmt: skip
@click.option(
    "--pool-cooldown", default=60.0, show_default=True, type=click.FloatRange(0, 86400),
    metavar="SECONDS", help="How long a pool's node stays idle before it is given back.",
)  # fmt: skip
@call_plugin_option
def serve(
    data: str,
    listen: str,
    tls_cert: str | None,
    tls_key: str | None,
    max_body: int,
    backend: str,
    ray_address: str,
    sim_nodes: int,
    sim_latency: float,
    workflows: str,
    agent_lease: float,
    reconcile_every: float,
    inventory: str | None,
    priority_classes: tuple[str, ...],
    role_priority: tuple[str, ...],
    task_env: tuple[str, ...],
    kafka: str | None,
    kafka_topic_prefix: str,
    kafka_options: tuple[str, ...],
    defaults_file: str | None,
    run_dpl: bool,
    pools: tuple[str, ...],
    pool_cooldown: float,
    call_plugins: tuple[str, ...],
) -> None:
    """Run the control server: the HTTP API, the controller and the store."""
    elastic = parse_pools(pools, pool_cooldown)
    kafka_config = parse_kafka(kafka, kafka_topic_prefix, kafka_options)
    if defaults_file is None and os.path.isfile(os.path.join(data, SITE_DEFAULTS_FILE)):
        defaults_file = os.path.join(data, SITE_DEFAULTS_FILE)
    site_defaults = load_site(defaults_file, None, run_dpl).defaults
    private_process()  # its environment holds CORRAL_TOKEN: not readable by its tasks
    import httpx  # noqa: F401  (the http call plugin's, imported lazily: now, not in the loop)

    host, port = parse_listen(listen)
    tls = parse_tls(tls_cert, tls_key)
    passed = parse_task_env(task_env)
    bridges = parse_call_plugins(call_plugins, passed)
    nodes = read_inventory(inventory)
    classes = parse_priorities(priority_classes)
    limits = parse_role_priorities(role_priority, classes)
    try:  # one control process per data directory, for as long as this one runs
        DataLock(data, f"corral serve --listen {listen}").acquire()
    except DataDirInUse as e:
        err.print(f"[bold red]error[/]: {e}")
        sys.exit(1)
    sys.exit(asyncio.run(_serve(
        data, host, port, backend, sim_nodes, workflows, nodes, classes, agent_lease,
        reconcile_every, ray_address, sim_latency, passed, tls=tls, max_body=max_body,
        role_priority=limits, kafka=kafka, kafka_prefix=kafka_topic_prefix,
        kafka_config=kafka_config, site_defaults=site_defaults, run_dpl=run_dpl,
        call_plugins=bridges, pools=elastic,
    )))  # fmt: skip


def parse_pools(pairs: tuple[str, ...], cooldown: float) -> list[PoolSpec]:
    """``--pool NAME=MIN:MAX:CPUS[:MEMORY_MB]``, checked now."""
    out: list[PoolSpec] = []
    for pair in pairs:
        name, eq, rest = (x.strip() for x in pair.partition("="))
        parts = rest.split(":")
        try:
            if not eq or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
                raise ValueError("expected NAME=MIN:MAX:CPUS[:MEMORY_MB]")
            if len(parts) not in (3, 4):
                raise ValueError("expected NAME=MIN:MAX:CPUS[:MEMORY_MB]")
            low, high = int(parts[0]), int(parts[1])
            cpu = float(parts[2])
            memory = int(parts[3]) if len(parts) == 4 else 0
            if not (0 < cpu <= 4096 and 0 <= memory <= 1 << 30):
                raise ValueError("cpus must be in (0, 4096] and memory in [0, 2^30] MB")
            out.append(PoolSpec(name, low, high, Node(name, cpu=cpu, memory=memory,
                                                      ports=(30000, 39999)), cooldown))  # fmt: skip
        except ValueError as e:
            raise click.BadParameter(f"{pair!r}: {e}", param_hint="--pool") from None
    if len({p.name for p in out}) != len(out):
        raise click.BadParameter("a pool is given twice", param_hint="--pool")
    return out


def parse_kafka(kafka: str | None, prefix: str, options: tuple[str, ...]) -> dict[str, str]:
    """``--kafka``'s settings, checked now; exit 2 if the 'kafka' extra is not installed."""
    if kafka is None:
        if options:
            raise click.UsageError("--kafka-option goes with --kafka")
        return {}
    try:
        import confluent_kafka  # noqa: F401
        import google.protobuf  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as e:
        err.print(
            f"[bold red]error[/]: --kafka needs the 'kafka' extra ({e.name} is not installed): "
            "pip install 'corral[kafka]'"
        )
        sys.exit(2)
    if not kafka.strip() or any(":" not in b for b in kafka.split(",")):
        raise click.BadParameter(f"{kafka!r}: expected HOST:PORT[,HOST:PORT...]",
                                 param_hint="--kafka")  # fmt: skip
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", prefix):
        raise click.BadParameter(f"{prefix!r}: letters, digits, '.', '_' and '-' only",
                                 param_hint="--kafka-topic-prefix")  # fmt: skip
    out: dict[str, str] = {}
    for pair in options:
        key, eq, value = (x.strip() for x in pair.partition("="))
        if not eq or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--kafka-option")
        out[key] = value
    from corral.events.kafka import check_config

    wrong = check_config(kafka, out)
    if wrong is not None:
        raise click.BadParameter(wrong, param_hint="--kafka-option")
    return out


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: ``_serve`` handles SIGINT and SIGTERM on
    the loop, so that the environments are torn down before the process ends."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(
    data: str,
    host: str,
    port: int,
    backend_name: str,
    sim_nodes: int,
    workflows: str,
    nodes: list[Node] | None,
    classes: dict[str, int] | None = None,
    lease: float = DEFAULT_LEASE,
    reconcile_every: float = 10.0,
    ray_address: str = "auto",
    sim_latency: float = 0.0,
    task_env: dict[str, str] | None = None,
    *,
    tls: tuple[str, str] | None = None,
    max_body: int = MAX_BODY,
    role_priority: dict[str, str | None] | None = None,
    kafka: str | None = None,
    kafka_prefix: str = "aliecs",
    kafka_config: dict[str, str] | None = None,
    pools: Sequence[PoolSpec] = (),
    site_defaults: dict[str, str] | None = None,
    run_dpl: bool = False,
    call_plugins: dict[str, BridgePlugin] | None = None,
) -> int:
    """``task_env``: the ``--task-env`` variables with their values, passed through to
    every task (the agents are told in their hello). ``kafka``: the brokers to publish
    the events on (docs/kafka.md)."""
    task_env = task_env or {}
    install_child_watcher()
    store = SqliteStore(os.path.join(data, "corral.db"))
    from corral.store.secrets import SecretError, SecretStore

    try:  # the jobs' secrets (docs/secrets.md): a key file that cannot be used stops here
        secrets = SecretStore(store, secrets_key_file(data))
    except (SecretError, OSError) as e:
        err.print(f"[bold red]error[/]: secrets: {e}")
        store.close()
        return 1
    if unreadable := secrets.unreadable():
        err.print(
            f"[yellow]note[/]: the key in {secrets.key_path} cannot decrypt the secrets "
            f"{', '.join(unreadable)} (was it replaced?): restore it, or put them again"
        )
    log_dir = os.path.join(os.path.abspath(data), "logs")
    backend: Backend
    agent: AgentBackend | None = None
    if backend_name == "local":  # the tasks belong to a node agent that outlives us
        agent = AgentBackend(
            socket_path(data), start=start_agent(data, lease=lease), lease=lease, task_env=task_env
        )
        try:
            await agent.connect()
        except AgentUnavailable as e:
            err.print(f"[bold red]error[/]: {e} (see {os.path.join(data, 'agent.log')})")
            store.close()
            return 1
        backend = agent
    elif backend_name == "ray":  # a node agent actor on every node of a Ray cluster
        from corral.backends.ray_engine import RayBackend

        ray_backend = RayBackend(ray_address, lease=lease, task_env=task_env)
        try:
            await ray_backend.start()
        except Exception as e:
            err.print(f"[bold red]error[/]: cannot join the Ray cluster at {ray_address}: {e}")
            store.close()
            return 1
        backend = ray_backend
    else:  # a simulated farm of the inventory's nodes, or of --sim-nodes generated ones
        backend = SimBackend(
            [n.name for n in nodes] if nodes else sim_nodes,
            launch_latency=sim_latency,
            transition_latency=sim_latency,
        )
    plane = ControlPlane(
        store, backend, log_dir=log_dir, inventory=nodes, priority_classes=classes,
        calls=Registry(extra=call_plugins or {}),
    )  # fmt: skip
    for giver in (plane.jobs.secrets, plane.services.secrets):
        giver.reveal = secrets.reveal
        giver.exists = secrets.exists
    service = ControlService(
        plane, workflows=workflows, role_priority=role_priority,
        site_defaults=site_defaults, run_dpl=run_dpl,
    )  # fmt: skip
    publisher = None
    if kafka is not None:  # before anything is stored: the store's events, from where it was
        from corral.events.kafka import KafkaPublisher

        publisher = KafkaPublisher(
            store, plane.bus, kafka, topic_prefix=kafka_prefix, config=kafka_config
        )
        await publisher.start()
        err.print(f"kafka: publishing events to {kafka} ({kafka_prefix}.* topics) from event "
                  f"{publisher.acked + 1}")  # fmt: skip
    keep = False  # at the end: leave the environments to the agent, or tear them down
    elastic: ElasticPools | None = None
    try:
        jobs = JobService(service)
        # (the jobs and services a previous server ran are taken over with what it left)
        for note in await plane.adopt_leftovers(claim=jobs.restore):
            err.print(f"[yellow]note[/]: {note}")
        for note in plane.periodic.restore() + jobs.schedule_all():
            err.print(f"[yellow]note[/]: {note}")
        if pools:
            provider: Provider = RayProvider() if backend_name == "ray" else SimulatedProvider()
            elastic = ElasticPools(plane.ledger, plane.jobs, plane.services, provider, pools,
                                   record=plane.record)  # fmt: skip
            elastic.start()
            err.print(f"elastic pools: {', '.join(f'{p.name} ({p.min}..{p.max})' for p in pools)}")
        if agent is not None:
            agent.on_reconnect = plane.after_reconnect
        if reconcile_every > 0:
            plane.start_reconcile(reconcile_every)
        try:
            token = service.first_admin_token()
        except ServiceError as e:
            err.print(f"[bold red]error[/]: cannot create the first admin token: {e}")
            return 1
        if token is not None:
            print(f"admin token (shown once, keep it): {token}", flush=True)
        app = create_app(service, log_dir=log_dir, max_body=max_body)
        app.state.secrets = secrets
        if publisher is not None:
            app.state.metrics.registry.register(publisher.collector())
        # no access log (a ?token= would be in it); the peer's address is the one the
        # failed logins count against (X-Forwarded-For from a local process would let it
        # pick a new one each time)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off",
            timeout_graceful_shutdown=3, access_log=False, proxy_headers=False,
            ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
        )  # fmt: skip
        server = _Server(config)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            app.state.closing = True  # event streams end, so shutdown need not wait
            server.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        job = asyncio.ensure_future(server.serve())
        while not server.started and not job.done():
            await asyncio.sleep(0.01)
        if job.done():
            job.result()
            err.print("[bold red]error[/]: the server did not start")
            return 1
        bound = server.servers[0].sockets[0].getsockname()
        scheme = "https" if tls else "http"
        print(f"corral serving on {scheme}://{bound[0]}:{bound[1]} ({backend_name} backend, "
              f"data in {data})", flush=True)  # fmt: skip
        await job
        live = [e for e in plane.environments.values() if e.state != "DONE"]
        keep = backend_name in ("local", "ray") and bool(live)
        if keep:
            err.print(f"stopping: {len(live)} environments keep running under the node "
                      f"agents; a server started on {data} within {lease:g} s takes them "
                      "over, else the agents end them")  # fmt: skip
        elif live:
            err.print(f"stopping: tearing {len(live)} environments down ...")
        else:
            err.print("stopping")
        return 0
    finally:
        if elastic is not None:
            await elastic.close()
        if keep:
            await service.detach()
        else:
            await service.close()
        if publisher is not None:  # what the teardown stored, too
            await publisher.close()
        store.close()


def parse_role_priorities(
    pairs: tuple[str, ...], classes: dict[str, int] | None
) -> dict[str, str | None]:
    """``--role-priority ROLE=CLASS``: a role's highest priority class (``none``: none),
    one of the priority classes (``--priority-class``, else the standard ones)."""
    known = classes if classes is not None else dict(PRIORITY_CLASSES)
    out: dict[str, str | None] = {}
    for pair in pairs:
        role, eq, name = (x.strip() for x in pair.partition("="))
        if not eq or role not in ROLES:
            raise click.BadParameter(
                f"{pair!r}: expected ROLE=CLASS, ROLE one of {', '.join(ROLES)}",
                param_hint="--role-priority",
            )
        if name != "none" and name not in known:
            raise click.BadParameter(
                f"{pair!r}: no priority class {name!r} (classes: "
                f"{', '.join(f'{k} ({v})' for k, v in known.items())}; or none)",
                param_hint="--role-priority",
            )
        out[role] = None if name == "none" else name
    return out
