"""The speed-ups of docs/scaling.md against their plain references: one fused embedding table with an index_add
backward vs one nn.Embedding per field, experts and gates sharing one matrix product vs one product per module, the
multiply-and-sum gate mix vs einsum, and batches gathered from a field matrix vs per-field columns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onerank.data.batching import BatchLoader, TensorSplit
from onerank.features.embedding import FeatureEmbedding
from onerank.features.space import FeatureSpace
from onerank.nn.experts import CGCLayer, MixtureOfExperts


def test_fused_table_matches_one_embedding_per_field(tiny_dataset):
    torch.manual_seed(0)
    space = FeatureSpace.from_dataset(tiny_dataset)
    fused = FeatureEmbedding(space, 8)
    reference = {n: nn.Embedding(space.vocab_sizes[n], 8, padding_idx=0) for n in space.categorical_fields}
    with torch.no_grad():
        for name, table in reference.items():
            table.weight.copy_(fused.field_table(name))
    batch = next(iter(BatchLoader(TensorSplit(tiny_dataset.train, tiny_dataset.item_table, "item_id"), 50).epoch(0)))
    batch.categorical["hour"][:3] = 0  # padding codes embed to zero and receive no gradient
    names = space.categorical_fields
    out = fused.fields(batch, names)
    expected = torch.stack([reference[n](batch.categorical[n]) for n in names], dim=1)
    torch.testing.assert_close(out, expected)
    assert (out[:3, names.index("hour")] == 0).all()
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for name in names:
        torch.testing.assert_close(_field_grad(fused, name), reference[name].weight.grad)
    assert (fused.table.weight.grad[0] == 0).all()
    history, mask = fused.history(batch, "clicked")
    item_expected = torch.stack([reference[n](batch.histories["clicked"][n]) for n in space.item_fields], dim=-2)
    torch.testing.assert_close(history, item_expected)


def _field_grad(embedding: FeatureEmbedding, name: str) -> torch.Tensor:
    grad = embedding.table.weight.grad
    start = embedding.offsets[name] + 1
    rows = grad[start: start + embedding.space.vocab_sizes[name] - 1]
    return torch.cat([torch.zeros_like(grad[:1]), rows])


def _mix(experts, gate_logits):
    return torch.einsum("be,beh->bh", torch.softmax(gate_logits, dim=-1), experts)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_experts_and_gates_in_one_product_match_one_product_each(batch_norm):
    torch.manual_seed(0)
    x = torch.randn(16, 10)
    moe = MixtureOfExperts(10, ["a", "b"], 3, (12, 6), batch_norm=batch_norm)
    out = moe(x)
    experts = torch.stack([e(x) for e in moe.experts], dim=1)
    for task in ("a", "b"):
        torch.testing.assert_close(out[task], _mix(experts, moe.gates[task](x)))
    per_task = {"a": torch.randn(16, 10), "b": torch.randn(16, 10)}
    out = moe(per_task)
    for task, xt in per_task.items():
        torch.testing.assert_close(out[task], _mix(torch.stack([e(xt) for e in moe.experts], 1), moe.gates[task](xt)))

    cgc = CGCLayer(10, ["a", "b"], 2, 1, (12,), with_shared_output=True, batch_norm=batch_norm)
    outputs, shared_out = cgc({"a": x, "b": x}, x)
    shared = [e(x) for e in cgc.shared_experts]
    own = {t: [e(x) for e in cgc.task_experts[t]] for t in ("a", "b")}
    for task in ("a", "b"):
        torch.testing.assert_close(outputs[task], _mix(torch.stack(own[task] + shared, 1), cgc.task_gates[task](x)))
    everything = torch.stack(own["a"] + own["b"] + shared, 1)
    torch.testing.assert_close(shared_out, _mix(everything, cgc.shared_gate(x)))


def test_batches_gathered_from_the_field_matrix_hold_each_field_column(tiny_dataset):
    split = TensorSplit(tiny_dataset.test, tiny_dataset.item_table, "item_id")
    rows = torch.tensor([5, 0, 17, 3])
    batch = split.gather(rows)
    for name, column in tiny_dataset.test.categorical.items():
        assert batch.categorical[name].tolist() == column[rows.numpy()].tolist()
    for name, column in tiny_dataset.test.dense.items():
        torch.testing.assert_close(batch.dense[name], torch.from_numpy(column[rows.numpy()]).float())
