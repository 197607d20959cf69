"""A stand-in for AliECS's integrated services (dcs, odc, trg, bookkeeping, ...), as a
``--call-plugin NAME=COMMAND`` bridge: ``standin_plugin.py PLUGIN METHOD ARGS...``.

It records the call (plugin, method, arguments, the trigger, the run number and the
variables it was given on stdin) in ``$STANDIN_RECORD/calls.jsonl`` and answers "ok".
"""

from __future__ import annotations

import json
import os
import sys

variables = json.load(sys.stdin)
where = os.environ.get("STANDIN_RECORD")
if where:
    with open(os.path.join(where, "calls.jsonl"), "a", encoding="utf-8") as f:
        call = {
            "plugin": sys.argv[1],
            "method": sys.argv[2],
            "args": sys.argv[3:],
            "trigger": os.environ.get("CORRAL_TRIGGER"),
            "run_number": os.environ.get("CORRAL_RUN_NUMBER"),
            "path": os.environ.get("CORRAL_CALL_PATH"),
            "variables": len(variables),
        }
        f.write(json.dumps(call) + "\n")
print("ok")
