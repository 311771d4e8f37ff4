"""Single-task baseline: one independent network (encoder, MLP, tower) per task; the reference for negative
transfer (what a multi-task model gains or loses on each task)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel
from onerank.models.encoders import DNNEncoder, DNNEncoderConfig
from onerank.nn.mlp import MLP


@dataclass
class SingleTaskConfig(DNNEncoderConfig):
    hidden: tuple[int, ...] = (128, 64, 32)
    dropout: float = 0.0


class _OneTaskNetwork(nn.Module):
    def __init__(self, space: FeatureSpace, config: SingleTaskConfig) -> None:
        super().__init__()
        self.encoder = DNNEncoder(space, config)
        self.mlp = MLP(self.encoder.output_dim, list(config.hidden), output_dim=1, dropout=config.dropout)

    def forward(self, batch: Batch) -> Tensor:
        return self.mlp(self.encoder(batch)).squeeze(-1)


class SingleTask(MultiTaskModel):
    Config = SingleTaskConfig

    def __init__(self, space: FeatureSpace, config: SingleTaskConfig) -> None:
        super().__init__(space, config)
        self.networks = nn.ModuleDict({t: _OneTaskNetwork(space, config) for t in self.tasks})

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        return {t: [f"networks.{t}."] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return {t: net.mlp.net[-1].bias for t, net in self.networks.items()}

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return {t: net(batch) for t, net in self.networks.items()}
