"""The item graph encoder (features/item_graph.py), the item vector plug-in (features/item_vectors.py), the cold-start
protocol (benchmarking/cold_start.py) and serving of items added after training (serving/item_refresh.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

from conftest import tiny_raw  # noqa: E402

from onerank import api  # noqa: E402
from onerank.benchmarking.cold_start import cold_rows, cold_split, refresh_items  # noqa: E402
from onerank.data.batching import TensorSplit  # noqa: E402
from onerank.data.dataset import encode_dataset  # noqa: E402
from onerank.data.encoding import OOV  # noqa: E402
from onerank.features.embedding import FeatureEmbedding  # noqa: E402
from onerank.features.item_graph import (  # noqa: E402
    ItemEncoderConfig, ItemGraphConfig, ItemLabels, build_item_graph, co_engagements, engagement_buckets, pretrain,
    save_encoder,
)
from onerank.features.item_vectors import ItemVectorSpec  # noqa: E402
from onerank.features.space import FeatureSpace  # noqa: E402
from onerank.models.base import build_model  # noqa: E402
from onerank.training.config import RunConfig, TrainConfig  # noqa: E402

INPUTS = ("category",)


def graph_of(ds, max_neighbours: int = 6):
    V = ds.vocab_sizes["item_id"]
    return build_item_graph(ds.train, ds.item_table, "item_id", V, INPUTS, ItemGraphConfig(max_neighbours=max_neighbours))


@pytest.fixture(scope="module")
def trained(tiny_dataset):
    graph = graph_of(tiny_dataset)
    labels = ItemLabels({"rate_click": engagement_buckets(tiny_dataset.train, "item_id", "click", graph.num_nodes)})
    config = ItemEncoderConfig(dim=8, hidden=16, field_dim=4, epochs=2, batch_pairs=256)
    fit = pretrain(graph, [tiny_dataset.vocab_sizes[f] for f in INPUTS], labels, config)
    return graph, fit.encoder


def test_the_training_graph_holds_no_edge_from_valid_or_test_time(tiny_dataset):
    graph = graph_of(tiny_dataset)
    assert graph.cutoff is not None and graph.cutoff < tiny_dataset.valid.time.min()
    train_pairs = {tuple(p) for p in co_engagements(tiny_dataset.train, "item_id", ("click",), 5)[0].tolist()}
    later = set()
    for split in (tiny_dataset.valid, tiny_dataset.test):
        later |= {tuple(p) for p in co_engagements(split, "item_id", ("click",), 5)[0].tolist()}
    edges = {tuple(p) for p in graph.pairs.tolist()}
    assert edges == train_pairs
    assert later - train_pairs, "the test is void: valid / test hold no pair of their own"
    assert not edges & (later - train_pairs)


def test_an_item_added_after_training_gets_the_vector_it_has_in_a_graph_built_with_it(trained):
    full, encoder = trained
    newest = full.num_nodes - 1
    touching = (full.pairs == newest).any(1)
    assert touching.any()
    before = dataclasses.replace(full, features=full.features[:-1], pairs=full.pairs[~touching],
                                 weights=full.weights[~touching])
    grown = before.with_items(full.features[-1:], full.pairs[touching], full.weights[touching])
    for a, b in zip(grown.neighbourhoods(), full.neighbourhoods()):
        np.testing.assert_array_equal(a, b)
    added, present = encoder.table(grown), encoder.table(full)
    np.testing.assert_allclose(added[newest], present[newest], atol=1e-6)
    alone = encoder.table(before.with_items(full.features[-1:], np.zeros((0, 2))))
    assert not np.allclose(alone[newest], present[newest], atol=1e-4), "the edges must shape the new item's vector"


def test_with_id_inputs_a_new_item_reads_its_neighbours_ids_but_has_none_of_its_own(tiny_dataset):
    full = graph_of(tiny_dataset)
    newest = full.num_nodes - 1
    touching = (full.pairs == newest).any(1)
    before = dataclasses.replace(full, features=full.features[:-1], pairs=full.pairs[~touching],
                                 weights=full.weights[~touching])
    config = ItemEncoderConfig(dim=8, hidden=16, field_dim=4, epochs=2, batch_pairs=256, id_dropout=0.3)
    encoder = pretrain(before, [tiny_dataset.vocab_sizes[f] for f in INPUTS], ItemLabels(), config).encoder
    assert encoder.id_rows == newest
    grown = before.with_items(full.features[-1:], full.pairs[touching], full.weights[touching])
    np.testing.assert_allclose(encoder.table(grown)[newest], encoder.table(full)[newest], atol=1e-6)
    # an old item's vector depends on its own id vector
    old = int(full.pairs[0, 0])
    vector = encoder.table(full)[old]
    with torch.no_grad():
        encoder.ids.weight[old] += 1.0
    assert not np.allclose(encoder.table(full)[old], vector, atol=1e-4)


def test_the_feature_only_encoder_ignores_edges(tiny_dataset):
    graph = graph_of(tiny_dataset)
    fit = pretrain(graph, [tiny_dataset.vocab_sizes[f] for f in INPUTS], ItemLabels(),
                   ItemEncoderConfig(dim=8, hidden=16, field_dim=4, epochs=1, use_edges=False))
    bare = dataclasses.replace(graph, pairs=graph.pairs[:0], weights=graph.weights[:0])
    np.testing.assert_allclose(fit.encoder.table(graph), fit.encoder.table(bare), atol=1e-6)


def test_a_missing_graph_extra_is_a_one_line_error_naming_it(monkeypatch):
    import importlib.util

    from onerank.features import item_graph
    from onerank.resources import MissingExtra

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("torch_geometric") else find(name, *a))
    with pytest.raises(MissingExtra, match=r"torch_geometric not installed\): pip install 'onerank\[graph\]'$"):
        item_graph.sage_conv()


@pytest.fixture(scope="module")
def cold(tiny_dataset):
    """The tiny data with items 3, 4 and 5 held out of training and refreshed into valid and test."""
    raw = tiny_raw()
    new = np.array([3, 4, 5])
    held = cold_split(raw, new)
    base = encode_dataset(held)
    assert (base.encoders.vocabularies["item_id"].encode(new) == OOV).all()
    return base, held, refresh_items(base, held, new)


def test_held_out_items_leave_no_trace_in_training_and_come_back_with_new_codes(cold):
    base, held, ds = cold
    V = ds.vocab_sizes["item_id"]
    assert (ds.train.categorical["item_id"] < V).all()
    rows = cold_rows(ds, "test")
    assert rows.any() and (~rows).any()
    # the refreshed ids are the held-out items, and the id embedding still reads them as out-of-vocabulary
    assert set(np.unique(ds.test.categorical["item_id"][rows])) == {V, V + 1, V + 2}
    np.testing.assert_array_equal(np.where(rows, OOV, ds.test.categorical["item_id"]), base.test.categorical["item_id"])
    # their side fields follow them into the item table: item 4's category is 4 % 6
    category = ds.encoders.vocabularies["category"].encode(np.array([3, 4, 5]))
    np.testing.assert_array_equal(ds.item_table["category"][V:], category)


def vectors_for(ds, width: int = 4, mode: str = "add", seed: int = 0) -> ItemVectorSpec:
    rows = len(ds.item_table["category"])
    table = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    table[0] = 0
    return ItemVectorSpec.of(table, mode=mode)


@pytest.mark.parametrize("model_name, options", [
    ("mmoe", {}), ("onerank", {}), ("onerank", {"task_item_embedding": "id"}), ("dtrn", {}),
])
def test_every_model_reads_the_item_vectors_of_new_items(cold, model_name, options):
    _, _, ds = cold
    spec = vectors_for(ds)
    torch.manual_seed(0)
    model = build_model(model_name, FeatureSpace.from_dataset(ds, spec), options).eval()
    split = TensorSplit(ds.test, ds.item_table, "item_id")
    batch = split.gather(torch.arange(0, 40), request=torch.arange(40) // 5)
    new = batch.categorical["item_id"] >= ds.vocab_sizes["item_id"]
    assert new.any()
    before = model(batch)
    embeddings = [m for m in model.modules() if isinstance(m, FeatureEmbedding)]
    assert embeddings and all(m.item_vectors is not None for m in embeddings)
    with torch.no_grad():
        for m in embeddings:
            m.item_vectors.table[ds.vocab_sizes["item_id"]:] += 1.0  # the new items' rows only
    after = model(batch)
    changed = (before["click"] - after["click"]).abs() > 1e-6
    assert changed[new].all()
    if model_name == "mmoe":  # point-wise: a row of an old item with no new item in its history keeps its score
        history = batch.histories["clicked"]["item_id"]
        untouched = ~new & ~(history >= ds.vocab_sizes["item_id"]).any(1)
        assert untouched.any() and not changed[untouched].any()


def test_replace_mode_reads_no_item_id_embedding(cold):
    _, _, ds = cold
    model = build_model("mmoe", FeatureSpace.from_dataset(ds, vectors_for(ds, mode="replace")),
                        {"use_histories": False}).eval()
    split = TensorSplit(ds.test, ds.item_table, "item_id")
    batch = split.gather(torch.arange(0, 30))
    before = model(batch)["click"]
    embedding = model.encoder.embedding
    with torch.no_grad():
        rows = embedding.offsets["item_id"] + batch.categorical["item_id"].clamp(max=ds.vocab_sizes["item_id"] - 1)
        embedding.table.weight[rows] += 5.0
    torch.testing.assert_close(model(batch)["click"], before)


def test_a_model_with_item_vectors_trains_saves_and_loads(cold, tmp_path):
    _, _, ds = cold
    config = RunConfig(dataset="tiny", model="mmoe", train=TrainConfig(epochs=1, batch_size=128, progress=False,
                                                                        tensorboard=False))
    spec = dataclasses.replace(vectors_for(ds), id_dropout=0.2)
    trainer = api.build_trainer(config, ds, out_dir=tmp_path, item_vectors=spec)
    table = trainer.model.encoder.embedding.item_vectors.table.clone()
    trainer.fit()
    trainer.close()
    torch.testing.assert_close(trainer.model.encoder.embedding.item_vectors.table, table)  # frozen
    model, meta = api.load_checkpoint(tmp_path / "checkpoint.pt")
    assert meta["space"]["item_vectors"]["rows"] == table.shape[0]
    torch.testing.assert_close(model.encoder.embedding.item_vectors.table, table)
    batch = TensorSplit(ds.test, ds.item_table, "item_id").gather(torch.arange(20))
    trainer.model.eval()
    torch.testing.assert_close(model(batch)["click"], trainer.model(batch)["click"])


@pytest.fixture(scope="module")
def served(tiny_dataset, trained, tmp_path_factory):
    """A checkpoint trained with the encoder's table, the encoder file, and a refreshed checkpoint with two new
    items: 900 (category 2, linked to items 6 and 12) and 901 (category 5, no edges)."""
    graph, encoder = trained
    folder = tmp_path_factory.mktemp("item_refresh")
    save_encoder(folder / "encoder.pt", encoder, graph, [tiny_dataset.vocab_sizes[f] for f in INPUTS])
    config = RunConfig(dataset="tiny", model="mmoe", train=TrainConfig(epochs=1, batch_size=128, progress=False,
                                                                        tensorboard=False))
    trainer = api.build_trainer(config, tiny_dataset, out_dir=folder,
                                item_vectors=ItemVectorSpec.of(encoder.table(graph)))
    trainer.fit()
    trainer.close()
    from onerank.serving.item_refresh import refresh_checkpoint

    counts = refresh_checkpoint(folder / "checkpoint.pt", folder / "encoder.pt",
                                [{"item_id": 900, "category": 2}, {"item_id": 901, "category": 5}],
                                [(900, 6), (900, 12)], folder / "refreshed.pt")
    assert counts == {"new_items": 2, "new_edges": 2, "tables": 1}
    return folder, graph, encoder


def request_with(items: list[int]) -> dict:
    return {"user": {"user_id": 3}, "context": {"hour": 20}, "histories": {"clicked": [6, 9]},
            "candidates": [{"item_id": i, "price": 10.0} for i in items]}


def test_a_refreshed_checkpoint_serves_new_items_with_their_graph_vectors(served, tiny_dataset):
    from onerank.serving.ranker import Ranker

    folder, graph, encoder = served
    old, new = Ranker(folder / "checkpoint.pt"), Ranker(folder / "refreshed.pt")
    items = [6, 900, 901, 12]
    before, after = old.predict(request_with(items))["click"], new.predict(request_with(items))["click"]
    assert before[1] == before[2] != after[1], "unknown to the old checkpoint, each new item to the refreshed one"
    # the served score is the model's on the vector the encoder gives the item in a graph built with it present
    vocabulary = tiny_dataset.encoders.vocabularies
    category = vocabulary["category"].encode(np.array([2, 5]))[:, None]
    linked = vocabulary["item_id"].encode(np.array([6, 12]))
    grown = graph.with_items(category, np.array([[graph.num_nodes, linked[0]], [graph.num_nodes, linked[1]]]))
    model, _ = api.load_checkpoint(folder / "checkpoint.pt")
    model.encoder.embedding.item_vectors.refresh(encoder.table(grown))
    batch = new.encode(request_with(items)).to_batch(new.backend.item_table, "item_id")
    np.testing.assert_allclose(after, torch.sigmoid(model(batch)["click"]).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileExistsError):
        from onerank.serving.item_refresh import refresh_checkpoint

        refresh_checkpoint(folder / "checkpoint.pt", folder / "encoder.pt", [], [], folder / "refreshed.pt")


def test_the_onnx_export_of_a_refreshed_checkpoint_scores_new_items_as_the_ranker(served):
    pytest.importorskip("onnxruntime")
    from onerank.serving.export import export_checkpoint
    from onerank.serving.ranker import Ranker

    folder, _, _ = served
    export_checkpoint(folder / "refreshed.pt", "onnx")
    torch_ranker = Ranker(folder / "refreshed.pt")
    onnx_ranker = Ranker(folder / "refreshed.pt", backend="onnx")
    request = request_with([900, 901, 6])
    np.testing.assert_allclose(onnx_ranker.predict(request)["click"], torch_ranker.predict(request)["click"],
                               rtol=1e-4, atol=1e-5)
