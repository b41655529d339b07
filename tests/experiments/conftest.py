"""Shared helpers of the lab's tests: synthetic results for an experiment's planned runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Outcome = Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]
Synthesise = Callable[..., list[RunResult]]


def synthetic_results(name: str, outcome: Outcome, profile: str = "full",
                      dataset: str = "mnist") -> list[RunResult]:
    """Results for every run ``name`` plans on ``dataset``: ``outcome(spec) -> (summary,
    metrics)``."""
    exp = get_experiment(name)
    out = []
    for spec in exp.runs(exp.config(profile), dataset):
        summary, metrics = outcome(spec)
        out.append(RunResult(spec, spec.run_id(name), summary, metrics))
    return out


@pytest.fixture
def lab_results() -> Synthesise:
    """:func:`synthetic_results`, for the verdict-rule tests of each experiment."""
    return synthetic_results
