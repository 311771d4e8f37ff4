"""A corpus of bad inputs, as a new user would make them, across the command line, configs, data files, checkpoints
and the HTTP service. Each one must end with one line naming the culprit (exit code 2), or a 4xx naming the field,
and leave every file already on disk byte for byte as it was.

The command line runs in-process (``cli.main``) on a tiny synthetic dataset cached once, so the corpus stays fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from onerank.cli import main
from onerank.serving import Ranker, RequestLimits
from onerank.serving.app import create_app

SMALL = ["--dataset", "synthetic", "--dataset-option", "num_users=120", "--dataset-option", "num_items=90",
         "--dataset-option", "candidates_per_request=6", "--epochs", "1", "--batch-size", "256", "--no-progress"]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` -> the SHA-256 of its bytes (and every folder, so that none appears or vanishes)."""
    seen: dict[str, str] = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for p in paths:
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return seen


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, capsys.readouterr().err


def expect_error(capsys, argv: list[str], *culprits: str, watch: tuple[Path, ...] = ()) -> str:
    """``onerank ARGV`` must exit 2 with one line naming each of ``culprits``, and change no file under ``watch``."""
    before = snapshot(*watch)
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for culprit in culprits:
        assert culprit in lines[0], f"{culprit!r} not in {lines[0]!r}"
    assert snapshot(*watch) == before, f"files changed by {argv}"
    return lines[0]


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    """A cache of the tiny synthetic dataset and a finished run (checkpoint.pt, last.pt, metrics.json) trained by
    the command line; every case checks that neither changes."""
    root = tmp_path_factory.mktemp("bad-inputs")
    cache = root / "cache"
    assert main(["train", *SMALL, "--cache-dir", str(cache), "--model", "mmoe", "--out", str(root / "run")]) == 0
    return root


@pytest.fixture
def cache(area) -> list[str]:
    return ["--cache-dir", str(area / "cache")]


@pytest.fixture
def run(area) -> Path:
    return area / "run"


# ---------------------------------------------------------------------------------------------------------------------
# Command line: flags and out dirs (CLI)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, culprits", [
    (["--epochs", "0"], ["--epochs", ">= 1"]),
    (["--epochs", "-1"], ["--epochs"]),
    (["--epochs", "ten"], ["--epochs", "'ten'"]),
    (["--patience", "-1"], ["--patience"]),
    (["--threads", "0"], ["--threads"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--lr", "-0.1"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--listwise", "-1"], ["--listwise"]),
    (["--seed", "-3"], ["--seed"]),
    (["--device", "bogus"], ["train.device", "bogus", "cpu"]),
    (["--model-option", "num_experts=many"], ["num_experts", "'many'"]),
    (["--model-option", "num_experts=-2"], ["num_experts", "negative"]),
    (["--model-option", "num_experts"], ["--model-option", "KEY=VALUE"]),
    (["--model-option", "experts=3"], ["experts", "options are"]),
    (["--model", "mmeo"], ["'mmeo'", "available"]),
    (["--tasks", "click,clikc"], ["clikc"]),
    (["--dataset-option", "num_usrs=5"], ["num_usrs"]),
    (["--weighting", "sometimes"], ["sometimes"]),
    (["--streaming", "maybe"], ["--streaming", "maybe"]),
    (["--precision", "fp16"], ["--precision", "fp16"]),
])
def test_bad_flags_of_train(flags, culprits, capsys, cache, area, tmp_path):
    argv = ["train", *SMALL, *cache, "--model", "mmoe", "--out", str(tmp_path / "new"), *flags]
    expect_error(capsys, argv, *culprits, watch=(area,))
    assert not (tmp_path / "new" / "checkpoint.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")
def test_cuda_on_a_machine_without_one(capsys, cache, area, tmp_path):
    expect_error(capsys, ["train", *SMALL, *cache, "--device", "cuda", "--out", str(tmp_path / "o")],
                 "'cuda'", "--device cpu", watch=(area,))


def test_an_out_dir_holding_a_run_is_refused(capsys, cache, run, area):
    message = expect_error(capsys, ["train", *SMALL, *cache, "--model", "mmoe", "--out", str(run)],
                           str(run), "--resume", "--overwrite", watch=(area,))
    assert "checkpoint.pt" in message


