"""Does every model learn in its first epoch at the library's defaults? Validation AUC against optimiser steps.

    .venv/bin/python benchmarks/first_epoch.py                              # synthetic (seeds 0, 1, 2) and KuaiRand
    .venv/bin/python benchmarks/first_epoch.py --datasets synthetic --models mmoe,ple --seeds 0

Each run is one epoch of ``Trainer.fit`` with no configuration at all (``TrainConfig()``'s learning rate, batch size,
initialisation and objective; only the seed, one thread and the CPU are set), on

* ``synthetic``: the built-in generator at its default options (55 optimiser steps of 1,024 impressions);
* ``kuairand``: a three-day window of KuaiRand-Pure (train 2022-05-03..05-05, histories of 10; ``--data-root``),
  whose one epoch is 48 optimiser steps, close to the synthetic data's 55 (the kuairand suite trains on all 11 days,
  about 176 steps an epoch); seed 0 only unless ``--kuairand-seeds`` says more.

The validation split is scored every ``--every`` steps (and before the first step), so the curves show how soon each
model leaves chance. The script prints the issue's targets and whether each model meets them: after one epoch,
synthetic click AUC >= 0.58 for every seed, and no model below 0.5 on any task (``--min-click``, ``--min-any``).

Writes ``<out>/<dataset>.json`` (every curve), ``<out>/first_epoch.png`` (mean curve per model, one panel per dataset
and task; a shaded band spans the seeds) and ``<out>/table.md`` (the end-of-epoch AUC per model, task and seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from onerank import api  # noqa: E402
from onerank.models.base import model_names  # noqa: E402
from onerank.training.config import RunConfig, TrainConfig  # noqa: E402
from onerank.training.trainer import TrainingInterrupted  # noqa: E402

DATASETS = {
    "synthetic": {"dataset": "synthetic", "data_dir": None, "dataset_options": {}},
    "kuairand": {"dataset": "kuairand", "data_dir": "kuairand-pure",
                 "dataset_options": {"train_dates": "20220503-20220505", "history_len": 10}},
}


def first_epoch_curve(config: RunConfig, dataset, every: int) -> dict:
    """Validation metrics before the first step, every ``every`` steps, and at the end of epoch 1."""
    trainer = api.build_trainer(config, dataset)
    steps = len(trainer.train_loader)
    points = []

    def record(step: int) -> None:
        valid = trainer.evaluate("valid")
        points.append({"step": step, "auc": {t: m["auc"] for t, m in valid.items() if "auc" in m}})

    t0 = time.perf_counter()
    try:
        record(0)
        for stop in range(every, steps, every):
            try:
                trainer.fit(stop_after_steps=stop)  # continues where the previous call stopped
            except TrainingInterrupted:
                record(stop)
        trainer.fit()
        record(steps)
    finally:
        trainer.close()
    return {"steps": steps, "points": points, "seconds": round(time.perf_counter() - t0, 1)}


def run(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(1)
    models = args.models.split(",") if args.models else model_names()
    # only to attribute the gains (e.g. --lr 1e-3 --bias-init zero); the targets are checked at the defaults
    overrides = {k: v for k, v in (("lr", args.lr), ("bias_init", args.bias_init)) if v is not None}
    results = {}
    for name in args.datasets.split(","):
        spec = dict(DATASETS[name])
        if spec["data_dir"]:
            path = Path(args.data_root) / spec["data_dir"]
            if not path.exists():
                print(f"[skip] {name}: {path} is absent (pass --data-root)")
                continue
            spec["data_dir"] = str(path)
        seeds = [int(s) for s in (args.seeds if name == "synthetic" else args.kuairand_seeds).split(",")]
        base = RunConfig(**spec, train=TrainConfig(epochs=1, threads=1, device="cpu", progress=False,
                                                   tensorboard=False))
        dataset = api.load_run_dataset(base)
        runs = {}
        for model in models:
            for seed in seeds:
                config = RunConfig(**spec, model=model, train=TrainConfig(
                    epochs=1, seed=seed, threads=1, device="cpu", progress=False, tensorboard=False, **overrides))
                curve = first_epoch_curve(config, dataset, args.every)
                runs.setdefault(model, {})[str(seed)] = curve
                end = curve["points"][-1]["auc"]
                print(f"{name:9s} {model:17s} seed {seed}: " + " ".join(f"{t}={v:.4f}" for t, v in end.items())
                      + f"  ({curve['steps']} steps, {curve['seconds']} s)", flush=True)
                results[name] = save(Path(args.out) / f"{name}.json", seeds, runs, overrides)
    return results


def save(path: Path, seeds: list[int], runs: dict, overrides: dict) -> dict:
    """Write after every run, so an interrupted sweep keeps what it finished. Runs of an earlier invocation with the
    same seeds and settings stay in the file; the models re-run here replace theirs."""
    record = {"seeds": seeds, "lr": overrides.get("lr", TrainConfig().lr),
              "bias_init": overrides.get("bias_init", TrainConfig().bias_init), "batch_size": TrainConfig().batch_size}
    earlier = json.loads(path.read_text()) if path.exists() else {}
    same = all(earlier.get(k) == v for k, v in record.items())
    record["runs"] = {**(earlier.get("runs", {}) if same else {}), **runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def check_targets(results: dict[str, dict], min_click: float, min_any: float) -> bool:
    """Print the targets per model: synthetic click AUC after one epoch >= min_click for every seed; no end-of-epoch
    AUC below min_any on any task and dataset."""
    ok = True
    print(f"\nTargets: synthetic click AUC >= {min_click} for every seed; every task's AUC >= {min_any}")
    for dataset, res in results.items():
        for model, seeds in res["runs"].items():
            ends = {seed: curve["points"][-1]["auc"] for seed, curve in seeds.items()}
            failures = [f"{t} {v:.4f} (seed {s})" for s, auc in ends.items() for t, v in auc.items() if v < min_any]
            if dataset == "synthetic":
                failures = [f for f in failures if not f.startswith("click")]
                failures += [f"click {a['click']:.4f} < {min_click} (seed {s})" for s, a in ends.items()
                             if a.get("click", 1.0) < min_click]
            ok &= not failures
            print(f"  {'FAIL' if failures else 'ok  '} {dataset:9s} {model:17s} {'; '.join(failures)}")
    return ok


def table(results: dict[str, dict]) -> str:
    lines = []
    for dataset, res in results.items():
        runs = res["runs"]
        tasks = list(next(iter(next(iter(runs.values())).values()))["points"][-1]["auc"])
        seeds = [str(s) for s in res["seeds"]]
        steps = next(iter(next(iter(runs.values())).values()))["steps"]
        lines += [f"### {dataset}: validation AUC after one epoch ({steps} steps, lr {res['lr']}, batch "
                  f"{res['batch_size']}; seeds {', '.join(seeds)})", ""]
        per_seed = " / ".join(seeds)
        lines += ["| model | " + " | ".join(f"{t} (seeds {per_seed})" for t in tasks)
                  + f" | steps to {tasks[0]} AUC 0.55 |", "|---" * (2 + len(tasks)) + "|"]
        for model, curves in runs.items():
            cells = [" / ".join(f"{curves[s]['points'][-1]['auc'][t]:.4f}" if s in curves else "-" for s in seeds)
                     for t in tasks]
            reach = []
            for s in seeds:
                hit = [p["step"] for p in curves.get(s, {}).get("points", []) if p["auc"].get(tasks[0], 0.0) >= 0.55]
                reach.append(str(hit[0]) if hit else "-")
            lines.append(f"| {model} | {' | '.join(cells)} | {' / '.join(reach)} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = model_names()  # one colour and marker per model, fixed by its place in the registry
    palette = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"

    panels = [(d, t) for d, res in results.items()
              for t in next(iter(next(iter(res["runs"].values())).values()))["points"][-1]["auc"]]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (dataset, task) in zip(axes.flat, panels):
        for model, curves in results[dataset]["runs"].items():
            steps = [p["step"] for p in next(iter(curves.values()))["points"]]
            values = np.array([[p["auc"][task] for p in c["points"]] for c in curves.values()])
            i = names.index(model) if model in names else len(names)
            color = palette[i % len(palette)]
            ax.plot(steps, values.mean(0), label=model, color=color, marker=markers[i % len(markers)], markersize=3)
            if len(values) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.12)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{dataset}: {task}")
        ax.set_xlabel("optimiser steps (epoch 1)")
        ax.set_ylabel("validation AUC")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout()
    # below the panels, outside every axis: the legend never covers a curve
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 8),
               frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="synthetic,kuairand")
    parser.add_argument("--models", default="", help="comma-separated; default: every registered model")
    parser.add_argument("--seeds", default="0,1,2", help="synthetic seeds")
    parser.add_argument("--kuairand-seeds", default="0")
    parser.add_argument("--every", type=int, default=5, help="validate every N optimiser steps")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "first_epoch"))
    parser.add_argument("--min-click", type=float, default=0.58)
    parser.add_argument("--min-any", type=float, default=0.5)
    parser.add_argument("--lr", type=float, help="override the default learning rate (attribution runs only)")
    parser.add_argument("--bias-init", choices=["auto", "zero"], help="override train.bias_init (attribution only)")
    parser.add_argument("--replot", action="store_true", help="only redraw figure and table from <out>/*.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    if args.replot:
        results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))
                   if p.stem in DATASETS}
    else:
        results = run(args)
    if not results:
        return 1
    plot(results, out / "first_epoch.png")
    (out / "table.md").write_text(table(results))
    print("\n" + table(results))
    return 0 if check_targets(results, args.min_click, args.min_any) else 1


if __name__ == "__main__":
    sys.exit(main())
