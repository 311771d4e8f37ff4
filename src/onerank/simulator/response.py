"""The simulated users' response model: how a user answers one shown video, fitted on KuaiRand train days.

A chain of per-behaviour models, each conditioned on the responses drawn before it (a like is far likelier after a
long view): click | x; long_view | x, click; completion, like, comment, forward | x, click, long_view;
log1p(play seconds) | x, click, long_view, completion, the play time drawn from the residuals the regression left on
train (per completion) and kept on the right side of the video's length (a completed play reaches it). ``x`` holds

* the user's side fields and the user's smoothed response rates on train days,
* the video's length, type, upload type and first tag, and its smoothed response rates on train days,
* the session so far: the position, and decayed sums of the responses already given in this session.

Two model classes fit the same chain: ``gbdt`` (scikit-learn's histogram gradient boosting, the simulator used by the
benchmark) and ``logistic`` (logistic and ridge regressions on one-hot and standardised features, the swapped-in
class that checks a fusion policy's gain is not an artefact of one simulator). Neither is a neural ranker of this
library, so a ranker under test never shares the simulator's inductive bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from onerank.simulator.logs import USER_FIELDS, KuaiRandLog

MODEL_CLASSES = ("gbdt", "logistic")
SESSION_DECAY = 0.8  # per impression: the weight of a response k impressions back is 0.8 ** k
SESSION_SIGNALS = ("click", "long_view", "like", "completion", "play")  # decayed in-session sums the model reads
RATE_TARGETS = ("click", "long_view", "like", "comment", "forward", "completion", "play")
SMOOTHING = 20.0  # pseudo-impressions at the global rate in every smoothed rate
CATEGORICAL = [*USER_FIELDS, "video_type", "upload_type", "tag"]
PLAY_QUANTILES = 201
# the chain's binary responses, in draw order: completion (the play reaches the video's end) is drawn as a behaviour
# so its rate is fitted, not left to the tail of the play-time draw
CHAIN = ("click", "long_view", "completion", "like", "comment", "forward")
UNIFORMS = len(CHAIN) + 1  # random numbers one response draw uses


# ---------------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------------
class TargetStats:
    """Smoothed per-key means of the response columns (a user's or a video's rates), with their log counts."""

    def __init__(self, key: str, prior: dict[str, float]) -> None:
        self.key, self.prior = key, prior
        self.table: pd.DataFrame | None = None

    def fit(self, rows: pd.DataFrame) -> "TargetStats":
        grouped = rows.groupby(self.key)
        sums = grouped[list(RATE_TARGETS)].sum()
        count = grouped.size()
        table = pd.DataFrame(index=sums.index)
        for t in RATE_TARGETS:
            table[t] = (sums[t] + SMOOTHING * self.prior[t]) / (count + SMOOTHING)
        table["log_count"] = np.log1p(count)
        self.table = table
        return self

    def transform(self, keys: np.ndarray, prefix: str) -> pd.DataFrame:
        out = self.table.reindex(keys)
        for t in RATE_TARGETS:
            out[t] = out[t].fillna(self.prior[t])
        out["log_count"] = out["log_count"].fillna(0.0)
        return out.set_axis([f"{prefix}_{c}" for c in out.columns], axis=1).reset_index(drop=True)


def with_targets(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["play"] = np.log1p(frame["play_s"])
    return frame


def session_signals(frame: pd.DataFrame) -> pd.DataFrame:
    """Per impression, the decayed sums of SESSION_SIGNALS over the earlier impressions of its session (real log)."""
    out = {}
    position = frame["position"].to_numpy()
    for s in SESSION_SIGNALS:
        values = frame[s].to_numpy(np.float64)
        acc = np.zeros(len(frame))
        running = 0.0
        for i in range(len(frame)):  # one pass; the log is sorted by (user, time)
            running = 0.0 if position[i] == 0 else SESSION_DECAY * (running + values[i - 1])
            acc[i] = running
        out[f"session_{s}"] = acc
    out["session_position"] = np.log1p(position)
    return pd.DataFrame(out)


class FeatureBuilder:
    """User, video and session features of (user, video, session state) rows; the rates come from train days."""

    def __init__(self, log: KuaiRandLog, reference: pd.DataFrame) -> None:
        reference = with_targets(reference)
        self.prior = {t: float(reference[t].mean()) for t in RATE_TARGETS}
        self.user_stats = TargetStats("user_id", self.prior).fit(reference)
        self.video_stats = TargetStats("video_id", self.prior).fit(reference)
        self.user_codes = {f: {v: i for i, v in enumerate(sorted(log.users[f].unique()))} for f in USER_FIELDS}
        self.users = log.users.set_index("user_id")
        self.videos = log.videos.set_index("video_id")
        # a video's length in the simulator: its median in the log, else the feature file's
        median = reference.groupby("video_id")["duration_s"].median()
        self.duration = self.videos["video_duration_s"].copy()
        self.duration.loc[median.index.intersection(self.duration.index)] = median

    def user_part(self, users: np.ndarray, stats: TargetStats | None = None) -> pd.DataFrame:
        raw = self.users.reindex(users)
        out = pd.DataFrame({f: raw[f].map(self.user_codes[f]).fillna(-1).to_numpy(np.int64) for f in USER_FIELDS})
        return pd.concat([out, (stats or self.user_stats).transform(users, "user")], axis=1)

    def video_part(self, videos: np.ndarray, duration_s: np.ndarray | None = None,
                   stats: TargetStats | None = None) -> pd.DataFrame:
        raw = self.videos.reindex(videos)
        if duration_s is None:
            duration_s = self.duration.reindex(videos).fillna(self.duration.median()).to_numpy()
        out = pd.DataFrame({
            "log_duration": np.log1p(np.nan_to_num(duration_s, nan=0.0)),
            "video_type": raw["video_type"].fillna(-1).to_numpy(np.int64),
            "upload_type": raw["upload_type"].fillna(-1).to_numpy(np.int64),
            "tag": raw["tag"].fillna(-1).to_numpy(np.int64),
        })
        return pd.concat([out, (stats or self.video_stats).transform(videos, "video")], axis=1)

    def log_rows(self, frame: pd.DataFrame, user_stats: TargetStats | None = None,
                 video_stats: TargetStats | None = None) -> pd.DataFrame:
        """Features of logged impressions (their real session so far)."""
        frame = with_targets(frame).reset_index(drop=True)
        return pd.concat([self.user_part(frame["user_id"].to_numpy(), user_stats),
                          self.video_part(frame["video_id"].to_numpy(), frame["duration_s"].to_numpy(), video_stats),
                          session_signals(frame)], axis=1)


def out_of_fold_features(builder: FeatureBuilder, train: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """Train rows' features with every rate computed without the row's own fold (no row sees its own label)."""
    train = with_targets(train).reset_index(drop=True)
    fold = np.random.default_rng(seed).integers(0, folds, len(train))
    parts = []
    for f in range(folds):
        rest = train[fold != f]
        user_stats = TargetStats("user_id", builder.prior).fit(rest)
        video_stats = TargetStats("video_id", builder.prior).fit(rest)
        rows = train[fold == f]
        part = builder.log_rows(rows, user_stats, video_stats)
        part.index = rows.index
        parts.append(part)
    return pd.concat(parts).sort_index()


# ---------------------------------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------------------------------
def _parents(target: str) -> list[str]:
    if target == "click":
        return []
    if target == "long_view":
        return ["click"]
    if target == "play":
        return ["click", "long_view", "completion"]
    return ["click", "long_view"]


def _make(model_class: str, kind: str, categorical: list[int], seed: int):
    if model_class == "gbdt":
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        # early stopping on a tenth of the train rows: the number of trees is chosen on rows the fit did not use
        common = dict(max_iter=300, learning_rate=0.1, max_leaf_nodes=31, min_samples_leaf=40, early_stopping=True,
                      validation_fraction=0.1, n_iter_no_change=10, random_state=seed)
        return (HistGradientBoostingClassifier(**common) if kind == "binary"
                else HistGradientBoostingRegressor(**common))
    if model_class == "logistic":
        from sklearn.compose import ColumnTransformer
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        encode = ColumnTransformer([("onehot", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=20),
                                     categorical)], remainder=StandardScaler())
        head = LogisticRegression(C=1.0, max_iter=1000) if kind == "binary" else Ridge(alpha=1.0)
        return make_pipeline(encode, head)
    raise ValueError(f"response model class must be one of {MODEL_CLASSES}, not {model_class!r}")


@dataclass
class ResponseModel:
    """The fitted chain (see the module docstring) over feature matrices whose columns are ``columns``; ``sample``
    draws one response per row."""

    model_class: str
    columns: list[str]
    models: dict[str, object] = field(default_factory=dict)
    play_residuals: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # residual quantiles per cell

    @classmethod
    def fit(cls, model_class: str, features: pd.DataFrame, frame: pd.DataFrame, seed: int = 0) -> "ResponseModel":
        frame = with_targets(frame).reset_index(drop=True)
        model = cls(model_class, list(features.columns))
        base = features.to_numpy(np.float64)
        categorical = [i for i, c in enumerate(model.columns) if c in CATEGORICAL]
        for target in (*CHAIN, "play"):
            x = model._x(base, target, {p: frame[p].to_numpy() for p in _parents(target)})
            kind = "regression" if target == "play" else "binary"
            estimator = _make(model_class, kind, categorical, seed)
            estimator.fit(x, frame[target].to_numpy())
            model.models[target] = estimator
            if target == "play":
                residual = frame["play"].to_numpy() - estimator.predict(x)
                q = np.linspace(0.0, 1.0, PLAY_QUANTILES)
                for c in (0, 1):
                    cell = frame["completion"].to_numpy() == c
                    model.play_residuals[c] = np.quantile(residual[cell] if cell.sum() >= 50 else residual, q)
        return model

    def matrix(self, features: pd.DataFrame) -> np.ndarray:
        return features[self.columns].to_numpy(np.float64)

    def _x(self, base: np.ndarray, target: str, given: dict[str, np.ndarray]) -> np.ndarray:
        parents = [np.broadcast_to(np.asarray(given[p], dtype=np.float64), (len(base),)) for p in _parents(target)]
        return np.column_stack([base, *parents]) if parents else base

    def probability(self, target: str, base: np.ndarray, given: dict[str, np.ndarray]) -> np.ndarray:
        return self.models[target].predict_proba(self._x(base, target, given))[:, 1]

    def marginals(self, base: np.ndarray) -> dict[str, np.ndarray]:
        """P(behaviour) per row with the parents summed out (exact: the chain's parents are two binary responses)."""
        n = len(base)
        p_click = self.probability("click", base, {})
        p_lv = {c: self.probability("long_view", base, {"click": np.full(n, c)}) for c in (0, 1)}
        weight = {(c, lv): (p_click if c else 1 - p_click) * (p_lv[c] if lv else 1 - p_lv[c])
                  for c in (0, 1) for lv in (0, 1)}
        out = {"click": p_click, "long_view": p_click * p_lv[1] + (1 - p_click) * p_lv[0]}
        for target in CHAIN[2:]:
            out[target] = sum(w * self.probability(target, base, {"click": np.full(n, c), "long_view":
                                                                    np.full(n, lv)})
                              for (c, lv), w in weight.items())
        return out

    def expected_log_play(self, base: np.ndarray, given: dict[str, np.ndarray]) -> np.ndarray:
        return self.models["play"].predict(self._x(base, "play", given))

    def sample(self, base: np.ndarray, duration_s: np.ndarray, uniforms: np.ndarray) -> dict[str, np.ndarray]:
        """One draw of every response per row (the binary behaviours, ``play_s``) from the row's uniforms
        ``[n, UNIFORMS]``: one per behaviour, then one for the play time (a simulator gives every session its own
        stream, so two policies meet the same random users: common random numbers)."""
        drawn: dict[str, np.ndarray] = {}
        for i, target in enumerate(CHAIN):
            p = self.probability(target, base, drawn)
            drawn[target] = (uniforms[:, i] < p).astype(np.int8)
        log_play = self.expected_log_play(base, drawn)
        u = uniforms[:, len(CHAIN)] * (PLAY_QUANTILES - 1)
        lo = np.floor(u).astype(np.int64)
        hi = np.minimum(lo + 1, PLAY_QUANTILES - 1)
        frac = u - lo
        residual = np.empty(len(base))
        for c, quantiles in self.play_residuals.items():
            cell = drawn["completion"] == c
            residual[cell] = quantiles[lo[cell]] * (1 - frac[cell]) + quantiles[hi[cell]] * frac[cell]
        play_s = np.expm1(log_play + residual)
        # a completed play lasts at least the video (at most three loops of it, as the log's longest), another one
        # stops before its end
        duration = np.maximum(duration_s, 1e-3)
        play_s = np.where(drawn["completion"] == 1, np.clip(play_s, duration, 3.0 * duration),
                          np.clip(play_s, 0.0, 0.999 * duration))
        drawn["play_s"] = play_s
        return drawn
