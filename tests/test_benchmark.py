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
from onerank.benchmarking.runner import SuiteRunner
from onerank.benchmarking.stats import _SortedAUC, paired_bootstrap_auc, paired_bootstrap_gauc, paired_t
from onerank.data.schema import SchemaError
from onerank.metrics.ranking import auc, gauc

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "benchmarks" / "suites"
RESULTS = ROOT / "benchmarks" / "results"
PUBLISHED = ("census", "kuairand", "lists", "synthetic", "distillation", "distillation_synthetic")


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
    assert "| *oracle (true probabilities)* |" in report and "Gap to the oracle on `click`" in report
    # one epoch at most: every run's best epoch is its last, and the report says so for every model
    assert report.count("Not converged") == 2 and "onerank[cross_task=none] (2 of 2 seeds)" in report

    # resuming a finished suite trains nothing; --report-only re-renders from the stored runs
    before = (out / "results.json").read_text()
    assert cli.main(args + ["--resume"]) == 0
    assert len(json.loads((out / "results.json").read_text())["runs"]) == len(json.loads(before)["runs"])
    assert cli.main(args + ["--report-only"]) == 0
    assert json.loads((out / "results.json").read_text())["summary"].keys() == results["summary"].keys()

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
    # --rerun trains a model again (its code changed) and keeps the others
    assert cli.main(args + ["--resume", "--suites-dir", str(suites), "--rerun", "onerank[listwise=0]"]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[smoke] ")]
    assert len(progress) == 4 and all("onerank[listwise=0]" in line for line in progress)
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
    runner._tune([{"lr": 0.001}, {"lr": 0.003}])
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
