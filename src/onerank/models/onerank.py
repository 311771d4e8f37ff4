"""OneRank (Tang, Dai, et al., KDD 2026): a Transformer-native multi-task ranker, read like the paper's figure.

    tokens (SD, history | candidates + K task tokens)                 1.1  Tokenizer
      -> one shared encoder with a task-conditioned attention mask     1.2  nn.structured: context once, then groups
      -> candidate-aware contextualization h_k = MHCA_k(f_k(s), r_k)   1.3  TaskChannel.contextualize
      -> cross-task attention with gradient detachment                 1.4  CrossTaskAttention
      -> matching scores s[k, i] = <z_k, r[k, i]> a_k + b_k            1.5  OneRank._score (losses: onerank.objectives)

Section numbers refer to docs/models.md (shared spec) and docs/onerank.md. The ablations the suites run are
``OneRankConfig`` values; the paper's other ablations sit in its ``experimental`` block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.encoding import OOV
from onerank.data.schema import CANDIDATE_GROUPS, SchemaError
from onerank.features.embedding import FeatureEmbedding
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel
from onerank.models.onerank_checkpoints import saved_options
from onerank.nn.mlp import MLP
from onerank.nn.structured import (
    ContextCache, ContextTokens, StructuredEncoder, project_distinct, real_first, reference_encoder,
)
from onerank.nn.transformer import FeedForward, GatedSetAttention, MultiHeadAttention


@dataclass
class OneRankExperimental:
    """Switches no suite runs: the paper's other ablations (section 1.6), its optional preference anchors, and the
    forms older checkpoints hold (docs/onerank.md section 2; none was measured on this project's data)."""

    anchor_sequences: tuple[str, ...] = ()  # behaviour sequences read as preference-anchor groups, not history
    sd_mlp: bool = False  # s = an MLP over the SD embeddings instead of the mean of the final SD states
    task_projections: bool = False  # ablation: r_k = P_k(c_i), per-task projections replace the task tokens
    random_sd: bool = False  # ablation: the pool attention reads an untrained s (a frozen random projection)
    cross_task_block: str = "gated"  # "post_norm": the paper's LN(h + Attn h), LN(z + FFN z) (older checkpoints)


@dataclass
class OneRankConfig:
    dim: int = 32  # d: width of every token (field embeddings too)
    num_layers: int = 2
    num_heads: int = 2
    ffn_multiplier: int = 4  # FFN hidden width = ffn_multiplier * d (encoder and cross-task layer)
    dropout: float = 0.0
    item_mlp_hidden: tuple[int, ...] = (64,)  # shared item projection: MLP(concat item field embeddings) -> d
    # "field": one SD token per field; "group": one per schema group (user, context), a projection of its fields.
    # On KuaiRand grouping cost 0.01-0.02 test AUC on click and long_view (docs/onerank.md).
    sd_tokens: str = "field"
    # "candidate": task token k of group i enters the encoder as t_k + c_i (the candidate reaches every layer of its
    # task tokens, not through one key among the context's); "template": the bare t_k (the paper's figure; ablation).
    task_token_input: str = "candidate"
    # "id": each task owns an embedding e_k of the candidate's item id, its task token's input is t_k + c_i + e_k(item)
    # (zero at the start; STEM's task-specific embeddings, Su et al. AAAI 2024, candidate side only); "all": of every
    # categorical item field, summed; "off": none.
    task_item_embedding: str = "off"
    task_tokens: str = "per_task"  # "per_task" tokens t_k; ablation: one "shared" token
    # "sd": h_k = MHCA_k(f_k(s), r_k); ablations: "mean_pool": h_k = mean of r_k over the pool; "off": h_k = f_k(s)
    contextualization: str = "sd"
    # "auto": "cascade" when the schema declares nested task spaces (a funnel), "full" otherwise; "cascade" (schema
    # order = funnel order), "full", "parallel", or "none" (no layer; ablation)
    cross_task: str = "auto"
    detach_cross_task: bool = True  # task k reads h_j (j != k) through h_j.detach()
    # r[k, i] also reads the other candidates of its request (a gated set attention per task): what depends on *which*
    # items share the page (the strongest competitor, how many of its kind), not only the one pool vector h_k
    page_attention: bool = False
    experimental: OneRankExperimental = field(default_factory=OneRankExperimental)

    def validate(self, space: FeatureSpace) -> None:
        choices = {
            "sd_tokens": ("field", "group"),
            "task_token_input": ("candidate", "template"),
            "task_item_embedding": ("off", "id", "all"),
            "task_tokens": ("per_task", "shared"),
            "contextualization": ("sd", "mean_pool", "off"),
            "cross_task": ("auto", "full", "cascade", "parallel", "none"),
            "experimental.cross_task_block": ("gated", "post_norm"),
        }
        for name, allowed in choices.items():
            value = getattr(self.experimental if "." in name else self, name.rpartition(".")[2])
            if value not in allowed:
                raise SchemaError(f"onerank: {name} must be one of {allowed}, got {value!r}")
        if min(self.num_layers, self.dim, self.num_heads) < 1 or self.dim % self.num_heads:
            raise SchemaError(f"onerank: dim, num_layers and num_heads must be >= 1 and dim divisible by num_heads, got "
                              f"dim={self.dim}, num_layers={self.num_layers}, num_heads={self.num_heads}")
        x = self.experimental
        unknown = sorted(set(x.anchor_sequences) - set(space.sequences))
        if unknown:
            raise SchemaError(f"onerank: experimental.anchor_sequences {unknown} are not sequences of the schema "
                              f"{space.sequences}")
        if (x.task_projections and self.task_tokens != "per_task") or (x.random_sd and self.contextualization != "sd"):
            raise SchemaError("onerank: experimental.task_projections replaces per_task tokens and experimental."
                              "random_sd the 'sd' contextualization; neither combines with another ablation")
        if self.task_item_embedding != "off" and (
            self.task_tokens != "per_task" or self.task_token_input != "candidate" or x.task_projections
            or not space.item_fields
        ):
            raise SchemaError("onerank: task_item_embedding needs task_tokens 'per_task', task_token_input 'candidate' "
                              "and an item id among the schema's fields")

    def task_visibility(self, num_tasks: int, funnel: bool = False) -> Tensor:
        """[K, K] bool: may task k (row) read task j (column) in the cross-task layer. ``funnel``: the schema declares
        nested task spaces (e.g. order only where click = 1), which "auto" reads as a cascade."""
        mode = self.cross_task if self.cross_task != "auto" else "cascade" if funnel else "full"
        full = torch.ones(num_tasks, num_tasks, dtype=torch.bool)
        return {"cascade": full.tril(), "parallel": torch.eye(num_tasks, dtype=torch.bool)}.get(mode, full)


# ---------------------------------------------------------------------------------------------------------------------
# 1.1 Tokens
# ---------------------------------------------------------------------------------------------------------------------
class Tokenizer(nn.Module):
    """Every input becomes a d-wide token. History, anchor and candidate items share one item projection (an MLP over
    their field embeddings), so a candidate and the same item in the history start from the same token. Behaviour
    sequences stay consecutive segments (the batch has no per-event times to merge them by); dense item fields exist
    only for candidates, so they are added after the projection; without item fields the candidate is a constant."""

    def __init__(self, space: FeatureSpace, config: OneRankConfig) -> None:
        super().__init__()
        d = config.dim
        self.space = space
        self.embedding = FeatureEmbedding(space, d)
        dense = space.schema.dense
        self.sd_dense = [i for i, f in enumerate(dense) if f.group not in CANDIDATE_GROUPS]
        self.item_dense = [i for i, f in enumerate(dense) if f.group in CANDIDATE_GROUPS]
        self.anchors = list(config.experimental.anchor_sequences)
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
        # SD fields are [context categorical..., SD dense...]; grouped, each token is a linear projection of the fields
        # of one schema group: cheaper, but KuaiRand's 34 SD fields lost detail (docs/onerank.md section 3).
        groups = [f.group for f in space.schema.categorical if f.group not in CANDIDATE_GROUPS]
        groups += [dense[i].group for i in self.sd_dense]
        named = dict.fromkeys(groups) if config.sd_tokens == "group" else {}
        self.sd_groups = [[i for i, g in enumerate(groups) if g == name] for name in named]
        self.group_projections = nn.ModuleList(nn.Linear(len(m) * d, d) for m in self.sd_groups)
        self.num_sd = len(self.sd_groups) if self.sd_groups else len(groups)

    def items(self, codes: dict[str, Tensor]) -> Tensor:
        """Item field codes of any leading shape -> [..., d] through the shared item projection."""
        return self.item_projection(self.embedding.items(codes).flatten(-2))

    def situational(self, requests: Batch) -> Tensor:
        """[R, U_sd, d] SD tokens."""
        dense = self.embedding.dense_tokens(requests)[:, self.sd_dense]
        fields = torch.cat([self.embedding.context(requests), dense], dim=1)
        if not self.sd_groups:
            return fields
        groups = zip(self.group_projections, self.sd_groups)
        return torch.stack([project(fields[:, members].flatten(1)) for project, members in groups], dim=1)

    def context(self, requests: Batch) -> ContextTokens:
        """The context tokens of each request, from ``batch.request_inputs()`` (one row per request): [history
        segments, anchor groups, SD tokens], the SD tokens being the context's global tokens."""
        tokens, valid, blocks = [], [], []
        sequences, fields = self.history + self.anchors, self.space.item_fields
        stacked = [torch.stack([requests.histories[seq][f] for f in fields], dim=-1) for seq in sequences]
        projected = project_distinct(lambda rows: self.items(dict(zip(fields, rows.unbind(1)))), stacked)
        for segment, seq in enumerate(sequences):
            items = projected[segment] + self.behaviour.weight[self.space.sequences.index(seq)]
            present = requests.histories[seq][self.space.schema.item_id] != 0
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
            tokens[-1], present = real_first(tokens[-1], present)  # histories come left-padded
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


# ---------------------------------------------------------------------------------------------------------------------
# 1.2 Attention mask (nn/structured.py runs it): the sequence is [context, G_1, ..., G_N], G_i = [c_i, t_1..t_K].
#   history / anchor token: the earlier tokens of its own segment        SD token: every real context token
#   candidate c_i: the real context and itself (not its task tokens: task j would reach task k through c_i)
#   task token t_k of G_i: the real context, c_i and itself                groups never see each other
# 1.3 - 1.5 Per-task parts (contextualization, scoring), and the cross-task layer
# ---------------------------------------------------------------------------------------------------------------------
class TaskChannel(nn.Module):
    """Everything private to one task: its task token t_k (or projection P_k), situation query f_k, pool attention
    MHCA_k and score calibration a_k, b_k. Other tasks' losses never reach it (section 1.4)."""

    def __init__(self, d: int, num_heads: int, contextualization: str, with_token: bool, with_projection: bool,
                 item_vocabs: dict[str, int], page_attention: bool = False) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(d) * 0.05) if with_token else None
        # e_k(item) of task_item_embedding, one table per item field, zero at the start (as if there were none)
        self.item_embeddings = nn.ModuleDict({f: nn.Embedding(n, d, padding_idx=0) for f, n in item_vocabs.items()})
        for table in self.item_embeddings.values():
            nn.init.zeros_(table.weight)
        self.projection = nn.Linear(d, d) if with_projection else None
        self.page = GatedSetAttention(d, num_heads) if page_attention else None  # page-aware r[k, i]
        self.query = nn.Linear(d, d) if contextualization != "mean_pool" else None  # f_k
        self.pool_attention = MultiHeadAttention(d, num_heads) if contextualization in ("sd", "random_sd") else None
        # Our addition: a learnable scale and bias per task. z and r leave LayerNorms with norms near sqrt(d), so
        # a_k = 1/sqrt(d) starts <z, r> a_k at logit scale (attention's usual scaling); b_k lets the point-wise
        # probabilities calibrate, while the list-wise softmax ignores it.
        self.scale = nn.Parameter(torch.tensor(d**-0.5))
        self.bias = nn.Parameter(torch.zeros(()))

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
    h through residuals gated per channel from 0: z = h + g_a Attn(LN h), z + g_f FFN(LN z), so the layer starts as
    the identity (the paper's post-norm form cost up to 0.03 AUC, docs/onerank.md section 3). With detachment, task k
    reads task j != k through keys and values built from h_j.detach(): information flows forward, gradients do not."""

    def __init__(self, config: OneRankConfig, visibility: Tensor) -> None:
        super().__init__()
        d = config.dim
        self.detach = config.detach_cross_task
        self.post_norm = config.experimental.cross_task_block == "post_norm"
        self.attention = MultiHeadAttention(d, config.num_heads)
        self.register_buffer("visibility", visibility, persistent=False)
        self.norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d, config.ffn_multiplier * d, config.dropout)
        self.ffn_norm = nn.LayerNorm(d)
        # vectors, like norm gains: no weight decay
        self.attention_gate = None if self.post_norm else nn.Parameter(torch.zeros(d))
        self.ffn_gate = None if self.post_norm else nn.Parameter(torch.zeros(d))

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
        if self.post_norm:
            z = self.norm(h + self.read_across(h, normalize=False))
            return self.ffn_norm(z + self.ffn(z))
        z = h + self.attention_gate * self.read_across(h, normalize=True)
        return z + self.ffn_gate * self.ffn(self.ffn_norm(z))


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------
class OneRank(MultiTaskModel):
    Config = OneRankConfig
    needs_requests = True
    # Point-wise BCE / MSE plus multi-positive InfoNCE per task (section 1.5). lambda_lw = 0.1: at 1.0 the list-wise
    # loss outweighed the point-wise one and cost about 0.04 test AUC on KuaiRand (docs/onerank.md section 1.5).
    objective_defaults = {"pointwise": 1.0, "listwise": 0.1, "temperature": 1.0}

    @classmethod
    def saved_options(cls, options: dict, space: FeatureSpace) -> dict:
        return saved_options(options, space)  # older checkpoints' options: added since, moved, removed

    def __init__(self, space: FeatureSpace, config: OneRankConfig) -> None:
        super().__init__(space, config)
        config.validate(space)
        d, x = config.dim, config.experimental
        # the ablations' modes, resolved once: the code below reads these, not the switches
        self.task_tokens = "projection" if x.task_projections else config.task_tokens
        self.contextualization = "random_sd" if x.random_sd else config.contextualization
        self.tokenizer = Tokenizer(space, config)
        self.encoder = StructuredEncoder(d, config.num_layers, config.num_heads, config.ffn_multiplier * d,
                                         config.dropout)
        own_fields = {"off": [], "id": [space.schema.item_id], "all": space.item_fields}[config.task_item_embedding]
        self.channels = nn.ModuleDict({
            t: TaskChannel(d, config.num_heads, self.contextualization, self.task_tokens == "per_task",
                           self.task_tokens == "projection", {f: space.vocab_sizes[f] for f in own_fields},
                           config.page_attention)
            for t in self.tasks
        })
        self.shared_task_token = nn.Parameter(torch.randn(d) * 0.05) if self.task_tokens == "shared" else None
        num_sd = self.tokenizer.num_sd
        if x.random_sd:
            # untrained, frozen SD: it varies with the request, but nothing learns what to ask of the pool
            self.register_buffer("random_sd", torch.randn(num_sd * d, d) / max(num_sd * d, 1) ** 0.5)
        elif x.sd_mlp and num_sd:
            self.sd_mlp = MLP(num_sd * d, [d], output_dim=d)
        funnel = any(t.space is not None for t in space.schema.tasks)
        visibility = config.task_visibility(len(self.tasks), funnel)
        self.cross_task = CrossTaskAttention(config, visibility) if config.cross_task != "none" else None

    def task_parameter_prefixes(self) -> dict[str, list[str]]:
        return {t: [f"channels.{t}."] for t in self.tasks}

    def output_biases(self) -> dict[str, nn.Parameter]:
        return {t: self.channels[t].bias for t in self.tasks}  # b_k of section 1.5

    # ---- 1.1 tokens -> the encoder's groups --------------------------------------------------------------------------
    def _candidates(self, batch: Batch) -> Tensor:
        """The candidate inputs of the groups: c_i [B, d]; with ``task_item_embedding`` [B, 1 + K, d], c_i and then
        c_i + e_k(item) for each task k."""
        candidates = self.tokenizer.candidates(batch)
        if self.config.task_item_embedding == "off":
            return candidates
        # e_k(item), task k's own item embeddings; an item added after training (features/item_vectors.py) reads OOV
        codes = {f: batch.categorical[f] for f in self.channels[self.tasks[0]].item_embeddings}
        own = [candidates + sum(table(torch.where(codes[f] < table.num_embeddings, codes[f], OOV))
                                for f, table in self.channels[t].item_embeddings.items()) for t in self.tasks]
        return torch.stack([candidates, *own], dim=1)

    def _groups(self, candidates: Tensor) -> Tensor:
        """[R, N, d] candidate tokens (``_candidates``) -> the groups [R, N, S, d]: [c_i, t_k + c_i ...], [c_i, t_k ...]
        with ``template``, [c_i, t_k + c_i + e_k(item) ...] from [R, N, 1 + K, d]; S = 2 with one shared token, [c_i]
        with projections. c_i carries no task token and e_k is task k's, so the channels stay private."""
        if self.task_tokens == "projection":
            return candidates[:, :, None]
        shared = self.task_tokens == "shared"
        template = self.shared_task_token[None] if shared else torch.stack([self.channels[t].token for t in self.tasks])
        if candidates.dim() == 4:
            return torch.cat([candidates[:, :, :1], candidates[:, :, 1:] + template], dim=2)
        followers = template.expand(*candidates.shape[:2], -1, candidates.shape[-1])
        if self.config.task_token_input == "candidate":
            followers = followers + candidates[:, :, None]
        return torch.cat([candidates[:, :, None], followers], dim=2)

    @property
    def _first_output(self) -> int:
        """The first group token whose final state is read: the candidate's only with projections (``_task_states``)."""
        return 0 if self.task_tokens == "projection" else 1

    def _task_states(self, outputs: Tensor) -> Tensor:
        """Final states of the group tokens ``_first_output:`` [R, N, S', d] -> r [R, N, K, d]."""
        if self.task_tokens == "projection":
            return torch.stack([self.channels[t].projection(outputs[:, :, 0]) for t in self.tasks], dim=2)
        return outputs.expand(-1, -1, len(self.tasks), -1) if self.task_tokens == "shared" else outputs

    def _first_context_output(self, context: ContextTokens) -> int:
        """The first context token whose final state is read: the SD tokens (last in the context) when s pools them,
        none otherwise (history and anchor tokens only offer keys and values to the last layer)."""
        U = context.tokens.shape[1]
        pools = self.contextualization in ("sd", "off") and not self.config.experimental.sd_mlp
        return U - context.num_global if pools else U

    def _situation(self, context: ContextTokens, sd_states: Tensor) -> Tensor:
        """s of section 1.3: [R, d] (sd_states: the final SD token states, read only when s pools them)."""
        if context.num_global == 0 or self.contextualization == "mean_pool":
            return sd_states.new_zeros(sd_states.shape[0], self.config.dim)
        sd_inputs = context.tokens[:, -context.num_global:]
        if self.contextualization == "random_sd":
            return sd_inputs.detach().flatten(1) @ self.random_sd
        return self.sd_mlp(sd_inputs.flatten(1)) if self.config.experimental.sd_mlp else sd_states.mean(1)

    def _cache(self, context: ContextTokens, sd_states: Tensor, keys_values: list) -> ContextCache:
        return ContextCache(keys_values, context.valid, sd_states, self._situation(context, sd_states))

    # ---- 1.2 encoder: the training path and the serving pieces ------------------------------------------------------
    def tokens(self, batch: Batch) -> tuple[ContextTokens, Tensor, Tensor]:
        """(each request's context tokens, its groups [R, N, S, d], candidate presence [R, N]): the encoder's input."""
        context = self.tokenizer.context(batch.request_inputs())
        slot, present = batch.list_layout()
        return context, self._groups(self._candidates(batch)[slot]), present

    def encode_context(self, batch: Batch) -> ContextCache:
        """Encode each request's context once (read from the request's first row): per-layer keys / values, the final
        SD states and s (``summary``). Reusable for any number of candidates of those requests, in any chunks."""
        context = self.tokenizer.context(batch.request_inputs())
        return self._cache(context, *self.encoder.context(context, self._first_context_output(context)))

    def encode(self, batch: Batch, pack: bool | None = None) -> tuple[ContextCache, Tensor]:
        """(the requests' ContextCache, r [R, N, K, d]): ``encode_context`` then ``encode_candidates`` in one pass
        (``StructuredEncoder.joint``), or packed when padding to the largest request would add more than a quarter
        of the candidates (``pack`` None; shapes only, so a traced graph decides alike; ``packed_groups``)."""
        slot, present = batch.list_layout()
        if not (present.numel() * 4 > batch.size * 5 if pack is None else pack):
            context, groups, _ = self.tokens(batch)
            return self.encode_tokens(context, groups)
        cache = self.encode_context(batch)
        groups = self._groups(self._candidates(batch)[:, None])[:, 0]
        return cache, self._task_states(self.encoder.packed_groups(groups, cache, slot, present, self._first_output))

    def encode_tokens(self, context: ContextTokens, groups: Tensor) -> tuple[ContextCache, Tensor]:
        """``encode`` from the encoder's input (``tokens``): the structured encoder alone."""
        sd_states, states, keys_values = self.encoder.joint(
            context, groups, self._first_output, self._first_context_output(context)
        )
        return self._cache(context, sd_states, keys_values), self._task_states(states)

    def encode_candidates(self, cache: ContextCache, batch: Batch, chunk_size: int | None = None) -> Tensor:
        """r [R, N, K, d]: the final task-token states of every candidate of the batch's requests against the cached
        context, ``chunk_size`` candidates per request at a time (groups are independent, so chunking is exact)."""
        slot, _ = batch.list_layout()
        if slot.shape[0] != cache.num_requests:
            raise ValueError(
                f"onerank: the batch has {slot.shape[0]} requests, the context cache {cache.num_requests}; "
                "group a serving pool with batch.as_one_request()"
            )
        candidates = self._candidates(batch)

        def encode(rows: Tensor) -> Tensor:
            return self.encoder.groups(self._groups(candidates[rows]), cache, self._first_output)

        if chunk_size is None:  # one pass, and no Python loop over a data-dependent N (graph export follows it)
            return self._task_states(encode(slot))
        chunks = [encode(slot[:, start:start + chunk_size]) for start in range(0, slot.shape[1], max(chunk_size, 1))]
        return self._task_states(torch.cat(chunks, dim=1))

    def score_with_context(self, cache: ContextCache, batch: Batch, chunk_size: int | None = None) -> dict[str, Tensor]:
        """Logits {task: [B]} of the batch's candidates (grouped in the same requests as ``cache``); groups are encoded
        chunk by chunk, contextualization and cross-task attention see the whole pool at once."""
        return self._score(self.encode_candidates(cache, batch, chunk_size), cache.summary, batch)

    def reference_encode(self, batch: Batch) -> tuple[ContextTokens, Tensor, Tensor]:
        """(context tokens, context states [R, U, d], group states [R, N, S, d]) from one masked full attention over
        the whole sequence (``nn.structured.reference_encoder``): what the structured path is tested against."""
        context, groups, present = self.tokens(batch)
        return context, *reference_encoder(self.encoder, context, groups, present)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        cache, r = self.encode(batch)
        return self._score(r, cache.summary, batch)

    @torch.no_grad()
    def score_pool(self, batch: Batch, chunk_size: int = 1024) -> dict[str, Tensor]:
        """One request's whole pool (all rows of ``batch``, whatever its ``request``): the context encoded once,
        candidate groups ``chunk_size`` at a time; the same scores as one pass."""
        pool = batch.as_one_request()
        if pool.size <= chunk_size:  # one chunk: the one-pass encoder
            return self(pool)
        return self.score_with_context(self.encode_context(pool), pool, chunk_size)

    # ---- 1.3 contextualization -> 1.4 cross-task attention -> 1.5 scoring ------------------------------------------
    def _score(self, r: Tensor, situation: Tensor, batch: Batch) -> dict[str, Tensor]:
        slot, present = batch.list_layout()
        if self.config.page_attention:  # each task's r[k, i] reads its page first
            r = torch.stack([self.channels[t].page(r[:, :, k], present) for k, t in enumerate(self.tasks)], dim=2)
        h = torch.stack(
            [self.channels[t].contextualize(situation, r[:, :, k], present) for k, t in enumerate(self.tasks)], dim=1
        )
        z = h if self.cross_task is None else self.cross_task(h)
        scale = torch.stack([self.channels[t].scale for t in self.tasks])
        bias = torch.stack([self.channels[t].bias for t in self.tasks])
        scores = torch.einsum("rkd,rnkd->rnk", z, r) * scale + bias
        logits = scores.new_zeros(batch.size, len(self.tasks))
        logits[slot[present]] = scores[present]
        return {t: logits[:, k] for k, t in enumerate(self.tasks)}
