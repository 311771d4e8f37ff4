"""The Python API behind the CLI: train one model, compare several on the same data, evaluate a checkpoint, fit
its calibration and fusion."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from onerank.data.dataset import EncodedDataset
from onerank.data.loaders import TrainingData, training_data
from onerank.data.registry import load_dataset
from onerank.features.item_vectors import ItemVectorSpec
from onerank.features.space import FeatureSpace
from onerank.fusion.fit import FuseSettings
from onerank.models.base import MultiTaskModel, build_config, build_model, model_class
from onerank.objectives.losses import MultiTaskObjective
from onerank.objectives.weighting import build_weighting
from onerank.resources import require
from onerank.training import checkpoint as ckpt
from onerank.training import distributed, tracking
from onerank.training.config import RunConfig, objective_config
from onerank.data.schema import SchemaError
from onerank.training.trainer import Trainer, TrainingDiverged, write_json

log = logging.getLogger(__name__)

# What makes a folder a run's: with any of these in it, a new run needs --resume or --overwrite.
RUN_FILES = ("checkpoint.pt", "last.pt", "metrics.json")
# Removed by --overwrite with the run files: what the old run wrote next to them (exports, logs).
RUN_ARTEFACTS = ("checkpoint.onnx", "checkpoint.pt2", "checkpoint.aoti.pt2", "checkpoint.torchscript.pt", "tensorboard",
                 "mlruns")
# Settings a resumed run may change: where and how fast it runs, and when it stops; anything else would make the
# resumed run a different experiment than metrics.json says.
RESUMABLE_CHANGES = {"data_dir", "cache_dir", "train.epochs", "train.patience", "train.progress", "train.tensorboard",
                     "train.mlflow", "train.mlflow_uri", "train.mlflow_experiment", "train.threads", "train.device",
                     "train.compile", "train.eval_batch_size", "train.checkpoint_every", "train.stream_prefetch"}


def load_run_dataset(config: RunConfig) -> EncodedDataset:
    if config.cache_dir is not None and Path(config.cache_dir).exists() and not Path(config.cache_dir).is_dir():
        raise SchemaError(f"--cache-dir {config.cache_dir} is a file; give a folder (it is created when missing)")

    # Under torchrun, rank 0 builds the cache first and the other ranks then read it, instead of all writing it.
    return distributed.rank_zero_first(
        lambda: load_dataset(config.dataset, config.data_dir, config.cache_dir, **config.dataset_options)
    )


def count_parameters(model: MultiTaskModel) -> int:
    return sum(p.numel() for p in model.parameters())


def run_data(config: RunConfig, dataset: EncodedDataset, by_request: bool, out_dir: str | Path | None = None,
             streaming: str | None = None, by_session: bool = False) -> TrainingData:
    """The batches of a run (``data.loaders.training_data``), sharded over torchrun's ranks; whole requests or whole
    sessions per batch when the model or the objective needs them."""
    train, where = config.train, distributed.info()
    return training_data(
        dataset, train.batch_size, train.seed, by_request, streaming or train.streaming, train.streaming_threshold_mb,
        train.stream_buffer_rows, out_dir, where.rank, where.world_size, distributed.all_ranks,
        distributed.rank_zero_first, train.stream_prefetch, by_session,
    )


def build_trainer(config: RunConfig, dataset: EncodedDataset, out_dir: str | Path | None = None,
                  item_vectors: ItemVectorSpec | None = None) -> Trainer:
    """The trainer of a fresh run; ``item_vectors``: an item vector table (e.g. a graph encoder's,
    ``features/item_graph.py``) the model reads beside or in place of the item id embedding."""
    space = FeatureSpace.from_dataset(dataset, item_vectors)
    with ckpt.seeded(config.train.seed):  # parameter initialisation is part of what the seed fixes
        model = build_model(config.model, space, config.model_options)
        weighting = build_weighting(config.weighting, dataset.schema.tasks, **config.weighting_options)
        objective = MultiTaskObjective(dataset.schema.tasks, objective_config(config, model.objective_defaults))
    meta = {
        "run_config": config.to_dict(),
        "model": config.model,
        "model_config": dataclasses.asdict(model.config),
        "space": space.to_dict(),
        "encoders": dataset.encoders.state(),
        "item_table": {k: v.copy() for k, v in dataset.item_table.items()},
        "dataset": dataset.name,
    }
    meta["objective"] = dataclasses.asdict(objective.config)
    data = run_data(config, dataset, model.needs_requests or objective.needs_requests, out_dir,
                    by_session=model.needs_sessions)
    trainer = Trainer(model, data, config.train, objective, weighting, out_dir=out_dir, meta=meta)
    trainer.initialise_output_biases()  # a fresh model: the training split's base rates (a resume loads its own)
    return trainer


def train(
    config: RunConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    dataset: EncodedDataset | None = None,
    stop_after_steps: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train with early stopping on validation, then report test metrics of the best epoch.

    With ``out_dir``: ``checkpoint.pt`` (best epoch, everything needed to score new data), ``last.pt`` (resumable
    state), ``metrics.json`` and TensorBoard logs are written there. An ``out_dir`` holding another run is refused
    unless ``resume`` (continue it, with the same settings) or ``overwrite`` (delete it first).
    """
    config = config.validated()
    build_config(config.model, config.model_options)  # a misspelled model or option fails before any data is read
    tracking.check_installed(config.train)
    distributed.setup(config.train.device)  # joins torchrun's process group; a no-op in a plain process
    if resume and out_dir is None:
        raise ValueError("resume needs the output folder of the run to continue")
    if out_dir is not None:
        check_out_dir(Path(out_dir), resume, overwrite)
    saved = ckpt.load(Path(out_dir) / "last.pt", kind="resume") if resume else None
    if saved is not None:
        check_same_run(saved["meta"], config, Path(out_dir) / "last.pt")
    dataset = dataset or load_run_dataset(config)
    if saved is not None and not trained_on(saved["meta"], dataset):
        raise ckpt.CheckpointError(f"--resume: the dataset's schema or vocabularies differ from those the run in "
                                   f"{out_dir} was trained on (its data changed?); start a new run (--overwrite)")
    trainer = build_trainer(config, dataset, out_dir)
    if saved is not None:
        trainer.resume(Path(out_dir) / "last.pt", state=saved)
    if out_dir is not None:
        claim_out_dir(Path(out_dir), overwrite)  # the last step before training: every check above has passed
    try:
        state = trainer.fit(stop_after_steps=stop_after_steps)
        if state.best_epoch <= 0:
            raise TrainingDiverged(f"no epoch gave a finite validation {config.train.monitor} (no task has it: "
                                   "predictions went NaN, or every task has one class only in the validation split), "
                                   "so no checkpoint was written; check the data or set another train.monitor")
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
        if out_dir is not None and distributed.info().is_main:
            write_json(result, Path(out_dir) / "metrics.json")
            trainer.loggers.log_artifacts([Path(out_dir) / "metrics.json", Path(out_dir) / "checkpoint.pt"])
    finally:
        trainer.close()
    return result


