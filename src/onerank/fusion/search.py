"""Fit a fusion form on one split's (calibrated) predictions with CMA-ES (the ``cmaes`` package).

The objective is the one the ranking is judged by, not a differentiable stand-in: value-NDCG@k within users, plus
optional weights on each task's GAUC of the fused score, minus a penalty when a task's GAUC falls below its floor
(its own prediction's GAUC minus a tolerance). The forms are scale-free for a ranking (a weighted sum or a product
ranks the same after multiplying every weight by c > 0), so their weights are searched as a softmax (summing to 1);
the monotone network's parameters are searched as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from onerank.fusion.forms import AnyFusion, Fusion, MonotoneFusion
from onerank.fusion.objective import TaskGAUC, ValueRanking

log = logging.getLogger(__name__)

FORMS = ("weighted_sum", "product", "monotone")
PENALTY = 10.0  # per unit of GAUC below a floor: larger than any NDCG gain, so the search treats floors as hard


@dataclass
class Objective:
    """What a fusion is fitted for, on fixed rows: value-NDCG@k, + sum_t auc_weights[t] * GAUC_t, with floors."""

    ranking: ValueRanking
    task_gauc: dict[str, TaskGAUC]
    auc_weights: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)

    def evaluate(self, scores: np.ndarray) -> dict:
        ndcg = self.ranking.ndcg(scores).mean()
        gaucs = {t: f(scores).mean() for t, f in self.task_gauc.items()}
        shortfall = sum(max(0.0, floor - gaucs[t]) for t, floor in self.floors.items())
        value = ndcg + sum(w * gaucs[t] for t, w in self.auc_weights.items()) - PENALTY * shortfall
        return {"objective": float(value), "ndcg": float(ndcg), "gauc": gaucs, "feasible": shortfall == 0}


@dataclass
class SearchResult:
    fusion: AnyFusion
    best: dict  # the objective's figures of the chosen fusion
    trace: list[dict]  # every evaluated candidate: its figures (the Pareto figure's points)
    evaluations: int


def weights_from(theta: np.ndarray, tasks: list[str]) -> dict[str, float]:
    w = np.exp(theta - np.max(theta))
    return dict(zip(tasks, (w / w.sum()).tolist()))


class FormSpace:
    """A form's parameter vector <-> a fusion."""

    def __init__(self, form: str, tasks: list[str], kinds: dict[str, str], predictions: dict[str, np.ndarray],
                 hidden: int = 4) -> None:
        if form not in FORMS:
            raise ValueError(f"fusion form must be one of {FORMS}, not {form!r}")
        if form == "product":
            regression = [t for t in tasks if kinds[t] != "binary"]
            if regression:
                raise ValueError(f"the product fusion needs probabilities; tasks {regression} are regression tasks "
                                 "(leave them out with --tasks)")
        self.form, self.tasks, self.kinds, self.hidden = form, list(tasks), dict(kinds), hidden
        if form == "monotone":
            unit = MonotoneFusion.from_vector(np.zeros(MonotoneFusion.num_params(len(tasks), hidden)), tasks, kinds,
                                              np.zeros(len(tasks)), np.ones(len(tasks)), hidden)
            z = unit.inputs(predictions)  # the standardisation is fitted on the same rows as the search
            self.shift = z.mean(axis=0)
            self.scale = np.maximum(z.std(axis=0), 1e-6)

    @property
    def dim(self) -> int:
        return MonotoneFusion.num_params(len(self.tasks), self.hidden) if self.form == "monotone" else len(self.tasks)

    def start(self, rng: np.random.Generator) -> np.ndarray:
        if self.form == "monotone":
            # hidden units need distinct starting weights, or they stay copies of each other
            return rng.normal(0.0, 0.5, self.dim)
        return np.zeros(self.dim)  # uniform weights

    def build(self, theta: np.ndarray) -> AnyFusion:
        if self.form == "monotone":
            return MonotoneFusion.from_vector(theta, self.tasks, self.kinds, self.shift, self.scale, self.hidden)
        return Fusion(self.form, weights_from(theta, self.tasks))


def fit_fusion(form: str, predictions: dict[str, np.ndarray], kinds: dict[str, str], tasks: list[str],
               objective: Objective, budget: int = 600, seed: int = 0, hidden: int = 4) -> SearchResult:
    """CMA-ES over the form's parameters for ``budget`` evaluations; the best candidate seen is returned."""
    from cmaes import CMA

    space = FormSpace(form, tasks, kinds, predictions, hidden)
    rng = np.random.default_rng(seed)
    optimizer = CMA(mean=space.start(rng), sigma=1.0, seed=seed)
    trace: list[dict] = []
    best_theta, best = None, None
    while len(trace) < budget and not optimizer.should_stop():
        told = []
        for _ in range(optimizer.population_size):
            theta = optimizer.ask()
            figures = objective.evaluate(space.build(theta)(predictions))
            trace.append(figures)
            told.append((theta, -figures["objective"]))  # cmaes minimises
            if best is None or figures["objective"] > best["objective"]:
                best_theta, best = theta, figures
        optimizer.tell(told)
    log.info("%s: %d evaluations, best objective %.5f (NDCG %.5f)", form, len(trace), best["objective"], best["ndcg"])
    return SearchResult(space.build(best_theta), best, trace, len(trace))


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Mask of the rows of ``points`` [n, d] that no other row dominates (>= everywhere, > somewhere)."""
    points = np.asarray(points, dtype=np.float64)
    keep = np.ones(len(points), dtype=bool)
    for i in range(len(points)):
        if not keep[i]:
            continue
        dominated = np.all(points >= points[i], axis=1) & np.any(points > points[i], axis=1)
        if dominated.any():
            keep[i] = False
    return keep & np.all(np.isfinite(points), axis=1) if len(points) else keep

