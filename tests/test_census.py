"""UCI Census-Income loader: official sizes and base rates, features, NA category, split, file formats, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onerank.data import SchemaError, load_dataset
from onerank.data.census import (
    CENSUS_COLUMNS,
    build_raw,
    census_schema,
    field_name,
    find_census_files,
    load,
    read_census_file,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CENSUS_DIR = SHARED_DATA / "census-income"
needs_data = pytest.mark.skipif(
    not (CENSUS_DIR / "census-income.data.gz").exists() and not (CENSUS_DIR / "census-income.data").exists(),
    reason=f"UCI census-income files not found in {CENSUS_DIR}",
)

# Two real lines of census-income.data, for the format tests that must run without the shared data.
SAMPLE_LINES = [
    "73, Not in universe, 0, 0, High school graduate, 0, Not in universe, Widowed, Not in universe or children, "
    "Not in universe, White, All other, Female, Not in universe, Not in universe, Not in labor force, 0, 0, 0, "
    "Nonfiler, Not in universe, Not in universe, Other Rel 18+ ever marr not in subfamily, Other relative of "
    "householder, 1700.09, ?, ?, ?, Not in universe under 1 year old, ?, 0, Not in universe, United-States, "
    "United-States, United-States, Native- Born in the United States, 0, Not in universe, 2, 0, 95, - 50000.",
    "58, Self-employed-not incorporated, 4, 34, Some college but no degree, 0, Not in universe, Divorced, "
    "Construction, Precision production craft & repair, White, NA, Male, Not in universe, Not in universe, "
    "Children or Armed Forces, 0, 0, 0, Head of household, South, Arkansas, Householder, Householder, 1053.55, "
    "MSA to MSA, Same county, Same county, No, Yes, 1, Not in universe, United-States, United-States, "
    "United-States, Native- Born in the United States, 0, Not in universe, 2, 52, 94, 50000+.",
]


def _write(path: Path, lines: list[str], gz: bool = False) -> Path:
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _head(path: Path, n: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return [next(fh).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    """First 500 lines of each official file, as plain text in one folder and gzip in another."""
    if not (CENSUS_DIR / "census-income.data.gz").exists():
        pytest.skip(f"UCI census-income .gz files not found in {CENSUS_DIR}")
    plain, gz = tmp_path_factory.mktemp("census-plain"), tmp_path_factory.mktemp("census-gz")
    for stem in ("census-income.data", "census-income.test"):
        lines = _head(CENSUS_DIR / f"{stem}.gz", 500)
        _write(plain / stem, lines)
        _write(gz / f"{stem}.gz", lines, gz=True)
    return plain, gz


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    if not CENSUS_DIR.is_dir():
        pytest.skip(f"UCI census-income files not found in {CENSUS_DIR}")
    root = tmp_path_factory.mktemp("census-cache")
    return load(CENSUS_DIR, root), root


# ---- the official files ------------------------------------------------------------------------------------------
@needs_data
def test_official_sizes_and_base_rates(full):
    ds, _ = full
    assert len(ds.train) + len(ds.valid) == 199_523
    assert len(ds.test) == 99_762
    assert len(ds.valid) == round(199_523 * 0.1)
    assert ds.schema.task_names == ["income", "marital"]
    for split in ("train", "valid", "test"):
        labels = ds.split(split).labels
        assert labels["income"].mean() == pytest.approx(0.062, abs=0.003)
        assert labels["marital"].mean() == pytest.approx(0.433, abs=0.006)
    train_valid = np.concatenate([ds.train.labels["income"], ds.valid.labels["income"]])
    assert train_valid.mean() == pytest.approx(0.0621, abs=0.0005)
    assert ds.info["files"]["train"]["official"] and ds.info["files"]["test"]["official"]


@needs_data
def test_features_and_na_category(full):
    ds, _ = full
    schema = ds.schema
    sources = [f.source for f in schema.categorical] + [f.source for f in schema.dense]
    assert "instance weight" not in sources and "income" not in sources
    assert "marital stat" not in sources  # the marital task's source is not a feature
    assert "education" in sources  # education is a feature unless it is a task
    assert len(sources) == 42 - 3
    assert {f.source for f in schema.dense} == {
        "age", "wage per hour", "capital gains", "capital losses", "dividends from stocks",
        "num persons worked for employer", "weeks worked in year",
    }
    assert all(f.name.isidentifier() for f in schema.categorical + schema.dense)
    assert schema.user_id is None and schema.item_id is None and not schema.sequences
    assert ds.train.user is None and ds.train.request is None
    hispanic = ds.encoders.vocabularies["hispanic_origin"].to_list()
    assert "NA" in hispanic and "All other" in hispanic
    na_code = ds.encoders.vocabularies["hispanic_origin"].encode(np.array(["NA"]))[0]
    assert na_code >= 2 and (ds.test.categorical["hispanic_origin"] == na_code).any()
    for name, values in ds.train.dense.items():
        assert abs(values.mean()) < 1e-3 and values.std() == pytest.approx(1.0, abs=1e-3), name


@needs_data
def test_cache_hit(full):
    ds, root = full
    again = load_dataset("census", CENSUS_DIR, cache_root=root)
    assert ds.info["cache_hit"] is False and again.info["cache_hit"] is True
    np.testing.assert_array_equal(again.valid.labels["marital"], ds.valid.labels["marital"])


# ---- small copies of the official files --------------------------------------------------------------------------
def test_gzip_and_plain_read_the_same(small_dirs):
    plain, gz = small_dirs
    a, _ = read_census_file(plain / "census-income.data")
    b, _ = read_census_file(gz / "census-income.data.gz")
    assert len(a) == 500 and list(a.columns) == CENSUS_COLUMNS
    pd.testing.assert_frame_equal(a, b)
    ra, rb = build_raw(plain), build_raw(gz)
    for split in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(getattr(ra, split).table, getattr(rb, split).table)
    # load from a user-given folder with plain files, caching in tmp
    ds = load(plain, plain / "cache")
    assert len(ds.train) == 450 and len(ds.valid) == 50 and len(ds.test) == 500


def test_valid_split_is_seeded(small_dirs):
    plain, _ = small_dirs
    a, b, c = build_raw(plain, seed=0), build_raw(plain, seed=0), build_raw(plain, seed=1)
    assert len(a.valid.table) == 50 and len(a.train.table) == 450
    pd.testing.assert_frame_equal(a.valid.table, b.valid.table)
    assert not a.valid.table.equals(c.valid.table)
    # train and valid partition the train file
    original, _ = read_census_file(plain / "census-income.data")
    both = pd.concat([a.train.table, a.valid.table])[CENSUS_COLUMNS]
    key = list(CENSUS_COLUMNS)
    pd.testing.assert_frame_equal(
        both.sort_values(key).reset_index(drop=True), original.sort_values(key).reset_index(drop=True)
    )
    d = build_raw(plain, valid_fraction=0.2)
    assert len(d.valid.table) == 100


def test_education_task(small_dirs):
    plain, _ = small_dirs
    raw = build_raw(plain, tasks=["income", "marital", "education"])
    assert raw.schema.task_names == ["income", "marital", "education"]
    sources = {f.source for f in raw.schema.categorical}
    assert "education" not in sources and "marital stat" not in sources
    table = raw.train.table
    degree = table["education"].str.contains("Bachelors|Masters|Doctorate|Prof school")
    np.testing.assert_array_equal(table["label_education"].to_numpy(), degree.astype(np.int8).to_numpy())
    np.testing.assert_array_equal(
        table["label_marital"].to_numpy(), (table["marital stat"] == "Never married").astype(np.int8).to_numpy()
    )
    # marital stat is a feature again when marital is not a task
    assert "marital stat" in {f.source for f in census_schema(["income", "education"]).categorical}
    with pytest.raises(SchemaError, match="tasks"):
        census_schema(["income", "age"])
    with pytest.raises(SchemaError, match="unknown options"):
        load(plain, plain / "cache", task=["income"])


def test_field_names():
    assert field_name("class of worker") == "class_of_worker"
    assert field_name("migration code-change in msa") == "migration_code_change_in_msa"
    assert field_name("fill inc questionnaire for veteran's admin") == "fill_inc_questionnaire_for_veterans_admin"


# ---- errors (no shared data needed) ----------------------------------------------------------------------------------
def test_malformed_file_names_the_file_and_line(tmp_path):
    fields = SAMPLE_LINES[0].split(", ")
    short = ", ".join(fields[:-2] + fields[-1:])  # 41 fields
    path = _write(tmp_path / "census-income.data", [SAMPLE_LINES[0], SAMPLE_LINES[1], short, SAMPLE_LINES[1]])
    with pytest.raises(SchemaError, match=r"census-income\.data line 3 has 41 .*expected 42"):
        read_census_file(path)
    long = _write(tmp_path / "long.data", [SAMPLE_LINES[0] + ", extra"])
    with pytest.raises(SchemaError, match=r"long\.data line 1 has 43"):
        read_census_file(long)
    bad_label = _write(tmp_path / "label.data", [SAMPLE_LINES[0][: -len("- 50000.")] + "maybe"])
    with pytest.raises(SchemaError, match=r"label\.data line 1: column 'income' holds 'maybe'"):
        read_census_file(bad_label)
    bad_age = _write(tmp_path / "age.data", ["old" + SAMPLE_LINES[0][2:]])
    with pytest.raises(SchemaError, match=r"age\.data line 1: column 'age' holds 'old'"):
        read_census_file(bad_age)


def test_sample_lines_parse_with_na_and_blank_lines(tmp_path):
    path = _write(tmp_path / "census-income.test", [SAMPLE_LINES[0], "", SAMPLE_LINES[1], ""])
    table, facts = read_census_file(path)
    assert len(table) == 2 and facts["rows"] == 2
    assert table["hispanic origin"].tolist() == ["All other", "NA"]
    assert table["income"].tolist() == ["- 50000.", "50000+."]
    assert table["age"].tolist() == [73.0, 58.0]
    assert table["migration code-change in msa"].iloc[0] == "?"


def test_missing_files_give_clear_errors(tmp_path, monkeypatch):
    _write(tmp_path / "census-income.data", SAMPLE_LINES)
    with pytest.raises(FileNotFoundError, match=r"missing census-income\.test \(or census-income\.test\.gz\)"):
        find_census_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="census-income.test"):
        load_dataset("census", tmp_path, cache_root=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_census_files(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)  # ../shared/data/census-income does not exist from here
    with pytest.raises(FileNotFoundError, match=r"census-income\.data\[\.gz\]"):
        find_census_files(None)


@needs_data
def test_default_data_dir_is_relative_to_cwd(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repo root: ../shared/data/census-income is CENSUS_DIR
    files = find_census_files(None)
    assert files["train"].name.startswith("census-income.data")
    assert files["test"].resolve().parent == CENSUS_DIR.resolve()
