"""Batch (offline) RL of a fusion policy from logged sessions, as BatchRL-MTF (KDD 2022, arXiv 2208.04560) does it.

The logs hold, per request of a session, the state the fusion read, the action the logging policy took (fusion weights
``softmax(action_scale * a)``), the request's reward and whether the user left after it. From them alone:

* :func:`train_policy` fits BCQ (the paper's agent: a conditional VAE proposing actions near the logged ones, a
  bounded perturbation network, twin critics with clipped double-Q targets) or CQL (conservative Q-learning on SAC,
  which the paper found as good or better offline) with d3rlpy, and exports the result as a
  :class:`~onerank.fusion.policy.PolicyFusion`: networks as numbers, served without d3rlpy.
* :func:`conservative_fqe` estimates a policy's value on the logs: fitted Q evaluation with a conservative penalty
  (the critic is pushed down where the evaluated policy's action leaves the logged one), so that a policy that
  strays from the data is not trusted on extrapolated values.

d3rlpy is in the ``rl`` extra (``pip install "onerank[rl]"``); serving a fitted policy needs only torch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from onerank.fusion.policy import ALGORITHMS, MLP, SESSION_FEATURES, PolicyFusion, StateSpec

log = logging.getLogger(__name__)

SESSIONS_FORMAT = 1
ARRAYS = ("session", "states", "actions", "rewards", "terminated", "truncated", "next_states")


def require_d3rlpy():
    try:
        import d3rlpy
        import structlog
    except ImportError:
        raise ValueError("batch RL fusion needs d3rlpy: pip install 'onerank[rl]'") from None
    # d3rlpy reports every fit's set-up and epochs through structlog at INFO; onerank reports its own summary
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return d3rlpy


# ---------------------------------------------------------------------------------------------------------------------
# Logged sessions
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class LoggedSessions:
    """One row per request, sessions contiguous and in order. ``states`` / ``next_states`` are raw (unstandardised)
    states laid out as :class:`StateSpec` lays them out for ``user_fields``; ``actions`` in [-1, 1]^K."""

    session: np.ndarray  # [T] int
    states: np.ndarray  # [T, D]
    actions: np.ndarray  # [T, K]
    rewards: np.ndarray  # [T]
    terminated: np.ndarray  # [T] bool: the user left after this request
    truncated: np.ndarray  # [T] bool: the session was cut (no more requests logged)
    next_states: np.ndarray  # [T, D]
    tasks: list[str]
    user_fields: dict[str, list[str]]
    action_scale: float
    gamma: float
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint hash, reward definition, logging policy, ...

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "logged sessions") -> None:
        t = len(self.session)
        if t == 0:
            raise ValueError(f"{where}: no requests")
        for name in ARRAYS:
            arr = getattr(self, name)
            if len(arr) != t:
                raise ValueError(f"{where}: {name} has {len(arr)} rows, session has {t}")
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise ValueError(f"{where}: {name} has NaN or infinite values")
        dim = sum(len(v) + 1 for v in self.user_fields.values()) + len(SESSION_FEATURES)
        for name in ("states", "next_states"):
            if getattr(self, name).ndim != 2 or getattr(self, name).shape[1] != dim:
                raise ValueError(f"{where}: {name} must be [T, {dim}] for user fields {list(self.user_fields)}")
        if self.actions.ndim != 2 or self.actions.shape[1] != len(self.tasks) or len(self.tasks) < 2:
            raise ValueError(f"{where}: actions must be [T, {len(self.tasks)}] (one column per task of {self.tasks})")
        if np.any(np.abs(self.actions) > 1.0 + 1e-6):
            raise ValueError(f"{where}: actions must lie in [-1, 1]")
        if np.any(np.diff(self.session) < 0):
            raise ValueError(f"{where}: sessions must be contiguous and in order")
        ends = np.r_[self.session[1:] != self.session[:-1], True]
        if np.any((self.terminated | self.truncated) & ~ends):
            raise ValueError(f"{where}: a session goes on after its user left or it was cut")
        if not 0 < self.gamma < 1 or not self.action_scale > 0:
            raise ValueError(f"{where}: gamma must be in (0, 1) and action_scale > 0")

    @property
    def initial(self) -> np.ndarray:
        """Rows that start a session."""
        return np.r_[True, self.session[1:] != self.session[:-1]]

    def split_sessions(self, fraction: float, seed: int) -> tuple["LoggedSessions", "LoggedSessions"]:
        """Two parts with disjoint sessions: ``1 - fraction`` and ``fraction`` of them (a seeded draw)."""
        ids = np.unique(self.session)
        chosen = np.random.default_rng(seed).permutation(ids)[: int(round(fraction * len(ids)))]
        second = np.isin(self.session, chosen)
        return self.rows(~second), self.rows(second)

    def rows(self, keep: np.ndarray) -> "LoggedSessions":
        return LoggedSessions(*(getattr(self, n)[keep] for n in ARRAYS), self.tasks, self.user_fields,
                              self.action_scale, self.gamma, dict(self.meta))

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """One ``.npz`` of plain arrays (no pickled objects) with the description as a JSON string, written
        atomically; an existing file is replaced only with ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
        header = {"format": SESSIONS_FORMAT, "kind": "onerank.logged_sessions", "tasks": self.tasks,
                  "user_fields": self.user_fields, "action_scale": self.action_scale, "gamma": self.gamma,
                  "meta": self.meta}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, header=np.array(json.dumps(header)),
                            **{n: np.asarray(getattr(self, n)) for n in ARRAYS})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(buffer.getvalue())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LoggedSessions":
        """Read a file written by :meth:`save`; anything else is refused with one line naming the file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"logged sessions file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {n: data[n] for n in ARRAYS}
        except (ValueError, OSError, KeyError, EOFError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a logged sessions file of onerank ({str(exc).splitlines()[0]})") from None
        if not isinstance(header, dict) or header.get("kind") != "onerank.logged_sessions":
            raise ValueError(f"{path} is not a logged sessions file of onerank")
        if header.get("format") != SESSIONS_FORMAT:
            raise ValueError(f"{path}: logged sessions format {header.get('format')!r} is not {SESSIONS_FORMAT}")
        try:
            sessions = cls(arrays["session"].astype(np.int64), arrays["states"].astype(np.float64),
                           arrays["actions"].astype(np.float64), arrays["rewards"].astype(np.float64),
                           arrays["terminated"].astype(bool), arrays["truncated"].astype(bool),
                           arrays["next_states"].astype(np.float64), [str(t) for t in header["tasks"]],
                           {str(k): [str(v) for v in vs] for k, vs in header["user_fields"].items()},
                           float(header["action_scale"]), float(header["gamma"]), dict(header.get("meta", {})))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: logged sessions header is malformed ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return sessions


def state_spec(sessions: LoggedSessions) -> StateSpec:
    """Standardisation of the logged states (columns that never vary keep scale 1)."""
    states = sessions.states
    scale = states.std(axis=0)
    return StateSpec(dict(sessions.user_fields), states.mean(axis=0), np.where(scale > 1e-6, scale, 1.0))


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class BatchRLSettings:
    algorithm: str = "bcq"
    steps: int = 2000  # gradient steps
    batch_size: int = 256
    hidden: tuple[int, ...] = (64, 64)
    seed: int = 0
    candidates: int = 10  # bcq: actions proposed per state (BCQ's n; the fixed latent draws when served)
    perturbation: float = 0.05  # bcq: the perturbation's bound (BCQ's Phi)
    conservative_weight: float = 5.0  # cql: alpha of the conservative penalty
    # learning rates (None: BCQ 1e-3 for every network, as in its paper and d3rlpy; CQL 3e-4, SAC's)
    actor_lr: float | None = None
    critic_lr: float | None = None

    def rates(self) -> tuple[float, float]:
        default = 1e-3 if self.algorithm == "bcq" else 3e-4
        return (self.actor_lr or default, self.critic_lr or default)

    def check(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"batch RL algorithm must be one of {ALGORITHMS}, not {self.algorithm!r}")
        if min(self.steps, self.batch_size, self.candidates, *self.hidden) < 1:
            raise ValueError("steps, batch_size, candidates and hidden sizes must be >= 1")
        if not (self.perturbation > 0 and self.conservative_weight >= 0 and min(self.rates()) > 0):
            raise ValueError("perturbation and learning rates must be > 0, conservative_weight >= 0")


def mdp_dataset(sessions: LoggedSessions, spec: StateSpec, reward_scale: float):
    """d3rlpy's dataset: every session an episode; a cut session gets its last next state as a final row (never a
    transition's start) so its last request is still learned from."""
    d3rlpy = require_d3rlpy()
    obs, act, rew, term, timeout = [], [], [], [], []
    ends = np.flatnonzero(np.r_[sessions.session[1:] != sessions.session[:-1], True])
    start = 0
    for end in ends:
        rows = slice(start, end + 1)
        obs.append(sessions.states[rows])
        act.append(sessions.actions[rows])
        rew.append(sessions.rewards[rows] * reward_scale)
        n = end + 1 - start
        flags = np.zeros(n)
        if sessions.terminated[end]:
            flags[-1] = 1.0
            term.append(flags)
            timeout.append(np.zeros(n))
        else:
            obs.append(sessions.next_states[end: end + 1])
            act.append(sessions.actions[end: end + 1])
            rew.append(np.zeros(1))
            term.append(np.zeros(n + 1))
            timeout.append(np.r_[np.zeros(n), 1.0])
        start = end + 1
    observations = spec.standardise(np.concatenate(obs))
    return d3rlpy.dataset.MDPDataset(observations, np.concatenate(act).astype(np.float32),
                                     np.concatenate(rew).astype(np.float32), np.concatenate(term),
                                     np.concatenate(timeout))


