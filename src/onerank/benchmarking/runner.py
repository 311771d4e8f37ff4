"""Run a suite: tune each model on validation with seed 0, train every seed at the chosen values, test once.

Every model of a suite sees the same dataset object (same features, splits and test impressions), the same trainer
settings and the same tuning grid. Each finished run is appended to ``OUT/results.json`` at once and its test
predictions are kept in ``WORK/predictions/`` (not part of the published results), so an interrupted suite resumes
with ``resume=True`` and the paired tests can be recomputed.
"""

from __future__ import annotations

import copy
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
from onerank.benchmarking.suite import ModelEntry, Suite
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


class SuiteRunner:
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
    ) -> None:
        self.suite = suite
        self.out_dir = Path(out_dir)
        self.work_dir = Path(work_dir) if work_dir else Path("runs/benchmark") / suite.name
        self.seeds = int(seeds if seeds is not None else suite.seeds)
        self.entries = suite.entries(models)
        self.cache_dir = cache_dir
        self.device = device
        self.results: dict[str, Any] = {
            "suite": suite.name,
            "suite_file": str(suite.path),
            "suite_sha256": suite.sha256,
            "description": suite.description,
            "dataset": suite.dataset,
            "command": command,
            "seeds": self.seeds,
            "models_filter": models,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            },
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "runs": [],
            "tuning": {},
        }
        self.predictions: dict[str, dict[str, np.ndarray]] = {}
        self.labels: dict[str, dict] = {}  # variant -> test labels, masks, users
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
            if path.exists() or run.get("error"):
                self.results["runs"].append(run)
                if path.exists():
                    with np.load(path) as npz:
                        self.predictions[run["key"]] = {t: npz[t] for t in npz.files}
        self.results["tuning"] = previous.get("tuning", {})
        self.results["started"] = previous.get("started", self.results["started"])
        self.results["previous_wall_seconds"] = previous.get("wall_seconds", 0.0)

    def _prediction_path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=," else "_" for c in key)
        return self.work_dir / "predictions" / f"{safe}.npz"

    def _done(self, key: str) -> dict | None:
        return next((r for r in self.results["runs"] if r["key"] == key), None)

    def _save(self, started: float) -> None:
        self.results["wall_seconds"] = round(self.results.get("previous_wall_seconds", 0.0) + time.time() - started, 1)
        write_json(self.results, self.out_dir / "results.json")

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
            model_options=dict(entry.options), objective=dict(suite.objective), train=train,
            cache_dir=self.cache_dir,
        )

    def _run(self, entry: ModelEntry, variant: Any, dataset: EncodedDataset, hparams: dict, seed: int,
             started: float) -> dict:
        key = run_key(variant, entry.label, hparams, seed)
        done = self._done(key)
        if done is not None:
            return done
        config = self.run_config(entry, variant, hparams, seed)
        record: dict[str, Any] = {
            "key": key, "variant": variant, "label": entry.label, "model": entry.model, "options": entry.options,
            "ablation": entry.ablation, "hparams": hparams, "seed": seed,
        }
        log.info("benchmark %s: %s", self.suite.name, key)
        t0 = time.time()
        try:
            record.update(self._train(config, dataset, key))
        except Exception as exc:  # a broken model is reported in the results, and the suite goes on
            log.exception("run %s failed", key)
            record["error"] = f"{type(exc).__name__}: {exc}"
        record["wall_seconds"] = round(time.time() - t0, 1)
        self.results["runs"].append(record)
        self._save(started)
        return record

    def _train(self, config: RunConfig, dataset: EncodedDataset, key: str) -> dict[str, Any]:
        trainer = api.build_trainer(config, dataset)
        try:
            first = next(iter(trainer.train_loader.epoch(0))).to(trainer.device)
            flops = flops_per_sample(trainer.model, first)
            state = trainer.fit()
            t0 = time.perf_counter()
            preds = trainer.predict("test")
            infer_seconds = time.perf_counter() - t0
            enc = dataset.split("test")
            test = evaluate_predictions(dataset.schema.tasks, preds, enc.labels, enc.label_mask, enc.user)
        finally:
            trainer.close()
        path = self._prediction_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **{t: p.astype(np.float32) for t, p in preds.items()})
        self.predictions[key] = preds
        best = state.history[state.best_epoch - 1] if state.best_epoch > 0 else None
        return {
            "test": test,
            "valid": best["valid"] if best else {},
            "valid_monitor": best["monitor"] if best else float("nan"),
            "epochs": len(state.history),
            "best_epoch": state.best_epoch,
            "train_seconds": round(state.train_seconds, 2),
            "train_samples_per_s": round(state.train_samples / state.train_seconds, 1) if state.train_seconds else None,
            "infer_candidates_per_s": round(len(enc) / infer_seconds, 1) if infer_seconds > 0 else None,
            "params": api.count_parameters(trainer.model),
            "flops_per_sample": round(flops, 1),
            "history": _compact_history(state.history),
        }

    def _grid(self) -> list[dict[str, Any]]:
        keys = sorted(self.suite.tuning)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.suite.tuning[k] for k in keys))]

    def _choose(self, runs: list[dict]) -> dict:
        ok = [r for r in runs if not r.get("error") and not np.isnan(r.get("valid_monitor", float("nan")))]
        if not ok:
            return runs[0]["hparams"]
        sign = -1.0 if self.suite.train.get("monitor", "auc") in LOWER_IS_BETTER else 1.0
        return max(ok, key=lambda r: sign * r["valid_monitor"])["hparams"]

    def run(self) -> dict[str, Any]:
        started = time.time()
        grid = self._grid()
        proposed_entry = next((e for e in self.entries if e.label == self.suite.proposed), None)
        for variant in self.suite.variant_values:
            config = self.run_config(self.entries[0], variant, {}, 0)
            dataset = api.load_run_dataset(config)
            enc = dataset.split("test")
            self.labels[str(variant)] = {"labels": enc.labels, "mask": enc.label_mask, "user": enc.user}
            tuning = self.results["tuning"].setdefault(str(variant), {})
            # tuning first (seed 0, every grid point); ablations reuse the proposed model's choice
            for entry in [e for e in self.entries if not e.ablation]:
                runs = [self._run(entry, variant, dataset, hp, 0, started) for hp in grid]
                tuning[entry.label] = {
                    "chosen": self._choose(runs),
                    "grid": [{"hparams": r["hparams"], "valid_monitor": r.get("valid_monitor")} for r in runs],
                }
            for entry in self.entries:
                source = proposed_entry.label if entry.ablation and proposed_entry else entry.label
                chosen = tuning.get(source, {}).get("chosen", grid[0])
                if entry.ablation:
                    tuning[entry.label] = {"chosen": chosen, "grid": [], "from": source}
                for seed in range(self.seeds):
                    self._run(entry, variant, dataset, chosen, seed, started)
            del dataset
        self.results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.results["summary"] = summarize(self.results, self.suite, self.predictions, self.labels)
        self._save(started)
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
) -> dict[str, Any]:
    """Run suite ``name`` (or, with ``report_only``, re-render an existing results.json) and write
    ``OUT/results.json``, ``OUT/report.md`` and the PNG figures; returns the results with ``report`` (Markdown)."""
    import json

    from onerank.benchmarking.plots import make_plots
    from onerank.benchmarking.report import render_markdown
    from onerank.benchmarking.suite import DEFAULT_SUITES_DIR, load_suite

    suite = load_suite(name, suites_dir or DEFAULT_SUITES_DIR)
    out = Path(out_dir) if out_dir else Path("benchmarks/results") / suite.name
    if report_only:
        path = out / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"--report-only: no results at {path}")
        results = json.loads(path.read_text())
    else:
        runner = SuiteRunner(suite, out, work_dir=work_dir, seeds=seeds, models=models, resume=resume,
                             cache_dir=cache_dir, command=command, device=device)
        results = runner.run()
    plots = make_plots(results, suite, out)
    report = render_markdown(results, suite, plots)
    (out / "report.md").write_text(report + "\n")
    return {**results, "report": report, "plots": plots}
