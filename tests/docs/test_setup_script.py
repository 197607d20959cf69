"""scripts/setup: the demo's set-up installs no system package; the tests' does.

The script runs for real, in a copy of the repository's top (its pyproject.toml),
with a stand-in `.venv/bin/python` and stand-ins for `apt-get` and the Debian
packages' commands on PATH, each recording how it was called (no pip, no apt)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

RECORD = '#!/bin/sh\necho "$(basename "$0") $*" >> "$CALLS"\n'


def _rig(tmp: Path) -> tuple[Path, dict[str, str]]:
    top = tmp / "repo"
    (top / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "setup"), top / "scripts" / "setup")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), top / "pyproject.toml")
    venv = top / ".venv" / "bin"
    venv.mkdir(parents=True)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, where in (("python", venv), ("apt-get", bin_dir)):
        (where / name).write_text(RECORD)
        (where / name).chmod(0o755)
    # only what the script needs besides: no chromium, prometheus, make nor cc
    for tool in ("bash", "sh", "id", "touch", "basename", "sed", "cat", "dirname"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "CALLS": str(tmp / "calls"), "HOME": str(tmp)}
    return top, env


def _calls(tmp: Path) -> list[str]:
    path = tmp / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_the_demo_set_up_installs_no_system_package(tmp_path: Path) -> None:
    top, env = _rig(tmp_path)
    r = subprocess.run(["bash", "scripts/setup"], cwd=top, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    assert not [c for c in calls if c.startswith("apt-get")], calls
    installs = [c for c in calls if "pip install" in c and "-e" in c]
    assert installs and all(c.endswith("-e .") for c in installs), calls  # no test extra


def test_the_test_set_up_installs_the_tools_and_the_packages(tmp_path: Path) -> None:
    top, env = _rig(tmp_path)
    r = subprocess.run(["bash", "scripts/setup", "--test"], cwd=top, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    assert any(c.endswith("-e .[test]") for c in calls), calls
    if os.geteuid() == 0:  # (as root only: otherwise it says what is missing)
        installed = [c for c in calls if c.startswith("apt-get") and " install " in c]
        assert installed and all(p in installed[0] for p in ("chromium", "prometheus",
                                                             "make", "gcc")), calls  # fmt: skip
    else:
        assert "cannot be installed here" in r.stdout + r.stderr


def test_an_old_python_is_refused_with_what_to_do(tmp_path: Path) -> None:
    top, env = _rig(tmp_path)
    shutil.rmtree(top / ".venv")
    old = tmp_path / "bin" / "python3"  # says it is too old to every check
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12"\nexit 1\n')
    old.chmod(0o755)
    r = subprocess.run(["bash", "scripts/setup"], cwd=top, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "needs Python 3.11 or newer" in r.stderr, r.stderr
    assert "Python 3.10.12" in r.stderr and "PYTHON=python3.11" in r.stderr
    assert not (top / ".venv").exists()
