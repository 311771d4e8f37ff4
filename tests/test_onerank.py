"""OneRank, property by property (docs/models.md section 1): the structured attention equals the masked reference,
tasks' private channels receive no other task's gradient, forward information follows the cross-task mask, candidate
encodings are independent, scores are permutation-equivariant and ignore padding, chunked serving equals one pass,
history is causal; every ablation switch trains; the model trains end to end, also on Census-like input."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from onerank import api
from onerank.data import CategoricalField, DenseField, RawDataset, RawSplit, Schema, SequenceField, TaskSpec
from onerank.data.batching import Batch, tensor_splits
from onerank.data.dataset import encode_dataset
from onerank.data.schema import SchemaError
from onerank.features.space import FeatureSpace
from onerank.models import build_model
from onerank.models.onerank import CrossTaskAttention, OneRank, OneRankConfig, OneRankExperimental
from onerank.nn.structured import context_layout, context_mask, distinct_rows, reference_mask
from onerank.nn.transformer import SegmentedPrefix, attention_bias
from onerank.objectives.losses import MultiTaskObjective, ObjectiveConfig
from onerank.training.config import RunConfig, TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
EXPERIMENTAL = {f.name for f in dataclasses.fields(OneRankExperimental)}
TASKS = ("click", "cart", "order")
L = 5  # history length of every sequence


def make_space(sequences=("clicked", "carted"), items: bool = True, tasks=TASKS) -> FeatureSpace:
    categorical = [CategoricalField("user_id", "user"), CategoricalField("hour", "context")]
    dense = [DenseField("age", group="user")]
    if items:
        categorical += [CategoricalField("item_id", "item"), CategoricalField("category", "item")]
        dense.append(DenseField("price", group="item"))
    schema = Schema(
        categorical=categorical,
        dense=dense,
        sequences=[SequenceField(s, max_len=L) for s in sequences],
        tasks=[TaskSpec(t) for t in tasks],
        item_id="item_id" if items else None,
    )
    return FeatureSpace(schema, {"user_id": 20, "hour": 10, "item_id": 30, "category": 8})


def make_batch(space: FeatureSpace, sizes: list[int], seed: int = 0) -> Batch:
    """Random requests of the given sizes; request-level fields and histories are the same on all rows of a request,
    histories are left-padded with random lengths (some empty)."""
    g = torch.Generator().manual_seed(seed)
    R, B = len(sizes), sum(sizes)
    request = torch.repeat_interleave(torch.arange(R), torch.tensor(sizes))
    per_request = {f.name for f in space.schema.categorical if f.group != "item"}
    categorical = {}
    for name in space.categorical_fields:
        if name in per_request:
            categorical[name] = torch.randint(2, space.vocab_sizes[name], (R,), generator=g)[request]
        else:
            categorical[name] = torch.randint(2, space.vocab_sizes[name], (B,), generator=g)
    dense = {
        f.name: (torch.randn(R, generator=g)[request] if f.group != "item" else torch.randn(B, generator=g))
        for f in space.schema.dense
    }
    histories = {}
    for seq in space.sequences:
        items = torch.randint(2, space.vocab_sizes["item_id"], (R, L), generator=g)
        lengths = torch.randint(0, L + 1, (R,), generator=g)
        lengths[0] = L - 1  # request 0 always has a history with one padded slot
        items[torch.arange(L)[None, :] < (L - lengths)[:, None]] = 0
        codes = {"item_id": items, "category": torch.where(items > 0, items % 6 + 2, 0)}
        histories[seq] = {f: c[request] for f, c in codes.items()}
    labels = {t: (torch.rand(B, generator=g) < 0.4).float() for t in space.task_names}
    return Batch(categorical, dense, histories, labels, {t: torch.ones(B, dtype=torch.bool) for t in labels},
                 user=request.clone(), request=request)


def take_rows(batch: Batch, rows: torch.Tensor, request: torch.Tensor | None) -> Batch:
    def cut(x):
        return {k: cut(v) for k, v in x.items()} if isinstance(x, dict) else x[rows]

    return Batch(cut(batch.categorical), cut(batch.dense), cut(batch.histories), cut(batch.labels),
                 cut(batch.label_mask), batch.user[rows], request=request)


def model_for(space: FeatureSpace, seed: int = 0, open_gates: bool = True, **options) -> OneRank:
    """A small OneRank; ``open_gates``: the cross-task layer's gates set away from their start at 0 (as after
    training), so that the layer reads across tasks and the tests of its flows have something to see."""
    torch.manual_seed(seed)
    options = {"dim": 16, "num_layers": 2, "num_heads": 2, "ffn_multiplier": 2, "item_mlp_hidden": (16,), **options}
    experimental = {k: options.pop(k) for k in list(options) if k in EXPERIMENTAL}  # flat here, for short params
    model = build_model("onerank", space, {**options, "experimental": experimental}).eval()
    if open_gates and model.cross_task is not None:
        opened(model.cross_task)
    return model


def opened(layer: CrossTaskAttention) -> CrossTaskAttention:
    for seed, gate in enumerate((layer.attention_gate, layer.ffn_gate)):
        if gate is not None:
            with torch.no_grad():
                gate.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return layer


def losses_of(model: OneRank, batch: Batch) -> dict[str, torch.Tensor]:
    objective = MultiTaskObjective(model.space.tasks, ObjectiveConfig(**model.objective_defaults))
    return objective(model(batch), batch)


@pytest.fixture(scope="module")
def space():
    return make_space()


# ---------------------------------------------------------------------------------------------------------------------
# The structured encoder and its reference
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {},  # task_token_input: candidate (t_k + c_i)
    {"task_token_input": "template"},  # the bare template: the first layer's once-per-request fast path
    {"task_token_input": "template", "task_tokens": "shared"},
    {"task_token_input": "template", "num_layers": 1},
    {"task_tokens": "shared"},
    {"task_projections": True},
    {"anchor_sequences": ("carted",)},
    {"sd_tokens": "group", "num_layers": 3},
    {"contextualization": "mean_pool"},  # s reads no final SD state
    {"contextualization": "off"},
    {"random_sd": True},  # s reads no final SD state
    {"num_layers": 1},
    {"num_layers": 1, "task_projections": True},
    {"sd_mlp": True},  # s reads no final SD state: the last layer updates only task tokens
    {"task_item_embedding": "all"},  # each task's own item embeddings in its task token's input
])
def test_structured_encoder_equals_the_reference_masked_full_attention(space, options):
    model = model_for(space, **options)
    randomize_task_item_embeddings(model)
    batch = make_batch(space, [4, 1, 7, 3], seed=1)  # ragged requests: padded candidates, empty histories
    with torch.no_grad():
        cache = model.encode_context(batch)
        r = model.encode_candidates(cache, batch)
        _, ref_context, ref_groups = model.reference_encode(batch)
        ref_r = model._task_states(ref_groups[:, :, model._first_output:])
        joint_cache, joint_r = model.encode(batch, pack=False)  # one pass (score_pool within one chunk)
        _, packed_r = model.encode(batch, pack=True)  # ragged requests in training: one group per real candidate
    _, present = batch.list_layout()
    assert (packed_r - ref_r)[present].abs().max() < 1e-5
    ref_sd_states = ref_context[:, ref_context.shape[1] - cache.global_states.shape[1]:]
    pooled = model.contextualization in ("sd", "off") and not model.config.experimental.sd_mlp
    assert cache.global_states.shape[1] == (model.tokenizer.num_sd if pooled else 0)  # only the final states s reads
    assert torch.allclose(cache.global_states, ref_sd_states, rtol=0, atol=1e-5)
    assert (r - ref_r)[present].abs().max() < 1e-5
    assert torch.allclose(joint_cache.global_states, ref_sd_states, rtol=0, atol=1e-5)
    assert (joint_r - ref_r)[present].abs().max() < 1e-5
    assert (joint_cache.summary - cache.summary).abs().max() < 1e-5
    for (k, v), (joint_k, joint_v) in zip(cache.keys_values, joint_cache.keys_values):
        assert (k - joint_k).abs().max() < 1e-5 and (v - joint_v).abs().max() < 1e-5


def test_reference_mask_and_context_mask_follow_the_visibility_rules(space):
    model = model_for(space, anchor_sequences=("carted",))
    batch = make_batch(space, [3, 2], seed=2)
    context = model.tokenizer.context(batch.request_inputs())
    _, present = batch.list_layout()
    K = len(TASKS)
    S = 1 + K
    mask = reference_mask(context, present, S)
    U = context.tokens.shape[1]
    assert mask.shape == (2, U + 3 * S, U + 3 * S)
    assert not mask[:, :U, U:].any()  # context never sees candidates or task tokens
    for i in range(3):
        c = U + i * S
        assert torch.equal(mask[0, c, :U], context.valid[0])  # groups see all real context
        assert mask[0, c, U:].nonzero().flatten().tolist() == [i * S]  # c_i sees itself only
        for k in range(1, S):
            assert mask[0, c + k, U:].nonzero().flatten().tolist() == [i * S, i * S + k]  # t_k: c_i and itself
    # history and anchor tokens: causal inside their segment; SD tokens: all real context
    allowed = context_mask(context)[0]
    blocks = context.blocks
    for q in range(U):
        for k in range(U):
            if q != k and allowed[q, k] and blocks[q] >= 0:
                assert blocks[k] == blocks[q] and k < q
    sd = blocks == -1
    assert torch.equal(allowed[sd][:, :], (context.valid[0][None, :] | torch.eye(U, dtype=torch.bool)[sd]))


@pytest.mark.parametrize("anchors", [(), ("carted",)])
def test_segmented_context_attention_equals_the_explicit_context_mask(space, anchors):
    """The encoder's context attention (causal segments with their real tokens first, SD tokens over every real
    token) against the explicit mask, for every set of queried tokens a layer asks for, with gradients."""
    model = model_for(space, anchor_sequences=anchors)
    batch = make_batch(space, [3, 2, 4], seed=11)
    batch.histories["clicked"]["item_id"][batch.request == 1] = 0  # an empty history segment
    context = model.tokenizer.context(batch.request_inputs())
    layout = context_layout(context, torch.float32)
    assert isinstance(layout, SegmentedPrefix)
    for start in range(len(context.segment_lengths)):  # real tokens first inside every segment
        first = sum(context.segment_lengths[:start])
        real = context.valid[:, first:first + context.segment_lengths[start]].int()
        assert (real[:, 1:] <= real[:, :-1]).all()
    explicit = attention_bias(context_mask(context)).unsqueeze(1)
    R, U = context.valid.shape
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(R, 2, U, 4, generator=g, requires_grad=True) for _ in range(3))
    for first_query in (0, 3, L + 1, U - context.num_global, U - 1):
        got = layout.attend(query[:, :, first_query:], key, value, first_query)
        want = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, first_query:], key, value, attn_mask=explicit[:, :, first_query:])
        real = context.valid[:, first_query:]  # padded slots' outputs are read by nobody
        torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real])
        grads = torch.autograd.grad((got.transpose(1, 2)[real]).sum(), (query, key, value))
        expected = torch.autograd.grad((want.transpose(1, 2)[real]).sum(), (query, key, value))
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b)


def test_distinct_rows_match_torch_unique_over_rows():
    g = torch.Generator().manual_seed(0)
    for shape, high in [((0, 3), 5), ((1, 1), 5), ((4000, 4), 6), ((3000, 1), 50), ((500, 3), 2**40)]:
        rows = torch.randint(0, high, shape, generator=g)
        distinct, inverse = distinct_rows(rows)
        assert torch.equal(distinct[inverse], rows)
        assert len(distinct) == len(torch.unique(rows, dim=0)) == len(torch.unique(distinct, dim=0))


def test_distinct_rows_traced_follow_the_data_not_the_example():
    # a traced graph (TorchScript, ONNX) must not bake in the example's code range or its count of distinct rows:
    # served requests have larger codes and more distinct items than the export example
    example = torch.tensor([[1, 2], [1, 2], [3, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(distinct_rows, (example,))
    rows = torch.randint(0, 1000, (700, 2), generator=torch.Generator().manual_seed(1))
    distinct, inverse = traced(rows)
    assert torch.equal(distinct[inverse], rows)
    assert len(distinct) == len(torch.unique(rows, dim=0))


def test_history_tokens_never_attend_to_later_history_tokens(space):
    model = model_for(space)
    batch = make_batch(space, [3, 2], seed=3)
    rows = batch.request == 0
    changed = make_batch(space, [3, 2], seed=3)
    slot = L - 2  # a real item, not the most recent
    changed.histories["clicked"]["item_id"][rows, slot] = 29
    changed.histories["clicked"]["category"][rows, slot] = 7
    with torch.no_grad():
        # every context token's final state (the model's own path computes only the SD tokens' at the last layer)
        contexts = [model.tokenizer.context(b.request_inputs()) for b in (batch, changed)]
        before, after = (model.encoder.context(context)[0][0] for context in contexts)
    moved = (before - after).abs().amax(-1) > 1e-6
    # context layout: [clicked (L), carted (L), SD tokens], each segment's real tokens first, in their order
    real = contexts[0].valid[0]
    count = int(real[:L].sum())
    assert real[:count].all() and not real[count:L].any()
    changed_at = count - (L - slot)  # the changed item's place among the real tokens
    assert not moved[:changed_at].any(), "an earlier history token saw a later one"
    assert moved[changed_at:count].all()
    assert not moved[L:2 * L].any(), "another behaviour segment saw this one"
    assert moved[2 * L:].all(), "SD tokens see the whole history"


def test_a_candidates_encoding_does_not_depend_on_other_candidates(space):
    model = model_for(space)
    batch = make_batch(space, [6, 4], seed=4)
    other = make_batch(space, [6, 4], seed=4)
    other.categorical["item_id"][2] = 29  # candidate 2 of request 0 changes
    other.dense["price"][2] += 3.0
    with torch.no_grad():
        a = model.encode_candidates(model.encode_context(batch), batch)
        b = model.encode_candidates(model.encode_context(other), other)
    moved = (a - b).abs().amax(dim=(-1, -2)) > 0
    assert moved[0, 2] and moved.sum() == 1


def test_scores_are_permutation_equivariant_and_ignore_padded_candidates(space):
    model = model_for(space)
    batch = make_batch(space, [6, 9], seed=5)
    with torch.no_grad():
        both = model(batch)
        alone = model(batch.slice(0, 6))  # request 0 without the padding that request 1 forces on it
        perm = torch.cat([torch.randperm(6, generator=torch.Generator().manual_seed(0)), torch.arange(6, 15)])
        permuted = model(take_rows(batch, perm, batch.request))
    for t in TASKS:
        assert torch.allclose(both[t][:6], alone[t], atol=1e-5)
        assert torch.allclose(permuted[t], both[t][perm], atol=1e-5)


def test_logits_and_loss_do_not_depend_on_the_order_of_requests_in_the_batch(space):
    model = model_for(space)
    sizes = [3, 1, 5, 2]
    batch = make_batch(space, sizes, seed=12)
    starts = [0, 3, 4, 9]
    order = [2, 0, 3, 1]
    rows = torch.cat([torch.arange(starts[r], starts[r] + sizes[r]) for r in order])
    request = torch.repeat_interleave(torch.arange(4), torch.tensor([sizes[r] for r in order]))
    shuffled = take_rows(batch, rows, request)
    with torch.no_grad():
        base, moved = model(batch), model(shuffled)
        base_loss, moved_loss = losses_of(model, batch), losses_of(model, shuffled)
    for t in TASKS:
        assert torch.allclose(moved[t], base[t][rows], atol=1e-5)
        assert torch.allclose(moved_loss[t], base_loss[t], atol=1e-6)


def test_mean_pool_averages_r_over_the_real_candidates(space):
    batch = make_batch(space, [4, 2, 5], seed=13)
    with torch.no_grad():
        pooled = model_for(space, contextualization="mean_pool")
        assert pooled.channels["click"].query is None and pooled.channels["click"].pool_attention is None
        _, r = pooled.encode(batch)
        _, present = batch.list_layout()
        h = pooled.channels["click"].contextualize(torch.zeros(3, 16), r[:, :, 0], present)
        assert torch.allclose(h[1], r[1, :2, 0].mean(0), atol=1e-6)  # request 1: 2 real candidates of 5 slots


def test_grouped_situational_fields_become_one_token_per_schema_group():
    fields = [CategoricalField(f"u{i}", "user") for i in range(19)] + [CategoricalField("hour", "context")]
    schema = Schema(categorical=fields + [CategoricalField("item_id", "item")], dense=[DenseField("age", "user")],
                    tasks=[TaskSpec("click")], item_id="item_id")
    wide = FeatureSpace(schema, {f.name: 5 for f in schema.categorical})
    # 21 SD fields: one token per schema group (user: 19 categorical + age, context: hour)
    assert [len(g) for g in model_for(wide, sd_tokens="group").tokenizer.sd_groups] == [20, 1]
    assert model_for(wide).tokenizer.num_sd == 21  # the default: one token per field


def reference_scores(model: OneRank, batch: Batch) -> dict[str, torch.Tensor]:
    """The model's logits with the encoder replaced by the masked full attention over [context, every group]."""
    context, hidden, groups = model.reference_encode(batch)
    r = model._task_states(groups[:, :, model._first_output:])
    return model._score(r, model._situation(context, hidden[:, model._first_context_output(context):]), batch)


