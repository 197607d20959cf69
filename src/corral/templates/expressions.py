"""CEL expressions of templates, behind one small interface.

``{{ expr }}`` in a template string is a CEL expression evaluated with the
``cel-expr-python`` package. This module is the only one that knows about CEL:

- a linear-time token pass rewrites AliECS spellings (``a contains b`` becomes
  ``(a).contains(b)``, ``len(x)`` becomes ``size(x)``) and finds the variables an
  expression may read;
- every variable is a string (as in AliECS), so each expression is compiled once per
  set of defined variables with their types declared: an undefined variable or a
  type error (``'true' == 1``) is a compile error, never a silent false;
- results are memoized on the values of the variables the expression reads (and on
  the role position for ``Up``/``Parent``/``This``), so a 150,000-task expansion
  evaluates each distinct (expression, inputs) pair once. ``uid.New()`` and
  ``util.PrefixedOverride`` read hidden state, so expressions using them are not
  memoized;
- functions are few and mostly pure Python callables: each call into Python leaks
  ~48 bytes inside the CEL runtime, which the memo keeps negligible.

Nothing here can reach the filesystem or Python internals: CEL has no such
facilities, inputs are capped at 4 KB and nesting at 32 levels by the runtime.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_strings

from corral.templates.services import ServiceError, Services, error_value

MAX_EXPRESSION_LENGTH = 4096
# json.Unmarshal's values: deeper nesting would overflow the Python stack when the result
# is converted and rendered; integers are CEL's (int64, or uint64 when positive)
MAX_JSON_NESTING = 100
_INT_RANGE = range(-(2**63), 2**64)

_NAMESPACES = frozenset({"strings", "json", "uid", "util"})
_ROLE_FUNCTIONS = frozenset({"Up", "Parent", "This"})
_RESERVED = frozenset(
    {
        "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
        "function", "if", "import", "let", "loop", "package", "namespace", "return", "var",
        "void", "while", "int", "uint", "double", "string", "bytes", "bool", "list", "map",
        "type", "dyn", "null_type", "has", "size", "contains",
    }
)  # fmt: skip
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})


class ExprError(Exception):
    """An expression that does not compile or fails when evaluated."""


# ---------------------------------------------------------------------------
# Token pass
# ---------------------------------------------------------------------------

_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS = _IDENT_START | frozenset("0123456789")
_DIGITS = frozenset("0123456789")
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {")": "(", "]": "[", "}": "{"}


@dataclass(slots=True)
class _Tok:
    kind: str  # ident | str | num | op | ws | blob
    text: str


def _tokenize(src: str) -> list[_Tok]:
    """Split CEL source into tokens. Linear in the length of the input."""
    toks: list[_Tok] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c in " \t\r\n":
            j = i + 1
            while j < n and src[j] in " \t\r\n":
                j += 1
            toks.append(_Tok("ws", src[i:j]))
            i = j
        elif c in _IDENT_START:
            j = i + 1
            while j < n and src[j] in _IDENT_CHARS:
                j += 1
            word = src[i:j]
            # string prefixes: r'..', b'..', rb'..'
            if j < n and src[j] in "'\"" and word.lower() in ("r", "b", "rb", "br"):
                end = _scan_string(src, j)
                toks.append(_Tok("str", src[i:end]))
                i = end
            else:
                toks.append(_Tok("ident", word))
                i = j
        elif c in _DIGITS or (c == "." and i + 1 < n and src[i + 1] in _DIGITS):
            j = i + 1
            while j < n and (src[j] in _IDENT_CHARS or src[j] == "."):
                j += 1
            toks.append(_Tok("num", src[i:j]))
            i = j
        elif c in "'\"":
            end = _scan_string(src, i)
            toks.append(_Tok("str", src[i:end]))
            i = end
        else:
            two = src[i : i + 2]
            if two in ("==", "!=", "<=", ">=", "&&", "||"):
                toks.append(_Tok("op", two))
                i += 2
            else:
                toks.append(_Tok("op", c))
                i += 1
    return toks


def _scan_string(src: str, i: int) -> int:
    """Return the index just past the string literal starting at src[i] (a quote)."""
    q = src[i]
    n = len(src)
    if src[i : i + 3] == q * 3:
        end = src.find(q * 3, i + 3)
        if end < 0:
            raise ExprError("unterminated string literal")
        return end + 3
    j = i + 1
    while j < n:
        ch = src[j]
        if ch == "\\":
            j += 2
            continue
        if ch == q:
            return j + 1
        if ch == "\n":
            break
        j += 1
    raise ExprError("unterminated string literal")


def _prev(toks: list[_Tok], i: int) -> int:
    i -= 1
    while i >= 0 and toks[i].kind == "ws":
        i -= 1
    return i


def _next(toks: list[_Tok], i: int) -> int:
    i += 1
    while i < len(toks) and toks[i].kind == "ws":
        i += 1
    return i


def _match_back(toks: list[_Tok], i: int) -> int:
    """Index of the opening bracket matching the closing bracket at i."""
    depth = 0
    while i >= 0:
        t = toks[i]
        if t.kind == "op" and t.text in _CLOSE:
            depth += 1
        elif t.kind == "op" and t.text in _OPEN:
            depth -= 1
            if depth == 0:
                return i
        i -= 1
    raise ExprError("unbalanced brackets")


def _match_forward(toks: list[_Tok], i: int) -> int:
    depth = 0
    while i < len(toks):
        t = toks[i]
        if t.kind == "op" and t.text in _OPEN:
            depth += 1
        elif t.kind == "op" and t.text in _CLOSE:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ExprError("unbalanced brackets")


def _left_operand(toks: list[_Tok], i: int) -> int:
    """Start index of the postfix expression ending at token i."""
    while True:
        if i < 0:
            raise ExprError("'contains' needs an operand on its left")
        t = toks[i]
        if t.kind == "op" and t.text in _CLOSE:
            j = _match_back(toks, i)
            p = _prev(toks, j)
            if p >= 0 and (
                toks[p].kind == "ident" or (toks[p].kind == "op" and toks[p].text in _CLOSE)
            ):
                i = p
                continue
            start = j
        elif t.kind in ("ident", "str", "num", "blob"):
            start = i
        else:
            raise ExprError(f"'contains' needs an operand on its left, found {t.text!r}")
        p = _prev(toks, start)
        if p >= 0 and toks[p].kind == "op" and toks[p].text == ".":
            i = _prev(toks, p)
            continue
        return start


def _right_operand(toks: list[_Tok], i: int) -> int:
    """End index (inclusive) of the operand starting at token i."""
    n = len(toks)
    while i < n and toks[i].kind == "op" and toks[i].text in ("!", "-"):
        i = _next(toks, i)
    if i >= n:
        raise ExprError("'contains' needs an operand on its right")
    t = toks[i]
    if t.kind == "op" and t.text in _OPEN:
        end = _match_forward(toks, i)
    elif t.kind in ("ident", "str", "num", "blob"):
        end = i
    else:
        raise ExprError(f"'contains' needs an operand on its right, found {t.text!r}")
    while True:
        nx = _next(toks, end)
        if nx >= n:
            return end
        t = toks[nx]
        if t.kind == "op" and t.text in ("(", "["):
            end = _match_forward(toks, nx)
        elif t.kind == "op" and t.text == ".":
            nn = _next(toks, nx)
            if nn >= n or toks[nn].kind != "ident":
                return end
            end = nn
        else:
            return end


@dataclass(frozen=True, slots=True)
class Analysis:
    """What the token pass found in one expression."""

    source: str  # CEL text after the rewrites
    names: tuple[str, ...]  # identifiers that may be variables, in first-seen order
    uses_role: bool
    volatile: bool
    site: bool = False  # calls a function of the site (inventory, config, runtime, dpl, odc)


def analyze(expr: str) -> Analysis:
    """Rewrite AliECS spellings to CEL and find the variables an expression may read."""
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise ExprError(
            f"expression is {len(expr)} characters long; the limit is {MAX_EXPRESSION_LENGTH}"
        )
    toks = _tokenize(expr)
    # `len(x)` -> `size(x)`
    for k, t in enumerate(toks):
        if t.kind == "ident" and t.text == "len":
            p, nx = _prev(toks, k), _next(toks, k)
            is_member = p >= 0 and toks[p].text == "."
            if not is_member and nx < len(toks) and toks[nx].text == "(":
                t.text = "size"
    # `a contains b` -> `(a).contains(b)`, left to right
    k = 0
    while k < len(toks):
        t = toks[k]
        if t.kind == "ident" and t.text == "contains":
            p, nx = _prev(toks, k), _next(toks, k)
            is_member = p >= 0 and toks[p].text == "."
            is_call = nx < len(toks) and toks[nx].text == "("
            if not is_member and not is_call:
                start = _left_operand(toks, p)
                end = _right_operand(toks, nx)
                left = "".join(x.text for x in toks[start : p + 1])
                right = "".join(x.text for x in toks[nx : end + 1])
                toks[start : end + 1] = [_Tok("blob", f"({left}).contains({right})")]
                k = start
        k += 1
    source = "".join(t.text for t in toks)
    # names, role functions, volatile functions
    sig = [t for t in _tokenize(source) if t.kind != "ws"]
    names: dict[str, None] = {}
    macro_locals: set[str] = set()
    uses_role = volatile = site = False
    for k, t in enumerate(sig):
        if t.kind != "ident":
            continue
        before = sig[k - 1].text if k > 0 else ""
        after = sig[k + 1].text if k + 1 < len(sig) else ""
        after2 = sig[k + 2].text if k + 2 < len(sig) else ""
        if before == ".":
            is_macro = t.text in _MACROS and after == "(" and k + 3 < len(sig)
            if is_macro and sig[k + 2].kind == "ident" and sig[k + 3].text == ",":
                macro_locals.add(sig[k + 2].text)
            continue
        if after == "(":
            if t.text in _ROLE_FUNCTIONS:
                uses_role = True
            continue
        if t.text in _NAMESPACES and after == ".":
            if (t.text, after2) in (("uid", "New"), ("util", "PrefixedOverride")):
                volatile = True
            continue
        if t.text in _SERVICE_NAMESPACES and after == "." and f"{t.text}.{after2}" in FUNCTIONS:
            volatile = site = True  # reads the site, bound at each evaluation
            continue
        if t.text in _RESERVED:
            continue
        names[t.text] = None
    for local in macro_locals:
        names.pop(local, None)
    return Analysis(source, tuple(names), uses_role, volatile, site)


# ---------------------------------------------------------------------------
# Role positions for Up(n) / Parent() / This()
# ---------------------------------------------------------------------------


class RolePos:
    """Where an expression is evaluated in the role tree.

    ``name`` is None while a role's own name is not known yet (in its enabled,
    defaults and vars); then This() and Up(0) are errors but Parent() works.
    """

    __slots__ = ("key", "label", "name", "parent", "path")

    def __init__(self, name: str | None, parent: RolePos | None, label: str = "") -> None:
        self.name = name
        self.parent = parent
        self.label = label  # the name as written, for messages while name is unknown
        self.key: str
        self.path: str | None
        if name is None:
            self.path = None
            base = parent.key if parent is not None else ""
            self.key = base + ".?"
        else:
            self.path = name if parent is None or parent.path is None else f"{parent.path}.{name}"
            self.key = self.path

    def up(self, n: int) -> dict[str, str]:
        if n < 0:
            raise ExprError(f"Up({n}): the argument must be 0 or more")
        pos: RolePos | None = self
        for _ in range(n):
            pos = pos.parent if pos is not None else None
        if pos is None:
            raise ExprError(f"Up({n}) goes above the root role")
        if pos.name is None or pos.path is None:
            raise ExprError(
                "This()/Up(0) is not available before the role's name is known "
                "(in enabled, defaults and vars); use Parent() or Up(n) with n >= 1"
            )
        return {"Name": pos.name, "Path": pos.path}


# ---------------------------------------------------------------------------
# Functions
# ---------------------------------------------------------------------------

_S = cel.Type.STRING
_B = cel.Type.BOOL
_I = cel.Type.INT
_DYN = cel.Type.DYN
_ROLE = cel.Type.Map(_S, _S)

_TRUTHY = frozenset({"true", "yes", "y", "1", "on", "ok"})
_FALSY = frozenset({"", "false", "no", "n", "0", "off", "none"})


def is_truthy(s: str) -> bool:
    return s.strip().lower() in _TRUTHY


def is_falsy(s: str) -> bool:
    return s.strip().lower() in _FALSY


def _atoi(s: str) -> int:
    try:
        n = int(s.strip())
    except ValueError:
        raise ExprError(f"strings.Atoi: {_short(s)} is not an integer") from None
    if not -(2**63) <= n < 2**63:
        raise ExprError(f"strings.Atoi: {_short(s)} is out of the 64-bit integer range")
    return n


def _short(s: str) -> str:
    """repr of a value for a message, cut short."""
    return repr(s) if len(s) <= 80 else repr(s[:60]) + f"... ({len(s)} characters)"


def _marshal(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _unmarshal(s: str) -> Any:
    too_deep = f"json.Unmarshal: lists and maps nest more than {MAX_JSON_NESTING} levels deep"
    try:
        value = json.loads(s)
    except ValueError as e:
        raise ExprError(f"json.Unmarshal: not JSON: {e}") from None
    except RecursionError:
        raise ExprError(too_deep) from None
    todo = [(value, 1)]
    while todo:  # iterative: the value may nest as deep as the JSON decoder allows
        v, depth = todo.pop()
        if isinstance(v, list | dict):
            if depth > MAX_JSON_NESTING:
                raise ExprError(too_deep)
            todo.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
        elif type(v) is int and v not in _INT_RANGE:
            raise ExprError("json.Unmarshal: a number is out of the 64-bit integer range")
    return value


def _sort(v: Any) -> Any:
    """AliECS's json.Sort: a list's items as strings, sorted; anything else as is."""
    if isinstance(v, list):
        return sorted(render(x) for x in v)
    return v


def _go_atoi(s: str) -> int | None:
    """Go's strconv.Atoi: an optional sign and ASCII digits, in the int64 range."""
    body = s[1:] if s[:1] in ("+", "-") else s
    if not body or not body.isascii() or not body.isdigit():
        return None
    n = int(s)
    return n if -(2**63) <= n < 2**63 else None


