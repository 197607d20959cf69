"""Benchmark: `corral run` of 200 basic `sleep 600` tasks, from the command to RUNNING.

What a newcomer does: `corral run wf.yaml` of a workflow of N plain processes
(`sleep 600`, control mode basic), timed from starting the command until it says the
run is RUNNING and all N `sleep` processes are in /proc (each one's
/proc/PID/cmdline is `sleep`'s: exec'd, not still the fork of corral). The whole
cost: the interpreter starting, the imports, expanding the template, the store,
placing, DEPLOY, CONFIGURE, START_ACTIVITY. Ctrl-C then tears it down (timed apart).

Beside it, the limits measured in the same run: the same N `sleep 600` spawned by
Popen from this process (what corral's local backend does, without corral and
without an interpreter starting), and by one shell (`sleep ... &` N times: a fork of
a small process is cheaper than one of Python), each waited for in /proc the same
way. Each is measured --runs times, alternating; the median is printed. Target:
corral <= 0.5 s.

    python bench/run_start_200.py [--tasks 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

TARGET = 0.5

WORKFLOW = """
name: sleepers
roles:
  - name: s-{{ i }}
    for: {begin: "1", end: "{{ n }}", var: i}
    task: {load: sleeper}
"""
CLASS = """
name: sleeper
control: {mode: basic}
wants: {cpu: 0.001, memory: 1}
command:
  value: sleep
  arguments: ["{{ seconds }}"]
"""


def sleeping(mark: str) -> set[int]:
    """The pids of the processes that run `sleep MARK` (exec'd)."""
    want = b"sleep\0" + mark.encode() + b"\0"
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.endswith(want) and os.path.basename(cmd.split(b"\0", 1)[0]) == b"sleep":
            found.add(int(name))
    return found


def limit(n: int) -> float:
    mark = f"600.{uuid.uuid4().int % 10**9:09d}"
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["sleep", mark],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(n)
    ]
    while len(sleeping(mark)) < n:
        pass
    took = time.perf_counter() - t0
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    return took


def shell_limit(n: int) -> float:
    """The same n sleeps started by one shell (`sleep M &`, n times): no Python fork."""
    mark = f"600.{uuid.uuid4().int % 10**9:09d}"
    t0 = time.perf_counter()
    sh = subprocess.Popen(
        ["sh", "-c", f"i=0; while [ $i -lt {n} ]; do sleep {mark} & i=$((i+1)); done; wait"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    while len(pids := sleeping(mark)) < n:
        pass
    took = time.perf_counter() - t0
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    sh.wait()
    return took


def corral(n: int, tmp: str, src: str | None = None) -> tuple[float, float]:
    """(from the command to RUNNING with every sleep in /proc, the teardown on Ctrl-C);
    ``src``: the corral whose sources are there."""
    mark = f"600.{uuid.uuid4().int % 10**9:09d}"
    data = os.path.join(tmp, f"data-{mark}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", os.path.join(tmp, "wf.yaml"), "--data", data,
         "--var", f"n={n}", "--var", f"seconds={mark}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=None if src is None else dict(os.environ, PYTHONPATH=src),
    )  # fmt: skip
    assert proc.stdout is not None
    said = proc.stdout.readline()  # "run number 1 is RUNNING"
    if "RUNNING" not in said:
        proc.kill()
        raise SystemExit(f"corral run: {said!r} {proc.communicate()}")
    while len(sleeping(mark)) < n:
        pass
    took = time.perf_counter() - t0
    t1 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    down = time.perf_counter() - t1
    left = sleeping(mark)
    if left:
        raise SystemExit(f"{len(left)} sleeps left after the teardown")
    return took, down


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--compare", metavar="SRC",
        help="also time the corral whose sources are in SRC (an older commit's `git archive "
        "... src`, say), in the same run",
    )  # fmt: skip
    a = p.parse_args()
    print(
        f"python {sys.version.split()[0]} on {os.cpu_count()} cpus; {a.runs} runs each; "
        f"load average "
        f"{os.getloadavg()[0]:.1f} at the start"
    )
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "wf.yaml"), "w") as f:
            f.write(WORKFLOW)
        os.mkdir(os.path.join(tmp, "tasks"))
        with open(os.path.join(tmp, "tasks", "sleeper.yaml"), "w") as f:
            f.write(CLASS)
        limits, shells, runs, downs, befores = [], [], [], [], []
        for _ in range(a.runs):
            limits.append(limit(a.tasks))
            shells.append(shell_limit(a.tasks))
            took, down = corral(a.tasks, tmp)
            runs.append(took)
            downs.append(down)
            if a.compare:
                befores.append(corral(a.tasks, tmp, a.compare)[0])
    lim, med = statistics.median(limits), statistics.median(runs)
    print(f"{a.tasks} sleep tasks: limit (Popen, no corral) median {lim:.3f} s "
          f"({', '.join(f'{x:.3f}' for x in limits)})")  # fmt: skip
    print(
        f"{a.tasks} sleep tasks: limit (one shell, `sleep &`) median "
        f"{statistics.median(shells):.3f} s ({', '.join(f'{x:.3f}' for x in shells)})"
    )
    print(f"{a.tasks} sleep tasks: corral run to RUNNING median {med:.3f} s "
          f"({', '.join(f'{x:.3f}' for x in runs)}); {med / lim:.1f} x the limit; "
          f"target <= {TARGET} s: {'met' if med <= TARGET else 'NOT met'}")  # fmt: skip
    if befores:
        print(
            f"{a.tasks} sleep tasks: {a.compare}: corral run to RUNNING median "
            f"{statistics.median(befores):.3f} s ({', '.join(f'{x:.3f}' for x in befores)})"
        )
    print(f"teardown on Ctrl-C (not counted): median {statistics.median(downs):.3f} s")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
