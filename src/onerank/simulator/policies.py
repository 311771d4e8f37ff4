"""Fusion policies for the simulator: raw states [B, D] -> actions [B, K] in [-1, 1]."""

from __future__ import annotations

import numpy as np

from onerank.fusion.policy import PolicyFusion
from onerank.simulator.env import Policy


def static_policy(action: np.ndarray) -> Policy:
    """The same action (fusion weights) for every request: a static fusion."""
    action = np.asarray(action, dtype=np.float64)
    return lambda states: np.broadcast_to(action, (len(states), len(action))).copy()


def exploring_policy(action: np.ndarray, random_share: float, noise: float, seed: int) -> Policy:
    """The logging policy of BatchRL-MTF's data collection: per request, with probability ``random_share`` a uniform
    random action, else the static ``action`` plus Gaussian noise of spread ``noise`` (clipped to [-1, 1])."""
    action = np.asarray(action, dtype=np.float64)
    rng = np.random.default_rng(seed)

    def act(states: np.ndarray) -> np.ndarray:
        n, k = len(states), len(action)
        noisy = np.clip(action + rng.normal(0.0, noise, (n, k)), -1.0, 1.0)
        uniform = rng.uniform(-1.0, 1.0, (n, k))
        return np.where(rng.random((n, 1)) < random_share, uniform, noisy)

    return act


def fusion_policy(policy: PolicyFusion) -> Policy:
    """A served fusion policy reading the simulator's raw states (standardised as the policy was trained)."""
    return lambda states: policy.act(policy.state_spec.standardise(np.asarray(states, dtype=np.float64)))
