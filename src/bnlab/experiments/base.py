"""What an experiment is: a claim, runs, a metric and a verdict rule written before any run.

An :class:`Experiment` subclass (one module per claim) declares

- ``claim``, ``seeds`` (the seed documents making it), ``quote`` (their own words),
  ``section`` (``"claim"`` for a seed claim, ``"literature"`` for a paper's own test of
  the mechanism), ``papers`` (the literature it is read against), ``literature`` (what
  those papers found, with their number and dataset), ``practice`` (for each verdict, one
  plain sentence on what it means in practice, written before the runs), ``rule`` (the
  verdict rule in plain words, shown in the report; a paired claim generates it from the
  verdict code, see :class:`bnlab.experiments.verdict.PairedClaim`) and one frozen config
  per profile
  (``smoke``, ``quick``, ``full``) in ``profiles``; each config embeds the shared
  :class:`TrainSettings` and adds what the claim sweeps or measures;
- ``runs(cfg, dataset)``: the list of :class:`RunSpec` (one training run each);
- ``runners()``: for each :attr:`RunSpec.kind` it uses, the function that performs such a
  run from a :class:`RunContext` and returns its :class:`RunOutput` (``"train"``, the
  plain training loop, unless the claim needs more);
- ``analyse(cfg, results)``: the metric, the per-config table and the verdict, computed by
  code fixed before the runs;
- ``plot(cfg, results, out_dir)``: PNG files.

A run's identity is a hash of its full config (and the bnlab version), so a rerun finds
what is done and a changed config never reuses an old result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bnlab import __version__
from bnlab.experiments.verdict import VERDICTS, Verdict
from bnlab.train import TrainConfig

if TYPE_CHECKING:
    from bnlab.data import DatasetSplits

PROFILES: tuple[str, ...] = ("smoke", "quick", "full")


@dataclass(frozen=True)
class RunSpec:
    """One run: a training config plus the labels that place it in the comparison.

    ``group`` is the run's cell in the comparison (e.g. ``{"norm": "bn", "lr": 0.1}``);
    runs that differ only by ``seed`` are averaged. ``kind`` selects the experiment's run
    function (:meth:`Experiment.runners`); ``params`` are its extra inputs.
    """

    group: dict[str, Any]
    seed: int
    config: TrainConfig
    kind: str = "train"
    params: dict[str, Any] = field(default_factory=dict)

    def identity(self, experiment: str) -> dict[str, Any]:
        """Everything that determines the result. ``threads`` is left out on purpose: it is
        set per invocation from ``--jobs`` and does not change what is being measured."""
        return {
            "experiment": experiment,
            "kind": self.kind,
            "group": self.group,
            "seed": self.seed,
            "config": asdict(replace(self.config, threads=None)),
            "params": self.params,
            "bnlab_version": __version__,
        }

    def run_id(self, experiment: str) -> str:
        text = json.dumps(self.identity(experiment), sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.group.items())


@dataclass(frozen=True)
class RunContext:
    """What the lab hands a run, explicitly: the dataset (loaded once by the lab; forked
    runs share it copy-on-write), the threads the run may use, whether it shows progress."""

    data: DatasetSplits
    threads: int = 1
    progress: bool | None = False


@dataclass(frozen=True)
class RunOutput:
    """What a run function returns; the lab writes it into the run's folder."""

    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


RunFunction = Callable[[RunSpec, RunContext], RunOutput]


@dataclass(frozen=True)
class RunResult:
    """A completed run as read back from its folder."""

    spec: RunSpec
    run_id: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def chance(self) -> float:
        """Chance accuracy on the run's dataset, ``1 / classes``: what a diverged run scores."""
        from bnlab.data import DATASET_INFO

        return 1.0 / DATASET_INFO[self.spec.config.dataset][1]


