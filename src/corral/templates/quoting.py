"""Keeping a caller's value out of a command's parse. Pure.

The expander brackets every value a caller set (and every result computed from one)
with two private-use characters, ``TAINT_START`` and ``TAINT_END`` (``templates.text``).
Where the expanded text is parsed again, this module takes the marks out and decides
what the caller's characters become:

- **a shell script** (``shell: true`` commands, ``exec.Shell``): the value never enters
  the script's text. It goes into an environment variable ``CORRAL_VALUE_<n>`` of the
  process, and the script reads it as ``"${CORRAL_VALUE_<n>}"`` (inside double quotes
  as ``${CORRAL_VALUE_<n>}``; inside single quotes the quotes are closed around it). A
  shell expands a parameter without parsing its value again, so ``$(…)``, backticks,
  ``;``, ``|``, newlines and quotes in it stay data, even where the quoting context is
  guessed wrong (a here-document, say: there the reference keeps its double quotes).
- **a call's** ``plugin.Method(args)``: inside a string literal, the value is escaped
  so that the literal goes on; outside one, it becomes a literal of its own (a number,
  ``true``, ``false``, ``null`` as written; anything else as a quoted string). One value
  is one argument.

The template's own text is code and is left as written: templates are written by the
people who run the experiment, callers only fill in variables.
"""

from __future__ import annotations

import re
from typing import Any

from corral.templates.text import TAINT_END, TAINT_START

ENV_PREFIX = "CORRAL_VALUE_"
# what a caller's value may hold in a raw hole: words, no shell or literal syntax
RAW_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./ \t-]*")
_LITERAL = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")


def marked(s: str) -> bool:
    return TAINT_START in s or TAINT_END in s


def segments(m: str) -> list[tuple[str, bool]]:
    """``m`` as (text, from a caller) pieces. An end mark without a start taints what
    came before it; a start without an end taints the rest: unbalanced marks only ever
    widen what counts as the caller's."""
    out: list[tuple[str, bool]] = []
    depth = 0
    buf: list[str] = []

    def flush() -> None:
        if buf:
            out.append(("".join(buf), depth > 0))
            buf.clear()

    for c in m:
        if c == TAINT_START:
            flush()
            depth += 1
        elif c == TAINT_END:
            flush()
            if depth == 0:
                out[:] = [(text, True) for text, _ in out]
            else:
                depth -= 1
        else:
            buf.append(c)
    flush()
    merged: list[tuple[str, bool]] = []
    for text, t in out:
        if merged and merged[-1][1] == t:
            merged[-1] = (merged[-1][0] + text, t)
        else:
            merged.append((text, t))
    return merged


class _ShellContext:
    """Where a POSIX shell lexer is after some text: outside quotes, in '…' or in "…",
    with ``$( … )`` and backquotes opening a fresh context (a stack of them)."""

    __slots__ = ("escape", "stack")

    def __init__(self) -> None:
        self.stack: list[list[Any]] = [["none", 0, ""]]  # [state, open parens, closer]
        self.escape = False

    @property
    def state(self) -> str:
        return str(self.stack[-1][0])

    def feed(self, text: str) -> None:
        prev = ""
        for c in text:
            top = self.stack[-1]
            state = top[0]
            if self.escape:
                self.escape = False
            elif state == "single":
                if c == "'":
                    top[0] = "none"
            elif c == "\\":
                self.escape = True
            elif c == "(" and prev == "$":
                self.stack.append(["none", 0, ")"])
            elif c == "`" and top[2] == "`" and state == "none":
                if len(self.stack) > 1:
                    self.stack.pop()
            elif c == "`":
                self.stack.append(["none", 0, "`"])
            elif state == "double":
                if c == '"':
                    top[0] = "none"
            elif c == "'":
                top[0] = "single"
            elif c == '"':
                top[0] = "double"
            elif c == "(":
                top[1] += 1
            elif c == ")":
                if top[1] > 0:
                    top[1] -= 1
                elif top[2] == ")" and len(self.stack) > 1:
                    self.stack.pop()
            prev = c

    def reference(self, name: str) -> str:
        if self.state == "single":
            return f"'\"${{{name}}}\"'"
        if self.state == "double":
            return f"${{{name}}}"
        return f'"${{{name}}}"'


def shell_script(m: str, first: int = 1) -> tuple[str, list[tuple[str, str]]]:
    """A script with each caller's value replaced by a reference to a variable, and
    those variables (``CORRAL_VALUE_<first>``, ...)."""
    if not marked(m):
        return m, []
    ctx = _ShellContext()
    out: list[str] = []
    env: dict[str, str] = {}  # value -> its variable: one variable per distinct value
    for text, tainted in segments(m):
        if not tainted:
            out.append(text)
            ctx.feed(text)
            continue
        name = env.get(text)
        if name is None:
            name = env[text] = f"{ENV_PREFIX}{first + len(env)}"
        out.append(ctx.reference(name))
    return "".join(out), [(name, value) for value, name in env.items()]


def _escape_in(value: str, quote: str) -> str:
    out = []
    for c in value:
        if c == "\\" or c == quote:
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 0x20 or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def call_func(m: str, first: int = 1) -> tuple[str, list[tuple[str, str]]]:
    """A call's ``plugin.Method(args)`` text with each caller's value one literal (or
    inside one), and the variables ``exec.Shell`` reads them from."""
    if not marked(m):
        return m, []
    segs = segments(m)
    clean_head = "".join(t for t, tainted in segs if not tainted).lstrip()
    is_shell = clean_head.startswith("exec.Shell(")
    out: list[str] = []
    env: dict[str, str] = {}  # value -> its variable
    quote = ""  # the open literal's quote character, or ""
    escape = False
    shell = _ShellContext()
    for text, tainted in segs:
        if tainted:
            if not quote:
                out.append(text if _LITERAL.fullmatch(text) else repr(text))
            elif is_shell:
                name = env.get(text)
                if name is None:
                    name = env[text] = f"{ENV_PREFIX}{first + len(env)}"
                out.append(_escape_in(shell.reference(name), quote))
            else:
                out.append(_escape_in(text, quote))
            continue
        out.append(text)
        for c in text:
            if escape:
                escape = False
                if quote:
                    shell.feed(c)
            elif quote:
                if c == "\\":
                    escape = True
                elif c == quote:
                    quote = ""
                else:
                    shell.feed(c)
            elif c in "'\"":
                quote = c
                shell = _ShellContext()
    return "".join(out), [(name, value) for value, name in env.items()]


__all__ = ["ENV_PREFIX", "RAW_SAFE", "call_func", "marked", "segments", "shell_script"]
