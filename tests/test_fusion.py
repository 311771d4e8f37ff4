"""Multi-task fusion: calibration brings the reliability curve to the diagonal on held-out rows; the monotone fusion
is monotone for any parameters; everything is fitted on validation only; the fitted fusion recovers a known
optimum; the fusion file is keyed to its checkpoint, used by the ranker and carried by exports; `onerank fuse`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from onerank.fusion import Calibration, FittedFusion, Fusion, MonotoneFusion, expected_calibration_error, reliability
from onerank.fusion.fit import FuseSettings, SplitData, fuse_predictions
from onerank.fusion.objective import TaskGAUC, ValueRanking
from onerank.fusion.search import pareto_front
from onerank.metrics import gauc


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities, and predictions that are over-confident and biased upwards."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.2, n)
    labels = (rng.random(n) < sigmoid(z)).astype(np.float64)
    return labels, sigmoid(2.0 * z + 1.0)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibrated_reliability_curve_is_near_the_diagonal_on_held_out_rows(method):
    fit_labels, fit_probs = miscalibrated(20_000, seed=0)
    labels, probs = miscalibrated(20_000, seed=1)  # held out: not seen by the fit
    calibration = Calibration.fit(method, {"click": fit_labels}, {"click": fit_probs})
    after = calibration({"click": probs})["click"]
    before_ece = expected_calibration_error(labels, probs)
    after_ece = expected_calibration_error(labels, after)
    curve = reliability(labels, after, bins=10)
    assert before_ece > 0.08
    assert after_ece < 0.015
    assert np.max(np.abs(curve["mean_prediction"] - curve["positive_rate"])) < 0.04
    # a calibration is monotone, so it keeps the task's ranking (AUC) up to ties
    assert np.all(np.diff(after[np.argsort(probs)]) >= -1e-12)
    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert np.allclose(again({"click": probs})["click"], after)


def test_monotone_fusion_is_monotone_in_every_task_for_any_parameters():
    rng = np.random.default_rng(0)
    tasks, kinds = ["click", "like", "watch"], {"click": "binary", "like": "binary", "watch": "regression"}
    n = 2000
    base = {"click": rng.random(n), "like": rng.random(n) * 0.05, "watch": rng.normal(3, 2, n)}
    for trial in range(20):
        theta = rng.normal(0, 3.0, MonotoneFusion.num_params(3, 5))  # wild parameters, negative raw weights included
        fusion = MonotoneFusion.from_vector(theta, tasks, kinds, rng.normal(0, 1, 3), rng.uniform(0.1, 3, 3), 5)
        score = fusion(base)
        for t in tasks:
            up = dict(base)
            step = rng.uniform(0, 0.3, n) if kinds[t] == "binary" else rng.uniform(0, 3, n)
            up[t] = np.clip(base[t] + step, None, 1 - 1e-6) if kinds[t] == "binary" else base[t] + step
            assert np.all(fusion(up) >= score - 1e-9), (trial, t)
            # and it does respond to every task: the skip path's weight softplus(u) > 0
            assert np.mean(fusion(up) > score) > 0.5
    restored = MonotoneFusion.from_vector(theta, tasks, kinds, fusion.shift, fusion.scale, 5)
    from onerank.fusion import fusion_from_dict

    assert np.allclose(fusion_from_dict(json.loads(json.dumps(restored.to_dict())))(base), restored(base))


def test_fast_grouped_metrics_equal_the_reference_gauc_and_ndcg():
    rng = np.random.default_rng(3)
    n = 3000
    users = rng.integers(0, 200, n)
    labels = (rng.random(n) < 0.3).astype(float)
    scores = np.round(rng.random(n) + 0.3 * labels, 1)  # many ties
    mask = rng.random(n) < 0.8
    assert TaskGAUC(users, labels, mask)(scores).mean() == pytest.approx(gauc(labels[mask], scores[mask], users[mask]))
    assert ValueRanking(users, labels).gauc(scores).mean() == pytest.approx(gauc(labels, scores, users))
    # NDCG of one user by hand, ties taking their expected gain
    ranking = ValueRanking(np.zeros(4), np.array([3.0, 0.0, 1.0, 0.0]), k=2)
    dcg = 3.0 + (0.5 * (1.0 + 0.0)) / np.log2(3)  # the rows with value 1 and 0 tie for the second place
    assert ranking.ndcg(np.array([0.9, 0.5, 0.5, 0.1])).mean() == pytest.approx(dcg / (3.0 + 1.0 / np.log2(3)))
    assert ranking.ndcg(np.array([3.0, 0.0, 1.0, 0.0])).mean() == pytest.approx(1.0)


def test_pareto_front_keeps_the_undominated_points():
    points = np.array([[0.6, 0.6], [0.7, 0.5], [0.5, 0.5], [0.6, 0.55], [0.5, 0.7]])
    assert pareto_front(points).tolist() == [True, True, False, False, True]


def funnel_split(n_users: int, seed: int, watch_from: str = "long_view") -> SplitData:
    """Predictions for click / long_view / like with known quality, and a value that only long_view's label
    drives: the best fusion weights long_view."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 12)
    n = len(users)
    latent = {t: rng.normal(0, 1, n) for t in ("click", "long_view", "like")}
    rates = {"click": -0.5, "long_view": -1.0, "like": -3.0}
    labels = {t: (rng.random(n) < sigmoid(rates[t] + 1.5 * latent[t])).astype(np.float32) for t in latent}
    preds = {t: sigmoid(rates[t] + 1.5 * (latent[t] + rng.normal(0, 0.5, n))).astype(np.float32) for t in latent}
    value = labels[watch_from] * rng.uniform(20, 60, n)
    return SplitData(preds, labels, {t: np.ones(n, bool) for t in latent}, users, value.astype(np.float64))