@dataclass
class Analysis:
    """What ``analyse`` returns; stored in ``result.json`` and shown in the report.

    ``effect`` holds the numbers the rule used (name -> value), ``headline`` is one sentence
    with the measured effect, ``table`` the per-config rows (mean ± std over seeds) that
    also go to ``NAME.csv``.
    """

    verdict: Verdict
    headline: str
    effect: dict[str, Any]
    table: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def train_run(spec: RunSpec, ctx: RunContext) -> RunOutput:
    """The plain training loop on the lab's data (the ``"train"`` kind)."""
    from bnlab.train import train

    result = train(spec.config, out_dir=None, progress=ctx.progress, data=ctx.data)
    return RunOutput(result.metrics, result.summary)


class Experiment:
    """Base class of the claims; see the module docstring."""

    name: str = ""
    claim: str = ""
    seeds: str = ""  # the seed documents making the claim, e.g. "000, 001"
    quote: str = ""  # the seed documents' own words, verbatim
    section: str = "claim"  # "claim" (a seed's claim) or "literature" (a paper's test)
    papers: str = ""  # e.g. "Santurkar et al., NeurIPS 2018"
    literature: str = ""  # what the papers found: their number, their dataset
    practice: ClassVar[dict[str, str]] = {}  # verdict -> one plain sentence
    rule: str = ""
    profiles: ClassVar[dict[str, Any]] = {}
    warm_up: bool = True  # the runner trains each model one step before forking the runs

    def config(self, profile: str) -> Any:
        if profile not in self.profiles:
            raise ValueError(
                f"unknown profile {profile!r}; expected one of: {', '.join(self.profiles)}"
            )
        return self.profiles[profile]

    def protocol(self, cfg: Any) -> str:
        raise NotImplementedError

    def runs(self, cfg: Any, dataset: str) -> list[RunSpec]:
        raise NotImplementedError

    def runners(self) -> dict[str, RunFunction]:
        """Run kind -> the function that performs a run of that kind."""
        return {"train": train_run}

    def execute(self, spec: RunSpec, ctx: RunContext) -> RunOutput:
        """Perform ``spec`` with the run function of its kind."""
        runners = self.runners()
        if spec.kind not in runners:
            raise ValueError(f"experiment {self.name}: no run function for kind "
                             f"{spec.kind!r}; expected one of: {', '.join(runners)}")
        return runners[spec.kind](spec, ctx)

    def analyse(self, cfg: Any, results: list[RunResult]) -> Analysis:
        raise NotImplementedError

    def plot(self, cfg: Any, results: list[RunResult], out_dir: Path) -> list[str]:
        return []


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """The training settings a claim's runs share (one profile). Each claim's config
    embeds them (a subclass) and adds what it sweeps or measures; a run that sweeps one of
    these settings sets it itself (:func:`train_config`)."""

    seeds: tuple[int, ...]
    steps: int
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    eval_subset: int | None = None
    model: str = "seed_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


# The settings train_config copies into every run (seeds are the runs' own; model_kwargs
# are copied so that a run may add to them).
_SHARED = tuple(f.name for f in fields(TrainSettings) if f.name not in ("seeds", "model_kwargs"))


@dataclass(frozen=True, kw_only=True)
class CurveConfig(TrainSettings):
    """Settings of a comparison that tracks test accuracy along training."""

    eval_every: int


def train_config(cfg: TrainSettings, dataset: str, seed: int, **run: Any) -> TrainConfig:
    """The training config of one run of an experiment with config ``cfg``.

    ``run`` holds what the run sets itself (``norm``, ``eval_every``, the swept value …).
    Every shared setting of ``cfg`` the run does not set, and a copy of ``model_kwargs``,
    come from ``cfg``.
    """
    shared = {k: getattr(cfg, k) for k in _SHARED if k not in run}
    if "model_kwargs" not in run:
        shared["model_kwargs"] = dict(cfg.model_kwargs)
    return TrainConfig(dataset=dataset, seed=seed, **shared, **run)
