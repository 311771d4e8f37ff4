"""Cross-task knowledge distillation (CrossDistil: Yang, Pan, Gao, Jiang, Liu & Chen, "Cross-Task Knowledge
Distillation in Multi-Task Recommendation", AAAI 2022) as a part of the objective, for any model.

A task's binary labels say nothing about how to order two items with the same label; another task's labels can: of
two items a user did not like, the one watched to the end is the better one. For each declared pair
``target<-helper`` the objective adds, on top of the plain per-task losses:

1. an auxiliary ranking head (the *teacher* of ``target``) trained with the quadruplet loss over the four label
   combinations (target, helper): ``++ > +- > -+ > --``. The target's label decides first, so the new order never
   contradicts the target's own labels; the helper only breaks the target's ties. The head is a separate output,
   so the pair-wise signal never lands on the target's own logit (the paper's answer to task conflicts);
2. a calibrator (Platt scaling with a positive slope, so the teacher's order is kept) that maps the teacher's
   scale-free ranking score to a probability of the target, trained on the target's labels: the teacher can then
   teach a student whose scores live on another scale (the paper's calibrated distillation);
3. the distillation term: binary cross-entropy of the target's logit against the corrected soft label
   ``q~ = c * y + (1 - c) * q`` (``q`` the calibrated teacher, ``y`` the label, ``c`` = ``correction``). With
   ``c > 1/2`` every positive's soft label is above every negative's, so no ranking error of the teacher across the
   target's labels reaches the student while its order within each label (what the labels lack) does. This, a
   warm-up before distillation starts, and stop-gradients are how teacher and student train together in one
   model and one optimiser step (the paper's error correction for synchronous training; the label-blend form is
   ours).

Gradient flow (tested): the teacher reads the model's logits detached, so the quadruplet loss reaches only the
teacher head; the calibrator reads the teacher's score detached, so calibration cannot change the teacher's order;
the soft label is detached, so the distillation term reaches only the model (the student), never the teacher.

The design choice that makes it model-agnostic: the paper puts the auxiliary towers on the model's shared bottom.
A model here only returns ``{task: logits}``, so the teacher is a small head owned by this module over the
(detached) logits of the target and the helper, initialised to the target's own logit (its last layer starts at
zero) and learning a residual from the pair: a teacher that can only re-rank with what the two tasks already
predict, not learn new features. The trainer optimises these parameters with the model's and saves them in its
resumable checkpoint; the served model (``checkpoint.pt``) is the student alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.schema import SchemaError, TaskSpec, dataclass_from_mapping

ARROW = "<-"


@dataclass(frozen=True)
class TaskPair:
    target: str  # the student: the task whose same-labelled items the helper orders
    helper: str
    weight: float  # of this pair's distillation term

    @property
    def key(self) -> str:
        return f"{self.target}{ARROW}{self.helper}"


@dataclass
class DistillationConfig:
    """Options of ``objective.distillation`` (run config YAML) or ``--distill*`` (CLI)."""

    pairs: list[str] | dict[str, float] = dataclasses.field(default_factory=list)  # "target<-helper" (or -> weight)
    weight: float = 0.5  # of the distillation term, per pair (a pairs mapping may set its own)
    ranking_weight: float = 1.0  # of the teacher's quadruplet loss
    warmup_steps: int = 10  # optimiser steps during which the teachers train but do not teach yet
    correction: float = 0.6  # c of the soft label c * y + (1 - c) * q; > 0.5 removes the teacher's cross-label errors
    hidden: int = 16  # width of each teacher head's hidden layer

    @classmethod
    def from_options(cls, options: Any) -> "DistillationConfig":
        config = dataclass_from_mapping(cls, options, "objective.distillation")
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.pairs, (list, tuple, dict)) or not self.pairs:
            raise SchemaError("objective.distillation.pairs must name at least one 'target<-helper' pair, "
                              "e.g. ['like<-long_view']")
        checks = {
            "weight": self.weight >= 0, "ranking_weight": self.ranking_weight >= 0,
            "warmup_steps": self.warmup_steps >= 0, "correction": 0.0 <= self.correction <= 1.0,
            "hidden": self.hidden >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise SchemaError(f"objective.distillation.{name} = {getattr(self, name)!r} is out of range "
                                  "(weights and warmup_steps >= 0, correction in [0, 1], hidden >= 1)")

    def task_pairs(self, tasks: list[TaskSpec]) -> list[TaskPair]:
        """The declared pairs, checked against the schema's tasks."""
        kinds = {t.name: t.kind for t in tasks}
        items = self.pairs.items() if isinstance(self.pairs, dict) else [(p, self.weight) for p in self.pairs]
        pairs = []
        for text, weight in items:
            target, sep, helper = str(text).partition(ARROW)
            target, helper = target.strip(), helper.strip()
            if not sep or not target or not helper or target == helper:
                raise SchemaError(
                    f"distillation pair {text!r} must read 'target{ARROW}helper' with two different tasks")
            for name in (target, helper):
                if name not in kinds:
                    raise SchemaError(f"distillation pair {text!r} names unknown task {name!r}; tasks: {list(kinds)}")
                if kinds[name] != "binary":
                    raise SchemaError(
                        f"distillation pair {text!r}: task {name!r} is {kinds[name]}; pairs need binary tasks")
            if float(weight) < 0:
                raise SchemaError(f"distillation pair {text!r} has a negative weight {weight}")
            pairs.append(TaskPair(target, helper, float(weight)))
        keys = [p.key for p in pairs]
        if len(set(keys)) != len(keys):
            raise SchemaError(f"distillation pairs are declared twice: {keys}")
        return pairs


