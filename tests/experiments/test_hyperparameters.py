"""The hyperparameter-robustness rule on synthetic results: per seed, the fraction of the
grid (learning rate × init scale × batch size) reaching the dataset's target, BN minus no
BN, decided by compare(); and the grid's runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bnlab.experiments import get_experiment
from bnlab.experiments.analysis import dataset_target, model_text
from bnlab.experiments.base import RunResult, RunSpec
from bnlab.experiments.hyperparameters import good_fraction

Results = Callable[..., list[RunResult]]
Outcome = Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, Any]]]]
CFG = get_experiment("hyperparameters").config("full")
CELLS = CFG.cells()


def good_cells(bn: list[int], none: list[int], acc: float = 0.99) -> Outcome:
    """Per seed, the first ``bn[seed]`` (``none[seed]``) cells of the grid end at ``acc``;
    the others diverge."""
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        cell = {k: spec.group[k] for k in CELLS[0]}
        if CELLS.index(cell) < (bn if spec.group["norm"] == "bn" else none)[spec.seed]:
            return {"test_acc": acc}, [{"step": CFG.steps, "test_acc": acc}]
        return {"test_acc": float("nan"), "diverged": True}, []
    return outcome


def test_the_grid_is_every_combination_with_its_own_settings() -> None:
    exp = get_experiment("hyperparameters")
    runs = exp.runs(CFG, "mnist")
    assert len(CELLS) == len(CFG.lrs) * len(CFG.scales) * len(CFG.batches) == 18
    assert len(runs) == 2 * len(CELLS) * len(CFG.seeds)
    for r in runs:
        assert (r.config.lr, r.config.init_scale, r.config.batch_size) == (
            r.group["lr"], r.group["init_scale"], r.group["batch"])
        assert r.config.norm == r.group["norm"] and r.config.eval_every == CFG.steps
    quick = exp.config("quick")
    assert quick.seeds == CFG.seeds[:3] and quick.cells() == CELLS and quick.steps == CFG.steps


@pytest.mark.parametrize(
    ("bn", "none", "expected"),
    [
        ([18, 17, 18, 16, 18], [6, 7, 5, 6, 8], "supported"),
        ([9, 9, 10, 9, 9], [9, 10, 9, 9, 9], "not supported"),
        ([6, 6, 6, 6, 6], [12, 11, 12, 13, 12], "not supported"),  # BN less robust
        ([18, 2, 17, 3, 16], [9, 9, 9, 9, 9], "inconclusive"),
    ],
)
def test_hyperparameter_verdicts(synthetic_results: Results, bn: list[int], none: list[int],
                                 expected: str) -> None:
    exp = get_experiment("hyperparameters")
    a = exp.analyse(CFG, synthetic_results("hyperparameters", good_cells(bn, none)))
    assert a.verdict == expected
    assert a.effect["grid_diff_pp"] == pytest.approx(100 * (sum(bn) - sum(none)) / 5 / 18)
    assert a.effect["good_fraction_bn"] == pytest.approx(sum(bn) / 5 / 18)
    assert "18-cell grid" in a.headline and "95 % CI" in a.headline


def test_a_grid_that_does_not_separate_decides_nothing(synthetic_results: Results) -> None:
    exp = get_experiment("hyperparameters")
    for count in (0, 18):
        cells = good_cells([count] * 5, [count] * 5)
        a = exp.analyse(CFG, synthetic_results("hyperparameters", cells))
        assert a.verdict == "inconclusive", count
    a = exp.analyse(CFG, synthetic_results("hyperparameters", good_cells([18, 0, 18, 0, 18],
                                                                  [18, 0, 18, 0, 18])))
    assert a.verdict == "inconclusive"
    assert "does not separate" in exp.rule


@pytest.mark.parametrize(("dataset", "fraction"), [("mnist", 0.0), ("fashion-mnist", 1.0)])
def test_a_cell_is_good_at_the_datasets_own_target(synthetic_results: Results, dataset: str,
                                                   fraction: float) -> None:
    """85 % reaches Fashion-MNIST's target (80 %), not MNIST's (93 %)."""
    results = synthetic_results("hyperparameters", good_cells([18] * 5, [18] * 5, acc=0.85),
                          dataset=dataset)
    seed0 = [r for r in results if r.spec.seed == 0 and r.spec.group["norm"] == "bn"]
    assert good_fraction(CFG, seed0, dataset_target(CFG.targets, results)) == fraction
    assert good_fraction(CFG, seed0[:9], 0.5) == pytest.approx(0.5)  # a missing cell: not good


def test_dataset_target_refuses_an_undeclared_dataset(synthetic_results: Results) -> None:
    results = synthetic_results("hyperparameters", good_cells([1] * 5, [1] * 5), dataset="digits")
    with pytest.raises(ValueError, match="no accuracy target declared for dataset 'digits'"):
        dataset_target(CFG.targets, results)
    mixed = results[:1] + synthetic_results("hyperparameters", good_cells([1] * 5, [1] * 5))[:1]
    with pytest.raises(ValueError, match="the runs of one dataset"):
        dataset_target(CFG.targets, mixed)


def test_model_text_names_every_option() -> None:
    assert model_text("deep_mlp", {"depth": 8}) == (
        "deep_mlp (depth 8, width 100, dropout 0.0, residual False)")
