"""What an experiment is: a claim, runs, a metric and a verdict rule written before any run.

An :class:`Experiment` subclass (one module per claim) provides

- ``claim``, ``seeds`` (the seed documents making it), ``rule`` (the verdict rule in plain
  words, shown in the report) and one frozen config per profile (``smoke``, ``quick``,
  ``full``) in ``profiles``;
- ``runs(cfg, dataset)``: the list of :class:`RunSpec` (one training run each);
- optionally ``execute(spec, run_dir, progress)``: a custom run (the default trains with
  :func:`bnlab.train.train`); it writes ``metrics.jsonl`` and then ``summary.json`` LAST;
- ``analyse(cfg, results)``: the metric, the per-config table and the verdict, computed by
  code fixed before the runs (:func:`compare` is the shared rule);
- ``plot(cfg, results, out_dir)``: PNG files.

A run's identity is a hash of its full config (and the bnlab version), so a rerun finds
what is done and a changed config never reuses an old result.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from bnlab import __version__
from bnlab.train import TrainConfig

Verdict = Literal["supported", "not supported", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("supported", "not supported", "inconclusive")
PROFILES: tuple[str, ...] = ("smoke", "quick", "full")


@dataclass(frozen=True)
class RunSpec:
    """One run: a training config plus the labels that place it in the comparison.

    ``group`` is the run's cell in the comparison (e.g. ``{"norm": "bn", "lr": 0.1}``);
    runs that differ only by ``seed`` are averaged. ``kind`` selects the module's custom
    run function (``"train"`` is the plain training loop); ``params`` are its extra inputs.
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
        return group_label(self.group)


def group_label(group: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in group.items())


@dataclass(frozen=True)
class RunResult:
    """A completed run as read back from its folder."""

    spec: RunSpec
    run_id: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]


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


class Experiment:
    """Base class of the claims; see the module docstring."""

    name: str = ""
    claim: str = ""
    seeds: str = ""
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

    def execute(self, spec: RunSpec, run_dir: Path, progress: bool | None) -> None:
        """Run ``spec`` into ``run_dir``: the plain training loop, files written by the lab."""
        from bnlab.train import train

        result = train(spec.config, out_dir=None, progress=progress,
                       data=get_data(spec.config.dataset))
        write_run_files(run_dir, result.metrics, result.summary)

    def analyse(self, cfg: Any, results: list[RunResult]) -> Analysis:
        raise NotImplementedError

    def plot(self, cfg: Any, results: list[RunResult], out_dir: Path) -> list[str]:
        return []


_PRELOADED: dict[str, Any] = {}


def preload(dataset: str, data_dir: str | Path | None = None) -> None:
    """Load ``dataset`` once in the runner's process; forked runs share it (copy-on-write)
    instead of each reading and normalising the files again."""
    from bnlab.data import load_dataset

    _PRELOADED[dataset] = load_dataset(dataset, data_dir)


def get_data(dataset: str) -> Any:
    """The preloaded dataset, or loaded now (never downloaded) if the runner did not."""
    if dataset not in _PRELOADED:
        from bnlab.data import load_dataset

        _PRELOADED[dataset] = load_dataset(dataset, download=False)
    return _PRELOADED[dataset]


@dataclass(frozen=True)
class CurveConfig:
    """Settings of a comparison that tracks test accuracy along training (one profile)."""

    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    eval_subset: int | None = None
    model: str = "seed_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


# The settings a sweep's config gives every run unless the run sets its own (train_config).
SHARED_SETTINGS = ("model", "steps", "batch_size", "lr", "momentum", "eval_subset")


def train_config(cfg: Any, dataset: str, seed: int, **run: Any) -> TrainConfig:
    """The training config of one run of an experiment with config ``cfg``.

    ``run`` holds what the run sets itself (``norm``, ``eval_every``, the swept value …).
    Every :data:`SHARED_SETTINGS` the run does not set, and a copy of ``model_kwargs``,
    come from ``cfg``.
    """
    shared = {k: getattr(cfg, k) for k in SHARED_SETTINGS if k not in run}
    if "model_kwargs" not in run:
        shared["model_kwargs"] = dict(cfg.model_kwargs)
    return TrainConfig(dataset=dataset, seed=seed, **shared, **run)


def write_run_files(run_dir: Path, metrics: Sequence[dict[str, Any]], summary: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> None:
    """Write the run folder (:func:`bnlab.train.runfiles.write_run`: summary.json last)."""
    from bnlab.train.runfiles import write_run

    write_run(run_dir, metrics, summary, extra)


# --------------------------------------------------------------------------- statistics


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) and the count."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, math.nan, 0
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0, 1
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var), len(xs)


