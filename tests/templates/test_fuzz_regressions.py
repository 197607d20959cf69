"""What the template fuzzer (test_fuzz.py, bench/fuzz_templates.py) found, minimised.

Each input used to crash check() with an exception other than a result, crash the
process, or hang it; now it gives a plan or located diagnostics, quickly.
"""

from __future__ import annotations

import pytest

from corral.templates import DictSources, check
from corral.templates.expressions import Evaluator, ExprError
from tests.templates.fuzz_strategies import TemplateSet, run_check, time_limit

CLASS = "name: t\ncommand:\n  value: run\n  arguments: ['{{ x }}']\n"


def with_defaults(value: str) -> str:
    return f"name: w\ndefaults:\n  x: {value}\nroles:\n  - name: a\n    task: {{load: t}}\n"


def run(workflow: str, **variables: str) -> tuple[bool, list[str]]:
    """check() under the fuzzer's property and a 10 s guard: (plan?, messages)."""
    ts = TemplateSet("w.yaml", {"w.yaml": workflow, "tasks/t.yaml": CLASS}, variables)
    outcome = run_check(ts, timeout=10)
    plan, diags = check("w.yaml", DictSources(dict(ts.files)), variables=variables)
    assert outcome.plan == (plan is not None)
    return plan is not None, [str(d) for d in diags]


def argument(workflow: str) -> str:
    plan, _ = check("w.yaml", DictSources({"w.yaml": workflow, "tasks/t.yaml": CLASS}))
    assert plan is not None
    return plan.tasks[0].command.arguments[0]


# -- variables written as YAML lists and maps (schema.py) ---------------------------


@pytest.mark.parametrize(
    ("value", "json_text"),
    [
        ("{a: , b: ~}", '{"a":null,"b":null}'),  # was: ParserError (re-serialised null)
        ("!!set {a, b}", '{"a":null,"b":null}'),
        ("[2001-12-14]", '["2001-12-14"]'),  # was: TypeError (date not JSON)
        ("[2001-12-14 21:59:43.10 -5]", '["2001-12-14 21:59:43.10 -5"]'),
        ("[!!int 0x1F, 1:30, .inf]", "[31,90,Infinity]"),
    ],
)
def test_list_and_map_variables_take_any_plain_yaml(value: str, json_text: str) -> None:
    assert argument(with_defaults(value)) == json_text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[!!binary aGVsbG8=]", "a binary value cannot be part of a variable"),  # TypeError
        ("[!!int abc]", "'abc' is not a valid int"),  # ValueError
        ("[!!float abc]", "'abc' is not a valid float"),  # ValueError
        ("[!!bool abc]", "'abc' is not a valid bool"),  # KeyError
        ("[!!timestamp abc]", "'abc' is not a valid timestamp"),  # AttributeError
        ("[!!python/name:os.system x]", "not a valid python/name:os.system"),  # ConstructorError
        ("[!!int " + "9" * 5000 + "]", "is not a valid int"),  # ValueError: 4300 digits
    ],
)
def test_bad_tags_in_list_variables_are_errors(value: str, message: str) -> None:
    plan, errors = run(with_defaults(value))
    assert not plan
    assert any(e.startswith("w.yaml:3:") and message in e for e in errors), errors


# -- aliases and nesting: refused before anything recurses (schema.py) --------------


def test_a_variable_that_contains_itself_is_an_error() -> None:
    plan, errors = run(with_defaults("&a [x, *a]"))  # was: RecursionError
    assert not plan and "refers to a list or map that contains it" in errors[0]


def test_roles_that_contain_themselves_are_an_error() -> None:
    _, errors = run("name: w\nroles: &r\n  - name: a\n    roles: *r\n")  # was: RecursionError
    assert errors == ["w.yaml:2:8: a YAML alias refers to a list or map that contains it"]


def test_aliases_that_double_thirty_times_are_refused_at_once() -> None:
    lines = ["name: w", "defaults:", "  a0: &a0 [x, y]"]
    lines += [f"  a{k}: &a{k} [*a{k - 1}, *a{k - 1}]" for k in range(1, 31)]
    lines += ["roles:", "  - {name: a, task: {load: t}}"]
    plan, errors = run("\n".join(lines) + "\n")  # was: 2**30 values, a hang
    assert not plan and "YAML aliases repeat more than 100000 values" in errors[0]


def test_roles_shared_through_aliases_thirty_times_are_refused_at_once() -> None:
    lines = ["name: w", "x:", "  - &r0 {name: s, task: {load: t}}"]
    lines += [f"  - &r{k} {{name: s, roles: [*r{k - 1}, *r{k - 1}]}}" for k in range(1, 31)]
    lines += ["roles: [*r30]"]
    plan, errors = run("\n".join(lines) + "\n")  # was: 2**30 roles parsed, a hang
    assert not plan and any("YAML aliases repeat" in e for e in errors)


