"""ALICE's real workflow templates, unchanged, on corral (issue 12, "Done when").

These run against a checkout of AliceO2Group/ControlWorkflows named by ``CORRAL_CWF``
(GPL: fetched, never committed), and are skipped without one: CI has none. With stand-in
executables for O2's (tests/alice/), every workflow validates and renders with
examples/alice/site-defaults.yaml, the DPL commands of its jit/ folder run, and
readout-dataflow with its integrations enabled runs: DEPLOY, CONFIGURE, START, STOP,
teardown, with every call going to a stand-in service.

    CORRAL_CWF=/path/to/ControlWorkflows .venv/bin/pytest tests/issues/test_issue12_alice.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CWF = os.environ.get("CORRAL_CWF", "")
pytestmark = pytest.mark.skipif(
    not CWF or not os.path.isdir(os.path.join(CWF, "workflows")),
    reason="set CORRAL_CWF to a ControlWorkflows checkout",
)
ALICE = Path(ROOT) / "examples" / "alice"
STANDINS = Path(ROOT) / "tests" / "alice"
HOSTS = '["alio2-cr1-flp001","alio2-cr1-flp160"]'
PLUGINS = ["bookkeeping", "ccdb", "dcs", "ddsched", "kafka", "lhc", "odc", "testplugin", "trg"]
INTEGRATIONS = {
    "dcs_enabled": "true",
    "epn_enabled": "true",
    "dd_enabled": "true",
    "trg_enabled": "true",
    "bookkeeping_enabled": "true",
    "ccdb_enabled": "true",
    "kafka_enabled": "true",
    "lhc_enabled": "true",
    "qc_remote_enabled": "true",
}


def wrapper(path: Path, script: str, *args: str, env: str = "") -> None:
    path.write_text(f'#!/bin/sh\n{env}exec {sys.executable} {script} {" ".join(args)} "$@"\n')
    path.chmod(0o755)


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a PATH folder of stand-ins for O2's executables, the folder they record in)."""
    root = tmp_path_factory.mktemp("standins")
    bin_ = root / "path"
    bin_.mkdir()
    record = root / "record"
    record.mkdir()
    exes: set[str] = set()
    for f in (Path(CWF) / "jit").iterdir():
        exes |= set(re.findall(r"(?:^|[|&;]\s*)(o2-[A-Za-z0-9_.-]+)", f.read_text()))
    rec = f"STANDIN_RECORD={record} "
    for exe in sorted(exes):  # describes itself in a pipeline; a FairMQ device under corral
        wrapper(bin_ / exe, str(STANDINS / "standin_dpl.py"), exe, env=rec)
    (bin_ / "consul").write_text("#!/bin/sh\necho 0\n")
    (bin_ / "numactl").write_text(
        '#!/bin/sh\nwhile [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n'
    )
    o2 = root / "o2" / "bin"
    o2.mkdir(parents=True)
    wrapper(o2 / "o2-readout-exe", str(STANDINS / "standin_task.py"), "readout", env=rec)
    for name in ("StfBuilder", "StfSender"):
        fmq = rec + "STANDIN_MODE=fairmq "
        wrapper(o2 / name, str(STANDINS / "standin_task.py"), name, env=fmq)
    for p in PLUGINS:
        wrapper(bin_ / f"plugin-{p}", str(STANDINS / "standin_plugin.py"), p, env=rec)
    for x in (bin_ / "consul", bin_ / "numactl"):
        x.chmod(0o755)
    return root, record


