"""The calls and hook tasks of a transition, run at their moments.

How this runs. On the control plane's event loop, for one environment's transition at
a time (the environment's lock). Each call or hook task started at a slot is one
asyncio task (calls are few, never one per task of the environment), awaited at its
await slot, cancelled with its timeout or with the transition. A hook task is a
process: when its transition is cancelled or it overruns its timeout, its process is
ended with it, never left to run on unwatched.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.calls import CallContext, CallError
from corral.control.tasks import NO_PID, RuntimeTask
from corral.lifecycle.hooks import Slot
from corral.model.plan import CallSpec
from corral.model.vocabulary import Trigger
from corral.ports.backend import Outcome

if TYPE_CHECKING:
    from corral.control.environment import Environment

Running = dict[int, "asyncio.Task[tuple[bool, str | None]]"]


@dataclass(frozen=True, slots=True)
class HookTask:
    """A hook task as ``schedule`` sees it: started at its trigger like a call."""

    task: RuntimeTask
    trigger: Trigger
    await_: Trigger

    @property
    def path(self) -> str:
        return self.task.spec.path

    @property
    def critical(self) -> bool:
        return self.task.spec.critical


Hooked = CallSpec | HookTask


class Hooks:
    """Runs one environment's calls and hook tasks."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.items: list[Hooked] = list(env.plan.calls)
        for t in env.tasks:
            if t.hook:
                assert t.spec.trigger is not None
                self.items.append(HookTask(t, t.spec.trigger, t.spec.await_ or t.spec.trigger))
        self.waiters: dict[str, asyncio.Future[int | None]] = {}  # hook task id -> its exit

    async def run_slot(self, slot: Slot[Hooked], event: str, running: Running) -> str | None:
        """Start the slot's items, await those due here; the first critical failure."""
        for item in slot.start:
            running[id(item)] = asyncio.ensure_future(self._run(item, event))
        first_error: str | None = None
        for item in slot.wait:
            fut = running.pop(id(item), None)
            if fut is None:
                continue
            ok, why = await fut
            if not ok and item.critical and first_error is None:
                first_error = f"critical call {item.path} failed: {why}"
        return first_error

    async def cancel(self, running: Running) -> None:
        """Cancel what still runs and wait until it has cleaned up."""
        for fut in running.values():
            fut.cancel()
        for fut in running.values():
            with contextlib.suppress(asyncio.CancelledError):
                await fut
        running.clear()

    def exited(self, task_id: str, code: int | None) -> bool:
        """A hook task's process ended: True when a run of it was waiting for that."""
        waiter = self.waiters.get(task_id)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(code)
        return True

    async def _run(self, item: Hooked, event: str) -> tuple[bool, str | None]:
        """Run one call (or hook task) with its timeout; report it; never raise."""
        if isinstance(item, HookTask):
            return await self._run_hook_task(item)
        env = self.env
        ctx = CallContext(
            environment_id=env.id,
            event=event,
            trigger=str(item.trigger),
            path=item.path,
            func=item.func,
            run_number=env.run_number,
            variables=env.variables,
            env=item.env,
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        base: dict[str, Any] = {
            "kind": "call",
            "env": env.id,
            "path": item.path,
            "func": item.func,
            "trigger": str(item.trigger),
            "transition": event,
            "critical": item.critical,
        }
        env.announce([dict(base, status="STARTED")])
        ok, why, result = True, None, None
        try:
            result = await asyncio.wait_for(env.calls.invoke(item.func, ctx), item.timeout)
        except TimeoutError:
            ok, why = False, f"timed out after {item.timeout:g} s (cancelled)"
        except CallError as e:
            ok, why = False, str(e)
        except Exception as e:  # a plugin bug must not break the controller
            ok, why = False, f"{type(e).__name__}: {e}"
        status = "DONE" if ok else ("TIMEOUT" if "timed out" in str(why) else "FAILED")
        ev = dict(base, status=status)
        ev["duration"] = round(loop.time() - t0, 6)
        if why:
            ev["error"] = why
        if result is not None:
            ev["result"] = result[:2000]
            if item.return_var:
                env.variables[item.return_var] = result
        env.announce([ev])
        return ok, why

    async def _run_hook_task(self, item: HookTask) -> tuple[bool, str | None]:
        env = self.env
        t = item.task
        timeout = t.spec.timeout or 30.0
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.waiters[t.id] = fut
        ok, why = True, None
        try:
            env.apply(t.node, [(t, "LAUNCH", NO_PID, None)])
            try:
                [out] = await env.backend.launch(t.node, [env.launch_of(t)], timeout, timeout)
            except Exception as e:  # whatever it started must not run on unwatched
                with contextlib.suppress(Exception):
                    await env.end_processes([t], grace=0.5)
                out = Outcome(t.id, error=f"the backend failed: {type(e).__name__}: {e}")
            if not out.ok:
                ok, why = False, out.error
            else:
                t.pid = out.pid
                try:
                    code = await asyncio.wait_for(fut, timeout)
                except TimeoutError:
                    ok, why = False, f"did not end within {timeout:g} s (killed)"
                    with contextlib.suppress(Exception):
                        await env.end_processes([t], grace=0.5)
                else:
                    if code != 0:
                        ok, why = False, f"exited with status {code}"
        except asyncio.CancelledError:
            # its transition was cancelled: the process ends with it
            await asyncio.shield(env.end_processes([t], grace=0.5))
            env.apply(t.node, [(t, "EXITED", NO_PID, "ended: its transition was interrupted")])
            raise
        finally:
            self.waiters.pop(t.id, None)
        env.apply(t.node, [(t, "EXITED" if ok else "FAIL", NO_PID, why)])
        return ok, why
