"""Expansion: a workflow template plus variables becomes a plan. Pure.

``expand(path, sources, variables=..., seed=...)`` walks the role tree once. For
each role it evaluates, in AliECS's order:

1. ``enabled`` with the parent's variables (a disabled role vanishes with its subtree);
2. ``defaults`` with the parent's variables plus iterator locals;
3. ``vars`` with those plus the role's own defaults;
4. the name, loads, triggers, targets and constraints with everything.

Variable precedence, lowest to highest: global defaults, template defaults (a deeper
role overrides its ancestors), global vars, template vars, user vars, iterator
locals. A role without variables of its own shares its parent's stack, and task
classes are resolved once per distinct set of inputs, so that 150,000 tasks cost
little more than the dictionary work they need.

Errors are collected, not raised, until the end: ``expand`` raises one
``TemplateError`` listing every problem as ``FILE:LINE:COL: message (role path)``.

Bounds. Every value and expression result is at most ``MAX_VALUE`` characters, the
inputs of one CEL evaluation at most ``MAX_EXPRESSION_INPUT``, the plan at most
``max_tasks`` tasks, and the walk stops at ``time_limit`` seconds of ``clock``: a
template that doubles a string forty times ends in an error, not in the OOM killer.

Callers' values. A value from ``variables`` (the caller's) is carried bracketed by
taint marks (``templates.text``), and so is any result computed from one; the marks
are taken out of everything the plan holds, and where a shell script or a call's
arguments are parsed again, ``templates.quoting`` keeps the caller's characters out of
the parse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import posixpath
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from corral.model.durations import parse_duration
from corral.model.plan import (
    HOST_PLACEHOLDER,
    NO_RESOURCES,
    Bind,
    CallSpec,
    Collection,
    Command,
    Connect,
    Constraint,
    HealthCheck,
    Plan,
    PublicVar,
    Resources,
    TaskSpec,
)
from corral.model.regex import regex_error
from corral.model.vocabulary import Trigger, TriggerError, parse_trigger
from corral.templates.diagnostics import Diagnostic, Diagnostics, Loc, TemplateError
from corral.templates.dpl import DplError
from corral.templates.dpl import generate as generate_dpl
from corral.templates.expressions import (
    Evaluator,
    ExprError,
    RolePos,
    analyze,
    is_falsy,
    is_truthy,
    render,
)
from corral.templates.library import Library, Sources
from corral.templates.public import public_var
from corral.templates.quoting import RAW_SAFE, call_func, marked, shell_script
from corral.templates.schema import (
    ADDRESSING,
    CHANNEL_TYPES,
    CONSTRAINT_OPERATORS,
    CONTROL_MODES,
    PROTOCOL_MODES,
    ChannelDef,
    ConstraintDef,
    ResourcesDef,
    RoleDef,
    TaskClassDef,
    VarDef,
)
from corral.templates.services import MAX_JIT_COMMAND, ServiceError, Services
from corral.templates.text import (
    TAINT_END,
    TAINT_START,
    Hole,
    Text,
    TextSyntaxError,
    split_holes,
    unmark,
)

DEFAULT_CALL_TIMEOUT = 30.0
MAX_ITERATIONS = 1_000_000
MAX_INCLUDE_DEPTH = 64
MAX_WARNINGS = 100  # distinct warnings a plan keeps
MAX_ROLE_DEPTH = 100  # roles inside roles, through includes too (the walk recurses)
MAX_VALUE = 1 << 20  # characters in one variable value or expression result
MAX_EXPRESSION_INPUT = 16 << 10  # characters of variables one CEL evaluation reads
MAX_TASKS = 1_000_000  # the default cap on the tasks of one plan
_CLOCK_EVERY = 1024  # evaluations between two looks at the clock

_ROLE_NAME = re.compile(r"^[^\s.:/]+$")
_UNSEEN = frozenset(("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"))  # unicode categories
# a role name made from a caller's value: it reaches commands through This().Path
_CALLER_ROLE_NAME = re.compile(r"[A-Za-z0-9_+@%=,~-]+")
_HOLE = re.compile(r"\{\{.*?\}\}", re.S)
_FUNC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+\(.*\)$", re.S)
_COMPLEMENT = {"push": "pull", "pull": "push", "pub": "sub", "sub": "pub"}


class _Skip(Exception):
    """An error was reported; skip the rest of this role."""


class _Abort(Exception):
    """A bound of the whole expansion was passed (tasks, time); stop the walk."""

    def __init__(self, loc: Loc, message: str, role: str | None) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.role = role


class _Unmarked(Mapping[str, str]):
    """A variable stack as CEL sees it: the caller's values without their marks."""

    __slots__ = ("_stack",)

    def __init__(self, stack: Mapping[str, str]) -> None:
        self._stack = stack

    def __getitem__(self, key: str) -> str:
        return unmark(self._stack[key])

    def get(self, key: str, default: Any = None) -> Any:
        v = self._stack.get(key)
        return default if v is None else unmark(v)

    def __contains__(self, key: object) -> bool:
        return key in self._stack

    def __iter__(self) -> Iterator[str]:
        return iter(self._stack)

    def __len__(self) -> int:
        return len(self._stack)


class _TaskVars(Mapping[str, str]):
    """A task's variables: the role's, under the few AliECS gives each task (task_name,
    task_class_name, task_parent_role, task_hostname). One small object per task: the
    role's stack is shared, never copied."""

    __slots__ = ("_own", "_stack")

    def __init__(self, stack: Mapping[str, str], own: dict[str, str]) -> None:
        self._stack = stack
        self._own = own

    def __getitem__(self, key: str) -> str:
        v = self._own.get(key)
        return v if v is not None else self._stack[key]

    def get(self, key: str, default: Any = None) -> Any:
        v = self._own.get(key)
        return v if v is not None else self._stack.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._own or key in self._stack

    def __iter__(self) -> Iterator[str]:
        yield from self._own
        yield from (k for k in self._stack if k not in self._own)

    def __len__(self) -> int:
        return len(self._stack) + sum(1 for k in self._own if k not in self._stack)


@dataclass(slots=True)
class _Scope:
    pos: RolePos
    defaults: dict[str, str]
    vars: dict[str, str]
    locals: dict[str, str]
    stack: dict[str, str]
    constraints: tuple[Constraint, ...]
    collection: str | None
    includes: tuple[str, ...]


@dataclass(slots=True)
class _ResolvedClass:
    command: Command
    mode: str
    wants: Resources
    limits: Resources | None
    properties: tuple[tuple[str, str], ...]
    health: HealthCheck | None


@dataclass(slots=True)
class _PendingConnect:
    task: str
    name: str
    type: str
    target: str
    transport: str
    properties: tuple[tuple[str, str], ...]
    loc: Loc


