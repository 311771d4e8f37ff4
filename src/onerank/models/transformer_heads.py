"""The "Transformer encoder, then multi-task predictor" baselines: ``transformer_mmoe`` and ``transformer_ple``.

Unified tokens (one per context field, one per dense field, one for the candidate item, one per history item of every
behaviour sequence) go through a standard pre-LN Transformer encoder (``torch.nn.TransformerEncoder``), are pooled to
one vector, and an MMoE or PLE predictor maps it to per-task logits. This is the encoder-then-predictor design
OneRank is compared against: the tasks share the whole encoder and first differ in the predictor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.embedding import FeatureEmbedding
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, TaskTowers
from onerank.nn.experts import PLE, MixtureOfExperts

POOLINGS = ("mean", "cls", "candidate")


@dataclass
class TransformerEncoderConfig:
    embedding_dim: int = 16  # width of the field embedding tables
    use_histories: bool = True
    d_model: int = 32
    num_layers: int = 2
    num_heads: int = 2
    ff_dim: int = 64
    pooling: str = "mean"  # "mean" over valid tokens, "cls" (a learned summary token), "candidate" (its output)
    dropout: float = 0.0


class TokenTransformerEncoder(nn.Module):
    """batch -> [B, d_model].

    Field tokens carry a learned per-field embedding (their identity), the candidate a type embedding, history items
    a behaviour embedding plus a slot embedding (slots are left-padded, so the last slot is the most recent item).
    Candidate and history items share one item projection, so both live in the same space; empty slots are masked.
    """

    def __init__(self, space: FeatureSpace, config: TransformerEncoderConfig) -> None:
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {config.pooling!r}")
        if config.pooling == "candidate" and not space.item_fields:
            raise ValueError("pooling 'candidate' needs item fields; this dataset has none")
        self.config = config
        d, m = config.embedding_dim, config.d_model
        self.embedding = FeatureEmbedding(space, d)
        self.sequences = space.sequences if config.use_histories else []
        self.has_candidate = bool(space.item_fields)
        num_fields = len(space.context_fields) + len(space.dense_fields)
        self.field_proj = nn.Linear(d, m)
        self.field_identity = nn.Parameter(torch.randn(num_fields, m) * 0.02)
        if self.has_candidate:
            self.item_proj = nn.Linear(len(space.item_fields) * d, m)
            self.candidate_type = nn.Parameter(torch.randn(m) * 0.02)
        self.behaviour_type = nn.ParameterDict({s: nn.Parameter(torch.randn(m) * 0.02) for s in self.sequences})
        self.slot = nn.ParameterDict({s: nn.Parameter(torch.randn(space.max_len(s), m) * 0.02) for s in self.sequences})
        self.cls = nn.Parameter(torch.randn(m) * 0.02) if config.pooling == "cls" else None
        layer = nn.TransformerEncoderLayer(
            m, config.num_heads, config.ff_dim, config.dropout, batch_first=True, norm_first=True
        )
        # pre-LN: the residual stream is never normalised inside the stack, so one final LayerNorm closes it
        self.encoder = nn.TransformerEncoder(
            layer, config.num_layers, norm=nn.LayerNorm(m), enable_nested_tensor=False
        )
        self.output_dim = m

    def forward(self, batch: Batch) -> Tensor:
        emb = self.embedding
        B = batch.size
        fields = torch.cat([emb.context(batch), emb.dense_tokens(batch)], dim=1)
        tokens = [self.field_proj(fields) + self.field_identity]
        valid = [torch.ones(B, fields.shape[1], dtype=torch.bool, device=fields.device)]
        if self.has_candidate:
            candidate = self.item_proj(emb.candidate(batch).flatten(1)) + self.candidate_type
            tokens.append(candidate.unsqueeze(1))
            valid.append(valid[0][:, :1])
        for seq in self.sequences:
            items, mask = emb.history(batch, seq)
            tokens.append(self.item_proj(items.flatten(2)) + self.behaviour_type[seq] + self.slot[seq])
            valid.append(mask)
        if self.cls is not None:
            tokens.insert(0, self.cls.expand(B, 1, -1))
            valid.insert(0, valid[0][:, :1])
        x, valid_mask = torch.cat(tokens, dim=1), torch.cat(valid, dim=1)
        h = self.encoder(x, src_key_padding_mask=~valid_mask)
        if self.config.pooling == "cls":
            return h[:, 0]
        if self.config.pooling == "candidate":
            return h[:, fields.shape[1]]
        weights = valid_mask.to(h.dtype).unsqueeze(-1)
        return (h * weights).sum(1) / weights.sum(1)


@dataclass
class TransformerMMoEConfig(TransformerEncoderConfig):
    num_experts: int = 4
    expert_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (32,)


@dataclass
class TransformerPLEConfig(TransformerEncoderConfig):
    num_levels: int = 1
    num_task_experts: int = 1
    num_shared_experts: int = 2
    expert_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (32,)


class TransformerMMoE(MultiTaskModel):
    Config = TransformerMMoEConfig

    def __init__(self, space: FeatureSpace, config: TransformerMMoEConfig) -> None:
        super().__init__(space, config)
        self.encoder = TokenTransformerEncoder(space, config)
        self.experts = MixtureOfExperts(
            self.encoder.output_dim, self.tasks, config.num_experts, config.expert_hidden, dropout=config.dropout
        )
        self.towers = TaskTowers(self.tasks, self.experts.output_dim, config.tower_hidden, config.dropout)

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        return {t: [f"towers.towers.{t}.", f"experts.gates.{t}."] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return self.towers.output_biases()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.towers(self.experts(self.encoder(batch)))


class TransformerPLE(MultiTaskModel):
    Config = TransformerPLEConfig

    def __init__(self, space: FeatureSpace, config: TransformerPLEConfig) -> None:
        super().__init__(space, config)
        self.encoder = TokenTransformerEncoder(space, config)
        self.extraction = PLE(
            self.encoder.output_dim, self.tasks, config.num_levels, config.num_task_experts,
            config.num_shared_experts, config.expert_hidden, config.dropout,
        )
        self.towers = TaskTowers(self.tasks, self.extraction.output_dim, config.tower_hidden, config.dropout)

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        own = self.extraction.private_prefixes("extraction")
        return {t: [f"towers.towers.{t}.", *own[t]] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return self.towers.output_biases()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.towers(self.extraction(self.encoder(batch)))
