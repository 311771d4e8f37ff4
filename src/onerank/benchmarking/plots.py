"""The suite's figures (matplotlib, Agg backend), written next to results.json: training curves, gradient cosines,
test AUC (and the gap to the oracle) against the swept option, OneRank's ablation bars, negative transfer.

Every figure draws a model with the same colour and marker (``style``: a fixed map, so a reader can compare figures
and suites at a glance), shows the spread over seeds (error bars or bands of one standard deviation), keeps its
legend outside the axes and puts epochs on whole-number ticks.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from onerank.benchmarking.report import final_runs  # noqa: E402

# One (colour, marker) per model of the zoo, never shared; ablations of OneRank are dashed, in their own colours.
MODEL_STYLES: dict[str, tuple[str, str]] = {
    "single_task": ("#7f7f7f", "o"),
    "shared_bottom": ("#8c564b", "s"),
    "omoe": ("#bcbd22", "v"),
    "mmoe": ("#1f77b4", "^"),
    "ple": ("#2ca02c", "D"),
    "esmm": ("#9467bd", "P"),
    "aitm": ("#e377c2", "X"),
    "stem": ("#17becf", "<"),
    "dtrn": ("#ff7f0e", ">"),
    "dtrn_mmoe": ("#aec7e8", "h"),
    "dtrn_ple": ("#98df8a", "H"),
    "transformer_mmoe": ("#393b79", "p"),
    "transformer_ple": ("#637939", "*"),
    "onerank": ("#d62728", "o"),
    "esmm_gru": ("#6a3d9a", "d"),
    "heroes": ("#b15928", "8"),
}
ABLATION_STYLES: dict[str, tuple[str, str]] = {
    "cross_task=none": ("#ff9896", "s"),
    "cross_task=parallel": ("#c49c94", "^"),
    "detach_cross_task=false": ("#1b9e77", "D"),
    "contextualization=off": ("#843c39", "v"),
    "contextualization=mean_pool": ("#7570b3", "<"),
    "listwise=0": ("#e6ab02", "P"),
    "task_token_input=template": ("#66a61e", "X"),
    "task_tokens=shared": ("#a6761d", ">"),
    "attention=full": ("#525252", "h"),
    # HEROES' parts (docs/heroes.md)
    "gate=false": ("#fdbf6f", "s"),
    "top_down=false": ("#cab2d6", "^"),
    "unit=hawkes": ("#b2df8a", "D"),
}
_FALLBACK = [("#000000", "o"), ("#5254a3", "s"), ("#8ca252", "^"), ("#bd9e39", "D"), ("#6b6ecf", "v")]
ORACLE_STYLE = {"color": "black", "marker": "*", "linestyle": ":", "markersize": 9}


_VARIANT_TINTS = (0.45, 0.65, 0.3)  # how far a variant's colour moves from its base model's towards white
_VARIANT_MARKERS = ("x", "d", "p", "*", "8")


def style(label: str) -> dict:
    """Matplotlib keywords for ``label``: the same in every figure of every suite."""
    if label in MODEL_STYLES:
        colour, marker = MODEL_STYLES[label]
        return {"color": colour, "marker": marker, "linestyle": "-"}
    inner = label[label.find("[") + 1:-1] if label.endswith("]") and "[" in label else label
    if inner in ABLATION_STYLES:
        colour, marker = ABLATION_STYLES[inner]
        return {"color": colour, "marker": marker, "linestyle": "--"}
    digest = int(hashlib.sha1(label.encode()).hexdigest(), 16)
    base = _base_model(label)
    if base is not None:
        # a variant of a zoo model (``mmoe+distil``, ``onerank[dim=64]``): a lighter shade of its model's colour,
        # so that with / without pairs read together and two models' variants never share one fallback colour
        tint = _VARIANT_TINTS[digest % len(_VARIANT_TINTS)]
        rgb = np.array(matplotlib.colors.to_rgb(MODEL_STYLES[base][0]))
        colour = matplotlib.colors.to_hex(rgb + (1.0 - rgb) * tint)
        marker = _VARIANT_MARKERS[digest // len(_VARIANT_TINTS) % len(_VARIANT_MARKERS)]
        return {"color": colour, "marker": marker, "linestyle": "--"}
    colour, marker = _FALLBACK[digest % len(_FALLBACK)]
    return {"color": colour, "marker": marker, "linestyle": "--"}


def _base_model(label: str) -> str | None:
    """The zoo model of a variant label (``ple+distil``, ``onerank[dim=64]``), else None."""
    return next((m for m in MODEL_STYLES if label.startswith((m + "+", m + "["))), None)


def _subplots(rows: int, cols: int, width: float = 4.2, height: float = 3.2):
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


def _save(fig, axes, path: Path) -> str:
    """Legend outside the axes (to the right, one entry per label), then write the PNG."""
    handles, labels = {}, []
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.tight_layout()
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=7, frameon=False)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _per_epoch(histories: list[list[dict]], value) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds of ``value(h)`` at each epoch (seeds that stopped earlier drop out)."""
    epochs = sorted({h["epoch"] for hist in histories for h in hist})
    means, stds = [], []
    for e in epochs:
        vals = [v for hist in histories for h in hist if h["epoch"] == e
                for v in [value(h)] if v is not None and not math.isnan(v)]
        means.append(float(np.mean(vals)) if vals else math.nan)
        stds.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
    return epochs, means, stds


