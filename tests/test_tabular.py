"""Generic tabular loader: the docs example, split rules, sequences, requests, and the AliExpress / Ali-CCP samples."""

import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onerank.data.encoding import OOV, PAD
from onerank.data.registry import load_dataset
from onerank.data.schema import SchemaError
from onerank.data.tabular import load

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLES = SHARED / "samples"
CONFIGS = ROOT / "configs" / "datasets"


def code_block(markdown: str, language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.S)
    assert blocks, f"no ```{language} block"
    return blocks[0]


@pytest.fixture
def shop(tmp_path):
    """The worked example of docs/tabular_example.md, written out from the doc itself."""
    doc = (ROOT / "docs" / "tabular_example.md").read_text()
    folder = tmp_path / "my_shop"
    folder.mkdir()
    (folder / "interactions.csv").write_text(code_block(doc, "csv"))
    (folder / "shop.yaml").write_text(code_block(doc, "yaml"))
    return folder


def decode(ds, codes):
    vocab = ds.encoders.vocabularies[ds.schema.item_id].to_list()
    return [None if c == PAD else "OOV" if c == OOV else vocab[c - 2] for c in codes if c != PAD]


def test_docs_example_runs(shop, tmp_path):
    ds = load_dataset("tabular", shop, tmp_path / "cache", schema=str(shop / "shop.yaml"))
    assert ds.name == "my_shop"
    assert {s: len(ds.split(s)) for s in ("train", "valid", "test")} == {"train": 6, "valid": 3, "test": 4}
    assert ds.schema.task_names == ["click", "buy"]
    assert ds.info["cache_hit"] is False
    # requests: u1's three and u2's two impressions of 03-01 form one request each
    assert sorted(np.bincount(ds.train.request).tolist()) == [1, 2, 3]
    assert sorted(np.bincount(ds.test.request).tolist()) == [1, 1, 2]
    # histories as the doc describes
    valid_user = ds.encoders.vocabularies["user"].to_list()
    u1 = [i for i, c in enumerate(ds.valid.categorical["user"]) if valid_user[c - 2] == "u1"][0]
    assert decode(ds, ds.valid.histories["clicked"][u1]) == ["i1", "i3"]
    assert decode(ds, ds.valid.histories["bought"][u1]) == ["i3"]
    u3 = [i for i, c in enumerate(ds.test.categorical["user"]) if valid_user[c - 2] == "u3"]
    assert len(u3) == 2
    for row in u3:  # one request: the first impression's click is not in the second one's history
        assert decode(ds, ds.test.histories["clicked"][row]) == ["i2"]
    # buy only counts where click = 1
    assert np.array_equal(ds.train.label_mask["buy"], ds.train.labels["click"] > 0.5)
    # the NaN price was filled, the test-only item i5 is OOV
    assert np.isfinite(ds.test.dense["price"]).all()
    assert (ds.test.categorical["item"] == OOV).sum() == 2
    # second load: cache hit; a changed option: a rebuild
    assert load_dataset("tabular", shop, tmp_path / "cache", schema=str(shop / "shop.yaml")).info["cache_hit"] is True
    other = load_dataset("tabular", shop, tmp_path / "cache", schema=str(shop / "shop.yaml"), tasks="click")
    assert other.info["cache_hit"] is False and other.schema.task_names == ["click"]


