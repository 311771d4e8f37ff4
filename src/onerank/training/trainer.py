"""The trainer: optimisation, early stopping on validation, resumable atomic checkpoints, per-task metrics.

It holds a model, an objective and a weighting strategy and never asks which model it holds: batches hold whole
requests when the model or the objective says it needs them (``needs_requests``), and the weighting strategy gets
the model's shared parameters through the common interface.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from onerank.data.batching import Batch, BatchLoader, TensorSplit, tensor_splits
from onerank.data.dataset import EncodedDataset
from onerank.metrics.ranking import evaluate_predictions, monitor_value
from onerank.models.base import MultiTaskModel
from onerank.objectives.losses import MultiTaskObjective
from onerank.objectives.weighting import WeightingStrategy
from onerank.training import checkpoint as ckpt
from onerank.training.config import TrainConfig
from onerank.training.diagnostics import gradient_cosines

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"logloss", "mse", "mae"}


class TrainingInterrupted(RuntimeError):
    """Raised when ``stop_after_steps`` ends a run early (used to simulate a crash in tests)."""


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or next to start)
    step: int = 0  # batches of ``epoch`` already done
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_samples: int = 0
    finished: bool = False


class Trainer:
    def __init__(
        self,
        model: MultiTaskModel,
        dataset: EncodedDataset,
        config: TrainConfig,
        objective: MultiTaskObjective,
        weighting: WeightingStrategy,
        out_dir: str | Path | None = None,
        meta: dict | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        if config.threads:
            torch.set_num_threads(config.threads)
        ckpt.seed_everything(config.seed)
        self.model = model.to(self.device)
        self.dataset = dataset
        self.tasks = dataset.schema.tasks
        self.objective = objective
        self.weighting = weighting.to(self.device)
        self.out_dir = Path(out_dir) if out_dir else None
        self.meta = meta or {}
        self.splits: dict[str, TensorSplit] = tensor_splits(dataset)
        self.by_request = bool(model.needs_requests or objective.needs_requests)
        self.train_loader = BatchLoader(
            self.splits["train"], config.batch_size, shuffle=True, seed=config.seed, by_request=self.by_request
        )
        self.optimizers = self._build_optimizers()
        total_steps = max(1, config.epochs * len(self.train_loader))
        self.schedulers = [self._schedule(opt, total_steps) for opt in self.optimizers]
        self.state = TrainState()
        self.best_model_state: dict | None = None
        self.monitor_weights = config.monitor_weights or {t.name: 1.0 for t in self.tasks}
        unknown = sorted(set(self.monitor_weights) - {t.name for t in self.tasks})
        if unknown:
            raise ValueError(f"monitor_weights names unknown tasks {unknown}")
        self._writer = None

    # ---- set-up ---------------------------------------------------------------------------------------------------
    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        embedding_params = {
            id(p) for m in self.model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
        }
        weighting_params = list(self.weighting.parameters())
        dense = [p for p in self.model.parameters() if id(p) not in embedding_params] + weighting_params
        sparse = [p for p in self.model.parameters() if id(p) in embedding_params]
        cfg = self.config
        if cfg.embedding_lr is None:
            # No weight decay on embeddings: rare ids would be pulled to zero between their few updates.
            groups = [{"params": dense, "weight_decay": cfg.weight_decay}, {"params": sparse, "weight_decay": 0.0}]
            return [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)]
        optimizers = [torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)]
        if sparse:
            optimizers.append(torch.optim.Adam(sparse, lr=cfg.embedding_lr))
        return optimizers

    def _schedule(self, optimizer: torch.optim.Optimizer, total_steps: int):
        if self.config.lr_schedule == "none":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        if self.config.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
            )
        raise ValueError(f"unknown lr_schedule {self.config.lr_schedule!r}; use 'none' or 'cosine'")

    @property
    def writer(self):
        if self._writer is None and self.out_dir is not None and self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        return self._writer

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def _resume_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "weighting": self.weighting.state_dict(),
            "weighting_extra": getattr(self.weighting, "extra_state", lambda: None)(),
            "rng": ckpt.rng_state(),
            "train_state": asdict(self.state),
            "best_model": self.best_model_state,
            "meta": self.meta,
        }

    def save_resume_state(self) -> None:
        if self.out_dir is not None:
            ckpt.save_atomic(self._resume_state(), self.out_dir / "last.pt")

    def resume(self, path: str | Path | None = None) -> None:
        path = Path(path) if path else (self.out_dir / "last.pt" if self.out_dir else None)
        if path is None:
            raise ValueError("resume needs a checkpoint path or an output directory")
        state = ckpt.load(path)
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.weighting.load_state_dict(state["weighting"])
        if state.get("weighting_extra") is not None and hasattr(self.weighting, "load_extra_state"):
            self.weighting.load_extra_state(state["weighting_extra"])
        self.state = TrainState(**state["train_state"])
        self.best_model_state = state["best_model"]
        ckpt.set_rng_state(state["rng"])
        log.info("resumed at epoch %d step %d", self.state.epoch, self.state.step)

    def _save_best(self) -> None:
        self.best_model_state = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
        if self.out_dir is not None:
            ckpt.save_atomic(
                {"model": self.best_model_state, "meta": self.meta, "epoch": self.state.epoch},
                self.out_dir / "checkpoint.pt",
            )

    # ---- training -------------------------------------------------------------------------------------------------------
    def fit(self, stop_after_steps: int | None = None, on_epoch: Callable[[dict], None] | None = None) -> TrainState:
        cfg = self.config
        shared = self.model.shared_parameters()
        while self.state.epoch < cfg.epochs and not self.state.finished:
            epoch = self.state.epoch
            self.model.train()
            loss_sums = {t.name: 0.0 for t in self.tasks}
            steps_done = 0
            start = time.perf_counter()
            batches = self.train_loader.epoch(epoch, start_step=self.state.step)
            bar = self._progress(batches, total=len(self.train_loader) - self.state.step, desc=f"epoch {epoch + 1}")
            for batch in bar:
                batch = batch.to(self.device)
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                logits = self.model(batch)
                losses = self.objective(logits, batch, self.model.auxiliary_losses(batch, logits))
                self.weighting.backward(losses, shared)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                for opt in self.optimizers:
                    opt.step()
                for sch in self.schedulers:
                    sch.step()
                for t in loss_sums:
                    loss_sums[t] += float(losses[t].detach())
                steps_done += 1
                self.state.step += 1
                self.state.global_step += 1
                self.state.train_samples += batch.size
                if self.writer is not None and self.state.global_step % 50 == 0:
                    for t, v in losses.items():
                        self.writer.add_scalar(f"train_loss/{t}", float(v.detach()), self.state.global_step)
                if cfg.checkpoint_every and self.state.global_step % cfg.checkpoint_every == 0:
                    self.state.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_resume_state()
                if stop_after_steps is not None and self.state.global_step >= stop_after_steps:
                    raise TrainingInterrupted(f"stopped after {self.state.global_step} steps")
            self.state.train_seconds += time.perf_counter() - start
            self._end_epoch({t: v / max(steps_done, 1) for t, v in loss_sums.items()}, on_epoch)
        if self.best_model_state is not None:
            self.model.load_state_dict(self.best_model_state)
        return self.state

    def _end_epoch(self, mean_losses: dict[str, float], on_epoch: Callable[[dict], None] | None) -> None:
        cfg = self.config
        epoch = self.state.epoch
        valid = self.evaluate("valid")
        score = monitor_value(valid, cfg.monitor, self.monitor_weights)
        signed = -score if cfg.monitor in LOWER_IS_BETTER else score
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": mean_losses, "valid": valid, "monitor": score}
        if cfg.gradient_diagnostics:
            record["gradient_cosine"] = gradient_cosines(
                self.model, self.objective, self.train_loader.epoch(epoch), self.device
            )
        self.weighting.epoch_end(mean_losses)
        improved = not math.isnan(signed) and signed > self.state.best_score
        if improved:
            self.state.best_score = signed
            self.state.best_epoch = epoch + 1
            self.state.bad_epochs = 0
            self._save_best()
        else:
            self.state.bad_epochs += 1
        self.state.history.append(record)
        self._log_epoch(record)
        self.state.epoch += 1
        self.state.step = 0
        if self.state.bad_epochs >= cfg.patience:
            self.state.finished = True
        self.save_resume_state()
        if on_epoch:
            on_epoch(record)

    def _log_epoch(self, record: dict) -> None:
        summary = " ".join(
            f"{t}:auc={m.get('auc', float('nan')):.4f}" for t, m in record["valid"].items() if "auc" in m
        )
        log.info("epoch %d valid %s monitor=%.5f", record["epoch"], summary, record["monitor"])
        if self.writer is not None:
            for t, metrics in record["valid"].items():
                for name, value in metrics.items():
                    if name != "count" and not math.isnan(value):
                        self.writer.add_scalar(f"valid_{name}/{t}", value, record["epoch"])
            for pair, value in (record.get("gradient_cosine") or {}).items():
                self.writer.add_scalar(f"gradient_cosine/{pair}", value, record["epoch"])
            self.writer.flush()

    def _progress(self, iterable, total: int, desc: str):
        if not self.config.progress or not sys.stderr.isatty():
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    # ---- evaluation -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split: str) -> dict[str, np.ndarray]:
        """Predictions (probabilities / values) for every row of ``split``, in row order."""
        self.model.eval()
        loader = BatchLoader(self.splits[split], self.config.eval_batch_size, by_request=self.by_request)
        parts: dict[str, list[np.ndarray]] = {t.name: [] for t in self.tasks}
        for batch in loader.epoch(0):
            preds = self.model.predict(batch.to(self.device))
            for t in parts:
                parts[t].append(preds[t].float().cpu().numpy())
        return {t: np.concatenate(v) if v else np.zeros(0, np.float32) for t, v in parts.items()}

    def evaluate(self, split: str) -> dict[str, dict[str, float]]:
        enc = self.dataset.split(split)
        preds = self.predict(split)
        return evaluate_predictions(self.tasks, preds, enc.labels, enc.label_mask, enc.user)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def write_json(obj: Any, path: str | Path) -> None:
    """JSON written atomically (temporary file + rename)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


__all__ = ["Trainer", "TrainState", "TrainingInterrupted", "write_json", "Batch"]
