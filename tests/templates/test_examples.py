"""The example workflows expand to the plans they describe."""

from __future__ import annotations

import os

from corral.store.files import DiskSources
from corral.templates import expand
from tests.conftest import EXAMPLES


def render_datataking(defaults: dict[str, str], **variables: str):  # type: ignore[no-untyped-def]
    return expand(
        os.path.join(EXAMPLES, "datataking.yaml"),
        DiskSources(),
        variables={"hosts": '["flp1","flp2"]', **variables},
        global_defaults=defaults,
        seed="test",
    )


def test_task_counts_and_paths(example_defaults: dict[str, str]) -> None:
    plan = render_datataking(example_defaults)
    paths = [t.path for t in plan.tasks]
    assert plan.name == "datataking"
    # 4 per FLP (readout, stfb, stfs, run-logger hook), distributor, 2 pipelines x 1 EPN, qc
    assert len(paths) == 4 * 2 + 1 + 2 + 1
    assert paths[:4] == [
        "datataking.flp-flp1.readout",
        "datataking.flp-flp1.stfb",
        "datataking.flp-flp1.stfs",
        "datataking.flp-flp1.log-run",
    ]
    assert "datataking.epn-localhost.proc-2" in paths
    assert "datataking.qc" in paths


def test_resolved_commands(example_defaults: dict[str, str]) -> None:
    plan = render_datataking(example_defaults, detector="ITS", readout_rate="10")
    by = {t.path: t for t in plan.tasks}
    readout = by["datataking.flp-flp2.readout"]
    assert readout.command.value == example_defaults["python"]
    assert readout.command.arguments == (
        os.path.join(EXAMPLES, "programs", "readout.py"),
        "--rate=10",
        "--detector=ITS",
    )
    env = dict(readout.command.env)
    assert env["O2_DETECTOR"] == "ITS"
    assert env["O2_ROLE"] == "flp2"
    assert env["O2_PARTITION"]  # environment_id, derived from the seed
    assert readout.control == "direct" and readout.critical
    assert readout.wants.cpu == 0.1 and readout.wants.memory == 64
    assert [c.to_dict() for c in readout.constraints] == [
        {"attribute": "machine_id", "operator": "equals", "value": "flp2"}
    ]
    logger = by["datataking.flp-flp1.log-run"]
    assert logger.control == "hook" and not logger.critical
    assert str(logger.trigger) == "after_START_ACTIVITY" and logger.timeout == 5.0
    assert logger.command.shell
    # the callers' values (hosts, detector) reach the shell as variables, not as script
    assert logger.command.value == 'echo "run started on ${CORRAL_VALUE_1} for ${CORRAL_VALUE_2}"'
    assert dict(logger.command.env) == {"CORRAL_VALUE_1": "flp1", "CORRAL_VALUE_2": "ITS"}
    proc = by["datataking.epn-localhost.proc-1"]
    assert not proc.critical and proc.collection == "datataking.epn-*"


def test_channel_endpoints(example_defaults: dict[str, str]) -> None:
    plan = render_datataking(example_defaults)
    binds = {(b.task, b.name): b for b in plan.binds}
    assert binds[("datataking.flp-flp1.readout", "readout")].addressing == "ipc"
    assert binds[("datataking.dist", "input")].global_alias == "stf-in"
    edges = {(c.task, c.name): (c.bind_task, c.bind_name, c.type) for c in plan.connects}
    assert edges[("datataking.flp-flp1.stfb", "readout")] == (
        "datataking.flp-flp1.readout",
        "readout",
        "pull",
    )
    assert edges[("datataking.flp-flp2.stfs", "input")] == (
        "datataking.flp-flp2.stfb",
        "output",
        "pull",
    )
    assert edges[("datataking.flp-flp2.stfs", "output")] == ("datataking.dist", "input", "push")
    assert edges[("datataking.epn-localhost.proc-2", "input")] == (
        "datataking.dist",
        "output",
        "pull",
    )
    assert edges[("datataking.epn-localhost.proc-1", "qc")] == ("datataking.qc", "input", "pub")


def test_hook_calls(example_defaults: dict[str, str]) -> None:
    plan = render_datataking(example_defaults)
    calls = {c.path: c for c in plan.calls}
    pfr = calls["datataking.dcs.pfr"]
    assert pfr.func == "test.Noop()"
    assert (str(pfr.trigger), str(pfr.await_)) == ("before_CONFIGURE", "after_CONFIGURE-1")
    assert pfr.timeout == 10.0 and not pfr.critical
    sor = calls["datataking.dcs.sor"]
    assert sor.trigger.weight == 100 and sor.critical and sor.await_ == sor.trigger
    assert str(calls["datataking.odc.part-init"].await_) == "after_DEPLOY-1"
    assert str(calls["datataking.trg.start"].trigger) == "after_START_ACTIVITY+10"


def test_switches_and_collections(example_defaults: dict[str, str]) -> None:
    plan = render_datataking(
        example_defaults,
        dcs_enabled="false",
        qc_enabled="false",
        epn_hosts='["epn1","epn2","epn3"]',
        epn_nmin="2",
        pipelines="3",
    )
    assert not any(c.path.startswith("datataking.dcs") for c in plan.calls)
    assert "datataking.qc" not in {t.path for t in plan.tasks}
    assert not any(c.name == "qc" for c in plan.connects)
    (coll,) = plan.collections
    assert coll.nmin == 2 and coll.path == "datataking.epn-*"
    assert coll.members == (
        "datataking.epn-epn1",
        "datataking.epn-epn2",
        "datataking.epn-epn3",
    )
    assert sum(t.task_class == "processing" for t in plan.tasks) == 9


def test_public_variables_are_kept(example_defaults: dict[str, str]) -> None:
    plan = render_datataking(example_defaults)
    public = {p.name: p for p in plan.public}
    assert public["hosts"].type == "list"
    assert public["hosts"].label == "FLP hosts"
    assert public["detector"].values == ("TST", "ITS", "TPC", "MCH", "MFT")
    assert public["qc_enabled"].widget == "checkBox"


def test_hello(example_defaults: dict[str, str]) -> None:
    plan = expand(
        os.path.join(EXAMPLES, "hello.yaml"), DiskSources(), global_defaults=example_defaults
    )
    (task,) = plan.tasks
    assert task.command.shell
    assert task.command.value == 'echo "hello from corral" && exec sleep 3600'
    (call,) = plan.calls
    assert str(call.trigger) == "before_START_ACTIVITY"
