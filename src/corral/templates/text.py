"""Template strings: literal text with ``{{ expr }}`` holes, split once at load time.

``{{ raw(expr) }}`` is a raw hole: where a caller's value would be kept out of a
command's parse (see ``templates.quoting``), a raw hole pastes it as written, provided
it holds no shell or literal syntax.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from corral.templates.diagnostics import Loc

if TYPE_CHECKING:
    from corral.templates.expressions import Expr


# Private-use characters that bracket a caller's value inside expanded strings, so that
# quoting knows which characters came from a caller. Never in a template's own text.
TAINT_START = "\ue000"
TAINT_END = "\ue001"
_MARKS = str.maketrans("", "", TAINT_START + TAINT_END)


def unmark(s: str) -> str:
    """``s`` without taint marks."""
    if TAINT_START in s or TAINT_END in s:
        return s.translate(_MARKS)
    return s


class Hole:
    """One ``{{ expr }}``: its expression text and where that text starts.

    ``expr`` is filled in by the expander on first use: definitions are parsed per
    expansion, so the compiled expression can live on the hole itself. ``raw`` is set
    for ``{{ raw(expr) }}``, whose ``source`` is then the inner expression.
    """

    __slots__ = ("expr", "loc", "raw", "source")

    def __init__(self, source: str, loc: Loc) -> None:
        inner = _raw_inner(source)
        self.raw = inner is not None
        self.source = source if inner is None else inner
        self.loc = loc
        self.expr: Expr | None = None


def _raw_inner(source: str) -> str | None:
    """The expression inside ``raw( ... )`` when that call is the whole hole."""
    s = source.strip()
    if not s.startswith("raw") or not s.endswith(")"):
        return None
    rest = s[3:].lstrip()
    if not rest.startswith("("):
        return None
    for k, c, depth in _unquoted(rest, 0):
        if c in ")]}" and depth == 1:
            inner = rest[1:k].strip()
            return inner if k == len(rest) - 1 and inner else None
    return None


def _unquoted(s: str, i: int) -> Iterator[tuple[int, str, int]]:
    """(index, character, bracket depth before it) of each character of ``s`` from
    ``i`` that is outside string literals."""
    depth, quote, n = 0, "", len(s)
    while i < n:
        c = s[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        else:
            yield i, c, depth
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
        i += 1


class TextSyntaxError(ValueError):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class Text:
    """A string value of a template. ``const`` is set when it holds no expression."""

    __slots__ = ("const", "loc", "parts", "raw", "single")

    def __init__(self, raw: str, loc: Loc, parts: tuple[str | Hole, ...]) -> None:
        raw = unmark(raw)
        parts = tuple(unmark(p) if type(p) is str else p for p in parts)
        self.raw = raw
        self.loc = loc
        self.parts = parts
        self.const: str | None = raw if not any(type(p) is Hole for p in parts) else None
        only = parts[0] if len(parts) == 1 else None
        self.single: Hole | None = only if type(only) is Hole else None

    @property
    def holes(self) -> tuple[Hole, ...]:
        return tuple(p for p in self.parts if type(p) is Hole)

    def __repr__(self) -> str:
        return f"Text({self.raw!r})"


def split_holes(raw: str) -> list[tuple[str, int] | str]:
    """Split ``raw`` into literal strings and (expression, offset) pairs.

    The closing ``}}`` is found outside string literals and brackets, so an
    expression may contain map literals and strings with braces.
    """
    out: list[tuple[str, int] | str] = []
    i, n = 0, len(raw)
    while i < n:
        start = raw.find("{{", i)
        if start < 0:
            out.append(raw[i:])
            break
        if start > i:
            out.append(raw[i:start])
        j = n
        for k, c, depth in _unquoted(raw, start + 2):
            if c == "}" and depth == 0 and raw.startswith("}}", k):
                j = k
                break
        if j >= n:
            raise TextSyntaxError("'{{' without a matching '}}'", start)
        inner = raw[start + 2 : j]
        stripped = inner.strip()
        if not stripped:
            raise TextSyntaxError("empty expression '{{ }}'", start)
        lead = len(inner) - len(inner.lstrip())
        out.append((stripped, start + 2 + lead))
        i = j + 2
    return out
