"""The benchmark suite machinery: the smoke suite end to end, the statistics, suite validation, and the check that
the published numbers (benchmarks/results, BENCHMARKS.md) were made by the current suite definitions."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onerank import __version__ as ONERANK_VERSION
from onerank import cli
from onerank.benchmarking import file_sha256, load_suite
from onerank.benchmarking.runner import SuiteRunner, run_key
from onerank.benchmarking.stats import _SortedAUC, paired_bootstrap_auc, paired_bootstrap_gauc, paired_t
from onerank.data.schema import SchemaError
from onerank.metrics.ranking import auc, gauc

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "benchmarks" / "suites"
RESULTS = ROOT / "benchmarks" / "results"
PUBLISHED = ("census", "kuairand", "lists", "synthetic", "distillation", "distillation_synthetic", "heroes_synthetic",
             "heroes_synthetic_shuffled", "heroes_funnel")


def test_smoke_suite_runs_end_to_end_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # suites and their data_dir are relative to the repository root
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["benchmark", "--suite", "smoke", "--out", str(out), "--work-dir", str(work)]
    assert cli.main(args) == 0  # about 15 s on an idle core (no wall-time assertion: the test machine is shared)
    captured = capsys.readouterr()
    report = captured.out
    # progress without -v: one line per run, done / total, elapsed and an estimate
    progress = [line for line in captured.err.splitlines() if line.startswith("[smoke] ")]
    assert len(progress) == 16 and progress[-1].startswith("[smoke] 16/16 runs done") and "left" in progress[-1]
    results = json.loads((out / "results.json").read_text())
    # the code that made the results: the version, and the commit of this checkout (None outside git)
    assert results["code"]["onerank"] == ONERANK_VERSION
    commit = results["code"]["git_commit"]
    assert commit is None or re.fullmatch("[0-9a-f]{40}", commit)
    assert all(r["git_commit"] == commit and len(r["config_sha256"]) == 64 for r in results["runs"])
    suite = load_suite("smoke")
    assert results["suite_sha256"] == file_sha256(SUITES / "smoke.yaml") == suite.sha256
    # 2 variants x (2 tuned models x (2 grid points + 1 more seed) + 1 ablation x 2 seeds)
    assert len(results["runs"]) == 2 * (2 * 3 + 2)
    assert not [r for r in results["runs"] if r.get("error")]
    for variant, block in results["summary"].items():
        assert set(block["models"]) == {"single_task", "onerank", "onerank[cross_task=none]"}
        onerank = block["models"]["onerank"]
        assert onerank["seeds"] == 2 and onerank["flops_per_sample"] > 0 and onerank["infer_candidates_per_s"] > 0
        for task, sig in block["significance"].items():
            assert sig["best_baseline"] == "single_task"
            assert 0 < sig["bootstrap_auc"]["p"] <= 1 and sig["bootstrap_auc"]["clusters"] == "users"
            assert sig["t_test_auc"]["n"] == 2
            pair = block["against_every_baseline"]["single_task"][task]  # the same comparison, by name
            assert pair["delta_auc"] == sig["delta_auc"] and pair["bootstrap_auc"]["p"] == sig["bootstrap_auc"]["p"]
        assert set(block["negative_transfer"]) == {"onerank"}
        # the synthetic data knows its true probabilities: an oracle above every model
        assert set(block["oracle"]) == {"click", "cart", "order"}
        assert all(block["oracle"][t]["auc"] > onerank["tasks"][t]["auc"]["mean"] for t in block["oracle"])
        chosen = results["tuning"][variant]
        assert chosen["onerank[cross_task=none]"]["chosen"] == chosen["onerank"]["chosen"]
    history = next(r for r in results["runs"] if r["label"] == "onerank")["history"]
    assert "gradient_cosine" in history[0] and "auc" in history[0]["valid"]["click"]
    for png in ("auc_vs_task_correlation.png", "gap_to_oracle_vs_task_correlation.png",
                "training_curves_task_correlation=0.9.png", "gradient_cosine_task_correlation=0.9.png"):
        assert (out / png).stat().st_size > 0 and f"({png})" in report
    assert (out / "report.md").read_text().strip() == report.strip()
    assert "| **onerank** |" in report and "bootstrap p" in report and "seesaw" in report
    # timings are published by default (timings: true), and no per-model grid is announced without model_tuning
    assert "| train samples/s | infer cand./s |" in report and "timings: not published" not in report
    assert "not a cost measurement" not in report and "per-model grids" not in report
    assert "| *oracle (true probabilities)* |" in report and "Gap to the oracle on `click`" in report
    # one epoch at most: every run's best epoch is its last, and the report says so for every model
    assert report.count("Not converged") == 2 and "onerank[cross_task=none] (2 of 2 seeds)" in report

    # resuming a finished suite trains nothing; --report-only re-renders from the stored runs
    before = (out / "results.json").read_text()
    assert cli.main(args + ["--resume"]) == 0
    assert len(json.loads((out / "results.json").read_text())["runs"]) == len(json.loads(before)["runs"])
    stored = json.loads(before)
    stored["workers"] = 2  # as if trained by two processes: re-rendering keeps how the runs were made
    (out / "results.json").write_text(json.dumps(stored))
    assert cli.main(args + ["--report-only"]) == 0
    rendered = json.loads((out / "results.json").read_text())
    assert rendered["summary"].keys() == results["summary"].keys()
    assert rendered["workers"] == 2 and rendered["command"] == stored["command"]
    assert rendered["finished"] == stored["finished"] and rendered["wall_seconds"] == stored["wall_seconds"]

    # --publish writes the report into a page between the suite's markers, links relative to the page
    page = tmp_path / "docs" / "PAGE.md"
    page.parent.mkdir()
    page.write_text("# intro\n\nan analysis\n")
    assert cli.main(args + ["--report-only", "--publish", str(page)]) == 2  # no markers: a clear error, exit 2
    assert "needs one line '<!-- onerank benchmark smoke: begin -->'" in capsys.readouterr().err
    page.write_text("# intro\n<!-- onerank benchmark smoke: begin -->\nold\n<!-- onerank benchmark smoke: end -->\nafter\n")
    assert cli.main(args + ["--report-only", "--publish", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# intro\n") and text.endswith("-->\nafter\n") and "old" not in text
    assert "](../out/auc_vs_task_correlation.png)" in text
    assert not broken_image_links(page)

    # a changed suite keeps the runs it would train identically and trains only what is new
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "smoke.yaml").write_text((SUITES / "smoke.yaml").read_text().replace(
        "ablations:\n", "ablations:\n  - {label: \"onerank[listwise=0]\", objective: {listwise: 0.0}}\n"))
    capsys.readouterr()
    assert cli.main(args + ["--resume", "--suites-dir", str(suites)]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[smoke] ")]
    assert len(progress) == 4 and progress[-1].startswith("[smoke] 20/20 runs done")  # 2 variants x 2 seeds
    changed = json.loads((out / "results.json").read_text())
    kept = {r["key"]: r["train_seconds"] for r in changed["runs"] if "listwise" not in r["label"]}
    assert kept == {r["key"]: r["train_seconds"] for r in results["runs"]}
    listwise_off = [r for r in changed["runs"] if r["label"] == "onerank[listwise=0]"]
    assert len(listwise_off) == 4 and all(r["objective"] == {"listwise": 0.0} for r in listwise_off)
    # --rerun trains a model again (its code changed) and keeps the others; with --models the ablation alone is
    # trained at its base row's chosen point (tuned from the runs on disk), and the progress counts its runs only
    assert cli.main(args + ["--resume", "--suites-dir", str(suites), "--rerun", "onerank[listwise=0]",
                            "--models", "onerank[listwise=0]"]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[smoke] ")]
    assert len(progress) == 4 and all("onerank[listwise=0]" in line for line in progress)
    assert progress[0].startswith("[smoke] 1/4 runs done") and progress[-1].startswith("[smoke] 4/4 runs done")
    rerun = json.loads((out / "results.json").read_text())
    for variant, tuning in rerun["tuning"].items():
        ablated = [r for r in rerun["runs"] if r["label"] == "onerank[listwise=0]" and str(r["variant"]) == variant]
        assert {r["hparams"]["lr"] for r in ablated} == {tuning["onerank"]["chosen"]["lr"]}
    assert len(rerun["runs"]) == 20
    assert cli.main(args + ["--resume", "--rerun", "mmoe"]) == 2  # not a model of the suite: exit 2


IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def broken_image_links(page: Path) -> list[str]:
    """The image links of a Markdown page that do not resolve from the page's folder."""
    return [link for link in IMAGE_LINK.findall(page.read_text())
            if "://" not in link and not (page.parent / link).is_file()]


