"""DPL workflow generation: a DPL workflow's JSON description → a corral sub-workflow.

O2's Data Processing Layer describes a workflow as a list of data processors (devices),
each with the data it consumes (``inputs``) and produces (``outputs``), matched by
``origin/description/subspec``; ``o2-… --dump-workflow`` prints that description as
JSON, with per-device ``metadata`` (the executable and its command line). AliECS runs
the command with ``--o2-control NAME`` and O2 writes AliECS templates; corral reads the
JSON dump itself and writes its own:

- one role per device, running a task class ``NAME-DEVICE`` in FairMQ control mode, its
  command the device's executable with its command-line arguments and ``--id DEVICE``;
- one channel per producer → consumer route, ``from_PRODUCER_to_CONSUMER``, bound
  (push, ipc) by the producer's class and connected (pull) by the consumer's role;
- a device's raw channels (``--channel-config "name=N,type=T,method=bind|connect,..."``
  in its arguments or its metadata's ``channels``: DPL's proxies to readout and
  StfBuilder) as O2 writes them for AliECS: one it binds gets the global alias
  ``N-{{ it }}``, one it connects targets ``::N-{{ it }}`` (the FLP the workflow is
  included for), so that the including workflow's channels meet them.

The name is ``jit-`` and a hash of the description, so the same description always
makes the same files (AliECS names its generated workflows the same way). The output is
YAML text for the library to parse like any file; every string from the description is
data, never template code (``{{`` in it is escaped).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

MAX_DUMP = 16 * 1024 * 1024  # the largest JSON description read
MAX_DEVICES = 5_000
MAX_SPECS = 100_000  # inputs and outputs of all devices
MAX_ROUTES = 50_000  # producer -> consumer channels
CHANNEL_TYPES = ("push", "pull", "pub", "sub")
_BAD_NAME = re.compile(r"[^A-Za-z0-9_-]+")


class DplError(ValueError):
    """A description that cannot be turned into a workflow; str() says why."""


@dataclass(frozen=True, slots=True)
class Generated:
    name: str  # the workflow's name, also its include reference
    workflow: str  # the workflow file's text
    classes: dict[str, str]  # task class name -> its file's text


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's when it is there


def _dump(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, width=1 << 20, allow_unicode=True)


def _name(s: str) -> str:
    out = _BAD_NAME.sub("-", s).strip("-")
    return out or "device"


def _literal(s: str) -> str:
    """A string from the description as template text that expands to itself."""
    return s.replace("{{", '{{ "{{" }}') if "{{" in s else s


@dataclass(frozen=True, slots=True)
class _Spec:
    origin: str
    description: str
    subspec: int | None


def _specs(items: Any, where: str) -> list[_Spec]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise DplError(f"{where}: expected a list")
    out = []
    for k, it in enumerate(items):
        if not isinstance(it, dict):
            raise DplError(f"{where}[{k}]: expected an object")
        origin, desc = it.get("origin"), it.get("description")
        if not isinstance(origin, str) or not isinstance(desc, str):
            raise DplError(f"{where}[{k}]: needs string 'origin' and 'description'")
        sub = it.get("subspec")
        if sub is not None and (type(sub) is not int):
            raise DplError(f"{where}[{k}]: 'subspec' must be a whole number")
        out.append(_Spec(origin, desc, sub))
    return out


_CHANNEL_CONFIG = re.compile(r"""--channel-config[\s=]+["']?([^"']+)""")


@dataclass(frozen=True, slots=True)
class _Raw:
    name: str
    type: str
    method: str  # bind | connect
    transport: str | None
    addressing: str | None


def _raw_channels(texts: list[str]) -> list[_Raw]:
    """The raw channels ``--channel-config`` declares in a device's arguments."""
    out: list[_Raw] = []
    for text in texts:
        for m in _CHANNEL_CONFIG.finditer(text):
            fields = dict(part.split("=", 1) for part in m.group(1).split(",") if "=" in part)
            name, method = fields.get("name", ""), fields.get("method", "")
            if not name or method not in ("bind", "connect"):
                continue
            address = fields.get("address", "")
            addressing = (
                "ipc"
                if address.startswith("ipc:")
                else ("tcp" if address.startswith("tcp:") else None)
            )
            transport = fields.get("transport")
            kind = fields.get("type", "push" if method == "bind" else "pull").strip()
            if kind not in CHANNEL_TYPES:
                raise DplError(
                    f"channel {_name(name)!r}: type {kind[:40]!r} is not one of "
                    f"{', '.join(CHANNEL_TYPES)}"
                )
            out.append(_Raw(
                _name(name), kind, method,
                transport if transport in ("zeromq", "shmem") else None, addressing,
            ))  # fmt: skip
    return out


def _routes(
    names: list[str], ins: list[list[_Spec]], outs: list[list[_Spec]], prefix: str
) -> tuple[dict[int, list[str]], dict[int, list[tuple[str, int]]]]:
    """The channels: producer -> consumer where an output matches an input (origin and
    description, and subspec when both give one); found through an index of the
    outputs, so the work grows with the routes found, never with devices squared."""
    exact: dict[tuple[str, str, int | None], list[int]] = {}
    any_sub: dict[tuple[str, str], list[int]] = {}
    for p, pout in enumerate(outs):
        for o in pout:
            exact.setdefault((o.origin, o.description, o.subspec), []).append(p)
            any_sub.setdefault((o.origin, o.description), []).append(p)
    binds: dict[int, list[str]] = {}
    connects: dict[int, list[tuple[str, int]]] = {}
    count = 0
    for c, cin in enumerate(ins):
        found: set[int] = set()
        for i in cin:
            if i.subspec is None:
                candidates = any_sub.get((i.origin, i.description), [])
            else:
                candidates = exact.get((i.origin, i.description, i.subspec), []) + exact.get(
                    (i.origin, i.description, None), []
                )
            for p in candidates:
                if p != c and p not in found:
                    found.add(p)
                    count += 1
                    if count > MAX_ROUTES:
                        raise DplError(f"the DPL description makes more than {MAX_ROUTES} channels")
        for p in sorted(found):
            chan = f"{prefix}from_{names[p]}_to_{names[c]}"
            binds.setdefault(p, []).append(chan)
            connects.setdefault(c, []).append((chan, p))
    return binds, connects


def parse_dump(text: str) -> dict[str, Any]:
    if len(text) > MAX_DUMP:
        raise DplError(f"the DPL description is {len(text)} bytes; the limit is {MAX_DUMP}")
    try:
        dump = json.loads(text)
    except ValueError as e:
        raise DplError(f"the DPL description is not JSON: {e}") from None
    except RecursionError:
        raise DplError("the DPL description nests too deep") from None
    if not isinstance(dump, dict) or not isinstance(dump.get("workflow"), list):
        raise DplError("the DPL description has no 'workflow' list of devices")
    return dump


def generate(text: str, channel_prefix: str = "") -> Generated:
    """The sub-workflow a DPL JSON description makes; DplError for a bad one."""
    dump = parse_dump(text)
    devices = dump["workflow"]
    if not devices:
        raise DplError("the DPL description has no devices")
    if len(devices) > MAX_DEVICES:
        raise DplError(f"the DPL description has {len(devices)} devices; limit {MAX_DEVICES}")
    meta_list = dump.get("metadata") or []
    if not isinstance(meta_list, list):
        raise DplError("the DPL description's 'metadata' is not a list")
    meta = {m.get("name"): m for m in meta_list if isinstance(m, dict)}
    digest = hashlib.sha1(
        json.dumps(dump, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    name = f"jit-{digest}"
    names: list[str] = []
    taken: set[str] = set()
    ins: list[list[_Spec]] = []
    outs: list[list[_Spec]] = []
    specs = 0
    for k, d in enumerate(devices):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise DplError(f"workflow[{k}]: a device needs a string 'name'")
        n = _name(d["name"])
        if n in taken:
            raise DplError(f"workflow[{k}]: two devices are named {n!r}")
        names.append(n)
        taken.add(n)
        ins.append(_specs(d.get("inputs"), f"workflow[{k}].inputs"))
        outs.append(_specs(d.get("outputs"), f"workflow[{k}].outputs"))
        specs += len(ins[-1]) + len(outs[-1])
        if specs > MAX_SPECS:
            raise DplError(f"the DPL description has more than {MAX_SPECS} inputs and outputs")
    binds, connects = _routes(names, ins, outs, channel_prefix)
    classes: dict[str, str] = {}
    roles: list[dict[str, Any]] = []
    for k, d in enumerate(devices):
        m = meta.get(d["name"])
        if m is None:
            raise DplError(
                f"device {d['name']!r} has no entry in the description's 'metadata' list "
                "(its executable and command-line arguments)"
            )
        exe = m.get("executable")
        if not isinstance(exe, str) or not exe:
            raise DplError(f"device {d['name']!r}: its metadata names no 'executable'")
        args = m.get("cmdLineArgs") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise DplError(f"device {d['name']!r}: 'cmdLineArgs' must be a list of strings")
        argv = [_literal(a) for a in args]
        if "--id" not in args:
            argv += ["--id", _literal(d["name"])]
        chans = m.get("channels") or []
        raw = _raw_channels([*args, *(c for c in chans if isinstance(c, str))])
        cls_name = f"{name}-{names[k]}"
        cls: dict[str, Any] = {
            "name": cls_name,
            "description": _literal(f"DPL device {d['name']}"),
            "control": {"mode": "fairmq"},
            "command": {"value": _literal(exe), "arguments": argv},
        }
        bind = [{"name": ch, "type": "push", "addressing": "ipc"} for ch in binds.get(k, [])]
        for r in raw:
            if r.method == "bind":
                entry: dict[str, Any] = {"name": r.name, "type": r.type}
                if r.transport:
                    entry["transport"] = r.transport
                entry["addressing"] = r.addressing or "ipc"
                entry["global"] = f"{r.name}-{{{{ it }}}}"
                bind.append(entry)
        if bind:
            cls["bind"] = bind
        classes[cls_name] = _dump(cls)
        role: dict[str, Any] = {"name": names[k]}
        connect: list[dict[str, Any]] = [
            {"name": ch, "type": "pull", "target": f"{{{{ Parent().Path }}}}.{names[p]}:{ch}"}
            for ch, p in connects.get(k, [])
        ]
        for r in raw:
            if r.method == "connect":
                entry = {"name": r.name, "type": r.type, "target": f"::{r.name}-{{{{ it }}}}"}
                if r.transport:
                    entry["transport"] = r.transport
                connect.append(entry)
        if connect:
            role["connect"] = connect
        role["task"] = {"load": cls_name}
        roles.append(role)
    wf = {"name": name, "description": "generated from a DPL workflow description", "roles": roles}
    return Generated(name, _dump(wf), classes)
