"""The tests behind a sweep's verdicts: Welch's t-test between two runs' seeds, the paired t-test over the seeds
they share, and Holm's correction for the many comparisons of one table.

With 3 seeds a side a comparison has 2 to 4 degrees of freedom, where the two-sided 5 % critical t is 2.8 to 4.3:
"more than two standard errors apart" would call far too much a difference. A side with one seed has no variance of
its own, so it is not tested (it never borrows the other side's)."""

from __future__ import annotations

from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class TTest:
    difference: float  # mean of `other` minus mean of `mine`: positive when mine is lower
    low: float  # the 95 % confidence interval of the difference
    high: float
    t: float
    df: float
    p: float  # two-sided
    n: int  # seeds behind it: both sides (Welch) or the pairs (paired)


def welch(mine: list[float], other: list[float]) -> TTest | None:
    """Welch's unequal-variance t-test of other - mine, with the Welch-Satterthwaite degrees of freedom; None when a
    side has fewer than 2 values or neither has any spread."""
    if min(len(mine), len(other)) < 2 or len(set(mine)) == len(set(other)) == 1:
        return None
    result = stats.ttest_ind(other, mine, equal_var=False)
    return _tested(result, sum(other) / len(other) - sum(mine) / len(mine), len(mine) + len(other))


def paired(mine: dict[int, float], other: dict[int, float]) -> TTest | None:
    """The paired t-test of other - mine over the seeds both sides ran (None below 2 shared seeds): a seed fixes the
    initialisation and the data order, so pairing removes what the two runs share."""
    shared = sorted(set(mine) & set(other))
    if len(shared) < 2 or len({other[s] - mine[s] for s in shared}) == 1:
        return None
    result = stats.ttest_rel([other[s] for s in shared], [mine[s] for s in shared])
    return _tested(result, sum(other[s] - mine[s] for s in shared) / len(shared), len(shared))


def _tested(result, difference: float, n: int) -> TTest | None:
    interval = result.confidence_interval(LEVEL)
    return TTest(difference, float(interval.low), float(interval.high), float(result.statistic), float(result.df),
                 float(result.pvalue), n)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment: the family-wise error rate of the whole list stays at the level a p-value is
    compared with. The k-th smallest p is multiplied by (m - k + 1), and the adjusted values are kept monotone."""
    order = sorted(range(len(pvalues)), key=pvalues.__getitem__)
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted
