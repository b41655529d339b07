"""The shared verdict rule, and the paired-claim declaration whose rule text it generates.

Most claims compare two variants seed by seed (same init, same batches) and decide on the
per-seed differences with :func:`compare`. A :class:`PairedClaim` declares such a claim:
what is measured and the claimed size. Its rule text (shown in the report) is built from
:func:`rule_text`, which states the clauses of :func:`compare` with the same threshold and
the same factor, so the prose and the code cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["supported", "not supported", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("supported", "not supported", "inconclusive")

SE_FACTOR = 2.0  # how many standard errors separate a decided verdict from the threshold


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


def compare(diffs: Sequence[float], threshold: float,
            se_factor: float | None = None) -> tuple[Verdict, float, float]:
    """The shared verdict rule on per-seed differences (claimed direction positive).

    With ``d`` the mean difference, ``se = std / sqrt(n)`` its standard error over seeds
    and ``k = se_factor`` (:data:`SE_FACTOR` unless given):

    - ``supported`` when ``d >= threshold`` and ``d - k·se > 0``;
    - ``not supported`` when ``d + k·se < threshold`` (the effect is confidently smaller
      than the claimed size, or goes the other way);
    - ``inconclusive`` otherwise (the seeds' spread straddles the threshold).

    With one seed ``se`` is 0: the verdict then rests on that seed alone (the report says
    how many seeds there were). :func:`rule_text` states these clauses in words.
    Returns ``(verdict, d, se)``.
    """
    if not diffs:
        return "inconclusive", math.nan, math.nan
    d, sd, n = mean_std(diffs)
    if any(math.isnan(x) for x in diffs):
        return "inconclusive", d, math.nan
    se = sd / math.sqrt(n)
    k = SE_FACTOR if se_factor is None else se_factor
    if d >= threshold and d - k * se > 0:
        return "supported", d, se
    if d + k * se < threshold:
        return "not supported", d, se
    return "inconclusive", d, se


def rule_text(measure: str, threshold: str, se_factor: float | None = None) -> str:
    """:func:`compare`'s clauses in words, for a ``measure`` and a ``threshold`` as read."""
    k = f"{SE_FACTOR if se_factor is None else se_factor:g}"
    return (
        f"{measure}. supported if the mean difference is at least {threshold} and more than "
        f"{k} standard errors above zero; not supported if mean + {k} SE is below "
        f"{threshold}; inconclusive otherwise."
    )


def pm(d: float, se: float, n: int, digits: int) -> str:
    """``d ± se`` for a headline, with ``digits`` decimals and ``d`` signed.

    With one seed there is no standard error (``compare`` then uses 0), so none is shown,
    as :func:`bnlab.experiments.analysis.fmt_ms` shows no spread for one value:
    ``+1.2 (1 seed)`` rather than a misleading ``+1.2 ± 0.0``.
    """
    if n < 2:
        return f"{d:+.{digits}f} (1 seed)"
    return f"{d:+.{digits}f} ± {se:.{digits}f}"


@dataclass(frozen=True)
class Decision:
    """What :meth:`PairedClaim.decide` found: the verdict, the mean difference, its
    standard error and the number of seeds."""

    verdict: Verdict
    mean: float
    se: float
    seeds: int

    def pm(self, digits: int) -> str:
        """The effect for a headline (see :func:`pm`)."""
        return pm(self.mean, self.se, self.seeds, digits)


@dataclass(frozen=True)
class PairedClaim:
    """A claim decided by :func:`compare` on per-seed paired differences.

    ``measure`` says what one seed's difference is (the claimed direction positive),
    ``threshold`` the claimed size in ``unit`` (percentage points unless the claim says
    otherwise), ``threshold_text`` how the threshold reads when ``"{threshold} {unit}"``
    would not do. ``key`` names the mean difference in the result's effect, next to
    ``se_{suffix}`` and ``threshold_{suffix}``; ``note`` follows the rule (what the
    verdict leaves out).
    """

    measure: str
    threshold: float
    key: str = "diff_pp"
    unit: str = "percentage point"
    suffix: str = "pp"
    threshold_text: str | None = None
    note: str = ""

    @property
    def rule(self) -> str:
        """The rule in words, generated from :func:`compare`'s clauses."""
        text = rule_text(self.measure, self.threshold_phrase)
        return f"{text} {self.note}" if self.note else text

    @property
    def threshold_phrase(self) -> str:
        if self.threshold_text is not None:
            return self.threshold_text
        plural = "" if self.threshold == 1 else "s"
        return f"{self.threshold:g} {self.unit}{plural}"

    def decide(self, diffs: Sequence[float]) -> Decision:
        verdict, d, se = compare(diffs, self.threshold)
        return Decision(verdict, d, se, len(diffs))

    def effect(self, decision: Decision, *, before: Mapping[str, Any] | None = None,
               after: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The result's effect: ``before``, the mean difference, its standard error, the
        threshold, ``after`` and the number of seeds."""
        return {
            **(before or {}),
            self.key: decision.mean,
            f"se_{self.suffix}": decision.se,
            f"threshold_{self.suffix}": self.threshold,
            **(after or {}),
            "seeds": decision.seeds,
        }