class _Memo:
    """Results keyed on the values of the variables they read.

    A memo that keeps missing (inputs unique per task, like a per-task id in a
    command) switches itself off: building and storing 150,000 keys that are never
    looked up again costs time and memory for nothing.
    """

    __slots__ = ("lookups", "misses", "names", "table")

    PROBATION = 2048

    def __init__(self, names: tuple[str, ...] | None) -> None:
        self.names = names  # None: must be computed every time (role position, uid)
        self.table: dict[tuple[str | None, ...], Any] = {}
        self.lookups = 0
        self.misses = 0

    def get(self, stack: Mapping[str, str], make: Any) -> Any:
        names = self.names
        if names is None:
            return make()
        get = stack.get
        key = tuple([get(n) for n in names])
        hit = self.table.get(key)
        if hit is None:
            hit = self.table[key] = make()
            self.misses += 1
            self.lookups += 1
            if self.lookups >= self.PROBATION and self.misses * 8 > self.lookups * 7:
                self.names = None
                self.table = {}
        else:
            self.lookups += 1
        return hit


_JIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def _marked_as(value: str, stack: Mapping[str, str]) -> str:
    """``value`` with the caller's marks it had in the variables: the function got it
    unmarked, and a command must know which of its characters a caller chose. A value
    no variable holds as is, or that only a caller's variable holds, is all marked."""
    clean = None
    for v in stack.values():
        if len(v) >= len(value) and unmark(v) == value:
            if TAINT_START in v or TAINT_END in v:
                return v
            clean = v
    if clean is not None:
        return clean
    if any(TAINT_START in v or TAINT_END in v for v in stack.values()):
        return TAINT_START + value + TAINT_END
    return value


def expand(
    path: str,
    sources: Sources,
    *,
    variables: Mapping[str, str] | None = None,
    global_defaults: Mapping[str, str] | None = None,
    global_vars: Mapping[str, str] | None = None,
    seed: str = "0",
    max_tasks: int = MAX_TASKS,
    time_limit: float | None = None,
    clock: Callable[[], float] | None = None,
    services: Services | None = None,
) -> Plan:
    """Expand the workflow at ``path``; raise TemplateError listing every problem."""
    plan, diags = check(
        path,
        sources,
        variables=variables,
        global_defaults=global_defaults,
        global_vars=global_vars,
        seed=seed,
        max_tasks=max_tasks,
        time_limit=time_limit,
        clock=clock,
        services=services,
    )
    if plan is None:
        raise TemplateError(diags)
    return plan


def check(
    path: str,
    sources: Sources,
    *,
    variables: Mapping[str, str] | None = None,
    global_defaults: Mapping[str, str] | None = None,
    global_vars: Mapping[str, str] | None = None,
    seed: str = "0",
    max_tasks: int = MAX_TASKS,
    time_limit: float | None = None,
    clock: Callable[[], float] | None = None,
    services: Services | None = None,
) -> tuple[Plan | None, list[Diagnostic]]:
    """Expand and return (plan or None, errors): the plan only when there is no error.

    ``time_limit`` (seconds of ``clock``, both or neither) bounds the walk; ``variables``
    are the caller's: see the module's notes on quoting. ``services`` is what the
    ``inventory``, ``config``, ``runtime`` and ``dpl`` functions read (the site)."""
    ex = _Expander(
        path,
        sources,
        dict(variables or {}),
        dict(global_defaults or {}),
        dict(global_vars or {}),
        seed,
        services,
    )
    ex.max_tasks = max_tasks
    if time_limit is not None and clock is not None:
        ex.clock = clock
        ex.time_limit = time_limit
        ex.deadline = clock() + time_limit
    # The walk allocates millions of small acyclic objects; the cyclic collector would
    # rescan the growing heap again and again (4.6 s instead of 2.5 s at 150,000
    # tasks). Nothing it builds holds a cycle, so collection waits until the end.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        plan = ex.run()
    finally:
        if was_enabled:
            gc.enable()
    return (plan if not ex.diags else None), ex.diags.items()