KINDS = {"click": "binary", "long_view": "binary", "like": "binary"}


def test_the_fit_recovers_the_task_that_drives_the_value_and_beats_uniform_weights():
    settings = FuseSettings(value="watch", budget=120, bootstrap=100, auc_tolerance=None)
    fitted, report = fuse_predictions(funnel_split(300, 0), funnel_split(300, 1), KINDS, settings, "sha")
    weights = report["fusions"]["fitted weighted_sum"]["weights"]
    assert max(weights, key=weights.get) == "long_view"
    test = report["test"]
    assert test["fitted weighted_sum"]["ndcg"]["vs_uniform"]["delta_ci_low"] > 0
    assert test["fitted weighted_sum"]["ndcg"]["value"] > test["only click"]["ndcg"]["value"]
    assert report["chosen"].startswith("fitted ")
    assert fitted.fusion is not None and fitted.calibration is not None and fitted.info["fitted_on"] == "valid"


def test_fitting_uses_the_validation_split_only():
    valid = funnel_split(200, 0)
    settings = dict(value="watch", budget=60, bootstrap=20, forms=("weighted_sum", "monotone"))
    first, report_a = fuse_predictions(valid, funnel_split(200, 1), KINDS, FuseSettings(**settings), "sha")
    other_test = funnel_split(150, 7, watch_from="like")  # another test split, even another value
    second, report_b = fuse_predictions(valid, other_test, KINDS, FuseSettings(**settings), "sha")
    fitted_a, fitted_b = first.to_dict(), second.to_dict()
    assert fitted_a["info"].pop("test_ndcg") != fitted_b["info"].pop("test_ndcg")  # a figure, never an input
    assert fitted_a == fitted_b  # calibration, fusion and the choice of form: the same
    assert report_a["valid"] == report_b["valid"]
    assert report_a["test"] != report_b["test"]
    third, _ = fuse_predictions(funnel_split(200, 5), funnel_split(200, 1), KINDS, FuseSettings(**settings), "sha")
    assert third.to_dict()["calibration"] != first.to_dict()["calibration"]


def test_auc_floors_trade_value_for_every_task_on_validation():
    def fit(tolerance):
        settings = FuseSettings(value="watch", budget=120, bootstrap=20, auc_tolerance=tolerance,
                                forms=("weighted_sum",))
        return fuse_predictions(funnel_split(300, 0), funnel_split(300, 1), KINDS, settings, "sha")[1]

    free, floored = fit(None), fit(0.15)
    fitted = floored["valid"]["fitted weighted_sum"]
    assert fitted["feasible"]
    for task, floor in floored["auc_floors_valid"].items():
        assert fitted["gauc"][task] >= floor
    unconstrained = free["valid"]["fitted weighted_sum"]
    assert min(unconstrained["gauc"].values()) < min(fitted["gauc"].values())
    assert unconstrained["ndcg"] > fitted["ndcg"]