def corral(standins: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{standins / 'path'}:{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip


def site_args() -> list[str]:
    return [
        "--defaults", str(ALICE / "site-defaults.yaml"),
        "--inventory", str(ALICE / "inventory.yaml"),
        "--run-dpl",
    ]  # fmt: skip


def workflows() -> list[str]:
    if not CWF:
        return []
    names = sorted(p.name for p in (Path(CWF) / "workflows").glob("*.yaml"))
    return [n for n in names if not n.startswith("_")]


@pytest.mark.parametrize("name", workflows())
def test_every_workflow_validates_and_renders_unchanged(
    standins: tuple[Path, Path], name: str
) -> None:
    """The tpc-* workflows are an FLP's DPL workflow: they meet readout's channels by
    global alias, so they are checked where they run, included by readout-dataflow for
    TPC's FLPs (tpc_dpl_workflow=NAME), as AliECS includes them."""
    root, _ = standins
    path = str(Path(CWF) / "workflows" / name)
    args = ["--var", f"hosts={HOSTS}"]
    if name.startswith("tpc-"):
        path = str(Path(CWF) / "workflows" / "readout-dataflow.yaml")
        hosts = '["alio2-cr1-flp001","alio2-cr1-flp145"]'  # the A side, and SAC's FLP
        args = ["--var", f"hosts={hosts}", "--var", f"tpc_dpl_workflow={name[:-5]}"]
    if name == "resources-cleanup.yaml":  # its caller names the detector (AliECS's GUI)
        args += ["--var", "detector=TPC"]
    r = corral(root, "template", "validate", path, *site_args(), *args)
    assert r.returncode == 0, r.stderr
    r = corral(root, "template", "render", path, *site_args(), *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["tasks"], "no tasks"
    if name.startswith("tpc-"):
        assert any(".dpl." in t["path"] for t in plan["tasks"]), "the DPL workflow is there"


def test_readout_dataflow_with_dpl_workflows_from_jit(standins: tuple[Path, Path]) -> None:
    """The FLPs' DPL workflows: TPC's through a workflow of jit/ commands, ITS's from a
    jit/ command directly; their proxies meet StfBuilder and StfSender by global alias."""
    root, _ = standins
    path = str(Path(CWF) / "workflows" / "readout-dataflow.yaml")
    r = corral(
        root, "template", "render", path, *site_args(), "--var", f"hosts={HOSTS}",
        "--var", "tpc_dpl_workflow=tpc-sac-cmv-full-split",
        "--var", "its_dpl_workflow=its-qc-fhr-fee", "-o", "json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    dpl = [t for t in plan["tasks"] if ".dpl." in t["path"]]
    assert {t["control"] for t in dpl} == {"fairmq"} and len(dpl) >= 6
    by_alias = {b["global"]: b for b in plan["channels"]["binds"] if b["global"]}
    for host in ("alio2-cr1-flp001", "alio2-cr1-flp160"):
        assert f"readout-proxy-{host}" in by_alias  # StfBuilder's, for DPL's readout proxy
        assert f"downstream-{host}" in by_alias  # DPL's output proxy, for StfSender
    connected = {(c["task"].split(".")[1], c["target"]) for c in plan["channels"]["connects"]}
    assert ("host-alio2-cr1-flp160", "::downstream-alio2-cr1-flp160") in connected


def test_every_task_file_validates_on_its_own(standins: tuple[Path, Path]) -> None:
    root, _ = standins
    files = sorted(str(p) for p in (Path(CWF) / "tasks").glob("*.yaml"))
    site = str(ALICE / "site-defaults.yaml")
    r = corral(root, "template", "validate", *files, "--defaults", site)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("a task class") == len(files)


def test_readout_dataflow_with_its_integrations_runs(
    standins: tuple[Path, Path], tmp_path: Path
) -> None:
    root, record = standins
    path = str(Path(CWF) / "workflows" / "readout-dataflow.yaml")
    variables = {
        **INTEGRATIONS,
        "hosts": '["alio2-cr1-flp160"]',
        "o2_install_path": str(root / "o2"),
        "user": "",  # the tasks' user: this one (AliECS's is flp)
        "fmq_initial_shm_cleanup_enabled": "false",  # they source /etc/profile.d/o2.sh
        "fmq_cleanup_enabled": "false",
        "its_dpl_workflow": "its-qc-fhr-fee",  # a DPL workflow from jit/, run by stand-ins
    }
    args = [a for k, v in variables.items() for a in ("--var", f"{k}={v}")]
    plugins = [a for p in PLUGINS for a in ("--call-plugin", f"{p}={root / 'path'}/plugin-{p}")]
    r = corral(
        root, "run", path, "--data", str(tmp_path / "data"), "--until", "RUNNING", "--for", "1",
        *site_args(), *args, *plugins,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    readout = [json.loads(x)["step"] for x in (record / "readout.jsonl").read_text().splitlines()]
    assert readout[:3] == ["CONFIGURE", "START", "STOP"]
    stfb = [json.loads(x)["step"] for x in (record / "StfBuilder.jsonl").read_text().splitlines()]
    assert stfb[:6] == ["INIT DEVICE", "BIND", "CONNECT", "INIT TASK", "RUN", "STOP"]
    proxy = (record / "o2-dpl-raw-proxy.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in proxy][:5] == ["INIT DEVICE", "BIND", "CONNECT",
                                                          "INIT TASK", "RUN"]  # fmt: skip
    calls = [json.loads(x) for x in (record / "calls.jsonl").read_text().splitlines()]
    made = {(c["plugin"], c["method"]) for c in calls}
    wanted = [
        ("dcs", "PrepareForRun"), ("dcs", "StartOfRun"), ("dcs", "EndOfRun"),
        ("trg", "RunStart"), ("trg", "RunStop"),
        ("odc", "Configure"), ("odc", "Start"), ("odc", "Stop"), ("ccdb", "RunStart"),
        ("ddsched", "PartitionInitialize"), ("lhc", "UpdateFillInfo"),
    ]  # fmt: skip
    assert set(wanted) <= made, sorted(set(wanted) - made)
    # as in AliECS, the run number exists from before_START_ACTIVITY to after_STOP_ACTIVITY
    in_run = [
        c for c in calls
        if c["trigger"] and ("START_ACTIVITY" in c["trigger"] or "STOP_ACTIVITY" in c["trigger"])
    ]  # fmt: skip
    assert in_run and all(c["run_number"] == "1" for c in in_run), in_run
