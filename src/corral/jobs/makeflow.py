"""Makeflow files (CCTools' classic make syntax) parsed into a DAG of steps.

Pure: text in, frozen dataclasses out. The process environment, which Makeflow reads
for undefined variables, ``export NAME`` and default resources, is a parameter.

Semantics (those of CCTools' lexer and parser, restricted to a subset; anything
outside it is refused with ``FILE:LINE``, never ignored):

- A rule is ``targets : sources`` followed by exactly one command line, indented
  with a tab (or spaces). ``file->remote`` renames a file in the job's sandbox.
- ``NAME=value`` and ``NAME+=value`` (append with a space) assign; the value is
  expanded when assigned, as Makeflow does (like make's ``:=``). ``$(NAME)``,
  ``${NAME}`` and ``$NAME`` expand outside single quotes; an undefined name is an
  error. So a variable cannot expand into itself: ``A=$(A)$(A)`` uses A's previous
  value, and growth is stopped by a size bound.
- Between a rule's header and its command, ``NAME=value``, ``@NAME=value`` and
  ``.MAKEFLOW KEY value`` lines apply to that rule only.
- ``CATEGORY=name`` or ``.MAKEFLOW CATEGORY name`` switches the category of the
  rules that follow; other top-level variables belong to the current category, and a
  lookup goes rule, category, ``default`` category, then the environment.
- ``CORES``, ``MEMORY`` (MB), ``DISK`` (MB), ``GPUS`` and ``WALL_TIME`` (s) are
  resource hints, read through the same lookup.
- ``export NAME`` / ``export NAME=value`` pass variables to every job.
- ``LOCAL`` before a command runs it on the controlling machine (so does a true
  ``BATCH_LOCAL``).
- ``#`` outside quotes starts a comment; a backslash at the end of a line continues
  it. Other backslashes are refused: Makeflow drops them where the shell would not.

Refused: nested ``MAKEFLOW`` commands, ``.SIZE`` / ``.UMBRELLA`` / ``.MAKEFLOW MODE``,
quoted file names, a single quote inside double quotes, ``$$`` and other stray ``$``.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

MAX_FILE_CHARS = 64 * 1024 * 1024
MAX_LINE_CHARS = 1024 * 1024
MAX_EXPANSION_CHARS = 1024 * 1024
MAX_COMMANDS_CHARS = 64 * 1024 * 1024  # all rules' expanded commands together
MAX_RULES = 100_000
MAX_ERRORS = 100

RESOURCE_NAMES = ("CORES", "MEMORY", "DISK", "GPUS", "WALL_TIME")
DEFAULT_CATEGORY = "default"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_FULL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SPECIAL = re.compile(r"['\"$#\\]")
_IN_DOUBLE = re.compile(r"[\"'$\\]")
_LOCAL_VAR = re.compile(r"[ ]+@?[A-Za-z_][A-Za-z0-9_]*\s*\+?=")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Problem:
    """One error of a file, at a 1-based line (0 for the file as a whole)."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class MakeflowError(ValueError):
    """A Makeflow file that cannot be parsed; ``problems`` holds every error found."""

    def __init__(
        self, path: str, line: int, message: str, problems: tuple[Problem, ...] = ()
    ) -> None:
        self.path = path
        self.line = line
        self.message = message
        self.problems = problems or (Problem(path, line, message),)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Resources:
    """A rule's resource hints; None where neither the file nor the environment says."""

    cores: int | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    gpus: int | None = None
    wall_time_s: int | None = None


@dataclass(frozen=True)
class Rule:
    """One step: its expanded command makes ``targets`` from ``sources``."""

    line: int
    targets: tuple[str, ...]
    sources: tuple[str, ...]
    command: str
    local: bool
    category: str
    resources: Resources
    env: tuple[tuple[str, str], ...]
    remote_names: tuple[tuple[str, str], ...] = ()
    """(file, name in the job's sandbox) for each ``file->name``."""


