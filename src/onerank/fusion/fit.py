"""From a checkpoint's predictions on validation and test to a fitted calibration and fusion, and the report.

Everything is fitted on the validation split (calibration maps, fusion weights, the choice of form); the test
split is scored once, at the end, for the report. ``onerank.api.fuse`` feeds it a checkpoint's predictions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onerank.fusion.calibration import METHODS, Calibration, expected_calibration_error, reliability
from onerank.fusion.fitted import FittedFusion
from onerank.fusion.forms import AnyFusion, Fusion
from onerank.fusion.objective import TaskGAUC, ValueRanking, paired_bootstrap
from onerank.fusion.search import FORMS, Objective, fit_fusion
from onerank.metrics import auc, gauc

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    """One split's rows: per-task predictions (probabilities / values), labels and label masks, users, the value."""

    predictions: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    users: np.ndarray
    value: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.users)
        for name, arr in [("value", self.value), *self.predictions.items()]:
            if len(arr) != n:
                raise ValueError(f"{name}: {len(arr)} rows, the split has {n}")

    def rows(self, keep: np.ndarray) -> "SplitData":
        pick = lambda d: {t: v[keep] for t, v in d.items()}  # noqa: E731
        return SplitData(pick(self.predictions), pick(self.labels), pick(self.masks), self.users[keep],
                         self.value[keep])

    def by_users(self, fraction: float, seed: int) -> tuple["SplitData", "SplitData"]:
        """Two parts with disjoint users: ``1 - fraction`` of them, and ``fraction`` (a seeded draw)."""
        users = np.unique(self.users)
        chosen = np.random.default_rng(seed).permutation(users)[: int(round(fraction * len(users)))]
        second = np.isin(self.users, chosen)
        return self.rows(~second), self.rows(second)


@dataclass
class FuseSettings:
    value: str
    forms: tuple[str, ...] = FORMS
    calibration: str | None = "platt"  # the method the fusion and the ranker use; None: raw probabilities
    k: int = 10
    tasks: list[str] | None = None  # tasks fused (default: every task of the model)
    auc_tolerance: float | None = 0.05  # floor per task: its own prediction's validation GAUC minus this
    auc_weights: dict[str, float] | None = None  # objective += sum_t w_t * GAUC_t of the fused score
    budget: int = 600  # CMA-ES evaluations per form
    select_fraction: float = 0.3  # validation users held out to choose the form (0: choose on the fit itself)
    hidden: int = 4  # hidden units of the monotone fusion
    seed: int = 0
    bootstrap: int = 1000  # user resamples for the test intervals

    def check(self, tasks: list[str]) -> None:
        if self.calibration is not None and self.calibration not in METHODS:
            raise ValueError(f"calibration must be one of {METHODS} or none, not {self.calibration!r}")
        unknown = [f for f in self.forms if f not in FORMS]
        if unknown or not self.forms:
            raise ValueError(f"fusion forms must be some of {FORMS}, got {list(self.forms)}")
        for t in list(self.tasks or []) + list(self.auc_weights or {}):
            if t not in tasks:
                raise ValueError(f"unknown task {t!r}; the model's tasks are {tasks}")
        if self.tasks is not None and len(self.tasks) < 2:
            raise ValueError(f"fusion needs at least two tasks, got {self.tasks}")
        if self.k < 1 or self.budget < 1 or self.hidden < 1 or self.bootstrap < 1:
            raise ValueError("k, budget, hidden and bootstrap must be >= 1")
        if not 0 <= self.select_fraction < 1:
            raise ValueError(f"select_fraction must be in [0, 1), got {self.select_fraction}")


def _masked(split: SplitData, task: str) -> tuple[np.ndarray, np.ndarray]:
    m = split.masks[task]
    return split.labels[task][m], split.predictions[task][m]


def fit_calibrations(valid: SplitData, test: SplitData, binary: list[str]) -> tuple[dict[str, Calibration], dict]:
    """Both methods fitted on validation; ECE and reliability curves on test, before and after each."""
    labels = {t: _masked(valid, t)[0] for t in binary}
    probs = {t: _masked(valid, t)[1] for t in binary}
    fitted = {m: Calibration.fit(m, labels, probs) for m in METHODS}
    report: dict[str, Any] = {}
    for t in binary:
        labels, raw = _masked(test, t)
        curves = {"before": raw}
        curves.update({m: fitted[m].tasks[t](raw) for m in METHODS})
        report[t] = {}
        for name, probs in curves.items():
            curve = reliability(labels, probs)
            report[t][name] = {"ece": expected_calibration_error(labels, probs),
                               "mean_prediction": curve["mean_prediction"].tolist(),
                               "positive_rate": curve["positive_rate"].tolist(), "count": curve["count"].tolist(),
                               "mean": float(np.mean(probs)), "rate": float(np.mean(labels))}
    return fitted, report


