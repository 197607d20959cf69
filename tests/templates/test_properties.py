"""Property tests of the expander over generated workflows and arbitrary text."""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.templates import DictSources, check

# CORRAL_HYPOTHESIS_EXAMPLES=3000 pytest tests/templates/test_properties.py  for a long run
EXAMPLES = int(os.environ.get("CORRAL_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

TASK_CLASS = """
name: t
control: {mode: direct}
bind:
  - {name: out, type: push}
command:
  value: run
  arguments: ["{{ x }}"]
"""

names = st.sampled_from(["a", "b", "c", "d", "e"])
channel_types = st.sampled_from(["push", "pull", "pub", "sub"])


@st.composite
def roles(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    name = draw(names)
    enabled = draw(st.sampled_from([None, "true", "false", "{{ flag == 'on' }}"]))
    role: dict[str, Any] = {}
    if enabled == "false":
        name = "off" + name  # disabled roles are recognisable by name
    role["name"] = name
    if enabled is not None:
        role["enabled"] = enabled
    kind = draw(st.sampled_from(["task", "call", "roles"] if depth < 3 else ["task", "call"]))
    if draw(st.booleans()):
        role["name"] = name + "-{{ i }}"
        role["for"] = {"begin": "0", "end": str(draw(st.integers(0, 3))), "var": "i"}
    if kind == "task":
        role["task"] = {"load": "t"}
        if draw(st.booleans()):
            target = draw(
                st.sampled_from(["w.a:out", "w.b.c:out", "::alias", "tcp://h:1", "w.a:x"])
            )
            role["connect"] = [{"name": "in", "type": draw(channel_types), "target": target}]
        if draw(st.booleans()):
            role["bind"] = [{"name": "out", "global": "alias"}]
    elif kind == "call":
        role["call"] = {"func": "p.F()", "trigger": "before_CONFIGURE"}
    else:
        role["roles"] = draw(st.lists(roles(depth + 1), min_size=1, max_size=3))
    return role


@st.composite
def workflows(draw: st.DrawFn) -> str:
    wf = {
        "name": "w",
        "defaults": {"x": "1", "flag": draw(st.sampled_from(["on", "off"]))},
        "roles": draw(st.lists(roles(), min_size=1, max_size=4)),
    }
    return yaml.safe_dump(wf, sort_keys=False)


def run(text: str, seed: str = "s") -> tuple[str | None, list[str]]:
    sources = DictSources({"w.yaml": text, "tasks/t.yaml": TASK_CLASS})
    plan, diags = check("w.yaml", sources, seed=seed)
    dumped = None if plan is None else json.dumps(plan.to_dict(), sort_keys=True)
    return dumped, [str(d) for d in diags]


@SETTINGS
@given(workflows())
def test_expansion_is_deterministic(text: str) -> None:
    assert run(text) == run(text)


@SETTINGS
@given(workflows())
def test_disabled_roles_never_appear(text: str) -> None:
    plan, _ = run(text)
    if plan is None:
        return
    data = json.loads(plan)
    paths = [t["path"] for t in data["tasks"]] + [c["path"] for c in data["calls"]]
    for path in paths:
        assert not any(seg.startswith("off") for seg in path.split(".")), path


@SETTINGS
@given(workflows())
def test_every_connect_resolves_to_one_bind_or_a_clear_error(text: str) -> None:
    plan, errors = run(text)
    if plan is None:
        assert errors
        for e in errors:
            # every error names its place and says what is wrong
            assert e.startswith("w.yaml:") or e.startswith("tasks/t.yaml:"), e
        return
    data = json.loads(plan)
    binds = {(b["task"], b["name"]) for b in data["channels"]["binds"]}
    for c in data["channels"]["connects"]:
        if c["bind"] is None:
            assert c["address"] is not None
        else:
            assert (c["bind"]["task"], c["bind"]["name"]) in binds


@SETTINGS
@given(st.text(max_size=400))
def test_arbitrary_text_never_crashes(text: str) -> None:
    _, errors = run(text)
    # anything but a valid workflow is a clean validation error
    assert isinstance(errors, list)


@SETTINGS
@given(workflows(), st.data())
def test_mutated_workflows_never_crash(text: str, data: st.DataObject) -> None:
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 5))):
        if not chars:
            break
        i = data.draw(st.integers(0, len(chars) - 1))
        op = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        c = data.draw(st.sampled_from([*list("{}[]:-'\"\n #!|>&*"), "{{", "}}"]))
        if op == "delete":
            del chars[i]
        elif op == "insert":
            chars.insert(i, c)
        else:
            chars[i] = c
    run("".join(chars))


@SETTINGS
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda kids: (
            st.lists(kids, max_size=4)
            | st.dictionaries(st.sampled_from(["name", "roles", "task", "for", "vars", "x"]), kids)
        ),
        max_leaves=30,
    )
)
def test_arbitrary_yaml_structures_never_crash(doc: Any) -> None:
    run(yaml.safe_dump(doc))


EXPRESSION_TOKENS = [*"ab()[]{}.,:'\"!+-*/?<>=&| 0123", "contains", "Up(", "uid.New()", "x"]


@SETTINGS
@given(st.lists(st.sampled_from(EXPRESSION_TOKENS), max_size=30).map("".join))
def test_arbitrary_expressions_never_crash(expr: str) -> None:
    role = {"name": "r{{ " + expr + " }}", "task": {"load": "t"}}
    run(yaml.safe_dump({"name": "w", "defaults": {"x": "1"}, "roles": [role]}))