@dataclass(frozen=True)
class Makeflow:
    """The rules in file order and the DAG between them."""

    rules: tuple[Rule, ...]
    variables: Mapping[str, str]
    """Top-level variables of the default category at the end of the file."""
    deps: tuple[tuple[int, ...], ...] = ()
    """For each rule (by index), the rules producing one of its sources."""
    inputs: tuple[str, ...] = ()
    """Sources that no rule produces: they must exist when the flow runs."""
    outputs: tuple[str, ...] = ()
    """Targets that no rule consumes: the flow's results."""
    exports: tuple[str, ...] = ()
    _producers: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def producer(self, file: str) -> int | None:
        """The index of the rule making ``file``, None for an input."""
        return self._producers.get(file)

    def order(self) -> tuple[int, ...]:
        """Rule indices, each after the rules it depends on (file order among equals)."""
        waiting = [len(d) for d in self.deps]
        users: list[list[int]] = [[] for _ in self.rules]
        for i, ds in enumerate(self.deps):
            for d in ds:
                users[d].append(i)
        ready = [i for i, n in enumerate(waiting) if n == 0]
        out: list[int] = []
        while ready:
            i = heapq.heappop(ready)
            out.append(i)
            for u in users[i]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(ready, u)
        return tuple(out)


class _LineError(Exception):
    pass


# ---------------------------------------------------------------- scanning


def _scan(s: str) -> Iterator[tuple[int, str, bool]]:
    """Yield (index, char, quoted) for each special char of ``s``, checking quotes."""
    pos = 0
    while True:
        m = _SPECIAL.search(s, pos)
        if m is None:
            return
        i, c = m.start(), m.group()
        if c == "\\":
            raise _LineError(
                "backslash escapes are not supported (Makeflow drops the backslash where "
                "the shell would keep it); only a backslash ending a line is"
            )
        if c == "'":
            end = s.find("'", i + 1)
            if end < 0:
                raise _LineError("missing closing '")
            pos = end + 1
            continue
        if c == '"':
            j = i + 1
            while True:
                m2 = _IN_DOUBLE.search(s, j)
                if m2 is None:
                    raise _LineError('missing closing "')
                c2 = m2.group()
                if c2 == '"':
                    break
                if c2 == "'":
                    raise _LineError(
                        "a single quote inside double quotes is not supported "
                        "(Makeflow reads it as a quote, the shell does not)"
                    )
                if c2 == "\\":
                    raise _LineError("backslash escapes are not supported")
                yield m2.start(), c2, True
                j = m2.end()
            pos = m2.end()
            continue
        yield i, c, False
        pos = i + 1


def _uncomment(s: str) -> str:
    for i, c, _ in _scan(s):
        if c == "#":
            return s[:i]
    return s


def _find_unquoted(s: str, ch: str) -> int:
    """Index of the first ``ch`` outside quotes, or -1; linear in ``len(s)``."""
    stops = re.compile("[" + re.escape(ch) + "'\"]")
    pos = 0
    while True:
        m = stops.search(s, pos)
        if m is None:
            return -1
        c = m.group()
        if c == ch:
            return m.start()
        end = s.find(c, m.end())
        if end < 0:
            return -1
        pos = end + 1


def _expand(s: str, lookup: Callable[[str], str | None]) -> str:
    """Expand ``$(NAME)``, ``${NAME}`` and ``$NAME`` outside single quotes."""
    if "$" not in s:
        if len(s) > MAX_EXPANSION_CHARS:
            raise _LineError(f"text longer than {MAX_EXPANSION_CHARS} characters")
        return s
    parts: list[str] = []
    size = 0
    pos = 0
    for i, c, _ in _scan(s):
        if c != "$" or i < pos:
            continue
        close = {"(": ")", "{": "}"}.get(s[i + 1 : i + 2], "")
        start = i + 2 if close else i + 1
        m = _NAME.match(s, start)
        if m is None or (close and s[m.end() : m.end() + 1] != close):
            shown = s[i : i + 12]
            raise _LineError(
                f"stray '$' at {shown!r}: write $(NAME), ${{NAME}} or $NAME; "
                "put a shell '$' in single quotes (Makeflow has no $$)"
            )
        value = lookup(m.group())
        if value is None:
            raise _LineError(f"variable {m.group()} is not defined")
        end = m.end() + (1 if close else 0)
        parts.append(s[pos:i])
        parts.append(value)
        size += (i - pos) + len(value)
        if size > MAX_EXPANSION_CHARS:
            raise _LineError(f"expansion longer than {MAX_EXPANSION_CHARS} characters")
        pos = end
    parts.append(s[pos:])
    size += len(s) - pos
    if size > MAX_EXPANSION_CHARS:
        raise _LineError(f"expansion longer than {MAX_EXPANSION_CHARS} characters")
    return "".join(parts)


