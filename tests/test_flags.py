"""Flag values: read as YAML 1.2, so a documented string value that reads like a YAML 1.1 boolean (off, no, on, yes)
is taken as written; ``--set`` reaches any config key and is checked like a config file; a value that is no YAML
ends in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from onerank import cli
from onerank.data.schema import SchemaError, load_yaml
from onerank.data.tabular import _parse_scalar
from onerank.models.base import build_config
from onerank.training.config import RunConfig


def run_config(*argv: str) -> RunConfig:
    return cli._run_config(cli.build_parser().parse_args(["train", "--out", "x", *argv]))


def model_options(*items: str) -> dict:
    return cli._key_values(list(items), "--model-option")


@pytest.mark.parametrize("text, value", [
    ("off", "off"), ("no", "no"), ("on", "on"), ("yes", "yes"), ("y", "y"), ("n", "n"), ("Off", "Off"),
    ("true", True), ("false", False), ("none", "none"), ("null", None), ("010", 10), ("1e-3", 0.001),
    ("1:30", "1:30"), ("[1, 2]", [1, 2]), ("{a: off}", {"a": "off"}),
])
def test_values_are_read_as_yaml_1_2(text, value):
    assert load_yaml(text) == value
    assert cli._key_values([f"k={text}"], "--dataset-option") == {"k": value}
    assert _parse_scalar(text) == value


# Every documented string option whose value reads like a YAML 1.1 boolean (or null), as a user passes it.
@pytest.mark.parametrize("model, option, value", [
    ("onerank", "contextualization", "off"),
    ("onerank", "task_item_embedding", "off"),
    ("onerank", "cross_task", "none"),
])
def test_model_options_that_read_like_booleans_stay_strings(model, option, value):
    config = build_config(model, model_options(f"{option}={value}"))
    assert getattr(config, option) == value


@pytest.mark.parametrize("setting, attribute, value", [
    ("train.streaming=off", "streaming", "off"),
    ("train.streaming=on", "streaming", "on"),
    ("train.lr_schedule=none", "lr_schedule", "none"),
])
def test_train_settings_that_read_like_booleans_stay_strings(setting, attribute, value):
    assert getattr(run_config("--set", setting).train, attribute) == value


def test_a_yaml_config_keeps_off_as_written(tmp_path):
    (tmp_path / "c.yaml").write_text("model: onerank\nmodel_options: {contextualization: off}\n"
                                     "train: {streaming: off, progress: no_such_bool}\n")
    with pytest.raises(SchemaError, match="progress"):
        RunConfig.from_yaml(tmp_path / "c.yaml")  # 'no_such_bool' is no boolean: named, not guessed
    (tmp_path / "c.yaml").write_text("model: onerank\nmodel_options: {contextualization: off}\n"
                                     "train: {streaming: off, progress: false}\n")
    config = RunConfig.from_yaml(tmp_path / "c.yaml")
    assert config.model_options["contextualization"] == "off" and config.train.streaming == "off"
    assert config.train.progress is False


def test_set_reaches_any_config_key():
    config = run_config("--set", "train.weight_decay=0.01", "--set", "train.grad_clip=null",
                        "--set", "train.lr_schedule=cosine", "--set", "objective.listwise=0.2",
                        "--set", "model_options.dim=16", "--set", "dataset_options.num_users=50",
                        "--set", "weighting=uncertainty", "--epochs", "3")
    assert config.train.weight_decay == 0.01 and config.train.grad_clip is None
    assert config.train.lr_schedule == "cosine" and config.train.epochs == 3
    assert config.objective["listwise"] == 0.2 and config.model_options == {"dim": 16}
    assert config.dataset_options["num_users"] == 50 and config.weighting == "uncertainty"


@pytest.mark.parametrize("setting, culprits", [
    ("train.weight_decay=-1", ["weight_decay"]),
    ("train.weight_decay=lots", ["weight_decay", "lots"]),
    ("train.wieght_decay=0.1", ["wieght_decay", "weight_decay"]),
    ("trian.lr=0.1", ["trian"]),
    ("train.lr_schedule=linear", ["lr_schedule", "linear"]),
    ("objective.listwise=-1", ["listwise"]),
    ("objective.lisstwise=1", ["lisstwise"]),
    ("dataset.name=x", ["dataset"]),
    ("train.epochs", ["KEY=VALUE"]),
])
def test_a_bad_setting_ends_in_one_line(setting, culprits, capsys):
    code = cli.main(["train", "--set", setting, "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for culprit in culprits:
        assert culprit in err


@pytest.mark.parametrize("flag", ["--model-option", "--dataset-option", "--set"])
def test_a_value_that_is_no_yaml_ends_in_one_line(flag):
    value = "num_experts=[1,2" if flag != "--set" else "model_options.num_experts=[1,2"
    proc = subprocess.run([sys.executable, "-m", "onerank", "train", "--model", "mmoe", flag, value, "--out", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "[1,2" in proc.stderr and flag in proc.stderr
