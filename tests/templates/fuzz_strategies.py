"""Fuzzing template expansion: hostile expressions and template sets, and the property.

Shared by tests/templates/test_fuzz.py (1,000 examples in CI) and
bench/fuzz_templates.py (100,000 and more). Three strategies:

- ``expressions()``: CEL text as templates write it: operators, literals, strings with
  quotes and braces, functions that exist and that do not, variables defined and not,
  role functions, deep nesting, huge numbers, unicode, long concatenation chains, and a
  share of token-level mutations;
- ``expression_templates()``: one small template set with expressions placed in the
  fields that evaluate them (names, enabled, variables, iterators, commands, channels,
  calls, includes, loads, constraints);
- ``template_sets()``: whole template sets: a workflow, included workflows (with
  cycles, and chains up to 70 long) and task classes, generated as structured data
  and dumped as YAML (tags, aliases, cycles), with a share of raw, mutated or invalid
  text; plus hostile caller variables. A third are clean (most give a plan), a third
  have a few wrong values, a third are wild. Their hundreds of decisions are read from
  one drawn byte string (``Choices``), which keeps generation fast and shrinkable.

The property (``run_check``): ``check()`` returns a plan and no diagnostics, or no plan
and diagnostics that each carry a location in one of the files; never another
exception, and never a hang (``time_limit``).

Bounds, so that an example stays small whatever expansion's own caps:

- a chain of doubling variables (``d1: "{{ d0 + d0 }}"`` nested k deep) grows as 2**k;
  it goes up to ``MAX_DOUBLING`` = 40 levels now that expansion caps what an expression
  reads (16 KiB; before that cap, 40 levels needed terabytes and CI kept k <= 14), from
  a base of 2 characters that neither caller nor template variables override;
- iterators have at most a few items, so nested ones stay in the hundreds (one wide
  role has up to 1,500), and a ``for`` end past the cap is 2,000,001, not 1,000,001:
  that one is allowed, a million instances in some 10 s;
- very long caller values sit in variables (``blob*``) that only plain holes and
  short concatenations read, never list macros that could square their size.

What it found is in test_fuzz_regressions.py, minimised.
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import posixpath
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml
from hypothesis import strategies as st

from corral.model import Plan
from corral.templates import Diagnostic, DictSources, Loc, check
from corral.templates.expressions import Evaluator, ExprError, RolePos, render
from corral.templates.text import TAINT_END, TAINT_START

MAX_DOUBLING = 40  # 2 characters * 2**40: stopped by expansion's cap on what an expression reads
DEFAULT_TIMEOUT = 20.0  # seconds per example before it counts as a hang
CHOICE_BYTES = 2048  # decisions of one template set; past the end, every choice is the first
T = TypeVar("T")

# ---------------------------------------------------------------------------
# Hang guard
# ---------------------------------------------------------------------------


class Hang(BaseException):
    """An example ran past its time limit. A BaseException, so that no ``except
    Exception`` in the code under test can turn it into a diagnostic."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after ``seconds`` (SIGALRM).

    A hang inside C code (libyaml, the CEL runtime) never returns to the interpreter,
    so the Python-level alarm cannot fire there: faulthandler's watchdog thread then
    prints every thread's stack and ends the process after three times the limit.
    """
    fired = False

    def on_alarm(signum: int, frame: Any) -> None:
        nonlocal fired
        fired = True
        raise Hang(f"check() ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 3, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
    if fired:  # the alarm's exception was swallowed somewhere: still a hang
        raise Hang(f"check() ran for more than {seconds} s")


# ---------------------------------------------------------------------------
# Examples and the property
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateSet:
    """Everything ``check()`` is given. Its repr is a runnable reproduction."""

    root: str
    files: Mapping[str, str]
    variables: Mapping[str, str] = field(default_factory=dict)
    global_defaults: Mapping[str, str] = field(default_factory=dict)
    global_vars: Mapping[str, str] = field(default_factory=dict)
    seed: str = "0"
    max_tasks: int | None = None
    time_limit: float | None = None  # seconds of a fake clock that ticks 1 ms per reading
    style: str = ""  # for statistics: clean, mild or wild

    def keywords(self) -> dict[str, Any]:
        """check()'s keyword arguments."""
        kw: dict[str, Any] = {
            "variables": dict(self.variables),
            "global_defaults": dict(self.global_defaults),
            "global_vars": dict(self.global_vars),
            "seed": self.seed,
        }
        if self.max_tasks is not None:
            kw["max_tasks"] = self.max_tasks
        if self.time_limit is not None:
            kw["time_limit"] = self.time_limit
            kw["clock"] = itertools.count(0.0, 0.001).__next__
        return kw

    def __repr__(self) -> str:
        def short(value: Mapping[str, str]) -> str:
            return "{" + ", ".join(f"{k!r}: {_clip(v)}" for k, v in value.items()) + "}"

        lines = ["check(", f"    {self.root!r},", "    DictSources({"]
        lines += [f"        {name!r}: {_clip(text)}," for name, text in self.files.items()]
        lines += [
            "    }),",
            f"    variables={short(self.variables)},",
            f"    global_defaults={short(self.global_defaults)},",
            f"    global_vars={short(self.global_vars)},",
            f"    seed={self.seed!r},",
        ]
        if self.max_tasks is not None:
            lines.append(f"    max_tasks={self.max_tasks},")
        if self.time_limit is not None:
            lines.append(
                f"    time_limit={self.time_limit}, clock=itertools.count(0, 0.001).__next__,"
            )
        lines.append(")")
        return "\n".join(lines)


