"""Shared helpers of the experiments' tests: synthetic results for every planned run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.base import RunResult, RunSpec

Outcome = Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]


@pytest.fixture
def synthetic_results() -> Callable[..., list[RunResult]]:
    """``synthetic_results(name, outcome, profile="full")``: a result for every run that
    experiment ``name`` plans on MNIST, ``outcome(spec) -> (summary, metrics)``."""
    def make(name: str, outcome: Outcome, profile: str = "full") -> list[RunResult]:
        exp = get_experiment(name)
        out = []
        for spec in exp.runs(exp.config(profile), "mnist"):
            summary, metrics = outcome(spec)
            out.append(RunResult(spec, spec.run_id(name), summary, metrics))
        return out
    return make
