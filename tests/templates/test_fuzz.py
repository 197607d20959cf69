"""Fuzzing template expansion: whatever the input, a plan or located diagnostics.

The strategies and the property live in fuzz_strategies.py, shared with
bench/fuzz_templates.py. CI runs 1,000 examples in all, derandomized (the same ones on
every run); for a longer, random run:

    CORRAL_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/templates/test_fuzz.py

Each example is bounded by a SIGALRM guard (CORRAL_FUZZ_TIMEOUT seconds, default 20):
past it the example fails as a hang, and past three times that a hang inside C code
ends the run with every thread's stack (faulthandler).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings

from corral.templates.expressions import RolePos
from tests.templates.fuzz_strategies import (
    Hang,
    TemplateSet,
    evaluate_directly,
    evaluation_cases,
    expression_templates,
    run_check,
    template_sets,
    time_limit,
)

LONG_RUN = os.environ.get("CORRAL_FUZZ_EXAMPLES")
TOTAL = int(LONG_RUN or "1000")
TIMEOUT = float(os.environ.get("CORRAL_FUZZ_TIMEOUT", "20"))


def fuzz_settings(share: float) -> settings:
    return settings(
        max_examples=max(1, round(TOTAL * share)),
        # wall time is bounded by the SIGALRM guard, not by Hypothesis' deadline, which
        # would flake on a machine shared with other test runs
        deadline=None,
        # CI sees the same examples every run; a long run explores new ones
        derandomize=not LONG_RUN,
        database=None,
        # no health check is suppressed: generation is fast enough (a template set's
        # hundreds of decisions are one drawn byte string) and examples fit the buffer
    )


@fuzz_settings(0.2)
@given(evaluation_cases())
def test_expressions_evaluate_or_fail_with_an_expression_error(
    case: tuple[str, dict[str, str], RolePos | None],
) -> None:
    expr, stack, pos = case
    with time_limit(TIMEOUT):
        evaluate_directly(expr, stack, pos)


@fuzz_settings(0.3)
@given(expression_templates())
def test_expressions_in_templates_give_a_plan_or_located_diagnostics(
    case: tuple[TemplateSet, str],
) -> None:
    run_check(case[0], TIMEOUT)


@fuzz_settings(0.5)
@given(template_sets())
def test_template_sets_give_a_plan_or_located_diagnostics(ts: TemplateSet) -> None:
    run_check(ts, TIMEOUT)


def test_the_hang_guard_interrupts_a_loop() -> None:
    with pytest.raises(Hang), time_limit(0.05):
        while True:
            pass
