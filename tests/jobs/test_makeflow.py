"""Makeflow files parsed into a DAG (issue 13, first increment: no running yet)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from corral.jobs import makeflow as mfmod
from corral.jobs.makeflow import MakeflowError, Resources, parse, to_makefile

CHUNKS = 16
PLOTS = ("pt", "eta", "phi", "tpc_dedx", "its_clusters", "tof_beta", "vertex_z", "mult")


def qa_makeflow() -> str:
    """A QA workflow as the QA cluster writes them: 50 rules, fan-out then fan-in."""
    lines = [
        "# Offline QA of one run: reconstruct chunks, QA each, merge, plot, report.",
        "RUN=245146",
        "QA=./qa.sh",
        "PERIOD=LHC15o",
        'TITLE="QA of $(PERIOD) run $(RUN)"',
        "export QA_RUN=$(RUN)",
        "export OCDB",
        "",
        "runlist.txt:",
        "\tLOCAL echo $(RUN) > runlist.txt",
        "",
        ".MAKEFLOW CATEGORY calib",
        ".MAKEFLOW CORES 1",
        "calib.root: runlist.txt $(QA)",
        "\t$(QA) calib runlist.txt calib.root",
        "",
        "CATEGORY=reco",
        "CORES=4",
        "MEMORY=2000",
        "DISK=8000",
    ]
    for i in range(CHUNKS):
        c = f"{i:02d}"
        lines += [
            f"reco.{c}.root reco.{c}.log: raw/{c}.raw calib.root $(QA)",
            f"\t$(QA) reco raw/{c}.raw calib.root reco.{c}.root > reco.{c}.log 2>&1",
        ]
    lines += ["", "CATEGORY=qa", "CORES=1", "MEMORY=500"]
    for i in range(CHUNKS):
        c = f"{i:02d}"
        lines += [f"qa.{c}.root: reco.{c}.root $(QA)", f"\t$(QA) qa reco.{c}.root qa.{c}.root"]
    lines += ["", "CATEGORY=merge", "MEMORY=4000"]
    for g in range(4):
        parts = " ".join(f"qa.{4 * g + k:02d}.root" for k in range(4))
        lines += [
            f"merged.{g}.root: {parts}",
            f"\thadd -f merged.{g}.root {parts}",
        ]
    lines += [
        "MERGED=merged.0.root merged.1.root",
        "MERGED+=merged.2.root merged.3.root",
        "QA.root: $(MERGED)",
        "\thadd -f QA.root $(MERGED)",
        "",
        "CATEGORY=plots",
    ]
    for name in PLOTS:
        lines += [
            f"plots/{name}.png: QA.root plot.C",
            f"\tLOCAL root -b -q 'plot.C(\"{name}\")' && test -s plots/{name}.png",
        ]
    pngs = " ".join(f"plots/{name}.png" for name in PLOTS)
    lines += [
        f"report.html: {pngs} \\",
        "    report.py",
        "\tLOCAL python3 report.py --title $(TITLE) \\",
        f"\t    -o report.html {pngs}",
        "summary.txt: QA.root",
        "\troot -b -q 'summary.C' | awk '{print $1, $2}' > summary.txt  # per-detector",
        "checks.log: QA.root",
        "@MEMORY=100",
        "\tLOCAL ./checks.sh QA.root > checks.log",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the QA flow


def test_qa_makeflow_parses_to_the_expected_dag() -> None:
    mf = parse(qa_makeflow(), "qa.makeflow", environ={"OCDB": "alien://ocdb"})
    assert len(mf.rules) == 50
    by_target = {t: i for i, r in enumerate(mf.rules) for t in r.targets}

    runlist = mf.rules[by_target["runlist.txt"]]
    assert runlist.local and runlist.command == "echo 245146 > runlist.txt"
    assert runlist.line == 9 and runlist.category == "default"
    assert runlist.env == (("QA_RUN", "245146"), ("OCDB", "alien://ocdb"))

    calib = mf.rules[by_target["calib.root"]]
    assert calib.category == "calib" and calib.resources == Resources(cores=1)
    assert calib.sources == ("runlist.txt", "./qa.sh")

    reco = mf.rules[by_target["reco.07.root"]]
    assert reco is mf.rules[by_target["reco.07.log"]]
    assert reco.targets == ("reco.07.root", "reco.07.log")
    assert reco.category == "reco"
    assert reco.resources == Resources(cores=4, memory_mb=2000, disk_mb=8000)
    assert reco.command == ("./qa.sh reco raw/07.raw calib.root reco.07.root > reco.07.log 2>&1")
    assert mf.deps[by_target["reco.07.root"]] == (by_target["calib.root"],)

    # Category scoping: DISK set under reco does not leak into qa.
    qa = mf.rules[by_target["qa.03.root"]]
    assert qa.resources == Resources(cores=1, memory_mb=500)
    assert mf.deps[by_target["qa.03.root"]] == (by_target["reco.03.root"],)

    # Fan-in: each merge takes four QA outputs, the final merge takes the four merges.
    merge1 = by_target["merged.1.root"]
    assert mf.deps[merge1] == tuple(sorted(by_target[f"qa.{k:02d}.root"] for k in range(4, 8)))
    final = mf.rules[by_target["QA.root"]]
    assert final.sources == tuple(f"merged.{g}.root" for g in range(4))
    assert (
        final.command == "hadd -f QA.root merged.0.root merged.1.root merged.2.root merged.3.root"
    )
    assert final.resources.memory_mb == 4000 and final.resources.cores is None

    # Fan-out: eight plots from QA.root, LOCAL, single quotes kept verbatim.
    pt = mf.rules[by_target["plots/pt.png"]]
    assert pt.local and pt.command == "root -b -q 'plot.C(\"pt\")' && test -s plots/pt.png"
    assert mf.deps[by_target["plots/pt.png"]] == (by_target["QA.root"],)

    report = mf.rules[by_target["report.html"]]
    header = next(
        n for n, line in enumerate(qa_makeflow().splitlines(), 1) if line.startswith("report.html:")
    )
    assert report.local and report.line == header
    assert report.sources[-1] == "report.py" and len(report.sources) == 9
    assert report.command.startswith('python3 report.py --title "QA of LHC15o run 245146"')
    assert mf.deps[by_target["report.html"]] == tuple(
        sorted(by_target[f"plots/{p}.png"] for p in PLOTS)
    )
    summary = mf.rules[by_target["summary.txt"]]
    assert summary.command == "root -b -q 'summary.C' | awk '{print $1, $2}' > summary.txt"
    checks = mf.rules[by_target["checks.log"]]
    assert checks.resources.memory_mb == 100  # @MEMORY: this rule only
    assert checks.category == "plots"

    assert mf.inputs == tuple(
        sorted(["./qa.sh", "plot.C", "report.py", *(f"raw/{i:02d}.raw" for i in range(CHUNKS))])
    )
    assert set(mf.outputs) == {
        "report.html",
        "summary.txt",
        "checks.log",
        *(f"reco.{i:02d}.log" for i in range(CHUNKS)),
    }
    assert mf.variables["RUN"] == "245146"
    assert mf.variables["TITLE"] == '"QA of LHC15o run 245146"'
    assert mf.exports == ("QA_RUN", "OCDB")
    assert mf.producer("QA.root") == by_target["QA.root"] and mf.producer("plot.C") is None

    order = mf.order()
    assert sorted(order) == list(range(50))
    seen: set[int] = set()
    for i in order:
        assert set(mf.deps[i]) <= seen
        seen.add(i)


def _make_n(makefile: str, tmp_path: os.PathLike[str], *inputs: str) -> list[str]:
    for name in inputs:
        path = os.path.join(tmp_path, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("x\n")
    with open(os.path.join(tmp_path, "Makefile"), "w") as f:
        f.write(makefile)
    out = subprocess.run(
        ["make", "-n", "-f", "Makefile"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.splitlines()


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


@needs_make
def test_to_makefile_lists_the_same_commands_under_make_n(tmp_path: os.PathLike[str]) -> None:
    mf = parse(qa_makeflow(), "qa.makeflow", environ={"OCDB": "alien://ocdb"})
    listed = _make_n(to_makefile(mf), tmp_path, *mf.inputs)
    # Each rule's command exactly once, grouped targets included, in a valid order.
    assert sorted(listed) == sorted(r.command for r in mf.rules)
    position = {cmd: k for k, cmd in enumerate(listed)}
    for i, r in enumerate(mf.rules):
        for d in mf.deps[i]:
            assert position[mf.rules[d].command] < position[r.command]


@needs_make
def test_to_makefile_runs_under_make_j_with_exports(tmp_path: os.PathLike[str]) -> None:
    text = (
        "export GREETING=hello $(WHO)\n"
        "WHO=world\n"  # defined after: the export already took its value
        "a.txt: in.txt\n"
        "\tcat in.txt > a.txt; echo 'a $' >> a.txt\n"
        "b.txt c.txt: in.txt\n"
        "\tsh -c 'echo $GREETING' > b.txt; echo c > c.txt\n"
        "d.txt: a.txt b.txt c.txt\n"
        "\tcat a.txt b.txt c.txt > d.txt\n"
    )
    mf = parse(text, "t.makeflow", environ={"WHO": "you"})
    with open(os.path.join(tmp_path, "in.txt"), "w") as f:
        f.write("in\n")
    with open(os.path.join(tmp_path, "Makefile"), "w") as f:
        f.write(to_makefile(mf))
    subprocess.run(["make", "-j4"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    with open(os.path.join(tmp_path, "d.txt")) as f:
        assert f.read() == "in\na $\nhello you\nc\n"


def test_to_makefile_refuses_what_make_cannot_say() -> None:
    mf = parse("c->out: a->in\n\tprog in > out\n", "r.makeflow")
    with pytest.raises(ValueError, match="remote names"):
        to_makefile(mf)
    mf = parse("a%b:\n\ttouch a%b\n", "p.makeflow")
    with pytest.raises(ValueError, match="cannot be written"):
        to_makefile(mf)


# ---------------------------------------------------------------- language details


def test_variables_expand_when_assigned_and_append() -> None:
    text = (
        "A=1\n"
        "B=$(A) ${A} $A\n"
        "A=2\n"
        "B+=$(A)\n"
        "C = spaced   # comment\n"
        "out: \n"
        "\techo $(B) '$(A)' \"$(A)\" $(C)\n"
    )
    mf = parse(text, "v.makeflow")
    assert mf.variables["B"] == "1 1 1 2"
    assert mf.variables["C"] == "spaced"
    assert mf.rules[0].command == "echo 1 1 1 2 '$(A)' \"2\" spaced"
    assert mf.rules[0].sources == ()


def test_environment_fills_undefined_variables_and_resources() -> None:
    text = "CATEGORY=a\nCORES=2\nx:\n\techo $(HOME)\nCATEGORY=b\ny:\n\techo\n"
    mf = parse(text, "e.makeflow", environ={"HOME": "/home/qa", "MEMORY": "800", "CORES": "9"})
    assert mf.rules[0].command == "echo /home/qa"
    assert mf.rules[0].resources == Resources(cores=2, memory_mb=800)
    assert mf.rules[1].resources == Resources(cores=9, memory_mb=800)
    assert mf.rules[1].category == "b"


def test_batch_local_and_remote_names() -> None:
    text = (
        "BATCH_LOCAL=true\n"
        "b: a myprog\n\tmyprog a > b\n"
        "c->out: a->in1 b myprog->prog\n\tprog in1 b > out\n"
    )
    mf = parse(text, "l.makeflow")
    assert mf.rules[0].local
    assert mf.rules[1].targets == ("c",)
    assert mf.rules[1].sources == ("a", "b", "myprog")
    assert mf.rules[1].remote_names == (("c", "out"), ("a", "in1"), ("myprog", "prog"))
    assert mf.deps == ((), (0,))


def test_rule_local_variables_do_not_leak() -> None:
    text = "X=global\na:\nX=mine\n.MAKEFLOW CATEGORY special\n\techo $(X)\nb:\n\techo $(X)\n"
    mf = parse(text, "r.makeflow")
    assert [r.command for r in mf.rules] == ["echo mine", "echo global"]
    assert [r.category for r in mf.rules] == ["special", "default"]


# ---------------------------------------------------------------- errors


def test_all_errors_of_a_file_are_reported_with_their_lines() -> None:
    text = "\n".join(
        [
            "a.out: b.out",  # 1  cycle a.out -> b.out -> a.out
            "\tmake-a",
            "b.out: a.out",  # 3
            "\tmake-b",
            "c.out: $(NOPE)",  # 5  undefined
            "\techo",
            "d.out:",  # 7  no command
            "e.out:",  # 8
            "\tone",
            "\ttwo",  # 10 second command
            "a.out:",  # 11 a.out made twice
            "\tagain",
            ".SIZE a.out 10",  # 13
            "f.out:",  # 14
            "\tMAKEFLOW sub.makeflow",  # 15
            "g.out:",
            "\techo a\\ b",  # 17 backslash
            "h.out:",
            "\techo $$HOME",  # 19 stray $
            "CORES=four",  # 20
            "what is this",  # 21
            "i.out: i.out",  # 22 self cycle
            "\tloop",
            "",
        ]
    )
    with pytest.raises(MakeflowError) as info:
        parse(text, "bad.makeflow")
    err = info.value
    got = [(p.line, p.message) for p in err.problems]
    lines = [line for line, _ in got]
    assert lines == sorted(lines)
    assert set(lines) == {1, 5, 7, 10, 11, 13, 15, 17, 19, 20, 21, 22}
    messages = dict(got)
    assert messages[1] == "cycle: a.out -> b.out -> a.out"
    assert messages[22] == "cycle: i.out -> i.out"
    assert "NOPE is not defined" in messages[5]
    assert messages[7] == "rule has no command"
    assert "line 8 already has a command" in messages[10]
    assert "already made by the rule at line 1" in messages[11]
    assert ".SIZE" in messages[13]
    assert "nested makeflows" in messages[15]
    assert "backslash" in messages[17]
    assert "stray '$'" in messages[19]
    assert "CORES must be a whole number" in messages[20]
    assert "unrecognized line" in messages[21]
    assert (err.path, err.line) == ("bad.makeflow", 1)
    assert str(err).splitlines()[0] == "bad.makeflow:1: cycle: a.out -> b.out -> a.out"
    assert len(str(err).splitlines()) == len(got)


def test_longer_cycle_is_named_in_order() -> None:
    text = "a: b\n\tx\nb: c\n\tx\nc: a\n\tx\n"
    with pytest.raises(MakeflowError, match=r"cycle: b -> c -> a -> b|cycle: a -> b -> c -> a"):
        parse(text, "c.makeflow")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("\techo\n", 1, "command line outside a rule"),
        ("a: b\n\techo 'unterminated\n", 2, "missing closing '"),
        ('a:\n\techo "it\'s"\n', 2, "single quote inside double quotes"),
        ("a: 'b c'\n\techo\n", 1, "quoted file names"),
        (": b\n\techo\n", 1, "no targets"),
        ("a:\n\tLOCAL\n", 2, "empty command"),
        ("A?=1\n", 1, "bad variable name"),
        ("export X=1\na:\n\techo\nexport Y\n", 4, "export after the first rule"),
        (".MAKEFLOW MODE FIXED\n", 1, ".MAKEFLOW MODE is not supported"),
        ("a:\n\t.MAKEFLOW CORES 2\n\techo\n", 2, "write a rule's own variables"),
        ("a: x->\n\techo\n", 1, "bad remote name"),
    ],
)
def test_single_errors(text: str, line: int, fragment: str) -> None:
    with pytest.raises(MakeflowError) as info:
        parse(text, "one.makeflow")
    assert info.value.line == line, info.value
    assert fragment in info.value.message


# ---------------------------------------------------------------- hostile input


def test_self_reference_is_an_error_not_a_hang() -> None:
    with pytest.raises(MakeflowError, match="A is not defined"):
        parse("A=$(A)\n", "self.makeflow")


def test_doubling_variable_is_bounded() -> None:
    text = "A=x\n" + "A=$(A)$(A)\n" * 40 + "out:\n\techo $(A)\n"
    start = time.perf_counter()
    with pytest.raises(MakeflowError) as info:
        parse(text, "double.makeflow")
    assert time.perf_counter() - start < 5
    first = info.value.problems[0]
    assert first.line == 22  # 2**21 > 1 MiB: the 21st doubling fails
    assert "longer than" in first.message
    assert len(info.value.problems) <= mfmod.MAX_ERRORS + 1


def test_huge_line_and_file_are_refused() -> None:
    text = "A=1\n" + "B=" + "x" * (mfmod.MAX_LINE_CHARS + 1) + "\nout:\n\techo\n"
    with pytest.raises(MakeflowError) as info:
        parse(text, "long.makeflow")
    assert [(p.line, p.message) for p in info.value.problems] == [
        (2, f"line longer than {mfmod.MAX_LINE_CHARS} characters")
    ]
    # Continuations count toward the logical line.
    text = "a: \\\n" + ("b \\\n" * (mfmod.MAX_LINE_CHARS // 3)) + "c\n\techo\n"
    with pytest.raises(MakeflowError, match="line longer than"):
        parse(text, "cont.makeflow")
    with pytest.raises(MakeflowError, match="file larger than"):
        parse("#" * (mfmod.MAX_FILE_CHARS + 1), "big.makeflow")


def test_error_flood_stops() -> None:
    with pytest.raises(MakeflowError) as info:
        parse("nonsense\n" * 10_000, "flood.makeflow")
    assert len(info.value.problems) == mfmod.MAX_ERRORS + 1
    assert "stopping" in info.value.problems[-1].message


def test_too_many_rules_are_refused() -> None:
    text = "".join(f"o{i}:\n\tx\n" for i in range(mfmod.MAX_RULES + 1))
    with pytest.raises(MakeflowError, match="more than 100000 rules"):
        parse(text, "many.makeflow")


def test_100k_rule_chain_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """A 100,000-step chain: no recursion limit, time printed (not asserted)."""
    n = mfmod.MAX_RULES
    text = "CORES=1\nin0:\n\ttouch in0\n" + "".join(
        f"in{i}: in{i - 1}\n\tcp in{i - 1} in{i}\n" for i in range(1, n)
    )
    start = time.perf_counter()
    mf = parse(text, "chain.makeflow")
    elapsed = time.perf_counter() - start
    assert len(mf.rules) == n and mf.deps[-1] == (n - 2,)
    assert mf.outputs == (f"in{n - 1}",) and mf.inputs == ()
    start = time.perf_counter()
    order = mf.order()
    assert order[:3] == (0, 1, 2)
    with capsys.disabled():
        print(
            f"\nmakeflow: parsed {n} rules in {elapsed:.2f}s, ordered in "
            f"{time.perf_counter() - start:.2f}s"
        )


def test_docs_example_parses() -> None:
    import re

    from tests.conftest import ROOT

    with open(os.path.join(ROOT, "docs", "makeflow.md"), encoding="utf-8") as f:
        (block,) = re.findall(r"```make\n(.*?)```", f.read(), re.S)
    mf = parse(block, "docs/makeflow.md")
    assert [r.targets[0] for r in mf.rules] == ["reco.00.root", "qa.00.root", "report.html"]
    assert mf.rules[2].local and mf.rules[2].resources == Resources(cores=1, memory_mb=100)
    words = ["python3", "report.py", "-o", "report.html", "qa.00.root"]
    assert mf.rules[2].command.split() == words


def test_all_commands_together_are_bounded() -> None:
    # each rule's command is under the 1 MiB bound, but together they would not fit
    text = "V=" + "x" * (512 * 1024) + "\n" + "".join(
        f"o{i}:\n\techo $(V) > o{i}\n" for i in range(140))  # fmt: skip
    with pytest.raises(MakeflowError) as e:
        parse(text, "big.makeflow")
    assert "commands expand to more than 67108864 characters together" in str(e.value)
