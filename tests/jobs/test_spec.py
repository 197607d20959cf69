"""Job specifications (issue 13, item 1): each kind read, each error at its place."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral.jobs.spec import (
    MAX_FILE_BYTES,
    MAX_NESTING,
    BatchSpec,
    DagSpec,
    JobSpec,
    PeriodicSpec,
    ServiceSpec,
    cron_problem,
    find_cycles,
    load_job,
    parse_duration,
)
from corral.templates.diagnostics import Diagnostic
from tests.conftest import ROOT

SERVICE = """\
kind: service
name: ci-builder
description: "CI builder with a hot cache"
replicas: 3
command:
  value: /usr/bin/builder
  arguments: ["--cache", /var/cache/builder]
  env: ["BUILDER_MODE=ci"]
wants: {cpu: 4, memory: 8192}
constraints:
  - {attribute: hostname, value: "build[0-9]+", operator: regex}
pool: build
priority_class: async
health:
  - http: {port: 8080, path: /healthz}
    interval: 10s
    timeout: 2s
    threshold: 3
  - exec: {value: /usr/bin/check, arguments: [--quick]}
restart: {initial: 1s, max: 5m, factor: 2, crash_loop: 5, reset_after: 1m}
update: {max_parallel: 1, health_gated: true, healthy_for: 30s, auto_rollback: true}
sticky: {cache_dir: /var/cache/builder}
protected: true
"""

BATCH = """\
kind: batch
name: reco
command:
  value: /usr/bin/reco
  arguments: ["--chunk={{ index }}", "--out=out-{{index}}.root"]
retries: {count: 3, backoff: 10s, max_backoff: 5m}
success_exit_codes: [0, 3]
deadline: 2h
array: 100
"""

DAG = """\
kind: dag
name: qa
failure: continue
steps:
  - name: fetch
    command: {value: /usr/bin/fetch}
    outputs: [data/raw.root]
  - name: calib
    command: {value: /usr/bin/calib}
    inputs: [data/raw.root]
    outputs: [calib.root]
  - name: hist
    command: {value: /usr/bin/hist}
    needs: [fetch]
    outputs: [hist.root]
  - name: report
    command: {value: /usr/bin/report}
    inputs: [calib.root, hist.root]
"""

PERIODIC = """\
kind: periodic
name: nightly
schedule: "0 2 * * *"
timezone: Europe/Zurich
overlap: skip
missed: run-once
job:
  kind: batch
  command: {value: /usr/bin/cleanup, arguments: [--older-than, 30d]}