@pytest.mark.parametrize("flags, culprit", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"), (["--patience", "-1"], "--patience"),
    (["--threads", "0"], "--threads"), (["--weighting", "sometimes"], "sometimes"),
    (["--dataset-option", "num_users=-5"], "num_users"),
])
def test_bad_input_with_overwrite_never_touches_the_run_already_there(flags, culprit, capsys, cache, run, area):
    """--overwrite replaces a run only once every check has passed, right before training starts."""
    expect_error(capsys, ["train", *SMALL, *cache, "--model", "mmoe", "--out", str(run), "--overwrite", *flags],
                 culprit, watch=(area,))


def test_an_out_dir_that_is_a_file(capsys, cache, area, tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("notes")
    expect_error(capsys, ["train", *SMALL, *cache, "--out", str(target)], str(target), "is a file",
                 watch=(area, tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir(capsys, cache, area, tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        expect_error(capsys, ["train", *SMALL, *cache, "--out", str(target)], str(target), "writable",
                     watch=(area,))
    finally:
        target.chmod(0o700)


def test_a_cache_dir_that_is_a_file(capsys, area, tmp_path):
    target = tmp_path / "cache.txt"
    target.write_text("x")
    expect_error(capsys, ["train", *SMALL, "--cache-dir", str(target), "--out", str(tmp_path / "o")],
                 "--cache-dir", str(target), watch=(area, target))


@pytest.mark.parametrize("flags, culprits", [
    ([], ["last.pt", "drop --resume"]),
    (["--overwrite"], ["--resume and --overwrite"]),
])
def test_resume_without_a_run_or_with_overwrite(flags, culprits, capsys, cache, area, tmp_path):
    target = tmp_path / "empty" if not flags else area / "run"
    expect_error(capsys, ["train", *SMALL, *cache, "--model", "mmoe", "--out", str(target), "--resume", *flags],
                 *culprits, watch=(area,))


@pytest.mark.parametrize("flags, culprits", [
    (["--lr", "0.5"], ["train.lr", "0.5"]),
    (["--seed", "99"], ["train.seed", "99"]),
    (["--model", "ple"], ["model", "'ple'"]),
    (["--dataset-option", "num_items=95"], ["dataset_options"]),
    (["--weighting", "uncertainty"], ["weighting"]),
])
def test_resume_with_other_settings_is_refused(flags, culprits, capsys, cache, run, area):
    expect_error(capsys, ["train", *SMALL, *cache, "--model", "mmoe", "--out", str(run), "--resume", *flags],
                 "--resume", *culprits, watch=(area,))


@pytest.mark.parametrize("argv, culprits", [
    (["compare", "--models", "mmoe", "--output", "{tmp}/missing/cmp.json"], ["--output", "missing"]),
    (["compare", "--models", "mmoe", "--output", "{tmp}"], ["--output", "is a folder"]),
    (["compare", "--models", " , "], ["--models names no model"]),
    (["compare", "--models", "mmoe", "--model-option", "experts=3"], ["MODEL.KEY=VALUE", "experts"]),
    (["compare", "--models", "mmoe", "--model-option", "mmoe.experts=3"], ["experts", "has no option"]),
    (["compare", "--models", "mmoe", "--dataset", "nope"], ["'nope'"]),
])
def test_bad_compare_commands(argv, culprits, capsys, cache, area, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    expect_error(capsys, [argv[0], *SMALL, *cache, *argv[1:]], *culprits, watch=(area, tmp_path))


@pytest.mark.parametrize("argv, culprits", [
    (["serve", "--checkpoint", "{run}/checkpoint.pt", "--port", "70000"], ["--port", "65535"]),
    (["serve", "--checkpoint", "{run}/checkpoint.pt", "--workers", "0"], ["--workers"]),
    (["serve", "--checkpoint", "{run}/checkpoint.pt", "--max-candidates", "0"], ["--max-candidates"]),
    (["serve", "--checkpoint", "{run}/checkpoint.pt", "--chunk-size", "-5"], ["--chunk-size"]),
    (["serve", "--checkpoint", "{run}/checkpoint.pt", "--max-body-mb", "0"], ["--max-body-mb"]),
    (["serve", "--checkpoint", "{run}/checkpoint.pt", "--weight", "clik=1"], ["clik"]),
    (["serve", "--checkpoint", "{run}/checkpoint.pt", "--backend", "onnx", "--onnx", "{run}/nothing.onnx"],
     ["nothing.onnx", "onerank export"]),
    (["export", "--checkpoint", "{run}/checkpoint.pt", "--format", "onnx", "--out", "{run}/no/such/m.onnx"],
     ["--out", "does not exist"]),
    (["export", "--checkpoint", "{run}/checkpoint.pt", "--format", "tflite"], ["--format", "tflite"]),
    (["export-encoded", *SMALL, "--out", "{run}/enc", "--rows-per-file", "0"], ["--rows-per-file"]),
    (["benchmark", "--suite", "no_such_suite"], ["no_such_suite"]),
    (["benchmark", "--suite", "smoke", "--seeds", "0"], ["--seeds"]),
    (["evaluate", "--checkpoint", "{run}/checkpoint.pt", "--split", "holdout"], ["--split", "holdout"]),
    (["train", "--out", "{run}", "--dataset", "synthetic", "--config"], ["--config"]),
])
def test_bad_serve_export_and_other_commands(argv, culprits, capsys, run, area):
    argv = [a.replace("{run}", str(run)) for a in argv]
    expect_error(capsys, argv, *culprits, watch=(area,))


# ---------------------------------------------------------------------------------------------------------------------
# Run configs (YAML)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, culprits", [
    ("train: {epochs: ten}", ["train.epochs", "'ten'"]),
    ("train: {epochs: 0}", ["train.epochs", "greater than or equal to 1"]),
    ("train: {lr: -1}", ["train.lr"]),
    ("train: {lr: abc}", ["train.lr", "'abc'"]),
    ("train: {patience: 0}", ["train.patience"]),
    ("train: {threads: 0}", ["train.threads"]),
    ("train: {device: gpu0}", ["train.device", "gpu0"]),
    ("train: {precision: fp16}", ["train.precision", "fp16"]),
    ("train: {streaming: maybe}", ["train.streaming"]),
    ("train: {lr_schedule: linear}", ["train.lr_schedule", "linear"]),
    ("train: {lerning_rate: 0.1}", ["lerning_rate", "valid"]),
    ("train: 3", ["'train'", "mapping"]),
    ("train: {epochs: 1\nmodel: [", ["not valid YAML", "line"]),
    ("- dataset: synthetic", ["mapping"]),
    ("modle: mmoe", ["modle"]),
    ("objective: {temperature: 0}", ["objective.temperature"]),
    ("objective: {listwise: -0.5}", ["objective.listwise"]),
    ("objective: {listwse: 1}", ["listwse"]),
    ("model: mmoe\nmodel_options: {num_experts: lots}", ["num_experts", "'lots'"]),
    ("dataset_options: [1, 2]", ["dataset_options"]),
])
def test_bad_run_configs(text, culprits, capsys, cache, area, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    expect_error(capsys, ["train", "--config", str(path), *cache, "--out", str(tmp_path / "o")], *culprits,
                 watch=(area, path))


def test_a_config_path_that_is_a_folder_or_missing(capsys, tmp_path, area):
    expect_error(capsys, ["train", "--config", str(tmp_path), "--out", str(tmp_path / "o")], str(tmp_path), "folder",
                 watch=(area,))
    expect_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")],
                 "nope.yaml", "does not exist", watch=(area,))


def test_yaml_strings_that_are_numbers_are_read_as_numbers(tmp_path):
    """PyYAML reads `1e-3` as a string; it is a learning rate all the same (rightly accepted, converted)."""
    from onerank.training.config import RunConfig

    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 1e-3, epochs: '2'}\nobjective: {temperature: '0.5'}\n")
    config = RunConfig.from_yaml(path)
    assert config.train.lr == 0.001 and config.train.epochs == 2 and config.objective == {"temperature": 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# Data files and schemas (tabular loader)
# ---------------------------------------------------------------------------------------------------------------------
SCHEMA = """files: {data: data.csv}
split: {method: fraction, by: row, valid_fraction: 0.2, test_fraction: 0.2}
user_id: user
item_id: item
categorical: [{name: user, group: user}, {name: item, group: item}]
dense: [{name: price, group: item}]
tasks: [click]
"""


def shop_frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"user": rng.integers(0, 20, n), "item": rng.integers(0, 30, n),
                         "price": rng.gamma(2.0, 10.0, n).round(2), "click": rng.integers(0, 2, n)})


def _tabular(tmp_path: Path, frame: pd.DataFrame, schema: str = SCHEMA) -> list[str]:
    frame.to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "s.yaml").write_text(schema)
    return ["train", "--dataset", "tabular", "--data-dir", str(tmp_path), "--dataset-option",
            f"schema={tmp_path / 's.yaml'}", "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--no-progress", "--model", "mmoe", "--out", str(tmp_path / "out")]


