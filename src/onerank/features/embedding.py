"""Embedding of categorical fields, dense fields and items (candidates and history items share the item tables)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.space import FeatureSpace


class FeatureEmbedding(nn.Module):
    """One table per categorical field (code 0 = padding embeds to zero), one learned vector per dense field.

    All fields share one width ``dim`` so that they can also serve as Transformer tokens.
    """

    def __init__(self, space: FeatureSpace, dim: int) -> None:
        super().__init__()
        self.space = space
        self.dim = dim
        self.tables = nn.ModuleDict(
            {name: nn.Embedding(space.vocab_sizes[name], dim, padding_idx=0) for name in space.categorical_fields}
        )
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()
        num_dense = len(space.dense_fields)
        self.dense_weight = nn.Parameter(torch.randn(num_dense, dim) * 0.05)
        self.dense_bias = nn.Parameter(torch.zeros(num_dense, dim))

    # ---- fields -----------------------------------------------------------------------------------------------------
    def fields(self, batch: Batch, names: list[str]) -> Tensor:
        """[B, len(names), d]"""
        if not names:
            return self.dense_weight.new_zeros(batch.size, 0, self.dim)
        return torch.stack([self.tables[n](batch.categorical[n]) for n in names], dim=1)

    def context(self, batch: Batch) -> Tensor:
        """User and context fields: [B, F_ctx, d]."""
        return self.fields(batch, self.space.context_fields)

    def candidate(self, batch: Batch) -> Tensor:
        """The candidate item's fields: [B, F_item, d]."""
        return self.fields(batch, self.space.item_fields)

    def dense_values(self, batch: Batch) -> Tensor:
        """[B, D] standardised dense values."""
        if not self.space.dense_fields:
            return self.dense_weight.new_zeros(batch.size, 0)
        return torch.stack([batch.dense[n] for n in self.space.dense_fields], dim=1)

    def dense_tokens(self, batch: Batch) -> Tensor:
        """[B, D, d]: value * w_f + b_f, one token per dense field."""
        return self.dense_values(batch).unsqueeze(-1) * self.dense_weight + self.dense_bias

    # ---- items and histories -----------------------------------------------------------------------------------------
    def items(self, codes: dict[str, Tensor]) -> Tensor:
        """Item fields of any leading shape -> [..., F_item, d]."""
        return torch.stack([self.tables[n](codes[n]) for n in self.space.item_fields], dim=-2)

    def history(self, batch: Batch, sequence: str) -> tuple[Tensor, Tensor]:
        """([B, L, F_item, d] item embeddings, [B, L] validity mask) of one behaviour sequence."""
        codes = batch.histories[sequence]
        return self.items(codes), codes[self.space.schema.item_id] != 0
