"""Run a suite: tune each model on validation with seed 0, train every seed at the chosen values, test once.

Every model of a suite sees the same dataset object (same features, splits and test impressions), the same trainer
settings and the same tuning grid. Each finished run is appended to ``OUT/results.json`` at once and its test
predictions are kept in ``WORK/predictions/`` (not part of the published results), so an interrupted suite resumes
with ``resume=True`` and the paired tests can be recomputed.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onerank import api
from onerank.benchmarking.report import summarize
from onerank.benchmarking.suite import ModelEntry, Suite, ablation_base
from onerank.data.batching import Batch
from onerank.data.dataset import EncodedDataset
from onerank.metrics.ranking import evaluate_predictions
from onerank.models.base import MultiTaskModel
from onerank.training.config import RunConfig, TrainConfig
from onerank.training.trainer import LOWER_IS_BETTER, write_json

log = logging.getLogger(__name__)


def flops_per_sample(model: MultiTaskModel, batch: Batch) -> float:
    """Forward FLOPs of one batch (torch's FlopCounterMode: matmuls, convolutions, attention) / batch size.

    Embedding lookups and element-wise ops are not counted, so this is the dense compute of a forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch)
    model.train(was_training)
    return counter.get_total_flops() / max(batch.size, 1)


def _compact_history(history: list[dict]) -> list[dict]:
    keep = ("auc", "gauc", "logloss")
    return [
        {
            "epoch": h["epoch"],
            "monitor": h["monitor"],
            "train_loss": h["train_loss"],
            "valid": {t: {k: v for k, v in m.items() if k in keep} for t, m in h["valid"].items()},
            **({"gradient_cosine": h["gradient_cosine"]} if "gradient_cosine" in h else {}),
        }
        for h in history
    ]


def run_key(variant: Any, label: str, hparams: dict[str, Any], seed: int) -> str:
    hp = ",".join(f"{k}={v}" for k, v in sorted(hparams.items()))
    return f"v={variant}|{label}|{hp}|seed={seed}"


_DATASETS: dict[str, EncodedDataset] = {}


def _dataset(config: RunConfig) -> EncodedDataset:
    """The run's dataset, loaded once per process (workers keep theirs between runs)."""
    import json

    key = json.dumps([config.dataset, config.data_dir, config.dataset_options, config.cache_dir], sort_keys=True,
                     default=str)
    if key not in _DATASETS:
        _DATASETS.clear()  # one variant at a time: the datasets are large
        _DATASETS[key] = api.load_run_dataset(config)
    return _DATASETS[key]


