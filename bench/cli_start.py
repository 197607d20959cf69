"""Benchmark: how long a `corral` command takes, start to exit.

`corral --version`, `corral env list` against a real server (`corral serve --backend
sim`, in a child process, with one environment), and `corral --help`, each run N times
as a user runs it (`python -m corral ...`, a new process each time); the median and the
fastest are printed. Beside them, the limit measured in the same run: the same
interpreter doing nothing (`python -c pass`), and importing click alone (what any
click command pays). Targets: `corral --version` and `corral env list` <= 150 ms.

    python bench/cli_start.py [--runs 21]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

from serving import sim_server

TARGET = 0.150


def timed(argv: list[str], runs: int, env: dict[str, str] | None = None) -> list[float]:
    took = []
    for _ in range(runs):
        t = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, env=env)
        took.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"{argv}: exit {r.returncode}: {r.stderr.decode()}")
    return took


def line(what: str, took: list[float], target: float | None = None) -> str:
    med = statistics.median(took)
    said = f"{what:<34} median {med * 1000:6.1f} ms, fastest {min(took) * 1000:6.1f} ms"
    if target is not None:
        said += f" (target <= {target * 1000:.0f} ms: {'met' if med <= target else 'NOT met'})"
    return said


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=21)
    p.add_argument(
        "--compare", metavar="SRC",
        help="also time the corral whose sources are in SRC (an older commit's `git archive "
        "... src`, say), in the same run",
    )  # fmt: skip
    a = p.parse_args()
    runs = a.runs
    py = sys.executable
    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    print(
        f"python {sys.version.split()[0]} on {os.cpu_count()} cpus; {runs} runs each; load average "
        f"{os.getloadavg()[0]:.1f} at the start"
    )
    with tempfile.TemporaryDirectory() as tmp:
        async with sim_server(tmp, 2, examples) as (url, token, _):
            env = dict(os.environ, CORRAL_SERVER=url, CORRAL_TOKEN=token)
            timed([py, "-m", "corral", "env", "create", "hello"], 1, env)
            rows = [
                line("limit: python -c pass", timed([py, "-c", "pass"], runs)),
                line("limit: python -c 'import click'", timed([py, "-c", "import click"], runs)),
                line("corral --version", timed([py, "-m", "corral", "--version"], runs), TARGET),
                line(
                    "corral env list (1 environment)",
                    await asyncio.to_thread(timed, [py, "-m", "corral", "env", "list"], runs, env),
                    TARGET,
                ),
                line("corral --help", timed([py, "-m", "corral", "--help"], runs)),
            ]
            if a.compare:
                before = dict(env, PYTHONPATH=a.compare)
                rows += [
                    line(f"{a.compare}: corral --version",
                         timed([py, "-m", "corral", "--version"], runs, before)),
                    line(f"{a.compare}: corral env list",
                         timed([py, "-m", "corral", "env", "list"], runs, before)),
                ]  # fmt: skip
            hello = os.path.join(examples, "hello.yaml")
            validate = [py, "-m", "corral", "template", "validate", hello]
            rows.append(line("corral template validate hello.yaml", timed(validate, runs)))
    for row in rows:
        print(row)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    asyncio.run(main())