def test_schema_path_relative_to_data_dir_and_string_options(shop, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = load(shop, tmp_path / "cache", schema="shop.yaml", valid_start="2024-03-01T11:30", request_max_size="2")
    assert len(ds.train) == 5 and len(ds.valid) == 4
    assert np.bincount(ds.train.request).max() == 2
    with pytest.raises(SchemaError, match="schema"):
        load(shop, tmp_path / "cache")
    with pytest.raises(SchemaError, match="not found"):
        load(shop, tmp_path / "cache", schema="nope.yaml")
    with pytest.raises(SchemaError, match="unknown options"):
        load(shop, tmp_path / "cache", schema="shop.yaml", colour="red")


def write_interactions(folder: Path, n_users: int = 30, per_user: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        for k in range(per_user):
            rows.append({
                "uid": u, "iid": int(rng.integers(0, 20)), "t": 1000 * u + 10 * k, "f": str(rng.choice(list("abc"))),
                "x": float(rng.normal()), "label": int(rng.random() < 0.5),
                "recent": "|".join(str(i) for i in rng.integers(0, 20, int(rng.integers(0, 4)))),
                "listed": [int(i) for i in rng.integers(0, 20, 2)],
            })
    frame = pd.DataFrame(rows)
    frame.to_parquet(folder / "all.parquet")
    return frame


SCHEMA = """
files: {data: all.parquet}
split: {method: fraction, by: user, valid_fraction: 0.2, test_fraction: 0.2, seed: 3}
user_id: uid
timestamp: t
item_id: iid
categorical: [{name: uid, group: user}, {name: iid, group: item}, f]
dense: [x]
sequences:
  - {name: recent, max_len: 3}
  - {name: listed, max_len: 4}
tasks: [label]
"""


def test_parquet_fraction_split_by_user_and_sequence_columns(tmp_path):
    frame = write_interactions(tmp_path)
    (tmp_path / "s.yaml").write_text(SCHEMA)
    ds = load(tmp_path, tmp_path / "cache", schema=str(tmp_path / "s.yaml"))
    assert sum(len(ds.split(s)) for s in ("train", "valid", "test")) == len(frame)
    # users are disjoint across splits: valid / test users are unseen (OOV) in train vocab
    assert (ds.valid.categorical["uid"] == OOV).all() and (ds.test.categorical["uid"] == OOV).all()
    assert (ds.train.categorical["uid"] > OOV).all()
    # a delimited-string column and a list column, left-padded to max_len
    assert ds.train.histories["recent"].shape[1] == 3 and ds.train.histories["listed"].shape[1] == 4
    assert ((ds.train.histories["listed"] != PAD).sum(axis=1) == 2).all()
    # the same seed on shuffled rows gives the same split
    frame.sample(frac=1.0, random_state=1).to_parquet(tmp_path / "all.parquet")
    ds2 = load(tmp_path, tmp_path / "cache2", schema=str(tmp_path / "s.yaml"))
    assert {s: len(ds2.split(s)) for s in ("train", "valid", "test")} == {s: len(ds.split(s)) for s in ("train", "valid", "test")}
    assert np.array_equal(np.sort(ds2.test.time), np.sort(ds.test.time))


def test_histories_from_log_with_numeric_time_and_request_grouping(tmp_path):
    frame = pd.DataFrame({
        "uid": [1, 1, 1, 1, 2, 2],
        "iid": [10, 11, 12, 13, 10, 14],
        "t": [0, 5, 100, 103, 0, 200],
        "label": [1, 1, 0, 1, 1, 0],
    })
    frame.iloc[[0, 1, 4]].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[[2, 3]].to_csv(tmp_path / "valid.csv", index=False)
    frame.iloc[[5]].to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""
        files: {train: train.csv, valid: valid.csv, test: test.csv}
        requests: {max_gap: 10}
        histories: {seen: null, liked: label}
        user_id: uid
        timestamp: t
        item_id: iid
        categorical: [{name: uid, group: user, min_count: 1}, {name: iid, group: item, min_count: 1}]
        sequences: [seen, liked]
        tasks: [label]
    """))
    ds = load(None, tmp_path / "cache", schema=str(tmp_path / "s.yaml"))  # files relative to the YAML's folder
    # valid: user 1's two impressions (t=100, 103) are one request: both see exactly the train events 10, 11
    assert np.bincount(ds.valid.request).tolist() == [2]
    for row in range(2):
        assert decode(ds, ds.valid.histories["seen"][row]) == [10, 11]
        assert decode(ds, ds.valid.histories["liked"][row]) == [10, 11]
        assert (ds.valid.history_times["seen"][row][-2:] < 100).all()
    # train: user 1's t=0 and t=5 are one request: empty histories for both
    assert (ds.train.histories["seen"] == PAD).all()
    # test: user 2 at t=200 sees its own train impression
    assert decode(ds, ds.test.histories["seen"][0]) == [10]


def test_time_split_and_missing_split_carved_from_train(tmp_path):
    frame = pd.DataFrame({"uid": [1, 2, 3, 4, 5, 6], "t": [1, 2, 3, 4, 5, 6], "a": list("abcabc"), "y": [0, 1, 0, 1, 0, 1]})
    frame.iloc[:5].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[5:].to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""
        files: {train: train.csv, test: test.csv}
        split: {method: time, valid_start: 4}
        timestamp: t
        categorical: [a]
        tasks: [y]
    """))
    ds = load(tmp_path, tmp_path / "cache", schema=str(tmp_path / "s.yaml"))
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (3, 2, 1)
    assert ds.valid.time.min() >= 4 and ds.train.time.max() < 4
    (tmp_path / "bad.yaml").write_text("files: {train: train.csv, test: test.csv}\nsplit: {method: time}\ntimestamp: t\ncategorical: [a]\ntasks: [y]\n")
    with pytest.raises(SchemaError, match="valid_start"):
        load(tmp_path, tmp_path / "cache", schema=str(tmp_path / "bad.yaml"))