def _band(ax, xs, means, stds, label: str) -> None:
    kw = style(label)
    ax.plot(xs, means, label=label, **kw)
    lo, hi = np.subtract(means, stds), np.add(means, stds)
    ax.fill_between(xs, lo, hi, color=kw["color"], alpha=0.15, linewidth=0)


def _histories(results: dict, variant: str, label: str) -> list[list[dict]]:
    return [r["history"] for r in final_runs(results, variant, label) if not r.get("error") and r.get("history")]


def training_curves(results: dict, variant: str, out_dir: Path, suffix: str = "") -> str | None:
    block = results["summary"][variant]
    tasks, labels = block["tasks"], [m for m, e in block["models"].items() if not e["ablation"]]
    if not tasks:
        return None
    fig, axes = _subplots(1, len(tasks))
    for label in labels:
        histories = _histories(results, variant, label)
        if not histories:
            continue
        for ax, t in zip(axes[0], tasks):
            epochs, means, stds = _per_epoch(histories, lambda h, t=t: h["valid"][t].get("auc", math.nan))
            _band(ax, epochs, means, stds, label)
    for ax, t in zip(axes[0], tasks):
        ax.set_title(f"{t}: validation AUC (mean ± std over seeds)", fontsize=9)
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
    return _save(fig, axes, out_dir / f"training_curves{suffix}.png")


def gradient_cosine(results: dict, variant: str, out_dir: Path, suffix: str = "") -> str | None:
    block = results["summary"][variant]
    labels = [m for m, e in block["models"].items() if not e["ablation"]]
    series: dict[str, dict[str, list[list[dict]]]] = {}
    for label in labels:
        for history in _histories(results, variant, label):
            pairs = {p for h in history for p in (h.get("gradient_cosine") or {})}
            for pair in pairs:
                series.setdefault(pair, {}).setdefault(label, []).append(history)
    # a model without shared parameters (single_task) has all-zero cosines: nothing to show
    series = {
        p: {m: hs for m, hs in s.items()
            if any(abs((h.get("gradient_cosine") or {}).get(p, 0.0)) > 1e-9 for hist in hs for h in hist)}
        for p, s in series.items()
    }
    series = {p: s for p, s in series.items() if s}
    if not series:
        return None
    fig, axes = _subplots(1, len(series))
    for ax, (pair, per_model) in zip(axes[0], series.items()):
        for label, histories in per_model.items():
            epochs, means, stds = _per_epoch(
                histories, lambda h, pair=pair: (h.get("gradient_cosine") or {}).get(pair, math.nan))
            _band(ax, epochs, means, stds, label)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(f"cos(grad {pair.replace('|', ', grad ')})", fontsize=9)
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
    return _save(fig, axes, out_dir / f"gradient_cosine{suffix}.png")


def _rows_of_labels(summary: dict, proposed: str) -> list[list[str]]:
    """The models of the sweep figures: the baselines and the proposed model; then, if there are ablations, the
    proposed model with its ablations (so each panel stays readable)."""
    models = summary[next(iter(summary))]["models"]
    main = [m for m, e in models.items() if not e["ablation"]]
    ablations = [m for m, e in models.items() if e["ablation"]]
    return [main] + ([[proposed] + ablations] if ablations and proposed in models else [])


