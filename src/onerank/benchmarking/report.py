"""Aggregate a suite's runs and render them: mean +- std tables, gains over the best baseline, paired tests, the
negative-transfer (seesaw) table, the ablation table and the task-correlation sweep; and publish the rendered report
into a docs page (``publish_report``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from onerank.benchmarking.stats import paired_bootstrap_auc, paired_bootstrap_gauc, paired_t, significance_mark


def _nan_stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not len(arr):
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def final_runs(results: dict[str, Any], variant: str, label: str) -> list[dict]:
    """The runs of ``label`` at its chosen hyper-parameters, one per seed, in seed order."""
    chosen = results["tuning"].get(variant, {}).get(label, {}).get("chosen")
    runs = [
        r for r in results["runs"]
        if str(r["variant"]) == variant and r["label"] == label and r["hparams"] == chosen
        and r["seed"] < results["seeds"]
    ]
    return sorted(runs, key=lambda r: r["seed"])


def summarize(results: dict[str, Any], suite, predictions: dict[str, dict], labels: dict[str, dict],
              previous: dict[str, Any] | None = None) -> dict:
    """Per variant: each model's mean ± std, the paired comparisons, negative transfer, the oracle. ``previous``: an
    earlier summary of the same runs, whose bootstrap results stand in where the test predictions are gone."""
    summary: dict[str, Any] = {}
    order = [e.label for e in suite.models if any(r["label"] == e.label for r in results["runs"])]
    for variant in [str(v) for v in suite.variant_values]:
        if variant not in results["tuning"]:
            continue
        models: dict[str, Any] = {}
        tasks: list[str] = []
        for label in order:
            runs = final_runs(results, variant, label)
            ok = [r for r in runs if not r.get("error")]
            errors = [r["error"] for r in runs if r.get("error")]
            entry: dict[str, Any] = {"seeds": len(ok), "errors": errors, "ablation": runs[0]["ablation"] if runs else False,
                                     "hparams": results["tuning"][variant].get(label, {}).get("chosen")}
            if ok:
                tasks = tasks or list(ok[0]["test"])
                entry["tasks"] = {}
                for t in ok[0]["test"]:
                    per = {}
                    for metric in ("auc", "gauc", "logloss"):
                        mean, std = _nan_stats([r["test"][t].get(metric, float("nan")) for r in ok])
                        per[metric] = {"mean": mean, "std": std}
                    entry["tasks"][t] = per
                for field in ("params", "flops_per_sample", "train_samples_per_s", "infer_candidates_per_s",
                              "epochs", "best_epoch", "train_seconds"):
                    entry[field] = _nan_stats([float(r[field]) for r in ok if r.get(field) is not None])[0]
                # the best validation epoch is the last one trained: more epochs might still have helped
                entry["not_converged"] = sum(1 for r in ok if r.get("epochs") and r.get("best_epoch") == r["epochs"])
            models[label] = entry
        block = {"models": models, "tasks": tasks}
        oracle = (labels.get(variant) or {}).get("oracle")
        if oracle:
            block["oracle"] = {t: oracle[t] for t in tasks if t in oracle}
        pairs = _against_every_baseline(results, suite, variant, models, tasks, predictions, labels)
        earlier = ((previous or {}).get(variant) or {}).get("against_every_baseline") or {}
        for baseline, per_task in pairs.items():
            for t, comparison in per_task.items():
                kept = ((earlier.get(baseline) or {}).get(t) or {}).get("bootstrap_auc")
                if "bootstrap_auc" not in comparison and kept and comparison["seeds"] == earlier[baseline][t]["seeds"]:
                    comparison["bootstrap_auc"] = kept
        block["significance"] = _against_the_best_baseline(models, tasks, pairs)
        block["against_every_baseline"] = pairs
        block["negative_transfer"] = _negative_transfer(suite, models, tasks)
        block["ablations"] = _ablations_against_their_base(results, suite, variant, models, tasks, predictions, labels)
        summary[variant] = block
    return summary


def _baselines(suite, models: dict[str, Any]) -> list[str]:
    return [m for m, e in models.items() if m != suite.proposed and not e["ablation"] and "tasks" in e]


def _against_the_best_baseline(models: dict[str, Any], tasks: list[str], pairs: dict[str, Any]) -> dict[str, Any]:
    """Per task: the comparison (from ``pairs``) with the baseline of the best mean test AUC, the strongest
    competitor."""
    if not pairs:
        return {}
    out: dict[str, Any] = {}
    for t in tasks:
        best = max(pairs, key=lambda m: models[m]["tasks"][t]["auc"]["mean"])
        out[t] = {"best_baseline": best, **pairs[best][t]}
    return out


def _against_every_baseline(results, suite, variant, models, tasks, predictions, labels) -> dict[str, Any]:
    """{baseline: {task: comparison}}: the proposed model against each baseline, not only the strongest (e.g. the
    Transformer encoder + MoE heads, the decoupled design OneRank argues against)."""
    if suite.proposed not in models or "tasks" not in models[suite.proposed]:
        return {}
    return {
        m: {t: _paired_comparison(results, suite, variant, models, t, m, predictions, labels) for t in tasks}
        for m in _baselines(suite, models)
    }


def _paired_comparison(results, suite, variant, models, task, baseline, predictions, labels) -> dict[str, Any]:
    """The proposed model against ``baseline`` on ``task``: mean AUCs, their difference, the paired t-tests over the
    matched seeds (AUC, GAUC) and the paired user-level bootstrap of the seed-averaged AUC difference."""
    proposed_runs = {r["seed"]: r for r in final_runs(results, variant, suite.proposed) if not r.get("error")}
    base_runs = {r["seed"]: r for r in final_runs(results, variant, baseline) if not r.get("error")}
    seeds = sorted(set(proposed_runs) & set(base_runs))
    p_auc = models[suite.proposed]["tasks"][task]["auc"]["mean"]
    b_auc = models[baseline]["tasks"][task]["auc"]["mean"]
    entry: dict[str, Any] = {
        "proposed_auc": p_auc,
        "baseline_auc": b_auc,
        "delta_auc": p_auc - b_auc,
        "relative_gain_auc_pct": 100.0 * (p_auc - b_auc) / b_auc if b_auc else float("nan"),
        "seeds": seeds,
        "t_test_auc": paired_t([proposed_runs[s]["test"][task]["auc"] for s in seeds],
                               [base_runs[s]["test"][task]["auc"] for s in seeds]),
    }
    if "gauc" in models[baseline]["tasks"][task] and not math.isnan(models[baseline]["tasks"][task]["gauc"]["mean"]):
        entry["t_test_gauc"] = paired_t([proposed_runs[s]["test"][task].get("gauc", float("nan")) for s in seeds],
                                        [base_runs[s]["test"][task].get("gauc", float("nan")) for s in seeds])
    keys_p = [proposed_runs[s]["key"] for s in seeds]
    keys_b = [base_runs[s]["key"] for s in seeds]
    data = labels.get(variant)
    if data is not None and all(k in predictions for k in keys_p + keys_b) and seeds:
        mask = data["mask"][task]
        users = data["user"][mask] if data["user"] is not None else None
        entry["bootstrap_auc"] = paired_bootstrap_auc(
            data["labels"][task][mask], [predictions[k][task][mask] for k in keys_p],
            [predictions[k][task][mask] for k in keys_b], clusters=users, resamples=suite.bootstrap,
        )
        entry["bootstrap_auc"]["clusters"] = "users" if users is not None else "impressions"
    return entry


def _ablations_against_their_base(results, suite, variant, models, tasks, predictions, labels) -> dict[str, Any]:
    """{ablation: {"base": label, "tasks": {task: comparison}}}: each ablation against the row it changes (its
    model's own row, else the proposed model's), on matched seeds: mean AUC / GAUC differences and the paired
    user-level bootstraps of both."""
    from onerank.benchmarking.suite import ablation_base

    data = labels.get(variant)
    out: dict[str, Any] = {}
    for entry in suite.models:
        base = ablation_base(suite, entry)
        if not entry.ablation or "tasks" not in models.get(entry.label, {}) or "tasks" not in models.get(base, {}):
            continue
        runs = {r["seed"]: r for r in final_runs(results, variant, entry.label) if not r.get("error")}
        base_runs = {r["seed"]: r for r in final_runs(results, variant, base) if not r.get("error")}
        seeds = sorted(set(runs) & set(base_runs))
        keys = [runs[s]["key"] for s in seeds], [base_runs[s]["key"] for s in seeds]
        per_task = {}
        for t in tasks:
            mine, theirs = models[entry.label]["tasks"][t], models[base]["tasks"][t]
            comparison: dict[str, Any] = {"seeds": seeds, "delta_auc": mine["auc"]["mean"] - theirs["auc"]["mean"],
                                          "delta_gauc": mine["gauc"]["mean"] - theirs["gauc"]["mean"]}
            if data is not None and seeds and all(k in predictions for k in keys[0] + keys[1]):
                mask = data["mask"][t]
                y = data["labels"][t][mask]
                a = [predictions[k][t][mask] for k in keys[0]]
                b = [predictions[k][t][mask] for k in keys[1]]
                users = data["user"][mask] if data["user"] is not None else None
                comparison["bootstrap_auc"] = paired_bootstrap_auc(y, a, b, clusters=users, resamples=suite.bootstrap)
                if users is not None:
                    comparison["bootstrap_gauc"] = paired_bootstrap_gauc(y, a, b, users, resamples=suite.bootstrap)
            per_task[t] = comparison
        out[entry.label] = {"base": base, "tasks": per_task}
    return out


def _negative_transfer(suite, models, tasks) -> dict[str, Any]:
    """Per multi-task model and task: mean test AUC minus the single-task reference's (negative = negative transfer)."""
    ref = models.get(suite.reference)
    if not ref or "tasks" not in ref:
        return {}
    out = {}
    for m, e in models.items():
        if m == suite.reference or "tasks" not in e or e["ablation"]:
            continue
        gains = {t: e["tasks"][t]["auc"]["mean"] - ref["tasks"][t]["auc"]["mean"] for t in tasks}
        out[m] = {"auc_gain": gains, "seesaw": any(g > 0 for g in gains.values()) and any(g < 0 for g in gains.values())}
    return out


