"""The shared verdict rule, and the paired-claim declaration whose rule text it generates.

Most claims compare two variants seed by seed (same init, same batches) and decide on the
per-seed differences with :func:`compare`: the mean difference and its 95 % confidence
interval from Student's t with n − 1 degrees of freedom. A :class:`PairedClaim` declares
such a claim: what is measured and the claimed size. Its rule text (shown in the report) is
built from :func:`rule_text`, which states the clauses of :func:`compare` with the same
threshold and the same confidence level, so the prose and the code cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["supported", "not supported", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("supported", "not supported", "inconclusive")

CONFIDENCE = 0.95  # the two-sided confidence level of every interval a verdict rests on
MIN_SEEDS = 2  # fewer seeds than this never decide a verdict (no spread to measure)


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


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified
    Lentz's method); converges quickly for ``x < (a + 1) / (a + b + 2)``."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`t_cdf`, to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def interval(values: Sequence[float], confidence: float | None = None) -> tuple[float, float]:
    """The two-sided ``confidence`` (:data:`CONFIDENCE` unless given) interval of the mean
    of ``values`` from Student's t with n − 1 degrees of freedom: ``mean ± t · sd /
    sqrt(n)``; ``(nan, nan)`` with fewer than two values or a non-finite one."""
    confidence = CONFIDENCE if confidence is None else confidence
    m, sd, n = mean_std(values)
    if n < 2 or not (math.isfinite(m) and math.isfinite(sd)):
        return math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return m - half, m + half


@dataclass(frozen=True)
class Decision:
    """What :func:`compare` found: the verdict, the mean difference, its standard error,
    the number of seeds, and the 95 % interval ``[low, high]`` (nan with < 2 seeds)."""

    verdict: Verdict
    mean: float
    se: float
    seeds: int
    low: float = math.nan
    high: float = math.nan

    def pm(self, digits: int) -> str:
        """The effect for a headline (see :func:`pm`)."""
        return pm(self.mean, self.low, self.high, self.seeds, digits)


def compare(diffs: Sequence[float], threshold: float) -> Decision:
    """The shared verdict rule on per-seed differences (claimed direction positive).

    With ``d`` the mean difference over the n seeds and ``[low, high]`` its
    :data:`CONFIDENCE` interval from Student's t with n − 1 degrees of freedom
    (:func:`interval`):

    - ``supported`` when ``low > 0`` (the whole interval above zero) and ``d >= threshold``;
    - ``not supported`` when ``high < threshold`` (the effect is confidently smaller than
      the claimed size, or goes the other way);
    - ``inconclusive`` otherwise (the interval straddles the threshold), and always with
      fewer than :data:`MIN_SEEDS` seeds or a non-finite difference.

    :func:`rule_text` states these clauses in words.
    """
    if not diffs:
        return Decision("inconclusive", math.nan, math.nan, 0)
    d, sd, n = mean_std(diffs)
    se = sd / math.sqrt(n) if n >= MIN_SEEDS else math.nan
    low, high = interval(diffs)
    if n < MIN_SEEDS or not all(math.isfinite(float(x)) for x in diffs):
        return Decision("inconclusive", d, se, n, low, high)
    if low > 0 and d >= threshold:
        return Decision("supported", d, se, n, low, high)
    if high < threshold:
        return Decision("not supported", d, se, n, low, high)
    return Decision("inconclusive", d, se, n, low, high)


def rule_text(measure: str, threshold: str) -> str:
    """:func:`compare`'s clauses in words, for a ``measure`` and a ``threshold`` as read."""
    level = f"{100 * CONFIDENCE:g} %"
    return (
        f"{measure}. Over the seeds, the mean difference and its {level} confidence "
        f"interval (Student's t with n − 1 degrees of freedom): supported if the whole "
        f"interval is above zero and the mean is at least {threshold}; not supported if the "
        f"interval's upper end is below {threshold}; inconclusive otherwise, and always "
        f"with fewer than {MIN_SEEDS} seeds."
    )


def pm(d: float, low: float, high: float, n: int, digits: int) -> str:
    """The mean difference and its interval for a headline, ``+1.2 (95 % CI +0.4 to
    +2.0, 5 seeds)``; with one seed, which decides nothing, ``+1.2 (1 seed)``."""
    if n < MIN_SEEDS or not (math.isfinite(low) and math.isfinite(high)):
        return f"{d:+.{digits}f} ({n} seed{'s' if n != 1 else ''})"
    return (f"{d:+.{digits}f} ({100 * CONFIDENCE:g} % CI {low:+.{digits}f} to "
            f"{high:+.{digits}f}, {n} seeds)")


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
        return compare(diffs, self.threshold)

    def effect(self, decision: Decision, *, before: Mapping[str, Any] | None = None,
               after: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The result's effect: ``before``, the mean difference, its standard error and
        95 % interval, the threshold, ``after`` and the number of seeds."""
        return {
            **(before or {}),
            self.key: decision.mean,
            f"se_{self.suffix}": decision.se,
            f"ci_low_{self.suffix}": decision.low,
            f"ci_high_{self.suffix}": decision.high,
            f"threshold_{self.suffix}": self.threshold,
            **(after or {}),
            "seeds": decision.seeds,
        }
