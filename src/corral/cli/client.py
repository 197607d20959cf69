"""The command line against a control server: ``corral env|task|token|lock ...``.

The server comes from ``--server`` or ``CORRAL_SERVER``, the token from ``--token`` or
``CORRAL_TOKEN``; an https server's certificate is checked against ``--ca-cert`` (or
``CORRAL_CA_CERT``) when given, else against the system's CAs. Listings print tables,
or JSON with ``-o json``. Exit codes scripts can rely on: 0 done; 1 the server refused or
the action failed (its problem detail is printed); 2 the command line is wrong; 3 the
server cannot be reached (or its certificate is not trusted).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from corral.cli import http
from corral.cli.console import Lazy, escape, table
from corral.cli.options import parse_vars, var_option

if TYPE_CHECKING:
    import ssl

out = Lazy()
err = Lazy(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
CA_CERT = "corral.ca_cert"  # where --ca-cert is kept, in the click context's meta


def _remember_ca(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[CA_CERT] = value


def server_options(f: F) -> F:
    f = click.option(
        "--server", envvar="CORRAL_SERVER", metavar="URL", help="The control server (or "
        "CORRAL_SERVER), e.g. http://127.0.0.1:8080.",
    )(f)  # fmt: skip
    f = click.option(
        "--token", envvar="CORRAL_TOKEN", metavar="TOKEN", help="Access token (or CORRAL_TOKEN)."
    )(f)
    f = click.option(
        "--ca-cert", envvar="CORRAL_CA_CERT", metavar="FILE", expose_value=False,
        callback=_remember_ca, help="Trust an https server whose certificate this CA "
        "(PEM) signed (or CORRAL_CA_CERT); by default the system's CAs.",
    )(f)  # fmt: skip
    return f


output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True)  # fmt: skip


def trust(ca_cert: str | None) -> ssl.SSLContext | bool:
    """What an https server's certificate is checked against: the CA certificate given
    (``--ca-cert``, ``CORRAL_CA_CERT``), else the system's CAs."""
    if ca_cert is None:
        ctx = click.get_current_context(silent=True)
        ca_cert = ctx.meta.get(CA_CERT) if ctx is not None else None
    ca_cert = ca_cert or os.environ.get("CORRAL_CA_CERT") or None
    if ca_cert is None:
        return True
    import ssl  # (~30 ms: only for https)

    try:
        return ssl.create_default_context(cafile=ca_cert)
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        fail(2, f"cannot use the CA certificate {ca_cert} (--ca-cert, CORRAL_CA_CERT): {reason}")


def unreachable(server: str, e: http.HTTPError) -> str:
    """Why ``server`` could not be reached, with what to do about a certificate this
    client does not trust."""
    import ssl

    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = str(cause.verify_message or cause.reason)
        if "mismatch" in why.lower():  # trusted, but for another name than the URL's
            return (f"cannot reach {server}: its TLS certificate is not for this address "
                    f"({why}); use a name or address the certificate lists (its "
                    "subjectAltName), or make one that lists this address")  # fmt: skip
        return (f"cannot reach {server}: its TLS certificate is not trusted "
                f"({cause.verify_message or cause.reason}); give the CA that signed it with "
                "--ca-cert FILE or CORRAL_CA_CERT")  # fmt: skip
    return f"cannot reach {server}: {e}"


