"""Per-task metrics on the task's valid rows: AUC, GAUC, logloss, calibration (binary); MSE, MAE (regression)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic, ties counted half. NaN if only one class is present."""
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def user_aucs(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> pd.DataFrame:
    """Per user (index) with both classes: ``auc`` and ``n`` (impressions); users with one class only are left out."""
    frame = pd.DataFrame({"g": groups, "y": np.asarray(labels) > 0.5, "s": scores})
    frame["r"] = frame.groupby("g")["s"].rank(method="average")
    per = frame.groupby("g").agg(n=("y", "size"), pos=("y", "sum"))
    per["rank_pos"] = frame[frame["y"]].groupby("g")["r"].sum()
    per = per[(per["pos"] > 0) & (per["pos"] < per["n"])]
    neg = per["n"] - per["pos"]
    per["auc"] = (per["rank_pos"] - per["pos"] * (per["pos"] + 1) / 2) / (per["pos"] * neg)
    return per[["auc", "n"]]


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Per-user AUC weighted by the user's impressions; users with one class only are skipped (Zhou et al., DIN)."""
    per = user_aucs(labels, scores, groups)
    if per.empty:
        return float("nan")
    return float(np.average(per["auc"], weights=per["n"]))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean prediction / mean label (1.0 is calibrated); NaN without positives."""
    mean_label = float(np.mean(labels))
    return float(np.mean(probs) / mean_label) if mean_label > 0 else float("nan")


def task_metrics(kind: str, labels: np.ndarray, preds: np.ndarray, users: np.ndarray | None) -> dict[str, float]:
    """Metrics of one task of ``kind`` ("binary" or "regression") on its valid rows (callers pass only those)."""
    out: dict[str, float] = {"count": int(len(labels))}
    if len(labels) == 0:
        return out
    if kind == "regression":
        err = np.asarray(preds, dtype=np.float64) - labels
        out.update(mse=float(np.mean(err**2)), mae=float(np.mean(np.abs(err))))
        return out
    out.update(auc=auc(labels, preds), logloss=logloss(labels, preds), calibration=calibration(labels, preds))
    if users is not None:
        out["gauc"] = gauc(labels, preds, users)
    return out


def evaluate_predictions(
    kinds: dict[str, str],
    preds: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    users: np.ndarray | None,
) -> dict[str, dict[str, float]]:
    """Per task (``kinds``: task -> "binary" or "regression", in order), its metrics on the rows its mask keeps."""
    return {
        task: task_metrics(kind, labels[task][masks[task]], preds[task][masks[task]],
                           None if users is None else users[masks[task]])
        for task, kind in kinds.items()
    }


def monitor_value(metrics: dict[str, dict[str, float]], metric: str, weights: dict[str, float]) -> float:
    """Weighted mean of one metric over tasks (the early-stopping monitor); NaNs are skipped."""
    total, norm = 0.0, 0.0
    for task, w in weights.items():
        value = metrics.get(task, {}).get(metric, float("nan"))
        if not math.isnan(value):
            total += w * value
            norm += w
    return total / norm if norm > 0 else float("nan")