def test_clear_errors(tmp_path):
    pd.DataFrame({"a": [1, 2], "y": [0, 1]}).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "s.yaml").write_text("files: {train: 'tr*.csv', test: 'nothing*.csv'}\ncategorical: [a]\ntasks: [y]\n")
    with pytest.raises(SchemaError, match="no file matches the test pattern"):
        load(tmp_path, tmp_path / "cache", schema=str(tmp_path / "s.yaml"))
    (tmp_path / "s2.yaml").write_text("files: {train: train.csv, test: train.csv, valid: train.csv}\ncategorical: [b]\ntasks: [y]\n")
    with pytest.raises(SchemaError, match="missing column 'b'"):
        load(tmp_path, tmp_path / "cache", schema=str(tmp_path / "s2.yaml"))
    (tmp_path / "s3.yaml").write_text("colour: red\ntasks: [y]\n")
    with pytest.raises(SchemaError, match="unknown keys"):
        load(tmp_path, tmp_path / "cache", schema=str(tmp_path / "s3.yaml"))
    (tmp_path / "s4.yaml").write_text(
        "files: {train: train.csv, test: train.csv, valid: train.csv}\ncategorical: [a]\nsequences: [s]\nitem_id: a\ntasks: [y]\n"
    )
    with pytest.raises(SchemaError, match="no `histories:` entry"):
        load(tmp_path, tmp_path / "cache", schema=str(tmp_path / "s4.yaml"))


# ---------------------------------------------------------------------------------------------------------------------
# The shared AliExpress and Ali-CCP samples through the shipped schema files
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (SAMPLES / "aliexpress").is_dir(), reason=f"no AliExpress sample at {SAMPLES / 'aliexpress'}")
def test_aliexpress_sample(tmp_path):
    ds = load_dataset("tabular", SAMPLES / "aliexpress", tmp_path, schema=str(CONFIGS / "aliexpress.yaml"))
    assert ds.name == "aliexpress"
    assert ds.schema.task_names == ["click", "conversion"] and ds.schema.task("conversion").space == "click"
    assert len(ds.schema.categorical) == 16 and len(ds.schema.dense) == 63
    n = {s: len(ds.split(s)) for s in ("train", "valid", "test")}
    assert n["train"] + n["valid"] == 100 and n["test"] == 20 and n["valid"] > 0
    raw = pd.read_csv(SAMPLES / "aliexpress" / "aliexpress_train_sample.csv")
    # valid holds whole searches: the request sizes of train and valid together are exactly the searches' sizes
    # (a search cut between the two splits would show up as two smaller requests)
    sizes = np.bincount(ds.train.request).tolist() + np.bincount(ds.valid.request).tolist()
    assert sorted(sizes) == sorted(raw.groupby("search_id").size().tolist())
    for split in ("train", "valid", "test"):
        s = ds.split(split)
        assert s.request is not None
        assert np.array_equal(s.label_mask["conversion"], s.labels["click"] > 0.5)


ALIEXPRESS = pytest.mark.skipif(not (SAMPLES / "aliexpress").is_dir(),
                                reason=f"no AliExpress sample at {SAMPLES / 'aliexpress'}")


