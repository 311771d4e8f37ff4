"""AITM (Xi et al., "Modeling the Sequential Dependence among Audience Multi-step Conversions with Multi-task
Learning in Targeted Display Advertising", KDD 2021).

Shared embeddings; per funnel step t a tower encodes q_t. Step t > 1 receives information from step t-1 through a
transfer unit, p_{t-1} = MLP(z_{t-1}), and an attention unit (AIT) mixes {p_{t-1}, q_t} into z_t with scaled
dot-product self-attention over the two vectors; a linear output layer maps z_t to the step's logit. The behavioural
expectation calibrator penalises p_t > p_{t-1} (a later step cannot be likelier than an earlier one):
``calibrator_weight * mean(max(p_t - p_{t-1}, 0))``, returned through ``auxiliary_losses`` and added to step t's loss.

Every funnel step's output is the probability of reaching it over the whole impression space. A task whose labels
exist only in a ``space`` predicts that conditional probability instead, and the calibrator only compares consecutive
steps defined over the same rows (a conditional probability may exceed the previous step's). The funnel order is the
``funnel`` option (default: the schema's binary tasks in order); tasks outside the funnel get an ordinary tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel
from onerank.models.encoders import DNNEncoder, DNNEncoderConfig
from onerank.models.esmm import funnel_order
from onerank.nn.mlp import MLP


@dataclass
class AITMConfig(DNNEncoderConfig):
    funnel: tuple[str, ...] = ()  # funnel order, e.g. (click, cart, order); default: the binary tasks in schema order
    tower_hidden: tuple[int, ...] = (128, 64, 32)  # each task's tower; its last width is the AIT width
    calibrator_weight: float = 0.6  # the paper's alpha
    detach_transfer: bool = False  # True: step t's loss does not train step t-1's tower through the transfer
    dropout: float = 0.0


class AttentionTransfer(nn.Module):
    """AIT: self-attention over the transferred vector and the task's own vector; [B, 2, h] -> [B, h]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, transferred: Tensor, own: Tensor) -> Tensor:
        x = torch.stack([transferred, own], dim=1)
        scores = (self.query(x) * self.key(x)).sum(-1) * self.scale  # each vector's attention to itself
        return torch.einsum("bn,bnh->bh", torch.softmax(scores, dim=1), self.value(x))


class AITM(MultiTaskModel):
    Config = AITMConfig

    def __init__(self, space: FeatureSpace, config: AITMConfig) -> None:
        super().__init__(space, config)
        if not config.tower_hidden:
            raise ValueError("aitm: tower_hidden needs at least one layer (its last width is the AIT width)")
        self.funnel = funnel_order(space, config.funnel)
        self.encoder = DNNEncoder(space, config)
        width = config.tower_hidden[-1]
        self.towers = nn.ModuleDict(
            {t: MLP(self.encoder.output_dim, list(config.tower_hidden), dropout=config.dropout) for t in self.tasks}
        )
        later = self.funnel[1:]
        self.transfer = nn.ModuleDict({t: MLP(width, [width], dropout=config.dropout) for t in later})
        self.attention = nn.ModuleDict({t: AttentionTransfer(width) for t in later})
        self.outputs = nn.ModuleDict({t: nn.Linear(width, 1) for t in self.tasks})
        # p_t <= p_{t-1} only holds when both are probabilities over the same rows (the same space)
        task_space = {t.name: t.space for t in space.tasks}
        self._calibrated = [(prev, t) for prev, t in zip(self.funnel, later) if task_space[prev] == task_space[t]]

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        prefixes = {t: [f"towers.{t}.", f"outputs.{t}."] for t in self.tasks}
        for t in self.funnel[1:]:
            prefixes[t] += [f"transfer.{t}.", f"attention.{t}."]
        return prefixes

    def output_biases(self) -> dict[str, nn.Parameter]:
        return {t: layer.bias for t, layer in self.outputs.items()}

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.encoder(batch)
        own = {t: tower(x) for t, tower in self.towers.items()}
        z = dict(own)
        for prev, t in zip(self.funnel, self.funnel[1:]):
            source = z[prev].detach() if self.config.detach_transfer else z[prev]
            z[t] = self.attention[t](self.transfer[t](source), own[t])
        return {t: self.outputs[t](z[t]).squeeze(-1) for t in self.tasks}

    def auxiliary_losses(self, batch: Batch, logits: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.config.calibrator_weight == 0:
            return {}
        return {
            f"{t}/calibrator": self.config.calibrator_weight
            * torch.relu(torch.sigmoid(logits[t]) - torch.sigmoid(logits[prev])).mean()
            for prev, t in self._calibrated
        }