def test_every_image_link_of_the_published_pages_resolves():
    pages = [ROOT / "BENCHMARKS.md", ROOT / "README.md", *sorted(RESULTS.glob("*/report.md")),
             *sorted((ROOT / "docs").glob("*.md"))]
    assert {p: broken_image_links(p) for p in pages} == {p: [] for p in pages}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_results_come_from_the_current_suite_definitions(name):
    """BENCHMARKS.md and benchmarks/results/NAME/results.json must name the sha256 of benchmarks/suites/NAME.yaml:
    editing a suite without re-running it (and re-publishing) fails here."""
    digest = file_sha256(SUITES / f"{name}.yaml")
    results = json.loads((RESULTS / name / "results.json").read_text())
    assert results["suite_sha256"] == digest, f"benchmarks/results/{name} was made by another version of {name}.yaml"
    assert results.get("summary"), f"benchmarks/results/{name}/results.json holds no finished summary"
    document = (ROOT / "BENCHMARKS.md").read_text()
    assert digest in document, f"BENCHMARKS.md does not show the current sha256 of {name}.yaml"
    for png in (RESULTS / name).glob("*.png"):
        assert png.stat().st_size < 1_000_000


def test_every_suite_file_is_valid():
    for path in SUITES.glob("*.yaml"):
        suite = load_suite(str(path))
        assert suite.name == path.stem and suite.models and suite.seeds >= 1