@pytest.mark.parametrize("size, chunks", [(23, (1, 5, 22)), (1000, (37, 256, 999))])
def test_chunked_scoring_with_a_cached_context_equals_the_masked_reference(space, size, chunks):
    """Pools larger than the chunk: the context encoded once, the groups chunk by chunk (``score_with_context``,
    ``score_pool``), contextualization and the cross-task layer over the whole pool; the same logits as the masked
    full attention over every token of the request."""
    model = model_for(space)
    pool = make_batch(space, [size], seed=6)
    with torch.no_grad():
        expected = reference_scores(model, pool)
        cache = model.encode_context(pool)
        for chunk in chunks:
            chunked = model.score_with_context(cache, pool, chunk_size=chunk)
            served = model.score_pool(pool, chunk_size=chunk)
            for t in TASKS:
                torch.testing.assert_close(chunked[t], expected[t], rtol=0, atol=2e-5)
                torch.testing.assert_close(served[t], expected[t], rtol=0, atol=2e-5)
        # a serving pool comes without request grouping: score_pool treats all its rows as one request
        ungrouped = take_rows(pool, torch.arange(size), None)
        torch.testing.assert_close(model.score_pool(ungrouped, chunk_size=chunks[0])["cart"], expected["cart"],
                                   rtol=0, atol=2e-5)
    assert len({round(float(v), 4) for v in expected["cart"]}) > size // 2  # candidates really score differently