def _logical_lines(text: str) -> Iterator[tuple[int, str | None]]:
    """(first physical line, text) with backslash-newline joined by a space.

    The text is None for a line longer than MAX_LINE_CHARS.
    """
    lines = text.split("\n")
    buf: list[str] = []
    first = 0
    size = 0
    for n, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not buf:
            first = n
        size += len(line)
        if size > MAX_LINE_CHARS:
            # Swallow the rest of an over-long logical line; report it once.
            if line.endswith("\\"):
                continue
            yield first, None
            buf, size = [], 0
            continue
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        yield first, " ".join(buf)
        buf, size = [], 0
    if buf:
        yield first, " ".join(buf)


# ---------------------------------------------------------------- parsing


@dataclass
class _Pending:
    line: int
    targets: list[str]
    sources: list[str]
    remote: list[tuple[str, str]]
    category: str
    local_vars: dict[str, str] = field(default_factory=dict)
    broken: bool = False


class _Parser:
    def __init__(self, path: str, environ: Mapping[str, str]) -> None:
        self.command_chars = 0  # all expanded commands so far (MAX_COMMANDS_CHARS)
        self.path = path
        self.environ = environ
        self.problems: list[Problem] = []
        self.scopes: dict[str, dict[str, str]] = {DEFAULT_CATEGORY: {}}
        self.category = DEFAULT_CATEGORY
        self.exports: list[str] = []
        self.rules: list[Rule] = []
        self.pending: _Pending | None = None
        self.last_rule_line = 0  # a rule whose command was read; more commands refused

    # lookups -------------------------------------------------------------

    def lookup(self, name: str) -> str | None:
        """Rule (while one is open), category, default category, environment."""
        if self.pending is not None:
            return self.lookup_in(name, self.pending.local_vars, self.pending.category)
        return self.lookup_in(name, {}, self.category)

    def lookup_in(self, name: str, local: Mapping[str, str], category: str) -> str | None:
        if name in local:
            return local[name]
        scope = self.scopes.get(category)
        if scope is not None and name in scope:
            return scope[name]
        default = self.scopes[DEFAULT_CATEGORY]
        if name in default:
            return default[name]
        return self.environ.get(name)

    def error(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message))

    # lines ---------------------------------------------------------------

    def run(self, text: str) -> None:
        if len(text) > MAX_FILE_CHARS:
            self.error(0, f"file larger than {MAX_FILE_CHARS} characters")
            return
        for n, raw in _logical_lines(text):
            if len(self.problems) >= MAX_ERRORS:
                self.error(n, f"more than {MAX_ERRORS} errors, stopping")
                return
            if raw is None:
                self.error(n, f"line longer than {MAX_LINE_CHARS} characters")
                if self.pending is not None:
                    self.pending.broken = True
                continue
            try:
                self.line(n, raw)
            except _LineError as e:
                self.error(n, str(e))
                if self.pending is not None:
                    self.pending.broken = True
            if len(self.rules) > MAX_RULES:
                self.error(n, f"more than {MAX_RULES} rules")
                return
        if self.pending is not None:
            self.no_command()

    def no_command(self) -> None:
        assert self.pending is not None
        if not self.pending.broken:
            self.error(self.pending.line, "rule has no command")
        self.pending = None

    def line(self, n: int, raw: str) -> None:
        text = _uncomment(raw)
        if not text.strip():
            return
        if text[0] in " \t":
            if self.pending is not None and not (text[0] == " " and _LOCAL_VAR.match(text)):
                return self.command(n, text.strip())
            if text[0] == "\t" or self.last_rule_line:
                if self.last_rule_line:
                    raise _LineError(
                        f"the rule at line {self.last_rule_line} already has a command: "
                        "a rule has exactly one, join commands with ';'"
                    )
                raise _LineError("command line outside a rule")
            text = text.strip()
        self.last_rule_line = 0
        stripped = text.strip()
        if stripped.startswith("@"):
            return self.assign(n, stripped[1:])
        if stripped.startswith("."):
            return self.directive(n, stripped)
        word = stripped.split(None, 1)[0]
        if word == "export":
            if self.pending is not None:
                self.no_command()
            return self.export(n, stripped[len("export") :].strip())
        colon, equal = _find_unquoted(stripped, ":"), _find_unquoted(stripped, "=")
        if colon >= 0 and (equal < 0 or colon < equal):
            if self.pending is not None:
                self.no_command()
            return self.header(n, stripped, colon)
        if equal >= 0:
            return self.assign(n, stripped)
        raise _LineError(f"unrecognized line {stripped[:40]!r}: not a rule, variable or command")

    def assign(self, n: int, text: str) -> None:
        equal = _find_unquoted(text, "=")
        if equal < 0:
            raise _LineError("missing '=' in variable definition")
        name, value = text[:equal].rstrip(), text[equal + 1 :].strip()
        append = name.endswith("+")
        if append:
            name = name[:-1].rstrip()
        if not _NAME_FULL.match(name):
            raise _LineError(f"bad variable name {name!r} (only NAME=value and NAME+=value)")
        expanded = _expand(value, self.lookup)
        if append:
            old = self.lookup(name)
            if old is not None:
                expanded = f"{old} {expanded}" if expanded else old
        if len(expanded) > MAX_EXPANSION_CHARS:
            raise _LineError(f"value of {name} longer than {MAX_EXPANSION_CHARS} characters")
        self.set(n, name, expanded)

    def set(self, n: int, name: str, value: str) -> None:
        if name in RESOURCE_NAMES:
            _resource_int(name, value)  # checked when set, reported here
        if self.pending is not None:
            if name == "CATEGORY":
                self.pending.category = _unquote(value) or DEFAULT_CATEGORY
            self.pending.local_vars[name] = value
            return
        if name == "CATEGORY":
            self.category = _unquote(value) or DEFAULT_CATEGORY
            self.scopes[DEFAULT_CATEGORY][name] = value
            self.scopes.setdefault(self.category, {})
            return
        self.scopes.setdefault(self.category, {})[name] = value

    def directive(self, n: int, text: str) -> None:
        words = text.split()
        if words[0] != ".MAKEFLOW":
            raise _LineError(f"directive {words[0]} is not supported (only .MAKEFLOW)")
        if len(words) != 3:
            raise _LineError(".MAKEFLOW takes a KEY and a value")
        key, value = words[1], _expand(words[2], self.lookup)
        if key not in ("CATEGORY", *RESOURCE_NAMES):
            raise _LineError(
                f".MAKEFLOW {key} is not supported (CATEGORY, {', '.join(RESOURCE_NAMES)})"
            )
        self.set(n, key, value)

    def export(self, n: int, rest: str) -> None:
        if self.rules or self.pending is not None:
            raise _LineError(
                "export after the first rule is not supported: Makeflow applies it to the "
                "rules before it too; move it above the rules"
            )
        equal = _find_unquoted(rest, "=")
        if equal >= 0:
            self.assign(n, rest)
            names = [rest[:equal].rstrip().rstrip("+").rstrip()]
        else:
            names = rest.split()
            if not names:
                raise _LineError("export names no variable")
            for name in names:
                if not _NAME_FULL.match(name):
                    raise _LineError(f"bad variable name {name!r}")
        for name in names:
            if name not in self.exports:
                self.exports.append(name)

    def header(self, n: int, text: str, colon: int) -> None:
        self.pending = _Pending(n, [], [], [], self.category, broken=True)
        targets = self.files(text[:colon], self.pending)
        sources = self.files(text[colon + 1 :], self.pending)
        if not targets:
            raise _LineError("rule has no targets")
        self.pending.targets = _unique(targets)
        self.pending.sources = _unique(sources)
        self.pending.broken = False

    def files(self, text: str, pending: _Pending) -> list[str]:
        if "'" in text or '"' in text:
            raise _LineError("quoted file names are not supported")
        out: list[str] = []
        for word in _expand(text, self.lookup).split():
            name, arrow, remote = word.partition("->")
            if ":" in word:
                raise _LineError(f"':' in file name {word!r} (one ':' per rule header)")
            if arrow and (not name or not remote or "->" in remote):
                raise _LineError(f"bad remote name {word!r}: write file->remote")
            if arrow:
                pending.remote.append((name, remote))
            out.append(name)
        return out

    def command(self, n: int, text: str) -> None:
        p = self.pending
        assert p is not None
        if text.startswith((".MAKEFLOW", "@")):
            raise _LineError(
                "an indented line is a command: write a rule's own variables and "
                ".MAKEFLOW directives unindented, between its header and its command"
            )
        self.pending = None
        self.last_rule_line = p.line
        if p.broken:
            return

        def lookup(name: str) -> str | None:
            return self.lookup_in(name, p.local_vars, p.category)

        command = _expand(text, lookup)
        self.command_chars += len(command)
        if self.command_chars > MAX_COMMANDS_CHARS:
            raise _LineError(f"the rules' commands expand to more than {MAX_COMMANDS_CHARS} "
                             "characters together")  # fmt: skip
        local = (lookup("BATCH_LOCAL") or "").strip().lower() in _TRUE
        words = command.split(None, 1)
        while words and words[0] in ("LOCAL", "MAKEFLOW"):
            if words[0] == "MAKEFLOW":
                raise _LineError("nested makeflows (MAKEFLOW commands) are not supported")
            local = True
            words = words[1].split(None, 1) if len(words) > 1 else []
        command = " ".join(words)
        if not command:
            raise _LineError("empty command")
        res: dict[str, int] = {}
        for name in RESOURCE_NAMES:
            value = lookup(name)
            if value is not None:
                res[name] = _resource_int(name, value)
        env: list[tuple[str, str]] = []
        for name in self.exports:
            value = lookup(name)
            if value is not None:
                env.append((name, value))
        self.rules.append(
            Rule(
                line=p.line,
                targets=tuple(p.targets),
                sources=tuple(p.sources),
                command=command,
                local=local,
                category=p.category,
                resources=Resources(
                    cores=res.get("CORES"),
                    memory_mb=res.get("MEMORY"),
                    disk_mb=res.get("DISK"),
                    gpus=res.get("GPUS"),
                    wall_time_s=res.get("WALL_TIME"),
                ),
                env=tuple(env),
                remote_names=tuple(p.remote),
            )
        )