def _clip(text: str) -> str:
    """repr of a string; a long repetition of a short piece as a product."""
    if len(text) > 200:
        for size in range(1, 9):
            piece = text[:size]
            if len(text) % size == 0 and piece * (len(text) // size) == text:
                return f"{piece!r} * {len(text) // size}"
    if len(text) <= 50_000:
        return repr(text)
    return f"{text[:2000]!r} + ...  # {len(text)} characters in all"


@dataclass(frozen=True, slots=True)
class Outcome:
    plan: bool
    seconds: float
    tasks: int
    diagnostics: int


def run_check(ts: TemplateSet, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Expand ``ts`` under a time limit and assert the property; return what happened."""
    sources = DictSources(dict(ts.files))
    t0 = time.perf_counter()
    with time_limit(timeout):
        result = check(ts.root, sources, **ts.keywords())
    seconds = time.perf_counter() - t0
    assert_result(result, ts)
    plan, diags = result
    return Outcome(plan is not None, seconds, 0 if plan is None else len(plan.tasks), len(diags))


def assert_result(result: Any, ts: TemplateSet) -> None:
    """A plan and no diagnostics, or no plan and located diagnostics."""
    assert isinstance(result, tuple) and len(result) == 2, result
    plan, diags = result
    assert isinstance(diags, list), diags
    if plan is None:
        assert diags, "no plan and no diagnostics"
    else:
        assert isinstance(plan, Plan), plan
        assert not diags, diags
        text = json.dumps(plan.to_dict(), ensure_ascii=False)  # a plan is serialisable
        # the marks around a caller's value (templates.text) never reach a plan, unless
        # they were in what the caller or the files gave
        inputs = [*ts.files.values()]
        for given in (ts.variables, ts.global_defaults, ts.global_vars):
            inputs += [*given, *given.values()]
        if not any(TAINT_START in v or TAINT_END in v for v in inputs):
            assert TAINT_START not in text and TAINT_END not in text, "marks in the plan"
    files = {posixpath.normpath(ts.root), *ts.files}
    for d in diags:
        assert isinstance(d, Diagnostic), d
        assert isinstance(d.loc, Loc), d
        assert d.loc.file in files, f"diagnostic in an unknown file: {d}"
        assert isinstance(d.loc.line, int) and d.loc.line >= 0, d
        assert isinstance(d.loc.col, int) and d.loc.col >= 0, d
        assert isinstance(d.message, str) and d.message.strip(), d
        assert d.role is None or isinstance(d.role, str), d
        assert isinstance(d.repeats, int) and d.repeats >= 1, d
        str(d)


def evaluate_directly(expr: str, stack: Mapping[str, str], pos: RolePos | None) -> str | None:
    """Evaluate one expression: its text, or None when it fails with ExprError."""
    ev = Evaluator("fuzz")
    try:
        value = ev.evaluate(ev.expr(expr), stack, pos)
    except ExprError as e:
        assert str(e).strip(), "an ExprError without a message"
        return None
    text = render(value)
    assert isinstance(text, str), text
    return text


# ---------------------------------------------------------------------------
# Expressions
# ---------------------------------------------------------------------------

# variables the expression templates define; "blob*" hold long caller values
DEFINED = ("x", "flag", "hosts", "n", "s", "empty", "quote", "obj", "it", "i", "which")
UNDEFINED = ("nope", "undefined_thing", "X", "_", "a1", "python", "environment_id")
RESERVED = ("in", "int", "type", "null", "while", "has", "size", "contains", "len", "as")
BASE_STACK = {
    "x": "1",
    "flag": "on",
    "hosts": '["flp1","flp2"]',
    "n": "3",
    "s": "abc",
    "empty": "",
    "quote": 'it\'s "quoted" {not}',  # no {{ }}: it also serves as a template default
    "obj": '{"a":[1,2,{"b":null}],"c":"d"}',
    "it": "flp1",
    "i": "0",
    "which": "inc",
}

_SPECIAL_CHARS = [
    *"{}[]()'\"\\`$;|&<>\n\t\r #:!%*?,.=+-/@~^",
    "{{",
    "}}",
    "\\n",
    "\\'",
    '\\"',
    "\\\\",
    "\\u00e9",
    "\\x41",
    "\\U0001F600",
    "\\z",
    "\\777",
    "$(rm -rf /)",
    "`id`",
    "\x00",
    "\u202e",
    "\ufeff",
    "é",
    "日本",
    "😀",
    "\u0301",
    "%s",
]
# no lone surrogates: YAML cannot carry them, and neither can a caller's UTF-8
_chars = st.characters(exclude_categories=("Cs",))
string_bodies = st.lists(st.sampled_from(_SPECIAL_CHARS) | _chars, max_size=12).map("".join)

int_literals = st.one_of(
    st.integers(-10, 10).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(
        [
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "18446744073709551615u",
            "18446744073709551616u",
            "0x7fffffffffffffff",
            "0xFFFFFFFFFFFFFFFFFF",
            "1u",
            "-1u",
            "0777",
            "1_000",
            "00",
        ]
    ),
    st.integers(20, 600).map(lambda k: "9" * k),
)
float_literals = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1e308", "1e999", "-1e999", "1e-999", ".5", "1.", "-0.0", "1e", "2.5e+3"]),
)


@st.composite
def string_literals(draw: st.DrawFn) -> str:
    body = draw(string_bodies)
    quote = draw(st.sampled_from(["'", '"', "'''", '"""', "r'", 'r"', "b'", 'B"', "'"]))
    q = quote.lstrip("rRbB")
    if draw(st.integers(0, 4)):  # mostly well formed
        if len(q) == 1:
            if not quote.startswith(("r", "R")):
                body = body.replace("\\", "\\\\")
            body = body.replace(q, "\\" + q).replace("\n", "\\n").replace("\r", "\\r")
        else:
            body = body.replace(q, "")
    return quote + body + q


var_refs = st.one_of(
    st.sampled_from(DEFINED),
    st.sampled_from(UNDEFINED),
    st.sampled_from(RESERVED),
    st.sampled_from(["ünï", "a-b", "$x", "x.y", "x .y", "d0"]),
)
role_refs = st.tuples(
    st.sampled_from(
        [
            *("Up(0)", "Up(1)", "Up(2)", "Up(9)", "Up(-1)", "Up(99999999999999999999)"),
            *("Up('1')", "Parent()", "This()", "Up()", "Parent(1)"),
        ]
    ),
    st.sampled_from([".Path", ".Name", ".Other", "", "['Path']", ".Path.Name"]),
).map("".join)
atoms = st.one_of(
    int_literals,
    float_literals,
    string_literals(),
    st.sampled_from(["true", "false", "null", "[]", "{}", "uid.New()", "b''", "''"]),
    var_refs,
    role_refs,
)

FUNCTIONS = [
    "strings.IsTruthy",
    "strings.IsFalsy",
    "strings.ToUpper",
    "strings.ToLower",
    "strings.TrimSpace",
    "strings.TrimQuotes",
    "strings.Atoi",
    "strings.Itoa",
    "json.Marshal",
    "json.Unmarshal",
    "util.PrefixedOverride",
    "uid.New",
    "size",
    "len",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "type",
    "dyn",
    "duration",
    "timestamp",
    "has",
    "strings.quote",
    "matches",
    # functions that do not exist (AliECS ones among them)
    "foo",
    "strings.Nope",
    "os.system",
    "config.Get",
    "inventory.DetectorForHost",
    "dpl.Generate",
    "__import__",
    "eval",
    "open",
    "uid.Old",
    "raw",
    "json",
]
METHODS = [
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "split",
    "join",
    "lowerAscii",
    "upperAscii",
    "replace",
    "substring",
    "charAt",
    "indexOf",
    "lastIndexOf",
    "trim",
    "size",
    "format",
    "reverse",
    "quote",
    "nope",
    "__class__",
]
MACROS = ["map", "filter", "all", "exists", "exists_one", "nope"]
BINARY = [
    "+", "-", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", "&&", "||", "in",
    "contains", "=", "===", "**", "&", "|", "^", "<<", "..", "?",
]  # fmt: skip


def _wrap(e: str, times: int, how: str) -> str:
    opening, closing = {
        "paren": ("(", ")"),
        "list": ("[", "]"),
        "not": ("!", ""),
        "neg": ("-", ""),
        "upper": ("strings.ToUpper(", ")"),
        "size": ("size([", "])"),
        "map": ("{'k': ", "}"),
        "unbalanced": ("(", ""),
    }[how]
    return opening * times + e + closing * times


def _extend(kids: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    args = st.lists(kids, max_size=3).map(", ".join)
    return st.one_of(
        st.builds(lambda a, op, b: f"{a} {op} {b}", kids, st.sampled_from(BINARY), kids),
        st.builds(lambda op, a: op + a, st.sampled_from(["!", "-", "!!", "--", "~"]), kids),
        kids.map(lambda e: f"({e})"),
        st.builds(lambda c, a, b: f"{c} ? {a} : {b}", kids, kids, kids),
        st.builds(lambda f, a: f"{f}({a})", st.sampled_from(FUNCTIONS), args),
        st.builds(lambda r, m, a: f"{r}.{m}({a})", kids, st.sampled_from(METHODS), args),
        st.builds(
            lambda r, m, v, b: f"{r}.{m}({v}, {b})",
            kids,
            st.sampled_from(MACROS),
            st.sampled_from(["v", "x", "it", "1"]),
            kids,
        ),
        args.map(lambda a: f"[{a}]"),
        st.lists(st.tuples(kids, kids), max_size=3).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"
        ),
        st.builds(lambda a, b: f"{a}[{b}]", kids, kids),
        st.builds(lambda a, f: f"{a}.{f}", kids, st.sampled_from(["a", "Path", "b", "size"])),
        st.lists(kids, min_size=2, max_size=8).map(" + ".join),
        st.builds(
            _wrap,
            kids,
            st.integers(1, 80),
            st.sampled_from(["paren", "list", "not", "neg", "upper", "size", "map", "unbalanced"]),
        ),
    )


# built once: a strategy is validated when first drawn from, which is slow for these
_RECURSIVE = {n: st.recursive(atoms, _extend, max_leaves=n) for n in (4, 8, 10)}
_MUTATION_TOKENS = [*_SPECIAL_CHARS, "contains", "len(", "Up(", "uid.New()", ".", "(", ")"]


@st.composite
def expressions(draw: st.DrawFn, max_leaves: int = 10) -> str:
    """The text between ``{{`` and ``}}``."""
    e = draw(_RECURSIVE[max_leaves])
    shape = draw(st.integers(0, 19))
    if shape == 0:  # a long concatenation chain, sometimes over the 4 KB cap
        e = " + ".join([e] * draw(st.integers(2, 700)))
    elif shape == 1:  # a long literal
        e = "'" + draw(st.sampled_from(["a", "é", "{", "\\'"])) * draw(st.integers(1, 5000)) + "'"
    elif shape in (2, 3):  # token-level mutations
        chars = list(e)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(chars)))
            if chars and draw(st.booleans()):
                del chars[min(at, len(chars) - 1)]
            else:
                chars.insert(at, draw(st.sampled_from(_MUTATION_TOKENS)))
        e = "".join(chars)
    elif shape == 4:  # whitespace around and inside
        e = (
            draw(st.sampled_from([" ", "\n", "\t", "  \n "]))
            + e
            + draw(st.sampled_from(["", "\n"]))
        )
    return e


