"""Streaming input: the encoded train split written as many Parquet files is read back, row group by row group
through a shuffle buffer, as the same Batch objects; every row once per epoch; exact resume; automatic switch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from onerank import api, cli
from onerank.data.batching import BatchLoader, TensorSplit
from onerank.data.registry import load_dataset
from onerank.data.streaming import (
    ParquetSource, StreamingBatchLoader, save_streaming_dataset, split_nbytes, write_encoded_parquet,
)
from onerank.training import checkpoint as ckpt
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import Trainer, TrainingInterrupted


@pytest.fixture(scope="module")
def parquet_dir(tiny_dataset, tmp_path_factory):
    # 1000 rows in files of ~150 rows and row groups of ~40: 7 files, 27 row groups
    return write_encoded_parquet(tiny_dataset.train, tmp_path_factory.mktemp("stream") / "train",
                                 rows_per_file=150, row_group_rows=40)


def _loader(ds, source, **kw) -> StreamingBatchLoader:
    kw = {"batch_size": 64, "buffer_rows": 200, "seed": 1, **kw}
    return StreamingBatchLoader(source, item_table=ds.item_table, item_id=ds.schema.item_id, **kw)


def _rows(batches) -> list[tuple]:
    """Each impression as a tuple of all its values, to compare epochs as multisets of rows."""
    rows = []
    for b in batches:
        columns = [b.user] + list(b.categorical.values()) + list(b.dense.values()) + list(b.labels.values())
        columns += [h for seq in b.histories.values() for h in seq.values()]
        flat = torch.cat([c.reshape(b.size, -1).double() for c in columns], dim=1)
        rows += [tuple(r) for r in flat.tolist()]
    return sorted(rows)


def test_many_files_are_written_with_whole_requests_per_row_group(parquet_dir, tiny_dataset):
    source = ParquetSource(parquet_dir)
    assert len(list(parquet_dir.glob("part-*.parquet"))) == 7
    assert len(source.fragments) > 20 and source.num_rows == len(tiny_dataset.train)
    for fragment in source.fragments:
        request = source.read(fragment)["request"]
        assert fragment.num_rows % 5 == 0 and len(np.unique(request)) == fragment.num_rows // 5


@pytest.mark.parametrize("by_request", [False, True])
def test_an_epoch_yields_every_row_once_as_the_same_batches(parquet_dir, tiny_dataset, by_request):
    memory = BatchLoader(TensorSplit(tiny_dataset.train, tiny_dataset.item_table, tiny_dataset.schema.item_id), 64,
                         shuffle=True, by_request=by_request)
    streamed = list(_loader(tiny_dataset, parquet_dir, by_request=by_request).epoch(0))
    in_memory = list(memory.epoch(0))
    assert _rows(streamed) == _rows(in_memory)
    # the same Batch objects: fields, keys, dtypes and shapes
    a, b = streamed[0], in_memory[0]
    for name in ("categorical", "dense", "labels", "label_mask"):
        assert {k: v.dtype for k, v in getattr(a, name).items()} == {k: v.dtype for k, v in getattr(b, name).items()}
    assert a.histories["clicked"]["item_id"].shape[1:] == b.histories["clicked"]["item_id"].shape[1:]
    assert (a.request is None) == (b.request is None)
    if by_request:
        for batch in streamed:  # whole requests, contiguous, numbered 0..R-1
            assert batch.size == 5 * batch.num_requests
            assert torch.equal(batch.request, torch.arange(batch.num_requests).repeat_interleave(5))
            assert len(torch.unique(batch.user[batch.request == 0])) == 1
    # a different order than the in-memory loader, and a different one every epoch, but reproducible
    assert _rows(streamed[:1]) != _rows(in_memory[:1])
    again = list(_loader(tiny_dataset, parquet_dir, by_request=by_request).epoch(0))
    assert all(torch.equal(x.user, y.user) for x, y in zip(streamed, again))
    other = list(_loader(tiny_dataset, parquet_dir, by_request=by_request).epoch(1))
    assert not torch.equal(other[0].user, streamed[0].user)


def test_start_step_skips_exactly_the_batches_already_trained_on(parquet_dir, tiny_dataset):
    loader = _loader(tiny_dataset, parquet_dir)
    full = list(loader.epoch(2))
    tail = list(loader.epoch(2, start_step=5))
    assert len(tail) == len(full) - 5
    assert all(torch.equal(x.user, y.user) and torch.equal(x.dense["price"], y.dense["price"])
               for x, y in zip(full[5:], tail))


def test_ranks_read_disjoint_row_groups_that_cover_the_split(parquet_dir, tiny_dataset):
    ranks = [_loader(tiny_dataset, parquet_dir, rank=r, world_size=2) for r in range(2)]
    shards = ranks[0].assignment(3)
    assert shards == ranks[1].assignment(3)  # every rank computes the same deal
    assert not set(shards[0]) & set(shards[1])
    rows = [sum(f.num_rows for f in s) for s in shards]
    assert abs(rows[0] - rows[1]) <= 40
    parts = [list(r.epoch(3)) for r in ranks]
    assert all(b.size <= 32 for p in parts for b in p)  # each rank takes half of the global batch of 64
    assert _rows(parts[0] + parts[1]) == _rows(list(_loader(tiny_dataset, parquet_dir).epoch(0)))


def _config(**train) -> RunConfig:
    defaults = dict(epochs=3, batch_size=64, progress=False, patience=5, seed=7, checkpoint_every=4,
                    tensorboard=False, streaming="on", stream_buffer_rows=200)
    defaults.update(train)
    return RunConfig(dataset="tiny", model="mmoe", train=TrainConfig(**defaults))


def test_training_from_the_stream_learns_and_resumes_exactly(tiny_dataset, tmp_path):
    straight = api.train(_config(), out_dir=tmp_path / "straight", dataset=tiny_dataset)
    assert (tmp_path / "straight" / "train-parquet").is_dir()
    assert straight["test"]["click"]["auc"] > 0.55  # better than chance (0.59 in memory with this config)
    with pytest.raises(TrainingInterrupted):
        api.train(_config(), out_dir=tmp_path / "crashed", dataset=tiny_dataset, stop_after_steps=22)  # mid-epoch 2
    resumed = api.train(_config(), out_dir=tmp_path / "crashed", dataset=tiny_dataset, resume=True)
    assert resumed["best_epoch"] == straight["best_epoch"]
    for task, metrics in straight["test"].items():
        for name, value in metrics.items():
            assert resumed["test"][task][name] == pytest.approx(value, abs=1e-6), (task, name)
    a = ckpt.load(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = ckpt.load(tmp_path / "crashed" / "checkpoint.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_auto_streams_only_above_the_size_threshold(tiny_dataset, tmp_path):
    config = _config(streaming="auto").train
    assert split_nbytes(tiny_dataset.train) < 2**20
    small = _trainer(tiny_dataset, config, tmp_path / "a")
    assert not small.data.streaming and isinstance(small.train_loader, BatchLoader)
    tiny_threshold = dataclasses.replace(config, streaming_threshold_mb=split_nbytes(tiny_dataset.train) / 2**21)
    big = _trainer(tiny_dataset, tiny_threshold, tmp_path / "b")
    assert big.data.streaming and "train" not in big.data.splits and isinstance(big.train_loader, StreamingBatchLoader)


def _trainer(ds, config: TrainConfig, out) -> Trainer:
    return api.build_trainer(RunConfig(dataset="tiny", model="mmoe", train=config), ds, out_dir=out)


def test_a_dataset_saved_for_streaming_trains_from_the_command_line(tiny_dataset, tmp_path):
    directory = save_streaming_dataset(tiny_dataset, tmp_path / "tiny-encoded", rows_per_file=300,
                                       row_group_rows=50)
    ds = load_dataset("encoded", directory)
    assert len(ds.train) == 0 and ds.info["train_rows"] == len(tiny_dataset.train)
    assert len(ds.test) == len(tiny_dataset.test)
    with pytest.raises(ValueError, match="can only stream"):
        _trainer(ds, _config(streaming="off").train, tmp_path / "x")
    code = cli.main(["train", "--dataset", "encoded", "--data-dir", str(directory), "--model", "shared_bottom",
                     "--epochs", "2", "--batch-size", "64", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["click"]["count"] == len(tiny_dataset.test)


def test_export_command_writes_a_streaming_dataset(tmp_path):
    code = cli.main(["export-encoded", "--dataset", "synthetic", "--dataset-option", "num_users=60",
                     "--dataset-option", "num_items=40", "--out", str(tmp_path / "syn"), "--rows-per-file", "200"])
    assert code == 0
    assert len(list((tmp_path / "syn" / "train").glob("*.parquet"))) > 1
    assert cli.main(["train", "--dataset", "encoded", "--data-dir", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "r")]) == 2


def test_without_an_output_folder_the_stream_lives_in_a_temporary_folder(tiny_dataset):
    trainer = _trainer(tiny_dataset, _config(epochs=1).train, None)
    scratch = trainer.data.scratch
    assert trainer.data.streaming and scratch is not None and scratch.is_dir()
    trainer.fit()
    assert trainer.evaluate("test")["click"]["count"] == len(tiny_dataset.test)
    trainer.close()
    assert not scratch.exists()


def test_row_groups_are_cut_into_parts_when_ranks_outnumber_them(tiny_dataset, tmp_path):
    directory = write_encoded_parquet(tiny_dataset.train, tmp_path / "one-group", row_group_rows=10_000)
    assert len(ParquetSource(directory).fragments) == 1
    ranks = [_loader(tiny_dataset, directory, rank=r, world_size=3, by_request=True) for r in range(3)]
    parts = [list(r.epoch(0)) for r in ranks]
    assert all(len(p) > 0 for p in parts)  # every rank has data to train on
    assert _rows(parts[0] + parts[1] + parts[2]) == _rows(list(_loader(tiny_dataset, directory).epoch(0)))
    assert all(b.size == 5 * b.num_requests for p in parts for b in p)  # parts hold whole requests


def test_a_stream_copy_is_reused_only_for_the_same_data(tiny_dataset, tmp_path):
    """Two datasets of the same size with other labels (as synthetic data with another task_correlation): the copy
    in OUT/train-parquet is keyed by the data, never by the row count, so the second one is written again."""
    from onerank.data.dataset import EncodedSplit
    from onerank.data.streaming import stream_source_for

    arrays = tiny_dataset.train.arrays()
    flipped = dataclasses.replace(
        tiny_dataset, info=dict(tiny_dataset.info),
        train=EncodedSplit.from_arrays({**arrays, "labels.click": 1 - arrays["labels.click"]}),
    )
    first = stream_source_for(tiny_dataset, "on", 0, tmp_path)
    written = (first / "_onerank_parquet.json").stat().st_mtime_ns
    assert stream_source_for(tiny_dataset, "on", 0, tmp_path) == first  # same data: reused as it is
    assert (first / "_onerank_parquet.json").stat().st_mtime_ns == written
    second = stream_source_for(flipped, "on", 0, tmp_path)
    labels = np.concatenate([ParquetSource(second).read(f)["labels.click"] for f in ParquetSource(second).fragments])
    np.testing.assert_array_equal(np.sort(labels), np.sort(flipped.train.labels["click"]))
    assert labels.sum() != tiny_dataset.train.labels["click"].sum()
    # a dataset from the cache is keyed by its cache key
    keyed = dataclasses.replace(tiny_dataset, info={**tiny_dataset.info, "cache_key": "abc"})
    stream_source_for(keyed, "on", 0, tmp_path)
    assert json.loads((first / "_onerank_parquet.json").read_text())["key"] == "cache:abc"
