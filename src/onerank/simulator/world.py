"""Fitting the simulator on KuaiRand train days, and its fit to the held-out days.

``fit_world`` fits the response chain (on the train days, rates out of fold) and the leave model (on the train days'
sessions) and gathers the catalogue and the users. ``response_fit`` scores the response model on held-out log rows:
per behaviour the AUC and the expected calibration error of its marginal probability, and the play time's fit.
"""

from __future__ import annotations

import numpy as np

from onerank.fusion.calibration import expected_calibration_error
from onerank.metrics import auc
from onerank.simulator.env import STATE_USER_FIELDS, World
from onerank.simulator.leave import LeaveModel
from onerank.simulator.logs import KuaiRandLog
from onerank.simulator.response import CHAIN, UNIFORMS, FeatureBuilder, ResponseModel, out_of_fold_features

FOLDS = 5


def fit_world(log: KuaiRandLog, model_class: str = "gbdt", seed: int = 0, max_train_rows: int | None = None,
              leave: LeaveModel | None = None) -> World:
    """The simulator fitted on ``log``'s train days (``max_train_rows``: a seeded sample of them, for tests).
    ``leave``: the leave model to run (default: the one fitted on the train days' sessions)."""
    train = log.split("train")
    builder = FeatureBuilder(log, train)
    rows = train
    if max_train_rows is not None and len(train) > max_train_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(train), max_train_rows, replace=False))
        rows = train.iloc[keep]
    features = out_of_fold_features(builder, rows, FOLDS, seed)
    response = ResponseModel.fit(model_class, features, rows, seed)
    fitted_leave = leave if leave is not None else LeaveModel.fit(train)
    counts = train["video_id"].value_counts()
    videos = counts.index.to_numpy(np.int64)
    popularity = counts.to_numpy(np.float64) / counts.sum()
    user_fields = {f: sorted(log.users[f].astype(str).unique().tolist()) for f in STATE_USER_FIELDS}
    return World(builder, response, fitted_leave, videos, popularity, user_fields)


def response_fit(world: World, log: KuaiRandLog, split: str = "test") -> dict:
    """Per behaviour on ``split``'s rows (their real session so far): AUC and ECE of the marginal probability, mean
    prediction and rate; play time: correlation of expected and real log1p(seconds); completion: simulated rate."""
    rows = log.split(split).reset_index(drop=True)
    base = world.response.matrix(world.builder.log_rows(rows))
    marginals = world.response.marginals(base)
    out: dict = {"rows": int(len(rows))}
    for b in CHAIN:
        y = rows[b].to_numpy()
        out[b] = {"auc": auc(y, marginals[b]), "ece": expected_calibration_error(y, marginals[b]),
                  "mean_prediction": float(marginals[b].mean()), "rate": float(y.mean())}
    real_play = np.log1p(rows["play_s"].to_numpy())
    given = {c: rows[c].to_numpy() for c in ("click", "long_view", "completion")}
    expected = world.response.expected_log_play(base, given)
    drawn = world.response.sample(base, rows["duration_s"].to_numpy(),
                                  np.random.default_rng(0).random((len(rows), UNIFORMS)))
    out["play"] = {"corr_log_play_given_parents": float(np.corrcoef(expected, real_play)[0, 1]),
                   "mean_log_play_sampled": float(np.log1p(drawn["play_s"]).mean()),
                   "mean_log_play_real": float(real_play.mean())}
    return out


def length_distribution(lengths: np.ndarray, edges: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50)) -> dict:
    """Share of sessions of each length bucket (``[edge_i, edge_{i+1})``, the last open) and the mean."""
    lengths = np.asarray(lengths)
    buckets = {}
    for lo, hi in zip(edges, [*edges[1:], None]):
        name = f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")
        keep = lengths >= lo if hi is None else (lengths >= lo) & (lengths < hi)
        buckets[name] = float(keep.mean())
    return {"mean": float(lengths.mean()), "median": float(np.median(lengths)), "share": buckets,
            "sessions": int(len(lengths))}


def real_leave_fit(log: KuaiRandLog, split: str = "test") -> dict:
    """The fitted leave model's AUC at telling a session's last impression on ``split``'s real sessions."""
    from onerank.simulator.leave import decayed_sums

    fitted = LeaveModel.fit(log.split("train"))
    rows = log.split(split).reset_index(drop=True)
    session = rows["session"].to_numpy()
    last = np.ones(len(rows), dtype=bool)
    last[:-1] = session[1:] != session[:-1]
    hazard = fitted.hazard(rows["position"].to_numpy(), decayed_sums(rows, inclusive=True))
    return {"model": fitted.to_dict(), "auc_last_impression": auc(last.astype(float), hazard)}


def users_with_features(log: KuaiRandLog, users: np.ndarray) -> np.ndarray:
    known = set(log.users["user_id"].tolist())
    return np.array([u for u in users if u in known], dtype=np.int64)

