"""The `onerank` command: parse, then call the library (onerank.api). User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from onerank.data.schema import SchemaError
from onerank.training.config import RunConfig

USER_ERRORS = (SchemaError, FileNotFoundError, ValueError, KeyError)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SchemaError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config; flags given here override it")
    p.add_argument("--dataset", help="dataset name (synthetic, census, kuairand, tabular)")
    p.add_argument("--data-dir", help="folder holding the dataset's files")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="loader option (repeatable)")
    p.add_argument("--tasks", help="comma-separated task subset, passed to the loader")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--weighting", help="task weighting strategy (fixed, equal, uncertainty, gradnorm, pcgrad, dwa)")
    p.add_argument("--listwise", type=float, help="weight of the list-wise loss (needs request grouping)")
    p.add_argument("--temperature", type=float, help="temperature of the list-wise loss")
    p.add_argument("--distill", metavar="PAIRS", help="cross-task distillation (CrossDistil, docs/distillation.md): "
                   "comma-separated target<-helper pairs, e.g. 'like<-long_view,long_view<-click'; 'none' turns it off")
    p.add_argument("--distill-weight", type=float, help="weight of each pair's distillation term (default 0.5)")
    p.add_argument("--distill-warmup", type=int, help="optimiser steps before distillation starts (default 10)")
    p.add_argument("--distill-option", action="append", metavar="KEY=VALUE",
                   help="another distillation option: ranking_weight, correction, hidden (repeatable)")
    p.add_argument("--gradient-diagnostics", action="store_true", help="log task-gradient cosines per epoch")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--cache-dir", help="where preprocessed datasets are cached (default ~/.cache/onerank)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast forward and loss (docs/scaling.md)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--streaming", choices=["auto", "on", "off"], help="train from a Parquet stream of the train split")
    p.add_argument("--threads", type=int, help="torch intra-op threads per process")


def _run_config(args: argparse.Namespace) -> RunConfig:
    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    if args.dataset:
        config.dataset = args.dataset
    if args.data_dir:
        config.data_dir = args.data_dir
    config.dataset_options.update(_key_values(args.dataset_option, "--dataset-option"))
    if args.tasks:
        config.dataset_options["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for flag, attr in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"),
                       ("patience", "patience"), ("device", "device"), ("precision", "precision"),
                       ("streaming", "streaming"), ("threads", "threads")):
        if getattr(args, flag) is not None:
            setattr(config.train, attr, getattr(args, flag))
    if args.gradient_diagnostics:
        config.train.gradient_diagnostics = True
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
    _distillation_flags(args, config)
    if args.cache_dir:
        config.cache_dir = args.cache_dir
    return config


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
    result = api.train(config, out_dir=out, resume=args.resume)
    if _is_main_process():  # under torchrun every rank holds the same result; one prints it
        print(format_table({"dataset": result["dataset"], "results": [result]}))
        print(f"wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from onerank import api
    from onerank.training.trainer import write_json

    config = _run_config(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise SchemaError("--models names no model")
    from onerank.models import model_class

    for m in models:
        model_class(m)  # fail on a misspelled name before any training
    options: dict[str, dict] = {}
    for key, value in _key_values(args.model_option, "--model-option").items():
        model, _, option = key.partition(".")
        if not option:
            raise SchemaError(f"--model-option for compare is MODEL.KEY=VALUE, got {key!r}")
        options.setdefault(model, {})[option] = value
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
    from onerank.serving.app import serve

    serve(
        args.checkpoint, host=args.host, port=args.port, backend=args.backend, onnx_path=args.onnx,
        fusion=_fusion(args), chunk_size=args.chunk_size, max_candidates=args.max_candidates,
        max_history=args.max_history, max_body_bytes=args.max_body_mb * 2**20, workers=args.workers,
        threads=args.threads,
    )
    return 0


def _fusion(args: argparse.Namespace):
    from onerank.serving import Fusion

    weights = {k: float(v) for k, v in _key_values(args.weight, "--weight").items()} or None
    return Fusion(args.fusion, weights)


def cmd_export(args: argparse.Namespace) -> int:
    from onerank.serving.export import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"wrote {report.path} ({report.model}, {report.format}; max |diff| vs PyTorch on an example request: "
          f"{report.max_abs_diff:.1e})")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from onerank.benchmarking import run_benchmark

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    flags = [("--seeds", args.seeds), ("--out", args.out), ("--models", args.models), ("--device", args.device),
             ("--workers", args.workers if args.workers != 1 else None)]
    command = " ".join([f"onerank benchmark --suite {args.suite}"] + [f"{f} {v}" for f, v in flags if v is not None])
    result = run_benchmark(
        args.suite, out_dir=args.out, seeds=args.seeds, models=models, suites_dir=args.suites_dir,
        work_dir=args.work_dir, resume=args.resume, report_only=args.report_only, cache_dir=args.cache_dir,
        command=command, device=args.device, workers=args.workers,
    )
    print(result["report"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onerank", description="Multi-task ranking for recommender systems")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model; writes DIR/checkpoint.pt and DIR/metrics.json")
    _add_run_flags(p)
    p.add_argument("--model", help="model name (e.g. mmoe)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="model option (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
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

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP: POST /rank, GET /model, GET /healthz")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--onnx", help="ONNX file for --backend onnx (default: next to the checkpoint)")
    p.add_argument("--fusion", default="weighted_sum", choices=["weighted_sum", "product"],
                   help="how task predictions become one score")
    p.add_argument("--weight", action="append", metavar="TASK=W", help="fusion weight of a task (repeatable; "
                   "default 1 for every task, 0 for tasks left out once one is given)")
    p.add_argument("--chunk-size", type=int, default=256,
                   help="candidates scored at a time (the scores do not depend on it)")
    p.add_argument("--max-candidates", type=int, default=4096, help="larger requests get 413")
    p.add_argument("--max-history", type=int, default=1000, help="longer histories get 413")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="larger request bodies get 413")
    p.add_argument("--workers", type=int, default=2, help="inference threads (requests scored at once)")
    p.add_argument("--threads", type=int,
                   help="intra-op threads per inference (default: the cores divided by the workers)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a checkpoint's model to ONNX or TorchScript (checked against PyTorch)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", help="output file (default: next to the checkpoint, .onnx / .torchscript.pt)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("benchmark", help="run a benchmark suite (benchmarks/suites/NAME.yaml): tables, tests, plots")
    p.add_argument("--suite", required=True, help="suite name (benchmarks/suites/NAME.yaml) or a YAML path")
    p.add_argument("--seeds", type=int, help="seeds per model (default: the suite's)")
    p.add_argument("--out", help="output folder (default benchmarks/results/NAME)")
    p.add_argument("--models", help="comma-separated subset of the suite's models (names or labels)")
    p.add_argument("--suites-dir", help="where suites are looked up (default benchmarks/suites)")
    p.add_argument("--work-dir", help="where test predictions are kept (default runs/benchmark/NAME)")
    p.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.json")
    p.add_argument("--report-only", action="store_true", help="re-render report.md and plots from OUT/results.json")
    p.add_argument("--cache-dir", help="where preprocessed datasets are cached (default ~/.cache/onerank)")
    p.add_argument("--device", help="auto, cpu or cuda (default: the suite's)")
    p.add_argument("--workers", type=int, default=1, help="runs trained in parallel processes (default 1)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("export-encoded", help="write a dataset for streaming: encoded train split as Parquet files")
    _add_run_flags(p)
    p.add_argument("--out", required=True, help="output folder (then: train --dataset encoded --data-dir OUT)")
    p.add_argument("--rows-per-file", type=int, default=1_000_000)
    p.add_argument("--row-group-rows", type=int, default=65_536, help="rows per row group (the unit of shuffling)")
    p.set_defaults(func=cmd_export_encoded)

    p = sub.add_parser("models", help="list model names")
    p.set_defaults(func=lambda a: print("\n".join(__import__("onerank.models", fromlist=["x"]).model_names())) or 0)
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
    finally:
        from onerank.training import distributed

        distributed.teardown()  # leave torchrun's process group cleanly (nothing to do in a plain process)


if __name__ == "__main__":
    sys.exit(main())