def test_suite_errors_name_the_fault(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: bad\ndataset: synthetic\nmodels: [mmoe]\nepochs: 3\n")
    with pytest.raises(SchemaError, match="unknown suite keys \\['epochs'\\]"):
        load_suite("bad", tmp_path)
    (tmp_path / "typo.yaml").write_text("name: typo\ndataset: synthetic\nmodels: [mmeo]\n")
    with pytest.raises(Exception, match="mmeo"):
        load_suite("typo", tmp_path)
    (tmp_path / "lr.yaml").write_text("name: lr\ndataset: synthetic\nmodels: [mmoe]\ntuning: {learning_rate: [1]}\n")
    with pytest.raises(SchemaError, match="learning_rate"):
        load_suite("lr", tmp_path)
    with pytest.raises(FileNotFoundError, match="no benchmark suite 'nope'"):
        load_suite("nope", tmp_path)
    with pytest.raises(SchemaError, match="has no model"):
        load_suite("smoke", SUITES).entries(["dtrn"])


def test_weighted_auc_matches_the_rank_statistic_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounding makes ties
    sorted_auc = _SortedAUC(labels, scores)
    assert sorted_auc(np.ones(500)) == pytest.approx(auc(labels, scores))
    counts = np.bincount(rng.integers(0, 500, 500), minlength=500).astype(float)
    expanded = np.repeat(np.arange(500), counts.astype(int))
    assert sorted_auc(counts) == pytest.approx(auc(labels[expanded], scores[expanded]))


def test_paired_tests_see_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 2000)
    good = [labels + rng.normal(0, 0.8, 2000) for _ in range(3)]
    weak = [labels + rng.normal(0, 1.6, 2000) for _ in range(3)]
    users = rng.integers(0, 300, 2000)
    better = paired_bootstrap_auc(labels, good, weak, clusters=users, resamples=200)
    assert better["delta"] > 0 and better["ci_low"] > 0 and better["p"] <= 0.01
    same = paired_bootstrap_auc(labels, good, good, resamples=50)
    assert same["delta"] == 0 and same["p"] == 1.0
    t = paired_t([0.80, 0.81, 0.82], [0.70, 0.70, 0.72])
    assert t["n"] == 3 and t["p"] < 0.05 and t["mean_diff"] == pytest.approx(0.1033, abs=1e-3)


def test_the_gauc_bootstrap_resamples_users_and_sees_a_real_difference():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 3000)
    users = rng.integers(0, 250, 3000)
    good = [labels + rng.normal(0, 0.8, 3000) for _ in range(3)]
    weak = [labels + rng.normal(0, 1.6, 3000) for _ in range(3)]
    better = paired_bootstrap_gauc(labels, good, weak, users, resamples=200)
    expected = np.mean([gauc(labels, p, users) for p in good]) - np.mean([gauc(labels, p, users) for p in weak])
    assert better["delta"] == pytest.approx(expected) and better["ci_low"] > 0 and better["p"] <= 0.01
    same = paired_bootstrap_gauc(labels, good, good, users, resamples=50)
    assert same["delta"] == 0 and same["p"] == 1.0


def test_an_ablation_can_change_the_objective_of_any_model(tmp_path):
    """An ablation entry with ``objective`` (e.g. distillation added to MMoE) is merged over the suite's objective,
    takes its tuned values from its own model's row and is compared with that row."""
    (tmp_path / "kd.yaml").write_text(
        "name: kd\ndataset: synthetic\nmodels: [mmoe, onerank]\nobjective: {pointwise: 1.0}\n"
        "tuning: {lr: [0.001, 0.003]}\n"
        "ablations:\n  - {label: mmoe+kd, model: mmoe, objective: {distillation: {pairs: ['order<-cart']}}}\n"
        "  - {options: {cross_task: none}}\n"
    )
    suite = load_suite("kd", tmp_path)
    runner = SuiteRunner(suite, tmp_path / "out")
    kd, plain = suite.entries(["mmoe+kd"])[0], suite.entries(["onerank[cross_task=none]"])[0]
    config = runner.run_config(kd, None, {}, 0)
    assert config.model == "mmoe" and config.objective == {"pointwise": 1.0, "distillation": {"pairs": ["order<-cart"]}}
    assert runner.run_config(plain, None, {}, 0).objective == {"pointwise": 1.0}
    runner.results["runs"] = [
        {"key": f"v=None|{m}|lr={lr}|seed=0", "label": m, "hparams": {"lr": lr}, "valid_monitor": score}
        for m, lr, score in (("mmoe", 0.001, 0.6), ("mmoe", 0.003, 0.7),
                             ("onerank", 0.001, 0.7), ("onerank", 0.003, 0.6))
    ]
    runner._tune()
    tuning = runner.results["tuning"]["None"]
    assert tuning["mmoe+kd"] == {"chosen": {"lr": 0.003}, "grid": [], "from": "mmoe"}
    assert tuning["onerank[cross_task=none]"]["chosen"] == {"lr": 0.001}
    for body, message in (("{model: mmoe, objective: {listwise: 1.0}}", "needs a 'label'"),
                          ("{label: x, model: mmoe, objective: {distillation: {pairs: ['a<-b'], wieght: 1}}}",
                           "ablation 'x'.*unknown keys"),
                          ("{label: x, model: mmoe}", "'options' and / or 'objective'")):
        (tmp_path / "bad.yaml").write_text(f"name: bad\ndataset: synthetic\nmodels: [mmoe]\nablations: [{body}]\n")
        with pytest.raises(SchemaError, match=message):
            load_suite("bad", tmp_path)


