"""Real-log features of the tabular loader on generated funnel logs (issue 16): entire-space labels, an events table
with leakage-free histories, request-level fields checked per request, label transforms and loss scales, trained
out-of-vocabulary rows, and errors that name the column and the fix."""

import logging
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from funnel_log import funnel_log

from onerank.data.batching import TensorSplit, drop_to_oov
from onerank.data.encoding import OOV, PAD, Encoders, LabelTransform
from onerank.data.schema import Schema, SchemaError, TaskSpec
from onerank.data.tabular import load
from onerank.objectives.losses import MultiTaskObjective
from onerank.training.trainer import dwarfing_loss_warning


@pytest.fixture(scope="module")
def log():
    return funnel_log(num_users=160, num_ads=60, seed=1)


def load_log(log, folder, **schema_options):
    return load(None, folder / "cache", schema=str(log.write(folder, **schema_options)))


def item_names(ds, codes):
    vocab = ds.encoders.vocabularies[ds.schema.item_id].to_list()
    return [vocab[c - 2] if c > OOV else c for c in codes if c != PAD]


# ---- 1. entire-space labels ------------------------------------------------------------------------------------------
def test_missing_conversion_outside_clicks_is_masked(log, tmp_path):
    assert log.impressions["cv"].isna().sum() == (log.impressions["clk"] == 0).sum() > 0
    ds = load_log(log, tmp_path)
    for split in ("train", "valid", "test"):
        s = ds.split(split)
        assert np.array_equal(s.label_mask["conversion"], s.labels["click"] > 0.5)
        assert np.isfinite(s.labels["conversion"]).all() and np.isfinite(s.labels["dwell"]).all()
        assert set(np.unique(s.labels["conversion"][s.label_mask["conversion"]])) <= {0.0, 1.0}


def test_missing_label_inside_its_space_names_the_rows_and_the_fix(log, tmp_path):
    frame = log.impressions.copy()
    clicked = np.flatnonzero(frame["clk"].to_numpy() == 1)
    frame.loc[clicked[:2], "cv"] = np.nan
    schema = log.write(tmp_path)
    frame.to_csv(tmp_path / "ads.csv", index=False)
    with pytest.raises(SchemaError, match=r"label column 'cv' \(task 'conversion'\) has 2 NaN labels inside its "
                                          r"space \(click = 1\) at rows \d+, \d+; fill or drop those rows"):
        load(None, tmp_path / "cache", schema=str(schema))
    # without a space, a NaN conversion is an error whose fix is the space
    raw = yaml.safe_load(schema.read_text())
    raw["tasks"] = [{"name": "click", "column": "clk"}, {"name": "conversion", "column": "cv"}]
    schema.write_text(yaml.safe_dump(raw))
    log.impressions.to_csv(tmp_path / "ads.csv", index=False)
    with pytest.raises(SchemaError, match=r"declare `space: <task>`"):
        load(None, tmp_path / "cache", schema=str(schema))


# ---- 2. events table -------------------------------------------------------------------------------------------------
def write_tiny(folder, impressions, events, extra_yaml=""):
    impressions.to_csv(folder / "imp.csv", index=False)
    events.to_csv(folder / "ev.csv", index=False)
    (folder / "s.yaml").write_text(textwrap.dedent("""
        files: {train: imp.csv, valid: imp.csv, test: imp.csv, events: ev.csv}
        events: {type: what, time: at}
        histories: {clicked: {event: click}, converted: {event: [conversion]}}
        user_id: u
        timestamp: t
        request_id: r
        item_id: i
        categorical: [{name: u, group: user, min_count: 1}, {name: i, group: item, min_count: 1}]
        sequences: [clicked, converted]
        tasks: [{name: y}]
    """) + extra_yaml)
    return folder / "s.yaml"


