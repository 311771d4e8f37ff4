"""Hashed ids (``hash_buckets``): codes without an in-memory vocabulary, the same in every process, a fixed table
whatever the number of ids, collisions accounted for by the loader; with the fused table and with TorchRec tables."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from onerank import api
from onerank.data.encoding import Encoders, HashedVocabulary
from onerank.data.registry import load_dataset
from onerank.data.schema import SchemaError
from onerank.features import tables
from onerank.training.config import RunConfig, TrainConfig

SMALL = dict(num_users=60, num_items=50, history_len=4, history_requests=2.0)


def test_codes_are_a_stable_hash_not_pythons_salted_one():
    ids = np.array([12345, 7, 10**9 + 3])
    names = np.array(["a", "item-42"], dtype=object)
    # pinned: a change of hash would silently re-map every trained table
    assert HashedVocabulary(1000).encode(ids).tolist() == [875, 606, 288]
    assert HashedVocabulary(1000, "str").encode(names).tolist() == [506, 477]
    # the same in another process with another string-hash salt
    code = ("import numpy as np; from onerank.data.encoding import HashedVocabulary; "
            "print(HashedVocabulary(1000, 'str').encode(np.array(['a', 'item-42'], dtype=object)).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == "[506, 477]"


def test_a_billion_id_space_costs_a_fixed_table_and_collisions_are_counted():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10**9, 20_000)
    vocab = HashedVocabulary(4096)
    codes = vocab.encode(ids)
    assert len(vocab) == 4098 and codes.min() >= 2 and codes.max() < 4098
    report = vocab.collisions(ids)
    distinct = len(np.unique(ids))
    occupied = len(np.unique(codes))
    assert report == {"buckets": 4096, "distinct_ids": distinct, "occupied_buckets": occupied,
                      "collision_rate": round(1 - occupied / distinct, 6)}
    # ~20k ids in 4096 buckets: nearly every bucket is taken and most ids share one
    assert occupied > 4000 and report["collision_rate"] > 0.7
    # as a checkpoint holds it
    state = Encoders(vocabularies={"item": vocab}).state()
    back = Encoders.from_state(state).vocabularies["item"]
    assert isinstance(back, HashedVocabulary) and np.array_equal(back.encode(ids), codes)


def test_a_hashed_dataset_is_keyed_by_its_buckets_reports_collisions_and_trains(tmp_path):
    plain = load_dataset("synthetic", cache_root=tmp_path, **SMALL)
    hashed = load_dataset("synthetic", cache_root=tmp_path, hash_buckets={"item_id": 32, "user_id": 16}, **SMALL)
    again = load_dataset("synthetic", cache_root=tmp_path, hash_buckets={"item_id": 32, "user_id": 16}, **SMALL)
    assert hashed.info["cache_key"] != plain.info["cache_key"] and again.info["cache_hit"]
    assert hashed.vocab_sizes["item_id"] == 34 and hashed.vocab_sizes["user_id"] == 18
    assert hashed.vocab_sizes["category"] == plain.vocab_sizes["category"]
    report = hashed.info["hashing"]["item_id"]
    assert report["buckets"] == 32 and report["distinct_ids"] >= 32 and 0 < report["collision_rate"] < 1
    # histories and the item table use the same hashed codes as the candidates
    assert hashed.train.histories["clicked"].max() < 34
    assert len(hashed.item_table["category"]) == 34
    with pytest.raises(SchemaError, match="not categorical fields"):
        load_dataset("synthetic", cache_root=tmp_path, hash_buckets={"nope": 8}, **SMALL)

    backends = ["fused"] + (["torchrec"] if tables.torchrec_available() else [])
    results = {}
    for backend in backends:
        train = TrainConfig(epochs=1, batch_size=256, progress=False, tensorboard=False, device="cpu",
                            embedding_tables=backend, embedding_optimizer="adagrad", grad_clip=None)
        results[backend] = api.train(RunConfig(dataset="synthetic", model="mmoe", train=train), dataset=hashed)["test"]
    for backend, result in results.items():
        assert result["click"]["auc"] == pytest.approx(results["fused"]["click"]["auc"], abs=1e-5), backend


def test_hashing_and_min_count_exclude_each_other():
    from onerank.data.schema import CategoricalField, Schema, TaskSpec

    with pytest.raises(SchemaError, match="min_count needs a vocabulary"):
        Schema(categorical=[CategoricalField("item", min_count=3)], tasks=[TaskSpec("click")]).with_hashing(
            {"item": 10})


def test_a_hashed_checkpoint_encodes_raw_request_ids_as_training_did(tmp_path):
    from onerank.features.space import FeatureSpace
    from onerank.serving.request import RequestEncoder

    ds = load_dataset("synthetic", cache_root=tmp_path, hash_buckets={"item_id": 32}, **SMALL)
    encoder = RequestEncoder(FeatureSpace.from_dataset(ds), ds.encoders, ds.item_table)
    raw = pd.Series([3, 17, 10**12])
    assert encoder._codes("item_id", raw.tolist(), ("candidates",)).tolist() == \
        ds.encoders.vocabularies["item_id"].encode(raw.to_numpy()).tolist()
