"""Issue 12, item 1: AliECS's template functions and rules, on templates of our own.

Each function is tested against what AliECS's source does (the AliceO2Group/Control
repository, ``configuration/template/stack.go`` and ``apricot/local/service.go``),
edge cases included. DPL generation is tested with descriptions we write and with a
stand-in executable that prints one, as ``o2-… --dump-workflow`` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral.control.site import DplRunner, SiteError, load_defaults, make_site
from corral.model.inventory import Node
from corral.model.plan import HOST_PLACEHOLDER
from corral.templates import DictSources, check
from corral.templates.expressions import Evaluator, suffix_in_range
from corral.templates.services import Site
from tests.conftest import ROOT, errors_of, expand_text

CARDS = json.dumps(
    {
        "1": {"type": "CRU", "serial": "0228", "endpoint": "1"},
        "0": {"type": "CRU", "serial": "0228", "endpoint": "0"},
        "2": {"type": "CRU", "serial": "1041", "endpoint": "0"},
    }
)
SITE_LABELS = {
    "flp001": {"detector": "TPC", "cards": CARDS},
    "flp002": {"detector": "TPC"},
    "flp160": {"detector": "ITS"},
    "flp999": {},
}


def ev(src: str, stack: dict[str, str] | None = None, site: Site | None = None) -> object:
    e = Evaluator("s", site if site is not None else Site(labels=SITE_LABELS))
    return e.evaluate(e.expr(src), stack or {}, None)


# -- util, json: the pure functions ------------------------------------------------


@pytest.mark.parametrize(
    ("value", "prefix", "low", "high", "want"),
    [
        ("alio2-cr1-flp001", "alio2-cr1-flp", "001", "072", "true"),
        ("alio2-cr1-flp072", "alio2-cr1-flp", "001", "072", "true"),
        ("alio2-cr1-flp073", "alio2-cr1-flp", "001", "072", "false"),
        ("alio2-cr1-flp000", "alio2-cr1-flp", "001", "072", "false"),
        ("alio2-cr1-flp145", "alio2-cr1-flp", "145", "145", "true"),
        ("other-flp001", "alio2-cr1-flp", "001", "072", "false"),  # the prefix is missing
        ("flp001", "", "0", "999", "false"),  # an empty prefix trims nothing: false
        ("alio2-cr1-flp", "alio2-cr1-flp", "0", "9", "false"),  # no number after it
        ("alio2-cr1-flp01a", "alio2-cr1-flp", "0", "99", "false"),
        ("alio2-cr1-flp+5", "alio2-cr1-flp", "0", "9", "true"),  # Go's Atoi takes a sign
        ("alio2-cr1-flp-5", "alio2-cr1-flp", "-9", "0", "true"),
        ("alio2-cr1-flp 5", "alio2-cr1-flp", "0", "9", "false"),  # nor spaces
        ("alio2-cr1-flp5", "alio2-cr1-flp", "x", "9", "false"),  # bounds not numbers
        ("alio2-cr1-flp5", "alio2-cr1-flp", "0", " 9", "false"),
        ("alio2-cr1-flp99999999999999999999", "alio2-cr1-flp", "0", "9", "false"),  # range
        ("alio2-cr1-flp٣", "alio2-cr1-flp", "0", "9", "false"),  # ASCII digits only
    ],
)
def test_suffix_in_range_as_in_aliecs(
    value: str, prefix: str, low: str, high: str, want: str
) -> None:
    assert suffix_in_range(value, prefix, low, high) == want
    src = f"util.SuffixInRange(v, {json.dumps(prefix)}, {json.dumps(low)}, {json.dumps(high)})"
    assert ev(src, {"v": value}) == want


def test_json_and_util_functions() -> None:
    assert ev('json.Sort(json.Unmarshal(\'[3, "b", 1, "a"]\'))') == ["1", "3", "a", "b"]
    assert ev("json.Sort('abc')") == "abc"  # not a list: as is
    assert ev("json.Serialize(json.Deserialize('{\"a\": [1]}'))") == '{"a":[1]}'
    assert ev("util.Nullable('x')") == "x"
    # util.Dump writes a file in AliECS; corral returns the value and writes nothing
    assert ev("util.Dump('payload', '/tmp/corral-dump-test')") == "payload"
    assert not os.path.exists("/tmp/corral-dump-test")


# -- inventory.* ---------------------------------------------------------------------


def test_inventory_functions_read_node_labels() -> None:
    assert ev("inventory.DetectorForHost('flp160')") == "ITS"
    assert ev("inventory.DetectorsForHosts(h)", {"h": '["flp160","flp001","flp002"]'}) == (
        '["ITS","TPC"]'  # unique, sorted (apricot's GetDetectorsForHosts)
    )
    # one card per serial, in the order of the cards' keys; endpoints space-separated
    assert ev("inventory.CRUCardsForHost('flp001')") == '["0228","1041"]'
    assert ev("inventory.EndpointsForCRUCard('flp001', '0228')") == "0 1"
    assert ev("inventory.EndpointsForCRUCard('flp001', '9999')") == ""


def test_inventory_failures_are_said_as_aliecs_says_them() -> None:
    """AliECS returns {"error": ...} as the value; a template that prints it shows why."""
    assert json.loads(str(ev("inventory.DetectorForHost('nope')"))) == {
        "error": "detector not found for host nope"
    }
    assert "detector not found for host flp999" in str(ev("inventory.DetectorForHost('flp999')"))
    bad = json.loads(str(ev("inventory.DetectorsForHosts('not json')")))
    assert bad["error"].startswith("DetectorsForHosts function:")
    unknown = json.loads(str(ev("inventory.DetectorsForHosts(h)", {"h": '["flp001","x"]'})))
    assert unknown == {"error": "detector not found for host x"}
    cards = json.loads(str(ev("inventory.CRUCardsForHost('flp002')")))
    assert cards[0].startswith("error: ")  # a list with the error, as AliECS's
    # without a site (a test's Evaluator), the functions say so rather than crash
    bare = Evaluator("s")
    assert "no site" in str(bare.evaluate(bare.expr("inventory.DetectorForHost('a')"), {}, None))


def test_inventory_in_a_workflow_per_iteration() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: host-{{ it }}
                for: {range: "{{ hosts }}", var: it}
                defaults:
                  detector: "{{ inventory.DetectorForHost(it) }}"
                  cards: "{{ inventory.CRUCardsForHost(it) }}"
                roles:
                  - name: card-{{ card }}
                    for: {range: "{{ cards }}", var: card}
                    vars:
                      eps: "{{ inventory.EndpointsForCRUCard(it, card) }}"
                    task: {load: t}
            """,
        "tasks/t.yaml": """
            name: t
            command: {value: /bin/true, arguments: ["{{ detector }}", "{{ eps }}"]}
            """,
    }
    plan = expand_text(files, variables={"hosts": '["flp001"]'}, services=Site(SITE_LABELS))
    got = {t.path: t.command.arguments for t in plan.tasks}
    assert got == {
        "wf.host-flp001.card-0228": ("TPC", "0 1"),
        "wf.host-flp001.card-1041": ("TPC", "0"),
    }