def test_onerank_attention_benchmark_writes_its_rows(tmp_path):
    """The issue's benchmark script keeps working: a tiny N, its JSON rows with the documented fields."""
    out = tmp_path / "attention.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "onerank_attention.py"), "--sizes", "3", "--budget", "0.05",
         "--json", str(out)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (row,) = json.loads(out.read_text())
    assert row["n"] == 3
    for key in ("structured_ms", "reference_ms", "ratio", "structured_e2e_ms", "reference_e2e_ms"):
        assert row[key] > 0, key
    try:  # the peak is measured after resetting the high-water mark; where that is refused it is NaN, not wrong
        Path("/proc/self/clear_refs").write_text("5")
        can_reset_peak = True
    except OSError:
        can_reset_peak = False
    for key in ("peak_mb", "reference_peak_mb"):
        assert row[key] > 0 if can_reset_peak else math.isnan(row[key]), key
    assert row["ratio"] == pytest.approx(row["reference_ms"] / row["structured_ms"], rel=0.02)


# ---- per-model tuning grids (model_tuning) and unpublished timings (timings: false) ---------------------------------
GRID_SUITE = """name: grid
dataset: synthetic
models: [mmoe, onerank]
model_options:
  onerank: {dim: 8, num_layers: 1, num_heads: 1}
tuning: {lr: [0.001, 0.003]}
model_tuning:
  onerank: {dim: [8, 16], num_layers: [1, 2]}
  mmoe: {weight_decay: [0.0, 0.0001]}
ablations:
  - {options: {num_layers: 0, cross_task: none}}
seeds: 3
"""


def test_model_tuning_gives_each_model_its_own_grid_and_applies_the_chosen_point(tmp_path):
    """A model's grid is the suite's times its own; a key that is a TrainConfig field is a trainer setting, any other
    a model option; the chosen point reaches the model's seeds and its ablations (whose own options win)."""
    (tmp_path / "grid.yaml").write_text(GRID_SUITE)
    suite = load_suite("grid", tmp_path)
    runner = SuiteRunner(suite, tmp_path / "out")
    mmoe, onerank, ablation = suite.models
    assert len(suite.grid(mmoe)) == 2 * 2 and len(suite.grid(onerank)) == 2 * 2 * 2
    assert suite.grid(onerank)[0] == {"dim": 8, "lr": 0.001, "num_layers": 1}
    # the ablation sets num_layers itself: its points are onerank's without it, 4 distinct ones
    assert suite.grid(ablation) == [{"dim": d, "lr": lr} for d in (8, 16) for lr in (0.001, 0.003)]
    # per variant: mmoe 4 points + 2 more seeds, onerank 8 + 2, the ablation 3 seeds
    assert runner.total_runs() == (4 + 2) + (8 + 2) + 3
    keys = {runner._spec(*job)["key"] for job in runner._all_jobs()}
    assert len(keys) == len(runner._all_jobs())  # unique
    assert "v=None|onerank|dim=16,lr=0.003,num_layers=2|seed=0" in keys
    assert "v=None|mmoe|lr=0.001,weight_decay=0.0001|seed=2" in keys

    # the split: weight_decay goes to the trainer, dim and num_layers to the model
    config = runner.run_config(mmoe, None, {"lr": 0.003, "weight_decay": 0.0001}, 1)
    assert config.train.weight_decay == 0.0001 and config.train.lr == 0.003 and config.model_options == {}
    config = runner.run_config(onerank, None, {"dim": 16, "lr": 0.003, "num_layers": 2}, 1)
    assert config.model_options == {"dim": 16, "num_layers": 2, "num_heads": 1} and config.train.lr == 0.003

    scores = {(8, 1): 0.60, (8, 2): 0.62, (16, 1): 0.70, (16, 2): 0.65}  # onerank best at dim 16, 1 layer, lr 3e-3
    runner.results["runs"] = [
        {"key": run_key(None, "onerank", hp, 0), "label": "onerank", "hparams": hp,
         "valid_monitor": scores[hp["dim"], hp["num_layers"]] + (0.01 if hp["lr"] == 0.003 else 0.0)}
        for hp in suite.grid(onerank)
    ] + [{"key": run_key(None, "mmoe", hp, 0), "label": "mmoe", "hparams": hp,
          "valid_monitor": 0.6 + hp["weight_decay"]} for hp in suite.grid(mmoe)]
    jobs = runner._tune()
    tuning = runner.results["tuning"]["None"]
    assert tuning["onerank"]["chosen"] == {"dim": 16, "lr": 0.003, "num_layers": 1}
    assert tuning["mmoe"]["chosen"] == {"lr": 0.001, "weight_decay": 0.0001}
    assert len(tuning["onerank"]["grid"]) == 8
    assert tuning["onerank[num_layers=0,cross_task=none]"] == {"chosen": {"dim": 16, "lr": 0.003}, "grid": [],
                                                                "from": "onerank"}
    seed_runs = {(e.label, seed): runner.run_config(e, v, hp, seed) for e, v, hp, seed in jobs}
    assert seed_runs["onerank", 2].model_options == {"dim": 16, "num_layers": 1, "num_heads": 1}
    assert seed_runs["onerank", 2].train.lr == 0.003 and seed_runs["onerank", 2].train.seed == 2
    # the ablation: onerank's chosen dim and lr, its own num_layers and cross_task
    ablated = seed_runs["onerank[num_layers=0,cross_task=none]", 1]
    assert ablated.model_options == {"dim": 16, "num_layers": 0, "num_heads": 1, "cross_task": "none"}
    assert ablated.train.lr == 0.003
    assert seed_runs["mmoe", 1].train.weight_decay == 0.0001


