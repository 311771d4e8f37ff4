"""Task-weighting strategies as plug-ins (LibMTL's split between architectures and weightings).

A strategy turns per-task losses into gradients: ``backward(losses, shared_params)``. It never looks at the model;
the trainer hands it the model's shared parameters. Strategies with learnable state are ``nn.Module``s whose
parameters the trainer optimises with the model's.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from torch import Tensor, nn

from onerank.data.schema import SchemaError, TaskSpec


class WeightingStrategy(nn.Module, abc.ABC):
    name: ClassVar[str] = ""

    def __init__(self, tasks: list[TaskSpec], **options) -> None:
        super().__init__()
        if options:
            raise SchemaError(f"weighting {self.name!r} takes no options {sorted(options)}")
        self.tasks = [t.name for t in tasks]
        self.base_weights = {t.name: float(t.weight) for t in tasks}

    @abc.abstractmethod
    def backward(self, losses: dict[str, Tensor], shared_params: list[nn.Parameter]) -> dict[str, float]:
        """Back-propagate the combined loss; return the weight each task's loss received."""

    def epoch_end(self, epoch_losses: dict[str, float]) -> None:
        """Hook for strategies that adapt per epoch (e.g. DWA)."""


_STRATEGIES: dict[str, type[WeightingStrategy]] = {}


def register_weighting(cls: type[WeightingStrategy]) -> type[WeightingStrategy]:
    _STRATEGIES[cls.name] = cls
    return cls


@register_weighting
class FixedWeights(WeightingStrategy):
    """sum_k w_k L_k with w_k the task's configured ``weight`` (1.0 unless set)."""

    name = "fixed"

    def backward(self, losses: dict[str, Tensor], shared_params: list[nn.Parameter]) -> dict[str, float]:
        total = sum(self.base_weights[t] * losses[t] for t in self.tasks)
        total.backward()
        return dict(self.base_weights)


@register_weighting
class EqualWeights(FixedWeights):
    """sum_k L_k, ignoring configured weights."""

    name = "equal"

    def __init__(self, tasks: list[TaskSpec], **options) -> None:
        super().__init__(tasks, **options)
        self.base_weights = {t: 1.0 for t in self.tasks}


def weighting_names() -> list[str]:
    import onerank.objectives.strategies  # noqa: F401  (registers the gradient-based strategies)

    return sorted(_STRATEGIES)


def build_weighting(name: str, tasks: list[TaskSpec], **options) -> WeightingStrategy:
    names = weighting_names()
    if name not in _STRATEGIES:
        raise SchemaError(f"unknown weighting {name!r}; available: {', '.join(names)}")
    return _STRATEGIES[name](tasks, **options)