# ---------------------------------------------------------------------------------------------------------------------
# The fusion file with a checkpoint: ranker, service description, export, refusal of another checkpoint
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def fitted_checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny MMoE checkpoint (tasks click, buy) with a fusion file beside it: a product with known
    powers on Platt-calibrated click probabilities."""
    from onerank.fusion import TaskCalibration, file_sha256

    path = tmp_path / "checkpoint.pt"
    shutil.copy(tiny_checkpoint("mmoe"), path)
    calibration = Calibration({"click": TaskCalibration("platt", {"slope": 0.5, "intercept": -0.3})})
    fitted = FittedFusion(file_sha256(path), calibration, Fusion("product", {"click": 1.0, "buy": 0.25}),
                          info={"value": "buy"})
    fitted.save(tmp_path / "checkpoint.fusion.json")
    return path, fitted


def test_ranker_uses_the_fitted_calibration_and_fusion_and_a_request_may_override_it(fitted_checkpoint):
    from onerank.serving import Ranker

    path, fitted = fitted_checkpoint
    ranker = Ranker(path)
    raw = Ranker(path, fusion_file=False)
    assert ranker.tasks == ["click", "buy"]
    request = raw.example_request(12)
    raw_probs = raw.predict(request)
    probs = ranker.predict(request)
    assert np.allclose(probs["click"], fitted.calibration.tasks["click"](raw_probs["click"]), atol=1e-6)
    assert not np.allclose(probs["click"], raw_probs["click"], atol=1e-3)
    assert np.array_equal(probs["buy"], raw_probs["buy"])  # no calibration for it: passes through
    result = ranker.rank(request)
    assert np.allclose(result.scores, probs["click"].astype(np.float64) * probs["buy"].astype(np.float64) ** 0.25)
    assert result.fusion.to_dict()["weights"] == {"click": 1.0, "buy": 0.25}
    override = ranker.rank({**request, "fusion": {"kind": "weighted_sum", "weights": {"buy": 1.0}}})
    assert np.array_equal(override.order, np.argsort(-probs["buy"], kind="stable"))
    assert np.allclose(raw.rank(request).scores, raw_probs["click"] + raw_probs["buy"])  # no file: uniform sum
    described = ranker.describe()
    assert described["fusion"]["kind"] == "product"
    assert described["fitted"]["calibration"]["click"]["method"] == "platt"
    assert described["fitted"]["file"].endswith("checkpoint.fusion.json")
    assert raw.describe()["fitted"] is None


def test_a_fusion_file_never_applies_to_another_checkpoint(fitted_checkpoint, tiny_checkpoint, tmp_path):
    from onerank.serving import Ranker

    path, _ = fitted_checkpoint
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tiny_checkpoint("esmm"), other / "checkpoint.pt")  # same name, other bytes
    shutil.copy(path.with_name("checkpoint.fusion.json"), other / "checkpoint.fusion.json")
    with pytest.raises(ValueError, match="was fitted on checkpoint"):
        Ranker(other / "checkpoint.pt")
    with pytest.raises(ValueError, match="was fitted on checkpoint"):
        Ranker(tiny_checkpoint("esmm"), fusion_file=path.with_name("checkpoint.fusion.json"))


def test_monotone_fitted_fusion_is_served(fitted_checkpoint):
    from onerank.fusion import file_sha256
    from onerank.serving import Ranker

    path, fitted = fitted_checkpoint
    kinds = {"click": "binary", "buy": "binary"}
    monotone = MonotoneFusion.from_vector(np.linspace(-1, 1, MonotoneFusion.num_params(2, 3)), ["click", "buy"],
                                          kinds, np.zeros(2), np.ones(2), 3)
    FittedFusion(file_sha256(path), fitted.calibration, monotone).save(path.with_name("checkpoint.fusion.json"),
                                                                       overwrite=True)
    ranker = Ranker(path)
    request = ranker.example_request(9)
    result = ranker.rank(request)
    assert np.allclose(result.scores, monotone(ranker.predict(request)))
    assert ranker.respond(request)["fusion"]["kind"] == "monotone"


def test_pt2_export_carries_the_fusion_file(fitted_checkpoint):
    from onerank.serving.export import export_checkpoint, export_metadata

    path, fitted = fitted_checkpoint
    report = export_checkpoint(path, "pt2")
    carried = json.loads(export_metadata(report.path, "pt2")["onerank.fusion"])
    assert carried == json.loads(json.dumps(fitted.to_dict()))


def test_cli_fuse_fits_on_a_synthetic_checkpoint_and_refuses_to_overwrite(tmp_path, capsys):
    from onerank.cli import main

    cache = ["--cache-dir", str(tmp_path / "cache")]
    small = ["--dataset", "synthetic", "--dataset-option", "num_users=150", "--dataset-option", "num_items=120",
             "--dataset-option", "candidates_per_request=8", "--epochs", "1", "--batch-size", "256", "--no-progress"]
    assert main(["train", *small, *cache, "--model", "mmoe", "--out", str(tmp_path / "run")]) == 0
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    fuse = ["fuse", "--checkpoint", checkpoint, "--value", "order", "--budget", "30", "--bootstrap", "20", *cache]
    assert main(fuse) == 0
    out = capsys.readouterr().out
    assert "fitted monotone" in out and "only click" in out and "ECE before" in out
    for name in ("report.json", "table.md", "pareto.png", "reliability.png"):
        assert (tmp_path / "run" / "fusion" / name).exists()
    fusion_file = tmp_path / "run" / "checkpoint.fusion.json"
    before = fusion_file.read_bytes()
    assert main(fuse) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert fusion_file.read_bytes() == before
    assert main(["fuse", "--checkpoint", checkpoint, "--value", "watch_time", *cache, "--overwrite"]) == 2
    assert "unknown value 'watch_time'" in capsys.readouterr().err


def test_value_columns_are_carried_row_aligned_and_checked():
    import dataclasses

    from conftest import tiny_raw
    from onerank.data import Schema
    from onerank.data.dataset import encode_dataset
    from onerank.data.schema import SchemaError

    raw = tiny_raw(50)
    raw.schema = dataclasses.replace(raw.schema, values=["price"])
    encoded = encode_dataset(raw)
    for split in ("valid", "test"):
        table = getattr(raw, split).table
        enc = encoded.split(split)
        # rows are reordered by request when encoded: compare as multisets per request-free key (item, user, price)
        assert sorted(enc.values["price"].tolist()) == sorted(table["price"].astype(float).tolist())
    assert Schema.from_dict(raw.schema.to_dict()).values == ["price"]
    assert "values" not in tiny_raw(50).schema.to_dict()  # schemas without values keep their old form (cache keys)
    raw.schema = dataclasses.replace(raw.schema, values=["watch_seconds"])
    with pytest.raises(SchemaError, match="missing column 'watch_seconds' \\(value column\\)"):
        encode_dataset(raw)


def test_the_form_is_chosen_on_validation_users_held_out_from_its_fit():
    valid = funnel_split(300, 0)
    fit_part, select_part = valid.by_users(0.3, seed=0)
    assert not set(fit_part.users) & set(select_part.users)
    assert len(set(select_part.users)) == 90 and len(fit_part.users) + len(select_part.users) == len(valid.users)
    settings = FuseSettings(value="watch", budget=60, bootstrap=20, forms=("weighted_sum", "monotone"))
    fitted, report = fuse_predictions(valid, funnel_split(100, 1), KINDS, settings, "sha")
    held_out = report["selection"]["objective"]
    assert report["selection"]["held_out_user_fraction"] == 0.3 and set(held_out) == {"weighted_sum", "monotone"}
    assert report["chosen"] == "fitted " + max(held_out, key=held_out.get) == "fitted " + fitted.info["form"]
    # the served fusion is the chosen form fitted again on every validation row
    assert fitted.fusion.to_dict() == report["fusions"][report["chosen"]]