# -- runtime.* -------------------------------------------------------------------------


def test_runtime_get_and_set() -> None:
    site = Site(runtime={("trg/ltu", "cfg"): "mode=1"})
    assert ev("runtime.Get('trg/ltu', 'cfg')", site=site) == "mode=1"
    missing = json.loads(str(ev("runtime.Get('trg/ltu', 'nope')", site=site)))
    assert missing == {"error": "no runtime entry trg/ltu/nope"}
    # Set returns the value; the write is collected, seen by later Gets, applied later
    assert ev("runtime.Set('a', 'k', 'v1')", site=site) == "v1"
    assert ev("runtime.Get('a', 'k')", site=site) == "v1"
    assert site.runtime_writes == {("a", "k"): "v1"}
    assert ("a", "k") not in site.runtime


# -- unknown functions -------------------------------------------------------------------


def test_an_unknown_function_is_named_with_the_nearest_one() -> None:
    errors = errors_of(
        {
            "wf.yaml": """
                name: wf
                defaults:
                  x: "{{ util.SuffixInRang(a, 'b', '1', '2') }}"
                  y: "{{ inventory.DetectorForHots('h') }}"
                roles: [{name: r, task: {load: t}}]
                """,
            "tasks/t.yaml": "name: t\ncommand: {value: /bin/true}\n",
        }
    )
    assert any("unknown function util.SuffixInRang; did you mean util.SuffixInRange?" in e
               for e in errors)  # fmt: skip
    assert any(
        "unknown function inventory.DetectorForHots; did you mean inventory.Detector" in e
        for e in errors
    )


# -- defaults ------------------------------------------------------------------------------


def test_a_default_reads_the_entries_above_it() -> None:
    files = {
        "wf.yaml": """
            name: wf
            defaults:
              base: "/opt/o2"
              bin: "{{ base }}/bin"
              exe: "{{ bin }}/o2-readout-exe"
            roles:
              - name: r
                defaults:
                  exe2: "{{ exe }}-2"
                  exe3: "{{ exe2 }}-3"
                task: {load: t}
            """,
        "tasks/t.yaml": """
            name: t
            defaults:
              a1: "{{ exe3 }}"
              a2: "{{ a1 }}!"
            command: {value: /bin/true, arguments: ["{{ a2 }}"]}
            """,
    }
    plan = expand_text(files)
    assert plan.tasks[0].command.arguments == ("/opt/o2/bin/o2-readout-exe-2-3!",)
    # an entry above that a caller overrides is read with the caller's value
    plan = expand_text(files, variables={"bin": "/usr/bin"})
    assert plan.tasks[0].command.arguments == ("/usr/bin/o2-readout-exe-2-3!",)


def test_an_overridden_default_is_never_evaluated() -> None:
    """A default whose expression cannot work where it is overridden is no error."""
    files = {
        "wf.yaml": """
            name: wf
            defaults:
              detector: "{{ inventory_only_in_production }}"
              n: "{{ strings.Atoi('not a number') }}"
            vars:
              n: "3"
            roles:
              - name: r
                task: {load: t}
            """,
        "tasks/t.yaml": """
            name: t
            defaults:
              cls: "{{ also_undefined }}"
            command: {value: /bin/true, arguments: ["{{ detector }}", "{{ n }}", "{{ cls }}"]}
            """,
    }
    plan = expand_text(files, variables={"detector": "TPC", "cls": "c"})
    assert plan.tasks[0].command.arguments == ("TPC", "3", "c")
    # not overridden: the errors are said, every one of the block, not only the first
    errors = errors_of(files, variables={"cls": "c"})
    assert len(errors) == 1 and "inventory_only_in_production" in errors[0]
    errors = errors_of({**files, "wf.yaml": files["wf.yaml"].replace('n: "3"', 'm: "3"')})
    assert any("inventory_only_in_production" in e for e in errors)
    assert any("strings.Atoi" in e for e in errors)


