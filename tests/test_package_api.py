"""The package-level API (lazy: ``import onerank`` loads no torch) and ``python -m onerank``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import onerank
from onerank import api


def test_import_onerank_is_cheap():
    code = "import sys, onerank; print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_public_names_are_the_library_functions():
    assert onerank.train is api.train and onerank.compare is api.compare and onerank.fuse is api.fuse
    assert onerank.evaluate is api.evaluate_checkpoint and onerank.load_checkpoint is api.load_checkpoint
    from onerank.serving.ranker import Ranker
    from onerank.training.config import RunConfig

    assert onerank.Ranker is Ranker and onerank.RunConfig is RunConfig
    assert {"train", "compare", "evaluate", "fuse", "load_checkpoint", "Ranker"} <= set(dir(onerank))
    with pytest.raises(AttributeError, match="trian"):
        onerank.trian


def test_train_evaluate_and_rank_through_the_package(tmp_path):
    config = onerank.RunConfig(dataset="synthetic", model="shared_bottom", cache_dir=str(tmp_path / "cache"),
                               dataset_options={"num_users": 60, "num_items": 40},
                               train=onerank.TrainConfig(epochs=1, batch_size=256, progress=False))
    result = onerank.train(config, out_dir=tmp_path / "run")
    report = onerank.evaluate(tmp_path / "run" / "checkpoint.pt", cache_dir=str(tmp_path / "cache"))
    assert report["metrics"]["click"]["auc"] == pytest.approx(result["test"]["click"]["auc"], abs=1e-9)
    ranker = onerank.Ranker(tmp_path / "run" / "checkpoint.pt")
    assert len(ranker.rank(ranker.example_request(4)).order) == 4


def test_python_dash_m_onerank():
    proc = subprocess.run([sys.executable, "-m", "onerank", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"onerank {onerank.__version__}"
