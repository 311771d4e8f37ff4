"""The Python ranker: raw requests are encoded exactly as the training data, vectorised over candidates; unknown ids
are OOV; histories are truncated and left-padded; fusion and sorting; errors name the field; OneRank's chunked
scoring equals one pass for pools of 4096 candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_raw
from onerank import api
from onerank.data.batching import tensor_splits
from onerank.data.encoding import OOV, PAD
from onerank.serving import Fusion, Ranker, RequestError, RequestLimits, RequestTooLarge


@pytest.fixture(scope="module")
def mmoe(tiny_checkpoint):
    return Ranker(tiny_checkpoint("mmoe"))


@pytest.fixture(scope="module")
def raw_test():
    return tiny_raw().test


def raw_request(raw_split, row: int, candidate_rows: list[int] | None = None) -> dict:
    """Row ``row``'s user, context and history, with the candidates of ``candidate_rows`` (default: the row's own)."""
    table = raw_split.table
    history = raw_split.histories["clicked"]
    items = history.values[history.offsets[row]:history.offsets[row + 1]].tolist()
    candidates = [
        {"item_id": int(table.item_id[r]), "category": int(table.category[r]), "price": float(table.price[r])}
        for r in (candidate_rows or [row])
    ]
    return {"user": {"user_id": int(table.user_id[row])}, "context": {"hour": int(table.hour[row])},
            "histories": {"clicked": items}, "candidates": candidates}


def test_raw_request_scores_equal_the_encoded_dataset(mmoe, tiny_checkpoint, tiny_dataset, raw_test):
    model, _ = api.load_checkpoint(tiny_checkpoint("mmoe"))
    rows = torch.arange(0, 40, 3)
    expected = model.predict(tensor_splits(tiny_dataset)["test"].gather(rows))
    for k, row in enumerate(rows.tolist()):
        got = mmoe.predict(raw_request(raw_test, row))
        for task in mmoe.tasks:
            assert got[task][0] == pytest.approx(float(expected[task][k]), abs=1e-6)


def test_many_candidates_score_as_one_at_a_time(mmoe, raw_test):
    request = raw_request(raw_test, 0, list(range(30)))
    pooled = mmoe.predict(request)
    for i, candidate in enumerate(request["candidates"]):
        single = mmoe.predict({**request, "candidates": [candidate]})
        for task in mmoe.tasks:
            assert pooled[task][i] == pytest.approx(single[task][0], abs=1e-6)


def test_item_fields_default_to_the_item_table_and_ids_may_be_strings(mmoe, raw_test):
    request = raw_request(raw_test, 0, list(range(10)))
    given = mmoe.encode(request)
    bare = mmoe.encode({**request, "candidates": [{"item_id": str(c["item_id"]), "price": c["price"]}
                                                  for c in request["candidates"]]})
    np.testing.assert_array_equal(given.categorical["category"], bare.categorical["category"])
    np.testing.assert_array_equal(given.categorical["item_id"], bare.categorical["item_id"])


def test_unknown_ids_are_oov_not_errors(mmoe, raw_test):
    request = raw_request(raw_test, 0, [0, 1])
    request["user"]["user_id"] = 987_654
    request["candidates"][0] = {"item_id": 10**9}
    request["candidates"][1]["category"] = 777
    request["histories"]["clicked"] = [10**9, 3]
    encoded = mmoe.encode(request)
    assert int(encoded.categorical["user_id"]) == OOV
    assert encoded.categorical["item_id"][0] == OOV and encoded.categorical["category"][0] == OOV
    assert encoded.categorical["category"][1] == OOV
    assert encoded.histories["clicked"][-2] == OOV and encoded.histories["clicked"][-1] > OOV
    assert np.isfinite(mmoe.rank(request).scores).all()
    null_user = mmoe.encode({**request, "user": {"user_id": None}})  # null: a missing value, as in training
    assert int(null_user.categorical["user_id"]) == OOV


def test_histories_are_truncated_to_the_most_recent_and_left_padded(mmoe, raw_test):
    max_len = mmoe.space.max_len("clicked")
    request = raw_request(raw_test, 0)
    vocab = mmoe.encoder.encoders.vocabularies["item_id"]
    known = vocab.to_list()
    long = known[: max_len + 3]
    encoded = mmoe.encode({**request, "histories": {"clicked": long}})
    np.testing.assert_array_equal(encoded.histories["clicked"], vocab.encode(np.array(long[-max_len:])))
    short = mmoe.encode({**request, "histories": {"clicked": known[:2]}}).histories["clicked"]
    assert (short[:-2] == PAD).all() and (short[-2:] == vocab.encode(np.array(known[:2]))).all()
    empty = mmoe.encode({**request, "histories": {"clicked": []}}).histories["clicked"]
    absent = mmoe.encode({**request, "histories": {}}).histories["clicked"]
    assert (empty == PAD).all() and (absent == PAD).all()
    assert np.isfinite(mmoe.rank({**request, "histories": {}}).scores).all()


def test_dense_values_are_scaled_and_missing_ones_fall_back_to_the_mean(mmoe, raw_test):
    request = raw_request(raw_test, 0, [0, 1, 2])
    scaler = mmoe.encoder.encoders.scalers["price"]
    request["candidates"][1]["price"] = None
    del request["candidates"][2]["price"]
    encoded = mmoe.encode(request)
    given = scaler.transform(np.array([request["candidates"][0]["price"]]))[0]
    assert encoded.dense["price"][0] == pytest.approx(float(given))
    assert encoded.dense["price"][1] == 0.0 and encoded.dense["price"][2] == 0.0


def test_fusion_weighted_sum_and_product_and_sorting(mmoe, raw_test):
    request = raw_request(raw_test, 0, list(range(25)))
    result = mmoe.rank(request, fusion=Fusion("weighted_sum", {"click": 1.0, "buy": 2.0}))
    p = result.probabilities
    np.testing.assert_allclose(result.scores, p["click"] + 2.0 * p["buy"], rtol=1e-6)
    assert (np.diff(result.scores[result.order]) <= 0).all()
    product = mmoe.rank({**request, "fusion": {"kind": "product", "weights": {"click": 1.0, "buy": 0.5}}})
    np.testing.assert_allclose(product.scores, p["click"] * p["buy"] ** 0.5, rtol=1e-5)
    top = mmoe.respond({**request, "top_k": 5})
    assert [r["index"] for r in top["ranking"]] == mmoe.rank(request).order[:5].tolist()
    assert top["ranking"][0]["rank"] == 1 and top["num_candidates"] == 25
    with pytest.raises(RequestError, match="unknown task 'like'"):
        mmoe.rank({**request, "fusion": {"weights": {"like": 1.0}}})
    with pytest.raises(ValueError, match="every task weight 0"):
        Fusion("weighted_sum", {"click": 0.0}).resolved(["click"], {"click": "binary"})


@pytest.mark.parametrize(
    "change, loc, status",
    [
        (lambda r: r["user"].pop("user_id"), ["body", "user", "user_id"], 422),
        (lambda r: r["context"].update(devcie="ios"), ["body", "context", "devcie"], 422),
        (lambda r: r["candidates"][1].update(hour=3), ["body", "candidates", 1, "hour"], 422),
        (lambda r: r["candidates"][2].pop("item_id"), ["body", "candidates", 2, "item_id"], 422),
        (lambda r: r["candidates"][2].update(item_id="abc"), ["body", "candidates", 2, "item_id"], 422),
        (lambda r: r["candidates"][1].update(price="cheap"), ["body", "candidates", 1, "price"], 422),
        (lambda r: r["candidates"][1].update(price=[1]), ["body", "candidates", 1, "price"], 422),
        (lambda r: r["histories"].update(clicked=[1, "x", 2]), ["body", "histories", "clicked", 1], 422),
        (lambda r: r["histories"].update(viewed=[1]), ["body", "histories", "viewed"], 422),
        (lambda r: r.update(candidates=[]), ["body", "candidates"], 422),
        (lambda r: r.update(candidates=[{"item_id": 1}] * 65), ["body", "candidates"], 413),
        (lambda r: r["histories"].update(clicked=[1] * 33), ["body", "histories", "clicked"], 413),
    ],
)
def test_bad_requests_name_the_field(tiny_checkpoint, raw_test, change, loc, status):
    ranker = Ranker(tiny_checkpoint("mmoe"), limits=RequestLimits(max_candidates=64, max_history=32))
    request = raw_request(raw_test, 0, [0, 1, 2])
    change(request)
    with pytest.raises(RequestError) as info:
        ranker.rank(request)
    assert info.value.errors[0]["loc"] == loc and info.value.status == status
    assert (status == 413) == isinstance(info.value, RequestTooLarge)


def test_example_request_is_accepted(mmoe):
    assert len(mmoe.rank(mmoe.example_request(4)).order) == 4
    description = mmoe.describe()
    assert description["name"] == "mmoe" and [t["name"] for t in description["tasks"]] == ["click", "buy"]
    assert description["schema"]["histories"] == {"clicked": {"max_len": 6}}


@pytest.mark.parametrize("name", ["mmoe", "onerank"])
def test_chunked_pool_of_4096_scores_as_one_pass(name, tiny_checkpoint):
    checkpoint = tiny_checkpoint(name)
    one_pass = Ranker(checkpoint, chunk_size=4096)
    chunked = Ranker(checkpoint, chunk_size=1000)
    request = one_pass.example_request(4096)
    a, b = one_pass.predict(request), chunked.predict(request)
    model, _ = api.load_checkpoint(checkpoint)
    with torch.no_grad():
        reference = model(one_pass.encode(request).to_batch(one_pass.backend.item_table, "item_id"))
    for task in one_pass.tasks:
        np.testing.assert_allclose(a[task], b[task], atol=1e-5)
        np.testing.assert_allclose(a[task], torch.sigmoid(reference[task]).numpy(), atol=1e-5)