class Api:
    def __init__(self, server: str | None, token: str | None, ca_cert: str | None = None) -> None:
        if not server:
            raise click.UsageError("no server: give --server URL or set CORRAL_SERVER")
        if token:
            token = token.strip()  # (a file edited elsewhere may end it with \r or spaces)
            if not token.isascii() or not token.isprintable() or " " in token:
                raise click.UsageError("--token, CORRAL_TOKEN: that is not a token (a stray "
                                       "character in it?)")  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self.client = http.Client(
                base_url=server.rstrip("/"), headers=headers, timeout=300, verify=trust(ca_cert)
            )
        except ValueError as e:
            raise click.UsageError(f"--server, CORRAL_SERVER: {e}") from None
        self.server = server

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.client.request(method, path, **kw)
        except http.ConnectError as e:
            fail(3, unreachable(self.server, e))
        except http.HTTPError as e:
            fail(3, f"{self.server}: {e}")
        if r.status_code >= 400:
            body = None
            with contextlib.suppress(http.HTTPError):
                body = r.json()
            if isinstance(body, dict):
                msg = f"{body.get('title', 'error')} ({r.status_code}): {body.get('detail')}"
                errors = body.get("errors")
                for item in errors[:20] if isinstance(errors, list) else ():
                    text = item.get("message", item) if isinstance(item, dict) else item
                    msg += f"\n  {text}"
            else:
                msg = f"HTTP {r.status_code}: {r.text[:500]}"
            fail(1, msg)
        if 300 <= r.status_code < 400:
            where = r.headers.get("location", "?")[:200]
            fail(3, f"{self.server} answered {r.status_code}, to {where}: give that URL as "
                 "--server (https?)")  # fmt: skip
        try:
            return r.json()
        except http.HTTPError as e:
            fail(3, f"{self.server}: {e}: is it a corral server?")

    def stream(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self.client.stream("GET", path, params=params, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    fail(1, f"HTTP {r.status_code}: {r.text[:500]}")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        event = http.loads(line[6:])
                        if isinstance(event, dict):
                            yield event
        except http.HTTPError as e:
            if isinstance(e, http.ConnectError):
                fail(3, unreachable(self.server, e))
            fail(3, f"the event stream from {self.server} ended: {e}")


def fail(code: int, message: str) -> NoReturn:
    err.print(f"[bold red]error[/]: {message}")
    sys.exit(code)


def show(rows: list[dict[str, Any]], columns: list[str], output: str) -> None:
    if output == "json":
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    table([[_cell(row.get(c)) for c in columns] for row in rows], columns)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return " ".join(f"{k}={n}" for k, n in v.items())
    return str(v)


# -- environments -----------------------------------------------------------------------------


@click.group("env")
def env() -> None:
    """Environments on a control server."""


@env.command("create")
@click.argument("workflow")
@var_option
@server_options
@output_option
def env_create(workflow: str, variables: tuple[str, ...], server: str, token: str,
               output: str) -> None:  # fmt: skip
    """Create an environment from WORKFLOW (a name in the server's workflows directory)."""
    api = Api(server, token)
    e = api.call("POST", "/api/environments", json={"workflow": workflow,
                                                     "vars": parse_vars(variables)})  # fmt: skip
    if output == "json":
        show([e], [], "json")
    else:
        out.print(e["id"])
        for w in e.get("warnings", []):
            err.print(f"[yellow]warning[/]: {escape(w)}", markup=True)


@env.command("list")
@server_options
@output_option
def env_list(server: str, token: str, output: str) -> None:
    """List environments."""
    rows = Api(server, token).call("GET", "/api/environments")
    show(rows, ["id", "name", "state", "run_number", "tasks", "created_by"], output)


@env.command("show")
@click.argument("env_id")
@server_options
@output_option
def env_show(env_id: str, server: str, token: str, output: str) -> None:
    """Show one environment: state, run, roles."""
    e = Api(server, token).call("GET", f"/api/environments/{env_id}")
    if output == "json":
        show([e], [], "json")
        return
    out.print(f"[bold]{e['id']}[/] {e['name']}: {e['state']}"
              + (f", run {e['run_number']}" if e["run_number"] else "")
              + (f" [red]{e['error']}[/]" if e["error"] else ""))  # fmt: skip
    out.print("tasks: " + _cell(e["tasks"]))
    if e.get("roles"):
        show(e["roles"], ["path", "state", "tasks"], "table")


@env.command("control")
@click.argument("env_id")
@click.argument("event", type=click.Choice(
    ["DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY", "RESET", "EXIT", "GO_ERROR",
     "RECOVER"], case_sensitive=False))  # fmt: skip
@server_options
def env_control(env_id: str, event: str, server: str, token: str) -> None:
    """Run a transition and wait for it."""
    r = Api(server, token).call("POST", f"/api/environments/{env_id}/transitions",
                                json={"event": event.upper()})  # fmt: skip
    out.print(f"{env_id} is {r['state']}" + (f", run {r['run_number']}" if r.get("run_number")
                                              else ""))  # fmt: skip


@env.command("destroy")
@click.argument("env_id")
@server_options
def env_destroy(env_id: str, server: str, token: str) -> None:
    """Stop, exit and tear down an environment."""
    r = Api(server, token).call("DELETE", f"/api/environments/{env_id}")
    out.print(f"{env_id} is {r['state']}")


# -- tasks --------------------------------------------------------------------------------------


@click.group("task")
def task() -> None:
    """Tasks on a control server."""


@task.command("list")
@click.option("--env", "env_id", help="Only this environment's tasks.")
@click.option("--state", help="Only tasks in this state.")
@click.option("--node", help="Only tasks on this node.")
@server_options
@output_option
def task_list(env_id: str | None, state: str | None, node: str | None, server: str, token: str,
              output: str) -> None:  # fmt: skip
    """List tasks."""
    params = {k: v for k, v in (("env", env_id), ("state", state), ("node", node)) if v}
    rows = Api(server, token).call("GET", "/api/tasks", params=params)
    show(rows, ["id", "path", "node", "state", "pid", "critical", "reason"], output)


@task.command("logs")
@click.argument("task_id")
@click.option("-n", "--lines", type=click.IntRange(1, 10_000), default=100, show_default=True)
@server_options
def task_logs(task_id: str, lines: int, server: str, token: str) -> None:
    """Print the end of a task's log."""
    r = Api(server, token).call("GET", f"/api/tasks/{task_id}/log", params={"lines": lines})
    for line in r["lines"]:
        sys.stdout.write(line + "\n")


# -- tokens and locks ----------------------------------------------------------------------------


@click.group("token")
def token_group() -> None:
    """Access tokens (admin)."""


@token_group.command("create")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True)
@click.option("--name", required=True, help="Who or what will use it (shown in events).")
@server_options
def token_create(role: str, name: str, server: str, token: str) -> None:
    """Create a token; it is printed once."""
    r = Api(server, token).call("POST", "/api/tokens", json={"role": role, "name": name})
    out.print(r["token"])


@token_group.command("list")
@server_options
@output_option
def token_list(server: str, token: str, output: str) -> None:
    """List tokens (never their secrets)."""
    rows = Api(server, token).call("GET", "/api/tokens")
    show(rows, ["id", "name", "role", "created_by", "revoked"], output)


@token_group.command("revoke")
@click.argument("token_id")
@server_options
def token_revoke(token_id: str, server: str, token: str) -> None:
    """Revoke a token by its id."""
    Api(server, token).call("DELETE", f"/api/tokens/{token_id}")
    out.print(f"{token_id} revoked")


@click.group("lock")
def lock() -> None:
    """Detector locks."""


def _lock(action: str, detectors: tuple[str, ...], force: bool, server: str, token: str) -> None:
    held = Api(server, token).call("POST", "/api/locks", json={
        "detectors": list(detectors), "action": action, "force": force})  # fmt: skip
    show([{"detector": d, **v} for d, v in held.items()], ["detector", "holder"], "table")


@lock.command("take")
@click.argument("detectors", nargs=-1, required=True)
@server_options
def lock_take(detectors: tuple[str, ...], server: str, token: str) -> None:
    """Take the locks of these detectors."""
    _lock("take", detectors, False, server, token)


@lock.command("release")
@click.argument("detectors", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Release another's lock (admin).")
@server_options
def lock_release(detectors: tuple[str, ...], force: bool, server: str, token: str) -> None:
    """Release the locks of these detectors."""
    _lock("release", detectors, force, server, token)


@lock.command("list")
@server_options
def lock_list(server: str, token: str) -> None:
    """Who holds which detector."""
    held = Api(server, token).call("GET", "/api/locks")
    show([{"detector": d, **v} for d, v in held.items()], ["detector", "holder"], "table")


@click.group("node")
def node() -> None:
    """Nodes: capacity, allocation and labels."""


@node.command("list")
@click.option("--inventory", type=click.Path(dir_okay=False), metavar="FILE",
              help="An inventory file (without a server).")  # fmt: skip
@server_options
@output_option
def node_list(inventory: str | None, server: str | None, token: str | None, output: str) -> None:
    """List nodes: from a server, an inventory file, or this machine."""
    if server:
        rows = Api(server, token).call("GET", "/api/nodes")
    else:
        from corral.backends.local import LocalBackend
        from corral.control.ledger import Ledger
        from corral.store.inventory import InventoryError, load_inventory

        try:
            nodes = load_inventory(inventory) if inventory else LocalBackend().nodes()
        except InventoryError as e:
            fail(1, str(e))
        rows = Ledger(nodes).table()
    if output == "json":
        show(rows, [], "json")
        return
    for r in rows:
        a = r.get("allocated") or {}
        r["cpu"] = f"{a.get('cpu', 0):g}/{r['cpu']:g}"
        r["memory"] = f"{a.get('memory', 0)}/{r['memory']}"
        r["gpu"] = f"{a.get('gpu', 0)}/{r['gpu']}"
        r["tasks"] = a.get("tasks", 0)
        r["labels"] = ",".join(f"{k}={v}" for k, v in r["labels"].items())
    show(
        rows,
        ["name", "pool", "cpu", "memory", "gpu", "tasks", "labels", "cordoned", "down"],
        output,
    )


@node.command("cordon")
@click.argument("name")
@click.option("--off", is_flag=True, help="Uncordon: let the node take new tasks again.")
@server_options
def node_cordon(name: str, off: bool, server: str, token: str) -> None:
    """Stop (or, with --off, resume) placing new tasks on a node."""
    r = Api(server, token).call("POST", f"/api/nodes/{name}/cordon", json={"cordoned": not off})
    out.print(f"{name} is {'cordoned' if r['cordoned'] else 'schedulable'}")


@node.command("drain")
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="Only say which environments would be evicted.")
@server_options
def node_drain(name: str, dry_run: bool, server: str, token: str) -> None:
    """Cordon a node and evict the environments running on it."""
    r = Api(server, token).call("POST", f"/api/nodes/{name}/drain", params={"dry_run": dry_run})
    verb = "would evict" if dry_run else "evicted"
    out.print(f"{name}: {verb} {', '.join(r['evict']) or 'nothing'}")


def _event_pages(api: Api, params: dict[str, Any], page: int = 10_000) -> Iterator[dict[str, Any]]:
    """The whole history after ``params["after"]``, a page at a time."""
    after = params["after"]
    while True:
        got = api.call("GET", "/api/events", params=dict(params, after=after, limit=page))
        if not isinstance(got, list):
            fail(3, "the server's answer is not a list of events")
        yield from (e for e in got if isinstance(e, dict))
        if len(got) < page or not isinstance(got[-1], dict) or "seq" not in got[-1]:
            return
        after = got[-1]["seq"]


def remote_events(server: str, token: str | None, env_id: str | None, after: int, follow: bool,
                  output: str, fmt: Callable[[dict[str, Any]], str]) -> None:  # fmt: skip
    """`corral events --server`: the history, then (with --follow) the live stream."""
    api = Api(server, token)
    params: dict[str, Any] = {"after": after}
    if env_id:
        params["env"] = env_id
    source = api.stream("/api/events/stream", params) if follow else _event_pages(api, params)
    try:
        for e in source:
            line = json.dumps(e, sort_keys=True) if output == "json" else fmt(e)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
