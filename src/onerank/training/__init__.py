"""Trainer, checkpoints, early stopping, diagnostics."""

from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import Trainer, TrainingInterrupted, TrainState, write_json

__all__ = ["RunConfig", "TrainConfig", "Trainer", "TrainingInterrupted", "TrainState", "write_json"]
