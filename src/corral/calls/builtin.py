"""Built-in call plugins: ``test`` (Noop, Sleep, Fail, Echo) and ``exec`` (Run, Shell).

``exec`` runs a command in its own process group; on cancellation (the call's timeout)
it kills the group and reaps the process before re-raising, so a timed-out call leaves
nothing behind. The command gets a minimal environment (``corral.ports.taskenv``), never
the server's whole one: PATH, HOME, LANG, the variables passed through with
``--task-env``, and the call's own ``CORRAL_*`` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping

from corral.calls._registry import CallContext, CallError
from corral.ports.taskenv import default_passed, task_environment

OUTPUT_CAP = 64 * 1024


def _want(method: str, args: tuple[object, ...], low: int, high: int) -> None:
    if not low <= len(args) <= high:
        n = str(low) if low == high else f"{low} to {high}"
        raise CallError(f"{method} takes {n} arguments, got {len(args)}")


class TestPlugin:
    """Calls for tests and examples."""

    methods = frozenset({"Noop", "Sleep", "Fail", "Echo"})

    async def call(self, method: str, args: tuple[object, ...], ctx: CallContext) -> str | None:
        if method == "Noop":
            _want(method, args, 0, 0)
            return None
        if method == "Sleep":
            _want(method, args, 1, 1)
            seconds = args[0]
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
                raise CallError(f"test.Sleep wants a number of seconds >= 0, got {seconds!r}")
            await asyncio.sleep(float(seconds))
            return None
        if method == "Fail":
            _want(method, args, 0, 1)
            raise CallError(str(args[0]) if args else "test.Fail")
        _want(method, args, 1, 1)
        return str(args[0])


class ExecPlugin:
    """Run a command: exit status 0 is success; stdout is the result."""

    methods = frozenset({"Run", "Shell"})

    def __init__(self, passed: Mapping[str, str] | None = None) -> None:
        """``passed``: the variables passed through to the commands (default: what this
        process was told by ``--task-env``, ``taskenv.set_default_passed``)."""
        self.passed = None if passed is None else dict(passed)

    async def call(self, method: str, args: tuple[object, ...], ctx: CallContext) -> str | None:
        if method == "Shell":
            _want(method, args, 1, 1)
            argv = ["/bin/sh", "-c", str(args[0])]
        else:
            if not args:
                raise CallError("exec.Run wants a command and its arguments")
            argv = [str(a) for a in args]
        return await run_command(argv, ctx, self.passed)


class BridgePlugin:
    """A plugin that is a command (``--call-plugin NAME=COMMAND``): ``NAME.Method(a, b)``
    runs ``COMMAND Method a b``, with the environment's variables as a JSON object on its
    standard input; exit status 0 is success, stdout is the result. A site bridges its
    own services this way (AliECS's dcs, odc, bookkeeping, ... plugins), or stands in for
    them in a test."""

    methods = frozenset[str]()  # any method: ``accepts`` says

    def __init__(self, command: str, passed: Mapping[str, str] | None = None) -> None:
        self.command = command
        self.passed = None if passed is None else dict(passed)

    @staticmethod
    def accepts(method: str) -> bool:
        return method.isidentifier()

    async def call(self, method: str, args: tuple[object, ...], ctx: CallContext) -> str | None:
        argv = [self.command, method, *("" if a is None else str(a) for a in args)]
        data = json.dumps(dict(ctx.variables), sort_keys=True).encode()
        return await run_command(argv, ctx, self.passed, data)


async def run_command(
    argv: list[str],
    ctx: CallContext,
    passed_given: Mapping[str, str] | None,
    stdin: bytes | None = None,
) -> str:
    """Run a call's command in its own group, killed with it on cancellation; its
    result is its stdout (capped), a non-zero exit a CallError with its stderr's end."""
    corral = [
        ("CORRAL_ENVIRONMENT_ID", ctx.environment_id),
        ("CORRAL_EVENT", ctx.event),
        ("CORRAL_TRIGGER", ctx.trigger),
        ("CORRAL_CALL_PATH", ctx.path),
        ("CORRAL_CALL_FUNC", ctx.func),
    ]
    if ctx.run_number is not None:
        corral.append(("CORRAL_RUN_NUMBER", str(ctx.run_number)))
    passed = default_passed() if passed_given is None else passed_given
    env = task_environment(ctx.env, corral, passed=passed)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CallError(f"cannot run {argv[0]!r}: no such file or directory") from None
    except PermissionError:
        raise CallError(f"cannot run {argv[0]!r}: permission denied") from None
    try:
        out, err, _ = await asyncio.gather(
            _first(proc.stdout, OUTPUT_CAP), _last(proc.stderr, 2000), _feed(proc, stdin)
        )
        await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what it left behind in its group
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-5:]
        status = (
            f"status {proc.returncode}"
            if (proc.returncode or 0) >= 0
            else f"signal {-(proc.returncode or 0)}"
        )
        detail = (": " + " | ".join(tail)) if tail else ""
        raise CallError(f"{argv[0]} ended with {status}{detail}")
    return out.decode("utf-8", "replace").strip()


async def _first(stream: asyncio.StreamReader | None, cap: int) -> bytes:
    """The first ``cap`` bytes of a stream, read to its end (the rest is dropped as it
    comes: a command that prints gigabytes costs no memory)."""
    buf = bytearray()
    while stream is not None and (chunk := await stream.read(65536)):
        if len(buf) < cap:
            buf += chunk[: cap - len(buf)]
    return bytes(buf)


async def _last(stream: asyncio.StreamReader | None, keep: int) -> bytes:
    """The last ``keep`` bytes of a stream, read to its end."""
    buf = b""
    while stream is not None and (chunk := await stream.read(65536)):
        buf = (buf + chunk)[-keep:]
    return buf


async def _feed(proc: asyncio.subprocess.Process, data: bytes | None) -> None:
    if data is None or proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    proc.stdin.close()
