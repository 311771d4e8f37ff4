from __future__ import annotations

import torch
from torch import Tensor, nn

from onerank.nn.mlp import MLP


class TargetAttention(nn.Module):
    """DIN's activation unit (Zhou et al., KDD 2018): an MLP scores each history item against the target from
    [target, item, target - item, target * item].

    The first layer is factored: a linear map of that concatenation equals ``A t + B k + C (t * k)`` (the ``t - k``
    block folds into A and B), so the target's term is computed once per row instead of once per history position
    and the [B, L, 4d] concatenation is never built. Same function class, about 4x fewer FLOPs.

    Scores are softmax-normalised over the valid items (DIN keeps them unnormalised; normalising keeps the pooled
    vector on the scale of one item, which trains more stably with long histories). An empty history pools to zeros.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (32,)) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("TargetAttention needs at least one hidden layer")
        self.target_proj = nn.Linear(dim, hidden[0])
        self.key_proj = nn.Linear(dim, hidden[0], bias=False)
        self.product_proj = nn.Linear(dim, hidden[0], bias=False)
        self.activation = nn.Sigmoid()
        self.score = MLP(hidden[0], list(hidden[1:]), output_dim=1, activation=nn.Sigmoid)

    def forward(self, target: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """target [B, d], keys [B, L, d], mask [B, L] -> [B, d]. With keys [L, d] and mask [L], one history shared
        by every row (the candidates of one request): ``shared_history``."""
        if keys.dim() == 2:
            return self.shared_history(target, keys, mask)
        t = target.unsqueeze(1)
        first = self.target_proj(t) + self.key_proj(keys) + self.product_proj(t * keys)
        logits = self.score(self.activation(first)).squeeze(-1)
        # A finite fill keeps gradients finite for rows with no valid item; the mask then zeroes their weights.
        weights = torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1) * mask
        return torch.einsum("bl,bld->bd", weights, keys)

    def shared_history(self, target: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """``forward`` for B targets against one history (keys [L, d], mask [L]), e.g. a request's candidates. The
        first layer A t + B k + C (t * k) is one matrix product of the targets with the history folded into the
        weights, [L, d, h] = k_lj C[:, j] + A[:, j], plus a per-position row (B k_l + bias): the [B, L, d] products
        and the two [B, L, h] sums are never built. The same function; the tests check it against ``forward`` on the
        history repeated for every row."""
        B, (L, d) = target.shape[0], keys.shape
        folded = keys[:, :, None] * self.product_proj.weight.T + self.target_proj.weight.T  # [L, d, h]
        row = self.key_proj(keys) + self.target_proj.bias  # [L, h]
        first = torch.addmm(row.flatten(), target, folded.permute(1, 0, 2).reshape(d, -1)).view(B, L, -1)
        logits = self.score(self.activation(first)).squeeze(-1)  # [B, L]
        weights = torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1) * mask
        return weights @ keys