@st.composite
def holes(draw: st.DrawFn, max_leaves: int = 8) -> str:
    """A template string with one or two ``{{ expr }}`` holes and literal text around."""
    lit = st.sampled_from(["", "", "pre-", "-post", "a b", "{ x }", "}}", "{", "\\", "$HOME"])
    parts = [draw(lit)]
    for _ in range(draw(st.integers(1, 2))):
        parts += ["{{ " + draw(_EXPRESSIONS[max_leaves]) + " }}", draw(lit)]
    return "".join(parts)


_EXPRESSIONS = {n: expressions(n) for n in _RECURSIVE}
_SMALL_HOLES = holes(max_leaves=4)


# ---------------------------------------------------------------------------
# Caller variables
# ---------------------------------------------------------------------------

HOSTILE = [
    "$(rm -rf /)",
    "`id`",
    "; ls -la",
    "| cat /etc/passwd",
    "&& reboot",
    "a\nb",
    "line1\r\nline2",
    "'",
    '"',
    "\\",
    "it's",
    '"; drop table x; --',
    "{{ x }}",
    "{{",
    "}}",
    "{{ uid.New() }}",
    "${HOME}",
    "%s%n%x",
    "\x00",
    "\x1b[31m",
    "😀",
    "\u202e",
    "\ufeff",
    " ",
    "",
    "none",
    "true",
    "false",
    "yes",
    "-1",
    "0",
    "3",
    "1.5",
    "9" * 25,
    "NaN",
    "null",
    "[]",
    '["a","b"]',
    '["a","a"]',
    '[1,[2,[3]],{"k":"v"},null,true,1.5]',
    '{"a":1}',
    "[",
    '["x", ',
    "before_CONFIGURE",
    "w.a:out",
    "::alias",
    "tcp://127.0.0.1:5555",
    "../../etc/passwd",
    "/etc/shadow",
    "inc",
    "t0",
    # the expander's marks around a caller's value (templates.text): a caller may send them
    "\ue000",
    "\ue001",
    "a\ue001; rm -rf /\ue000b",
    "\ue000$(id)",
    "1e400",
    "inf",
    "Infinity",
]

_hostile_values = st.one_of(
    st.sampled_from(HOSTILE),
    st.lists(st.sampled_from(HOSTILE), min_size=2, max_size=4).map("".join),
    st.text(_chars, max_size=30),
    st.lists(st.sampled_from(HOSTILE), max_size=6).map(json.dumps),
    # nested JSON lists, for ranges and json.Unmarshal: shallow, and past the caps
    (st.integers(1, 60) | st.integers(60, 20_000)).map(lambda k: "[" * k + "]" * k),
)
_long_values = st.builds(
    lambda piece, k: piece * k,
    st.sampled_from(["A", "{{", "$(x)", "é", "\n", "ab;", "\\"]),
    st.integers(1000, 200_000) | st.sampled_from([1_048_577, 1_100_000]),
)
CALLER_NAMES = (*DEFINED, "nope", "python", "workflow_dir", "environment_id", "cls", "t")
WEIRD_NAMES = ("", "a b", "x.y", "{{ x }}", "ünï", "1abc", "__class__", "in", "-", "a=b")


_caller_names = st.sampled_from(CALLER_NAMES) | st.sampled_from(WEIRD_NAMES)
# what a clean template set only pastes into commands, constraints and messages
_clean_caller_names = st.sampled_from(("x", "s", "msg", "a", "b"))


@st.composite
def caller_variables(draw: st.DrawFn, clean: bool = False) -> dict[str, str]:
    out: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 6))):
        name = draw(_clean_caller_names if clean else _caller_names)
        out[name] = draw(_hostile_values)
    if draw(st.integers(0, 4)) == 0:
        out[draw(st.sampled_from(["blob0", "blob1"]))] = draw(_long_values)
    return out


_CALLER_VARIABLES = {clean: caller_variables(clean=clean) for clean in (False, True)}

# ---------------------------------------------------------------------------
# YAML with tags, aliases and cycles
# ---------------------------------------------------------------------------


class Public(dict):  # type: ignore[type-arg]
    """A ``!public`` variable spec (a mapping)."""


class PublicScalar(str):
    """A ``!public`` plain value."""

    __slots__ = ()


@dataclass(frozen=True)
class Tagged:
    tag: str
    value: Any


class _Dumper(yaml.CSafeDumper):  # libyaml: ten times faster than the Python emitter
    pass


def _represent_tagged(d: yaml.CSafeDumper, v: Tagged) -> yaml.Node:
    tag = "tag:yaml.org,2002:" + v.tag[2:] if v.tag.startswith("!!") else v.tag
    if isinstance(v.value, dict):
        return d.represent_mapping(tag, v.value)
    if isinstance(v.value, list):
        return d.represent_sequence(tag, v.value)
    return d.represent_scalar(tag, str(v.value))


