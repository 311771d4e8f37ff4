"""Losses and task-weighting strategies."""

from onerank.objectives.losses import MultiTaskObjective, ObjectiveConfig, listwise_loss, pointwise_loss
from onerank.objectives.weighting import WeightingStrategy, build_weighting, register_weighting, weighting_names

__all__ = [
    "MultiTaskObjective", "ObjectiveConfig", "listwise_loss", "pointwise_loss", "WeightingStrategy",
    "build_weighting", "register_weighting", "weighting_names",
]