def quadruplet_classes(target: Tensor, helper: Tensor) -> Tensor:
    """The rank of each label combination in ``++ > +- > -+ > --``: 3, 2, 1, 0 (target first, helper breaks ties)."""
    return 2 * (target > 0.5).long() + (helper > 0.5).long()


def quadruplet_loss(scores: Tensor, classes: Tensor, valid: Tensor) -> Tensor:
    """Mean over the adjacent relations present in the batch (3 > 2, 2 > 1, 1 > 0) of the mean pair-wise logistic
    loss ``-log sigmoid(s_i - s_j)`` over every pair (i of the higher class, j of the lower one) of valid rows."""
    terms = []
    for upper in (3, 2, 1):
        above, below = scores[valid & (classes == upper)], scores[valid & (classes == upper - 1)]
        if above.numel() and below.numel():
            terms.append(F.softplus(below[None, :] - above[:, None]).mean())
    if not terms:
        return scores.sum() * 0.0  # keeps the term in the graph when no relation is present
    return torch.stack(terms).mean()


def masked_bce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[mask], targets[mask])


class AuxiliaryRanker(nn.Module):
    """The teacher of one pair: ``r = z_target + MLP([z_target, z_helper])``, the MLP's output layer starting at zero
    so the teacher starts as the target's own ranking."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, target_logit: Tensor, helper_logit: Tensor) -> Tensor:
        return target_logit + self.residual(torch.stack([target_logit, helper_logit], dim=-1)).squeeze(-1)


class PlattCalibrator(nn.Module):
    """``logit = softplus(a) * r + b``: increasing in r, so calibrating never reorders the teacher. Starts at
    ``softplus(a) = 1, b = 0`` (the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_slope = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, scores: Tensor) -> Tensor:
        return F.softplus(self.raw_slope) * scores + self.bias


@dataclass
class PairTerms:
    ranking: Tensor  # the teacher's quadruplet loss (reaches the teacher head only)
    calibration: Tensor  # the calibrator's BCE on the target's labels (reaches the calibrator only)
    distillation: Tensor | None  # the student's BCE against the corrected soft labels (None before the warm-up ends)


class CrossDistillation(nn.Module):
    """The CrossDistil terms of every declared pair, added to the target task's loss by ``MultiTaskObjective``."""

    def __init__(self, tasks: list[TaskSpec], config: DistillationConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = DistillationConfig.from_options(config)
        self.pairs = self.config.task_pairs(tasks)
        self.teachers = nn.ModuleDict({p.key: AuxiliaryRanker(self.config.hidden) for p in self.pairs})
        self.calibrators = nn.ModuleDict({p.key: PlattCalibrator() for p in self.pairs})
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimiser steps so far, for the warm-up

    @property
    def distilling(self) -> bool:
        return int(self.steps) >= self.config.warmup_steps

    def end_step(self) -> None:
        self.steps += 1

    @torch.no_grad()  # the soft label teaches the student; it must not train the teacher or its calibrator
    def soft_labels(self, pair: TaskPair, teacher_scores: Tensor, labels: Tensor) -> Tensor:
        """The error-corrected soft labels ``c * y + (1 - c) * q`` of the pair's target, q the calibrated teacher."""
        q = torch.sigmoid(self.calibrators[pair.key](teacher_scores))
        return self.config.correction * labels + (1.0 - self.config.correction) * q

    def pair_terms(self, pair: TaskPair, logits: dict[str, Tensor], batch: Batch) -> PairTerms:
        student = logits[pair.target].float()
        target_mask, helper_mask = batch.label_mask[pair.target], batch.label_mask[pair.helper]
        labels = batch.labels[pair.target].float()
        teacher = self.teachers[pair.key](student.detach(), logits[pair.helper].float().detach())
        classes = quadruplet_classes(labels, batch.labels[pair.helper])
        ranking = quadruplet_loss(teacher, classes, target_mask & helper_mask)
        calibration = masked_bce(self.calibrators[pair.key](teacher.detach()), labels, target_mask)
        distillation = None
        if self.distilling and pair.weight > 0:
            distillation = masked_bce(student, self.soft_labels(pair, teacher, labels), target_mask)
        return PairTerms(ranking, calibration, distillation)

    def forward(self, logits: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Per target task, the sum of its pairs' terms: ranking (weighted), calibration, distillation (weighted)."""
        out: dict[str, Tensor] = {}
        for pair in self.pairs:
            terms = self.pair_terms(pair, logits, batch)
            total = self.config.ranking_weight * terms.ranking + terms.calibration
            if terms.distillation is not None:
                total = total + pair.weight * terms.distillation
            out[pair.target] = out[pair.target] + total if pair.target in out else total
        return out
