"""The verdict rules on synthetic results: each rule says what its docstring says, before
any real run. Also run identity (the hash) and the shared statistics."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from bnlab.experiments import base, experiment_names, get_experiment, verdict
from bnlab.experiments.analysis import acc_curve, final_acc
from bnlab.experiments.base import RunResult, RunSpec
from bnlab.experiments.covariate_shift import drift
from bnlab.experiments.verdict import PairedClaim, compare, mean_std
from bnlab.train import TrainConfig


def results_for(name: str, outcome: Any, profile: str = "full") -> list[RunResult]:
    """Results for every planned run of ``name``: ``outcome(spec) -> (summary, metrics)``."""
    exp = get_experiment(name)
    out = []
    for spec in exp.runs(exp.config(profile), "mnist"):
        summary, metrics = outcome(spec)
        out.append(RunResult(spec, spec.run_id(name), summary, metrics))
    return out


def curve(final: float, steps: int = 5) -> list[dict[str, Any]]:
    return [{"step": 100 * (i + 1), "test_acc": final * (i + 1) / steps} for i in range(steps)]


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([2.0, 2.2, 1.9], "supported"),
        ([0.1, -0.2, 0.05], "not supported"),
        ([-3.0, -2.5, -3.2], "not supported"),  # the other way round
        ([5.0, -4.0, 3.0], "inconclusive"),  # the interval straddles the threshold
        ([1.5], "inconclusive"),  # one seed decides nothing, however large
        ([100.0], "inconclusive"),
        ([-100.0], "inconclusive"),
        ([], "inconclusive"),
        ([2.0, math.nan, 2.0], "inconclusive"),
        ([2.0, math.inf, 2.0], "inconclusive"),
    ],
)
def test_compare(diffs: list[float], expected: str) -> None:
    decision = compare(diffs, 1.0)
    assert decision.verdict == expected
    assert decision.seeds == len(diffs)
    if len(diffs) >= 2 and all(math.isfinite(x) for x in diffs):
        m, s, n = mean_std(diffs)
        assert decision.mean == pytest.approx(m) and decision.se == pytest.approx(s / math.sqrt(n))
        half = verdict.t_quantile(0.975, n - 1) * s / math.sqrt(n)
        assert (decision.low, decision.high) == (pytest.approx(m - half), pytest.approx(m + half))


# two-sided 95 % critical values of Student's t (any printed table)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 29: 2.045,
           120: 1.980}


@pytest.mark.parametrize(("df", "value"), sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df: int, value: float) -> None:
    assert verdict.t_quantile(0.975, df) == pytest.approx(value, abs=6e-4)
    assert verdict.t_quantile(0.025, df) == pytest.approx(-value, abs=6e-4)
    assert verdict.t_cdf(verdict.t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-10)


def test_t_quantile_tends_to_the_normal_one() -> None:
    assert verdict.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_interval_uses_t_not_two_standard_errors() -> None:
    """With 3 seeds, a mean 3 SE above zero is decided by "mean − 2·SE > 0" but not by the
    t interval (t = 4.30 with 2 degrees of freedom)."""
    diffs = [2.0, 3.0, 4.0]  # mean 3, sd 1, se 0.577: 3 − 2·0.577 > 0, 3 − 4.30·0.577 > 0
    assert compare(diffs, 1.0).verdict == "supported"
    diffs = [0.5, 3.0, 5.5]  # mean 3, se 1.44: 3 − 2·1.44 > 0 but 3 − 4.30·1.44 < 0
    d = compare(diffs, 1.0)
    assert d.mean - 2 * d.se > 0 and d.low < 0 and d.verdict == "inconclusive"


def test_an_interval_straddling_the_threshold_is_inconclusive() -> None:
    """Above zero throughout, the mean above the threshold, but the interval's lower part
    below it and its upper part above: supported needs only the mean at the size, so it is
    supported; move the threshold above the mean and it is inconclusive, never "not
    supported", until the whole interval is below the threshold."""
    diffs = [1.0, 1.4, 1.2, 1.6, 0.8]
    d = compare(diffs, 1.0)
    assert 0 < d.low < 1.0 < d.high and d.verdict == "supported"
    assert compare(diffs, 1.3).verdict == "inconclusive"  # mean 1.2 < 1.3 < high
    assert compare(diffs, d.high + 0.01).verdict == "not supported"


