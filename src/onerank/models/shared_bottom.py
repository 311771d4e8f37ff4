"""Shared-Bottom (Caruana, 1997): one shared MLP over the encoder output, one tower per task."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, TaskTowers
from onerank.models.encoders import DNNEncoder, DNNEncoderConfig
from onerank.nn.mlp import MLP


@dataclass
class SharedBottomConfig(DNNEncoderConfig):
    bottom_hidden: tuple[int, ...] = (128, 64)
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0


class SharedBottom(MultiTaskModel):
    Config = SharedBottomConfig

    def __init__(self, space: FeatureSpace, config: SharedBottomConfig) -> None:
        super().__init__(space, config)
        self.encoder = DNNEncoder(space, config)
        self.bottom = MLP(self.encoder.output_dim, list(config.bottom_hidden), dropout=config.dropout)
        self.towers = TaskTowers(self.tasks, self.bottom.output_dim, config.tower_hidden, config.dropout)

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        return {t: [f"towers.towers.{t}."] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return self.towers.output_biases()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        shared = self.bottom(self.encoder(batch))
        return self.towers({t: shared for t in self.tasks})
