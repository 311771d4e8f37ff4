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
from onerank.resources import Registry


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


class FixedWeights(WeightingStrategy):
    """sum_k w_k L_k with w_k the task's configured ``weight`` (1.0 unless set)."""

    name = "fixed"

    def backward(self, losses: dict[str, Tensor], shared_params: list[nn.Parameter]) -> dict[str, float]:
        total = sum(self.base_weights[t] * losses[t] for t in self.tasks)
        total.backward()
        return dict(self.base_weights)


class EqualWeights(FixedWeights):
    """sum_k L_k, ignoring configured weights."""

    name = "equal"

    def __init__(self, tasks: list[TaskSpec], **options) -> None:
        super().__init__(tasks, **options)
        self.base_weights = {t: 1.0 for t in self.tasks}


# Weighting names -> strategies, imported on first use
WEIGHTINGS: Registry[type[WeightingStrategy]] = Registry("weighting", {
    "fixed": "onerank.objectives.weighting:FixedWeights",
    "equal": "onerank.objectives.weighting:EqualWeights",
    "uncertainty": "onerank.objectives.strategies:UncertaintyWeighting",
    "gradnorm": "onerank.objectives.strategies:GradNorm",
    "pcgrad": "onerank.objectives.strategies:PCGrad",
    "dwa": "onerank.objectives.strategies:DynamicWeightAverage",
}, SchemaError)


def register_weighting(name: str, strategy: type[WeightingStrategy] | str) -> None:
    """Make ``strategy`` (a ``WeightingStrategy`` class, or its ``"module:Class"``) the weighting ``name``."""
    WEIGHTINGS.register(name, strategy)


def weighting_names() -> list[str]:
    return WEIGHTINGS.names()


def build_weighting(name: str, tasks: list[TaskSpec], **options) -> WeightingStrategy:
    return WEIGHTINGS.get(name)(tasks, **options)
