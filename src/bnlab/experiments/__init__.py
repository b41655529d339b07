"""The claims lab: every claim the seed documents make about batch norm, as an experiment.

Each claim is one module: a declaration with a frozen config per profile (embedding the
shared training settings), its runs, its metric and a verdict rule written before any run
(:mod:`~bnlab.experiments.base`; a paired claim's rule text is generated from the verdict
code in :mod:`~bnlab.experiments.verdict`). :mod:`~bnlab.experiments.analysis` reads runs
for an analysis. The runner (:mod:`~bnlab.experiments.runner`) plans and resumes, the
store (:mod:`~bnlab.experiments.store`) owns the results folder, the scheduler
(:mod:`~bnlab.experiments.scheduler`) forks the runs; the report
(:mod:`~bnlab.experiments.report`) turns a results folder into Markdown and HTML.

>>> from bnlab.experiments import experiment_names
>>> experiment_names()[:3]
['convergence', 'lr-tolerance', 'depth']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bnlab.experiments.base import Experiment

# name -> module under bnlab.experiments; the order is the report's order
_MODULES: dict[str, str] = {
    "convergence": "convergence",
    "lr-tolerance": "lr_tolerance",
    "depth": "depth",
    "init-sensitivity": "init_sensitivity",
    "regularization": "regularization",
    "placement": "placement",
    "covariate-shift": "covariate_shift",
    "train-eval": "train_eval",
    "batch-size": "batch_size",
    "input-scale": "input_scale",
    "batch-vs-dataset": "batch_vs_dataset",
    "bjorck-2018": "bjorck_2018",
    "wu-johnson-2021": "wu_johnson_2021",
}


def experiment_names() -> list[str]:
    """The experiments' names, in the report's order."""
    return list(_MODULES)


def get_experiment(name: str) -> Experiment:
    """The experiment ``name`` (its module is imported on first use)."""
    if name not in _MODULES:
        raise ValueError(f"unknown experiment {name!r}; expected one of: "
                         f"{', '.join(_MODULES)}")
    module = importlib.import_module(f"bnlab.experiments.{_MODULES[name]}")
    exp: Experiment = module.EXPERIMENT
    return exp


__all__ = ["experiment_names", "get_experiment"]