def _with(column: str, row: int, value) -> pd.DataFrame:
    frame = shop_frame()
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    return frame


@pytest.mark.parametrize("frame, culprits", [
    (_with("click", 5, "yes"), ["'click'"]),
    (_with("click", 7, 2), ["'click'", "2"]),
    (_with("click", 3, None), ["'click'", "NaN"]),
    (_with("price", 5, "inf"), ["'price'", "infinite"]),
    (_with("price", 9, "-inf"), ["'price'", "infinite"]),
    (_with("price", 4, None), ["'price'", "fill_value"]),
    (_with("price", 4, "cheap"), ["'price'", "numeric", "cheap"]),
    (_with("item", 2, -4), ["'item'", "negative"]),
    (_with("item", 2, 3.5), ["'item'", "non-integer"]),
    (shop_frame().drop(columns="price"), ["missing column 'price'"]),
    (shop_frame().rename(columns={"click": "Click"}), ["missing column 'click'"]),
])
def test_bad_data_files(frame, culprits, capsys, tmp_path, area):
    argv = _tabular(tmp_path, frame)
    expect_error(capsys, argv, *culprits, watch=(area, tmp_path / "data.csv", tmp_path / "s.yaml"))
    assert not (tmp_path / "out" / "checkpoint.pt").exists() and not list((tmp_path / "cache").glob("*/manifest.json"))


