"""Figures of a fusion fit: reliability curves before / after calibration, and the Pareto front across tasks."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from onerank.fusion.search import pareto_front


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_plot(curves: dict[str, dict[str, dict]], path: str | Path, split: str = "test") -> Path:
    """``curves``: task -> {"before" | method: reliability curve}; one panel per task, the diagonal for reference."""
    plt = _pyplot()
    tasks = list(curves)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        top = 0.0
        for label, curve in curves[task].items():
            x, y = np.asarray(curve["mean_prediction"]), np.asarray(curve["positive_rate"])
            ax.plot(x, y, marker="o", ms=3, label=f"{label} (ECE {curve['ece']:.4f})")
            top = max(top, float(x.max()), float(y.max()))
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="calibrated")
        ax.set(title=f"{task} ({split}, equal-mass bins)", xlabel="mean predicted probability",
               ylabel="observed rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def pareto_plot(traces: dict[str, list[dict]], named: dict[str, dict[str, float]], tasks: list[str],
                path: str | Path, split: str = "valid") -> Path:
    """Per pair of tasks, every fusion the search evaluated (one point: the fused score's GAUC on each task), the
    Pareto front over all tasks circled, and the named fusions (uniform, single tasks, the fitted ones) marked."""
    plt = _pyplot()
    pairs = list(itertools.combinations(tasks, 2)) or [(tasks[0], tasks[0])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.2), squeeze=False)
    cloud = [(form, point) for form, trace in traces.items() for point in trace]
    points = np.array([[p["gauc"][t] for t in tasks] for _, p in cloud]) if cloud else np.zeros((0, len(tasks)))
    front = pareto_front(points)
    for ax, (a, b) in zip(axes[0], pairs):
        ia, ib = tasks.index(a), tasks.index(b)
        for form in traces:
            rows = np.array([f == form for f, _ in cloud])
            ax.scatter(points[rows, ia], points[rows, ib], s=5, alpha=0.3, label=f"{form} (search)")
        ax.scatter(points[front, ia], points[front, ib], s=18, facecolors="none", edgecolors="black", lw=0.7,
                   label="Pareto front (all tasks)")
        for name, gaucs in named.items():
            ax.scatter([gaucs[a]], [gaucs[b]], marker="*", s=90, label=name)
            ax.annotate(name, (gaucs[a], gaucs[b]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"GAUC of the fused score on {a}", ylabel=f"GAUC of the fused score on {b}",
               title=f"{a} vs {b} ({split})")
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
