"""docs/protocol.md: its JSON and Python examples are valid, and its session obeys the rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

from corral.taskctl import TRANSITIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_json_examples_are_objects() -> None:
    found = blocks("json")
    assert len(found) >= 5
    for block in found:
        assert isinstance(json.loads(block), dict), block


def test_python_example_compiles() -> None:
    [example] = blocks("python")
    compile(example, "protocol.md", "exec")


def test_the_session_follows_the_protocol() -> None:
    [session] = re.findall(r"```\n(< \{.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    state, last_id, pending = "STANDBY", 0, ""
    lines = [ln for ln in session.splitlines() if ln[:2] in ("< ", "> ")]
    assert json.loads(lines[0][2:]) == {"state": "STANDBY", "pid": 4242, "protocol": 1}
    for line in lines[1:]:
        msg = json.loads(line[2:])
        if line.startswith("> "):
            assert msg["id"] == last_id + 1 and not pending
            assert all(isinstance(v, str) for v in msg["args"].values())
            last_id, pending = msg["id"], msg["transition"]
        elif "event" in msg:
            assert msg["event"] in ("END_OF_STREAM", "ERROR")
        else:
            valid_in, target = TRANSITIONS[pending]
            assert state in valid_in and msg == {"id": last_id, "state": target}
            state, pending = target, ""
    assert state == "DONE"