@pytest.mark.parametrize("old, new, culprits", [
    ("dense: [{name: price, group: item}]", "dense: price", ["dense", "list", "[price]"]),
    ("dense: [{name: price, group: item}]", "dense: [{name: price, group: item, log1p: sometimes}]",
     ["dense[0]", "log1p", "'sometimes'"]),
    ("dense: [{name: price, group: item}]", "dense: [{name: price, group: shop}]", ["dense[0]", "group", "'shop'"]),
    ("dense: [{name: price, group: item}]", "dense: [{name: price, fill: 0}]", ["dense[0]", "fill"]),
    ("dense: [{name: price, group: item}]", "dense: [{name: price, fill_value: .nan}]", ["fill_value"]),
    ("tasks: [click]", "tasks: [{name: click, kind: ranking}]", ["tasks[0]", "kind", "'ranking'"]),
    ("tasks: [click]", "tasks: [{name: click, weight: -1}]", ["tasks[0]", "weight"]),
    ("tasks: [click]", "tasks: []", ["no task"]),
    ("item_id: item", "item_id: [item]", ["item_id"]),
    ("tasks: [click]", "tasks: [click]\nsequences: [{name: seen, max_len: twenty}]", ["max_len", "'twenty'"]),
    ("tasks: [click]", "tasks: [click]\nsequences: [{name: seen, max_len: 0}]", ["max_len"]),
    ("tasks: [click]", "tasks: [click\n", ["not valid YAML", "line"]),
    ("tasks: [click]", "tasks: [click]\ncolour: red", ["colour"]),
    ("files: {data: data.csv}", "files: {data: dat.csv}", ["dat.csv", "does not exist"]),
])
def test_bad_schemas(old, new, culprits, capsys, tmp_path, area):
    argv = _tabular(tmp_path, shop_frame(), SCHEMA.replace(old, new))
    expect_error(capsys, argv, *culprits, watch=(area, tmp_path / "data.csv", tmp_path / "s.yaml"))


