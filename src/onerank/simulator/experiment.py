"""The pieces an experiment (``onerank simulate``, benchmarks/rl_fusion.py) puts together: the app-session leave model
calibrated to a session depth, and logged sessions of an exploring logging policy around a static fusion."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from onerank.fusion.batch_rl import LoggedSessions
from onerank.simulator.env import SessionStarts, SimulatorConfig, World, simulate
from onerank.simulator.leave import LeaveModel
from onerank.simulator.logs import KuaiRandLog
from onerank.simulator.policies import Policy, exploring_policy


@dataclass
class SimulationSettings:
    """How the simulator is built and how the logs are collected (docs/rl_fusion.md gives the reasons)."""

    response_model: str = "gbdt"
    slate_size: int = 5
    pool_size: int = 100
    max_requests: int = 20
    gamma: float = 0.95  # BatchRL-MTF's discount per request
    # the leave model's assumption: satisfaction weights, and the mean impressions per session under the logging
    # policy's centre that its intercept is set to
    satisfaction: dict[str, float] = field(default_factory=lambda: {"long_view": 0.5, "completion": 0.5})
    target_depth: float = 30.0
    calibration_sessions: int = 300
    # the logging policy: per request a uniform random action with this probability, else the static fusion + noise
    random_share: float = 0.3
    noise: float = 0.3
    max_train_rows: int | None = None  # fit the response model on a sample of the train days (tests)

    def config(self) -> SimulatorConfig:
        return SimulatorConfig(slate_size=self.slate_size, pool_size=self.pool_size, max_requests=self.max_requests)

    def check(self) -> None:
        self.config()
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        if not 0 <= self.random_share <= 1 or self.noise < 0:
            raise ValueError("random_share must be in [0, 1] and noise >= 0")
        if not 1 <= self.target_depth <= self.slate_size * self.max_requests:
            raise ValueError(f"target_depth must be in [1, {self.slate_size * self.max_requests}]")

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_leave(world: World, starts: SessionStarts, policy: Policy, config: SimulatorConfig,
                    satisfaction: dict[str, float], target_depth: float, iterations: int = 10) -> LeaveModel:
    """The assumed leave model whose intercept makes the mean session depth under ``policy`` on ``starts`` equal
    ``target_depth`` (bisection: the depth falls as the intercept rises)."""
    lo, hi = -10.0, 5.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        world.leave = LeaveModel.assumed(mid, satisfaction)
        depth = simulate(world, starts, policy, config).session_depth().mean()
        lo, hi = (mid, hi) if depth > target_depth else (lo, mid)
    world.leave = LeaveModel.assumed((lo + hi) / 2, satisfaction)
    return world.leave


def log_sessions(world: World, starts: SessionStarts, centre: np.ndarray, settings: SimulationSettings,
                 tasks: list[str], seed: int, meta: dict) -> LoggedSessions:
    """Sessions logged under the exploring policy around the static action ``centre``."""
    config = settings.config()
    policy = exploring_policy(centre, settings.random_share, settings.noise, seed)
    rollout = simulate(world, starts, policy, config)
    meta = {**meta, "logging_policy": {"centre": np.asarray(centre).tolist(), "random_share": settings.random_share,
                                       "noise": settings.noise, "seed": seed},
            "simulation": settings.to_dict(), "reward": asdict(config.reward), "leave": world.leave.to_dict(),
            "response_model": world.response.model_class}
    return LoggedSessions(rollout.session, rollout.states, rollout.actions, rollout.rewards, rollout.terminated,
                          rollout.truncated, rollout.next_states, list(tasks), dict(world.user_fields),
                          config.action_scale, settings.gamma, meta)


@dataclass
class CheckpointSimulation:
    """The simulator around one checkpoint: the world, the ranker scoring pools per split (calibrated by the
    checkpoint's fusion file), the fused tasks and the static fusion's action (the logging policy's centre)."""

    world: World
    log: KuaiRandLog
    scorers: dict  # split -> RankerScorer
    users: dict  # split -> raw user ids with a context in that split and side features
    tasks: list[str]
    centre: np.ndarray
    meta: dict  # checkpoint hash, calibration and static fusion (written into logged sessions)
