"""Helpers of the model-zoo tests: each model's tiny configuration, small slices of the real datasets, a tiny run."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from conftest import shared_data
from onerank import api
from onerank.data.batching import Batch, BatchLoader, tensor_splits
from onerank.data.dataset import EncodedDataset, EncodedSplit
from onerank.data.registry import load_dataset
from onerank.training.config import RunConfig, TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def first_batch(dataset: EncodedDataset, size: int) -> Batch:
    """The first ``size`` train impressions of ``dataset`` as one batch."""
    return next(iter(BatchLoader(tensor_splits(dataset)["train"], size)))


def tiny_config(model: str, **overrides: Any) -> RunConfig:
    """``configs/models/<model>_tiny.yaml``, the configuration CI trains end to end, with ``overrides`` applied."""
    config = RunConfig.from_yaml(CONFIGS / f"{model}_tiny.yaml")
    assert config.model == model
    return dataclasses.replace(config, **overrides)


def _sample_split(split: EncodedSplit, n: int, rng: np.random.Generator) -> EncodedSplit:
    """``n`` random rows in their original order (request indices renumbered, so requests stay contiguous)."""
    rows = np.sort(rng.choice(len(split), size=min(n, len(split)), replace=False))
    arrays = {k: v[rows] for k, v in split.arrays().items()}
    if "request" in arrays:
        arrays["request"] = pd.factorize(arrays["request"])[0].astype(np.int64)
    return EncodedSplit.from_arrays(arrays)


def sample_dataset(ds: EncodedDataset, train_rows: int = 1500, eval_rows: int = 600, seed: int = 0) -> EncodedDataset:
    rng = np.random.default_rng(seed)
    return dataclasses.replace(
        ds,
        train=_sample_split(ds.train, train_rows, rng),
        valid=_sample_split(ds.valid, eval_rows, rng),
        test=_sample_split(ds.test, eval_rows, rng),
    )


# A real-data slice has a fifth of the tiny synthetic data's rows: three epochs give its runs enough steps to learn.
REAL_DATA_EPOCHS = 3


@functools.lru_cache(maxsize=None)
def real_dataset(name: str) -> EncodedDataset:
    """A small random slice of KuaiRand-Pure or Census-Income (skips when ../shared/data lacks the files).

    Loaded once per test session; the encoded full dataset is cached on disk (``ONERANK_CACHE``).
    """
    if name == "kuairand":
        ds = load_dataset("kuairand", str(shared_data("kuairand-pure")), history_len=8)
    elif name == "census":
        ds = load_dataset("census", str(shared_data("census-income")))
    else:
        raise ValueError(name)
    return sample_dataset(ds)


@functools.lru_cache(maxsize=None)
def _synthetic(options: str) -> EncodedDataset:
    return load_dataset("synthetic", **json.loads(options))


def synthetic_dataset(model: str) -> EncodedDataset:
    """The synthetic dataset of ``model``'s tiny configuration (loaded once per session for equal options)."""
    config = tiny_config(model)
    assert config.dataset == "synthetic"
    return _synthetic(json.dumps(config.dataset_options, sort_keys=True))


def learned(dataset: EncodedDataset, valid: dict[str, dict[str, float]], min_class: int = 20) -> float:
    """How far the validation AUCs of a run lie above chance, in standard errors: each task's (AUC - 0.5) over the
    AUC's standard error at chance, sqrt((P + N + 1) / (12 P N)) for P positives and N negatives, pooled over the
    tasks with at least ``min_class`` of each (Stouffer's sum / sqrt(K)). A model that learned nothing scores about
    N(0, 1); rarer tasks (a handful of likes) are left out, their AUC is noise."""
    split = dataset.split("valid")
    scores = []
    for task, metrics in valid.items():
        labels = split.labels[task][split.label_mask[task]]
        positives = int((labels > 0.5).sum())
        negatives = len(labels) - positives
        if "auc" in metrics and min(positives, negatives) >= min_class:
            scores.append((metrics["auc"] - 0.5) / np.sqrt((positives + negatives + 1) / (12 * positives * negatives)))
    assert scores, f"no task of {dataset.name} has {min_class} validation positives and negatives"
    return float(np.sum(scores) / np.sqrt(len(scores)))


# A tiny run must leave chance, as the first-epoch benchmark asks of every model (benchmarks/first_epoch.py): its
# validation AUCs at least this many standard errors above 0.5 (a model at chance gets there once in about 160 runs).
# The zoo scored 5 to 7 on the tiny configurations' synthetic data when this test was written.
MIN_LEARNED = 2.5


def train_tiny(model: str, dataset: EncodedDataset | None = None, epochs: int | None = None, **overrides: Any) -> dict:
    """One tiny training run (on the tiny configuration's synthetic data unless ``dataset`` is given, for ``epochs``
    instead of the configuration's); checks it produced finite metrics for every task and learned (``learned`` of its
    best epoch's validation AUCs)."""
    dataset = dataset if dataset is not None else synthetic_dataset(model)
    config = tiny_config(model, **overrides)
    if epochs is not None:
        config.train = dataclasses.replace(config.train, epochs=epochs, patience=epochs)
    result = api.train(config, dataset=dataset)
    assert set(result["test"]) == set(dataset.schema.task_names)
    for task, metrics in result["test"].items():
        values = [v for k, v in metrics.items() if k in ("logloss", "mse")]
        assert values and all(np.isfinite(values)), (model, task, metrics)
    aucs = {task: round(metrics["auc"], 4) for task, metrics in result["valid"].items() if "auc" in metrics}
    assert learned(dataset, result["valid"]) > MIN_LEARNED, (model, dataset.name, aucs)
    return result


def train_on_tiny_dataset(model: str, dataset: EncodedDataset, epochs: int = 4, **train: Any) -> dict:
    """``model`` with its tiny options on the hand-made dataset of conftest (learnable in a few epochs)."""
    options = dict(epochs=epochs, batch_size=64, lr=3e-3, progress=False, tensorboard=False, patience=5, seed=7)
    options.update(train)
    config = RunConfig(dataset=dataset.name, model=model, model_options=tiny_config(model).model_options,
                       train=TrainConfig(**options))
    return api.train(config, dataset=dataset)
