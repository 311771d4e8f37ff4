"""Configuration of a run: dataset, model, objective, weighting and trainer, loadable from YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from onerank.data.schema import SchemaError, dataclass_from_mapping, read_yaml_mapping
from onerank.objectives.losses import ObjectiveConfig


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    embedding_lr: float | None = None  # a separate Adam optimiser for embedding tables when set
    grad_clip: float | None = 10.0  # max global grad norm; None disables clipping
    lr_schedule: str = "none"  # "none" or "cosine" (over all training steps)
    patience: int = 2  # epochs without improvement of the monitor before stopping
    monitor: str = "auc"  # metric averaged over tasks on validation: auc, gauc, logloss, mse, ...
    monitor_weights: dict[str, float] | None = None  # per-task weights of the monitor (None: equal)
    seed: int = 0
    eval_batch_size: int = 8192
    checkpoint_every: int = 0  # also write the resumable state every N steps (0: only at epoch ends)
    device: str = "auto"  # "auto", "cpu", "cuda"
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = None  # torch intra-op threads (None: leave PyTorch's default)
    gradient_diagnostics: bool = False  # log per-epoch cosines between task gradients on shared parameters
    # speed and scale (docs/scaling.md)
    precision: str = "fp32"  # "fp32" or "bf16": autocast of forward and loss (parameters and optimiser stay fp32)
    compile: bool = False  # torch.compile the model (in place; checkpoints keep their parameter names)
    streaming: str = "auto"  # "auto", "on", "off": train from a Parquet stream of the train split
    streaming_threshold_mb: float = 4096.0  # auto: stream when the train split's tensors would exceed this
    stream_buffer_rows: int = 262_144  # shuffle buffer of the stream, in impressions


@dataclass
class RunConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mmoe"
    model_options: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)  # ObjectiveConfig fields overriding the model's defaults
    weighting: str = "fixed"
    weighting_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SchemaError(f"unknown config keys {unknown}; expected some of {sorted(known)}")
        raw["train"] = dataclass_from_mapping(TrainConfig, raw.get("train") or {}, "train")
        objective = raw.get("objective") or {}
        dataclass_from_mapping(ObjectiveConfig, objective, "objective")  # validates the keys
        raw["objective"] = dict(objective)
        return cls(**raw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(read_yaml_mapping(path))


def objective_config(config: "RunConfig", model_defaults: dict[str, Any]) -> ObjectiveConfig:
    """The model's recommended objective, overridden by what the run sets explicitly."""
    return ObjectiveConfig(**{**model_defaults, **config.objective})
