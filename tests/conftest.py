"""Shared fixtures: a tiny hand-made dataset with histories, requests and a task space, and the shared data path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from onerank.data import (
    CategoricalField, DenseField, RaggedHistory, RawDataset, RawSplit, Schema, SequenceField, TaskSpec,
)
from onerank.data.dataset import encode_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two cores are shared by the whole suite: one intra-op thread per test process keeps runs predictable.
torch.set_num_threads(1)
os.environ.setdefault("ONERANK_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "test-datasets"))


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared dataset {path} is absent (CI provides ../shared/data)")
    return path


def tiny_schema() -> Schema:
    return Schema(
        categorical=[
            CategoricalField("user_id", "user"),
            CategoricalField("item_id", "item"),
            CategoricalField("category", "item"),
            CategoricalField("hour", "context"),
        ],
        dense=[DenseField("price", group="item", log1p=True)],
        sequences=[SequenceField("clicked", max_len=6)],
        tasks=[TaskSpec("click"), TaskSpec("buy", space="click")],
        item_id="item_id",
        user_id="user_id",
        timestamp="time",
    )


def tiny_split(n_requests: int, seed: int, per_request: int = 5) -> RawSplit:
    """Labels depend on a user taste and on the item category, so models can learn something."""
    rng = np.random.default_rng(seed)
    n = n_requests * per_request
    user = np.repeat(rng.integers(0, 40, n_requests), per_request)
    item = rng.integers(0, 60, n)
    taste = (user % 3) == (item % 3)
    click = (rng.random(n) < 0.1 + 0.45 * (item % 6 < 2) + 0.25 * taste).astype(np.int64)
    buy = click * (rng.random(n) < np.where(item % 2 == 0, 0.5, 0.1)).astype(np.int64)
    table = pd.DataFrame({
        "user_id": user, "item_id": item, "category": item % 6, "hour": rng.integers(0, 24, n),
        "price": rng.gamma(2.0, 10.0, n), "click": click, "buy": buy, "time": np.arange(n) + seed * 10_000,
    })
    lengths = rng.integers(0, 8, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    history = RaggedHistory(values=(rng.integers(0, 20, lengths.sum()) * 3 + 0), offsets=offsets)
    return RawSplit(table=table, histories={"clicked": history}, request=np.repeat(np.arange(n_requests), per_request))


def tiny_raw(n_train_requests: int = 200) -> RawDataset:
    items = pd.DataFrame({"item_id": np.arange(60), "category": np.arange(60) % 6})
    return RawDataset(
        "tiny", tiny_schema(), tiny_split(n_train_requests, 1), tiny_split(60, 2), tiny_split(60, 3), item_table=items
    )


@pytest.fixture(scope="session")
def tiny_dataset():
    return encode_dataset(tiny_raw())


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset, tmp_path_factory):
    """``tiny_checkpoint(model_name) -> checkpoint.pt`` of the model trained one epoch on the tiny dataset (cached)."""
    from onerank import api
    from onerank.training.config import RunConfig, TrainConfig

    made: dict[str, Path] = {}

    def make(model: str) -> Path:
        if model not in made:
            out = tmp_path_factory.mktemp(f"checkpoint-{model}")
            config = RunConfig(model=model, train=TrainConfig(epochs=1, batch_size=256, progress=False,
                                                              tensorboard=False))
            api.train(config, out_dir=out, dataset=tiny_dataset)
            made[model] = out / "checkpoint.pt"
        return made[model]

    return make
