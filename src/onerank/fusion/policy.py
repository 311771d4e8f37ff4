"""A fusion policy: per-request fusion weights from the session's state (BatchRL-MTF, KDD 2022, arXiv 2208.04560).

The learned policy is served as a fusion form, ``kind: "policy"``: a request carries its session's state (the user's
side fields are read from its ``user`` part, the session's recent interactions from its ``state`` part), the policy
maps that state to an action ``a`` in ``[-1, 1]^K`` and the action to the weights of a weighted sum of the K fused
tasks, ``w = softmax(action_scale * a)`` (a weighted sum ranks the same under any positive scale, so the weights sum
to 1). Its networks are stored in the fusion file as plain numbers and run here with a few torch operations, so
serving needs neither d3rlpy nor anything from the file but numbers (loading never executes code).

The state, in the order the networks read it (each column standardised with the logs' mean and spread):
one-hot user fields (``state_spec.user_fields``: each known value, then "other"), then SESSION_FEATURES:

* ``requests``, ``impressions``: requests and impressions already served in this session (read as log1p);
* ``recent_click``, ``recent_long_view``, ``recent_like``, ``recent_completion``: the session's responses so far,
  decayed by 0.8 per impression (``sum_j 0.8 ** (n - 1 - j) * x_j`` over impressions j = 0..n-1);
* ``recent_play``: the same sum of ``log1p(play seconds)``.

:class:`SessionTracker` computes them from a session's responses. A request without ``state`` is a session's first
request (every session feature 0); a partial or unknown state is an error naming the field.

Two policies (``algorithm``):

* ``cql``: the SAC actor of CQL, deterministic at serving time: ``a = tanh(mu(s))``.
* ``bcq``: BCQ's selection: ``n`` candidate actions from the conditional VAE's decoder at fixed latent draws (drawn
  once when the policy is exported, clipped to [-0.5, 0.5] as BCQ samples them), each moved by the perturbation
  network (at most ``perturbation_scale``), the one the first critic values most is served. Fixed draws make the
  served weights a function of the state alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from onerank.fusion.forms import Fusion

SESSION_FEATURES = ("requests", "impressions", "recent_click", "recent_long_view", "recent_like",
                    "recent_completion", "recent_play")
COUNT_FEATURES = ("requests", "impressions")  # read as log1p
RECENT_DECAY = 0.8
ALGORITHMS = ("bcq", "cql")


class SessionTracker:
    """The session features of the next request, from the responses of the impressions served so far."""

    def __init__(self) -> None:
        self.requests = 0
        self.impressions = 0
        self.recent = {name: 0.0 for name in SESSION_FEATURES if name.startswith("recent_")}

    def add_impression(self, click: float, long_view: float, like: float, completion: float,
                       play_seconds: float) -> None:
        values = {"recent_click": click, "recent_long_view": long_view, "recent_like": like,
                  "recent_completion": completion, "recent_play": math.log1p(max(play_seconds, 0.0))}
        for name, x in values.items():
            self.recent[name] = RECENT_DECAY * self.recent[name] + float(x)
        self.impressions += 1

    def end_request(self) -> None:
        self.requests += 1

    def state(self) -> dict[str, float]:
        return {"requests": float(self.requests), "impressions": float(self.impressions), **self.recent}


@dataclass
class StateSpec:
    """How a request becomes the policy's state vector: the user fields one-hot over their known values, the session
    features, each column standardised."""

    user_fields: dict[str, list[str]]  # field -> known raw values (as strings), in one-hot order
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D] > 0

    @property
    def names(self) -> list[str]:
        cols = [f"{f}={v}" for f, values in self.user_fields.items() for v in [*values, "other"]]
        return cols + list(SESSION_FEATURES)

    @property
    def dim(self) -> int:
        return sum(len(v) + 1 for v in self.user_fields.values()) + len(SESSION_FEATURES)

    def raw_vector(self, user: dict[str, Any], state: dict[str, float] | None) -> np.ndarray:
        """The unstandardised state of one request; errors name the field at fault."""
        parts: list[float] = []
        for name, values in self.user_fields.items():
            value = user.get(name)
            one_hot = [0.0] * (len(values) + 1)
            key = None if value is None else str(value)
            one_hot[values.index(key) if key in values else len(values)] = 1.0
            parts += one_hot
        state = {} if state is None else state
        unknown = sorted(set(state) - set(SESSION_FEATURES))
        if unknown:
            raise ValueError(f"unknown session state field {unknown[0]!r}; the policy reads {list(SESSION_FEATURES)}")
        if state:
            missing = [n for n in SESSION_FEATURES if n not in state]
            if missing:
                raise ValueError(f"session state field {missing[0]!r} is missing; give all of "
                                 f"{list(SESSION_FEATURES)}, or no state for a session's first request")
        for name in SESSION_FEATURES:
            x = float(state.get(name, 0.0))
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"session state field {name!r} must be a finite number >= 0, got {x}")
            parts.append(math.log1p(x) if name in COUNT_FEATURES else x)
        return np.asarray(parts, dtype=np.float64)

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        return ((raw - self.mean) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"user_fields": self.user_fields, "session_features": list(SESSION_FEATURES),
                "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "StateSpec":
        if list(raw.get("session_features", [])) != list(SESSION_FEATURES):
            raise ValueError(f"policy state reads session features {raw.get('session_features')}, this version of "
                             f"onerank computes {list(SESSION_FEATURES)}")
        spec = cls({str(f): [str(v) for v in values] for f, values in raw["user_fields"].items()},
                   np.asarray(raw["mean"], dtype=np.float64), np.asarray(raw["scale"], dtype=np.float64))
        if spec.mean.shape != (spec.dim,) or spec.scale.shape != (spec.dim,):
            raise ValueError(f"policy state: mean and scale must have {spec.dim} entries")
        if not (np.all(np.isfinite(spec.mean)) and np.all(np.isfinite(spec.scale)) and np.all(spec.scale > 0)):
            raise ValueError("policy state: mean must be finite and scale finite and > 0")
        return spec


@dataclass
class MLP:
    """Linear layers with a ReLU after each hidden one (d3rlpy's vector encoder) and a linear head."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (weight [out, in], bias [out]); the last one is the head

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for weight, bias in self.layers[:-1]:
            x = torch.relu(F.linear(x, weight, bias))
        return F.linear(x, *self.layers[-1])

    @property
    def in_features(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def out_features(self) -> int:
        return int(self.layers[-1][0].shape[0])

    def to_dict(self) -> list[dict[str, list]]:
        return [{"weight": w.tolist(), "bias": b.tolist()} for w, b in self.layers]

    @classmethod
    def from_dict(cls, raw: list[dict[str, list]], name: str) -> "MLP":
        layers = []
        try:
            for layer in raw:
                w = torch.tensor(layer["weight"], dtype=torch.float32)
                b = torch.tensor(layer["bias"], dtype=torch.float32)
                if w.ndim != 2 or b.shape != (w.shape[0],):
                    raise ValueError("bad shapes")
                layers.append((w, b))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"policy network {name!r}: layers must be {{weight: [out][in], bias: [out]}} lists of "
                             f"numbers ({exc})") from None
        if not layers:
            raise ValueError(f"policy network {name!r} has no layers")
        for (w1, _), (w2, _) in zip(layers, layers[1:]):
            if w2.shape[1] != w1.shape[0]:
                raise ValueError(f"policy network {name!r}: a layer of {w1.shape[0]} outputs feeds one of "
                                 f"{w2.shape[1]} inputs")
        if not all(torch.isfinite(w).all() and torch.isfinite(b).all() for w, b in layers):
            raise ValueError(f"policy network {name!r} has NaN or infinite weights")
        return cls(layers)


@dataclass
class PolicyFusion:
    """A weighted sum whose weights a policy network sets per request from its state (see the module docstring)."""

    algorithm: str
    tasks: list[str]  # the fused tasks, in action order
    state_spec: StateSpec
    networks: dict[str, MLP]  # cql: actor; bcq: decoder, perturbation, critic
    action_scale: float = 3.0  # w = softmax(action_scale * a)
    latents: torch.Tensor | None = None  # bcq: [n, 2K] fixed latent draws
    perturbation_scale: float = 0.05  # bcq: the perturbation network's bound (BCQ's Phi)
    info: dict[str, Any] = field(default_factory=dict)

    kind = "policy"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"policy algorithm must be one of {ALGORITHMS}, not {self.algorithm!r}")
        k, d = len(self.tasks), self.state_spec.dim
        if k < 2:
            raise ValueError(f"a fusion policy needs at least two tasks, got {self.tasks}")
        if not (math.isfinite(self.action_scale) and self.action_scale > 0):
            raise ValueError(f"policy action_scale must be finite and > 0, got {self.action_scale}")
        needed = {"cql": {"actor": (d, k)},
                  "bcq": {"decoder": (d + 2 * k, k), "perturbation": (d + k, k), "critic": (d + k, 1)}}[self.algorithm]
        for name, (n_in, n_out) in needed.items():
            net = self.networks.get(name)
            if net is None:
                raise ValueError(f"a {self.algorithm} policy needs a {name!r} network")
            if (net.in_features, net.out_features) != (n_in, n_out):
                raise ValueError(f"policy network {name!r} maps {net.in_features} -> {net.out_features}, the state "
                                 f"and {k} tasks need {n_in} -> {n_out}")
        if self.algorithm == "bcq":
            if self.latents is None or self.latents.ndim != 2 or self.latents.shape[1] != 2 * k or not len(self.latents):
                raise ValueError(f"a bcq policy needs latents of shape [n, {2 * k}]")
            if not torch.isfinite(self.latents).all():
                raise ValueError("bcq policy latents must be finite")

    # ---- the policy -----------------------------------------------------------------------------------------------
    def act(self, states: np.ndarray, latents: torch.Tensor | None = None) -> np.ndarray:
        """Actions [B, K] for standardised states [B, D]. ``latents`` ([B * n, 2K], bcq only) replaces the fixed
        draws (tests compare with d3rlpy's own sampling)."""
        x = torch.as_tensor(np.asarray(states, dtype=np.float32))
        with torch.no_grad():
            if self.algorithm == "cql":
                return torch.tanh(self.networks["actor"](x)).numpy()
            n = self.latents.shape[0] if latents is None else latents.shape[0] // x.shape[0]
            repeated = x.unsqueeze(1).expand(x.shape[0], n, x.shape[1]).reshape(-1, x.shape[1])
            z = self.latents.repeat(x.shape[0], 1) if latents is None else latents
            proposed = self.networks["decoder"](torch.cat([repeated, z], dim=1))
            residual = self.perturbation_scale * torch.tanh(
                self.networks["perturbation"](torch.cat([repeated, proposed], dim=1)))
            actions = (proposed + residual).clamp(-1.0, 1.0)
            values = self.networks["critic"](torch.cat([repeated, actions], dim=1)).view(-1, n)
            best = values.argmax(dim=1)
            return actions.view(-1, n, actions.shape[1])[torch.arange(x.shape[0]), best].numpy()

    def weights_of(self, actions: np.ndarray) -> np.ndarray:
        return action_weights(actions, self.action_scale)

    def for_request(self, user: dict[str, Any], state: dict[str, float] | None) -> Fusion:
        """The weighted sum this request is ranked with."""
        s = self.state_spec.standardise(self.state_spec.raw_vector(user, state))[None, :]
        w = self.weights_of(self.act(s))[0]
        return Fusion("weighted_sum", dict(zip(self.tasks, w.tolist())))

    def __call__(self, predictions: dict[str, np.ndarray]) -> np.ndarray:
        raise ValueError("a fusion policy sets its weights per request from the session state; rank a request "
                         "(Ranker.rank) or call for_request(user, state) first")

    # ---- the fusion-form protocol -------------------------------------------------------------------------------
    def resolved(self, tasks: list[str], kinds: dict[str, str]) -> "PolicyFusion":
        unknown = [t for t in self.tasks if t not in tasks]
        if unknown:
            raise ValueError(f"fusion policy over unknown tasks {unknown}; the model's tasks are {tasks}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "algorithm": self.algorithm, "tasks": list(self.tasks),
            "action_scale": self.action_scale, "state": self.state_spec.to_dict(),
            "networks": {name: net.to_dict() for name, net in self.networks.items()}, "info": self.info,
        }
        if self.algorithm == "bcq":
            out["latents"] = self.latents.tolist()
            out["perturbation_scale"] = self.perturbation_scale
        return out

    def summary(self) -> dict[str, Any]:
        """What a response shows: the policy without its networks."""
        return {"kind": self.kind, "algorithm": self.algorithm, "tasks": list(self.tasks),
                "action_scale": self.action_scale, "state": self.state_spec.names}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PolicyFusion":
        try:
            algorithm = raw["algorithm"]
            tasks = [str(t) for t in raw["tasks"]]
            networks = {str(name): MLP.from_dict(layers, name) for name, layers in raw["networks"].items()}
            latents = None
            if raw.get("latents") is not None:
                latents = torch.tensor(raw["latents"], dtype=torch.float32)
            return cls(algorithm, tasks, StateSpec.from_dict(raw["state"]), networks,
                       float(raw.get("action_scale", 3.0)), latents, float(raw.get("perturbation_scale", 0.05)),
                       dict(raw.get("info", {})))
        except KeyError as exc:
            raise ValueError(f"fusion policy lacks {exc.args[0]!r}") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"fusion policy is malformed ({exc})") from None


def action_weights(actions: np.ndarray, action_scale: float) -> np.ndarray:
    """Actions [B, K] in [-1, 1] -> weights [B, K] that sum to 1: ``softmax(action_scale * a)``."""
    z = action_scale * np.asarray(actions, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def weights_action(weights: dict[str, float], tasks: list[str], action_scale: float) -> np.ndarray:
    """The action whose weights are closest to ``weights`` (log-weights centred, divided by the scale, clipped to
    [-1, 1]): how a static fusion enters the policy's action space."""
    w = np.array([max(float(weights.get(t, 0.0)), 1e-12) for t in tasks])
    log_w = np.log(w / w.sum())
    return np.clip((log_w - log_w.mean()) / action_scale, -1.0, 1.0)