# ---------------------------------------------------------------------------------------------------------------------
# Tasks: private gradients, forward information flow
# ---------------------------------------------------------------------------------------------------------------------
def private_groups(task: str) -> dict[str, str]:
    return {"task token": f"channels.{task}.token", "SD projection f_k": f"channels.{task}.query.",
            "cross-attention MHCA_k": f"channels.{task}.pool_attention.", "scale and bias": f"channels.{task}.scale"}


def gradients(model: OneRank, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def randomize_task_item_embeddings(model: OneRank) -> None:
    """task_item_embedding starts at zero (the model without it); tests that compare paths need it non-zero."""
    for channel in model.channels.values():
        for table in channel.item_embeddings.values():
            with torch.no_grad():
                table.weight[1:].normal_(std=0.5)


def open_page_gates(model: OneRank) -> None:
    """The page attention's gates start at 0 (the model without it); tests of what it reads need them open."""
    for k, channel in enumerate(model.channels.values()):
        if channel.page is not None:
            with torch.no_grad():
                channel.page.gate.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(k))


@pytest.mark.parametrize("page_attention", [False, True])
@pytest.mark.parametrize("task_item_embedding", ["off", "all"])
@pytest.mark.parametrize("detach", [True, False])
def test_a_tasks_loss_never_reaches_another_tasks_private_parameters(space, detach, task_item_embedding,
                                                                     page_attention):
    model = model_for(space, cross_task="full", detach_cross_task=detach,
                      task_item_embedding=task_item_embedding, page_attention=page_attention).train()
    randomize_task_item_embeddings(model)
    open_page_gates(model)
    batch = make_batch(space, [5, 4, 6], seed=7)
    losses = losses_of(model, batch)
    for k in TASKS:
        grads = gradients(model, losses[k])

        def norm(prefix):
            return sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith(prefix))

        groups = private_groups(k)
        if task_item_embedding != "off":
            groups["item embeddings e_k"] = f"channels.{k}.item_embeddings."
        if page_attention:
            groups["page attention"] = f"channels.{k}.page."
        for part, prefix in groups.items():
            assert norm(prefix) > 0, f"{k}'s loss gives no gradient to its own {part}"
        assert norm("encoder.") > 0 and norm("tokenizer.") > 0 and norm("cross_task.") > 0
        for j in TASKS:
            if j == k:
                continue
            others = private_groups(j)
            if task_item_embedding != "off":
                others["item embeddings e_k"] = f"channels.{j}.item_embeddings."
            if page_attention:
                others["page attention"] = f"channels.{j}.page."
            leaked = {part: norm(prefix) for part, prefix in others.items() if "scale" not in part}
            if detach:
                assert all(v == 0.0 for v in leaked.values()), f"{k}'s loss reached {j}'s {leaked}"
            else:
                assert all(v > 0 for v in leaked.values()), f"without detachment {k}'s loss should reach {j}: {leaked}"


