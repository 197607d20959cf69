"""A template broken in ten different ways yields ten errors at the right lines."""

from __future__ import annotations

import os

from corral.store.files import DiskSources
from corral.templates import check

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "broken")


def test_ten_errors_at_the_right_lines() -> None:
    root = os.path.join(HERE, "broken.yaml")
    plan, diags = check(root, DiskSources())
    assert plan is None
    found = [(os.path.relpath(d.loc.file, HERE), d.loc.line, d.loc.col) for d in diags]
    messages = [d.message for d in diags]
    assert found == [
        ("badyaml.yaml", 5, 9),  # YAML syntax
        ("broken.yaml", 6, 5),  # unknown field
        ("broken.yaml", 8, 18),  # missing task class
        ("broken.yaml", 11, 40),  # bad channel target
        ("broken.yaml", 16, 21),  # expression error
        ("broken.yaml", 20, 11),  # duplicate role name
        ("broken.yaml", 23, 36),  # bad trigger
        ("broken.yaml", 25, 60),  # bad duration
        ("loop.yaml", 4, 14),  # include cycle
        ("tasks/badclass.yaml", 4, 3),  # unknown field in a task class
    ]
    expected = [
        "YAML syntax error",
        "unknown field 'tsk' in a role; did you mean 'task'?",
        "no task class 'nosuchclass'",
        "no task at role path 'broken.nowhere'",
        "undefined variable 'undefined_thing'",
        "duplicate role name 'dup'",
        "bad trigger 'before_NOTHING'",
        "bad duration 'soon'",
        "include cycle",
        "unknown field 'argumens' in command; did you mean 'arguments'?",
    ]
    for message, fragment in zip(messages, expected, strict=True):
        assert fragment in message
    roles = [d.role for d in diags]
    assert roles[3] == "broken.three" and roles[4] == "broken.five"
