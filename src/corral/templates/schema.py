"""Parse workflow and task-class YAML into definitions, with a place for every value.

The structure and names follow ALICE's AliECS workflow templates so that their
templates migrate. Parsing checks the shape (known fields, one role kind, types of
literal values); everything that depends on variables is checked by the expander.
Every problem is reported as ``FILE:LINE:COL: message``; parsing goes on after an
error so that one run shows them all.
"""

from __future__ import annotations

import datetime
import difflib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from corral.templates.diagnostics import Diagnostics, Loc
from corral.templates.text import Hole, Text, TextSyntaxError, split_holes

try:  # the C loader is ~10x faster; fall back where libyaml is missing
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

_STR = "tag:yaml.org,2002:str"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
PUBLIC_TAG = "!public"

CHANNEL_TYPES = ("push", "pull", "pub", "sub")
ADDRESSING = ("tcp", "ipc")
CONTROL_MODES = ("direct", "basic", "hook", "fairmq")
PROTOCOL_MODES = ("direct", "fairmq")  # the modes whose tasks speak the control protocol
CONSTRAINT_OPERATORS = ("equals", "regex", "in")
PUBLIC_TYPES = ("string", "bool", "number", "list", "map")
# A file is refused before anything walks it recursively when its lists and maps nest
# deeper than this (libyaml's composer recurses in C and crashes the process past some
# 25,000 levels; the parser and `_plain` recurse in Python), or when its aliases repeat
# more than this many values (a "billion laughs": 30 levels of `b: [*a, *a]` are 2**30).
MAX_NESTING = 200
MAX_ALIAS_EXPANSION = 100_000
# FairMQ-style channel options carried through to the task as channel properties
CHANNEL_OPTIONS = (
    "rateLogging",
    "sndBufSize",
    "rcvBufSize",
    "sndKernelSize",
    "rcvKernelSize",
    "method",
    "linger",
)


# ---------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class VarDef:
    name: str
    value: Text
    loc: Loc
    public: dict[str, Any] | None = None  # the !public spec, value excluded


@dataclass(slots=True)
class ChannelDef:
    kind: str  # bind | connect
    name: str
    loc: Loc
    type: Text | None = None
    transport: Text | None = None
    addressing: Text | None = None
    global_alias: Text | None = None
    target: Text | None = None
    properties: list[tuple[str, Text]] = field(default_factory=list)


@dataclass(slots=True)
class ConstraintDef:
    attribute: Text
    value: Text
    operator: Text | None
    loc: Loc


@dataclass(slots=True)
class TaskRefDef:
    load: Text
    loc: Loc
    critical: Text | None = None
    trigger: Text | None = None
    await_: Text | None = None
    timeout: Text | None = None


@dataclass(slots=True)
class CallDef:
    func: Text
    loc: Loc
    trigger: Text | None = None
    await_: Text | None = None
    timeout: Text | None = None
    critical: Text | None = None
    return_var: Text | None = None


@dataclass(slots=True)
class ForDef:
    var: str
    loc: Loc
    range: Text | None = None
    begin: Text | None = None
    end: Text | None = None
    nmin: Text | None = None


@dataclass(slots=True)
class RoleDef:
    name: Text
    loc: Loc
    file: str
    enabled: Text | None = None
    defaults: list[VarDef] = field(default_factory=list)
    vars: list[VarDef] = field(default_factory=list)
    constraints: list[ConstraintDef] = field(default_factory=list)
    binds: list[ChannelDef] = field(default_factory=list)
    connects: list[ChannelDef] = field(default_factory=list)
    task: TaskRefDef | None = None
    call: CallDef | None = None
    roles: list[RoleDef] | None = None
    iterator: ForDef | None = None
    include: Text | None = None


@dataclass(slots=True)
class WorkflowDef:
    """A workflow file: its root role plus a description."""

    root: RoleDef
    description: str = ""
    public: tuple[str, ...] = ()  # "name", "description": what AliECS's GUI may show/edit


@dataclass(slots=True)
class CommandDef:
    value: Text
    loc: Loc
    arguments: list[Text] = field(default_factory=list)
    env: list[Text] = field(default_factory=list)
    shell: Text | None = None
    user: Text | None = None
    cwd: Text | None = None


