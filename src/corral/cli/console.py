"""Output for the command line that costs nothing until it is used.

Rich takes ~50 ms to import; most commands print a line or a table and need none of
it. ``Lazy`` is a console that imports Rich on its first ``print`` (or any other
attribute), ``escape`` is Rich's markup escape without importing Rich, and ``table``
prints aligned columns in plain text: never cut to the terminal's width, bold
headers on a terminal only.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from re import Match
from typing import IO, Any

_MARKUP = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def escape(markup: str) -> str:
    """Text that Rich prints as it is (Rich's ``rich.markup.escape``)."""

    def double(match: Match[str]) -> str:
        backslashes, text = match.groups()
        return f"{backslashes}{backslashes}\\{text}"

    markup = _MARKUP.sub(double, markup)
    if markup.endswith("\\") and not markup.endswith("\\\\"):
        return markup + "\\"
    return markup


_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")  # Rich's markup tag (rich.markup.RE_TAGS)


def plain(markup: str) -> str:
    """Rich markup as the text Rich prints without styles: the tags dropped, escaped
    brackets kept."""

    def tag(m: Match[str]) -> str:
        whole, backslashes, _ = m.groups()
        if len(backslashes) % 2:  # an escaped bracket: text
            return backslashes[: len(backslashes) // 2] + whole[len(backslashes) :]
        return backslashes[: len(backslashes) // 2]

    return _TAG.sub(tag, markup)


class Lazy:
    """A ``rich.console.Console(highlight=False, soft_wrap=True)`` made on first use.

    Printing lines of text where there is no terminal (a pipe, a file, a test) needs
    no Rich: ``print`` writes them with their markup taken out, as Rich would (no
    styles where there is no terminal), and Rich is imported only for a terminal, or
    for what is not text (tables, progress bars)."""

    def __init__(self, stderr: bool = False, **options: Any) -> None:
        self._options = {"highlight": False, "soft_wrap": True, "stderr": stderr, **options}
        self._stderr = stderr
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._rich(), name)

    def _rich(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    @property
    def file(self) -> IO[str]:
        return sys.stderr if self._stderr else sys.stdout

    @property
    def is_terminal(self) -> bool:
        """Whether it writes to a terminal (as Rich decides: TTY_COMPATIBLE, FORCE_COLOR,
        then isatty)."""
        if self._console is not None:
            return bool(self._console.is_terminal)
        tty = os.environ.get("TTY_COMPATIBLE", "")
        if tty in ("0", "1"):
            return tty == "1"
        force = os.environ.get("FORCE_COLOR")
        if force is not None:
            return force != ""
        return _is_terminal(self.file)

    def print(self, *objects: Any, sep: str = " ", end: str = "\n", **options: Any) -> None:
        if self.is_terminal or not all(isinstance(o, str) for o in objects) or set(options) - {
            "markup", "emoji", "highlight", "soft_wrap"
        }:  # fmt: skip
            self._rich().print(*objects, sep=sep, end=end, **options)
            return
        text = sep.join(objects)
        if options.get("markup", True):
            text = plain(text)
        f = self.file
        f.write(text + end)
        f.flush()


class _NoProgress:
    """What ``progress`` gives when it would show nothing: Rich not imported."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kw: Any) -> int:
        return 0

    def update(self, *args: Any, **kw: Any) -> None:
        return None


def progress(console: Any, *columns: str, **options: Any) -> Any:
    """A Rich progress display on ``console``: its description, a bar, done/total and
    the elapsed time, then the ``columns`` given (Rich text columns). Disabled
    (``disable=True``), it is one that does nothing, without importing Rich."""
    if options.get("disable"):
        return _NoProgress(console)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    if isinstance(console, Lazy):
        console = console._rich()  # (Rich wants its own: it enters it, and more)
    first = columns[0] if columns else "{task.description}"
    rest = [TextColumn(c) for c in columns[1:]]
    return Progress(
        TextColumn(first), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), *rest,
        console=console, **options,
    )  # fmt: skip


def table(
    rows: Sequence[Sequence[str]],
    header: Sequence[str],
    stream: IO[str] | None = None,
    style: Callable[[str], str] | None = None,
) -> None:
    """Print ``rows`` under ``header``: columns two spaces apart, padded to the widest
    cell, nothing cut (a pipe or a file gets every character of every cell)."""
    stream = stream or sys.stdout
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    head = line(header)
    if style is None and _is_terminal(stream):
        head = f"\x1b[1m{head}\x1b[0m"
    elif style is not None:
        head = style(head)
    stream.write(head + "\n")
    for row in rows:
        stream.write(line(row) + "\n")
    stream.flush()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = ["Lazy", "escape", "progress", "table"]