def test_errors_inside_iterations_say_which_iteration() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: host-{{ it }}
                for: {range: '["a","b"]', var: it}
                defaults:
                  x: "{{ strings.Atoi(it == 'b' ? 'not a number' : '1') }}"
                task: {load: t}
            """,
        "tasks/t.yaml": "name: t\ncommand: {value: /bin/true}\n",
    }
    errors = errors_of(files)
    assert len(errors) == 1, errors
    assert "strings.Atoi: 'not a number' is not an integer" in errors[0]
    assert "(wf.host-{{ it }} [it=b])" in errors[0]


# -- basic tasks -----------------------------------------------------------------------


def test_timeout_on_a_basic_task_without_trigger() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: once
                task: {load: basic, timeout: 40s}
              - name: unbounded
                task: {load: basic, timeout: 0s}
              - name: plain
                task: {load: basic}
            """,
        "tasks/basic.yaml": "name: basic\ncommand: {value: /bin/true}\n",
        "tasks/direct.yaml": "name: direct\ncontrol: {mode: direct}\ncommand: {value: x}\n",
    }
    plan = expand_text(files)
    got = {t.path: (t.control, t.timeout) for t in plan.tasks}
    assert got == {
        "wf.once": ("basic", 40.0),
        "wf.unbounded": ("basic", None),
        "wf.plain": ("basic", None),
    }
    bad = dict(files)
    bad["wf.yaml"] = files["wf.yaml"].replace(
        "load: basic, timeout: 0s", "load: direct, timeout: 5s"
    )
    errors = errors_of(bad)
    assert len(errors) == 1 and "timeout applies to basic and hook tasks" in errors[0]


# -- per-task variables --------------------------------------------------------------------


