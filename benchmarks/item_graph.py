"""Graph-based inductive item vectors (MUSIG-style GraphSAGE, multi-task) against the id embedding on cold and warm
items (issue 33; protocol in docs/item_graph.md).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/item_graph.py --dataset synthetic \
        --out /work/runs/w33/synthetic.json
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/item_graph.py --dataset kuairand \
        --data-dir ../shared/data/kuairand-pure --out /work/runs/w33/kuairand.json

Per dataset: ``--cold-share`` of the training split's items is held out of training with every trace of it
(``onerank.benchmarking.cold_start``); the item graph is built from the training split only; each encoder variant is
pre-trained per seed, its table fed to the rankers (``add``: beside the id embedding); after training the table is
refreshed with the held-out items' validation-day edges and test is read once. Variants:

* ``id``: the id embedding only, its out-of-vocabulary row trained by id dropout (``--id-dropout``);
* ``features``: feature-only MLP trained on the same tasks (the encoder without edges);
* ``sage_single``: GraphSAGE trained on link prediction only;
* ``sage_multi``: GraphSAGE trained on link prediction + item labels (MUSIG).

Figures: test AUC / GAUC per task on cold rows (candidate held out of training) and warm rows, 3 seeds, paired cluster
bootstrap (users) of each variant against ``id`` and of ``sage_multi`` against the other encoders; recall@k of
held-out test co-engagements by each encoder's vectors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from onerank import api
from onerank.benchmarking.cold_start import choose_cold_items, cold_rows, cold_split, refresh_items
from onerank.benchmarking.runner import code_version
from onerank.benchmarking.stats import paired_bootstrap_auc, paired_bootstrap_gauc
from onerank.data.dataset import encode_dataset
from onerank.data.encoding import OOV
from onerank.features.embedding import FeatureEmbedding
from onerank.features.item_graph import (
    ItemEncoderConfig, ItemGraphConfig, ItemLabels, build_item_graph, co_engagements, engagement_buckets, pretrain,
)
from onerank.features.item_vectors import ItemVectorSpec
from onerank.metrics.ranking import task_metrics
from onerank.training.config import RunConfig, TrainConfig

VARIANTS = ("id", "features", "sage_single", "sage_multi")
ENCODERS = {
    "features": {"use_edges": False},
    "sage_single": {"label_weight": 0.0},
    "sage_multi": {},
}


def dataset_setup(name: str, data_dir: str | None, train_dates: str) -> dict:
    """The raw data and what the protocol reads of it, per dataset."""
    if name == "synthetic":
        from onerank.data.synthetic import build_raw

        return {"raw": build_raw(), "tasks": ("click", "cart"), "link_tasks": ("click",),
                "inputs": ("category", "brand"), "label_fields": (), "model_tasks": None}
    if name == "kuairand":
        from onerank.data import kuairand

        opts = kuairand._options({"tasks": "click,long_view", "history_len": 20, "train_dates": train_dates})
        directory = kuairand.resolve_data_dir(data_dir)
        raw = kuairand.build(directory, kuairand.find_files(directory, opts), opts)
        return {"raw": raw, "tasks": ("click", "long_view"), "link_tasks": ("click", "long_view"),
                "inputs": ("author_id", "video_type", "upload_type", "music_type", "tag"),
                "label_fields": ("duration_bucket",), "model_tasks": None}
    raise SystemExit(f"unknown dataset {name!r}")


def with_id_dropout(ds, rate: float):
    """The dataset with the item id's out-of-vocabulary dropout set (the id baseline's cold-start practice)."""
    fields = [dataclasses.replace(f, oov_dropout=rate) if f.name == ds.schema.item_id else f
              for f in ds.schema.categorical]
    out = dataclasses.replace(ds, schema=dataclasses.replace(ds.schema, categorical=fields))
    return out


def recall_at_k(vectors: np.ndarray, pairs: np.ndarray, candidates: np.ndarray, k: int) -> float:
    """Share of held-out pairs (a, b) with b among the k items closest to a (cosine; a itself excluded)."""
    if not len(pairs):
        return float("nan")
    hits = 0
    for start in range(0, len(pairs), 512):
        chunk = pairs[start:start + 512]
        scores = vectors[chunk[:, 0]] @ vectors[candidates].T
        scores[candidates[None, :] == chunk[:, :1]] = -np.inf
        target = (vectors[chunk[:, 0]] * vectors[chunk[:, 1]]).sum(1)
        hits += int(((scores > target[:, None]).sum(1) < k).sum())
    return hits / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default="mmoe,onerank")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cold-share", type=float, default=0.1)
    parser.add_argument("--train-dates", default="20220429-20220505", help="KuaiRand training days")
    parser.add_argument("--id-dropout", type=float, default=0.1)
    parser.add_argument("--mode", default="add")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch-pairs", type=int, default=1024, help="edges per encoder pre-training step")
    parser.add_argument("--encoder-epochs", type=int, default=30)
    parser.add_argument("--resamples", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out_path = Path(args.out)
    if out_path.exists():
        raise SystemExit(f"{out_path} exists; give another --out (a run never overwrites another's files)")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    started = time.time()
    setup = dataset_setup(args.dataset, args.data_dir, args.train_dates)
    raw = setup["raw"]
    raw = dataclasses.replace(raw, schema=raw.schema.select_tasks(list(setup["tasks"])))
    cold = choose_cold_items(raw, args.cold_share, seed=2024)
    held_out = cold_split(raw, cold)
    base = encode_dataset(held_out)
    new_items = cold[base.encoders.vocabularies[base.schema.item_id].encode(cold) == OOV]
    ds = refresh_items(base, held_out, new_items)
    item_id = ds.schema.item_id
    V = ds.vocab_sizes[item_id]
    N = V + len(new_items)
    graph_config = ItemGraphConfig(link_tasks=setup["link_tasks"])
    graph = build_item_graph(ds.train, ds.item_table, item_id, V, setup["inputs"], graph_config,
                             before=int(ds.valid.time.min()))
    assert graph.cutoff is None or graph.cutoff < ds.valid.time.min(), "an edge from after the training split"
    new_features = np.stack([ds.item_table[f][V:N] for f in setup["inputs"]], axis=1)
    # valid time: the new items are known by their features only; test time: their validation-day edges as well
    graph_valid = graph.with_items(new_features, np.zeros((0, 2)))
    # (validation rows before the first test event: KuaiRand's days overlap by the hour)
    valid_pairs, valid_counts = co_engagements(ds.valid, item_id, setup["link_tasks"], graph_config.window,
                                               before=int(ds.test.time.min()))
    touches_new = (valid_pairs >= V).any(1)
    graph_test = graph.with_items(new_features, valid_pairs[touches_new], valid_counts[touches_new])
    warm_valid_pairs = valid_pairs[~touches_new]
    test_pairs, _ = co_engagements(ds.test, item_id, setup["link_tasks"], graph_config.window)
    train_edges = {tuple(p) for p in graph.pairs.tolist()}
    test_pairs = np.array([p for p in test_pairs.tolist() if tuple(p) not in train_edges], dtype=np.int64)
    test_pairs = np.concatenate([test_pairs, test_pairs[:, ::-1]])  # both directions: each end queries
    cold_query = test_pairs[:, 0] >= V
    field_sizes = [ds.vocab_sizes[f] for f in setup["inputs"]]
    labels = {f"rate_{t}": engagement_buckets(ds.train, item_id, t, V) for t in setup["tasks"]}
    labels.update({f: ds.item_table[f][:V].copy() for f in setup["label_fields"]})
    for f in setup["label_fields"]:
        labels[f][:OOV + 1] = -1
    results: dict = {
        "what": "cold-start item graph benchmark (issue 33)", "dataset": args.dataset, "code": code_version(),
        "settings": vars(args), "machine_load": os.getloadavg(),
        "data": {"items_trained": int(V - 2), "items_held_out": int(len(new_items)), "graph_edges": int(len(graph.pairs)),
                 "new_item_edges_at_test": int(touches_new.sum()),
                 "new_items_with_test_edges": int(len(np.unique(valid_pairs[touches_new][valid_pairs[touches_new] >= V]))),
                 "test_rows": int(len(ds.test)), "test_cold_rows": int(cold_rows(ds, "test").sum()),
                 "held_out_test_pairs": {"cold": int(cold_query.sum()), "warm": int((~cold_query).sum())}},
        "pretraining": {}, "recall": {}, "runs": {}, "comparisons": {},
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float))
        tmp.replace(out_path)

    prediction_dir = out_path.parent / f"{out_path.stem}_predictions"
    prediction_dir.mkdir(parents=True, exist_ok=True)
    tables: dict = {}
    candidates = np.arange(OOV + 1, N)
    popularity = np.bincount(ds.train.categorical[item_id], minlength=N).astype(np.float64)
    for seed in seeds:
        for variant in variants:
            if variant == "id":
                continue
            config = ItemEncoderConfig(seed=seed, batch_pairs=args.batch_pairs, epochs=args.encoder_epochs,
                                       **ENCODERS[variant])
            t0 = time.time()
            fit = pretrain(graph, field_sizes, ItemLabels(labels), config, valid_pairs=warm_valid_pairs)
            tables[variant, seed] = (fit.encoder.table(graph_valid), fit.encoder.table(graph_test))
            test_table = tables[variant, seed][1]
            results["pretraining"][f"{variant}|{seed}"] = {"best_epoch": fit.best_epoch, "history": fit.history,
                                                           "seconds": round(time.time() - t0, 1)}
            results["recall"][f"{variant}|{seed}"] = {
                "cold": recall_at_k(test_table, test_pairs[cold_query], candidates, args.k),
                "warm": recall_at_k(test_table, test_pairs[~cold_query], candidates, args.k),
            }
            print(variant, seed, results["pretraining"][f"{variant}|{seed}"]["best_epoch"],
                  results["recall"][f"{variant}|{seed}"], flush=True)
            save()
    # popularity: the recall of ranking every query by the items' training impressions (a reference, no vectors)
    ranks = np.argsort(np.argsort(-popularity[candidates]))
    position = np.full(N, len(candidates))
    position[candidates] = ranks
    results["recall"]["popularity"] = {
        "cold": float(np.mean(position[test_pairs[cold_query][:, 1]] < args.k)),
        "warm": float(np.mean(position[test_pairs[~cold_query][:, 1]] < args.k)),
    }

    test = ds.test
    labels_test = ds.label_values("test")
    cold_mask = cold_rows(ds, "test")
    predictions: dict = {}
    np.savez(prediction_dir / "test.npz", cold=cold_mask, user=test.user,
             **{f"label_{t}": labels_test[t] for t in setup["tasks"]},
             **{f"mask_{t}": test.label_mask[t] for t in setup["tasks"]})
    for model in [m for m in args.models.split(",") if m]:
        for variant in variants:
            for seed in seeds:
                key = f"{model}|{variant}|{seed}"
                train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=seed, progress=False,
                                    tensorboard=False, threads=1, patience=args.patience)
                run = RunConfig(dataset=args.dataset, model=model, train=train)
                if variant == "id":
                    trainer = api.build_trainer(run, with_id_dropout(ds, args.id_dropout))
                else:
                    spec = ItemVectorSpec.of(tables[variant, seed][0], mode=args.mode, id_dropout=args.id_dropout)
                    trainer = api.build_trainer(run, ds, item_vectors=spec)
                t0 = time.time()
                state = trainer.fit()
                if variant != "id":  # the refreshed table: the held-out items' validation-day edges
                    for module in trainer.model.modules():
                        if isinstance(module, FeatureEmbedding) and module.item_vectors is not None:
                            module.item_vectors.refresh(tables[variant, seed][1])
                preds = trainer.predict("test")
                trainer.close()
                predictions[key] = preds
                np.savez(prediction_dir / f"{key.replace('|', '_')}.npz", **preds)  # --compare of unfinished runs
                record = {"epochs": len(state.history), "best_epoch": state.best_epoch,
                          "seconds": round(time.time() - t0, 1), "valid": state.history[state.best_epoch - 1]["valid"]}
                for part, rows in (("cold", cold_mask), ("warm", ~cold_mask), ("all", np.ones_like(cold_mask))):
                    record[part] = {
                        t: {m: v for m, v in task_metrics(ds.schema.task(t).kind, labels_test[t][rows], preds[t][rows],
                                                           test.user[rows]).items() if m in ("auc", "gauc", "logloss")}
                        for t in setup["tasks"]
                    }
                results["runs"][key] = record
                print(key, record["best_epoch"], {p: {t: round(record[p][t]["auc"], 4) for t in setup["tasks"]}
                                                  for p in ("cold", "warm")}, flush=True)
                save()
        compare(results, predictions, model, variants, seeds, labels_test, test, cold_mask, setup["tasks"],
                args.resamples)
        save()
    results["seconds"] = round(time.time() - started, 1)
    results["machine_load_end"] = os.getloadavg()
    save()


def compare(results: dict, predictions: dict, model: str, variants: list[str], seeds: list[int], labels: dict,
            test, cold_mask: np.ndarray, tasks: tuple[str, ...], resamples: int) -> None:
    """Paired cluster bootstraps (users, all seeds) of each variant against ``id`` and of ``sage_multi`` against the
    other encoders, on cold and warm test rows, for the pairs whose runs all finished."""
    pairs = [(v, "id") for v in variants if v != "id"] + [("sage_multi", v) for v in ("features", "sage_single")]
    for a, b in pairs:
        if not all(f"{model}|{v}|{s}" in predictions for v in (a, b) for s in seeds):
            continue
        for part, rows in (("cold", cold_mask), ("warm", ~cold_mask)):
            for t in tasks:
                keep = rows & test.label_mask[t]
                pa = [predictions[f"{model}|{a}|{s}"][t][keep] for s in seeds]
                pb = [predictions[f"{model}|{b}|{s}"][t][keep] for s in seeds]
                results["comparisons"][f"{model}|{a}-{b}|{part}|{t}"] = {
                    "auc": paired_bootstrap_auc(labels[t][keep], pa, pb, test.user[keep], resamples),
                    "gauc": paired_bootstrap_gauc(labels[t][keep], pa, pb, test.user[keep], resamples),
                }


# ---------------------------------------------------------------------------------------------------------------------
# The table of docs/item_graph.md, generated from the results files
# ---------------------------------------------------------------------------------------------------------------------
BEGIN, END = "<!-- item-graph-table:begin -->", "<!-- item-graph-table:end -->"


def _cell(results: dict, model: str, variant: str, part: str, task: str, metric: str) -> str:
    values = [r[part][task][metric] for k, r in results["runs"].items() if k.startswith(f"{model}|{variant}|")]
    if not values:
        return "-"
    text = f"{np.mean(values):.4f}"
    if len(values) < len(results["settings"]["seeds"].split(",")):
        text += f" ({len(values)} seed{'s' if len(values) > 1 else ''} only)"
    if variant != "id":
        c = results["comparisons"].get(f"{model}|{variant}-id|{part}|{task}", {}).get(metric)
        if c:
            text += f" ({c['delta']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}])"
    return text


def render(paths: list[str]) -> str:
    lines = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        code = results["code"]
        tasks = sorted({t for r in results["runs"].values() for t in r["cold"]},
                       key=lambda t: ["click", "long_view", "cart"].index(t) if t in ("click", "long_view", "cart") else 9)
        data = results["data"]
        lines += [f"### {results['dataset']}", "",
                  f"{data['items_trained']} items trained, {data['items_held_out']} held out; test: {data['test_rows']} "
                  f"rows, {data['test_cold_rows']} of them held-out items; {data['new_items_with_test_edges']} held-out "
                  f"items got validation-day edges ({data['new_item_edges_at_test']} edges). Seeds "
                  f"{results['settings']['seeds']}; commit `{(code.get('git_commit') or '?')[:10]}`"
                  f"{' (uncommitted changes)' if code.get('git_dirty') else ' (clean tree)'}; file "
                  f"`{Path(path).name}`"
                  f"{'' if 'seconds' in results else ' (stopped before its last runs: only what it finished is shown)'}"
                  ".", ""]
        models = list(dict.fromkeys(k.split("|")[0] for k in results["runs"]))
        for model in models:
            for metric in ("auc", "gauc"):
                header = [f"{model} test {metric.upper()}"] + [f"{part} {t}" for part in ("cold", "warm") for t in tasks]
                lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                for variant in VARIANTS:
                    cells = [_cell(results, model, variant, part, t, metric) for part in ("cold", "warm") for t in tasks]
                    if set(cells) != {"-"}:
                        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
                lines.append("")
            epochs = {k.split("|", 1)[1]: f"{r['best_epoch']}/{r['epochs']}" for k, r in results["runs"].items()
                      if k.startswith(model + "|")}
            lines += [f"{model} best epoch / epochs run: " + ", ".join(f"{k} {v}" for k, v in epochs.items()), ""]
            unconverged = [k.split("|", 1)[1] for k, r in results["runs"].items() if k.startswith(model + "|")
                           and r["best_epoch"] == r["epochs"] == results["settings"]["epochs"]]
            if unconverged:
                lines += [f"Not converged (best epoch = the last of {results['settings']['epochs']}): "
                          + ", ".join(unconverged), ""]
        lines += ["Differences whose 95 % interval excludes zero (all others include it):", ""]
        clear = [(key, metric, c) for key, entry in results["comparisons"].items() for metric, c in entry.items()
                 if c.get("resamples") and (c["ci_low"] > 0 or c["ci_high"] < 0)]
        for key, metric, c in clear:
            model, pair, part, task = key.split("|")
            lines.append(f"* {model} {pair.replace('-', ' vs ')}, {part} rows, {task} {metric.upper()}: "
                         f"{c['delta']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]")
        if not results["comparisons"]:
            lines[-2:] = ["No comparison: the run stopped before a second variant finished.", ""]
        elif not clear:
            lines.append("* none")
        lines.append("")
        recall = results["recall"]
        k = results["settings"]["k"]
        lines += [f"| recall@{k} of held-out test co-engagements | cold query | warm query |", "|---|---|---|"]
        for variant in [*ENCODERS, "popularity"]:
            values = [v for key, v in recall.items() if key.split("|")[0] == variant]
            if values:
                lines.append(f"| {variant} | {np.mean([v['cold'] for v in values]):.4f} | "
                             f"{np.mean([v['warm'] for v in values]):.4f} |")
        lines.append("")
    return "\n".join(lines)


def publish(paths: list[str], page: Path) -> None:
    text = page.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    page.write_text(text[:start] + "\n" + render(paths) + "\n" + text[stop:])


def compare_saved(path: Path) -> None:
    """The comparisons of a run that stopped before its last model finished, from its saved test predictions, written
    into its own results file."""
    results = json.loads(path.read_text())
    folder = path.parent / f"{path.stem}_predictions"
    saved = np.load(folder / "test.npz")
    tasks = tuple(k[len("label_"):] for k in saved.files if k.startswith("label_"))
    test = argparse.Namespace(user=saved["user"], label_mask={t: saved[f"mask_{t}"] for t in tasks})
    labels = {t: saved[f"label_{t}"] for t in tasks}
    predictions = {key: dict(np.load(folder / f"{key.replace('|', '_')}.npz")) for key in results["runs"]}
    seeds = [int(s) for s in results["settings"]["seeds"].split(",")]
    for model in dict.fromkeys(k.split("|")[0] for k in results["runs"]):
        variants = list(dict.fromkeys(k.split("|")[1] for k in results["runs"] if k.startswith(model + "|")))
        compare(results, predictions, model, variants, seeds, labels, test, saved["cold"], tasks,
                results["settings"]["resamples"])
    results["compared_after_stop"] = True
    path.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        publish(sys.argv[3:], Path(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--compare":
        compare_saved(Path(sys.argv[2]))
    else:
        main()