_Dumper.add_representer(Public, lambda d, v: d.represent_mapping("!public", dict(v)))
_Dumper.add_representer(PublicScalar, lambda d, v: d.represent_scalar("!public", str(v)))
_Dumper.add_representer(Tagged, _represent_tagged)


def dump(doc: Any, flow: bool | None = False, unicode: bool = True, width: int = 80) -> str:
    return yaml.dump(
        doc,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=flow,
        allow_unicode=unicode,
        width=width,
    )


RAW_TEXTS = [
    "",
    "\n",
    "---\n---\n",
    "%YAML 1.1\n---\nname: w\n",
    "name: w\nroles: []\n",
    "name: w\nroles: [1, 2]\n",
    "name: w\nroles: {}\n",
    "[1, 2]\n",
    "just text",
    "name: w\nroles:\n\t- name: a\n",
    "name: !!python/object/apply:os.system ['id']\nroles: []\n",
    "name: w\nroles: *nope\n",
    "name: &a w\nroles: [&b {name: *a, roles: *b}]\n",
    "name: w\nname: w\nroles:\n - {name: a, task: {load: t0}}\n",
    "\ufeffname: w\nroles:\n - {name: a, call: {func: p.F(), trigger: DEPLOY}}\n",
    "? [a, b]\n: c\n",
    "name: w\nroles:\n - " + "- " * 300 + "a\n",
    "name: w\ndefaults:\n  x: " + "[" * 250 + "]" * 250 + "\nroles: []\n",
    "name: w\ndefaults:\n  x: " + "{a: " * 220 + "1" + "}" * 220 + "\nroles: []\n",
    "name: w\ndefaults: {x: " + "[" * 30000 + "}\nroles: []\n",
    "name: w\nroles: [" + "{name: a, roles: [" * 400 + "]}" * 400 + "]\n",
]


class Choices:
    """Decisions read from one drawn byte string, as a fuzzer reads its input.

    A template set takes hundreds of decisions, and each Hypothesis draw costs some
    50 us; one ``st.binary`` draw per set instead keeps generation several times
    faster. Zero bytes, and the end of the string, give the first choice of every
    decision (the simplest: no optional field, the first option, the lowest number),
    so what Hypothesis' shrinker does to bytes (shorten, lower) simplifies the set.
    """

    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def int(self, lo: int, hi: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        size = (span.bit_length() + 7) // 8
        chunk = self.data[self.at : self.at + size]
        self.at += size
        if len(chunk) < size:
            return lo
        return lo + int.from_bytes(chunk, "big") % (span + 1)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.int(0, len(options) - 1)]

    def chance(self, one_in: int) -> bool:
        """True about once in ``one_in``; False for a zero byte."""
        return self.int(0, one_in - 1) == one_in - 1

    def subset(self, options: Sequence[T]) -> list[T]:
        return [o for o in options if self.chance(2)]


def mutated(c: Choices, text: str) -> str:
    """Small edits to YAML text: characters and lines inserted, deleted, duplicated."""
    lines = text.split("\n")  # never empty: "".split gives [""]
    for _ in range(c.int(1, 5)):
        op = c.int(0, 5)
        at = c.int(0, max(0, len(lines) - 1))
        if op == 0 and len(lines) > 1:
            del lines[at]
        elif op == 1:
            lines.insert(at, lines[at])
        elif op == 2:  # indent or dedent a line
            lines[at] = c.pick([" ", "  ", "\t", ""]) + lines[at].lstrip(" ")
        else:
            line = lines[at]
            col = c.int(0, len(line))
            piece = c.pick([*"{}[]:-'\"\n #!|>&*%@`,?", "{{", "}}", "- ", ": "])
            cut = c.int(0, 1) if op == 3 else 0
            lines[at] = line[:col] + piece + line[col + cut :]
    return "\n".join(lines)


def file_text(c: Choices, doc: Any, wild: int) -> str:
    """YAML for ``doc``; in a wild set now and then mutated or replaced by raw text."""
    text = dump(
        doc,
        flow=c.pick([False, None, True, False]),
        unicode=c.int(0, 1) == 0,
        width=c.pick([80, 20, 10_000, 80]),
    )
    if wild < 2:
        return text
    choice = c.int(0, 19)
    if choice == 1:
        return mutated(c, text)
    if choice == 2:
        return c.pick(RAW_TEXTS)
    if choice == 3:
        return text[: c.int(0, len(text))]
    if choice == 4:
        return mutated(c, text)
    return text


# ---------------------------------------------------------------------------
# Template sets
# ---------------------------------------------------------------------------

CLASS_NAMES = ("t0", "t1", "t2")
INCLUDE_FILES = ("inc.yaml", "lib/sub.yaml", "workflows/inc2.yaml")
INCLUDE_REFS = (
    "inc", "inc.yaml", "lib/sub.yaml", "sub", "inc2", "workflows/inc2.yaml", "../w.yaml",
    "w", "w.yaml", "missing", "{{ which }}", "", "/etc/passwd", "../../../etc/passwd",
    "lib/", ".", "..", "{{ nope }}", "inc\n", "lib/../inc.yaml",
)  # fmt: skip
VAR_NAMES = ("x", "flag", "hosts", "n", "s", "which", "cls", "t", "a", "b", "msg", "x1")
CLEAN_VAR_NAMES = ("x", "s", "a", "b", "msg", "x1")
ROOT_DEFAULTS = {**BASE_STACK, "d0": "ab", "t": "t0", "cls": "t1", "msg": "hello", "blob0": ""}
MOMENTS = (
    "before_CONFIGURE", "after_CONFIGURE", "CONFIGURE", "enter_RUNNING", "leave_CONFIGURED",
    "before_START_ACTIVITY+100", "after_DEPLOY-1", "before_DESTROY", "after_EXIT",
)  # fmt: skip
BAD_MOMENTS = (
    "before_NOTHING", "enter_CONFIGURE", "leave_NOWHERE", "before_CONFIGURE+9999999999",
    "before_configure", "", " before_RESET ", "after_STOP_ACTIVITY+-1", "{{ trig }}",
)  # fmt: skip
DURATIONS = ("10s", "500ms", "1m30s", "2h", "2.5", "0", "{{ n }}s")
BAD_DURATIONS = ("-1", "1e400", "nan", "soon", "1h1h", "µs", "10 s", "", "1.5.5s", "9" * 40, "inf")
BOOLS = ("true", "false", "yes", "no", "on", "off", "1", "0", "TRUE", " y ", "")
BAD_BOOLS = ("maybe", "2", "{{ x }}x")
NUMBERS = ("1", "0", "64", "512", " 2 ", "0.1", "2.5")  # the first five are whole
BAD_NUMBERS = ("-1", "abc", "", "0x10", "1_000", "nan", "1e400", "inf", "-inf", "9" * 400)
TARGETS = ("tcp://127.0.0.1:5555", "ipc:///tmp/x")
BAD_TARGETS = (
    "w.a:out", "w.b.c:out", "{{ Parent().Path }}.r0:out", "{{ This().Path }}:out", "::alias",
    "::", ":", "w.a:", ":out", "bad", "{{ Up(3).Path }}:x", "w.r0-{{ i }}:out", "w.r0:in",
)  # fmt: skip
SIBLING_TARGETS = (
    "{{ Parent().Path }}.r0:b0", "{{ Parent().Path }}.r1:b0", "{{ Parent().Path }}.r0:b1",
    "::alias", "{{ Up(2).Path }}.r0:b0",
)  # fmt: skip
SIMPLE_HOLES = (
    "{{ x }}", "v-{{ x }}", "{{ s + '-' + n }}", "{{ flag == 'on' }}", "{{ nope }}",
    "{{ blob0 }}", "{{ blob1 + '-' + blob1 }}", "{{ size(blob0) }}", "{{ msg }}",
    "{{ strings.ToUpper(s) }}", "{{ json.Unmarshal(hosts)[0] }}", "{{ uid.New() }}",
    "{{ util.PrefixedOverride('x', 'its') }}", "{{ Parent().Path }}", "{{ This().Name }}",
    "{{ raw(x) }}", "--f {{ raw(msg) }}", "{{ raw(s + '-' + x) }}", "{{ raw() }}",
    "{{ raw(raw(x)) }}", "{{raw(msg)}}", "'{{ msg }}'", '"{{ msg }}"',
)  # fmt: skip
GOOD_TAGS = (
    ("!!str", "12"), ("!!int", "12"), ("!!int", "0x1F"), ("!!timestamp", "2001-12-14"),
    ("!!float", "1.5"), ("!!float", ".inf"), ("!!bool", "yes"), ("!!null", ""),
)  # fmt: skip
JUNK: tuple[Any, ...] = (
    None, 1, -1, 2.5, True, [], {}, ["a"], {"a": "b"}, [[["x"]]], "", Tagged("!odd", "x"),
)  # fmt: skip


