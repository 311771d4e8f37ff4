"""The "DNN" encoder shared by the classic baselines: field embeddings, a DIN-style target attention from the
candidate over each behaviour sequence, and dense values, concatenated into one vector per impression."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.features.embedding import FeatureEmbedding
from onerank.features.space import FeatureSpace
from onerank.nn.attention import TargetAttention


@dataclass
class DNNEncoderConfig:
    embedding_dim: int = 16
    use_histories: bool = True  # False: the same model without behaviour sequences (for ablations)
    attention_hidden: tuple[int, ...] = (32,)


class DNNEncoder(nn.Module):
    def __init__(self, space: FeatureSpace, config: DNNEncoderConfig) -> None:
        super().__init__()
        self.space = space
        self.embedding = FeatureEmbedding(space, config.embedding_dim)
        self.sequences = space.sequences if config.use_histories else []
        item_width = len(space.item_fields) * config.embedding_dim
        self.attention = nn.ModuleDict(
            {s: TargetAttention(item_width, config.attention_hidden) for s in self.sequences}
        )
        self.output_dim = (
            len(space.categorical_fields) * config.embedding_dim
            + len(space.dense_fields)
            + len(self.sequences) * item_width
        )

    def forward(self, batch: Batch) -> Tensor:
        context = self.embedding.context(batch).flatten(1)
        candidate = self.embedding.candidate(batch).flatten(1)
        parts = [context, candidate, self.embedding.dense_values(batch)]
        for seq in self.sequences:
            if shares_one_history(batch.histories[seq]):  # a serving pool: embed and attend to the history once
                items, mask = self.embedding.history(batch.slice(0, 1), seq)
                parts.append(self.attention[seq](candidate, items[0].flatten(1), mask[0]))
                continue
            items, mask = self.embedding.history(batch, seq)
            parts.append(self.attention[seq](candidate, items.flatten(2), mask))
        return torch.cat(parts, dim=1)


def shares_one_history(codes: dict[str, Tensor]) -> bool:
    """Whether every row of a sequence holds the same history because the rows are one row broadcast (stride 0), as
    the ranker builds a request's pool: then the history is embedded and its attention terms computed once."""
    return all(c.dim() == 2 and c.shape[0] > 1 and c.stride(0) == 0 for c in codes.values())