def compare(diffs: Sequence[float], threshold: float) -> tuple[Verdict, float, float]:
    """The shared verdict rule on per-seed differences (claimed direction positive).

    With ``d`` the mean difference and ``se = std / sqrt(n)`` its standard error over seeds:

    - ``supported`` when ``d >= threshold`` and ``d - 2·se > 0``;
    - ``not supported`` when ``d + 2·se < threshold`` (the effect is confidently smaller
      than the claimed size, or goes the other way);
    - ``inconclusive`` otherwise (the seeds' spread straddles the threshold).

    With one seed ``se`` is 0: the verdict then rests on that seed alone (the report says
    how many seeds there were). Returns ``(verdict, d, se)``.
    """
    if not diffs:
        return "inconclusive", math.nan, math.nan
    d, sd, n = mean_std(diffs)
    if any(math.isnan(x) for x in diffs):
        return "inconclusive", d, math.nan
    se = sd / math.sqrt(n)
    if d >= threshold and d - 2 * se > 0:
        return "supported", d, se
    if d + 2 * se < threshold:
        return "not supported", d, se
    return "inconclusive", d, se


def pm(d: float, se: float, n: int, digits: int) -> str:
    """``d ± se`` for a headline, with ``digits`` decimals and ``d`` signed.

    With one seed there is no standard error (``compare`` then uses 0), so none is shown,
    as :func:`fmt_ms` shows no spread for one value: ``+1.2 (1 seed)`` rather than a
    misleading ``+1.2 ± 0.0``.
    """
    if n < 2:
        return f"{d:+.{digits}f} (1 seed)"
    return f"{d:+.{digits}f} ± {se:.{digits}f}"


def final_acc(result: RunResult, num_classes: int = 10) -> float:
    """Final test accuracy in [0, 1]; a diverged run counts as chance (1 / classes)."""
    acc = result.summary.get("test_acc")
    if result.summary.get("diverged") or acc is None or not math.isfinite(float(acc)):
        return 1.0 / num_classes
    return float(acc)


def acc_curve(result: RunResult) -> tuple[list[int], list[float]]:
    """(steps, test accuracies) of a run's evaluations; non-finite values become chance."""
    steps, accs = [], []
    for m in result.metrics:
        if "test_acc" not in m:
            continue
        a = m["test_acc"]
        steps.append(int(m["step"]))
        accs.append(float(a) if a is not None and math.isfinite(float(a)) else 0.1)
    return steps, accs


def steps_to(result: RunResult, threshold: float) -> float:
    """First evaluated step with test accuracy >= threshold; ``inf`` if never reached."""
    for step, acc in zip(*acc_curve(result), strict=True):
        if acc >= threshold:
            return float(step)
    return math.inf


def paired_diffs_pp(claimed: Sequence[RunResult], other: Sequence[RunResult],
                    metric: Callable[[RunResult], float] = final_acc) -> list[float]:
    """Per seed, ``metric`` of the ``claimed`` run minus the ``other`` run, in percentage
    points; both lists sorted by seed, as :func:`select` returns them."""
    return [100 * (metric(a) - metric(b)) for a, b in zip(claimed, other, strict=True)]


def select(results: Iterable[RunResult], **group: Any) -> list[RunResult]:
    """The results whose group contains every ``key=value`` given, sorted by seed."""
    chosen = [r for r in results if all(r.spec.group.get(k) == v for k, v in group.items())]
    return sorted(chosen, key=lambda r: r.spec.seed)


def eval_set_text(eval_subset: int | None) -> str:
    """How the protocol names the evaluation set."""
    return "the full test set" if eval_subset is None else f"the first {eval_subset} test images"


def fmt_ms(values: Sequence[float], scale: float = 100.0, unit: str = " %") -> str:
    """``mean ± std`` of ``values`` times ``scale`` (accuracies in % by default)."""
    m, s, n = mean_std(values)
    if n == 0 or not math.isfinite(m):
        return "n/a"
    if n == 1:
        return f"{scale * m:.2f}{unit}"
    return f"{scale * m:.2f} ± {scale * s:.2f}{unit}"


def table_row(group: dict[str, Any], **cols: Any) -> dict[str, Any]:
    return {**{k: ("None" if v is None else v) for k, v in group.items()}, **cols}


def acc_row(group: dict[str, Any], runs: Sequence[RunResult], **cols: Any) -> dict[str, Any]:
    """The table row of ``group``: final accuracy (mean ± std), ``cols``, the number of
    diverged runs and of seeds."""
    return table_row(group, final_acc=fmt_ms([final_acc(r) for r in runs]), **cols,
                     diverged=sum(bool(r.summary.get("diverged")) for r in runs),
                     seeds=len(runs))
