"""``corral secret put|list|rm``: the jobs' secrets on a control server (docs/secrets.md).

The server, token and CA come as for the other client commands (``--server`` or
``CORRAL_SERVER``, ``--token`` or ``CORRAL_TOKEN``, ``--ca-cert`` or ``CORRAL_CA_CERT``);
only an admin's token may use these. ``put`` reads the value from a file or standard
input (a terminal is asked without echo), never from the command line, where other
users' ``ps`` would see it; it sends the bytes as they are, base64-encoded, and nothing
prints a value back. Exit codes: 0 done; 1 the server refused (its problem detail is
printed: 403 for a non-admin, a bad name, a value too large or empty); 2 the command
line is wrong; 3 the server cannot be reached.
"""

from __future__ import annotations

import base64
import sys
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import click

from corral.cli.client import Api, fail, out, output_option, server_options, show


def _name(name: str) -> str:
    from corral.store.secrets import SecretError, check_name  # (cryptography: not at start)

    try:
        return quote(check_name(name), safe="")
    except SecretError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None


def _when(t: Any) -> str:
    if not isinstance(t, int | float):
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_value(path: str | None) -> bytes:
    """The value from ``path``, or standard input: asked without echo on a terminal,
    else read whole. At most ``MAX_VALUE`` bytes."""
    from corral.store.secrets import MAX_VALUE

    if path is None and sys.stdin.isatty():
        typed = click.prompt("value", hide_input=True, err=True)
        return str(typed).encode("utf-8")
    try:
        if path is None:
            data = sys.stdin.buffer.read(MAX_VALUE + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_VALUE + 1)
    except OSError as e:
        fail(1, f"cannot read {path or 'standard input'}: {e.strerror or e}")
    if len(data) > MAX_VALUE:
        fail(1, f"the value is larger than {MAX_VALUE} bytes: a secret is at most that")
    if not data:
        fail(1, f"{path or 'standard input'} is empty: a secret has a value")
    return data


@click.group("secret")
def secret() -> None:
    """Secrets for jobs: stored encrypted, never shown (docs/secrets.md). Admin."""


@secret.command("put")
@click.argument("name")
@click.option(
    "--from-file", "from_file", metavar="FILE", type=click.Path(dir_okay=False),
    help="Read the value from FILE (default: standard input; a terminal asks without echo).",
)  # fmt: skip
@server_options
def secret_put(name: str, from_file: str | None, server: str, token: str) -> None:
    """Store NAME's value (a new version), read from --from-file or standard input."""
    path = _name(name)
    value = read_value(from_file)
    body = {"base64": base64.b64encode(value).decode("ascii")}
    r = Api(server, token).call("PUT", f"/api/secrets/{path}", json=body)
    out.print(f"{name}: version {r['version']}, {r['size']} bytes")


@secret.command("list")
@server_options
@output_option
def secret_list(server: str, token: str, output: str) -> None:
    """List the secrets: name, version, writer, updated, size (never a value)."""
    rows = Api(server, token).call("GET", "/api/secrets")
    if output == "table":
        rows = [dict(r, updated=_when(r.get("updated"))) for r in rows]
    show(rows, ["name", "version", "writer", "updated", "size"], output)


@secret.command("rm")
@click.argument("name")
@server_options
def secret_rm(name: str, server: str, token: str) -> None:
    """Remove the secret NAME."""
    Api(server, token).call("DELETE", f"/api/secrets/{_name(name)}")
    out.print(f"{name}: removed")