def suffix_in_range(value: str, prefix: str, low: str, high: str) -> str:
    """AliECS's util.SuffixInRange: "true" when ``value`` is ``prefix`` followed by a
    whole number within [low, high], else "false" (so also for an empty or missing
    prefix, and for bounds that are not numbers)."""
    if not prefix or not value.startswith(prefix):
        return "false"
    n, lo, hi = _go_atoi(value[len(prefix) :]), _go_atoi(low), _go_atoi(high)
    if n is None or lo is None or hi is None:
        return "false"
    return "true" if lo <= n <= hi else "false"


# Functions bound to the site (``templates.services``), with their arity
SERVICE_FUNCTIONS: dict[str, int] = {
    "inventory.DetectorForHost": 1,
    "inventory.DetectorsForHosts": 1,
    "inventory.CRUCardsForHost": 1,
    "inventory.EndpointsForCRUCard": 2,
    "config.Get": 1,
    "config.GetLegacy": 1,
    "config.Resolve": 4,
    "config.ResolvePath": 1,
    "runtime.Get": 2,
    "runtime.Set": 3,
    "dpl.Generate": 1,
    "dpl.GenerateFromUri": 1,
    "dpl.GenerateFromUriOrFallbackToTemplate": 1,
    "odc.GenerateEPNTopologyFullname": 0,
    "odc.GenerateEPNWorkflowScript": 0,
    "service.Endpoints": 1,
}
_SERVICE_NAMESPACES = frozenset(n.split(".")[0] for n in SERVICE_FUNCTIONS)

