"""Job specifications: one YAML file is one job of a kind (docs/jobs.md).

Four kinds, chosen by the file's ``kind:`` field: ``service`` (replicas that should
always run), ``batch`` (runs to completion, retried), ``dag`` (batch steps with
dependencies) and ``periodic`` (a batch job or DAG on a cron schedule). Reading a file
checks everything that can be checked without running it, and reports every problem
of the file as ``FILE:LINE:COL: message``, not only the first.

Pure: text in, frozen values and diagnostics out. No file is opened here; a periodic
job that names its job by file is returned with that name (``PeriodicSpec.job_file``)
for the caller to read.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeAlias

import yaml

from corral.jobs.cron import CronError, Schedule
from corral.model.durations import parse_duration
from corral.model.plan import NO_RESOURCES, Command, Constraint, Resources
from corral.model.regex import regex_error
from corral.templates.diagnostics import Diagnostic, Loc
from corral.templates.schema import too_deep, yaml_problem

try:  # the C loader is ~10x faster; fall back where libyaml is missing
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

KINDS = ("service", "batch", "dag", "periodic")
MAX_FILE_BYTES = 16 * 1024 * 1024  # a DAG of 100,000 steps fits
MAX_NESTING = 64  # lists and maps; the schema itself needs fewer than 10
MAX_REPLICAS = 10_000
MAX_ARRAY = 1_000_000
MAX_STEPS = 100_000
MAX_STRING = 64 * 1024  # one value (a command, an argument, an env entry)
MAX_LIST = 100_000  # arguments, env, inputs, outputs, needs, exit codes, constraints
MAX_DURATION = 366 * 24 * 3600.0  # a year
MAX_RETRIES = 1_000
MAX_SECRETS = 100  # secrets one job declares
DEFAULT_PRIORITY_CLASS = "batch"
FAILURE_POLICIES = ("stop", "continue")
OVERLAP_POLICIES = ("skip", "queue", "replace")
MISSED_POLICIES = ("skip", "run-once")
HEALTH_KINDS = ("http", "tcp", "exec")
CONSTRAINT_OPERATORS = ("equals", "regex", "in")
CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOLE = re.compile(r"\{\{(.*?)\}\}", re.S)
_INT = re.compile(r"[+]?[0-9][0-9_]{0,19}")

_TAG = "tag:yaml.org,2002:"
_STR, _INT_TAG, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_PLAIN_TAGS = frozenset(
    {_STR, _INT_TAG, _FLOAT, _BOOL, _NULL, _TAG + "timestamp", _TAG + "seq", _TAG + "map"}
)


NOWHERE = Loc("")  # a place not known (yet)


# ---------------------------------------------------------------------------
# Specifications
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a job's instances may run and how they rank: the same for every kind."""

    wants: Resources = NO_RESOURCES
    constraints: tuple[Constraint, ...] = ()
    pool: str | None = None
    priority_class: str = DEFAULT_PRIORITY_CLASS