def trained_on(meta: dict, dataset: EncodedDataset) -> bool:
    """Whether a checkpoint's metadata fits ``dataset``: the same schema, vocabulary sizes and vocabularies (the
    same ids under the same codes)."""
    return (meta.get("space") == FeatureSpace.from_dataset(dataset).to_dict()
            and meta.get("encoders", {}).get("vocabularies") == dataset.encoders.state()["vocabularies"])


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that is a file, is not writable, or holds another run (unless asked to continue or
    replace it). Nothing is written yet: see ``claim_out_dir``."""
    if resume and overwrite:
        raise SchemaError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if out.exists() and not out.is_dir():
        raise SchemaError(f"--out {out} is a file; give a folder for the run")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not (out / "last.pt").exists():
            raise FileNotFoundError(f"--resume: no resumable state at {out / 'last.pt'}; drop --resume to start a run")
    elif present and not overwrite:
        raise SchemaError(f"--out {out} holds a run already ({', '.join(present)}); continue it with --resume, "
                          "replace it with --overwrite, or choose another --out")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SchemaError(f"--out {out}: {existing} is not a writable folder; choose another --out or fix its "
                          "permissions")


def claim_out_dir(out: Path, overwrite: bool) -> None:
    """Create the output folder; with ``overwrite``, delete the old run's files first (rank 0), so that nothing of it
    outlives the new one (a later --resume or serve would mix the two)."""
    if distributed.info().is_main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES + RUN_ARTEFACTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    distributed.barrier()


def check_same_run(saved_meta: dict, config: RunConfig, path: Path) -> None:
    """A resumed run trains with the settings it started with (see RESUMABLE_CHANGES)."""
    defaults = _flat(RunConfig().to_dict())  # a setting added since the run started counts as its default
    before = {**{k: v for k, v in defaults.items() if k.startswith("train.")}, **_flat(saved_meta.get("run_config") or {})}
    now = _flat(config.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}={before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise SchemaError(f"--resume: {path} was trained with other settings ({diffs}); resume with the run's own "
                          "settings, or start a new run with --overwrite or another --out")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k == "train":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
    state = ckpt.load(path, kind="model")
    meta = state["meta"]
    try:
        space = FeatureSpace.from_dict(meta["space"])
        model = build_model(meta["model"], space, model_class(meta["model"]).saved_options(meta["model_config"], space))
    except (KeyError, SchemaError) as exc:
        raise ckpt.CheckpointError(f"{path}: cannot rebuild its model {meta['model']!r} ({exc}); it was written by "
                                   f"onerank {state.get('onerank_version', '< 0.1.0')}: retrain or use that version")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{path}: its weights do not fit its model {meta['model']!r} "
                                   f"({str(exc).splitlines()[0]}); the file is damaged or was edited") from None
    model.eval()
    return model, meta


def checkpoint_trainer(
    path: str | Path, data_dir: str | None = None, cache_dir: str | None = None
) -> tuple[Trainer, EncodedDataset, dict]:
    """A trainer around a checkpoint's model and its dataset (re-loaded from cache), ready to predict a split."""
    model, meta = load_checkpoint(path)
    config = RunConfig.from_dict(meta["run_config"])
    config.train.embedding_tables = "fused"  # checkpoint.pt holds the plain layout, whatever trained it
    if data_dir is not None:
        config.data_dir = data_dir
    if cache_dir is not None:
        config.cache_dir = cache_dir
    dataset = load_run_dataset(config)
    if not trained_on(meta, dataset):
        raise ckpt.CheckpointError(
            f"{path} was trained on {meta['dataset']!r} with tasks {model.space.task_names} and other fields or "
            f"vocabularies than the data found now ({dataset.name!r}, tasks {dataset.schema.task_names}); evaluate it "
            "on the data it was trained on (--data-dir)"
        )
    objective = MultiTaskObjective(dataset.schema.tasks, objective_config(config, model.objective_defaults))
    # evaluation needs no Parquet copy of an in-memory train split
    streaming = None if dataset.info.get("train_parquet") else "off"
    data = run_data(config, dataset, model.needs_requests or objective.needs_requests, streaming=streaming,
                    by_session=model.needs_sessions)
    trainer = Trainer(model, data, config.train, objective,
                      build_weighting(config.weighting, dataset.schema.tasks, **config.weighting_options))
    return trainer, dataset, meta


