"""Where on the KuaiRand test split a model wins or loses: test AUC and GAUC per slice, for the models of a finished
(or partial) ``kuairand`` suite and any extra prediction files.

Slices: the length of the user's first behaviour history at request time (KuaiRand: ``watched``; empty, short, ...,
full at the loader's ``history_len``) and how often the candidate video was shown in the training days (unseen,
rare, ..., popular). Each model is read at its chosen tuning point (``results.json``'s tuning, or the runs of seed 0
when tuning is not finished), every seed whose test predictions are in the work folder, metrics averaged over
seeds. AUC mixes two abilities: ranking users (who clicks more) and ranking one user's impressions (GAUC, the
impression-weighted per-user AUC over users with both labels); the second table separates them.

    python benchmarks/kuairand_slices.py --results benchmarks/results/kuairand --work-dir runs/benchmark/kuairand \\
        --models stem,mmoe,onerank [--extra probe=runs/probe/predictions/gated_lr=0.001_seed=0.npz] \\
        [--blend onerank+stem] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from onerank import api
from onerank.benchmarking import load_suite
from onerank.benchmarking.runner import SuiteRunner, run_key
from onerank.fusion.calibration import logit
from onerank.metrics.ranking import auc, gauc

TASKS = ("click", "long_view", "like")
MIN_GAUC_ROWS = 500  # a GAUC over a few dozen users is noise (the empty-history slice holds 45 test rows)


def slices(history_len: int, lengths: np.ndarray, shown: np.ndarray) -> dict[str, np.ndarray]:
    """Slice name -> boolean mask over the test rows."""
    third = max(history_len // 3, 1)
    bounds = [(0, 1), (1, third), (third, 2 * third), (2 * third, history_len), (history_len, history_len + 1)]
    out = {f"history {lo}" if hi == lo + 1 else f"history {lo}-{hi - 1}": (lengths >= lo) & (lengths < hi)
           for lo, hi in bounds if hi > lo}
    for lo, hi in [(0, 1), (1, 5), (5, 50), (50, None)]:
        name = "video unseen in training" if hi == lo + 1 else f"video shown {lo}{'+' if hi is None else f'-{hi - 1}'}x"
        out[name] = (shown >= lo) & (shown < (hi if hi is not None else np.inf))
    return out


def model_predictions(runner: SuiteRunner, labels: list[str]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Label -> the test predictions of its chosen point, one per seed found."""
    runner._tune()
    out = {}
    for label in labels:
        tuning = runner.results["tuning"].get("None", {}).get(label)
        if tuning is None:
            raise SystemExit(f"no model {label!r} in the suite's results")
        keys = [run_key(None, label, tuning["chosen"], seed) for seed in range(runner.seeds)]
        found = [runner.predictions[k] for k in keys if k in runner.predictions]
        if found:
            out[f"{label} (n={len(found)})"] = found
    return out


def blend(predictions: dict[str, list[dict[str, np.ndarray]]], labels: list[str]) -> list[dict[str, np.ndarray]]:
    """The sum of the models' logits (probabilities in, probabilities out), seed by seed over their common seeds."""
    def model(label: str) -> list[dict[str, np.ndarray]]:
        found = [runs for name, runs in predictions.items() if name == label or name.startswith(f"{label} (n=")]
        if not found:
            raise SystemExit(f"--blend: no predictions for {label!r}; have {sorted(predictions)}")
        return found[0]

    runs = [model(label) for label in labels]
    return [{task: 1 / (1 + np.exp(-sum(logit(seed[task]) for seed in seeds))) for task in seeds[0]}
            for seeds in zip(*runs)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="benchmarks/results/kuairand", help="the suite's output folder")
    p.add_argument("--work-dir", default="runs/benchmark/kuairand", help="the suite's work folder (predictions)")
    p.add_argument("--suite", default="kuairand")
    p.add_argument("--models", help="comma-separated labels (default: every tuned model with predictions)")
    p.add_argument("--extra", action="append", default=[], help="LABEL=PATH.npz: more test predictions")
    p.add_argument("--blend", action="append", default=[], metavar="A+B",
                   help="also score the sum of two models' logits (labels as in --models / --extra): do they hold "
                        "the same information?")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args()

    suite = load_suite(args.suite)
    runner = SuiteRunner(suite, args.results, work_dir=args.work_dir, resume=True)
    labels = args.models.split(",") if args.models else [e.label for e in suite.models if not e.ablation]
    predictions = model_predictions(runner, labels)
    for item in args.extra:
        label, _, path = item.partition("=")
        with np.load(path) as npz:
            predictions[label] = [{t: npz[t] for t in npz.files}]
    if not predictions:
        raise SystemExit(f"no test predictions found under {args.work_dir}")
    for pair in args.blend:
        predictions[pair] = blend(predictions, pair.split("+"))

    dataset = api.load_run_dataset(runner.run_config(suite.models[0], None, {}, 0))
    test, train = dataset.split("test"), dataset.split("train")
    sequence = dataset.schema.sequences[0].name  # the first declared behaviour (KuaiRand: every exposure)
    history = test.histories[sequence]
    lengths = (history[..., 0] if history.ndim == 3 else history) != 0
    item = dataset.schema.item_id
    shown = np.bincount(train.categorical[item], minlength=int(test.categorical[item].max()) + 1)
    masks = slices(history.shape[1], lengths.sum(1), shown[test.categorical[item]])

    table = {}
    rows = {"all": np.ones(len(lengths), bool), **masks}
    for metric, score in (("AUC", lambda y, p, m: auc(y, p)), ("GAUC", lambda y, p, m: gauc(y, p, test.user[m]))):
        for task in [t for t in TASKS if t in test.labels]:
            print(f"\n{task}: test {metric} by slice (mean over seeds); history = length of '{sequence}' at request time")
            names = list(predictions)
            print(f"{'slice':28} {'rows':>7} {'share':>6} " + " ".join(f"{n[:22]:>22}" for n in names))
            for name, mask in rows.items():
                mask = mask & test.label_mask[task]
                y = test.labels[task][mask]
                if mask.sum() == 0 or y.min() == y.max() or (metric == "GAUC" and mask.sum() < MIN_GAUC_ROWS):
                    continue
                scores = {n: float(np.mean([score(y, run[task][mask], mask) for run in runs]))
                          for n, runs in predictions.items()}
                best = max(scores.values())
                cells = " ".join(f"{('*' if s == best else '') + f'{s:.4f}':>22}" for s in scores.values())
                print(f"{name:28} {int(mask.sum()):7,} {mask.mean():6.1%} {cells}")
                table.setdefault(metric, {}).setdefault(task, {})[name] = {"rows": int(mask.sum()), **scores}
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
