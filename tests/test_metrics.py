import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from onerank.metrics import auc, calibration, evaluate_predictions, gauc, logloss, monitor_value


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # rounding creates many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_undefined_for_one_class():
    assert np.isnan(auc(np.zeros(10), np.arange(10)))


@pytest.mark.parametrize("seed", range(3))
def test_gauc_is_impression_weighted_mean_of_per_user_auc(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, 1000)
    y = rng.integers(0, 2, 1000)
    s = rng.random(1000) + 0.2 * y
    total, weight = 0.0, 0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():  # users with one class only are skipped
            total += roc_auc_score(y[m], s[m]) * m.sum()
            weight += m.sum()
    assert gauc(y, s, users) == pytest.approx(total / weight, abs=1e-12)


def test_logloss_and_calibration_match_definitions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.random(300), 0.01, 0.99)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), abs=1e-9)
    assert calibration(y, p) == pytest.approx(p.mean() / y.mean())


def test_evaluation_uses_only_rows_in_the_task_space():
    tasks = {"click": "binary", "buy": "binary"}
    labels = {"click": np.array([1, 1, 0, 0.0]), "buy": np.array([1, 0, 0, 0.0])}
    masks = {"click": np.ones(4, bool), "buy": np.array([True, True, False, False])}
    # The out-of-space rows get absurd scores; they must not matter.
    preds = {"click": np.array([0.9, 0.8, 0.1, 0.2]), "buy": np.array([0.7, 0.2, 0.99, 0.99])}
    metrics = evaluate_predictions(tasks, preds, labels, masks, users=None)
    assert metrics["buy"]["count"] == 2
    assert metrics["buy"]["auc"] == 1.0
    assert "gauc" not in metrics["buy"]


def test_regression_metrics_and_monitor():
    tasks = {"t": "regression"}
    m = evaluate_predictions(tasks, {"t": np.array([1.0, 3.0])}, {"t": np.array([2.0, 2.0])},
                             {"t": np.ones(2, bool)}, None)
    assert m["t"]["mse"] == 1.0 and m["t"]["mae"] == 1.0
    metrics = {"a": {"auc": 0.8}, "b": {"auc": 0.6}, "c": {"auc": float("nan")}}
    assert monitor_value(metrics, "auc", {"a": 3, "b": 1, "c": 1}) == pytest.approx(0.75)