def evaluate_checkpoint(
    path: str | Path, split: str = "test", data_dir: str | None = None, cache_dir: str | None = None
) -> dict[str, Any]:
    """Re-load the checkpoint's dataset (from cache) and report the split's per-task metrics."""
    trainer, dataset, meta = checkpoint_trainer(path, data_dir, cache_dir)
    return {"model": meta["model"], "dataset": dataset.name, "split": split, "metrics": trainer.evaluate(split)}


def split_value(dataset: EncodedDataset, split: str, value: str) -> np.ndarray:
    """A split's value column for fusion: a value column of the schema, else a task's labels (0 outside the
    task's space, e.g. no order without a click)."""
    enc = dataset.split(split)
    if value in enc.values:
        return enc.values[value]
    if value in enc.labels:
        return np.where(enc.label_mask[value], enc.labels[value], 0.0).astype(np.float64)
    raise ValueError(f"unknown value {value!r} for dataset {dataset.name!r}: its value columns are "
                     f"{sorted(enc.values)} and its tasks {sorted(enc.labels)}")


def fuse(
    checkpoint: str | Path,
    settings: FuseSettings,
    out_dir: str | Path | None = None,
    fusion_path: str | Path | None = None,
    overwrite: bool = False,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Fit calibration and fusion on the checkpoint's validation split, evaluate once on test.

    Writes the fusion file (default ``checkpoint.fusion.json`` beside the checkpoint; the ranker uses it by default)
    and, in ``out_dir`` (default ``<checkpoint folder>/fusion``), ``report.json``, ``table.md``,
    ``reliability.png`` and ``pareto.png``. Neither is replaced unless ``overwrite``.
    """
    require("fusion", "onerank fuse", "sklearn", "cmaes", "matplotlib")
    from onerank.fusion import default_path, file_sha256
    from onerank.fusion.fit import SplitData, format_report, fuse_predictions

    checkpoint = Path(checkpoint)
    fusion_path = Path(fusion_path) if fusion_path else default_path(checkpoint)
    out_dir = Path(out_dir) if out_dir else checkpoint.parent / "fusion"
    for target in (fusion_path, out_dir / "report.json"):
        if target.exists() and not overwrite:
            raise ValueError(f"{target} exists; pass --overwrite to replace it")
    sha = file_sha256(checkpoint) if checkpoint.exists() else None
    trainer, dataset, meta = checkpoint_trainer(checkpoint, data_dir, cache_dir)
    if dataset.vocab_sizes != dict(trainer.model.space.vocab_sizes):
        raise ValueError(f"the dataset re-loaded for {checkpoint} has other vocabularies than the checkpoint's; "
                         "pass the --data-dir it was trained on")
    splits = {}
    for name in ("valid", "test"):
        enc = dataset.split(name)
        if enc.user is None:
            raise ValueError(f"dataset {dataset.name!r} has no user column: within-user ranking quality needs one")
        splits[name] = SplitData(trainer.predict(name), enc.labels, enc.label_mask, enc.user,
                                 split_value(dataset, name, settings.value))
    kinds = {t.name: t.kind for t in dataset.schema.tasks}
    out_dir.mkdir(parents=True, exist_ok=True)
    fitted, report = fuse_predictions(splits["valid"], splits["test"], kinds, settings, sha, figures_dir=out_dir)
    report.update(checkpoint=str(checkpoint), checkpoint_sha256=sha, model=meta["model"], dataset=dataset.name)
    fitted.info.update(model=meta["model"], dataset=dataset.name)
    fitted.save(fusion_path, overwrite=overwrite)
    write_json(report, out_dir / "report.json")
    (out_dir / "table.md").write_text(format_report(report) + "\n")
    report["fusion_file"] = str(fusion_path)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Batch RL fusion in a simulator (docs/rl_fusion.md)
# ---------------------------------------------------------------------------------------------------------------------
def checkpoint_simulation(checkpoint: str | Path, settings=None, seed: int = 0, data_dir: str | None = None,
                          cache_dir: str | None = None, fusion_file: str | Path | None = None):
    """The KuaiRand simulator fitted for ``checkpoint`` (a ``SimulationSettings``; see
    ``onerank.simulator.experiment``): the checkpoint's model scores the pools with its fusion file's calibration,
    and the fusion file's weighted sum is the logging policy's centre. The leave model is calibrated to
    ``settings.target_depth`` under that static fusion."""
    from onerank.fusion import load_for_checkpoint
    from onerank.fusion.forms import Fusion
    from onerank.fusion.policy import weights_action
    from onerank.simulator import draw_starts, fit_world, read_kuairand
    from onerank.simulator.experiment import CheckpointSimulation, SimulationSettings, calibrate_leave
    from onerank.simulator.policies import static_policy
    from onerank.simulator.ranker import RankerScorer
    from onerank.simulator.world import users_with_features

    settings = settings or SimulationSettings()
    settings.check()
    trainer, dataset, meta = checkpoint_trainer(checkpoint, data_dir, cache_dir)
    if dataset.name != "kuairand":
        raise ValueError(f"the simulator is built from KuaiRand; {checkpoint} was trained on {dataset.name!r}")
    fitted = load_for_checkpoint(checkpoint, fusion_file)
    if fitted is None or not isinstance(fitted.fusion, Fusion) or fitted.fusion.kind != "weighted_sum":
        raise ValueError(f"{checkpoint} needs a weighted-sum fusion file to log around: "
                         f"onerank fuse --checkpoint {checkpoint} --value play_time_ms --forms weighted_sum")
    tasks = [t for t, w in fitted.fusion.weights.items()]
    config = RunConfig.from_dict(meta["run_config"])
    log_ = read_kuairand(data_dir or config.data_dir)
    world = fit_world(log_, settings.response_model, seed, settings.max_train_rows)

    def duration(videos: np.ndarray) -> np.ndarray:
        return world.builder.duration.reindex(videos).fillna(world.builder.duration.median()).to_numpy()

    scorers, users = {}, {}
    for split in ("valid", "test"):
        scorers[split] = RankerScorer(trainer.model, dataset, split, tasks, duration, fitted.calibrate)
        users[split] = users_with_features(log_, scorers[split].users())
    sim_config = settings.config()
    centre = weights_action(fitted.fusion.weights, tasks, sim_config.action_scale)
    starts = draw_starts(world, users["valid"], settings.calibration_sessions, settings.pool_size, scorers["valid"],
                         seed + 10_000)
    calibrate_leave(world, starts, static_policy(centre), sim_config, settings.satisfaction, settings.target_depth)
    sha = ckpt.file_sha256(checkpoint)
    return CheckpointSimulation(world, log_, scorers, users, tasks, centre, {
        "checkpoint_sha256": sha, "model": meta["model"],
        "calibration": None if fitted.calibration is None else fitted.calibration.to_dict(),
        "static_fusion": fitted.fusion.to_dict()})


def simulate_sessions(checkpoint: str | Path, out: str | Path, sessions: int = 3000, settings=None, seed: int = 0,
                      overwrite: bool = False, data_dir: str | None = None, cache_dir: str | None = None,
                      fusion_file: str | Path | None = None) -> dict[str, Any]:
    """Log ``sessions`` simulated sessions under the exploring policy around the checkpoint's fusion (on users of the
    validation day) and write them to ``out`` (``onerank fuse --method batch-rl`` learns from them)."""
    require("rl", "onerank simulate", "sklearn")  # the simulator's response and leave models
    from onerank.simulator import draw_starts
    from onerank.simulator.experiment import SimulationSettings, log_sessions

    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if sessions < 1:
        raise ValueError(f"sessions must be >= 1, got {sessions}")
    settings = settings or SimulationSettings()
    sim = checkpoint_simulation(checkpoint, settings, seed, data_dir, cache_dir, fusion_file)
    starts = draw_starts(sim.world, sim.users["valid"], sessions, settings.pool_size, sim.scorers["valid"], seed)
    logged = log_sessions(sim.world, starts, sim.centre, settings, sim.tasks, seed, sim.meta)
    logged.save(out, overwrite=overwrite)
    return {"file": str(out), "sessions": int(logged.initial.sum()), "requests": int(len(logged.session)),
            "mean_return": float(np.bincount(logged.session, logged.rewards).sum() / logged.initial.sum()),
            "tasks": sim.tasks, "leave": sim.world.leave.to_dict()}


def fuse_batch_rl(checkpoint: str | Path, sessions: str | Path, settings=None, fusion_path: str | Path | None = None,
                  overwrite: bool = False, evaluate: bool = True) -> dict[str, Any]:
    """Train a fusion policy (``BatchRLSettings``: BCQ or CQL) on logged sessions of ``checkpoint`` and write it as the
    checkpoint's fusion file (default beside it), with the calibration the sessions were logged with. ``evaluate``:
    also the conservative FQE estimate, on the logs, of the new policy and of the logging policy's static centre
    (each critic trained for ``settings.steps`` steps)."""
    require("rl", "onerank fuse --method batch-rl", "d3rlpy", "structlog", "sklearn")
    from onerank.fusion import Calibration, FittedFusion, default_path, file_sha256
    from onerank.fusion.batch_rl import BatchRLSettings, FQESettings, LoggedSessions, conservative_fqe, train_policy
    from onerank.simulator.policies import fusion_policy, static_policy

    checkpoint = Path(checkpoint)
    fusion_path = Path(fusion_path) if fusion_path else default_path(checkpoint)
    if fusion_path.exists() and not overwrite:
        raise ValueError(f"{fusion_path} exists; pass --overwrite to replace it (or --fusion-file elsewhere)")
    settings = settings or BatchRLSettings()
    settings.check()
    logged = LoggedSessions.load(sessions)
    model, _ = load_checkpoint(checkpoint)
    sha = file_sha256(checkpoint)
    logged_sha = logged.meta.get("checkpoint_sha256")
    if logged_sha != sha:
        raise ValueError(f"{sessions} was logged with checkpoint {str(logged_sha)[:12]}, not {checkpoint} "
                         f"({sha[:12]}): the policy's weights act on that ranker's predictions")
    unknown = [t for t in logged.tasks if t not in model.space.task_names]
    if unknown:
        raise ValueError(f"{sessions} fuses tasks {unknown} that {checkpoint} does not predict")
    policy, _ = train_policy(logged, settings)
    raw_calibration = logged.meta.get("calibration")
    calibration = None if raw_calibration is None else Calibration.from_dict(raw_calibration)
    report: dict[str, Any] = {"algorithm": settings.algorithm, "steps": settings.steps,
                              "sessions": int(logged.initial.sum()), "requests": int(len(logged.session))}
    if evaluate:
        centre = np.asarray(logged.meta.get("logging_policy", {}).get("centre", np.zeros(len(logged.tasks))))
        fqe = FQESettings(steps=settings.steps, seed=settings.seed)  # the critic gets the policy's budget
        report["conservative_fqe"] = {"policy": conservative_fqe(logged, fusion_policy(policy), fqe)["estimate"],
                                      "logging_centre": conservative_fqe(logged, static_policy(centre), fqe)["estimate"]}
    policy.info["report"] = report
    FittedFusion(sha, calibration, policy, info={"method": "batch-rl", "sessions": str(sessions), **report}).save(
        fusion_path, overwrite=overwrite)
    return {**report, "fusion_file": str(fusion_path)}
