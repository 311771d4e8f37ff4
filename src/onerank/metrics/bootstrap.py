"""The cluster bootstrap shared by the benchmark reports and the fusion reports: resample users (clusters) with
replacement, re-weight per-user figures, summarise a paired difference."""

from __future__ import annotations

import numpy as np


def resampled_statistic(statistic, num_clusters: int, resamples: int, seed: int) -> np.ndarray:
    """``statistic(cluster_counts)`` over ``resamples`` draws of the clusters with replacement (NaNs dropped): each
    draw is the count of times each cluster (user) was drawn, so a statistic re-weights per-cluster figures."""
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    for i in range(resamples):
        counts = np.bincount(rng.integers(0, num_clusters, num_clusters), minlength=num_clusters).astype(np.float64)
        deltas[i] = statistic(counts)
    return deltas[~np.isnan(deltas)]


def bootstrap_summary(observed: float, deltas: np.ndarray) -> dict[str, float]:
    """The observed difference, its 95 % interval over the resampled ``deltas`` and the two-sided bootstrap p."""
    if not len(deltas):
        return {"delta": observed, "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "resamples": 0}
    p = 2.0 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0)))
    return {
        "delta": observed,
        "ci_low": float(np.quantile(deltas, 0.025)),
        "ci_high": float(np.quantile(deltas, 0.975)),
        "p": max(min(p, 1.0), 1.0 / len(deltas)),
        "resamples": int(len(deltas)),
    }