@dataclass(slots=True)
class HealthDef:
    command: Text
    loc: Loc
    arguments: list[Text] = field(default_factory=list)
    interval: Text | None = None
    timeout: Text | None = None
    failures: Text | None = None


@dataclass(slots=True)
class ResourcesDef:
    loc: Loc
    cpu: Text | None = None
    memory: Text | None = None
    gpu: Text | None = None
    ports: Text | None = None


@dataclass(slots=True)
class TaskClassDef:
    name: str
    loc: Loc
    file: str
    command: CommandDef | None
    mode: Text | None = None
    defaults: list[VarDef] = field(default_factory=list)
    vars: list[VarDef] = field(default_factory=list)
    wants: ResourcesDef | None = None
    limits: ResourcesDef | None = None
    binds: list[ChannelDef] = field(default_factory=list)
    connects: list[ChannelDef] = field(default_factory=list)
    properties: list[tuple[str, Text]] = field(default_factory=list)
    health: HealthDef | None = None


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------

_ROLE_KEYS = (
    "name", "enabled", "description", "defaults", "vars", "constraints", "bind", "connect",
    "task", "call", "roles", "for", "include",
)  # fmt: skip
_ROOT_KEYS = ("name", "description", "enabled", "defaults", "vars", "constraints", "roles")
_TASK_KEYS = ("load", "critical", "trigger", "await", "timeout")
_CALL_KEYS = ("func", "trigger", "await", "timeout", "critical", "return")
_FOR_KEYS = ("range", "begin", "end", "var", "nmin")
_BIND_KEYS = ("name", "type", "transport", "addressing", "global", *CHANNEL_OPTIONS)
_CONNECT_KEYS = ("name", "type", "target", "transport", *CHANNEL_OPTIONS)
_CONSTRAINT_KEYS = ("attribute", "value", "operator")
_CLASS_KEYS = (
    "name", "description", "defaults", "vars", "control", "wants", "limits", "bind",
    "connect", "properties", "command", "health",
)  # fmt: skip
_COMMAND_KEYS = ("value", "arguments", "env", "shell", "user", "cwd", "stdout", "stderr", "log")
_RESOURCE_KEYS = ("cpu", "memory", "gpu", "ports")
_HEALTH_KEYS = ("command", "arguments", "interval", "timeout", "failures")
_PUBLIC_KEYS = (
    "value", "type", "label", "description", "widget", "values", "panel", "index",
    "visibleif", "rows",
)  # fmt: skip


