"""The structured encoder of ranked requests: each request's context (a prefix of tokens) encoded once, then token
groups, one per candidate, that read the context's keys / values and, inside their group, its first token and
themselves. With its cache (what serving keeps per request), the packing of ragged requests, and the plain masked
full attention it is tested against. OneRank's encoder (docs/onerank.md section 1.2); it takes widths, not a model.

    context  [segment 1, ..., segment B, global tokens]: a segment's token sees the earlier real tokens of its segment
             (causal), a global token every real context token.
    groups   [R, N, S, d]: group i = [anchor, followers...]; the anchor sees the context and itself, a follower the
             context, the anchor and itself; groups never see each other, and the context never sees a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from onerank.nn.transformer import SegmentedPrefix, TransformerBlock, attention_bias


class ContextTokens(NamedTuple):
    """A request's context: ``[segments, global tokens]``, the global tokens last. Inside each segment the real tokens
    come first, in their order, then the padding: attention is causal inside a segment, so a real token then never
    has a padded slot before it and the segments need no per-request mask (``context_layout``)."""

    tokens: Tensor  # [R, U, d]
    valid: Tensor  # [R, U] bool: False on padded segment slots
    blocks: Tensor  # [U] segment of each token (causal inside it); -1 for global tokens
    num_global: int
    segment_lengths: tuple[int, ...]  # tokens per segment, in order


@dataclass
class ContextCache:
    """Everything the groups of a request need from its context; computed once, reused for any pool or chunk."""

    keys_values: list[tuple[Tensor, Tensor]]  # per layer, the context's keys and values [R, H, U, dh]
    valid: Tensor  # [R, U] context tokens that are real (segment padding is not)
    global_states: Tensor  # [R, U_g, d] final global token states (after the final norm); [R, 0, d] when not asked for
    summary: Tensor | None = None  # [R, d] what the cache's owner derives from the context once (OneRank: s)

    @property
    def num_requests(self) -> int:
        return self.valid.shape[0]

    def rows(self, request: Tensor) -> ContextCache:
        """The cache of request ``request[b]`` for each b: one request per group (packed groups)."""
        return ContextCache(
            [(key[request], value[request]) for key, value in self.keys_values], self.valid[request],
            self.global_states[request], None if self.summary is None else self.summary[request],
        )


def distinct_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct rows of an integer matrix [N, F] and each row's index among them: (distinct [M, F], inverse [N]),
    ``distinct[inverse] == rows``. What ``torch.unique(rows, dim=0, return_inverse=True)`` returns (rows in another
    order), but through one-dimensional sorts: on the CPU ``unique`` over rows compares them one by one and took a
    third of a OneRank training step on KuaiRand. Each column is folded into a running key (a dense id below N times
    the column's range plus the code), so no key can overflow.

    Only tensor operations, no Python number read from the data: a traced or ONNX graph would bake such a number in
    (the example's code range as the key's multiplier, so larger codes collide; the example's count of distinct rows
    as a buffer size)."""
    if rows.shape[0] == 0:
        return rows, rows.new_zeros(0)
    key = rows[:, 0]
    for column in rows.unbind(1)[1:]:
        _, dense = torch.unique(key, return_inverse=True)
        key = dense * (column.max() + 1) + column
    keys, inverse = torch.unique(key, return_inverse=True)
    first = torch.zeros_like(keys).scatter(0, inverse, torch.ones_like(inverse).cumsum(0) - 1)  # any occurrence
    return rows[first], inverse


def project_distinct(project: Callable[[Tensor], Tensor], sequences: list[Tensor]) -> list[Tensor]:
    """``project`` ([M, F] integer rows -> [M, d]) of every row of several code tensors [..., F] (e.g. each behaviour
    sequence's item fields, [R, L, F]), each distinct row projected once: a batch's histories repeat the same
    popular items (and padding) many times over. Returns [..., d] per tensor."""
    if not sequences:
        return []
    flat = torch.cat([s.reshape(-1, s.shape[-1]) for s in sequences])
    distinct, inverse = distinct_rows(flat)
    tokens = project(distinct)[inverse]
    return [t.view(*s.shape[:-1], -1) for s, t in zip(sequences, tokens.split([s[..., 0].numel() for s in sequences]))]