def _unquote(value: str) -> str:
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1].strip()
    return v


def _resource_int(name: str, value: str) -> int:
    v = _unquote(value)
    if not v.isdigit() or len(v) > 12:
        raise _LineError(f"{name} must be a whole number, not {value!r}")
    return int(v)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------- the DAG


def _dag(
    path: str, rules: list[Rule], problems: list[Problem]
) -> tuple[dict[str, int], list[tuple[int, ...]]]:
    producers: dict[str, int] = {}
    for i, r in enumerate(rules):
        for t in r.targets:
            other = producers.get(t)
            if other is not None:
                problems.append(
                    Problem(
                        path,
                        r.line,
                        f"target {t} is already made by the rule at line {rules[other].line}",
                    )
                )
            else:
                producers[t] = i
    edges: list[list[tuple[int, str]]] = []
    deps: list[tuple[int, ...]] = []
    for r in rules:
        e = [(producers[s], s) for s in r.sources if s in producers]
        edges.append(e)
        deps.append(tuple(sorted({j for j, _ in e})))
    # Iterative DFS; each back edge names one cycle.
    state = [0] * len(rules)  # 0 new, 1 on the path, 2 done
    cycles = 0
    for root in range(len(rules)):
        if state[root]:
            continue
        path_rules = [root]
        path_files: list[str] = []
        cursors = [0]
        state[root] = 1
        while path_rules:
            u = path_rules[-1]
            k = cursors[-1]
            if k == len(edges[u]):
                state[u] = 2
                path_rules.pop()
                cursors.pop()
                if path_files:
                    path_files.pop()
                continue
            cursors[-1] = k + 1
            v, f = edges[u][k]
            if state[v] == 0:
                state[v] = 1
                path_rules.append(v)
                path_files.append(f)
                cursors.append(0)
            elif state[v] == 1 and cycles < MAX_ERRORS:
                cycles += 1
                at = path_rules.index(v)
                chain = [f, *path_files[at:], f]
                problems.append(Problem(path, rules[v].line, "cycle: " + " -> ".join(chain)))
    return producers, deps