"""


def load(text: str, name: str = "job.yaml") -> tuple[JobSpec | None, list[Diagnostic]]:
    return load_job(name, textwrap.dedent(text))


def errors(text: str) -> list[str]:
    spec, diags = load(text)
    assert spec is None, spec
    assert diags
    return [str(d) for d in diags]


# -- each kind ----------------------------------------------------------------


def test_service() -> None:
    spec, diags = load(SERVICE)
    assert diags == []
    assert isinstance(spec, ServiceSpec)
    assert spec.name == "ci-builder" and spec.replicas == 3 and spec.protected
    assert spec.command.arguments == ("--cache", "/var/cache/builder")
    assert spec.command.env == (("BUILDER_MODE", "ci"),)
    assert spec.placement.wants.cpu == 4 and spec.placement.wants.memory == 8192
    assert spec.placement.pool == "build" and spec.placement.priority_class == "async"
    assert spec.placement.constraints[0].operator == "regex"
    http, check = spec.health
    assert (http.kind, http.port, http.path, http.interval, http.timeout, http.threshold) == (
        "http", 8080, "/healthz", 10.0, 2.0, 3,
    )  # fmt: skip
    assert check.kind == "exec" and check.command is not None
    assert check.command.arguments == ("--quick",)
    assert (spec.restart.initial, spec.restart.max, spec.restart.crash_loop) == (1.0, 300.0, 5)
    assert spec.update.healthy_for == 30.0 and spec.update.auto_rollback
    assert spec.sticky_cache == "/var/cache/builder"
    with pytest.raises(AttributeError):
        spec.name = "x"  # type: ignore[misc]


def test_batch_array() -> None:
    spec, diags = load(BATCH)
    assert diags == []
    assert isinstance(spec, BatchSpec)
    assert spec.array == 100 and spec.deadline == 7200.0
    assert (spec.retries.count, spec.retries.backoff, spec.retries.max_backoff) == (3, 10, 300)
    assert spec.success_exit_codes == (0, 3)
    assert spec.command.arguments[0] == "--chunk={{ index }}"


def test_dag_needs_from_files() -> None:
    spec, diags = load(DAG)
    assert diags == []
    assert isinstance(spec, DagSpec)
    assert spec.failure == "continue"
    needs = {s.name: s.needs for s in spec.steps}
    assert needs == {
        "fetch": (),
        "calib": ("fetch",),
        "hist": ("fetch",),
        "report": ("calib", "hist"),
    }


def test_periodic_inline() -> None:
    spec, diags = load(PERIODIC)
    assert diags == []
    assert isinstance(spec, PeriodicSpec)
    assert spec.schedule == "0 2 * * *" and spec.timezone == "Europe/Zurich"
    assert spec.overlap == "skip" and spec.missed == "run-once"
    assert isinstance(spec.job, BatchSpec) and spec.job.name == "nightly"


def test_periodic_by_file() -> None:
    spec, diags = load(
        """\
        kind: periodic
        name: nightly-qa
        schedule: "@daily"
        job: qa.yaml
        """
    )
    assert diags == []
    assert isinstance(spec, PeriodicSpec) and spec.job is None and spec.job_file == "qa.yaml"
    assert (spec.job_loc.line, spec.job_loc.col) == (4, 6)


# -- errors at their places ---------------------------------------------------------


def test_unknown_field_did_you_mean_and_all_errors() -> None:
    got = errors(
        """\
        kind: service
        name: web
        replicaz: 2
        command: {value: /bin/web}
        restart: {initial: 10s, max: 1s}
        health:
          http: {port: 70000}
        """
    )
    assert got == [
        "job.yaml:3:1: unknown field 'replicaz' in a service job; did you mean 'replicas'?",
        "job.yaml:5:30: restart max must not be less than initial",
        "job.yaml:7:16: http port must be between 1 and 65,535, not 70,000",
    ]


def test_wrong_types_each_with_place() -> None:
    got = errors(
        """\
        kind: batch
        name: "bad name"
        command: {value: /bin/x, shell: maybe, env: [NOEQUALS]}
        retries: {count: three, backoff: 10 minutes}
        success_exit_codes: [0, 256]
        deadline: -5s
        """
    )
    assert got == [
        "job.yaml:2:7: name 'bad name' is not a name: letters, digits, '_', '.' and '-', "
        "starting with a letter or digit, at most 100 characters",
        "job.yaml:3:33: shell must be true or false, not 'maybe'",
        "job.yaml:3:46: env entry 'NOEQUALS' must be NAME=VALUE",
        "job.yaml:4:18: retries count must be a whole number, not 'three'",
        "job.yaml:4:34: retries backoff: bad duration '10 minutes': use e.g. 500ms, 10s, 1m30s",
        "job.yaml:5:25: an exit code in success_exit_codes must be between 0 and 255, not 256",
        "job.yaml:6:11: deadline: bad duration '-5s': use e.g. 500ms, 10s, 1m30s",
    ]


def test_kind_missing_and_misspelt() -> None:
    assert errors("name: x\n") == [
        "job.yaml:1:1: a job needs kind: one of service, batch, dag, periodic"
    ]
    assert errors("kind: servise\nname: x\n") == [
        "job.yaml:1:7: kind 'servise' is not one of service, batch, dag, periodic; "
        "did you mean 'service'?"
    ]


def test_bounds() -> None:
    got = errors("kind: service\nname: x\nreplicas: 10001\ncommand: {value: /bin/x}\n")
    assert got == ["job.yaml:3:11: replicas must be between 0 and 10,000, not 10,001"]
    got = errors("kind: batch\nname: x\narray: 1_000_001\ncommand: {value: /bin/x}\n")
    assert got == ["job.yaml:3:8: array must be between 1 and 1,000,000, not 1,000,001"]


def test_index_only_in_array_jobs() -> None:
    got = errors(
        """\
        kind: batch
        name: x
        command: {value: /bin/x, arguments: ["a{{ index }}", "{{ host }}"]}
        """
    )
    assert got == [
        "job.yaml:3:40: an entry of arguments: {{ index }} is only known in an array job",
        "job.yaml:3:55: an entry of arguments: unknown placeholder '{{ host }}'; a job's "
        "command may use {{ index }} in an array job, nothing else",
    ]


def test_health_check_needs_one_kind() -> None:
    got = errors(
        """\
        kind: service
        name: x
        command: {value: /bin/x}
        health:
          - {http: {port: 80}, tcp: {port: 80}}
          - {interval: 1s, timeout: 5s, exec: {value: /bin/ok}}
        """
    )
    assert got == [
        "job.yaml:5:24: a health check has exactly one of http, tcp, exec; found http and tcp",
        "job.yaml:6:29: health timeout (5s) must not be longer than its interval (1s)",
    ]


def test_dag_cycle_is_named() -> None:
    got = errors(
        """\
        kind: dag
        name: loop
        steps:
          - {name: a, command: {value: /bin/a}, needs: [b]}
          - {name: b, command: {value: /bin/b}, needs: [a]}
          - {name: c, command: {value: /bin/c}, needs: [d]}
        """
    )
    assert got == [
        "job.yaml:4:5: steps form a cycle: a -> b -> a",
        "job.yaml:6:49: step 'c' needs 'd', which is no step",
    ]


def test_dag_cycle_through_files_and_duplicates() -> None:
    got = errors(
        """\
        kind: dag
        name: loop
        steps:
          - {name: a, command: {value: /bin/a}, inputs: [y], outputs: [x]}
          - {name: b, command: {value: /bin/b}, inputs: [x], outputs: [y, ../z]}
          - {name: a, command: {value: /bin/a}}
          - {name: c, command: {value: /bin/c}, outputs: [x]}
        """
    )
    assert got == [
        "job.yaml:4:5: steps form a cycle: a -> b -> a",
        "job.yaml:5:67: outputs '../z' must be a path inside the job's directory "
        "(relative, without '..')",
        "job.yaml:6:12: duplicate step 'a' (first at line 4)",
        "job.yaml:7:51: output 'x' of step 'c' is also an output of step 'a'",
    ]


def test_find_cycles_large_and_deep() -> None:
    n = 50_000  # a chain this long would overflow a recursive search
    edges = {f"s{i}": [f"s{i + 1}"] for i in range(n)}
    edges[f"s{n}"] = ["s0"]
    order = [f"s{i}" for i in range(n + 1)]
    (cycle,) = find_cycles(edges, order)
    assert cycle[0] == cycle[-1] == "s0" and len(cycle) == n + 2


def test_bad_cron_and_time_zone() -> None:
    got = errors(
        """\
        kind: periodic
        name: p
        schedule: "61 * * * *"
        timezone: Europe/Zurch
        overlap: queued
        job: {kind: service, name: s, command: {value: /bin/s}}
        """
    )
    assert got[0].startswith("job.yaml:3:11: cron '61 * * * *': bad minute field '61'")
    assert got[1] == (
        "job.yaml:4:11: unknown time zone 'Europe/Zurch' (an IANA name such as 'Europe/Zurich')"
    )
    assert got[2] == (
        "job.yaml:5:10: overlap 'queued' is not one of skip, queue, replace; did you mean 'queue'?"
    )
    assert got[3] == "job.yaml:6:13: kind 'service' is not one of batch, dag"
    assert "a schedule has 5" in str(cron_problem("* * *"))
    assert cron_problem("0 0 31 2 *") is not None  # never fires
    assert cron_problem("R * * * *") is not None  # random: not a schedule
    assert cron_problem("0 2 * * MON-FRI") is None and cron_problem("@hourly") is None


@pytest.mark.parametrize("tz", ["../../etc/passwd", "/etc/localtime", "Nowhere/City", ""])
def test_hostile_time_zones(tz: str) -> None:
    got = errors(f'kind: periodic\nname: p\nschedule: "@daily"\ntimezone: "{tz}"\njob: a.yaml\n')
    assert len(got) == 1 and got[0].startswith("job.yaml:4:11: ")


def test_durations() -> None:
    assert parse_duration("1m30s") == 90 and parse_duration("500ms") == 0.5
    assert parse_duration("2") == 2
    for bad in ("", "1d", "-1s", "nan", "inf", "1s 2s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# -- hostile input ----------------------------------------------------------------


def test_python_tags_are_refused() -> None:
    got = errors(
        """\
        kind: batch
        name: x
        command: !!python/object/apply:os.system ["touch /tmp/pwned"]
        deadline: !custom 5s
        """
    )
    assert got == [
        "job.yaml:3:10: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' "
        "is not allowed in a job file",
        "job.yaml:4:11: YAML tag '!custom' is not allowed in a job file",
    ]


def test_deep_nesting_is_refused_before_composing() -> None:
    text = "kind: batch\nname: x\ncommand: " + "[" * 100_000 + "]" * 100_000 + "\n"
    got = errors(text)
    assert got == [f"job.yaml:3:{10 + MAX_NESTING - 1}: lists and maps nest more than "
                   f"{MAX_NESTING} levels deep"]  # fmt: skip


def test_huge_file_is_refused() -> None:
    data = b"kind: batch\n" + b"#" * MAX_FILE_BYTES
    spec, diags = load_job("big.yaml", data)
    assert spec is None
    assert [str(d) for d in diags] == [
        f"big.yaml:1:1: the file is larger than {MAX_FILE_BYTES:,} bytes ({len(data):,})"
    ]


def test_bad_utf8_is_refused_with_its_place() -> None:
    spec, diags = load_job("bad.yaml", b"kind: batch\nname: caf\xe9\n")
    assert spec is None
    assert [str(d) for d in diags] == [
        "bad.yaml:2:10: the file is not UTF-8: byte 0xe9 at offset 21"
    ]


def test_yaml_syntax_error_and_empty_and_not_a_mapping() -> None:
    assert errors("kind: batch\n  name: [x\n")[0].startswith("job.yaml:2:")
    assert errors("") == ["job.yaml:1:1: the file is empty: a job file declares one job"]
    assert errors("- a\n") == ["job.yaml:1:1: a job must be a mapping, not a list"]


def test_alias_bomb_is_bounded() -> None:
    lines = ["kind: batch", "name: x", "command: {value: /bin/x}", "a0: &a0 [x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 40)]
    got = errors("\n".join(lines) + "\n")
    assert got[0] == "job.yaml:4:1: unknown field 'a0' in a batch job"  # nothing expanded


# -- the command line ----------------------------------------------------------------


def corral(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def test_cli_validate(tmp_path: Path) -> None:
    for name, text in [("svc", SERVICE), ("batch", BATCH), ("dag", DAG), ("cron", PERIODIC)]:
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "nightly.yaml").write_text(
        'kind: periodic\nname: n\nschedule: "0 3 * * *"\njob: dag.yaml\n'
    )
    r = corral("job", "validate", *sorted(str(p) for p in tmp_path.iterdir()))
    assert r.returncode == 0, r.stderr
    assert "✓" in r.stderr and "service ci-builder: 3 replica(s)" in r.stderr
    assert "dag qa: 4 step(s), on failure continue" in r.stderr
    assert "periodic n: '0 3 * * *' (UTC) runs dag.yaml" in r.stderr


def test_cli_errors_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: dag\nname: '[red]x'\nsteps: []\n")
    missing = tmp_path / "p.yaml"
    missing.write_text('kind: periodic\nname: p\nschedule: "@daily"\njob: gone.yaml\n')
    r = corral("job", "validate", str(bad), str(missing))
    assert r.returncode == 1
    assert f"{bad}:2:7: name '[red]x' is not a name" in r.stderr  # markup escaped
    assert f"{bad}:3:8: steps must not be empty" in r.stderr
    assert f"{missing}:4:6: job 'gone.yaml': no such file" in r.stderr


def test_cli_periodic_file_of_the_wrong_kind(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text(SERVICE)
    p = tmp_path / "p.yaml"
    p.write_text('kind: periodic\nname: p\nschedule: "@daily"\njob: svc.yaml\n')
    r = corral("job", "validate", str(p))
    assert r.returncode == 1
    assert (
        f"{p}:4:6: job 'svc.yaml' is a service job; a periodic job runs a batch or dag job"
        in r.stderr
    )


def test_cli_usage_exit_2(tmp_path: Path) -> None:
    assert corral("job", "validate").returncode == 2
    assert corral("job", "validate", str(tmp_path / "nope.yaml")).returncode == 2


def test_docs_examples_are_valid_jobs() -> None:
    import re

    text = (Path(ROOT) / "docs" / "jobs.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    kinds = set()
    for block in blocks:
        spec, diags = load_job("docs/jobs.md", block)
        assert diags == [] and spec is not None
        kinds.add(spec.kind)
    assert kinds == {"service", "batch", "dag", "periodic"}


def test_the_job_examples_validate() -> None:
    """examples/jobs: the seed use cases' job files (a CI builder, a nightly build, a QA
    DAG) are valid as written."""
    import glob
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    files = sorted(glob.glob(os.path.join(ROOT, "examples", "jobs", "*.yaml")))
    files += sorted(glob.glob(os.path.join(ROOT, "examples", "jobs", "cron", "*.yaml")))
    assert len(files) >= 4
    r = subprocess.run(
        [sys.executable, "-m", "corral", "job", "validate", *files],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("✓") == len(files)
