"""Train torch-rechub's MMOE or PLE on an exported split; runs inside the peer virtualenv (never imports onerank).

Input: the ``.npz`` written by ``rechub_census.py`` (per split: ``<split>.cat.<field>`` codes, ``<split>.dense.<field>``
values, ``<split>.label.<task>``; ``vocab.<field>`` sizes). Output: a JSON line with the test AUC per task and the
training samples/s. Only torch-rechub's public API is used: feature classes, the model, ``DataGenerator`` for the
loaders and ``MTLTrainer`` (``train_one_epoch`` per epoch, timed; ``evaluate`` on validation to keep the best epoch,
the same model selection as onerank's trainer; ``predict`` on test through its ``PredictDataset``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # torch-rechub's progress bars would flood the log

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch_rechub.basic.features import DenseFeature, SparseFeature
from torch_rechub.models.multi_task import MMOE, PLE
from torch_rechub.trainers import MTLTrainer
from torch.utils.data import DataLoader
from torch_rechub.utils.data import DataGenerator, PredictDataset


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", choices=["mmoe", "ple"], required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--expert-units", type=int, default=64)
    p.add_argument("--tower-units", type=int, default=32)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--ple-task-experts", type=int, default=1)
    p.add_argument("--ple-shared-experts", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = np.load(args.data)
    fields = sorted(k.split(".", 2)[2] for k in data.files if k.startswith("train.cat."))
    dense = sorted(k.split(".", 2)[2] for k in data.files if k.startswith("train.dense."))
    tasks = [str(t) for t in data["tasks"]]

    def split(name: str) -> tuple[dict, np.ndarray]:
        x = {f: data[f"{name}.cat.{f}"] for f in fields}
        x.update({f: data[f"{name}.dense.{f}"] for f in dense})
        y = np.stack([data[f"{name}.label.{t}"] for t in tasks], axis=1).astype(np.float32)
        return x, y

    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = split("train"), split("valid"), split("test")
    features = [SparseFeature(f, int(data[f"vocab.{f}"]), embed_dim=args.embedding_dim) for f in fields]
    features += [DenseFeature(f) for f in dense]
    task_types = ["classification"] * len(tasks)
    expert = {"dims": [args.expert_units]}
    towers = [{"dims": [args.tower_units]} for _ in tasks]
    if args.model == "mmoe":
        model = MMOE(features, task_types, n_expert=args.num_experts, expert_params=expert, tower_params_list=towers)
    else:
        model = PLE(features, task_types, n_level=1, n_expert_specific=args.ple_task_experts,
                    n_expert_shared=args.ple_shared_experts, expert_params=expert, tower_params_list=towers)
    train_dl, valid_dl, _ = DataGenerator(x_train, y_train).generate_dataloader(
        x_val=x_valid, y_val=y_valid, x_test=x_test, y_test=y_test, batch_size=args.batch_size
    )
    test_dl = DataLoader(PredictDataset(x_test), batch_size=args.batch_size, shuffle=False)
    trainer = MTLTrainer(model, task_types, optimizer_params={"lr": args.lr, "weight_decay": 0.0},
                         n_epoch=args.epochs, earlystop_patience=args.epochs, device="cpu", model_path=os.devnull)
    seconds, best, best_state, history = 0.0, -1.0, None, []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        trainer.train_one_epoch(train_dl)
        seconds += time.perf_counter() - start
        valid_auc = trainer.evaluate(trainer.model, valid_dl)
        history.append({"epoch": epoch + 1, "valid_auc": [float(a) for a in valid_auc]})
        if float(np.mean(valid_auc)) > best:  # the best epoch on mean validation AUC, as onerank's trainer keeps
            best, best_state = float(np.mean(valid_auc)), copy.deepcopy(trainer.model.state_dict())
    trainer.model.load_state_dict(best_state)
    preds = np.asarray(trainer.predict(trainer.model, test_dl))
    print(json.dumps({
        "library": "torch-rechub",
        "model": type(model).__name__,
        "test_auc": [float(roc_auc_score(y_test[:, i], preds[:, i])) for i in range(len(tasks))],
        "train_samples_per_s": round(len(y_train) * args.epochs / seconds, 1),
        "train_seconds": round(seconds, 3),
        "epochs": args.epochs,
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
    }))


if __name__ == "__main__":
    main()