def execute_run(config: RunConfig) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Train one run, test once: (record fields, test predictions). A failure is returned as ``error``, so a broken
    model is reported in the results and the suite goes on."""
    t0 = time.time()
    try:
        dataset = _dataset(config)
        trainer = api.build_trainer(config, dataset)
        if not trainer.model.shared_parameters():
            trainer.config.gradient_diagnostics = False  # nothing shared (single_task): no cosine to measure
        try:
            first = next(iter(trainer.train_loader.epoch(0))).to(trainer.device)
            flops = flops_per_sample(trainer.model, first)
            state = trainer.fit()
            t1 = time.perf_counter()
            preds = trainer.predict("test")
            infer_seconds = time.perf_counter() - t1
            enc = dataset.split("test")
            test = evaluate_predictions(dataset.schema.tasks, preds, enc.labels, enc.label_mask, enc.user)
            params = api.count_parameters(trainer.model)
        finally:
            trainer.close()
    except Exception as exc:
        log.exception("run of %s failed", config.model)
        return {"error": f"{type(exc).__name__}: {exc}", "wall_seconds": round(time.time() - t0, 1)}, None
    best = state.history[state.best_epoch - 1] if state.best_epoch > 0 else None
    record = {
        "test": test,
        "valid": best["valid"] if best else {},
        "valid_monitor": best["monitor"] if best else float("nan"),
        "epochs": len(state.history),
        "best_epoch": state.best_epoch,
        "train_seconds": round(state.train_seconds, 2),
        "train_samples_per_s": round(state.train_samples / state.train_seconds, 1) if state.train_seconds else None,
        "infer_candidates_per_s": round(len(enc) / infer_seconds, 1) if infer_seconds > 0 else None,
        "params": params,
        "flops_per_sample": round(flops, 1),
        "history": _compact_history(state.history),
        "wall_seconds": round(time.time() - t0, 1),
    }
    return record, {t: p.astype(np.float32) for t, p in preds.items()}


class SuiteRunner:
    """Phase 1: every model's tuning runs (seed 0, each grid point). Phase 2: the other seeds at each model's chosen
    values (ablations at the proposed model's). Runs of a phase are independent, so ``workers`` > 1 runs them in
    parallel processes (one torch thread each, as the suites set ``threads: 1``)."""

    def __init__(
        self,
        suite: Suite,
        out_dir: str | Path,
        work_dir: str | Path | None = None,
        seeds: int | None = None,
        models: list[str] | None = None,
        resume: bool = False,
        cache_dir: str | None = None,
        command: str | None = None,
        device: str | None = None,
        workers: int = 1,
    ) -> None:
        self.suite = suite
        self.out_dir = Path(out_dir)
        self.work_dir = Path(work_dir) if work_dir else Path("runs/benchmark") / suite.name
        self.seeds = int(seeds if seeds is not None else suite.seeds)
        self.entries = suite.entries(models)
        self.cache_dir = cache_dir
        self.device = device
        self.workers = max(1, int(workers))
        self.started = time.time()
        self.count_time = True
        self.results: dict[str, Any] = {
            "suite": suite.name,
            "suite_file": str(suite.path),
            "suite_sha256": suite.sha256,
            "description": suite.description,
            "dataset": suite.dataset,
            "command": command,
            "seeds": self.seeds,
            "models_filter": models,
            "workers": self.workers,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            },
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "runs": [],
            "tuning": {},
        }
        self.predictions: dict[str, dict[str, np.ndarray]] = {}
        if resume and (self.out_dir / "results.json").exists():
            self._load_previous()

    # ---- persistence ----------------------------------------------------------------------------------------------
    def _load_previous(self) -> None:
        import json

        previous = json.loads((self.out_dir / "results.json").read_text())
        if previous.get("suite_sha256") != self.suite.sha256:
            log.warning("results.json was made by another version of the suite; starting afresh")
            return
        for run in previous.get("runs", []):
            path = self._prediction_path(run["key"])
            if path.exists():
                self.results["runs"].append(run)
                with np.load(path) as npz:
                    self.predictions[run["key"]] = {t: npz[t] for t in npz.files}
        self.results["started"] = previous.get("started", self.results["started"])
        self.results["previous_wall_seconds"] = previous.get("wall_seconds", 0.0)

    def _prediction_path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=," else "_" for c in key)
        return self.work_dir / "predictions" / f"{safe}.npz"

    def _done(self, key: str) -> dict | None:
        return next((r for r in self.results["runs"] if r["key"] == key), None)

    def _save(self) -> None:
        elapsed = time.time() - self.started if self.count_time else 0.0
        self.results["wall_seconds"] = round(self.results.get("previous_wall_seconds", 0.0) + elapsed, 1)
        write_json(self.results, self.out_dir / "results.json")

    def _record(self, spec: dict, fields: dict, preds: dict[str, np.ndarray] | None) -> None:
        if preds is not None:
            path = self._prediction_path(spec["key"])
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **preds)
            self.predictions[spec["key"]] = preds
        self.results["runs"].append({**spec, **fields})
        log.info("benchmark %s: %s done (%s)", self.suite.name, spec["key"], fields.get("error", "ok"))
        self._save()

    # ---- runs -------------------------------------------------------------------------------------------------------
    def run_config(self, entry: ModelEntry, variant: Any, hparams: dict[str, Any], seed: int) -> RunConfig:
        suite = self.suite
        options = dict(suite.dataset_options)
        if suite.variant_option is not None:
            options[suite.variant_option] = variant
        train = TrainConfig(**{"progress": False, "tensorboard": False, **suite.train, **hparams})
        train.seed = seed
        train.gradient_diagnostics = suite.gradient_diagnostics
        if self.device:
            train.device = self.device
        return RunConfig(
            dataset=suite.dataset, data_dir=suite.data_dir, dataset_options=options, model=entry.model,
            model_options=dict(entry.options), objective={**suite.objective, **entry.objective}, train=train,
            cache_dir=self.cache_dir,
        )

    def _spec(self, entry: ModelEntry, variant: Any, hparams: dict, seed: int) -> dict[str, Any]:
        return {
            "key": run_key(variant, entry.label, hparams, seed), "variant": variant, "label": entry.label,
            "model": entry.model, "options": entry.options, "ablation": entry.ablation, "hparams": hparams,
            "seed": seed,
        }

    def _execute(self, jobs: list[tuple[ModelEntry, Any, dict, int]]) -> None:
        """Run every job not already done; in ``workers`` processes when more than one."""
        todo = []
        for entry, variant, hparams, seed in jobs:
            spec = self._spec(entry, variant, hparams, seed)
            if self._done(spec["key"]) is None and all(spec["key"] != s["key"] for s, _ in todo):
                todo.append((spec, self.run_config(entry, variant, hparams, seed)))
        if self.workers == 1:
            for spec, config in todo:
                self._record(spec, *execute_run(config))
            return
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(execute_run, config): spec for spec, config in todo}
            for future in cf.as_completed(futures):
                self._record(futures[future], *future.result())

    def _grid(self) -> list[dict[str, Any]]:
        keys = sorted(self.suite.tuning)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.suite.tuning[k] for k in keys))]

    def _choose(self, variant: Any, entry: ModelEntry, grid: list[dict]) -> dict[str, Any]:
        runs = [self._done(run_key(variant, entry.label, hp, 0)) for hp in grid]
        ok = [r for r in runs if r and not r.get("error") and not np.isnan(r.get("valid_monitor", float("nan")))]
        if not ok:
            return grid[0]
        sign = -1.0 if self.suite.train.get("monitor", "auc") in LOWER_IS_BETTER else 1.0
        return max(ok, key=lambda r: sign * r["valid_monitor"])["hparams"]

    def _tune(self, grid: list[dict]) -> list[tuple[ModelEntry, Any, dict, int]]:
        """Fill ``results["tuning"]`` from the seed-0 runs done so far; the seed runs at the chosen values."""
        jobs = []
        for variant in self.suite.variant_values:
            tuning = self.results["tuning"].setdefault(str(variant), {})
            for entry in [e for e in self.entries if not e.ablation]:
                tuning[entry.label] = {
                    "chosen": self._choose(variant, entry, grid),
                    "grid": [{"hparams": hp, "valid_monitor": (self._done(run_key(variant, entry.label, hp, 0))
                                                               or {}).get("valid_monitor")} for hp in grid],
                }
            for entry in self.entries:
                if entry.ablation:  # at its base model's chosen values, so that the two differ only by the ablation
                    base = ablation_base(self.suite, entry)
                    chosen = tuning.get(base, {}).get("chosen", grid[0])
                    tuning[entry.label] = {"chosen": chosen, "grid": [], "from": base}
                jobs += [(entry, variant, tuning[entry.label]["chosen"], seed) for seed in range(self.seeds)]
        return jobs

    def run(self) -> dict[str, Any]:
        grid = self._grid()
        for variant in self.suite.variant_values:
            # build each variant's cache here, once: workers building the same cache at once would race
            api.load_run_dataset(self.run_config(self.entries[0], variant, {}, 0))
        tuned = [e for e in self.entries if not e.ablation]
        self._execute([(e, v, hp, 0) for v in self.suite.variant_values for e in tuned for hp in grid])
        self._execute(self._tune(grid))
        return self.finalize()

    def finalize(self) -> dict[str, Any]:
        """Tables' numbers and paired tests from the runs done so far (also on a partial, resumed suite)."""
        self._tune(self._grid())
        labels = {}
        for variant in self.suite.variant_values:
            enc = api.load_run_dataset(self.run_config(self.entries[0], variant, {}, 0)).split("test")
            labels[str(variant)] = {"labels": enc.labels, "mask": enc.label_mask, "user": enc.user}
        self.results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.results["summary"] = summarize(self.results, self.suite, self.predictions, labels)
        self._save()
        return self.results

def run_benchmark(
    name: str,
    out_dir: str | Path | None = None,
    seeds: int | None = None,
    models: list[str] | None = None,
    suites_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    report_only: bool = False,
    cache_dir: str | None = None,
    command: str | None = None,
    device: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run suite ``name`` (or, with ``report_only``, re-render an existing results.json) and write
    ``OUT/results.json``, ``OUT/report.md`` and the PNG figures; returns the results with ``report`` (Markdown)."""
    import json

    from onerank.benchmarking.plots import make_plots
    from onerank.benchmarking.report import render_markdown
    from onerank.benchmarking.suite import DEFAULT_SUITES_DIR, load_suite

    suite = load_suite(name, suites_dir or DEFAULT_SUITES_DIR)
    out = Path(out_dir) if out_dir else Path("benchmarks/results") / suite.name
    if report_only and not (out / "results.json").exists():
        raise FileNotFoundError(f"--report-only: no results at {out / 'results.json'}")
    if report_only:  # keep the command and wall time of the run that made the results
        previous = json.loads((out / "results.json").read_text())
        command, seeds = previous.get("command"), previous.get("seeds", seeds)
    runner = SuiteRunner(suite, out, work_dir=work_dir, seeds=seeds, models=models, resume=resume or report_only,
                         cache_dir=cache_dir, command=command, device=device, workers=workers)
    if report_only:  # re-rendering is not part of the suite's wall time
        runner.started = time.time()
        runner.results["previous_wall_seconds"] = previous.get("wall_seconds", 0.0)
        runner.count_time = False
        results = runner.finalize()
    else:
        results = runner.run()
    plots = make_plots(results, suite, out)
    report = render_markdown(results, suite, plots)
    (out / "report.md").write_text(report + "\n")
    return {**results, "report": report, "plots": plots}
