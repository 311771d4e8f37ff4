"""The suite's figures (matplotlib, Agg backend), written next to results.json: training curves, gradient cosines,
AUC against task correlation, ablation bars."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from onerank.benchmarking.report import final_runs  # noqa: E402


def _subplots(n: int, width: float = 4.2, height: float = 3.2):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def training_curves(results: dict, variant: str, out_dir: Path, suffix: str = "") -> str | None:
    block = results["summary"][variant]
    tasks, labels = block["tasks"], [m for m, e in block["models"].items() if not e["ablation"]]
    if not tasks:
        return None
    fig, axes = _subplots(len(tasks))
    for label in labels:
        runs = [r for r in final_runs(results, variant, label) if not r.get("error") and r["seed"] == 0]
        if not runs:
            continue
        history = runs[0]["history"]
        for ax, t in zip(axes, tasks):
            ax.plot([h["epoch"] for h in history], [h["valid"][t].get("auc", math.nan) for h in history],
                    marker="o", label=label)
    for ax, t in zip(axes, tasks):
        ax.set_title(f"{t}: validation AUC (seed 0)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    return _save(fig, out_dir / f"training_curves{suffix}.png")


def gradient_cosine(results: dict, variant: str, out_dir: Path, suffix: str = "") -> str | None:
    block = results["summary"][variant]
    labels = [m for m, e in block["models"].items() if not e["ablation"]]
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for label in labels:
        runs = [r for r in final_runs(results, variant, label) if not r.get("error") and r["seed"] == 0]
        if not runs:
            continue
        for h in runs[0]["history"]:
            for pair, cos in (h.get("gradient_cosine") or {}).items():
                series.setdefault(pair, {}).setdefault(label, []).append((h["epoch"], cos))
    # a model without shared parameters (single_task) has all-zero cosines: nothing to show
    series = {p: {m: v for m, v in s.items() if any(abs(c) > 1e-9 for _, c in v)} for p, s in series.items()}
    series = {p: s for p, s in series.items() if s}
    if not series:
        return None
    fig, axes = _subplots(len(series))
    for ax, (pair, per_model) in zip(axes, series.items()):
        for label, points in per_model.items():
            ax.plot([e for e, _ in points], [c for _, c in points], marker="o", label=label)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(f"cos(grad {pair.replace('|', ', grad ')})")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    return _save(fig, out_dir / f"gradient_cosine{suffix}.png")


def auc_vs_correlation(results: dict, option: str, out_dir: Path) -> str | None:
    summary = results["summary"]
    variants = list(summary)
    if len(variants) < 2:
        return None
    tasks = summary[variants[0]]["tasks"]
    labels = [m for m, e in summary[variants[0]]["models"].items() if not e["ablation"]]
    xs = [float(v) for v in variants]
    fig, axes = _subplots(len(tasks))
    for ax, t in zip(axes, tasks):
        for label in labels:
            points = [(x, summary[v]["models"][label]["tasks"][t]["auc"]) for x, v in zip(xs, variants)
                      if "tasks" in summary[v]["models"].get(label, {})]
            ax.errorbar([x for x, _ in points], [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points],
                        marker="o", capsize=2, label=label)
        ax.set_title(f"{t}: test AUC")
        ax.set_xlabel(option)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    return _save(fig, out_dir / "auc_vs_correlation.png")


def ablation_bars(results: dict, variant: str, out_dir: Path) -> str | None:
    """Test AUC of each ablation beside the row it changes (red)."""
    block = results["summary"][variant]
    models, tasks = block["models"], block["tasks"]
    comparisons = block.get("ablations") or {}
    bases = list(dict.fromkeys(c["base"] for c in comparisons.values()))
    labels = [m for base in bases for m in [base] + [a for a, c in comparisons.items() if c["base"] == base]]
    if not labels:
        return None
    fig, axes = _subplots(len(tasks), width=4.6, height=3.6)
    for ax, t in zip(axes, tasks):
        means = [models[m]["tasks"][t]["auc"]["mean"] for m in labels]
        stds = [models[m]["tasks"][t]["auc"]["std"] for m in labels]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3,
               color=["tab:red" if m in bases else "tab:blue" for m in labels])
        lo, hi = min(means) - 2 * max(stds + [1e-4]), max(means) + 2 * max(stds + [1e-4])
        ax.set_ylim(lo, hi)
        ax.set_xticks(range(len(labels)))
        short = [m.replace(f"{comparisons[m]['base']}[", "[") if m in comparisons else m for m in labels]
        ax.set_xticklabels(short, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{t}: test AUC")
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_dir / "ablations.png")


def negative_transfer(results: dict, variant: str, reference: str, out_dir: Path, suffix: str = "") -> str | None:
    """Per task, each multi-task model's mean test AUC minus the single-task reference's: the seesaw at a glance."""
    block = results["summary"][variant]
    gains, tasks = block["negative_transfer"], block["tasks"]
    if not gains:
        return None
    models = list(gains)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(tasks) + 0.3 * len(models), 3.4))
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [gains[m]["auc_gain"][t] for t in tasks], width, label=m)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel(f"test AUC - {reference}")
    ax.set_title("gain over single-task models (below 0: negative transfer)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / f"negative_transfer{suffix}.png")


def make_plots(results: dict, suite, out_dir: str | Path) -> list[str]:
    """Every figure that applies to the suite; returns the file names (relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = list(results["summary"])
    made = []
    if len(variants) > 1:
        made.append(auc_vs_correlation(results, suite.variant_option, out_dir))
    for variant in variants:
        suffix = "" if len(variants) == 1 else f"_{suite.variant_option}={variant}"
        made.append(training_curves(results, variant, out_dir, suffix))
        made.append(gradient_cosine(results, variant, out_dir, suffix))
        made.append(negative_transfer(results, variant, suite.reference, out_dir, suffix))
    made.append(ablation_bars(results, variants[0], out_dir) if variants else None)
    return [m for m in made if m]
