"""Sessions of simulated KuaiRand users ranked by a fusion of a ranker's predictions.

A session starts with a user and a candidate pool (``pool_size`` videos drawn by popularity, the retrieval stage's
output) that the ranker under test has scored once (its calibrated per-task predictions). Each request, the fusion
policy reads the state (the user's side fields and the session's recent interactions, onerank.fusion.policy) and
returns an action; its weights fuse the predictions and the ``slate_size`` best unseen videos of the pool are shown.
The user answers each video in turn (the response model) and may leave after any of them (the leave model); the
request's reward is the weighted sum of the answers (BatchRL-MTF's reward: play time, completion, like, share,
comment). A session ends when the user leaves (terminated) or after ``max_requests`` requests (truncated).

Every session draws its random numbers from its own stream (a per-session seed), so two policies run on the same
seed meet the same users, pools and coin flips: their difference is not sampling noise of the users.

``simulate`` runs many sessions at once (vectorised); :class:`FusionEnv` is one session behind Gymnasium's Env
interface (gymnasium is in the ``rl`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from onerank.fusion.policy import COUNT_FEATURES, RECENT_DECAY, SESSION_FEATURES, action_weights
from onerank.simulator.leave import LeaveModel
from onerank.simulator.response import SESSION_DECAY, SESSION_SIGNALS, UNIFORMS, FeatureBuilder, ResponseModel

# ranker scorer: (user ids [N], pools of video ids [N, P]) -> calibrated predictions [N, P, K] of the fused tasks
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
STATE_USER_FIELDS = ("user_active_degree", "is_lowactive_period")
RESPONSES = ("click", "long_view", "completion", "like", "comment", "forward", "play_s")
assert SESSION_DECAY == RECENT_DECAY, "the policy's recent interactions are the response model's session sums"


@dataclass
class RewardWeights:
    """Reward of one impression (BatchRL-MTF's components): play seconds, completion, like, share, comment."""

    play_seconds: float = 0.05
    completion: float = 1.0
    like: float = 5.0
    forward: float = 10.0
    comment: float = 10.0

    def __call__(self, r: dict[str, np.ndarray]) -> np.ndarray:
        return (self.play_seconds * r["play_s"] + self.completion * r["completion"] + self.like * r["like"]
                + self.forward * r["forward"] + self.comment * r["comment"])


@dataclass
class SimulatorConfig:
    slate_size: int = 5
    pool_size: int = 100
    max_requests: int = 20
    action_scale: float = 3.0  # fusion weights = softmax(action_scale * action)
    reward: RewardWeights = field(default_factory=RewardWeights)

    def __post_init__(self) -> None:
        if self.slate_size < 1 or self.max_requests < 1:
            raise ValueError("slate_size and max_requests must be >= 1")
        if self.pool_size < self.slate_size * self.max_requests:
            raise ValueError(f"pool_size {self.pool_size} cannot fill {self.max_requests} slates of {self.slate_size}")

    @property
    def max_impressions(self) -> int:
        return self.slate_size * self.max_requests


@dataclass
class World:
    """The fitted simulator: who the users are, what the videos are, how users answer and when they leave."""

    builder: FeatureBuilder
    response: ResponseModel
    leave: LeaveModel
    videos: np.ndarray  # the catalogue pools are drawn from (video ids with train impressions)
    popularity: np.ndarray  # draw probability of each catalogue video
    user_fields: dict[str, list[str]]  # the state's one-hot user fields and their known values

    def describe(self) -> dict:
        return {"response_model": self.response.model_class, "leave": self.leave.to_dict(),
                "catalogue": int(len(self.videos)), "state_user_fields": self.user_fields}


@dataclass
class SessionStarts:
    """Per session: the user, the candidate pool, the ranker's predictions of the fused tasks, a random seed."""

    users: np.ndarray  # [N] user ids
    pools: np.ndarray  # [N, P] video ids
    predictions: np.ndarray  # [N, P, K]
    seeds: np.ndarray  # [N] per-session random streams

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, rows: np.ndarray) -> "SessionStarts":
        return SessionStarts(self.users[rows], self.pools[rows], self.predictions[rows], self.seeds[rows])