FUNCTIONS: set[str] = set()  # the namespaced functions templates may call (``_decl``)
# namespaces of functions (AliECS's among them): ``ns.Name(`` there names a function
_FUNCTION_NAMESPACES = _NAMESPACES | {"inventory", "config", "runtime", "dpl", "odc", "service"}


def _decl(name: str, params: list[Any], ret: Any, impl: Callable[..., Any] | None) -> Any:
    if "." in name:
        FUNCTIONS.add(name)
    oid = name.replace(".", "_") + "_" + "_".join(p.name() for p in params)
    if impl is None:
        return cel.FunctionDecl(name, [cel.Overload(oid, ret, params)])
    return cel.FunctionDecl(name, [cel.Overload(oid, ret, params, impl=impl)])


_EXTENSION = cel.CelExtension(
    "corral",
    [
        _decl("strings.IsTruthy", [_S], _B, is_truthy),
        _decl("strings.IsFalsy", [_S], _B, is_falsy),
        _decl("strings.ToUpper", [_S], _S, str.upper),
        _decl("strings.ToLower", [_S], _S, str.lower),
        _decl("strings.TrimSpace", [_S], _S, str.strip),
        _decl("strings.TrimQuotes", [_S], _S, lambda s: s.strip('"')),
        _decl("strings.Atoi", [_S], _I, _atoi),
        _decl("strings.Itoa", [_I], _S, str),
        _decl("json.Marshal", [_DYN], _S, _marshal),
        _decl("json.Unmarshal", [_S], _DYN, _unmarshal),
        _decl("json.Serialize", [_DYN], _S, _marshal),
        _decl("json.Deserialize", [_S], _DYN, _unmarshal),
        _decl("json.Sort", [_DYN], _DYN, _sort),
        _decl("util.SuffixInRange", [_S, _S, _S, _S], _S, suffix_in_range),
        _decl("util.Nullable", [_S], _S, lambda s: s),
        _decl("util.Dump", [_S, _S], _S, lambda s, _path: s),
        # bound per evaluation: they read the seed, the variables or the role position
        _decl("uid.New", [], _S, None),
        _decl("util.PrefixedOverride", [_S, _S], _S, None),
        # bound per expansion: they read the site (``templates.services``)
        *(_decl(name, [_S] * n, _S, None) for name, n in SERVICE_FUNCTIONS.items()),
        _decl("Up", [_I], _ROLE, None),
        _decl("Parent", [], _ROLE, None),
        _decl("This", [], _ROLE, None),
    ],
)
_STRINGS = ext_strings.ExtStrings()