def _test_figures(fusion: AnyFusion, test: SplitData, ranking: ValueRanking, binary: list[str]):
    scores = fusion(test.predictions)
    per_task = {}
    for t in binary:
        m = test.masks[t]
        per_task[t] = {"auc": auc(test.labels[t][m], scores[m]), "gauc": gauc(test.labels[t][m], scores[m],
                                                                               test.users[m])}
    return ranking.ndcg(scores), ranking.gauc(scores), per_task


def _objective(split: SplitData, tasks: list[str], binary: list[str], settings: FuseSettings):
    """The fit objective on ``split``'s rows, with the GAUC floors from the tasks' own predictions there."""
    task_gauc = {t: TaskGAUC(split.users, split.labels[t], split.masks[t]) for t in binary}
    own = {t: task_gauc[t](split.predictions[t]).mean() for t in binary}
    floors = {} if settings.auc_tolerance is None else {t: own[t] - settings.auc_tolerance for t in tasks
                                                            if t in binary}
    objective = Objective(ValueRanking(split.users, split.value, settings.k), task_gauc,
                          dict(settings.auc_weights or {}), floors)
    return objective, own, floors


def fuse_predictions(valid: SplitData, test: SplitData, kinds: dict[str, str], settings: FuseSettings,
                     checkpoint_sha256: str, figures_dir: str | Path | None = None) -> tuple[FittedFusion, dict]:
    """Fit calibration and every requested fusion form on ``valid``; choose the form on validation users held out
    from its fit (``select_fraction``), then fit it on all of ``valid``; report every form, uniform weights and each single task on ``test``. Returns the fusion file's content and the
    report."""
    all_tasks = list(kinds)
    settings.check(all_tasks)
    tasks = list(settings.tasks or all_tasks)
    binary = [t for t in all_tasks if kinds[t] == "binary"]
    calibrations, calibration_report = fit_calibrations(valid, test, binary)
    calibration = calibrations[settings.calibration] if settings.calibration else None
    if calibration is not None:
        valid = SplitData(calibration(valid.predictions), valid.labels, valid.masks, valid.users, valid.value)
        test = SplitData(calibration(test.predictions), test.labels, test.masks, test.users, test.value)

    objective, own, floors = _objective(valid, tasks, binary, settings)
    baselines: dict[str, AnyFusion] = {"uniform": Fusion("weighted_sum", {t: 1.0 for t in tasks})}
    baselines.update({f"only {t}": Fusion("weighted_sum", {t: 1.0}) for t in tasks})

    def fit(form: str, split: SplitData, objective: Objective):
        return fit_fusion(form, split.predictions, kinds, tasks, objective, settings.budget, settings.seed,
                          settings.hidden)

    selection = None
    if len(settings.forms) > 1 and settings.select_fraction > 0:
        # A richer form always fits its own rows at least as well; it is chosen only if it also does better on
        # validation users it was not fitted on. The chosen form is then fitted again on every validation row.
        fit_part, select_part = valid.by_users(settings.select_fraction, settings.seed)
        fit_objective, select_objective = (_objective(part, tasks, binary, settings)[0]
                                           for part in (fit_part, select_part))
        selection = {form: select_objective.evaluate(fit(form, fit_part, fit_objective).fusion(
            select_part.predictions)) for form in settings.forms}
    searches = {form: fit(form, valid, objective) for form in settings.forms}
    form_scores = selection or {f: s.best for f, s in searches.items()}
    chosen = max(form_scores, key=lambda f: form_scores[f]["objective"])
    candidates = {**baselines, **{f"fitted {f}": s.fusion for f, s in searches.items()}}
    on_valid = {name: objective.evaluate(f(valid.predictions)) for name, f in candidates.items()}

    # test, once
    ranking = ValueRanking(test.users, test.value, settings.k)
    ndcgs, value_gaucs, task_figures = {}, {}, {}
    for name, fusion in candidates.items():
        ndcgs[name], value_gaucs[name], task_figures[name] = _test_figures(fusion, test, ranking, binary)
    single = f"only {tasks[0]}"
    test_report = {}
    for metric, figures in (("ndcg", ndcgs), ("value_gauc", value_gaucs)):
        vs_uniform = paired_bootstrap(figures, "uniform", settings.bootstrap, settings.seed)
        vs_single = paired_bootstrap(figures, single, settings.bootstrap, settings.seed)
        for name in candidates:
            row = test_report.setdefault(name, {"tasks": task_figures[name]})
            row[metric] = {k: v for k, v in vs_uniform[name].items() if not k.startswith(("delta", "p"))}
            row[metric]["vs_uniform"] = {k: v for k, v in vs_uniform[name].items() if k.startswith(("delta", "p"))}
            row[metric]["vs_" + single.replace(" ", "_")] = {k: v for k, v in vs_single[name].items()
                                                              if k.startswith(("delta", "p"))}

    report = {
        "value": settings.value, "k": settings.k, "tasks": tasks, "calibration": settings.calibration,
        "calibration_ece_test": {t: {m: r["ece"] for m, r in calibration_report[t].items()} for t in binary},
        "auc_floors_valid": floors, "own_gauc_valid": own, "auc_weights": dict(settings.auc_weights or {}),
        "chosen": f"fitted {chosen}", "budget": settings.budget,
        "selection": {"held_out_user_fraction": settings.select_fraction if selection else 0.0,
                      "objective": {f: r["objective"] for f, r in form_scores.items()}},
        "evaluations": {f: s.evaluations for f, s in searches.items()},
        "valid": on_valid, "test": test_report,
        "fusions": {name: f.to_dict() for name, f in candidates.items()},
        "rows": {"valid": int(len(valid.users)), "test": int(len(test.users)),
                 "test_users": int(ranking.grouping.num_groups),
                 "test_users_ranked": int(ranking.rankable.sum())},  # users with at least two distinct values
        "bootstrap": {"resamples": settings.bootstrap, "unit": "user", "seed": settings.seed},
    }
    fitted = FittedFusion(checkpoint_sha256, calibration, searches[chosen].fusion, info={
        "value": settings.value, "k": settings.k, "form": chosen, "fitted_on": "valid",
        "calibration_method": settings.calibration, "auc_tolerance": settings.auc_tolerance,
        "selection": "held-out validation users" if selection else "validation objective",
        "valid_objective": searches[chosen].best, "test_ndcg": test_report[f"fitted {chosen}"]["ndcg"]["value"],
    })
    if figures_dir is not None:
        from onerank.fusion.plots import pareto_plot, reliability_plot

        figures_dir = Path(figures_dir)
        report["figures"] = {
            "reliability": str(reliability_plot(calibration_report, figures_dir / "reliability.png")),
            "pareto": str(pareto_plot({f: s.trace for f, s in searches.items()},
                                      {n: r["gauc"] for n, r in on_valid.items()}, [t for t in tasks if t in binary],
                                      figures_dir / "pareto.png")),
        }
    report["calibration_curves_test"] = calibration_report
    return fitted, report


