"""Per-task losses honouring label masks and task spaces: point-wise (BCE / MSE) and list-wise (multi-positive
InfoNCE over each request's candidates). The objective is independent of the model: it reads logits and the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.schema import TaskSpec
from onerank.objectives.distillation import DistillationConfig
from onerank.resources import Registry


REDUCTIONS = ("requests", "positives")
# Terms an objective adds to the task losses, by the name of their ObjectiveConfig section -> the module computing
# them from (tasks, options, then logits and the batch); imported only when a run configures them.
OBJECTIVE_TERMS: Registry[type[nn.Module]] = Registry("objective term", {
    "distillation": "onerank.objectives.distillation:CrossDistillation",
})
# (bound, bound allowed) of the numeric options
LOWER_BOUNDS = {"pointwise": (0.0, True), "listwise": (0.0, True), "temperature": (0.0, False),
                "min_temperature": (0.0, False)}


@dataclass
class ObjectiveConfig:
    pointwise: float = 1.0  # lambda_pw
    listwise: float = 0.0  # lambda_lw; > 0 needs batches of whole requests
    temperature: float = 1.0  # tau of the list-wise softmax (the starting value when it is learnt)
    # How the list-wise loss averages over the requests that have both a positive and a negative: "requests" (each
    # such request weighs the same: the mean over its positives, then over requests) or "positives" (every positive
    # weighs the same, so requests with many positives weigh more).
    listwise_reduction: str = "requests"
    learn_temperature: bool = False  # one learnt tau per binary task, stored as log tau, never below min_temperature
    min_temperature: float = 0.01
    distillation: dict[str, Any] | None = None  # CrossDistil options (objectives/distillation.py); None: off

    def validate(self) -> None:
        """Ranges of the options (checked where a config is read and where an objective is built)."""
        for key, (low, inclusive) in LOWER_BOUNDS.items():
            value = getattr(self, key)
            if not math.isfinite(value) or not (value >= low if inclusive else value > low):
                raise ValueError(f"objective.{key} must be a finite number {'>=' if inclusive else '>'} {low}, "
                                 f"got {value!r}")
        if self.listwise_reduction not in REDUCTIONS:
            raise ValueError(f"objective.listwise_reduction must be one of {REDUCTIONS}, got "
                             f"{self.listwise_reduction!r}")

    def __post_init__(self) -> None:
        if self.distillation is not None:
            DistillationConfig.from_options(self.distillation)  # a bad option fails when the config is read


def _zero_like_graph(x: Tensor) -> Tensor:
    # Keeps the loss connected to the graph when a batch has no valid label for a task.
    return x.sum() * 0.0


def pointwise_loss(logits: Tensor, labels: Tensor, mask: Tensor, kind: str) -> Tensor:
    if not bool(mask.any()):
        return _zero_like_graph(logits)
    x, y = logits[mask], labels[mask]
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(x, y)
    return F.mse_loss(x, y)


def listwise_loss(
    logits: Tensor, labels: Tensor, mask: Tensor, batch: Batch, temperature: float | Tensor,
    reduction: str = "requests",
) -> Tensor:
    """Multi-positive InfoNCE: for each positive i of a request, -log softmax_i(s / tau) over the request's valid
    candidates (positives included).

    Only requests with at least one positive and one negative count: a one-impression request contributes exactly 0
    (its softmax is 1) and an all-positive request would only push its scores together, so both would dilute the mean
    (on KuaiRand about 92 % of the positives are in one-impression requests). The kept requests are selected before
    any softmax, so a dropped request gets no gradient; a batch without any kept request gives a (graph-connected) 0.
    ``reduction``: "requests" averages each request's mean over its positives, "positives" averages over all positives
    of the kept requests.
    """
    _, present = batch.list_layout()
    valid = present & batch.to_lists(mask)
    positive = valid & (batch.to_lists(labels) > 0.5)
    negative = valid & ~positive
    kept = positive.any(dim=1) & negative.any(dim=1)
    if not bool(kept.any()):
        return _zero_like_graph(logits)
    scores = batch.to_lists(logits)[kept] / temperature
    valid, positive = valid[kept], positive[kept]
    log_prob = scores - torch.logsumexp(scores.masked_fill(~valid, float("-inf")), dim=1, keepdim=True)
    if reduction == "positives":
        return -log_prob[positive].mean()
    per_request = -(log_prob * positive).sum(dim=1) / positive.sum(dim=1)
    return per_request.mean()


class MultiTaskObjective(nn.Module):
    """Per-task losses from a model's logits and the batch. A module for its optional parameters (learnt list-wise
    temperatures, distillation teachers), which the trainer optimises and saves in its resumable checkpoint."""

    def __init__(self, tasks: list[TaskSpec], config: ObjectiveConfig | None = None) -> None:
        super().__init__()
        self.tasks = tasks
        self.config = config or ObjectiveConfig()
        self.config.validate()
        self.log_temperature = nn.ParameterDict()
        if self.config.learn_temperature and self.config.listwise > 0:
            start = math.log(max(self.config.temperature, self.config.min_temperature))
            self.log_temperature.update(
                {t.name: nn.Parameter(torch.tensor(start)) for t in tasks if t.kind == "binary"}
            )
        distillation = self.config.distillation
        self.distillation = OBJECTIVE_TERMS.get("distillation")(tasks, distillation) if distillation else None

    @property
    def needs_requests(self) -> bool:
        return self.config.listwise > 0

    def temperature(self, task: str) -> float | Tensor:
        """tau of ``task``'s list-wise softmax: the configured constant, or exp(log tau) clamped at min_temperature."""
        if task not in self.log_temperature:
            return self.config.temperature
        return self.log_temperature[task].exp().clamp(min=self.config.min_temperature)

    def end_step(self) -> None:
        """Called by the trainer after each optimiser step (the distillation warm-up counts steps)."""
        if self.distillation is not None:
            self.distillation.end_step()

    def forward(
        self, logits: dict[str, Tensor], batch: Batch, auxiliary: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Loss per task, times the task's ``loss_scale`` (task weights are applied by the weighting strategy).

        ``auxiliary``: a model's extra terms (``MultiTaskModel.auxiliary_losses``), each added to the loss of the task
        its key ``"<task>/<name>"`` names. Cross-task distillation's terms are added to their target tasks' losses.
        """
        losses = {}
        cfg = self.config
        for task in self.tasks:
            x, y, m = logits[task.name], batch.labels[task.name], batch.label_mask[task.name]
            loss = cfg.pointwise * pointwise_loss(x, y, m, task.kind) if cfg.pointwise > 0 else 0.0
            if cfg.listwise > 0 and task.kind == "binary":
                tau = self.temperature(task.name)
                loss = loss + cfg.listwise * listwise_loss(x, y, m, batch, tau, cfg.listwise_reduction)
            losses[task.name] = loss * task.loss_scale if task.loss_scale != 1.0 else loss
        for key, term in (auxiliary or {}).items():
            task_name, sep, _ = key.partition("/")
            if not sep or task_name not in losses:
                raise ValueError(
                    f"auxiliary loss {key!r} must be named '<task>/<name>' with a task of the schema {list(losses)}"
                )
            losses[task_name] = losses[task_name] + term
        if self.distillation is not None:
            for task_name, term in self.distillation(logits, batch).items():
                losses[task_name] = losses[task_name] + term
        return losses
