"""Expansion semantics: variables and their staging, roles, includes, channels, calls."""

from __future__ import annotations

import pytest

from corral.templates import TemplateError
from tests.conftest import errors_of, expand_text

ECHO = """
    name: echo
    command:
      value: echo
      arguments: ["{{ msg }}"]
"""


def args(plan, path):  # type: ignore[no-untyped-def]
    return next(t for t in plan.tasks if t.path == path).command.arguments


def test_variable_precedence_lowest_to_highest() -> None:
    files = {
        "wf.yaml": """
            name: wf
            defaults: {msg: template-default, a: d}
            vars: {b: template-var}
            roles:
              - name: t
                task: {load: echo}
        """,
        "tasks/echo.yaml": ECHO,
    }
    # global default < template default
    plan = expand_text(files, global_defaults={"msg": "global-default"})
    assert args(plan, "wf.t") == ("template-default",)
    # template default < global var
    plan = expand_text(files, global_vars={"msg": "global-var"})
    assert args(plan, "wf.t") == ("global-var",)
    # global var < template var
    files["wf.yaml"] = files["wf.yaml"].replace("{b: template-var}", "{msg: template-var}")
    plan = expand_text(files, global_vars={"msg": "global-var"})
    assert args(plan, "wf.t") == ("template-var",)
    # template var < user var
    plan = expand_text(files, global_vars={"msg": "g"}, variables={"msg": "user"})
    assert args(plan, "wf.t") == ("user",)


def test_iterator_locals_beat_user_vars_and_deeper_defaults_win() -> None:
    files = {
        "wf.yaml": """
            name: wf
            defaults: {msg: outer}
            roles:
              - name: g
                defaults: {msg: inner}
                roles:
                  - name: t
                    task: {load: echo}
              - name: it-{{ msg }}
                for: {range: '["x", "y"]', var: msg}
                roles:
                  - name: t
                    task: {load: echo}
        """,
        "tasks/echo.yaml": ECHO,
    }
    plan = expand_text(files, variables={"msg": "user"})
    assert args(plan, "wf.g.t") == ("user",)
    assert args(plan, "wf.it-x.t") == ("x",)
    assert args(plan, "wf.it-y.t") == ("y",)
    plan = expand_text(files)
    assert args(plan, "wf.g.t") == ("inner",)


def test_staging_defaults_vars_and_names() -> None:
    files = {
        "wf.yaml": """
            name: wf
            defaults: {base: b}
            roles:
              - name: r-{{ suffix }}
                defaults:
                  d1: "{{ base }}-1"
                vars:
                  suffix: "{{ d1 }}-s"
                  msg: "{{ d1 }}/{{ Parent().Path }}"
                roles:
                  - name: t
                    task: {load: echo}
        """,
        "tasks/echo.yaml": ECHO,
    }
    plan = expand_text(files)
    assert args(plan, "wf.r-b-1-s.t") == ("b-1/wf",)


