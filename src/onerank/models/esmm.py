"""ESMM (Ma et al., "Entire Space Multi-Task Model", SIGIR 2018): pCTCVR = pCTR x pCVR over the whole impression space.

Each funnel step t has a tower giving its conditional probability q_t = p(t | t-1) over shared embeddings; the model
returns, per funnel task, the log-odds of the product of the q's up to that step, computed in log space. Trained by
the ordinary per-task BCE on every impression, step 1 learns pCTR and step 2 learns pCTCVR on the entire space while
pCVR itself is never fitted on clicked rows only (no sample selection bias). The funnel order is the ``funnel``
option (default: the schema's binary tasks in order); tasks outside the funnel get an ordinary tower.

A task whose labels exist only in a ``space`` (e.g. conversion where click = 1) holds conditional labels, so its
output is the conditional probability p(t | space) (what its rows' metric must rank by), and the entire-space term
comes from ``auxiliary_losses``: BCE of p(space and t) against ``label(space) x label(t)`` on every row where the
space's label exists. See docs/models.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.schema import SchemaError
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, TaskTowers
from onerank.models.encoders import DNNEncoder, DNNEncoderConfig


def funnel_order(space: FeatureSpace, funnel: tuple[str, ...] | list[str]) -> list[str]:
    """The funnel's tasks in order: ``funnel`` if given, else the schema's binary tasks in schema order.

    A funnel task with a ``space`` must be defined in the space of an earlier funnel step.
    """
    names = list(funnel) if funnel else [t.name for t in space.tasks if t.kind == "binary"]
    kinds = {t.name: t.kind for t in space.tasks}
    unknown = [n for n in names if n not in kinds]
    if unknown:
        raise SchemaError(f"funnel names unknown tasks {unknown}; the schema has {space.task_names}")
    if len(set(names)) != len(names):
        raise SchemaError(f"funnel repeats a task: {names}")
    not_binary = [n for n in names if kinds[n] != "binary"]
    if not_binary:
        raise SchemaError(f"funnel tasks must be binary; {not_binary} are not")
    if len(names) < 2:
        raise SchemaError(f"a funnel needs at least two binary tasks, got {names}")
    for i, name in enumerate(names):
        spec = space.schema.task(name)
        if spec.space is not None and spec.space not in names[:i]:
            raise SchemaError(
                f"funnel task {name!r} is defined in the space of {spec.space!r}, which is not an earlier step of "
                f"the funnel {names}"
            )
    return names


def product_logit(logits: list[Tensor]) -> Tensor:
    """logit(prod_i sigmoid(l_i)) without leaving log space.

    With P = prod_i sigmoid(l_i): log P is a sum of log-sigmoids, and 1 - P_t = (1 - P_{t-1}) + P_{t-1} (1 - q_t)
    gives log(1 - P) by a running logaddexp, so neither P nor 1 - P is ever rounded to 0 or 1.
    """
    if len(logits) == 1:
        return logits[0]
    log_p, log_not_p = F.logsigmoid(logits[0]), F.logsigmoid(-logits[0])
    for step in logits[1:]:
        log_not_p = torch.logaddexp(log_not_p, log_p + F.logsigmoid(-step))
        log_p = log_p + F.logsigmoid(step)
    return log_p - log_not_p


@dataclass
class ESMMConfig(DNNEncoderConfig):
    funnel: tuple[str, ...] = ()  # funnel order, e.g. (click, cart, order); default: the binary tasks in schema order
    tower_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0


class ESMM(MultiTaskModel):
    Config = ESMMConfig

    def __init__(self, space: FeatureSpace, config: ESMMConfig) -> None:
        super().__init__(space, config)
        self.funnel = funnel_order(space, config.funnel)
        # the first step of task t's product: right after its space's step (conditional labels), else step 0
        self._first_step = {}
        for name in self.funnel:
            task_space = space.schema.task(name).space
            self._first_step[name] = self.funnel.index(task_space) + 1 if task_space is not None else 0
        self.encoder = DNNEncoder(space, config)
        # funnel tasks' towers give the conditional step logits; other tasks' towers their own logits
        self.towers = TaskTowers(self.tasks, self.tower_input_dims(), config.tower_hidden, config.dropout)

    def tower_input_dims(self) -> int | dict[str, int]:
        """Width of what each task's tower reads: the encoder's output (a session model adds its state)."""
        return self.encoder.output_dim

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        return {t: [f"towers.towers.{t}."] for t in self.tasks}

    def step_logits(self, batch: Batch) -> dict[str, Tensor]:
        """Per task its tower's logit: for funnel step t, the conditional log-odds of p(t | step t-1)."""
        x = self.encoder(batch)
        return self.towers({t: x for t in self.tasks})

    def output_biases(self) -> dict[str, nn.Parameter]:
        return self.towers.output_biases()

    @torch.no_grad()
    def init_output_biases(self, logits: dict[str, float]) -> None:
        """A funnel task's output is a product of step probabilities, so step i starts at the conditional rate
        q_i = p_i / (q_first ... q_{i-1}) that makes the product p_i (``logits`` are the outputs' targets)."""
        steps = dict(logits)
        for i, name in enumerate(self.funnel):
            if name not in logits:
                continue
            earlier = 1.0
            for prev in self.funnel[self._first_step[name]:i]:
                earlier *= torch.sigmoid(torch.tensor(steps[prev])).item()
            q = min(max(torch.sigmoid(torch.tensor(logits[name])).item() / earlier, 1e-4), 1 - 1e-4)
            steps[name] = math.log(q / (1 - q))
        super().init_output_biases(steps)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        steps = self.step_logits(batch)
        out = dict(steps)
        for i, name in enumerate(self.funnel):
            out[name] = product_logit([steps[t] for t in self.funnel[self._first_step[name]:i + 1]])
        return out

    def auxiliary_losses(self, batch: Batch, logits: dict[str, Tensor]) -> dict[str, Tensor]:
        """For a funnel task t in the space of an earlier step s: BCE of p(s and t) = p(s) x p(t | s) on every row
        where s's label exists, against label(s) x label(t) (no conversion without a click)."""
        out = {}
        for name in self.funnel:
            task_space = self.space.schema.task(name).space
            if task_space is None:
                continue
            rows = batch.label_mask[task_space]
            label = batch.labels[name]
            joint_label = batch.labels[task_space] * torch.where(batch.label_mask[name], label, torch.zeros_like(label))
            joint = product_logit([logits[task_space], logits[name]])
            out[f"{name}/entire_space"] = (
                F.binary_cross_entropy_with_logits(joint[rows], joint_label[rows]) if bool(rows.any())
                else joint.sum() * 0.0
            )
        return out

    @torch.no_grad()
    def funnel_probabilities(self, batch: Batch) -> dict[str, Tensor]:
        """Every funnel probability by name: ``p(t)`` over the whole impression space for each step, ``p(t|prev)``
        the conditional of each step after the first, and ESMM's names for the first two steps: ``pCTR`` = p(step 1),
        ``pCVR`` = p(step 2 | step 1), ``pCTCVR`` = p(step 2) = pCTR x pCVR."""
        steps = self.step_logits(batch)
        out: dict[str, Tensor] = {}
        log_joint = torch.zeros_like(steps[self.funnel[0]])
        for i, name in enumerate(self.funnel):
            log_joint = log_joint + F.logsigmoid(steps[name])
            out[f"p({name})"] = log_joint.exp()
            if i > 0:
                out[f"p({name}|{self.funnel[i - 1]})"] = torch.sigmoid(steps[name])
        first, second = self.funnel[:2]
        out["pCTR"] = out[f"p({first})"]
        out["pCVR"] = out[f"p({second}|{first})"]
        out["pCTCVR"] = out[f"p({second})"]
        return out
