from __future__ import annotations

import torch
from torch import Tensor, nn

from onerank.nn.mlp import MLP


class TargetAttention(nn.Module):
    """DIN's activation unit (Zhou et al., KDD 2018): an MLP scores each history item against the target from
    [target, item, target - item, target * item].

    Scores are softmax-normalised over the valid items (DIN keeps them unnormalised; normalising keeps the pooled
    vector on the scale of one item, which trains more stably with long histories). An empty history pools to zeros.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        self.score = MLP(4 * dim, list(hidden), output_dim=1, activation=nn.Sigmoid)

    def forward(self, target: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """target [B, d], keys [B, L, d], mask [B, L] -> [B, d]"""
        t = target.unsqueeze(1).expand_as(keys)
        logits = self.score(torch.cat([t, keys, t - keys, t * keys], dim=-1)).squeeze(-1)
        # A finite fill keeps gradients finite for rows with no valid item; the mask then zeroes their weights.
        weights = torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1) * mask
        return torch.einsum("bl,bld->bd", weights, keys)