def test_defaults_do_not_see_own_vars_and_enabled_sees_parent() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: r
                defaults:
                  d: "{{ v }}"
                vars:
                  v: own
                task: {load: echo}
        """,
        "tasks/echo.yaml": ECHO,
    }
    errs = errors_of(files)
    assert len(errs) == 1 and "undefined variable 'v'" in errs[0]
    files["wf.yaml"] = """
        name: wf
        roles:
          - name: r
            enabled: "{{ flag == 'on' }}"
            vars: {flag: "on", msg: m}
            task: {load: echo}
    """
    errs = errors_of(files)
    assert "undefined variable 'flag'" in errs[0]


def test_disabled_roles_vanish_with_their_subtree_and_calls() -> None:
    files = {
        "wf.yaml": """
            name: wf
            defaults: {msg: m, on: "true"}
            roles:
              - name: off
                enabled: "{{ on == 'false' }}"
                roles:
                  - name: t
                    task: {load: missing-class-never-loaded}
                  - name: c
                    call: {func: x.Y(), trigger: NOT_A_MOMENT}
              - name: kept
                enabled: "{{ on }}"
                task: {load: echo}
        """,
        "tasks/echo.yaml": ECHO,
    }
    plan = expand_text(files)
    assert [t.path for t in plan.tasks] == ["wf.kept"]
    assert plan.calls == ()


def test_range_iterator_and_nmin() -> None:
    files = {
        "wf.yaml": """
            name: wf
            defaults: {n: "3", msg: m}
            roles:
              - name: w{{ i }}
                for: {begin: "1", end: "{{ n }}", var: i, nmin: "2"}
                task: {load: echo}
        """,
        "tasks/echo.yaml": ECHO,
    }
    plan = expand_text(files)
    assert [t.path for t in plan.tasks] == ["wf.w1", "wf.w2", "wf.w3"]
    (c,) = plan.collections
    assert c.nmin == 2 and len(c.members) == 3
    assert c.path == "wf.w*"  # the instances' name pattern, never a raw template
    assert all(t.collection == c.path for t in plan.tasks)
    errs = errors_of(files, variables={"n": "1"})
    assert "nmin 2 is more than the 1 iterations" in errs[0]


def test_include_by_name_and_path_with_layered_vars() -> None:
    files = {
        "wf.yaml": """
            name: wf
            defaults: {msg: root}
            roles:
              - name: a
                include: sub
              - name: b
                vars: {msg: from-b}
                include: lib/sub2.yaml
        """,
        "sub.yaml": """
            name: sub
            defaults: {msg: sub-default}
            roles:
              - name: t
                task: {load: echo}
        """,
        "lib/sub2.yaml": """
            name: sub2
            roles:
              - name: t
                task: {load: echo}
        """,
        "tasks/echo.yaml": ECHO,
    }
    plan = expand_text(files)
    # the included workflow's root name vanishes; its roles attach to the include role
    assert args(plan, "wf.a.t") == ("sub-default",)
    assert args(plan, "wf.b.t") == ("from-b",)
    assert plan.files == ("wf.yaml", "sub.yaml", "tasks/echo.yaml", "lib/sub2.yaml")


def test_include_cycle_is_an_error() -> None:
    files = {
        "wf.yaml": "name: wf\nroles:\n  - name: a\n    include: b\n",
        "b.yaml": "name: b\nroles:\n  - name: x\n    include: c\n",
        "c.yaml": "name: c\nroles:\n  - name: y\n    include: b\n",
    }
    (err,) = errors_of(files)
    assert err.startswith("c.yaml:4:14: include cycle: wf.yaml -> b.yaml -> c.yaml -> b.yaml")


def test_class_defaults_and_vars_sit_under_the_roles() -> None:
    files = {
        "wf.yaml": """
            name: wf
            defaults: {level: wf-default}
            roles:
              - name: t1
                task: {load: k}
              - name: t2
                vars: {mode_var: role-var, level: role-var}
                task: {load: k}
        """,
        "tasks/k.yaml": """
            name: k
            defaults: {level: class-default, extra: e}
            vars: {mode_var: class-var}
            command:
              value: run
              arguments: ["{{ level }}", "{{ mode_var }}", "{{ extra }}"]
        """,
    }
    plan = expand_text(files)
    assert args(plan, "wf.t1") == ("wf-default", "class-var", "e")
    assert args(plan, "wf.t2") == ("role-var", "role-var", "e")


def test_channels_resolve_by_path_alias_and_literal_address() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: src
                bind:
                  - {name: out, type: push, addressing: ipc, global: feed, rateLogging: "5"}
                task: {load: p}
              - name: sink
                connect:
                  - {name: a, type: pull, target: "{{ Parent().Path }}.src:out"}
                  - {name: b, type: pull, target: "::feed"}
                  - {name: c, type: sub, target: "tcp://127.0.0.1:5555"}
                task: {load: p}
        """,
        "tasks/p.yaml": "name: p\ncontrol: {mode: direct}\ncommand: {value: p}\n",
    }
    plan = expand_text(files)
    (b,) = plan.binds
    assert (b.task, b.name, b.type, b.addressing, b.global_alias) == (
        "wf.src", "out", "push", "ipc", "feed",
    )  # fmt: skip
    assert b.properties == (("rateLogging", "5"),)
    a, bb, c = plan.connects
    assert (a.bind_task, a.bind_name) == ("wf.src", "out")
    assert (bb.bind_task, bb.bind_name) == ("wf.src", "out")
    assert c.bind_task is None and c.address == "tcp://127.0.0.1:5555"


