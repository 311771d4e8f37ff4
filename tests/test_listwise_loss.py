"""The list-wise loss against a plain per-request loop (value and gradient), which requests it drops, and its learnt
temperature."""

from __future__ import annotations

import math

import pytest
import torch

from onerank.data.batching import Batch
from onerank.data.schema import TaskSpec
from onerank.objectives.losses import MultiTaskObjective, ObjectiveConfig, listwise_loss


def batch_of(sizes: list[int], labels: list[float], mask: list[bool] | None = None) -> Batch:
    """Requests of the given sizes (rows contiguous), one binary task "click"."""
    n = sum(sizes)
    request = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    y = torch.tensor(labels, dtype=torch.float32)
    m = torch.tensor(mask if mask is not None else [True] * n)
    return Batch({}, {}, {}, {"click": y}, {"click": m}, torch.zeros(n, dtype=torch.long), request)


def loop_reference(logits: torch.Tensor, batch: Batch, tau: float | torch.Tensor, reduction: str) -> torch.Tensor:
    """One request at a time, in plain Python: the definition the vectorised loss must match."""
    per_request, per_positive = [], []
    for r in batch.request.unique().tolist():
        rows = [i for i in range(batch.size) if int(batch.request[i]) == r and bool(batch.label_mask["click"][i])]
        pos = [i for i in rows if float(batch.labels["click"][i]) > 0.5]
        if not pos or len(pos) == len(rows):
            continue  # a request needs a positive and a negative
        scores = torch.stack([logits[i] for i in rows]) / tau
        log_norm = torch.logsumexp(scores, dim=0)
        terms = [-(logits[i] / tau - log_norm) for i in pos]
        per_positive += terms
        per_request.append(torch.stack(terms).mean())
    chosen = per_request if reduction == "requests" else per_positive
    return torch.stack(chosen).mean()


SIZES = [4, 1, 3, 5, 2, 4]
LABELS = [1, 0, 0, 1,   1,   0, 0, 0,   1, 1, 0, 0, 1,   1, 1,   0, 1, 0, 0]
MASK = [True, True, True, True, True, True, True, True, True, False, True, True, True, True, True,
        True, True, False, True]


@pytest.mark.parametrize("reduction", ["requests", "positives"])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_listwise_loss_matches_a_per_request_loop_in_value_and_gradient(reduction, tau):
    batch = batch_of(SIZES, LABELS, MASK)
    logits = torch.randn(batch.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fast_x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast = listwise_loss(fast_x, batch.labels["click"], batch.label_mask["click"], batch, tau, reduction)
    ref = loop_reference(ref_x, batch, tau, reduction)
    fast.backward()
    ref.backward()
    assert torch.allclose(fast, ref, atol=1e-12)
    assert torch.allclose(fast_x.grad, ref_x.grad, atol=1e-12)


def test_the_two_reductions_differ_when_requests_have_different_numbers_of_positives():
    batch = batch_of(SIZES, LABELS, MASK)
    logits = torch.randn(batch.size, generator=torch.Generator().manual_seed(0))
    args = (logits, batch.labels["click"], batch.label_mask["click"], batch, 1.0)
    assert not torch.isclose(listwise_loss(*args, "requests"), listwise_loss(*args, "positives"))


def test_dropped_requests_leak_no_gradient():
    # requests 1 (one impression), 2 (no positive), 4 (all positive) and the masked rows get exactly zero gradient
    batch = batch_of(SIZES, LABELS, MASK)
    x = torch.randn(batch.size, generator=torch.Generator().manual_seed(1)).requires_grad_()
    listwise_loss(x, batch.labels["click"], batch.label_mask["click"], batch, 1.0).backward()
    dropped = (batch.request == 1) | (batch.request == 2) | (batch.request == 4) | ~batch.label_mask["click"]
    assert torch.equal(x.grad[dropped], torch.zeros(int(dropped.sum())))
    assert bool((x.grad[~dropped] != 0).all())  # every kept candidate is pushed up or down


def test_an_all_dropped_batch_gives_a_finite_zero_connected_to_the_graph():
    # one-impression requests, an all-positive request, an all-negative one, and one whose labels are all masked
    batch = batch_of([1, 1, 3, 2, 2], [1, 0, 1, 1, 1, 0, 0, 1, 0], [True] * 7 + [False, False])
    x = torch.randn(batch.size).requires_grad_()
    loss = listwise_loss(x, batch.labels["click"], batch.label_mask["click"], batch, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    assert torch.equal(x.grad, torch.zeros(batch.size))


def test_learnt_temperature_is_stored_as_a_log_trained_and_clamped():
    tasks = [TaskSpec("click")]
    objective = MultiTaskObjective(
        tasks, ObjectiveConfig(pointwise=0.0, listwise=1.0, temperature=0.5, learn_temperature=True,
                               min_temperature=0.05),
    )
    assert [n for n, _ in objective.named_parameters()] == ["log_temperature.click"]
    assert objective.log_temperature["click"].item() == pytest.approx(math.log(0.5))
    batch = batch_of(SIZES, LABELS, MASK)
    logits = torch.randn(batch.size, generator=torch.Generator().manual_seed(2))
    loss = objective({"click": logits}, batch)["click"]
    assert torch.allclose(loss, loop_reference(logits, batch, 0.5, "requests"))
    loss.backward()
    assert objective.log_temperature["click"].grad is not None
    assert objective.log_temperature["click"].grad.abs().item() > 0
    with torch.no_grad():
        objective.log_temperature["click"].fill_(math.log(1e-4))
    assert objective.temperature("click").item() == pytest.approx(0.05)  # never below min_temperature


def test_a_fixed_temperature_adds_no_parameter_and_bad_options_are_named():
    assert list(MultiTaskObjective([TaskSpec("click")], ObjectiveConfig(listwise=1.0)).parameters()) == []
    with pytest.raises(ValueError, match="listwise_reduction"):
        MultiTaskObjective([TaskSpec("click")], ObjectiveConfig(listwise=1.0, listwise_reduction="mean"))
    with pytest.raises(ValueError, match="temperature"):
        MultiTaskObjective([TaskSpec("click")], ObjectiveConfig(listwise=1.0, temperature=0.0))