class _Expander:
    def __init__(
        self,
        path: str,
        sources: Sources,
        user: dict[str, str],
        gdefaults: dict[str, str],
        gvars: dict[str, str],
        seed: str,
        services: Services | None = None,
    ) -> None:
        self.diags = Diagnostics()
        self.lib = Library(path, sources, self.diags)
        self.services = services
        self.ev = Evaluator(seed, services)
        self.ev.dpl = self._dpl
        self._marked_stack: Mapping[str, str] = {}
        self.seed = seed
        self.variables = {str(k): unmark(str(v)) for k, v in user.items()}
        self.user = {k: TAINT_START + v + TAINT_END for k, v in self.variables.items()}
        gdefaults = {k: unmark(v) for k, v in gdefaults.items()}
        gdefaults.setdefault("environment_id", _environment_id(seed))
        self.gdefaults = gdefaults
        self.gvars = {k: unmark(v) for k, v in gvars.items()}
        self.max_tasks = MAX_TASKS
        self.clock: Callable[[], float] | None = None
        self.time_limit = 0.0
        self.deadline = 0.0
        self._evals = 0
        self._depth = 0  # roles inside roles, now
        self.tasks: list[TaskSpec] = []
        self.calls: list[CallSpec] = []
        self.binds: dict[tuple[str, str], tuple[Bind, Loc]] = {}
        self.aliases: dict[str, tuple[Bind, Loc]] = {}
        self.connects: list[_PendingConnect] = []
        self.collections: list[Collection] = []
        self.paths: set[str] = set()
        self.public: dict[str, PublicVar] = {}
        self._public_seen: set[int] = set()
        self.warnings: dict[tuple[Loc, str], list[Any]] = {}  # -> [role, count]
        self._class_cache: dict[int, tuple[_Memo, _Memo]] = {}
        self._channel_cache: dict[int, _Memo] = {}
        self._merged: dict[tuple[int, int], tuple[list[ChannelDef], list[ChannelDef]]] = {}

    def _site_warnings(self, loc: Loc, pos: RolePos | None) -> None:
        """A site function answered an error value: the expansion goes on with it (as
        AliECS's does), and the plan says where (once per place and message)."""
        for message in self.ev.site_errors:
            key = (loc, message)
            if key in self.warnings:
                self.warnings[key][1] += 1
            elif len(self.warnings) < MAX_WARNINGS:
                self.warnings[key] = [_role_of(pos), 1]
        self.ev.site_errors.clear()

    # -- DPL workflow generation (dpl.*) ------------------------------------------

    def _dpl(self, name: str, arg: str, _stack: Mapping[str, str]) -> str:
        """An include reference to the workflow ``dpl.Generate*`` makes of ``arg``."""
        stack = self._marked_stack
        if arg.strip() == "none":
            raise ServiceError("dplCommand is 'none'")
        if name == "dpl.Generate":
            return self._dpl_command(_marked_as(arg, stack), stack)
        uri = arg.strip()
        if not _JIT_NAME.fullmatch(uri):
            raise ServiceError(
                f"bad DPL command name {uri!r}: a file name of the jit/ folder "
                "(letters, digits, '.', '_', '-')"
            )
        text = None if self.services is None else self.services.jit_command(uri)
        if text is None:
            if name == "dpl.GenerateFromUriOrFallbackToTemplate":
                return uri  # AliECS: then the workflow of that name
            raise ServiceError(f"failed to read DPL command from 'jit/{uri}': no such file")
        if text.lstrip().startswith("{"):  # a JSON description, as o2-… --dump-workflow prints
            return self._dpl_register(text, f"jit/{uri}")  # (its size is checked there)
        if len(text) > MAX_JIT_COMMAND:
            raise ServiceError(
                f"the command in jit/{uri} is {len(text)} characters; limit {MAX_JIT_COMMAND}"
            )
        # a command file is a template itself, expanded with the variables (as AliECS does)
        loc = Loc(f"jit/{uri}", 1, 1)
        try:
            pieces = split_holes(text)
        except TextSyntaxError as e:
            raise ServiceError(f"jit/{uri}: {e}") from None
        parts = tuple(p if isinstance(p, str) else Hole(p[0], loc) for p in pieces)
        try:
            command = self.mtext(Text(text, loc, parts), stack, None)
        except _Skip:  # its own error is said at jit/NAME
            raise ServiceError(f"the DPL command in jit/{uri} did not expand") from None
        return self._dpl_command(command, stack)

    def _dpl_command(self, command: str, stack: Mapping[str, str]) -> str:
        """Run a DPL command for its JSON description; callers' values stay one word."""
        if self.services is None:
            raise ServiceError("DPL commands cannot be run here: no site is known")
        jit_env = stack.get("jit_env_vars", "")
        if unmark(jit_env).strip() and unmark(jit_env).strip() != "none":
            command = f"export {jit_env} && {command}"
        script, env = shell_script(command.replace("\n", " ").replace("\r", " "))
        dump = self.services.dpl_dump(script + " --dump-workflow", dict(env))
        return self._dpl_register(dump, "the DPL command's description")

    def _dpl_register(self, dump: str, what: str) -> str:
        try:
            gen = generate_dpl(dump)
        except DplError as e:
            raise ServiceError(f"{what}: {e}") from None
        self.lib.add_generated(gen.name, gen.workflow, gen.classes)
        return gen.name

    # -- evaluation helpers ----------------------------------------------------

    def text(self, t: Text, stack: Mapping[str, str], pos: RolePos | None) -> str:
        """The string value of a template text, caller's marks taken out."""
        const = t.const
        if const is not None:
            return const
        s = self.mtext(t, stack, pos)
        if TAINT_START in s or TAINT_END in s:
            return unmark(s)
        return s

    def mtext(self, t: Text, stack: Mapping[str, str], pos: RolePos | None) -> str:
        """The string value of a template text, a caller's values still marked (for
        variables, which pass them on). The hot path of expansion."""
        const = t.const
        if const is not None:
            return const
        hole = t.single
        if hole is not None:
            e = hole.expr
            if e is not None and e.bare is not None and not hole.raw:
                value = stack.get(e.bare)
                if value is not None:
                    return value
            return self._hole(hole, stack, pos)
        out = []
        for p in t.parts:
            if type(p) is str:
                out.append(p)
            else:
                assert type(p) is Hole
                e = p.expr
                value = None if e is None or e.bare is None or p.raw else stack.get(e.bare)
                out.append(value if value is not None else self._hole(p, stack, pos))
        s = "".join(out)
        if len(s) > MAX_VALUE:
            shown = len(unmark(s))
            self.fail(t.loc, f"this value is {shown} characters; the limit is {MAX_VALUE}", pos)
        return s

    def _hole(self, hole: Hole, stack: Mapping[str, str], pos: RolePos | None) -> str:
        """One hole's value as text: marked when it read a caller's value."""
        e = hole.expr
        if e is None:
            e = hole.expr = self.ev.expr(hole.source)
        self._evals += 1
        if self.clock is not None and self._evals % _CLOCK_EVERY == 0:
            self.check_time(hole.loc, pos)
        tainted = False
        if e.bare is not None:
            v = stack.get(e.bare)
            if v is not None and not hole.raw:
                return v  # as is: only the caller's part of it marked
            tainted = v is not None and (TAINT_START in v or TAINT_END in v)
        else:
            size = 0
            for n in e.analysis.names:
                v = stack.get(n)
                if v is not None:
                    size += len(v)
                    if TAINT_START in v or TAINT_END in v:
                        tainted = True
            if e.analysis.volatile and not tainted:  # reads variables by name at run time
                tainted = any(TAINT_START in v or TAINT_END in v for v in stack.values())
            if size > MAX_EXPRESSION_INPUT:
                self.fail(
                    hole.loc,
                    f"in {{{{ {hole.source} }}}}: the variables it reads hold {size} "
                    f"characters; an expression may read at most {MAX_EXPRESSION_INPUT}",
                    pos,
                )
        if e.analysis.site:
            self._marked_stack = stack  # for dpl.*, which keeps callers' values apart
        try:
            value = self.ev.evaluate(e, _Unmarked(stack) if tainted else stack, pos)
        except ExprError as err:
            self.fail(hole.loc, f"in {{{{ {hole.source} }}}}: {err}", pos)
        if self.ev.site_errors:
            self._site_warnings(hole.loc, pos)
        # Marks in a result are never the caller's word on where their value is: CEL got
        # the values unmarked, so a mark here was made by it (json.Unmarshal of a
        # "\ue001" escape, say). Taken out; the whole result is marked below if tainted.
        s = unmark(render(value))
        if len(s) > MAX_VALUE:
            self.fail(
                hole.loc,
                f"{{{{ {hole.source} }}}} gives {len(unmark(s))} characters; "
                f"the limit is {MAX_VALUE}",
                pos,
            )
        if tainted:
            same = _input_as_read(s, e.analysis.names, stack)
            if same is not None and not hole.raw:
                # The result is one of the variables it read, as read: the caller's value
                # chose it (``size(x) > 0 ? a : b``), and wrote only what it wrote of it.
                return same
            if same is not None and TAINT_START not in same and TAINT_END not in same:
                tainted = False
        if hole.raw:
            if tainted:
                bad = sorted({c for c in s if not RAW_SAFE.fullmatch(c)})
                if bad:
                    shown = " ".join(repr(c) for c in bad[:8])
                    self.fail(
                        hole.loc,
                        f"raw({hole.source}): a caller's value here may hold letters, digits, "
                        f"spaces and _@%+=:,./- only, not {shown}",
                        pos,
                    )
            return s
        if tainted:
            return TAINT_START + s + TAINT_END
        return s

    def check_time(self, loc: Loc, pos: RolePos | None) -> None:
        assert self.clock is not None
        if self.clock() > self.deadline:
            raise _Abort(
                loc,
                f"expansion took longer than {self.time_limit:g} s, the limit; "
                f"stopped here after {len(self.tasks)} tasks",
                _role_of(pos),
            )

    def bool_text(
        self, t: Text | None, default: bool, stack: Mapping[str, str], pos: RolePos, what: str
    ) -> bool:
        if t is None:
            return default
        s = self.text(t, stack, pos)
        if is_truthy(s):
            return True
        if is_falsy(s):
            return False
        self.fail(t.loc, f"{what} must be true or false, not {s!r}", pos)

    def number(
        self, t: Text | None, stack: Mapping[str, str], pos: RolePos, what: str, *, integer: bool
    ) -> float:
        if t is None:
            return 0
        s = self.text(t, stack, pos).strip()
        try:
            v = float(s)
        except ValueError:
            self.fail(t.loc, f"{what} must be a number, not {s!r}", pos)
        if v != v or v in (math.inf, -math.inf):
            self.fail(t.loc, f"{what} must be a finite number, not {s!r}", pos)
        if v < 0:
            self.fail(t.loc, f"{what} must not be negative, got {s!r}", pos)
        if integer and v != int(v):
            self.fail(t.loc, f"{what} must be a whole number, not {s!r}", pos)
        return int(v) if integer else v

    def duration(
        self, t: Text | None, stack: Mapping[str, str], pos: RolePos, default: float | None
    ) -> float | None:
        if t is None:
            return default
        s = self.text(t, stack, pos)
        try:
            return parse_duration(s)
        except ValueError as e:
            self.fail(t.loc, str(e), pos)

    def trigger(self, t: Text, stack: Mapping[str, str], pos: RolePos) -> Trigger:
        s = self.text(t, stack, pos)
        try:
            return parse_trigger(s)
        except TriggerError as e:
            self.fail(t.loc, str(e), pos)

    def fail(self, loc: Loc, message: str, pos: RolePos | None) -> NoReturn:
        self.diags.error(loc, message, _role_of(pos))
        raise _Skip

    def build(
        self, d: Mapping[str, str], v: Mapping[str, str], loc: Mapping[str, str]
    ) -> dict[str, str]:
        return {**self.gdefaults, **d, **self.gvars, **v, **self.user, **loc}

    # -- the walk ----------------------------------------------------------------

    def run(self) -> Plan | None:
        wf = self.lib.workflow(self.lib.root_file)
        if wf is None:
            if not self.diags:
                self.diags.error(Loc(self.lib.root_file), "no such file")
            return None
        self._collect_public(wf.root.defaults + wf.root.vars)
        empty: dict[str, str] = {}
        top = _Scope(
            RolePos(None, None), empty, empty, empty, self.build(empty, empty, empty), (), None,
            (self.lib.root_file,),
        )  # fmt: skip
        root_name = ""
        try:
            scope = self.enter(wf.root, top, None, check_enabled=True)
            if scope is not None:
                root_name = scope.pos.name or ""
                self.children(wf.root.roles or [], scope)
        except _Skip:
            pass
        except _Abort as a:
            self.diags.error(a.loc, a.message, a.role)
            return None
        self.resolve_channels()
        return Plan(
            name=root_name,
            description=wf.description,
            seed=self.seed,
            variables=dict(self.variables),
            tasks=tuple(self.tasks),
            calls=tuple(self.calls),
            binds=tuple(b for b, _ in self.binds.values()),
            connects=tuple(self.connected),
            collections=tuple(self.collections),
            public=tuple(self.public.values()),
            files=tuple(self.lib.files),
            warnings=tuple(
                f"{loc}: {msg}"
                + (f" ({role})" if role else "")
                + (f" [{n} times]" if n > 1 else "")
                for (loc, msg), (role, n) in self.warnings.items()
            ),
        )

    def children(self, roles: list[RoleDef], scope: _Scope) -> None:
        if not roles:
            return
        if self._depth >= MAX_ROLE_DEPTH:
            self.fail(
                roles[0].name.loc, f"roles nest deeper than {MAX_ROLE_DEPTH} levels", scope.pos
            )
        self._depth += 1
        try:
            for r in roles:
                with contextlib.suppress(_Skip):
                    self.role(r, scope)
        finally:
            self._depth -= 1

    def enter(
        self,
        r: RoleDef,
        parent: _Scope,
        locals_add: dict[str, str] | None,
        *,
        check_enabled: bool,
        collection: str | None = None,
    ) -> _Scope | None:
        """Evaluate a role's enabled, defaults, vars, name and constraints."""
        label = r.name.raw
        if locals_add and "{{" in label:  # an iteration: say which, until its name is known
            label += "".join(f" [{k}={unmark(v)[:60]}]" for k, v in locals_add.items())
        pre = RolePos(None, parent.pos if parent.pos.name is not None else parent.pos.parent, label)
        self._evals += 1
        if self.clock is not None and self._evals % _CLOCK_EVERY == 0:
            self.check_time(r.name.loc, pre)
        enabled = r.enabled if check_enabled else None
        if enabled is not None and not self.bool_text(enabled, True, parent.stack, pre, "enabled"):
            return None
        loc_vars = parent.locals
        s0 = parent.stack
        if locals_add:
            loc_vars = {**parent.locals, **locals_add}
            s0 = self.build(parent.defaults, parent.vars, loc_vars)
        d, v, stack = self.layer(
            r.defaults, r.vars, parent.defaults, parent.vars, loc_vars, s0, pre
        )
        if (r.defaults or r.vars) and id(r) not in self._public_seen:
            self._public_seen.add(id(r))  # a role's own public variables, once per role
            self._collect_public(r.defaults + r.vars)
        name = self.mtext(r.name, stack, pre)
        if marked(name):
            name = unmark(name)
            if not _CALLER_ROLE_NAME.fullmatch(name):
                self.fail(
                    r.name.loc,
                    f"role name {name!r} comes from a caller's value, and may then hold "
                    "letters, digits and _-+@%=,~ only",
                    pre,
                )
        if not _ROLE_NAME.match(name) or any(
            unicodedata.category(ch) in _UNSEEN for ch in name
        ):  # (it reaches terminals, logs and SVG: nothing that moves a cursor or hides)
            self.fail(
                r.name.loc,
                f"role name {name!r} must be non-empty without spaces, control or "
                "formatting characters, '.', ':' or '/'",
                pre,
            )
        pos = RolePos(name, parent.pos if parent.pos.name is not None else None)
        assert pos.path is not None
        if pos.path in self.paths:
            self.fail(r.name.loc, f"duplicate role name {name!r}: {pos.path} already exists", pos)
        self.paths.add(pos.path)
        constraints = parent.constraints
        if r.constraints:
            constraints = constraints + tuple(self.constraint(c, stack, pos) for c in r.constraints)
        return _Scope(
            pos,
            d,
            v,
            loc_vars,
            stack,
            constraints,
            collection or parent.collection,
            parent.includes,
        )

    def layer(
        self,
        defaults: list[VarDef],
        vars_: list[VarDef],
        pd: dict[str, str],
        pv: dict[str, str],
        loc_vars: dict[str, str],
        s0: dict[str, str],
        pos: RolePos,
    ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        """New (defaults, vars, stack) after a role's own defaults and vars."""
        if not defaults and not vars_:
            return pd, pv, s0
        d = pd
        if defaults:
            d = dict(pd)
            own = {vd.name for vd in vars_} if vars_ else ()
            gv, user = self.gvars, self.user
            d.update(
                self.defaults_block(
                    defaults,
                    s0,
                    lambda n: n in own or n in pv or n in gv or n in user or n in loc_vars,
                    pos,
                )
            )
        v = pv
        if vars_:
            s1 = self.build(d, pv, loc_vars) if defaults else s0
            v = dict(pv)
            failed = False
            for vd in vars_:
                try:
                    v[vd.name] = self.mtext(vd.value, s1, pos)
                except _Skip:  # said; the entries below are still checked
                    failed = True
            if failed:
                raise _Skip
        return d, v, self.build(d, v, loc_vars)

    def defaults_block(
        self,
        defaults: list[VarDef],
        stack: dict[str, str],
        overridden: Callable[[str], bool],
        pos: RolePos | None,
    ) -> dict[str, str]:
        """A defaults block's values, in order: an entry reads the entries above it (as
        in AliECS), and one that a stronger layer overrides is never evaluated (its
        expression may not even make sense where it is overridden)."""
        out: dict[str, str] = {}
        last = max((k for k, vd in enumerate(defaults) if vd.value.const is None), default=-1)
        s = stack
        failed = False
        for k, vd in enumerate(defaults):
            if overridden(vd.name):
                continue
            try:
                value = self.mtext(vd.value, s, pos)
            except _Skip:  # said; the entries below are still checked
                failed = True
                self._read_below(vd, defaults[k + 1 :], s, pos)
                continue
            out[vd.name] = value
            if k < last:  # an entry below may read it
                if s is stack:
                    s = dict(stack)
                s[vd.name] = value
        if failed:
            raise _Skip
        return out

    def _read_below(
        self, vd: VarDef, below: list[VarDef], stack: Mapping[str, str], pos: RolePos | None
    ) -> None:
        """A defaults entry failed: if it reads one set below it, say so (the order)."""
        later = {b.name: b for b in below}
        for hole in vd.value.holes:
            for n in self.ev.expr(hole.source).analysis.names:
                if n in later and n not in stack:
                    self.diags.error(
                        vd.value.loc,
                        f"{n!r} is set below, at line {later[n].value.loc.line}: an entry of a "
                        "defaults block reads only the entries above it",
                        _role_of(pos),
                    )
                    return

    def role(self, r: RoleDef, parent: _Scope) -> None:
        if r.iterator is not None:
            self.iterate(r, parent)
            return
        scope = self.enter(r, parent, None, check_enabled=True)
        if scope is not None:
            self.body(r, scope)

    def iterate(self, r: RoleDef, parent: _Scope) -> None:
        it = r.iterator
        assert it is not None
        pre = RolePos(None, parent.pos, r.name.raw)
        if r.enabled is not None and not self.bool_text(
            r.enabled, True, parent.stack, pre, "enabled"
        ):
            return
        items: list[str]
        if it.range is not None:
            raw = self.mtext(it.range, parent.stack, pre)
            items = self.range_items(raw, it.range.loc, pre)
        else:
            assert it.begin is not None and it.end is not None
            begin = self.integer(it.begin, parent.stack, pre, "for begin")
            end = self.integer(it.end, parent.stack, pre, "for end")
            if end - begin + 1 > MAX_ITERATIONS:
                count = end - begin + 1
                self.fail(it.loc, f"for range of {count} items exceeds {MAX_ITERATIONS}", pre)
            items = [str(i) for i in range(begin, end + 1)]
        collection = None
        nmin = 0
        if it.nmin is not None:
            nmin = int(self.number(it.nmin, parent.stack, pre, "for nmin", integer=True))
            if nmin > len(items):
                self.fail(it.nmin.loc, f"nmin {nmin} is more than the {len(items)} iterations", pre)
            base = parent.pos.path + "." if parent.pos.path else ""
            # named after the instances' pattern: "epn-{{ host }}" gives "epn-*"
            collection = base + _HOLE.sub("*", r.name.raw)
        members: list[str] = []
        for item in items:
            try:
                scope = self.enter(
                    r, parent, {it.var: item}, check_enabled=False, collection=collection
                )
            except _Skip:
                continue
            assert scope is not None and scope.pos.path is not None
            members.append(scope.pos.path)
            with contextlib.suppress(_Skip):
                self.body(r, scope)
        if collection is not None:
            self.collections.append(Collection(collection, nmin, tuple(members)))

    def integer(self, t: Text, stack: Mapping[str, str], pos: RolePos, what: str) -> int:
        s = self.text(t, stack, pos).strip()
        try:
            return int(s)
        except ValueError:
            self.fail(t.loc, f"{what} must be an integer, not {s!r}", pos)

    def range_items(self, raw: str, loc: Loc, pos: RolePos) -> list[str]:
        """The items of a ``for`` range. When the range holds a caller's value anywhere,
        every item counts as the caller's (marked); marks that JSON escapes decode to
        (``"\\ue001"``) are taken out of the items either way."""
        tainted = marked(raw)
        s = unmark(raw).strip()
        if not s:
            return []
        try:
            value = json.loads(s)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            self.fail(loc, f'for range must be a JSON list, e.g. ["a","b"], not {s!r}', pos)
        if not isinstance(value, list):
            self.fail(loc, f"for range must be a list, not {s!r}", pos)
        if len(value) > MAX_ITERATIONS:
            self.fail(loc, f"for range of {len(value)} items exceeds {MAX_ITERATIONS}", pos)
        if tainted:
            return [TAINT_START + unmark(render(x)) + TAINT_END for x in value]
        return [unmark(render(x)) for x in value]

    def body(self, r: RoleDef, scope: _Scope) -> None:
        if r.task is not None:
            self.task(r, scope)
        elif r.call is not None:
            self.call(r, scope)
        elif r.include is not None:
            self.include(r, scope)
        elif r.roles is not None:
            self.children(r.roles, scope)

    def include(self, r: RoleDef, scope: _Scope) -> None:
        assert r.include is not None
        ref = self.text(r.include, scope.stack, scope.pos).strip()
        try:
            path = self.lib.find_include(ref, r.file)
        except ValueError as e:
            self.fail(r.include.loc, str(e), scope.pos)
        if path is None:
            self.fail(r.include.loc, f"include {ref!r}: no such workflow", scope.pos)
        assert path is not None
        if path in scope.includes:
            chain = " -> ".join((*scope.includes, path))
            self.fail(r.include.loc, f"include cycle: {chain}", scope.pos)
        if len(scope.includes) >= MAX_INCLUDE_DEPTH:
            self.fail(r.include.loc, f"includes nest deeper than {MAX_INCLUDE_DEPTH}", scope.pos)
        wf = self.lib.workflow(path)
        if wf is None:
            if self.lib.sources.read(path) is None:
                self.fail(r.include.loc, f"include {ref!r}: cannot read {path}", scope.pos)
            raise _Skip  # its own errors are reported
        sub = wf.root
        self._collect_public(sub.defaults + sub.vars)
        if sub.enabled is not None and not self.bool_text(
            sub.enabled, True, scope.stack, scope.pos, "enabled"
        ):
            return
        d, v, stack = self.layer(
            sub.defaults, sub.vars, scope.defaults, scope.vars, scope.locals, scope.stack, scope.pos
        )
        constraints = scope.constraints
        if sub.constraints:
            constraints += tuple(self.constraint(c, stack, scope.pos) for c in sub.constraints)
        inner = _Scope(
            scope.pos, d, v, scope.locals, stack, constraints, scope.collection,
            (*scope.includes, path),
        )  # fmt: skip
        self.children(sub.roles or [], inner)

    def constraint(self, c: ConstraintDef, stack: Mapping[str, str], pos: RolePos) -> Constraint:
        attr = self.text(c.attribute, stack, pos)
        value = self.text(c.value, stack, pos)
        op = "equals" if c.operator is None else self.text(c.operator, stack, pos)
        if op not in CONSTRAINT_OPERATORS:
            assert c.operator is not None
            self.fail(
                c.operator.loc,
                f"constraint operator {op!r} is not one of {', '.join(CONSTRAINT_OPERATORS)}",
                pos,
            )
        if op == "regex":
            why = regex_error(value)
            if why is not None:
                self.fail(
                    c.value.loc,
                    f"bad constraint regex {value!r}: {why} (RE2 syntax: no backreferences "
                    "or lookaround)",
                    pos,
                )
        if not attr:
            self.fail(c.attribute.loc, "constraint attribute is empty", pos)
        return Constraint(attr, value, op)

    # -- calls -----------------------------------------------------------------

    def call(self, r: RoleDef, scope: _Scope) -> None:
        c = r.call
        assert c is not None and c.trigger is not None
        st, pos = scope.stack, scope.pos
        if len(self.tasks) + len(self.calls) >= self.max_tasks:
            raise _Abort(
                c.func.loc,
                f"the plan has more than {self.max_tasks} tasks and calls, the limit; stopped here",
                pos.path,
            )
        try:
            func, env = call_func(self.mtext(c.func, st, pos))
        except ValueError as e:
            self.fail(c.func.loc, str(e), pos)
        func = func.strip()
        if not _FUNC.match(func):
            self.fail(c.func.loc, f"call func {func!r} must look like plugin.Method(...)", pos)
        trig = self.trigger(c.trigger, st, pos)
        awaited = trig if c.await_ is None else self.trigger(c.await_, st, pos)
        if c.await_ is not None and not awaited.not_before(trig):
            self.fail(c.await_.loc, f"await {awaited} comes before trigger {trig}", pos)
        timeout = self.duration(c.timeout, st, pos, DEFAULT_CALL_TIMEOUT)
        assert timeout is not None
        critical = self.bool_text(c.critical, True, st, pos, "critical")
        ret = None if c.return_var is None else (self.text(c.return_var, st, pos).strip() or None)
        assert pos.path is not None
        self.calls.append(
            CallSpec(pos.path, func, trig, awaited, timeout, critical, ret, tuple(env))
        )

    # -- tasks -----------------------------------------------------------------

    def task(self, r: RoleDef, scope: _Scope) -> None:
        ref = r.task
        assert ref is not None
        pos = scope.pos
        path = pos.path
        assert path is not None
        if len(self.tasks) + len(self.calls) >= self.max_tasks:
            raise _Abort(
                r.name.loc,
                f"the plan has more than {self.max_tasks} tasks and calls, the limit; stopped here",
                path,
            )
        name = self.text(ref.load, scope.stack, pos).strip()
        tc = self.lib.task_class(name, ref.load.loc)
        if tc is None:
            raise _Skip
        host = HOST_PLACEHOLDER
        for c in scope.constraints:
            if c.attribute in ("machine_id", "hostname") and c.operator == "equals":
                host = c.value
        parent = pos.parent.path if pos.parent is not None else None
        own = {
            "task_name": pos.path or "",
            "task_class_name": name,
            "task_parent_role": parent or "",
            "task_hostname": host,
        }
        stack = _TaskVars(self.class_stack(tc, scope), own)
        resolved = self.resolve_class(tc, stack, pos)
        critical = self.bool_text(ref.critical, True, stack, pos, "critical")
        mode = resolved.mode
        trig = awaited = None
        timeout = None
        if ref.trigger is not None:
            if mode in PROTOCOL_MODES:
                self.fail(
                    ref.trigger.loc,
                    f"task class {name!r} is a {mode}-control task; "
                    "only basic tasks run at a trigger",
                    pos,
                )
            mode = "hook"
            trig = self.trigger(ref.trigger, stack, pos)
            awaited = trig if ref.await_ is None else self.trigger(ref.await_, stack, pos)
            if ref.await_ is not None and not awaited.not_before(trig):
                self.fail(ref.await_.loc, f"await {awaited} comes before trigger {trig}", pos)
            timeout = self.duration(ref.timeout, stack, pos, DEFAULT_CALL_TIMEOUT)
        elif mode == "hook":
            self.fail(ref.loc, f"task class {name!r} is a hook: the role needs a trigger", pos)
        elif ref.await_ is not None:
            self.fail(ref.await_.loc, "await applies to hook tasks, which need a trigger", pos)
        elif ref.timeout is not None:
            if mode != "basic":
                self.fail(
                    ref.timeout.loc,
                    f"timeout applies to basic and hook tasks, and this task is {mode}",
                    pos,
                )
            # AliECS: a basic task is ended when it runs longer; 0s (or none) is no limit
            timeout = self.duration(ref.timeout, stack, pos, 0.0) or None
        if resolved.health is not None and mode != "basic":
            self.fail(tc.loc, f"health checks are for basic tasks, and this task is {mode}", pos)
        merged = self._merged.get((id(tc), id(r)))
        if merged is None:
            merged = (_merge_channels(tc.binds, r.binds), _merge_channels(tc.connects, r.connects))
            self._merged[(id(tc), id(r))] = merged
        binds, connects = merged
        if binds or connects:
            self.channels(path, binds, connects, stack, pos)
        self.tasks.append(
            TaskSpec(
                path,
                name,
                resolved.command,
                mode,
                critical,
                resolved.wants,
                resolved.limits,
                scope.constraints,
                resolved.properties,
                trig,
                awaited,
                timeout,
                resolved.health,
                scope.collection,
            )
        )

    def class_stack(self, tc: TaskClassDef, scope: _Scope) -> dict[str, str]:
        """The task's variables: class defaults under the role's, class vars under its vars."""
        if not tc.defaults and not tc.vars:
            return scope.stack
        pos = scope.pos
        g, u = self.gdefaults, self.user
        own = {vd.name for vd in tc.vars} if tc.vars else ()
        sd, sv, gv, sl = scope.defaults, scope.vars, self.gvars, scope.locals
        cd = self.defaults_block(
            tc.defaults,
            scope.stack,
            lambda n: n in sd or n in own or n in sv or n in gv or n in u or n in sl,
            pos,
        )
        if not tc.vars:
            return {**g, **cd, **scope.defaults, **self.gvars, **scope.vars, **u, **scope.locals}
        s1 = {**g, **cd, **scope.defaults, **self.gvars, **scope.vars, **u, **scope.locals}
        cv = {vd.name: self.mtext(vd.value, s1, pos) for vd in tc.vars}
        return {**g, **cd, **scope.defaults, **self.gvars, **cv, **scope.vars, **u, **scope.locals}

    def resolve_class(
        self, tc: TaskClassDef, stack: Mapping[str, str], pos: RolePos
    ) -> _ResolvedClass:
        """Command, mode, resources and properties of a task.

        Each of the two parts (the command; the rest) is cached on the values of the
        variables its expressions read, so tasks that differ only in, say, their
        command arguments share one resolved copy of everything else.
        """
        entry = self._class_cache.get(id(tc))
        if entry is None:
            if tc.command is None:
                raise _Skip  # reported when the class was parsed
            entry = (_Memo(self._names(_command_texts(tc))), _Memo(self._names(_static_texts(tc))))
            self._class_cache[id(tc)] = entry
        command = entry[0].get(stack, lambda: self._command(tc, stack, pos))
        mode, wants, limits, props, health = entry[1].get(
            stack, lambda: self._static(tc, stack, pos)
        )
        return _ResolvedClass(command, mode, wants, limits, props, health)

    def _names(self, texts: list[Text]) -> tuple[str, ...] | None:
        """Variables the texts read; None when one of them must be evaluated every time."""
        names: dict[str, None] = {}
        for t in texts:
            for hole in t.holes:
                e = self.ev.expr(hole.source)
                if e.error is not None or e.analysis.uses_role or e.analysis.volatile:
                    return None
                names.update(dict.fromkeys(e.analysis.names))
        return tuple(names)

    def _command(self, tc: TaskClassDef, stack: Mapping[str, str], pos: RolePos) -> Command:
        c = tc.command
        assert c is not None
        value = self.mtext(c.value, stack, pos)
        if not unmark(value).strip():
            self.fail(c.value.loc, f"task class {tc.name!r}: command value is empty", pos)
        args = tuple([self.text(a, stack, pos) for a in c.arguments])
        env = []
        for e in c.env:
            m = self.mtext(e, stack, pos)
            s = unmark(m)
            k, eq, val = s.partition("=")
            if not eq or not k.strip():
                self.fail(e.loc, f"env entry {s!r} must look like NAME=value", pos)
            if marked(m.partition("=")[0]):
                # a caller names values, never variables (LD_PRELOAD, PATH, CORRAL_*)
                self.fail(e.loc, f"env entry {s[:60]!r}: its name comes from a caller", pos)
            env.append((k.strip(), val))
        shell = self.bool_text(c.shell, False, stack, pos, "shell")
        if shell:  # a caller's value is read from a variable, never parsed
            try:
                value, values = shell_script(value)
            except ValueError as e:
                self.fail(c.value.loc, str(e), pos)
            env.extend(values)
        else:
            value = unmark(value)
        user = None if c.user is None else (self.text(c.user, stack, pos).strip() or None)
        cwd = None if c.cwd is None else (self.text(c.cwd, stack, pos).strip() or None)
        return Command(value, args, tuple(env), shell, user, cwd)

    def _static(
        self, tc: TaskClassDef, stack: Mapping[str, str], pos: RolePos
    ) -> tuple[str, Resources, Resources | None, tuple[tuple[str, str], ...], HealthCheck | None]:
        mode = "basic" if tc.mode is None else self.text(tc.mode, stack, pos).strip()
        if mode not in CONTROL_MODES:
            assert tc.mode is not None
            self.fail(
                tc.mode.loc,
                f"control mode {mode!r} is not one of {', '.join(CONTROL_MODES)}",
                pos,
            )
        wants = self.resources(tc.wants, stack, pos) or NO_RESOURCES
        limits = self.resources(tc.limits, stack, pos)
        props = tuple((k, self.text(t, stack, pos)) for k, t in tc.properties)
        health = None
        if tc.health is not None:
            h = tc.health
            argv = (
                self.text(h.command, stack, pos),
                *(self.text(a, stack, pos) for a in h.arguments),
            )
            interval = self.duration(h.interval, stack, pos, 10.0)
            htimeout = self.duration(h.timeout, stack, pos, 5.0)
            assert interval is not None and htimeout is not None
            failures = 3
            if h.failures is not None:
                failures = int(self.number(h.failures, stack, pos, "health failures", integer=True))
            health = HealthCheck(argv, interval, htimeout, failures)
        return mode, wants, limits, props, health

    def resources(
        self, r: ResourcesDef | None, stack: Mapping[str, str], pos: RolePos
    ) -> Resources | None:
        if r is None:
            return None
        return Resources(
            cpu=float(self.number(r.cpu, stack, pos, "cpu", integer=False)),
            memory=int(self.number(r.memory, stack, pos, "memory", integer=True)),
            gpu=int(self.number(r.gpu, stack, pos, "gpu", integer=True)),
            ports=int(self.number(r.ports, stack, pos, "ports", integer=True)),
        )

    # -- channels ----------------------------------------------------------------

    def channels(
        self,
        path: str,
        binds: list[ChannelDef],
        connects: list[ChannelDef],
        stack: Mapping[str, str],
        pos: RolePos,
    ) -> None:
        for ch in binds:
            ctype, transport, addressing, alias, props = self.channel_fields(ch, stack, pos)
            b = Bind(path, ch.name, ctype, transport, addressing, alias, props)
            self.binds[(path, ch.name)] = (b, ch.loc)
            if alias is not None:
                seen = self.aliases.get(alias)
                if seen is not None:
                    self.fail(
                        ch.loc,
                        f"global channel alias {alias!r} is already bound by "
                        f"{seen[0].task}:{seen[0].name} ({seen[1]})",
                        pos,
                    )
                self.aliases[alias] = (b, ch.loc)
        for ch in connects:
            ctype, transport, _, _, props = self.channel_fields(ch, stack, pos)
            assert ch.target is not None
            target = self.text(ch.target, stack, pos).strip()
            self.connects.append(
                _PendingConnect(path, ch.name, ctype, target, transport, props, ch.target.loc)
            )

    def channel_fields(
        self, ch: ChannelDef, stack: Mapping[str, str], pos: RolePos
    ) -> tuple[str, str, str, str | None, tuple[tuple[str, str], ...]]:
        """(type, transport, addressing, global alias, properties), cached per inputs."""
        memo = self._channel_cache.get(id(ch))
        if memo is None:
            texts = [t for t in (ch.type, ch.transport, ch.addressing, ch.global_alias) if t]
            texts += [t for _, t in ch.properties]
            memo = self._channel_cache[id(ch)] = _Memo(self._names(texts))
        return memo.get(stack, lambda: self._channel_fields(ch, stack, pos))  # type: ignore[no-any-return]

    def _channel_fields(
        self, ch: ChannelDef, stack: Mapping[str, str], pos: RolePos
    ) -> tuple[str, str, str, str | None, tuple[tuple[str, str], ...]]:
        if ch.type is None:
            self.fail(ch.loc, f"{ch.kind} {ch.name!r} needs a type (push, pull, pub or sub)", pos)
        assert ch.type is not None
        ctype = self.text(ch.type, stack, pos)
        if ctype not in CHANNEL_TYPES:
            self.fail(
                ch.type.loc,
                f"{ch.kind} {ch.name!r}: type {ctype!r} is not one of push, pull, pub, sub",
                pos,
            )
        addressing = "tcp" if ch.addressing is None else self.text(ch.addressing, stack, pos)
        if addressing not in ADDRESSING:
            assert ch.addressing is not None
            self.fail(
                ch.addressing.loc,
                f"{ch.kind} {ch.name!r}: addressing {addressing!r} is not one of tcp, ipc",
                pos,
            )
        transport = "zeromq" if ch.transport is None else self.text(ch.transport, stack, pos)
        alias = None
        if ch.global_alias is not None:
            alias = self.text(ch.global_alias, stack, pos) or None
        props = tuple((k, self.text(t, stack, pos)) for k, t in ch.properties)
        return ctype, transport, addressing, alias, props

    def resolve_channels(self) -> None:
        """Resolve each connect to exactly one bind, or report why it cannot."""
        self.connected: list[Connect] = []
        for pc in self.connects:
            target = pc.target
            bind: Bind | None = None
            address = None
            if target.startswith(("tcp://", "ipc://")):
                address = target
            elif target.startswith("::"):
                found = self.aliases.get(target[2:])
                if found is None:
                    self.diags.error(
                        pc.loc,
                        f"connect {pc.name!r}: no channel is bound with global alias "
                        f"{target[2:]!r}",
                        pc.task,
                    )
                    continue
                bind = found[0]
            else:
                role, sep, chan = target.rpartition(":")
                if not sep or not role or not chan:
                    self.diags.error(
                        pc.loc,
                        f"connect {pc.name!r}: bad target {target!r}; use role.path:channel, "
                        "::alias, tcp://host:port or ipc://path",
                        pc.task,
                    )
                    continue
                found = self.binds.get((role, chan))
                if found is None:
                    here = [n for (t, n) in self.binds if t == role] if role in self.paths else None
                    if here is None:
                        why = f"no task at role path {role!r}"
                    elif here:
                        why = f"{role!r} binds no channel {chan!r} (it binds: {', '.join(here)})"
                    else:
                        why = f"{role!r} binds no channels"
                    self.diags.error(pc.loc, f"connect {pc.name!r} to {target!r}: {why}", pc.task)
                    continue
                bind = found[0]
            if bind is not None and _COMPLEMENT[bind.type] != pc.type:
                self.diags.error(
                    pc.loc,
                    f"connect {pc.name!r} is {pc.type} but {bind.task}:{bind.name} binds "
                    f"{bind.type}; a {bind.type} bind takes a {_COMPLEMENT[bind.type]} connect",
                    pc.task,
                )
                continue
            self.connected.append(
                Connect(
                    pc.task,
                    pc.name,
                    pc.type,
                    target,
                    None if bind is None else bind.task,
                    None if bind is None else bind.name,
                    address,
                    pc.transport,
                    pc.properties,
                )
            )

    # -- public variables ----------------------------------------------------------

    def _collect_public(self, defs: list[VarDef]) -> None:
        for vd in defs:
            if vd.public is None or vd.name in self.public:
                continue
            self.public[vd.name] = public_var(vd)


def _command_texts(tc: TaskClassDef) -> list[Text]:
    c = tc.command
    if c is None:
        return []
    return [c.value, *c.arguments, *c.env, *(t for t in (c.shell, c.user, c.cwd) if t is not None)]


def _static_texts(tc: TaskClassDef) -> list[Text]:
    texts: list[Text] = [] if tc.mode is None else [tc.mode]
    for res in (tc.wants, tc.limits):
        if res is not None:
            texts += [t for t in (res.cpu, res.memory, res.gpu, res.ports) if t is not None]
    texts += [t for _, t in tc.properties]
    if tc.health is not None:
        h = tc.health
        texts += [h.command, *h.arguments]
        texts += [t for t in (h.interval, h.timeout, h.failures) if t is not None]
    return texts


def _merge_channels(defaults: list[ChannelDef], own: list[ChannelDef]) -> list[ChannelDef]:
    """Class channel defaults overridden field by field by the role's, by name."""
    if not own:
        return defaults
    if not defaults:
        return own
    by_name = {c.name: c for c in defaults}
    out = list(defaults)
    for c in own:
        base = by_name.get(c.name)
        if base is None:
            out.append(c)
            continue
        merged = ChannelDef(
            c.kind,
            c.name,
            c.loc,
            type=c.type or base.type,
            transport=c.transport or base.transport,
            addressing=c.addressing or base.addressing,
            global_alias=c.global_alias or base.global_alias,
            target=c.target or base.target,
            properties=list({**dict(base.properties), **dict(c.properties)}.items()),
        )
        out[out.index(base)] = merged
    return out


def _input_as_read(result: str, names: tuple[str, ...], stack: Mapping[str, str]) -> str | None:
    """The value, with its marks, of a variable the expression read that is exactly
    ``result`` (a clean one first, then the one marked least); None if none is."""
    best = None
    for n in names:
        v = stack.get(n)
        if v is None or len(v) < len(result):
            continue
        if v == result:
            return v  # holds no caller's value
        if unmark(v) == result and (best is None or len(v) < len(best)):
            best = v
    return best


def _role_of(pos: RolePos | None) -> str | None:
    return pos.path if pos is not None and pos.path else _parent_path(pos)


def _parent_path(pos: RolePos | None) -> str | None:
    """For messages: the path of a role whose name is not known yet, as written."""
    label = pos.label if pos is not None else ""
    while pos is not None:
        if pos.path:
            return f"{pos.path}.{label}" if label else pos.path
        pos = pos.parent
    return label or None


def _environment_id(seed: str) -> str:
    return Evaluator(seed + ":environment").new_uid()


__all__ = ["check", "expand", "parse_duration"]


_HOLE = re.compile(r"\{\{(.*?)\}\}", re.S)


def check_task_file(
    path: str,
    sources: Sources,
    *,
    variables: Mapping[str, str] | None = None,
    global_defaults: Mapping[str, str] | None = None,
) -> list[Diagnostic]:
    """Errors of a task class file checked on its own, wherever it is: loaded by a
    one-role workflow (as ``tasks/NAME.yaml`` of a folder of its own) and expanded,
    every variable that a workflow would give it (and nothing here defines) standing in
    as its own name."""
    path = posixpath.normpath(path)
    name = posixpath.basename(path).rsplit(".", 1)[0]
    here = posixpath.join(posixpath.dirname(path), "__corral_task_check__")
    root = posixpath.join(here, "wf.yaml")
    as_class = posixpath.join(here, "tasks", name + ".yaml")
    text = sources.read(path)
    if text is None:
        return [Diagnostic(Loc(path), "no such file", None)]
    names: dict[str, None] = {}
    for m in _HOLE.finditer(text):
        with contextlib.suppress(Exception):  # a broken expression is said by the check
            names.update(dict.fromkeys(analyze(m.group(1)).names))
    defined = {**(global_defaults or {}), **(variables or {})}
    stand_ins = {n: n for n in names if n not in defined}
    wf = f"name: check\nroles:\n  - name: task\n    task:\n      load: {json.dumps(name)}\n"

    class _With:
        def read(self, p: str) -> str | None:
            if p == root:
                return wf
            return text if p == as_class else sources.read(p)

    _, diags = check(
        root, _With(), variables=variables, global_defaults={**stand_ins, **(global_defaults or {})}
    )
    out = []
    for d in diags:
        if d.loc.file == as_class:
            d = dataclasses.replace(d, loc=dataclasses.replace(d.loc, file=path))
        if d.loc.file != root:
            out.append(d)
    return out
