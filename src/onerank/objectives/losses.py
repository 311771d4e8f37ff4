"""Per-task losses honouring label masks and task spaces: point-wise (BCE / MSE) and list-wise (multi-positive
InfoNCE over each request's candidates). The objective is independent of the model: it reads logits and the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.schema import TaskSpec
from onerank.objectives.distillation import CrossDistillation, DistillationConfig


@dataclass
class ObjectiveConfig:
    pointwise: float = 1.0  # lambda_pw
    listwise: float = 0.0  # lambda_lw; > 0 needs batches of whole requests
    temperature: float = 1.0  # tau of the list-wise softmax
    distillation: dict[str, Any] | None = None  # CrossDistil options (objectives/distillation.py); None: off

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


def listwise_loss(logits: Tensor, labels: Tensor, mask: Tensor, batch: Batch, temperature: float) -> Tensor:
    """Multi-positive InfoNCE: for each positive i of a request, -log softmax_i(s / tau) over the request's valid
    candidates, averaged over all positives; requests without a positive contribute nothing."""
    _, present = batch.list_layout()
    scores = batch.to_lists(logits) / temperature
    valid = present & batch.to_lists(mask)
    positive = valid & (batch.to_lists(labels) > 0.5)
    if not bool(positive.any()):
        return _zero_like_graph(logits)
    log_prob = scores - torch.logsumexp(scores.masked_fill(~valid, float("-inf")), dim=1, keepdim=True)
    return -(log_prob[positive]).mean()


class MultiTaskObjective(nn.Module):
    """Per-task losses; a module because optional parts (distillation) own parameters, which the trainer optimises
    with the model's and saves in its resumable checkpoint."""

    def __init__(self, tasks: list[TaskSpec], config: ObjectiveConfig | None = None) -> None:
        super().__init__()
        self.tasks = tasks
        self.config = config or ObjectiveConfig()
        if self.config.temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.distillation = CrossDistillation(tasks, self.config.distillation) if self.config.distillation else None

    @property
    def needs_requests(self) -> bool:
        return self.config.listwise > 0

    def end_step(self) -> None:
        """Called by the trainer after each optimiser step (the distillation warm-up counts steps)."""
        if self.distillation is not None:
            self.distillation.end_step()

    def forward(
        self, logits: dict[str, Tensor], batch: Batch, auxiliary: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Unweighted loss per task (task weights are applied by the weighting strategy).

        ``auxiliary``: a model's extra terms (``MultiTaskModel.auxiliary_losses``), each added to the loss of the task
        its key ``"<task>/<name>"`` names. Cross-task distillation's terms are added to their target tasks' losses.
        """
        losses = {}
        cfg = self.config
        for task in self.tasks:
            x, y, m = logits[task.name], batch.labels[task.name], batch.label_mask[task.name]
            loss = cfg.pointwise * pointwise_loss(x, y, m, task.kind) if cfg.pointwise > 0 else 0.0
            if cfg.listwise > 0 and task.kind == "binary":
                loss = loss + cfg.listwise * listwise_loss(x, y, m, batch, cfg.temperature)
            losses[task.name] = loss
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