def _linears(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight.detach().clone(), m.bias.detach().clone()) for m in module.modules()
            if isinstance(m, torch.nn.Linear)]


def _mlp(encoder: torch.nn.Module, head: torch.nn.Linear) -> MLP:
    layers = [m for m in encoder.modules() if not isinstance(m, (torch.nn.Sequential, type(encoder)))]
    if not all(isinstance(m, (torch.nn.Linear, torch.nn.ReLU)) for m in layers):
        raise ValueError(f"cannot export an encoder made of {sorted({type(m).__name__ for m in layers})}")
    return MLP(_linears(encoder) + _linears(head))


def train_policy(sessions: LoggedSessions, settings: BatchRLSettings,
                 progress: Callable[[int, dict], None] | None = None) -> tuple[PolicyFusion, Any]:
    """Fit ``settings.algorithm`` on ``sessions`` and export it; returns the served policy and d3rlpy's model."""
    settings.check()
    d3rlpy = require_d3rlpy()
    spec = state_spec(sessions)
    reward_scale = 1.0 / max(float(np.std(sessions.rewards)), 1e-6)  # critics learn rewards of unit spread
    dataset = mdp_dataset(sessions, spec, reward_scale)
    d3rlpy.seed(settings.seed)
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=list(settings.hidden))
    actor_lr, critic_lr = settings.rates()
    if settings.algorithm == "bcq":
        config = d3rlpy.algos.BCQConfig(
            actor_encoder_factory=encoder, critic_encoder_factory=encoder, imitator_encoder_factory=encoder,
            batch_size=settings.batch_size, gamma=sessions.gamma, n_action_samples=settings.candidates,
            action_flexibility=settings.perturbation, actor_learning_rate=actor_lr, critic_learning_rate=critic_lr,
            imitator_learning_rate=critic_lr)
    else:
        config = d3rlpy.algos.CQLConfig(
            actor_encoder_factory=encoder, critic_encoder_factory=encoder, batch_size=settings.batch_size,
            gamma=sessions.gamma, conservative_weight=settings.conservative_weight, n_action_samples=10,
            actor_learning_rate=actor_lr, critic_learning_rate=critic_lr)
    algo = config.create(device="cpu")
    history = []
    for epoch, metrics in algo.fitter(dataset, n_steps=settings.steps, n_steps_per_epoch=max(settings.steps // 10, 1),
                                      show_progress=False, save_interval=10**9,
                                      logger_adapter=d3rlpy.logging.NoopAdapterFactory()):
        history.append({"epoch": epoch, **{k: float(v) for k, v in metrics.items() if not k.startswith("time")}})
        if progress is not None:
            progress(epoch, history[-1])
    policy = export_policy(algo, settings, spec, sessions, reward_scale)
    policy.info["training_curve"] = history
    return policy, algo


def export_policy(algo: Any, settings: BatchRLSettings, spec: StateSpec, sessions: LoggedSessions,
                  reward_scale: float) -> PolicyFusion:
    modules = algo.impl.modules
    k = len(sessions.tasks)
    info = {"settings": {**asdict(settings), "hidden": list(settings.hidden)}, "gamma": sessions.gamma,
            "reward_scale": reward_scale, "trained_on": {"requests": int(len(sessions.session)),
                                                         "sessions": int(sessions.initial.sum())},
            "logs": sessions.meta}
    if settings.algorithm == "cql":
        actor = modules.policy
        networks = {"actor": _mlp(actor._encoder, actor._mu)}
        return PolicyFusion("cql", list(sessions.tasks), spec, networks, sessions.action_scale, info=info)
    generator = torch.Generator().manual_seed(settings.seed)
    latents = torch.randn(settings.candidates, 2 * k, generator=generator).clamp(-0.5, 0.5)
    networks = {"decoder": _mlp(modules.vae_decoder._encoder, modules.vae_decoder._fc),
                "perturbation": _mlp(modules.policy._encoder, modules.policy._fc),
                "critic": _mlp(modules.q_funcs[0]._encoder, modules.q_funcs[0]._fc)}
    return PolicyFusion("bcq", list(sessions.tasks), spec, networks, sessions.action_scale, latents,
                        float(settings.perturbation), info=info)


# ---------------------------------------------------------------------------------------------------------------------
# Off-policy evaluation
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class FQESettings:
    steps: int = 2000
    batch_size: int = 256
    hidden: tuple[int, ...] = (64, 64)
    lr: float = 1e-3
    tau: float = 0.05  # target network update rate: evaluation, not control, so the targets may follow quickly
    conservative_weight: float = 1.0  # weight of the penalty on unconfirmed improvements (0: plain FQE)
    seed: int = 0


def conservative_fqe(sessions: LoggedSessions, actions_of: Callable[[np.ndarray], np.ndarray],
                     settings: FQESettings | None = None) -> dict[str, float]:
    """The value of the policy ``actions_of`` (raw states [B, D] -> actions [B, K]) at the logged sessions' first
    states, by fitted Q evaluation on the logs with a conservative penalty:

    ``loss = E[(Q(s, a) - r - gamma (1 - left) Q'(s', pi(s')))^2] + w E[max(0, Q(s, pi(s)) - Q(s, a))^2]``

    (``a``: the logged action; a cut session bootstraps from its last next state). The penalty pulls down any value
    the critic gives the policy's action above the logged action's in the same state: an improvement the logs do not
    show is not credited. It is bounded (its minimum is reached once the claimed improvement is gone), so the fit
    converges; a linear penalty would push the value of every action the logs lack down without end. The estimate is
    in reward units, discounted by the logs' gamma."""
    settings = settings or FQESettings()
    spec = state_spec(sessions)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    scale = 1.0 / max(float(np.std(sessions.rewards)), 1e-6)
    s = torch.as_tensor(spec.standardise(sessions.states))
    s_next = torch.as_tensor(spec.standardise(sessions.next_states))
    a = torch.as_tensor(sessions.actions, dtype=torch.float32)
    pi_s = torch.as_tensor(np.asarray(actions_of(sessions.states)), dtype=torch.float32)
    pi_next = torch.as_tensor(np.asarray(actions_of(sessions.next_states)), dtype=torch.float32)
    r = torch.as_tensor(sessions.rewards * scale, dtype=torch.float32)
    done = torch.as_tensor(sessions.terminated, dtype=torch.float32)
    dims = [s.shape[1] + a.shape[1], *settings.hidden, 1]

    def net() -> torch.nn.Sequential:
        layers: list[torch.nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(torch.nn.Linear(n_in, n_out))
            if i < len(dims) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)

    q, q_target = net(), net()
    q_target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=settings.lr)
    n = len(r)
    for _ in range(settings.steps):
        idx = torch.as_tensor(rng.integers(0, n, settings.batch_size))
        with torch.no_grad():
            target = r[idx] + sessions.gamma * (1 - done[idx]) * q_target(
                torch.cat([s_next[idx], pi_next[idx]], 1)).squeeze(1)
        q_logged = q(torch.cat([s[idx], a[idx]], 1)).squeeze(1)
        loss = ((q_logged - target) ** 2).mean()
        if settings.conservative_weight > 0:
            q_policy = q(torch.cat([s[idx], pi_s[idx]], 1)).squeeze(1)
            gain = torch.relu(q_policy - q_logged.detach())
            loss = loss + settings.conservative_weight * (gain ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p, p_t in zip(q.parameters(), q_target.parameters()):
                p_t.mul_(1 - settings.tau).add_(settings.tau * p)
    first = torch.as_tensor(sessions.initial)
    with torch.no_grad():
        value = q(torch.cat([s[first], pi_s[first]], 1)).squeeze(1).mean().item() / scale
    return {"estimate": value, "conservative_weight": settings.conservative_weight, "steps": settings.steps}