def test_events_are_cut_strictly_before_the_request_start_at_their_own_time(tmp_path):
    # user 1: a request at t=1000 (two candidates) and one at t=5000, times in milliseconds
    impressions = pd.DataFrame({"r": [1, 1, 2], "u": [1, 1, 1], "i": [10, 11, 12], "t": [1000, 1000, 5000],
                                "y": [1, 0, 0]})
    events = pd.DataFrame({
        "u": [1, 1, 1, 1, 1],
        "i": [20, 21, 10, 10, 22],
        "what": ["click", "click", "click", "conversion", "click"],
        # 999: 1 ms before the first request -> seen; 1001: 1 ms after its start -> never in it; the click on item 10
        # at 1030 converts at 4000 (logged later than the click): placed at 4000, so only the 5000 request sees it.
        # 5000: at the second request's start -> not earlier, not seen.
        "at": [999, 1001, 1030, 4000, 5000],
    })
    ds = load(None, tmp_path / "cache", schema=str(write_tiny(tmp_path, impressions, events)))
    test = ds.test
    first = np.flatnonzero(test.time == 1000)
    second = np.flatnonzero(test.time == 5000)
    for row in first:
        assert item_names(ds, test.histories["clicked"][row]) == [20]  # 1001 is 1 ms too late
        assert item_names(ds, test.histories["converted"][row]) == []
    assert item_names(ds, test.histories["clicked"][second[0]]) == [20, 21, 10]
    assert item_names(ds, test.histories["converted"][second[0]]) == [10]
    assert test.history_times["converted"][second[0]][-1] == 4000  # the conversion's own time, not the click's
    assert ds.info["event_rows"] == 5


def test_events_table_errors_name_the_column(tmp_path):
    impressions = pd.DataFrame({"r": [1], "u": [1], "i": [10], "t": [1000], "y": [1]})
    events = pd.DataFrame({"u": [1], "i": [20], "what": ["click"], "at": ["2024-01-01"]})
    with pytest.raises(SchemaError, match="time column 'at' holds dates but the timestamp column 't' holds numbers"):
        load(None, tmp_path / "cache", schema=str(write_tiny(tmp_path, impressions, events)))
    with pytest.raises(SchemaError, match=r"no type column 'what'.*`events: \{type: COLUMN\}`"):
        load(None, tmp_path / "c2", schema=str(write_tiny(tmp_path, impressions, events.rename(columns={"what": "x"}))))
    events = pd.DataFrame({"u": [1], "i": ["ad-10"], "what": ["click"], "at": [10]})
    with pytest.raises(SchemaError, match=r"no item of the events table occurs in the impressions' 'i' column"):
        load(None, tmp_path / "c4", schema=str(write_tiny(tmp_path, impressions, events)))
    events = pd.DataFrame({"u": [1], "i": [20], "what": ["like"], "at": [10]})
    with pytest.raises(SchemaError, match=r"no event of type \['click'\].*\['like'\]"):
        load(None, tmp_path / "c3", schema=str(write_tiny(tmp_path, impressions, events)))


def test_generated_log_histories_hold_only_events_before_each_request_and_the_pre_period(log, tmp_path):
    ds = load_log(log, tmp_path)
    first_log_time = log.impressions["ts"].min()
    saw_pre_period = False
    for split in ("train", "valid", "test"):
        s = ds.split(split)
        for seq in ("clicked", "converted"):
            times = s.history_times[seq]
            present = s.histories[seq] != PAD
            assert (times[present] < s.time[:, None].repeat(times.shape[1], 1)[present]).all(), (split, seq)
            saw_pre_period |= bool((times[present] < first_log_time).any())
    assert saw_pre_period  # the events table's pre-period feeds the first requests' histories
    # conversions happen after their click (the events table keeps both times)
    ev = log.events
    first_click = ev[ev["kind"] == "click"].groupby(["user", "ad_id"])["t"].min()
    first_conversion = ev[ev["kind"] == "conversion"].groupby(["user", "ad_id"])["t"].min()
    assert (first_conversion > first_click.reindex(first_conversion.index)).all()


def test_histories_from_a_delayed_label_column_warn(log, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="onerank.data.tabular"):
        load_log(log, tmp_path, events=False)
    assert "places each cv at its impression's time" in caplog.text and "files.events" in caplog.text