def test_coordinate_search_tunes_a_models_own_grid_first_then_the_suite_grid_at_its_choice(tmp_path, monkeypatch):
    """tuning_search: coordinate. OneRank's own grid (dim x num_layers) runs at the suite's first lr; the lr grid then
    runs at the chosen dim and num_layers; the choice is the best of every point run; a model without model_tuning
    keeps the plain grid. The runner's phases ask for exactly those runs (training replaced by scores)."""
    (tmp_path / "grid.yaml").write_text(GRID_SUITE.replace("  mmoe: {weight_decay: [0.0, 0.0001]}\n", "")
                                        .replace("models: [mmoe, onerank]", "models: [mmoe, onerank]\n"
                                                 "tuning_search: coordinate"))
    suite = load_suite("grid", tmp_path)
    mmoe, onerank, ablation = suite.models
    assert suite.first_stage(mmoe) == suite.grid(mmoe) == [{"lr": 0.001}, {"lr": 0.003}]
    assert suite.first_stage(onerank) == [{"dim": d, "lr": 0.001, "num_layers": n} for d in (8, 16) for n in (1, 2)]
    assert suite.second_stage(onerank, {"dim": 16, "lr": 0.001, "num_layers": 1}) == [
        {"dim": 16, "lr": lr, "num_layers": 1} for lr in (0.001, 0.003)]
    assert suite.second_stage(mmoe, {"lr": 0.001}) == []
    assert suite.points_searched(onerank) == 4 + 2 - 1 and suite.points_searched(mmoe) == 2
    runner = SuiteRunner(suite, tmp_path / "out")
    # mmoe 2 points + 2 more seeds; onerank 5 points + 2 more seeds; the ablation 3 seeds
    assert runner.total_runs() == (2 + 2) + (5 + 2) + 3

    # onerank's validation score: best own values dim 16, 1 layer; at those, lr 3e-3 beats 1e-3; a point outside
    # the search (dim 8, lr 3e-3) would score best of all: it must not be trained
    scores = {(8, 1): 0.60, (8, 2): 0.62, (16, 1): 0.70, (16, 2): 0.65}
    trained = []

    def fake_run(config):
        options, lr = config.model_options, config.train.lr
        trained.append((config.model, options.get("dim"), options.get("num_layers"), lr, config.train.seed))
        score = 0.6 if config.model == "mmoe" else scores.get((options["dim"], options["num_layers"]), 0.5) + (
            (0.05 if options["dim"] == 16 else 0.5) if lr == 0.003 else 0.0)
        return {"valid_monitor": score}, None

    monkeypatch.setattr("onerank.benchmarking.runner.execute_run", fake_run)
    monkeypatch.setattr("onerank.benchmarking.runner.api.load_run_dataset", lambda config: None)
    monkeypatch.setattr(SuiteRunner, "finalize", lambda self: self._tune())
    runner.run()
    onerank_seed0 = [(d, n, lr) for model, d, n, lr, seed in trained if model == "onerank" and n and seed == 0]
    assert sorted(onerank_seed0) == sorted([(8, 1, 0.001), (8, 2, 0.001), (16, 1, 0.001), (16, 2, 0.001),
                                            (16, 1, 0.003)])
    tuning = runner.results["tuning"]["None"]
    assert tuning["onerank"]["chosen"] == {"dim": 16, "lr": 0.003, "num_layers": 1}
    assert [p["hparams"] for p in tuning["onerank"]["grid"]][-1] == {"dim": 16, "lr": 0.003, "num_layers": 1}
    assert len(tuning["onerank"]["grid"]) == 5 and all(p["valid_monitor"] for p in tuning["onerank"]["grid"])
    assert sorted(seed for model, d, n, lr, seed in trained if (model, d, n, lr) == ("onerank", 16, 1, 0.003)) == \
        [0, 1, 2]
    assert len(trained) == runner.total_runs()
    assert tuning["onerank[num_layers=0,cross_task=none]"]["chosen"] == {"dim": 16, "lr": 0.003}


