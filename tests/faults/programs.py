"""A task program for fault tests, written to a file at run time.

It speaks the control protocol directly. Arguments: a directory, then the transitions
it holds (comma-separated, may be empty) and a delay in seconds. For each transition
it receives it first touches ``DIR/<task path>.<TRANSITION>`` (so a test can see the
order arrived); a held transition is never answered (the task waits to be killed),
any other is answered after the delay. ``HELLO`` among the held ones holds the hello.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROGRAM = r"""
import json, os, socket, sys, time
where, held, delay = sys.argv[1], set(filter(None, sys.argv[2].split(","))), float(sys.argv[3])
path = os.environ["CORRAL_TASK_PATH"]
s = socket.socket(fileno=int(os.environ["CORRAL_CONTROL_FD"]))
f = s.makefile("rwb", buffering=0)
def mark(what):
    open(os.path.join(where, path + "." + what), "w").close()
def send(m):
    s.sendall((json.dumps(m) + "\n").encode())
mark("HELLO")
if "HELLO" in held:
    time.sleep(600)
time.sleep(delay)
send({"state": "STANDBY"})
answers = {"CONFIGURE": "CONFIGURED", "START": "RUNNING", "STOP": "CONFIGURED",
           "RESET": "STANDBY", "EXIT": "DONE"}
for line in f:
    m = json.loads(line)
    t = m["transition"]
    mark(t)
    if t in held:
        time.sleep(600)
    time.sleep(delay)
    send({"id": m["id"], "state": answers[t]})
    if t == "EXIT":
        sys.exit(0)
"""

CLASS = """
name: fault
control: {mode: direct}
command:
  value: "{{ python }}"
  arguments: ["{{ program }}", "{{ marks }}", "{{ hold }}", "{{ delay }}"]
"""

SLEEPER = """
name: sleeper
control: {mode: basic}
command: {value: /bin/sleep, arguments: ["600"]}
"""


def write(tmp: Path) -> str:
    path = tmp / "fault_task.py"
    path.write_text(PROGRAM)
    return str(path)


def defaults(tmp: Path, *, hold: str = "", delay: float = 0.0) -> dict[str, str]:
    marks = tmp / "marks"
    marks.mkdir(exist_ok=True)
    return {
        "python": sys.executable,
        "program": write(tmp),
        "marks": str(marks),
        "hold": hold,
        "delay": str(delay),
    }
