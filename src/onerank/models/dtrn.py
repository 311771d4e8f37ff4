"""DTRN (Liu et al., "Deep Task-specific Bottom Representation Network for Multi-Task Recommendation", CIKM 2023).

The paper's equations were not available: this is our reconstruction of its two modules (docs/models.md says which
choices are ours). Every task gets its own bottom representation x_k:

1. task-specific interest: a shared hypernetwork, fed a task embedding and a behaviour-type embedding, generates a
   low-rank bilinear target-attention unit per (task, behaviour); attending from the candidate over each behaviour
   sequence gives task k its own interest u[k, b] (``nn/hypernetwork.py``);
2. task-specific representation refinement: per task, a SENet-like gate over all field embeddings and that task's
   interests rescales each field (``nn/senet.py``); the gated fields, concatenated, are x_k.

Heads: per-task towers (``dtrn``), or MMoE / PLE where task k's gate and experts read x_k (``dtrn_mmoe``, ``dtrn_ple``).
Without behaviour sequences (Census-Income) there are no interests and only the refinement runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.embedding import FeatureEmbedding
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, TaskTowers
from onerank.nn.attention import TargetAttention
from onerank.nn.experts import PLE, MixtureOfExperts
from onerank.nn.hypernetwork import HyperTargetAttention
from onerank.nn.senet import SENetGate


@dataclass
class DTRNConfig:
    embedding_dim: int = 16
    use_histories: bool = True  # False: no interests at all (refinement only, as on data without sequences)
    task_interest: bool = True  # False (ablation): one DIN target attention per behaviour, shared by all tasks
    refinement: bool = True  # False (ablation): no per-task gate, x_k = the fields and task k's interests
    task_embedding_dim: int = 8
    behaviour_embedding_dim: int = 8
    hyper_hidden: tuple[int, ...] = (64,)  # the shared hypernetwork's hidden layers
    attention_rank: int = 4  # r of the generated bilinear form W = U V^T
    attention_hidden: tuple[int, ...] = (64, 32)  # DIN unit, only used with task_interest = False
    se_reduction: int = 4  # excitation width = ceil(num_fields / se_reduction)
    gate_scale: float = 2.0  # gate = gate_scale * sigmoid(.): 2 makes an untrained gate the identity
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0


@dataclass
class DTRNMMoEConfig(DTRNConfig):
    num_experts: int = 4
    expert_hidden: tuple[int, ...] = (64,)


@dataclass
class DTRNPLEConfig(DTRNConfig):
    num_levels: int = 1
    num_task_experts: int = 1
    num_shared_experts: int = 2
    expert_hidden: tuple[int, ...] = (64,)


class TaskSpecificBottom(nn.Module):
    """batch -> {task: x_k [B, output_dim]}: the fields (categorical, dense tokens) and task k's interests, gated.

    Each interest (a weighted sum of history items, one ``d``-wide slice per item field) enters the gate as one
    field per item field, so every gated field has the embedding width ``d``.
    """

    def __init__(self, space: FeatureSpace, tasks: list[str], config: DTRNConfig) -> None:
        super().__init__()
        self.tasks = tasks
        self.config = config
        self.embedding = FeatureEmbedding(space, config.embedding_dim)
        self.sequences = space.sequences if config.use_histories else []
        self.item_fields = len(space.item_fields)
        item_width = self.item_fields * config.embedding_dim
        self.interest: nn.Module | None = None
        if self.sequences and config.task_interest:
            self.interest = HyperTargetAttention(
                item_width, tasks, self.sequences, config.task_embedding_dim, config.behaviour_embedding_dim,
                config.hyper_hidden, config.attention_rank,
            )
        elif self.sequences:
            self.interest = nn.ModuleDict({s: TargetAttention(item_width, config.attention_hidden) for s in self.sequences})
        self.num_fields = (
            len(space.categorical_fields) + len(space.dense_fields) + len(self.sequences) * self.item_fields
        )
        self.refine = (
            nn.ModuleDict({t: SENetGate(self.num_fields, config.se_reduction, config.gate_scale) for t in tasks})
            if config.refinement else None
        )
        self.output_dim = self.num_fields * config.embedding_dim

    def task_parameter_prefixes(self, prefix: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {t: [] for t in self.tasks}
        for t in self.tasks:
            if self.refine is not None:
                out[t].append(f"{prefix}refine.{t}.")
            if isinstance(self.interest, HyperTargetAttention):
                out[t].append(f"{prefix}interest.task_embeddings.{t}.")
        return out

    def _interests(self, batch: Batch, candidate: Tensor) -> dict[str, Tensor]:
        """Per task, its interests as fields: [B, S * F_item, d]."""
        histories = {}
        for seq in self.sequences:
            items, mask = self.embedding.history(batch, seq)
            histories[seq] = (items.flatten(2), mask)
        B, d = candidate.shape[0], self.config.embedding_dim
        if isinstance(self.interest, HyperTargetAttention):
            per_task = self.interest(candidate, histories)  # [B, K, S, F_item * d]
            return {t: per_task[:, k].reshape(B, -1, d) for k, t in enumerate(self.tasks)}
        shared = torch.stack([self.interest[s](candidate, *histories[s]) for s in self.sequences], dim=1)
        return {t: shared.reshape(B, -1, d) for t in self.tasks}

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        emb = self.embedding
        candidate = emb.candidate(batch)
        fields = torch.cat([emb.context(batch), candidate, emb.dense_tokens(batch)], dim=1)  # [B, F, d]
        interests = self._interests(batch, candidate.flatten(1)) if self.sequences else {}
        out = {}
        for t in self.tasks:
            x = torch.cat([fields, interests[t]], dim=1) if interests else fields
            if self.refine is not None:
                x = self.refine[t](x)
            out[t] = x.flatten(1)
        return out


class DTRN(MultiTaskModel):
    """Task-specific bottoms, then one tower per task."""

    Config = DTRNConfig

    def __init__(self, space: FeatureSpace, config: DTRNConfig) -> None:
        super().__init__(space, config)
        self.bottom = TaskSpecificBottom(space, self.tasks, config)
        self.head, width = self._build_head(self.bottom.output_dim)
        self.towers = TaskTowers(self.tasks, width, config.tower_hidden, config.dropout)

    def _build_head(self, input_dim: int) -> tuple[nn.Module | None, int]:
        return None, input_dim

    def _head_prefixes(self, task: str) -> list[str]:
        return []

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        bottom = self.bottom.task_parameter_prefixes("bottom.")
        return {t: [f"towers.towers.{t}.", *bottom[t], *self._head_prefixes(t)] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return self.towers.output_biases()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        reps = self.bottom(batch)
        return self.towers(self.head(reps) if self.head is not None else reps)


class DTRNMMoE(DTRN):
    """Task-specific bottoms under MMoE: task k's gate and the experts it mixes read x_k."""

    Config = DTRNMMoEConfig

    def _build_head(self, input_dim: int) -> tuple[nn.Module, int]:
        c = self.config
        head = MixtureOfExperts(input_dim, self.tasks, c.num_experts, c.expert_hidden, dropout=c.dropout)
        return head, head.output_dim

    def _head_prefixes(self, task: str) -> list[str]:
        return [f"head.gates.{task}."]


class DTRNPLE(DTRN):
    """Task-specific bottoms under PLE: task k's experts and gate read x_k; the shared experts read the mean of the
    x_k (``nn.experts.PLE``'s default for per-task inputs)."""

    Config = DTRNPLEConfig

    def _build_head(self, input_dim: int) -> tuple[nn.Module, int]:
        c = self.config
        head = PLE(input_dim, self.tasks, c.num_levels, c.num_task_experts, c.num_shared_experts, c.expert_hidden,
                   c.dropout)
        return head, head.output_dim

    def _head_prefixes(self, task: str) -> list[str]:
        return self.head.private_prefixes("head")[task]