# ---- Markdown ---------------------------------------------------------------------------------------------------------
def _fmt(mean: float, std: float | None = None, digits: int = 4) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if std is None or math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f} M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f} k"
    return f"{x:,.{digits}f}"


def _p(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _name(label: str, entry: dict, seeds: int, proposed: str) -> str:
    """The row name; a model with fewer finished seeds than the suite asks for says so."""
    name = f"**{label}**" if label == proposed else label
    return name if entry.get("seeds", seeds) >= seeds or "tasks" not in entry else f"{name} (n = {entry['seeds']} seeds)"


def main_table(block: dict, proposed: str, seeds: int, include_ablations: bool = False,
               timings: bool = True) -> list[str]:
    """Mean ± std over seeds of each task's test AUC and GAUC; the best mean per column in bold; last, where the
    dataset knows its true probabilities, the oracle's row. ``timings=False`` leaves out the two throughput columns
    (parameters and FLOPs per sample do not depend on the machine's load, so they stay)."""
    models, tasks = block["models"], block["tasks"]
    labels = [m for m, e in models.items() if include_ablations or not e["ablation"]]
    metrics = [(t, m) for t in tasks for m in ("auc", "gauc")
               if any("tasks" in models[l] and not math.isnan(models[l]["tasks"][t][m]["mean"]) for l in labels)]
    best = {}
    for t, m in metrics:
        vals = [models[l]["tasks"][t][m]["mean"] for l in labels if "tasks" in models[l]]
        best[(t, m)] = max(v for v in vals if not math.isnan(v))
    header = ["model"] + [f"{t} {m.upper()}" for t, m in metrics] + [
        "params", "FLOPs/sample", *(["train samples/s", "infer cand./s"] if timings else []), "epochs (best)"]
    rows = []
    for l in labels:
        e = models[l]
        name = _name(l, e, seeds, proposed)
        if "tasks" not in e:
            status = ("failed: " + "; ".join(e["errors"])[:120]) if e["errors"] else "not run"
            rows.append([name] + [status] + [""] * (len(header) - 2))
            continue
        row = [name]
        for t, m in metrics:
            s = e["tasks"][t][m]
            cell = _fmt(s["mean"], s["std"])
            row.append(f"**{cell}**" if s["mean"] == best[(t, m)] else cell)
        row += [_num(e["params"]), _num(e["flops_per_sample"]),
                *([_num(e["train_samples_per_s"]), _num(e["infer_candidates_per_s"])] if timings else []),
                f"{e['epochs']:.1f} ({e['best_epoch']:.1f})"]
        rows.append(row)
    oracle = block.get("oracle")
    if oracle:
        rows.append(["*oracle (true probabilities)*"] + [_fmt(oracle[t].get(m, float("nan"))) for t, m in metrics]
                    + [""] * (len(header) - 1 - len(metrics)))
    return _table(header, rows)


def tuning_table(tuning: dict[str, Any]) -> list[str]:
    """One model's grid (``results["tuning"][variant][label]``): each point's values and its seed-0 validation
    monitor, the chosen point marked."""
    grid = tuning.get("grid") or []
    keys = list(dict.fromkeys(k for point in grid for k in point["hparams"]))
    rows = [[str(point["hparams"].get(k, "")) for k in keys]
            + [_fmt(point["valid_monitor"] if point["valid_monitor"] is not None else float("nan")),
               "chosen" if point["hparams"] == tuning.get("chosen") else ""] for point in grid]
    return _table(keys + ["validation monitor (seed 0)", ""], rows) if rows else []


def oracle_gap_table(block: dict, proposed: str, seeds: int) -> list[str]:
    """Per model and ablation: the oracle's test AUC minus the model's mean (smaller is better)."""
    oracle, models, tasks = block.get("oracle"), block["models"], block["tasks"]
    if not oracle:
        return []
    rows = [[_name(m, e, seeds, proposed)] + [f"{oracle[t]['auc'] - e['tasks'][t]['auc']['mean']:.4f}" for t in tasks]
            for m, e in models.items() if "tasks" in e]
    return _table(["model"] + [f"{t} gap (oracle {oracle[t]['auc']:.4f})" for t in tasks], rows)


def convergence_lines(block: dict) -> list[str]:
    """One line per model whose best validation epoch was the last one trained in some seed."""
    late = [(m, e) for m, e in block["models"].items() if e.get("not_converged")]
    if not late:
        return ["Every run converged: its best validation epoch came before its last epoch."]
    return ["Not converged (best validation epoch = the last epoch trained, so more epochs might still help): "
            + ", ".join(f"{m} ({e['not_converged']} of {e['seeds']} seeds)" for m, e in late) + "."]


def significance_table(block: dict, proposed: str) -> list[str]:
    sig = block["significance"]
    if not sig:
        return []
    header = ["task", "best baseline", f"{proposed} AUC", "baseline AUC", "ΔAUC", "rel. gain",
              "t-test p (AUC, seeds)", "t-test p (GAUC, seeds)", "bootstrap ΔAUC [95 % CI]", "bootstrap p"]
    rows = []
    for t, s in sig.items():
        boot = s.get("bootstrap_auc") or {}
        bp = boot.get("p", float("nan"))
        rows.append([
            t, s["best_baseline"], _fmt(s["proposed_auc"]), _fmt(s["baseline_auc"]),
            f"{s['delta_auc']:+.4f}", f"{s['relative_gain_auc_pct']:+.2f} %",
            _p(s["t_test_auc"]["p"]), _p((s.get("t_test_gauc") or {}).get("p")),
            f"{boot['delta']:+.4f} [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]" if boot else "-",
            (_p(bp) + significance_mark(bp)) if boot else "-",
        ])
    return _table(header, rows)


def pairwise_table(block: dict, proposed: str) -> list[str]:
    """One row per baseline: the proposed model's ΔAUC on each task with the paired bootstrap's 95 % interval and
    p-value."""
    pairs = block.get("against_every_baseline") or {}
    if not pairs:
        return []
    tasks = block["tasks"]
    header = ["baseline"] + [f"{t} ΔAUC [95 % CI] (bootstrap p)" for t in tasks]
    rows = []
    for baseline, per_task in pairs.items():
        row = [baseline]
        for t in tasks:
            c = per_task[t]
            boot = c.get("bootstrap_auc") or {}
            bp = boot.get("p")
            interval = f" [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]" if "ci_low" in boot else ""
            row.append(f"{c['delta_auc']:+.4f}{interval}" + (f" ({_p(bp)}{significance_mark(bp)})" if bp is not None
                                                             else ""))
        rows.append(row)
    return _table(header, rows)


def negative_transfer_table(block: dict, reference: str) -> list[str]:
    nt = block["negative_transfer"]
    if not nt:
        return []
    tasks = block["tasks"]
    header = ["model"] + [f"{t} ΔAUC vs {reference}" for t in tasks] + ["seesaw"]
    rows = [[m] + [f"{e['auc_gain'][t]:+.4f}" for t in tasks] + ["yes" if e["seesaw"] else ""] for m, e in nt.items()]
    return _table(header, rows)


def ablation_table(block: dict, proposed: str, seeds: int) -> list[str]:
    """Each ablation under the row it changes: mean ± std test AUC (and GAUC where defined) per task, the difference
    from that row and the paired bootstrap p (over test users)."""
    models, tasks = block["models"], block["tasks"]
    comparisons = block.get("ablations") or {}
    bases = list(dict.fromkeys(c["base"] for c in comparisons.values()))
    if not bases:
        return []
    metrics = [m for m in ("auc", "gauc") if any(not math.isnan(models[b]["tasks"][t][m]["mean"])
                                                    for b in bases for t in tasks)]
    header = ["variant"] + [f"{t} {m.upper()}" for t in tasks for m in metrics]
    rows = []
    for base in bases:
        full = models[base]["tasks"]
        rows.append([f"{base} (base)"] + [_fmt(full[t][m]["mean"], full[t][m]["std"]) for t in tasks for m in metrics])
        for label, c in comparisons.items():
            if c["base"] != base:
                continue
            row = [_name(label, models[label], seeds, proposed)]
            for t in tasks:
                for m in metrics:
                    s, boot = models[label]["tasks"][t][m], c["tasks"][t].get(f"bootstrap_{m}") or {}
                    p = f", p {_p(boot['p'])}{significance_mark(boot['p'])}" if boot else ""
                    row.append(f"{_fmt(s['mean'], s['std'])} ({c['tasks'][t][f'delta_{m}']:+.4f}{p})")
            rows.append(row)
    failed = [m for m, e in models.items() if e["ablation"] and "tasks" not in e]
    for m in failed:
        status = ("failed: " + "; ".join(models[m]["errors"])[:120]) if models[m]["errors"] else "not run"
        rows.append([m, status] + [""] * (len(header) - 2))
    return _table(header, rows)


def sweep_tables(results: dict, option: str) -> list[str]:
    """Per task: test AUC by variant (and the oracle's), then, where there is an oracle, the gap to it by variant."""
    summary = results["summary"]
    variants = list(summary)
    if len(variants) < 2:
        return []
    tasks = summary[variants[0]]["tasks"]
    labels = list(summary[variants[0]]["models"])
    has_oracle = all(summary[v].get("oracle") for v in variants)
    header = ["model"] + [f"{option} = {v}" for v in variants]

    def rows(cell) -> list[list[str]]:
        """One row per model, ``cell(variant, task AUC stats)`` per variant ("-" where the model did not run)."""
        return [[label] + [cell(v, e["tasks"][t]["auc"]) if "tasks" in e else "-"
                           for v in variants for e in [summary[v]["models"].get(label, {})]] for label in labels]

    lines = []
    for t in tasks:
        auc_rows = rows(lambda v, auc: _fmt(auc["mean"], auc["std"]))
        if has_oracle:
            auc_rows.append(["*oracle*"] + [_fmt(summary[v]["oracle"][t]["auc"]) for v in variants])
        lines += [f"Test AUC of `{t}` (mean ± std over seeds) by {option}:", "", *_table(header, auc_rows), ""]
        if has_oracle:
            gap_rows = rows(lambda v, auc: f"{summary[v]['oracle'][t]['auc'] - auc['mean']:.4f}")
            lines += [f"Gap to the oracle on `{t}` (oracle AUC minus mean test AUC; smaller is better) by {option}:",
                      "", *_table(header, gap_rows), ""]
    return lines


def code_line(results: dict) -> str:
    """Which code made the runs: the onerank version and the git commit(s) recorded with them."""
    code = results.get("code")
    commits: dict[str, int] = {}
    for r in results["runs"]:
        if r.get("git_commit"):
            commits[r["git_commit"][:10]] = commits.get(r["git_commit"][:10], 0) + 1
    if not code and not commits:
        return "* code: not recorded (these results predate the version and commit record)"
    version = f"onerank {code['onerank']}" if code else "onerank (version not recorded)"
    made = ", ".join(f"`{c}` ({n} runs)" for c, n in commits.items()) or "not recorded"
    dirty = " (with uncommitted changes)" if code and code.get("git_dirty") else ""
    return f"* code: {version}; runs made at commit {made}{dirty}"


def render_markdown(results: dict, suite, plots: list[str] | None = None, image_prefix: str = "") -> str:
    """The suite's section of BENCHMARKS.md. ``plots`` are file names in the results folder; ``image_prefix`` is that
    folder as seen from where the Markdown is read ("" for OUT/report.md, e.g. "benchmarks/results/NAME/" for a
    page at the repository root), so every image link resolves."""
    out = [f"### Suite `{results['suite']}` (dataset `{results['dataset']}`)", ""]
    if results.get("description"):
        out += [results["description"], ""]
    out += [
        f"* suite file `{results['suite_file']}`, sha256 `{results['suite_sha256']}`",
        f"* command: `{results.get('command')}`",
        f"* seeds: {results['seeds']}; tuning grid (seed 0, validation monitor): "
        f"{suite.tuning or 'none'}; shared trainer settings: {suite.train}",
    ]
    if suite.model_tuning:
        entries = {e.label: e for e in suite.models}
        sizes = {label: suite.points_searched(entries[label]) for label in suite.model_tuning}
        grids = [f"{label} {axes} ({sizes[label]} point{'s' if sizes[label] > 1 else ''})"
                 for label, axes in suite.model_tuning.items()]
        how = ("searched coordinate-wise: first the model's own grid at the first value of each axis of the tuning "
               "grid above, then that grid at the chosen own values" if suite.tuning_search == "coordinate"
               else "each times the tuning grid above")
        out.append(f"* per-model grids, {how} (a TrainConfig field is a trainer setting, any other key a model "
                   "option): " + "; ".join(grids))
    wall = (f"* wall time: {results.get('wall_seconds', 0) / 60:.1f} min on {results['machine']['cpu_count']} CPU cores "
            f"(torch {results['machine']['torch']}, {results['machine']['cuda'] or 'no GPU'})")
    if not suite.timings:
        wall += "; not a cost measurement: the runs shared the machine with other jobs"
        out.append("* timings: not published for this suite (no train samples/s, no inference candidates/s): its runs "
                   "shared the machine with other jobs, so they would measure the load, not the models; for cost see "
                   "`benchmarks/throughput.py` (docs/scaling.md). Parameters and FLOPs/sample do not depend on the load.")
    out += [wall, code_line(results), ""]
    for variant, block in results["summary"].items():
        title = f"{suite.variant_option} = {variant}" if suite.variant_option else "test split"
        out += [f"#### {title}", "", *main_table(block, suite.proposed, results["seeds"], timings=suite.timings), ""]
        out += [*convergence_lines(block), ""]
        chosen = {m: e["hparams"] for m, e in block["models"].items() if not e["ablation"]}
        out += ["Chosen on validation: " + ", ".join(f"{m} {h}" for m, h in chosen.items()), ""]
        for label in [m for m in chosen if m in suite.model_tuning]:
            grid = tuning_table(results["tuning"].get(variant, {}).get(label, {}))
            if grid:
                how = "coordinate search" if suite.tuning_search == "coordinate" else "its grid times the suite's"
                out += [f"Tuning of {label} ({how}; seed 0, validation):", "", *grid, ""]
        sig = significance_table(block, suite.proposed)
        if sig:
            out += [f"{suite.proposed} against the best baseline per task (by mean test AUC):", "", *sig, ""]
        pairs = pairwise_table(block, suite.proposed)
        if len(pairs) > 3:  # more than one baseline
            clusters = next((c["bootstrap_auc"]["clusters"] for per_task in block["against_every_baseline"].values()
                             for c in per_task.values() if c.get("bootstrap_auc")), "users")
            out += [f"{suite.proposed} against every baseline (ΔAUC = {suite.proposed} minus baseline, mean over "
                    f"seeds; 95 % interval and p of the paired bootstrap over test {clusters}):", "", *pairs, ""]
        nt = negative_transfer_table(block, suite.reference)
        if nt:
            out += [f"Negative transfer: mean test AUC minus `{suite.reference}`'s (same DNN encoder):", "", *nt, ""]
        ab = ablation_table(block, suite.proposed, results["seeds"])
        if ab:
            out += ["Ablations, each at its base row's chosen tuning point (its own options win); in brackets the difference from the base "
                    "(mean over seeds) and the p of the paired bootstrap over test users (* p < 0.05, ** p < 0.01):",
                    "", *ab, ""]
        gap = oracle_gap_table(block, suite.proposed, results["seeds"])
        if gap:
            out += ["Gap to the oracle (its test AUC minus each model's mean; the oracle is the generator's own "
                    "probability, a ceiling):", "", *gap, ""]
    out += sweep_tables(results, suite.variant_option or "variant")
    for p in plots or []:
        out += [f"![{p}]({image_prefix}{p})", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# Publishing: the report written into a docs page (e.g. BENCHMARKS.md) between the suite's two marker lines
# ---------------------------------------------------------------------------------------------------------------------
def publish_report(page: Path, results: dict, suite, plots: list[str], out_dir: Path) -> None:
    """The suite's report into ``page``, its image links relative to the page (the figures stay in ``out_dir``)."""
    prefix = Path(os.path.relpath(Path(out_dir).resolve(), page.resolve().parent)).as_posix() + "/"
    publish_section(page, suite.name, render_markdown(results, suite, plots, image_prefix=prefix))


def section_markers(suite_name: str) -> tuple[str, str]:
    return f"<!-- onerank benchmark {suite_name}: begin -->", f"<!-- onerank benchmark {suite_name}: end -->"


def check_page(page: Path, suite_name: str) -> str:
    """The page's text, once it is known to hold the suite's two markers in order."""
    begin, end = section_markers(suite_name)
    text = page.read_text() if page.is_file() else ""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"--publish {page}: the page needs one line {begin!r} and, after it, one line {end!r} "
                         "around the place of the suite's tables")
    return text


def publish_section(page: str | Path, suite_name: str, markdown: str) -> None:
    """Replace the text between the suite's two marker lines of ``page`` by ``markdown``; the rest of the page (the
    analysis written around the tables) is kept as it is."""
    page = Path(page)
    text = check_page(page, suite_name)
    begin, end = section_markers(suite_name)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
