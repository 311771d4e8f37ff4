"""STEM (Su et al., "STEM: Unleashing the Power of Embeddings for Multi-task Recommendation", AAAI 2024).

Shared and Task-specific EMbeddings: one shared embedding set plus one per task (each a full DNN encoder: field
embeddings and target attention over the histories). Task k's experts read task k's embeddings, the shared experts
the shared ones. Task k's gate ("All Forward, Task-specific Backward") mixes every expert of every task and the shared
ones, but the other tasks' experts enter it detached: task k's loss reaches only its own and the shared experts and
embeddings, so each task keeps embeddings of its own while still reading what the others learnt.
Gate input: the sum of the task's and the shared representation (as in the reference implementation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, TaskTowers
from onerank.models.encoders import DNNEncoder, DNNEncoderConfig
from onerank.nn.mlp import MLP


@dataclass
class STEMConfig(DNNEncoderConfig):
    num_shared_experts: int = 1
    num_task_experts: int = 1
    expert_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (32,)
    detach_other_tasks: bool = True  # False (ablation): gates pass gradients to every task's experts
    dropout: float = 0.0


class STEM(MultiTaskModel):
    Config = STEMConfig

    def __init__(self, space: FeatureSpace, config: STEMConfig) -> None:
        super().__init__(space, config)
        self.shared_encoder = DNNEncoder(space, config)
        self.task_encoders = nn.ModuleDict({t: DNNEncoder(space, config) for t in self.tasks})
        width = self.shared_encoder.output_dim

        def experts(n: int) -> nn.ModuleList:
            return nn.ModuleList(MLP(width, list(config.expert_hidden), dropout=config.dropout) for _ in range(n))

        self.shared_experts = experts(config.num_shared_experts)
        self.task_experts = nn.ModuleDict({t: experts(config.num_task_experts) for t in self.tasks})
        total = config.num_shared_experts + config.num_task_experts * len(self.tasks)
        self.gates = nn.ModuleDict({t: nn.Linear(width, total) for t in self.tasks})
        self.towers = TaskTowers(self.tasks, self.shared_experts[0].output_dim, config.tower_hidden, config.dropout)

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        return {
            t: [f"task_encoders.{t}.", f"task_experts.{t}.", f"gates.{t}.", f"towers.towers.{t}."] for t in self.tasks
        }

    def output_biases(self) -> dict[str, nn.Parameter]:
        return self.towers.output_biases()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        shared_x = self.shared_encoder(batch)
        task_x = {t: enc(batch) for t, enc in self.task_encoders.items()}
        shared = [e(shared_x) for e in self.shared_experts]
        own = {t: [e(task_x[t]) for e in self.task_experts[t]] for t in self.tasks}
        mixed = {}
        for task in self.tasks:
            experts = list(shared)
            for other in self.tasks:
                detach = self.config.detach_other_tasks and other != task
                experts += [e.detach() for e in own[other]] if detach else own[other]
            weights = torch.softmax(self.gates[task](task_x[task] + shared_x), dim=-1)
            mixed[task] = torch.einsum("be,beh->bh", weights, torch.stack(experts, dim=1))
        return self.towers(mixed)
