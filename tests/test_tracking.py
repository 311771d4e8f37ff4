"""Experiment tracking (training/tracking.py): off by default; TensorBoard and MLflow (a local file store) record the
run's settings, per-epoch metrics, the task weights an adaptive strategy chose, and the run's files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from onerank.cli import main

SMALL = ["--dataset", "synthetic", "--dataset-option", "num_users=60", "--dataset-option", "num_items=40",
         "--batch-size", "256", "--no-progress", "--model", "mmoe"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> list[str]:
    return ["--cache-dir", str(tmp_path_factory.mktemp("tracking-cache"))]


def test_nothing_is_tracked_unless_asked(tmp_path, cache):
    assert main(["train", *SMALL, *cache, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "last.pt", "metrics.json"]


def test_mlflow_records_params_metrics_task_weights_and_artefacts(tmp_path, cache, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "run"
    assert main(["train", *SMALL, *cache, "--epochs", "2", "--patience", "5", "--weighting", "uncertainty",
                 "--mlflow-experiment", "tracking-test", "--set", "train.weight_decay=0.01",
                 "--out", str(out)]) == 0
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["model"] == "mmoe" and params["weighting"] == "uncertainty"
    assert float(params["train.weight_decay"]) == 0.01 and params["train.mlflow"] == "True"
    history = json.loads((out / "metrics.json").read_text())["history"]
    auc = client.get_metric_history(run.info.run_id, "valid_auc/click")
    assert [m.step for m in auc] == [1, 2]
    assert [m.value for m in auc] == pytest.approx([h["valid"]["click"]["auc"] for h in history])
    weights = client.get_metric_history(run.info.run_id, "task_weight/cart")
    assert [m.value for m in weights] == pytest.approx([h["task_weights"]["cart"] for h in history])
    assert weights[0].value != weights[1].value  # uncertainty weighting moved them
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "checkpoint.pt"}


def test_tensorboard_records_epoch_metrics(tmp_path, cache):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", *SMALL, *cache, "--epochs", "1", "--tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"valid_auc/click", "epoch_loss/order", "task_weight/click", "monitor"} <= tags
    assert events.Scalars("task_weight/click")[0].value == 1.0  # fixed weights


@pytest.mark.parametrize("flag, module", [("--mlflow", "mlflow"), ("--tensorboard", "tensorboard")])
def test_a_missing_tracking_extra_is_named_in_one_line(flag, module, tmp_path, cache, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert main(["train", *SMALL, *cache, "--epochs", "1", flag, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onerank[tracking]" in err and module in err
    assert not (Path(tmp_path) / "run" / "checkpoint.pt").exists()