# ---------------------------------------------------------------------------------------------------------------------
# Page-aware scoring
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_attention", [False, True])
def test_page_attention_lets_a_score_read_its_own_requests_competitors_and_no_others(space, page_attention):
    # contextualization off: without the page attention nothing of the other candidates reaches a score
    model = model_for(space, contextualization="off", page_attention=page_attention)
    open_page_gates(model)
    batch = make_batch(space, [6, 4], seed=4)
    other = make_batch(space, [6, 4], seed=4)
    other.categorical["item_id"][2] = 29  # candidate 2 of request 0 changes
    other.dense["price"][2] += 3.0
    with torch.no_grad():
        a, b = model(batch), model(other)
    for t in TASKS:
        moved = (a[t] - b[t]).abs() > 1e-6
        assert moved[2], "the changed candidate's own score must move"
        assert not moved[6:].any(), "a candidate of another request moved"
        competitors = torch.cat([moved[:2], moved[3:6]])
        assert bool(competitors.all()) == page_attention and bool(competitors.any()) == page_attention


def test_page_attention_on_ragged_requests_equals_each_request_scored_alone(space):
    model = model_for(space, page_attention=True, task_item_embedding="id")
    open_page_gates(model)
    randomize_task_item_embeddings(model)
    sizes = [3, 1, 7, 2, 1, 1]
    batch = make_batch(space, sizes, seed=21)
    starts = np.cumsum([0, *sizes])
    with torch.no_grad():
        together = model(batch)
        packed = model._score(model.encode(batch, pack=True)[1], model.encode_context(batch).summary, batch)
        alone = [model(batch.slice(int(lo), int(hi))) for lo, hi in zip(starts[:-1], starts[1:])]
    for t in TASKS:
        loop = torch.cat([scores[t] for scores in alone])
        assert torch.allclose(together[t], loop, atol=1e-5)
        assert torch.allclose(packed[t], loop, atol=1e-5)


