"""Batch RL fusion (BatchRL-MTF) against static fusions, in the KuaiRand simulator (docs/rl_fusion.md).

For a KuaiRand checkpoint with a weighted-sum fusion file (``onerank fuse --forms weighted_sum``):

1. fits the simulator (GBDT response chain, leave model calibrated to the target depth under the static fusion) and
   reports its fit to the held-out test days; fits the swapped simulator (logistic response chain, same leave
   assumption, its intercept calibrated the same way);
2. per seed: logs sessions of validation-day users under the exploring policy around the static fusion, trains BCQ
   and CQL on them, estimates every policy's value on those logs by conservative FQE, and simulates uniform weights,
   the static CMA-ES fusion, BCQ and CQL on the same test-day sessions (same users, pools and random numbers) in both
   simulators;
3. writes OUT/results.json (commit, clean tree, machine load), OUT/rl_fusion.png, and with ``--publish PAGE`` the
   table between the page's ``<!-- rl_fusion results: begin -->`` / ``end`` lines.

    python benchmarks/rl_fusion.py --checkpoint runs/mmoe/checkpoint.pt --out runs/rl_fusion
    python benchmarks/rl_fusion.py --out runs/rl_fusion --report-only --publish docs/rl_fusion.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from onerank import api
from onerank.benchmarking.runner import code_version
from onerank.fusion.batch_rl import BatchRLSettings, FQESettings, conservative_fqe, train_policy
from onerank.simulator import draw_starts, fit_world, simulate
from onerank.simulator.env import SimulatorConfig
from onerank.simulator.experiment import SimulationSettings, calibrate_leave, log_sessions
from onerank.simulator.leave import LeaveModel
from onerank.simulator.policies import fusion_policy, static_policy
from onerank.simulator.world import length_distribution, real_leave_fit, response_fit

POLICIES = ("uniform", "cma-es", "bcq", "cql")
LABELS = {"uniform": "uniform weights (static)", "cma-es": "CMA-ES fusion (static, the logging policy's centre)",
          "bcq": "BCQ (batch RL)", "cql": "CQL + SAC (batch RL)"}
WORLDS = ("gbdt", "logistic")
BEGIN, END = "<!-- rl_fusion results: begin -->", "<!-- rl_fusion results: end -->"


def interval(values: np.ndarray) -> dict:
    """Mean and 95 % t-interval over seeds."""
    values = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "low": float(values.mean() - half), "high": float(values.mean() + half),
            "per_seed": values.tolist()}


def fit_report(sim, settings: SimulationSettings, seed: int) -> dict:
    """The simulator's fit to the held-out test days: responses, and session lengths (real; the leave model fitted
    on the train days run on test-day users one video per request; the app-session model the experiments use)."""
    world, log = sim.world, sim.log
    report = {"response_gbdt": response_fit(world, log, "test"), "leave_fitted_on_train": real_leave_fit(log, "test")}
    real = log.session_lengths("test")
    one_by_one = SimulatorConfig(slate_size=1, pool_size=settings.pool_size, max_requests=settings.pool_size)
    assumed = world.leave
    world.leave = LeaveModel(**report["leave_fitted_on_train"]["model"])
    starts = draw_starts(world, sim.users["test"], 500, settings.pool_size, sim.scorers["test"], seed + 20_000)
    fitted_lengths = simulate(world, starts, static_policy(sim.centre), one_by_one).session_depth()
    world.leave = assumed
    app = simulate(world, starts, static_policy(sim.centre), settings.config()).session_depth()
    report["session_length"] = {"real_test_days": length_distribution(real),
                                "simulated_fitted_leave": length_distribution(fitted_lengths),
                                "simulated_app_sessions": length_distribution(app)}
    return report


def run(args: argparse.Namespace, out: Path) -> dict:
    torch.set_num_threads(1)
    code = code_version()  # the code that runs (later commits to the checkout do not change this process)
    started = time.time()
    timings: dict[str, float] = {}
    settings = SimulationSettings(target_depth=args.target_depth, max_train_rows=args.train_rows,
                                  calibration_sessions=args.calibration_sessions)
    sim = api.checkpoint_simulation(args.checkpoint, settings, seed=0, data_dir=args.data_dir)
    timings["simulator"] = time.time() - started
    print(f"simulator fitted and calibrated ({timings['simulator']:.0f} s)", flush=True)
    config = settings.config()
    results: dict = {"checkpoint": str(args.checkpoint), "tasks": sim.tasks, "static_fusion": sim.meta["static_fusion"],
                     "centre_action": sim.centre.tolist(), "settings": settings.to_dict(),
                     "world": sim.world.describe()}
    t = time.time()
    results["fit"] = fit_report(sim, settings, 0)
    timings["fit_report"] = time.time() - t
    print(f"fit report ({timings['fit_report']:.0f} s)", flush=True)

    t = time.time()
    swapped = fit_world(sim.log, "logistic", seed=0, max_train_rows=args.train_rows)
    calibration_starts = draw_starts(swapped, sim.users["valid"], settings.calibration_sessions, settings.pool_size,
                                     sim.scorers["valid"], 10_000)
    calibrate_leave(swapped, calibration_starts, static_policy(sim.centre), config, settings.satisfaction,
                    settings.target_depth)
    results["response_logistic"] = response_fit(swapped, sim.log, "test")
    results["world_logistic"] = swapped.describe()
    timings["swapped_simulator"] = time.time() - t
    print(f"swapped simulator ({timings['swapped_simulator']:.0f} s)", flush=True)
    worlds = {"gbdt": sim.world, "logistic": swapped}

    per_seed = []
    for seed in range(args.seeds):
        record: dict = {"seed": seed}
        t = time.time()
        log_starts = draw_starts(sim.world, sim.users["valid"], args.log_sessions, settings.pool_size,
                                 sim.scorers["valid"], seed)
        logged = log_sessions(sim.world, log_starts, sim.centre, settings, sim.tasks, seed, sim.meta)
        logged.save(out / f"sessions_seed{seed}.npz")
        record["logs"] = {"sessions": int(logged.initial.sum()), "requests": int(len(logged.session)),
                          "mean_return": float(np.bincount(logged.session, logged.rewards).sum()
                                               / logged.initial.sum())}
        record["seconds_logging"] = time.time() - t
        policies = {"uniform": static_policy(np.zeros(len(sim.tasks))), "cma-es": static_policy(sim.centre)}
        record["training"] = {}
        for algorithm, steps in (("bcq", args.bcq_steps), ("cql", args.cql_steps)):
            t = time.time()
            policy, _ = train_policy(logged, BatchRLSettings(algorithm=algorithm, steps=steps, seed=seed))
            record["training"][algorithm] = {"seconds": time.time() - t, "curve": policy.info["training_curve"]}
            (out / f"policy_{algorithm}_seed{seed}.json").write_text(json.dumps(policy.to_dict()))
            policies[algorithm] = fusion_policy(policy)
        t = time.time()
        record["fqe"] = {name: conservative_fqe(logged, policies[name], FQESettings(steps=args.fqe_steps,
                                                                                    seed=seed))["estimate"]
                         for name in POLICIES}
        record["fqe_plain"] = {name: conservative_fqe(logged, policies[name], FQESettings(
            steps=args.fqe_steps, seed=seed, conservative_weight=0.0))["estimate"] for name in POLICIES}
        record["seconds_fqe"] = time.time() - t
        t = time.time()
        eval_starts = draw_starts(sim.world, sim.users["test"], args.eval_sessions, settings.pool_size,
                                  sim.scorers["test"], 1_000 + seed)
        record["simulated"] = {world: {name: simulate(w, eval_starts, policies[name], config).summary(settings.gamma)
                                       for name in POLICIES} for world, w in worlds.items()}
        record["seconds_simulation"] = time.time() - t
        per_seed.append(record)
        print(f"seed {seed}: " + ", ".join(f"{n} {record['simulated']['gbdt'][n]['return']:.2f}" for n in POLICIES)
              + f" ({time.time() - started:.0f} s)", flush=True)

    summary: dict = {}
    for world in WORLDS:
        summary[world] = {}
        for name in POLICIES:
            row = {}
            for metric in ("return", "discounted_return", "depth"):
                values = np.array([r["simulated"][world][name][metric] for r in per_seed])
                base = np.array([r["simulated"][world]["cma-es"][metric] for r in per_seed])
                row[metric] = interval(values)
                row[f"{metric}_vs_cma-es"] = interval(values - base)
                row[f"{metric}_vs_cma-es_percent"] = interval(100 * (values - base) / base)
            summary[world][name] = row
    fqe = np.array([[r["fqe"][n] for n in POLICIES] for r in per_seed])
    plain = np.array([[r["fqe_plain"][n] for n in POLICIES] for r in per_seed])
    sim_value = np.array([[r["simulated"]["gbdt"][n]["discounted_return"] for n in POLICIES] for r in per_seed])
    logged_value = np.array([r["logs"]["mean_return"] for r in per_seed])
    results["ope"] = {
        "estimates": {n: interval(fqe[:, i]) for i, n in enumerate(POLICIES)},
        "plain_estimates": {n: interval(plain[:, i]) for i, n in enumerate(POLICIES)},
        "plain_pearson": float(stats.pearsonr(plain.ravel(), sim_value.ravel())[0]),
        "plain_spearman": float(stats.spearmanr(plain.ravel(), sim_value.ravel())[0]),
        "pearson": float(stats.pearsonr(fqe.ravel(), sim_value.ravel())[0]),
        "spearman": float(stats.spearmanr(fqe.ravel(), sim_value.ravel())[0]),
        "within_seed_spearman": interval([stats.spearmanr(fqe[s], sim_value[s])[0] for s in range(len(per_seed))]),
        "points": len(fqe.ravel()),
        "logged_mean_return": interval(logged_value),
    }
    results["summary"] = summary
    results["per_seed"] = per_seed
    results["protocol"] = {"seeds": args.seeds, "log_sessions": args.log_sessions, "eval_sessions": args.eval_sessions,
                           "bcq_steps": args.bcq_steps, "cql_steps": args.cql_steps, "fqe_steps": args.fqe_steps,
                           "log_users": "validation day (2022-05-06)", "eval_users": "test days (2022-05-07..08)"}
    results["timings_seconds"] = {**timings, "total": time.time() - started}
    results["machine"] = {"loadavg_at_end": list(os.getloadavg()), "cpus": os.cpu_count(),
                          "note": "a 2-core machine shared with other jobs; timings are not benchmarks"}
    results["code"] = code
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def _ci(m: dict, digits: int = 2, sign: bool = False) -> str:
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{fmt.format(m['mean'])} [{fmt.format(m['low'])}, {fmt.format(m['high'])}]"


def reading(results: dict) -> str:
    """One generated sentence per batch RL policy: is its return above, below or not told apart from CMA-ES's?"""
    parts = []
    for name in ("bcq", "cql"):
        verdicts = []
        for world in WORLDS:
            d = results["summary"][world][name]["return_vs_cma-es_percent"]
            verdict = ("above" if d["low"] > 0 else "below" if d["high"] < 0 else "not told apart from")
            verdicts.append(f"{verdict} the CMA-ES fusion's in the {world} simulator ({d['mean']:+.1f} %)")
        parts.append(f"{LABELS[name]}: return " + "; ".join(verdicts))
    return "Reading (95 % intervals over seeds): " + ". ".join(parts) + "."


