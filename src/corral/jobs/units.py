"""What the runner runs: a job as units, one process each to run to completion.

Pure. A batch job is one unit, or N for an array job (one shared ``UnitSpec``; the
instance's ``{{ index }}`` is filled in when it starts, so a large array costs one
spec, not N); a DAG is one unit per step, with the steps it needs; a Makeflow file is
a DAG whose steps are its rules, run by ``/bin/sh -c`` in the file's directory, as
Makeflow runs them.

Jobs run in their directory (the job file's): a command's relative ``cwd`` is taken
from there. A job that says nothing of cpus takes one per instance (as Makeflow's
rules do), so that a queue of batch work never starts more processes than the nodes
have cores.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field, replace

from corral.jobs.makeflow import Makeflow
from corral.jobs.spec import BatchSpec, DagSpec, Placement, Retries, SecretRef
from corral.model.plan import Command, Constraint, Resources

DEFAULT_CPU = 1.0
_INDEX = re.compile(r"\{\{\s*index\s*\}\}")


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """One process to run to completion (an array job's instances share one)."""

    name: str
    command: Command
    wants: Resources
    constraints: tuple[Constraint, ...] = ()
    retries: Retries = field(default_factory=Retries)
    success: frozenset[int] = frozenset({0})
    deadline: float | None = None
    needs: tuple[int, ...] = ()  # the units (by position) it waits for
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    secrets: tuple[SecretRef, ...] = ()  # what it is given (files, or env when asked)


@dataclass(frozen=True, slots=True)
class Units:
    """A job's units: ``specs`` per unit, or one spec for ``array`` instances."""

    specs: tuple[UnitSpec, ...]
    array: int | None = None
    failure: str = "stop"  # a DAG's failure policy: stop | continue

    @property
    def count(self) -> int:
        return self.array if self.array is not None else len(self.specs)

    def spec(self, idx: int) -> UnitSpec:
        return self.specs[0] if self.array is not None else self.specs[idx]

    def name(self, idx: int) -> str:
        return f"{self.specs[0].name}[{idx}]" if self.array is not None else self.specs[idx].name

    def command(self, idx: int, workdir: str) -> Command:
        """The unit's command as it starts: its index filled in, its cwd resolved."""
        c = self.spec(idx).command
        if self.array is not None:
            c = _with_index(c, str(idx))
        cwd = posixpath.join(workdir, c.cwd) if c.cwd else workdir
        return replace(c, cwd=cwd) if cwd != c.cwd else c

    def dependents(self) -> list[list[int]]:
        """For each unit, the units that need it."""
        out: list[list[int]] = [[] for _ in range(self.count if self.array is None else 0)]
        if self.array is None:
            for i, s in enumerate(self.specs):
                for d in s.needs:
                    out[d].append(i)
        return out


def _with_index(c: Command, index: str) -> Command:
    def sub(s: str) -> str:
        return _INDEX.sub(index, s) if "{{" in s else s

    return replace(
        c,
        value=sub(c.value),
        arguments=tuple(sub(a) for a in c.arguments),
        env=tuple((k, sub(v)) for k, v in c.env),
        cwd=None if c.cwd is None else sub(c.cwd),
    )


def _wants(w: Resources) -> Resources:
    return w if w.cpu > 0 else replace(w, cpu=DEFAULT_CPU)


def constraints_of(p: Placement) -> tuple[Constraint, ...]:
    """A job's placement rules: its constraints, and its pool's (a node label)."""
    if p.pool is None:
        return p.constraints
    return (*p.constraints, Constraint("pool", p.pool))


def units_of(spec: BatchSpec | DagSpec) -> Units:
    """The units of a batch job or a DAG (see the module doc)."""
    if isinstance(spec, BatchSpec):
        p = spec.placement
        one = UnitSpec(
            spec.name, spec.command, _wants(p.wants), constraints_of(p), spec.retries,
            frozenset(spec.success_exit_codes), spec.deadline, secrets=spec.secrets,
        )  # fmt: skip
        return Units((one,), spec.array)
    by_name = {s.name: i for i, s in enumerate(spec.steps)}
    constraints = constraints_of(spec.placement)
    steps = tuple(
        UnitSpec(
            s.name,
            s.command,
            _wants(s.wants),
            constraints,
            s.retries,
            frozenset(s.success_exit_codes),
            s.deadline,
            tuple(sorted({by_name[n] for n in s.needs})),
            s.inputs,
            s.outputs,
            spec.secrets,  # a DAG's secrets: every step's
        )
        for s in spec.steps
    )
    return Units(steps, None, spec.failure)


def units_of_makeflow(mf: Makeflow, *, failure: str = "stop") -> Units:
    """A Makeflow file's rules as a DAG's units, each run by ``/bin/sh -c`` with the
    rule's variables and the file's exports in its environment."""
    steps = []
    for i, r in enumerate(mf.rules):
        res = r.resources
        wants = Resources(
            cpu=float(res.cores) if res.cores else DEFAULT_CPU,
            memory=res.memory_mb or 0,
            gpu=res.gpus or 0,
        )
        name = r.targets[0] if r.targets else f"rule{i + 1}"
        steps.append(
            UnitSpec(
                f"{name}@{r.line}",
                Command(r.command, env=r.env, shell=True),
                wants,
                deadline=float(res.wall_time_s) if res.wall_time_s else None,
                needs=tuple(sorted(set(mf.deps[i]))),
                inputs=r.sources,
                outputs=r.targets,
            )
        )
    return Units(tuple(steps), None, failure)


def blocked_by(units: Units, failed: set[int]) -> set[int]:
    """The units that depend, directly or not, on one of ``failed``."""
    users = units.dependents()
    out: set[int] = set()
    todo = list(failed)
    while todo:
        for u in users[todo.pop()]:
            if u not in out:
                out.add(u)
                todo.append(u)
    return out
