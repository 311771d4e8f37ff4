"""What each fix of issue 16 changes in test AUC on a generated advertising funnel log with known probabilities.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/funnel_fixes.py --json benchmarks/results/funnel_fixes.json

The log comes from ``tests/funnel_log.py`` (the same generator the tests use): impressions with request ids and a
per-candidate position, a click -> conversion funnel with conversions missing where there was no click, a dwell-seconds
label, an events table with each click and conversion at its own time and a pre-period, a high-cardinality site field
and users who arrive in the test period. Every variant changes one thing from the fixed set-up ("after"):

* ``histories from impressions``: ``clicked`` / ``converted`` built from the impression log's label columns (each
  outcome at its impression's time, no pre-period) instead of the events table;
* ``slot as context``: the display position declared a context field (now refused at load; OneRank read it from each
  request's first row before the check existed, so it is emulated by giving every candidate the first row's slot);
* ``dwell raw``: the dwell task learned in seconds (no label transform); ``no dwell task``: click + conversion only;
* ``min_count 1`` (no rare value trains the OOV row), ``min_count 1 + oov_dropout 0.1``, ``min_count 2 + oov_dropout``.

Each model trains with early stopping on validation AUC (batch 256, lr 1e-3, at most ``--epochs`` epochs, patience 2),
one thread; figures are test AUC, dwell MSE (seconds squared) and MAE (seconds) next to those of predicting the
train mean (MSE) and median (MAE).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onerank import api
from onerank.data.dataset import EncodedDataset
from onerank.data.encoding import OOV
from onerank.data.tabular import load
from onerank.metrics.ranking import auc
from onerank.training.config import RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from funnel_log import funnel_log  # noqa: E402  (tests/ holds the generator the tests share)

VARIANTS = {
    "after (all fixes)": {},
    "histories from impressions": {"events": False},
    "slot as context": {"slot_group": "context"},
    "dwell raw": {"dwell_transform": "none"},
    "no dwell task": {"dwell": False},
    "min_count 1": {"min_count": 1},
    "min_count 1 + oov_dropout 0.1": {"min_count": 1, "oov_dropout": 0.1},
    "min_count 2 + oov_dropout 0.1": {"oov_dropout": 0.1},
}


def first_row_slot(ds: EncodedDataset) -> EncodedDataset:
    """The slot of each request's first row for every candidate: what a context field gave OneRank before the check."""
    for split in ("train", "valid", "test"):
        s = ds.split(split)
        starts = np.r_[0, np.flatnonzero(np.diff(s.request)) + 1]
        owner = np.repeat(starts, np.diff(np.r_[starts, len(s.request)]))
        s.categorical["slot"] = s.categorical["slot"][owner]
    return ds


def early_conversions(log, ds: EncodedDataset, split: str = "test") -> dict:
    """With histories built from the impression log, the ``converted`` entries of ``split`` whose conversion had not
    happened yet when the request started (its event time is at or after the request's start)."""
    s = ds.split(split)
    vocab = np.asarray(ds.encoders.vocabularies["ad"].to_list() + [None, None], dtype=object)
    users = np.asarray(ds.encoders.vocabularies["uid"].to_list(), dtype=object)
    conversions = log.events[log.events["kind"] == "conversion"]
    by_pair = {k: np.sort(g.to_numpy()) for k, g in conversions.groupby(["user", "ad_id"])["t"]}
    total = early = 0
    for row in np.flatnonzero(s.categorical["uid"] > OOV):
        user = users[s.categorical["uid"][row] - 2]
        codes, times = s.histories["converted"][row], s.history_times["converted"][row]
        for code, t in zip(codes[codes > OOV], times[codes > OOV]):
            total += 1
            times_of_pair = by_pair.get((user, vocab[code - 2]), np.zeros(0))
            after = times_of_pair[times_of_pair >= t]  # the conversion that followed this impression
            early += int(len(after) == 0 or after[0] >= s.time[row])
    return {"converted_entries": total, "not_yet_converted_at_request": early}


