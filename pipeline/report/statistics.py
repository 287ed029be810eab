"""Confidence intervals and verdicts for the papers' claims: a seeded, stratified, paired bootstrap.

A claim compares two strategies on the same test rows ("MeteoRA top-2 is within 2 points of the oracle") or one
strategy with a bar ("the router identifies at least 98% of the prompts"). Its statistic is a mean over tasks of a
per-task score (or score difference). One resample draws each task's rows with replacement, the same draw for
both strategies (paired: row i of one side is row i of the other, the same test prompt) and within each task
(stratified: every task keeps its row count); each side's metric is recomputed from the resampled per-row
statistics (``data.scoring.row_stats`` / ``from_stats``: exact for accuracy, ROUGE and corpus BLEU), then the
statistic. The interval is the percentile interval of ``resamples`` such statistics, drawn by numpy's
``default_rng(seed)`` with the tasks in sorted order, so the same records always give the same interval.

    a = {"winowhy": Side("accuracy", stats_oracle), ...}; b = {"winowhy": Side("accuracy", stats_top2), ...}
    iv = mean_difference(a, b)                           # Interval(estimate, low, high, ...)
    verdict(iv, 0.02, "<=")                              # ("yes" | "no" | "inconclusive", reason or None)

Verdicts, for a claim "statistic <= bar" (or ">=", or ">"):

* ``yes``: the whole interval is on the claim's side of the bar (touching the bar, to ``TIE``, counts as on it);
* ``no``: the whole interval is on the other side;
* ``inconclusive``: the interval contains the bar;
* ``None``: untestable, with a reason (every row of every task scores 0 on both sides; no rows).

Scores enter the mean as fractions: BLEU (0-100) is divided by 100, as the tables' averages do. scipy's
``stats.bootstrap`` resamples paired samples but not within strata, and corpus BLEU is no mean of rows, so the
resampling is written here: one multinomial draw of row counts per task and resample. Where a task's rows come in
clusters that ask the same question (``Side.clusters``: a composite sub-task cycled over more rows than its test
split holds), the draw is of clusters, each bringing all its rows, so repeats of one question do not narrow the
interval as independent rows would.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from data.scoring import from_stats

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
SIDES = ("<=", ">=", ">")
TIE = 1e-9  # a statistic this close to the bar ties with it (float noise: 0.5 - 0.48 = 0.020000000000000018)


@dataclass
class Side:
    """One strategy's rows of one task: the metric and its per-row statistics ``[N, k]`` (``data.scoring``);
    ``clusters`` [N] (optional): rows with the same id ask the same question (a composite sub-task cycled over
    more rows than it has test rows), so a resample draws them together: it draws the clusters with replacement,
    each bringing all its rows, and the interval does not count one question as several independent rows."""

    metric: str
    stats: np.ndarray
    clusters: np.ndarray | None = None


@dataclass
class Interval:
    """A statistic's point estimate and bootstrap interval; ``all_zero``: every task scored 0 on every side."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int
    seed: int
    rows: int
    all_zero: bool = False

    def to_dict(self) -> dict:
        return {"estimate": round(self.estimate, 6), "low": round(self.low, 6), "high": round(self.high, 6),
                "level": self.level, "resamples": self.resamples, "seed": self.seed, "rows": self.rows}


def unit(metric: str, value):
    """A score on [0, 1]: BLEU / 100, every other metric as it is."""
    return value / 100.0 if metric == "bleu" else value


def _value(side: Side, weights: np.ndarray | None = None):
    summed = side.stats.sum(0) if weights is None else weights @ side.stats
    return unit(side.metric, from_stats(side.metric, summed))


def mean_difference(a: dict[str, Side], b: dict[str, Side] | None = None, *, resamples: int = RESAMPLES,
                    seed: int = SEED, level: float = LEVEL) -> Interval:
    """Mean over tasks of ``score_a - score_b`` (``b`` None: of ``score_a``), with its paired bootstrap interval."""
    tasks = sorted(a)
    if not tasks:
        raise ValueError("mean_difference needs at least one task with rows")
    rng = np.random.default_rng(seed)
    boot, parts, rows, zero = np.zeros(resamples), [], 0, True
    for task in tasks:
        sides = [a[task]] + ([b[task]] if b is not None else [])
        n = sides[0].stats.shape[0]
        if n == 0 or any(s.stats.shape[0] != n for s in sides):
            raise ValueError(f"task {task}: sides have {[s.stats.shape[0] for s in sides]} rows; a paired "
                             f"comparison needs the same non-empty set of rows on both sides")
        w = _draw(rng, n, sides[0].clusters, resamples)  # [R, n] row counts (paired: one draw for both sides)
        full = [_value(s) for s in sides]
        drawn = [_value(s, w) for s in sides]
        parts.append(full[0] - (full[1] if b is not None else 0.0))
        boot += drawn[0] - (drawn[1] if b is not None else 0.0)
        rows += n
        zero = zero and all(v == 0 for v in full)
    boot /= len(tasks)
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(np.mean(parts)), float(low), float(high), level, resamples, seed, rows, zero)


def _draw(rng, n: int, clusters, resamples: int) -> np.ndarray:
    """``[resamples, n]`` weights of the rows in each resample: a multinomial draw of ``n`` rows, or with
    ``clusters`` (an id per row) of as many clusters as there are, each row weighted by its cluster's count."""
    if clusters is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    k = int(inverse.max()) + 1
    return rng.multinomial(k, np.full(k, 1.0 / k), size=resamples).astype(float)[:, inverse.reshape(-1)]