def render(results: dict, figure: str | None) -> str:
    seeds = results["protocol"]["seeds"]
    lines = [f"Generated by `benchmarks/rl_fusion.py` from `benchmarks/results/rl_fusion/results.json` "
             f"(commit {str(results['code']['git_commit'])[:10]}, "
             f"{'clean tree' if results['code']['git_dirty'] is False else 'uncommitted changes'}). "
             f"{seeds} seeds; per seed {results['protocol']['log_sessions']} logged sessions (validation-day users), "
             f"{results['protocol']['eval_sessions']} evaluation sessions (test-day users, the same ones for every "
             "policy); mean over seeds with a 95 % t-interval over seeds.", ""]
    for world in WORLDS:
        title = {"gbdt": "Simulator with the GBDT response model (the one the logs came from)",
                 "logistic": "Swapped simulator: logistic response model (policies trained on the GBDT simulator's "
                             "logs)"}[world]
        lines += [f"**{title}**", "",
                  "| fusion | return per session | vs CMA-ES | vs CMA-ES (%) | depth (impressions) | vs CMA-ES |",
                  "|---|---|---|---|---|---|"]
        for name in POLICIES:
            r = results["summary"][world][name]
            vs = "-" if name == "cma-es" else _ci(r["return_vs_cma-es"], 2, True)
            vs_pct = "-" if name == "cma-es" else _ci(r["return_vs_cma-es_percent"], 1, True)
            vs_depth = "-" if name == "cma-es" else _ci(r["depth_vs_cma-es"], 2, True)
            lines.append(f"| {LABELS[name]} | {_ci(r['return'])} | {vs} | {vs_pct} | {_ci(r['depth'])} | {vs_depth} |")
        lines.append("")
    lines += [reading(results), ""]
    ope = results["ope"]
    lines += ["**Conservative FQE on the logs vs the simulated discounted return** (gamma "
              f"{results['settings']['gamma']})", "",
              "| fusion | conservative FQE estimate | plain FQE estimate | simulated discounted return |",
              "|---|---|---|---|"]
    for name in POLICIES:
        lines.append(f"| {LABELS[name]} | {_ci(ope['estimates'][name])} | {_ci(ope['plain_estimates'][name])} | "
                     f"{_ci(results['summary']['gbdt'][name]['discounted_return'])} |")
    lines += ["", f"Correlation with the simulated discounted return over the {ope['points']} (policy, seed) points: "
              f"conservative FQE Pearson {ope['pearson']:.2f}, Spearman {ope['spearman']:.2f} (ranking of the four "
              f"policies within a seed: Spearman {_ci(ope['within_seed_spearman'])}); plain FQE Pearson "
              f"{ope['plain_pearson']:.2f}, Spearman {ope['plain_spearman']:.2f}.", ""]
    fit = results["fit"]
    lines += ["**The simulator's fit to the held-out test days** (response models: the marginal probability of each "
              "behaviour given the real session so far)", "",
              "| behaviour | rate | GBDT AUC | GBDT ECE | GBDT mean prediction | logistic AUC | logistic ECE |",
              "|---|---|---|---|---|---|---|"]
    for b in ("click", "long_view", "completion", "like", "comment", "forward"):
        g, lg = fit["response_gbdt"][b], results["response_logistic"][b]
        lines.append(f"| {b} | {g['rate']:.4f} | {g['auc']:.3f} | {g['ece']:.4f} | {g['mean_prediction']:.4f} | "
                     f"{lg['auc']:.3f} | {lg['ece']:.4f} |")
    play = fit["response_gbdt"]["play"]
    lines += ["", f"Play time (GBDT): correlation of the expected and the real log1p(seconds) given click, long view and "
              f"completion {play['corr_log_play_given_parents']:.3f}; mean log1p(seconds) drawn "
              f"{play['mean_log_play_sampled']:.3f}, real {play['mean_log_play_real']:.3f}.", ""]
    leave = fit["leave_fitted_on_train"]
    sat = ", ".join(f"{k} {v:+.3f}" for k, v in leave["model"]["satisfaction"].items())
    lines += [f"Leave model fitted on the train days' real sessions: intercept {leave['model']['intercept']:.3f}, "
              f"log1p(position) {leave['model']['position']:+.3f}, satisfaction weights {sat}; AUC at telling a "
              f"test-day session's last impression {leave['auc_last_impression']:.3f}. The experiments run the "
              f"assumed app-session model: {json.dumps(results['world']['leave'])}.", "",
              "| sessions | mean length | 1 | 2 | 3-4 | 5-9 | 10-19 | 20-49 | 50+ |", "|---|---|---|---|---|---|---|---|---|"]
    names = {"real_test_days": "real, test days (1 h gap)",
             "simulated_fitted_leave": "simulated, fitted leave model, one video per request",
             "simulated_app_sessions": "simulated, app-session leave model (the experiments)"}
    for key, label in names.items():
        d = fit["session_length"][key]
        lines.append(f"| {label} | {d['mean']:.2f} | " + " | ".join(f"{100 * v:.1f} %" for v in d["share"].values())
                     + " |")
    t = results["timings_seconds"]
    lines += ["", f"Run time {t['total'] / 60:.0f} min on a shared 2-core CPU machine (load average "
              f"{results['machine']['loadavg_at_end'][0]:.1f} at the end)."]
    if figure:
        lines += ["", f"![batch RL fusion in the simulator]({figure})"]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(POLICIES))
    for offset, world in zip((-0.15, 0.15), WORLDS):
        for ax, metric in zip(axes[:2], ("return", "depth")):
            m = [results["summary"][world][n][metric] for n in POLICIES]
            mean = np.array([v["mean"] for v in m])
            err = np.array([[v["mean"] - v["low"] for v in m], [v["high"] - v["mean"] for v in m]])
            ax.errorbar(x + offset, mean, yerr=err, fmt="o", capsize=4, label=f"{world} simulator")
    for ax, title in zip(axes[:2], ("return per session", "session depth (impressions)")):
        ax.set_xticks(x, POLICIES)
        ax.set_title(title + " (95 % CI over seeds)")
        ax.legend()
    ax = axes[2]
    for i, name in enumerate(POLICIES):
        fqe = [r["fqe"][name] for r in results["per_seed"]]
        value = [r["simulated"]["gbdt"][name]["discounted_return"] for r in results["per_seed"]]
        ax.scatter(fqe, value, label=name)
    ax.set_xlabel("conservative FQE estimate on the logs")
    ax.set_ylabel("simulated discounted return")
    ax.set_title(f"off-policy estimate vs simulator (Spearman {results['ope']['spearman']:.2f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(page: Path, text: str) -> None:
    content = page.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{page} lacks the {BEGIN} / {END} lines")
    block = f"{BEGIN}\n{text}\n{END}"
    page.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, content, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="KuaiRand checkpoint with a weighted-sum fusion file")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", required=True, help="folder of results.json and rl_fusion.png (new unless "
                        "--report-only)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--log-sessions", type=int, default=1000)
    parser.add_argument("--eval-sessions", type=int, default=300)
    parser.add_argument("--bcq-steps", type=int, default=2000)
    parser.add_argument("--cql-steps", type=int, default=2000)
    parser.add_argument("--fqe-steps", type=int, default=1200)
    parser.add_argument("--target-depth", type=float, default=30.0)
    parser.add_argument("--train-rows", type=int, default=60_000,
                        help="train-day rows the response models are fitted on (a seeded sample; all: 0)")
    parser.add_argument("--calibration-sessions", type=int, default=200,
                        help="sessions the leave model's intercept is calibrated on")
    parser.add_argument("--report-only", action="store_true", help="re-render the figure and table from results.json")
    parser.add_argument("--publish", help="page whose rl_fusion results block gets the table")
    parser.add_argument("--figure-link", default="../benchmarks/results/rl_fusion/rl_fusion.png",
                        help="the figure's path relative to the published page")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
    else:
        if (out / "results.json").exists():
            raise SystemExit(f"{out}/results.json exists: a run never overwrites another's; choose a new --out")
        if not args.checkpoint:
            raise SystemExit("--checkpoint is required")
        args.train_rows = args.train_rows or None
        out.mkdir(parents=True, exist_ok=True)
        results = run(args, out)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "rl_fusion.png")
    text = render(results, args.figure_link)
    print(text)
    if args.publish:
        publish(Path(args.publish), text)


if __name__ == "__main__":
    main()