def test_a_validation_split_without_a_metric_writes_no_checkpoint(capsys, tmp_path, area):
    """Every validation label is 0: no AUC, so no epoch can be chosen as the best. The run says so and fails,
    instead of printing "wrote checkpoint.pt" without writing one."""
    frame = shop_frame(300)
    argv = _tabular(tmp_path, frame, SCHEMA.replace("files: {data: data.csv}", "files: {train: data.csv, valid: "
                                                    "valid.csv, test: data.csv}"))
    frame.assign(click=0).to_csv(tmp_path / "valid.csv", index=False)
    expect_error(capsys, argv, "no epoch gave a finite validation auc", "no checkpoint was written",
                 watch=(area, tmp_path / "data.csv", tmp_path / "valid.csv"))
    assert not (tmp_path / "out" / "checkpoint.pt").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_a_diverging_run_fails_loudly_instead_of_claiming_success(capsys, cache, area, tmp_path):
    """A learning rate far too large: the losses become inf / NaN within a few steps. The run stops there with an
    error naming the task and the fix, and writes no checkpoint and no metrics."""
    out = tmp_path / "diverged"
    expect_error(capsys, ["train", *SMALL, *cache, "--model", "mmoe", "--lr", "1e30", "--out", str(out)],
                 "loss is", "training diverged", "lower the learning rate", watch=(area,))
    assert not [p.name for p in out.iterdir() if p.name in ("checkpoint.pt", "last.pt", "metrics.json")]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: damaged, foreign, not the expected kind
# ---------------------------------------------------------------------------------------------------------------------
def _bad_checkpoint(kind: str, run: Path, folder: Path) -> Path:
    path = folder / "checkpoint.pt"
    good = (run / "checkpoint.pt").read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "json":
        path.write_text(json.dumps({"model": "mmoe"}))
    elif kind == "text":
        path.write_text("these are my notes\n")
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    elif kind == "foreign":
        torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "resume_state":
        shutil.copy(run / "last.pt", path)
    else:
        state = torch.load(run / "checkpoint.pt", weights_only=False)
        if kind == "newer":
            state["onerank_version"] = "9.0.0"
        elif kind == "unknown_model":
            state["meta"]["model"] = "hydranet"
        elif kind == "other_weights":
            state["model"] = {k + "_x": v for k, v in state["model"].items()}
        elif kind == "no_meta":
            del state["meta"]
        torch.save(state, path)
    return path


CHECKPOINT_CASES = [
    ("truncated", ["truncated"]), ("empty", ["empty"]), ("random", ["not a readable checkpoint"]),
    ("json", ["JSON"]), ("text", ["text file"]), ("torchscript", ["TorchScript"]),
    ("foreign", ["not an onerank checkpoint", "state_dict"]), ("folder", ["is a folder"]),
    ("resume_state", ["resumable state", "not a model checkpoint"]), ("newer", ["9.0.0", "upgrade"]),
    ("unknown_model", ["hydranet"]), ("other_weights", ["weights do not fit"]), ("no_meta", ["not an onerank"]),
]


@pytest.mark.parametrize("kind, culprits", CHECKPOINT_CASES)
def test_bad_checkpoints_for_evaluate(kind, culprits, capsys, run, area, cache, tmp_path):
    path = _bad_checkpoint(kind, run, tmp_path)
    expect_error(capsys, ["evaluate", "--checkpoint", str(path), *cache], str(path), *culprits,
                 watch=(area, tmp_path))


@pytest.mark.parametrize("command", [["export", "--format", "pt2"], ["serve", "--port", "0"]])
@pytest.mark.parametrize("kind", ["truncated", "random", "torchscript"])
def test_bad_checkpoints_for_export_and_serve(command, kind, capsys, run, area, tmp_path):
    path = _bad_checkpoint(kind, run, tmp_path)
    expect_error(capsys, [command[0], "--checkpoint", str(path), *command[1:]], str(path), watch=(area, tmp_path))


