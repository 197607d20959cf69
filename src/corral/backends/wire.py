"""The agent protocol's encoding: the Backend port's values as compact JSON.

A node agent and its controller exchange one JSON object per line over a stream (a
unix socket for the local agent). Requests carry an ``id`` and an ``op`` (a method
of the port); the answer carries the same ``id`` and ``result`` or ``error``; reports
come unasked, in batches: ``{"reports": [...]}``.

A node's launch batch can hold thousands of tasks that share a few commands, so
commands and health checks are sent once per batch, in tables, and each launch
refers to them by index. Everything else is a short list per item.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from corral.model.inventory import Node
from corral.model.plan import Command, HealthCheck
from corral.ports.backend import ChannelRequest, Launch, Order, Outcome, Report

MAX_FRAME = 256 << 20  # the longest line either side accepts: 256 MiB


class WireError(ValueError):
    """A frame that does not decode: the peer is not an agent (or a controller)."""


def dumps(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


def loads(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise WireError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise WireError("not an object")
    return msg


# -- launches ----------------------------------------------------------------------------


def encode_launches(batch: Sequence[Launch]) -> dict[str, Any]:
    commands: dict[Command, int] = {}
    checks: dict[HealthCheck, int] = {}
    items = []
    for x in batch:
        c = commands.setdefault(x.command, len(commands))
        h = -1 if x.health is None else checks.setdefault(x.health, len(checks))
        items.append(
            [x.task_id, x.path, c, x.control, [list(p) for p in x.env], x.log_path, h, x.lease]
            + ([] if x.timeout is None else [x.timeout])
        )
    return {
        "commands": [
            [c.value, list(c.arguments), [list(p) for p in c.env], c.shell, c.user, c.cwd]
            for c in commands
        ],
        "checks": [[list(h.command), h.interval, h.timeout, h.failures] for h in checks],
        "launches": items,
    }


def decode_launches(data: dict[str, Any]) -> list[Launch]:
    try:
        commands = [
            Command(v, tuple(a), tuple((k, e) for k, e in env), bool(sh), u, cwd)
            for v, a, env, sh, u, cwd in data["commands"]
        ]
        checks = [
            HealthCheck(tuple(c), float(i), float(t), int(f)) for c, i, t, f in data["checks"]
        ]
        return [
            Launch(
                tid,
                path,
                commands[c],
                control,
                tuple((k, v) for k, v in env),
                log,
                None if h < 0 else checks[h],
                None if lease is None else float(lease),
                None if not rest else float(rest[0]),
            )
            for tid, path, c, control, env, log, h, lease, *rest in data["launches"]
        ]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise WireError(f"a launch batch that does not decode: {e}") from None


# -- orders, outcomes, reports, channels, nodes ---------------------------------------------


def encode_orders(batch: Sequence[Order]) -> list[list[Any]]:
    return [[o.task_id, o.transition, o.args] for o in batch]


def decode_orders(data: Any) -> list[Order]:
    try:
        return [Order(str(t), str(n), {str(k): str(v) for k, v in a.items()}) for t, n, a in data]
    except (TypeError, ValueError, AttributeError) as e:
        raise WireError(f"an order batch that does not decode: {e}") from None


def encode_outcomes(outs: Sequence[Outcome]) -> list[list[Any]]:
    return [[o.task_id, o.state, o.error, o.pid, o.timed_out] for o in outs]


def decode_outcomes(data: Any) -> list[Outcome]:
    try:
        return [Outcome(t, s, e, p, bool(to)) for t, s, e, p, to in data]
    except (TypeError, ValueError) as e:
        raise WireError(f"outcomes that do not decode: {e}") from None


def encode_reports(reports: Sequence[Report]) -> list[list[Any]]:
    return [[r.task_id, r.kind, r.reason, r.code, r.pid] for r in reports]


def decode_reports(data: Any) -> list[Report]:
    try:
        return [Report(t, k, reason, code, pid) for t, k, reason, code, pid in data]
    except (TypeError, ValueError) as e:
        raise WireError(f"reports that do not decode: {e}") from None


def encode_channels(channels: Sequence[ChannelRequest]) -> list[list[Any]]:
    return [[c.task_id, c.name, c.addressing, c.port] for c in channels]


def decode_channels(data: Any) -> list[ChannelRequest]:
    try:
        return [ChannelRequest(str(t), str(n), str(a), int(p)) for t, n, a, p in data]
    except (TypeError, ValueError) as e:
        raise WireError(f"channel requests that do not decode: {e}") from None


def encode_nodes(nodes: Sequence[Node]) -> list[dict[str, Any]]:
    return [n.to_dict() for n in nodes]


def decode_nodes(data: Any) -> list[Node]:
    try:
        return [
            Node(
                str(d["name"]),
                float(d["cpu"]),
                int(d["memory"]),
                int(d["gpu"]),
                (int(d["ports"][0]), int(d["ports"][1])),
                tuple(sorted((str(k), str(v)) for k, v in d["labels"].items())),
                str(d["pool"]),
                bool(d["cordoned"]),
            )
            for d in data
        ]
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise WireError(f"nodes that do not decode: {e}") from None