# ---- 3. request-level fields -----------------------------------------------------------------------------------------
def test_a_context_field_that_varies_within_a_request_is_refused(log, tmp_path):
    with pytest.raises(SchemaError, match=r"context field 'slot' varies within \d+ requests.*declare it `group: impression`"):
        load_log(log, tmp_path, slot_group="context")
    frame = log.impressions.copy()
    frame.loc[1, "dev"] = (frame.loc[0, "dev"] + 1) % 3  # rows 0 and 1 are one request
    assert frame.loc[0, "req"] == frame.loc[1, "req"]
    schema = log.write(tmp_path)
    frame.to_csv(tmp_path / "ads.csv", index=False)
    with pytest.raises(SchemaError, match=r"context field 'dev' varies within 1 requests"):
        load(None, tmp_path / "c2", schema=str(schema))


# ---- 4. label transforms, loss scale, dominance warning --------------------------------------------------------------
def test_regression_labels_are_learned_transformed_and_mapped_back(log, tmp_path):
    ds = load_log(log, tmp_path)
    transform = ds.encoders.label_transforms["dwell"]
    assert transform.log1p
    m = ds.train.label_mask["dwell"]
    assert abs(ds.train.labels["dwell"][m].mean()) < 1e-4 and abs(ds.train.labels["dwell"][m].std() - 1) < 1e-3
    train = log.impressions[log.impressions["ts"] < log.valid_start]
    back = ds.label_values("train")["dwell"][m]
    assert np.allclose(np.sort(back), np.sort(train["dwell"].dropna().to_numpy()), rtol=1e-4)
    assert np.allclose(transform.inverse(transform.transform(np.array([0.0, 3.5, 1500.0]))), [0.0, 3.5, 1500.0],
                       rtol=1e-4, atol=1e-5)
    # a checkpoint's encoders keep the transform; older ones (no key) learned raw labels
    state = ds.encoders.state()
    assert Encoders.from_state(state).label_transforms["dwell"] == transform
    state.pop("label_transforms")
    assert Encoders.from_state(state).label_transforms == {}


def test_default_transforms_and_schema_checks():
    assert TaskSpec("d", kind="regression").label_transform == "standardize"
    assert TaskSpec("c").label_transform == "none"
    with pytest.raises(SchemaError, match="binary task's labels stay 0 / 1"):
        Schema(tasks=[TaskSpec("c", transform="log1p")])
    with pytest.raises(SchemaError, match="transform must be one of"):
        Schema(tasks=[TaskSpec("d", kind="regression", transform="sqrt")])
    with pytest.raises(SchemaError, match="loss_scale must be a positive number"):
        Schema(tasks=[TaskSpec("d", loss_scale=0.0)])
    with pytest.raises(SchemaError, match="oov_dropout must be in"):
        Schema.from_dict({"categorical": [{"name": "a", "oov_dropout": 1.5}], "tasks": ["y"]})
    none = LabelTransform.fit("none", np.array([1.0, 2.0]))
    assert none.mean == 0.0 and none.std == 1.0 and not none.log1p


def test_trainer_predicts_regression_in_label_units_and_warns_on_a_dominant_loss(log, tmp_path, caplog):
    from onerank import api
    from onerank.training.config import RunConfig, TrainConfig

    config = RunConfig(model="mmoe", train=TrainConfig(epochs=1, batch_size=512, progress=False, tensorboard=False))
    raw_ds = load_log(log, tmp_path / "raw", dwell_transform="none")
    with caplog.at_level(logging.WARNING, logger="onerank.training.trainer"):
        trainer = api.build_trainer(config, raw_ds)
        state = trainer.fit()
    assert "task 'dwell'" in state.history[0]["loss_warning"] and "transform: log1p_standardize" in caplog.text
    ds = load_log(log, tmp_path / "fixed")
    trainer = api.build_trainer(config, ds)
    state = trainer.fit()
    assert state.history[0]["loss_warning"] is None
    preds = trainer.predict("test")["dwell"]
    m = ds.test.label_mask["dwell"]
    # in seconds: the median prediction is within a factor 3 of the median dwell (transformed units are ~0)
    ratio = np.median(preds[m]) / np.median(ds.label_values("test")["dwell"][m])
    assert 1 / 3 < ratio < 3
    assert trainer.evaluate("test")["dwell"]["mae"] == pytest.approx(
        float(np.mean(np.abs(preds[m] - ds.label_values("test")["dwell"][m]))), rel=1e-5
    )


