"""MMoE (Ma et al., KDD 2018) and its one-gate ablation OMoE: shared experts, softmax gates, per-task towers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, TaskTowers
from onerank.models.encoders import DNNEncoder, DNNEncoderConfig
from onerank.nn.experts import MixtureOfExperts


@dataclass
class MMoEConfig(DNNEncoderConfig):
    num_experts: int = 4
    expert_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0
    batch_norm: bool = False  # BatchNorm after each hidden layer of the experts and towers (as torch-rechub's MLPs)


class MMoE(MultiTaskModel):
    Config = MMoEConfig
    added_options = {"batch_norm": False}
    per_task_gates = True

    def __init__(self, space: FeatureSpace, config: MMoEConfig) -> None:
        super().__init__(space, config)
        self.encoder = DNNEncoder(space, config)
        self.experts = MixtureOfExperts(
            self.encoder.output_dim, self.tasks, config.num_experts, config.expert_hidden,
            per_task_gates=self.per_task_gates, dropout=config.dropout, batch_norm=config.batch_norm,
        )
        self.towers = TaskTowers(
            self.tasks, self.experts.output_dim, config.tower_hidden, config.dropout, batch_norm=config.batch_norm
        )

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        gates = {t: [f"experts.gates.{t}."] for t in self.tasks} if self.per_task_gates else {t: [] for t in self.tasks}
        return {t: [f"towers.towers.{t}.", *gates[t]] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return self.towers.output_biases()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.towers(self.experts(self.encoder(batch)))


class OMoE(MMoE):
    """One gate shared by all tasks: isolates what MMoE's per-task gates add."""

    per_task_gates = False