def run(model: str, ds: EncodedDataset, epochs: int, seed: int) -> dict:
    config = RunConfig(
        dataset="tabular", model=model,
        train=TrainConfig(epochs=epochs, batch_size=256, lr=1e-3, patience=2, seed=seed, progress=False,
                          tensorboard=False, threads=1, device="cpu"),
    )
    trainer = api.build_trainer(config, ds)
    start = time.perf_counter()
    state = trainer.fit()
    preds = trainer.predict("test")
    trainer.close()
    labels, masks = ds.label_values("test"), ds.test.label_mask
    out = {
        "epochs": state.epoch, "best_epoch": state.best_epoch, "seconds": round(time.perf_counter() - start, 1),
        "converged": state.finished, "loss_warning": state.history[0].get("loss_warning"),
    }
    for task in ("click", "conversion"):
        out[f"{task}_auc"] = round(auc(labels[task][masks[task]], preds[task][masks[task]]), 4)
    # test impressions of users without a trained id embedding (unseen in train, or rarer than min_count)
    new_user = ds.test.categorical["uid"] == OOV
    out["oov_user_share"] = round(float(new_user.mean()), 3)
    out["click_auc_oov_users"] = round(auc(labels["click"][new_user], preds["click"][new_user]), 4)
    out["click_auc_known_users"] = round(auc(labels["click"][~new_user], preds["click"][~new_user]), 4)
    if "dwell" in preds:
        m = masks["dwell"]
        train_mean = float(ds.label_values("train")["dwell"][ds.train.label_mask["dwell"]].mean())
        out["dwell_mse"] = round(float(np.mean((preds["dwell"][m] - labels["dwell"][m]) ** 2)), 1)
        out["dwell_mse_train_mean"] = round(float(np.mean((train_mean - labels["dwell"][m]) ** 2)), 1)
        train_median = float(np.median(ds.label_values("train")["dwell"][ds.train.label_mask["dwell"]]))
        out["dwell_mae"] = round(float(np.mean(np.abs(preds["dwell"][m] - labels["dwell"][m]))), 2)
        out["dwell_mae_train_median"] = round(float(np.mean(np.abs(train_median - labels["dwell"][m]))), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mmoe,onerank")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="data and training seeds, comma-separated")
    parser.add_argument("--users", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--count-early-conversions", action="store_true",
                        help="only count impression-log history entries whose conversion came after the request")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            log = funnel_log(num_users=args.users, seed=seed)
            im = log.impressions
            test = im[im["ts"] >= log.test_start]
            clicked = test[test["clk"] == 1]
            truth = {"click_auc": round(auc(test["clk"].to_numpy(), test["p_click"].to_numpy()), 4),
                     "conversion_auc": round(auc(clicked["cv"].to_numpy(), clicked["p_cv"].to_numpy()), 4)}
            print(f"seed {seed}: {len(im)} impressions, {len(log.events)} events; truth AUC {truth}", flush=True)
            results.append({"seed": seed, "variant": "truth (generating probabilities)", **truth})
            if args.count_early_conversions:
                folder = Path(tmp) / f"{seed}-count"
                ds = load(None, folder / "cache", schema=str(log.write(folder, events=False)))
                print(f"seed {seed}: test split, histories from impressions: {early_conversions(log, ds)}", flush=True)
                continue
            for name in args.variants.split(","):
                options = dict(VARIANTS[name])
                # a context slot is now refused at load: reproduce what OneRank saw before, the request's first slot
                collapse = options.pop("slot_group", None) == "context"
                folder = Path(tmp) / f"{seed}-{len(results)}"
                ds = load(None, folder / "cache", schema=str(log.write(folder, **options)))
                for model in args.models.split(","):
                    data = ds
                    if collapse:
                        if model != "onerank":
                            continue  # point-wise models read every row's own value: the variant changes nothing
                        data = first_row_slot(load(None, folder / "cache", schema=str(folder / "funnel.yaml")))
                    record = {"seed": seed, "variant": name, "model": model, **run(model, data, args.epochs, seed)}
                    results.append(record)
                    print(json.dumps(record), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
        Path(args.json).with_suffix(".md").write_text(markdown(results, " ".join(sys.argv)))


def markdown(results: list[dict], command: str) -> str:
    """Mean test AUC over seeds per variant and model, with the change from the fixed set-up."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        rows.setdefault((r["variant"], r.get("model", "-")), []).append(r)

    def mean(records: list[dict], key: str) -> float:
        values = [r[key] for r in records if key in r]
        return float(np.mean(values)) if values else float("nan")

    header = ("| variant | model | seeds | click AUC | Δ | conversion AUC | Δ | click AUC, OOV users | dwell MAE (s) | "
              "epochs (best) |")
    lines = [f"`{command}`", "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, model), records in rows.items():
        base = rows.get(("after (all fixes)", model), records)
        cells = [variant, model, str(len(records))]
        for key in ("click_auc", "conversion_auc"):
            value = mean(records, key)
            delta = value - mean(base, key)
            cells += [f"{value:.4f}", "" if variant.startswith(("after", "truth")) else f"{delta:+.4f}"]
        cells.append(f"{mean(records, 'click_auc_oov_users'):.4f}" if any("click_auc_oov_users" in r for r in records)
                     else "")
        cells.append(f"{mean(records, 'dwell_mae'):.2f}" if any("dwell_mae" in r for r in records) else "")
        cells.append(", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in records if "epochs" in r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