def test_page_attention_starts_as_the_model_without_it(space):
    batch = make_batch(space, [5, 3], seed=2)
    with torch.no_grad():
        plain = model_for(space, seed=3)(batch)
        paged = model_for(space, seed=3, page_attention=True)
    # the page attention's parameters are drawn after the others, so the shared ones are equal; its gate is 0
    missing = paged.load_state_dict(model_for(space, seed=3).state_dict(), strict=False).missing_keys
    assert missing and all(".page." in name for name in missing)
    with torch.no_grad():
        for t, scores in paged(batch).items():
            assert torch.allclose(scores, plain[t], atol=1e-6)


@pytest.mark.parametrize("visibility", ["full", "cascade", "parallel"])
def test_cross_task_forward_flow_follows_the_mask(space, visibility):
    model = model_for(space, cross_task=visibility)
    allowed = model.cross_task.visibility
    batch = make_batch(space, [5, 3], seed=8)
    with torch.no_grad():
        base = model(batch)
        # the layer itself: moving h_j moves z_k exactly where task k may read task j
        h = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
        z = model.cross_task(h)
        for j in range(3):
            moved_h = h.clone()
            moved_h[:, j] += torch.randn(16, generator=torch.Generator().manual_seed(j))  # (LN ignores a shift)
            moved = (model.cross_task(moved_h) - z).abs().amax(dim=(0, 2)) > 1e-6
            assert torch.equal(moved, allowed[:, j]), (j, moved, allowed[:, j])
        # the model: changing task j's request vector (through its SD projection f_j) moves task k's scores likewise
        for j, task in enumerate(TASKS):
            weight = model.channels[task].query.weight
            saved = weight.clone()
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(j)))
            moved = [bool((model(batch)[t] - base[t]).abs().max() > 1e-6) for t in TASKS]
            weight.copy_(saved)
            assert moved == allowed[:, j].tolist(), (task, moved)


def test_the_cross_task_mask_is_cascade_for_nested_task_spaces_and_full_otherwise():
    flat = make_space()
    funnel = FeatureSpace(dataclasses.replace(flat.schema, tasks=[TaskSpec("click"), TaskSpec("cart", space="click"),
                                                                  TaskSpec("order", space="cart")]), flat.vocab_sizes)
    assert model_for(flat).cross_task.visibility.all()
    assert torch.equal(model_for(funnel).cross_task.visibility, torch.ones(3, 3, dtype=torch.bool).tril())
    assert model_for(funnel, cross_task="full").cross_task.visibility.all()  # an explicit choice wins


def test_cascade_mask_follows_the_schema_order():
    assert OneRankConfig(cross_task="cascade").task_visibility(3).tolist() == [
        [True, False, False], [True, True, False], [True, True, True]]
    assert OneRankConfig(cross_task="parallel").task_visibility(3).tolist() == torch.eye(3, dtype=torch.bool).tolist()


