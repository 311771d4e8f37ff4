"""STEM: shared plus per-task embeddings; gates read every expert, other tasks' experts detached."""

from __future__ import annotations

import pytest
import torch

from onerank.features.space import FeatureSpace
from onerank.models import build_model
import zoo_helpers
from zoo_helpers import REAL_DATA_EPOCHS, real_dataset, train_on_tiny_dataset, train_tiny

SMALL = dict(embedding_dim=8, attention_hidden=(8,), expert_hidden=(16,), tower_hidden=(8,))


def first_batch(dataset, size=48):
    return zoo_helpers.first_batch(dataset, size)


def grad_total(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_tiny_config_trains_on_synthetic():
    train_tiny("stem")


@pytest.mark.parametrize("dataset", ["kuairand", "census"])
def test_trains_on_real_data(dataset):
    train_tiny("stem", dataset=real_dataset(dataset), epochs=REAL_DATA_EPOCHS)


def test_learns_the_hand_made_dataset(tiny_dataset):
    assert train_on_tiny_dataset("stem", tiny_dataset)["test"]["click"]["auc"] > 0.6


def test_every_task_has_its_own_embeddings(tiny_dataset):
    model = build_model("stem", FeatureSpace.from_dataset(tiny_dataset), SMALL)
    encoders = [model.shared_encoder, *(model.task_encoders[t] for t in model.tasks)]
    tables = {id(p) for e in encoders for m in e.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    assert len(tables) >= 3 and len(tables) % 3 == 0  # the same tables, once per embedding set
    assert model.gates["click"].out_features == 1 + 1 * 2  # the gate reads all experts: shared + every task's


@pytest.mark.parametrize("detach", [True, False])
def test_a_tasks_loss_reaches_only_its_own_and_the_shared_experts(tiny_dataset, detach):
    model = build_model("stem", FeatureSpace.from_dataset(tiny_dataset), {**SMALL, "detach_other_tasks": detach})
    model(first_batch(tiny_dataset))["click"].sum().backward()
    assert grad_total(model.task_encoders["click"]) > 0 and grad_total(model.task_experts["click"]) > 0
    assert grad_total(model.shared_encoder) > 0 and grad_total(model.shared_experts) > 0
    other = grad_total(model.task_encoders["buy"]) + grad_total(model.task_experts["buy"])
    assert (other == 0) == detach  # "all forward, task-specific backward"


def test_detaching_changes_gradients_not_predictions(tiny_dataset):
    space = FeatureSpace.from_dataset(tiny_dataset)
    torch.manual_seed(0)
    detached = build_model("stem", space, SMALL)
    torch.manual_seed(0)
    full = build_model("stem", space, {**SMALL, "detach_other_tasks": False})
    batch = first_batch(tiny_dataset)
    a, b = detached(batch), full(batch)
    for t in a:
        torch.testing.assert_close(a[t], b[t])


def test_private_parameters_are_not_shared(tiny_dataset):
    model = build_model("stem", FeatureSpace.from_dataset(tiny_dataset), SMALL)
    shared = {id(p) for p in model.shared_parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in shared]
    assert names and all(n.startswith(("shared_encoder.", "shared_experts.")) for n in names)