def real_first(tokens: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """A segment's tokens [R, L, d] with the real ones (``present`` [R, L]) moved to the front, in their order, and
    the padding behind them, as ``ContextTokens`` needs. Each token's new place from running counts (no sort:
    exporters know scatter, not a stable sort)."""
    real = present.long()
    place = torch.where(present, real.cumsum(1), real.sum(1, keepdim=True) + (1 - real).cumsum(1)) - 1
    moved = torch.zeros_like(tokens).scatter(1, place[..., None].expand_as(tokens), tokens)
    return moved, torch.zeros_like(present).scatter(1, place, present)


# ---------------------------------------------------------------------------------------------------------------------
# Masks: the rules as explicit tables (the reference) and as the layout the encoder runs on
# ---------------------------------------------------------------------------------------------------------------------
def context_mask(context: ContextTokens) -> Tensor:
    """[R, U, U]: segment tokens see their own segment causally, global tokens see every context token; padded slots
    are never keys (a padded slot sees only itself, which keeps its softmax row defined)."""
    blocks = context.blocks
    U = len(blocks)
    earlier = torch.ones(U, U, dtype=torch.bool, device=blocks.device).tril()
    structure = (blocks[:, None] == -1) | ((blocks[:, None] == blocks[None, :]) & earlier)
    diagonal = torch.eye(U, dtype=torch.bool, device=blocks.device)
    return (structure & context.valid[:, None, :]) | diagonal


def context_layout(context: ContextTokens, dtype: torch.dtype) -> SegmentedPrefix:
    """``context_mask`` as the encoder runs it: causal segments in the fused kernel, the global tokens' key bias."""
    return SegmentedPrefix(context.segment_lengths, attention_bias(context.valid, dtype)[:, None, None, :])


def group_mask(size: int, device: torch.device | None = None) -> Tensor:
    """[S, S] inside one group [anchor, followers]: the anchor sees itself only (it must not carry one follower to
    another), a follower sees the anchor and itself; followers are mutually invisible."""
    mask = torch.eye(size, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return mask


def reference_mask(context: ContextTokens, present: Tensor, group_size: int, bidirectional: bool = False) -> Tensor:
    """The explicit [R, T, T] boolean mask over T = U + N S tokens, [context, G_1, ..., G_N] (present [R, N]: real
    groups). ``bidirectional``: every token sees every real token; otherwise the rules of the module docstring."""
    R, N = present.shape
    U, S = len(context.blocks), group_size
    group_valid = present.repeat_interleave(S, dim=1)
    diagonal = torch.eye(U + N * S, dtype=torch.bool, device=present.device)
    if bidirectional:
        return torch.cat([context.valid, group_valid], 1)[:, None, :] | diagonal
    mask = torch.zeros(R, U + N * S, U + N * S, dtype=torch.bool, device=present.device)
    mask[:, :U, :U] = context_mask(context)
    mask[:, U:, :U] = context.valid[:, None, :]
    eye = torch.eye(N, dtype=torch.bool, device=present.device)
    mask[:, U:, U:] = (eye[:, None, :, None] & group_mask(S, present.device)[None, :, None, :]).reshape(N * S, N * S)
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# The encoder: context once per request, then the groups against its cached keys / values
# ---------------------------------------------------------------------------------------------------------------------
class StructuredEncoder(nn.Module):
    """``num_layers`` pre-LN blocks whose weights all tokens share (they differ only in what they may see), then a
    final LayerNorm. The last layer updates only the tokens whose final states are asked for (``first_output``: the
    groups' tokens from that index on; ``first_context_output``: the context's), all tokens still offer keys."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, ffn_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, ffn_hidden, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def context(self, context: ContextTokens, first_output: int = 0) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """(final states of the context tokens ``first_output:`` [R, U - first_output, d], per-layer keys / values)."""
        x, cache = context.tokens, []
        mask = context_layout(context, x.dtype)  # built once, not per layer
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            x, kv = block.self_attend(x, mask, first_output if layer == last else 0)
            cache.append(kv)
        return self.norm(x), cache

    def joint(
        self, context: ContextTokens, groups: Tensor, first_output: int = 0, first_context_output: int = 0,
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """``context`` then ``groups`` as one function, but every layer runs its norms, projections and feed-forward
        once over the concatenation [context tokens, group tokens] and splits only the attention
        (``TransformerBlock.attend_joint``). groups [R, N, S, d] -> (final context states ``first_context_output:``,
        final group states ``first_output:`` [R, N, S - first_output, d], per-layer context keys / values)."""
        R, N, S, d = groups.shape
        U = context.tokens.shape[1]
        x = torch.cat([context.tokens, groups.reshape(R, N * S, d)], dim=1)
        mask = context_layout(context, x.dtype)
        bias = attention_bias(context.valid, x.dtype)
        last, cache = len(self.blocks) - 1, []
        for layer, block in enumerate(self.blocks):
            first, first_context = (first_output, first_context_output) if layer == last else (0, 0)
            x, kv = block.attend_joint(x, U, S, mask, bias, first, first_context)
            cache.append(kv)
        x = self.norm(x)
        context_outputs = U - first_context_output
        return x[:, :context_outputs], x[:, context_outputs:].unflatten(1, (N, -1)), cache

    def groups(self, groups: Tensor, cache: ContextCache, first_output: int = 0) -> Tensor:
        """groups [R, N, S, d] against their requests' cached context -> final states [R, N, S - first_output, d]."""
        last, x = len(self.blocks) - 1, groups
        bias = attention_bias(cache.valid, groups.dtype)
        for layer, (block, kv) in enumerate(zip(self.blocks, cache.keys_values)):
            x = block.attend_groups(x, kv, bias, first_output if layer == last else 0)
        return self.norm(x)

    def packed_groups(
        self, groups: Tensor, cache: ContextCache, slot: Tensor, present: Tensor, first_output: int = 0
    ) -> Tensor:
        """Ragged requests without padded groups: groups [B, S, d] (one per row of the batch, ``slot`` [R, N] / ``present``
        [R, N] its list layout) -> final states [R, N, S - first_output, d]. Each request's first group reads its
        request's cache as it is; only the others get their request's keys / values copied (KuaiRand: 55 of 1,024
        rows), so no group is computed for a padded slot (one request of 20 among 900 of one would pad 18,000)."""
        groups = groups[:, None]  # each group a request of one
        later = present.clone()
        later[:, 0] = False
        rows, firsts = slot[later], slot[:, 0]
        request = torch.arange(slot.shape[0], device=slot.device)[:, None].expand_as(slot)[later]
        states = torch.cat([
            self.groups(groups[firsts], cache, first_output),
            self.groups(groups[rows], cache.rows(request), first_output),
        ])  # [B, 1, S', d] in the order (firsts, rows)
        order = torch.cat([firsts, rows])
        states = states[torch.empty_like(order).index_put_((order,), torch.arange(len(order), device=order.device))]
        return states[:, 0][slot]


def reference_encoder(
    encoder: StructuredEncoder, context: ContextTokens, groups: Tensor, present: Tensor, bidirectional: bool = False
) -> tuple[Tensor, Tensor]:
    """The specification the encoder is tested against: the explicit mask (``reference_mask``), then every block over
    all U + N S tokens, with the encoder's weights -> (context states [R, U, d], group states [R, N, S, d]).
    O((U + N S)^2): not a serving path."""
    R, N, S, d = groups.shape
    x = torch.cat([context.tokens, groups.reshape(R, N * S, d)], dim=1)
    mask = reference_mask(context, present, S, bidirectional).unsqueeze(1)
    for block in encoder.blocks:
        x = block(x, mask)
    x = encoder.norm(x)
    U = context.tokens.shape[1]
    return x[:, :U], x[:, U:].reshape(R, N, S, d)
