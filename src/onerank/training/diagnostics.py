"""Gradient-conflict diagnostics: the cosine between each pair of tasks' gradients on the shared parameters.

A negative cosine means a step that helps one task hurts the other on the shared parameters (the "seesaw")."""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import Tensor

from onerank.data.batching import Batch
from onerank.models.base import MultiTaskModel
from onerank.objectives.losses import MultiTaskObjective


def task_gradients(model: MultiTaskModel, losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per task, the flattened gradient of its loss on the model's shared parameters (zeros where unused)."""
    shared = model.shared_parameters()
    out = {}
    for task, loss in losses.items():
        if not (isinstance(loss, Tensor) and loss.requires_grad):  # a task without a loss term this batch
            out[task] = torch.cat([torch.zeros_like(p).reshape(-1) for p in shared])
            continue
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        out[task] = torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, shared)
        ])
    return out


def gradient_cosines(
    model: MultiTaskModel, objective: MultiTaskObjective, batches: Iterable[Batch], device: torch.device,
    max_batches: int = 4,
) -> dict[str, float]:
    """Mean over up to ``max_batches`` batches of cos(g_j, g_k) for every task pair "j|k".

    Empty for a model without shared parameters (e.g. ``single_task``): its tasks cannot conflict."""
    if not model.shared_parameters():
        return {}
    was_training = model.training
    model.train()
    sums: dict[str, float] = {}
    count = 0
    for batch in itertools.islice(batches, max_batches):
        batch = batch.to(device)
        logits = model(batch)
        grads = task_gradients(model, objective(logits, batch, model.auxiliary_losses(batch, logits)))
        for a, b in itertools.combinations(grads, 2):
            cos = torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0, eps=1e-12)
            sums[f"{a}|{b}"] = sums.get(f"{a}|{b}", 0.0) + float(cos)
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {pair: total / max(count, 1) for pair, total in sums.items()}
