"""Benchmark: the doubling chain of issue 11 ends in an error, quickly and small.

Forty nested roles, each with ``vars: {sN: "{{ sN-1 + sN-1 }}"}`` (an expression), and
the same with ``"{{ sN-1 }}{{ sN-1 }}"`` (plain text), expanded by ``corral template
validate`` in a child process each. Before the bounds, the first grew to 24 GB in 100 s.
Prints seconds and the child's peak RSS beside the limits (< 1 s, < 200 MB), and the
error it ended with.

    python bench/doubling.py [--depth 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

LIMIT_SECONDS = 1.0
LIMIT_MB = 200


def chain(depth: int, concat: bool) -> str:
    lines = ["name: w", "defaults:", '  s0: "ab"', "roles:"]
    indent = "  "
    for i in range(1, depth + 1):
        s = f"s{i - 1}"
        grow = f"{{{{ {s} }}}}{{{{ {s} }}}}" if concat else f"{{{{ {s} + {s} }}}}"
        lines += [f"{indent}- name: r{i}", f"{indent}  vars:", f'{indent}    s{i}: "{grow}"']
        lines.append(f"{indent}  roles:")
        indent += "    "
    lines += [f"{indent}- name: leaf", f"{indent}  task:", f"{indent}    load: t"]
    return "\n".join(lines) + "\n"


CHILD = """
import json, resource, sys, time
from corral.store.files import DiskSources
from corral.templates import check
t0 = time.perf_counter()
plan, diags = check(sys.argv[1], DiskSources(), time_limit=60.0, clock=time.monotonic)
took = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": took, "rss_mb": rss, "plan": plan is not None,
                  "errors": [str(d) for d in diags]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=40)
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {os.cpu_count()} cpus")
    failed = False
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "tasks"))
        with open(os.path.join(d, "tasks", "t.yaml"), "w") as fh:
            fh.write("name: t\ncommand:\n  value: /bin/true\n")
        for concat in (False, True):
            path = os.path.join(d, "wf.yaml")
            with open(path, "w") as fh:
                fh.write(chain(args.depth, concat))
            r = subprocess.run(
                [sys.executable, "-c", CHILD, path], capture_output=True, text=True, timeout=600
            )
            if r.returncode != 0:
                sys.exit(f"the child failed: {r.stderr.strip()[-2000:]}")
            out = json.loads(r.stdout)
            kind = "text" if concat else "expression"
            print(
                f"{kind:10s} depth {args.depth}: {out['seconds']:.3f} s (limit {LIMIT_SECONDS} s), "
                f"peak RSS {out['rss_mb']:.0f} MB (limit {LIMIT_MB} MB), "
                f"{'a plan' if out['plan'] else 'no plan'}"
            )
            for e in out["errors"]:
                print(f"    {e.replace(d + '/', '')}")
            ok = not out["plan"] and out["seconds"] < LIMIT_SECONDS and out["rss_mb"] < LIMIT_MB
            failed = failed or not ok
    if failed:
        sys.exit("a bound was not met")


if __name__ == "__main__":
    main()