def test_loss_scale_multiplies_the_task_loss(log, tmp_path):
    ds = load_log(log, tmp_path)
    split = TensorSplit(ds.train, ds.item_table, ds.schema.item_id)
    batch = split.gather(torch.arange(64))
    logits = {t: torch.linspace(-1, 1, 64) for t in ds.schema.task_names}
    plain = MultiTaskObjective(ds.schema.tasks)(logits, batch)
    scaled_tasks = [TaskSpec(t.name, t.kind, t.column, space=t.space, transform=t.transform,
                             loss_scale=0.25 if t.name == "dwell" else 1.0) for t in ds.schema.tasks]
    scaled = MultiTaskObjective(scaled_tasks)(logits, batch)
    assert torch.isclose(scaled["dwell"], 0.25 * plain["dwell"]) and torch.equal(scaled["click"], plain["click"])


def test_dwarfing_loss_warning():
    tasks = [TaskSpec("click"), TaskSpec("dwell", kind="regression")]
    assert dwarfing_loss_warning({"click": 0.4, "dwell": 0.9}, tasks) is None
    message = dwarfing_loss_warning({"click": 0.4, "dwell": 9000.0}, tasks)
    assert "task 'dwell'" in message and "22500x" in message and "loss_scale" in message


# ---- 5. trained out-of-vocabulary rows -------------------------------------------------------------------------------
def test_min_count_sends_rare_values_to_oov_counting_requests_for_context_fields(log, tmp_path):
    ds1 = load_log(log, tmp_path / "a", min_count=1)
    ds2 = load_log(log, tmp_path / "b", min_count=2)
    assert (ds1.train.categorical["site"] == OOV).sum() == 0
    # a site seen in one train request only (8 rows) is OOV with min_count 2: the OOV row now trains
    train = log.impressions[log.impressions["ts"] < log.valid_start]
    once = train.groupby("site")["req"].nunique()
    once = set(once[once == 1].index)
    rows_once = train["site"].isin(once).sum()
    assert rows_once > 0 and (ds2.train.categorical["site"] == OOV).sum() == rows_once
    assert len(ds2.encoders.vocabularies["site"]) == len(ds1.encoders.vocabularies["site"]) - len(once)


def test_oov_dropout_replaces_a_share_of_codes_and_keeps_padding():
    codes = torch.tensor([0, 1] + [5] * 9998)
    from onerank.data.batching import Batch

    batch = Batch({"uid": codes, "ad": codes.clone()}, {}, {}, {}, {}, torch.zeros(10000, dtype=torch.long))
    torch.manual_seed(0)
    out = drop_to_oov(batch, {"uid": 0.2})
    share = float((out.categorical["uid"][2:] == OOV).float().mean())
    assert 0.18 < share < 0.22
    assert out.categorical["uid"][0] == PAD and torch.equal(out.categorical["ad"], codes)
    assert torch.equal(batch.categorical["uid"], codes)  # the input batch is not modified
    assert drop_to_oov(batch, {}) is batch


def test_training_with_oov_dropout_trains_the_oov_row(log, tmp_path):
    from onerank import api
    from onerank.training.config import RunConfig, TrainConfig

    ds = load_log(log, tmp_path, min_count=1, oov_dropout=0.2)
    assert (ds.train.categorical["uid"] == OOV).sum() == 0
    trainer = api.build_trainer(
        RunConfig(model="mmoe", train=TrainConfig(epochs=1, batch_size=512, progress=False, tensorboard=False)), ds
    )
    emb = next(m for m in trainer.model.modules() if m.__class__.__name__ == "FeatureEmbedding")
    row = emb.offsets["uid"] + OOV
    before = emb.table.weight[row].detach().clone()
    trainer.fit()
    assert not torch.equal(emb.table.weight[row].detach(), before)