def test_a_run_is_queued_as_soon_as_its_own_inputs_are_done_not_after_every_models_tuning(tmp_path):
    """Parallel workers are never left idle behind a slow model's grid: a model whose search is done has its other
    seeds ready while another model is still in its first stage; a second stage waits only for its own first stage,
    an ablation only for its base row's search; lower seeds come first."""
    (tmp_path / "grid.yaml").write_text(GRID_SUITE.replace("models: [mmoe, onerank]", "models: [mmoe, onerank]\n"
                                                           "tuning_search: coordinate"))
    suite = load_suite("grid", tmp_path)
    mmoe, onerank, ablation = suite.models
    runner = SuiteRunner(suite, tmp_path / "out")

    def finish(entry, points, seed=0):
        runner.results["runs"] += [{"key": run_key(None, entry.label, hp, seed), "label": entry.label, "hparams": hp,
                                    "valid_monitor": 0.6 + 0.01 * hp.get("dim", 0) + hp["lr"] + hp.get("weight_decay", 0)}
                                   for hp in points]

    def ready():
        return [(e.label, tuple(sorted(hp.items())), seed) for e, _, hp, seed in runner._ready_jobs()
                if runner._done(run_key(None, e.label, hp, seed)) is None]

    finish(mmoe, suite.grid(mmoe))  # mmoe tuned; onerank has one of its four first-stage points
    finish(onerank, suite.first_stage(onerank)[:1])
    jobs = ready()
    mmoe_best = tuple(sorted({"lr": 0.003, "weight_decay": 0.0001}.items()))
    assert sorted(j for j in jobs if j[0] == "mmoe") == [("mmoe", mmoe_best, 1), ("mmoe", mmoe_best, 2)]
    assert sorted(j[1] for j in jobs if j[0] == "onerank") == sorted(
        tuple(sorted(hp.items())) for hp in suite.first_stage(onerank)[1:])
    assert not any(j[0] == ablation.label for j in jobs)
    assert [j[2] for j in jobs] == sorted(j[2] for j in jobs)  # the tuning runs (seed 0) before any seed 1

    finish(onerank, suite.first_stage(onerank)[1:])  # first stage done: its second stage, not yet its seeds
    jobs = ready()
    second = {"dim": 16, "lr": 0.003, "num_layers": 1}  # dim 16 scores best; a tie between depths keeps the first
    assert [j for j in jobs if j[0] == "onerank"] == [("onerank", tuple(sorted(second.items())), 0)]
    assert not any(j[0] == ablation.label for j in jobs)

    finish(onerank, [second])  # tuned: its seeds and the ablation's, at onerank's chosen point
    jobs = ready()
    assert sorted(j[2] for j in jobs if j[0] == "onerank") == [1, 2]
    assert sorted(j for j in jobs if j[0] == ablation.label) == [
        (ablation.label, (("dim", 16), ("lr", 0.003)), seed) for seed in range(3)]

    # the ablation alone (--models): nothing while its base row has no runs on disk, then the same runs
    alone = SuiteRunner(suite, tmp_path / "alone", models=[ablation.label])
    assert alone._ready_jobs() == []
    alone.results["runs"] = runner.results["runs"]
    assert [(hp, seed) for _, _, hp, seed in alone._ready_jobs()] == [({"dim": 16, "lr": 0.003}, s) for s in range(3)]


def test_a_suite_without_ablations_trains_every_tuned_run_and_the_ablations_come_later(tmp_path, monkeypatch):
    """--no-ablations: the tuned models' grids and seeds, none of the ablations' runs; a later run with the
    ablations (what --resume does) trains exactly the ablations' seeds, at the base row's chosen point."""
    (tmp_path / "grid.yaml").write_text(GRID_SUITE)
    suite = load_suite("grid", tmp_path)
    trained = []

    def fake_run(config):
        trained.append((config.model, tuple(sorted(config.model_options.items())), config.train.seed))
        return {"valid_monitor": 0.6 + 0.01 * config.train.seed}, None

    monkeypatch.setattr("onerank.benchmarking.runner.execute_run", fake_run)
    monkeypatch.setattr("onerank.benchmarking.runner.api.load_run_dataset", lambda config: None)
    monkeypatch.setattr(SuiteRunner, "finalize", lambda self: self._tune())
    complete = SuiteRunner(suite, tmp_path / "all")
    without = SuiteRunner(suite, tmp_path / "out", ablations=False)
    assert without.total_runs() == complete.total_runs() - 3  # the ablation's 3 seeds
    without.run()
    assert len(trained) == without.total_runs()
    assert not any(("cross_task", "none") in options for _, options, _ in trained)
    later = SuiteRunner(suite, tmp_path / "out")
    later.results["runs"] = without.results["runs"]
    trained.clear()
    later.run()
    assert len(trained) == 3 and all(("cross_task", "none") in options for _, options, _ in trained)
    assert len(later.results["runs"]) == complete.total_runs()