def test_mean_std_matches_statistics_module() -> None:
    import statistics

    xs = [0.1, 0.4, 0.35, 0.2]
    m, s, n = mean_std(xs)
    assert (m, s, n) == (pytest.approx(statistics.mean(xs)), pytest.approx(statistics.stdev(xs)), 4)
    assert mean_std([3.0]) == (3.0, 0.0, 1)


def test_convergence_rule() -> None:
    def bn_faster(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        final = 0.99 if spec.group["norm"] == "bn" else 0.9 + 0.001 * spec.seed
        return {"test_acc": final}, curve(final)

    exp = get_experiment("convergence")
    a = exp.analyse(exp.config("full"), results_for("convergence", bn_faster))
    assert a.verdict == "supported"
    seeds = exp.config("full").seeds
    none_final = 0.9 + 0.001 * sum(seeds) / len(seeds)
    assert a.effect["curve_diff_pp"] == pytest.approx(100 * (0.99 - none_final) * 3 / 5)
    assert a.effect["target"] == 0.97
    assert a.effect["steps_to_target_bn"] == 500
    assert math.isinf(a.effect["steps_to_target_none"])

    def same(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return {"test_acc": 0.98}, curve(0.98 + 0.001 * spec.seed)

    assert exp.analyse(exp.config("full"), results_for("convergence", same)).verdict == (
        "not supported"
    )


def test_headline_shows_no_interval_for_one_seed() -> None:
    """One seed has no spread; the headline must not print an interval for it."""
    exp = get_experiment("convergence")

    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        final = 0.99 if spec.group["norm"] == "bn" else 0.9 + 0.001 * spec.seed
        return {"test_acc": final}, curve(final)

    full = exp.config("full")
    one = replace(full, seeds=full.seeds[:1])
    results = [r for r in results_for("convergence", outcome) if r.spec.seed == full.seeds[0]]
    headline = exp.analyse(one, results).headline
    assert "(1 seed)" in headline and "CI" not in headline
    assert "95 % CI" in exp.analyse(full, results_for("convergence", outcome)).headline
    assert verdict.pm(1.234, 0.5, 2.0, 3, 1) == "+1.2 (95 % CI +0.5 to +2.0, 3 seeds)"
    assert verdict.pm(-1.234, math.nan, math.nan, 1, 2) == "-1.23 (1 seed)"


@pytest.mark.parametrize(
    ("bn_max", "none_max", "expected"),
    [(1.0, 0.1, "supported"), (0.1, 0.1, "not supported"), (0.03, 0.3, "not supported"),
     (None, None, "inconclusive"), (0.3, None, "supported")],
)
def test_lr_tolerance_rule(bn_max: float | None, none_max: float | None, expected: str) -> None:
    top = {"bn": bn_max, "none": none_max}

    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        limit = top[spec.group["norm"]]
        good = limit is not None and spec.group["lr"] <= limit
        return {"test_acc": 0.98 if good else 0.5, "diverged": not good}, curve(0.98)

    exp = get_experiment("lr-tolerance")
    a = exp.analyse(exp.config("full"), results_for("lr-tolerance", outcome))
    assert a.verdict == expected
    assert a.effect["max_good_lr_bn"] == bn_max and a.effect["max_good_lr_none"] == none_max


def test_init_sensitivity_counts_diverged_runs_as_chance() -> None:
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if spec.group["norm"] == "none" and spec.group["init_scale"] == 10.0:
            return {"test_acc": float("nan"), "diverged": True}, []
        return {"test_acc": 0.98}, curve(0.98)

    exp = get_experiment("init-sensitivity")
    a = exp.analyse(exp.config("full"), results_for("init-sensitivity", outcome))
    assert a.verdict == "supported"
    assert a.effect["range_none_pp"] == pytest.approx(88.0)
    assert a.effect["range_bn_pp"] == pytest.approx(0.0)


def test_batch_size_rule() -> None:
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        acc = 0.97
        if spec.group["norm"] in ("bn", "renorm", "ghost") and spec.group["batch"] == 2:
            acc = 0.6
        return {"test_acc": acc}, curve(acc)

    exp = get_experiment("batch-size")
    a = exp.analyse(exp.config("full"), results_for("batch-size", outcome))
    assert a.verdict == "supported"
    assert a.effect["gap_growth_pp"] == pytest.approx(37.0)


def test_train_eval_rule() -> None:
    def outcome(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        variants = {"running": 0.98, "batch_1000": 0.98, "batch_32": 0.97, "batch_8": 0.9,
                    "batch_2": 0.4}
        return {"test_acc": 0.98, "eval_variants": variants}, curve(0.98)

    exp = get_experiment("train-eval")
    a = exp.analyse(exp.config("full"), results_for("train-eval", outcome))
    assert a.verdict == "supported" and a.effect["diff_pp"] == pytest.approx(58.0)


def test_covariate_shift_drift_is_scale_free() -> None:
    def run(scale: float, moves: list[float]) -> RunResult:
        spec = RunSpec({"norm": "bn", "backend": "torch"}, 0, TrainConfig())
        metrics = [{"step": 0, "p15": 9.0, "p50": 9.0, "p85": 9.0}]  # init: ignored
        for i, m in enumerate(moves):
            metrics.append({"step": 100 * (i + 1), "p15": scale * (m - 1), "p50": scale * m,
                            "p85": scale * (m + 1)})
        return RunResult(spec, "x", {"test_acc": 0.9}, metrics)

    assert drift(run(1.0, [0.0, 0.0, 0.0])) == 0.0
    assert drift(run(1.0, [0.0, 1.0, 2.0])) == pytest.approx(1.0 / 2.0)
    assert drift(run(10.0, [0.0, 1.0, 2.0])) == pytest.approx(drift(run(1.0, [0.0, 1.0, 2.0])))


def test_run_id_covers_the_config_and_version_but_not_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = RunSpec({"norm": "bn"}, 0, TrainConfig(lr=0.1))
    rid = spec.run_id("convergence")
    assert len(rid) == 16 and rid == spec.run_id("convergence")
    assert replace(spec, config=replace(spec.config, threads=7)).run_id("convergence") == rid
    assert replace(spec, config=replace(spec.config, lr=0.2)).run_id("convergence") != rid
    assert replace(spec, seed=1).run_id("convergence") != rid
    assert spec.run_id("depth") != rid
    monkeypatch.setattr(base, "__version__", "9.9.9")
    assert spec.run_id("convergence") != rid


def test_every_experiment_plans_distinct_runs_and_states_its_rule() -> None:
    from bnlab.experiments import experiment_names

    for name in experiment_names():
        exp = get_experiment(name)
        assert exp.rule and exp.claim and exp.seeds
        for profile in ("smoke", "quick", "full"):
            # every config embeds the shared training settings
            assert isinstance(exp.config(profile), base.TrainSettings), name
            runs = exp.runs(exp.config(profile), "mnist")
            assert len({r.run_id(name) for r in runs}) == len(runs)
        with pytest.raises(ValueError, match="unknown profile"):
            exp.config("huge")


@pytest.mark.parametrize("name", experiment_names())
def test_quick_runs_at_least_three_seeds_and_full_five(name: str) -> None:
    """One seed decides nothing; quick's verdicts need 3 seeds, full's 5."""
    exp = get_experiment(name)
    for profile, least in (("quick", 3), ("full", 5)):
        runs = exp.runs(exp.config(profile), "mnist")
        assert len({r.seed for r in runs}) >= least, (name, profile)


def test_paired_rule_text_follows_the_threshold_and_the_verdict_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rule text is generated from what compare() does: change the threshold (or the
    confidence level) and both the text and the verdict move together."""
    claim = PairedClaim("Per seed, A minus B", threshold=1.0)
    assert claim.rule == (
        "Per seed, A minus B. Over the seeds, the mean difference and its 95 % confidence "
        "interval (Student's t with n − 1 degrees of freedom): supported if the whole interval "
        "is above zero and the mean is at least 1 percentage point; not supported if the "
        "interval's upper end is below 1 percentage point; inconclusive otherwise, and always "
        "with fewer than 2 seeds."
    )
    three = replace(claim, threshold=3.0)
    assert "at least 3 percentage points" in three.rule and "below 3 percentage points" in (
        three.rule)
    assert "1 percentage point" not in three.rule
    diffs = [2.0, 2.2, 1.9]
    assert claim.decide(diffs).verdict == "supported"
    assert three.decide(diffs).verdict == "not supported"  # 2.03 + 4.30·0.088 < 3
    monkeypatch.setattr(verdict, "CONFIDENCE", 0.99999)
    assert "99.999 % confidence interval" in claim.rule
    assert claim.decide(diffs).verdict == "inconclusive"  # the interval now reaches below 0


def test_every_paired_experiment_states_the_rule_of_its_declaration() -> None:
    from bnlab.experiments import experiment_names

    paired = 0
    for name in experiment_names():
        module = __import__(type(get_experiment(name)).__module__, fromlist=["PAIRED"])
        claim = getattr(module, "PAIRED", None)
        if claim is None:
            continue
        paired += 1
        assert get_experiment(name).rule == claim.rule, name
        assert f"{claim.threshold_phrase};" in claim.rule
    assert paired >= 8


def test_chance_accuracy_comes_from_the_datasets_class_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bnlab.data import DATASET_INFO

    spec = RunSpec({"norm": "bn"}, 0, TrainConfig(dataset="digits"))
    diverged = RunResult(spec, "x", {"test_acc": float("nan"), "diverged": True},
                         [{"step": 1, "test_acc": 0.5}, {"step": 2, "test_acc": float("nan")}])
    assert final_acc(diverged) == pytest.approx(0.1)
    monkeypatch.setitem(DATASET_INFO, "digits", ((1, 8, 8), 4))
    assert final_acc(diverged) == pytest.approx(0.25)
    assert acc_curve(diverged) == ([1, 2], [0.5, 0.25])


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_declares_its_words_its_literature_and_its_practice(name: str) -> None:
    """The report shows, for each experiment, the seeds' words (a seed claim) or the paper
    (a literature experiment), what the literature found, and one sentence per verdict."""
    exp = get_experiment(name)
    assert exp.section in ("claim", "literature"), name
    assert exp.literature and exp.papers, name
    if exp.section == "claim":
        assert exp.seeds and exp.quote, name
    assert set(exp.practice) == set(verdict.VERDICTS), name
    assert all(sentence.strip() for sentence in exp.practice.values()), name


SEED_CLAIMS = {
    "convergence", "lr-tolerance", "depth", "init-sensitivity", "regularization", "placement",
    "covariate-shift", "train-eval", "batch-size", "weight-decay", "dropout", "input-scale",
    "gradient-health", "hyperparameters", "batch-vs-dataset",
}
LITERATURE = {"santurkar-2018", "yang-2019", "bjorck-2018", "wu-johnson-2021"}


def test_the_lab_has_every_seed_claim_and_the_four_papers_tests() -> None:
    names = experiment_names()
    assert len(names) == len(set(names))
    by_section = {s: {n for n in names if get_experiment(n).section == s}
                  for s in ("claim", "literature")}
    assert by_section == {"claim": SEED_CLAIMS, "literature": LITERATURE}
