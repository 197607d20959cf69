"""A stand-in for an O2 DPL executable in a DPL pipeline (``a | b | c --dump-workflow``).

    standin_dpl.py EXECUTABLE [ARGS...]

As a DPL process passes its workflow down a pipe, each stand-in reads the description
of the stages before it from its standard input (when that is a pipe that says
something), adds one device of its own that consumes the previous device's output, and
prints the whole description as JSON: what ``--dump-workflow`` prints at the end of the
pipeline. Its device's name is the executable's (with ``--id``'s value when given), made
unique with a number.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

if "CORRAL_CONTROL_FD" in os.environ:  # run by corral as the device it described
    sys.argv = [sys.argv[0], os.path.basename(sys.argv[1]), *sys.argv[2:]]
    os.environ["STANDIN_MODE"] = "fairmq"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import standin_task

    sys.exit(standin_task.run_device(standin_task.FairMQ()))

exe = sys.argv[1]
args = [a for a in sys.argv[2:] if a != "--dump-workflow"]
dump: dict[str, Any] = {"workflow": [], "metadata": []}
if not sys.stdin.isatty():
    text = sys.stdin.read()
    if text.strip():
        dump = json.loads(text)
devices = dump["workflow"]
name = os.path.basename(exe)
if "--id" in args[:-1]:
    name = args[args.index("--id") + 1]
taken = {d["name"] for d in devices}
base, n = name, 1
while name in taken:
    n += 1
    name = f"{base}-{n}"
k = len(devices)
device: dict[str, Any] = {
    "name": name,
    "inputs": [] if k == 0 else [{"binding": "in", "origin": "STI", "description": f"D{k - 1}"}],
    "outputs": [{"binding": "out", "origin": "STI", "description": f"D{k}", "subspec": 0}],
    "options": [],
    "rank": 0,
    "nSlots": 1,
    "inputTimeSliceId": 0,
    "maxInputTimeslices": 1,
}
devices.append(device)
dump["metadata"].append({"name": name, "executable": exe, "cmdLineArgs": args})
print(json.dumps(dump))
