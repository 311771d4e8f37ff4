import numpy as np
import pandas as pd
import pytest

from onerank.data import OOV, PAD, RaggedHistory, Schema, SchemaError
from onerank.data.dataset import encode_dataset
from onerank.data.encoding import Vocabulary, pack_left_padded, validate_table

from conftest import tiny_raw, tiny_schema, tiny_split


def table():
    return tiny_split(4, seed=0).table


def test_missing_column_is_named_with_a_hint():
    t = table().rename(columns={"category": "Category"})
    with pytest.raises(SchemaError, match=r"missing column 'category'.*did you mean 'Category'"):
        validate_table(t, tiny_schema(), "train")


def test_wrong_dense_type_names_column_and_value():
    t = table()
    t["price"] = t["price"].astype(str)
    t.loc[0, "price"] = "cheap"
    with pytest.raises(SchemaError, match=r"dense column 'price' must be numeric.*'cheap'"):
        validate_table(t, tiny_schema(), "train")


def test_nan_label_is_rejected_with_its_row():
    t = table().astype({"click": float})
    t.loc[3, "click"] = np.nan
    with pytest.raises(SchemaError, match=r"label column .click. \(task .click.\) has 1 NaN labels at rows 3; fill or drop"):
        validate_table(t, tiny_schema(), "train")


@pytest.mark.parametrize("bad, message", [(-4, "negative ids"), (2.5, "non-integer")])
def test_bad_item_ids(bad, message):
    t = table().astype({"item_id": float})
    t.loc[1, "item_id"] = bad
    with pytest.raises(SchemaError, match=message):
        validate_table(t, tiny_schema(), "train")


def test_empty_table_and_non_binary_label():
    with pytest.raises(SchemaError, match="empty"):
        validate_table(table().iloc[:0], tiny_schema(), "test split")
    t = table()
    t.loc[0, "click"] = 3
    with pytest.raises(SchemaError, match=r"binary label column 'click' holds 3"):
        validate_table(t, tiny_schema(), "train")


def test_schema_checks_and_yaml(tmp_path):
    with pytest.raises(SchemaError, match="space 'nope' is not a task"):
        Schema.from_dict({"categorical": ["a"], "tasks": [{"name": "b", "space": "nope"}]})
    with pytest.raises(SchemaError, match="unknown schema keys"):
        Schema.from_dict({"tasks": ["a"], "colums": []})
    with pytest.raises(SchemaError, match="declares no task"):
        Schema.from_dict({"categorical": ["a"]})
    path = tmp_path / "s.yaml"
    path.write_text(
        "schema:\n  categorical: [{name: u, group: user}, {name: i, group: item}]\n"
        "  sequences: [{name: clicks, max_len: 3}]\n  item_id: i\n"
        "  tasks: [click, {name: buy, space: click}]\n"
    )
    schema = Schema.from_yaml(path)
    assert schema.item_fields == ["i"] and schema.task("buy").space == "click"


def test_vocabulary_is_fitted_on_train_only_and_unseen_values_are_oov():
    raw = tiny_raw(50)
    raw.test.table.loc[0, "hour"] = 99  # an hour never seen in train
    ds = encode_dataset(raw)
    vocab = ds.encoders.vocabularies["hour"]
    assert 99 not in vocab.to_list()
    assert ds.test.categorical["hour"][0] == OOV
    assert set(vocab.to_list()) == set(raw.train.table["hour"])


def test_vocabulary_codes_do_not_depend_on_row_order():
    values = pd.Series(["b", "a", "c", "a"])
    assert Vocabulary.fit(values).encode(values).tolist() == Vocabulary.fit(values[::-1]).encode(values).tolist()
    assert Vocabulary.fit(values, min_count=2).encode(pd.Series(["a", "b"])).tolist() == [2, OOV]


def test_left_padded_packing_keeps_the_most_recent_items():
    offsets = np.array([0, 0, 2, 7])
    codes = np.arange(10, 17)
    packed = pack_left_padded(codes, offsets, max_len=3)
    assert packed.tolist() == [[PAD, PAD, PAD], [PAD, 10, 11], [14, 15, 16]]


def test_ragged_history_from_delimited_strings_and_lists():
    h = RaggedHistory.from_lists(pd.Series(["3|4|5", "", None, [7, 8]]))
    assert h.offsets.tolist() == [0, 3, 3, 3, 5]
    assert [str(v) for v in h.values] == ["3", "4", "5", "7", "8"]
    with pytest.raises(SchemaError):
        RaggedHistory(values=np.arange(3), offsets=np.array([0, 2]))


def test_item_table_gives_history_items_their_side_features(tiny_dataset):
    ds = tiny_dataset
    item_vocab = ds.encoders.vocabularies["item_id"]
    cat_vocab = ds.encoders.vocabularies["category"]
    code = item_vocab.encode(np.array([13]))[0]
    assert ds.item_table["category"][code] == cat_vocab.encode(np.array([13 % 6]))[0]
    assert ds.item_table["category"][PAD] == PAD


def test_request_ids_must_match_the_rows():
    raw = tiny_raw(30)
    raw.valid.request = raw.valid.request[:-1]
    with pytest.raises(SchemaError, match="valid split: 299 request ids for 300 rows"):
        encode_dataset(raw)


def test_task_space_mask_and_request_contiguity(tiny_dataset):
    ds = tiny_dataset
    np.testing.assert_array_equal(ds.train.label_mask["buy"], ds.train.labels["click"] > 0.5)
    assert ds.train.label_mask["click"].all()
    req = ds.train.request
    assert (np.diff(req) >= 0).all() and req[0] == 0


def test_items_seen_only_in_train_histories_keep_their_side_features():
    raw = tiny_raw(30)
    keep = (raw.train.table["item_id"] != 57).to_numpy()
    raw.train.table = raw.train.table[keep].reset_index(drop=True)
    raw.train.request = raw.train.request[keep]
    raw.train.histories["clicked"] = RaggedHistory(
        values=np.array([57] * len(raw.train.table)), offsets=np.arange(len(raw.train.table) + 1)
    )
    raw.item_table.loc[raw.item_table["item_id"] == 57, "category"] = 99  # a category no train candidate has
    ds = encode_dataset(raw)
    code = ds.encoders.vocabularies["item_id"].encode(np.array([57]))[0]
    assert code != OOV
    assert ds.item_table["category"][code] == ds.encoders.vocabularies["category"].encode(np.array([99]))[0] != OOV


def test_two_processes_building_the_same_cache_both_succeed(tmp_path):
    import multiprocessing

    from onerank.data.dataset import EncodedDataset

    ds = encode_dataset(tiny_raw(20))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=ds.save, args=(tmp_path / "cache",)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    loaded = EncodedDataset.load(tmp_path / "cache")
    np.testing.assert_array_equal(loaded.train.labels["click"], ds.train.labels["click"])
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
