"""Paired significance tests of one model against another on matched seeds.

* ``paired_t``: the paired t-test over seeds (scipy), on per-seed test metrics. With 3 seeds it has little power: it
  answers "is the difference larger than the seed-to-seed noise", nothing finer.
* ``paired_bootstrap_auc``: a paired cluster bootstrap of the test AUC difference. Each resample draws the test
  users (impressions when the dataset has no users) with replacement; the same resample is applied to both models and
  to every matched seed, and the statistic is the seed-averaged AUC difference. It captures the uncertainty of the
  finite test set, which seeds do not. The two-sided p-value is ``2 * min(P(delta <= 0), P(delta >= 0))`` over
  resamples (floored at 1 / B). Resampling users rather than impressions keeps a user's correlated impressions
  together.
"""

from __future__ import annotations

import math

import numpy as np

from onerank.metrics.bootstrap import bootstrap_summary, resampled_statistic


def paired_t(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired t-test of a - b over matched seeds: mean difference, t statistic and two-sided p-value."""
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    out = {"n": int(len(x)), "mean_diff": float(np.mean(x - y)) if len(x) else float("nan")}
    if len(x) < 2 or np.allclose(x - y, (x - y)[0]):
        out.update(t=float("nan"), p=float("nan"))
        return out
    res = stats.ttest_rel(x, y)
    out.update(t=float(res.statistic), p=float(res.pvalue))
    return out


class _SortedAUC:
    """AUC under integer resampling weights, with the scores sorted once: each resample is O(n)."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray) -> None:
        order = np.argsort(scores, kind="mergesort")
        self.order = order
        sorted_scores = scores[order]
        # tied scores form one group: a positive and a negative in the same group count half
        self.group = np.concatenate([[0], np.cumsum(sorted_scores[1:] != sorted_scores[:-1])])
        self.pos = (labels[order] > 0.5).astype(np.float64)
        self.groups = int(self.group[-1]) + 1 if len(order) else 0

    def __call__(self, weights: np.ndarray) -> float:
        w = weights[self.order]
        gp = np.bincount(self.group, w * self.pos, minlength=self.groups)
        gn = np.bincount(self.group, w * (1.0 - self.pos), minlength=self.groups)
        total_pos, total_neg = gp.sum(), gn.sum()
        if total_pos == 0 or total_neg == 0:
            return float("nan")
        below = np.cumsum(gn) - gn
        return float(np.sum(gp * (below + 0.5 * gn)) / (total_pos * total_neg))


def _clusters(n: int, clusters: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Each row's cluster index and the number of clusters (every row its own cluster without ``clusters``)."""
    if clusters is None:
        return np.arange(n), n
    _, cluster_idx = np.unique(np.asarray(clusters), return_inverse=True)
    return cluster_idx, int(cluster_idx.max()) + 1 if n else 0


def paired_bootstrap_auc(
    labels: np.ndarray,
    preds_a: list[np.ndarray],
    preds_b: list[np.ndarray],
    clusters: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Bootstrap of mean_s AUC(a_s) - AUC(b_s) over matched seeds s, resampling clusters (users) with replacement.

    ``labels``: [n] binary labels of the task's valid test rows; ``preds_a`` / ``preds_b``: per seed, [n] predictions
    on the same rows; ``clusters``: [n] cluster ids (None: every row its own cluster).
    """
    labels = np.asarray(labels)
    n = len(labels)
    cluster_idx, num_clusters = _clusters(n, clusters)
    aucs_a = [_SortedAUC(labels, np.asarray(p)) for p in preds_a]
    aucs_b = [_SortedAUC(labels, np.asarray(p)) for p in preds_b]
    ones = np.ones(n)
    observed = float(np.mean([f(ones) for f in aucs_a]) - np.mean([f(ones) for f in aucs_b]))

    def delta(counts: np.ndarray) -> float:
        w = counts[cluster_idx]
        return float(np.mean([f(w) for f in aucs_a]) - np.mean([f(w) for f in aucs_b]))

    return bootstrap_summary(observed, resampled_statistic(delta, num_clusters, resamples, seed))


def paired_bootstrap_gauc(
    labels: np.ndarray,
    preds_a: list[np.ndarray],
    preds_b: list[np.ndarray],
    users: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Bootstrap of mean_s GAUC(a_s) - GAUC(b_s) over matched seeds, resampling users with replacement.

    A user drawn c times counts c times in GAUC's impression-weighted mean of per-user AUCs, and a user's own AUC does
    not change when all of their impressions are repeated, so each resample is a re-weighting of the per-user AUCs
    (computed once). Users with one class only have no AUC and count in neither model's GAUC.
    """
    from onerank.metrics.ranking import user_aucs

    labels, users = np.asarray(labels), np.asarray(users)
    user_ids, cluster_idx = np.unique(users, return_inverse=True)
    per_seed = [user_aucs(labels, np.asarray(p), cluster_idx) for p in list(preds_a) + list(preds_b)]
    if not len(per_seed[0]):
        return bootstrap_summary(float("nan"), np.empty(0))
    index = per_seed[0].index.to_numpy()  # the same users for every model and seed: eligibility depends on labels only
    impressions = per_seed[0]["n"].to_numpy(np.float64)
    aucs = np.stack([p["auc"].reindex(index).to_numpy(np.float64) for p in per_seed])
    k = len(preds_a)
    difference = aucs[:k].mean(axis=0) - aucs[k:].mean(axis=0)  # seed-averaged GAUC difference, per user

    def delta(counts: np.ndarray) -> float:
        weights = counts[index] * impressions
        total = weights.sum()
        return float(weights @ difference / total) if total > 0 else float("nan")

    return bootstrap_summary(delta(np.ones(len(user_ids))), resampled_statistic(delta, len(user_ids), resamples, seed))


def significance_mark(p: float) -> str:
    if p is None or math.isnan(p):
        return ""
    return "**" if p < 0.01 else "*" if p < 0.05 else ""