def test_per_task_variables() -> None:
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: pinned
                constraints: [{attribute: machine_id, value: flp001}]
                task: {load: t}
              - name: floating
                task: {load: t}
            """,
        "tasks/t.yaml": """
            name: t
            command:
              value: /bin/echo
              arguments: ["{{ task_hostname }}", "{{ task_name }}", "{{ task_class_name }}",
                          "{{ task_parent_role }}"]
            """,
    }
    plan = expand_text(files)
    args = {t.path: t.command.arguments for t in plan.tasks}
    assert args["wf.pinned"] == ("flp001", "wf.pinned", "t", "wf")
    # placed later: a placeholder that the control plane fills in at launch
    assert args["wf.floating"][0] == HOST_PLACEHOLDER


# -- task files on their own ---------------------------------------------------------------


def corral(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=300,
    )


def test_a_task_file_is_validated_on_its_own(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "good.yaml").write_text(
        textwrap.dedent(
            """
            name: good
            defaults: {user: flp}
            control: {mode: fairmq}
            bind: [{name: out, type: push, addressing: ipc}]
            command:
              value: "{{ o2_install_path }}/bin/o2-thing"
              arguments: ["--detector={{ detector }}"]
            """
        )
    )
    (tasks / "bad.yaml").write_text("name: bad\ncontrol: {mode: fairmqq}\ncommand: {value: x}\n")
    (tasks / "broken.yaml").write_text("name: broken\ncommand: {value: '{{ a + }}'}\n")
    r = corral("template", "validate", str(tasks / "good.yaml"))
    assert r.returncode == 0, r.stderr
    assert "a task class" in r.stderr
    r = corral("template", "validate", str(tasks / "bad.yaml"), str(tasks / "broken.yaml"))
    assert r.returncode == 1
    assert f"{tasks / 'bad.yaml'}:2:" in r.stderr and "control mode 'fairmqq'" in r.stderr
    assert f"{tasks / 'broken.yaml'}:2:" in r.stderr and "syntax error" in r.stderr


# -- site defaults -------------------------------------------------------------------------


def test_site_defaults_sit_under_the_templates_own(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(
        "name: t\ncommand: {value: /bin/true, arguments: ['{{ a }}', '{{ b }}', '{{ c }}']}\n"
    )
    (tmp_path / "wf.yaml").write_text(
        "name: wf\ndefaults: {b: template}\nroles: [{name: r, task: {load: t}}]\n"
    )
    site = tmp_path / "site.yaml"
    site.write_text("a: site\nb: site\nc: 3\n")
    r = corral(
        "template", "render", str(tmp_path / "wf.yaml"), "--defaults", str(site), "-o", "json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"][0]["command"]["arguments"] == ["site", "template", "3"]
    site.write_text("a: site\nb: [1, 2]\n")
    r = corral("template", "validate", str(tmp_path / "wf.yaml"), "--defaults", str(site))
    assert r.returncode == 2 and f"{site}:2: b: the value must be a scalar" in r.stderr
    with pytest.raises(SiteError, match="is given twice"):
        site.write_text("a: 1\na: 2\n")
        load_defaults(str(site))


# -- DPL workflow generation ------------------------------------------------------------------

DUMP = {
    "workflow": [
        {
            "name": "readout-proxy",
            "inputs": [],
            "outputs": [{"binding": "A", "origin": "TPC", "description": "RAWDATA", "subspec": 0}],
            "options": [],
            "rank": 0,
            "nSlots": 1,
        },
        {
            "name": "tpc-decoder",
            "inputs": [{"binding": "A", "origin": "TPC", "description": "RAWDATA"}],
            "outputs": [{"binding": "D", "origin": "TPC", "description": "DIGITS", "subspec": 0}],
        },
        {
            "name": "qc-task:TPC/{{ evil }}",
            "inputs": [{"binding": "D", "origin": "TPC", "description": "DIGITS", "subspec": 0}],
            "outputs": [],
        },
    ],
    "metadata": [
        {"name": "readout-proxy", "executable": "o2-dpl-raw-proxy", "cmdLineArgs": ["-b"]},
        {"name": "tpc-decoder", "executable": "o2-tpc-raw-to-digits", "cmdLineArgs": ["--x"]},
        {
            "name": "qc-task:TPC/{{ evil }}",
            "executable": "o2-qc",
            "cmdLineArgs": ["--config", "{{ json.Marshal('not evaluated') }}"],
        },
    ],
}


def dpl_files(jit: dict[str, str]) -> tuple[dict[str, str], Site]:
    files = {
        "workflows/wf.yaml": """
            name: wf
            roles:
              - name: flp
                include: "{{ dpl.GenerateFromUri(dpl_workflow) }}"
            """,
    }
    site = Site(jit=lambda name: jit.get(name))
    return files, site


def test_a_dpl_description_becomes_tasks_and_channels() -> None:
    files, site = dpl_files({"tpc-raw": json.dumps(DUMP)})
    plan = expand_text(
        files, root="workflows/wf.yaml", variables={"dpl_workflow": "tpc-raw"}, services=site
    )
    tasks = {t.path: t for t in plan.tasks}
    assert set(tasks) == {"wf.flp.readout-proxy", "wf.flp.tpc-decoder", "wf.flp.qc-task-TPC-evil"}
    assert {t.control for t in plan.tasks} == {"fairmq"}
    dec = tasks["wf.flp.tpc-decoder"].command
    assert (dec.value, dec.arguments) == ("o2-tpc-raw-to-digits", ("--x", "--id", "tpc-decoder"))
    # strings of the description are data: a template hole in them stays as written
    qc = tasks["wf.flp.qc-task-TPC-evil"].command
    assert qc.arguments == (
        "--config", "{{ json.Marshal('not evaluated') }}", "--id", "qc-task:TPC/{{ evil }}"
    )  # fmt: skip
    routes = {(c.task, c.name, c.bind_task) for c in plan.connects}
    assert routes == {
        ("wf.flp.tpc-decoder", "from_readout-proxy_to_tpc-decoder", "wf.flp.readout-proxy"),
        ("wf.flp.qc-task-TPC-evil", "from_tpc-decoder_to_qc-task-TPC-evil", "wf.flp.tpc-decoder"),
    }


def test_dpl_uri_rules() -> None:
    files, site = dpl_files({"tpc-raw": json.dumps(DUMP), "bad": '{"workflow": "x"}'})
    root = "workflows/wf.yaml"

    def errs(name: str) -> list[str]:
        return errors_of(files, root=root, variables={"dpl_workflow": name}, services=site)

    assert "failed to read DPL command from 'jit/missing'" in errs("missing")[0]
    assert "bad DPL command name '../../etc/passwd'" in errs("../../etc/passwd")[0]
    assert "dplCommand is 'none'" in errs("none")[0]
    assert "no 'workflow' list of devices" in errs("bad")[0]
    # ...OrFallbackToTemplate: no jit file of that name, then the workflow of that name
    files2 = {
        **files,
        "workflows/wf.yaml": files["workflows/wf.yaml"].replace(
            "GenerateFromUri", "GenerateFromUriOrFallbackToTemplate"
        ),
        "workflows/plain.yaml": "name: plain\nroles: [{name: p, task: {load: t}}]\n",
        "tasks/t.yaml": "name: t\ncommand: {value: /bin/true}\n",
    }
    plan = expand_text(files2, root=root, variables={"dpl_workflow": "plain"}, services=site)
    assert [t.path for t in plan.tasks] == ["wf.flp.p"]


STANDIN = """\
#!{python}
import json, sys
args = sys.argv[1:]
assert args[-1] == "--dump-workflow", args
dump = {dump}
dump["metadata"][1]["cmdLineArgs"] = args[:-1]
print(json.dumps(dump))
"""


def test_a_dpl_command_runs_and_a_callers_value_stays_one_word(tmp_path: Path) -> None:
    """A jit command file is a template; it runs in bash with --dump-workflow added, and
    a caller's value in it is read from a variable, never parsed by the shell."""
    exe = tmp_path / "o2-standin"
    exe.write_text(STANDIN.format(python=sys.executable, dump=repr(DUMP)))
    exe.chmod(0o755)
    (tmp_path / "jit").mkdir()
    (tmp_path / "jit" / "tpc").write_text(f"{exe} --session default --detector '{{{{ det }}}}'\n")
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "wf.yaml").write_text(
        textwrap.dedent(
            """
            name: wf
            defaults: {det: TPC, dpl_workflow: tpc}
            roles:
              - name: flp
                include: "{{ dpl.GenerateFromUri(dpl_workflow) }}"
            """
        )
    )
    runner = DplRunner(str(tmp_path))
    path = str(tmp_path / "workflows" / "wf.yaml")
    from corral.store.files import DiskSources

    site = make_site(path, [Node("flp001")], run_dpl=runner)
    hostile = "x'; touch PWNED; echo '"
    plan, diags = check(path, DiskSources(), variables={"det": hostile}, services=site)
    assert plan is not None, [str(d) for d in diags]
    dec = {t.path: t for t in plan.tasks}["wf.flp.tpc-decoder"]
    assert dec.command.arguments[:4] == ("--session", "default", "--detector", hostile)
    assert not (tmp_path / "PWNED").exists()
    assert runner.runs == 1
    # the same command again: the description is reused, not made again
    plan, _ = check(path, DiskSources(), variables={"det": hostile}, services=site)
    assert plan is not None and runner.runs == 1
    # a command that fails says so, with its output
    (tmp_path / "jit" / "tpc").write_text("echo 'no such workflow' >&2; false\n")
    plan, diags = check(path, DiskSources(), variables={"det": "TPC"}, services=site)
    assert plan is None
    assert "the DPL command failed (exit 1): no such workflow" in str(diags[0])
    # without --run-dpl (no runner), a command is an error, not run
    site = make_site(path, [])
    plan, diags = check(path, DiskSources(), services=site)
    assert plan is None and "DPL commands run only where the site allows it: add --run-dpl" in str(
        diags[0]
    )


