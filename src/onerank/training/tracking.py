"""Experiment tracking: one small interface, with TensorBoard and MLflow behind it (the ``tracking`` extra).

Nothing is tracked unless a run asks for it (``train.tensorboard``, ``train.mlflow``; ``--tensorboard``,
``--mlflow``). What a tracked run records: its settings as parameters (the run config, flattened), per step the
training losses, per epoch the mean training losses, every validation metric, the weight each task's loss received
(constant for ``fixed``; what ``uncertainty``, ``gradnorm`` and ``dwa`` chose) and the gradient cosines when asked
for, and at the end its files (``metrics.json``, ``checkpoint.pt``) as artefacts.

MLflow: the run goes to ``train.mlflow_uri``, else to ``MLFLOW_TRACKING_URI``, else to a local file store in the
run's folder (``OUT/mlruns``; ``mlflow ui --backend-store-uri OUT/mlruns`` shows it). MLflow 3 keeps its file store
in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; onerank sets that for the file store it chose itself.
Weights & Biases is left out: its client's wheel carries 76 MB of binaries of its own (docs/architecture.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from onerank.resources import require


class RunLogger(Protocol):
    """What the trainer calls; each backend maps it to its own API."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifacts(self, paths: list[Path]) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """Scalars under ``OUT/tensorboard``; the parameters as one text summary."""

    def __init__(self, log_dir: Path) -> None:
        require("tracking", "TensorBoard logging", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        lines = "\n".join(f"    {k}: {v}" for k, v in params.items())  # indented: a code block in markdown
        self.writer.add_text("params", lines)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_artifacts(self, paths: list[Path]) -> None:
        """TensorBoard keeps no files: the run's folder holds them next to its logs."""

    def close(self) -> None:
        self.writer.close()


class MlflowLogger:
    """One MLflow run per training run, in experiment ``experiment``."""

    def __init__(self, uri: str | None, experiment: str, run_name: str | None, out_dir: Path | None) -> None:
        require("tracking", "MLflow logging", "mlflow")
        import mlflow

        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            if out_dir is None:
                raise ValueError("train.mlflow without an output folder needs train.mlflow_uri (or "
                                 "MLFLOW_TRACKING_URI): there is no run folder for a local store")
            uri = (out_dir / "mlruns").absolute().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the store onerank chose, see the module doc
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.uri = uri

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow keeps parameter values as strings of at most 6000 characters
        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(batch), 100):  # its limit per call
            self.client.log_batch(self.run_id, params=batch[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = _millis()
        batch = [Metric(_mlflow_key(k), float(v), stamp, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Loggers:
    """The backends a run asked for, called together (none: every call does nothing)."""

    def __init__(self, backends: list[RunLogger]) -> None:
        self.backends = backends

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log_params(self, params: dict[str, Any]) -> None:
        for backend in self.backends:
            backend.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if finite:
            for backend in self.backends:
                backend.log_metrics(finite, step)

    def log_artifacts(self, paths: list[Path]) -> None:
        for backend in self.backends:
            backend.log_artifacts(paths)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def check_installed(train_config: Any) -> None:
    """Fail before any training when a tracker the run asks for is not installed (``MissingExtra``)."""
    if train_config.tensorboard:
        require("tracking", "TensorBoard logging", "tensorboard")
    if train_config.mlflow:
        require("tracking", "MLflow logging", "mlflow")


def open_loggers(train_config: Any, out_dir: Path | None, run_config: dict | None = None) -> Loggers:
    """The loggers ``train_config`` asks for (``tensorboard``, ``mlflow``), with the run's settings logged."""
    backends: list[RunLogger] = []
    if train_config.tensorboard and out_dir is not None:
        backends.append(TensorBoardLogger(out_dir / "tensorboard"))
    if train_config.mlflow:
        run_name = out_dir.name if out_dir is not None else None
        backends.append(MlflowLogger(train_config.mlflow_uri, train_config.mlflow_experiment, run_name, out_dir))
    loggers = Loggers(backends)
    if loggers and run_config:
        loggers.log_params(flatten(run_config))
    return loggers


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.002}}`` -> ``{"train.lr": 0.002}``; lists and tuples as JSON."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value
    return out


def epoch_metrics(record: dict) -> dict[str, float]:
    """An epoch's record (``Trainer`` history) as flat metric names: ``valid_auc/click``, ``epoch_loss/click``,
    ``task_weight/click``, ``gradient_cosine/click|cart``, ``monitor``."""
    metrics = {"monitor": record["monitor"]}
    for task, values in record["valid"].items():
        metrics.update({f"valid_{name}/{task}": v for name, v in values.items() if name != "count"})
    metrics.update({f"epoch_loss/{task}": v for task, v in record["train_loss"].items()})
    metrics.update({f"task_weight/{task}": v for task, v in (record.get("task_weights") or {}).items()})
    metrics.update({f"gradient_cosine/{pair}": v for pair, v in (record.get("gradient_cosine") or {}).items()})
    return metrics


def _mlflow_key(name: str) -> str:
    # MLflow names take letters, digits, _ - . / and spaces; the cosine pairs' "|" is not one of them
    return name.replace("|", "-")


def _millis() -> int:
    import time

    return int(time.time() * 1000)