class Parser:
    """Turns the text of one file into definitions, reporting into ``diags``."""

    def __init__(self, file: str, diags: Diagnostics) -> None:
        self.file = file
        self.diags = diags
        self.unknown_keys = False  # did the last mapping() report an unknown key?

    # -- plumbing ---------------------------------------------------------

    def loc(self, node: yaml.Node) -> Loc:
        m = node.start_mark
        return Loc(self.file, m.line + 1, m.column + 1)

    def error(self, node: yaml.Node | Loc, message: str) -> None:
        self.diags.error(node if isinstance(node, Loc) else self.loc(node), message)

    def compose(self, text: str) -> yaml.Node | None:
        try:
            deep = too_deep(text)
            if deep is not None:
                message = f"lists and maps nest more than {MAX_NESTING} levels deep"
                self.error(Loc(self.file, *deep), message)
                return None
            node = yaml.compose(text, Loader=_Loader)
        except yaml.MarkedYAMLError as e:
            self.diags.error(*yaml_problem(e, self.file))
            return None
        except yaml.YAMLError as e:
            self.diags.error(Loc(self.file, 1, 1), f"YAML error: {e}")
            return None
        if node is None:
            self.diags.error(Loc(self.file, 1, 1), "the file is empty")
            return None
        bad = _graph_problem(node)
        if bad is not None:
            self.error(*bad)
            return None
        return node

    def mapping(
        self, node: yaml.Node, what: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """Keys of a mapping node (key node, value node); unknown/duplicate keys reported."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping, not {_kind(node)}")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.unknown_keys = False
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.error(k, f"{what}: keys must be plain names")
                continue
            key = k.value
            if key in out:
                self.error(k, f"{what}: duplicate key {key!r}")
                continue
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                self.error(k, f"unknown field {key!r} in {what}{extra}")
                self.unknown_keys = True
                continue
            out[key] = (k, v)
        return out

    def scalar(self, node: yaml.Node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{what} must be a single value, not {_kind(node)}")
            return None
        if node.tag not in (_STR, _BOOL, _NULL) and node.tag.startswith("!"):
            self.error(node, f"{what}: unknown tag {node.tag!r}")
            return None
        return _scalar_text(node)

    def text(self, node: yaml.Node, what: str) -> Text | None:
        raw = self.scalar(node, what)
        if raw is None:
            return None
        return self.make_text(raw, node)

    def make_text(self, raw: str, node: yaml.Node) -> Text | None:
        loc = self.loc(node)
        try:
            pieces = split_holes(raw)
        except TextSyntaxError as e:
            self.error(_offset_loc(loc, node, raw, e.offset), str(e))
            return None
        parts: list[str | Hole] = []
        for p in pieces:
            if isinstance(p, str):
                parts.append(p)
            else:
                src, off = p
                parts.append(Hole(src, _offset_loc(loc, node, raw, off)))
        return Text(raw, loc, tuple(parts))

    def name(self, node: yaml.Node, what: str) -> str | None:
        raw = self.scalar(node, what)
        if raw is None:
            return None
        if not raw or "{{" in raw:
            self.error(node, f"{what} must be a literal name")
            return None
        return raw

    def seq(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{what} must be a list, not {_kind(node)}")
            return []
        return list(node.value)

    def texts(self, node: yaml.Node, what: str) -> list[Text]:
        out = []
        for item in self.seq(node, what):
            t = self.text(item, f"an entry of {what}")
            if t is not None:
                out.append(t)
        return out

    # -- variables ----------------------------------------------------------

    def var_map(self, node: yaml.Node, what: str) -> list[VarDef]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping of variable names to values")
            return []
        out: list[VarDef] = []
        seen: set[str] = set()
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or not k.value:
                self.error(k, f"{what}: variable names must be plain names")
                continue
            name = k.value
            if name in seen:
                self.error(k, f"{what}: duplicate variable {name!r}")
                continue
            seen.add(name)
            vd = self.var_value(name, v, what)
            if vd is not None:
                out.append(vd)
        return out

    def var_value(self, name: str, node: yaml.Node, what: str) -> VarDef | None:
        loc = self.loc(node)
        if node.tag == PUBLIC_TAG:
            return self.public_var(name, node)
        if isinstance(node, yaml.ScalarNode):
            t = self.text(node, f"variable {name!r}")
            return None if t is None else VarDef(name, t, loc)
        # lists and maps are kept as JSON text: variables are strings
        try:
            raw = json.dumps(_plain(node), sort_keys=True, separators=(",", ":"))
        except _NotPlain as e:
            self.error(e.node, f"variable {name!r}: {e}")
            return None
        return VarDef(name, Text(raw, loc, (raw,)), loc)

    def public_var(self, name: str, node: yaml.Node) -> VarDef | None:
        loc = self.loc(node)
        if isinstance(node, yaml.ScalarNode):
            t = self.make_text(_scalar_text(node), node)
            return None if t is None else VarDef(name, t, loc, {})
        keys = self.mapping(node, f"public variable {name!r}", _PUBLIC_KEYS)
        if keys is None:
            return None
        spec: dict[str, Any] = {}
        value: Text | None = None
        if "value" in keys:
            vnode = keys["value"][1]
            if isinstance(vnode, yaml.ScalarNode):
                value = self.text(vnode, f"public variable {name!r} value")
            else:
                try:
                    raw = json.dumps(_plain(vnode), sort_keys=True, separators=(",", ":"))
                    value = Text(raw, self.loc(vnode), (raw,))
                except _NotPlain as e:
                    self.error(e.node, f"public variable {name!r}: {e}")
        else:
            value = Text("", loc, ("",))
        for key, (_knode, vnode) in keys.items():
            if key == "value":
                continue
            if key == "values":
                items = []
                for item in self.seq(vnode, f"public variable {name!r} values"):
                    s = self.scalar(item, "an allowed value")
                    if s is not None:
                        items.append(s)
                spec["values"] = tuple(items)
            elif key in ("index", "rows"):
                s = self.scalar(vnode, key)
                if s is not None:
                    try:
                        spec[key] = int(s)
                    except ValueError:
                        self.error(vnode, f"public variable {name!r}: {key} must be an integer")
            else:
                s = self.scalar(vnode, key)
                if s is None:
                    continue
                if key == "type" and s not in PUBLIC_TYPES:
                    self.error(
                        vnode,
                        f"public variable {name!r}: type {s!r} is not one of "
                        + ", ".join(PUBLIC_TYPES),
                    )
                    continue
                spec[key] = s
        if value is None:
            return None
        return VarDef(name, value, loc, spec)

    # -- channels and constraints ---------------------------------------------

    def channels(self, node: yaml.Node, kind: str) -> list[ChannelDef]:
        out: list[ChannelDef] = []
        allowed = _BIND_KEYS if kind == "bind" else _CONNECT_KEYS
        seen: set[str] = set()
        for item in self.seq(node, kind):
            keys = self.mapping(item, f"a {kind} entry", allowed)
            if keys is None:
                continue
            if "name" not in keys:
                self.error(item, f"a {kind} entry needs a name")
                continue
            name = self.name(keys["name"][1], f"{kind} name")
            if name is None:
                continue
            if name in seen:
                self.error(keys["name"][1], f"duplicate {kind} channel {name!r}")
                continue
            seen.add(name)
            ch = ChannelDef(kind, name, self.loc(item))
            for key, (_, v) in keys.items():
                if key == "name":
                    continue
                t = self.text(v, f"{kind} {name!r} {key}")
                if t is None:
                    continue
                if key == "type":
                    ch.type = t
                elif key == "transport":
                    ch.transport = t
                elif key == "addressing":
                    ch.addressing = t
                elif key == "global":
                    ch.global_alias = t
                elif key == "target":
                    ch.target = t
                else:
                    ch.properties.append((key, t))
            if kind == "connect" and ch.target is None:
                self.error(item, f"connect {name!r} needs a target")
                continue
            out.append(ch)
        return out

    def constraints(self, node: yaml.Node) -> list[ConstraintDef]:
        out = []
        for item in self.seq(node, "constraints"):
            keys = self.mapping(item, "a constraint", _CONSTRAINT_KEYS)
            if keys is None:
                continue
            if "attribute" not in keys or "value" not in keys:
                self.error(item, "a constraint needs an attribute and a value")
                continue
            attr = self.text(keys["attribute"][1], "constraint attribute")
            value = self.text(keys["value"][1], "constraint value")
            op = (
                self.text(keys["operator"][1], "constraint operator")
                if "operator" in keys
                else None
            )
            if attr is not None and value is not None:
                out.append(ConstraintDef(attr, value, op, self.loc(item)))
        return out

    # -- roles -----------------------------------------------------------------

    def workflow(self, text: str) -> WorkflowDef | None:
        node = self.compose(text)
        if node is None:
            return None
        keys = self.mapping(node, "a workflow", _ROOT_KEYS)
        if keys is None:
            return None
        if "name" not in keys:
            self.error(node, "a workflow needs a name")
            return None
        if "roles" not in keys:
            self.error(node, "a workflow needs roles")
            return None
        public = []
        for key in ("name", "description"):  # AliECS: `name: !public readout-dataflow`
            value = keys.get(key, (None, None))[1]
            if isinstance(value, yaml.ScalarNode) and value.tag == PUBLIC_TAG:
                value.tag = _STR
                public.append(key)
        description = ""
        if "description" in keys:
            description = self.scalar(keys["description"][1], "description") or ""
        root = self.role_body(node, keys, top=True)
        return None if root is None else WorkflowDef(root, description, tuple(public))

    def role(self, node: yaml.Node) -> RoleDef | None:
        keys = self.mapping(node, "a role", _ROLE_KEYS)
        if keys is None:
            return None
        if self.unknown_keys and not any(k in keys for k in ("task", "call", "roles", "include")):
            return None  # the unknown key is most likely the misspelt kind: said once
        if "name" not in keys:
            self.error(node, "a role needs a name")
            return None
        return self.role_body(node, keys, top=False)

    def role_body(
        self, node: yaml.Node, keys: dict[str, tuple[yaml.Node, yaml.Node]], *, top: bool
    ) -> RoleDef | None:
        before = len(self.diags)
        in_children = 0
        name = self.text(keys["name"][1], "role name")
        if name is None:
            return None
        role = RoleDef(name, self.loc(node), self.file)
        kinds = [k for k in ("task", "call", "roles", "include") if k in keys]
        if not top:
            if not kinds:
                self.error(node, "a role needs one of task, call, roles or include")
                return None
            if len(kinds) > 1:
                self.error(
                    keys[kinds[1]][0],
                    "a role has exactly one of task, call, roles, include; "
                    f"found {' and '.join(kinds)}",
                )
                return None
        for key, (_knode, v) in keys.items():
            if key == "enabled":
                role.enabled = self.text(v, "enabled")
            elif key == "defaults":
                role.defaults = self.var_map(v, "defaults")
            elif key == "vars":
                role.vars = self.var_map(v, "vars")
            elif key == "constraints":
                role.constraints = self.constraints(v)
            elif key == "bind":
                role.binds = self.channels(v, "bind")
            elif key == "connect":
                role.connects = self.channels(v, "connect")
            elif key == "task":
                role.task = self.task_ref(v)
            elif key == "call":
                role.call = self.call(v)
            elif key == "include":
                role.include = self.text(v, "include")
            elif key == "for":
                role.iterator = self.iterator(v)
            elif key == "roles":
                children = []
                items = self.seq(v, "roles")
                if not items:
                    self.error(v, "roles must not be empty")
                for item in items:
                    mark = len(self.diags)
                    child = self.role(item)
                    in_children += len(self.diags) - mark
                    if child is not None:
                        children.append(child)
                role.roles = children
        if (role.binds or role.connects) and role.task is None and not top:
            where = keys["bind"][0] if "bind" in keys else keys["connect"][0]
            self.error(where, "bind and connect belong on task roles")
        if len(self.diags) - before > in_children:
            return None  # its own fields are broken (and reported): leave it out
        return role

    def task_ref(self, node: yaml.Node) -> TaskRefDef | None:
        keys = self.mapping(node, "task", _TASK_KEYS)
        if keys is None:
            return None
        if "load" not in keys:
            self.error(node, "task needs load: the name of a task class")
            return None
        load = self.text(keys["load"][1], "task load")
        if load is None:
            return None
        ref = TaskRefDef(load, self.loc(node))
        for key, (_, v) in keys.items():
            if key == "critical":
                ref.critical = self.text(v, "critical")
            elif key == "trigger":
                ref.trigger = self.text(v, "trigger")
            elif key == "await":
                ref.await_ = self.text(v, "await")
            elif key == "timeout":
                ref.timeout = self.text(v, "timeout")
        return ref

    def call(self, node: yaml.Node) -> CallDef | None:
        keys = self.mapping(node, "call", _CALL_KEYS)
        if keys is None:
            return None
        if "func" not in keys:
            self.error(node, "call needs func, e.g. dcs.StartOfRun()")
            return None
        if "trigger" not in keys:
            self.error(node, "call needs a trigger, e.g. before_START_ACTIVITY")
            return None
        func = self.text(keys["func"][1], "call func")
        if func is None:
            return None
        c = CallDef(func, self.loc(node))
        for key, (_, v) in keys.items():
            if key == "trigger":
                c.trigger = self.text(v, "trigger")
            elif key == "await":
                c.await_ = self.text(v, "await")
            elif key == "timeout":
                c.timeout = self.text(v, "timeout")
            elif key == "critical":
                c.critical = self.text(v, "critical")
            elif key == "return":
                c.return_var = self.text(v, "return")
        return c

    def iterator(self, node: yaml.Node) -> ForDef | None:
        keys = self.mapping(node, "for", _FOR_KEYS)
        if keys is None:
            return None
        if "var" not in keys:
            self.error(node, "for needs var: the name of the iterator variable")
            return None
        var = self.name(keys["var"][1], "for var")
        if var is None:
            return None
        has_range = "range" in keys
        has_bounds = "begin" in keys or "end" in keys
        if has_range == has_bounds:
            self.error(node, "for needs either range (a list) or begin and end (integers)")
            return None
        if has_bounds and ("begin" not in keys or "end" not in keys):
            self.error(node, "for needs both begin and end")
            return None
        f = ForDef(var, self.loc(node))
        for key, (_, v) in keys.items():
            if key in ("range", "begin", "end", "nmin"):
                setattr(f, key, self.text(v, f"for {key}"))
        return f

    # -- task classes ----------------------------------------------------------

    def task_class(self, text: str, expected_name: str) -> TaskClassDef | None:
        node = self.compose(text)
        if node is None:
            return None
        keys = self.mapping(node, "a task class", _CLASS_KEYS)
        if keys is None:
            return None
        name = expected_name
        if "name" in keys:
            given = self.name(keys["name"][1], "task class name")
            if given is not None and given != expected_name:
                self.error(
                    keys["name"][1],
                    f"task class is named {given!r} but its file is {expected_name!r}.yaml",
                )
        before = len(self.diags)
        if "command" not in keys:
            self.error(node, "a task class needs a command")
        tc = TaskClassDef(name, self.loc(node), self.file, None)
        for key, (_, v) in keys.items():
            if key == "command":
                tc.command = self.command(v)
            elif key == "control":
                ck = self.mapping(v, "control", ("mode",))
                if ck is not None and "mode" in ck:
                    tc.mode = self.text(ck["mode"][1], "control mode")
            elif key == "defaults":
                tc.defaults = self.var_map(v, "defaults")
            elif key == "vars":
                tc.vars = self.var_map(v, "vars")
            elif key in ("wants", "limits"):
                setattr(tc, key, self.resources(v, key))
            elif key == "bind":
                tc.binds = self.channels(v, "bind")
            elif key == "connect":
                tc.connects = self.channels(v, "connect")
            elif key == "properties":
                if isinstance(v, yaml.ScalarNode) and v.tag == _NULL:
                    continue
                if not isinstance(v, yaml.MappingNode):
                    self.error(v, "properties must be a mapping")
                    continue
                for pk, pv in v.value:
                    t = self.text(pv, f"property {pk.value!r}")
                    if t is not None:
                        tc.properties.append((str(pk.value), t))
            elif key == "health":
                tc.health = self.health(v)
        if len(self.diags) > before:
            return None  # reported; a broken class is not used
        return tc

    def command(self, node: yaml.Node) -> CommandDef | None:
        keys = self.mapping(node, "command", _COMMAND_KEYS)
        if keys is None:
            return None
        if "value" not in keys:
            self.error(node, "command needs value: the program to run")
            return None
        value = self.text(keys["value"][1], "command value")
        if value is None:
            return None
        cmd = CommandDef(value, self.loc(node))
        for key, (_, v) in keys.items():
            if key == "arguments":
                cmd.arguments = self.texts(v, "arguments")
            elif key == "env":
                cmd.env = self.texts(v, "env")
            elif key in ("shell", "user", "cwd"):
                setattr(cmd, key, self.text(v, key))
            # stdout/stderr/log: AliECS logging options, accepted and ignored
        return cmd

    def resources(self, node: yaml.Node, what: str) -> ResourcesDef | None:
        keys = self.mapping(node, what, _RESOURCE_KEYS)
        if keys is None:
            return None
        r = ResourcesDef(self.loc(node))
        for key, (_, v) in keys.items():
            setattr(r, key, self.text(v, f"{what} {key}"))
        return r

    def health(self, node: yaml.Node) -> HealthDef | None:
        keys = self.mapping(node, "health", _HEALTH_KEYS)
        if keys is None:
            return None
        if "command" not in keys:
            self.error(node, "health needs a command")
            return None
        cmd = self.text(keys["command"][1], "health command")
        if cmd is None:
            return None
        h = HealthDef(cmd, self.loc(node))
        for key, (_, v) in keys.items():
            if key == "arguments":
                h.arguments = self.texts(v, "health arguments")
            elif key in ("interval", "timeout", "failures"):
                setattr(h, key, self.text(v, f"health {key}"))
        return h


class _NotPlain(ValueError):
    def __init__(self, message: str, node: yaml.Node) -> None:
        super().__init__(message)
        self.node = node


def _scalar_text(node: yaml.ScalarNode) -> str:
    """A scalar as AliECS sees it: a string; booleans lowercase, null empty."""
    value: str = node.value
    if node.tag == _NULL:
        return ""
    if node.tag == _BOOL and value.lower() in ("true", "false"):
        return value.lower()
    return value


def _plain(node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        if node.tag.startswith("!"):
            raise _NotPlain(f"unknown tag {node.tag!r}", node)
        return _scalar_value(node)
    if isinstance(node, yaml.SequenceNode):
        return [_plain(n) for n in node.value]
    if isinstance(node, yaml.MappingNode):
        return {str(_plain(k)): _plain(v) for k, v in node.value}
    raise _NotPlain("unsupported value", node)  # pragma: no cover


def _scalar_value(node: yaml.ScalarNode) -> Any:
    """A scalar inside a list or map, typed as YAML types it, if JSON can carry it."""
    tag = node.tag.removeprefix("tag:yaml.org,2002:")
    try:
        value = yaml.constructor.SafeConstructor().construct_object(node)
    except Exception:  # PyYAML's constructors fail in several ways on a bad explicit tag
        raise _NotPlain(f"{node.value!r} is not a valid {tag}", node) from None
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, datetime.date):  # dates and timestamps stay as written
        return node.value
    raise _NotPlain(f"a {tag} value cannot be part of a variable", node)


def yaml_problem(e: yaml.MarkedYAMLError, file: str) -> tuple[Loc, str]:
    """Where a YAML syntax error is and what it is, for a person."""
    mark = e.problem_mark or e.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = e.problem or e.context or "invalid YAML"
    ctx = e.context_mark
    if e.context and ctx is not None and e.problem_mark is not None:
        problem += f" ({e.context} started at line {ctx.line + 1}, column {ctx.column + 1})"
    return Loc(file, line, col), f"YAML syntax error: {problem}"


def too_deep(text: str, limit: int = MAX_NESTING) -> tuple[int, int] | None:
    """(line, column) where ``text`` first nests lists and maps deeper than ``limit``.

    Read as a stream of events, before libyaml composes the tree recursively (a deep
    enough tree overflows its stack). Not a complete parse: a syntax error is raised
    here as by ``yaml.compose``.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > limit:
                m = event.start_mark
                return (m.line + 1, m.column + 1) if m is not None else (0, 0)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def _graph_problem(root: yaml.Node) -> tuple[yaml.Node, str] | None:
    """Why a composed file cannot be walked: a recursive alias, nesting too deep through
    aliases, or aliases that repeat too many values. Iterative, linear in the nodes."""
    cap = 1 << 40
    size: dict[int, int] = {}  # values below a node once aliases are expanded
    depth: dict[int, int] = {}
    distinct = 0
    on_path: set[int] = set()
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    while todo:
        node, done = todo.pop()
        key = id(node)
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = node.value
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            size[key] = min(cap, 1 + sum(size[id(k)] for k in kids))
            depth[key] = 0
            if isinstance(node, yaml.CollectionNode):
                depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if depth[key] > MAX_NESTING:
                return node, f"lists and maps nest more than {MAX_NESTING} levels deep"
            if size[key] - distinct > MAX_ALIAS_EXPANSION:
                return node, (
                    f"YAML aliases repeat more than {MAX_ALIAS_EXPANSION} values here; "
                    "write them out or use a variable"
                )
            continue
        if key in size:
            continue
        if key in on_path:
            return node, "a YAML alias refers to a list or map that contains it"
        on_path.add(key)
        distinct += 1
        todo.append((node, True))
        todo.extend((k, False) for k in kids if id(k) not in size)
    return None


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}"


def _offset_loc(loc: Loc, node: yaml.Node, raw: str, offset: int) -> Loc:
    """Point into a one-line scalar at ``offset``; multi-line scalars keep their start."""
    if not isinstance(node, yaml.ScalarNode) or "\n" in raw[:offset]:
        return loc
    style = node.style
    if style in ("|", ">"):
        return loc
    quote = 1 if style in ("'", '"') else 0
    return loc.shifted(offset + quote)
