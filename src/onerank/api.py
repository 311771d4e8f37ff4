"""The Python API behind the CLI: train one model, compare several on the same data, evaluate a checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

from onerank.data.dataset import EncodedDataset
from onerank.data.registry import load_dataset
from onerank.features.space import FeatureSpace
from onerank.models.base import MultiTaskModel, build_model
from onerank.objectives.losses import MultiTaskObjective
from onerank.objectives.weighting import build_weighting
from onerank.training import checkpoint as ckpt
from onerank.training import distributed
from onerank.training.config import RunConfig, objective_config
from onerank.training.trainer import Trainer, write_json

log = logging.getLogger(__name__)


def load_run_dataset(config: RunConfig) -> EncodedDataset:
    import onerank.data.streaming  # noqa: F401  (registers the "encoded" dataset: a train split kept on disk)

    # Under torchrun, rank 0 builds the cache first and the other ranks then read it, instead of all writing it.
    return distributed.rank_zero_first(
        lambda: load_dataset(config.dataset, config.data_dir, config.cache_dir, **config.dataset_options)
    )


def count_parameters(model: MultiTaskModel) -> int:
    return sum(p.numel() for p in model.parameters())


def build_trainer(config: RunConfig, dataset: EncodedDataset, out_dir: str | Path | None = None) -> Trainer:
    space = FeatureSpace.from_dataset(dataset)
    ckpt.seed_everything(config.train.seed)  # parameter initialisation is part of what the seed fixes
    model = build_model(config.model, space, config.model_options)
    weighting = build_weighting(config.weighting, dataset.schema.tasks, **config.weighting_options)
    meta = {
        "run_config": config.to_dict(),
        "model": config.model,
        "model_config": dataclasses.asdict(model.config),
        "space": space.to_dict(),
        "encoders": dataset.encoders.state(),
        "item_table": {k: v.copy() for k, v in dataset.item_table.items()},
        "dataset": dataset.name,
    }
    objective = MultiTaskObjective(dataset.schema.tasks, objective_config(config, model.objective_defaults))
    meta["objective"] = dataclasses.asdict(objective.config)
    trainer = Trainer(model, dataset, config.train, objective, weighting, out_dir=out_dir, meta=meta)
    trainer.initialise_output_biases()  # a fresh model: the training split's base rates (a resume loads its own)
    return trainer


def train(
    config: RunConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    dataset: EncodedDataset | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train with early stopping on validation, then report test metrics of the best epoch.

    With ``out_dir``: ``checkpoint.pt`` (best epoch, everything needed to score new data), ``last.pt`` (resumable
    state), ``metrics.json`` and TensorBoard logs are written there.
    """
    distributed.setup(config.train.device)  # joins torchrun's process group; a no-op in a plain process
    dataset = dataset or load_run_dataset(config)
    trainer = build_trainer(config, dataset, out_dir)
    if resume:
        last = Path(out_dir) / "last.pt" if out_dir else None
        if last is None or not last.exists():
            raise FileNotFoundError(f"--resume: no resumable state at {last}")
        trainer.resume(last)
    try:
        state = trainer.fit(stop_after_steps=stop_after_steps)
        result = {
            "model": config.model,
            "dataset": dataset.name,
            "test": trainer.evaluate("test"),
            "valid": state.history[state.best_epoch - 1]["valid"] if state.best_epoch > 0 else {},
            "epochs": len(state.history),
            "best_epoch": state.best_epoch,
            "train_seconds": round(state.train_seconds, 3),
            "train_samples_per_s": round(state.train_samples / state.train_seconds, 1) if state.train_seconds else None,
            "params": count_parameters(trainer.model),
            "world_size": trainer.dist.world_size,
            "history": state.history,
            "config": config.to_dict(),
        }
    finally:
        trainer.close()
    if out_dir is not None and distributed.info().is_main:
        write_json(result, Path(out_dir) / "metrics.json")
    return result


def compare(
    config: RunConfig, models: list[str], model_options: dict[str, dict] | None = None
) -> dict[str, Any]:
    """Train each model on the same dataset (loaded once) and the same trainer settings."""
    distributed.setup(config.train.device)
    dataset = load_run_dataset(config)
    results = []
    for name in models:
        run = copy.deepcopy(config)
        run.model = name
        run.model_options = dict((model_options or {}).get(name, {}))
        log.info("training %s on %s", name, dataset.name)
        results.append(train(run, dataset=dataset))
    return {
        "dataset": dataset.name,
        "dataset_info": {k: v for k, v in dataset.info.items() if k != "cache_dir"},
        "results": results,
    }


def load_checkpoint(path: str | Path) -> tuple[MultiTaskModel, dict]:
    """The model of a ``checkpoint.pt`` with its metadata (schema, vocabularies, configs)."""
    state = ckpt.load(path)
    meta = state["meta"]
    space = FeatureSpace.from_dict(meta["space"])
    model = build_model(meta["model"], space, meta["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, meta


def evaluate_checkpoint(
    path: str | Path, split: str = "test", data_dir: str | None = None, cache_dir: str | None = None
) -> dict[str, Any]:
    """Re-load the checkpoint's dataset (from cache) and report the split's per-task metrics."""
    model, meta = load_checkpoint(path)
    config = RunConfig.from_dict(meta["run_config"])
    if data_dir is not None:
        config.data_dir = data_dir
    if cache_dir is not None:
        config.cache_dir = cache_dir
    dataset = load_run_dataset(config)
    if not dataset.info.get("train_parquet"):
        config.train.streaming = "off"  # evaluation needs no Parquet copy of an in-memory train split
    trainer = Trainer(
        model, dataset, config.train,
        MultiTaskObjective(dataset.schema.tasks, objective_config(config, model.objective_defaults)),
        build_weighting(config.weighting, dataset.schema.tasks, **config.weighting_options),
    )
    return {"model": meta["model"], "dataset": dataset.name, "split": split, "metrics": trainer.evaluate(split)}
