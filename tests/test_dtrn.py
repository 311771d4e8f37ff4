"""DTRN: hypernetwork-generated task-specific interests, per-task SENet refinement, towers / MMoE / PLE heads."""

from __future__ import annotations

import math

import pytest
import torch

from onerank.cli import main
from onerank.features.space import FeatureSpace
from onerank.models import build_model
from onerank.nn.hypernetwork import HyperTargetAttention
from onerank.nn.senet import SENetGate
import zoo_helpers
from zoo_helpers import REAL_DATA_EPOCHS, CONFIGS, real_dataset, train_on_tiny_dataset, train_tiny

MODELS = ["dtrn", "dtrn_mmoe", "dtrn_ple"]
SMALL = dict(embedding_dim=8, hyper_hidden=(16,), attention_rank=2, task_embedding_dim=4, behaviour_embedding_dim=4,
             tower_hidden=(8,))


def first_batch(dataset, size=48):
    return zoo_helpers.first_batch(dataset, size)


@pytest.mark.parametrize("model", MODELS)
def test_tiny_config_trains_on_synthetic(model):
    train_tiny(model)


@pytest.mark.parametrize("model", MODELS)
def test_learns_the_hand_made_dataset(model, tiny_dataset):
    assert train_on_tiny_dataset(model, tiny_dataset)["test"]["click"]["auc"] > 0.6


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", ["kuairand", "census"])
def test_trains_on_real_data(model, dataset):
    # Census-Income has no behaviour sequences: the interests are absent and only the refinement runs.
    train_tiny(model, dataset=real_dataset(dataset), epochs=REAL_DATA_EPOCHS)


def test_without_sequences_only_the_refinement_runs():
    ds = real_dataset("census")
    model = build_model("dtrn", FeatureSpace.from_dataset(ds), SMALL)
    assert model.bottom.interest is None
    space = model.space
    assert model.bottom.num_fields == len(space.categorical_fields) + len(space.dense_fields)
    out = model(first_batch(ds))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_each_task_attends_with_its_own_generated_unit(tiny_dataset):
    model = build_model("dtrn", FeatureSpace.from_dataset(tiny_dataset), SMALL)
    u, v = model.bottom.interest.generate()
    assert u.shape == (2, 1, 2 * 8, 2)  # [tasks, behaviours, item width (2 item fields x 8), rank]
    assert not torch.allclose(u[0], u[1])
    reps = model.bottom(first_batch(tiny_dataset))
    assert not torch.allclose(reps["click"], reps["buy"])
    # changing one task's embedding changes only that task's bottom representation
    with torch.no_grad():
        model.bottom.interest.task_embeddings["buy"].vector.add_(1.0)
    after = model.bottom(first_batch(tiny_dataset))
    assert torch.allclose(after["click"], reps["click"])
    assert not torch.allclose(after["buy"], reps["buy"])


def test_hyper_attention_matches_a_per_pair_reference():
    torch.manual_seed(0)
    attention = HyperTargetAttention(6, ["a", "b"], ["s1", "s2"], hidden=(8,), rank=3)
    candidate = torch.randn(4, 6)
    histories = {s: (torch.randn(4, 5, 6), torch.rand(4, 5) > 0.3) for s in ("s1", "s2")}
    histories["s2"][1][2] = False  # one row with an empty history
    out = attention(candidate, histories)
    u, v = attention.generate()
    for k in range(2):
        for s, name in enumerate(("s1", "s2")):
            keys, mask = histories[name]
            for row in range(4):
                w = u[k, s] @ v[k, s].T  # the generated bilinear form W = U V^T
                scores = keys[row] @ w.T @ candidate[row] / math.sqrt(3)
                valid = mask[row]
                expected = torch.zeros(6)
                if valid.any():
                    expected = torch.softmax(scores[valid], 0) @ keys[row][valid]
                torch.testing.assert_close(out[row, k, s], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_empty_histories_give_zero_interests_and_finite_gradients(tiny_dataset, model_name):
    model = build_model(model_name, FeatureSpace.from_dataset(tiny_dataset), SMALL)
    batch = first_batch(tiny_dataset)
    for codes in batch.histories.values():
        for field in codes:
            codes[field] = torch.zeros_like(codes[field])
    interests = model.bottom._interests(batch, model.bottom.embedding.candidate(batch).flatten(1))
    assert all(x.detach().abs().max().item() == 0.0 for x in interests.values())
    out = model(batch)
    sum(o.sum() for o in out.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_senet_gate_rescales_each_field_and_starts_as_identity():
    gate = SENetGate(num_fields=5, reduction=2, scale=2.0)
    fields = torch.randn(3, 5, 4)
    g = gate.gates(fields)
    assert g.shape == (3, 5) and bool(((g > 0) & (g < 2)).all())
    torch.testing.assert_close(gate(fields), fields * g.unsqueeze(-1))
    with torch.no_grad():  # an excitation that outputs 0 gives gate 2 * sigmoid(0) = 1: the identity
        gate.excitation[-1].weight.zero_()
        gate.excitation[-1].bias.zero_()
    torch.testing.assert_close(gate(fields), fields)


def test_heads_read_each_tasks_own_representation(tiny_dataset):
    model = build_model("dtrn_mmoe", FeatureSpace.from_dataset(tiny_dataset), {**SMALL, "num_experts": 2})
    seen = {}
    model.head.register_forward_hook(lambda module, args, output: seen.update(inputs=args[0]))
    model(first_batch(tiny_dataset))
    assert isinstance(seen["inputs"], dict) and set(seen["inputs"]) == {"click", "buy"}
    assert not torch.allclose(seen["inputs"]["click"], seen["inputs"]["buy"])


@pytest.mark.parametrize("model_name", ["dtrn", "dtrn_mmoe"])
def test_private_parameters_only_get_their_own_tasks_gradient(tiny_dataset, model_name):
    model = build_model(model_name, FeatureSpace.from_dataset(tiny_dataset), SMALL)
    prefixes = model.task_parameter_prefixes()
    batch = first_batch(tiny_dataset)
    for task in model.tasks:
        model.zero_grad(set_to_none=True)
        model(batch)[task].sum().backward()
        for other in model.tasks:
            own = [
                (n, p) for n, p in model.named_parameters() if any(n.startswith(x) for x in prefixes[other])
            ]
            assert own, other
            touched = [n for n, p in own if p.grad is not None and float(p.grad.abs().max()) > 0]
            assert bool(touched) == (other == task), (task, other, touched)
    shared = {id(p) for p in model.shared_parameters()}
    assert not any(id(p) in shared for n, p in model.named_parameters() if "refine." in n or "task_embeddings" in n)


def test_ablation_switches(tiny_dataset):
    space = FeatureSpace.from_dataset(tiny_dataset)
    shared_interest = build_model("dtrn", space, {**SMALL, "task_interest": False, "refinement": False})
    reps = shared_interest.bottom(first_batch(tiny_dataset))
    torch.testing.assert_close(reps["click"], reps["buy"])  # nothing task-specific is left in the bottom
    no_histories = build_model("dtrn", space, {**SMALL, "use_histories": False})
    assert no_histories.bottom.interest is None


def test_compare_runs_the_dtrn_family_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    code = main(["compare", "--config", str(CONFIGS / "dtrn_tiny.yaml"), "--models", "dtrn,dtrn_mmoe,dtrn_ple",
                 "--model-option", "dtrn_ple.num_levels=2", "--model-option", "dtrn.attention_rank=2",
                 "--output", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert all(name in table for name in MODELS)
