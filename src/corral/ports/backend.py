"""The Backend port: what the controller asks of the machines tasks run on.

Every call carries one node's whole batch (all the tasks of that node that take part
in a step), so the controller makes one call per node per step and a backend never
needs an asyncio task or timer per task. Backends implement it for this machine
(``local``), a simulated farm (``sim``) and, later, distributed engines.

Unsolicited news from tasks (a process exited, a task sent END_OF_STREAM or ERROR,
a task is slow to answer) is delivered as lists of ``Report`` to the sink the
controller subscribes with; a backend coalesces what arrives together into one list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from corral.model.inventory import Node
from corral.model.plan import Command, HealthCheck

# What a task answers to each transition of the task control protocol.
BUSY = "BUSY"  # in an inventory: a direct task with an order under way (no answer yet)
# what a process ended by its node agent's fencing says, after its exit (no control
# process was heard from for its lease: not the process's own failure)
FENCED = "fenced: "
TASK_TRANSITIONS: dict[str, str] = {
    "CONFIGURE": "CONFIGURED",
    "START": "RUNNING",
    "STOP": "CONFIGURED",
    "RESET": "STANDBY",
    "EXIT": "DONE",
}


@dataclass(slots=True)  # not frozen: one per task per batch, and frozen ones cost 3x to make
class Launch:
    """Start one task's process. ``control`` is direct, basic or hook.

    A direct task counts as started when it sends its first message
    (``{"state":"STANDBY"}``); a basic or hook task as soon as it is spawned.
    """

    task_id: str
    path: str
    command: Command
    control: str
    env: tuple[tuple[str, str], ...] = ()  # added to the command's own env
    log_path: str | None = None  # stdout and stderr go here (appended)
    health: HealthCheck | None = None  # a basic task's periodic check, run by its node
    lease: float | None = None  # seconds its agent keeps it without a controller (fencing)
    timeout: float | None = None  # a basic task is ended as failed when it runs longer


@dataclass(slots=True)  # not frozen: one per task per batch, and frozen ones cost 3x to make
class Order:
    """One transition for one direct task, with its string arguments."""

    task_id: str
    transition: str  # a key of TASK_TRANSITIONS
    args: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)  # not frozen: one per task per batch, and frozen ones cost 3x to make
class Outcome:
    """How one task's launch or transition ended.

    ``state`` is the state the task reports on success (STANDBY after a launch, the
    value of TASK_TRANSITIONS after an order); ``error`` says why it failed otherwise
    (it died, answered an error, said something that breaks the protocol, or missed
    the deadline). ``pid`` is set after a launch when a process was started.
    """

    task_id: str
    state: str | None = None
    error: str | None = None
    pid: int | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """A bound channel that needs a concrete address on its task's node; a tcp one
    comes with the port placement gave it from the node's range (0: any free one)."""

    task_id: str
    name: str
    addressing: str  # tcp | ipc
    port: int = 0


@dataclass(slots=True)  # not frozen: one per task per batch, and frozen ones cost 3x to make
class Report:
    """Unsolicited news about a task.

    kind:
      ``exited``         the process ended; ``code`` is its exit status, or minus the
                         signal number that ended it;
      ``end_of_stream``  the task sent END_OF_STREAM;
      ``error``          the task sent ERROR, broke the protocol (garbage, a line too
                         long, EOF while alive), or failed its health check as many
                         times in a row as it allows; ``reason`` says which;
      ``slow``           the task has not answered a launch or transition yet, while
                         its process is alive; ``reason`` says for how long;
      ``lost``           the task's node is gone (or cut off): its process is taken
                         for dead, and ``reason`` says why.

    ``pid`` names the process the news is about, when there is one: a task relaunched
    by RECOVER is a new process with the same task id, and news of its previous
    process must not be taken for news of the new one.
    """

    task_id: str
    kind: str
    reason: str = ""
    code: int | None = None
    pid: int | None = None


ReportSink = Callable[[list[Report]], None]


# A node as a backend knows it: its resources and labels feed placement.
NodeInfo = Node


class Backend(Protocol):
    """Where tasks run. Each method handles one node's batch; see the module doc."""

    name: str

    def nodes(self) -> Sequence[NodeInfo]: ...

    def subscribe(self, sink: ReportSink) -> None: ...

    async def allocate(
        self, node: str, env_id: str, channels: Sequence[ChannelRequest]
    ) -> list[str]:
        """Concrete addresses (``tcp://host:port``, ``ipc:///path``), in order."""
        ...

    async def launch(
        self, node: str, batch: Sequence[Launch], timeout: float, slow_after: float
    ) -> list[Outcome]:
        """Start the batch; return one Outcome per launch, in order, within timeout."""
        ...

    async def transition(
        self, node: str, batch: Sequence[Order], timeout: float, slow_after: float
    ) -> list[Outcome]:
        """Send each order; return one Outcome per order, in order, within timeout."""
        ...

    async def stop(self, node: str, task_ids: Sequence[str], grace: float) -> None:
        """End these tasks' process groups: SIGTERM, then SIGKILL after ``grace``.

        Returns once every one of them is reaped, and every process that carries one
        of these task ids (a descendant that left the group) is ended too. Unknown or
        ended tasks are skipped.
        """
        ...

    async def release(self, node: str, env_id: str) -> None:
        """Forget an environment on this node: remove its ipc paths and leftovers."""
        ...

    async def inventory(self) -> list[tuple[str, int, str | None]]:
        """The tasks whose processes run now, on every node: (task id, pid, the state a
        direct task last confirmed, or None). What reconcile compares with the store."""
        ...

    async def resume(self) -> None:
        """Deliver the reports held while no controller listened (an agent that outlived
        its controller); called once the control plane knows its environments again."""
        ...

    async def end_leftovers(self, env_ids: Sequence[str]) -> int:
        """End every process a previous control process left running for these
        environments, wherever it runs.

        Only a process that provably belongs to one of them is ended (it carries the
        environment's id), never a reused pid; returns how many were ended.
        """
        ...

    async def close(self) -> None:
        """Stop every task still running and free the backend's resources."""
        ...
