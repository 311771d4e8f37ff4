"""Fusion forms: how K per-task predictions become one ranking score.

``Fusion("weighted_sum")``: ``sum_t w_t p_t``; ``Fusion("product")``: ``prod_t p_t ** w_t`` (powers of the
probabilities, computed as ``exp(sum_t w_t log p_t)``); :class:`MonotoneFusion`: a small network whose score never
decreases when one task's prediction rises (the idea of xMTF's monotone fusion cells, 2025: a fused ranking must not
punish an item for a better prediction on any task). Every form is called on ``{task: [N] predictions}`` and returns
``[N]`` scores; ``to_dict`` / :func:`fusion_from_dict` write and read it as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np

from onerank.fusion.calibration import logit

PRODUCT_EPS = 1e-12  # floor of a probability raised to a power in the product fusion (log of 0 is -inf)


@dataclass
class Fusion:
    """``weighted_sum``: ``sum_t w_t p_t``; ``product``: ``prod_t p_t ** w_t`` (computed as ``exp(sum_t w_t log p_t)``).

    ``weights`` defaults to 1 for every task; tasks it does not name have weight 0.
    """

    kind: Literal["weighted_sum", "product"] = "weighted_sum"
    weights: dict[str, float] | None = None

    def resolved(self, tasks: list[str], kinds: dict[str, str]) -> "Fusion":
        """A copy with explicit weights for ``tasks``, checked (errors name the task at fault)."""
        if self.kind not in ("weighted_sum", "product"):
            raise ValueError(f"fusion kind must be 'weighted_sum' or 'product', not {self.kind!r}")
        weights = {t: 1.0 for t in tasks} if self.weights is None else dict(self.weights)
        for task, w in weights.items():
            if task not in tasks:
                raise ValueError(f"fusion weight for unknown task {task!r}; the model's tasks are {tasks}")
            if not math.isfinite(w):
                raise ValueError(f"fusion weight of task {task!r} must be finite, got {w}")
            if self.kind == "product" and w != 0 and kinds[task] != "binary":
                raise ValueError(f"fusion 'product' needs probabilities; task {task!r} is a regression task")
        if not any(w != 0 for w in weights.values()):
            raise ValueError(f"fusion weights {weights} give every task weight 0")
        return Fusion(self.kind, {t: float(weights.get(t, 0.0)) for t in tasks})

    def __call__(self, predictions: dict[str, np.ndarray]) -> np.ndarray:
        weights = self.weights or {}
        active = [(t, w) for t, w in weights.items() if w != 0]
        if self.kind == "weighted_sum":
            return sum(w * predictions[t].astype(np.float64) for t, w in active)
        log_score = sum(w * np.log(np.maximum(predictions[t].astype(np.float64), PRODUCT_EPS)) for t, w in active)
        return np.exp(log_score)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": dict(self.weights or {})}


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


@dataclass
class MonotoneFusion:
    """``score = softplus(v) . tanh(z softplus(W) + b) + softplus(u) . z``, ``z_t = (x_t - shift_t) / scale_t``.

    ``x_t`` is the logit of task t's probability (binary task) or its value (regression task). Every path from an
    input to the score has a non-negative weight (softplus) and increasing activations (tanh, identity), so the
    score is non-decreasing in every task's prediction for any parameters: monotone by construction, whatever a
    search or a gradient step sets them to. ``shift`` / ``scale`` (> 0) only standardise the inputs.
    """

    tasks: list[str]
    kinds: dict[str, str]
    shift: np.ndarray  # [K]
    scale: np.ndarray  # [K], > 0
    W: np.ndarray  # [K, H] raw; the effective weights are softplus(W) >= 0
    b: np.ndarray  # [H]
    v: np.ndarray  # [H] raw
    u: np.ndarray  # [K] raw (the linear skip path)

    kind = "monotone"

    @property
    def hidden(self) -> int:
        return int(self.b.shape[0])

    @staticmethod
    def num_params(num_tasks: int, hidden: int) -> int:
        return num_tasks * hidden + 2 * hidden + num_tasks

    @classmethod
    def from_vector(cls, theta: np.ndarray, tasks: list[str], kinds: dict[str, str], shift: np.ndarray,
                    scale: np.ndarray, hidden: int) -> "MonotoneFusion":
        k = len(tasks)
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (cls.num_params(k, hidden),):
            raise ValueError(f"a monotone fusion of {k} tasks and {hidden} hidden units has "
                             f"{cls.num_params(k, hidden)} parameters, got {theta.shape}")
        W, rest = theta[: k * hidden].reshape(k, hidden), theta[k * hidden:]
        return cls(list(tasks), dict(kinds), np.asarray(shift, float), np.asarray(scale, float),
                   W, rest[:hidden], rest[hidden: 2 * hidden], rest[2 * hidden:])

    def inputs(self, predictions: dict[str, np.ndarray]) -> np.ndarray:
        cols = [logit(predictions[t]) if self.kinds[t] == "binary" else np.asarray(predictions[t], np.float64)
                for t in self.tasks]
        return (np.stack(cols, axis=1) - self.shift) / self.scale

    def __call__(self, predictions: dict[str, np.ndarray]) -> np.ndarray:
        z = self.inputs(predictions)
        return np.tanh(z @ softplus(self.W) + self.b) @ softplus(self.v) + z @ softplus(self.u)

    def resolved(self, tasks: list[str], kinds: dict[str, str]) -> "MonotoneFusion":
        unknown = [t for t in self.tasks if t not in tasks]
        if unknown:
            raise ValueError(f"monotone fusion over unknown tasks {unknown}; the model's tasks are {tasks}")
        changed = [t for t in self.tasks if kinds[t] != self.kinds[t]]
        if changed:
            raise ValueError(f"monotone fusion: tasks {changed} changed kind since the fusion was fitted")
        if not np.all(self.scale > 0):
            raise ValueError("monotone fusion: every input scale must be > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "tasks": list(self.tasks), "task_kinds": dict(self.kinds), "hidden": self.hidden,
            "shift": self.shift.tolist(), "scale": self.scale.tolist(), "W": self.W.tolist(), "b": self.b.tolist(),
            "v": self.v.tolist(), "u": self.u.tolist(),
            "effective_weights": {"input_to_hidden": softplus(self.W).tolist(), "hidden_to_score": softplus(self.v).tolist(),
                                  "skip": dict(zip(self.tasks, softplus(self.u).tolist()))},
        }


AnyFusion = Union[Fusion, MonotoneFusion]


def fusion_from_dict(raw: dict[str, Any]) -> AnyFusion:
    kind = raw.get("kind")
    if kind in ("weighted_sum", "product"):
        return Fusion(kind, {t: float(w) for t, w in (raw.get("weights") or {}).items()} or None)
    if kind == "monotone":
        arr = lambda key: np.asarray(raw[key], dtype=np.float64)  # noqa: E731
        return MonotoneFusion(list(raw["tasks"]), dict(raw["task_kinds"]), arr("shift"), arr("scale"), arr("W"),
                              arr("b"), arr("v"), arr("u"))
    raise ValueError(f"fusion kind must be 'weighted_sum', 'product' or 'monotone', not {kind!r}")