def prefixed_override(stack: Mapping[str, str], varname: str, prefix: str) -> str:
    """AliECS's util.PrefixedOverride: ``<prefix>_<varname>`` if set, else ``varname``."""
    for key in (f"{prefix}_{varname}", varname):
        value = stack.get(key)
        if value is not None and value.strip() and value != "none":
            return value
    return ""


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def render(value: Any) -> str:
    """A CEL result as template text: lists and maps as JSON, booleans lowercase."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | dict):
        return _marshal(value)
    return str(value)


def _plain(value: Any) -> Any:
    """Turn CEL container contents into JSON-able Python values."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {render(k) if not isinstance(k, str) else k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    text = str(value)
    return None if text == "null" else text


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _compile_error_message(err: BaseException) -> str:
    raw = str(err)
    lines = []
    for line in raw.splitlines():
        line = line.strip()
        marker = "ERROR: <input>:"
        at = line.find(marker)
        if at >= 0:
            rest = line[at + len(marker) :]
            # rest = "L:C: message"
            parts = rest.split(": ", 1)
            msg = parts[1] if len(parts) == 2 else rest
            lines.append(_humanize(msg))
    if not lines:
        first = raw.splitlines()[0] if raw else "cannot compile"
        lines.append(_humanize(first.split(": ", 1)[-1]))
    return "; ".join(lines)