def parse(text: str, path: str, environ: Mapping[str, str] | None = None) -> Makeflow:
    """Parse a Makeflow file's text; ``path`` names it in errors.

    ``environ`` stands for the process environment Makeflow would read (undefined
    variables, ``export NAME``, default resources); empty by default.
    Raises MakeflowError listing every error of the file.
    """
    p = _Parser(path, environ or {})
    p.run(text)
    rules = p.rules
    producers, deps = _dag(path, rules, p.problems)
    if p.problems:
        problems = tuple(sorted(p.problems, key=lambda q: q.line))
        first = problems[0]
        raise MakeflowError(first.path, first.line, first.message, problems)
    consumed = {s for r in rules for s in r.sources}
    inputs = sorted({s for r in rules for s in r.sources if s not in producers})
    outputs = [t for r in rules for t in r.targets if t not in consumed]
    return Makeflow(
        rules=tuple(rules),
        variables=MappingProxyType(dict(p.scopes[DEFAULT_CATEGORY])),
        deps=tuple(deps),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        exports=tuple(p.exports),
        _producers=MappingProxyType(producers),
    )


# ---------------------------------------------------------------- GNU make

_MAKE_BAD_FILE = re.compile(r"[%:#;=\\*?\[\]$|'\"(){}]")
_MAKE_RESERVED = re.compile(r"(MAKE.*|SHELL|MFLAGS|GNUMAKEFLAGS|VPATH|\.[A-Z_]+)\Z")