@pytest.mark.parametrize("block", ["gated", "post_norm"])
def test_detachment_acts_on_the_inputs_not_on_the_cross_task_layers_weights(block):
    """With and without detachment the layer computes the same z, and its query / key / value projection weights get
    the same gradient (a weight's gradient reads the detached input's value, not its gradient): detachment stops
    only the path back into the other tasks' h_j."""
    torch.manual_seed(0)
    config = OneRankConfig(dim=8, num_heads=2, experimental=OneRankExperimental(cross_task_block=block))
    layer = opened(CrossTaskAttention(config, torch.ones(3, 3, dtype=torch.bool)))
    h = torch.randn(4, 3, 8)
    weight = torch.randn(3, 8)
    outputs, grads = [], []
    for detach in (True, False):
        layer.detach = detach
        layer.zero_grad()
        z = layer(h)
        (z * weight).sum().backward()
        outputs.append(z.detach())
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
    for name in ("attention.key_value.weight", "attention.key_value.bias", "attention.query.weight", "norm.weight",
                 *(("attention_gate", "ffn_gate") if block == "gated" else ())):
        assert grads[0][name].abs().max() > 0
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("block", ["gated", "post_norm"])
def test_without_detachment_the_layer_passes_gradients_across_tasks(block):
    config = OneRankConfig(dim=8, num_heads=2, detach_cross_task=True,
                           experimental=OneRankExperimental(cross_task_block=block))
    visibility = config.task_visibility(3)
    layer = opened(CrossTaskAttention(config, visibility))
    h = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(8)  # (a plain sum of a LayerNorm output has zero gradient)
    (grad,) = torch.autograd.grad((layer(h)[:, 0] * weight).sum(), h)
    assert grad[:, 1:].abs().max() == 0 and grad[:, 0].abs().max() > 0
    layer.detach = False
    (grad,) = torch.autograd.grad((layer(h)[:, 0] * weight).sum(), h)
    assert grad[:, 1:].abs().max() > 0


def test_the_gated_cross_task_layer_starts_as_the_identity_and_learns_its_gates():
    """Gates at 0: z = h exactly (the model starts as with ``cross_task: none``), yet every task's loss reaches the
    gates, so the layer can open where reading across tasks helps; post_norm is the spec's form (not the identity)."""
    torch.manual_seed(0)
    config = OneRankConfig(dim=8, num_heads=2)
    layer = CrossTaskAttention(config, config.task_visibility(3))
    h = torch.randn(4, 3, 8)
    assert torch.equal(layer(h), h)
    for k in range(3):
        grads = torch.autograd.grad((layer(h)[:, k] * torch.randn(8)).sum(), [layer.attention_gate, layer.ffn_gate])
        assert all(g.abs().max() > 0 for g in grads)
    post_norm = OneRankConfig(dim=8, num_heads=2, experimental=OneRankExperimental(cross_task_block="post_norm"))
    post = CrossTaskAttention(post_norm, config.task_visibility(3))
    assert not torch.allclose(post(h), h, atol=1e-3)
    with pytest.raises(SchemaError, match="cross_task_block"):
        OneRankConfig(experimental=OneRankExperimental(cross_task_block="pre_norm")).validate(make_space())


def test_task_parameter_prefixes_name_each_tasks_private_parameters(space):
    model = model_for(space)
    prefixes = model.task_parameter_prefixes()
    assert set(prefixes) == set(TASKS)
    names = [n for n, _ in model.named_parameters()]
    for t in TASKS:
        own = [n for n in names if any(n.startswith(p) for p in prefixes[t])]
        assert {f"channels.{t}.token", f"channels.{t}.scale", f"channels.{t}.bias"} <= set(own)
        assert any(".query." in n for n in own) and any(".pool_attention." in n for n in own)
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) not in shared for n, p in model.named_parameters() if n.startswith("channels."))
    assert any(id(p) in shared for n, p in model.named_parameters() if n.startswith("encoder."))


# ---------------------------------------------------------------------------------------------------------------------
# Ablations, training, degenerate inputs
# ---------------------------------------------------------------------------------------------------------------------
ABLATIONS = [  # the suites' and the experimental block's
    {"task_tokens": "shared"},
    {"cross_task": "none"},
    {"cross_task": "parallel"},
    {"cross_task": "cascade"},
    {"detach_cross_task": False},
    {"contextualization": "off"},
    {"contextualization": "mean_pool"},
    {"sd_tokens": "group"},
    {"task_token_input": "template"},
    {"task_item_embedding": "id"},
    {"task_projections": True},
    {"random_sd": True},
    {"sd_mlp": True},
    {"anchor_sequences": ("carted",)},
    {"cross_task_block": "post_norm"},
    {"page_attention": True},
]


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_switch_builds_and_trains_a_step(space, options):
    model = model_for(space, **options).train()
    batch = make_batch(space, [4, 6, 2], seed=9)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = sum(losses_of(model, batch).values())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith("encoder."))
    model.eval()
    with torch.no_grad():
        scores = model(batch)
        pool = batch.slice(4, 10)
        assert torch.allclose(model.score_pool(pool, chunk_size=4)["click"], model(pool)["click"], atol=1e-5)
    assert all(torch.isfinite(v).all() for v in scores.values())


def test_random_sd_is_frozen(space):
    model = model_for(space, random_sd=True)
    assert "random_sd" in dict(model.named_buffers()) and "random_sd" not in dict(model.named_parameters())