def _humanize(msg: str) -> str:
    msg = msg.replace(" [INVALID_ARGUMENT]", "").replace(" [CANCELLED]", "").strip()
    if msg.startswith("undeclared reference to "):
        name = msg[len("undeclared reference to ") :].split(" (in container")[0]
        return f"undefined variable {name}"
    if msg.startswith("Syntax error: "):
        return "syntax error: " + msg[len("Syntax error: ") :]
    return msg


_ROLE_ATTR = re.compile(r"^(?:Up\((\d+)\)|(Parent)\(\)|(This)\(\))\.(Path|Name)$")


class Expr:
    """One expression text: compiled once per set of defined variables, memoized.

    Two shapes skip CEL when they can: a bare variable (``{{ host }}``) and a role
    attribute (``{{ Parent().Path }}``); they are most of a large template's holes.
    """

    __slots__ = (
        "analysis", "bare", "error", "lookups", "memo", "memoize", "misses", "programs",
        "role_attr", "text",
    )  # fmt: skip

    def __init__(self, text: str) -> None:
        self.text = text
        self.error: str | None = None
        self.programs: dict[frozenset[str], Any] = {}
        self.memo: dict[tuple[Any, ...], Any] = {}
        self.memoize = True  # off once the memo proves useless (inputs unique per use)
        self.lookups = 0
        self.misses = 0
        self.bare: str | None = None
        self.role_attr: tuple[int, str] | None = None
        try:
            self.analysis = analyze(text)
        except ExprError as e:
            self.error = str(e)
            self.analysis = Analysis(text, (), False, False)
            return
        unknown = _unknown_function(self.analysis.source)
        if unknown is not None:
            self.error = unknown
            return
        src = self.analysis.source.strip()
        if self.analysis.names == (src,):
            self.bare = src
        m = _ROLE_ATTR.match(src)
        if m is not None:
            up = int(m.group(1)) if m.group(1) is not None else (1 if m.group(2) else 0)
            self.role_attr = (up, m.group(4))


