from __future__ import annotations

import os
import sys
import textwrap

import pytest

from corral.model import Plan
from corral.templates import DictSources, check, expand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def dedent_files(files: dict[str, str]) -> dict[str, str]:
    return {k: textwrap.dedent(v).lstrip("\n") for k, v in files.items()}


def expand_text(files: dict[str, str], root: str = "wf.yaml", **kw: object) -> Plan:
    """Expand in-memory template files (dedented) and return the plan."""
    return expand(root, DictSources(dedent_files(files)), **kw)  # type: ignore[arg-type]


def errors_of(files: dict[str, str], root: str = "wf.yaml", **kw: object) -> list[str]:
    plan, diags = check(root, DictSources(dedent_files(files)), **kw)  # type: ignore[arg-type]
    assert plan is None, "expected errors, got a plan"
    return [str(d) for d in diags]


@pytest.fixture
def example_defaults() -> dict[str, str]:
    return {"python": sys.executable, "workflow_dir": EXAMPLES}


@pytest.fixture(autouse=True)
def _fresh_child_watcher() -> object:
    """Each test's event loop installs its own pidfd child watcher (3.11); forget it
    afterwards, so that a later loop (Playwright's, say) does not inherit a watcher
    attached to a closed loop."""
    yield
    if sys.version_info < (3, 12):
        import asyncio
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.get_event_loop_policy().set_child_watcher(None)  # type: ignore[arg-type]