def test_config_errors_name_the_option(space):
    with pytest.raises(SchemaError, match="task_tokens"):
        model_for(space, task_tokens="many")
    with pytest.raises(SchemaError, match="anchor_sequences.*liked"):
        model_for(space, anchor_sequences=("liked",))
    with pytest.raises(SchemaError, match="num_heads"):
        model_for(space, dim=10, num_heads=4)
    with pytest.raises(SchemaError, match="num_layers"):
        model_for(space, num_layers=0)
    for clash in ({"task_tokens": "shared"}, {"task_token_input": "template"}):
        with pytest.raises(SchemaError, match="task_item_embedding"):
            model_for(space, task_item_embedding="id", **clash)
    with pytest.raises(SchemaError, match="task_item_embedding"):
        model_for(space, task_item_embedding="yes")


def test_task_item_embeddings_start_at_zero_and_are_each_tasks_own(space):
    """At the start the option changes nothing (e_k = 0): the same scores as the model without it. Once e_k is
    non-zero it moves only task k's scores of that item, in a one-task-per-channel model (cross_task none)."""
    torch.manual_seed(0)
    plain = model_for(space, cross_task="none").eval()
    torch.manual_seed(0)
    model = model_for(space, cross_task="none", task_item_embedding="all").eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".item_embeddings." in name for name in missing)
    assert len(missing) == len(TASKS) * len(space.item_fields) > len(TASKS)
    batch = make_batch(space, [3, 2], seed=5)
    with torch.no_grad():
        before = model(batch)
        expected = plain(batch)
        for t in TASKS:
            torch.testing.assert_close(before[t], expected[t])
        model.channels["click"].item_embeddings[space.item_fields[-1]].weight[1:].normal_(std=0.5)
        after = model(batch)
    assert (after["click"] - before["click"]).abs().max() > 1e-3
    for t in TASKS[1:]:
        torch.testing.assert_close(after[t], before[t])


def tiny_run(dataset, epochs: int = 3, out_dir=None) -> dict:
    config = RunConfig.from_yaml(CONFIGS / "onerank_tiny.yaml")
    config.dataset = dataset.name
    config.train = TrainConfig(epochs=epochs, batch_size=64, lr=1e-2, patience=epochs, progress=False,
                               tensorboard=False, seed=3)
    return api.train(config, out_dir=out_dir, dataset=dataset)


def test_trains_end_to_end_through_the_api_and_its_loss_decreases(tiny_dataset, tmp_path):
    result = tiny_run(tiny_dataset, epochs=5, out_dir=tmp_path)
    first, last = result["history"][0]["train_loss"], result["history"][-1]["train_loss"]
    assert sum(last.values()) < sum(first.values())
    assert result["config"]["model"] == "onerank"
    assert result["valid"]["click"]["auc"] > 0.6  # the best epoch (the tiny test split has only 300 rows)
    # the checkpoint rebuilds the same model, and its serving path scores a request like the training path
    model, _ = api.load_checkpoint(tmp_path / "checkpoint.pt")
    from onerank.data.batching import tensor_splits

    split = tensor_splits(tiny_dataset)["test"]
    pool = split.gather(torch.arange(5), request=torch.zeros(5, dtype=torch.long))
    with torch.no_grad():
        assert torch.allclose(model.score_pool(pool, chunk_size=2)["buy"], model(pool)["buy"], atol=1e-5)


def before_issue_28(model_config: dict, **changed) -> dict:
    """A model config as checkpoints saved it before the ``experimental`` block: every option at the top level."""
    options = {k: v for k, v in model_config.items() if k != "experimental"}
    options.update(sd_group_size=None, anchor_sequences=[], scorer="dot", attention="structured",
                   sd_representation="pooled", cross_task_matrix=None, cross_task_block="gated")
    options.update(changed)
    return {k: v for k, v in options.items() if v is not DROPPED}


DROPPED = object()


@pytest.mark.parametrize("experimental, old_options", [
    ({"cross_task_block": "post_norm"}, {"cross_task_block": DROPPED}),  # before cross_task_block: post-norm
    ({"task_projections": True}, {"task_tokens": "projection"}),
    ({"random_sd": True, "anchor_sequences": ["clicked"]}, {"contextualization": "random_sd",
                                                            "anchor_sequences": ["clicked"]}),
    ({"sd_mlp": True}, {"sd_representation": "mlp"}),
])
def test_checkpoints_of_earlier_releases_load_with_their_options_moved(tiny_dataset, tmp_path, experimental,
                                                                       old_options):
    """Checkpoints written before the ``experimental`` block (and before ``cross_task_block``) name the paper's
    other ablations at the top level: they load into the block and score as saved; an option removed since is refused
    with its name."""
    config = RunConfig.from_yaml(CONFIGS / "onerank_tiny.yaml")
    config.dataset = tiny_dataset.name
    config.model_options = {**config.model_options, "experimental": experimental}
    config.train = TrainConfig(epochs=1, batch_size=64, progress=False, tensorboard=False, seed=1)
    api.train(config, out_dir=tmp_path, dataset=tiny_dataset)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["meta"]["model_config"] = before_issue_28(state["meta"]["model_config"], **old_options)
    torch.save(state, tmp_path / "old.pt")
    old, _ = api.load_checkpoint(tmp_path / "old.pt")
    saved, _ = api.load_checkpoint(tmp_path / "checkpoint.pt")
    assert old.config == saved.config
    assert all(getattr(old.config.experimental, k) == (tuple(v) if isinstance(v, list) else v)
               for k, v in experimental.items())
    pool = tensor_splits(tiny_dataset)["test"].gather(torch.arange(5), request=torch.zeros(5, dtype=torch.long))
    with torch.no_grad():
        assert torch.equal(old(pool)["buy"], saved(pool)["buy"])
    for removed in ({"scorer": "bilinear"}, {"attention": "full"}, {"cross_task_block": "pre_norm"},
                    {"sd_group_size": 8}):
        state["meta"]["model_config"] = before_issue_28(saved.config.__dict__ | {"experimental": None}, **removed)
        torch.save(state, tmp_path / "removed.pt")
        with pytest.raises(api.ckpt.CheckpointError, match=f"{next(iter(removed))}.*removed"):
            api.load_checkpoint(tmp_path / "removed.pt")


