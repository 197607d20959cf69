"""Errors with a place: ``FILE:LINE:COL: message (role path)``.

The expander never stops at the first problem: every error of a run is collected,
identical ones (same place, same message) are reported once with a count of the
role instances they hit, and the caller prints them all and exits 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Loc:
    """A place in a template file; line and col are 1-based."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.col}"

    def shifted(self, cols: int) -> Loc:
        return Loc(self.file, self.line, self.col + cols)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    loc: Loc
    message: str
    role: str | None = None
    repeats: int = 1

    def __str__(self) -> str:
        text = f"{self.loc}: {self.message}"
        if self.role:
            text += f" ({self.role})"
        if self.repeats > 1:
            text += f" [and {self.repeats - 1} more role instance(s)]"
        return text


class Diagnostics:
    """Collects errors in order of discovery, folding repeats of the same error."""

    __slots__ = ("_by_key", "_order")

    def __init__(self) -> None:
        self._by_key: dict[tuple[Loc, str], Diagnostic] = {}
        self._order: list[tuple[Loc, str]] = []

    def error(self, loc: Loc, message: str, role: str | None = None) -> None:
        key = (loc, message)
        seen = self._by_key.get(key)
        if seen is None:
            self._by_key[key] = Diagnostic(loc, message, role)
            self._order.append(key)
        else:
            self._by_key[key] = Diagnostic(seen.loc, message, seen.role, seen.repeats + 1)

    def __bool__(self) -> bool:
        return bool(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def items(self) -> list[Diagnostic]:
        """Errors sorted by file and line, so that output reads like a compiler's."""
        return sorted((self._by_key[k] for k in self._order), key=lambda d: d.loc)


class TemplateError(Exception):
    """Raised by the public entry points when a template has errors."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))