# -- on a real control plane: the timeout of a basic task, task_hostname at launch --------


def test_a_basic_task_that_runs_past_its_timeout_is_ended(tmp_path: Path) -> None:
    from corral.control.environment import TransitionError  # noqa: F401
    from corral.store.files import DiskSources
    from corral.templates import expand
    from tests.control.harness import Harness, run
    from tests.fake_tasks import alive

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sleeper.yaml").write_text(
        "name: sleeper\ncommand: {value: /bin/sleep, arguments: ['3600']}\n"
    )
    (tmp_path / "tasks" / "host.yaml").write_text(
        "name: host\ncommand:\n  value: /bin/sh\n"
        "  arguments: ['-c', 'echo \"$0\" > {{ out }}; exec sleep 3600', '{{ task_hostname }}']\n"
    )
    (tmp_path / "wf.yaml").write_text(
        textwrap.dedent(
            """
            name: wf
            roles:
              - name: once
                task: {load: sleeper, timeout: 1s, critical: false}
              - name: long
                task: {load: sleeper, timeout: 1h}
              - name: host
                task: {load: host}
            """
        )
    )
    out = tmp_path / "hostname"
    plan = expand(str(tmp_path / "wf.yaml"), DiskSources(), variables={"out": str(out)})

    async def body(h: Harness) -> None:
        env = h.create(plan)
        assert await env.transition("DEPLOY") == "DEPLOYED"
        once = env.by_path["wf.once"]
        await h.until(lambda: once.state == "ERROR")
        assert "ran longer than its timeout of 1 s" in (once.reason or ""), once.reason
        long = env.by_path["wf.long"]
        assert long.state == "STANDBY" and long.pid is not None and alive(long.pid)
        # task_hostname, placed after expansion, was filled in with the node's name
        await h.until(out.exists)
        await h.until(lambda: out.read_text().strip() != "")
        assert out.read_text().strip() == env.by_path["wf.host"].node
        await h.plane.destroy(env.id)

    run(tmp_path, body)


def test_the_timeout_crosses_the_wire_to_a_node_agent() -> None:
    from corral.backends.wire import decode_launches, encode_launches
    from corral.model.plan import Command
    from corral.ports.backend import Launch

    batch = [
        Launch("t1", "wf.a", Command("/bin/true"), "basic", timeout=40.0),
        Launch("t2", "wf.b", Command("/bin/true"), "basic"),
    ]
    back = decode_launches(json.loads(json.dumps(encode_launches(batch))))
    assert [x.timeout for x in back] == [40.0, None]


def test_a_recipe_keeps_what_the_site_answered() -> None:
    """A later control process expands the same plan again from the environment's
    recipe, even when the inventory changed or the DPL command can no longer run."""
    from corral.control import recipes
    from corral.templates.services import RecordingSite

    files = {
        "workflows/wf.yaml": textwrap.dedent(
            """
            name: wf
            roles:
              - name: host-{{ it }}
                for: {range: '["flp001","flp160"]', var: it}
                vars: {det: "{{ inventory.DetectorForHost(it) }}"}
                include: "{{ dpl.GenerateFromUri('tpc-raw') }}"
            """
        )
    }
    site = RecordingSite(Site(labels=SITE_LABELS, jit={"tpc-raw": json.dumps(DUMP)}.get))
    plan, diags = check("workflows/wf.yaml", DictSources(files), services=site)
    assert plan is not None, diags
    recipe = recipes.make("workflows/wf.yaml", files, {}, {}, "0", site.record)
    again, _ = recipes.replay(recipe)
    assert again is not None and again.to_dict() == plan.to_dict()
    assert len(again.tasks) == 6
    # a recipe without the answers (made before this version): said, not guessed
    bare = recipes.make("workflows/wf.yaml", files, {}, {}, "0")
    none, why = recipes.replay(bare)
    assert none is None and "recipe has no answer" in str(why[0])


def test_a_variable_holding_a_callers_value_keeps_only_that_part_marked() -> None:
    """ALICE's shell-command class: ``value: {{ shell_command }}`` where shell_command
    holds an iterator's host. Only the host is read from a variable; the rest of the
    command stays the template's shell code (it was all one variable reference before)."""
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: host-{{ it }}
                for: {range: "{{ hosts }}", var: it}
                roles:
                  - name: c
                    vars:
                      shell_command: "cd /tmp && O2_ROLE={{ it }} exec true"
                    task: {load: sc, trigger: before_DEPLOY}
            """,
        "tasks/sc.yaml": """
            name: sc
            command:
              shell: true
              value: >-
                {{ shell_command }}
            """,
    }
    plan = expand_text(files, variables={"hosts": '["flp1"]'})
    c = plan.tasks[0].command
    assert c.value == 'cd /tmp && O2_ROLE="${CORRAL_VALUE_1}" exec true'
    assert c.env == (("CORRAL_VALUE_1", "flp1"),)


def test_a_choice_between_variables_keeps_the_chosen_ones_marks() -> None:
    """ALICE's stfsender class: ``{{ len(modulepath) > 0 ? _module : _plain }}`` where
    _plain holds a caller's install path. The result is _plain as read: the command
    stays the template's, with only the path read from a variable."""
    files = {
        "wf.yaml": "name: wf\nroles: [{name: r, task: {load: s}}]\n",
        "tasks/s.yaml": """
            name: s
            defaults:
              modulepath: ""
              _module: "module load X && X"
              _plain: "exec {{ prefix }}/bin/X --flag"
            command:
              shell: true
              value: "{{ len(modulepath) > 0 ? _module : _plain }}"
            """,
    }
    plan = expand_text(files, variables={"prefix": "/opt/o2 x; touch PWNED"})
    c = plan.tasks[0].command
    assert c.value == 'exec "${CORRAL_VALUE_1}"/bin/X --flag'
    assert c.env == (("CORRAL_VALUE_1", "/opt/o2 x; touch PWNED"),)


