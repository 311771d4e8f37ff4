"""The command line: train / evaluate / compare on small synthetic data, and one-line errors for user mistakes."""

import json
import subprocess
import sys

import pytest

from onerank.cli import main

SMALL = ["--dataset", "synthetic", "--dataset-option", "num_users=150", "--dataset-option", "num_items=120",
         "--dataset-option", "candidates_per_request=8", "--epochs", "1", "--batch-size", "256", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onerank.cli", *args], capture_output=True, text=True, timeout=300)


def test_train_then_evaluate_the_checkpoint(tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *SMALL, *cache, "--model", "mmoe", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"click", "cart", "order"}
    assert (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "tensorboard").exists()
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), *cache]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["click"]["auc"] == pytest.approx(metrics["test"]["click"]["auc"], abs=1e-9)


def test_compare_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    code = main(["compare", *SMALL, "--cache-dir", str(tmp_path / "cache"), "--models", "shared_bottom,omoe",
                 "--output", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "shared_bottom" in table and "click:auc" in table and "samples/s" in table
    data = json.loads(out.read_text())
    assert data["dataset"] == "synthetic"
    for r in data["results"]:
        assert {"model", "test", "epochs", "train_seconds", "train_samples_per_s", "params"} <= set(r)
        assert {"auc", "gauc", "logloss"} <= set(r["test"]["click"])


@pytest.mark.parametrize("args, message", [
    (["compare", "--dataset", "synthetic", "--models", "mmoe,mmeo"], "unknown model 'mmeo'"),
    (["compare", "--dataset", "nope", "--models", "mmoe"], "unknown dataset 'nope'"),
    (["train", "--config", "missing.yaml", "--out", "x"], "config file missing.yaml does not exist"),
    (["compare", "--dataset", "synthetic", "--tasks", "click,clikc", "--models", "mmoe"], "clikc"),
    (["compare", "--dataset", "synthetic", "--models", "mmoe", "--model-option", "mmoe.experts=3"],
     "has no option"),
    (["compare", "--dataset", "synthetic", "--models", "mmoe", "--bias-init", "high"], "--bias-init must be"),
    (["compare", *SMALL, "--models", "mmoe", "--bias-init", "0.5"], "1 values for 3 tasks"),
])
def test_user_errors_are_one_line_without_traceback(args, message, tmp_path):
    proc = run_cli(*args, "--cache-dir", str(tmp_path)) if args[0] != "train" else run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_config_with_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: synthetic\nmodel: mmoe\ntrain: {epochs: 1, lerning_rate: 0.1}\n")
    proc = run_cli("train", "--config", str(path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "lerning_rate" in proc.stderr


def test_a_run_is_replaced_only_with_overwrite_and_resumed_only_with_its_settings(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *SMALL, "--cache-dir", str(tmp_path / "cache"), "--model", "shared_bottom", "--out", str(run)]
    assert main(args) == 0
    first = (run / "metrics.json").read_bytes()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (run / "metrics.json").read_bytes() == first
    # more epochs is a setting a resumed run may change; it is recorded in metrics.json
    assert main([*args, "--resume", "--epochs", "2"]) == 0
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["epochs"] == 2 and resumed["config"]["train"]["epochs"] == 2
    assert main([*args, "--seed", "5", "--overwrite"]) == 0
    replaced = json.loads((run / "metrics.json").read_text())
    assert replaced["epochs"] == 1 and replaced["config"]["train"]["seed"] == 5