def test_role_channels_override_class_channel_defaults_by_name() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: src
                bind:
                  - {name: out, addressing: ipc}
                task: {load: p}
        """,
        "tasks/p.yaml": """
            name: p
            bind:
              - {name: out, type: pub, transport: zeromq}
            command: {value: p}
        """,
    }
    (b,) = expand_text(files).binds
    assert (b.type, b.addressing, b.transport) == ("pub", "ipc", "zeromq")


@pytest.mark.parametrize(
    ("connect", "message"),
    [
        ("{name: a, type: pull, target: 'wf.nothere:out'}", "no task at role path 'wf.nothere'"),
        (
            "{name: a, type: pull, target: 'wf.src:nope'}",
            "'wf.src' binds no channel 'nope' (it binds: out)",
        ),
        ("{name: a, type: push, target: 'wf.src:out'}", "a push bind takes a pull connect"),
        (
            "{name: a, type: pull, target: '::ghost'}",
            "no channel is bound with global alias 'ghost'",
        ),
        ("{name: a, type: pull, target: 'nocolon'}", "bad target 'nocolon'"),
        ("{name: a, type: pipe, target: 'wf.src:out'}", "type 'pipe' is not one of"),
    ],
)  # fmt: skip
def test_connect_errors(connect: str, message: str) -> None:
    files = {
        "wf.yaml": f"""
            name: wf
            roles:
              - name: src
                bind: [{{name: out, type: push}}]
                task: {{load: p}}
              - name: sink
                connect: [{connect}]
                task: {{load: p}}
        """,
        "tasks/p.yaml": "name: p\ncommand: {value: p}\n",
    }
    (err,) = errors_of(files)
    assert message in err and err.startswith("wf.yaml:7:") and "(wf.sink)" in err


def test_calls_triggers_and_timeouts() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: c
                call:
                  func: dcs.StartOfRun()
                  trigger: before_START_ACTIVITY+100
                  await: after_START_ACTIVITY-5
                  timeout: 1m30s
                  critical: false
                  return: sor_result
        """,
    }
    (call,) = expand_text(files).calls
    assert call.to_dict() == {
        "path": "wf.c",
        "func": "dcs.StartOfRun()",
        "trigger": "before_START_ACTIVITY+100",
        "await": "after_START_ACTIVITY-5",
        "timeout": 90.0,
        "critical": False,
        "return": "sor_result",
    }


def test_await_before_trigger_is_an_error() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: c
                call: {func: a.B(), trigger: after_CONFIGURE, await: before_CONFIGURE}
        """,
    }
    (err,) = errors_of(files)
    assert "await before_CONFIGURE comes before trigger after_CONFIGURE" in err


def test_hook_tasks() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: h
                task: {load: sh, trigger: before_DEPLOY, timeout: 2s, critical: false}
              - name: bad
                task: {load: d, trigger: enter_RUNNING}
        """,
        "tasks/sh.yaml": "name: sh\ncontrol: {mode: basic}\ncommand: {value: 'true'}\n",
        "tasks/d.yaml": "name: d\ncontrol: {mode: direct}\ncommand: {value: 'x'}\n",
    }
    (err,) = errors_of(files)
    assert "is a direct-control task" in err and "(wf.bad)" in err
    files["wf.yaml"] = files["wf.yaml"].split("      - name: bad")[0]
    (t,) = expand_text(files).tasks
    assert (t.control, str(t.trigger), t.timeout, t.critical) == (
        "hook",
        "before_DEPLOY",
        2.0,
        False,
    )


def test_same_input_gives_byte_identical_json() -> None:
    import json

    files = {
        "wf.yaml": """
            name: wf
            defaults: {msg: m}
            roles:
              - name: t{{ i }}-{{ uid.New() }}
                for: {begin: "0", end: "20", var: i}
                task: {load: echo}
        """,
        "tasks/echo.yaml": ECHO,
    }
    one = json.dumps(expand_text(files, seed="s").to_dict(), sort_keys=True)
    two = json.dumps(expand_text(files, seed="s").to_dict(), sort_keys=True)
    other = json.dumps(expand_text(files, seed="t").to_dict(), sort_keys=True)
    assert one == two and one != other


def test_expand_raises_with_every_error() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: a
                task: {load: x}
              - name: b
                task: {load: y}
        """
    }
    with pytest.raises(TemplateError) as info:
        expand_text(files)
    assert len(info.value.diagnostics) == 2


def test_public_root_name_and_description() -> None:
    """AliECS's templates mark the root name and description ``!public`` (issue 12)."""
    plan = expand_text(
        {
            "wf.yaml": """
                name: !public readout-dataflow
                description: !public "Main workflow"
                roles:
                  - {name: r, task: {load: t}}
                """,
            "tasks/t.yaml": "name: t\ncommand: {value: /bin/true}\n",
        }
    )
    assert plan.name == "readout-dataflow" and plan.description == "Main workflow"
    assert [t.path for t in plan.tasks] == ["readout-dataflow.r"]
    errors = errors_of(
        {
            "wf.yaml": """
                name: w
                roles:
                  - {name: !public r, task: {load: t}}
                """,
            "tasks/t.yaml": "name: t\ncommand: {value: /bin/true}\n",
        }
    )
    assert "role name: unknown tag '!public'" in errors[0]


def test_a_role_name_with_control_or_formatting_characters_is_refused() -> None:
    # (a name reaches terminals, logs and the SVG graph: an escape sequence, a
    # right-to-left override or a NUL-like character would be written there as is)
    for bad in ("\\u001b[31mred", "evil\\u202eexe", "a\\u0001b", "zero\\u200bwidth"):
        errors = errors_of(
            {
                "wf.yaml": f"""
                    name: w
                    roles:
                      - {{name: "{bad}", task: {{load: t}}}}
                    """,
                "tasks/t.yaml": "name: t\ncommand: {value: /bin/true}\n",
            }
        )
        assert errors and "control or formatting characters" in errors[0], (bad, errors)
