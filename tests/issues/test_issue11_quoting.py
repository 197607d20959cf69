"""Issue 11, items 1 and 2: a caller's value never changes a command's parse, and
expansion is bounded. Each test here failed on main before the fix (aba3e4c).

Commands are run for real (``/bin/sh -c`` with the plan's environment, and ``corral
run`` end to end); "PWNED" is a file the hostile values try to create.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral.calls import CallContext, parse_func
from corral.calls.builtin import ExecPlugin
from corral.model.plan import CallSpec
from corral.templates import DictSources, check
from corral.templates.expansion import MAX_EXPRESSION_INPUT, MAX_VALUE
from tests.conftest import ROOT, errors_of, expand_text

HOSTILE = [
    "x; touch PWNED",
    "$(touch PWNED)",
    "`touch PWNED`",
    "a | touch PWNED",
    "a\ntouch PWNED",
    "'; touch PWNED; '",
    '"; touch PWNED; "',
    "a && touch PWNED #",
    "${IFS}$(touch${IFS}PWNED)",
    "\\'; touch PWNED",
    "\ue001; touch PWNED; \ue000",  # the taint marks themselves
]


def sh(value: str, env: tuple[tuple[str, str], ...], cwd: Path, shell: str = "/bin/sh") -> str:
    """What ``shell -c value`` prints, with the plan's environment."""
    r = subprocess.run(
        [shell, "-c", value],
        env={"PATH": os.environ["PATH"], **dict(env)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.stdout


def shell_class(value: str, defaults: str = "") -> dict[str, str]:
    task = textwrap.dedent(
        f"""
        name: t
        command:
          shell: true
          value: {value}
        """
    ).lstrip("\n")
    if defaults:
        task += "defaults:\n" + textwrap.indent(textwrap.dedent(defaults), "  ")
    return {
        "wf.yaml": """
            name: w
            roles:
              - name: r
                task:
                  load: t
            """,
        "tasks/t.yaml": task,
    }


FORMS = {
    "bare": ("'echo {{ msg }}'", ""),
    "single-quoted": ("\"echo '{{ msg }}'\"", ""),
    "double-quoted": ("'echo \"{{ msg }}\"'", ""),
    "through a template variable": ("'{{ _cmd }}'", "_cmd: 'echo {{ msg }}'\n"),
    "computed": ("'echo {{ msg + \"\" }}'", ""),
    "command substitution": ("'echo \"$(echo {{ msg }})\"'", ""),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_reaches_no_shell(form: str, value: str, tmp_path: Path) -> None:
    command, defaults = FORMS[form]
    plan = expand_text(shell_class(command, defaults), variables={"msg": value})
    cmd = plan.tasks[0].command
    out = sh(cmd.value, cmd.env, tmp_path)
    assert not (tmp_path / "PWNED").exists(), (cmd.value, cmd.env)
    shown = value.replace("\ue000", "").replace("\ue001", "")
    if form in ("single-quoted", "double-quoted", "computed", "command substitution"):
        assert out == shown + "\n"  # one word, exactly the caller's characters


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_in_a_here_document(value: str, tmp_path: Path) -> None:
    files = shell_class("'cat <<EOF\n\n  {{ msg }}\n\n  EOF'")
    plan = expand_text(files, variables={"msg": value})
    cmd = plan.tasks[0].command
    sh(cmd.value, cmd.env, tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_template_own_text_is_the_script() -> None:
    """What the template (and its defaults) write stays shell code, as ALICE's
    templates need: ``&&`` of a default is an operator, not data."""
    plan = expand_text(
        shell_class(
            "'{{ _cmd }} {{ where }}'", "_cmd: 'echo a && echo'\nwhere: '{{ workflow }}'\n"
        ),
        global_defaults={"workflow": "here"},
    )
    cmd = plan.tasks[0].command
    assert cmd.value == "echo a && echo here" and cmd.env == ()


@pytest.mark.parametrize("value", HOSTILE)
def test_exec_calls_keep_a_value_one_argument(value: str, tmp_path: Path) -> None:
    """Both exec methods, run for real by the plugin, with the call's variables."""
    files = {
        "wf.yaml": """
            name: w
            roles:
              - name: run
                call:
                  func: "exec.Run('/bin/echo', '{{ msg }}', \\"{{ msg }}\\", {{ msg }})"
                  trigger: START_ACTIVITY
              - name: shell
                call:
                  func: "exec.Shell('cd {{ dir }} && echo {{ msg }}')"
                  trigger: START_ACTIVITY
            """
    }
    plan = expand_text(files, variables={"msg": value}, global_defaults={"dir": str(tmp_path)})
    run, shell = plan.calls
    shown = value.replace("\ue000", "").replace("\ue001", "")
    assert parse_func(run.func).args == ("/bin/echo", shown, shown, shown)

    async def invoke(spec: CallSpec) -> str | None:
        parsed = parse_func(spec.func)
        ctx = CallContext("e", "START_ACTIVITY", "START_ACTIVITY", spec.path, spec.func, None,
                          {}, spec.env)  # fmt: skip
        return await ExecPlugin({}).call(parsed.method, parsed.args, ctx)

    assert asyncio.run(invoke(run)) == " ".join([shown] * 3).strip()
    assert asyncio.run(invoke(shell)) == shown.strip()
    assert not (tmp_path / "PWNED").exists()
    assert not (Path(ROOT) / "PWNED").exists()


def test_a_number_outside_a_literal_stays_a_number() -> None:
    files = {
        "wf.yaml": """
            name: w
            roles:
              - name: nap
                call:
                  func: "test.Sleep({{ t }})"
                  trigger: START_ACTIVITY
            """
    }
    plan = expand_text(files, variables={"t": "0.5"})
    assert parse_func(plan.calls[0].func).args == (0.5,)
    plan = expand_text(files, variables={"t": "0.5); exec.Shell('touch PWNED'"})
    assert parse_func(plan.calls[0].func).args == ("0.5); exec.Shell('touch PWNED'",)


def test_raw_holes_take_words_and_refuse_syntax(tmp_path: Path) -> None:
    files = shell_class("'printf \"<%s>\" {{ raw(flags) }}'")
    plan = expand_text(files, variables={"flags": "--a 1 --b=x,y"})
    cmd = plan.tasks[0].command
    assert sh(cmd.value, cmd.env, tmp_path) == "<--a><1><--b=x,y>"
    errors = errors_of(files, variables={"flags": "--a; touch PWNED"})
    assert len(errors) == 1
    assert errors[0].startswith("tasks/t.yaml:4:")
    assert "raw(flags): a caller's value here may hold letters" in errors[0]
    assert "';'" in errors[0]


def test_role_names_from_a_caller_hold_no_shell_syntax() -> None:
    files = {
        "wf.yaml": """
            name: w
            roles:
              - name: "n-{{ it }}"
                for:
                  range: "{{ hosts }}"
                  var: it
                task:
                  load: t
            """,
        "tasks/t.yaml": """
            name: t
            command:
              shell: true
              value: "echo {{ This().Path }}"
            """,
    }
    plan = expand_text(files, variables={"hosts": '["flp1","flp2"]'})
    assert [t.command.value for t in plan.tasks] == ["echo w.n-flp1", "echo w.n-flp2"]
    errors = errors_of(files, variables={"hosts": '["$(touch${IFS}PWNED)"]'})
    assert "comes from a caller's value, and may then hold letters" in errors[0]


def doubling(depth: int, concat: bool) -> dict[str, str]:
    lines = ["name: w", "defaults:", '  s0: "ab"', "roles:"]
    indent = "  "
    for i in range(1, depth + 1):
        s = f"s{i - 1}"
        grow = f"{{{{ {s} }}}}{{{{ {s} }}}}" if concat else f"{{{{ {s} + {s} }}}}"
        lines += [f"{indent}- name: r{i}", f"{indent}  vars:", f'{indent}    s{i}: "{grow}"']
        lines.append(f"{indent}  roles:")
        indent += "    "
    lines += [f"{indent}- name: leaf", f"{indent}  task:", f"{indent}    load: t"]
    return {
        "wf.yaml": "\n".join(lines) + "\n",
        "tasks/t.yaml": "name: t\ncommand:\n  value: /bin/true\n",
    }


@pytest.mark.parametrize("concat", [False, True], ids=["expression", "text"])
def test_the_doubling_chain_ends_in_an_error(concat: bool) -> None:
    """40 nested roles doubling a string: an error naming the place and the limit (the
    bench, bench/doubling.py, measures time and memory)."""
    plan, diags = check("wf.yaml", DictSources(doubling(40, concat)))
    assert plan is None and len(diags) == 1
    text = str(diags[0])
    assert text.startswith("wf.yaml:")
    assert f"{MAX_VALUE}" in text if concat else f"{MAX_EXPRESSION_INPUT}" in text


def test_the_doubling_chain_stays_small_in_a_process(tmp_path: Path) -> None:
    """The same in a child process capped at 1 GiB of address space: it ends with the
    error, not with a MemoryError or the kernel's OOM killer."""
    for name, text in doubling(40, True).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from corral.cli.main import main
        sys.argv = ["corral", "template", "validate", sys.argv[1]]
        main()
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "wf.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert f"the limit is {MAX_VALUE}" in r.stdout + r.stderr
    assert "MemoryError" not in r.stderr


def test_task_count_and_time_are_bounded() -> None:
    files = {
        "wf.yaml": """
            name: w
            roles:
              - name: "n{{ i }}"
                for:
                  begin: "1"
                  end: "20000"
                  var: i
                task:
                  load: t
            """,
        "tasks/t.yaml": "name: t\ncommand:\n  value: /bin/true\n",
    }
    errors = errors_of(files, max_tasks=20)
    assert len(errors) == 1 and "more than 20 tasks and calls, the limit" in errors[0]
    assert errors[0].startswith("wf.yaml:3:11: ") and errors[0].endswith("(w.n21)")
    ticks = iter(range(1_000_000))  # a clock that moves one second each time it is read
    errors = errors_of(files, time_limit=3.0, clock=lambda: float(next(ticks)))
    assert len(errors) == 1 and "expansion took longer than 3 s, the limit" in errors[0]


def test_corral_run_var_reaches_no_shell(tmp_path: Path) -> None:
    """The issue's reproduction, end to end: ``corral run --var 'msg=x; touch PWNED'``."""
    wf = tmp_path / "wf"
    (wf / "tasks").mkdir(parents=True)
    roles = []
    for n in range(len(HOSTILE)):
        roles.append(
            f"""
              - name: log{n}
                task:
                  load: echo
                  trigger: after_START_ACTIVITY
                vars:
                  n: "{n}"
                  msg: "{{{{ msg{n} }}}}"
            """
        )
    (wf / "w.yaml").write_text(
        textwrap.dedent("name: w\nroles:\n") + "".join(textwrap.dedent(r) for r in roles)
    )
    (wf / "tasks" / "echo.yaml").write_text(
        textwrap.dedent(
            """
            name: echo
            control:
              mode: basic
            command:
              shell: true
              cwd: "{{ workflow_dir }}"
              value: "echo {{ msg }} > out{{ n }}.txt"
            """
        )
    )
    args = []
    for n, v in enumerate(HOSTILE):
        args += ["--var", f"msg{n}={v}"]
    r = subprocess.run(
        [sys.executable, "-m", "corral", "run", str(wf / "w.yaml"), "--data",
         str(tmp_path / "data"), "--for", "0", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (wf / "PWNED").exists()
    for n, v in enumerate(HOSTILE):
        shown = v.replace("\ue000", "").replace("\ue001", "")
        assert (wf / f"out{n}.txt").read_text().strip() == shown.strip(), n


@pytest.mark.parametrize(
    "expr", ["strings.TrimSpace(x)", 'x + ""', "string(x)", 'size(x) > 0 ? x : "b"', "[x][0]"]
)
def test_raw_checks_a_computed_value_too(expr: str) -> None:
    """A new user's finding: raw() of an expression that read a caller's value pasted it
    unchecked (only a bare variable kept its marks)."""
    files = shell_class(f"'echo {{{{ raw({expr}) }}}}'")
    errors = errors_of(files, variables={"x": "--v; touch PWNED"})
    assert len(errors) == 1 and "a caller's value here may hold letters" in errors[0], errors
    plan = expand_text(files, variables={"x": "--v 1"})
    assert plan.tasks[0].command.value == "echo --v 1"


def test_a_choice_between_template_values_stays_code(tmp_path: Path) -> None:
    """``size(modulepath) > 0 ? module_cmdline : plain_cmdline`` with a caller's
    modulepath: the result is one of the template's own command lines, not the caller's
    text, so it stays shell code (as in ALICE's task classes)."""
    defaults = "_a: 'echo a && echo b'\n_b: 'echo plain'\n"
    files = shell_class("'{{ size(mp) > 0 ? _a : _b }}'", defaults)
    cmd = expand_text(files, variables={"mp": "/opt/modules; touch PWNED"}).tasks[0].command
    assert cmd.value == "echo a && echo b" and cmd.env == ()
    assert sh(cmd.value, cmd.env, tmp_path) == "a\nb\n"
    assert expand_text(files, variables={"mp": ""}).tasks[0].command.value == "echo plain"


def test_one_variable_per_distinct_value(tmp_path: Path) -> None:
    files = shell_class("'echo {{ x }} {{ x }} \"{{ x }}\" {{ y }}'")
    cmd = expand_text(files, variables={"x": "a b", "y": "c"}).tasks[0].command
    assert cmd.value == (
        'echo "${CORRAL_VALUE_1}" "${CORRAL_VALUE_1}" "${CORRAL_VALUE_1}" "${CORRAL_VALUE_2}"'
    )
    assert cmd.env == (("CORRAL_VALUE_1", "a b"), ("CORRAL_VALUE_2", "c"))
    assert sh(cmd.value, cmd.env, tmp_path) == "a b a b a b c\n"


def test_a_caller_names_no_environment_variable() -> None:
    """An attacker's finding: ``env: ["{{ extra }}"]`` let a caller set LD_PRELOAD or
    PATH of a task. A caller's value may be an env entry's value, not its name."""
    task = "name: t\ncommand:\n  value: /bin/true\n  env: ['{{ extra }}', 'X={{ extra }}']\n"
    files = {"wf.yaml": "name: w\nroles:\n  - {name: r, task: {load: t}}\n", "tasks/t.yaml": task}
    errors = errors_of(files, variables={"extra": "LD_PRELOAD=/tmp/evil.so"})
    assert len(errors) == 1 and "its name comes from a caller" in errors[0], errors
    files["tasks/t.yaml"] = task.replace("'{{ extra }}', ", "")
    cmd = expand_text(files, variables={"extra": "LD_PRELOAD=/tmp/evil.so"}).tasks[0].command
    assert cmd.env == (("X", "LD_PRELOAD=/tmp/evil.so"),)
