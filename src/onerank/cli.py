"""The `onerank` command: parse, then call the library (onerank.api). User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

import onerank
from onerank.data.schema import SchemaError, load_yaml
from onerank.resources import MissingExtra, require, shipped
from onerank.training.config import RunConfig

USER_ERRORS = (SchemaError, FileNotFoundError, ValueError, KeyError, MissingExtra)


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one line naming the flag, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, inclusive: bool = True, high: float | None = None):
    """An argparse type: a ``kind`` number within [low, high] (or (low, high] when not ``inclusive``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or (value < low if inclusive else value <= low) or (
                high is not None and value > high):
            bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
POSITIVE_FLOAT = _number(float, 0, inclusive=False)
NON_NEGATIVE_FLOAT = _number(float, 0)
PORT = _number(int, 0, high=65535)


def _existing_parent(path: str, flag: str) -> Path:
    """An output file whose folder must exist (a typo in it should not create a new folder tree)."""
    out = Path(path)
    if out.is_dir():
        raise SchemaError(f"{flag} {out} is a folder; give a file path")
    if not out.parent.is_dir():
        raise SchemaError(f"{flag} {out}: folder {out.parent} does not exist; create it first or fix the path")
    return out


def _list(module: str, registry: str) -> int:
    """Print the names of a plug-in registry (its map only: no plug-in is imported)."""
    import importlib

    print("\n".join(getattr(importlib.import_module(module), registry).names()))
    return 0


def _parse_value(text: str, flag: str, key: str) -> Any:
    """A flag's value as YAML 1.2 (``off`` and ``no`` stay strings, ``true`` / ``false`` are booleans, ``[1, 2]`` a
    list); a value that is not YAML ends with one line naming the flag."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SchemaError(f"{flag} {key}={text!r} is not a valid value ({problem}); write a list as [a, b], a mapping "
                          "as {a: 1}, and quote a string that holds such brackets") from None


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SchemaError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value, flag, key.strip())
    return out


# RunConfig fields that hold free-form mappings: --set reaches any key inside them (checked where they are used)
OPEN_MAPPINGS = ("dataset_options", "model_options", "objective", "weighting_options")


def apply_settings(config: RunConfig, items: list[str] | None) -> RunConfig:
    """``--set KEY.PATH=VALUE`` over a config (``train.weight_decay=0.01``, ``objective.listwise=0.1``,
    ``model_options.dim=16``, ``dataset=census``), then checked like a config file: an unknown key, a wrong type or
    an out-of-range value ends with one line naming it."""
    raw = config.to_dict()
    for key, value in _key_values(items, "--set").items():
        path = key.split(".")
        if path[0] not in raw:
            raise SchemaError(f"--set {key}: no config key {path[0]!r}; expected one of {sorted(raw)}")
        target = raw
        for i, part in enumerate(path[:-1]):
            if not isinstance(target.get(part), dict):
                if part not in target and path[0] in OPEN_MAPPINGS:
                    target[part] = {}
                else:
                    raise SchemaError(f"--set {key}: {'.'.join(path[:i + 1])} holds no settings of its own")
            target = target[part]
        if path[0] == "train" and len(path) == 2 and path[1] not in target:
            raise SchemaError(f"--set {key}: no train setting {path[1]!r}; expected one of {sorted(target)}")
        target[path[-1]] = value
    return RunConfig.from_dict(raw)


def _bias_init(text: str) -> str | list[float]:
    if text in ("auto", "zero"):
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--bias-init must be auto, zero or comma-separated numbers (one per task), got {text!r}") from None


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config; flags given here override it")
    p.add_argument("--dataset", help="dataset name (synthetic, census, kuairand, tabular)")
    p.add_argument("--data-dir", help="folder holding the dataset's files")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="loader option (repeatable)")
    p.add_argument("--tasks", help="comma-separated task subset, passed to the loader")
    p.add_argument("--epochs", type=POSITIVE_INT)
    p.add_argument("--batch-size", type=POSITIVE_INT)
    p.add_argument("--lr", type=POSITIVE_FLOAT)
    p.add_argument("--seed", type=NON_NEGATIVE_INT)
    p.add_argument("--patience", type=POSITIVE_INT, help="epochs without improvement before stopping (>= 1)")
    p.add_argument("--weighting", help="task weighting strategy (fixed, equal, uncertainty, gradnorm, pcgrad, dwa)")
    p.add_argument("--listwise", type=NON_NEGATIVE_FLOAT, help="weight of the list-wise loss (needs request grouping)")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, help="temperature of the list-wise loss")
    p.add_argument("--listwise-reduction", choices=["requests", "positives"],
                   help="average the list-wise loss per request (default) or per positive")
    p.add_argument("--learn-temperature", action="store_true", help="learn the list-wise temperature (per task)")
    p.add_argument("--bias-init", metavar="auto|zero|V1,V2,...",
                   help="output biases at the start: training base-rate logits (auto, default), zero, or one value "
                        "per task in schema order")
    p.add_argument("--distill", metavar="PAIRS", help="cross-task distillation (CrossDistil, docs/distillation.md): "
                   "comma-separated target<-helper pairs, e.g. 'like<-long_view,long_view<-click'; 'none' turns it off")
    p.add_argument("--distill-weight", type=float, help="weight of each pair's distillation term (default 0.5)")
    p.add_argument("--distill-warmup", type=int, help="optimiser steps before distillation starts (default 10)")
    p.add_argument("--distill-option", action="append", metavar="KEY=VALUE",
                   help="another distillation option: ranking_weight, correction, hidden (repeatable)")
    p.add_argument("--gradient-diagnostics", action="store_true", help="log task-gradient cosines per epoch")
    p.add_argument("--tensorboard", action="store_true", help="log to TensorBoard under OUT/tensorboard "
                   "(the tracking extra)")
    p.add_argument("--mlflow", action="store_true", help="log an MLflow run: params, metrics, task weights, "
                   "metrics.json and checkpoint.pt (the tracking extra)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else OUT/mlruns); "
                   "implies --mlflow")
    p.add_argument("--mlflow-experiment", help="MLflow experiment name (default onerank); implies --mlflow")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--cache-dir", help="where preprocessed datasets are cached (default ~/.cache/onerank)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast forward and loss (docs/scaling.md)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--streaming", choices=["auto", "on", "off"], help="train from a Parquet stream of the train split")
    p.add_argument("--threads", type=POSITIVE_INT, help="torch intra-op threads per process")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config key, dotted (train.weight_decay=0.01, train.lr_schedule=cosine, "
                        "objective.listwise=0.1); applied after the other flags and checked like a config file "
                        "(repeatable)")
    p.add_argument("--embedding-tables", choices=["fused", "torchrec"],
                   help="torchrec: embedding tables sharded over the processes (extra onerank[torchrec]; docs/scaling.md)")
    p.add_argument("--sharding", choices=["auto", "table_wise", "column_wise", "row_wise"],
                   help="how TorchRec shards the tables (default: its planner's choice)")
    p.add_argument("--embedding-optimizer", choices=["adam", "adagrad"],
                   help="the embedding tables' optimiser (torchrec on CPU: adagrad)")


def _config_path(text: str) -> Path:
    """A config file; outside a checkout, ``configs/NAME.yaml`` is also looked up among the installed configs."""
    path = Path(text)
    if path.exists() or path.is_absolute():
        return path
    packaged = shipped("configs") / (path.relative_to("configs") if path.parts[:1] == ("configs",) else path)
    return packaged if packaged.exists() else path


def _run_config(args: argparse.Namespace) -> RunConfig:
    config = RunConfig.from_yaml(_config_path(args.config)) if args.config else RunConfig()
    if args.dataset:
        config.dataset = args.dataset
    if args.data_dir:
        config.data_dir = args.data_dir
    config.dataset_options.update(_key_values(args.dataset_option, "--dataset-option"))
    if args.tasks:
        config.dataset_options["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for flag, attr in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"),
                       ("patience", "patience"), ("device", "device"), ("precision", "precision"),
                       ("streaming", "streaming"), ("threads", "threads"),
                       ("embedding_tables", "embedding_tables"), ("sharding", "sharding"),
                       ("embedding_optimizer", "embedding_optimizer")):
        if getattr(args, flag) is not None:
            setattr(config.train, attr, getattr(args, flag))
    if args.gradient_diagnostics:
        config.train.gradient_diagnostics = True
    if args.tensorboard:
        config.train.tensorboard = True
    if args.mlflow or args.mlflow_uri or args.mlflow_experiment:
        config.train.mlflow = True
    if args.mlflow_uri:
        config.train.mlflow_uri = args.mlflow_uri
    if args.mlflow_experiment:
        config.train.mlflow_experiment = args.mlflow_experiment
    if args.compile:
        config.train.compile = True
    if args.no_progress:
        config.train.progress = False
    if args.weighting:
        config.weighting = args.weighting
    if args.listwise is not None:
        config.objective["listwise"] = args.listwise
    if args.temperature is not None:
        config.objective["temperature"] = args.temperature
    if args.listwise_reduction:
        config.objective["listwise_reduction"] = args.listwise_reduction
    if args.learn_temperature:
        config.objective["learn_temperature"] = True
    if args.bias_init:
        config.train.bias_init = _bias_init(args.bias_init)
    _distillation_flags(args, config)
    if args.cache_dir:
        config.cache_dir = args.cache_dir
    return apply_settings(config.validated(), args.set)


def _distillation_flags(args: argparse.Namespace, config: RunConfig) -> None:
    """--distill* flags over the config's ``objective.distillation`` (validated when the objective is built)."""
    from onerank.objectives.distillation import DistillationConfig

    if args.distill is not None and args.distill.strip().lower() == "none":
        config.objective["distillation"] = None
        return
    options = dict(config.objective.get("distillation") or {})
    if args.distill is not None:
        options["pairs"] = [p.strip() for p in args.distill.split(",") if p.strip()]
    for flag, key in (("distill_weight", "weight"), ("distill_warmup", "warmup_steps")):
        if getattr(args, flag) is not None:
            options[key] = getattr(args, flag)
    options.update(_key_values(args.distill_option, "--distill-option"))
    if options:
        config.objective["distillation"] = dataclasses.asdict(DistillationConfig.from_options(options))


def format_table(comparison: dict) -> str:
    """One row per model; per task AUC / GAUC / logloss on test, then throughput and size."""
    results = comparison["results"]
    if not results:
        return "(no results)"
    tasks = list(results[0]["test"])
    header = ["model"]
    for t in tasks:
        kind_metrics = ["auc", "gauc", "logloss"] if "auc" in results[0]["test"][t] else ["mse", "mae"]
        header += [f"{t}:{m}" for m in kind_metrics]
    header += ["epochs", "train_s", "samples/s", "params"]
    rows = []
    for r in results:
        row = [r["model"]]
        for t in tasks:
            for m in (["auc", "gauc", "logloss"] if "auc" in r["test"][t] else ["mse", "mae"]):
                v = r["test"][t].get(m, float("nan"))
                row.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}")
        row += [str(r["epochs"]), f"{r['train_seconds']:.1f}", f"{r['train_samples_per_s'] or 0:,.0f}",
                f"{r['params']:,}"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"dataset: {comparison['dataset']} (test split)", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def cmd_train(args: argparse.Namespace) -> int:
    from onerank import api

    config = _run_config(args)
    if args.model:
        config.model = args.model
    config.model_options.update(_key_values(args.model_option, "--model-option"))
    out = Path(args.out)
    result = api.train(config, out_dir=out, resume=args.resume, overwrite=args.overwrite)
    if _is_main_process():  # under torchrun every rank holds the same result; one prints it
        print(format_table({"dataset": result["dataset"], "results": [result]}))
        print(f"wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from onerank import api
    from onerank.training.trainer import write_json

    model_settings = [s for s in args.set or [] if s.split("=", 1)[0].split(".")[0] in ("model", "model_options")]
    if model_settings:
        raise SchemaError(f"--set {model_settings[0]}: compare takes its models from --models and their options "
                          "from --model-option MODEL.KEY=VALUE")
    config = _run_config(args)
    if args.output:
        _existing_parent(args.output, "--output")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise SchemaError("--models names no model")
    from onerank.models.base import build_config

    options: dict[str, dict] = {}
    for key, value in _key_values(args.model_option, "--model-option").items():
        model, _, option = key.partition(".")
        if not option:
            raise SchemaError(f"--model-option for compare is MODEL.KEY=VALUE, got {key!r}")
        if model not in models:
            raise SchemaError(f"--model-option {key}: model {model!r} is not in --models {models}")
        options.setdefault(model, {})[option] = value
    for m in models:
        build_config(m, options.get(m))  # a misspelled name or option fails before any training
    comparison = api.compare(config, models, options)
    if not _is_main_process():
        return 0
    print(format_table(comparison))
    if args.output:
        write_json(comparison, args.output)
        print(f"wrote {args.output}")
    return 0


def _is_main_process() -> bool:
    from onerank.training import distributed

    return distributed.info().is_main


def cmd_export_encoded(args: argparse.Namespace) -> int:
    from onerank import api
    from onerank.data.streaming import save_streaming_dataset

    config = _run_config(args)
    dataset = api.load_run_dataset(config)
    out = save_streaming_dataset(dataset, args.out, rows_per_file=args.rows_per_file,
                                 row_group_rows=args.row_group_rows)
    print(f"wrote {out}: {len(dataset.train)} train rows as Parquet; train with --dataset encoded --data-dir {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from onerank import api

    report = api.evaluate_checkpoint(args.checkpoint, split=args.split, data_dir=args.data_dir,
                                     cache_dir=args.cache_dir)
    print(json.dumps(report, indent=2, default=float))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    require("serve", "onerank serve", "fastapi", "uvicorn", "prometheus_client")
    from onerank.serving.app import serve

    serve(
        args.checkpoint, host=args.host, port=args.port, backend=args.backend, export_path=args.export_file,
        fusion=_fusion(args), chunk_size=args.chunk_size, max_candidates=args.max_candidates,
        max_history=args.max_history, max_body_bytes=args.max_body_mb * 2**20, workers=args.workers,
        threads=args.threads, fusion_file=False if args.no_fusion_file else args.fusion_file,
        max_queue=args.max_queue, retry_after_s=args.retry_after,
        graceful_timeout_s=args.graceful_timeout, device=args.device, precision=args.precision,
        processes=args.processes,
    )
    return 0


def _fusion(args: argparse.Namespace):
    """The --fusion / --weight override, or None: the checkpoint's fitted fusion, else uniform weights."""
    from onerank.serving import Fusion

    weights = {k: float(v) for k, v in _key_values(args.weight, "--weight").items()} or None
    if args.fusion is None and weights is None:
        return None
    return Fusion(args.fusion or "weighted_sum", weights)


def cmd_fuse(args: argparse.Namespace) -> int:
    from onerank import api
    from onerank.fusion.fit import FuseSettings, format_report

    if args.method == "batch-rl":
        return _fuse_batch_rl(args)
    if args.value is None:
        raise ValueError("--value is required with --method cma-es (what the fused ranking is judged by)")
    settings = FuseSettings(
        value=args.value, forms=tuple(f.strip() for f in args.forms.split(",") if f.strip()),
        calibration=None if args.calibration == "none" else args.calibration, k=args.k,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
        auc_tolerance=None if args.auc_tolerance < 0 else args.auc_tolerance,
        auc_weights={k: float(v) for k, v in _key_values(args.auc_weight, "--auc-weight").items()} or None,
        budget=args.budget, hidden=args.hidden, seed=args.seed, bootstrap=args.bootstrap,
        select_fraction=args.select_fraction,
    )
    report = api.fuse(args.checkpoint, settings, out_dir=args.out, fusion_path=args.fusion_file,
                      overwrite=args.overwrite, data_dir=args.data_dir, cache_dir=args.cache_dir)
    print(f"value {report['value']}, test split ({report['rows']['test']} rows, {report['rows']['test_users']} users, "
          f"{report['rows']['test_users_ranked']} with values to rank); "
          f"fitted on validation, served: {report['chosen']}")
    print(format_report(report))
    print(f"wrote {report['fusion_file']} and {Path(report['figures']['pareto']).parent}/"
          "{report.json,table.md,pareto.png,reliability.png}")
    return 0


def _fuse_batch_rl(args: argparse.Namespace) -> int:
    from onerank import api
    from onerank.fusion.batch_rl import BatchRLSettings

    if args.sessions is None:
        raise ValueError("--method batch-rl needs --sessions FILE (logged sessions, e.g. from onerank simulate)")
    settings = BatchRLSettings(algorithm=args.algorithm, steps=args.steps, seed=args.seed)
    report = api.fuse_batch_rl(args.checkpoint, args.sessions, settings, fusion_path=args.fusion_file,
                               overwrite=args.overwrite)
    print(f"{report['algorithm']} on {report['sessions']} logged sessions ({report['requests']} requests), "
          f"{report['steps']} steps")
    if "conservative_fqe" in report:
        fqe = report["conservative_fqe"]
        print(f"conservative FQE on the logs: policy {fqe['policy']:.3f}, logging policy's static fusion "
              f"{fqe['logging_centre']:.3f}")
    print(f"wrote {report['fusion_file']}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from onerank import api
    from onerank.simulator.experiment import SimulationSettings

    settings = SimulationSettings(response_model=args.response_model, target_depth=args.target_depth,
                                  random_share=args.random_share, noise=args.noise)
    report = api.simulate_sessions(args.checkpoint, args.out, sessions=args.sessions, settings=settings,
                                   seed=args.seed, overwrite=args.overwrite, data_dir=args.data_dir,
                                   cache_dir=args.cache_dir, fusion_file=args.fusion_file)
    print(f"logged {report['sessions']} sessions ({report['requests']} requests, mean return "
          f"{report['mean_return']:.2f}) over tasks {report['tasks']}; wrote {report['file']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from onerank.serving.export import export_checkpoint

    if args.out:
        _existing_parent(args.out, "--out")
    report = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"wrote {report.path} ({report.model}, {report.format}; max |diff| vs PyTorch on an example request: "
          f"{report.max_abs_diff:.1e})")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    require("bench", "onerank benchmark", "matplotlib", "scipy")
    from onerank.benchmarking import run_benchmark

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    flags = [("--seeds", args.seeds), ("--out", args.out), ("--models", args.models), ("--device", args.device),
             ("--workers", args.workers if args.workers != 1 else None)]
    command = " ".join([f"onerank benchmark --suite {args.suite}"] + [f"{f} {v}" for f, v in flags if v is not None]
                       + (["--no-ablations"] if args.no_ablations else []))
    result = run_benchmark(
        args.suite, out_dir=args.out, seeds=args.seeds, models=models, suites_dir=args.suites_dir,
        work_dir=args.work_dir, resume=args.resume, report_only=args.report_only, cache_dir=args.cache_dir,
        command=command, device=args.device, workers=args.workers,
        progress=lambda line: print(line, file=sys.stderr, flush=True), publish=args.publish,
        rerun=[m.strip() for m in args.rerun.split(",") if m.strip()] if args.rerun else None,
        ablations=not args.no_ablations,
    )
    print(result["report"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="onerank", description="Multi-task ranking for recommender systems")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    parser.add_argument("--version", action="version", version=f"onerank {onerank.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model; writes DIR/checkpoint.pt and DIR/metrics.json")
    _add_run_flags(p)
    p.add_argument("--model", help="model name (e.g. mmoe)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="model option (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (with the same settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (without it, an OUT holding a run is refused)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several models on the same data and print one table")
    _add_run_flags(p)
    p.add_argument("--models", required=True, help="comma-separated model names")
    p.add_argument("--model-option", action="append", metavar="MODEL.KEY=VALUE")
    p.add_argument("--output", help="write the comparison JSON here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a split of its dataset")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP: POST /rank, GET /model, /healthz, /readyz, /metrics")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "pt2"],
                   help="torch: the checkpoint's model; onnx, pt2: its export (onerank export)")
    p.add_argument("--export-file", "--onnx", dest="export_file", help="the export file of --backend onnx or pt2 "
                   "(default: next to the checkpoint, CHECKPOINT.onnx / .pt2)")
    p.add_argument("--fusion", choices=["weighted_sum", "product"],
                   help="how task predictions become one score (default: the checkpoint's fitted fusion from "
                   "`onerank fuse`, else weighted_sum)")
    p.add_argument("--weight", action="append", metavar="TASK=W", help="fusion weight of a task (repeatable; "
                   "default 1 for every task, 0 for tasks left out once one is given)")
    p.add_argument("--chunk-size", type=POSITIVE_INT, default=256,
                   help="candidates scored at a time (the scores do not depend on it)")
    p.add_argument("--max-candidates", type=POSITIVE_INT, default=4096, help="larger requests get 413")
    p.add_argument("--max-history", type=NON_NEGATIVE_INT, default=1000, help="longer histories get 413")
    p.add_argument("--max-body-mb", type=POSITIVE_FLOAT, default=8.0, help="larger request bodies get 413")
    p.add_argument("--workers", type=POSITIVE_INT, default=2, help="inference threads (requests scored at once)")
    p.add_argument("--threads", type=POSITIVE_INT,
                   help="intra-op threads per inference (default: the cores divided by workers x processes)")
    p.add_argument("--max-queue", type=NON_NEGATIVE_INT, default=8,
                   help="requests that may wait for a worker; past workers + max-queue in flight: 503 + Retry-After")
    p.add_argument("--retry-after", type=NON_NEGATIVE_INT, default=1, help="seconds in the Retry-After header of a 503")
    p.add_argument("--graceful-timeout", type=POSITIVE_FLOAT, default=30.0,
                   help="seconds the requests in flight get to finish after SIGTERM / SIGINT")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (an error where no GPU is present)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="torch backend: fp32, or bf16 autocast (matrix products in bfloat16)")
    p.add_argument("--processes", type=POSITIVE_INT, default=1,
                   help="server processes on the port, each with its own copy of the model (default 1)")
    p.add_argument("--fusion-file", help="fitted calibration + fusion (default: CHECKPOINT.fusion.json if present)")
    p.add_argument("--no-fusion-file", action="store_true", help="serve raw probabilities, ignore any fusion file")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("fuse", help="fit per-task calibration and a fusion of the tasks on validation against a value "
                       "column; evaluate once on test (docs/fusion.md)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--method", default="cma-es", choices=["cma-es", "batch-rl"],
                   help="cma-es: one static fusion fitted on validation (default); batch-rl: a fusion policy "
                   "(per-request weights from the session state) learned from logged sessions (docs/rl_fusion.md)")
    p.add_argument("--value", help="cma-es: what the fused ranking is judged by: a value column of the dataset "
                   "(kuairand: play_time_ms, long_view, duration_ms) or a task (synthetic: order)")
    p.add_argument("--sessions", help="batch-rl: logged sessions (.npz, from onerank simulate)")
    p.add_argument("--algorithm", default="bcq", choices=["bcq", "cql"], help="batch-rl: BCQ (default) or CQL (SAC)")
    p.add_argument("--steps", type=int, default=2000, help="batch-rl: gradient steps")
    p.add_argument("--forms", default="weighted_sum,product,monotone", help="fusion forms to fit; the one with the "
                   "best validation objective is written to the fusion file")
    p.add_argument("--calibration", default="platt", choices=["platt", "isotonic", "none"],
                   help="calibration the fusion and the ranker use (ECE is reported for both methods)")
    p.add_argument("--k", type=int, default=10, help="cut-off of value-NDCG@k")
    p.add_argument("--tasks", help="comma-separated tasks to fuse (default: all)")
    p.add_argument("--auc-tolerance", type=float, default=0.05, help="constraint: each task's validation GAUC of the "
                   "fused score stays within this of the task's own prediction's (negative: no constraint)")
    p.add_argument("--auc-weight", action="append", metavar="TASK=W",
                   help="objective += W * GAUC of the fused score on TASK (repeatable)")
    p.add_argument("--budget", type=int, default=600, help="CMA-ES evaluations per form")
    p.add_argument("--hidden", type=int, default=4, help="hidden units of the monotone fusion")
    p.add_argument("--select-fraction", type=float, default=0.3, help="share of validation users held out from the "
                   "fit to choose the form (0: choose by the fit's own objective)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000, help="user resamples for the test intervals")
    p.add_argument("--out", help="report folder (default: CHECKPOINT_DIR/fusion)")
    p.add_argument("--fusion-file", help="where the fusion file goes (default: CHECKPOINT.fusion.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing fusion file and report")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("simulate", help="log sessions of simulated KuaiRand users ranked by the checkpoint with an "
                       "exploring version of its fusion (for onerank fuse --method batch-rl; docs/rl_fusion.md)")
    p.add_argument("--checkpoint", required=True, help="a KuaiRand checkpoint with a weighted-sum fusion file")
    p.add_argument("--out", required=True, help="the logged sessions file (.npz)")
    p.add_argument("--sessions", type=int, default=3000)
    p.add_argument("--response-model", default="gbdt", choices=["gbdt", "logistic"])
    p.add_argument("--target-depth", type=float, default=30.0,
                   help="mean impressions per session under the static fusion (sets the leave model's intercept)")
    p.add_argument("--random-share", type=float, default=0.3, help="share of requests with a uniform random action")
    p.add_argument("--noise", type=float, default=0.3, help="spread of the Gaussian noise on the other requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fusion-file", help="the static fusion to log around (default: CHECKPOINT.fusion.json)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("export", help="export a checkpoint's model to ONNX, a torch.export program or an AOTInductor "
                       "package (checked against PyTorch)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=["onnx", "pt2", "aoti"],
                   help="onnx (ONNX Runtime; the serve extra), pt2 (torch.export program: batches of requests, served "
                   "by --backend pt2), aoti (pt2 compiled ahead of time by AOTInductor, for Python and C++; needs a "
                   "C++ compiler)")
    p.add_argument("--out", help="output file (default: next to the checkpoint, .onnx / .pt2 / .aoti.pt2)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("benchmark", help="run a benchmark suite (benchmarks/suites/NAME.yaml): tables, tests, plots")
    p.add_argument("--suite", required=True, help="suite name (benchmarks/suites/NAME.yaml) or a YAML path")
    p.add_argument("--seeds", type=POSITIVE_INT, help="seeds per model (default: the suite's)")
    p.add_argument("--out", help="output folder (default benchmarks/results/NAME)")
    p.add_argument("--models", help="comma-separated subset of the suite's models (names or labels)")
    p.add_argument("--suites-dir", help="where suites are looked up (default benchmarks/suites)")
    p.add_argument("--work-dir", help="where test predictions are kept (default runs/benchmark/NAME)")
    p.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.json")
    p.add_argument("--report-only", action="store_true", help="re-render report.md and plots from OUT/results.json")
    p.add_argument("--cache-dir", help="where preprocessed datasets are cached (default ~/.cache/onerank)")
    p.add_argument("--device", help="auto, cpu or cuda (default: the suite's)")
    p.add_argument("--workers", type=POSITIVE_INT, default=1, help="runs trained in parallel processes (default 1)")
    p.add_argument("--no-ablations", action="store_true", help="train the tuned models only, not the suite's "
                   "ablations (e.g. every model's seeds first on a small machine; a later --resume adds them)")
    p.add_argument("--rerun", metavar="MODELS", help="with --resume: train these models again (names or labels, "
                   "comma-separated; a model name takes its ablations too), e.g. after their code changed")
    p.add_argument("--publish", metavar="PAGE", help="also write the report into PAGE (e.g. BENCHMARKS.md) between "
                   "its lines '<!-- onerank benchmark NAME: begin -->' and '... NAME: end -->', links relative to PAGE")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("export-encoded", help="write a dataset for streaming: encoded train split as Parquet files")
    _add_run_flags(p)
    p.add_argument("--out", required=True, help="output folder (then: train --dataset encoded --data-dir OUT)")
    p.add_argument("--rows-per-file", type=POSITIVE_INT, default=1_000_000)
    p.add_argument("--row-group-rows", type=POSITIVE_INT, default=65_536, help="rows per row group (the unit of shuffling)")
    p.set_defaults(func=cmd_export_encoded)

    p = sub.add_parser("models", help="list model names")
    p.set_defaults(func=lambda a: _list("onerank.models.base", "MODELS"))
    p = sub.add_parser("weightings", help="list task-weighting strategies")
    p.set_defaults(func=lambda a: _list("onerank.objectives.weighting", "WEIGHTINGS"))
    p = sub.add_parser("datasets", help="list dataset loaders")
    p.set_defaults(func=lambda a: _list("onerank.data.registry", "DATASETS"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"onerank: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away (`onerank models | head`)
        return 0
    except OSError as exc:  # a path that is a file where a folder is needed, no permission, a full disk, ...
        where = f" {exc.filename}" if exc.filename else ""
        print(f"onerank: error: cannot use{where}: {exc.strerror or exc}; check the path and its permissions",
              file=sys.stderr)
        return 2
    finally:
        from onerank.training import distributed

        distributed.teardown()  # leave torchrun's process group cleanly (nothing to do in a plain process)


if __name__ == "__main__":
    sys.exit(main())