# -- on a real server: the configuration store, the runtime table, site defaults, bridges --


SERVER_WF = """\
name: site
defaults:
  run_type: PHYSICS
  rate: "10"
roles:
  - name: r
    vars:
      cfg: "{{ config.Get('readout/' + run_type + '/flp001/cfg') }}"
      where: "{{ config.Resolve('readout', run_type, 'flp001', 'cfg') }}"
      ltu: "{{ runtime.Get('trg/ltu', 'mode') }}"
      noted: "{{ runtime.Set('corral', 'last_site', site_name) }}"
    task: {load: show}
  - name: sor
    call: {func: "dcs.StartOfRun(1)", trigger: before_START_ACTIVITY, timeout: 30s}
"""
SHOW_CLASS = """\
name: show
command: {value: /bin/sleep, arguments: ["3600", "{{ cfg }}", "{{ where }}", "{{ ltu }}"]}
"""


def test_templates_read_the_store_and_the_site_on_a_server(tmp_path: Path) -> None:
    from tests.api.server import Server
    from tests.issues.test_issue12_config import tokens

    wf = tmp_path / "workflows"
    (wf / "tasks").mkdir(parents=True)
    (wf / "site.yaml").write_text(SERVER_WF)
    (wf / "tasks" / "show.yaml").write_text(SHOW_CLASS)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "site-defaults.yaml").write_text("site_name: point2\n")  # read by serve
    record = tmp_path / "calls"
    plugin = tmp_path / "dcs-standin"
    plugin.write_text(f'#!/bin/sh\necho "$@" >> {record}\necho ok\n')
    plugin.chmod(0o755)
    args = ("--backend", "sim", "--workflows", str(wf), "--call-plugin", f"dcs={plugin}")
    with Server(data, *args) as s:
        t = tokens(s)
        with s.client(t["admin"]) as admin, s.client(t["viewer"]) as viewer:
            r = admin.put("/api/config/readout/ANY/any/cfg", json={"payload": "rate={{ rate }}"})
            assert r.status_code == 200, r.text
            r = admin.put("/api/runtime/trg/ltu/mode", json={"value": "global"})
            assert r.status_code == 200, r.text
            # a viewer's render reads the store (resolved through ANY/any, rendered with
            # the variables) and writes nothing
            r = viewer.post("/api/workflows/render", json={"workflow": "site"})
            assert r.status_code == 200, r.text
            [task] = r.json()["tasks"]
            assert task["command"]["arguments"] == [
                "3600", "rate=10", "readout/ANY/any/cfg", "global"
            ]  # fmt: skip
            assert admin.get("/api/runtime/corral/last_site").status_code == 404
            # a dry run writes nothing either
            r = admin.post("/api/environments", json={"workflow": "site", "dry_run": True})
            assert r.status_code == 200 and r.json()["dry_run"], r.text
            assert admin.get("/api/runtime/corral/last_site").status_code == 404
            # creating applies runtime.Set; the site default came from the data directory
            r = admin.post("/api/environments", json={"workflow": "site"})
            assert r.status_code == 201, r.text
            env_id = r.json()["id"]
            got = admin.get("/api/runtime/corral/last_site").json()
            assert got["value"] == "point2" and "admin" in got["writer"]
            for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
                r = admin.post(f"/api/environments/{env_id}/transitions", json={"event": event})
                assert r.status_code == 200, r.text
            # the bridge plugin ran for dcs.StartOfRun(1)
            assert record.read_text().split() == ["StartOfRun", "1"]
            assert admin.delete(f"/api/environments/{env_id}").status_code in (200, 202, 204)