@dataclass(frozen=True, slots=True)
class HealthCheck:
    kind: Literal["http", "tcp", "exec"]
    port: int | None = None  # http, tcp; None: the replica's first placed port
    path: str = "/"  # http
    command: Command | None = None  # exec
    interval: float = 10.0
    timeout: float = 2.0
    threshold: int = 3  # consecutive failures that make a replica unhealthy


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Exponential backoff: initial, initial*factor, ... up to max; ``crash_loop``
    restarts in a row that each ran less than ``reset_after`` make a crash loop."""

    initial: float = 1.0
    max: float = 300.0
    factor: float = 2.0
    crash_loop: int = 5
    reset_after: float = 60.0


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    max_parallel: int = 1
    health_gated: bool = True
    healthy_for: float = 10.0
    deadline: float = 300.0
    auto_rollback: bool = True


@dataclass(frozen=True, slots=True)
class Retries:
    """``count`` more tries after a failure, ``backoff`` doubling up to ``max_backoff``."""

    count: int = 0
    backoff: float = 10.0
    max_backoff: float = 300.0


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A secret a job declares (docs/secrets.md): a file named as the secret in the
    job's private secrets directory, or, when ``env`` is given, that variable only."""

    name: str
    env: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    kind: ClassVar[str] = "service"
    name: str
    loc: Loc
    command: Command
    description: str = ""
    placement: Placement = Placement()
    replicas: int = 1
    health: tuple[HealthCheck, ...] = ()
    restart: RestartPolicy = RestartPolicy()
    update: UpdatePolicy = UpdatePolicy()
    sticky_cache: str | None = None  # prefer the node that holds this directory
    protected: bool = False  # never preempted
    secrets: tuple[SecretRef, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchSpec:
    kind: ClassVar[str] = "batch"
    name: str
    loc: Loc
    command: Command
    description: str = ""
    placement: Placement = Placement()
    retries: Retries = Retries()
    success_exit_codes: tuple[int, ...] = (0,)
    deadline: float | None = None
    array: int | None = None  # N instances, {{ index }} = 0 .. N-1
    secrets: tuple[SecretRef, ...] = ()


@dataclass(frozen=True, slots=True)
class DagStep:
    name: str
    loc: Loc
    command: Command
    needs: tuple[str, ...] = ()  # as written, then those implied by inputs
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    wants: Resources = NO_RESOURCES
    retries: Retries = Retries()
    success_exit_codes: tuple[int, ...] = (0,)
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class DagSpec:
    kind: ClassVar[str] = "dag"
    name: str
    loc: Loc
    steps: tuple[DagStep, ...]
    description: str = ""
    placement: Placement = Placement()
    failure: Literal["stop", "continue"] = "stop"
    secrets: tuple[SecretRef, ...] = ()  # every step's


@dataclass(frozen=True, slots=True)
class PeriodicSpec:
    kind: ClassVar[str] = "periodic"
    name: str
    loc: Loc
    schedule: str
    job: BatchSpec | DagSpec | None  # inline; None when given by file
    job_file: str | None = None  # relative to the periodic job's file
    job_loc: Loc = NOWHERE
    description: str = ""
    timezone: str = "UTC"
    overlap: Literal["skip", "queue", "replace"] = "skip"
    missed: Literal["skip", "run-once"] = "skip"


JobSpec: TypeAlias = ServiceSpec | BatchSpec | DagSpec | PeriodicSpec


def describe(spec: JobSpec) -> str:
    """A one-line summary, as ``corral job validate`` prints it."""
    if isinstance(spec, ServiceSpec):
        checks = ", ".join(h.kind for h in spec.health) or "no"
        extra = ", protected" if spec.protected else ""
        return f"service {spec.name}: {spec.replicas} replica(s), {checks} health check(s){extra}"
    if isinstance(spec, BatchSpec):
        array = f", array of {spec.array}" if spec.array is not None else ""
        return f"batch {spec.name}: {spec.retries.count} retries{array}"
    if isinstance(spec, DagSpec):
        return f"dag {spec.name}: {len(spec.steps)} step(s), on failure {spec.failure}"
    what = spec.job_file if spec.job is None else f"{spec.job.kind} {spec.job.name}"
    return f"periodic {spec.name}: {spec.schedule!r} ({spec.timezone}) runs {what}"


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def load_job(path: str, text: str | bytes) -> tuple[JobSpec | None, list[Diagnostic]]:
    """The job a file declares, or None; and every problem found, sorted by place."""
    reader = _Reader(path)
    # Composing and reading a large file allocates millions of small objects; the cyclic
    # collector would rescan the growing heap again and again (22 s instead of 5.5 s for
    # 100,000 steps). What is built here is collected once, at the end.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        spec = reader.read(text)
    finally:
        if was_enabled:
            gc.enable()
    diags = reader.diagnostics()
    return (spec if not diags else None), diags


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a cron schedule corral runs, or None (``jobs.cron``)."""
    try:
        Schedule.parse(expr, "UTC")
    except CronError as e:
        return str(e)
    return None


def timezone_problem(name: str) -> str | None:
    """Why ``name`` is not an IANA time zone, or None (``jobs.cron``)."""
    try:
        Schedule.parse("@daily", name)
    except CronError as e:
        return str(e)
    return None


_COMMON_KEYS = (
    "kind", "name", "description", "wants", "constraints", "pool", "priority_class", "secrets",
)  # fmt: skip
_SERVICE_KEYS = (
    *_COMMON_KEYS, "command", "replicas", "health", "restart", "update", "sticky", "protected",
)  # fmt: skip
_BATCH_KEYS = (
    *_COMMON_KEYS, "command", "retries", "success_exit_codes", "deadline", "array",
)  # fmt: skip
_DAG_KEYS = (*_COMMON_KEYS, "steps", "failure")
_PERIODIC_KEYS = ("kind", "name", "description", "schedule", "timezone", "overlap", "missed", "job")
_STEP_KEYS = (
    "name", "command", "needs", "inputs", "outputs", "wants", "retries",
    "success_exit_codes", "deadline",
)  # fmt: skip
_COMMAND_KEYS = ("value", "arguments", "env", "shell", "user", "cwd")
_RESOURCE_KEYS = ("cpu", "memory", "gpu", "ports")
_CONSTRAINT_KEYS = ("attribute", "value", "operator")
_HEALTH_KEYS = ("http", "tcp", "exec", "interval", "timeout", "threshold")
_HTTP_KEYS = ("port", "path")
_TCP_KEYS = ("port",)
_RESTART_KEYS = ("initial", "max", "factor", "crash_loop", "reset_after")
_UPDATE_KEYS = ("max_parallel", "health_gated", "healthy_for", "deadline", "auto_rollback")
_RETRY_KEYS = ("count", "backoff", "max_backoff")
_STICKY_KEYS = ("cache_dir",)
_SECRET_KEYS = ("name", "env")

_Keys: TypeAlias = dict[str, tuple[yaml.Node, yaml.Node]]


@dataclass(slots=True)
class _RawStep:
    """A step as read, its references still with their places."""

    name: str
    name_node: yaml.Node
    loc: Loc
    command: Command
    needs: list[tuple[str, yaml.Node]]
    inputs: list[tuple[str, yaml.Node]]
    outputs: list[tuple[str, yaml.Node]]
    wants: Resources
    retries: Retries
    success_exit_codes: tuple[int, ...]
    deadline: float | None


class _Bad(Exception):
    """A value was wrong, and said so; the field keeps its default."""


class _Reader:
    def __init__(self, file: str) -> None:
        self.file = file
        self._diags: dict[tuple[Loc, str], None] = {}
        self.holes_allowed: frozenset[str] = frozenset()
        self.placed_ports = 0  # ports a service's replica is given (a check may use them)

    # -- plumbing -------------------------------------------------------------

    def diagnostics(self) -> list[Diagnostic]:
        return sorted((Diagnostic(loc, msg) for loc, msg in self._diags), key=lambda d: d.loc)

    def loc(self, node: yaml.Node) -> Loc:
        m = node.start_mark
        return Loc(self.file, m.line + 1, m.column + 1)

    def error(self, where: yaml.Node | Loc, message: str) -> None:
        loc = where if isinstance(where, Loc) else self.loc(where)
        self._diags.setdefault((loc, message), None)

    def bad(self, where: yaml.Node | Loc, message: str) -> _Bad:
        self.error(where, message)
        return _Bad()

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> _Keys:
        if not isinstance(node, yaml.MappingNode):
            raise self.bad(node, f"{what} must be a mapping, not {_kind(node)}")
        out: _Keys = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.error(k, f"{what}: keys must be plain names")
                continue
            key = k.value
            if key in out:
                self.error(k, f"{what}: duplicate key {key!r}")
            elif key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                self.error(k, f"unknown field {key!r} in {what}{extra}")
            else:
                out[key] = (k, v)
        return out

    def field(self, keys: _Keys, key: str, read: Callable[[yaml.Node, str], object]) -> object:
        """``read(value, key)`` if the key is there and its value good, else None."""
        if key not in keys:
            return None
        try:
            return read(keys[key][1], key)
        except _Bad:
            return None

    def scalar(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.bad(node, f"{what} must be a single value, not {_kind(node)}")
        if len(node.value) > MAX_STRING:
            raise self.bad(node, f"{what} is longer than {MAX_STRING} characters")
        return "" if node.tag == _NULL else str(node.value)

    def string(self, node: yaml.Node, what: str) -> str:
        s = self.scalar(node, what)
        if "\0" in s:
            raise self.bad(node, f"{what} must not contain a NUL character")
        self.check_holes(node, s, what)
        return s

    def nonempty(self, node: yaml.Node, what: str) -> str:
        s = self.string(node, what)
        if not s.strip():
            raise self.bad(node, f"{what} must not be empty")
        return s

    def name(self, node: yaml.Node, what: str) -> str:
        s = self.scalar(node, what)
        if not _NAME.fullmatch(s):
            raise self.bad(
                node,
                f"{what} {s!r} is not a name: letters, digits, '_', '.' and '-', "
                "starting with a letter or digit, at most 100 characters",
            )
        return s

    def choice(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> str:
        s = self.scalar(node, what)
        if s not in allowed:
            hint = difflib.get_close_matches(s, allowed, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise self.bad(node, f"{what} {s!r} is not one of {', '.join(allowed)}{extra}")
        return s

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int:
        s = self.scalar(node, what)
        if node.tag not in (_INT_TAG, _STR) or not _INT.fullmatch(s):
            raise self.bad(node, f"{what} must be a whole number, not {s!r}")
        n = int(s.replace("_", ""))
        if not low <= n <= high:
            raise self.bad(node, f"{what} must be between {low:,} and {high:,}, not {n:,}")
        return n

    def number(self, node: yaml.Node, what: str, high: float) -> float:
        s = self.scalar(node, what)
        try:
            x = float(s.replace("_", ""))
        except ValueError:
            raise self.bad(node, f"{what} must be a number, not {s!r}") from None
        if not 0 <= x <= high:  # also NaN
            raise self.bad(node, f"{what} must be between 0 and {high:g}, not {s}")
        return x

    def boolean(self, node: yaml.Node, what: str) -> bool:
        s = self.scalar(node, what)
        if node.tag != _BOOL:
            raise self.bad(node, f"{what} must be true or false, not {s!r}")
        return s.lower() in ("true", "yes", "on", "y")

    def duration(self, node: yaml.Node, what: str, *, positive: bool = True) -> float:
        s = self.scalar(node, what)
        try:
            d = parse_duration(s)
        except ValueError as e:
            raise self.bad(node, f"{what}: {e}") from None
        if positive and d <= 0:
            raise self.bad(node, f"{what} must be more than 0")
        if d > MAX_DURATION:
            raise self.bad(node, f"{what} must be at most a year ({MAX_DURATION:g}s), not {s}")
        return d

    def seq(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.bad(node, f"{what} must be a list, not {_kind(node)}")
        if len(node.value) > MAX_LIST:
            raise self.bad(node, f"{what} has more than {MAX_LIST:,} entries")
        return list(node.value)

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        out = []
        for item in self.seq(node, what):
            with contextlib.suppress(_Bad):
                out.append(self.string(item, f"an entry of {what}"))
        return tuple(out)

    def check_holes(self, node: yaml.Node, s: str, what: str) -> None:
        """``{{ index }}`` where an array job allows it; nothing else is expanded."""
        if "{{" not in s:
            return
        for m in _HOLE.finditer(s):
            word = m.group(1).strip()
            where = _offset_loc(self.loc(node), node, s, m.start())
            if word in self.holes_allowed:
                continue
            if word == "index":
                self.error(where, f"{what}: {{{{ index }}}} is only known in an array job")
            else:
                self.error(
                    where,
                    f"{what}: unknown placeholder {m.group(0)!r}; a job's command may use "
                    "{{ index }} in an array job, nothing else",
                )
        rest = _HOLE.sub("", s)
        if "{{" in rest:
            self.error(node, f"{what}: '{{{{' without a closing '}}}}'")

    # -- the file ----------------------------------------------------------------

    def read(self, text: str | bytes) -> JobSpec | None:
        root = self.compose(text)
        if root is None:
            return None
        try:
            return self.job(root, top=True)
        except _Bad:
            return None

    def compose(self, text: str | bytes) -> yaml.Node | None:
        whole = Loc(self.file, 1, 1)
        size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
        if size > MAX_FILE_BYTES:
            self.error(whole, f"the file is larger than {MAX_FILE_BYTES:,} bytes ({size:,})")
            return None
        if isinstance(text, bytes):
            data = text
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data.count(b"\n", 0, e.start) + 1
                col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
                self.error(
                    Loc(self.file, line, col),
                    f"the file is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}",
                )
                return None
        text = text.removeprefix("\ufeff")
        try:
            deep = too_deep(text, MAX_NESTING)
            if deep is not None:
                message = f"lists and maps nest more than {MAX_NESTING} levels deep"
                self.error(Loc(self.file, *deep), message)
                return None
            node = yaml.compose(text, Loader=_Loader)
        except yaml.MarkedYAMLError as e:
            self.error(*yaml_problem(e, self.file))
            return None
        except (yaml.YAMLError, ValueError) as e:  # the C reader's own complaints
            self.error(whole, f"YAML error: {e}")
            return None
        if node is None:
            self.error(whole, "the file is empty: a job file declares one job")
            return None
        for bad in _foreign_tags(node):
            self.error(bad, f"YAML tag {bad.tag!r} is not allowed in a job file")
        if self._diags:
            return None
        return node

    def job(self, node: yaml.Node, *, top: bool, default_name: str = "") -> JobSpec:
        if not isinstance(node, yaml.MappingNode):
            raise self.bad(node, f"a job must be a mapping, not {_kind(node)}")
        kind_node = next(
            (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == "kind"),
            None,
        )
        allowed = KINDS if top else ("batch", "dag")
        if kind_node is None:
            raise self.bad(node, f"a job needs kind: one of {', '.join(allowed)}")
        kind = self.choice(kind_node, "kind", allowed)
        keys = self.mapping(
            node,
            f"a {kind} job",
            {"service": _SERVICE_KEYS, "batch": _BATCH_KEYS, "dag": _DAG_KEYS}.get(
                kind, _PERIODIC_KEYS
            ),
        )
        name = default_name
        if "name" in keys:
            given = self.field(keys, "name", self.name)
            name = given if isinstance(given, str) else ""
        elif top or not default_name:
            self.error(node, f"a {kind} job needs a name")
        loc = self.loc(node)
        description = self.field(keys, "description", self.string) or ""
        assert isinstance(description, str)
        if kind == "service":
            return self.service(node, keys, name, loc, description)
        if kind == "batch":
            return self.batch(node, keys, name, loc, description)
        if kind == "dag":
            return self.dag(node, keys, name, loc, description)
        return self.periodic(node, keys, name, loc, description)

    # -- parts ---------------------------------------------------------------------

    def command(self, node: yaml.Node, what: str = "command") -> Command:
        keys = self.mapping(node, what, _COMMAND_KEYS)
        if "value" not in keys:
            raise self.bad(node, f"{what} needs value: the program to run")
        value = self.field(keys, "value", lambda n, _: self.nonempty(n, f"{what} value"))
        arguments = self.field(keys, "arguments", lambda n, _: self.strings(n, "arguments"))
        env: list[tuple[str, str]] = []
        if "env" in keys:
            try:
                entries = self.seq(keys["env"][1], "env")
            except _Bad:
                entries = []
            for item in entries:
                try:
                    entry = self.string(item, "an env entry")
                except _Bad:
                    continue
                k, eq, v = entry.partition("=")
                if not eq or not _ENV_NAME.fullmatch(k):
                    self.error(item, f"env entry {entry!r} must be NAME=VALUE")
                else:
                    env.append((k, v))
        shell = self.field(keys, "shell", self.boolean)
        user = self.field(keys, "user", self.nonempty)
        cwd = self.field(keys, "cwd", self.nonempty)
        if not isinstance(value, str):
            raise _Bad()
        return Command(
            value,
            arguments if isinstance(arguments, tuple) else (),
            tuple(env),
            shell is True,
            user if isinstance(user, str) else None,
            cwd if isinstance(cwd, str) else None,
        )

    def resources(self, node: yaml.Node, what: str) -> Resources:
        keys = self.mapping(node, what, _RESOURCE_KEYS)
        cpu = self.field(keys, "cpu", lambda n, k: self.number(n, f"{what} {k}", 1e6))
        memory = self.field(keys, "memory", lambda n, k: self.number(n, f"{what} {k}", 1e12))
        gpu = self.field(keys, "gpu", lambda n, k: self.integer(n, f"{what} {k}", 0, 1024))
        ports = self.field(keys, "ports", lambda n, k: self.integer(n, f"{what} {k}", 0, 1024))
        return Resources(
            float(cpu) if isinstance(cpu, float) else 0.0,
            int(memory) if isinstance(memory, float) else 0,
            gpu if isinstance(gpu, int) else 0,
            ports if isinstance(ports, int) else 0,
        )

    def constraints(self, node: yaml.Node, _what: str) -> tuple[Constraint, ...]:
        out = []
        for item in self.seq(node, "constraints"):
            try:
                keys = self.mapping(item, "a constraint", _CONSTRAINT_KEYS)
            except _Bad:
                continue
            if "attribute" not in keys or "value" not in keys:
                self.error(item, "a constraint needs an attribute and a value")
                continue
            attr = self.field(keys, "attribute", lambda n, _: self.nonempty(n, "attribute"))
            value = self.field(keys, "value", lambda n, _: self.string(n, "constraint value"))
            op = self.field(
                keys, "operator", lambda n, _: self.choice(n, "operator", CONSTRAINT_OPERATORS)
            )
            if op == "regex" and isinstance(value, str):
                why = regex_error(value)
                if why is not None:
                    self.error(keys["value"][1], f"constraint regex {value!r}: {why}")
                    continue
            if isinstance(attr, str) and isinstance(value, str):
                out.append(Constraint(attr, value, op if isinstance(op, str) else "equals"))
        return tuple(out)

    def placement(self, keys: _Keys) -> Placement:
        wants = self.field(keys, "wants", self.resources)
        constraints = self.field(keys, "constraints", self.constraints)
        pool = self.field(keys, "pool", self.name)
        pclass = self.field(keys, "priority_class", self.name)
        return Placement(
            wants if isinstance(wants, Resources) else Resources(),
            constraints if isinstance(constraints, tuple) else (),
            pool if isinstance(pool, str) else None,
            pclass if isinstance(pclass, str) else DEFAULT_PRIORITY_CLASS,
        )

    def retries(self, node: yaml.Node, _what: str) -> Retries:
        keys = self.mapping(node, "retries", _RETRY_KEYS)
        count = self.field(
            keys, "count", lambda n, _: self.integer(n, "retries count", 0, MAX_RETRIES)
        )
        backoff = self.field(keys, "backoff", lambda n, _: self.duration(n, "retries backoff"))
        top = self.field(keys, "max_backoff", lambda n, _: self.duration(n, "retries max_backoff"))
        d = Retries()
        first = backoff if isinstance(backoff, float) else d.backoff
        out = Retries(
            count if isinstance(count, int) else d.count,
            first,
            top if isinstance(top, float) else max(d.max_backoff, first),
        )
        if out.max_backoff < out.backoff:
            self.error(keys["max_backoff"][1] if "max_backoff" in keys else node,
                       "retries max_backoff must not be less than backoff")  # fmt: skip
        return out

    def exit_codes(self, node: yaml.Node, what: str) -> tuple[int, ...]:
        codes = []
        for item in self.seq(node, what):
            with contextlib.suppress(_Bad):
                codes.append(self.integer(item, f"an exit code in {what}", 0, 255))
        if not codes:
            raise self.bad(node, f"{what} must name at least one exit code")
        return tuple(sorted(set(codes)))

    # -- kinds ---------------------------------------------------------------------

    def service(
        self, node: yaml.Node, keys: _Keys, name: str, loc: Loc, description: str
    ) -> ServiceSpec:
        if "command" not in keys:
            self.error(node, "a service job needs a command")
        command = self.field(keys, "command", self.command)
        placement = self.placement(keys)
        replicas = self.field(keys, "replicas", lambda n, k: self.integer(n, k, 0, MAX_REPLICAS))
        self.placed_ports = placement.wants.ports
        health = self.field(keys, "health", self.health_checks)
        restart = self.field(keys, "restart", self.restart)
        update = self.field(keys, "update", self.update)
        sticky = self.field(keys, "sticky", self.sticky)
        protected = self.field(keys, "protected", self.boolean)
        secrets = self.job_secrets(keys, [command])
        if not isinstance(command, Command):
            raise _Bad()
        return ServiceSpec(
            name, loc, command, description, placement,
            replicas if isinstance(replicas, int) else 1,
            health if isinstance(health, tuple) else (),
            restart if isinstance(restart, RestartPolicy) else RestartPolicy(),
            update if isinstance(update, UpdatePolicy) else UpdatePolicy(),
            sticky if isinstance(sticky, str) else None,
            protected is True,
            secrets,
        )  # fmt: skip

    def health_checks(self, node: yaml.Node, _what: str) -> tuple[HealthCheck, ...]:
        items = [node] if isinstance(node, yaml.MappingNode) else self.seq(node, "health")
        out = []
        for item in items:
            with contextlib.suppress(_Bad):
                out.append(self.health_check(item))
        return tuple(out)

    def health_check(self, node: yaml.Node) -> HealthCheck:
        keys = self.mapping(node, "a health check", _HEALTH_KEYS)
        kinds = [k for k in HEALTH_KINDS if k in keys]
        if len(kinds) != 1:
            where = keys[kinds[1]][0] if len(kinds) > 1 else node
            found = f"; found {' and '.join(kinds)}" if kinds else ""
            raise self.bad(where, f"a health check has exactly one of http, tcp, exec{found}")
        kind = kinds[0]
        port: int | None = None
        path = "/"
        command: Command | None = None
        body = keys[kind][1]
        if kind == "exec":
            command = self.command(body, "exec")
        else:
            sub = self.mapping(body, kind, _HTTP_KEYS if kind == "http" else _TCP_KEYS)
            if "port" in sub:
                port = self.integer(sub["port"][1], f"{kind} port", 1, 65535)
            elif not self.placed_ports:
                raise self.bad(
                    body,
                    f"a {kind} health check needs a port, or the service wants ports "
                    "(wants: {ports: 1}): then it checks each replica's first port",
                )
            if "path" in sub:
                path = self.nonempty(sub["path"][1], "http path")
                if not path.startswith("/"):
                    raise self.bad(sub["path"][1], f"http path {path!r} must start with '/'")
        d = HealthCheck("http")
        interval = self.field(keys, "interval", self.duration)
        timeout = self.field(keys, "timeout", self.duration)
        threshold = self.field(keys, "threshold", lambda n, k: self.integer(n, k, 1, 1000))
        check = HealthCheck(
            "http" if kind == "http" else "tcp" if kind == "tcp" else "exec",
            port, path, command,
            interval if isinstance(interval, float) else d.interval,
            timeout if isinstance(timeout, float) else d.timeout,
            threshold if isinstance(threshold, int) else d.threshold,
        )  # fmt: skip
        if check.timeout > check.interval:
            where = keys["timeout"][1] if "timeout" in keys else node
            self.error(
                where,
                f"health timeout ({check.timeout:g}s) must not be longer than its "
                f"interval ({check.interval:g}s)",
            )
        return check

    def restart(self, node: yaml.Node, _what: str) -> RestartPolicy:
        keys = self.mapping(node, "restart", _RESTART_KEYS)
        d = RestartPolicy()
        initial = self.field(keys, "initial", lambda n, k: self.duration(n, f"restart {k}"))
        top = self.field(keys, "max", lambda n, k: self.duration(n, f"restart {k}"))
        factor = self.field(keys, "factor", lambda n, k: self.number(n, f"restart {k}", 100))
        loop = self.field(keys, "crash_loop", lambda n, k: self.integer(n, f"restart {k}", 1, 1000))
        reset = self.field(keys, "reset_after", lambda n, k: self.duration(n, f"restart {k}"))
        if isinstance(factor, float) and factor < 1:
            self.error(keys["factor"][1], "restart factor must be at least 1")
        first = initial if isinstance(initial, float) else d.initial
        p = RestartPolicy(
            first,
            top if isinstance(top, float) else max(d.max, first),
            factor if isinstance(factor, float) and factor >= 1 else d.factor,
            loop if isinstance(loop, int) else d.crash_loop,
            reset if isinstance(reset, float) else d.reset_after,
        )
        if p.max < p.initial:
            self.error(keys["max"][1], "restart max must not be less than initial")
        return p

    def update(self, node: yaml.Node, _what: str) -> UpdatePolicy:
        keys = self.mapping(node, "update", _UPDATE_KEYS)
        d = UpdatePolicy()
        par = self.field(
            keys, "max_parallel", lambda n, k: self.integer(n, f"update {k}", 1, MAX_REPLICAS)
        )
        gated = self.field(keys, "health_gated", self.boolean)
        healthy = self.field(keys, "healthy_for", lambda n, k: self.duration(n, f"update {k}"))
        deadline = self.field(keys, "deadline", lambda n, k: self.duration(n, f"update {k}"))
        rollback = self.field(keys, "auto_rollback", self.boolean)
        return UpdatePolicy(
            par if isinstance(par, int) else d.max_parallel,
            gated if isinstance(gated, bool) else d.health_gated,
            healthy if isinstance(healthy, float) else d.healthy_for,
            deadline if isinstance(deadline, float) else d.deadline,
            rollback if isinstance(rollback, bool) else d.auto_rollback,
        )

    def sticky(self, node: yaml.Node, _what: str) -> str:
        keys = self.mapping(node, "sticky", _STICKY_KEYS)
        if "cache_dir" not in keys:
            raise self.bad(node, "sticky needs cache_dir: the directory that makes a node sticky")
        d = self.nonempty(keys["cache_dir"][1], "sticky cache_dir")
        if not d.startswith("/"):
            raise self.bad(keys["cache_dir"][1], f"sticky cache_dir {d!r} must be absolute")
        return d

    def job_secrets(self, keys: _Keys, commands: list[object]) -> tuple[SecretRef, ...]:
        """The job's ``secrets:``; a variable one names may not be one the job's
        commands set in their ``env``."""
        taken = {k for c in commands if isinstance(c, Command) for k, _ in c.env}
        found = self.field(keys, "secrets", lambda n, k: self.secrets(n, k, taken))
        return found if isinstance(found, tuple) else ()

    def secrets(self, node: yaml.Node, what: str, taken: set[str]) -> tuple[SecretRef, ...]:
        items = self.seq(node, what)
        if len(items) > MAX_SECRETS:
            raise self.bad(node, f"{what} has more than {MAX_SECRETS} entries")
        out: list[SecretRef] = []
        names: dict[str, yaml.Node] = {}
        envs: dict[str, yaml.Node] = {}
        for item in items:
            try:
                ref, name_node, env_node = self.secret(item)
            except _Bad:
                continue
            if ref.name in names:
                first = self.loc(names[ref.name]).line
                self.error(
                    name_node, f"secret {ref.name!r} is declared twice (first at line {first})"
                )
                continue
            names[ref.name] = name_node
            if ref.env is not None and env_node is not None:
                if ref.env in envs:
                    first = self.loc(envs[ref.env]).line
                    self.error(
                        env_node,
                        f"env {ref.env!r} is given two secrets (the first at line {first})",
                    )
                    continue
                if ref.env in taken:
                    self.error(
                        env_node,
                        f"env {ref.env!r} of secret {ref.name!r} is also set by the command's env",
                    )
                    continue
                envs[ref.env] = env_node
            out.append(ref)
        return tuple(out)

    def secret(self, node: yaml.Node) -> tuple[SecretRef, yaml.Node, yaml.Node | None]:
        """One entry: a name (a file), or ``{name: N, env: VAR}`` (that variable)."""
        if not isinstance(node, yaml.MappingNode):
            if not isinstance(node, yaml.ScalarNode):
                raise self.bad(
                    node, f"a secret is a name or {{name: N, env: VAR}}, not {_kind(node)}"
                )
            return SecretRef(self.name(node, "secret")), node, None
        keys = self.mapping(node, "a secret", _SECRET_KEYS)
        if "name" not in keys:
            raise self.bad(node, "a secret needs a name")
        name_node = keys["name"][1]
        name = self.name(name_node, "secret")
        if "env" not in keys:
            return SecretRef(name), name_node, None
        env_node = keys["env"][1]
        var = self.scalar(env_node, f"env of secret {name!r}")
        if not _ENV_NAME.fullmatch(var):
            raise self.bad(
                env_node,
                f"env {var!r} of secret {name!r} is not a variable's name: letters, digits "
                "and '_', not starting with a digit",
            )
        if var.startswith("CORRAL_"):
            raise self.bad(env_node, f"env {var!r}: CORRAL_* variables are corral's own")
        return SecretRef(name, var), name_node, env_node

    def batch(
        self, node: yaml.Node, keys: _Keys, name: str, loc: Loc, description: str
    ) -> BatchSpec:
        array = self.field(keys, "array", lambda n, k: self.integer(n, k, 1, MAX_ARRAY))
        if "command" not in keys:
            self.error(node, "a batch job needs a command")
        if isinstance(array, int):
            self.holes_allowed = frozenset({"index"})
        try:
            command = self.field(keys, "command", self.command)
        finally:
            self.holes_allowed = frozenset()
        placement = self.placement(keys)
        retries, codes, deadline = self.run_policy(keys)
        secrets = self.job_secrets(keys, [command])
        if not isinstance(command, Command):
            raise _Bad()
        return BatchSpec(
            name, loc, command, description, placement, retries, codes, deadline,
            array if isinstance(array, int) else None, secrets,
        )  # fmt: skip

    def run_policy(self, keys: _Keys) -> tuple[Retries, tuple[int, ...], float | None]:
        retries = self.field(keys, "retries", self.retries)
        codes = self.field(keys, "success_exit_codes", self.exit_codes)
        deadline = self.field(keys, "deadline", self.duration)
        return (
            retries if isinstance(retries, Retries) else Retries(),
            codes if isinstance(codes, tuple) else (0,),
            deadline if isinstance(deadline, float) else None,
        )

    def dag(self, node: yaml.Node, keys: _Keys, name: str, loc: Loc, description: str) -> DagSpec:
        placement = self.placement(keys)
        failure = self.field(keys, "failure", lambda n, k: self.choice(n, k, FAILURE_POLICIES))
        if "steps" not in keys:
            raise self.bad(node, "a dag job needs steps")
        items = self.seq(keys["steps"][1], "steps")
        if not items:
            raise self.bad(keys["steps"][1], "steps must not be empty")
        if len(items) > MAX_STEPS:
            raise self.bad(keys["steps"][1], f"a dag has at most {MAX_STEPS:,} steps")
        steps: list[_RawStep] = []
        seen: dict[str, _RawStep] = {}
        for item in items:
            try:
                step = self.step(item)
            except _Bad:
                continue
            if step.name in seen:
                first = seen[step.name].loc
                self.error(
                    step.name_node, f"duplicate step {step.name!r} (first at line {first.line})"
                )
                continue
            seen[step.name] = step
            steps.append(step)
        linked = self.link(steps)
        secrets = self.job_secrets(keys, [s.command for s in steps])
        return DagSpec(
            name, loc, linked, description, placement,
            "continue" if failure == "continue" else "stop", secrets,
        )  # fmt: skip

    def step(self, node: yaml.Node) -> _RawStep:
        keys = self.mapping(node, "a step", _STEP_KEYS)
        if "name" not in keys:
            raise self.bad(node, "a step needs a name")
        name_node = keys["name"][1]
        name = self.name(name_node, "step name")
        if "command" not in keys:
            self.error(node, f"step {name!r} needs a command")
        command = self.field(keys, "command", self.command)
        needs = self.field(keys, "needs", lambda n, _: self.names(n, "needs"))
        inputs = self.field(keys, "inputs", lambda n, _: self.files(n, "inputs"))
        outputs = self.field(keys, "outputs", lambda n, _: self.files(n, "outputs"))
        wants = self.field(keys, "wants", self.resources)
        retries, codes, deadline = self.run_policy(keys)
        if not isinstance(command, Command):
            raise _Bad()
        return _RawStep(
            name, name_node, self.loc(node), command,
            needs if isinstance(needs, list) else [],
            inputs if isinstance(inputs, list) else [],
            outputs if isinstance(outputs, list) else [],
            wants if isinstance(wants, Resources) else Resources(),
            retries, codes, deadline,
        )  # fmt: skip

    def names(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        out = []
        for item in self.seq(node, what):
            with contextlib.suppress(_Bad):
                out.append((self.name(item, f"a step in {what}"), item))
        return out

    def files(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        out = []
        for item in self.seq(node, what):
            try:
                f = self.nonempty(item, f"a file in {what}")
            except _Bad:
                continue
            if f.startswith("/") or ".." in f.split("/"):
                self.error(
                    item,
                    f"{what} {f!r} must be a path inside the job's directory "
                    "(relative, without '..')",
                )
                continue
            out.append((posix_normal(f), item))
        return out

    def link(self, raw: list[_RawStep]) -> tuple[DagStep, ...]:
        """Resolve needs (as written, then implied by inputs another step outputs), and
        name every cycle."""
        known = {s.name for s in raw}
        producer: dict[str, str] = {}
        for s in raw:
            for f, fnode in s.outputs:
                other = producer.setdefault(f, s.name)
                if other != s.name:
                    self.error(
                        fnode,
                        f"output {f!r} of step {s.name!r} is also an output of step {other!r}",
                    )
        edges: dict[str, list[str]] = {}
        steps = []
        for s in raw:
            deps: list[str] = []
            for dep, dnode in s.needs:
                if dep == s.name:
                    self.error(dnode, f"step {s.name!r} needs itself")
                elif dep not in known:
                    hint = difflib.get_close_matches(dep, sorted(known), n=1)
                    extra = f"; did you mean {hint[0]!r}?" if hint else ""
                    self.error(dnode, f"step {s.name!r} needs {dep!r}, which is no step{extra}")
                elif dep not in deps:
                    deps.append(dep)
            for f, _ in s.inputs:
                p = producer.get(f)
                if p is not None and p != s.name and p not in deps:
                    deps.append(p)
            edges[s.name] = deps
            steps.append(
                DagStep(
                    s.name,
                    s.loc,
                    s.command,
                    tuple(deps),
                    tuple(f for f, _ in s.inputs),
                    tuple(f for f, _ in s.outputs),
                    s.wants,
                    s.retries,
                    s.success_exit_codes,
                    s.deadline,
                )
            )
        by_name = {s.name: s for s in steps}
        for cycle in find_cycles(edges, [s.name for s in steps]):
            self.error(by_name[cycle[0]].loc, "steps form a cycle: " + " -> ".join(cycle))
        return tuple(steps)

    def periodic(
        self, node: yaml.Node, keys: _Keys, name: str, loc: Loc, description: str
    ) -> PeriodicSpec:
        schedule = self.field(keys, "schedule", self.cron)
        if "schedule" not in keys:
            self.error(node, "a periodic job needs a schedule, e.g. '0 2 * * *'")
        tz = self.field(keys, "timezone", self.timezone)
        overlap = self.field(keys, "overlap", lambda n, k: self.choice(n, k, OVERLAP_POLICIES))
        missed = self.field(keys, "missed", lambda n, k: self.choice(n, k, MISSED_POLICIES))
        job: BatchSpec | DagSpec | None = None
        job_file: str | None = None
        job_loc = loc
        if "job" not in keys:
            self.error(node, "a periodic job needs job: a batch or dag job, inline or a file name")
        else:
            jnode = keys["job"][1]
            job_loc = self.loc(jnode)
            try:
                if isinstance(jnode, yaml.MappingNode):
                    inner = self.job(jnode, top=False, default_name=name)
                    assert isinstance(inner, BatchSpec | DagSpec)
                    job = inner
                else:
                    job_file = self.job_file(jnode)
            except _Bad:
                pass
        if not isinstance(schedule, str):
            raise _Bad()
        return PeriodicSpec(
            name, loc, schedule, job, job_file, job_loc, description,
            tz if isinstance(tz, str) else "UTC",
            overlap if overlap in ("queue", "replace") else "skip",
            "run-once" if missed == "run-once" else "skip",
        )  # fmt: skip

    def cron(self, node: yaml.Node, what: str) -> str:
        s = self.nonempty(node, what)
        why = cron_problem(s)
        if why is not None:
            raise self.bad(node, why)
        return s.strip()

    def timezone(self, node: yaml.Node, what: str) -> str:
        s = self.nonempty(node, what)
        why = timezone_problem(s)
        if why is not None:
            raise self.bad(node, why)
        return s

    def job_file(self, node: yaml.Node) -> str:
        f = self.nonempty(node, "job")
        if f.startswith("/") or ".." in f.split("/") or not f.endswith((".yaml", ".yml")):
            raise self.bad(
                node,
                f"job {f!r}: name a .yaml file beside this one (a relative path without "
                "'..'), or write the job inline",
            )
        return posix_normal(f)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def posix_normal(path: str) -> str:
    """``a//b/./c`` -> ``a/b/c`` (no '..' reaches here)."""
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def find_cycles(edges: dict[str, list[str]], order: list[str]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one step, each written
    from its first step in ``order`` back to it: ``["a", "b", "a"]``. Iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in order:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(edges.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges.get(w, ()))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    components.append(comp)
    rank = {n: i for i, n in enumerate(order)}
    out = []
    for comp in sorted(components, key=lambda c: min(rank[n] for n in c)):
        members = set(comp)
        first = min(comp, key=lambda n: rank[n])
        out.append(_cycle_through(first, members, edges))
    return out


def _cycle_through(first: str, members: set[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest path first -> ... -> first inside one component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [first]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges.get(v, ()):
                if w not in members:
                    continue
                if w == first:
                    path = [v]
                    while path[-1] != first:
                        path.append(parent[path[-1]])
                    return [*reversed(path), first]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return [first, first]  # pragma: no cover - a component always has a cycle


def _foreign_tags(root: yaml.Node) -> list[yaml.Node]:
    """Nodes with a tag other than YAML's plain ones (``!!python/object``, ``!foo``);
    each node once, aliases and cycles included."""
    out = []
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag not in _PLAIN_TAGS:
            out.append(node)
        if isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            todo.extend(n for pair in node.value for n in pair)
    return out


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    v = str(node.value)
    return f"the value {v[:60] + '...' if len(v) > 60 else v!r}"


def _offset_loc(loc: Loc, node: yaml.Node, raw: str, offset: int) -> Loc:
    """Point into a one-line scalar at ``offset``; multi-line scalars keep their start."""
    if not isinstance(node, yaml.ScalarNode) or "\n" in raw[:offset] or node.style in ("|", ">"):
        return loc
    quote = 1 if node.style in ("'", '"') else 0
    return Loc(loc.file, loc.line, loc.col + offset + quote)
