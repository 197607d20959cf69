"""Small task programs for backend and controller tests, written to files at run time.

They speak the control protocol directly (not through corral.taskctl) so the backend
is tested against the wire format itself. Behaviour is chosen by argv[1]:
  good      obeys every transition
  garbage   answers CONFIGURE with garbage
  mute      never answers CONFIGURE
  crash     exits 3 when told to CONFIGURE
  slowhello waits argv[2] seconds before its hello
  eos       sends END_OF_STREAM after START
  eosconf   sends END_OF_STREAM once it answered CONFIGURE (before any run)
  boolid    answers CONFIGURE with the id true (Python's True == 1)
  flood     sends 200,000 END_OF_STREAM at once after START, then obeys
  child     also starts a grandchild (sleep) in its process group, writes its pid to argv[2]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROGRAM = r"""
import json, os, socket, subprocess, sys, time
mode = sys.argv[1]
fd = int(os.environ["CORRAL_CONTROL_FD"])
s = socket.socket(fileno=fd)
f = s.makefile("rwb", buffering=0)
def send(m):
    s.sendall((json.dumps(m) + "\n").encode())
if mode == "slowhello":
    time.sleep(float(sys.argv[2]))
if mode == "child":
    p = subprocess.Popen(["sleep", "300"])
    open(sys.argv[2], "w").write(str(p.pid))
send({"state": "STANDBY", "pid": os.getpid()})
answers = {"CONFIGURE": "CONFIGURED", "START": "RUNNING", "STOP": "CONFIGURED",
           "RESET": "STANDBY", "EXIT": "DONE"}
for line in f:
    m = json.loads(line)
    t = m["transition"]
    if t == "CONFIGURE" and mode == "garbage":
        s.sendall(b"this is not json\n"); continue
    if t == "CONFIGURE" and mode == "mute":
        continue
    if t == "CONFIGURE" and mode == "crash":
        sys.exit(3)
    if t == "CONFIGURE" and mode == "fail":
        send({"id": m["id"], "error": "no calibration for this run"}); continue
    if t == "CONFIGURE" and "CORRAL_ARGS_FILE" in os.environ:
        path = os.environ["CORRAL_ARGS_FILE"] + "." + os.environ["CORRAL_TASK_PATH"]
        open(path, "w").write(json.dumps(m["args"]))
    if t == "CONFIGURE" and mode == "boolid":
        send({"id": True, "state": "CONFIGURED"}); continue
    send({"id": m["id"], "state": answers[t]})
    if t == "START" and mode == "eos":
        send({"event": "END_OF_STREAM"})
    if t == "CONFIGURE" and mode == "eosconf":
        send({"event": "END_OF_STREAM"})
    if t == "START" and mode == "flood":
        try:
            s.sendall(b'{"event": "END_OF_STREAM"}\n' * 200000)
        except OSError:
            pass
    if t == "EXIT":
        sys.exit(0)
"""


def write_program(tmp: Path) -> str:
    path = tmp / "fake_task.py"
    path.write_text(PROGRAM)
    return str(path)


def python() -> str:
    return sys.executable


def alive(pid: int) -> bool:
    """True if pid is a live process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d))
    return out