def test_dpl_raw_channels_meet_the_including_workflow_by_global_alias() -> None:
    """DPL's proxies declare raw channels (``--channel-config``): bound ones get the
    global alias NAME-{{ it }}, connected ones target ::NAME-{{ it }}, as O2 writes them
    for AliECS, so the FLP's StfBuilder and StfSender meet them."""
    proxy_in = '--channel-config "name=readout-proxy,type=pull,method=connect,address=ipc://x"'
    proxy_out = (
        '--channel-config "name=downstream,type=push,method=bind,address=ipc:///tmp/p,'
        'transport=shmem,rateLogging=10"'
    )
    dump = {
        "workflow": [
            {"name": "readout-proxy", "outputs": [{"origin": "TPC", "description": "RAW"}]},
            {"name": "output-proxy", "inputs": [{"origin": "TPC", "description": "RAW"}]},
        ],
        "metadata": [
            {"name": "readout-proxy", "executable": "o2-dpl-raw-proxy",
             "cmdLineArgs": ["-b", "--readout-proxy", proxy_in]},
            {"name": "output-proxy", "executable": "o2-dpl-output-proxy",
             "cmdLineArgs": ["--dpl-output-proxy", proxy_out]},
        ],
    }  # fmt: skip
    files = {
        "workflows/wf.yaml": """
            name: wf
            roles:
              - name: host-{{ it }}
                for: {range: '["flp1","flp2"]', var: it}
                roles:
                  - name: stfb
                    bind: [{name: dpl-chan, type: push, addressing: ipc,
                            global: "readout-proxy-{{ it }}"}]
                    task: {load: t}
                  - name: stfs
                    connect: [{name: downstream, type: pull, target: "::downstream-{{ it }}"}]
                    task: {load: t}
                  - name: dpl
                    include: "{{ dpl.GenerateFromUri('flp') }}"
            """,
        "tasks/t.yaml": "name: t\ncontrol: {mode: direct}\ncommand: {value: /bin/true}\n",
    }
    site = Site(jit={"flp": json.dumps(dump)}.get)
    plan = expand_text(files, root="workflows/wf.yaml", services=site)
    links = {(c.task, c.name, c.bind_task) for c in plan.connects}
    for h in ("flp1", "flp2"):
        assert (f"wf.host-{h}.dpl.readout-proxy", "readout-proxy", f"wf.host-{h}.stfb") in links
        assert (f"wf.host-{h}.stfs", "downstream", f"wf.host-{h}.dpl.output-proxy") in links
    out = {b.task: b for b in plan.binds if b.name == "downstream"}
    assert out["wf.host-flp1.dpl.output-proxy"].transport == "shmem"


def test_every_field_of_a_public_variable_is_kept_in_role_defaults() -> None:
    files = {
        "wf.yaml": """
            name: !public wf
            description: !public "a workflow"
            roles:
              - name: r
                defaults:
                  extra_env: !public
                    value: ""
                    type: string
                    label: "Extra ENV variables"
                    description: "exported before the script"
                    widget: editBox
                    panel: EPNs_Workflows
                    index: 3
                    rows: 35
                    visibleif: $$epn_enabled === "true"
                task: {load: t}
            """,
        "tasks/t.yaml": "name: t\ncommand: {value: /bin/true}\n",
    }
    plan = expand_text(files)
    [p] = [p.to_dict() for p in plan.public if p.name == "extra_env"]
    assert p == {
        "name": "extra_env", "value": "", "type": "string", "label": "Extra ENV variables",
        "description": "exported before the script", "widget": "editBox", "values": [],
        "panel": "EPNs_Workflows", "index": 3, "visibleif": '$$epn_enabled === "true"',
        "rows": 35,
    }  # fmt: skip


def test_an_error_a_site_function_answers_is_a_warning_with_its_place() -> None:
    """As in AliECS the expansion goes on with {"error":...} as the value; the plan says
    where it happened, so that validate, render and create show it."""
    files = {
        "wf.yaml": """
            name: wf
            roles:
              - name: host-{{ it }}
                for: {range: '["flp001","flp009","flp010"]', var: it}
                vars: {det: "{{ inventory.DetectorForHost(it) }}"}
                task: {load: t}
            """,
        "tasks/t.yaml": "name: t\ncommand: {value: /bin/true, arguments: ['{{ det }}']}\n",
    }
    plan = expand_text(files, services=Site(SITE_LABELS))
    assert [t.command.arguments[0] for t in plan.tasks] == [
        "TPC",
        '{"error":"detector not found for host flp009"}',
        '{"error":"detector not found for host flp010"}',
    ]
    assert plan.warnings == (
        "wf.yaml:5:21: inventory.DetectorForHost('flp009') answered "
        '{"error":"detector not found for host flp009"} (wf.host-{{ it }} [it=flp009])',
        "wf.yaml:5:21: inventory.DetectorForHost('flp010') answered "
        '{"error":"detector not found for host flp010"} (wf.host-{{ it }} [it=flp010])',
    )
    assert plan.to_dict()["warnings"] == list(plan.warnings)


def test_an_entry_that_reads_one_below_it_is_told_the_order() -> None:
    errors = errors_of(
        {
            "wf.yaml": """
                name: wf
                defaults:
                  bin: "{{ base }}/bin"
                  base: /opt
                roles: [{name: r, task: {load: t}}]
                """,
            "tasks/t.yaml": "name: t\ncommand: {value: /bin/true}\n",
        }
    )
    assert any("'base' is set below, at line 4: an entry of a defaults block reads only "
               "the entries above it" in e for e in errors)  # fmt: skip


def test_a_task_class_anywhere_is_checked_and_never_rendered(tmp_path: Path) -> None:
    loose = tmp_path / "worker.yaml"
    loose.write_text("name: worker\ncontrol: {mode: fairmq}\ncommand: {value: '{{ exe }}'}\n")
    r = corral("template", "validate", str(loose))
    assert r.returncode == 0 and "a task class" in r.stderr, r.stderr
    loose.write_text("name: worker\ncontrol: {mode: fairmqq}\ncommand: {value: x}\n")
    r = corral("template", "validate", str(loose))
    assert r.returncode == 1 and f"{loose}:2:" in r.stderr and "fairmqq" in r.stderr
    r = corral("template", "render", str(loose))
    assert r.returncode == 1 and "is a task class, not a workflow" in r.stderr


