"""The trainer: optimisation, early stopping on validation, resumable atomic checkpoints, per-task metrics.

It holds a model, an objective and a weighting strategy and never asks which model it holds, nor where its batches
come from: it is handed them (``data.loaders.TrainingData``: in memory or streamed, whole requests when the model or
the objective needs them, whole sessions when the model does: ``needs_sessions``), and the weighting strategy gets
the model's shared parameters through the common interface. It sets no seed: the run's set-up
(``api.build_trainer``) does, once.
"""

from __future__ import annotations

import itertools
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

from onerank.data.batching import Batch, drop_to_oov
from onerank.data.loaders import TrainingData
from onerank.data.schema import TaskSpec
from onerank.features import sharding, tables
from onerank.metrics.ranking import evaluate_predictions, monitor_value
from onerank.models.base import MultiTaskModel
from onerank.objectives.losses import MultiTaskObjective
from onerank.objectives.weighting import WeightingStrategy
from onerank.training import checkpoint as ckpt
from onerank.training import distributed, sharded_checkpoint, tracking
from onerank.training.config import TrainConfig
from onerank.training.diagnostics import gradient_cosines

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"logloss", "mse", "mae"}
# A task whose mean loss is this many times another's takes over the shared parameters (docs/datasets.md).
DWARFING_RATIO = 20.0


class TrainingInterrupted(RuntimeError):
    """Raised when ``stop_after_steps`` ends a run early (used to simulate a crash in tests)."""


