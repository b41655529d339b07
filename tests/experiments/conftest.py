"""Shared helpers of the experiments' tests: synthetic results for every planned run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Outcome = Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]
Synthesise = Callable[..., list[RunResult]]


def make_results(name: str, outcome: Outcome, profile: str = "full",
                 dataset: str = "mnist") -> list[RunResult]:
    """A result for every run that experiment ``name`` plans on ``dataset``:
    ``outcome(spec) -> (summary, metrics)``."""
    exp = get_experiment(name)
    out = []
    for spec in exp.runs(exp.config(profile), dataset):
        summary, metrics = outcome(spec)
        out.append(RunResult(spec, spec.run_id(name), summary, metrics))
    return out


@pytest.fixture
def synthetic_results() -> Synthesise:
    """:func:`make_results`, for the verdict-rule tests of each experiment."""
    return make_results
