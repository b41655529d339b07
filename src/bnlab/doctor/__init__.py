"""bnlab.doctor: find the batch-norm mistakes in a model (and its data), measure what each
costs, and fix them in one call.

``examine(model, batches=None, *, loss_fn=None, ...) -> Report``: static checks of the
module tree and the torch.fx graph, and with a few batches of data, hook-based measurements
(statistics gap, dropout variance shift, train/eval divergence, tiny batches, batch
composition); nothing of the model changes. ``fix(model, report, which=...)`` returns a new
model with the chosen remedies applied. ``bnlab doctor CHECKPOINT_OR_MODULE --data mnist``
is the command line.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from bnlab.doctor import examine
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=0.99), nn.ReLU())
    >>> report = examine(net)
    >>> sorted(f.code for f in report.findings)
    ['bias_before_bn', 'momentum_keras']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnlab.doctor._examine import CODES, examine
    from bnlab.doctor._fix import REMEDIES, fix
    from bnlab.doctor._report import GAP_WARN, SEVERITIES, Finding, LayerStats, Report

# Imported on first use, so that the command line's parser (bnlab.doctor._cli) stays light.
_WHERE = {
    "CODES": "_examine", "examine": "_examine", "REMEDIES": "_fix", "fix": "_fix",
    "GAP_WARN": "_report", "SEVERITIES": "_report", "Finding": "_report",
    "LayerStats": "_report", "Report": "_report",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bnlab.doctor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"bnlab.doctor.{_WHERE[name]}"), name)


__all__ = [
    "CODES",
    "GAP_WARN",
    "REMEDIES",
    "SEVERITIES",
    "Finding",
    "LayerStats",
    "Report",
    "examine",
    "fix",
]
