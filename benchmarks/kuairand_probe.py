"""Single runs on the KuaiRand suite's protocol, seed by seed, and their comparison with a reference model.

The probes of docs/onerank.md section 7 (issue 12): each RUN trains one model with the short protocol of the
first KuaiRand suite (3 training days, histories of 10, 2 epochs; ``--full``: the full-budget suite's settings)
through the suite runner's ``execute_run``, keeps the test predictions, and records the metrics in OUT/results.json (a run already there is skipped, so the
command resumes). ``--analyse`` prints mean +- std over seeds per label and the paired bootstrap over test users of
every label against ``--reference``.

    python benchmarks/kuairand_probe.py runs/probe onerank:onerank:0.001:0 onerank:onerank:0.001:1 \\
        mmoe:mmoe:0.003:0 mmoe:mmoe:0.003:1 'lw0:onerank:0.001:0:obj.listwise=0'
    python benchmarks/kuairand_probe.py runs/probe --analyse --reference mmoe

RUN = LABEL:MODEL:LR:SEED[:KEY=VALUE,...]; a KEY is a model option, ``obj.NAME`` an objective option or ``train.NAME``
a train option, ``data.NAME`` a dataset option (``null``: the loader's default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

from onerank import api
from onerank.benchmarking.runner import execute_run
from onerank.benchmarking.stats import paired_bootstrap_auc
from onerank.training.config import RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# The short protocol of the first KuaiRand suite (2026-11-25), on which the issue-12 probes ran: 3 training days,
# histories of 10, 2 epochs, patience 1. ``--full`` takes the full-budget suite's (benchmarks/suites/kuairand.yaml).
SHORT = {"dataset_options": {"train_dates": "20220503-20220505", "history_len": 10},
         "train": {"epochs": 2, "batch_size": 1024, "patience": 1, "threads": 1, "device": "cpu"}}
FULL = yaml.safe_load((ROOT / "benchmarks" / "suites" / "kuairand.yaml").read_text())
TASKS = ["click", "long_view", "like"]


def parse_run(spec: str) -> tuple[str, str, float, int, dict, dict, dict, dict]:
    label, model, lr, seed, *rest = spec.split(":")
    options, objective, train, data = {}, {}, {}, {}
    prefixes = {"obj": objective, "train": train, "data": data}
    for item in (rest[0].split(",") if rest else []):
        key, value = item.split("=", 1)
        prefix, _, name = key.partition(".")
        target = prefixes.get(prefix) if name else None
        if target is None:
            target, name = options, key
        target[name] = yaml.safe_load(value)
    return label, model, float(lr), int(seed), options, objective, train, data


def dataset_options(protocol: dict, overrides: dict) -> dict:
    """The protocol's dataset options with ``data.NAME=VALUE`` overrides; ``data.NAME=null`` drops the suite's value
    (the loader's default, e.g. all 11 training days)."""
    options = {**protocol["dataset_options"], **overrides}
    return {k: v for k, v in options.items() if v is not None}


def run(out: Path, specs: list[str], data_dir: str, protocol: dict) -> None:
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for spec in specs:
        label, model, lr, seed, options, objective, train, data = parse_run(spec)
        key = f"{label}_lr={lr}_seed={seed}"
        if key in results:
            continue
        settings = {"progress": False, "tensorboard": False, **protocol["train"], "lr": lr, "seed": seed, **train}
        config = RunConfig(dataset="kuairand", data_dir=data_dir, dataset_options=dataset_options(protocol, data),
                           model=model, model_options=options, objective=objective, train=TrainConfig(**settings))
        start = time.time()
        record, predictions = execute_run(config)
        record.pop("history", None)
        results[key] = {"label": label, "model": model, "lr": lr, "seed": seed, "options": options,
                        "objective": objective, "train": train, **record}
        if predictions is not None:
            np.savez_compressed(out / "predictions" / f"{key}.npz", **predictions)
        path.write_text(json.dumps(results, indent=1, default=float))
        metrics = {t: (round(m["auc"], 4), round(m.get("gauc", float("nan")), 4))
                   for t, m in record.get("test", {}).items()}
        print(key, metrics, record.get("error"), f"{time.time() - start:.0f} s", flush=True)


def analyse(out: Path, reference: str, data_dir: str, protocol: dict) -> None:
    results = json.loads((out / "results.json").read_text())
    groups: dict[str, list[tuple[int, str, dict]]] = {}
    for key, record in results.items():
        if not record.get("error"):
            groups.setdefault(record["label"], []).append((record["seed"], key, record))
    test = api.load_run_dataset(RunConfig(dataset="kuairand", data_dir=data_dir,
                                          dataset_options=dict(protocol["dataset_options"]))).split("test")
    for label, runs in sorted(groups.items()):
        runs.sort(key=lambda r: r[0])
        print(f"{label}: seeds {[s for s, _, _ in runs]}")
        for t in TASKS:
            aucs = [r["test"][t]["auc"] for _, _, r in runs]
            gaucs = [r["test"][t]["gauc"] for _, _, r in runs]
            spread = (lambda v: np.std(v, ddof=1) if len(v) > 1 else 0.0)
            print(f"  {t}: AUC {np.mean(aucs):.4f} +- {spread(aucs):.4f}  GAUC {np.mean(gaucs):.4f} +- "
                  f"{spread(gaucs):.4f}")
    base = {s: k for s, k, _ in groups.get(reference, [])}
    for label, runs in sorted(groups.items()):
        seeds = [s for s, _, _ in runs if s in base]
        if label == reference or not seeds:
            continue
        own = {s: k for s, k, _ in runs}
        for t in TASKS:
            mask = test.label_mask[t]
            ours = [np.load(out / "predictions" / f"{own[s]}.npz")[t][mask] for s in seeds]
            theirs = [np.load(out / "predictions" / f"{base[s]}.npz")[t][mask] for s in seeds]
            b = paired_bootstrap_auc(test.labels[t][mask], ours, theirs, clusters=test.user[mask], resamples=1000)
            print(f"{label} - {reference}, seeds {seeds}, {t}: {b['delta']:+.4f} [{b['ci_low']:+.4f}, "
                  f"{b['ci_high']:+.4f}], p = {b['p']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="*", help="LABEL:MODEL:LR:SEED[:KEY=VALUE,...]")
    parser.add_argument("--analyse", action="store_true")
    parser.add_argument("--reference", default="mmoe", help="label the others are compared with (--analyse)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "kuairand-pure"))
    parser.add_argument("--full", action="store_true", help="the full-budget suite's data and trainer settings "
                        "(11 training days, histories of 50, up to 6 epochs, patience 2) instead of the short protocol")
    args = parser.parse_args()
    protocol = FULL if args.full else SHORT
    if args.runs:
        run(args.out, args.runs, args.data_dir, protocol)
    if args.analyse:
        analyse(args.out, args.reference, args.data_dir, protocol)


if __name__ == "__main__":
    main()
