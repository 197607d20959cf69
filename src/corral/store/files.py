"""Template files read from the local filesystem, for the expander's ``Sources``.

Reads are bounded (a template larger than ``MAX_TEMPLATE_BYTES`` is refused) and
text must be UTF-8; anything else is reported as a missing or unreadable file by
the expander, never as a crash.
"""

from __future__ import annotations

import os

MAX_TEMPLATE_BYTES = 8 * 1024 * 1024


class DiskSources:
    """Reads template files relative to the current directory."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}

    def read(self, path: str) -> str | None:
        try:
            if not os.path.isfile(path):
                return None
            if os.path.getsize(path) > MAX_TEMPLATE_BYTES:
                self.problems[path] = f"larger than {MAX_TEMPLATE_BYTES} bytes"
                return None
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            self.problems[path] = str(e)
            return None
