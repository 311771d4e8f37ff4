"""Per-task probability calibration, fitted on the validation split: Platt scaling and isotonic regression.

scikit-learn fits both; the fitted maps are kept as a few numbers (Platt: slope and intercept on the logit;
isotonic: the step function's knots), so a calibration file is plain JSON and applying it needs only NumPy.
Regression tasks are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Method = Literal["platt", "isotonic"]
METHODS = ("platt", "isotonic")
PROB_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before a logit


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS)
    return np.log(p) - np.log1p(-p)


@dataclass
class TaskCalibration:
    """A monotone map from a task's predicted probability to a calibrated one."""

    method: Method
    params: dict[str, Any]  # platt: {"slope", "intercept"}; isotonic: {"x", "y"} (knots, x increasing)

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        if self.method == "platt":
            z = self.params["slope"] * logit(probs) + self.params["intercept"]
            return 1.0 / (1.0 + np.exp(-z))
        # isotonic: linear between knots, constant beyond them (sklearn's out_of_bounds="clip")
        return np.interp(np.asarray(probs, dtype=np.float64), self.params["x"], self.params["y"])

    @classmethod
    def fit(cls, method: Method, labels: np.ndarray, probs: np.ndarray) -> "TaskCalibration":
        labels = np.asarray(labels, dtype=np.float64)
        if len(np.unique(labels)) < 2:
            raise ValueError("calibration needs both classes in the validation labels")
        if method == "platt":
            from sklearn.linear_model import LogisticRegression

            # Platt (1999) fits a sigmoid on the score; on a probability the score is its logit. No penalty
            # (C = inf): two parameters on thousands of rows need none.
            model = LogisticRegression(C=np.inf).fit(logit(probs)[:, None], labels)
            return cls("platt", {"slope": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0])})
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            model.fit(np.asarray(probs, dtype=np.float64), labels)
            return cls("isotonic", {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()})
        raise ValueError(f"calibration method must be one of {METHODS}, not {method!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TaskCalibration":
        params = {k: v for k, v in raw.items() if k != "method"}
        if raw.get("method") not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, not {raw.get('method')!r}")
        return cls(raw["method"], params)


@dataclass
class Calibration:
    """One map per binary task; tasks without one pass through."""

    tasks: dict[str, TaskCalibration]

    def __call__(self, predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t: (self.tasks[t](p).astype(np.float32) if t in self.tasks else p) for t, p in predictions.items()}

    @classmethod
    def fit(cls, method: Method, labels: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> "Calibration":
        """``labels`` / ``probs``: per binary task, its valid rows of the validation split."""
        fitted = {}
        for t in probs:
            try:
                fitted[t] = TaskCalibration.fit(method, labels[t], probs[t])
            except ValueError as exc:
                raise ValueError(f"task {t!r}: {exc}") from None
        return cls(fitted)

    def to_dict(self) -> dict[str, Any]:
        return {t: c.to_dict() for t, c in self.tasks.items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Calibration":
        return cls({t: TaskCalibration.from_dict(c) for t, c in raw.items()})


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-mass bins of the predictions: per bin its mean prediction, its positive rate and its row count.

    Equal-mass rather than equal-width bins: click-through-like rates crowd into a few width bins, leaving the others
    with a handful of rows each.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    order = np.argsort(probs, kind="stable")
    parts = [p for p in np.array_split(order, min(bins, len(order))) if len(p)]
    return {
        "mean_prediction": np.array([probs[p].mean() for p in parts]),
        "positive_rate": np.array([labels[p].mean() for p in parts]),
        "count": np.array([len(p) for p in parts]),
    }


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE: the row-weighted mean |mean prediction - positive rate| over the bins of :func:`reliability`."""
    curve = reliability(labels, probs, bins)
    gaps = np.abs(curve["mean_prediction"] - curve["positive_rate"])
    return float(np.sum(gaps * curve["count"]) / np.sum(curve["count"]))