def test_a_filtered_resume_of_a_changed_suite_keeps_the_other_models_runs(tmp_path):
    """--resume --models X after the suite file changed: the runs the new version still asks for are kept for every
    model, not only X's (X's own are dropped where their configuration changed); a model left out of --models must
    not lose its runs."""
    (tmp_path / "grid.yaml").write_text(GRID_SUITE)
    before = SuiteRunner(load_suite("grid", tmp_path), tmp_path / "out", work_dir=tmp_path / "work")
    runs = []
    for job in before._all_jobs():
        spec = before._spec(*job)
        path = before._prediction_path(spec["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, click=np.zeros(2))
        runs.append({**spec, "valid_monitor": 0.5})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps({"suite_sha256": "an older version", "runs": runs}))
    # the new version changes onerank's options: its runs (and its ablation's) go, mmoe's stay
    (tmp_path / "grid.yaml").write_text(GRID_SUITE.replace("num_heads: 1}", "num_heads: 1, ffn_multiplier: 2}"))
    resumed = SuiteRunner(load_suite("grid", tmp_path), tmp_path / "out", work_dir=tmp_path / "work",
                          models=["onerank"], resume=True)
    kept = resumed.results["runs"]
    assert sorted(r["key"] for r in kept) == sorted(r["key"] for r in runs if r["model"] == "mmoe")
    unchanged = SuiteRunner(load_suite("grid", tmp_path), tmp_path / "out", work_dir=tmp_path / "work",
                            models=["mmoe"], resume=True)
    assert len(unchanged.results["runs"]) == len(kept)


def test_run_keys_and_totals_of_the_published_suites_are_unchanged(tmp_path):
    """Every run of a published results.json is one the current runner would ask for, under the same key and with
    the same model options, so that ``--resume`` and ``--report-only`` keep finding them."""
    for name in PUBLISHED:
        runner = SuiteRunner(load_suite(name), tmp_path / name)
        specs = {}
        for job in runner._all_jobs():
            spec = runner._spec(*job)
            specs[spec["key"]] = spec
        runs = json.loads((RESULTS / name / "results.json").read_text())["runs"]
        assert [r["key"] for r in runs if r["key"] not in specs] == [], name
        assert all(specs[r["key"]]["options"] == r["options"] for r in runs), name
        assert runner.total_runs() >= len(runs), name


def test_model_tuning_and_timings_errors_name_the_suite_the_model_and_the_key(tmp_path):
    head = "name: bad\ndataset: synthetic\nmodels: [mmoe, onerank]\ntuning: {lr: [0.001]}\n"
    bad = tmp_path / "bad.yaml"
    for body, message in (
        ("model_tuning: {onerank: {dmi: [8, 16]}}", r"bad\.yaml: model_tuning\.onerank\.dmi is neither an option of "
                                                    r"model 'onerank'"),
        ("model_tuning: {dtrn: {dim: [8]}}", r"bad\.yaml: model_tuning names 'dtrn', which is not in the suite's "
                                             r"models"),
        ("model_tuning: {'onerank[cross_task=none]': {dim: [8]}}\nablations: [{options: {cross_task: none}}]",
         "an ablation is not tuned"),
        ("model_tuning: {onerank: {lr: [0.01]}}", r"model_tuning\.onerank\.lr is already on the suite-wide grid"),
        ("model_tuning: {onerank: {dim: [-8]}}", r"model_tuning\.onerank\.dim = -8: .*must not be negative"),
        ("model_tuning: {onerank: {dim: 8}}", r"model_tuning\.onerank\.dim must be a non-empty list"),
        ("model_tuning: {onerank: {dim: [8, 8]}}", "repeats a value"),
        ("model_tuning: {mmoe: {seed: [0, 1]}}", r"model_tuning\.mmoe\.seed cannot be tuned"),
        ("model_tuning: {mmoe: {patience: [abc]}}", r"model_tuning\.mmoe\.patience = 'abc'"),
        ("model_tuning: {onerank: {dim: [8, 16]}}\nablations: [{label: x, model: mmoe, options: {num_experts: 2}}]",
         None),  # an mmoe ablation compared with the mmoe row: fine
        ("models: [single_task, onerank]\nmodel_tuning: {onerank: {dim: [8, 16]}}\n"
         "ablations: [{label: x, model: mmoe, options: {num_experts: 2}}]",
         r"ablation 'x' of model 'mmoe' takes its tuned values from 'onerank'.*\['dim'\]"),
        ("timings: no-thanks", "timings must be true or false"),
        ("tuning_search: random", "tuning_search must be product or coordinate, got 'random'"),
        ("ablations: [{options: {cross_tsk: none}}]", r"onerank\[cross_tsk=none\]: model 'onerank' has no option"),
    ):
        text = head + body + "\n"
        if body.startswith("models:"):
            text = text.replace("models: [mmoe, onerank]\n", "")
        bad.write_text(text)
        if message is None:
            load_suite("bad", tmp_path)
            continue
        with pytest.raises(SchemaError, match=message) as caught:
            load_suite("bad", tmp_path)
        assert "\n" not in str(caught.value)


def test_a_suite_with_model_tuning_and_no_timings_runs_reports_and_resumes(tmp_path):
    """End to end on tiny synthetic data: OneRank tuned over two widths, the chosen width reaching its seeds and its
    ablation, the report showing the grid and leaving out the throughputs."""
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "tiny.yaml").write_text(
        "name: tiny\ndataset: synthetic\n"
        "dataset_options: {num_users: 80, num_items: 40, candidates_per_request: 6, history_len: 4, "
        "history_requests: 2.0}\n"
        "models: [single_task, onerank]\n"
        "model_options:\n  onerank: {dim: 8, num_layers: 1, num_heads: 1, item_mlp_hidden: [8]}\n"
        "model_tuning:\n  onerank: {dim: [4, 8]}\n"
        "ablations:\n  - {options: {cross_task: none}}\n"
        "seeds: 2\ntrain: {epochs: 1, batch_size: 256, patience: 1, threads: 1, device: cpu, lr: 0.01}\n"
        "timings: false\nbootstrap: 20\n"
    )
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["benchmark", "--suite", "tiny", "--suites-dir", str(suites), "--out", str(out), "--work-dir", str(work),
            "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["key"]: r for r in results["runs"]}
    # single_task: 1 point + 1 more seed; onerank: 2 widths + 1 more seed; the ablation: 2 seeds
    assert len(runs) == 2 + 3 + 2 and not [r for r in runs.values() if r.get("error")]
    assert {"v=None|single_task||seed=0", "v=None|single_task||seed=1", "v=None|onerank|dim=4|seed=0",
            "v=None|onerank|dim=8|seed=0"} <= set(runs)
    # the width is really applied: the wider model has more parameters
    assert runs["v=None|onerank|dim=4|seed=0"]["params"] < runs["v=None|onerank|dim=8|seed=0"]["params"]
    chosen = results["tuning"]["None"]["onerank"]["chosen"]
    assert set(chosen) == {"dim"}
    dim = chosen["dim"]
    seed1 = runs[f"v=None|onerank|dim={dim}|seed=1"]
    assert seed1["options"]["dim"] == dim and seed1["params"] == runs[f"v=None|onerank|dim={dim}|seed=0"]["params"]
    for seed in (0, 1):
        ablated = runs[f"v=None|onerank[cross_task=none]|dim={dim}|seed={seed}"]
        assert ablated["options"] == {"dim": dim, "num_layers": 1, "num_heads": 1, "item_mlp_hidden": [8],
                                      "cross_task": "none"}
    block = results["summary"]["None"]
    assert block["models"]["onerank"]["seeds"] == 2 and block["models"]["onerank"]["hparams"] == {"dim": dim}

    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "params" in header and "FLOPs/sample" in header
    assert "samples/s" not in header and "cand./s" not in header
    assert "* timings: not published for this suite" in report and "`benchmarks/throughput.py`" in report
    assert "not a cost measurement" in next(line for line in report.splitlines() if line.startswith("* wall time"))
    assert "* per-model grids, each times the tuning grid above" in report
    assert "onerank {'dim': [4, 8]} (2 points)" in report
    assert f"Chosen on validation: single_task {{}}, onerank {{'dim': {dim}}}" in report
    tuning_rows = report.split("Tuning of onerank")[1].split("\n\n")[1].splitlines()
    assert tuning_rows[0].startswith("| dim | validation monitor (seed 0) |") and len(tuning_rows) == 2 + 2
    chosen_rows = [row for row in tuning_rows if row.endswith("| chosen |")]
    assert len(chosen_rows) == 1 and chosen_rows[0].startswith(f"| {dim} |")

    # resuming trains nothing: the keys are stable
    before = results["runs"]
    assert cli.main(args + ["--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == before


def test_kuairand_slices_partition_the_test_rows():
    """benchmarks/kuairand_slices.py: the history-length slices and the video-frequency slices each cover every test
    row exactly once, at the loader's history length."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kuairand_slices", ROOT / "benchmarks" / "kuairand_slices.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    for history_len in (1, 2, 10, 50):
        lengths, shown = rng.integers(0, history_len + 1, 500), rng.integers(0, 120, 500)
        masks = module.slices(history_len, lengths, shown)
        by_history = [m for name, m in masks.items() if name.startswith("history")]
        by_video = [m for name, m in masks.items() if name.startswith("video")]
        assert (np.sum(by_history, axis=0) == 1).all() and (np.sum(by_video, axis=0) == 1).all(), history_len
        assert masks[f"history {history_len}"].sum() == (lengths == history_len).sum()
    assert list(masks)[-4:] == ["video unseen in training", "video shown 1-4x", "video shown 5-49x",
                                "video shown 50+x"]


def test_every_label_of_a_shipped_suite_has_its_own_colour():
    """One colour per model or variant within a suite's figures (bars carry no marker), the same in every figure; a
    variant such as ``mmoe+distil`` is a lighter shade of its model's colour."""
    from matplotlib.colors import rgb_to_hsv, to_rgb

    from onerank.benchmarking.plots import MODEL_STYLES, style

    for path in sorted(SUITES.glob("*.yaml")):
        labels = [entry.label for entry in load_suite(path).models]
        colours = [style(label)["color"] for label in labels]
        assert len(set(colours)) == len(labels), (path.name, dict(zip(labels, colours)))
    assert style("mmoe")["color"] == MODEL_STYLES["mmoe"][0]
    # a variant takes its own model's hue, not that of a model whose name its name starts with (dtrn_mmoe, not dtrn)
    assert abs(rgb_to_hsv(to_rgb(style("dtrn_mmoe+distil")["color"]))[0]
               - rgb_to_hsv(to_rgb(MODEL_STYLES["dtrn_mmoe"][0]))[0]) < 0.01
    variants = [style(f"{model}+distil")["color"] for model in ("mmoe", "ple", "onerank")]
    assert len(set(variants)) == 3 and not set(variants) & {c for c, _ in MODEL_STYLES.values()}
    base, shade = (rgb_to_hsv(to_rgb(c)) for c in (MODEL_STYLES["ple"][0], variants[1]))
    assert abs(shade[0] - base[0]) < 0.01 and shade[1] < base[1]  # PLE's hue, paler