class _Gen:
    """Builds the documents of one template set from a ``Choices``.

    ``wild`` is 0 for a clean set (meant to expand to a plan: unique names, variables
    that exist, loads of classes that exist), 1 for one with a few wrong values, 2 for
    anything: wrong shapes, hostile strings, tags, aliases, cycles, mutated text.
    """

    def __init__(self, c: Choices, wild: int, exprs: list[str]) -> None:
        self.c = c
        self.wild = wild
        self.exprs = exprs or ["x"]
        self.budget = 0
        self.modes: dict[str, str] = {}  # class name -> control mode, for clean tasks
        self.include_refs: tuple[str, ...] = ()
        self.extra_roles: list[Any] = []  # for the next workflow's roles
        self.wide = False  # a role with a thousand instances: worth a time limit

    def pick(self, options: Sequence[T]) -> T:
        return self.c.pick(options)

    def int(self, lo: int, hi: int) -> int:
        return self.c.int(lo, hi)

    def chance(self, one_in: int) -> bool:
        return self.c.chance(one_in)

    def wild_chance(self, one_in: int) -> bool:
        """Only in a wild set: True about once in ``one_in``."""
        return self.wild == 2 and self.c.chance(one_in)

    def text(self, valid: tuple[str, ...], invalid: tuple[str, ...] = ()) -> Any:
        """A template string: valid, invalid, with a hole, hostile, or not a string."""
        if not self.wild:
            return self.pick(valid)
        if self.wild == 1:  # mostly valid, so that expansion goes on below
            k = self.int(0, 19)
            if k < 16:
                return self.pick(valid)
            if k < 18:
                return self.pick(invalid or valid)
            k = 6 + 2 * (k - 18)  # a simple hole or an expression
        else:
            k = self.int(0, 11)
        if k < 4:
            return self.pick(valid)
        if k < 6:
            return self.pick(invalid or valid)
        if k < 8:
            return self.pick(SIMPLE_HOLES)
        if k < 10:
            pre = self.pick(["", "pre-", "a b", "{ x }", "}}", "{", "$HOME"])
            return pre + "{{ " + self.pick(self.exprs) + " }}" + self.pick(["", "-post", "\\"])
        if k < 11:
            return self.pick(HOSTILE)
        return self.pick(JUNK)

    def var_value(self, literal: bool = False) -> Any:
        # what refuses a whole file (a cycle, too deep, too many aliases) stays rare
        k = self.int(0, 7 if self.wild < 2 else 13)
        if k == 13:
            k = self.pick([7, 9, 10, 11])
        elif k in (7, 9, 10):
            k = self.pick([0, 1, 2, 3, 6, 7])
        if k < 3:
            if literal:  # the root's defaults see no template variable
                return self.text(("1", "on", "abc", '["a","b"]', ""))
            return self.text(("1", "on", "abc", '["a","b"]', "{{ x }}-{{ n }}", "{{ msg }}!", ""))
        if k == 3:
            return self.c.subset(["a", "b", 1, None, True, 2.5])
        if k == 4:
            return {"k": self.pick(["v", 1, None, ["x"]]), "m": {"n": self.pick([1.5, "s"])}}
        if k == 5:  # public variables
            if self.chance(5):
                return PublicScalar("hello")
            spec: dict[str, Any] = {"value": self.text(("TST", "1", ""))}
            if self.chance(2):
                spec["type"] = self.pick(["string", "bool", "number", "list", "map"])
            if self.chance(2):
                spec["values"] = ["TST", "ITS"]
            if self.chance(2):
                spec["index"] = self.int(0, 9)
            for key in self.c.subset(["label", "description", "widget", "panel", "visibleif"]):
                spec[key] = self.text(("text",))
            if self.wild and self.chance(3):
                spec[self.pick(["type", "values", "index", "bad", "value"])] = self.pick(
                    ["blob", [["x"]], "x", 99999999999999999999999, {"a": 1}, None]
                )
            return Public(spec)
        if k == 6:  # tags JSON can carry, alone or in a list
            tagged = Tagged(*self.pick(GOOD_TAGS))
            return tagged if self.chance(2) else [tagged, "x"]
        if k == 7:  # nested lists, within the parser's nesting cap unless rare and wild
            value: Any = "x"
            for _ in range(self.int(1, 20 if self.wild < 2 or self.chance(3) else 250)):
                value = [value]
            return value
        if k == 8:  # odd and unknown tags, on scalars and collections, alone or in a list
            odd = Tagged(
                self.pick(
                    [
                        *("!!binary", "!!timestamp", "!!int", "!!float", "!!bool", "!!null"),
                        *("!!str", "!!python/name:os.system", "!custom", "!!set", "!!omap"),
                    ]
                ),
                self.pick(["aGVsbG8=", "2001-12-14", "abc", "12", "", ["a"], {"a": None}]),
            )
            return odd if self.chance(2) else ["x", odd]
        if k == 9:  # aliases: a tree that doubles at each level; past 2**17 refused
            value = ["x", "y"]
            for _ in range(self.int(1, 6) if self.chance(2) else self.int(17, 30)):
                value = [value, value]
            return value
        if k == 10:  # a cycle
            cyc: list[Any] = ["x"]
            cyc.append(cyc)
            return cyc
        return self.pick(JUNK)

    def var_map(self, literal: bool = False) -> Any:
        if self.wild_chance(20):
            return self.pick(JUNK)
        out: dict[Any, Any] = {}
        for _ in range(self.int(0, 4)):
            # a clean set leaves alone what its iterators and loads read
            name: Any = self.pick(VAR_NAMES if self.wild else CLEAN_VAR_NAMES)
            if self.wild_chance(8):
                name = self.pick(["", "a b", "{{ x }}", 1, True])
            out[name] = self.var_value(literal)
        return out

    def channels(self, kind: str) -> Any:
        if self.wild_chance(20):
            return self.pick(JUNK)
        out = []
        for k in range(self.int(1, 3)):
            ch: dict[str, Any] = {"name": f"{kind[0]}{k}"}
            if self.wild_chance(6):
                ch["name"] = self.pick(["out", "{{ x }}", "", "c0", "b0"])
            if not self.wild_chance(6):
                types = ("push", "pub") if kind == "bind" else ("pull", "sub")
                ch["type"] = self.text(types, ("push", "pull", "pub", "sub", "req", ""))
            if kind == "bind":
                if self.chance(2):
                    ch["addressing"] = self.text(("tcp", "ipc"), ("udp", ""))
                if self.chance(4 if self.wild else 8):
                    ch["global"] = self.text(("alias", "stf-{{ This().Path }}"), ("",))
            elif not self.wild_chance(8):
                ch["target"] = self.text(TARGETS, BAD_TARGETS)
                if self.chance(3):  # a sibling's bind: resolved, or an error saying why
                    ch["target"] = self.pick(SIBLING_TARGETS)
            if self.chance(3):
                ch["transport"] = self.text(("zeromq", "shmem"))
            if self.chance(4):
                key = self.pick(["rateLogging", "linger", "method", "bogus" if self.wild else "x"])
                ch[key if key != "x" else "sndBufSize"] = self.text(("10",))
            out.append(ch)
        return out

    def constraints(self) -> Any:
        out = []
        for _ in range(self.int(1, 2)):
            c: dict[str, Any] = {}
            if not self.wild_chance(8):
                c["attribute"] = self.text(("machine_id", "host"), ("",))
            if not self.wild_chance(8):
                c["value"] = self.text(("flp1", "{{ x }}", "a,b"), ("(", "[z-a]", "(a+)+$"))
            if self.chance(2):
                c["operator"] = self.text(("equals", "in"), ("like", "regex"))
            out.append(c)
        return out

    def iterator(self) -> tuple[dict[str, Any], str]:
        """A ``for`` and the iterator variable's name."""
        var = self.pick(["i", "it"])
        if self.wild_chance(6):
            var = self.pick(["", "{{ x }}", "x", "a b", "flag"])
        f: dict[str, Any] = {"var": var}
        k = self.int(0, 9)
        if k < 5:
            f["range"] = self.text(
                ('["a","b"]', "{{ hosts }}", "[]", "[1,2,3]", '["x"]'),
                ('{"a":1}', "x", '["a","a"]', "[null, true, {}]"),
            )
        elif k < 9 or not self.wild:
            f["begin"] = self.text(("0", "1", "-2"), ("abc", "", "9" * 30, "1e3"))
            # past the cap; end 1000001 from begin 1 is allowed: a million instances, 12 s
            f["end"] = self.text(("0", "2", "3", "{{ n }}"), ("-5", "2000001", "x", " 1 "))
        else:
            f["range"] = "[]"
            f["begin"] = "0"
        if self.chance(3):
            f["nmin"] = self.text(("0",), ("1", "9", "-1", "x", "2.5"))
        if self.wild_chance(15):
            del f["var"]
        return f, var

    def role(self, depth: int, index: int, includes: bool) -> Any:
        self.budget -= 1
        name = f"r{index}"
        r: dict[str, Any] = {"name": self.text((name,), ("a", "a.b", "a b", "", "x:y"))}
        if self.chance(5):
            r["enabled"] = self.text(BOOLS, BAD_BOOLS)
        if self.chance(4):
            r["defaults"] = self.var_map()
        if self.chance(4):
            r["vars"] = self.var_map()
        if self.chance(6):
            r["constraints"] = self.constraints()
        if self.chance(5):
            r["for"], var = self.iterator()
            r["name"] = f"{name}-{{{{ {var} }}}}" if var.isidentifier() else name
            if self.wild_chance(4):
                r["name"] = self.pick(["r-{{ i }}", "r", "v-{{ x }}"])
        kinds = ["task", "task", "call"]
        if depth > 0 and self.budget > 0:
            kinds += ["roles", "roles"]
        if includes and (self.wild or self.include_refs):
            kinds.append("include")
        kind = self.pick(kinds)
        if kind == "task":
            self.task(r)
        elif kind == "call":
            self.call(r)
        elif kind == "roles":
            r["roles"] = [self.role(depth - 1, k, includes) for k in range(self.int(1, 3))]
        else:
            r["include"] = self.text(self.include_refs or ("inc",), INCLUDE_REFS)
        if self.wild_chance(20):  # a second kind, an unknown key or no name
            extra = self.pick(["call", "roles", "tsk", "description", "bogus", "-name"])
            if extra == "-name":
                r.pop("name")
            else:
                r[extra] = self.pick(JUNK)
        return r

    def task(self, r: dict[str, Any]) -> None:
        classes = tuple(self.modes) or CLASS_NAMES
        t: dict[str, Any] = {"load": self.text(classes, ("missing", "{{ cls }}", "../t0", ""))}
        mode = self.modes.get(t["load"]) if isinstance(t["load"], str) else None
        if self.chance(4):
            t["critical"] = self.text(BOOLS, BAD_BOOLS)
        hook = mode == "hook" or (mode == "basic" and self.wild > 0 and self.chance(4))
        if hook or self.wild_chance(5):
            t["trigger"] = self.text(MOMENTS, BAD_MOMENTS)
            if self.chance(2):
                t["await"] = t["trigger"] if not self.wild else self.text(MOMENTS, BAD_MOMENTS)
            if self.chance(3):
                t["timeout"] = self.text(DURATIONS, BAD_DURATIONS)
        elif self.wild_chance(8):
            t["timeout"] = self.text(DURATIONS, BAD_DURATIONS)
        r["task"] = t if not self.wild_chance(25) else self.pick(JUNK)
        if self.chance(3):
            r["bind"] = self.channels("bind")
        if self.chance(3):
            r["connect"] = self.channels("connect")

    def call(self, r: dict[str, Any]) -> None:
        c: dict[str, Any] = {
            "func": self.text(
                (
                    *("p.F()", "dcs.PrepareForRun(1, 'a')", "test.Noop({{ msg }})"),
                    *("exec.Shell('echo {{ msg }} > /tmp/x')", "p.F('{{ x }}', \"{{ s }}\")"),
                ),
                ("p.F", "F()", "p.F(", "p.F({{ raw(msg) }})", "exec.Shell('{{ msg }}"),
            ),
            "trigger": self.text(MOMENTS, BAD_MOMENTS),
        }
        if self.chance(3):
            c["await"] = c["trigger"] if not self.wild else self.text(MOMENTS, BAD_MOMENTS)
        if self.chance(3):
            c["timeout"] = self.text(DURATIONS, BAD_DURATIONS)
        if self.chance(3):
            c["critical"] = self.text(BOOLS, BAD_BOOLS)
        if self.chance(3):
            c["return"] = self.text(("res",), ("", "a b"))
        if self.wild_chance(10):
            del c[self.pick(["func", "trigger"])]
        r["call"] = c

    def chain(self, kind: str, depth: int) -> dict[str, Any]:
        """Nested roles: a doubling chain of variables, or just deep nesting."""
        plain = [n for n, m in self.modes.items() if m != "hook"] or ["t0"]
        inner: dict[str, Any] = {"name": "leaf", "task": {"load": plain[0]}}
        if kind == "doubling":
            inner["vars"] = {"x": "{{ size(d" + str(depth) + ") }}"}
        for level in range(depth, 0, -1):
            wrap: dict[str, Any] = {"name": f"c{level}", "roles": [inner]}
            if kind == "doubling":
                wrap["defaults"] = {f"d{level}": f"{{{{ d{level - 1} + d{level - 1} }}}}"}
            inner = wrap
        return inner

    def workflow(self, name: str, includes: bool) -> Any:
        self.budget = self.int(1, 10)
        doc: dict[str, Any] = {"name": self.text((name,), ("w-{{ x }}", "", "a.b"))}
        if self.chance(6):
            doc["description"] = self.text(("a workflow",))
        if self.chance(8):
            doc["enabled"] = self.text(BOOLS, BAD_BOOLS)
        defaults = self.var_map(literal=not self.wild)
        if name == "w" and isinstance(defaults, dict) and not self.wild_chance(4):
            defaults = {**ROOT_DEFAULTS, **defaults}
        if defaults or self.wild:
            doc["defaults"] = defaults
        if self.chance(3):
            doc["vars"] = self.var_map()
        if self.chance(10):
            doc["constraints"] = self.constraints()
        roles = [self.role(self.int(0, 3), 0, includes)]
        while self.budget > 0 and self.chance(2):
            roles.append(self.role(self.int(0, 2), len(roles), includes))
        k = self.int(0, 14)
        if k == 1 and self.modes:
            roles.append(self.chain("doubling", self.int(1, MAX_DOUBLING)))
        elif k == 2 and self.modes:
            roles.append(self.chain("deep", self.int(10, 95 if self.wild == 2 else 80)))
        elif k == 3 and self.wild == 2:  # roles shared through YAML aliases, doubling
            shared: dict[str, Any] = {"name": "s", "task": {"load": "t0"}}
            for _ in range(self.int(1, 30)):
                shared = {"name": "s", "roles": [shared, shared]}
            roles.append(shared)
        elif k == 4 and self.wild == 2:  # a role that contains itself
            cyc: dict[str, Any] = {"name": "cyc", "roles": []}
            cyc["roles"].append(cyc)
            roles.append(cyc)
        elif k == 5 and self.modes:  # over a thousand evaluations: the clock is read
            wide: dict[str, Any] = {"name": "wide-{{ i }}", "task": {"load": "t0"}}
            wide["for"] = {"begin": "1", "end": str(self.int(100, 1500)), "var": "i"}
            roles.append(wide)
            self.wide = True
        roles += self.extra_roles
        self.extra_roles = []
        doc["roles"] = roles if not self.wild_chance(30) else self.pick(JUNK)
        if self.wild_chance(25):
            doc[self.pick(["bogus", "for", "task"])] = self.pick(JUNK)
        return doc

    def task_class(self, name: str) -> Any:
        doc: dict[str, Any] = {}
        mode = self.pick(["direct", "basic", "hook"])
        if not self.chance(5):
            doc["name"] = self.text((name,), ("other", "{{ x }}", ""))
        if not self.chance(4) or mode != "basic":
            doc["control"] = {"mode": self.text((mode,), ("fairmq", "", "Direct"))}
        self.modes[name] = mode
        if self.chance(3):
            doc["defaults"] = self.var_map()
        if self.chance(4):
            doc["vars"] = self.var_map()
        for key in ("wants", "limits"):
            if self.chance(3):
                fields = self.c.subset(["cpu", "memory", "gpu", "ports", "disk" * (self.wild > 0)])
                doc[key] = {
                    k: self.text(NUMBERS, BAD_NUMBERS)
                    if k == "cpu"
                    else self.text(NUMBERS[:5], BAD_NUMBERS)
                    for k in fields
                    if k
                }
        if self.chance(4):
            doc["bind"] = self.channels("bind")
        if self.chance(5):
            doc["connect"] = self.channels("connect")
        if self.chance(4):
            doc["properties"] = {"severity": self.text(("info",)), "p": self.text(("{{ s }}",))}
        if not self.wild_chance(12):
            cmd: dict[str, Any] = {
                "value": self.text(
                    (
                        *("run", "/bin/sh", "{{ python }}", "echo {{ msg }} > out.txt"),
                        *("printf '%s' '{{ msg }}'", 'echo "{{ x }}" `id` $(echo {{ s }})'),
                    ),
                    ("", " ", "$(rm -rf /)", "cat <<EOF\n{{ msg }}\nEOF"),
                )
            }
            cmd["arguments"] = [
                self.text(
                    (
                        *("--rate={{ x }}", "`id`", "; ls", "a|b", "'quoted'", "a\nb"),
                        *("{{ raw(msg) }}", "--data={{ blob0 }}"),
                    )
                )
                for _ in range(self.int(0, 4))
            ]
            if self.chance(2):
                cmd["env"] = [
                    self.text(("A=1", "B={{ s }}", "C=$(id)", "D={{ msg }}"), ("bad", "=x", " =y"))
                    for _ in range(self.int(0, 3))
                ]
            if self.chance(2):
                cmd["shell"] = self.text(BOOLS, BAD_BOOLS)
            for key in ("user", "cwd", "log", "stdout"):
                if self.chance(5):
                    cmd[key] = self.text(("flp", "/tmp", "all"), ("",))
            doc["command"] = cmd if not self.wild_chance(25) else self.pick(JUNK)
        if self.chance(6) and (mode == "basic" or self.wild):
            h: dict[str, Any] = {"command": self.text(("/usr/bin/check",))}
            if self.chance(2):
                h["arguments"] = ["--quick", self.text(("{{ x }}",))]
            if self.chance(2):
                h["interval"] = self.text(DURATIONS, BAD_DURATIONS)
            if self.chance(2):
                h["timeout"] = self.text(DURATIONS, BAD_DURATIONS)
            if self.chance(2):
                h["failures"] = self.text(NUMBERS[:2], BAD_NUMBERS)
            doc["health"] = h
        if self.wild_chance(25):
            doc[self.pick(["bogus", "roles", "task"])] = self.pick(JUNK)
        return doc


