"""OneRank's list-wise objective: which reduction and temperature, measured on 20-candidate requests.

    .venv/bin/python benchmarks/listwise_objective.py                    # the variants below, seeds 0, 1, 2
    .venv/bin/python benchmarks/listwise_objective.py --seeds 0 --epochs 1

Trains OneRank on the built-in synthetic data (20 candidates per request; ``--users`` users, histories of 10) with
each objective variant and the same trainer settings, early-stopped on validation AUC, and prints test AUC and GAUC
per task (mean +- std over seeds). The variants (``VARIANTS``): point-wise only; point-wise + list-wise averaged
over requests or over positives; the same with a learnt temperature. Requests without both a positive and a negative never count.
Writes ``benchmarks/results/listwise/results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from onerank import api  # noqa: E402
from onerank.training.config import RunConfig, TrainConfig  # noqa: E402

VARIANTS = {  # label -> ObjectiveConfig fields (point-wise BCE at weight 1 in every variant)
    "pointwise": {"listwise": 0.0},
    "requests": {"listwise": 1.0, "listwise_reduction": "requests"},
    "positives": {"listwise": 1.0, "listwise_reduction": "positives"},
    "requests+learnt_tau": {"listwise": 1.0, "listwise_reduction": "requests", "learn_temperature": True},
    "positives+learnt_tau": {"listwise": 1.0, "listwise_reduction": "positives", "learn_temperature": True},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--variants", default="", help="comma-separated names of VARIANTS; default: all")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "listwise"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants.split(",")}
    base = dict(dataset="synthetic", dataset_options={"num_users": args.users, "history_len": 10}, model="onerank")
    dataset = api.load_run_dataset(RunConfig(**base))
    results: dict[str, list[dict]] = {}
    for label, objective in variants.items():
        for seed in seeds:
            config = RunConfig(**base, objective={"pointwise": 1.0, **objective}, train=TrainConfig(
                epochs=args.epochs, patience=1, seed=seed, threads=1, device="cpu", progress=False,
                tensorboard=False))
            run = api.train(config, dataset=dataset)
            results.setdefault(label, []).append({"seed": seed, "test": run["test"], "best_epoch": run["best_epoch"]})
            print(f"{label:22s} seed {seed}: " + " ".join(
                f"{t}: auc {m['auc']:.4f} gauc {m['gauc']:.4f}" for t, m in run["test"].items()), flush=True)
    tasks = list(next(iter(results.values()))[0]["test"])
    lines = [f"OneRank, synthetic ({args.users} users, 20 candidates per request, histories of 10), at most "
             f"{args.epochs} epochs, patience 1, library defaults otherwise; test metrics, mean +- std over seeds "
             f"{', '.join(map(str, seeds))}.", "",
             "| objective | " + " | ".join(f"{t} AUC | {t} GAUC" for t in tasks) + " |",
             "|---" * (1 + 2 * len(tasks)) + "|"]
    for label, runs in results.items():
        cells = []
        for t in tasks:
            for metric in ("auc", "gauc"):
                values = np.array([r["test"][t][metric] for r in runs])
                cells.append(f"{values.mean():.4f} +- {values.std():.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
