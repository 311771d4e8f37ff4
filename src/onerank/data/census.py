"""UCI Census-Income (KDD) loader: the classic multi-task tabular benchmark of the MMoE and PLE papers.

Files: ``census-income.data`` and ``census-income.test``, gzip-compressed or plain (detected from the content, not the
name), 42 comma-separated fields, no header, in the order of ``CENSUS_COLUMNS``.

* Tasks: ``income`` (income is ``50000+.``), ``marital`` (``marital stat`` is ``Never married``) and, optionally,
  ``education`` (``education`` is a bachelor's degree or higher: Bachelors, Masters, Prof school or Doctorate).
  Choose with ``tasks=[...]``; the default is the classic pair ``["income", "marital"]``.
* A selected task's source column is never a feature: ``marital stat`` is dropped when ``marital`` is a task and
  ``education`` when ``education`` is a task. ``income`` (the label) and ``instance weight`` (a sampling weight) are
  never features.
* Dense features: the seven continuous columns, standardised on train (``log1p`` first for the heavy-tailed money
  columns). Every other column is a categorical field (group ``user``; ``year`` is ``context``). Raw values are kept
  verbatim, with ``NA`` a real category (of ``hispanic origin``) and ``?`` another (unknown migration codes).
* Split: the official train / test files; a seeded ``valid_fraction`` (10 %) of the train file is held out for
  validation. There is no user id, so GAUC is undefined for this dataset (``schema.user_id`` is None).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from onerank.data.dataset import EncodedDataset, RawDataset, RawSplit, file_fingerprint, load_or_build
from onerank.data.schema import CategoricalField, DenseField, Schema, SchemaError, TaskSpec

LOADER_VERSION = "census-v1"
FILE_STEMS = {"train": "census-income.data", "test": "census-income.test"}
DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "census-income"  # relative to the current working directory
# md5 of the official uncompressed files (shared/data/README.md); a mismatch is only reported in ``info``.
OFFICIAL_MD5 = {"train": "887f4dc410a99bc332bddbb0a4195b88", "test": "b82952d217858365c8e597827e3e5468"}

CENSUS_COLUMNS = [
    "age", "class of worker", "detailed industry recode", "detailed occupation recode", "education",
    "wage per hour", "enroll in edu inst last wk", "marital stat", "major industry code", "major occupation code",
    "race", "hispanic origin", "sex", "member of a labor union", "reason for unemployment",
    "full or part time employment stat", "capital gains", "capital losses", "dividends from stocks", "tax filer stat",
    "region of previous residence", "state of previous residence", "detailed household and family stat",
    "detailed household summary in household", "instance weight", "migration code-change in msa",
    "migration code-change in reg", "migration code-move within reg", "live in this house 1 year ago",
    "migration prev res in sunbelt", "num persons worked for employer", "family members under 18",
    "country of birth father", "country of birth mother", "country of birth self", "citizenship",
    "own business or self employed", "fill inc questionnaire for veteran's admin", "veterans benefits",
    "weeks worked in year", "year", "income",
]
NUM_FIELDS = len(CENSUS_COLUMNS)  # 42
WEIGHT_COLUMN = "instance weight"
LABEL_COLUMN = "income"
# continuous columns -> log1p before standardising (heavy-tailed money columns)
DENSE_COLUMNS = {
    "age": False,
    "wage per hour": True,
    "capital gains": True,
    "capital losses": True,
    "dividends from stocks": True,
    "num persons worked for employer": False,
    "weeks worked in year": False,
}
CONTEXT_COLUMNS = {"year"}
INCOME_VALUES = {"- 50000.": 0, "50000+.": 1}
BACHELOR_OR_HIGHER = (
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)
# task -> (label column written into the table, raw column dropped from the features when the task is selected)
TASK_SOURCES = {
    "income": ("label_income", "income"),
    "marital": ("label_marital", "marital stat"),
    "education": ("label_education", "education"),
}
DEFAULT_TASKS = ("income", "marital")


def field_name(column: str) -> str:
    """Raw census column name -> python-identifier-like field name (``class of worker`` -> ``class_of_worker``)."""
    return re.sub(r"[^0-9a-z]+", "_", column.lower().replace("'", "")).strip("_")


def _check_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASK_SOURCES]
    if not tasks or unknown:
        raise SchemaError(f"census: tasks must be a non-empty list of {list(TASK_SOURCES)}, got {tasks}")
    if len(set(tasks)) != len(tasks):
        raise SchemaError(f"census: repeated tasks in {tasks}")
    return tasks


def census_schema(tasks=DEFAULT_TASKS) -> Schema:
    tasks = _check_tasks(tasks)
    dropped = {WEIGHT_COLUMN, LABEL_COLUMN} | {TASK_SOURCES[t][1] for t in tasks}
    categorical = [
        CategoricalField(field_name(c), group="context" if c in CONTEXT_COLUMNS else "user", column=c)
        for c in CENSUS_COLUMNS
        if c not in dropped and c not in DENSE_COLUMNS
    ]
    dense = [DenseField(field_name(c), group="user", column=c, log1p=log) for c, log in DENSE_COLUMNS.items()]
    return Schema(
        categorical=categorical,
        dense=dense,
        tasks=[TaskSpec(t, column=TASK_SOURCES[t][0]) for t in tasks],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def find_census_files(data_dir: str | Path | None = None) -> dict[str, Path]:
    """{"train": path, "test": path}; each file may be plain or end in ``.gz`` (the plain one wins if both exist)."""
    if data_dir is None:
        directory = (Path.cwd() / DEFAULT_DATA_DIR).resolve()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"census: no data_dir given and the default {DEFAULT_DATA_DIR} (resolved against the current "
                f"directory: {directory}) does not exist; pass data_dir=<folder holding census-income.data[.gz] and "
                "census-income.test[.gz]>"
            )
    else:
        directory = Path(data_dir).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"census: data_dir {directory} is not a directory; expected a folder holding "
                "census-income.data[.gz] and census-income.test[.gz]"
            )
    found = {}
    for split, stem in FILE_STEMS.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        existing = [p for p in candidates if p.is_file()]
        if not existing:
            raise FileNotFoundError(f"census: missing {stem} (or {stem}.gz) in {directory}")
        found[split] = existing[0]
    return found


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except (OSError, EOFError) as exc:
            raise SchemaError(f"census: {path} is not a readable gzip file ({exc})") from None
    return path.read_bytes()


def read_census_file(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Parse one census file (gzip or plain) into a table with the 42 named columns (strings, except the dense
    columns, which are numeric). Raises SchemaError naming the file and the line for a malformed line.

    Returns the table and facts about the file (rows, md5 of the uncompressed content)."""
    path = Path(path)
    data = _read_bytes(path)
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    if len(buf) and buf[-1] != ord("\n"):
        newlines = np.append(newlines, len(buf))  # last line without a trailing newline
    line_starts = np.concatenate([[0], newlines[:-1] + 1]) if len(newlines) else np.zeros(0, np.int64)
    commas = np.bincount(np.searchsorted(newlines, np.flatnonzero(buf == ord(","))), minlength=len(newlines))
    commas = commas[: len(newlines)]
    # blank lines (nothing but whitespace) are skipped, as pandas does; only comma-free lines can be blank
    blank = np.zeros(len(newlines), dtype=bool)
    for line in np.flatnonzero(commas == 0):
        blank[line] = not data[line_starts[line]: newlines[line]].strip()
    data_lines = np.flatnonzero(~blank)
    if len(data_lines) == 0:
        raise SchemaError(f"census: {path} holds no data lines")
    bad = data_lines[commas[data_lines] != NUM_FIELDS - 1]
    if len(bad):
        line = int(bad[0])
        text = data[line_starts[line]: line_starts[line] + 120].decode("utf-8", "replace").rstrip("\r\n")
        raise SchemaError(
            f"census: {path} line {line + 1} has {int(commas[line]) + 1} comma-separated fields, expected "
            f"{NUM_FIELDS} ({len(bad)} malformed line(s) in all); the line starts {text!r}"
        )
    try:
        table = pd.read_csv(
            io.BytesIO(data), header=None, names=CENSUS_COLUMNS, dtype=str, skipinitialspace=True,
            keep_default_na=False, na_values=[], skip_blank_lines=True, engine="c",
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SchemaError(f"census: cannot parse {path}: {exc}") from None
    line_numbers = data_lines + 1  # table row r comes from file line line_numbers[r]

    def fail(column: str, rows: np.ndarray, values: pd.Series, expected: str) -> None:
        r = int(rows[0])
        raise SchemaError(
            f"census: {path} line {int(line_numbers[r])}: column {column!r} holds {values.iloc[r]!r}; expected "
            f"{expected} ({len(rows)} such line(s))"
        )

    income = table[LABEL_COLUMN]
    unknown = ~income.isin(list(INCOME_VALUES))
    if unknown.any():
        fail(LABEL_COLUMN, np.flatnonzero(unknown.to_numpy()), income, f"one of {list(INCOME_VALUES)}")
    for column in (*DENSE_COLUMNS, WEIGHT_COLUMN):
        numeric = pd.to_numeric(table[column], errors="coerce")
        if numeric.isna().any():
            fail(column, np.flatnonzero(numeric.isna().to_numpy()), table[column], "a number")
        table[column] = numeric.astype(np.float64)
    facts = {"path": str(path.resolve()), "rows": int(len(table)), "md5": hashlib.md5(data).hexdigest()}
    return table, facts


def _with_labels(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["label_income"] = table[LABEL_COLUMN].map(INCOME_VALUES).astype(np.int8)
    table["label_marital"] = (table["marital stat"] == "Never married").astype(np.int8)
    table["label_education"] = table["education"].isin(BACHELOR_OR_HIGHER).astype(np.int8)
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------------------------
def build_raw(
    data_dir: str | Path | None = None, tasks=DEFAULT_TASKS, seed: int = 0, valid_fraction: float = 0.1
) -> RawDataset:
    tasks = _check_tasks(tasks)
    if not 0.0 < float(valid_fraction) < 1.0:
        raise SchemaError(f"census: valid_fraction must lie in (0, 1), got {valid_fraction}")
    files = find_census_files(data_dir)
    schema = census_schema(tasks)
    train_full, train_facts = read_census_file(files["train"])
    test, test_facts = read_census_file(files["test"])
    train_full, test = _with_labels(train_full), _with_labels(test)

    n = len(train_full)
    n_valid = int(round(n * float(valid_fraction)))
    if n_valid < 1 or n_valid >= n:
        raise SchemaError(f"census: {files['train']} has {n} rows, too few for valid_fraction={valid_fraction}")
    rng = np.random.default_rng(int(seed))
    is_valid = np.zeros(n, dtype=bool)
    is_valid[rng.choice(n, size=n_valid, replace=False)] = True
    splits = {
        "train": train_full[~is_valid].reset_index(drop=True),
        "valid": train_full[is_valid].reset_index(drop=True),
        "test": test.reset_index(drop=True),
    }
    features = [f.source for f in schema.categorical] + [f.source for f in schema.dense]
    info = {
        "loader": LOADER_VERSION,
        "tasks": tasks,
        "files": {
            split: {**facts, "official": facts["md5"] == OFFICIAL_MD5[split]}
            for split, facts in (("train", train_facts), ("test", test_facts))
        },
        "rows": {name: int(len(t)) for name, t in splits.items()},
        "base_rates": {
            name: {task: float(t[TASK_SOURCES[task][0]].mean()) for task in tasks} for name, t in splits.items()
        },
        "dropped_columns": [c for c in CENSUS_COLUMNS if c not in features],
        "seed": int(seed),
        "valid_fraction": float(valid_fraction),
    }
    return RawDataset(
        name="census",
        schema=schema,
        info=info,
        **{name: RawSplit(table=t) for name, t in splits.items()},
    )


def load(
    data_dir: str | Path | None = None,
    cache_root: str | Path | None = None,
    **options,
) -> EncodedDataset:
    """Load UCI Census-Income from ``data_dir`` (default ``../shared/data/census-income``, relative to the current
    directory). Options: ``tasks`` (subset of income, marital, education, in order; default income, marital),
    ``seed`` (0) and ``valid_fraction`` (0.1) of the train-file hold-out; ``hash_buckets`` (``load_or_build``)."""
    hash_buckets = options.pop("hash_buckets", None)
    known = {"tasks", "seed", "valid_fraction"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SchemaError(f"census: unknown options {unknown}; valid options are {sorted(known)}")
    tasks = _check_tasks(options.get("tasks", DEFAULT_TASKS))
    seed, valid_fraction = options.get("seed", 0), options.get("valid_fraction", 0.1)
    files = find_census_files(data_dir)
    key = {
        "dataset": "census",
        "loader": LOADER_VERSION,
        "files": {split: file_fingerprint(p) for split, p in files.items()},
        "tasks": tasks,
        "seed": int(seed),
        "valid_fraction": float(valid_fraction),
    }
    return load_or_build(
        "census", key, lambda: build_raw(data_dir, tasks=tasks, seed=seed, valid_fraction=valid_fraction), cache_root,
        hash_buckets,
    )
