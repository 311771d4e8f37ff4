"""Adaptive task-weighting strategies as plug-ins: uncertainty, GradNorm, PCGrad, DWA.

Each one only sees the per-task losses and the model's shared parameters (``backward(losses, shared_params)``), never
the model, so any strategy runs with any model. Learnable state is ``nn.Parameter``s (the trainer optimises them with
the model's); other state is saved by ``state_dict`` (buffers) or ``extra_state()`` / ``load_extra_state()`` (plain
Python values), which the trainer writes to and reads from its resumable checkpoint.

The configured per-task ``weight`` is used by ``fixed`` only: the adaptive strategies set the weights themselves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from onerank.data.schema import SchemaError, TaskSpec
from onerank.objectives.weighting import WeightingStrategy


def _flat_gradient(loss: Tensor | float, params: list[nn.Parameter]) -> Tensor:
    """d loss / d params, flattened into one vector (zeros for parameters the loss does not reach)."""
    if not (isinstance(loss, Tensor) and loss.requires_grad):
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _as_tensor(loss: Tensor | float, like: Tensor) -> Tensor:
    return loss if isinstance(loss, Tensor) else like.new_tensor(float(loss))


class UncertaintyWeighting(WeightingStrategy):
    """Kendall, Gal & Cipolla (CVPR 2018): homoscedastic task uncertainty, with a learnable s_k = log sigma_k^2.

    Binary tasks (classification likelihood): ``exp(-s_k) L_k + s_k / 2``; regression tasks (Gaussian likelihood):
    ``exp(-s_k) L_k / 2 + s_k / 2``. At the optimum sigma_k^2 = 2 L_k (binary) or L_k (regression): the noisier a
    task, the smaller its weight, ``1 / sigma^2`` (``1 / (2 sigma^2)`` for regression).
    Option ``init_log_variance`` (default 0: every weight starts at 1, or 1/2 for regression).
    """

    name = "uncertainty"

    def __init__(self, tasks: list[TaskSpec], init_log_variance: float = 0.0, **options) -> None:
        super().__init__(tasks, **options)
        self.log_variance = nn.Parameter(torch.full((len(self.tasks),), float(init_log_variance)))
        self.likelihood_scale = [0.5 if t.kind == "regression" else 1.0 for t in tasks]

    def precision_weights(self) -> Tensor:
        return torch.tensor(self.likelihood_scale, device=self.log_variance.device) * torch.exp(-self.log_variance)

    def backward(self, losses: dict[str, Tensor], shared_params: list[nn.Parameter]) -> dict[str, float]:
        weights = self.precision_weights()
        stacked = torch.stack([_as_tensor(losses[t], weights) for t in self.tasks])
        total = (weights * stacked).sum() + 0.5 * self.log_variance.sum()
        total.backward()
        return dict(zip(self.tasks, weights.detach().tolist()))


class GradNorm(WeightingStrategy):
    """Chen et al. (ICML 2018): learnable weights w_k that equalise the tasks' gradient norms, scaled by their
    relative training rates.

    Per step: G_k = ||grad_W (w_k L_k)||, r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0)), and the weights take a gradient
    step on ``sum_k |G_k - mean_j(G_j) * r_k^alpha|`` (the target held constant), while the model gets the gradient of
    ``sum_k w_k L_k``. Before each step the weights are renormalised to sum to the number of tasks.
    Options: ``alpha`` (1.5; higher pulls slow tasks harder), ``layer``: ``"all"`` (W = every shared parameter,
    default: exact for any model) or ``"last"`` (W = the last shared weight matrix in registration order, the paper's
    cheaper choice).
    """

    name = "gradnorm"

    def __init__(self, tasks: list[TaskSpec], alpha: float = 1.5, layer: str = "all", **options) -> None:
        super().__init__(tasks, **options)
        if layer not in ("all", "last"):
            raise SchemaError(f"gradnorm option layer must be 'all' or 'last', got {layer!r}")
        if float(alpha) < 0:
            raise SchemaError(f"gradnorm option alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.layer = layer
        self.weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), math.nan))

    def _norm_params(self, shared_params: list[nn.Parameter]) -> list[nn.Parameter]:
        if self.layer == "last":
            matrices = [p for p in shared_params if p.dim() >= 2]
            if matrices:
                return [matrices[-1]]
        return shared_params

    def backward(self, losses: dict[str, Tensor], shared_params: list[nn.Parameter]) -> dict[str, float]:
        K = len(self.tasks)
        with torch.no_grad():
            self.weights.clamp_(min=1e-4)
            self.weights.mul_(K / self.weights.sum())
        stacked = torch.stack([_as_tensor(losses[t], self.weights) for t in self.tasks])
        current = stacked.detach()
        with torch.no_grad():
            unset = torch.isnan(self.initial_losses) & (current > 0)
            self.initial_losses.copy_(torch.where(unset, current, self.initial_losses))
        params = self._norm_params(shared_params)
        norms = torch.stack([_flat_gradient(losses[t], params).norm() for t in self.tasks])
        ratio = torch.where(self.initial_losses > 0, current / self.initial_losses, torch.ones_like(current))
        rate = ratio / ratio.mean().clamp_min(1e-12)
        weighted_norms = self.weights * norms  # G_k: linear in w_k, so the norms need no second-order graph
        target = (weighted_norms.mean() * rate.pow(self.alpha)).detach()
        balance = (weighted_norms - target).abs().sum()
        self.weights.grad = torch.autograd.grad(balance, self.weights)[0]
        (self.weights.detach() * stacked).sum().backward()
        return dict(zip(self.tasks, self.weights.detach().tolist()))


class PCGrad(WeightingStrategy):
    """Yu et al. (NeurIPS 2020), "gradient surgery": on the shared parameters, each task's gradient is projected onto
    the normal plane of every other task's gradient it conflicts with (negative dot product), the others visited in
    a random order; the projected gradients are summed. Parameters outside the shared set get the gradient of
    ``sum_k L_k``, which for a task's private parameters is its own task's gradient.
    Option ``seed`` (the projection order's random generator, saved with the checkpoint).
    """

    name = "pcgrad"

    def __init__(self, tasks: list[TaskSpec], seed: int = 0, **options) -> None:
        super().__init__(tasks, **options)
        self.generator = torch.Generator().manual_seed(int(seed))

    def project(self, grads: list[Tensor]) -> list[Tensor]:
        """The surgery itself: per task, its gradient with the conflicting components removed."""
        projected = []
        for i, grad in enumerate(grads):
            g = grad.clone()
            for j in torch.randperm(len(grads), generator=self.generator).tolist():
                if j == i:
                    continue
                dot = torch.dot(g, grads[j])
                if dot < 0:
                    g = g - dot / grads[j].pow(2).sum().clamp_min(1e-20) * grads[j]
            projected.append(g)
        return projected

    def backward(self, losses: dict[str, Tensor], shared_params: list[nn.Parameter]) -> dict[str, float]:
        grads = [_flat_gradient(losses[t], shared_params) for t in self.tasks]
        total = sum(losses[t] for t in self.tasks)
        if isinstance(total, Tensor) and total.requires_grad:
            total.backward()
        merged = torch.stack(self.project(grads)).sum(0)
        offset = 0
        for p in shared_params:
            n = p.numel()
            p.grad = merged[offset:offset + n].view_as(p).clone()
            offset += n
        return {t: 1.0 for t in self.tasks}

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class DynamicWeightAverage(WeightingStrategy):
    """Liu, Johns & Davison (CVPR 2019): w_k = K softmax_k(r_k / T), r_k = L_k(e-1) / L_k(e-2), from the mean
    training losses of the last two epochs; equal weights for the first two epochs. A task whose loss fell less
    (r_k larger) gets more weight. Option ``temperature`` (T, default 2; larger is closer to equal weights).
    """

    name = "dwa"

    def __init__(self, tasks: list[TaskSpec], temperature: float = 2.0, **options) -> None:
        super().__init__(tasks, **options)
        if float(temperature) <= 0:
            raise SchemaError(f"dwa option temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.history: list[dict[str, float]] = []  # the last two epochs' mean losses, oldest first

    def current_weights(self) -> dict[str, float]:
        if len(self.history) < 2:
            return {t: 1.0 for t in self.tasks}
        before, last = self.history
        rates = torch.tensor([last[t] / before[t] if before[t] > 0 else 1.0 for t in self.tasks])
        weights = len(self.tasks) * torch.softmax(rates / self.temperature, dim=0)
        return dict(zip(self.tasks, weights.tolist()))

    def backward(self, losses: dict[str, Tensor], shared_params: list[nn.Parameter]) -> dict[str, float]:
        weights = self.current_weights()
        sum(weights[t] * losses[t] for t in self.tasks).backward()
        return weights

    def epoch_end(self, epoch_losses: dict[str, float]) -> None:
        self.history = (self.history + [{t: float(epoch_losses[t]) for t in self.tasks}])[-2:]

    def extra_state(self) -> dict:
        return {"history": [dict(h) for h in self.history]}

    def load_extra_state(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
