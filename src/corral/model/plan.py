"""The plan: what a workflow template expands to for given variables. Pure data.

Records are frozen, slotted dataclasses so that a 150,000-task plan stays compact;
identical sub-records (a resolved command, a constraint tuple) are shared between
tasks by the expander rather than copied. ``Plan.to_dict()`` gives the stable,
JSON-ready form that ``corral template render -o json`` prints: the same plan always
serializes to the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.model.vocabulary import Trigger

JSON = dict[str, Any]


# Where a task's host name goes when placement, after expansion, chooses it: the control
# plane puts the node's name there at launch (``task_hostname`` of a task not pinned to
# one host by a machine_id/hostname constraint).
HOST_PLACEHOLDER = "\ue002task_hostname\ue003"


@dataclass(frozen=True, slots=True)
class Resources:
    """Resources a task wants (or is limited to). memory in MB."""

    cpu: float = 0.0
    memory: int = 0
    gpu: int = 0
    ports: int = 0

    def to_dict(self) -> JSON:
        return {"cpu": self.cpu, "memory": self.memory, "gpu": self.gpu, "ports": self.ports}


NO_RESOURCES = Resources()


@dataclass(frozen=True, slots=True)
class Command:
    """How to start the process: an argument vector unless ``shell`` is true."""

    value: str
    arguments: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    shell: bool = False
    user: str | None = None
    cwd: str | None = None

    def to_dict(self) -> JSON:
        return {
            "value": self.value,
            "arguments": list(self.arguments),
            "env": dict(self.env),
            "shell": self.shell,
            "user": self.user,
            "cwd": self.cwd,
        }


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A periodic command whose non-zero exit marks a long-running basic task unhealthy."""

    command: tuple[str, ...]
    interval: float
    timeout: float
    failures: int

    def to_dict(self) -> JSON:
        return {
            "command": list(self.command),
            "interval": self.interval,
            "timeout": self.timeout,
            "failures": self.failures,
        }


@dataclass(frozen=True, slots=True)
class Constraint:
    """A placement rule on a node attribute: equals, regex, or in (comma list)."""

    attribute: str
    value: str
    operator: str = "equals"

    def to_dict(self) -> JSON:
        return {"attribute": self.attribute, "operator": self.operator, "value": self.value}


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One process of the environment, fully resolved except its node and ports."""

    path: str
    task_class: str
    command: Command
    control: str  # direct | fairmq | basic | hook
    critical: bool
    wants: Resources
    limits: Resources | None
    constraints: tuple[Constraint, ...]
    properties: tuple[tuple[str, str], ...]
    trigger: Trigger | None = None
    await_: Trigger | None = None
    timeout: float | None = None
    health: HealthCheck | None = None
    collection: str | None = None

    def to_dict(self) -> JSON:
        return {
            "path": self.path,
            "class": self.task_class,
            "command": self.command.to_dict(),
            "control": self.control,
            "critical": self.critical,
            "wants": self.wants.to_dict(),
            "limits": None if self.limits is None else self.limits.to_dict(),
            "constraints": [c.to_dict() for c in self.constraints],
            "properties": dict(self.properties),
            "trigger": None if self.trigger is None else str(self.trigger),
            "await": None if self.await_ is None else str(self.await_),
            "timeout": self.timeout,
            "health": None if self.health is None else self.health.to_dict(),
            "collection": self.collection,
        }


@dataclass(frozen=True, slots=True)
class CallSpec:
    """An integrated-service call ordered around a transition."""

    path: str
    func: str
    trigger: Trigger
    await_: Trigger
    timeout: float
    critical: bool
    return_var: str | None = None
    # variables the call's process reads callers' values from (``exec.Shell``)
    env: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> JSON:
        out: JSON = {
            "path": self.path,
            "func": self.func,
            "trigger": str(self.trigger),
            "await": str(self.await_),
            "timeout": self.timeout,
            "critical": self.critical,
            "return": self.return_var,
        }
        if self.env:
            out["env"] = dict(self.env)
        return out


@dataclass(frozen=True, slots=True)
class Bind:
    """A channel a task listens on. Its address is chosen at placement."""

    task: str
    name: str
    type: str  # push | pull | pub | sub
    transport: str
    addressing: str  # tcp | ipc
    global_alias: str | None
    properties: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> JSON:
        return {
            "task": self.task,
            "name": self.name,
            "type": self.type,
            "transport": self.transport,
            "addressing": self.addressing,
            "global": self.global_alias,
            "properties": dict(self.properties),
        }


@dataclass(frozen=True, slots=True)
class Connect:
    """A channel a task connects: to a bind of the plan, or to a literal address."""

    task: str
    name: str
    type: str
    target: str  # as written after expansion
    bind_task: str | None  # the task that binds, when the target is in the plan
    bind_name: str | None
    address: str | None  # the literal tcp:// or ipc:// address otherwise
    transport: str
    properties: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> JSON:
        return {
            "task": self.task,
            "name": self.name,
            "type": self.type,
            "target": self.target,
            "bind": None
            if self.bind_task is None
            else {"task": self.bind_task, "name": self.bind_name},
            "address": self.address,
            "transport": self.transport,
            "properties": dict(self.properties),
        }


@dataclass(frozen=True, slots=True)
class Collection:
    """The instances of an iterator role: at least ``nmin`` must stay healthy."""

    path: str
    nmin: int
    members: tuple[str, ...]

    def to_dict(self) -> JSON:
        return {"path": self.path, "nmin": self.nmin, "members": list(self.members)}


@dataclass(frozen=True, slots=True)
class PublicVar:
    """A variable a user interface offers (from the ``!public`` tag)."""

    name: str
    value: str
    type: str = "string"
    label: str | None = None
    description: str | None = None
    widget: str | None = None
    values: tuple[str, ...] = ()
    panel: str | None = None
    index: int | None = None
    visible_if: str | None = None
    rows: int | None = None  # the height of an editBox, in lines

    def to_dict(self) -> JSON:
        return {
            "name": self.name,
            "value": self.value,
            "type": self.type,
            "label": self.label,
            "description": self.description,
            "widget": self.widget,
            "values": list(self.values),
            "panel": self.panel,
            "index": self.index,
            "visibleif": self.visible_if,
            "rows": self.rows,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """A whole expanded workflow. ``tasks`` and ``calls`` are in template order."""

    name: str
    description: str
    seed: str
    variables: Mapping[str, str]  # the user variables the plan was expanded with
    tasks: tuple[TaskSpec, ...]
    calls: tuple[CallSpec, ...]
    binds: tuple[Bind, ...]
    connects: tuple[Connect, ...]
    collections: tuple[Collection, ...] = ()
    public: tuple[PublicVar, ...] = ()
    files: tuple[str, ...] = field(default=())
    # what a site function answered with an error value, as AliECS does ("FILE:LINE:COL:
    # message (role)"): the expansion went on with it, a person should see it
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> JSON:
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "variables": dict(sorted(self.variables.items())),
            "files": list(self.files),
            "warnings": list(self.warnings),
            "public": [p.to_dict() for p in self.public],
            "tasks": [t.to_dict() for t in self.tasks],
            "calls": [c.to_dict() for c in self.calls],
            "channels": {
                "binds": [b.to_dict() for b in self.binds],
                "connects": [c.to_dict() for c in self.connects],
            },
            "collections": [c.to_dict() for c in self.collections],
        }
