"""``corral config get|put|history|render|list``: the configuration store of a control
server (docs/config.md).

The server, token and CA come as for the other client commands (``--server`` or
``CORRAL_SERVER``, ``--token`` or ``CORRAL_TOKEN``, ``--ca-cert`` or ``CORRAL_CA_CERT``).
Exit codes: 0 done; 1 the server refused (its problem detail is printed: a missing key,
a template error with its key and line, 403 for a non-admin's write) or the payload
file is not text; 2 the command line is wrong; 3 the server cannot be reached.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import click

from corral.cli.client import Api, fail, out, output_option, server_options, show
from corral.cli.options import parse_vars, var_option

revision_option = click.option(
    "--revision", "-r", type=click.IntRange(min=0), default=None, metavar="N",
    help="As of this revision (default: now).",
)  # fmt: skip


def _path(key: str) -> str:
    """A key in a URL: its parts quoted, the ``/`` between them kept. A key that is not
    one is refused here (a URL would lose its ``..`` on the way)."""
    from corral.templates.configpayload import ConfigError, check_key

    try:
        check_key(key)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="KEY") from None
    return quote(key, safe="/")


def _when(t: Any) -> str:
    if not isinstance(t, int | float):
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@click.group("config")
def config() -> None:
    """Configuration payloads: versioned, rendered with Jinja2 (docs/config.md)."""


@config.command("get")
@click.argument("key")
@revision_option
@server_options
@output_option
def config_get(key: str, revision: int | None, server: str, token: str, output: str) -> None:
    """Print the payload at KEY (with -o json: and its version, writer and time)."""
    params = {} if revision is None else {"revision": revision}
    row = Api(server, token).call("GET", f"/api/config/{_path(key)}", params=params)
    if output == "json":
        sys.stdout.write(json.dumps(row, indent=2) + "\n")
    else:
        sys.stdout.write(row["payload"])


@config.command("put")
@click.argument("key")
@click.argument("file", type=click.File("rb"), default="-")
@server_options
def config_put(key: str, file: Any, server: str, token: str) -> None:
    """Store a new version of KEY from FILE (default, or '-': standard input). Admin."""
    data = file.read()
    try:
        payload = data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(1, f"{file.name}: not UTF-8 text (byte {e.start}): a payload is text")
    r = Api(server, token).call("PUT", f"/api/config/{_path(key)}", json={"payload": payload})
    out.print(f"{key}: version {r['version']}, revision {r['revision']}")


@config.command("history")
@click.argument("key")
@server_options
@output_option
def config_history(key: str, server: str, token: str, output: str) -> None:
    """List the versions of KEY: revision, version, writer, time, size."""
    rows = Api(server, token).call("GET", f"/api/config-history/{_path(key)}")
    if output == "table":
        rows = [dict(r, time=_when(r.get("time"))) for r in rows]
    show(rows, ["revision", "version", "writer", "time", "size"], output)


@config.command("list")
@click.argument("prefix", default="")
@revision_option
@server_options
@output_option
def config_list(prefix: str, revision: int | None, server: str, token: str, output: str) -> None:
    """List the keys starting with PREFIX."""
    params: dict[str, Any] = {"prefix": prefix}
    if revision is not None:
        params["revision"] = revision
    r = Api(server, token).call("GET", "/api/config", params=params)
    if output == "json":
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    for key in r["keys"]:
        sys.stdout.write(key + "\n")


@config.command("render")
@click.argument("key")
@var_option
@revision_option
@server_options
@output_option
def config_render(key: str, variables: tuple[str, ...], revision: int | None, server: str,
                  token: str, output: str) -> None:  # fmt: skip
    """Print the payload at KEY rendered with the variables (its includes read too)."""
    body: dict[str, Any] = {"key": key, "vars": parse_vars(variables)}
    if revision is not None:
        body["revision"] = revision
    r = Api(server, token).call("POST", "/api/config/render", json=body)
    if output == "json":
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
    else:
        sys.stdout.write(r["text"])