# ---- 6. errors for keep_default_na ------------------------------------------------------------------------------------
def test_keep_default_na_error_names_the_column_and_the_fix(log, tmp_path):
    schema = log.write(tmp_path)
    raw = yaml.safe_load(schema.read_text())
    raw["files"]["csv"] = {"keep_default_na": False}
    schema.write_text(yaml.safe_dump(raw))
    with pytest.raises(SchemaError, match=r"dense column 'bid' must be numeric.*''.*keep_default_na: false.*na_values"):
        load(None, tmp_path / "cache", schema=str(schema))
    raw["files"]["csv"] = {"keep_default_na": False, "na_values": {"bid": [""], "cv": [""], "dwell": [""]}}
    schema.write_text(yaml.safe_dump(raw))
    assert len(load(None, tmp_path / "cache", schema=str(schema)).train) > 0


def test_user_id_naming_a_field_instead_of_its_column_names_the_fix(tmp_path):
    pd.DataFrame({"customer": [1, 2], "i": [3, 4], "y": [0, 1]}).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "s.yaml").write_text(
        "files: {train: d.csv, valid: d.csv, test: d.csv}\nuser_id: user\n"
        "categorical: [{name: user, column: customer, group: user}]\ntasks: [y]\n"
    )
    with pytest.raises(SchemaError, match=r"`user_id: user` names no column.*write `user_id: customer`"):
        load(None, tmp_path / "cache", schema=str(tmp_path / "s.yaml"))


# ---- 6. the worked example of docs/tabular_example.md ----------------------------------------------------------------
def test_docs_funnel_example_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "tabular_example.md").read_text()

    def block_after(filename: str) -> str:
        match = re.search(rf"`ad_funnel/{re.escape(filename)}`[^\n]*\n+```\w*\n(.*?)```", doc, flags=re.DOTALL)
        assert match, filename
        return match.group(1)

    folder = tmp_path / "ad_funnel"
    folder.mkdir()
    for name in ("ads.csv", "events.csv", "funnel.yaml"):
        (folder / name).write_text(block_after(name))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ONERANK_CACHE", str(tmp_path / "cache"))
    code = re.search(r"```python\n(from onerank.data import load_dataset\n\nds = load_dataset\(\"tabular\", \"ad_funnel\""
                     r".*?)```", doc, flags=re.DOTALL).group(1)
    namespace: dict = {}
    exec(code, namespace)
    ds = namespace["ds"]
    assert ds is not None and {s: len(ds.split(s)) for s in ("train", "valid", "test")} == {
        "train": 5, "valid": 3, "test": 4}
    test = ds.test
    # u1 and u2 were seen in one train request each: below the tabular default min_count 2, their codes are OOV
    assert (test.categorical["uid"] == OOV).all()
    by_user = {"u1": np.flatnonzero(test.time == 1709456400), "u2": np.flatnonzero(test.time == 1709460000)}
    assert len(by_user["u1"]) == len(by_user["u2"]) == 2
    for row in by_user["u1"]:
        assert item_names(ds, test.histories["clicked"][row]) == ["a3", "a1", "a4"]
        assert item_names(ds, test.histories["converted"][row]) == ["a3"]
    for row in by_user["u2"]:
        assert item_names(ds, test.histories["clicked"][row]) == ["a2", "a4"]
        assert item_names(ds, test.histories["converted"][row]) == ["a4"]
    assert np.array_equal(test.label_mask["conversion"], test.labels["click"] > 0.5)
    assert sorted(ds.label_values("test")["dwell"][test.label_mask["dwell"]].round(3).tolist()) == [30.0, 200.0]


def test_ranker_serves_regression_predictions_in_label_units(log, tmp_path):
    from onerank import api
    from onerank.serving import Ranker
    from onerank.training.config import RunConfig, TrainConfig

    ds = load_log(log, tmp_path)
    config = RunConfig(model="mmoe", train=TrainConfig(epochs=1, batch_size=512, progress=False, tensorboard=False))
    api.train(config, out_dir=tmp_path / "run", dataset=ds)
    ranker = Ranker(tmp_path / "run" / "checkpoint.pt")
    encoded = ranker.encode(ranker.example_request(5))
    logits = ranker.backend(encoded)["dwell"]
    served = ranker.predict(encoded)["dwell"]
    assert np.allclose(served, ds.encoders.label_transforms["dwell"].inverse(logits), rtol=1e-5)
    assert (served > 0).all() and not np.allclose(served, logits)
