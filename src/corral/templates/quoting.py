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
_INTEGER = re.compile(r"-?[0-9]{1,18}")
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
    in a comment, or in arithmetic; ``$( … )`` and backquotes open a fresh context (a
    stack of them), ``$(( … ))`` and ``(( … ))`` an arithmetic one."""

    __slots__ = ("escape", "prev", "prev2", "skip", "stack")

    def __init__(self) -> None:
        self.stack: list[list[Any]] = [["none", 0, ""]]  # [state, open parens, closer]
        self.escape = False
        self.prev = self.prev2 = "\n"
        self.skip = False  # the second ")" of an arithmetic "))"

    @property
    def state(self) -> str:
        return str(self.stack[-1][0])

    def feed(self, text: str) -> None:
        for c in text:
            self._char(c)
            self.prev2, self.prev = self.prev, c

    def _char(self, c: str) -> None:
        top = self.stack[-1]
        state = top[0]
        if self.skip and c == ")":
            self.skip = False
            return
        self.skip = False
        if self.escape:
            self.escape = False
        elif state == "single":
            if c == "'":
                top[0] = "none"
        elif state == "comment":
            if c == "\n":
                top[0] = "none"
        elif c == "\\":
            self.escape = True
        elif state == "arith":
            if c == "(":
                top[1] += 1
            elif c == ")":
                if top[1] > 0:
                    top[1] -= 1
                elif len(self.stack) > 1:
                    self.stack.pop()
                    self.skip = True
        elif c == "(" and self.prev == "(" and state == "none":
            if self.prev2 == "$" and top[2] == ")" and top[1] == 0 and len(self.stack) > 1:
                self.stack[-1] = ["arith", 0, "))"]  # "$((": not a command substitution
            else:
                top[1] = max(0, top[1] - 1)  # "((": the first "(" was counted
                self.stack.append(["arith", 0, "))"])
        elif c == "(" and self.prev == "$" and state in ("none", "double"):
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
        elif c == "#" and self.prev in " \t\n;&|()":
            top[0] = "comment"
        elif c == "(":
            top[1] += 1
        elif c == ")":
            if top[1] > 0:
                top[1] -= 1
            elif top[2] == ")" and len(self.stack) > 1:
                self.stack.pop()

    def reference(self, name: str, value: str) -> str:
        state = self.state
        if state == "arith":
            # bash evaluates a variable's text in arithmetic (an array subscript in it
            # runs commands): only a whole number goes in, as written
            if not _INTEGER.fullmatch(value):
                raise ValueError(
                    "a caller's value in shell arithmetic must be a whole number, "
                    f"not {value[:40]!r}"
                )
            return value
        if state == "single":
            return f"'\"${{{name}}}\"'"
        if state == "double":
            return f"${{{name}}}"
        if state == "comment":
            return ""
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
        name = env.get(text) or f"{ENV_PREFIX}{first + len(env)}"
        ref = ctx.reference(name, text)
        if "$" in ref:
            env[text] = name
        out.append(ref)
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
    inside one), and the variables ``exec.Shell`` reads them from. ValueError for a
    caller's value where it cannot go (shell arithmetic)."""
    if not marked(m):
        return m, []
    segs = segments(m)
    clean_head = "".join(t for t, tainted in segs if not tainted).lstrip()
    is_shell = clean_head.startswith("exec.Shell(")
    out: list[str] = []
    env: dict[str, str] = {}  # value -> its variable
    quote = ""  # the open literal's quote: ', ", \'\'\' or \"\"\", or ""
    escape = False
    shell = _ShellContext()
    for text, tainted in segs:
        if tainted:
            if not quote:
                out.append(text if _LITERAL.fullmatch(text) else repr(text))
            elif is_shell:
                name = env.get(text) or f"{ENV_PREFIX}{first + len(env)}"
                ref = shell.reference(name, text)
                if "$" in ref:
                    env[text] = name
                out.append(_escape_in(ref, quote[0]))
            else:
                out.append(_escape_in(text, quote[0]))
            continue
        out.append(text)
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if escape:
                escape = False
                if quote:
                    shell.feed(c)
            elif quote:
                if c == "\\":
                    escape = True
                elif text.startswith(quote, i):
                    i += len(quote) - 1
                    quote = ""
                else:
                    shell.feed(c)
            elif c in "'\"":
                quote = c * 3 if text.startswith(c * 3, i) else c
                i += len(quote) - 1
                shell = _ShellContext()
            i += 1
    return "".join(out), [(name, value) for value, name in env.items()]


__all__ = ["ENV_PREFIX", "RAW_SAFE", "call_func", "marked", "segments", "shell_script"]
