"""Durations as templates and job files write them: Go-style (``1m30s``, ``500ms``) or a
plain number of seconds. Pure."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration (``1m30s``, ``500ms``) or a plain number;
    ValueError for anything else, a negative, NaN or infinite one."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pos, total = 0, 0.0
        for m in _PART.finditer(s):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise ValueError(f"bad duration {text!r}: use e.g. 500ms, 10s, 1m30s") from None
        value = total
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"bad duration {text!r}: must be a finite number, not negative")
    return value