def draw_starts(world: World, users: np.ndarray, n: int, pool_size: int, scorer: Scorer,
                seed: int) -> SessionStarts:
    """``n`` sessions: users drawn from ``users`` (with repetition, as they come back), pools by popularity."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.asarray(users), size=n, replace=True)
    pools = np.stack([rng.choice(world.videos, size=pool_size, replace=False, p=world.popularity) for _ in range(n)])
    predictions = np.asarray(scorer(chosen, pools), dtype=np.float64)
    if predictions.ndim != 3 or predictions.shape[:2] != pools.shape:
        raise ValueError(f"the scorer returned predictions of shape {predictions.shape}, expected {pools.shape} + [K]")
    return SessionStarts(chosen, pools, predictions, rng.integers(0, 2**63 - 1, size=n))


def user_one_hot(user_fields: dict[str, list[str]], users: pd.DataFrame) -> np.ndarray:
    """The state's user block [N, sum(len(values) + 1)]: each field one-hot over its known values, then "other"."""
    blocks = []
    for name, values in user_fields.items():
        raw = users[name].astype(str).to_numpy()
        index = np.full(len(raw), len(values))
        for i, v in enumerate(values):
            index[raw == v] = i
        blocks.append(np.eye(len(values) + 1)[index])
    return np.concatenate(blocks, axis=1)