def _unknown_function(source: str) -> str | None:
    """Why ``source`` calls a function that does not exist (``util.SuffixInRang(…)``),
    said as such rather than as undefined variables; None when it calls none."""
    sig = [t for t in _tokenize(source) if t.kind != "ws"]
    for k in range(len(sig) - 3):
        ns, dot, fn, paren = sig[k : k + 4]
        if (
            ns.kind == "ident" and ns.text in _FUNCTION_NAMESPACES and dot.text == "."
            and fn.kind == "ident" and fn.text[:1].isupper() and paren.text == "("
            and (k == 0 or sig[k - 1].text != ".")
        ):  # fmt: skip
            name = f"{ns.text}.{fn.text}"
            if name in FUNCTIONS:
                continue
            close = difflib.get_close_matches(name, sorted(FUNCTIONS), n=1, cutoff=0.75)
            if close:
                return f"unknown function {name}; did you mean {close[0]}?"
            same = sorted(f for f in FUNCTIONS if f.startswith(ns.text + "."))
            if same:
                return f"unknown function {name} (corral's {ns.text} functions: {', '.join(same)})"
            return f"unknown function {name}: corral has no {ns.text}.* functions"
    return None


_PROBATION = 2048  # lookups before a memo that keeps missing is switched off


class _Failure:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class Evaluator:
    """Compiles and evaluates template expressions for one expansion.

    ``seed`` makes ``uid.New()`` deterministic: the n-th call of an expansion
    always returns the same id for the same seed.
    """

    def __init__(self, seed: str, services: Services | None = None) -> None:
        self._seed = seed
        self.services = services
        # dpl.*: (function name, argument, the variables) -> an include reference; set
        # by the expander, which renders jit files and registers the generated files
        self.dpl: Callable[[str, str, Mapping[str, str]], str] | None = None
        self._stack: Mapping[str, str] = {}
        self._service_fns: list[Any] | None = None
        self.site_errors: list[str] = []  # error values site functions answered (AliECS's way)
        self._uid_count = 0
        self._envs: dict[frozenset[str], Any] = {}
        self._exprs: dict[str, Expr] = {}

    def expr(self, text: str) -> Expr:
        e = self._exprs.get(text)
        if e is None:
            e = self._exprs[text] = Expr(text)
        return e

    def new_uid(self) -> str:
        self._uid_count += 1
        digest = hashlib.blake2b(f"{self._seed}:{self._uid_count}".encode(), digest_size=8)
        n = int.from_bytes(digest.digest(), "big")
        alphabet = "0123456789abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
        out = []
        for _ in range(11):
            n, r = divmod(n, len(alphabet))
            out.append(alphabet[r])
        return "".join(out)

    def evaluate(self, e: Expr, stack: Mapping[str, str], pos: RolePos | None) -> Any:
        """Value of the expression (a plain Python value); ExprError on failure."""
        bare = e.bare
        if bare is not None:
            value = stack.get(bare)
            if value is not None:
                return value
        elif e.role_attr is not None and pos is not None:
            up, attr = e.role_attr
            return pos.up(up)[attr]
        if e.error is not None:
            raise ExprError(e.error)
        a = e.analysis
        if a.volatile or not e.memoize:
            return self._run(e, stack, pos)
        get = stack.get
        key: tuple[Any, ...] = tuple([get(n) for n in a.names])
        if a.uses_role:
            key += (pos.key if pos is not None else None,)
        hit = e.memo.get(key, e)
        e.lookups += 1
        if hit is e:
            try:
                hit = self._run(e, stack, pos)
            except ExprError as err:
                hit = _Failure(str(err))
            e.memo[key] = hit
            e.misses += 1
            if e.lookups >= _PROBATION and e.misses * 8 > e.lookups * 7:
                e.memoize = False
                e.memo = {}
        if type(hit) is _Failure:
            raise ExprError(hit.message)
        return hit

    def _program(self, e: Expr, declared: frozenset[str]) -> Any:
        prog = e.programs.get(declared)
        if prog is None:
            env = self._envs.get(declared)
            if env is None:
                env = cel.NewEnv(
                    variables=dict.fromkeys(sorted(declared), _S),
                    extensions=[_STRINGS, _EXTENSION],
                )
                self._envs[declared] = env
            try:
                prog = env.compile(e.analysis.source)
            except Exception as err:  # the binding raises RuntimeError with CEL's text
                prog = _Failure(_compile_error_message(err))
            e.programs[declared] = prog
        if type(prog) is _Failure:
            raise ExprError(prog.message)
        return prog

    def _run(self, e: Expr, stack: Mapping[str, str], pos: RolePos | None) -> Any:
        a = e.analysis
        data = {n: stack[n] for n in a.names if n in stack}
        prog = self._program(e, frozenset(data))
        functions = []
        if a.uses_role:
            functions.extend(self._role_functions(pos))
        if a.site:
            self._stack = stack
            functions.extend(self._site_functions())
        if a.volatile:
            functions.append(cel.Function("uid.New", [], False, self.new_uid, _S))
            functions.append(
                cel.Function(
                    "util.PrefixedOverride",
                    [_S, _S],
                    False,
                    lambda v, p: prefixed_override(stack, v, p),
                    _S,
                )
            )
        try:
            result = (
                prog.eval(data=data, functions=functions) if functions else prog.eval(data=data)
            )
        except Exception as err:  # pragma: no cover - the binding reports errors as values
            raise ExprError(str(err)) from None
        if result.type() == cel.Type.ERROR:
            raise ExprError(_humanize(str(result.value()).split(": ", 1)[-1]))
        return _plain(result.plain_value())

    def _site_functions(self) -> list[Any]:
        """The ``SERVICE_FUNCTIONS``, bound to this expansion's site (made once)."""
        if self._service_fns is None:
            self._service_fns = [
                cel.Function(name, [_S] * n, False, self._site_impl(name), _S)
                for name, n in SERVICE_FUNCTIONS.items()
            ]
        return self._service_fns

    def _site_impl(self, name: str) -> Callable[..., str]:
        if name.startswith("dpl."):

            def dpl(arg: str) -> str:
                if self.dpl is None:
                    raise ExprError(f"{name}: DPL workflows cannot be generated here")
                try:
                    return self.dpl(name, arg, self._stack)
                except ServiceError as e:
                    raise ExprError(f"{name}: {e}") from None

            return dpl
        if name.startswith("odc."):
            var = {
                "odc.GenerateEPNTopologyFullname": "odc_epn_topology_fullname",
                "odc.GenerateEPNWorkflowScript": "odc_epn_workflow_script",
            }[name]

            def odc() -> str:
                value = self._stack.get(var)
                if value is None:
                    return error_value(f"{name}: set {var} in the site defaults")
                return value

            return odc
        method = {
            "inventory.DetectorForHost": "detector_for_host",
            "inventory.DetectorsForHosts": "detectors_for_hosts",
            "inventory.CRUCardsForHost": "cru_cards_for_host",
            "inventory.EndpointsForCRUCard": "endpoints_for_cru_card",
            "config.Resolve": "config_resolve",
            "config.ResolvePath": "config_resolve_path",
            "runtime.Get": "runtime_get",
            "runtime.Set": "runtime_set",
            "service.Endpoints": "service_endpoints",
        }.get(name)

        def site(*args: str) -> str:
            svc = self.services
            if svc is None:
                result = error_value(f"{name}: no site is known here")
            elif method is None:  # config.Get, config.GetLegacy: rendered with the variables
                result = svc.config_get(args[0], self._stack)
            else:
                result = getattr(svc, method)(*args)
            if result.startswith(('{"error":', '["error: ')):
                shown = ", ".join(repr(a[:60]) for a in args)
                self.site_errors.append(f"{name}({shown}) answered {result[:300]}")
            return result

        return site

    @staticmethod
    def _role_functions(pos: RolePos | None) -> list[Any]:
        def up(n: int) -> dict[str, str]:
            if pos is None:
                raise ExprError("Up()/Parent()/This() are only available inside a role")
            return pos.up(n)

        return [
            cel.Function("Up", [_I], False, up, _ROLE),
            cel.Function("Parent", [], False, lambda: up(1), _ROLE),
            cel.Function("This", [], False, lambda: up(0), _ROLE),
        ]
