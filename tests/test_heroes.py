"""HEROES and its session data: session grouping and batching, causality, the gate's copy / update, the batched
recurrence against one session at a time, ESMM's product, the synthetic session excitation, and training runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import shared_data
from onerank import api
from onerank.data.batching import BatchLoader, TensorSplit, tensor_splits
from onerank.data.registry import load_dataset
from onerank.data.schema import SchemaError
from onerank.data.sessions import SessionRule, apply_session_rule, group_sessions, session_rule
from onerank.data.synthetic import simulate
from onerank.features.space import FeatureSpace
from onerank.models import build_model
from onerank.models.heroes import HEROESConfig, HierarchicalCell
from onerank.training.config import RunConfig, TrainConfig
from test_tabular import ROOT, code_block
from zoo_helpers import REAL_DATA_EPOCHS, tiny_config, train_tiny

SESSION_MODELS = ["heroes", "esmm_gru"]
HEROES_VARIANTS = [{}, {"gate": False}, {"top_down": False}, {"unit": "hawkes"}]


@pytest.fixture(scope="module")
def dataset():
    """The tiny HEROES configuration's synthetic data (excitation on), with sessions of a week: a user's requests
    (8 impressions each) join into sessions of 8, 16, 24, ... impressions."""
    options = {**tiny_config("heroes").dataset_options, "session_gap": "7D"}
    return load_dataset("synthetic", **options)


@pytest.fixture(scope="module")
def session_batch(dataset):
    batches = BatchLoader(tensor_splits(dataset)["train"], 96, shuffle=True, by_session=True)
    return next(b for b in batches if len(set(b.session_layout()[1].sum(1).tolist())) > 1)  # of unequal lengths


def model_for(name: str, dataset, **options):
    torch.manual_seed(0)
    return build_model(name, FeatureSpace.from_dataset(dataset), {**tiny_config(name).model_options, **options}).eval()


# ---- sessions -------------------------------------------------------------------------------------------------------
def test_sessions_are_whole_requests_of_one_user_cut_at_the_gap():
    # user 0: requests 0 (t 0-5) and 1 (t 8) join (gap 3 < 5); request 2 starts 10 after request 1 ends: new session.
    # user 1: request 3 at t 1, alone. Rows in a scrambled order: the ids must not depend on it.
    user = np.array([0, 0, 0, 0, 1, 0])
    time = np.array([0, 5, 8, 18, 1, 20])
    request = np.array([0, 0, 1, 2, 3, 2])
    order = np.array([3, 0, 5, 4, 1, 2])
    session = group_sessions(user[order], time[order], request[order], max_gap=5)
    expected = np.array([0, 0, 0, 1, 2, 1])[order]
    assert session.tolist() == expected.tolist()
    # a gap equal to the limit cuts; max_size cuts at the first request starting after that many impressions
    assert group_sessions(user, time, request, max_gap=3).tolist() == [0, 0, 1, 2, 3, 2]
    assert group_sessions(user, time, request, max_gap=100, max_size=2).tolist() == [0, 0, 1, 1, 2, 1]


def test_a_request_of_two_users_is_refused():
    with pytest.raises(SchemaError, match="several users"):
        group_sessions(np.array([0, 1]), np.array([0, 1]), np.array([0, 0]), max_gap=5)


def test_session_options_are_checked_with_one_line_errors():
    with pytest.raises(SchemaError, match="session_order"):
        session_rule({"session_gap": 5, "session_order": "random"}, {})
    with pytest.raises(SchemaError, match="session_gap"):
        session_rule({"session_gap": -1}, {})
    with pytest.raises(SchemaError, match="time unit"):
        session_rule({"session_gap": "30min"}, {"time_unit": None})
    with pytest.raises(SchemaError, match="need session_gap"):
        session_rule({"session_max_size": 5}, {})
    assert session_rule({"session_gap": "30min"}, {"time_unit": "ms"}).max_gap == 1_800_000
    assert session_rule({}, {}) is None


def test_applying_a_rule_makes_sessions_contiguous_and_time_ordered(tiny_dataset):
    ds = apply_session_rule(tiny_dataset, SessionRule(max_gap=50, max_size=12))
    for name in ("train", "valid", "test"):
        split, before = ds.split(name), tiny_dataset.split(name)
        assert len(split) == len(before)
        session, request = split.session, split.request
        assert (np.diff(session) >= 0).all() and (np.diff(request) >= 0).all()  # contiguous, numbered in order
        same = np.diff(session) == 0
        assert (np.diff(split.time)[same] >= 0).all()  # time order within a session
        assert (split.user[1:][same] == split.user[:-1][same]).all()  # one user per session
        # whole requests: a request never spans two sessions
        assert len(np.unique(np.stack([request, session]), axis=1)[0]) == request.max() + 1
        # the same impressions, reordered: labels and times are a permutation of the split's
        assert sorted(split.time.tolist()) == sorted(before.time.tolist())


def test_the_shuffled_control_keeps_each_session_and_request_but_not_its_order(tiny_dataset):
    rule = SessionRule(max_gap=50)
    ordered = apply_session_rule(tiny_dataset, rule).train
    shuffled = apply_session_rule(tiny_dataset, dataclasses.replace(rule, order="shuffled")).train
    assert (ordered.session == shuffled.session).all()
    for s in range(3):
        a, b = ordered.session == s, shuffled.session == s
        assert sorted(ordered.time[a].tolist()) == sorted(shuffled.time[b].tolist())
    assert (np.diff(shuffled.request) >= 0).all()  # requests still whole and contiguous
    assert not (np.diff(shuffled.time)[np.diff(shuffled.session) == 0] >= 0).all()
    again = apply_session_rule(tiny_dataset, dataclasses.replace(rule, order="shuffled")).train
    assert (again.time == shuffled.time).all()  # seeded


def test_session_batches_hold_whole_sessions_in_time_order(tiny_dataset):
    ds = apply_session_rule(tiny_dataset, SessionRule(max_gap=50))
    split = TensorSplit(ds.train, ds.item_table, ds.schema.item_id)
    seen = []
    for batch in BatchLoader(split, 40, shuffle=True, seed=3, by_session=True).epoch(1):
        slot, mask = batch.session_layout()
        times = batch.dense["price"]  # any per-row column: check rows against the split through the user column
        assert times.shape[0] == batch.size
        assert batch.num_requests == int(batch.request.max()) + 1
        # every session of the batch is one whole session of the split, in its row order
        for s in range(slot.shape[0]):
            rows = slot[s][mask[s]]
            users = batch.user[rows]
            assert (users == users[0]).all()
        seen.append(batch.size)
    assert sum(seen) == len(ds.train)
    # unshuffled, the batches cover the rows in split order (what prediction relies on)
    rows = torch.cat([b.user for b in BatchLoader(split, 40, by_session=True)])
    assert (rows == split.user).all()


def test_without_a_rule_each_request_is_a_session(tiny_dataset):
    split = tensor_splits(tiny_dataset)["train"]
    assert (split.session == split.request).all()
    batch = next(iter(BatchLoader(split, 25, by_session=True)))
    assert (batch.session == batch.request).all()


# ---- the model ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", [("heroes", v) for v in HEROES_VARIANTS] + [("esmm_gru", {})])
def test_no_score_depends_on_a_later_impression(dataset, session_batch, name, options):
    model = model_for(name, dataset, **options)
    slot, mask = session_batch.session_layout()
    session = int(torch.argmax(mask.sum(1)))  # the longest session of the batch
    rows = slot[session][mask[session]]
    assert len(rows) >= 4
    cut = len(rows) // 2
    later = rows[cut:]
    changed = dataclasses.replace(session_batch, categorical=dict(session_batch.categorical),
                                  dense=dict(session_batch.dense))
    for field, codes in changed.categorical.items():
        codes = codes.clone()
        codes[later] = torch.randint(2, 5, (len(later),))
        changed.categorical[field] = codes
    changed.dense = {k: v.clone().index_fill_(0, later, 3.0) for k, v in changed.dense.items()}
    with torch.no_grad():
        before, after = model(session_batch), model(changed)
    others = torch.ones(session_batch.size, dtype=torch.bool)
    others[rows] = False
    for task in model.tasks:
        assert torch.equal(before[task][rows[:cut]], after[task][rows[:cut]]), task  # earlier: untouched
        assert torch.equal(before[task][others], after[task][others]), task  # other sessions: untouched
        assert not torch.allclose(before[task][later], after[task][later])  # the perturbation is seen


@pytest.mark.parametrize("name,options", [("heroes", v) for v in HEROES_VARIANTS] + [("esmm_gru", {})])
def test_the_batched_recurrence_equals_one_session_at_a_time(dataset, session_batch, name, options):
    model = model_for(name, dataset, **options)
    slot, mask = session_batch.session_layout()
    assert mask.sum(1).min() < mask.shape[1]  # sessions of different lengths: padding is exercised
    with torch.no_grad():
        batched = model(session_batch)
        for s in range(slot.shape[0]):
            rows = slot[s][mask[s]]
            alone = model(session_batch.slice(int(rows[0]), int(rows[-1]) + 1))
            for task in model.tasks:
                assert torch.allclose(batched[task][rows], alone[task], atol=1e-5), (task, s)


def test_the_upper_layer_is_copied_where_the_gate_is_closed_and_updated_where_it_is_open():
    torch.manual_seed(0)
    cell = HierarchicalCell(6, HEROESConfig(hidden=4))
    state = {k: torch.randn(3, 4) for k in ("s_c", "s_c_bar", "H_c", "s_v", "s_v_bar", "H_v")}
    x = torch.randn(3, 6)
    lower = cell.lower_step(cell.lower.project(x), state, torch.zeros(3, 1))
    closed = cell.upper_step(cell.upper.project(x), state, lower, torch.zeros(3, 1))
    for key in ("s_v", "s_v_bar", "H_v"):
        assert torch.equal(closed[key], state[key])  # copy: exactly the previous state
    opened = cell.upper_step(cell.upper.project(x), state, lower, torch.ones(3, 1))
    half = cell.upper_step(cell.upper.project(x), state, lower, torch.full((3, 1), 0.5))
    assert not torch.allclose(opened["H_v"], state["H_v"])
    assert torch.allclose(half["s_v"], 0.5 * (state["s_v"] + opened["s_v"]))  # a soft gate mixes the two
    # the lower layer after a boundary forgets its own memory (flush) and is seeded from above
    other = {**state, "s_c": torch.randn(3, 4) * 5, "s_c_bar": torch.randn(3, 4)}
    flushed = [cell.lower_step(cell.lower.project(x), s, torch.ones(3, 1))["s_c"] for s in (state, other)]
    assert torch.allclose(flushed[0], flushed[1])
    kept = [cell.lower_step(cell.lower.project(x), s, torch.zeros(3, 1))["s_c"] for s in (state, other)]
    assert not torch.allclose(kept[0], kept[1])


def test_without_the_gate_the_upper_layer_updates_at_every_impression(dataset, session_batch):
    gated, flat = model_for("heroes", dataset), model_for("heroes", dataset, gate=False)
    with torch.no_grad():
        assert not torch.allclose(gated(session_batch)["cart"], flat(session_batch)["cart"])


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_ctcvr_is_ctr_times_cvr(dataset, session_batch, name):
    model = model_for(name, dataset)
    with torch.no_grad():
        out, steps = model(session_batch), model.step_logits(session_batch)
        probs = model.funnel_probabilities(session_batch)
    assert model.funnel == ["click", "cart", "order"]
    assert torch.allclose(probs["pCTCVR"], probs["pCTR"] * probs["pCVR"], atol=1e-6)
    ctr, cvr = torch.sigmoid(steps["click"]), torch.sigmoid(steps["cart"])
    assert torch.allclose(torch.sigmoid(out["cart"]), ctr * cvr, atol=1e-6)
    assert torch.allclose(torch.sigmoid(out["order"]), ctr * cvr * torch.sigmoid(steps["order"]), atol=1e-6)


def test_a_batch_without_sessions_scores_each_impression_alone(dataset, session_batch):
    model = model_for("heroes", dataset)
    alone = dataclasses.replace(session_batch, session=None)
    with torch.no_grad():
        got = model(alone)
        for row in (0, 5):
            one = model(alone.slice(row, row + 1))
            assert torch.allclose(got["click"][row], one["click"][0], atol=1e-6)


# ---- synthetic session excitation -----------------------------------------------------------------------------------
def test_the_excitation_raises_clicks_after_clicks_and_changes_nothing_else():
    options = dict(num_users=400, num_items=200, history_requests=2.0, candidates_per_request=10)
    off, on = simulate(**options), simulate(**options, session_excitation=1.5)
    same = ["request_id", "time", "user_id", "item_id", "price", "device", "hour", "split"]
    assert off.impressions[same].equals(on.impressions[same])  # users, items, requests, times: unchanged
    n = 10

    def after_click_rate(imp):
        click = imp["click"].to_numpy().reshape(-1, n)
        previous = click[:, :-1].astype(bool)
        return click[:, 1:][previous].mean(), click[:, 1:][~previous].mean()

    followed, not_followed = after_click_rate(on.impressions)
    assert followed > not_followed + 0.05  # engagement on an earlier item raises the next click
    base_followed, base_not = after_click_rate(off.impressions)
    assert abs(base_followed - base_not) < followed - not_followed
    for sim in (off, on):
        imp = sim.impressions
        assert abs(imp["click"].mean() - 0.2) < 0.02  # the base rate holds at every strength
        assert ((imp["cart"] <= imp["click"]) & (imp["order"] <= imp["cart"])).all()
    # the oracle knows the earlier clicks: it ranks clicks better than the same model without the excitation
    assert on.probability["click"].std() > 0 and on.intercepts["click"] != off.intercepts["click"]


def test_strength_zero_is_the_default_world():
    a, b = simulate(num_users=150, num_items=100), simulate(num_users=150, num_items=100, session_excitation=0.0)
    assert a.impressions.equals(b.impressions)
    assert all(np.array_equal(a.probability[t], b.probability[t]) for t in a.probability)


# ---- training -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SESSION_MODELS)
def test_tiny_config_trains_on_synthetic(name):
    train_tiny(name)


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_session_models_learn_the_tiny_dataset_with_its_requests_as_sessions(tiny_dataset, name):
    config = RunConfig(model=name, model_options=tiny_config(name).model_options,
                       train=TrainConfig(epochs=4, batch_size=64, lr=3e-3, progress=False, tensorboard=False, seed=7))
    assert api.train(config, dataset=tiny_dataset)["test"]["click"]["auc"] > 0.6


def test_a_session_model_refuses_the_streaming_loader(tiny_dataset, tmp_path):
    config = RunConfig(model="heroes", train=TrainConfig(epochs=1, streaming="on", progress=False, tensorboard=False))
    with pytest.raises(ValueError, match="streaming"):
        api.build_trainer(config, tiny_dataset, out_dir=tmp_path)


def test_onerank_train_heroes_runs_on_the_tabular_docs_example(tmp_path):
    from onerank.cli import main

    doc = (ROOT / "docs" / "tabular_example.md").read_text()
    shop = tmp_path / "my_shop"
    shop.mkdir()
    (shop / "interactions.csv").write_text(code_block(doc, "csv"))
    (shop / "shop.yaml").write_text(code_block(doc, "yaml"))

    code = main(["train", "--dataset", "tabular", "--data-dir", str(shop), "--dataset-option",
                 f"schema={shop / 'shop.yaml'}", "--dataset-option", "session_gap=1h", "--model", "heroes",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    assert (tmp_path / "run" / "metrics.json").exists()


def test_heroes_trains_on_a_kuairand_slice_with_sessions():
    ds = load_dataset("kuairand", str(shared_data("kuairand-pure")), history_len=8, tasks="click,long_view",
                      session_gap="1h", session_max_size=50)
    assert ds.info["session_rule"]["max_gap"] == 3_600_000
    assert ds.info["train_sessions"]["mean_size"] > 1
    from zoo_helpers import sample_dataset

    small = sample_dataset(ds)
    small = apply_session_rule(small, SessionRule(max_gap=3_600_000, max_size=50))  # a sample's rows, re-grouped
    train_tiny("heroes", dataset=small, epochs=REAL_DATA_EPOCHS)


def test_a_bad_session_option_ends_the_cli_with_one_line_and_exit_code_2(tmp_path, capsys):
    from onerank.cli import main

    args = ["train", "--dataset", "synthetic", "--dataset-option", "num_users=60", "--dataset-option",
            "num_items=40", "--model", "heroes", "--epochs", "1", "--cache-dir", str(tmp_path / "cache")]
    for option, message in (("session_order=random", "session_order"), ("session_gap=soon", "session_gap"),
                            ("session_max_size=0", "session_max_size")):
        assert main(args + ["--dataset-option", option, "--out", str(tmp_path / option)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_sweep_over_a_categorical_option_is_drawn_one_position_per_value(tmp_path):
    from onerank.benchmarking.plots import auc_vs_variant

    def block(auc: float) -> dict:
        tasks = {"click": {"auc": {"mean": auc, "std": 0.01}}}
        return {"tasks": ["click"], "models": {m: {"ablation": False, "tasks": tasks} for m in ("esmm", "heroes")}}

    results = {"summary": {"time": block(0.70), "shuffled": block(0.68)}}
    path = auc_vs_variant(results, "session_order", "heroes", tmp_path)
    assert path and (tmp_path / "auc_vs_session_order.png").stat().st_size > 0