class _CreatesAFile:
    """What a crafted pickle does: unpickling it calls a function of its choice (here: create a file)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


def _crafted(run: Path, folder: Path, name: str, marker: Path) -> Path:
    """An onerank checkpoint (header, weights, metadata) whose metadata carries a payload that creates ``marker``."""
    state = torch.load(run / name, weights_only=True)
    state["meta"]["dataset"] = _CreatesAFile(marker)
    path = folder / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize("command", [
    ["evaluate"], ["serve", "--port", "0"], ["export", "--format", "onnx"], ["export", "--format", "pt2"],
    ["fuse", "--value", "order"],
])
def test_a_crafted_checkpoint_runs_nothing(command, capsys, run, area, cache, tmp_path):
    """Every command that reads a checkpoint refuses a crafted pickle in one line, and nothing of it runs."""
    marker = tmp_path / "pwned"
    path = _crafted(run, tmp_path, "checkpoint.pt", marker)
    line = expect_error(capsys, [command[0], "--checkpoint", str(path), *command[1:]], str(path), "refused",
                        "it names", watch=(area,))
    assert not marker.exists(), line


def test_a_crafted_resumable_state_runs_nothing(capsys, run, cache, area, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "pwned"
    _crafted(run, copy, "last.pt", marker)
    expect_error(capsys, ["train", *SMALL, *cache, "--model", "mmoe", "--out", str(copy), "--resume"],
                 "last.pt", "refused", watch=(area, copy))
    assert not marker.exists()


def test_a_crafted_checkpoint_runs_nothing_from_python(run, tmp_path):
    from onerank import api
    from onerank.training.checkpoint import CheckpointError

    marker = tmp_path / "pwned"
    path = _crafted(run, tmp_path, "checkpoint.pt", marker)
    for load in (api.load_checkpoint, Ranker):
        with pytest.raises(CheckpointError, match="refused"):
            load(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind, culprits", [("truncated", ["truncated"]), ("random", ["not a readable"]),
                                            ("other_weights", ["weights do not fit"])])
def test_damaged_resumable_state(kind, culprits, capsys, run, cache, area, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    good = (run / "last.pt").read_bytes()
    if kind == "truncated":
        (copy / "last.pt").write_bytes(good[: len(good) // 3])
    elif kind == "random":
        (copy / "last.pt").write_bytes(np.random.default_rng(1).bytes(2048))
    else:
        state = torch.load(run / "last.pt", weights_only=False)
        state["model"] = {k: v[..., :1] if v.ndim else v for k, v in state["model"].items()}
        torch.save(state, copy / "last.pt")
    expect_error(capsys, ["train", *SMALL, *cache, "--model", "mmoe", "--out", str(copy), "--resume"],
                 "last.pt", *culprits, watch=(area, copy))


def test_a_checkpoint_evaluated_on_other_data_is_refused(capsys, tmp_path, area):
    """The checkpoint's vocabularies were fitted on other data than --data-dir holds now: its metrics on that data
    would score ids under codes they were never trained with."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(_tabular(tmp_path / "a", shop_frame())) == 0
    shutil.copy(tmp_path / "a" / "s.yaml", tmp_path / "b" / "s.yaml")
    shop_frame().assign(item=lambda f: f["item"] + 100).to_csv(tmp_path / "b" / "data.csv", index=False)
    checkpoint = tmp_path / "a" / "out" / "checkpoint.pt"
    expect_error(capsys, ["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "b"),
                          "--cache-dir", str(tmp_path / "cache")],
                 str(checkpoint), "vocabularies", "--data-dir", watch=(area, tmp_path / "a"))


def test_an_export_of_another_checkpoint_is_refused(capsys, run, area, tmp_path):
    """The ONNX file next to a checkpoint was made from an earlier one (the run was trained again since): refused,
    not served under the new checkpoint's version."""
    pytest.importorskip("onnxruntime")
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run / "checkpoint.pt", copy / "checkpoint.pt")
    assert main(["export", "--checkpoint", str(copy / "checkpoint.pt"), "--format", "onnx"]) == 0
    state = torch.load(copy / "checkpoint.pt", weights_only=False)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, copy / "checkpoint.pt")  # "retrained"
    expect_error(capsys, ["serve", "--checkpoint", str(copy / "checkpoint.pt"), "--backend", "onnx"],
                 "checkpoint.onnx", "another checkpoint", "onerank export", watch=(area, copy))


