"""Gradient-conflict diagnostics: cosines between task gradients on the shared parameters, per epoch."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import Tensor, nn

from onerank import api
from onerank.data.batching import Batch, BatchLoader, tensor_splits
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel
from onerank.objectives.losses import MultiTaskObjective
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.diagnostics import gradient_cosines, task_gradients


class OneLogit(MultiTaskModel):
    """Both tasks read the same logit of a zero-initialised linear model over the dense and embedded fields, so
    each task's gradient is sum_i (sigmoid(z_i) - y_i) dz_i/dtheta with sigmoid(z_i) = 1/2 at the start."""

    def __init__(self, space: FeatureSpace, click_only_parameter: bool = False) -> None:
        super().__init__(space, None)
        self.item = nn.Embedding(space.vocab_sizes["item_id"], 4)
        self.linear = nn.Linear(5, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        # a module's own parameters come first in named_parameters(): this one is the first shared entry
        self.click_bias = nn.Parameter(torch.zeros(())) if click_only_parameter else None

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = torch.cat([self.item(batch.categorical["item_id"]), batch.dense["price"][:, None]], dim=1)
        z = self.linear(x).squeeze(-1)
        return {"click": z if self.click_bias is None else z + self.click_bias, "buy": z}


def batches_with_labels(dataset, relation: str, n: int = 3) -> list[Batch]:
    out = []
    for batch in BatchLoader(tensor_splits(dataset)["train"], 64).epoch(0):
        click = batch.labels["click"]
        buy = click if relation == "same" else 1.0 - click
        out.append(dataclasses.replace(
            batch, labels={"click": click, "buy": buy},
            label_mask={t: torch.ones_like(click, dtype=torch.bool) for t in ("click", "buy")},
        ))
        if len(out) == n:
            return out
    return out


@pytest.mark.parametrize("relation, expected", [("same", 1.0), ("opposite", -1.0)])
def test_cosine_is_one_for_identical_and_minus_one_for_opposite_labels(tiny_dataset, relation, expected):
    model = OneLogit(FeatureSpace.from_dataset(tiny_dataset))
    objective = MultiTaskObjective(tiny_dataset.schema.tasks)
    cosines = gradient_cosines(model, objective, batches_with_labels(tiny_dataset, relation), torch.device("cpu"))
    assert set(cosines) == {"click|buy"}
    assert cosines["click|buy"] == pytest.approx(expected, abs=1e-5)
    assert all(p.grad is None for p in model.parameters())  # leaves no gradient behind for the next step


def test_task_gradients_cover_every_shared_parameter(tiny_dataset):
    model = OneLogit(FeatureSpace.from_dataset(tiny_dataset), click_only_parameter=True)
    batch = batches_with_labels(tiny_dataset, "same", 1)[0]
    losses = MultiTaskObjective(tiny_dataset.schema.tasks)(model(batch), batch)
    losses["none"] = 0.0  # a task without a loss term gets a zero gradient, not an error
    grads = task_gradients(model, losses)
    size = sum(p.numel() for p in model.shared_parameters())
    assert all(g.shape == (size,) for g in grads.values())
    assert float(grads["buy"][0]) == 0.0 and float(grads["click"][0]) != 0.0  # buy does not use click_bias
    assert float(grads["none"].abs().sum()) == 0.0


def test_trainer_logs_cosines_into_history_and_tensorboard(tiny_dataset, tmp_path):
    config = RunConfig(dataset="tiny", model="mmoe", train=TrainConfig(
        epochs=2, batch_size=128, progress=False, tensorboard=True, gradient_diagnostics=True, seed=1,
    ))
    result = api.train(config, out_dir=tmp_path, dataset=tiny_dataset)
    for record in result["history"]:
        assert set(record["gradient_cosine"]) == {"click|buy"}
        assert -1.0 <= record["gradient_cosine"]["click|buy"] <= 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["history"][0]["gradient_cosine"] == result["history"][0]["gradient_cosine"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "gradient_cosine/click|buy" in events.Tags()["scalars"]
    assert len(events.Scalars("gradient_cosine/click|buy")) == 2


def test_diagnostics_are_off_by_default(tiny_dataset):
    config = RunConfig(dataset="tiny", model="shared_bottom", train=TrainConfig(
        epochs=1, batch_size=256, progress=False, tensorboard=False,
    ))
    assert "gradient_cosine" not in api.train(config, dataset=tiny_dataset)["history"][0]


def test_a_model_without_shared_parameters_has_no_gradient_conflict(tiny_dataset):
    from onerank import api
    from onerank.training.config import RunConfig, TrainConfig

    config = RunConfig(model="single_task", train=TrainConfig(epochs=1, batch_size=128, progress=False,
                                                              gradient_diagnostics=True))
    result = api.train(config, dataset=tiny_dataset)
    assert result["history"][0]["gradient_cosine"] == {}
