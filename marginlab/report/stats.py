"""The statistics of the report: a confidence interval over seeds, a test of each row against the best row (paired
on shared seeds, else Welch), Holm's correction over those tests, and how many seeds a difference needs.

SciPy is imported inside the functions: ``marginlab --help`` and ``marginlab report --help`` stay fast."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

#: the target power of ``seeds_needed`` and its upper bound on n (a difference far below the noise)
POWER = 0.8
MAX_SEEDS = 1000


@dataclass(frozen=True)
class Summary:
    """mean, sample std (n - 1; None for one seed) and the Student-t interval of the mean (None below 2 seeds)."""

    mean: float
    std: float | None
    n: int
    ci_low: float | None = None
    ci_high: float | None = None

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None else self.ci_high - self.mean


def summarize(values: list[float], level: float = 0.95) -> Summary | None:
    """Mean +- t_{(1+level)/2, n-1} s / sqrt(n): the Student t interval of the mean over seeds (Student 1908)."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Summary(mean, None, len(values))
    from scipy import stats

    std = statistics.stdev(values)
    half = float(stats.t.ppf((1 + level) / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return Summary(mean, std, len(values), mean - half, mean + half)


def _t_p(t: float, df: float) -> float:
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def paired_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided paired t-test of mean(a - b) = 0 (``scipy.stats.ttest_rel``); a, b in seed order. None below 2
    pairs; identical differences give 1 (all zero) or 0 (a constant shift: no noise to hide it)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return None
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 1.0 if statistics.fmean(diffs) == 0 else 0.0
    return _t_p(statistics.fmean(diffs) / (sd / math.sqrt(len(diffs))), len(diffs) - 1)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test (unequal variances, Welch-Satterthwaite df; Welch 1947), ``ttest_ind(equal_var=False)``.
    None below 2 values on either side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return 1.0 if diff == 0 else 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return _t_p(diff / math.sqrt(va + vb), df)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order: the i-th smallest p times (m - i + 1),
    made monotone, capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired_power(n: int, delta: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n pairs to detect a mean difference ``delta`` when the per-seed
    differences have std ``sd``: P(|T| > t_crit) with T ~ noncentral t(n - 1, delta sqrt(n) / sd)."""
    from scipy import stats

    df, nc = n - 1, delta * math.sqrt(n) / sd
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(delta: float, sd: float, alpha: float = 0.05, power: float = POWER) -> int | None:
    """The fewest seeds (pairs, >= 2) whose paired t-test detects ``delta`` with ``power``; None past MAX_SEEDS."""
    if sd == 0:
        return 2
    for n in range(2, MAX_SEEDS + 1):
        if paired_power(n, abs(delta), sd, alpha) >= power:
            return n
    return None


@dataclass
class VsBest:
    """One row's test against the best row."""

    test: str  # "paired" (the same seeds) or "Welch"
    p: float | None  # two-sided; None when a side has fewer than 2 seeds
    p_holm: float | None = None
    seeds_needed: int | None = None  # for a ``detect`` difference at 80% power (None: no estimate, or > MAX_SEEDS)
    sd: float | None = None  # the std of the per-seed difference the estimate is from


def versus_best(best: dict[str, float], rows: list[dict[str, float]], alpha: float, detect: float) -> list[VsBest]:
    """Each row (seed -> value) against the best row: a paired t-test when both ran the same seeds (same seed = same
    init and data order), else Welch's; Holm-adjusted over the rows that could be tested; seeds needed for
    ``detect`` from the std of the per-seed difference (unpaired: sqrt(var_a + var_b), the no-correlation value)."""
    results = []
    for values in rows:
        if set(values) == set(best) and len(values) >= 2 and "null" not in values:
            seeds = sorted(values)
            ours, ref = [values[s] for s in seeds], [best[s] for s in seeds]
            result = VsBest("paired", paired_p(ours, ref), sd=statistics.stdev([x - y for x, y in zip(ours, ref)]))
        else:
            a, b = list(values.values()), list(best.values())
            sd = math.sqrt(statistics.variance(a) + statistics.variance(b)) if min(len(a), len(b)) >= 2 else None
            result = VsBest("Welch", welch_p(a, b), sd=sd)
        if result.sd is not None:
            result.seeds_needed = seeds_needed(detect, result.sd, alpha)
        results.append(result)
    tested = [r for r in results if r.p is not None]
    for result, adjusted in zip(tested, holm([r.p for r in tested])):
        result.p_holm = adjusted
    return results