def point_holds(value: float | None, bar: float, side: str) -> bool | None:
    """Whether a point estimate is on the claim's side of the bar (None when there is no estimate)."""
    if side not in SIDES:
        raise ValueError(f"side {side!r}: use one of {SIDES}")
    if value is None:
        return None
    if side == "<=":
        return bool(value <= bar + TIE)
    return bool(value >= bar - TIE if side == ">=" else value > bar + TIE)


def verdict(iv: Interval | None, bar: float, side: str, *, why_none: str = "no per-row records") \
        -> tuple[str | None, str | None]:
    """``(verdict, reason)`` of the claim "statistic <side> bar" by the interval (see the module docstring)."""
    if iv is None:
        return None, why_none
    if iv.all_zero:
        return None, "every row scores 0 on every side: the comparison has nothing to measure"
    if point_holds(iv.low, bar, side) and point_holds(iv.high, bar, side):
        return "yes", None
    if not point_holds(iv.low, bar, side) and not point_holds(iv.high, bar, side):
        return "no", None
    return "inconclusive", None


def majority_verdict(intervals: list[Interval]) -> tuple[str | None, dict]:
    """"Side a beats side b on most tasks", from each task's difference interval: ``yes`` when more than half are
    sure wins (interval above 0), ``no`` when at most half could be wins (interval reaching above 0), else
    ``inconclusive``; ties (an interval of exactly 0) are no wins."""
    if not intervals:
        return None, {"sure_wins": 0, "possible_wins": 0, "tasks": 0}
    need = len(intervals) // 2 + 1
    sure = sum(iv.low > TIE for iv in intervals)
    possible = sum(iv.high > TIE for iv in intervals)
    counts = {"sure_wins": int(sure), "possible_wins": int(possible), "tasks": len(intervals)}
    return ("yes" if sure >= need else "no" if possible < need else "inconclusive"), counts


__all__ = [
    "Interval",
    "Side",
    "interval_text",
    "majority_verdict",
    "mean_difference",
    "median_interval",
    "median_verdict",
    "point_holds",
    "round_time_ratios",
    "rounded",
    "unit",
    "verdict",
]


def paired_time_ratios(mine: list, ref: list) -> list[float]:
    """Per interleaved round, the decode-time ratio of two strategies, sorted. Each round holds ``(t_1, t_N)``: a
    1-token and an N-token generation, so ``t_N - t_1`` is the decode time; rounds where ``ref`` measured no
    decode time are left out. The same rounds on both sides: a slow phase of the machine hits both alike."""
    return sorted((a[1] - a[0]) / (b[1] - b[0]) for a, b in zip(mine, ref) if b[1] > b[0])


def round_time_ratios(mine: list, ref: list) -> list:
    """Per interleaved round, in round order (so ratios of several pairs line up by round), ``mine``'s decode time
    over ``ref``'s (``t_N - t_1`` each); None where either side measured no decode time (host noise over too few
    tokens)."""
    return [(a[1] - a[0]) / (b[1] - b[0]) if b[1] > b[0] and a[1] > a[0] else None for a, b in zip(mine, ref)]


def median_interval(values: list[float], level: float = LEVEL) -> dict:
    """The median of repeated timings (paired rounds) with a distribution-free interval for it, from order
    statistics: ``x(k) .. x(n+1-k)`` of the sorted values holds the median with probability
    ``1 - 2 P(Binomial(n, 1/2) <= k - 1)``, whatever the distribution; k is the largest that keeps this at least
    ``level``. Timings have no rows to resample, and the rounds' min..max would widen as rounds are added (at 15
    rounds it holds the median with probability 0.99994); this interval narrows instead. Below 6 values no k reaches
    95%: the interval is then min..max, and ``coverage`` says what it holds (0.9375 at 5). Returns ``{"median",
    "low", "high", "coverage", "n", "min", "max"}``."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval: no values")
    k, tail = 1, 0.5 ** n  # min..max, x(1) .. x(n): it misses the median with probability 2 P(B <= 0)
    for kk in range(2, (n + 1) // 2 + 1):
        p = sum(math.comb(n, j) for j in range(kk)) / 2 ** n  # P(B <= kk - 1)
        if p > (1 - level) / 2:
            break
        k, tail = kk, p
    return {"median": statistics.median(xs), "low": xs[k - 1], "high": xs[n - k], "coverage": 1 - 2 * tail,
            "n": n, "min": xs[0], "max": xs[-1]}


def rounded(interval: dict, digits: int = 3) -> dict:
    """``median_interval``'s dict with its values rounded for a table (coverage to 4 places, n as is)."""
    return {k: (v if k == "n" else round(v, 4 if k == "coverage" else digits)) for k, v in interval.items()}


def interval_text(iv: dict, fmt: str = "{}") -> str:
    """``median [low, high]`` as tables print it (``fmt`` formats each number)."""
    return f"{fmt.format(iv['median'])} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def median_verdict(interval: dict, bar: float, side: str = "<=") -> str:
    """A timing claim "median <= bar" (or ">="), by ``median_interval``'s interval: ``yes`` when all of it is on
    the claim's side (touching the bar counts), ``no`` when none of it is, else ``inconclusive``."""
    lo, hi = interval["low"], interval["high"]
    if side == "<=":
        return "yes" if hi <= bar + TIE else "no" if lo > bar + TIE else "inconclusive"
    if side == ">=":
        return "yes" if lo >= bar - TIE else "no" if hi < bar - TIE else "inconclusive"
    raise ValueError(f"median_verdict: side {side!r} is not '<=' or '>='")

