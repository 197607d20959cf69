"""Regular expressions from templates and callers, in RE2. Pure.

Constraint patterns (``operator: regex``) may come from a caller's variable; Python's
``re`` backtracks, and some patterns take minutes on a short value. RE2 runs in time
linear in the value for any pattern, and refuses what needs backtracking
(backreferences, lookaround).
"""

from __future__ import annotations

from typing import Any

import re2  # type: ignore[import-untyped]

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error comes back as the exception, not on stderr


def compile_regex(pattern: str) -> Any:
    """``pattern`` compiled by RE2, or None when RE2 refuses it (``regex_error``)."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error:
        return None


def regex_error(pattern: str) -> str | None:
    """Why RE2 refuses ``pattern``, or None."""
    try:
        re2.compile(pattern, _OPTIONS)
    except re2.error as e:
        why = e.args[0] if e.args else e
        return why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
    return None


__all__ = ["compile_regex", "regex_error"]