def to_makefile(mf: Makeflow) -> str:
    """The same rules as a GNU Makefile (make 4.3 or later, for grouped targets).

    Commands are fully expanded, so every ``$`` is escaped as ``$$``; exported
    variables become private target-specific exports. Raises ValueError for a file
    name or variable make cannot express.
    """
    out = [
        "# Generated by corral from a Makeflow file: one recipe per rule.",
        "MAKEFLAGS += --no-builtin-rules --no-builtin-variables",
        ".SUFFIXES:",
        ".PHONY: corral-all",
    ]
    targets = [t for r in mf.rules for t in r.targets]
    for t in targets:
        if _MAKE_BAD_FILE.search(t):
            raise ValueError(f"file name {t!r} cannot be written in a Makefile")
    out.append("corral-all: " + " ".join(targets))
    for r in mf.rules:
        for s in r.sources:
            if _MAKE_BAD_FILE.search(s):
                raise ValueError(f"file name {s!r} cannot be written in a Makefile")
        if r.remote_names:
            raise ValueError(f"line {r.line}: remote names (file->name) have no make equivalent")
        if r.command[:1] in "@-+":
            raise ValueError(f"line {r.line}: a command starting with {r.command[0]!r}")
        head = " ".join(r.targets)
        grouped = " &:" if len(r.targets) > 1 else ":"
        out.append("")
        for name, value in r.env:
            if _MAKE_RESERVED.match(name):
                raise ValueError(f"line {r.line}: variable {name} is make's own")
            escaped = value.replace("$", "$$").replace("#", "\\#")
            out.append(f"{head}: private export {name} = {escaped}")
        sources = " ".join(r.sources)
        out.append(f"{head}{grouped} {sources}".rstrip())
        out.append("\t" + r.command.replace("$", "$$"))
    return "\n".join(out) + "\n"
