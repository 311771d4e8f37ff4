"""Output biases: every model exposes one per task, the training set-up starts them at the training split's base
rates (``train.bias_init``), and they, like every bias, norm gain and OneRank's a_k / b_k, get no weight decay."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from onerank import api
from onerank.data.batching import BatchLoader, tensor_splits
from onerank.features.space import FeatureSpace
from onerank.models.base import build_model, model_names
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import resolve_bias_init


def config(model: str = "mmoe", **train) -> RunConfig:
    return RunConfig(model=model, train=TrainConfig(epochs=1, batch_size=256, progress=False, tensorboard=False,
                                                    **train))


def base_rate_logits(split) -> dict[str, float]:
    out = {}
    for task, y in split.labels.items():
        y = y[split.label_mask[task]]
        rate = ((y > 0.5).sum() + 0.5) / (len(y) + 1.0)
        out[task] = math.log(rate / (1 - rate))
    return out


@pytest.fixture(scope="module")
def batch(tiny_dataset):
    return next(iter(BatchLoader(tensor_splits(tiny_dataset)["train"], 64, by_request=True)))


@pytest.mark.parametrize("name", model_names())
def test_every_model_exposes_one_output_bias_per_task_that_shifts_its_logit(tiny_dataset, batch, name):
    torch.manual_seed(0)
    model = build_model(name, FeatureSpace.from_dataset(tiny_dataset)).eval()
    biases = model.output_biases()
    assert sorted(biases) == sorted(model.tasks)
    assert all(b.numel() == 1 and b.requires_grad for b in biases.values())
    if name in ("esmm", "heroes"):
        # funnel outputs are products of step probabilities (see the next test); HEROES' click is also its gate
        return
    before = model(batch)
    with torch.no_grad():
        biases["click"].add_(0.7)
    after = model(batch)
    assert torch.allclose(after["click"] - before["click"], torch.full_like(before["click"], 0.7), atol=1e-5)
    assert torch.allclose(after["buy"], before["buy"])


def test_esmm_starts_each_funnel_step_so_that_its_products_equal_the_targets(tiny_dataset, batch):
    model = build_model("esmm", FeatureSpace.from_dataset(tiny_dataset)).eval()
    with torch.no_grad():
        for tower in model.towers.towers.values():
            tower.net[-1].weight.zero_()  # outputs = biases alone
    targets = {"click": math.log(0.3 / 0.7), "buy": math.log(0.4 / 0.6)}
    model.init_output_biases(targets)
    probs = model.predict(batch)
    # buy is defined in click's space (conditional labels), so its output is the conditional p(buy | click)
    assert torch.allclose(probs["click"], torch.tensor(0.3), atol=1e-6)
    assert torch.allclose(probs["buy"], torch.tensor(0.4), atol=1e-6)


@pytest.mark.parametrize("name", ["mmoe", "single_task", "aitm", "onerank"])
def test_auto_bias_init_uses_the_training_split_base_rates(tiny_dataset, name):
    expected = base_rate_logits(tiny_dataset.train)
    assert expected != pytest.approx(base_rate_logits(tiny_dataset.valid))  # so the test can tell the splits apart
    trainer = api.build_trainer(config(name), tiny_dataset)
    got = {t: b.item() for t, b in trainer.model.output_biases().items()}
    assert got == pytest.approx(expected, abs=1e-6)


def test_streamed_training_split_gives_the_same_base_rates(tiny_dataset, tmp_path):
    streamed = api.build_trainer(config(streaming="on", stream_buffer_rows=128), tiny_dataset, out_dir=tmp_path)
    try:
        assert streamed.data.streaming
        got = {t: b.item() for t, b in streamed.model.output_biases().items()}
    finally:
        streamed.close()
    assert got == pytest.approx(base_rate_logits(tiny_dataset.train), abs=1e-6)


def test_zero_and_explicit_bias_init(tiny_dataset):
    zero = api.build_trainer(config(bias_init="zero"), tiny_dataset)
    assert all(b.item() == 0.0 for b in zero.model.output_biases().values())
    listed = api.build_trainer(config(bias_init=[-1.0, 2.0]), tiny_dataset)
    assert {t: b.item() for t, b in listed.model.output_biases().items()} == {"click": -1.0, "buy": 2.0}
    mapped = api.build_trainer(config(bias_init={"buy": 0.5}), tiny_dataset)
    assert mapped.model.output_biases()["buy"].item() == 0.5


@pytest.mark.parametrize("value, message", [
    ("median", "must be 'auto', 'zero'"),
    ([1.0], "1 values for 2 tasks"),
    ({"like": 1.0}, "unknown tasks"),
    ({"click": float("nan")}, "finite number"),
])
def test_bad_bias_init_is_named(tiny_dataset, value, message):
    with pytest.raises(ValueError, match=message):
        resolve_bias_init(value, tiny_dataset.schema.tasks, lambda: (tiny_dataset.train.labels,
                                                                      tiny_dataset.train.label_mask))


def test_a_task_without_valid_training_labels_starts_at_zero_and_regression_at_the_mean(tiny_dataset):
    tasks = [dataclasses.replace(tiny_dataset.schema.tasks[0], kind="regression"), tiny_dataset.schema.tasks[1]]
    labels = {"click": np.array([1.0, 3.0, 100.0]), "buy": np.array([1.0, 0.0, 1.0])}
    masks = {"click": np.array([True, True, False]), "buy": np.zeros(3, dtype=bool)}
    assert resolve_bias_init("auto", tasks, lambda: (labels, masks)) == {"click": 2.0, "buy": 0.0}


def test_no_weight_decay_on_biases_norms_or_onerank_scales(tiny_dataset):
    trainer = api.build_trainer(config("onerank", weight_decay=0.1), tiny_dataset)
    decay_of = {id(p): g["weight_decay"] for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    for t in trainer.model.tasks:
        assert decay_of[id(named[f"channels.{t}.scale"])] == 0.0  # a_k
        assert decay_of[id(named[f"channels.{t}.bias"])] == 0.0  # b_k
        assert decay_of[id(named[f"channels.{t}.query.weight"])] == 0.1
    assert decay_of[id(named["encoder.norm.weight"])] == 0.0
    assert decay_of[id(named["tokenizer.embedding.table.weight"])] == 0.0
    assert len(decay_of) == len(named)  # every parameter is optimised exactly once