@st.composite
def template_sets(draw: st.DrawFn) -> TemplateSet:
    """A workflow, included workflows and task classes, with caller variables.

    A third of the sets are clean (most expand to a plan), a third have a few wrong
    values, and a third are wild.
    """
    c = Choices(draw(st.binary(min_size=CHOICE_BYTES, max_size=CHOICE_BYTES)))
    wild = c.int(0, 2)
    exprs = draw(st.lists(_EXPRESSIONS[4], max_size=3)) if wild else []
    g = _Gen(c, wild, exprs)
    root = c.pick(["w.yaml", "workflows/w.yaml", "w.yaml"])
    files: dict[str, str] = {}
    for name in (CLASS_NAMES[0], *c.subset(CLASS_NAMES[1:])):
        where = "tasks" if root == "w.yaml" or c.chance(2) else "workflows/tasks"
        files[f"{where}/{name}.yaml"] = file_text(c, g.task_class(name), wild)
    clean_include = posixpath.join(posixpath.dirname(root), "inc.yaml")
    includes = c.subset(INCLUDE_FILES) if wild else [clean_include] * c.chance(2)
    for path in includes:
        nested = bool(wild)  # a clean include includes nothing: no cycles
        doc = g.workflow("inc", includes=nested)
        files[path] = file_text(c, doc, wild)
    g.include_refs = ("inc",) if includes and not wild else ()
    if c.chance(12):  # a chain of includes, each file nesting some roles
        length = c.int(2, 70)
        nest = c.int(0, 1) if c.chance(2) else c.int(2, 40)  # past 100 levels in all: refused
        for k in range(length):
            inner: dict[str, Any] = {"name": "n", "include": f"c{k + 1}"}
            if k == length - 1:
                inner = {"name": "leaf", "task": {"load": "t0"}}
            for _ in range(nest):
                inner = {"name": "d", "roles": [inner]}
            path = posixpath.join(posixpath.dirname(root), f"chain/c{k}.yaml")
            files[path] = dump({"name": f"c{k}", "roles": [inner]})
        g.extra_roles.append({"name": "chain", "include": "chain/c0.yaml"})
    files[root] = file_text(c, g.workflow("w", includes=True), wild)
    if wild == 2 and c.chance(30):
        root = c.pick(["missing.yaml", "tasks/t0.yaml", "chain/c1.yaml", "inc.yaml"])
    return TemplateSet(
        root,
        files,
        draw(_CALLER_VARIABLES[not wild]),
        {"python": "/usr/bin/python3", "workflow_dir": "/w"} if not wild or c.chance(2) else {},
        c.pick([{}, {"x": "global"}, {"flag": "off", "n": "0"}]),
        c.pick(["0", "s", "", "ü", "\x00"]),
        c.int(0, 5) if c.chance(10) else None,
        c.pick([0.0, 0.005, 0.05]) if c.chance(2 if g.wide else 10) else None,
        ("clean", "mild", "wild")[wild],
    )


