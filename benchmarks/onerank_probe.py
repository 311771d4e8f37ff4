"""Validation-only probes: train configurations on one dataset and record each one's best epoch and validation
metrics (the test split is never scored). For choosing defaults and settings before a final run.

    python benchmarks/onerank_probe.py OUT.jsonl DATASET_JSON LABEL:MODEL:KEY=V,KEY=V ...

DATASET_JSON: {"dataset": "synthetic", "options": {...}, "data_dir": ..., "train": {...}} (``train``: TrainConfig
fields shared by every probe). KEY: ``train.X`` (a TrainConfig field), ``obj.X`` (an objective setting) or a model
option; values are read and checked as ``--set`` reads them (``onerank.cli.apply_settings``). Each probe appends one JSON line: label, spec, best epoch, epochs, validation AUC / GAUC per task, the
per-epoch mean validation AUC, seconds, and the code version (commit, clean tree) and machine load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch

from onerank import api
from onerank.benchmarking.runner import code_version
from onerank.cli import apply_settings
from onerank.training.config import RunConfig, TrainConfig


def settings(items: list[str]) -> list[str]:
    """A probe's KEY=VALUE items as ``--set`` items: ``obj.X`` -> ``objective.X``, a bare key -> ``model_options.KEY``."""
    out = []
    for item in items:
        key, value = item.split("=", 1)
        prefix = "objective." + key[4:] if key.startswith("obj.") else key if key.startswith("train.") else (
            "model_options." + key)
        out.append(f"{prefix}={value}")
    return out


def main(out: str, data_spec: dict, specs: list[str]) -> None:
    torch.set_num_threads(1)
    base = RunConfig(dataset=data_spec["dataset"], data_dir=data_spec.get("data_dir"),
                     dataset_options=data_spec.get("options", {}),
                     train=TrainConfig(**{"progress": False, "tensorboard": False, **data_spec.get("train", {})}))
    code = code_version()  # one checkout for every probe of this call
    dataset = None
    for spec in specs:
        label, model, *rest = spec.split(":")
        items = rest[0].split(",") if rest and rest[0] else []
        config = apply_settings(dataclasses.replace(base, model=model), settings(items)).validated()
        dataset = dataset or api.load_run_dataset(config)
        started = time.time()
        trainer = api.build_trainer(config, dataset)
        state = trainer.fit()
        best = state.history[state.best_epoch - 1]["valid"]
        tasks = dataset.schema.task_names
        row = {
            "label": label, "model": model, "spec": spec, "best_epoch": state.best_epoch, "epochs": len(state.history),
            "valid": {t: {m: best[t][m] for m in ("auc", "gauc") if m in best[t]} for t in tasks},
            "curve": [round(sum(h["valid"][t]["auc"] for t in tasks) / len(tasks), 4) for h in state.history],
            "seconds": round(time.time() - started, 1), "code": code, "load": os.getloadavg(),
        }
        trainer.close()
        print(label, row["best_epoch"], "/", row["epochs"], {t: round(v["auc"], 4) for t, v in row["valid"].items()},
              flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:])
