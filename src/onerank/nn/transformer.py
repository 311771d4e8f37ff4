"""Pre-LN Transformer pieces: multi-head attention with separate query and key/value sets, a feed-forward layer, a
block, and the attention of small token groups over a shared, cached prefix plus their own tokens.

Masks are boolean and follow ``scaled_dot_product_attention``: True means "may attend". Callers keep at least one
allowed key per query (e.g. the query itself), so no softmax row is empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention whose queries and keys/values may come from different token sets."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def split_heads(self, x: Tensor) -> Tensor:
        """[..., S, d] -> [..., H, S, d / H]"""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """[..., H, S, d / H] -> [..., S, d]"""
        return x.transpose(-3, -2).flatten(-2)

    def queries(self, x: Tensor) -> Tensor:
        return self.split_heads(self.query(x))

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        key, value = self.key_value(x).chunk(2, dim=-1)
        return self.split_heads(key), self.split_heads(value)

    def forward(self, query: Tensor, key_value: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """query [B, Sq, d], key_value [B, Sk, d] (default: the queries), mask broadcastable to [B, H, Sq, Sk]."""
        key, value = self.keys_values(query if key_value is None else key_value)
        out = F.scaled_dot_product_attention(self.queries(query), key, value, attn_mask=mask)
        return self.out(self.merge_heads(out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def prefix_group_attention(
    query: Tensor, prefix_key: Tensor, prefix_value: Tensor, prefix_valid: Tensor,
    own_key: Tensor, own_value: Tensor, own_mask: Tensor,
) -> Tensor:
    """Every group of tokens attends to its request's shared prefix plus its own S tokens.

    query: [R, H, N, Sq, dh] (N groups per request; Sq <= S when only some tokens of a group ask); own_key /
    own_value: [R, H, N, S, dh]; prefix_key / prefix_value: [R, H, P, dh]; prefix_valid: [R, P]; own_mask: [Sq, S].
    Returns [R, H, N, Sq, dh].

    One softmax over the concatenated scores [prefix, own] gives exactly the attention over the keys
    ``[prefix, own group]``; the prefix is read once per request instead of being copied into every group, so the
    cost is O(N S P) rather than O((P + N S)^2) for the equivalent masked full attention.
    """
    R, H, N, Sq, dh = query.shape
    P, S = prefix_key.shape[-2], own_key.shape[-2]
    query = query * dh**-0.5
    prefix_scores = torch.matmul(query.reshape(R, H, N * Sq, dh), prefix_key.transpose(-1, -2)).view(R, H, N, Sq, P)
    # Groups are tiny (S = 1 + K): broadcasting beats R H N separate Sq x S matrix products.
    own_scores = (query.unsqueeze(-2) * own_key.unsqueeze(-3)).sum(-1)
    allowed = torch.cat(
        [prefix_valid[:, None, None, None, :].expand(R, 1, 1, Sq, P), own_mask.expand(R, 1, 1, Sq, S)], dim=-1
    )
    probs = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1).masked_fill(~allowed, float("-inf")), dim=-1)
    from_prefix = torch.matmul(probs[..., :P].reshape(R, H, N * Sq, P), prefix_value).view(R, H, N, Sq, dh)
    return from_prefix + (probs[..., P:].unsqueeze(-1) * own_value.unsqueeze(-3)).sum(-2)


class TransformerBlock(nn.Module):
    """x + Attn(LN(x)), then x + FFN(LN(x)) (pre-LN); dropout on the two residual branches only, so the structured
    and the reference attention paths stay the same function even in training mode."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, num_heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_hidden, dropout)
        self.dropout = nn.Dropout(dropout)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def self_attend(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, S, d], mask broadcastable to [B, H, S, S] -> (output, the (keys, values) [B, H, S, dh] the tokens
        offered): the keys and values are what later token groups read from a cached prefix."""
        h = self.attention_norm(x)
        key, value = self.attention.keys_values(h)
        out = F.scaled_dot_product_attention(self.attention.queries(h), key, value, attn_mask=mask)
        x = x + self.dropout(self.attention.out(self.attention.merge_heads(out)))
        return self._feed_forward(x), (key, value)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.self_attend(x, mask)[0]

    def attend_groups(
        self, x: Tensor, prefix: tuple[Tensor, Tensor], prefix_valid: Tensor, own_mask: Tensor, first_query: int = 0
    ) -> Tensor:
        """x [R, N, S, d]: N groups of S tokens per request, each attending to the request's prefix (keys and values
        from ``self_attend`` of this block) and to its own tokens under ``own_mask`` [S, S].

        Only tokens ``first_query:`` are updated and returned ([R, N, S - first_query, d]); all S still offer keys.
        A last layer whose first tokens' outputs nobody reads skips their queries and feed-forward."""
        h = self.attention_norm(x)
        query = self.attention.queries(h[:, :, first_query:]).transpose(1, 2)  # [R, H, N, Sq, dh]
        key, value = (t.transpose(1, 2) for t in self.attention.keys_values(h))
        out = prefix_group_attention(query, *prefix, prefix_valid, key, value, own_mask[first_query:])
        x = x[:, :, first_query:] + self.dropout(self.attention.out(self.attention.merge_heads(out.transpose(1, 2))))
        return self._feed_forward(x)
