"""``corral flow run`` and ``corral job run``: the real CLI, real processes.

A Makeflow file of 50 rules (fan-out, chains, multi-target rules, fan-in, variables,
categories, exports) runs unchanged and makes the same files, byte for byte, as GNU
make -j on the same rules; a failed run resumes without running again what finished.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.jobs.makeflow import parse, to_makefile

CORRAL = [sys.executable, "-m", "corral"]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def fifty_rules() -> str:
    """50 rules: 1 seed, 10 chunks (fan-out), 10 squares, 10 two-target rules, 10
    pair sums, 5 merges of pairs, 3 merges, and the final fan-in."""
    lines = [
        "# a QA-like flow: split, process per chunk, merge",
        "PREFIX=run",
        'export QA_LABEL=qa-"check"',
        "CATEGORY=split",
        "CORES=1",
        "seeds.txt:",
        "\tseq 101 110 > seeds.txt",
    ]
    for i in range(1, 11):
        lines += [
            f"$(PREFIX)_chunk{i}.txt: seeds.txt",
            f"\tsed -n '{i}p' seeds.txt > $(PREFIX)_chunk{i}.txt",
        ]
    lines += ["CATEGORY=process", "MEMORY=10"]
    for i in range(1, 11):
        lines += [f"sq{i}.txt: $(PREFIX)_chunk{i}.txt",
                  f"\tawk '{{print $1*$1}}' $(PREFIX)_chunk{i}.txt > sq{i}.txt"]  # fmt: skip
    for i in range(1, 11):
        lines += [
            f"cube{i}.txt hdr{i}.txt: sq{i}.txt $(PREFIX)_chunk{i}.txt",
            f"\tawk '{{print $1*$1*$1}}' $(PREFIX)_chunk{i}.txt > cube{i}.txt && "
            f'echo "$QA_LABEL {i}" > hdr{i}.txt',
        ]
    for i in range(1, 11):
        lines += [f"sum{i}.txt: sq{i}.txt cube{i}.txt hdr{i}.txt",
                  f"\tcat hdr{i}.txt sq{i}.txt cube{i}.txt > sum{i}.txt"]  # fmt: skip
    for k in range(1, 6):
        a, b = 2 * k - 1, 2 * k
        lines += [f"pair{k}.txt: sum{a}.txt sum{b}.txt",
                  f"\tcat sum{a}.txt sum{b}.txt | sort > pair{k}.txt"]  # fmt: skip
    lines += [
        "CATEGORY=merge",
        "m1.txt: pair1.txt pair2.txt",
        "\tcat pair1.txt pair2.txt > m1.txt",
        "m2.txt: pair3.txt pair4.txt",
        "\tcat pair3.txt pair4.txt > m2.txt",
        "m3.txt: pair5.txt",
        "\twc -l pair5.txt > m3.txt",
        "final.txt: m1.txt m2.txt m3.txt",
        "\tcat m1.txt m2.txt m3.txt | sha256sum > final.txt",
    ]
    return "\n".join(lines) + "\n"


def corral(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([*CORRAL, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@needs_make
def test_fifty_rules_make_the_same_files_as_make(tmp_path: Path) -> None:
    text = fifty_rules()
    mf = parse(text, "qa.makeflow")
    assert len(mf.rules) == 50
    ours, theirs = tmp_path / "corral", tmp_path / "make"
    ours.mkdir()
    theirs.mkdir()
    (ours / "qa.makeflow").write_text(text)
    (theirs / "Makefile").write_text(to_makefile(mf))
    made = subprocess.run(["make", "-j4"], cwd=theirs, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert made.returncode == 0, made.stderr
    p = corral("flow", "run", "qa.makeflow", "--data", str(tmp_path / "data"), cwd=ours)
    assert p.returncode == 0, p.stderr
    assert "SUCCEEDED: 50 succeeded" in p.stdout
    files = sorted(f for f in os.listdir(theirs) if f != "Makefile")
    assert files == sorted(f for f in os.listdir(ours) if f != "qa.makeflow")
    assert len(files) == 60  # 50 rules, 10 of them with two targets
    _, mismatch, errors = filecmp.cmpfiles(ours, theirs, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    assert (ours / "hdr3.txt").read_text() == "qa-check 3\n"  # the export reached it (unquoted)


def test_a_failed_flow_resumes_without_rerunning_finished_steps(tmp_path: Path) -> None:
    (tmp_path / "f.makeflow").write_text(
        "a.txt:\n\techo a >> ran; echo A > a.txt\n"
        "b.txt: a.txt\n\techo b >> ran; test -e go && cp a.txt b.txt\n"
        "c.txt: a.txt\n\techo c >> ran; cp a.txt c.txt\n"
        "d.txt: b.txt c.txt\n\techo d >> ran; cat b.txt c.txt > d.txt\n"
    )
    data = str(tmp_path / "data")
    p = corral("flow", "run", "f.makeflow", "--data", data, cwd=tmp_path)
    assert p.returncode == 1
    assert "failed: b.txt@3: process" in p.stderr and "exited with status 1" in p.stderr
    assert "(log: " in p.stderr
    first = (tmp_path / "ran").read_text().split()
    assert sorted(first) in (["a", "b"], ["a", "b", "c"]) and "d" not in first
    st = corral("flow", "status", "f.makeflow", "--data", data, cwd=tmp_path)
    assert st.returncode == 0 and "FAILED" in st.stdout and "step 1 FAILED" in st.stdout
    (tmp_path / "go").touch()
    (tmp_path / "ran").write_text("")
    p = corral("flow", "run", "f.makeflow", "--data", data, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stderr
    second = (tmp_path / "ran").read_text().split()
    assert "a" not in second and "b" in second and "d" in second
    assert ("c" in second) == ("c" not in first)
    assert (tmp_path / "d.txt").read_text() == "A\nA\n"
    # --fresh runs everything again
    (tmp_path / "ran").write_text("")
    p = corral("flow", "run", "f.makeflow", "--data", data, "--fresh", cwd=tmp_path)
    assert p.returncode == 0 and sorted((tmp_path / "ran").read_text().split()) == list("abcd")


def test_a_broken_makeflow_says_where(tmp_path: Path) -> None:
    (tmp_path / "bad.makeflow").write_text("a.txt: $(NOPE)\n\techo\nb.txt:\n")
    p = corral("flow", "run", "bad.makeflow", "--data", str(tmp_path / "d"), cwd=tmp_path)
    assert p.returncode == 1
    assert "bad.makeflow:1:" in p.stderr and "NOPE" in p.stderr
    assert "bad.makeflow:3:" in p.stderr  # every error, not only the first
    assert not (tmp_path / "d").exists() or not os.listdir(tmp_path / "d")


def test_job_run_runs_a_batch_job_file(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(f"""
kind: batch
name: arr
array: 4
wants: {{cpu: 0.5}}
command:
  value: {sys.executable}
  arguments: ["-c", "open('o{{{{ index }}}}', 'w').write('x')"]
