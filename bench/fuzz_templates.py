"""Fuzz template expansion at length: N generated examples (default 100,000).

The strategies and the property are tests/templates/fuzz_strategies.py's, as in
tests/templates/test_fuzz.py: 20 % single expressions evaluated alone, 30 % expressions
placed in a small template set, 50 % whole template sets (workflows, includes, task
classes, raw and mutated YAML, hostile caller variables). Every example must give a
plan or located diagnostics (an ExprError for a lone expression), within the time
limit. Examples run in batches of 1,000, batch k with Hypothesis seed ``--seed + k``, so
a run is reproducible. Address space is capped (``--max-memory-mb``) so that a memory
blow-up is a MemoryError here, not the machine's OOM killer.

Prints examples/second, the slowest example, peak RSS and how many examples gave a plan
or diagnostics; then each distinct crash or hang with its smallest example. Exit status
1 if there was any (a hang inside C code ends the run at once, with every thread's
stack), 0 otherwise.

    python bench/fuzz_templates.py                 # 100,000 examples
    python bench/fuzz_templates.py 5000 --seed 7
    python bench/fuzz_templates.py 5000 --show-slow 2   # and print examples over 2 s
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 1000
SHARES = {"expression": 2, "placed": 3, "template set": 5}


@dataclass
class Crash:
    signature: str
    count: int = 0
    example: str = ""
    trace: str = ""


@dataclass
class Stats:
    examples: int = 0
    plans: int = 0
    diagnostics: int = 0
    values: int = 0
    expr_errors: int = 0
    tasks: int = 0
    check_seconds: float = 0.0
    slowest: float = 0.0
    slowest_kind: str = ""
    slow: list[tuple[float, str, str]] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    crashes: dict[str, Crash] = field(default_factory=dict)


def signature(err: BaseException) -> str:
    """Exception type and the innermost frame in corral (or the test code)."""
    frames = traceback.extract_tb(err.__traceback__)
    inner = [f for f in frames if "/corral/" in f.filename] or frames[-1:]
    where = f"{os.path.relpath(inner[-1].filename, ROOT)}:{inner[-1].lineno}" if inner else "?"
    return f"{type(err).__name__} at {where}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("examples", nargs="?", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0, help="Hypothesis seed of the first batch")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a hang")
    ap.add_argument("--max-memory-mb", type=int, default=4096, help="address-space cap")
    ap.add_argument(
        "--show-slow", type=float, default=0, metavar="S", help="print examples slower than S s"
    )
    args = ap.parse_args()
    if args.max_memory_mb > 0:
        cap = args.max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.path.insert(0, ROOT)

    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st
    from tests.templates.fuzz_strategies import (
        Hang,
        evaluate_directly,
        evaluation_cases,
        expression_templates,
        run_check,
        template_sets,
        time_limit,
    )

    strategies = {
        "expression": evaluation_cases(),
        "placed": expression_templates().map(lambda case: case[0]),
        "template set": template_sets(),
    }
    weighted = [kind for kind, share in SHARES.items() for _ in range(share)]
    cases = st.sampled_from(weighted).flatmap(
        lambda kind: strategies[kind].map(lambda ex: (kind, ex))
    )
    stats = Stats()

    def one(case: tuple[str, Any]) -> None:
        kind, example = case
        stats.examples += 1
        stats.kinds[kind] += 1
        t0 = time.perf_counter()
        try:
            if kind == "expression":
                with time_limit(args.timeout):
                    text = evaluate_directly(*example)
                if text is None:
                    stats.expr_errors += 1
                else:
                    stats.values += 1
            else:
                outcome = run_check(example, args.timeout)
                stats.plans += outcome.plan
                stats.diagnostics += not outcome.plan
                stats.tasks += outcome.tasks
        except (Exception, Hang) as err:  # a crash, a hang or a broken property
            sig = signature(err)
            crash = stats.crashes.setdefault(sig, Crash(sig))
            crash.count += 1
            text = repr(example)
            if not crash.example or len(text) < len(crash.example):
                crash.example = text
                crash.trace = "".join(traceback.format_exception(err)[-6:])
        dt = time.perf_counter() - t0
        stats.check_seconds += dt
        if dt > stats.slowest:
            stats.slowest, stats.slowest_kind = dt, kind
        if args.show_slow and dt > args.show_slow and len(stats.slow) < 10:
            stats.slow.append((dt, kind, repr(example)))

    def batch(count: int, batch_seed: int) -> None:
        @seed(batch_seed)
        @settings(
            max_examples=count,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(cases)
        def run(case: tuple[str, Any]) -> None:
            one(case)

        run()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        f"fuzzing {args.examples:,} examples, seeds {args.seed}.., timeout {args.timeout:g} s, "
        f"address space {args.max_memory_mb} MB"
    )
    t0 = time.perf_counter()
    done, k = 0, 0
    while done < args.examples:
        count = min(BATCH, args.examples - done)
        before = stats.examples
        batch(count, args.seed + k)
        done += max(1, stats.examples - before)
        k += 1
        if k % 10 == 0:
            el = time.perf_counter() - t0
            print(
                f"  {stats.examples:>8,} examples  {el:7.0f} s  {stats.examples / el:6.1f}/s  "
                f"crashes {sum(c.count for c in stats.crashes.values())}",
                flush=True,
            )
    elapsed = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = stats.examples
    runs = stats.plans + stats.diagnostics
    print(f"examples: {n:,} in {elapsed:.0f} s: {n / elapsed:.1f} examples/s")
    print(f"  by kind: {', '.join(f'{k} {v:,}' for k, v in stats.kinds.items())}")
    print(f"  in check()/evaluate: {stats.check_seconds:.0f} s; the rest is generation")
    print(
        f"template runs: {runs:,}: plans {stats.plans:,} ({100 * stats.plans / max(1, runs):.1f} %)"
        f", diagnostics {stats.diagnostics:,}; {stats.tasks:,} tasks in the plans"
    )
    print(f"lone expressions: values {stats.values:,}, expression errors {stats.expr_errors:,}")
    print(f"slowest example: {stats.slowest * 1000:.0f} ms ({stats.slowest_kind})")
    print(f"peak RSS: {rss:.0f} MB")
    for dt, kind, text in stats.slow:
        print(f"\n--- slow: {dt * 1000:.0f} ms ({kind}):\n{text}")
    crashes = sorted(stats.crashes.values(), key=lambda c: -c.count)
    print(f"crashes and hangs: {sum(c.count for c in crashes)} ({len(crashes)} distinct)")
    for c in crashes:
        print(f"\n--- {c.signature}: {c.count} example(s); the smallest:\n{c.example}\n{c.trace}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
