"""Writes the checkpoints of earlier onerank releases that tests/test_checkpoint_formats.py loads.

For each commit below, the source of that commit (``git archive``) trains tiny models on tiny synthetic data, and
this folder receives, per model, the checkpoint it wrote (``LABEL/MODEL.pt``) and the logits that code computed on
one batch of whole requests (``LABEL/MODEL.expected.pt``: the batch's tensors and the logits, plain tensors). The
test rebuilds each model with today's code and checks it scores that batch as the code that trained it did.

    python tests/data/legacy_checkpoints/generate.py          # from the repository root, with the dev venv

Each format folder also gets ``options.json``: every model's options at that commit, so the test can check that
each option added since has an old default (``MultiTaskModel.added_options``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# label -> (commit, why that one): the first release, and the commits just before a model option appeared
FORMATS = {
    "headerless": ("bbed0ab", "the first release: no header; the fewest model options"),
    "format1_pre_gated": ("ad4d379", "the first with the format 1 header, before OneRank's cross_task_block"),
    "format1_pre_task_item": ("7da33a0^", "format 1, before OneRank's task_item_embedding"),
    "format1": ("cc304f0", "format 1 with every option: the last commit before format 2 (and its last.pt)"),
}
MODELS = {
    "onerank": {"dim": 8, "num_layers": 1, "num_heads": 2, "item_mlp_hidden": [8]},
    "mmoe": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
}
DATA = {"num_users": 40, "num_items": 30, "requests_per_user": 2, "seed": 3}


def inner(out: Path, models: list[str], keep_resume: bool) -> None:
    """Runs inside the old source tree (PYTHONPATH): train, then score one batch of whole requests."""
    import torch

    import onerank
    from onerank import api
    from onerank.data.batching import BatchLoader
    from onerank.training.config import RunConfig, TrainConfig

    assert onerank.__file__.startswith(os.environ["PYTHONPATH"]), onerank.__file__
    from dataclasses import fields

    from onerank.models.base import model_class, model_names

    options = {m: sorted(f.name for f in fields(model_class(m).Config)) for m in model_names()}
    (out / "options.json").write_text(json.dumps(options, indent=1) + "\n")
    for name in models:
        run = Path(tempfile.mkdtemp()) / name
        config = RunConfig(dataset="synthetic", model=name, model_options=dict(MODELS[name]),
                           dataset_options=dict(DATA), train=TrainConfig(epochs=1, batch_size=64, progress=False,
                                                                         tensorboard=False),
                           cache_dir=str(run.parent / "cache"))
        api.train(config, out_dir=run)
        model, _ = api.load_checkpoint(run / "checkpoint.pt")
        dataset = api.load_run_dataset(config)
        trainer = api.build_trainer(config, dataset)
        batch = next(iter(BatchLoader(trainer.splits["test"], 48, by_request=True).epoch(0)))
        with torch.no_grad():
            logits = model(batch)
        shutil.copy(run / "checkpoint.pt", out / f"{name}.pt")
        if keep_resume:
            shutil.copy(run / "last.pt", out / f"{name}.last.pt")
        torch.save({"categorical": batch.categorical, "dense": batch.dense, "histories": batch.histories,
                    "user": batch.user, "request": batch.request, "logits": logits}, out / f"{name}.expected.pt")


def main() -> None:
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    for label, (commit, why) in FORMATS.items():
        out = HERE / label
        out.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory() as tree:
            archive = subprocess.run(["git", "archive", commit, "src"], cwd=root, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
            env = {**os.environ, "PYTHONPATH": str(Path(tree) / "src"), "OMP_NUM_THREADS": "1"}
            models = list(MODELS) if label == "headerless" else ["onerank"]
            subprocess.run([sys.executable, __file__, "--inner", str(out), ",".join(models),
                            "1" if label == "format1" else "0"], env=env, check=True)
        sha = subprocess.check_output(["git", "rev-parse", commit], cwd=root, text=True).strip()
        (out / "SOURCE.json").write_text(json.dumps({"commit": sha, "why": why, "models": MODELS, "data": DATA},
                                                    indent=2) + "\n")
        print(label, commit, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inner"]:
        inner(Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4] == "1")
    else:
        main()