def test_template_commands_read_a_data_directorys_store(tmp_path: Path) -> None:
    from corral.store.sqlite import SqliteStore

    data = tmp_path / "data"
    store = SqliteStore(str(data / "corral.db"))
    store.config_put("readout/ANY/any/cfg", "rate={{ rate }}", "admin", 1.0)
    store.runtime_set("trg", "mode", "global", "admin", 1.0)
    store.close()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(
        "name: t\ncommand: {value: /bin/true, arguments: ['{{ cfg }}', '{{ mode }}']}\n"
    )
    (tmp_path / "wf.yaml").write_text(
        textwrap.dedent(
            """
            name: wf
            defaults: {rate: "5"}
            roles:
              - name: r
                vars:
                  cfg: "{{ config.Get('readout/PHYSICS/flp1/cfg') }}"
                  mode: "{{ runtime.Get('trg', 'mode') }}"
                task: {load: t}
            """
        )
    )
    wf = str(tmp_path / "wf.yaml")
    r = corral("template", "render", wf, "--data", str(data), "-o", "json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["tasks"][0]["command"]["arguments"] == ["rate=5", "global"]
    assert plan["warnings"] == []
    # without the store: the AliECS error value, and a warning that says where
    r = corral("template", "validate", wf)
    assert r.returncode == 0
    assert (
        "warning: " in r.stderr
        and "wf.yaml:7:" in r.stderr
        and "no configuration store" in r.stderr
    )
    r = corral("template", "validate", wf, "--data", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no store there" in r.stderr


# -- what an attacker tried (issue 12 review) ----------------------------------------------


def test_a_raw_channels_type_is_data_never_template_code() -> None:
    evil = '--channel-config "name=a,method=bind,type={{ strings.ToUpper(workflow_dir) }}"'
    dump = {
        "workflow": [{"name": "p"}],
        "metadata": [{"name": "p", "executable": "x", "cmdLineArgs": [evil]}],
    }
    files, site = dpl_files({"evil": json.dumps(dump)})
    errors = errors_of(files, root="workflows/wf.yaml", variables={"dpl_workflow": "evil"},
                       services=site)  # fmt: skip
    assert len(errors) == 1 and "is not one of push, pull, pub, sub" in errors[0], errors
    assert "WORKFLOW" not in errors[0]  # nothing was evaluated


def test_a_description_whose_routes_grow_as_devices_squared_is_refused() -> None:
    n = 2000  # every device consumes what every other produces: n * (n - 1) channels
    dump = {
        "workflow": [
            {"name": f"d{i}", "inputs": [{"origin": "A", "description": "B"}],
             "outputs": [{"origin": "A", "description": "B", "subspec": 0}]}
            for i in range(n)
        ],
        "metadata": [{"name": f"d{i}", "executable": "x"} for i in range(n)],
    }  # fmt: skip
    files, site = dpl_files({"quad": json.dumps(dump)})
    errors = errors_of(files, root="workflows/wf.yaml", variables={"dpl_workflow": "quad"},
                       services=site)  # fmt: skip
    assert "makes more than 50000 channels" in errors[0]


def test_what_a_dpl_command_prints_is_read_within_its_bound(tmp_path: Path) -> None:
    import tracemalloc

    from corral.templates.dpl import MAX_DUMP
    from corral.templates.services import ServiceError

    runner = DplRunner(str(tmp_path))
    tracemalloc.start()
    try:
        with pytest.raises(ServiceError, match=f"printed more than {MAX_DUMP} bytes"):
            runner("head -c 200000000 /dev/zero; yes err >&2 | head -c 50000000 #", {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_DUMP, peak


def test_a_calls_output_is_read_within_its_cap() -> None:
    import asyncio
    import tracemalloc

    from corral.calls import CallContext
    from corral.calls.builtin import OUTPUT_CAP, ExecPlugin

    ctx = CallContext("env", "CONFIGURE", "before_CONFIGURE", "wf.c", "exec.Shell", None, {})
    tracemalloc.start()
    try:
        out = asyncio.run(
            ExecPlugin({}).call("Shell", ("yes xxxxxxxx | tr -d '\\n' | head -c 200000000",), ctx)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == "x" * OUTPUT_CAP
    assert peak < 16 * OUTPUT_CAP + (1 << 20), peak


def test_a_config_render_counts_the_items_filters_walk() -> None:
    import time

    from corral.templates.configpayload import RenderError, render

    payload = "{{ ('a' * 400000)" + "|select('ne', 'b')" * 20 + "|list|length }}"
    with pytest.raises(RenderError, match="more than 1000000 steps"):
        render("k", {"k": payload}.get, {}, clock=time.monotonic, time_limit=60)


def test_deep_site_files_are_refused_not_crashed_on(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000)
    with pytest.raises(SiteError, match="nests too deep"):
        load_defaults(str(deep))
    r = corral("template", "validate", str(tmp_path / "x.yaml"), "--inventory", str(deep))
    assert r.returncode == 2 and "nest more than 64 deep" in r.stderr, r.stderr


def test_the_alice_examples_load() -> None:
    """examples/alice: the site defaults and the inventory docs/migration.md starts from
    (ALICE's templates themselves are checked by test_issue12_alice.py, with a checkout)."""
    from corral.store.inventory import load_inventory

    defaults = load_defaults(os.path.join(ROOT, "examples", "alice", "site-defaults.yaml"))
    assert {"consul_endpoint", "modulepath", "o2_install_path", "infologger_mode"} <= set(defaults)
    nodes = load_inventory(os.path.join(ROOT, "examples", "alice", "inventory.yaml"))
    site = make_site("wf.yaml", nodes)
    assert site.detector_for_host("alio2-cr1-flp160") == "ITS"
    assert site.cru_cards_for_host("alio2-cr1-flp001") == '["0228"]'
    assert site.endpoints_for_cru_card("alio2-cr1-flp001", "0228") == "0 1"