def format_report(report: dict) -> str:
    """The test table: value-NDCG@k and value-GAUC with 95% user-bootstrap intervals, the paired differences to
    uniform weights and to the first task alone, and each task's GAUC of the fused score."""
    tasks = [t for t in report["tasks"] if t in report["calibration_ece_test"]]
    single = "vs_only_" + report["tasks"][0]
    k = report["k"]
    header = ["fusion", f"NDCG@{k} [95% CI]", "vs uniform", f"vs {single[3:].replace('_', ' ')}",
              "value-GAUC [95% CI]", "vs uniform"] + [f"GAUC {t}" for t in tasks]

    def ci(m: dict) -> str:
        return f"{m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]"

    def delta(m: dict) -> str:
        return "-" if "delta" not in m else f"{m['delta']:+.4f} [{m['delta_ci_low']:+.4f}, {m['delta_ci_high']:+.4f}]"

    rows = []
    for name, r in report["test"].items():
        marker = " (served)" if name == report["chosen"] else ""
        rows.append([name + marker, ci(r["ndcg"]), delta(r["ndcg"]["vs_uniform"]), delta(r["ndcg"][single]),
                     ci(r["value_gauc"]), delta(r["value_gauc"]["vs_uniform"])]
                    + [f"{r['tasks'][t]['gauc']:.4f}" for t in tasks])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    ece = ["", "| task | ECE before | ECE Platt | ECE isotonic |", "|---|---|---|---|"]
    ece += [f"| {t} | {e['before']:.4f} | {e['platt']:.4f} | {e['isotonic']:.4f} |"
            for t, e in report["calibration_ece_test"].items()]
    return "\n".join(lines + ece)
