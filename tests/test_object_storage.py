"""Streaming from object storage: the encoded Parquet train split read through a URI (``file://`` here, as ``s3://`` or
``gs://`` would be; ``memory://`` through fsspec) with batches decoded ahead by a thread gives exactly the batches of
local streaming without prefetch."""

from __future__ import annotations

import itertools

import fsspec
import numpy as np
import pytest

from onerank import api
from onerank.data.streaming import (
    ParquetSource, StreamingBatchLoader, ahead, load_streaming_dataset, save_streaming_dataset, write_encoded_parquet,
)
from onerank.training.config import RunConfig, TrainConfig


def _batches(loader: StreamingBatchLoader, epoch: int) -> list[dict]:
    return [{"categorical": {k: v.numpy().copy() for k, v in b.categorical.items()},
             "labels": {k: v.numpy().copy() for k, v in b.labels.items()},
             "histories": {s: {k: v.numpy().copy() for k, v in h.items()} for s, h in b.histories.items()}}
            for b in loader.epoch(epoch)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for group in ("categorical", "labels"):
            for key in x[group]:
                assert np.array_equal(x[group][key], y[group][key]), (group, key)
        for seq in x["histories"]:
            for key in x["histories"][seq]:
                assert np.array_equal(x["histories"][seq][key], y["histories"][seq][key])


@pytest.mark.parametrize("by_request", [False, True])
def test_a_uri_with_prefetch_streams_the_batches_of_a_local_folder(tiny_dataset, tmp_path, by_request):
    folder = write_encoded_parquet(tiny_dataset.train, tmp_path / "train", rows_per_file=300, row_group_rows=100)
    common = dict(batch_size=64, item_table=tiny_dataset.item_table, item_id="item_id", seed=3, by_request=by_request,
                  buffer_rows=256)
    local = StreamingBatchLoader(folder, prefetch=0, **common)
    remote = StreamingBatchLoader(f"file://{folder}", prefetch=3, **common)
    assert isinstance(remote.source.fragments[0].path, str) and remote.source.num_rows == local.source.num_rows
    for epoch in (0, 1):
        _assert_same(_batches(local, epoch), _batches(remote, epoch))
    # any fsspec file system: here its in-memory one
    memory = fsspec.filesystem("memory")
    for path in sorted(folder.glob("*.parquet")):
        memory.pipe(f"/bucket/train/{path.name}", path.read_bytes())
    in_memory = StreamingBatchLoader("memory://bucket/train", prefetch=2, **common)
    _assert_same(_batches(local, 0), _batches(in_memory, 0))


def test_prefetch_keeps_order_raises_errors_and_stops_with_its_consumer():
    assert list(ahead(iter(range(50)), 3)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("bad row group")

    with pytest.raises(RuntimeError, match="bad row group"):
        list(ahead(failing(), 2))
    produced = []

    def counting():
        for i in itertools.count():
            produced.append(i)
            yield i

    stream = ahead(counting(), 2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # the consumer stops: the thread stops too, a few items ahead at most
    count = len(produced)
    assert count <= 3 + 2 + 1
    assert len(produced) == count


def test_training_from_a_dataset_uri_matches_the_local_folder(tiny_dataset, tmp_path):
    save_streaming_dataset(tiny_dataset, tmp_path / "data", rows_per_file=400, row_group_rows=100)
    uri = f"file://{tmp_path / 'data'}"
    remote = load_streaming_dataset(uri, cache_root=tmp_path / "cache")
    assert remote.info["train_parquet"] == f"{uri}/train"
    assert any((tmp_path / "cache").glob("remote-encoded-*/manifest.json"))  # encoded/ copied to the local cache
    assert ParquetSource(remote.info["train_parquet"]).num_rows == len(tiny_dataset.train)
    results = []
    for data_dir in (str(tmp_path / "data"), uri):
        train = TrainConfig(epochs=1, batch_size=64, progress=False, tensorboard=False, stream_buffer_rows=256,
                            stream_prefetch=2 if data_dir == uri else 0)
        config = RunConfig(dataset="encoded", data_dir=data_dir, cache_dir=str(tmp_path / "cache"), model="mmoe",
                           model_options={"use_histories": False}, train=train)
        results.append(api.train(config)["test"])
    assert results[0] == results[1]
