"""OneRank (Tang, Dai, et al., KDD 2026): a Transformer-native multi-task ranker, read like the paper's figure.

    tokens (SD, history, anchors | candidates + K task tokens)        section 1.1
      -> one shared encoder with a task-conditioned attention mask     1.2  context once per request, then groups
      -> candidate-aware contextualization h_k = MHCA_k(f_k(s), r_k)   1.3  one vector per task and request
      -> cross-task attention with gradient detachment z = ...(h)     1.4
      -> matching scores s[k, i] = <z_k, r[k, i]> a_k + b_k            1.5  (losses: onerank.objectives)

Section numbers refer to docs/models.md (shared spec) and docs/onerank.md. Every ablation of section 1.6 is a
``OneRankConfig`` value. ``reference_encode`` at the end is the plain masked full attention the structured encoder is
tested against; the "full bidirectional" ablation runs on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.encoding import OOV
from onerank.data.schema import SchemaError
from onerank.features.embedding import FeatureEmbedding
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, register_model
from onerank.nn.mlp import MLP
from onerank.nn.transformer import (
    FeedForward, MultiHeadAttention, SegmentedPrefix, TransformerBlock, attention_bias,
)


MANY_SD_FIELDS = 8  # sd_tokens: auto groups the SD fields of a dataset with more than this many


@dataclass
class OneRankConfig:
    dim: int = 32  # d: width of every token (field embeddings too)
    num_layers: int = 2
    num_heads: int = 2
    ffn_multiplier: int = 4  # FFN hidden width = ffn_multiplier * d (encoder and cross-task layer)
    dropout: float = 0.0
    item_mlp_hidden: tuple[int, ...] = (64,)  # shared item projection: MLP(concat item field embeddings) -> d
    # "field": one SD token per field; "group": one token per schema group (user, context), a projection of its
    # fields, or per run of at most sd_group_size fields of it; "auto": "group" where there are more than
    # MANY_SD_FIELDS SD fields. "field" is the default: on KuaiRand grouping cost 0.01-0.02 test AUC on click and
    # long_view (docs/onerank.md).
    sd_tokens: str = "field"
    sd_group_size: int | None = None
    anchor_sequences: tuple[str, ...] = ()  # behaviour sequences used as preference-anchor groups (not history)
    # "candidate": task token k of group i enters the encoder as t_k + c_i (the candidate reaches every layer of its
    # task tokens, not through one key among the context's); "template": the bare t_k (the paper's figure; ablation).
    task_token_input: str = "candidate"
    # "id": each task also owns an embedding of the candidate's item id, added to its task token's input
    # (t_k + c_i + e_k(item)); "all": of every categorical item field, summed; zero at the start. Task-specific
    # embeddings as in STEM (Su et al., AAAI 2024), on the candidate side only: the context stays shared, so the
    # cost is a few lookups per task and candidate. "off": none.
    task_item_embedding: str = "off"
    scorer: str = "dot"  # s = <z_k, r> a_k + b_k; "bilinear": z_k^T W_k r a_k + b_k with W_k = I at the start
    # ---- ablation switches (section 1.6) ----
    attention: str = "structured"  # "structured" mask, or "full" bidirectional attention over all tokens
    task_tokens: str = "per_task"  # "per_task" tokens t_k; one "shared" token; "projection": r_k = P_k(c_i)
    # "sd": h_k = MHCA_k(f_k(s), r_k); "random_sd": s untrained; "mean_pool": h_k = mean of r_k over the pool (no
    # contextualization); "off": h_k = f_k(s) (no pool)
    contextualization: str = "sd"
    sd_representation: str = "pooled"  # s = mean of the SD token outputs ("pooled") or an MLP over SD embeddings
    # "auto": "cascade" when the schema declares nested task spaces (a funnel), "full" otherwise; "cascade" (schema
    # order = funnel order), "full", "parallel", or "none" (no layer)
    cross_task: str = "auto"
    cross_task_matrix: tuple[tuple[bool, ...], ...] | None = None  # explicit K x K [reader][read]; overrides cross_task
    detach_cross_task: bool = True  # task k reads h_j (j != k) through h_j.detach()
    # How the cross-task layer adds to h. "gated": z = h + g_a * Attn(LN(h)), z = z + g_f * FFN(LN(z)) with per-channel
    # gates g starting at 0, so the layer starts as the identity (z = h) and learns how much to read across tasks;
    # "post_norm": the spec's z = LN(h + Attn(h)), z = LN(z + FFN(z)); "pre_norm": the gated form with gates fixed at 1.
    # "gated" is the default: post_norm cost OneRank up to 0.03 AUC (docs/onerank.md section 3).
    cross_task_block: str = "gated"

    def validate(self, space: FeatureSpace) -> None:
        choices = {
            "sd_tokens": ("auto", "field", "group"),
            "task_token_input": ("candidate", "template"),
            "task_item_embedding": ("off", "id", "all"),
            "scorer": ("dot", "bilinear"),
            "attention": ("structured", "full"),
            "task_tokens": ("per_task", "shared", "projection"),
            "contextualization": ("sd", "random_sd", "mean_pool", "off"),
            "sd_representation": ("pooled", "mlp"),
            "cross_task": ("auto", "full", "cascade", "parallel", "none"),
            "cross_task_block": ("gated", "post_norm", "pre_norm"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SchemaError(f"onerank: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_layers < 1 or self.dim < 1 or self.num_heads < 1:
            raise SchemaError(f"onerank: dim, num_layers and num_heads must be >= 1, got dim={self.dim}, "
                              f"num_layers={self.num_layers}, num_heads={self.num_heads}")
        if self.sd_group_size is not None and self.sd_group_size < 1:
            raise SchemaError(f"onerank: sd_group_size must be >= 1, got {self.sd_group_size}")
        if self.dim % self.num_heads:
            raise SchemaError(f"onerank: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        unknown = sorted(set(self.anchor_sequences) - set(space.sequences))
        if unknown:
            raise SchemaError(f"onerank: anchor_sequences {unknown} are not sequences of the schema {space.sequences}")
        if self.task_item_embedding != "off" and (
            self.task_tokens != "per_task" or self.task_token_input != "candidate" or not space.item_fields
        ):
            raise SchemaError("onerank: task_item_embedding needs task_tokens 'per_task', task_token_input 'candidate' "
                              "and an item id among the schema's fields")

    def cross_task_mode(self, funnel: bool) -> str:
        """``cross_task`` with "auto" resolved: "cascade" where the schema declares nested task spaces (``funnel``:
        a task exists only inside another's positives, e.g. order only where click = 1), "full" otherwise."""
        if self.cross_task != "auto":
            return self.cross_task
        return "cascade" if funnel else "full"

    def task_visibility(self, num_tasks: int, funnel: bool = False) -> Tensor:
        """[K, K] bool: may task k (row) read task j (column) in the cross-task layer."""
        if self.cross_task_matrix is not None:
            matrix = torch.tensor([[bool(v) for v in row] for row in self.cross_task_matrix])
            if matrix.shape != (num_tasks, num_tasks):
                raise SchemaError(
                    f"onerank: cross_task_matrix must be {num_tasks} x {num_tasks}, got {list(matrix.shape)}"
                )
            if not bool(matrix.diagonal().all()):
                raise SchemaError("onerank: cross_task_matrix must let every task read itself (diagonal all true)")
            return matrix
        full = torch.ones(num_tasks, num_tasks, dtype=torch.bool)
        return {"full": full, "cascade": full.tril(), "parallel": torch.eye(num_tasks, dtype=torch.bool)}.get(
            self.cross_task_mode(funnel), full
        )


# ---------------------------------------------------------------------------------------------------------------------
# 1.1 Tokens
# ---------------------------------------------------------------------------------------------------------------------
def request_inputs(batch: Batch) -> Batch:
    """The request-level inputs (user / context fields, dense fields, histories) of each request, read at its first
    row: a batch of R rows, so the context is embedded once per request, not once per candidate."""
    rows = batch.request_rows()

    def pick(columns: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v[rows] for k, v in columns.items()}

    histories = {seq: pick(codes) for seq, codes in batch.histories.items()}
    return Batch(pick(batch.categorical), pick(batch.dense), histories, {}, {}, batch.user[rows])


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


class ContextTokens(NamedTuple):
    """A request's context: ``[history segments, anchor groups, SD tokens]``, the SD tokens last. Inside each segment
    the real tokens come first, in their order, then the padding: attention is causal inside a segment, so a real
    token then never has a padded slot before it and the segments need no per-request mask (``context_layout``)."""

    tokens: Tensor  # [R, U, d]
    valid: Tensor  # [R, U] bool: False on empty history / anchor slots
    blocks: Tensor  # [U] segment of each history / anchor token (causal inside it); -1 for SD tokens
    num_sd: int
    segment_lengths: tuple[int, ...]  # tokens per history / anchor segment, in order


class Tokenizer(nn.Module):
    """Every input becomes a d-wide token. History, anchor and candidate items share one item projection (an MLP over
    their concatenated field embeddings), so a candidate and the same item in the history start from the same token.

    Our decisions: behaviour sequences stay consecutive segments (the batch carries no per-event times to merge them
    by time); dense item features exist only for candidates (histories carry categorical item fields only), so they
    are added to the candidate token after the shared projection; without item fields (Census-Income) the candidate
    token is a learned constant.
    """

    def __init__(self, space: FeatureSpace, config: OneRankConfig) -> None:
        super().__init__()
        d = config.dim
        self.space = space
        self.embedding = FeatureEmbedding(space, d)
        dense = space.schema.dense
        self.sd_dense = [i for i, f in enumerate(dense) if f.group != "item"]
        self.item_dense = [i for i, f in enumerate(dense) if f.group == "item"]
        self.anchors = list(config.anchor_sequences)
        self.history = [s for s in space.sequences if s not in self.anchors]
        if space.item_fields:
            self.item_projection = MLP(len(space.item_fields) * d, config.item_mlp_hidden, output_dim=d)
        else:
            self.candidate_constant = nn.Parameter(torch.randn(d) * 0.05)
        if space.sequences:
            self.behaviour = nn.Embedding(len(space.sequences), d)  # behaviour type = which sequence
            nn.init.normal_(self.behaviour.weight, std=0.05)
        longest = max([space.max_len(s) for s in space.sequences], default=0)
        if self.history:
            self.recency = nn.Embedding(longest, d)  # 0 = the most recent behaviour
            nn.init.normal_(self.recency.weight, std=0.05)
        if self.anchors:
            self.anchor_position = nn.Embedding(longest, d)
            nn.init.normal_(self.anchor_position.weight, std=0.05)
            self.anchor_delimiters = nn.Parameter(torch.randn(len(self.anchors), 2, d) * 0.05)  # BOS, EOS per group
        # SD tokens: fields are [context categorical..., SD dense...]. Grouped, each token is a linear projection of
        # up to sd_group_size fields of one schema group: one token per field lets 30-odd user fields crowd out the
        # candidate and the history in every attention row (KuaiRand: 62-69 % of the task tokens' attention) and
        # costs width; a handful of group tokens keeps the user side's detail in their projections.
        groups = [f.group for f in space.schema.categorical if f.group != "item"]
        groups += [dense[i].group for i in self.sd_dense]
        self.sd_groups = []
        if config.sd_tokens == "group" or (config.sd_tokens == "auto" and len(groups) > MANY_SD_FIELDS):
            size = config.sd_group_size or len(groups)
            for name in dict.fromkeys(groups):
                members = [i for i, g in enumerate(groups) if g == name]
                self.sd_groups += [members[start:start + size] for start in range(0, len(members), size)]
        self.group_projections = nn.ModuleList(nn.Linear(len(m) * d, d) for m in self.sd_groups)
        self.num_sd = len(self.sd_groups) if self.sd_groups else len(groups)

    def items(self, codes: dict[str, Tensor]) -> Tensor:
        """Item field codes of any leading shape -> [..., d] through the shared item projection."""
        return self.item_projection(self.embedding.items(codes).flatten(-2))

    def distinct_items(self, sequences: list[dict[str, Tensor]]) -> list[Tensor]:
        """``items`` of several code sets (e.g. every behaviour sequence of a batch, [R, L] each), each distinct item
        projected once: a batch's histories repeat the same popular items (and padding) many times over."""
        fields = self.space.item_fields
        stacked = [torch.stack([codes[f] for f in fields], dim=-1) for codes in sequences]
        flat = torch.cat([s.reshape(-1, len(fields)) for s in stacked])
        distinct, inverse = distinct_rows(flat)
        tokens = self.items({f: distinct[:, j] for j, f in enumerate(fields)})[inverse]
        return [t.view(*s.shape[:-1], -1) for s, t in zip(stacked, tokens.split([s[..., 0].numel() for s in stacked]))]

    def situational(self, requests: Batch) -> Tensor:
        """[R, U_sd, d] SD tokens."""
        dense = self.embedding.dense_tokens(requests)[:, self.sd_dense]
        fields = torch.cat([self.embedding.context(requests), dense], dim=1)
        if not self.sd_groups:
            return fields
        groups = zip(self.group_projections, self.sd_groups)
        return torch.stack([project(fields[:, members].flatten(1)) for project, members in groups], dim=1)

    def context(self, requests: Batch) -> ContextTokens:
        """The context tokens of each request, from ``request_inputs(batch)`` (one row per request)."""
        tokens, valid, blocks = [], [], []
        sequences = self.history + self.anchors
        projected = self.distinct_items([requests.histories[seq] for seq in sequences]) if sequences else []
        for segment, seq in enumerate(sequences):
            codes = requests.histories[seq]
            items = projected[segment] + self.behaviour.weight[self.space.sequences.index(seq)]
            present = codes[self.space.schema.item_id] != 0
            L = present.shape[1]
            recency = torch.arange(L - 1, -1, -1, device=present.device)  # left-padded: the last slot is the newest
            if seq in self.history:
                tokens.append(items + self.recency(recency))
            else:
                # A preference-anchor group: [BOS, items, EOS], position counted from the group's end.
                delimiters = self.anchor_delimiters[self.anchors.index(seq)]
                bos, eos = delimiters[:, None].expand(-1, requests.size, -1)
                tokens.append(torch.cat([bos[:, None], items + self.anchor_position(recency), eos[:, None]], 1))
                edge = present.new_ones(requests.size, 1)
                present = torch.cat([edge, present, edge], 1)
            # real tokens first, in their order, then the padding (histories come left-padded): see ContextTokens.
            # Each token's new place from running counts (no sort: exporters know scatter, not a stable sort).
            real = present.long()
            place = torch.where(present, real.cumsum(1), real.sum(1, keepdim=True) + (1 - real).cumsum(1)) - 1
            tokens[-1] = torch.zeros_like(tokens[-1]).scatter(1, place[..., None].expand_as(tokens[-1]), tokens[-1])
            present = torch.zeros_like(present).scatter(1, place, present)
            valid.append(present)
            blocks.append(torch.full((present.shape[1],), segment, device=present.device))
        sd = self.situational(requests)
        tokens.append(sd)
        valid.append(torch.ones(sd.shape[:2], dtype=torch.bool, device=sd.device))
        blocks.append(torch.full((sd.shape[1],), -1, device=sd.device))
        lengths = tuple(len(b) for b in blocks[:-1])
        return ContextTokens(torch.cat(tokens, 1), torch.cat(valid, 1), torch.cat(blocks), sd.shape[1], lengths)

    def candidates(self, batch: Batch) -> Tensor:
        """[B, d] one token per impression; no position embedding (no position-label shortcut)."""
        if self.space.item_fields:
            token = self.items({f: batch.categorical[f] for f in self.space.item_fields})
        else:
            token = self.candidate_constant.expand(batch.size, -1)
        if self.item_dense:
            token = token + self.embedding.dense_tokens(batch)[:, self.item_dense].sum(1)
        return token


def as_one_request(batch: Batch) -> Batch:
    """The batch's rows as the candidates of one request (a serving pool usually comes without request grouping)."""
    request = torch.zeros(batch.size, dtype=torch.long, device=batch.user.device)
    return Batch(batch.categorical, batch.dense, batch.histories, batch.labels, batch.label_mask, batch.user, request)


# ---------------------------------------------------------------------------------------------------------------------
# 1.2 Attention layout
# ---------------------------------------------------------------------------------------------------------------------
def context_mask(context: ContextTokens) -> Tensor:
    """[R, U, U]: history / anchor tokens see their own segment causally, SD tokens see every context token; padded
    slots are never keys (a padded slot sees only itself, which keeps its softmax row defined)."""
    blocks = context.blocks
    U = len(blocks)
    earlier = torch.ones(U, U, dtype=torch.bool, device=blocks.device).tril()
    structure = (blocks[:, None] == -1) | ((blocks[:, None] == blocks[None, :]) & earlier)
    diagonal = torch.eye(U, dtype=torch.bool, device=blocks.device)
    return (structure & context.valid[:, None, :]) | diagonal


def context_layout(context: ContextTokens, dtype: torch.dtype) -> SegmentedPrefix:
    """What the encoder's context self-attention runs on: the segments and the SD tokens' key bias (``SegmentedPrefix``
    needs each segment's real tokens first: the tokenizer orders them so); ``context_mask`` is the same rule as an
    explicit mask, for the reference."""
    return SegmentedPrefix(context.segment_lengths, attention_bias(context.valid, dtype)[:, None, None, :])


def group_mask(size: int, device: torch.device | None = None) -> Tensor:
    """[S, S] inside one group [c_i, t_1..t_K]: c_i sees itself only (it must not carry task j's token to task k);
    t_k sees c_i and itself; task tokens are mutually invisible."""
    mask = torch.eye(size, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Encoder: context once per request, then the candidate groups against the cached context
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ContextCache:
    """Everything the candidates of a request need from its context; computed once, reused for any pool or chunk."""

    keys_values: list[tuple[Tensor, Tensor]]  # per layer, the context's keys and values [R, H, U, dh]
    valid: Tensor  # [R, U] context tokens that are real (history padding is not)
    sd_states: Tensor  # [R, U_sd, d] final SD token states (after the final norm); [R, 0, d] when s does not read them
    situation: Tensor  # [R, d] the SD representation s of section 1.3

    @property
    def num_requests(self) -> int:
        return self.valid.shape[0]

    def rows(self, request: Tensor) -> "ContextCache":
        """The cache of request ``request[b]`` for each b: one request per candidate (packed groups)."""
        return ContextCache(
            [(key[request], value[request]) for key, value in self.keys_values], self.valid[request],
            self.sd_states[request], self.situation[request],
        )


class Encoder(nn.Module):
    """L pre-LN blocks whose weights all tokens share: tasks differ only in what they may see."""

    def __init__(self, config: OneRankConfig) -> None:
        super().__init__()
        d = config.dim
        self.blocks = nn.ModuleList(
            TransformerBlock(d, config.num_heads, config.ffn_multiplier * d, config.dropout)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(d)

    def context(
        self, context: ContextTokens, first_output: int = 0
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """(final states of the context tokens ``first_output:`` [R, U - first_output, d], per-layer keys / values):
        the last layer updates only the tokens whose final states are read (the SD tokens), all offer keys."""
        x, cache = context.tokens, []
        mask = context_layout(context, x.dtype)  # built once, not per layer
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            x, kv = block.self_attend(x, mask, first_output if layer == last else 0)
            cache.append(kv)
        return self.norm(x), cache

    def joint(
        self, context: ContextTokens, groups: Tensor, first_output: int = 0, template: Tensor | None = None,
        first_context_output: int = 0,
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """Context and candidate groups in one pass (training, and scoring a pool at once): ``context`` then
        ``groups`` as one function, but every layer runs its norms, projections and feed-forward once over the
        concatenation [context tokens, group tokens] and splits only the attention (``attend_joint``): the context
        attends to itself under ``context_mask``, each group to this layer's context keys / values and inside itself.
        groups [R, N, S, d] (explicit, ``OneRank._groups``) -> (final states of the context tokens
        ``first_context_output:`` [R, U - first_context_output, d], final states of the group tokens ``first_output:``
        [R, N, S - first_output, d], per-layer context keys / values for a cache).
        With ``template`` ([S - 1, d], the tokens after c_i in every group) the first layer projects the template once
        per request instead of once per group (``attend_joint_template``)."""
        R, N, S, d = groups.shape
        U = context.tokens.shape[1]
        x = torch.cat([context.tokens, groups.reshape(R, N * S, d)], dim=1)
        mask = context_layout(context, x.dtype)
        bias = attention_bias(context.valid, x.dtype)
        last, cache = len(self.blocks) - 1, []
        for layer, block in enumerate(self.blocks):
            first, first_context = (first_output, first_context_output) if layer == last else (0, 0)
            if layer == 0 and template is not None:
                x, kv = block.attend_joint_template(x, groups[:, :, 0], template, mask, bias, first, first_context)
            else:
                x, kv = block.attend_joint(x, U, S, mask, bias, first, first_context)
            cache.append(kv)
        x = self.norm(x)
        context_outputs = U - first_context_output
        return x[:, :context_outputs], x[:, context_outputs:].unflatten(1, (N, -1)), cache

    def groups(
        self, inputs: Tensor, template: Tensor | None, cache: ContextCache, first_output: int = 0
    ) -> Tensor:
        """The explicit groups (inputs [R, N, S, d]; template None), or the groups [c_i, template] (inputs: the
        candidates [R, N, d], template [F, d] shared by every group) -> final states [R, N, S - first_output, d] of
        their tokens ``first_output:``. Every group reads only its request's context and, inside itself, what
        ``group_mask`` allows (``prefix_group_attention`` implements that rule structurally). With a shared template
        the task tokens are the same in every group before the first layer, so that layer handles them once per
        request."""
        last = len(self.blocks) - 1
        x = inputs if template is not None or inputs.dim() == 4 else inputs.unsqueeze(2)
        bias = attention_bias(cache.valid, inputs.dtype)
        for layer, (block, kv) in enumerate(zip(self.blocks, cache.keys_values)):
            first = first_output if layer == last else 0
            if layer == 0 and template is not None:
                x = block.attend_template_groups(inputs, template, kv, bias, first)
            else:
                x = block.attend_groups(x, kv, bias, first)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------------------
# 1.3 - 1.5 Per-task parts, and the cross-task layer
# ---------------------------------------------------------------------------------------------------------------------
def task_item_fields(space: FeatureSpace, config: OneRankConfig) -> list[str]:
    """The item fields each task embeds for itself (``task_item_embedding``)."""
    if config.task_item_embedding == "off":
        return []
    return [space.schema.item_id] if config.task_item_embedding == "id" else list(space.item_fields)


class TaskChannel(nn.Module):
    """Everything private to one task: its task token t_k (or projection P_k), situation query f_k, pool attention
    MHCA_k and score calibration a_k, b_k. Other tasks' losses never reach it (section 1.4)."""

    def __init__(
        self, config: OneRankConfig, with_token: bool, with_projection: bool, item_vocabs: dict[str, int] | None = None
    ) -> None:
        super().__init__()
        d = config.dim
        self.contextualization = config.contextualization
        self.token = nn.Parameter(torch.randn(d) * 0.05) if with_token else None
        # e_k(item) of task_item_embedding, one table per item field: zero at the start, so the model starts as it
        # would without them
        self.item_embeddings = nn.ModuleDict(
            {field: nn.Embedding(size, d, padding_idx=0) for field, size in (item_vocabs or {}).items()}
        )
        for table in self.item_embeddings.values():
            nn.init.zeros_(table.weight)
        self.projection = nn.Linear(d, d) if with_projection else None
        reads_situation = config.contextualization != "mean_pool"
        self.query = nn.Linear(d, d) if reads_situation else None  # f_k
        pools = config.contextualization in ("sd", "random_sd")
        self.pool_attention = MultiHeadAttention(d, config.num_heads) if pools else None  # MHCA_k
        # W_k of the bilinear scorer, the identity at the start: the same scores as the dot product until it learns.
        self.bilinear = nn.Parameter(torch.eye(d)) if config.scorer == "bilinear" else None
        # Our addition: a learnable scale and bias per task. z and r leave LayerNorms with norms near sqrt(d), so
        # a_k = 1/sqrt(d) starts <z, r> a_k at logit scale (attention's usual scaling); b_k lets the point-wise
        # probabilities calibrate, while the list-wise softmax ignores it.
        self.scale = nn.Parameter(torch.tensor(d**-0.5))
        self.bias = nn.Parameter(torch.zeros(()))

    def item_embedding(self, codes: dict[str, Tensor]) -> Tensor:
        """e_k(item): the sum of this task's embeddings of the candidate's item fields, [B, d]."""
        # an item added after training (a code beyond the vocabulary, features/item_vectors.py) reads the OOV row
        return sum(table(torch.where(codes[field] < table.num_embeddings, codes[field], OOV))
                   for field, table in self.item_embeddings.items())

    def contextualize(self, situation: Tensor, r: Tensor, present: Tensor) -> Tensor:
        """h_k = MHCA_k(query = f_k(s), keys = values = r[k, i] over the request's valid candidates): [R, d]; the mean
        of r[k, i] over them with ``mean_pool``, f_k(s) with ``off``."""
        if self.query is None:
            weights = present.to(r.dtype)
            return (r * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
        query = self.query(situation)
        if self.pool_attention is None:
            return query
        return self.pool_attention(query[:, None], r, present[:, None, None, :]).squeeze(1)


class CrossTaskAttention(nn.Module):
    """One attention layer over the K task vectors under a K x K visibility mask, then a feed-forward layer, added to
    h as ``cross_task_block`` says (gated residuals by default, the spec's post-norm form as an option). With
    detachment, task k's query reads task j != k through keys and values built from h_j.detach(): information flows
    forward across tasks, gradients do not flow back into task j."""

    def __init__(self, config: OneRankConfig, visibility: Tensor) -> None:
        super().__init__()
        d = config.dim
        self.detach = config.detach_cross_task
        self.block = config.cross_task_block
        self.attention = MultiHeadAttention(d, config.num_heads)
        self.register_buffer("visibility", visibility, persistent=False)
        self.norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d, config.ffn_multiplier * d, config.dropout)
        self.ffn_norm = nn.LayerNorm(d)
        # g_a, g_f of the gated block, per channel: 0 at the start, so z = h until the tasks' losses find reading
        # across useful (vectors, like norm gains: no weight decay)
        gated = self.block == "gated"
        self.attention_gate = nn.Parameter(torch.zeros(d)) if gated else None
        self.ffn_gate = nn.Parameter(torch.zeros(d)) if gated else None

    def read_across(self, h: Tensor, normalize: bool) -> Tensor:
        """The masked attention over the task vectors h [R, K, d] (LN(h) with ``normalize``): [R, K, d]. With
        detachment the other tasks' keys and values are built from h.detach(), so only the path back into h_j is
        cut: the layer's own weights (projections, LN) get the same gradient either way."""
        att = self.attention
        x = self.norm(h) if normalize else h
        query = att.queries(x) * att.head_dim**-0.5  # [R, H, K, dh]
        key, value = att.keys_values(x)
        if self.detach:
            # keys[r, h, k, j]: task k's own key keeps its gradient, the others' are detached: [R, H, K, K, dh]
            own = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)[:, :, None]
            frozen_key, frozen_value = att.keys_values(self.norm(h.detach()) if normalize else h.detach())
            key = torch.where(own, key[:, :, None], frozen_key[:, :, None])
            value = torch.where(own, value[:, :, None], frozen_value[:, :, None])
            scores = torch.einsum("rhqd,rhqkd->rhqk", query, key)
        else:
            scores = query @ key.transpose(-1, -2)
        probs = torch.softmax(scores.masked_fill(~self.visibility, float("-inf")), dim=-1)
        out = torch.einsum("rhqk,rhqkd->rhqd", probs, value) if self.detach else probs @ value
        return att.out(att.merge_heads(out))

    def forward(self, h: Tensor) -> Tensor:
        """h [R, K, d] -> z [R, K, d]"""
        if self.block == "post_norm":
            z = self.norm(h + self.read_across(h, normalize=False))
            return self.ffn_norm(z + self.ffn(z))
        # pre-norm residuals, scaled by the gates in the gated block
        gated = self.attention_gate is not None
        attended = self.read_across(h, normalize=True)
        z = h + (self.attention_gate * attended if gated else attended)
        fed = self.ffn(self.ffn_norm(z))
        return z + (self.ffn_gate * fed if gated else fed)


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------
@register_model("onerank")
class OneRank(MultiTaskModel):
    Config = OneRankConfig
    needs_requests = True
    # Point-wise BCE / MSE plus multi-positive InfoNCE per task (section 1.5); tau and the lambdas are run options.
    # lambda_lw = 0.1: once the list-wise loss counts only requests with a positive and a negative, 1.0 outweighed the
    # point-wise loss and cost about 0.04 test AUC on KuaiRand (docs/onerank.md section 1.5).
    objective_defaults = {"pointwise": 1.0, "listwise": 0.1, "temperature": 1.0}

    @classmethod
    def saved_options(cls, options: dict) -> dict:
        # checkpoints written before cross_task_block existed hold the post-norm layer (no gates)
        return {"cross_task_block": "post_norm", **options}

    def __init__(self, space: FeatureSpace, config: OneRankConfig) -> None:
        super().__init__(space, config)
        config.validate(space)
        d = config.dim
        self.tokenizer = Tokenizer(space, config)
        self.encoder = Encoder(config)
        self.channels = nn.ModuleDict({
            t: TaskChannel(
                config,
                with_token=config.task_tokens == "per_task",
                with_projection=config.task_tokens == "projection",
                item_vocabs={f: space.vocab_sizes[f] for f in task_item_fields(space, config)},
            )
            for t in self.tasks
        })
        self.shared_task_token = nn.Parameter(torch.randn(d) * 0.05) if config.task_tokens == "shared" else None
        num_sd = self.tokenizer.num_sd
        if config.contextualization == "random_sd":
            # Untrained, frozen SD: a fixed random projection of the (detached) SD embeddings. It still varies with
            # the request, but nothing learns what the situation should ask of the candidate pool.
            self.register_buffer("random_sd", torch.randn(num_sd * d, d) / max(num_sd * d, 1) ** 0.5)
        elif config.sd_representation == "mlp" and num_sd:
            self.sd_mlp = MLP(num_sd * d, [d], output_dim=d)
        funnel = any(t.space is not None for t in space.schema.tasks)
        self.cross_task = (
            CrossTaskAttention(config, config.task_visibility(len(self.tasks), funnel))
            if config.cross_task != "none" or config.cross_task_matrix is not None else None
        )

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        return {t: [f"channels.{t}."] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return {t: self.channels[t].bias for t in self.tasks}  # b_k of section 1.5

    # ---- tokens -> encoder ----------------------------------------------------------------------------------------
    def _task_template(self) -> Tensor | None:
        """The tokens that follow c_i in every group G_i = [c_i, t_1..t_K]: [K, d] task tokens, [1, d] with one
        shared task token, None when per-task projections replace the task tokens."""
        if self.config.task_tokens == "projection":
            return None
        if self.config.task_tokens == "shared":
            return self.shared_task_token[None]
        return torch.stack([self.channels[t].token for t in self.tasks])

    def _shared_followers(self) -> Tensor | None:
        """The task template when the tokens after c_i are the same in every group (``task_token_input: template``):
        the encoder's first layer then handles them once per request. None when they differ per group."""
        return self._task_template() if self.config.task_token_input == "template" else None

    def _candidates(self, batch: Batch) -> Tensor:
        """The candidate inputs of the groups: c_i [B, d]; with ``task_item_embedding`` [B, 1 + K, d], c_i and then
        c_i + e_k(item) for each task k."""
        candidates = self.tokenizer.candidates(batch)
        if self.config.task_item_embedding == "off":
            return candidates
        own = [candidates + self.channels[t].item_embedding(batch.categorical) for t in self.tasks]
        return torch.stack([candidates, *own], dim=1)

    def _groups(self, candidates: Tensor) -> Tensor:
        """[R, N, d] candidate tokens (``_candidates``) -> the explicit groups [R, N, S, d] (S = 1 + K, 2 or 1):
        [c_i, t_k + c_i ...] with ``task_token_input: candidate``, [c_i, t_k ...] with ``template``; from
        [R, N, 1 + K, d] (``task_item_embedding``): [c_i, t_k + c_i + e_k(item) ...]. c_i carries no task token and
        e_k belongs to task k, so no path opens from task j to task k: the channels stay private."""
        template = self._task_template()
        if candidates.dim() == 4:
            return torch.cat([candidates[:, :, :1], candidates[:, :, 1:] + template], dim=2)
        if template is None:
            return candidates[:, :, None]
        R, N, d = candidates.shape
        followers = template.expand(R, N, -1, d)
        if self.config.task_token_input == "candidate":
            followers = followers + candidates[:, :, None]
        return torch.cat([candidates[:, :, None], followers], dim=2)

    @property
    def _first_output(self) -> int:
        """The first group token whose final state is read: the candidate's only when projections replace the task
        tokens (otherwise the last layer need not update it)."""
        return 0 if self.config.task_tokens == "projection" else 1

    def _task_states(self, outputs: Tensor) -> Tensor:
        """Final states of the group tokens ``_first_output:`` [R, N, S', d] -> r [R, N, K, d]."""
        mode = self.config.task_tokens
        if mode == "projection":
            return torch.stack([self.channels[t].projection(outputs[:, :, 0]) for t in self.tasks], dim=2)
        if mode == "shared":
            return outputs.expand(-1, -1, len(self.tasks), -1)
        return outputs

    def _first_context_output(self, context: ContextTokens) -> int:
        """The first context token whose final state is read: the SD tokens (last in the context) when s pools them,
        none otherwise. History and anchor tokens only offer keys and values, so the last layer skips their queries
        and feed-forward."""
        U = context.tokens.shape[1]
        pools_sd_states = (
            self.config.contextualization not in ("random_sd", "mean_pool") and self.config.sd_representation == "pooled"
        )
        return U - context.num_sd if pools_sd_states else U

    def _situation(self, context: ContextTokens, sd_states: Tensor) -> Tensor:
        """s of section 1.3: [R, d] (sd_states: the final SD token states, read only when s pools them)."""
        if context.num_sd == 0 or self.config.contextualization == "mean_pool":
            return sd_states.new_zeros(sd_states.shape[0], self.config.dim)
        sd_inputs = context.tokens[:, -context.num_sd:]
        if self.config.contextualization == "random_sd":
            return sd_inputs.detach().flatten(1) @ self.random_sd
        if self.config.sd_representation == "mlp":
            return self.sd_mlp(sd_inputs.flatten(1))
        return sd_states.mean(1)

    # ---- serving pieces (also the training path) ------------------------------------------------------------------
    def encode_context(self, batch: Batch) -> ContextCache:
        """Encode each request's context once (read from the request's first row): per-layer keys / values, the final
        context states and s. Reusable for any number of candidates of those requests, in any chunks."""
        if self.config.attention == "full":
            raise ValueError("onerank: with attention='full' the context depends on the candidates; nothing to cache")
        context = self.tokenizer.context(request_inputs(batch))
        sd_states, keys_values = self.encoder.context(context, self._first_context_output(context))
        return ContextCache(keys_values, context.valid, sd_states, self._situation(context, sd_states))

    def tokens(self, batch: Batch) -> tuple[ContextTokens, Tensor, Tensor]:
        """(each request's context tokens, its candidate groups [R, N, S, d] (``_groups``), candidate presence
        [R, N]): the encoder's input."""
        context = self.tokenizer.context(request_inputs(batch))
        slot, present = batch.list_layout()
        return context, self._groups(self._candidates(batch)[slot]), present

    def encode(self, batch: Batch, pack: bool | None = None) -> tuple[ContextCache, Tensor]:
        """Context and candidates (what training and ``score_pool`` of a pool within one chunk run): (the requests'
        ContextCache, r [R, N, K, d]). The same as ``encode_context`` followed by ``encode_candidates``.

        Requests of one size (a serving pool, the synthetic lists) run in one pass (``Encoder.joint``, the token-wise
        work of context and groups in shared operator calls). Ragged requests are packed (``pack`` None: when
        padding to the largest request would add more than a quarter of the candidates): the context is encoded
        once per request, then every candidate's group against its own request's keys / values, so no group is
        computed for a padded slot (KuaiRand: one request of 20 among 900 of one would pad 18,000 groups)."""
        if self.config.attention == "full":
            raise ValueError("onerank: with attention='full' the context depends on the candidates; nothing to cache")
        slot, present = batch.list_layout()
        if pack is None:
            pack = present.numel() * 4 > batch.size * 5  # shapes only: the same choice when a graph is traced
        if not pack:
            context, groups, _ = self.tokens(batch)
            return self.encode_tokens(context, groups)
        cache = self.encode_context(batch)
        candidates, template = self._candidates(batch)[:, None], self._shared_followers()
        inputs = candidates if template is not None else self._groups(candidates)
        # Each request's first candidate reads its request's cache as it is; only the others get their request's
        # keys / values copied (KuaiRand: 55 of 1,024 rows), not every candidate.
        later = present.clone()
        later[:, 0] = False
        rows, firsts = slot[later], slot[:, 0]
        request = torch.arange(slot.shape[0], device=slot.device)[:, None].expand_as(slot)[later]
        states = torch.cat([
            self.encoder.groups(inputs[firsts], template, cache, self._first_output),
            self.encoder.groups(inputs[rows], template, cache.rows(request), self._first_output),
        ])  # [B, 1, S', d] in the order (firsts, rows)
        order = torch.cat([firsts, rows])
        states = states[torch.empty_like(order).index_put_((order,), torch.arange(len(order), device=order.device))]
        return cache, self._task_states(states)[:, 0][slot]

    def encode_tokens(self, context: ContextTokens, groups: Tensor) -> tuple[ContextCache, Tensor]:
        """``encode`` from the encoder's input (``tokens``): the structured encoder alone."""
        sd_states, states, keys_values = self.encoder.joint(
            context, groups, self._first_output, self._shared_followers(), self._first_context_output(context)
        )
        cache = ContextCache(keys_values, context.valid, sd_states, self._situation(context, sd_states))
        return cache, self._task_states(states)

    def encode_candidates(self, cache: ContextCache, batch: Batch, chunk_size: int | None = None) -> Tensor:
        """r [R, N, K, d]: the final task-token states of every candidate of the batch's requests against the cached
        context, ``chunk_size`` candidates per request at a time (groups are independent, so chunking is exact)."""
        slot, _ = batch.list_layout()
        if slot.shape[0] != cache.num_requests:
            raise ValueError(
                f"onerank: the batch has {slot.shape[0]} requests, the context cache {cache.num_requests}; "
                "group a serving pool with as_one_request(batch)"
            )
        candidates, template = self._candidates(batch), self._shared_followers()

        def encode(rows: Tensor) -> Tensor:
            inputs = candidates[rows] if template is not None else self._groups(candidates[rows])
            return self.encoder.groups(inputs, template, cache, self._first_output)

        if chunk_size is None:  # one pass, and no Python loop over a data-dependent N (graph export follows it)
            return self._task_states(encode(slot))
        chunks = [encode(slot[:, start:start + chunk_size]) for start in range(0, slot.shape[1], max(chunk_size, 1))]
        return self._task_states(torch.cat(chunks, dim=1))

    def score_with_context(
        self, cache: ContextCache, batch: Batch, chunk_size: int | None = None
    ) -> dict[str, Tensor]:
        """Logits {task: [B]} of the batch's candidates (grouped in the same requests as ``cache``); groups are encoded
        chunk by chunk, contextualization and cross-task attention see the whole pool at once."""
        return self._score(self.encode_candidates(cache, batch, chunk_size), cache.situation, batch)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        if self.config.attention == "full":
            context, hidden, groups = reference_encode(self, batch, bidirectional=True)
            r = self._task_states(groups[:, :, self._first_output:])
            return self._score(r, self._situation(context, hidden[:, self._first_context_output(context):]), batch)
        cache, r = self.encode(batch)
        return self._score(r, cache.situation, batch)

    @torch.no_grad()
    def score_pool(self, batch: Batch, chunk_size: int = 1024) -> dict[str, Tensor]:
        """One request's whole pool (all rows of ``batch``, whatever its ``request``): the context encoded once,
        candidate groups ``chunk_size`` at a time; the same scores as one pass."""
        pool = as_one_request(batch)
        if self.config.attention == "full" or pool.size <= chunk_size:  # one chunk: the one-pass encoder
            return self(pool)
        return self.score_with_context(self.encode_context(pool), pool, chunk_size)

    # ---- 1.3 contextualization -> 1.4 cross-task attention -> 1.5 scoring -----------------------------------------
    def _score(self, r: Tensor, situation: Tensor, batch: Batch) -> dict[str, Tensor]:
        slot, present = batch.list_layout()
        h = torch.stack(
            [self.channels[t].contextualize(situation, r[:, :, k], present) for k, t in enumerate(self.tasks)], dim=1
        )
        z = h if self.cross_task is None else self.cross_task(h)
        if self.config.scorer == "bilinear":
            z = torch.einsum("rkd,kde->rke", z, torch.stack([self.channels[t].bilinear for t in self.tasks]))
        scale = torch.stack([self.channels[t].scale for t in self.tasks])
        bias = torch.stack([self.channels[t].bias for t in self.tasks])
        scores = torch.einsum("rkd,rnkd->rnk", z, r) * scale + bias
        logits = scores.new_zeros(batch.size, len(self.tasks))
        logits[slot[present]] = scores[present]
        return {t: logits[:, k] for k, t in enumerate(self.tasks)}


# ---------------------------------------------------------------------------------------------------------------------
# Reference (tests, and the "full" ablation): one masked full attention over [context + all groups]
# ---------------------------------------------------------------------------------------------------------------------
def reference_mask(context: ContextTokens, present: Tensor, group_size: int, bidirectional: bool = False) -> Tensor:
    """The explicit [R, T, T] boolean mask over T = U + N S tokens, [context, G_1, ..., G_N] (section 1.2).

    ``bidirectional``: every token sees every real token (the ablation); otherwise context sees context (causal
    inside history / anchor segments), groups see the real context plus their own tokens under ``group_mask``.
    """
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


def reference_encode(
    model: OneRank, batch: Batch, bidirectional: bool = False
) -> tuple[ContextTokens, Tensor, Tensor]:
    """(context tokens, context states [R, U, d], group states [R, N, S, d]) from one full attention over the whole
    sequence with the explicit mask, through the model's own weights. O((U + N S)^2): a specification to test the
    structured path against, not a serving path."""
    context, groups, present = model.tokens(batch)
    hidden, states = reference_encoder(model, context, groups, present, bidirectional)
    return context, hidden, states


def reference_encoder(
    model: OneRank, context: ContextTokens, groups: Tensor, present: Tensor, bidirectional: bool = False
) -> tuple[Tensor, Tensor]:
    """The encoder part of ``reference_encode`` (from ``model.tokens``): the explicit mask, then every block over all
    U + N S tokens -> (context states [R, U, d], group states [R, N, S, d])."""
    R, N, S, d = groups.shape
    x = torch.cat([context.tokens, groups.reshape(R, N * S, d)], dim=1)
    mask = reference_mask(context, present, S, bidirectional).unsqueeze(1)
    for block in model.encoder.blocks:
        x = block(x, mask)
    x = model.encoder.norm(x)
    U = context.tokens.shape[1]
    return x[:, :U], x[:, U:].reshape(R, N, S, d)
