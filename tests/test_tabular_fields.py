"""Tabular loader: per-impression candidate fields (``group: impression``) next to an items table, errors that name
only what is missing and print plain values, and history columns whose cells are not item lists."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from onerank.data.batching import BatchLoader, tensor_splits
from onerank.data.encoding import PAD, RaggedHistory
from onerank.data.schema import SchemaError
from onerank.data.tabular import load
from onerank.features.space import FeatureSpace
from onerank.models import build_model


def impressions(n_requests: int = 60, per_request: int = 5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_requests * per_request
    item = rng.integers(0, 30, n)
    pos = np.tile(np.arange(per_request), n_requests)
    return pd.DataFrame({
        "req": np.repeat(np.arange(n_requests), per_request), "uid": np.repeat(rng.integers(0, 12, n_requests),
                                                                                per_request),
        "adId": item, "brand": item % 4, "pos": pos, "t": np.repeat(np.arange(n_requests) * 10, per_request),
        "click": (rng.random(n) < 0.3 + 0.3 * (pos == 0)).astype(int),
        "recent": ["|".join(map(str, rng.integers(0, 30, 3))) for _ in range(n)],
    })


SCHEMA = """
files: {data: log.csv, items: items.csv}
split: {method: fraction, by: request, valid_fraction: 0.2, test_fraction: 0.2, seed: 1}
request_id: req
user_id: uid
timestamp: t
item_id: adId
categorical: [{name: uid, group: user}, {name: adId, group: item}, {name: brand, group: item},
              {name: pos, group: impression}]
sequences: [{name: recent, max_len: 3}]
tasks: [click]
"""


def write(folder: Path, log: pd.DataFrame, items: pd.DataFrame, schema: str = SCHEMA) -> Path:
    log.to_csv(folder / "log.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    (folder / "s.yaml").write_text(schema)
    return folder / "s.yaml"


def items_table() -> pd.DataFrame:
    return pd.DataFrame({"adId": np.arange(30), "brand": np.arange(30) % 4})


def test_a_per_impression_position_loads_next_to_an_items_table(tmp_path):
    schema = write(tmp_path, impressions(), items_table())  # pos is in the log only, not in the items file
    ds = load(tmp_path, tmp_path / "cache", schema=str(schema))
    assert ds.schema.item_fields == ["adId", "brand", "pos"]
    # candidates carry their position; history items carry none (padding), their brand comes from the items file
    assert (ds.train.categorical["pos"] > PAD).all()
    assert (ds.item_table["pos"] == PAD).all() and (ds.item_table["brand"][2:] > PAD).any()
    # a model takes the position as a candidate field and varies with it
    space = FeatureSpace.from_dataset(ds)
    model = build_model("mmoe", space).eval()
    batch = next(iter(BatchLoader(tensor_splits(ds)["test"], 64).epoch(0)))
    moved = type(batch)(**{**batch.__dict__, "categorical": {**batch.categorical,
                                                                "pos": torch.flip(batch.categorical["pos"], [0])}})
    with torch.no_grad():
        assert not torch.allclose(model(batch)["click"], model(moved)["click"])


def test_an_items_table_error_names_only_the_missing_column(tmp_path):
    schema = write(tmp_path, impressions(), items_table().drop(columns=["brand"]))
    with pytest.raises(SchemaError) as error:
        load(tmp_path, tmp_path / "cache", schema=str(schema))
    message = str(error.value)
    assert "['brand']" in message and "adId" not in message.split("lacks")[1].split(" of ")[0]
    assert "group: impression" in message


def test_a_request_field_that_varies_names_plain_values_and_the_impression_group(tmp_path):
    log = impressions()
    schema = write(tmp_path, log, items_table(), SCHEMA.replace("{name: pos, group: impression}", "pos"))
    with pytest.raises(SchemaError) as error:
        load(tmp_path, tmp_path / "cache", schema=str(schema))
    message = str(error.value)
    assert "'pos' varies" in message and "(e.g. 0 and 1 in one request)" in message
    assert "np." not in message and "group: impression" in message


@pytest.mark.parametrize("cells, separator", [
    (lambda ids: f"[{ids[0]}, {ids[1]}]", "|"),  # JSON text
    (lambda ids: ";".join(map(str, ids)), "|"),  # another separator than the schema's
    (lambda ids: f"{ids[0]}.5", "|"),  # a number that is no item id
])
def test_history_cells_that_are_not_item_lists_are_refused(cells, separator, tmp_path):
    log = impressions()
    rng = np.random.default_rng(2)
    log["recent"] = [cells(rng.integers(0, 30, 3)) for _ in range(len(log))]
    schema = write(tmp_path, log, items_table())
    with pytest.raises(SchemaError) as error:
        load(tmp_path, tmp_path / "cache", schema=str(schema))
    message = str(error.value)
    assert "history column 'recent'" in message and "hold no item id" in message and "'|'" in message
    assert "row 0:" in message and "refused" in message


def test_a_few_bad_history_cells_are_named_in_a_warning(tmp_path, caplog):
    log = impressions()
    log.loc[[3, 7], "recent"] = "unknown-thing"
    schema = write(tmp_path, log, items_table())
    with caplog.at_level(logging.WARNING, logger="onerank.data.tabular"):
        load(tmp_path, tmp_path / "cache", schema=str(schema))
    assert any("hold no item id" in r.message and "'unknown-thing'" in r.message for r in caplog.records)


def test_a_mapping_in_a_history_cell_names_its_row():
    column = pd.Series(["1|2", [3, 4], 5, {"a": 1}], name="recent", dtype=object)
    with pytest.raises(SchemaError, match=r"'recent', row 3: a dict"):
        RaggedHistory.from_lists(column)
    history = RaggedHistory.from_lists(column[:3])  # strings, lists and a lone number are histories
    assert history.values.tolist() == ["1", "2", 3, 4, 5]


def test_delimited_history_ids_are_the_candidates_ids(tmp_path):
    """"12|7" cells of a numeric item id column name the same items as the candidates (one embedding each)."""
    log = impressions()
    schema = write(tmp_path, log, items_table())
    ds = load(tmp_path, tmp_path / "cache", schema=str(schema))
    vocab = ds.encoders.vocabularies["adId"]
    assert all(isinstance(v, int) for v in vocab.to_list())  # no "12" beside 12
