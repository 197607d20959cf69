"""A stand-in for an O2 executable, for running ALICE's templates without O2.

    standin_task.py NAME [ARGS...]

It records each transition it is given (and its arguments) as a JSON line in
``$STANDIN_RECORD/NAME.jsonl`` and does nothing else. Its control mode is said by its
environment: a FairMQ device when corral gives it FairMQ's transitions (its hello is
IDLE), else a direct task (corral's protocol). ``STANDIN_MODE`` picks: direct or fairmq.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from corral.taskctl import Device, Task, run, run_device

__all__ = ["Direct", "FairMQ", "run_device"]

NAME = sys.argv[1] if len(sys.argv) > 1 else "task"


def record(step: str, args: Any) -> None:
    where = os.environ.get("STANDIN_RECORD")
    if not where:
        return
    with open(os.path.join(where, f"{NAME}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "argv": sys.argv[2:], "args": args}) + "\n")


class Direct(Task):
    def configure(self, args: dict[str, str]) -> None:
        record("CONFIGURE", args)

    def start(self, args: dict[str, str]) -> None:
        record("START", args)

    def stop(self, args: dict[str, str]) -> None:
        record("STOP", args)

    def reset(self, args: dict[str, str]) -> None:
        record("RESET", args)


class FairMQ(Device):
    def init_device(self, props: dict[str, str]) -> None:
        record("INIT DEVICE", props)

    def bind(self) -> None:
        record("BIND", None)

    def connect(self) -> None:
        record("CONNECT", None)

    def init_task(self) -> None:
        record("INIT TASK", None)

    def run(self, args: dict[str, str]) -> None:
        record("RUN", args)

    def stop(self) -> None:
        record("STOP", None)

    def reset_task(self) -> None:
        record("RESET TASK", None)

    def reset_device(self) -> None:
        record("RESET DEVICE", None)


if __name__ == "__main__":
    if os.environ.get("STANDIN_MODE") == "fairmq":
        sys.exit(run_device(FairMQ()))
    sys.exit(run(Direct()))
