"""Run a suite: tune each model on validation with seed 0, train every seed at the chosen values, test once.

Every model of a suite sees the same dataset object (same features, splits and test impressions), the same trainer
settings and the same tuning grid (times its own grid where the suite gives it one in ``model_tuning``). Each
finished run is appended to ``OUT/results.json`` at once and its test predictions are kept in ``WORK/predictions/``
(not part of the published results), so an interrupted suite resumes with ``resume=True`` and the paired tests can be
recomputed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from onerank import api
from onerank.benchmarking.report import summarize
from onerank.benchmarking.suite import ModelEntry, Suite, ablation_base, ablation_point, split_point
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


def code_version() -> dict[str, Any]:
    """The onerank version and, when the package runs from a git checkout, its commit and whether the tracked files
    differ from it (so a result can be traced to the code that made it)."""
    import subprocess

    import onerank

    out: dict[str, Any] = {"onerank": onerank.__version__, "git_commit": None, "git_dirty": None}
    where = Path(onerank.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass  # no git: the version alone identifies the code
    return out


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def run_key(variant: Any, label: str, hparams: dict[str, Any], seed: int) -> str:
    """``v=VARIANT|LABEL|K=V,...|seed=S`` with the tuning point's keys sorted, trainer settings and model options
    alike (e.g. ``v=None|onerank|dim=64,lr=0.001,num_layers=2|seed=1``): readable, and stable across versions, so
    that a results.json resumes."""
    hp = ",".join(f"{k}={v}" for k, v in sorted(hparams.items()))
    return f"v={variant}|{label}|{hp}|seed={seed}"


_DATASETS: dict[str, EncodedDataset] = {}


def _dataset(config: RunConfig) -> EncodedDataset:
    """The run's dataset, loaded once per process (workers keep theirs between runs)."""
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
            kinds = {t.name: t.kind for t in dataset.schema.tasks}
            test = evaluate_predictions(kinds, preds, dataset.label_values("test"), enc.label_mask, enc.user)
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
    """Each model's tuning runs (seed 0, each grid point; with coordinate search the first stage, then the second at
    the first stage's choice), then its other seeds at the chosen point (an ablation's at its base row's once that row
    is tuned). A run starts as soon as the runs it depends on are done, whatever other models are still tuning, so
    ``workers`` > 1 parallel processes (one torch thread each, as the suites set ``threads: 1``) are never left idle
    waiting for a slow model's grid; lower seeds go first, so a suite cut short has every model at fewer seeds."""

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
        progress: Callable[[str], None] | None = None,
        rerun: list[str] | None = None,
        ablations: bool = True,
    ) -> None:
        self.suite = suite
        self.rerun = set(rerun or [])  # model names or labels whose earlier runs are trained again (code changed)
        self.progress = progress
        self.code = code_version()
        self.out_dir = Path(out_dir)
        self.work_dir = Path(work_dir) if work_dir else Path("runs/benchmark") / suite.name
        self.seeds = int(seeds if seeds is not None else suite.seeds)
        self.entries = [e for e in suite.entries(models) if ablations or not e.ablation]
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
            "code": self.code,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "runs": [],
            "tuning": {},
        }
        self.predictions: dict[str, dict[str, np.ndarray]] = {}
        self.session_runs = 0  # runs trained by this process (the time estimate's rate)
        self.previous_summary: dict[str, Any] = {}
        if resume and (self.out_dir / "results.json").exists():
            self._load_previous()

    # ---- persistence ----------------------------------------------------------------------------------------------
    def _load_previous(self, without_predictions: bool = False) -> None:
        """Take over the finished runs of OUT/results.json. A run whose test predictions are gone is trained again
        (the paired bootstrap needs them), unless ``without_predictions`` (re-rendering a report: its bootstrap
        results are then taken from the previous summary)."""
        previous = json.loads((self.out_dir / "results.json").read_text())
        self.previous_summary = previous.get("summary") or {}
        changed = previous.get("suite_sha256") != self.suite.sha256
        if changed:
            log.warning("results.json was made by another version of the suite: keeping only the runs whose "
                        "configuration the new version still asks for")
        # every run the suite asks for, whatever --models trains now: a filtered resume must keep the other
        # models' runs
        wanted = {self._spec(*job)["key"]: self._spec(*job)["config_sha256"] for job in self._all_jobs(every_model=True)}
        for run in previous.get("runs", []):
            path = self._prediction_path(run["key"])
            if changed and wanted.get(run["key"]) != run.get("config_sha256", "none"):
                continue
            if run["label"] in self.rerun or run["model"] in self.rerun:
                continue
            if path.exists():
                self.results["runs"].append(run)
                with np.load(path) as npz:
                    self.predictions[run["key"]] = {t: npz[t] for t in npz.files}
            elif without_predictions:
                self.results["runs"].append(run)
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
        self._report_progress(spec, fields)

    def total_runs(self) -> int:
        """Runs of the whole suite: per variant, each tuned model's own grid at seed 0 and its other seeds at the chosen
        point, and every seed of each ablation."""
        per_variant = sum(self.seeds if e.ablation else self.suite.points_searched(e) + self.seeds - 1
                          for e in self.entries)
        return len(self.suite.variant_values) * per_variant

    def _report_progress(self, spec: dict, fields: dict) -> None:
        self.session_runs += 1
        if self.progress is None:
            return
        # of the models this runner trains (--models): the other models' kept runs are not part of its total
        labels = {e.label for e in self.entries}
        total = self.total_runs()
        done = min(sum(r["label"] in labels for r in self.results["runs"]), total)
        elapsed = time.time() - self.started
        left = elapsed / self.session_runs * max(total - done, 0)
        status = f"FAILED: {fields['error'][:80]}" if fields.get("error") else f"{fields.get('wall_seconds', 0):.0f} s"
        self.progress(f"[{self.suite.name}] {done}/{total} runs done ({spec['label']}, {spec['variant']}, seed "
                      f"{spec['seed']}: {status}); {_duration(elapsed)} elapsed, about {_duration(left)} left")

    # ---- runs -------------------------------------------------------------------------------------------------------
    def run_config(self, entry: ModelEntry, variant: Any, hparams: dict[str, Any], seed: int) -> RunConfig:
        suite = self.suite
        options = dict(suite.dataset_options)
        if suite.variant_option is not None:
            options[suite.variant_option] = variant
        settings, tuned_options = split_point(hparams)
        train = TrainConfig(**{"progress": False, "tensorboard": False, **suite.train, **settings})
        train.seed = seed
        train.gradient_diagnostics = suite.gradient_diagnostics
        if self.device:
            train.device = self.device
        return RunConfig(
            dataset=suite.dataset, data_dir=suite.data_dir, dataset_options=options, model=entry.model,
            # an ablation's own options win over the tuned ones of its base row: they are what it changes
            model_options={**entry.options, **tuned_options, **entry.changed},
            objective={**suite.objective, **entry.objective}, train=train,
            cache_dir=self.cache_dir,
        )

    def _all_jobs(self, every_model: bool = False) -> list[tuple[ModelEntry, Any, dict, int]]:
        """Every run the suite can ask for given the tuning already done in ``previous``: each grid point of each
        seed (the chosen points are among them): a kept run is one the current suite would train identically. Of
        the models this runner trains, or with ``every_model`` of the whole suite."""
        entries = self.suite.models if every_model else self.entries
        return [(e, v, hp, seed) for v in self.suite.variant_values for e in entries for hp in self.suite.grid(e)
                for seed in range(self.seeds)]

    def _spec(self, entry: ModelEntry, variant: Any, hparams: dict, seed: int) -> dict[str, Any]:
        run = self.run_config(entry, variant, hparams, seed)
        config = run.to_dict()
        for machine_only in ("cache_dir",):
            config.pop(machine_only, None)
        fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        return {
            "key": run_key(variant, entry.label, hparams, seed), "variant": variant, "label": entry.label,
            "model": entry.model, "options": run.model_options, "ablation": entry.ablation, "hparams": hparams,
            "seed": seed, **({"objective": entry.objective} if entry.objective else {}),
            "git_commit": self.code["git_commit"], "config_sha256": fingerprint,
        }

    def _ready_jobs(self) -> list[tuple[ModelEntry, Any, dict, int]]:
        """The runs whose inputs are known now: every first-stage point; a model's second stage once its first is
        done; the seeds of ``_tune`` once the row they are tuned from (the model's own, or an ablation's base row,
        also when --models leaves that row out) has its whole search done. Lower seeds first; done runs included."""
        def all_done(variant: Any, entry: ModelEntry, points: list[dict]) -> bool:
            return all(self._done(run_key(variant, entry.label, hp, 0)) for hp in points)

        jobs = []
        for variant in self.suite.variant_values:
            for entry in [e for e in self.entries if not e.ablation]:
                first = self.suite.first_stage(entry)
                jobs += [(entry, variant, hp, 0) for hp in first]
                if all_done(variant, entry, first):
                    jobs += [(entry, variant, hp, 0) for hp in self._searched(variant, entry)]
        for entry, variant, hparams, seed in self._tune():
            row = self._entry(ablation_base(self.suite, entry)) if entry.ablation else entry
            if all_done(variant, row, self._searched(variant, row)):  # its first stage included
                jobs.append((entry, variant, hparams, seed))
        return sorted(jobs, key=lambda job: job[3])

    def _execute(self) -> None:
        """Train every run of the suite not already done, in ``workers`` processes when more than one; after each
        finished run the runs it unblocked are queued (``_ready_jobs``)."""
        def pending(running: set[str]) -> list[tuple[dict, RunConfig]]:
            todo: list[tuple[dict, RunConfig]] = []
            for entry, variant, hparams, seed in self._ready_jobs():
                spec = self._spec(entry, variant, hparams, seed)
                if (self._done(spec["key"]) is None and spec["key"] not in running
                        and all(spec["key"] != s["key"] for s, _ in todo)):
                    todo.append((spec, self.run_config(entry, variant, hparams, seed)))
            return todo

        if self.workers == 1:
            while todo := pending(set()):
                spec, config = todo[0]
                self._record(spec, *execute_run(config))
        else:
            self._execute_in_processes(pending)
        ready = {job[0].label for job in self._ready_jobs()}
        for entry in [e for e in self.entries if e.ablation and e.label not in ready]:
            base = ablation_base(self.suite, entry)
            log.warning("%s not trained: its base row %s is not tuned yet (train %s first, or without --models)",
                        entry.label, base, base)

    def _execute_in_processes(self, pending: Callable[[set[str]], list[tuple[dict, RunConfig]]]) -> None:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) as pool:
            running: dict[cf.Future, dict] = {}
            while True:
                for spec, config in pending({s["key"] for s in running.values()})[:self.workers - len(running)]:
                    running[pool.submit(execute_run, config)] = spec
                if not running:
                    return
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    self._record(running.pop(future), *future.result())

    def _entry(self, label: str) -> ModelEntry:
        return next(e for e in self.suite.models if e.label == label)

    def _choose(self, variant: Any, entry: ModelEntry, grid: list[dict]) -> dict[str, Any]:
        runs = [self._done(run_key(variant, entry.label, hp, 0)) for hp in grid]
        ok = [r for r in runs if r and not r.get("error") and not np.isnan(r.get("valid_monitor", float("nan")))]
        if not ok:
            return grid[0]
        sign = -1.0 if self.suite.train.get("monitor", "auc") in LOWER_IS_BETTER else 1.0
        return max(ok, key=lambda r: sign * r["valid_monitor"])["hparams"]

    def _searched(self, variant: Any, entry: ModelEntry) -> list[dict[str, Any]]:
        """The points a tuned model is chosen among: its first stage, then the second stage at the first stage's
        choice (coordinate search; the shared point counted once)."""
        first = self.suite.first_stage(entry)
        second = self.suite.second_stage(entry, self._choose(variant, entry, first))
        return first + [point for point in second if point not in first]

    def _tune(self) -> list[tuple[ModelEntry, Any, dict, int]]:
        """Fill ``results["tuning"]`` from the seed-0 runs done so far; the seed runs at the chosen values."""
        jobs = []
        # an ablation's base row is tuned from its runs on disk even when --models leaves that row out
        bases = {ablation_base(self.suite, e) for e in self.entries if e.ablation}
        tuned = [e for e in self.suite.models if not e.ablation and (e in self.entries or e.label in bases)]
        for variant in self.suite.variant_values:
            tuning = self.results["tuning"].setdefault(str(variant), {})
            for entry in tuned:
                grid = self._searched(variant, entry)
                tuning[entry.label] = {
                    "chosen": self._choose(variant, entry, grid),
                    "grid": [{"hparams": hp, "valid_monitor": (self._done(run_key(variant, entry.label, hp, 0))
                                                               or {}).get("valid_monitor")} for hp in grid],
                }
            for entry in self.entries:
                if entry.ablation:  # at its base row's chosen point, so that the two differ only by the ablation
                    base = ablation_base(self.suite, entry)
                    tuning[entry.label] = {"chosen": ablation_point(entry, tuning[base]["chosen"]), "grid": [],
                                           "from": base}
                jobs += [(entry, variant, tuning[entry.label]["chosen"], seed) for seed in range(self.seeds)]
        # seed by seed over every variant and model: a suite cut short has every model at fewer seeds, not the last
        # variants at none
        return sorted(jobs, key=lambda job: job[3])

    def run(self) -> dict[str, Any]:
        for variant in self.suite.variant_values:
            # build each variant's cache here, once: workers building the same cache at once would race
            api.load_run_dataset(self.run_config(self.entries[0], variant, {}, 0))
        self._execute()
        return self.finalize()

    def finalize(self) -> dict[str, Any]:
        """Tables' numbers and paired tests from the runs done so far (also on a partial, resumed suite)."""
        self._tune()
        labels = {}
        for variant in self.suite.variant_values:
            dataset = api.load_run_dataset(self.run_config(self.entries[0], variant, {}, 0))
            enc = dataset.split("test")
            labels[str(variant)] = {"labels": enc.labels, "mask": enc.label_mask, "user": enc.user,
                                    "oracle": (dataset.info.get("oracle") or {}).get("test")}
        if self.count_time:  # a re-rendering keeps the time the runs finished
            self.results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.results["summary"] = summarize(self.results, self.suite, self.predictions, labels,
                                            previous=self.previous_summary)
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
    progress: Callable[[str], None] | None = None,
    publish: str | Path | None = None,
    rerun: list[str] | None = None,
    ablations: bool = True,
) -> dict[str, Any]:
    """Run suite ``name`` (or, with ``report_only``, re-render an existing results.json) and write
    ``OUT/results.json``, ``OUT/report.md`` and the PNG figures; returns the results with ``report`` (Markdown).
    ``publish``: a Markdown page (e.g. BENCHMARKS.md) whose block for this suite is replaced by the report
    (``report.publish_report``). ``ablations=False`` trains the tuned models only (the
    ablations' runs already done are kept and reported)."""
    from onerank.benchmarking.plots import make_plots
    from onerank.benchmarking.report import check_page, publish_report, render_markdown
    from onerank.benchmarking.suite import DEFAULT_SUITES_DIR, load_suite

    suite = load_suite(name, suites_dir or DEFAULT_SUITES_DIR)
    if rerun:
        suite.entries(rerun)  # an unknown name fails here, with the suite's names
    if publish is not None:
        check_page(Path(publish), suite.name)  # before hours of training, not after
    out = Path(out_dir) if out_dir else Path("benchmarks/results") / suite.name
    if report_only and not (out / "results.json").exists():
        raise FileNotFoundError(f"--report-only: no results at {out / 'results.json'}")
    if report_only:  # keep the command and wall time of the run that made the results
        previous = json.loads((out / "results.json").read_text())
        command, seeds = previous.get("command"), previous.get("seeds", seeds)
    runner = SuiteRunner(suite, out, work_dir=work_dir, seeds=seeds, models=models, resume=resume or report_only,
                         cache_dir=cache_dir, command=command, device=device, workers=workers, progress=progress,
                         rerun=rerun, ablations=ablations)
    if report_only:  # re-rendering is not part of the suite's wall time
        runner.results["runs"], runner.predictions = [], {}
        runner._load_previous(without_predictions=True)
        runner.started = time.time()
        runner.results["previous_wall_seconds"] = previous.get("wall_seconds", 0.0)
        for key in ("code", "workers", "finished"):  # how and when the runs were made, not the re-rendering
            runner.results[key] = previous.get(key, runner.results.get(key))
        runner.count_time = False
        results = runner.finalize()
    else:
        results = runner.run()
    plots = make_plots(results, suite, out)
    report = render_markdown(results, suite, plots)
    (out / "report.md").write_text(report + "\n")
    if publish is not None:
        publish_report(Path(publish), results, suite, plots, out)
    return {**results, "report": report, "plots": plots}
