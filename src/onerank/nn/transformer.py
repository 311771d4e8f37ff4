"""Pre-LN Transformer pieces: multi-head attention with separate query and key/value sets, a feed-forward layer, a
block, and the attention of small token groups over a shared, cached prefix plus their own tokens (the structured
attention of OneRank; ``nn/structured.py`` builds its encoder on them and keeps the plain masked reference it is
tested against).

Boolean masks follow ``scaled_dot_product_attention``: True means "may attend". A prefix's validity is passed to the
group attentions as an additive bias (``attention_bias``). Every query keeps at least one allowed key (itself), so
no softmax row is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def project(self, x: Tensor) -> Tensor:
        """[..., S, d] -> [..., S, 3 d]: queries, keys and values of the same tokens in one matrix product."""
        return F.linear(x, torch.cat([self.query.weight, self.key_value.weight]),
                        torch.cat([self.query.bias, self.key_value.bias]))

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


class GatedSetAttention(nn.Module):
    """Attention within each set, added through a gate: x_i <- x_i + g * Attn(LN x_i, {LN x_j : j in i's set}), the
    keys the set's real members (x_i itself included, so a set of one stays defined). The per-channel gate g starts
    at 0, so a model starts as it would without the layer (OneRank's page attention: a set is a request's candidates
    under one task)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, num_heads)
        self.gate = nn.Parameter(torch.zeros(dim))  # a vector like a norm gain: no weight decay

    def forward(self, x: Tensor, present: Tensor) -> Tensor:
        """x [R, N, d] (R sets padded to N), present [R, N] -> [R, N, d]"""
        normed = self.norm(x)
        return x + self.gate * self.attention(normed, normed, present[:, None, None, :])


def attention_bias(valid: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean key validity -> additive scores: 0 where a key may be read, -inf where not."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))


def _prefix_scores(query: Tensor, prefix_key: Tensor, prefix_bias: Tensor) -> Tensor:
    """Scaled queries [R, H, ..., dh] -> their scores to the request's prefix keys [R, H, P, dh] plus the prefix's
    additive bias [R, P]: [R, H, ..., P], the bias folded into one batched matrix product."""
    R, H, dh = query.shape[0], query.shape[1], query.shape[-1]
    P = prefix_key.shape[-2]
    scores = torch.baddbmm(
        prefix_bias.view(R, 1, 1, P).expand(R, H, 1, P).reshape(R * H, 1, P),
        query.reshape(R * H, -1, dh), prefix_key.reshape(R * H, P, dh).transpose(1, 2),
    )
    return scores.view(*query.shape[:-1], P)


def prefix_group_attention(
    query: Tensor, prefix_key: Tensor, prefix_value: Tensor, prefix_bias: Tensor,
    group_key: Tensor, group_value: Tensor,
) -> Tensor:
    """Token groups [a, b_1, ..., b_m] (an anchor and its followers, e.g. a candidate and its task tokens) attending
    to their request's shared prefix plus, inside the group, the anchor and themselves: the anchor sees the prefix
    and itself, b_j sees the prefix, a and b_j. Groups never see each other.

    query: [R, H, N, Sq, dh], the queries of the group's last Sq tokens (Sq = S, or S - 1 when the anchor's own
    output is not needed); group_key / group_value: [R, H, N, S, dh]; prefix_key / prefix_value: [R, H, P, dh];
    prefix_bias: [R, P] (``attention_bias`` of the prefix's validity). Returns [R, H, N, Sq, dh].

    One softmax over [prefix scores, score to the anchor, score to itself] is exactly the masked attention over
    ``[prefix, own group]``, but the prefix is read once per request instead of once per group: O(N S P) rather
    than the O((P + N S)^2) of the equivalent masked full attention, and only the two allowed in-group scores are
    computed (the reference builds the explicit mask; the tests check that they agree). Without gradients on the CPU
    the prefix part runs in the fused kernel (``prefix_attention``) and the two in-group keys are merged into its
    result (``merge_extra_keys``).
    """
    R, H, N, Sq, dh = query.shape
    P, S = prefix_key.shape[-2], group_key.shape[-2]
    query = query * dh**-0.5
    anchor_key, anchor_value = group_key[..., :1, :], group_value[..., :1, :]
    own_key, own_value = group_key[..., S - Sq:, :], group_value[..., S - Sq:, :]
    to_anchor = (query * anchor_key).sum(-1, keepdim=True)
    to_self = (query * own_key).sum(-1, keepdim=True)
    if Sq == S:  # the anchor's "self" is the anchor: count it once
        to_self = to_self.masked_fill(torch.arange(S, device=query.device).view(S, 1) == 0, float("-inf"))
    if fused_attention_applies(query):
        out, log_total = prefix_attention(query.reshape(R, H, N * Sq, dh), prefix_key, prefix_value, prefix_bias)
        return merge_extra_keys(out.unflatten(2, (N, Sq)), log_total.unflatten(2, (N, Sq)),
                                [to_anchor.squeeze(-1), to_self.squeeze(-1)], [anchor_value, own_value])
    to_prefix = _prefix_scores(query, prefix_key, prefix_bias)  # [R, H, N, Sq, P]
    probs = torch.softmax(torch.cat([to_prefix, to_anchor, to_self], dim=-1), dim=-1)
    out = torch.matmul(probs[..., :P].reshape(R, H, N * Sq, P), prefix_value).view(R, H, N, Sq, dh)
    return out + probs[..., P:P + 1] * anchor_value + probs[..., P + 1:] * own_value


def fused_attention_applies(x: Tensor) -> bool:
    """Whether ``prefix_attention`` may run: inference (no gradient) on the CPU, outside graph capture (export and
    tracing record the explicit softmax, which every exporter knows). Training keeps the explicit path."""
    return (
        x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
    )


def prefix_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Scaled queries [R, H, L, dh] attending to their request's prefix (keys / values [R, H, P, dh], additive bias
    [R, P]) in PyTorch's fused CPU attention kernel (the one ``scaled_dot_product_attention`` dispatches to, called
    directly because it also returns the softmax's log-sum-exp): (output [R, H, L, dh], log-sum-exp [R, H, L]).
    The [L, P] scores are never materialised. A request whose prefix has no valid key gets a log-sum-exp of -inf
    (the kernel reports 0), so that ``merge_extra_keys`` gives its prefix no weight."""
    out, log_total = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=bias[:, None, None, :].to(query.dtype), scale=1.0
    )
    empty = torch.isinf(bias).all(-1)  # bias is 0 or -inf
    return out, log_total.masked_fill(empty[:, None, None], float("-inf"))


def merge_extra_keys(out: Tensor, log_total: Tensor, scores: list[Tensor], values: list[Tensor]) -> Tensor:
    """An attention's output over some keys (``out`` [..., dh], the log-sum-exp of its scores ``log_total`` [...])
    -> the output of one softmax over those keys plus a few more, each with its score [...] and value [..., dh]:
    the softmax over [log_total, scores...] weighs each part, exactly (the split-softmax identity)."""
    weights = torch.softmax(torch.stack([log_total.to(scores[0].dtype), *scores], dim=-1), dim=-1).unsqueeze(-1)
    merged = weights[..., 0, :] * out
    for k, value in enumerate(values, start=1):
        merged = merged + weights[..., k, :] * value
    return merged


class TransformerBlock(nn.Module):
    """x + Attn(LN(x)), then x + FFN(LN(x)) (pre-LN). Dropout acts on the residual branches and inside the FFN, never
    on attention probabilities, so the structured and the reference attention stay the same function in training."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, num_heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_hidden, dropout)
        self.dropout = nn.Dropout(dropout)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def self_attend(
        self, x: Tensor, mask: Tensor | SegmentedPrefix | None = None, first_query: int = 0
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, S, d], mask broadcastable to [B, H, S, S] -> (output of tokens ``first_query:``, the (keys, values)
        [B, H, S, dh] all tokens offered): the keys and values are what later token groups read from a cached prefix.
        A last layer whose leading tokens' outputs nobody reads skips their queries and feed-forward."""
        h = self.attention_norm(x)
        key, value = self.attention.keys_values(h)
        if first_query >= x.shape[1]:
            return x[:, x.shape[1]:], (key, value)
        if isinstance(mask, SegmentedPrefix):
            out = mask.attend(self.attention.queries(h[:, first_query:]), key, value, first_query)
        else:
            if mask is not None and mask.shape[-2] > 1:
                mask = mask[..., first_query:, :]
            out = F.scaled_dot_product_attention(self.attention.queries(h[:, first_query:]), key, value,
                                                 attn_mask=mask)
        x = x[:, first_query:] + self.dropout(self.attention.out(self.attention.merge_heads(out)))
        return self._feed_forward(x), (key, value)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.self_attend(x, mask)[0]

    def attend_groups(
        self, x: Tensor, prefix: tuple[Tensor, Tensor], prefix_bias: Tensor, first_query: int = 0
    ) -> Tensor:
        """x [R, N, S, d]: N groups [anchor, followers] per request attending as in ``prefix_group_attention`` to
        the request's prefix (keys and values from ``self_attend`` of this block) and inside their group.

        Only tokens ``first_query:`` are updated and returned ([R, N, S - first_query, d]); all S still offer keys:
        a last layer whose anchor output nobody reads skips the anchor's query and feed-forward."""
        h = self.attention_norm(x)
        query = self.attention.queries(h[:, :, first_query:]).transpose(1, 2)  # [R, H, N, Sq, dh]
        key, value = (t.transpose(1, 2) for t in self.attention.keys_values(h))
        out = prefix_group_attention(query, *prefix, prefix_bias, key, value)
        x = x[:, :, first_query:] + self.dropout(self.attention.out(self.attention.merge_heads(out.transpose(1, 2))))
        return self._feed_forward(x)

    def attend_joint(
        self, x: Tensor, num_prefix: int, group_size: int, prefix_layout: SegmentedPrefix, prefix_bias: Tensor,
        first_query: int = 0, first_prefix_query: int = 0,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``self_attend`` of a prefix and ``attend_groups`` of its groups in one call: x [R, P + N S, d] is
        [prefix, G_1, ..., G_N] (groups of S tokens). The token-wise parts (norms, projections, feed-forward) run once
        on all tokens; only the attention is split (the prefix under its ``prefix_layout``, the groups over this
        layer's prefix keys / values, ``prefix_bias`` [R, P], and inside their group). The same function as
        ``self_attend`` followed by ``attend_groups``, with fewer operator launches.

        Returns ([R, P - first_prefix_query + N (S - first_query), d]: the prefix tokens ``first_prefix_query:`` and
        the group tokens ``first_query:``, the prefix's (keys, values) [R, H, P, dh])."""
        attended, prefix_kv = _joint_attention(
            self.attention, self.attention_norm(x), num_prefix, group_size, prefix_layout, prefix_bias, first_query,
            first_prefix_query,
        )
        x = _queried_tokens(x, num_prefix, group_size, first_query, first_prefix_query)
        x = x + self.dropout(self.attention.out(attended.flatten(2)))
        return self._feed_forward(x), prefix_kv


@dataclass
class SegmentedPrefix:
    """A prefix laid out as causal segments, then global tokens: a segment's token sees the earlier tokens of its
    segment and itself, a global token every real prefix token. Inside each segment the real tokens must come first
    (padding last): a real token then never has padding before it, so the segments run in the fused causal kernel
    with no mask at all, and only the global tokens read the padding bias. The same attention as the explicit
    [R, P, P] mask (``nn.structured.context_mask``; the tests compare them) at a fraction of the cost: no mask to
    build, and S_1^2 + S_2^2 + ... scores instead of P^2 (KuaiRand: three histories of 50 and 34 SD tokens, 184
    tokens). Padded slots attend to the real tokens of their segment; nobody reads them (they are never keys)."""

    segment_lengths: tuple[int, ...]
    key_bias: Tensor  # [R, 1, 1, P] additive (``attention_bias`` of the prefix's validity)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, first_query: int = 0) -> Tensor:
        """The queries of tokens ``first_query:`` [R, H, P - first_query, dh], keys / values of all P tokens
        [R, H, P, dh] -> their outputs [R, H, P - first_query, dh]."""
        P, first_global = key.shape[2], sum(self.segment_lengths)
        if first_query >= first_global:  # only global tokens asked for (a last layer)
            return self._attend_globally(query, key, value)
        if first_query:  # a segment's first tokens lie before first_query: computed, then dropped (causal: exact)
            query = torch.cat([query.new_zeros(*query.shape[:2], first_query, query.shape[-1]), query], dim=2)
        # one split per tensor, not a slice per segment: its backward writes one gradient, not one per segment
        sizes = [*self.segment_lengths, P - first_global]
        queries, keys, values = query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)
        outputs = [F.scaled_dot_product_attention(q, k, v, is_causal=True)
                   for q, k, v in zip(queries[:-1], keys[:-1], values[:-1])]
        outputs.append(self._attend_globally(queries[-1], key, value))
        return torch.cat(outputs, dim=2)[:, :, first_query:]

    def _attend_globally(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Global tokens' queries -> their attention over every real prefix token."""
        if query.shape[2] == 0:
            return query
        return F.scaled_dot_product_attention(query, key, value, attn_mask=self.key_bias.to(query.dtype))


def _prefix_attention(query: Tensor, key: Tensor, value: Tensor, layout: SegmentedPrefix, first_query: int) -> Tensor:
    """The prefix's self-attention for its queries ``first_query:`` (query [R, H, P, dh])."""
    if first_query == query.shape[2]:
        return query[:, :, first_query:]
    return layout.attend(query[:, :, first_query:], key, value, first_query)


def _queried_tokens(x: Tensor, num_prefix: int, group_size: int, first_query: int, first_prefix_query: int) -> Tensor:
    """x [R, P + N S, d] -> the tokens a layer updates: prefix tokens ``first_prefix_query:``, group tokens
    ``first_query:``."""
    if not first_query and not first_prefix_query:
        return x
    R, _, d = x.shape
    groups = x[:, num_prefix:].unflatten(1, (-1, group_size))[:, :, first_query:]
    return torch.cat([x[:, first_prefix_query:num_prefix], groups.reshape(R, -1, d)], dim=1)


def _joint_attention(
    attention: MultiHeadAttention, h: Tensor, num_prefix: int, group_size: int, prefix_layout: SegmentedPrefix,
    prefix_bias: Tensor, first_query: int, first_prefix_query: int = 0,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The attention of ``TransformerBlock.attend_joint`` (before the output projection): h [R, P + N S, d] normed
    tokens [prefix, G_1, ..., G_N]. The queries, keys and values of all tokens come from one projection each; the
    prefix attends to itself under ``prefix_layout``, the groups as in ``prefix_group_attention`` to this layer's prefix
    keys / values and inside their group. Returns ([R, P - first_prefix_query + N Sq, H, dh] token-major outputs of
    the prefix queries ``first_prefix_query:`` and the group queries ``first_query:``, prefix (keys, values)
    [R, H, P, dh])."""
    R, T, d = h.shape
    P, S, H, dh = num_prefix, group_size, attention.num_heads, attention.head_dim
    Sq = S - first_query
    query, key, value = attention.project(h).view(R, T, 3, H, dh).unbind(2)  # [R, T, H, dh] each
    prefix_key, prefix_value = key[:, :P].transpose(1, 2), value[:, :P].transpose(1, 2)  # [R, H, P, dh]
    prefix_out = _prefix_attention(query[:, :P].transpose(1, 2), prefix_key, prefix_value, prefix_layout,
                                   first_prefix_query)  # [R, H, P - first_prefix_query, dh]
    group_query = query[:, P:].unflatten(1, (-1, S))[:, :, first_query:]  # [R, N, Sq, H, dh]
    group_key, group_value = key[:, P:].unflatten(1, (-1, S)), value[:, P:].unflatten(1, (-1, S))
    scaled = group_query.permute(0, 3, 1, 2, 4) * dh**-0.5  # [R, H, N, Sq, dh]
    N = scaled.shape[2]
    to_prefix = _prefix_scores(scaled, prefix_key, prefix_bias)  # [R, H, N, Sq, P]
    anchor_key = group_key[:, :, :1].permute(0, 3, 1, 2, 4)  # [R, H, N, 1, dh]
    own_key = group_key[:, :, first_query:].permute(0, 3, 1, 2, 4)  # [R, H, N, Sq, dh]
    to_anchor = (scaled * anchor_key).sum(-1, keepdim=True)  # [R, H, N, Sq, 1]
    to_self = (scaled * own_key).sum(-1, keepdim=True)
    if first_query == 0:  # the anchor's "self" is the anchor: count it once
        to_self = to_self.masked_fill(torch.arange(S, device=h.device).view(S, 1) == 0, float("-inf"))
    probs = torch.softmax(torch.cat([to_prefix, to_anchor, to_self], dim=-1), dim=-1)
    out = torch.bmm(probs.view(R * H, N * Sq, P + 2)[..., :P], prefix_value.reshape(R * H, P, dh))
    out = out.view(R, H, N, Sq, dh)
    anchor_value = group_value[:, :, :1].permute(0, 3, 1, 2, 4)
    own_value = group_value[:, :, first_query:].permute(0, 3, 1, 2, 4)
    out = out + probs[..., P:P + 1] * anchor_value + probs[..., P + 1:] * own_value
    merged = torch.cat([prefix_out.transpose(1, 2), out.permute(0, 2, 3, 1, 4).flatten(1, 2)], dim=1)
    return merged, (prefix_key, prefix_value)
