"""Configuration of a run: dataset, model, objective, weighting and trainer, loadable from YAML."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from onerank.data.schema import SchemaError, check_keys, read_yaml_mapping, typed
from onerank.objectives.losses import ObjectiveConfig


# Ranges of the numeric settings (checked wherever a config is read: YAML, flags, Python; see RunConfig.validated).
Positive = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _device(name: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", name):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return name


Device = Annotated[str, AfterValidator(_device)]


@dataclass
class TrainConfig:
    epochs: Positive = 10
    batch_size: Positive = 1024
    lr: PositiveFloat = 2e-3  # with about 50 steps per epoch, 1e-3 left several models at chance after epoch 1 (BENCHMARKS.md)
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0  # AdamW's, on weight matrices only
    # Each task's output bias at the start: "auto" = the logit of its training base rate over valid labels (binary
    # tasks; regression tasks: the mean target), "zero", or explicit values (a list in the schema's task order, or a
    # {task: value} mapping), in logits for binary tasks. See MultiTaskModel.output_biases.
    bias_init: str | list[float] | dict[str, float] = "auto"
    embedding_lr: PositiveFloat | None = None  # a separate Adam optimiser for embedding tables when set
    grad_clip: PositiveFloat | None = 10.0  # max global grad norm; None disables clipping
    lr_schedule: Literal["none", "cosine"] = "none"  # "none" or "cosine" (over all training steps)
    patience: Positive = 2  # epochs without improvement of the monitor before stopping
    monitor: str = "auc"  # metric averaged over tasks on validation: auc, gauc, logloss, mse, ...
    monitor_weights: dict[str, float] | None = None  # per-task weights of the monitor (None: equal)
    seed: Annotated[int, Field(ge=0)] = 0
    eval_batch_size: Positive = 8192
    checkpoint_every: Annotated[int, Field(ge=0)] = 0  # also write the resumable state every N steps (0: only at epoch ends)
    device: Device = "auto"  # "auto", "cpu", "cuda"
    progress: bool = True
    # experiment tracking (training/tracking.py, the `tracking` extra); off unless asked for
    tensorboard: bool = False  # scalars under OUT/tensorboard (on by default in earlier versions)
    mlflow: bool = False  # an MLflow run: params, per-epoch metrics, task weights, metrics.json and checkpoint.pt
    mlflow_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else a file store in OUT/mlruns
    mlflow_experiment: str = "onerank"
    threads: Positive | None = None  # torch intra-op threads (None: leave PyTorch's default)
    gradient_diagnostics: bool = False  # log per-epoch cosines between task gradients on shared parameters
    # speed and scale (docs/scaling.md)
    precision: Literal["fp32", "bf16"] = "fp32"  # autocast of forward and loss (parameters and optimiser stay fp32)
    compile: bool = False  # torch.compile the model (in place; checkpoints keep their parameter names)
    streaming: Literal["auto", "on", "off"] = "auto"  # train from a Parquet stream of the train split
    streaming_threshold_mb: PositiveFloat = 4096.0  # auto: stream when the train split's tensors would exceed this
    stream_buffer_rows: Positive = 262_144  # shuffle buffer of the stream, in impressions
    # batches a background thread decodes ahead of training while streaming (0: decode in the training loop)
    stream_prefetch: Annotated[int, Field(ge=0)] = 2
    # embedding tables (docs/scaling.md, "Sharded embedding tables"): "fused" = one table replicated on every rank;
    # "torchrec" = one TorchRec table per field, sharded over the ranks by TorchRec's planner (the extra
    # onerank[torchrec]), trained by FBGEMM's fused optimiser
    embedding_tables: Literal["fused", "torchrec"] = "fused"
    sharding: Literal["auto", "table_wise", "column_wise", "row_wise"] = "auto"  # torchrec: "auto" = the planner's pick
    # the embedding tables' optimiser: "adam" (fused tables: part of the AdamW, or its own Adam with embedding_lr;
    # torchrec: FBGEMM's Adam on the batch's rows only, CUDA only) or "adagrad" (exact Adagrad, the same in both)
    embedding_optimizer: Literal["adam", "adagrad"] = "adam"


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
        """A config from plain values (YAML), every field checked for its type and range (errors name it)."""
        if not isinstance(raw, dict):
            raise SchemaError(f"a run config is a mapping, got {type(raw).__name__}")
        raw = {k: str(v) if isinstance(v, Path) else v for k, v in raw.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SchemaError(f"unknown config keys {unknown}; expected some of {sorted(known)}")
        train = raw.get("train") or {}
        raw["train"] = dataclasses.asdict(train) if dataclasses.is_dataclass(train) else train
        check_keys(TrainConfig, raw["train"], "train")
        objective = raw.get("objective") or {}
        check_keys(ObjectiveConfig, objective, "objective")
        checked = typed(ObjectiveConfig, objective, "objective")
        try:
            checked.validate()
        except ValueError as exc:
            raise SchemaError(str(exc)) from None
        raw["objective"] = {k: getattr(checked, k) for k in objective}
        return typed(cls, raw, "config")

    def validated(self) -> "RunConfig":
        """A checked copy (types converted, ranges enforced), e.g. after flags were set on a config."""
        return RunConfig.from_dict(self.to_dict())

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(read_yaml_mapping(path))


def objective_config(config: "RunConfig", model_defaults: dict[str, Any]) -> ObjectiveConfig:
    """The model's recommended objective, overridden by what the run sets explicitly."""
    return ObjectiveConfig(**{**model_defaults, **config.objective})