""")
    # from another directory: a job runs in its file's
    p = corral(
        "job", "run", str(tmp_path / "b.yaml"), "--data", str(tmp_path / "d"), cwd=tmp_path.parent
    )
    assert p.returncode == 0, p.stderr
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("o")) == [
        "o0", "o1", "o2", "o3"]  # fmt: skip
    (tmp_path / "s.yaml").write_text("kind: service\nname: s\ncommand: {value: /bin/true}\n")
    p = corral("job", "run", "s.yaml", "--data", str(tmp_path / "d"), cwd=tmp_path)
    assert p.returncode == 1 and "a service job does not run to an end" in p.stderr


def test_the_qa_makeflow_example_runs(tmp_path: Path) -> None:
    from tests.conftest import EXAMPLES

    p = corral("flow", "run", os.path.join(EXAMPLES, "jobs", "qa.makeflow"), "--data",
               str(tmp_path / "d"), cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "report.txt").read_text() == (
        "reco run 245146\nreco run 245147\n1\n1\n")  # fmt: skip


def test_a_changed_flow_reruns_only_what_changed_and_what_follows(tmp_path: Path) -> None:
    flow = tmp_path / "f.makeflow"
    flow.write_text(
        "a.txt:\n\techo a >> ran; echo A > a.txt\n"
        "b.txt: a.txt\n\techo b >> ran; cp a.txt b.txt\n"
        "c.txt:\n\techo c >> ran; echo C > c.txt\n"
        "d.txt: b.txt c.txt\n\techo d >> ran; cat b.txt c.txt > d.txt\n"
    )
    data = str(tmp_path / "data")
    assert corral("flow", "run", "f.makeflow", "--data", data, cwd=tmp_path).returncode == 0
    # run again unchanged: everything is done (as make says "nothing to be done")
    (tmp_path / "ran").write_text("")
    p = corral("flow", "run", "f.makeflow", "--data", data, cwd=tmp_path)
    assert p.returncode == 0 and (tmp_path / "ran").read_text() == "", p.stderr
    # a comment and a changed step: that step and what needs it run, nothing else
    flow.write_text("# fixed c\n" + flow.read_text().replace("echo C > c.txt", "echo CC > c.txt"))
    p = corral("flow", "run", "f.makeflow", "--data", data, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted((tmp_path / "ran").read_text().split()) == ["c", "d"]
    assert (tmp_path / "d.txt").read_text() == "A\nCC\n"


def test_job_validate_checks_makeflow_files(tmp_path: Path) -> None:
    from tests.conftest import EXAMPLES

    good = os.path.join(EXAMPLES, "jobs", "qa.makeflow")
    (tmp_path / "bad.makeflow").write_text("a: $(X)\n\techo\n")
    p = corral("job", "validate", good, str(tmp_path / "bad.makeflow"), cwd=tmp_path)
    assert p.returncode == 1
    assert "qa.makeflow: makeflow: 6 rules" in p.stderr
    assert "bad.makeflow:1: variable X is not defined" in p.stderr