@pytest.mark.parametrize(
    "value",
    [
        "[" * 600 + "]" * 600,  # was: RecursionError in the variable's conversion
        "[" * 30_000 + "]" * 30_000,  # was: a segmentation fault in libyaml's composer
        "[" * 20_000,  # was: 4 s of libyaml scanning before the syntax error
        "\n    " + "- " * 100_000 + "x",  # block style: the same segmentation fault
    ],
)
def test_nesting_deeper_than_200_levels_is_an_error(value: str) -> None:
    with time_limit(5):
        plan, errors = run(with_defaults(value))
    assert not plan and "nest more than 200 levels deep" in errors[0], errors


def test_roles_nested_600_deep_are_an_error() -> None:
    role = "{name: a, task: {load: t}}"
    for _ in range(600):
        role = "{name: a, roles: [" + role + "]}"
    plan, errors = run("name: w\nroles: [" + role + "]\n")  # was: RecursionError
    assert not plan and "nest more than 200 levels deep" in errors[0]


# -- json.Unmarshal and strings.Atoi (expressions.py) ---------------------------------


def test_json_unmarshal_of_deep_json_is_an_expression_error() -> None:
    deep = "[" * 800 + "]" * 800  # was: RecursionError converting the result
    wf = "name: w\nroles:\n  - name: a\n    vars: {x: '{{ json.Unmarshal(h) }}'}\n"
    plan, errors = run(wf + "    task: {load: t}\n", h=deep)
    assert not plan and "json.Unmarshal: lists and maps nest more than 100 levels" in errors[0]


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        # was: "... out of range for 'Python function '<function _unmarshal at 0x7f...>''",
        # a message that changed from run to run
        ("json.Unmarshal('123456789012345678901234567890')", "out of the 64-bit integer range"),
        ("json.Unmarshal('[1, -9223372036854775809]')", "out of the 64-bit integer range"),
        ("strings.Atoi('99999999999999999999')", "out of the 64-bit integer range"),
    ],
)
def test_numbers_out_of_range_are_clear_and_deterministic_errors(expr: str, message: str) -> None:
    texts = set()
    for _ in range(2):
        ev = Evaluator("s")
        with pytest.raises(ExprError, match=message) as info:
            ev.evaluate(ev.expr(expr), {}, None)
        texts.add(str(info.value))
    assert len(texts) == 1 and "0x" not in texts.pop()


def test_json_unmarshal_keeps_unsigned_and_float_numbers() -> None:
    ev = Evaluator("s")
    value = ev.evaluate(ev.expr("json.Unmarshal('[18446744073709551615, 1e400]')"), {}, None)
    assert value == [18446744073709551615, float("inf")]


# -- found by the fuzz, fixed in expansion.py ------------------------------------------


@pytest.mark.parametrize(
    "workflow, task_class",
    [
        (
            "name: w\nroles:\n  - name: a-{{ i }}\n    for: {begin: '0', end: '1', var: i, "
            "nmin: '1e400'}\n    task: {load: t}\n",
            CLASS,
        ),
        (
            "name: w\nroles:\n  - name: a-{{ i }}\n    for: {begin: '0', end: '1', var: i, "
            "nmin: '{{ 1e308 * 10.0 }}'}\n    task: {load: t}\n",
            CLASS,
        ),
        (with_defaults("'1'"), CLASS + "wants: {memory: inf}\n"),
        (with_defaults("'1'"), CLASS + "health: {command: c, failures: '1e400'}\n"),
    ],
    ids=["nmin-1e400", "nmin-expression", "memory-inf", "health-failures-1e400"],
)
def test_an_infinite_whole_number_is_an_error(workflow: str, task_class: str) -> None:
    sources = DictSources({"w.yaml": workflow, "tasks/t.yaml": task_class})
    plan, diags = check("w.yaml", sources)
    assert plan is None and diags


def test_a_deeply_nested_for_range_is_an_error() -> None:
    wf = "name: w\nroles:\n  - name: a-{{ i }}\n    for: {range: '{{ r }}', var: i}\n"
    sources = DictSources({"w.yaml": wf + "    task: {load: t}\n", "tasks/t.yaml": CLASS})
    plan, diags = check("w.yaml", sources, variables={"r": "[" * 5000 + "]" * 5000})
    assert plan is None and diags


def test_roles_nested_deep_through_includes_are_an_error() -> None:
    files = {"tasks/t.yaml": CLASS, "w.yaml": "name: w\nroles: [{name: r, include: c0}]\n"}
    for k in range(4):
        role = "{name: leaf, task: {load: t}}" if k == 3 else f"{{name: n, include: c{k + 1}}}"
        for _ in range(95):
            role = "{name: d, roles: [" + role + "]}"
        files[f"c{k}.yaml"] = f"name: c{k}\nroles: [{role}]\n"
    plan, diags = check("w.yaml", DictSources(files))
    assert plan is None and diags