def auc_vs_variant(results: dict, option: str, proposed: str, out_dir: Path, gap: bool = False) -> str | None:
    """Test AUC (or, with ``gap``, the oracle's AUC minus it) against the swept option, mean ± std over seeds; the
    oracle as a dotted black line where the dataset knows it."""
    summary = results["summary"]
    variants = list(summary)
    if len(variants) < 2:
        return None
    has_oracle = all(summary[v].get("oracle") for v in variants)
    if gap and not has_oracle:
        return None
    tasks = summary[variants[0]]["tasks"]
    try:
        xs = [float(v) for v in variants]
    except ValueError:  # a categorical option (e.g. session_order: time, shuffled): one position per value
        xs = list(range(len(variants)))
    rows = _rows_of_labels(summary, proposed)
    fig, axes = _subplots(len(rows), len(tasks))
    for row, labels in zip(axes, rows):
        for ax, t in zip(row, tasks):
            for label in labels:
                points = [(x, v, summary[v]["models"][label]["tasks"][t]["auc"]) for x, v in zip(xs, variants)
                          if "tasks" in summary[v]["models"].get(label, {})]
                if not points:
                    continue
                ys = [(summary[v]["oracle"][t]["auc"] - s["mean"]) if gap else s["mean"] for _, v, s in points]
                ax.errorbar([x for x, _, _ in points], ys, yerr=[s["std"] for _, _, s in points], capsize=2,
                            label=label, **style(label))
            if has_oracle and not gap:
                ax.plot(xs, [summary[v]["oracle"][t]["auc"] for v in variants], label="oracle", **ORACLE_STYLE)
            ax.set_title(f"{t}: {'oracle AUC - test AUC' if gap else 'test AUC'}", fontsize=9)
            ax.set_xlabel(option)
            ax.set_xticks(xs, [str(v) for v in variants])
            ax.grid(alpha=0.3)
    return _save(fig, axes, out_dir / f"{'gap_to_oracle' if gap else 'auc'}_vs_{option}.png")


def ablation_bars(results: dict, variant: str, out_dir: Path) -> str | None:
    """Test AUC of each ablation beside the row it changes (red)."""
    block = results["summary"][variant]
    models, tasks = block["models"], block["tasks"]
    comparisons = block.get("ablations") or {}
    bases = list(dict.fromkeys(c["base"] for c in comparisons.values()))
    labels = [m for base in bases for m in [base] + [a for a, c in comparisons.items() if c["base"] == base]]
    if not labels:
        return None
    fig, axes = _subplots(1, len(tasks), width=4.6, height=3.6)
    for ax, t in zip(axes[0], tasks):
        means = [models[m]["tasks"][t]["auc"]["mean"] for m in labels]
        stds = [models[m]["tasks"][t]["auc"]["std"] for m in labels]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color=[style(m)["color"] for m in labels],
               edgecolor=["black" if m in bases else "none" for m in labels])
        lo, hi = min(means) - 2 * max(stds + [1e-4]), max(means) + 2 * max(stds + [1e-4])
        ax.set_ylim(lo, hi)
        ax.set_xticks(range(len(labels)))
        short = [m.replace(f"{comparisons[m]['base']}[", "[") if m in comparisons else m for m in labels]
        ax.set_xticklabels(short, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{t}: test AUC (mean ± std over seeds)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out_dir / "ablations.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")  # the bars are named on the axis: no legend
    plt.close(fig)
    return path.name


def negative_transfer(results: dict, variant: str, reference: str, out_dir: Path, suffix: str = "") -> str | None:
    """Per task, each multi-task model's mean test AUC minus the single-task reference's: the seesaw at a glance.
    The error bar is the standard deviation of that difference over seeds (the two stds combined)."""
    block = results["summary"][variant]
    gains, tasks, models = block["negative_transfer"], block["tasks"], block["models"]
    if not gains:
        return None
    names = list(gains)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(tasks) + 0.3 * len(names), 3.4))
    ref = models[reference]["tasks"]
    for i, m in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tasks))]
        errs = [math.hypot(models[m]["tasks"][t]["auc"]["std"], ref[t]["auc"]["std"]) for t in tasks]
        ax.bar(xs, [gains[m]["auc_gain"][t] for t in tasks], width, yerr=errs, capsize=2, label=m,
               color=style(m)["color"])
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel(f"test AUC - {reference}")
    ax.set_title("gain over single-task models (below 0: negative transfer)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, np.array([ax]), out_dir / f"negative_transfer{suffix}.png")


def make_plots(results: dict, suite, out_dir: str | Path) -> list[str]:
    """Every figure that applies to the suite; returns the file names (relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = list(results["summary"])
    made = []
    if len(variants) > 1:
        made.append(auc_vs_variant(results, suite.variant_option, suite.proposed, out_dir))
        made.append(auc_vs_variant(results, suite.variant_option, suite.proposed, out_dir, gap=True))
    for variant in variants:
        suffix = "" if len(variants) == 1 else f"_{suite.variant_option}={variant}"
        made.append(training_curves(results, variant, out_dir, suffix))
        made.append(gradient_cosine(results, variant, out_dir, suffix))
        made.append(negative_transfer(results, variant, suite.reference, out_dir, suffix))
    if len(variants) == 1:  # with a sweep, the ablations are lines of the figures against the swept option
        made.append(ablation_bars(results, variants[0], out_dir))
    return [m for m in made if m]