def test_a_checkpoint_of_the_auto_sd_tokens_reads_them_as_its_schema_had_them():
    from onerank.models.onerank_checkpoints import saved_options

    fields = [CategoricalField(f"u{i}", "user") for i in range(9)] + [CategoricalField("item_id", "item")]
    wide = FeatureSpace(Schema(categorical=fields, tasks=[TaskSpec("click")], item_id="item_id"),
                        {f.name: 5 for f in fields})
    old = before_issue_28(dataclasses.asdict(OneRankConfig()), sd_tokens="auto")
    assert saved_options(old, wide)["sd_tokens"] == "group"  # 9 SD fields: more than 8, grouped
    assert saved_options(old, make_space())["sd_tokens"] == "field"


def test_the_benchmark_config_builds(space):
    config = RunConfig.from_yaml(CONFIGS / "onerank.yaml")
    model = build_model(config.model, space, config.model_options)
    assert model.config.task_tokens == "per_task" and model.config.detach_cross_task
    # the benchmark configuration is the code default, which the suites run (they pass no OneRank options)
    assert dataclasses.asdict(model.config) == dataclasses.asdict(OneRank.Config())
    assert config.objective == {"pointwise": 1.0, "listwise": 0.1, "temperature": 1.0} == OneRank.objective_defaults


def census_like() -> RawDataset:
    """No requests, no item fields, no sequences: every impression is a request of one."""
    schema = Schema(
        categorical=[CategoricalField(f"c{i}", "user") for i in range(4)],
        dense=[DenseField("age", group="user")],
        tasks=[TaskSpec("income"), TaskSpec("married")],
    )

    def split(n: int, seed: int) -> RawSplit:
        rng = np.random.default_rng(seed)
        table = pd.DataFrame({f"c{i}": rng.integers(0, 5, n) for i in range(4)})
        table["age"] = rng.normal(40, 10, n)
        table["income"] = (rng.random(n) < 0.2 + 0.5 * (table["c0"] < 2)).astype(int)
        table["married"] = (rng.random(n) < 0.3 + 0.4 * (table["age"] > 40)).astype(int)
        return RawSplit(table=table)

    return RawDataset("census_like", schema, split(300, 0), split(80, 1), split(80, 2))


def test_census_like_input_without_requests_items_or_sequences_runs():
    dataset = encode_dataset(census_like())
    result = tiny_run(dataset, epochs=2)
    assert all(np.isfinite(m["logloss"]) for m in result["test"].values())
    model = model_for(FeatureSpace.from_dataset(dataset))
    space = model.space
    ones = {t: torch.ones(7) for t in space.task_names}
    batch = Batch({f: torch.randint(1, 5, (7,)) for f in space.categorical_fields}, {"age": torch.randn(7)}, {},
                  ones, {t: v.bool() for t, v in ones.items()}, user=torch.arange(7))
    with torch.no_grad():
        scores = model(batch)
        # N = 1: each impression is its own request, so scoring one row alone gives the same result
        assert torch.allclose(model(batch.slice(3, 4))["income"], scores["income"][3:4], atol=1e-6)


def candidate_shift(model_name: str, dataset, options: dict | None = None) -> float:
    """Mean |change| of the click logit on the test split when every candidate's item (its item fields, categorical
    and dense) is swapped for another row's, after a few training epochs on the tiny data."""
    config = RunConfig(model=model_name, model_options=options or {},
                       train=TrainConfig(epochs=3, batch_size=64, lr=1e-2, patience=3, progress=False,
                                         tensorboard=False, seed=0))
    trainer = api.build_trainer(config, dataset)
    try:
        trainer.fit()
    finally:
        trainer.close()
    model = trainer.model.eval()
    from onerank.data.batching import tensor_splits

    split = tensor_splits(dataset)["test"]
    rows = torch.arange(split.n)
    request = torch.unique(split.request, return_inverse=True)[1]
    batch, swapped = split.gather(rows, request), split.gather(rows, request)
    item_dense = [f.name for f in dataset.schema.dense if f.group == "item"]
    moved = torch.roll(torch.arange(batch.size), 7)
    for name in model.space.item_fields:
        swapped.categorical[name] = batch.categorical[name][moved]
    for name in item_dense:
        swapped.dense[name] = batch.dense[name][moved]
    with torch.no_grad():
        return float((model(batch)["click"] - model(swapped)["click"]).abs().mean())


def test_swapping_the_candidate_moves_oneranks_scores_as_much_as_mmoes(tiny_dataset):
    """The candidate must reach its score: with the bare task template it reached the task tokens through one key
    among the context's and OneRank scored mostly the user (KuaiRand: 0.17 against MMoE's 0.47)."""
    onerank = candidate_shift("onerank", tiny_dataset, {"dim": 16, "num_heads": 2, "item_mlp_hidden": [16]})
    mmoe = candidate_shift("mmoe", tiny_dataset)
    assert onerank >= 0.5 * mmoe, (onerank, mmoe)
