"""Within-user ranking quality of one score per row: value-NDCG@k, value-GAUC and per-task GAUC, vectorised so a
search can evaluate thousands of candidate fusions; and a paired bootstrap over users.

Every metric here is a weighted mean of per-user figures (NDCG@k: users weighted equally; GAUC: users weighted by
their impressions; users whose rows all share one value or one class are skipped by both, as by
``onerank.metrics.gauc``: every order of their list scores the same), so a
bootstrap over users only re-weights the per-user figures. Tied scores are handled exactly: NDCG takes the expected
gain of a block of tied rows (the mean under a random order of the ties), AUC counts a tied pair half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from onerank.metrics.bootstrap import bootstrap_summary, resampled_statistic


@dataclass
class UserFigures:
    """Per user: a figure and its weight (NaN / 0 for users the metric skips)."""

    value: np.ndarray
    weight: np.ndarray

    def mean(self, resample: np.ndarray | None = None) -> float:
        w = self.weight if resample is None else self.weight * resample
        keep = w > 0
        return float(np.sum(self.value[keep] * w[keep]) / np.sum(w[keep])) if keep.any() else float("nan")


class Grouping:
    """Rows grouped by user, with the sort machinery shared by every metric on these rows."""

    def __init__(self, users: np.ndarray) -> None:
        self.group, uniques = pd.factorize(np.asarray(users), sort=False)
        self.num_groups = len(uniques)
        self.size = np.bincount(self.group, minlength=self.num_groups)
        self.start = np.concatenate([[0], np.cumsum(self.size)[:-1]])

    def sort(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows sorted by (user, score descending); each row's position in its user's list; tie-block ids."""
        scores = np.asarray(scores, dtype=np.float64)
        order = np.lexsort((-scores, self.group))
        g = self.group[order]
        pos = np.arange(len(order)) - self.start[g]
        s = scores[order]
        new_block = np.ones(len(order), dtype=bool)
        new_block[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
        return order, pos, np.cumsum(new_block) - 1


def _block_mean(block: np.ndarray, values: np.ndarray) -> np.ndarray:
    sums = np.bincount(block, values)
    counts = np.bincount(block)
    return (sums / counts)[block]


class ValueRanking:
    """Value-NDCG@k and value-GAUC of scores on fixed rows (the value of each row, its user)."""

    def __init__(self, users: np.ndarray, value: np.ndarray, k: int = 10) -> None:
        value = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError("the value column has NaN or infinite entries")
        if np.any(value < 0):
            raise ValueError("NDCG needs non-negative values (gains); the value column has negative entries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.grouping = Grouping(users)
        self.value = value
        self.k = k
        self.discount = 1.0 / np.log2(np.arange(k) + 2.0)
        ideal = np.lexsort((-value, self.grouping.group))
        ideal_pos = np.arange(len(value)) - self.grouping.start[self.grouping.group[ideal]]
        self.idcg = self._dcg(ideal, ideal_pos, value[ideal])
        # a user whose rows all have the same value scores 1 under every order: nothing to rank, skipped
        spread = np.zeros(self.grouping.num_groups)
        np.maximum.at(spread, self.grouping.group, value)
        low = np.full(self.grouping.num_groups, np.inf)
        np.minimum.at(low, self.grouping.group, value)
        self.rankable = spread > low

    def _dcg(self, order: np.ndarray, pos: np.ndarray, gains: np.ndarray) -> np.ndarray:
        top = pos < self.k
        return np.bincount(self.grouping.group[order][top], gains[top] * self.discount[pos[top]],
                           minlength=self.grouping.num_groups)

    def ndcg(self, scores: np.ndarray) -> UserFigures:
        order, pos, block = self.grouping.sort(scores)
        gains = _block_mean(block, self.value[order])  # expected gain of a row inside a block of ties
        dcg = self._dcg(order, pos, gains)
        valid = self.rankable & (self.idcg > 0)
        return UserFigures(np.where(valid, dcg / np.where(valid, self.idcg, 1.0), np.nan), valid.astype(float))

    def gauc(self, scores: np.ndarray) -> UserFigures:
        """Per user, the share of pairs with different values that the scores order right (ties count half),
        weighted by the user's impressions: GAUC for a 0/1 value, the concordance index for a graded one."""
        grouping = self.grouping
        scores = np.asarray(scores, dtype=np.float64)
        rows_by_user = np.argsort(grouping.group, kind="stable")
        right = np.zeros(grouping.num_groups)
        pairs = np.zeros(grouping.num_groups)
        # users of one list size at a time: a [users, size, size] comparison, no Python loop over users
        for size in np.unique(grouping.size[grouping.size > 1]):
            users = np.flatnonzero(grouping.size == size)
            for chunk in np.array_split(users, max(1, len(users) * size * size // 4_000_000)):
                rows = rows_by_user[grouping.start[chunk][:, None] + np.arange(size)]
                v, s = self.value[rows], scores[rows]
                better = v[:, :, None] > v[:, None, :]
                ordered = (s[:, :, None] > s[:, None, :]) + 0.5 * (s[:, :, None] == s[:, None, :])
                right[chunk] = (ordered * better).sum(axis=(1, 2))
                pairs[chunk] = better.sum(axis=(1, 2))
        valid = pairs > 0
        return UserFigures(np.where(valid, right / np.where(valid, pairs, 1.0), 0.0),
                           np.where(valid, grouping.size, 0.0).astype(float))


class TaskGAUC:
    """GAUC of scores against one binary task's labels on its valid rows (same figure as ``metrics.gauc``)."""

    def __init__(self, users: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
        self.mask = np.asarray(mask, dtype=bool)
        self.grouping = Grouping(np.asarray(users)[self.mask])
        self.labels = np.asarray(labels)[self.mask] > 0.5
        g = self.grouping.group
        self.pos = np.bincount(g, self.labels, minlength=self.grouping.num_groups)
        self.neg = self.grouping.size - self.pos
        self.valid = (self.pos > 0) & (self.neg > 0)

    def __call__(self, scores: np.ndarray) -> UserFigures:
        order, pos, block = self.grouping.sort(np.asarray(scores)[self.mask])
        g = self.grouping.group[order]
        # ascending rank in the user's list (1 = lowest score), averaged over tied rows
        ascending = (self.grouping.size[g] - pos).astype(np.float64)
        ascending = _block_mean(block, ascending)
        rank_sum = np.bincount(g, ascending * self.labels[order], minlength=self.grouping.num_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (rank_sum - self.pos * (self.pos + 1) / 2) / (self.pos * self.neg)
        return UserFigures(np.where(self.valid, auc, np.nan), np.where(self.valid, self.grouping.size, 0.0))


def paired_bootstrap(figures: dict[str, UserFigures], baseline: str | None, resamples: int = 1000,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Per name: the figure, its 95% interval over user resamples, and (with ``baseline``) the paired difference
    to the baseline's figure with its interval and a two-sided bootstrap p-value.

    All figures must come from one :class:`Grouping` (the same users in the same order): each resample draws the
    users once and re-weights every figure with the same draw.
    """
    n = len(next(iter(figures.values())).value)
    out = {}
    for name, fig in figures.items():
        samples = resampled_statistic(fig.mean, n, resamples, seed)
        row = {"value": fig.mean(), "ci_low": float(np.quantile(samples, 0.025)),
               "ci_high": float(np.quantile(samples, 0.975))}
        if baseline is not None and name != baseline:
            base = figures[baseline]
            deltas = resampled_statistic(lambda w, fig=fig, base=base: fig.mean(w) - base.mean(w), n, resamples, seed)
            summary = bootstrap_summary(fig.mean() - base.mean(), deltas)
            row.update(delta=summary["delta"], delta_ci_low=summary["ci_low"], delta_ci_high=summary["ci_high"],
                       p=summary["p"])
        out[name] = row
    return out
