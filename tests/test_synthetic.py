"""The synthetic funnel dataset: determinism, task correlation, base rates, funnel, requests, histories, cache, and the
list effects with their oracle."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from onerank.data import SchemaError, load_dataset
from onerank.data.synthetic import (
    BASE_TIME,
    DAY,
    LIST_EFFECTS,
    SyntheticConfig,
    build_raw,
    conversion_effect_logits,
    list_effect_logits,
    load,
    simulate,
    synthetic_schema,
)

SMALL = dict(num_users=300, num_items=200, history_requests=4.0, requests_per_user=2.0, candidates_per_request=10,
             history_len=12)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture(scope="module")
def ds(cache_root):
    return load(None, cache_root, **SMALL)


@pytest.fixture(scope="module")
def sim():
    return simulate(**SMALL)


def test_config_validation():
    with pytest.raises(SchemaError, match="unknown options.*'num_user'"):
        SyntheticConfig.from_options({"num_user": 10})
    with pytest.raises(SchemaError, match="task_correlation"):
        SyntheticConfig(task_correlation=1.5)
    with pytest.raises(SchemaError, match="base rates"):
        SyntheticConfig(click_rate=0.05, cart_rate=0.1)
    with pytest.raises(SchemaError, match="candidates_per_request"):
        SyntheticConfig(num_items=5, candidates_per_request=10)
    assert SyntheticConfig(num_users=300.0).num_users == 300  # integral floats from YAML / CLI are accepted
    assert isinstance(SyntheticConfig(num_users=300.0).num_users, int)


def test_deterministic_by_seed():
    a, b, c = build_raw(**SMALL), build_raw(**SMALL), build_raw(**SMALL, seed=1)
    for split in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(getattr(a, split).table, getattr(b, split).table)
        for seq in ("clicked", "carted"):
            ha, hb = getattr(a, split).histories[seq], getattr(b, split).histories[seq]
            np.testing.assert_array_equal(ha.values, hb.values)
            np.testing.assert_array_equal(ha.offsets, hb.offsets)
            np.testing.assert_array_equal(ha.times, hb.times)
    ta, tc = a.train.table, c.train.table
    assert len(ta) != len(tc) or not ta.equals(tc)
    assert not np.array_equal(a.train.histories["clicked"].values[:50], c.train.histories["clicked"].values[:50])


def test_task_correlation_controls_affinity_correlation():
    corr = {}
    for c in (1.0, 0.0, -0.5):
        s = simulate(**SMALL, task_correlation=c)
        corr[c] = np.corrcoef(s.affinity["click"], s.affinity["cart"])[0, 1]
        w = s.task_vectors
        assert np.dot(w["click"], w["cart"]) == pytest.approx(c, abs=1e-9)
        assert np.linalg.norm(w["cart"]) == pytest.approx(1.0)
    assert corr[1.0] == pytest.approx(1.0, abs=1e-9)
    assert corr[1.0] > corr[0.0] > corr[-0.5]
    assert abs(corr[0.0]) < 0.2
    assert corr[-0.5] < -0.2


def test_order_correlation_option():
    s = simulate(**SMALL, task_correlation=0.0, order_correlation=0.9)
    assert np.dot(s.task_vectors["cart"], s.task_vectors["order"]) == pytest.approx(0.9)
    assert np.dot(s.task_vectors["click"], s.task_vectors["order"]) == pytest.approx(0.0, abs=1e-9)


def test_base_rates_and_funnel(sim):
    imp = sim.impressions
    rates = {t: imp[t].mean() for t in ("click", "cart", "order")}
    assert 0.10 <= rates["click"] <= 0.30, rates
    assert 0.03 <= rates["cart"] <= 0.08, rates
    assert 0.01 <= rates["order"] <= 0.03, rates
    for table in (imp, sim.pre_impressions):
        assert (table["cart"] <= table["click"]).all()
        assert (table["order"] <= table["cart"]).all()


def test_labels_are_predictable_but_noisy(sim):
    # the true click affinity ranks clicks well above chance but not perfectly
    imp = sim.impressions
    y, s = imp["click"].to_numpy(), sim.affinity["click"]
    pos, neg = s[y == 1], s[y == 0]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert 0.6 < auc < 0.95


def test_schema_and_item_table(ds):
    schema = ds.schema
    assert schema.task_names == ["click", "cart", "order"]
    assert all(t.space is None for t in schema.tasks)
    assert schema.user_id == "user_id" and schema.timestamp == "time" and schema.item_id == "item_id"
    assert [s.name for s in schema.sequences] == ["clicked", "carted"]
    assert all(s.max_len == SMALL["history_len"] for s in schema.sequences)
    assert schema.item_fields == ["item_id", "category", "brand"]
    assert set(ds.item_table) == {"category", "brand"}
    assert len(ds.item_table["category"]) == ds.vocab_sizes["item_id"]
    assert synthetic_schema().sequences[0].max_len == 30
    for split in ("train", "valid", "test"):
        s = ds.split(split)
        assert s.histories["clicked"].shape == (len(s), SMALL["history_len"])
        assert s.user is not None and s.time is not None and s.request is not None
        # label masks cover the whole impression space
        assert all(m.all() for m in s.label_mask.values())


def test_requests_contiguous_and_within_one_split(ds):
    raw = build_raw(**SMALL)
    ids = {split: set(getattr(raw, split).table["request_id"]) for split in ("train", "valid", "test")}
    assert not ids["train"] & ids["valid"] and not ids["train"] & ids["test"] and not ids["valid"] & ids["test"]
    # split by request time: every train request is before every valid request, etc.
    times = {split: getattr(raw, split).table["time"] for split in ("train", "valid", "test")}
    assert times["train"].max() <= times["valid"].min() <= times["valid"].max() <= times["test"].min()
    n_req = sum(len(v) for v in ids.values())
    assert 0.75 < len(ids["train"]) / n_req < 0.85
    for split in ("train", "valid", "test"):
        s = ds.split(split)
        req = s.request
        assert req[0] == 0 and np.all(np.diff(req) >= 0) and np.all(np.diff(req) <= 1)
        sizes = np.bincount(req)
        assert (sizes == SMALL["candidates_per_request"]).all()
        starts = np.cumsum(sizes) - sizes
        # one user, one time, one context and one history per request
        for arr in (s.user, s.time, s.categorical["device"], s.categorical["hour"], s.histories["clicked"]):
            np.testing.assert_array_equal(arr, np.repeat(arr[starts], sizes, axis=0))
        # candidates of a request are distinct items
        items = s.categorical["item_id"].reshape(-1, SMALL["candidates_per_request"])
        raw_items = getattr(raw, split).table["item_id"].to_numpy().reshape(-1, SMALL["candidates_per_request"])
        assert all(len(set(r)) == len(r) for r in raw_items)
        assert items.shape[0] == len(sizes)


def test_histories_strictly_before_requests(ds, sim):
    t0 = BASE_TIME + SyntheticConfig().history_days * DAY
    assert sim.impressions["time"].min() >= t0
    assert sim.pre_impressions["time"].max() < t0
    for split in ("train", "valid", "test"):
        s = ds.split(split)
        for seq in ("clicked", "carted"):
            times, codes = s.history_times[seq], s.histories[seq]
            assert ((times == -1) == (codes == 0)).all()  # padding is consistent
            real = times[times >= 0]
            assert len(real) and real.max() < s.time.min()
            # left padding (-1), then oldest first: times are non-decreasing along each row
            assert (np.diff(times, axis=1) >= 0).all()
    # the clicked history of a user is its last clicked items of the pre-period
    pre = sim.pre_impressions
    h = sim.histories["clicked"]
    for user in (0, 1, 7):
        clicked = pre[(pre["user_id"] == user) & (pre["click"] == 1)]["item_id"].to_numpy()
        expected = clicked[-SMALL["history_len"]:]
        np.testing.assert_array_equal(h.values[h.offsets[user]:h.offsets[user + 1]], expected)
    carted = sim.histories["carted"]
    assert np.diff(carted.offsets).max() <= SMALL["history_len"]


def test_cache_hit_and_key(cache_root, ds):
    assert ds.info["cache_hit"] is False
    again = load_dataset("synthetic", cache_root=cache_root, **SMALL)
    assert again.info["cache_hit"] is True
    np.testing.assert_array_equal(again.train.categorical["item_id"], ds.train.categorical["item_id"])
    np.testing.assert_array_equal(again.test.histories["carted"], ds.test.histories["carted"])
    other = load_dataset("synthetic", cache_root=cache_root, **SMALL, label_noise=1.0)
    assert other.info["cache_hit"] is False
    assert other.info["cache_dir"] != ds.info["cache_dir"]
    assert ds.info["config"]["label_noise"] == 0.5 and other.info["config"]["label_noise"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# List effects: each one is real in the generated labels, and off by default
# ---------------------------------------------------------------------------------------------------------------------
LISTS = dict(num_users=1000)  # about 35 k impressions in requests of 20: enough for the stratified rates below


def _stratified_gap(labels: np.ndarray, utility: np.ndarray, flag: np.ndarray) -> float:
    """Click rate of the flagged rows minus the others', within deciles of the list-blind utility (so a difference
    is not the item's or user's own appeal), averaged over deciles weighted by size."""
    bins = np.searchsorted(np.quantile(utility, np.linspace(0, 1, 11)[1:-1]), utility)
    gaps, weights = [], []
    for b in range(10):
        rows = bins == b
        yes, no = labels[rows & flag], labels[rows & ~flag]
        if len(yes) > 20 and len(no) > 20:
            gaps.append(yes.mean() - no.mean())
            weights.append(rows.sum())
    return float(np.average(gaps, weights=weights))


def _pool_statistics(s) -> dict[str, np.ndarray]:
    """Per impression: its click, list-blind utility, how strong its competitors are (log-mean-exp of the other
    candidates' utilities) and how many other candidates share its category."""
    n = s.config.candidates_per_request
    utility = s.click_utility.reshape(-1, n)
    top = utility.max(axis=1, keepdims=True)
    shares = np.exp(utility - top)
    category = s.impressions["category"].to_numpy().reshape(-1, n)
    return {
        "click": s.impressions["click"].to_numpy(),
        "utility": s.click_utility,
        "competitors": (np.log(shares.sum(axis=1, keepdims=True) - shares) + top).ravel(),
        "same_category": ((category[:, :, None] == category[:, None, :]).sum(axis=2) - 1).ravel(),
        "best_other": np.where(np.eye(n, dtype=bool), -np.inf, utility[:, None, :]).max(axis=2).ravel(),
    }


@pytest.fixture(scope="module")
def plain():
    return _pool_statistics(simulate(**LISTS))


def test_default_data_is_the_published_one():
    """The list effects are off by default and the default world is byte for byte the one of generator v1 (the
    digest was taken from v1), so the published synthetic results stay reproducible."""
    s = simulate()
    assert s.config.list_effects == dict.fromkeys(LIST_EFFECTS, 0.0)
    digest = hashlib.sha256()
    for column in ("user_id", "item_id", "time", "click", "cart", "order"):
        digest.update(s.impressions[column].to_numpy().tobytes())
    assert digest.hexdigest() == "73a840f80e721ed5c120ddc7fcf7e4c1e48a666bf8d22cd50b033f636b05e1eb"


def test_choice_competition_lowers_clicks_next_to_better_alternatives(plain):
    stats = _pool_statistics(simulate(**LISTS, choice_competition=1.0))
    strong = stats["competitors"] > np.median(stats["competitors"])
    assert _stratified_gap(stats["click"], stats["utility"], strong) < -0.08
    no_effect = _stratified_gap(plain["click"], plain["utility"], plain["competitors"] > np.median(plain["competitors"]))
    assert abs(no_effect) < 0.03
    # the ground truth itself: one item, the same pool but for one alternative that gets better
    utility = np.array([[0.0, -1.0, -1.0, -1.0], [0.0, 2.0, -1.0, -1.0]])
    category = np.arange(8).reshape(2, 4)
    logits = list_effect_logits(utility, category, np.zeros_like(utility, dtype=bool), {"choice_competition": 1.0})
    assert logits[1, 0] < logits[0, 0] - 1.0


def test_strongest_competitor_lowers_clicks_next_to_one_outstanding_alternative():
    utility = np.array([[0.0, -1.0, -1.0, -1.0], [0.0, 3.0, -1.0, -1.0], [0.0, 1.0, 1.0, 1.0]])
    category = np.arange(12).reshape(3, 4)
    logits = list_effect_logits(utility, category, np.zeros_like(utility, dtype=bool), {"strongest_competitor": 1.0})
    # one outstanding alternative lowers item 0 by its utility; three good ones by no more than one of them
    assert logits[1, 0] == pytest.approx(-3.0) and logits[2, 0] == pytest.approx(-1.0)
    assert logits[1, 1] == pytest.approx(3.0)  # the outstanding item itself competes with the best of the rest (0)
    s = simulate(**LISTS, strongest_competitor=1.0)
    stats = _pool_statistics(s)
    assert s.config.list_effects["strongest_competitor"] == 1.0
    assert _stratified_gap(stats["click"], stats["utility"], stats["best_other"] > np.median(stats["best_other"])) < -0.05


def test_conversion_effects_lower_add_to_cart_on_crowded_pages():
    quality = np.array([[0.0, 1.0, -1.0, 0.5]])
    category = np.array([[1, 1, 2, 3]])
    brand = np.array([[7, 8, 7, 9]])
    shift = conversion_effect_logits(quality, category, brand, {"conversion_competition": 1.0})
    assert shift.tolist() == [[-1.0, 0.0, 0.0, 0.0]]  # only item 0 has a better item of its category on the page
    shift = conversion_effect_logits(quality, category, brand, {"brand_repeat": 0.5})
    assert shift.tolist() == [[-0.5, 0.0, -0.5, 0.0]]  # brand 7 shown twice
    plain, paged = simulate(**LISTS), simulate(**LISTS, brand_repeat=1.0)
    assert (plain.impressions["click"] == paged.impressions["click"]).all()  # the click is untouched
    table = paged.impressions
    repeated = table.groupby(["request_id", "brand"])["item_id"].transform("size").to_numpy() > 1
    clicked = table["click"].to_numpy() == 1
    rate = table["cart"].to_numpy()[clicked]
    assert rate[repeated[clicked]].mean() < rate[~repeated[clicked]].mean() - 0.05
    assert abs(table["cart"].mean() - plain.impressions["cart"].mean()) < 0.005  # the base rate holds


def test_request_intent_shapes_the_pool_and_the_clicks(plain):
    s = simulate(**LISTS, request_intent=1.0)
    stats = _pool_statistics(s)
    # retrieval: the intent category is over-represented in its pool (the pool reveals the intent) ...
    intent_share = (s.impressions["category"].to_numpy() == s.intent).mean()
    blind = simulate(**LISTS)
    assert intent_share > 2 * (blind.impressions["category"].to_numpy() == blind.intent).mean()
    # ... and engagement: an item whose category fills its pool is clicked more than the same appeal alone
    assert _stratified_gap(stats["click"], stats["utility"], stats["same_category"] >= 2) > 0.05
    assert abs(_stratified_gap(plain["click"], plain["utility"], plain["same_category"] >= 2)) < 0.03


def test_satiation_lowers_clicks_among_similar_items(plain):
    stats = _pool_statistics(simulate(**LISTS, satiation=1.0))
    assert _stratified_gap(stats["click"], stats["utility"], stats["same_category"] >= 2) < -0.05
    assert _stratified_gap(stats["click"], stats["utility"], stats["same_category"] == 0) > 0.05


def test_oracle_probabilities_and_metrics():
    plain_raw, lists_raw = build_raw(**LISTS), build_raw(**LISTS, preset="lists", strength=1.0)
    for raw in (plain_raw, lists_raw):
        assert set(raw.info["oracle"]) == {"train", "valid", "test"}
        assert raw.info["oracle"]["test"]["order"]["auc"] > 0.9
    # without list effects the oracle's click ranking is the list-blind utility's; with them, the pool explains more
    assert plain_raw.info["oracle"]["test"]["click"]["auc"] == pytest.approx(plain_raw.info["list_blind_click_auc"]["test"])
    assert lists_raw.info["oracle"]["test"]["click"]["auc"] > lists_raw.info["list_blind_click_auc"]["test"] + 0.05
    assert lists_raw.info["list_effects"] == {**dict.fromkeys(LIST_EFFECTS, 0.0), "request_intent": 1.0,
                                              "satiation": 1.0, "choice_competition": 1.0}
    # the probabilities are calibrated: the mean probability in each decile matches the label rate
    s = simulate(**LISTS, preset="lists", strength=1.0)
    for task in ("click", "cart"):
        p, y = s.probability[task], s.impressions[task].to_numpy()
        bins = np.searchsorted(np.quantile(p, np.linspace(0, 1, 11)[1:-1]), p)
        for b in range(10):
            assert abs(p[bins == b].mean() - y[bins == b].mean()) < 0.03, (task, b)
    assert (s.probability["order"] <= s.probability["cart"]).all() and (s.probability["cart"] <= s.probability["click"]).all()


def test_list_effect_options_are_validated():
    assert SyntheticConfig(preset="pages", strength=0.5).list_effects == dict.fromkeys(LIST_EFFECTS, 0.5)
    assert SyntheticConfig(preset="lists", strength=0.5).list_effects["strongest_competitor"] == 0.0
    with pytest.raises(SchemaError, match="unknown preset 'list'"):
        SyntheticConfig(preset="list")
    with pytest.raises(SchemaError, match="give either the preset or those options"):
        SyntheticConfig(preset="lists", satiation=0.3)
    with pytest.raises(SchemaError, match="satiation must be a finite number >= 0"):
        SyntheticConfig(satiation=-1.0)
    with pytest.raises(SchemaError, match="strength"):
        SyntheticConfig(preset="lists", strength=float("nan"))
