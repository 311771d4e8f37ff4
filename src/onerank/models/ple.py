"""PLE (Tang et al., RecSys 2020): task-specific and shared experts in stacked CGC levels, per-task towers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, TaskTowers
from onerank.models.encoders import DNNEncoder, DNNEncoderConfig
from onerank.nn.experts import PLE as PLELayers


@dataclass
class PLEConfig(DNNEncoderConfig):
    num_levels: int = 1
    num_task_experts: int = 1
    num_shared_experts: int = 2
    expert_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0
    batch_norm: bool = False  # BatchNorm after each hidden layer of the experts and towers (as torch-rechub's MLPs)


class PLE(MultiTaskModel):
    Config = PLEConfig
    added_options = {"batch_norm": False}

    def __init__(self, space: FeatureSpace, config: PLEConfig) -> None:
        super().__init__(space, config)
        self.encoder = DNNEncoder(space, config)
        self.extraction = PLELayers(
            self.encoder.output_dim, self.tasks, config.num_levels, config.num_task_experts,
            config.num_shared_experts, config.expert_hidden, config.dropout, batch_norm=config.batch_norm,
        )
        self.towers = TaskTowers(
            self.tasks, self.extraction.output_dim, config.tower_hidden, config.dropout, batch_norm=config.batch_norm
        )

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        own = self.extraction.private_prefixes("extraction")
        return {t: [f"towers.towers.{t}.", *own[t]] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return self.towers.output_biases()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.towers(self.extraction(self.encoder(batch)))