class SessionBatch:
    """Sessions in lockstep: ``observe()`` the live ones' states, ``step(actions)`` one request for each."""

    def __init__(self, world: World, starts: SessionStarts, config: SimulatorConfig) -> None:
        if starts.predictions.shape[1] < config.slate_size * config.max_requests:
            raise ValueError("the pools are smaller than max_requests slates")
        self.world, self.starts, self.config = world, starts, config
        n, p = starts.pools.shape
        builder = world.builder
        response = world.response
        user_part, video_part = builder.user_part(starts.users), builder.video_part(starts.pools.ravel())
        self.session_columns = [c for c in response.columns if c.startswith("session_")]
        self.user_features = user_part.to_numpy(np.float64)
        self.video_features = video_part.to_numpy(np.float64)
        # where each column of the response model's matrix comes from: user part, video part or the session
        sources = {**{c: ("user", i) for i, c in enumerate(user_part.columns)},
                   **{c: ("video", i) for i, c in enumerate(video_part.columns)},
                   **{c: ("session", i) for i, c in enumerate(self.session_columns)}}
        self.layout = [sources[c] for c in response.columns]
        self.duration = builder.duration.reindex(starts.pools.ravel()).fillna(builder.duration.median()).to_numpy()
        self.user_block = user_one_hot(world.user_fields, builder.users.reindex(starts.users).fillna("<NA>"))
        self.uniforms = np.stack([np.random.default_rng(int(s)).random((config.max_impressions, UNIFORMS + 1))
                                  for s in starts.seeds])  # [N, impressions, UNIFORMS + 1]: responses, then leaving
        self.shown = np.zeros((n, p), dtype=bool)
        self.alive = np.ones(n, dtype=bool)
        self.requests = np.zeros(n, dtype=np.int64)
        self.impressions = np.zeros(n, dtype=np.int64)
        self.signals = np.zeros((n, len(SESSION_SIGNALS)))  # decayed sums including the last impression
        self.total_reward = np.zeros(n)

    @property
    def state_dim(self) -> int:
        return self.user_block.shape[1] + len(SESSION_FEATURES)

    def observe(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Raw (unstandardised) states [rows, D], laid out as StateSpec.raw_vector lays out a request's."""
        rows = np.flatnonzero(self.alive) if rows is None else rows
        recent = {f"recent_{s}": self.signals[rows, i] for i, s in enumerate(SESSION_SIGNALS)}
        session = {"requests": self.requests[rows], "impressions": self.impressions[rows], **recent}
        cols = [np.log1p(session[f]) if f in COUNT_FEATURES else session[f] for f in SESSION_FEATURES]
        return np.concatenate([self.user_block[rows], np.column_stack(cols)], axis=1)

    def step(self, rows: np.ndarray, actions: np.ndarray) -> dict[str, np.ndarray]:
        """One request for each session in ``rows`` (live ones): returns reward, terminated, truncated, impressions,
        the slates' video ids and the responses per row ([R, slate_size] per response, NaN after the user left)."""
        config, world = self.config, self.world
        weights = action_weights(actions, config.action_scale)  # [R, K]
        scores = np.einsum("rpk,rk->rp", self.starts.predictions[rows], weights)
        scores[self.shown[rows]] = -np.inf
        slate = np.argsort(-scores, axis=1, kind="stable")[:, : config.slate_size]  # [R, k] pool positions
        self.shown[rows[:, None], slate] = True
        reward = np.zeros(len(rows))
        responses = {name: np.full((len(rows), config.slate_size), np.nan) for name in RESPONSES}  # NaN: unseen
        left = np.zeros(len(rows), dtype=bool)
        shown_count = np.zeros(len(rows), dtype=np.int64)
        n_pool = self.starts.pools.shape[1]
        for j in range(config.slate_size):
            active = np.flatnonzero(~left)
            if not len(active):
                break
            sess = rows[active]
            flat = sess * n_pool + slate[active, j]
            position = self.impressions[sess]
            draws = self.uniforms[sess, position]  # [A, UNIFORMS + 1]
            session = {f"session_{s}": SESSION_DECAY * self.signals[sess, i] for i, s in enumerate(SESSION_SIGNALS)}
            session["session_position"] = np.log1p(position)
            parts = {"user": self.user_features[sess], "video": self.video_features[flat],
                     "session": np.column_stack([session[c] for c in self.session_columns])}
            base = np.column_stack([parts[src][:, i] for src, i in self.layout])
            answer = world.response.sample(base, self.duration[flat], draws[:, :UNIFORMS])
            values = {**answer, "play": np.log1p(answer["play_s"])}
            self.signals[sess] = SESSION_DECAY * self.signals[sess] + np.column_stack(
                [values[s] for s in SESSION_SIGNALS])
            reward[active] += config.reward(answer)
            for name in RESPONSES:
                responses[name][active, j] = answer[name]
            self.impressions[sess] += 1
            shown_count[active] += 1
            hazard = world.leave.hazard(position, {s: self.signals[sess, i] for i, s in enumerate(SESSION_SIGNALS)})
            left[active] = draws[:, UNIFORMS] < hazard
        self.requests[rows] += 1
        truncated = ~left & (self.requests[rows] >= config.max_requests)
        self.alive[rows] = ~(left | truncated)
        self.total_reward[rows] += reward
        return {"reward": reward, "terminated": left, "truncated": truncated, "impressions": shown_count,
                "slate": self.starts.pools[rows[:, None], slate], "responses": responses}


Policy = Callable[[np.ndarray], np.ndarray]  # raw states [B, D] -> actions [B, K] in [-1, 1]


@dataclass
class Rollout:
    """Every request of every session: one transition per request, sessions contiguous and in order."""

    session: np.ndarray  # [T]
    states: np.ndarray  # [T, D] raw states
    actions: np.ndarray  # [T, K]
    rewards: np.ndarray  # [T]
    terminated: np.ndarray  # [T] the user left after this request
    truncated: np.ndarray  # [T] the session hit max_requests
    next_states: np.ndarray  # [T, D]
    impressions: np.ndarray  # [T] impressions shown before the user left (<= slate_size)

    def session_returns(self, gamma: float = 1.0) -> np.ndarray:
        step = _step_in_session(self.session)
        return np.bincount(self.session, self.rewards * gamma ** step)

    def session_depth(self) -> np.ndarray:
        """Impressions per session."""
        return np.bincount(self.session, self.impressions)

    def summary(self, gamma: float) -> dict[str, float]:
        returns, depth = self.session_returns(), self.session_depth()
        return {"return": float(returns.mean()), "discounted_return": float(self.session_returns(gamma).mean()),
                "depth": float(depth.mean()), "requests": float(np.bincount(self.session).mean()),
                "sessions": int(len(returns))}


def _step_in_session(session: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(np.r_[True, session[1:] != session[:-1]])
    counts = np.diff(np.r_[starts, len(session)])
    return np.arange(len(session)) - np.repeat(starts, counts)


def simulate(world: World, starts: SessionStarts, policy: Policy, config: SimulatorConfig) -> Rollout:
    """Run every session of ``starts`` to its end under ``policy``."""
    batch = SessionBatch(world, starts, config)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("session", "states", "actions", "rewards", "terminated",
                                                            "truncated", "next_states", "impressions")}
    while batch.alive.any():
        rows = np.flatnonzero(batch.alive)
        states = batch.observe(rows)
        actions = np.clip(np.asarray(policy(states), dtype=np.float64), -1.0, 1.0)
        out = batch.step(rows, actions)
        for key, value in (("session", rows), ("states", states), ("actions", actions), ("rewards", out["reward"]),
                           ("terminated", out["terminated"]), ("truncated", out["truncated"]),
                           ("next_states", batch.observe(rows)), ("impressions", out["impressions"])):
            parts[key].append(value)
    flat = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.lexsort((np.concatenate([np.full(len(p), i) for i, p in enumerate(parts["session"])]),
                        flat["session"]))  # by session, then by request
    return Rollout(**{k: v[order] for k, v in flat.items()})


# ---------------------------------------------------------------------------------------------------------------------
# Gymnasium
# ---------------------------------------------------------------------------------------------------------------------
def _gymnasium():
    try:
        import gymnasium
    except ImportError:
        raise ValueError("the simulator's Env needs gymnasium: pip install 'onerank[rl]'") from None
    return gymnasium


def make_env(world: World, users: np.ndarray, scorer: Scorer, config: SimulatorConfig | None = None):
    """A Gymnasium Env of one session (see the module docstring): observation = the raw state, action = the fusion
    action in [-1, 1]^K; ``reset(seed=...)`` draws the user, the pool and the session's random stream."""
    gymnasium = _gymnasium()
    config = config or SimulatorConfig()

    class FusionEnv(gymnasium.Env):
        metadata = {"render_modes": []}

        def __init__(self) -> None:
            self.world, self.users, self.scorer, self.config = world, np.asarray(users), scorer, config
            probe = draw_starts(world, self.users[:1], 1, config.pool_size, scorer, 0)
            self.num_tasks = probe.predictions.shape[2]
            # bounds: one-hots, log1p of the counts, decayed sums of at most 1 / (1 - decay) times their largest term
            longest_play = np.log1p(3.0 * float(world.builder.duration.max()))
            recent_high = {"recent_play": longest_play / (1 - SESSION_DECAY)}
            session_high = [np.log1p(config.max_requests) if f == "requests" else
                            np.log1p(config.max_impressions) if f == "impressions" else
                            recent_high.get(f, 1.0 / (1 - SESSION_DECAY)) for f in SESSION_FEATURES]
            high = np.r_[np.ones(sum(len(v) + 1 for v in world.user_fields.values())), session_high].astype(np.float32)
            self.observation_space = gymnasium.spaces.Box(np.zeros_like(high), high, (len(high),), np.float32)
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (self.num_tasks,), np.float32)
            self.batch: SessionBatch | None = None

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            super().reset(seed=seed)
            starts = draw_starts(self.world, self.users, 1, self.config.pool_size, self.scorer,
                                 int(self.np_random.integers(0, 2**63 - 1)))
            self.batch = SessionBatch(self.world, starts, self.config)
            return self._observation(), {"user_id": int(starts.users[0])}

        def step(self, action):
            if self.batch is None or not self.batch.alive[0]:
                raise RuntimeError("the session has ended: call reset()")
            a = np.clip(np.asarray(action, dtype=np.float64).reshape(1, -1), -1.0, 1.0)
            out = self.batch.step(np.array([0]), a)
            info = {"impressions": int(out["impressions"][0]), "slate": out["slate"][0].tolist(),
                    "weights": action_weights(a, self.config.action_scale)[0].tolist()}
            return (self._observation(), float(out["reward"][0]), bool(out["terminated"][0]),
                    bool(out["truncated"][0]), info)

        def _observation(self) -> np.ndarray:
            return self.batch.observe(np.array([0]))[0].astype(np.float32)

    return FusionEnv()
