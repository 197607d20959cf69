"""corral.taskctl: the task side of corral's control protocol, for Python programs.

A program subclasses Task, overrides the transitions it needs and calls
``sys.exit(run(MyTask()))``; a FairMQ device (control mode ``fairmq``) subclasses
Device and calls ``sys.exit(run_device(MyDevice()))``. The protocol itself is
language-neutral and documented in docs/protocol.md. This package imports nothing else
of corral and only the standard library, so a task needs nothing but this package.
"""

from corral.taskctl._channels import Channel, channels
from corral.taskctl._protocol import MAX_LINE, PROTOCOL_VERSION, TRANSITIONS
from corral.taskctl._run import run
from corral.taskctl._task import Task
from corral.taskctl.fairmq import FAIRMQ_TRANSITIONS, Device, run_device

__all__ = [
    "FAIRMQ_TRANSITIONS",
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "TRANSITIONS",
    "Channel",
    "Device",
    "Task",
    "channels",
    "run",
    "run_device",
]
