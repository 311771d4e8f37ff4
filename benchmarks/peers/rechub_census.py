"""onerank and torch-rechub side by side: MMoE and PLE on exactly the same Census-Income rows and features.

    .venv/bin/python benchmarks/peers/rechub_census.py --json benchmarks/results/peers_census.json

What it does, in one run on one machine:
1. makes sure the peer library is installed in its own virtualenv (``.venv-peers``; ``torch==2.13.0`` is installed
   first, so that pip does not pull a CUDA build, then ``torch-rechub`` from PyPI). torch-rechub is never a
   dependency of onerank.
2. loads onerank's encoded Census-Income split (official train/test files, a seeded 10 % of train for validation,
   tasks income and never-married) and exports it as NumPy arrays: every categorical field's codes, the 7
   standardised dense values, the labels, and each field's vocabulary size. Both libraries see identical rows,
   features and labels.
3. trains each model with both libraries under the same settings (embeddings 16, experts of 64 units, towers of
   32, BatchNorm in expert and tower layers as torch-rechub's MLP has, batch 1024, Adam(W) lr 1e-3 without weight
   decay, the same number of epochs, the best epoch on mean validation AUC), and prints test AUCs, training
   samples/s and the speed ratio.

Throughput is wall-clock time of the training epochs only (validation and test excluded for both).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "rechub_worker.py"
TORCH_PIN = "torch==2.13.0"  # the same PyTorch as onerank's; pinned first so that no CUDA build is pulled
PEER_PACKAGE = "torch-rechub"


def ensure_peer_env(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import torch_rechub, sklearn"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing {PEER_PACKAGE} into {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for package in (TORCH_PIN, PEER_PACKAGE):
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", package], check=True)
    subprocess.run(probe, check=True)
    return python


def export_census(ds, path: Path) -> None:
    """onerank's encoded split -> the arrays the peer worker reads (codes, standardised dense values, labels)."""
    arrays: dict[str, np.ndarray] = {"tasks": np.array(ds.schema.task_names)}
    for name in ("train", "valid", "test"):
        split = ds.split(name)
        for field, codes in split.categorical.items():
            arrays[f"{name}.cat.{field}"] = codes.astype(np.int64)
        for field, values in split.dense.items():
            arrays[f"{name}.dense.{field}"] = values.astype(np.float32)
        for task, labels in split.labels.items():
            if not split.label_mask[task].all():
                raise ValueError(f"census task {task} has unlabelled rows; the peer has no label masks")
            arrays[f"{name}.label.{task}"] = labels.astype(np.float32)
    for field, size in ds.vocab_sizes.items():
        arrays[f"vocab.{field}"] = np.array(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def run_ours(model: str, ds, args) -> dict:
    from onerank import api
    from onerank.training.config import RunConfig, TrainConfig

    # batch_norm: torch-rechub's MLP puts BatchNorm after every hidden layer; ours does so when asked
    options = {"embedding_dim": 16, "expert_hidden": (64,), "tower_hidden": (32,), "batch_norm": True}
    options.update({"num_experts": 4} if model == "mmoe" else {"num_task_experts": 1, "num_shared_experts": 2})
    config = RunConfig(
        dataset="census", data_dir=args.data_dir, model=model, model_options=options,
        train=TrainConfig(epochs=args.epochs, batch_size=1024, lr=1e-3, weight_decay=0.0, patience=args.epochs,
                          seed=args.seed, threads=args.threads, progress=False, tensorboard=False,
                          precision=args.precision),
    )
    result = api.train(config, dataset=ds)
    return {
        "library": "onerank",
        "model": model,
        "test_auc": [result["test"][t]["auc"] for t in ds.schema.task_names],
        "train_samples_per_s": result["train_samples_per_s"],
        "train_seconds": result["train_seconds"],
        "epochs": result["epochs"],
        "params": result["params"],
    }


def run_peer(python: Path, model: str, data: Path, args) -> dict:
    command = [
        str(python), str(WORKER), "--data", str(data), "--model", model, "--epochs", str(args.epochs),
        "--threads", str(args.threads), "--seed", str(args.seed),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"torch-rechub worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "census-income"))
    p.add_argument("--models", default="mmoe,ple")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both libraries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="onerank's precision")
    p.add_argument("--peer-venv", default=str(ROOT / ".venv-peers"))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "peers"))
    p.add_argument("--json", help="write the comparison here")
    args = p.parse_args()
    if not Path(args.data_dir).is_dir():
        print(f"Census-Income not found at {args.data_dir}; pass --data-dir", file=sys.stderr)
        return 2

    import torch

    from onerank import api
    from onerank.training.config import RunConfig

    torch.set_num_threads(args.threads)
    python = ensure_peer_env(Path(args.peer_venv))
    ds = api.load_run_dataset(RunConfig(dataset="census", data_dir=args.data_dir))
    data = Path(args.work_dir) / "census.npz"
    export_census(ds, data)
    print(f"census: {len(ds.train)} train / {len(ds.valid)} valid / {len(ds.test)} test rows, "
          f"{len(ds.schema.categorical)} categorical + {len(ds.schema.dense)} dense fields, tasks "
          f"{ds.schema.task_names}; {args.epochs} epochs, {args.threads} thread(s)", flush=True)

    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        started = time.perf_counter()
        ours = run_ours(model, ds, args)
        peer = run_peer(python, model, data, args)
        ratio = ours["train_samples_per_s"] / peer["train_samples_per_s"]
        rows.append({"model": model, "ours": ours, "peer": peer, "speed_ratio": round(ratio, 2)})
        print(f"{model}: done in {time.perf_counter() - started:.0f}s", flush=True)

    tasks = ds.schema.task_names
    header = f"{'model':6} {'library':13} " + " ".join(f"{t + ' AUC':>12}" for t in tasks) + f" {'samples/s':>10}"
    print(header)
    for row in rows:
        for side in ("ours", "peer"):
            r = row[side]
            aucs = " ".join(f"{a:12.4f}" for a in r["test_auc"])
            print(f"{row['model']:6} {r['library']:13} {aucs} {r['train_samples_per_s']:10,.0f}")
        delta = " ".join(f"{a - b:+12.4f}" for a, b in zip(row["ours"]["test_auc"], row["peer"]["test_auc"]))
        print(f"{'':6} {'ours - peer':13} {delta} {row['speed_ratio']:9.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