# ---------------------------------------------------------------------------
# Expressions placed in a small template set
# ---------------------------------------------------------------------------

_CLASS = {
    "name": "t0",
    "control": {"mode": "basic"},
    "command": {"value": "run", "arguments": ["{{ x }}"]},
}
PLACES = (
    "name", "enabled", "defaults", "vars", "class-defaults", "class-vars", "range", "begin",
    "end", "load", "include", "constraint", "call-func", "trigger", "await",
    "timeout", "critical", "return", "target", "global", "type", "command", "argument",
    "env", "shell", "user", "cwd", "mode", "cpu", "property", "health", "root-name", "nmin",
    "failures",
)  # fmt: skip


@st.composite
def expression_templates(draw: st.DrawFn) -> tuple[TemplateSet, str]:
    """A small valid template set with ``{{ expr }}`` placed in one or two fields."""
    wf: dict[str, Any] = {"name": "w", "defaults": dict(BASE_STACK)}
    role: dict[str, Any] = {"name": "a", "task": {"load": "t0"}}
    cls: dict[str, Any] = json.loads(json.dumps(_CLASS))
    inc = {"name": "inc", "roles": [{"name": "i", "task": {"load": "t0"}}]}
    expr = ""
    for _ in range(draw(st.integers(1, 2))):
        expr = draw(_EXPRESSIONS[10])
        h = "{{ " + expr + " }}"
        place = draw(st.sampled_from(PLACES))
        if place == "name":
            role["name"] = "a-" + h
        elif place == "root-name":
            wf["name"] = h
        elif place == "enabled":
            role["enabled"] = h
        elif place in ("defaults", "vars"):
            role[place] = {"v": h}
            cls["command"]["arguments"].append("{{ v }}")
        elif place in ("class-defaults", "class-vars"):
            cls[place.split("-")[1]] = {"v": h}
        elif place == "range":
            role["for"] = {"range": h, "var": "it"}
            role["name"] = "a-{{ it }}"
        elif place in ("begin", "end"):
            role["for"] = {"begin": "0", "end": "1", "var": "i", place: h}
            role["name"] = "a-{{ i }}"
        elif place == "nmin":
            role["for"] = {"range": "{{ hosts }}", "var": "it", "nmin": h}
            role["name"] = "a-{{ it }}"
        elif place == "load":
            role.pop("call", None)
            role.pop("include", None)
            role.setdefault("task", {})["load"] = h
        elif place == "include":
            role.pop("task", None)
            role.pop("call", None)
            role["include"] = h
        elif place == "constraint":
            key = draw(st.sampled_from(["attribute", "value", "operator"]))
            c = {"attribute": "machine_id", "value": "flp1", key: h}
            role["constraints"] = [c]
        elif place in ("call-func", "trigger", "await", "timeout", "critical", "return"):
            role.pop("task", None)
            role.pop("include", None)
            call = role.setdefault("call", {"func": "p.F()", "trigger": "before_CONFIGURE"})
            call[place.removeprefix("call-")] = "p.F(" + h + ")" if place == "call-func" else h
        elif place in ("target", "global", "type"):
            key = "connect" if place == "target" else "bind"
            ch = {"name": "c", "type": "pull" if key == "connect" else "push"}
            ch[place] = h
            if key == "connect":
                ch.setdefault("target", "w.b:out")
            role[key] = [ch]
            wf["roles"] = [
                {"name": "b", "task": {"load": "t0"}, "bind": [{"name": "out", "type": "push"}]}
            ]
        elif place in ("command", "argument", "env", "shell", "user", "cwd"):
            cmd = cls["command"]
            if place == "command":
                cmd["value"] = h
            elif place == "argument":
                cmd["arguments"].append(h)
            elif place == "env":
                cmd["env"] = ["K=" + h, h]
            else:
                cmd[place] = h
        elif place == "mode":
            cls["control"]["mode"] = h
        elif place == "cpu":
            cls["wants"] = {"cpu": h}
        elif place == "property":
            cls["properties"] = {"p": h}
        elif place == "failures":
            cls["control"]["mode"] = "basic"
            cls["health"] = {"command": "check", "failures": h}
        else:
            cls["control"]["mode"] = "basic"
            cls["health"] = {"command": h, "interval": h}
    wf.setdefault("roles", []).insert(0, role)
    files = {"w.yaml": dump(wf), "tasks/t0.yaml": dump(cls), "inc.yaml": dump(inc)}
    variables = draw(_CALLER_VARIABLES[False]) if draw(st.booleans()) else {}
    # an expression in `end` can ask for a few hundred thousand tasks (--374469): a
    # valid plan, but seconds of work that says nothing more about expressions
    return TemplateSet("w.yaml", files, variables, seed="fuzz", max_tasks=10_000), expr


@st.composite
def evaluation_cases(draw: st.DrawFn) -> tuple[str, dict[str, str], RolePos | None]:
    """An expression, a variable stack and a role position, for the Evaluator alone."""
    stack = dict(BASE_STACK)
    stack.update(draw(_CALLER_VARIABLES[False]))
    root = RolePos("w", None)
    pos = draw(
        st.sampled_from(
            [None, root, RolePos("a", root), RolePos(None, root, "a-{{ x }}"), RolePos(None, None)]
        )
    )
    return draw(_EXPRESSIONS[10]), stack, pos