# ---------------------------------------------------------------------------------------------------------------------
# HTTP: malformed requests get a 4xx naming the field, and the service keeps serving
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    from fastapi.testclient import TestClient

    ranker = Ranker(tiny_checkpoint("mmoe"), limits=RequestLimits(max_candidates=20, max_history=30))
    with TestClient(create_app(ranker, workers=1, max_body_bytes=20_000)) as test_client:
        test_client.example = ranker.example_request(3)
        yield test_client


def _request(client, change) -> dict:
    body = json.loads(json.dumps(client.example))
    change(body)
    return body


def _set(path: tuple, value):
    def change(body):
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


HTTP_CASES = [
    ("dense NaN", _set(("candidates", 0, "price"), math.nan), 422, ["candidates", 0, "price"]),
    ("dense infinity", _set(("candidates", 1, "price"), math.inf), 422, ["candidates", 1, "price"]),
    ("dense true", _set(("candidates", 0, "price"), True), 422, ["candidates", 0, "price"]),
    ("dense string", _set(("candidates", 2, "price"), "cheap"), 422, ["candidates", 2, "price"]),
    ("item id true", _set(("candidates", 1, "item_id"), True), 422, ["candidates", 1, "item_id"]),
    ("item id fraction", _set(("candidates", 0, "item_id"), 1.5), 422, ["candidates", 0, "item_id"]),
    ("item id missing", lambda b: b["candidates"][0].pop("item_id"), 422, ["candidates", 0, "item_id"]),
    ("item id a list", _set(("candidates", 0, "item_id"), [1, 2]), 422, ["candidates", 0, "item_id"]),
    ("no candidates", _set(("candidates",), []), 422, ["candidates"]),
    ("candidates missing", lambda b: b.pop("candidates"), 422, ["candidates"]),
    ("candidates not a list", _set(("candidates",), {"item_id": 1}), 422, ["candidates"]),
    ("unknown user field", _set(("user", "age"), 30), 422, ["user", "age"]),
    ("user field missing", lambda b: b["user"].pop("user_id"), 422, ["user", "user_id"]),
    ("unknown candidate field", _set(("candidates", 0, "colour"), "red"), 422, ["candidates", 0, "colour"]),
    ("unknown sequence", _set(("histories", "bought"), [1, 2]), 422, ["histories", "bought"]),
    ("history item true", _set(("histories", "clicked"), [3, True]), 422, ["histories", "clicked"]),
    ("history not a list", _set(("histories", "clicked"), 7), 422, ["histories", "clicked"]),
    ("history too long", _set(("histories", "clicked"), list(range(31))), 413, ["histories", "clicked"]),
    ("too many candidates", _set(("candidates",), [{"item_id": i} for i in range(21)]), 413, ["candidates"]),
    ("top_k zero", _set(("top_k",), 0), 422, ["top_k"]),
    ("fusion unknown task", _set(("fusion",), {"weights": {"clik": 1.0}}), 422, ["fusion"]),
    ("fusion bad kind", _set(("fusion",), {"kind": "max"}), 422, ["fusion", "kind"]),
    ("fusion all zero", _set(("fusion",), {"weights": {"click": 0.0}}), 422, ["fusion"]),
    ("unknown top-level key", _set(("extra",), 1), 422, ["extra"]),
    ("user a list", _set(("user",), [1]), 422, ["user"]),
]


@pytest.mark.parametrize("name, change, status, loc", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_requests_get_a_4xx_naming_the_field(name, change, status, loc, client, tiny_checkpoint):
    checkpoint = tiny_checkpoint("mmoe")
    before = snapshot(checkpoint)
    body = json.dumps(_request(client, change), allow_nan=True)
    response = client.post("/rank", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert any([p for p in d["loc"] if p != "body"][: len(loc)] == loc for d in detail), (loc, detail)
    assert client.get("/healthz").status_code == 200
    assert snapshot(checkpoint) == before


@pytest.mark.parametrize("body, status", [
    (b"{not json", 422), (b"[1, 2, 3]", 422), (b"", 422), (b'{"candidates": [' + b'{"item_id": 1},' * 2000 + b"]}", 413),
])
def test_malformed_bodies(body, status, client):
    response = client.post("/rank", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"
    assert client.get("/healthz").status_code == 200