class TrainingDiverged(ValueError):
    """A loss became NaN or infinite: the run stops at once instead of training on (and reporting) garbage."""


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or next to start)
    step: int = 0  # batches of ``epoch`` already done
    epoch_loss_sums: dict[str, float] = field(default_factory=dict)  # per task, the loss summed over those batches
    epoch_weight_sums: dict[str, float] = field(default_factory=dict)  # per task, the loss weight summed over them
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
        data: TrainingData,
        config: TrainConfig,
        objective: MultiTaskObjective,
        weighting: WeightingStrategy,
        out_dir: str | Path | None = None,
        meta: dict | None = None,
    ) -> None:
        self.config = config
        if config.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {config.precision!r}")
        self.dist = distributed.info()  # a world of one unless launched by torchrun
        self.device = distributed.resolve_device(config.device, self.dist)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model = model.to(self.device)
        self.data = data
        self.dataset = data.dataset
        self.tasks = self.dataset.schema.tasks
        self.objective = objective.to(self.device)  # an objective may own parameters (learnt temperatures, teachers)
        self.weighting = weighting.to(self.device)
        self.out_dir = Path(out_dir) if out_dir else None
        self.meta = meta or {}
        self.oov_dropout = {f.name: f.oov_dropout for f in self.dataset.schema.categorical if f.oov_dropout > 0}
        self.train_loader = data.train
        if config.embedding_tables == "torchrec" and config.compile:
            raise ValueError("train.compile does not combine with embedding_tables: torchrec (its sharded lookups are "
                             "collectives torch.compile cannot trace); drop one of the two")
        # TorchRec tables (features/tables.py): sharded over the ranks, updated by their fused optimisers in backward
        self.table_plan = sharding.shard(self.model, self.table_settings(), self.device) \
            if config.embedding_tables == "torchrec" else {}
        self.sharded = sharding.sharded_paths(self.model)
        self.optimizers = self._build_optimizers()
        self.table_optimizers = sharding.fused_optimizers(self.model)
        # DDP when launched by torchrun (see training/distributed.py): sync.module is what the training step calls
        self.grad_sync = distributed.GradientSync(
            self.model, self._extra_parameters(), distributed.plain_backward(self.weighting), self.device, self.sharded
        )
        if config.compile:
            self.model.compile()
        total_steps = max(1, config.epochs * len(self.train_loader))
        self.schedulers = [self._schedule(opt, total_steps) for opt in self.optimizers + self.table_optimizers]
        self.state = TrainState()
        self.best_model_state: dict | None = None
        self.monitor_weights = config.monitor_weights or {t.name: 1.0 for t in self.tasks}
        unknown = sorted(set(self.monitor_weights) - {t.name for t in self.tasks})
        if unknown:
            raise ValueError(f"monitor_weights names unknown tasks {unknown}")
        self._loggers: tracking.Loggers | None = None

    # ---- set-up ---------------------------------------------------------------------------------------------------
    def initialise_output_biases(self) -> dict[str, float]:
        """Set every task's output bias (``MultiTaskModel.output_biases``) as ``train.bias_init`` says, from the
        training split only; returns the values set. Called by the training set-up on a fresh model (never on a
        loaded checkpoint, whose biases are already trained)."""
        values = resolve_bias_init(self.config.bias_init, self.tasks, self.data.train_labels)
        exposed = set(self.model.output_biases())
        missing = [t.name for t in self.tasks if t.name in values and t.name not in exposed]
        if missing:
            log.warning("%s exposes no output bias for %s; bias_init leaves them as initialised",
                        type(self.model).__name__, missing)
        self.model.init_output_biases(values)
        return values

    def table_settings(self) -> tables.TableSettings:
        cfg = self.config
        return tables.TableSettings(cfg.embedding_tables, cfg.sharding, cfg.embedding_optimizer,
                                    cfg.embedding_lr or cfg.lr)

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        embedding_params = {
            id(p) for m in self.model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
        }
        owned = sharding.sharded_parameter_names(self.model)  # trained by TorchRec's fused optimisers
        params = [p for n, p in self.model.named_parameters() if n not in owned]
        dense = [p for p in params if id(p) not in embedding_params]
        sparse = [p for p in params if id(p) in embedding_params]
        # Weight decay on weight matrices only. Biases, norm gains and per-task scalars (OneRank's a_k, b_k, the
        # output biases that bias_init sets) would be pulled towards 0 for no regularisation benefit; the weighting
        # strategy's parameters (e.g. uncertainty log-variances) are not model weights either.
        decayed = [p for p in dense if p.ndim >= 2]
        undecayed = [p for p in dense if p.ndim < 2] + self._extra_parameters()
        cfg = self.config
        groups = [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
        if cfg.embedding_optimizer == "adagrad":
            # exact Adagrad: rows without gradient do not move, so it matches the sharded tables' sparse updates
            optimizers = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, **self._fused())]
            if sparse:
                optimizers.append(torch.optim.Adagrad(sparse, lr=cfg.embedding_lr or cfg.lr, eps=tables.TABLE_EPS))
            return optimizers
        if cfg.embedding_lr is None:
            # No weight decay on embeddings: rare ids would be pulled to zero between their few updates.
            groups.append({"params": sparse, "weight_decay": 0.0})
            return [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, **self._fused())]
        optimizers = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, **self._fused())]
        if sparse:
            optimizers.append(torch.optim.Adam(sparse, lr=cfg.embedding_lr, **self._fused()))
        return optimizers

    def _extra_parameters(self) -> list[nn.Parameter]:
        """Trained parameters outside the model: the weighting strategy's and the objective's (learnt temperatures)."""
        return list(self.weighting.parameters()) + list(self.objective.parameters())

    def _fused(self) -> dict[str, bool]:
        # one fused kernel per step instead of a loop over parameter tensors: about 3x faster optimiser steps on CPU
        return {"fused": True} if self.device.type in ("cpu", "cuda") else {}

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _schedule(self, optimizer: torch.optim.Optimizer, total_steps: int):
        if self.config.lr_schedule == "none":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        if self.config.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
            )
        raise ValueError(f"unknown lr_schedule {self.config.lr_schedule!r}; use 'none' or 'cosine'")

    @property
    def loggers(self) -> tracking.Loggers:
        """The experiment trackers the run asked for (none by default), opened at their first use, on rank 0."""
        if self._loggers is None:
            self._loggers = (tracking.open_loggers(self.config, self.out_dir, self.meta.get("run_config"))
                             if self.dist.is_main else tracking.Loggers([]))
        return self._loggers

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def _resume_state(self) -> dict:
        return {
            **ckpt.header("resume"),
            "model": self._dense_state(),
            "table_steps": [int(t) for t in sharding.step_counters(self.model)] if self.sharded else None,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "weighting": self.weighting.state_dict(),
            "weighting_extra": getattr(self.weighting, "extra_state", lambda: None)(),
            "objective": self.objective.state_dict(),
            "rng": ckpt.rng_state(),
            "train_state": asdict(self.state),
            "best_model": self.best_model_state,
            "meta": self.meta,
        }

    def _dense_state(self) -> dict:
        """The model's state without the sharded tables (those go to ``last.dcp``)."""
        keys = sharding.sharded_state_keys(self.model)
        return {k: v for k, v in self.model.state_dict().items() if k not in keys}

    def _table_state(self) -> dict:
        """The sharded tables and their optimisers' state, as DCP saves and loads it."""
        keys = sharding.sharded_state_keys(self.model)
        return {
            "tables": {k: v for k, v in self.model.state_dict().items() if k in keys},
            "optimizers": {str(i): o.state_dict()["state"] for i, o in enumerate(self.table_optimizers)},
        }

    def _load_model_state(self, state: dict) -> None:
        """A whole model state in the plain (fused-table) layout, e.g. the best epoch's, into this model."""
        if self.sharded:
            sharding.load_plain_state_dict(self.model, state)
        else:
            self.model.load_state_dict(state)

    def save_resume_state(self) -> None:
        if self.out_dir is None:
            return
        if self.sharded:  # every rank writes its shards first; last.pt is only written once they are complete
            sharded_checkpoint.save(self._table_state(), self.out_dir / "last.dcp")
        rng_per_rank = distributed.gather_objects(ckpt.rng_state())  # every rank's, so that a resume is exact
        if self.dist.is_main:  # one writer; every rank reads it on resume
            ckpt.save_atomic({**self._resume_state(), "rng_per_rank": rng_per_rank}, self.out_dir / "last.pt")

    def resume(self, path: str | Path | None = None, state: dict | None = None) -> None:
        """Continue from resumable state: ``state`` as read by ``checkpoint.load(..., "resume")``, or a path."""
        path = Path(path) if path else (self.out_dir / "last.pt" if self.out_dir else None)
        if state is None:
            if path is None:
                raise ValueError("resume needs a checkpoint path or an output directory")
            state = ckpt.load(path, kind="resume")
        try:
            # the sharded tables are in last.dcp: here they keep their own values (TorchRec's load expects them)
            live = self.model.state_dict()
            self.model.load_state_dict({**state["model"], **{k: live[k] for k in sharding.sharded_state_keys(self.model)}})
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{path}: its weights do not fit this run's model "
                                       f"({str(exc).splitlines()[0]}); start a new run (--overwrite)") from None
        if self.sharded:
            self._resume_tables(path, state)
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.weighting.load_state_dict(state["weighting"])
        if "objective" in state:  # absent from checkpoints written before objectives held state
            self.objective.load_state_dict(state["objective"])
        if state.get("weighting_extra") is not None and hasattr(self.weighting, "load_extra_state"):
            self.weighting.load_extra_state(state["weighting_extra"])
        self.state = TrainState(**state["train_state"])
        self.best_model_state = state["best_model"]
        per_rank = state.get("rng_per_rank")
        same_world = per_rank is not None and len(per_rank) == self.dist.world_size
        ckpt.set_rng_state(per_rank[self.dist.rank] if same_world else state["rng"])
        log.info("resumed at epoch %d step %d", self.state.epoch, self.state.step)

    def _resume_tables(self, path: Path | None, state: dict) -> None:
        """The sharded tables and their optimiser state from ``last.dcp`` beside ``path`` (written by any number of
        ranks: each rank reads the rows of its own shards)."""
        target = self._table_state()
        sharded_checkpoint.load(target, Path(path).parent / "last.dcp")
        for optimizer, loaded in zip(self.table_optimizers, target["optimizers"].values()):
            optimizer.load_state_dict({**optimizer.state_dict(), "state": loaded})
        for counter, value in zip(sharding.step_counters(self.model), state.get("table_steps") or []):
            counter.fill_(value)

    def _save_best(self) -> None:
        # the plain layout (whole tables) under sharding: what checkpoint.pt, serving and export read
        source = sharding.plain_state_dict(self.model) if self.sharded else self.model.state_dict()
        self.best_model_state = {k: v.detach().clone().cpu() for k, v in source.items()}
        if self.out_dir is not None and self.dist.is_main:
            ckpt.save_atomic(
                {**ckpt.header("model"), "model": self.best_model_state, "meta": self.meta, "epoch": self.state.epoch},
                self.out_dir / "checkpoint.pt",
            )

    # ---- training -------------------------------------------------------------------------------------------------------
    def fit(self, stop_after_steps: int | None = None, on_epoch: Callable[[dict], None] | None = None) -> TrainState:
        cfg = self.config
        shared = self.model.shared_parameters()
        while self.state.epoch < cfg.epochs and not self.state.finished:
            epoch = self.state.epoch
            self.model.train()
            # a resumed epoch continues its sums, so epoch-level strategies (DWA) see the whole epoch's mean loss
            if self.state.step == 0 or not self.state.epoch_loss_sums:
                self.state.epoch_loss_sums = {t.name: 0.0 for t in self.tasks}
                self.state.epoch_weight_sums = {t.name: 0.0 for t in self.tasks}
            loss_sums, weight_sums = self.state.epoch_loss_sums, self.state.epoch_weight_sums
            start = time.perf_counter()
            batches = self.train_loader.epoch(epoch, start_step=self.state.step)
            bar = self._progress(batches, total=len(self.train_loader) - self.state.step, desc=f"epoch {epoch + 1}")
            for batch in bar:
                batch = drop_to_oov(batch.to(self.device), self.oov_dropout)
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                with self.grad_sync.step():
                    with self._autocast():
                        logits = self.grad_sync.module(batch)
                        losses = self.objective(logits, batch, self.model.auxiliary_losses(batch, logits))
                    # under DDP each rank's mean loss is rescaled to its share of the global-batch mean
                    scales, global_size = distributed.global_loss_scales(batch.size, batch.label_mask)
                    weights = self.weighting.backward(_rescaled(losses, scales), shared)
                self.grad_sync.finish()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                for opt in self.optimizers + self.table_optimizers:  # a fused optimiser's step sets its lr
                    opt.step()
                for sch in self.schedulers:
                    sch.step()
                self.objective.end_step()
                for t in loss_sums:
                    value = float(losses[t].detach())
                    if not math.isfinite(value):
                        raise TrainingDiverged(
                            f"the {t!r} loss is {value} at epoch {epoch + 1}, step {self.state.step + 1}: training "
                            f"diverged; look for inf / NaN in the data or lower the learning rate (lr={cfg.lr})"
                        )
                    loss_sums[t] += value
                    weight_sums[t] = weight_sums.get(t, 0.0) + float(weights.get(t, 0.0))
                self.state.step += 1
                self.state.global_step += 1
                self.state.train_samples += global_size
                if self.state.global_step % 50 == 0 and self.loggers:
                    self.loggers.log_metrics({f"train_loss/{t}": float(v.detach()) for t, v in losses.items()},
                                             self.state.global_step)
                if cfg.checkpoint_every and self.state.global_step % cfg.checkpoint_every == 0:
                    self.state.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_resume_state()
                if stop_after_steps is not None and self.state.global_step >= stop_after_steps:
                    raise TrainingInterrupted(f"stopped after {self.state.global_step} steps")
            self.state.train_seconds += time.perf_counter() - start
            steps = max(self.state.step, 1)
            self._end_epoch({t: v / steps for t, v in loss_sums.items()}, on_epoch,
                            {t: v / steps for t, v in weight_sums.items()})
        if self.best_model_state is not None:
            self._load_model_state(self.best_model_state)
        return self.state

    def _end_epoch(self, mean_losses: dict[str, float], on_epoch: Callable[[dict], None] | None,
                   task_weights: dict[str, float] | None = None) -> None:
        cfg = self.config
        epoch = self.state.epoch
        mean_losses = distributed.mean_over_ranks(mean_losses)  # every rank's strategy sees the same epoch losses
        valid = self.evaluate("valid")
        score = monitor_value(valid, cfg.monitor, self.monitor_weights)
        signed = -score if cfg.monitor in LOWER_IS_BETTER else score
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": mean_losses, "valid": valid, "monitor": score}
        if task_weights:
            record["task_weights"] = task_weights  # the mean weight each task's loss got (adaptive strategies vary it)
        if cfg.gradient_diagnostics:
            record["gradient_cosine"] = gradient_cosines(
                self.model, self.objective, self.train_loader.epoch(epoch), self.device
            )
        self.weighting.epoch_end(mean_losses)
        if epoch == 0:
            record["loss_warning"] = dwarfing_loss_warning(mean_losses, self.tasks)
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
        if self.loggers:
            self.loggers.log_metrics(tracking.epoch_metrics(record), record["epoch"])

    def _progress(self, iterable, total: int, desc: str):
        if not self.config.progress or not sys.stderr.isatty() or not self.dist.is_main:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    # ---- evaluation -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split: str) -> dict[str, np.ndarray]:
        """Predictions for every row of ``split``, in row order: probabilities, and regression values in the label's
        units (the inverse of the task's label transform), comparable with ``dataset.label_values(split)``.

        Under DDP each rank predicts a contiguous block of the batches and every rank receives all predictions, so
        metrics are exact on the whole split (not averaged over ranks)."""
        loader = self.data.eval_batches(split, self.config.eval_batch_size)
        self.model.eval()
        distributed.sync_buffers(self.model, self.sharded)
        lo, hi = distributed.block(len(loader), self.dist)
        parts: dict[str, list[np.ndarray]] = {t.name: [] for t in self.tasks}
        with self._autocast():
            for batch in itertools.islice(loader.epoch(0, start_step=lo), hi - lo):
                preds = self.model.predict(batch.to(self.device))
                for t in parts:
                    parts[t].append(preds[t].float().cpu().numpy())
            if self.sharded:
                # a sharded forward is a collective: a rank with a shorter block repeats a batch it drops, so that
                # every rank calls the model as often
                for _ in range(-(-len(loader) // self.dist.world_size) - (hi - lo)):
                    self.model.predict(next(iter(loader.epoch(0))).to(self.device))
        local = {t: np.concatenate(v) if v else np.zeros(0, np.float32) for t, v in parts.items()}
        return self.dataset.encoders.to_label_units(distributed.gather_predictions(local))

    def evaluate(self, split: str) -> dict[str, dict[str, float]]:
        enc = self.dataset.split(split)
        preds = self.predict(split)
        kinds = {t.name: t.kind for t in self.tasks}
        return evaluate_predictions(kinds, preds, self.dataset.label_values(split), enc.label_mask, enc.user)

    def close(self) -> None:
        if self._loggers is not None:
            self._loggers.close()
        self.data.close()


def dwarfing_loss_warning(mean_losses: dict[str, float], tasks: list) -> str | None:
    """A warning (also logged) when one task's mean loss is ``DWARFING_RATIO`` times another's: its gradients then
    dominate the shared parameters and the other tasks barely learn. None when the losses are comparable."""
    scaled = {t: v for t, v in mean_losses.items() if math.isfinite(v) and v > 0}
    if len(scaled) < 2:
        return None
    top, low = max(scaled, key=scaled.get), min(scaled, key=scaled.get)
    if scaled[top] < DWARFING_RATIO * scaled[low]:
        return None
    kind = next((t.kind for t in tasks if t.name == top), "binary")
    fix = "set `transform: log1p_standardize` (or `standardize`) on it, or " if kind == "regression" else ""
    message = (
        f"task {top!r}'s mean training loss ({scaled[top]:.4g}) is {scaled[top] / scaled[low]:.0f}x task {low!r}'s "
        f"({scaled[low]:.4g}) and will dominate the shared layers; {fix}lower its `loss_scale` in the schema"
    )
    log.warning(message)
    return message


def resolve_bias_init(
    bias_init: str | list[float] | tuple[float, ...] | dict[str, float],
    tasks: list[TaskSpec],
    train_labels: Callable[[], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
) -> dict[str, float]:
    """``train.bias_init`` -> {task: starting output bias}. ``train_labels`` gives the training split's (labels,
    masks), read only for "auto": a binary task starts at the logit of its base rate over valid labels (smoothed as
    (positives + 0.5) / (n + 1), so that a task with no positive starts low, not at -inf), a regression task at its
    mean target; a task without any valid training label keeps 0."""
    names = [t.name for t in tasks]
    if isinstance(bias_init, str):
        if bias_init == "zero":
            return {t: 0.0 for t in names}
        if bias_init != "auto":
            raise ValueError(f"train.bias_init must be 'auto', 'zero', a list of {len(names)} values (tasks "
                             f"{names}) or a {{task: value}} mapping, got {bias_init!r}")
        labels, masks = train_labels()
        values = {}
        for task in tasks:
            y = np.asarray(labels[task.name], dtype=np.float64)[np.asarray(masks[task.name], dtype=bool)]
            if y.size == 0:
                values[task.name] = 0.0
            elif task.kind == "binary":
                rate = (float((y > 0.5).sum()) + 0.5) / (y.size + 1.0)
                values[task.name] = math.log(rate / (1.0 - rate))
            else:
                values[task.name] = float(y.mean())
        return values
    if isinstance(bias_init, dict):
        unknown = sorted(set(bias_init) - set(names))
        if unknown:
            raise ValueError(f"train.bias_init names unknown tasks {unknown}; the tasks are {names}")
        given = dict(bias_init)
    elif isinstance(bias_init, (list, tuple)):
        if len(bias_init) != len(names):
            raise ValueError(f"train.bias_init has {len(bias_init)} values for {len(names)} tasks {names}; give one "
                             "per task in that order, or a {task: value} mapping")
        given = dict(zip(names, bias_init))
    else:
        raise ValueError(f"train.bias_init must be 'auto', 'zero', a list or a mapping, got {type(bias_init).__name__}")
    for task, value in given.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"train.bias_init[{task!r}] must be a finite number, got {value!r}")
    return {t: float(v) for t, v in given.items()}


def _rescaled(losses: dict[str, Any], scales: dict[str, float]) -> dict[str, Any]:
    if all(s == 1.0 for s in scales.values()):
        return losses
    return {t: loss * scales.get(t, 1.0) for t, loss in losses.items()}


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


__all__ = ["Trainer", "TrainState", "TrainingDiverged", "TrainingInterrupted", "resolve_bias_init", "write_json",
           "Batch"]