@ALIEXPRESS
def test_aliexpress_searches_are_requests_with_a_shared_user_side(tmp_path):
    """A search is a request: its rows share the user-side fields, differ in the item fields, and a list-wise model
    trains on whole searches and ranks a search's items apart (the sample is for formats only: no metric here)."""
    from onerank import api
    from onerank.training.config import RunConfig, TrainConfig

    ds = load_dataset("tabular", SAMPLES / "aliexpress", tmp_path, schema=str(CONFIGS / "aliexpress.yaml"))
    schema = ds.schema
    user = [f.name for f in schema.categorical if f.group == "user"] + [f.name for f in schema.dense if f.group == "user"]
    item = schema.item_fields + [f.name for f in schema.dense if f.group == "item"]
    assert len(user) == 10 + 26 and len(item) == 6 + 37
    train = ds.train
    sizes = np.bincount(train.request)
    starts = np.cumsum(sizes) - sizes
    assert sizes.max() == 20  # the sample's largest search, kept whole
    for name in user:
        column = train.categorical.get(name, train.dense.get(name))
        np.testing.assert_array_equal(column, np.repeat(column[starts], sizes, axis=0))
    config = RunConfig(
        dataset="tabular", data_dir=str(SAMPLES / "aliexpress"), cache_dir=str(tmp_path),
        dataset_options={"schema": str(CONFIGS / "aliexpress.yaml")}, model="onerank",
        model_options={"dim": 8, "num_layers": 1, "num_heads": 1, "item_mlp_hidden": [16]},
        train=TrainConfig(epochs=1, batch_size=64, threads=1, device="cpu", progress=False, tensorboard=False),
    )
    trainer = api.build_trainer(config, ds)
    try:
        assert trainer.objective.needs_requests  # OneRank's list-wise loss: batches of whole searches
        state = trainer.fit()
        scores = trainer.predict("train")["click"]
    finally:
        trainer.close()
    assert state.history and all(np.isfinite(v) for v in state.history[0]["train_loss"].values())
    largest = int(np.argmax(sizes))
    in_search = scores[starts[largest]:starts[largest] + sizes[largest]]
    assert np.unique(np.round(in_search, 6)).size > 1  # the items of one search are told apart


@ALIEXPRESS
def test_aliexpress_official_file_names_load_with_the_same_code(tmp_path):
    """The official per-country release (AliExpress_NL/train.csv, test.csv, ...) loads from any folder with the same
    schema file: here the sample under the official names."""
    country = tmp_path / "data" / "AliExpress_NL"
    country.mkdir(parents=True)
    for split in ("train", "test"):
        (country / f"{split}.csv").write_bytes((SAMPLES / "aliexpress" / f"aliexpress_{split}_sample.csv").read_bytes())
    official = load_dataset("tabular", country, tmp_path / "cache", schema=str(CONFIGS / "aliexpress.yaml"))
    sample = load_dataset("tabular", SAMPLES / "aliexpress", tmp_path / "cache", schema=str(CONFIGS / "aliexpress.yaml"))
    assert official.info["cache_dir"] != sample.info["cache_dir"]  # other files, other cache entry
    for split in ("train", "valid", "test"):
        a, b = official.split(split), sample.split(split)
        np.testing.assert_array_equal(a.request, b.request)
        for name in a.categorical:
            np.testing.assert_array_equal(a.categorical[name], b.categorical[name])
        np.testing.assert_array_equal(a.labels["conversion"], b.labels["conversion"])


@ALIEXPRESS
def test_a_user_field_that_differs_within_a_search_is_an_error(tmp_path):
    raw = pd.read_csv(SAMPLES / "aliexpress" / "aliexpress_train_sample.csv")
    largest = raw["search_id"].value_counts().idxmax()
    rows = raw.index[raw["search_id"] == largest]
    raw.loc[rows[1], "categorical_3"] = raw.loc[rows[0], "categorical_3"] + 1
    raw.to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "test.csv").write_bytes((SAMPLES / "aliexpress" / "aliexpress_test_sample.csv").read_bytes())
    with pytest.raises(SchemaError, match="user field 'categorical_3' varies within 1 requests.*`group: impression`.*"
                       "`group: item`"):
        load_dataset("tabular", tmp_path, tmp_path / "cache", schema=str(CONFIGS / "aliexpress.yaml"))


@pytest.mark.skipif(not (SAMPLES / "ali-ccp").is_dir(), reason=f"no Ali-CCP sample at {SAMPLES / 'ali-ccp'}")
def test_ali_ccp_sample(tmp_path):
    ds = load_dataset("tabular", SAMPLES / "ali-ccp", tmp_path, schema=str(CONFIGS / "ali_ccp.yaml"))
    assert ds.schema.task_names == ["click", "purchase"] and ds.schema.task("purchase").space == "click"
    assert {s: len(ds.split(s)) for s in ("train", "valid", "test")} == {"train": 100, "valid": 50, "test": 50}
    assert len(ds.schema.categorical) == 23 and len(ds.schema.dense) == 8
    assert ds.schema.item_id == "f205" and set(ds.item_table) == {"f206", "f207", "f210", "f216"}
    assert ds.train.label_mask["purchase"].sum() == ds.train.labels["click"].sum()
    assert ds.train.user is not None
