"""KuaiRand loader (dataset name ``kuairand``): the shared KuaiRand-Pure slice and the official KuaiRand-Pure / 1K
releases, found by their file-name patterns in the directory given.

See ``docs/datasets.md`` (KuaiRand section) for the choices made here: tasks and their names, features, the date
split, request grouping (gap and size), leakage-free histories cut at the request start, duplicates, and why the
video statistic file is off by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from onerank.data.dataset import RawDataset, RawSplit, file_fingerprint, load_or_build
from onerank.data.histories import PrePeriod, build_histories
from onerank.data.requests import group_requests, request_start_times, size_distribution
from onerank.data.schema import CategoricalField, DenseField, Schema, SchemaError, SequenceField, TaskSpec

log = logging.getLogger(__name__)

NAME = "kuairand"
LOADER_VERSION = 2  # 2: value columns play_time_ms, duration_ms, long_view (offline evaluation of fused rankings)
DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "kuairand-pure"

# task name -> (raw log column, kind)
TASKS: dict[str, tuple[str, str]] = {
    "click": ("is_click", "binary"),
    "long_view": ("long_view", "binary"),
    "like": ("is_like", "binary"),
    "follow": ("is_follow", "binary"),
    "comment": ("is_comment", "binary"),
    "forward": ("is_forward", "binary"),
    "hate": ("is_hate", "binary"),
    "profile_enter": ("is_profile_enter", "binary"),
    "play_time": ("play_time_ms", "regression"),  # label = log1p(play_time_ms / 1000), i.e. log1p(seconds)
}
DEFAULT_TASKS = ("click", "long_view", "like")
# Raw log columns kept per row as values a fused ranking can be judged by offline (`onerank fuse --value`), whatever
# the tasks: watch time in ms, the video's length, the long-view flag.
VALUE_COLUMNS = ["play_time_ms", "duration_ms", "long_view"]

# behaviour name -> (log column marking the event, or None for every exposure; column of the user_sequences summary)
BEHAVIOURS: dict[str, tuple[str | None, str | None]] = {
    "watched": (None, "watch_seq"),
    "long_viewed": ("long_view", "long_watch_seq"),
    "liked": ("is_like", "like_seq"),
    "clicked": ("is_click", None),
    "followed": ("is_follow", None),
    "commented": ("is_comment", None),
    "forwarded": ("is_forward", None),
    "profile_entered": ("is_profile_enter", None),
    "hated": ("is_hate", None),
}
DEFAULT_BEHAVIOURS = ("watched", "long_viewed", "liked")

USER_CATEGORICAL = [
    "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num_range", "fans_user_num_range", "friend_user_num_range", "register_days_range",
    *[f"onehot_feat{i}" for i in range(18)],
]
USER_DENSE = ["follow_user_num", "fans_user_num", "friend_user_num", "register_days"]
ITEM_CATEGORICAL = ["author_id", "video_type", "upload_type", "music_type", "tag", "duration_bucket"]
CONTEXT_CATEGORICAL = ["hour", "weekday", "tab"]
# video_features_statistic columns used with use_video_statistics=True (dense, log1p except play_progress)
STATISTIC_COLUMNS = [
    "show_cnt", "play_cnt", "complete_play_cnt", "valid_play_cnt", "long_time_play_cnt", "short_time_play_cnt",
    "like_cnt", "comment_cnt", "follow_cnt", "share_cnt", "collect_cnt", "report_cnt", "reduce_similar_cnt",
    "play_progress",
]
# video duration buckets (seconds), shared by candidates and history items through the item table
DURATION_EDGES_S = [7, 15, 30, 60, 120, 300, 600]

LOG_COLUMNS = [
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "is_profile_enter", "tab",
]
NA_CATEGORY = "<NA>"  # missing string categories; missing numeric categories become -1
MISSING_CODE = -1


@dataclass(frozen=True)
class FilePattern:
    pattern: str
    purpose: str
    required: bool = True


PATTERNS = {
    "log_standard": FilePattern("log_standard_*.csv", "the standard exposure log: impressions and their feedback"),
    "log_random": FilePattern("log_random_*.csv", "the random-exposure log (option include_random_log=True)"),
    "user_features": FilePattern("user_features_*.csv", "user side features"),
    "video_basic": FilePattern("video_features_basic_*.csv", "video side features (author, type, tag, duration)"),
    "video_statistic": FilePattern(
        "video_features_statistic_*.csv", "video engagement counts (option use_video_statistics=True)"
    ),
    "user_sequences": FilePattern(
        "user_sequences_*.parquet", "optional per-user pre-period history summary", required=False
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------
def _date_range(value, what: str) -> tuple[int, int]:
    """"20220425-20220505", "20220506", (start, end) or [start, end] -> (start, end) as yyyymmdd ints."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        text = str(value).strip()
        for sep in ("..", ":", "-", ","):
            if sep in text:
                parts = [p.strip() for p in text.split(sep)]
                break
        else:
            parts = [text]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise SchemaError(f"kuairand option {what}={value!r}: expected a date yyyymmdd or a range 'yyyymmdd-yyyymmdd'")
    try:
        start, end = (int(str(p).replace("-", "")) for p in parts)
    except ValueError:
        raise SchemaError(f"kuairand option {what}={value!r}: dates must be yyyymmdd") from None
    for d in (start, end):
        if not 19000101 <= d <= 29991231:
            raise SchemaError(f"kuairand option {what}={value!r}: {d} is not a yyyymmdd date")
    if start > end:
        raise SchemaError(f"kuairand option {what}={value!r}: start {start} is after end {end}")
    return start, end


def _name_list(value, known: Iterable[str], what: str) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.replace("|", ",").split(",") if v.strip()]
    names = list(value)
    aliases = {col: name for name, (col, _) in TASKS.items()} if what == "tasks" else {}
    names = [aliases.get(n, n) for n in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SchemaError(f"kuairand option {what}: unknown {unknown}; available: {sorted(known)}")
    if not names and what == "tasks":
        raise SchemaError("kuairand option tasks: at least one task is needed")
    if len(set(names)) != len(names):
        raise SchemaError(f"kuairand option {what}: repeated names in {names}")
    return names


def _flag(value, what: str) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise SchemaError(f"kuairand option {what}={value!r}: expected true or false")
    return bool(value)


def _options(options: dict) -> dict:
    known = {
        "tasks", "behaviours", "history_len", "train_dates", "valid_dates", "test_dates", "request_gap_seconds",
        "request_max_size", "include_random_log", "use_video_statistics", "use_user_sequences", "drop_duplicates",
        "history_times",
    }
    unknown = set(options) - known
    if unknown:
        raise SchemaError(f"kuairand: unknown options {sorted(unknown)}; available: {sorted(known)}")
    opts = {
        "tasks": _name_list(options.get("tasks", DEFAULT_TASKS), TASKS, "tasks"),
        "behaviours": _name_list(options.get("behaviours", DEFAULT_BEHAVIOURS), BEHAVIOURS, "behaviours"),
        "history_len": int(options.get("history_len", 50)),
        "train_dates": _date_range(options.get("train_dates", "20220425-20220505"), "train_dates"),
        "valid_dates": _date_range(options.get("valid_dates", "20220506"), "valid_dates"),
        "test_dates": _date_range(options.get("test_dates", "20220507-20220508"), "test_dates"),
        "request_gap_seconds": float(options.get("request_gap_seconds", 300)),
        "request_max_size": int(options.get("request_max_size", 20)),
        "include_random_log": _flag(options.get("include_random_log", False), "include_random_log"),
        "use_video_statistics": _flag(options.get("use_video_statistics", False), "use_video_statistics"),
        "use_user_sequences": _flag(options.get("use_user_sequences", True), "use_user_sequences"),
        "drop_duplicates": _flag(options.get("drop_duplicates", True), "drop_duplicates"),
        "history_times": _flag(options.get("history_times", True), "history_times"),
    }
    if opts["history_len"] < 1:
        raise SchemaError("kuairand option history_len must be >= 1")
    if opts["request_max_size"] < 1:
        raise SchemaError("kuairand option request_max_size must be >= 1")
    if opts["request_gap_seconds"] < 0:
        raise SchemaError("kuairand option request_gap_seconds must be >= 0")
    tr, va, te = opts["train_dates"], opts["valid_dates"], opts["test_dates"]
    if not (tr[1] < va[0] and va[1] < te[0]):
        raise SchemaError(f"kuairand: date ranges must be ordered train < valid < test, got {tr}, {va}, {te}")
    return opts


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | Path | None) -> Path:
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not directory.is_dir():
        hint = ""
        if data_dir is None:
            hint = " (the default is ../shared/data/kuairand-pure relative to the working directory)"
        raise SchemaError(f"kuairand: data directory {directory} does not exist{hint}")
    return directory


def find_files(directory: Path, opts: dict) -> dict[str, list[Path]]:
    """Files per role, by glob pattern in ``directory`` (or its ``data/`` subfolder, as the official archives
    unpack)."""
    candidates = [directory] + ([directory / "data"] if (directory / "data").is_dir() else [])
    # role -> required; opt-in roles are not even looked for when off, so their files never enter the cache key
    wanted = {"log_standard": True, "user_features": True, "video_basic": True}
    if opts["include_random_log"]:
        wanted["log_random"] = True
    if opts["use_video_statistics"]:
        wanted["video_statistic"] = True
    if opts["use_user_sequences"]:
        wanted["user_sequences"] = False
    found: dict[str, list[Path]] = {}
    missing = []
    for role, required in wanted.items():
        pattern = PATTERNS[role]
        paths: list[Path] = []
        for folder in candidates:
            paths = sorted(folder.glob(pattern.pattern))
            if paths:
                break
        if paths:
            found[role] = paths
        elif required:
            missing.append(f"{pattern.pattern} ({pattern.purpose})")
    if missing:
        raise SchemaError(f"kuairand: {directory} lacks files matching: " + "; ".join(missing))
    if len(found.get("user_sequences", [])) > 1:
        raise SchemaError(f"kuairand: several user_sequences_*.parquet files in {directory}; keep one")
    return found


def _read_csvs(paths: list[Path], usecols=None) -> pd.DataFrame:
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_csv(p, usecols=usecols, low_memory=False))
        except ValueError as exc:  # usecols naming a column the file lacks
            raise SchemaError(f"kuairand: {p.name}: {exc}") from None
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _require_columns(table: pd.DataFrame, columns: Iterable[str], path_hint: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise SchemaError(f"kuairand: {path_hint} lacks columns {missing}")


# ---------------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------------
def _fill_categorical(frame: pd.DataFrame, columns: Iterable[str]) -> None:
    """Missing values -> "<NA>" (string columns) or -1 (numeric columns), in place; numeric codes become int64."""
    for c in columns:
        col = frame[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            values = col.to_numpy(dtype=np.float64)
            if np.all(np.isnan(values) | (values == np.floor(values))):
                frame[c] = np.where(np.isnan(values), MISSING_CODE, values).astype(np.int64)
            else:
                frame[c] = col.astype(object).where(col.notna(), NA_CATEGORY).astype(str)
        else:
            frame[c] = col.astype(object).where(col.notna(), NA_CATEGORY).astype(str)


def video_table(basic: pd.DataFrame) -> pd.DataFrame:
    """One row per video: id + item side fields (first tag, duration bucket), missing values filled."""
    _require_columns(basic, ["video_id", "author_id", "video_type", "upload_type", "music_type", "tag",
                             "video_duration"], "video_features_basic")
    videos = basic.drop_duplicates(subset=["video_id"], keep="last").copy()
    tag = videos["tag"].astype(object).where(videos["tag"].notna(), None)
    videos["tag"] = tag.map(lambda t: None if t is None else str(t).split(",")[0].strip())
    seconds = videos["video_duration"].to_numpy(dtype=np.float64) / 1000.0
    bucket = np.digitize(np.nan_to_num(seconds, nan=0.0), DURATION_EDGES_S).astype(np.int64)
    videos["duration_bucket"] = np.where(np.isnan(seconds), MISSING_CODE, bucket)
    out = videos[["video_id", *ITEM_CATEGORICAL]].reset_index(drop=True)
    _fill_categorical(out, ITEM_CATEGORICAL)
    return out


def user_table(users: pd.DataFrame) -> pd.DataFrame:
    _require_columns(users, ["user_id", *USER_CATEGORICAL, *USER_DENSE], "user_features")
    out = users.drop_duplicates(subset=["user_id"], keep="last")[["user_id", *USER_CATEGORICAL, *USER_DENSE]].copy()
    _fill_categorical(out, USER_CATEGORICAL)
    return out.reset_index(drop=True)


def statistic_table(stats: pd.DataFrame) -> pd.DataFrame:
    _require_columns(stats, ["video_id", *STATISTIC_COLUMNS], "video_features_statistic")
    out = stats.drop_duplicates(subset=["video_id"], keep="last")[["video_id", *STATISTIC_COLUMNS]]
    return out.rename(columns={c: f"stat_{c}" for c in STATISTIC_COLUMNS}).reset_index(drop=True)


def build_schema(opts: dict) -> Schema:
    categorical = [CategoricalField("user_id", group="user"), CategoricalField("video_id", group="item")]
    categorical += [CategoricalField(c, group="user") for c in USER_CATEGORICAL]
    categorical += [CategoricalField(c, group="item") for c in ITEM_CATEGORICAL]
    categorical += [CategoricalField(c, group="context") for c in CONTEXT_CATEGORICAL]
    dense = [DenseField(c, group="user", log1p=True, fill_value=0.0) for c in USER_DENSE]
    dense.append(DenseField("duration", group="item", log1p=True, fill_value=0.0))
    if opts["use_video_statistics"]:
        dense += [
            DenseField(f"stat_{c}", group="item", log1p=c != "play_progress", fill_value=0.0) for c in STATISTIC_COLUMNS
        ]
    tasks = [TaskSpec(name, kind=TASKS[name][1], column=name) for name in opts["tasks"]]
    sequences = [SequenceField(b, max_len=opts["history_len"]) for b in opts["behaviours"]]
    return Schema(
        categorical=categorical,
        dense=dense,
        sequences=sequences,
        tasks=tasks,
        item_id="video_id",
        user_id="user_id",
        timestamp="time_ms",
        values=list(VALUE_COLUMNS),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------------
def _read_log(files: dict[str, list[Path]], opts: dict, info: dict) -> pd.DataFrame:
    paths = list(files["log_standard"]) + list(files.get("log_random", []))
    frames = []
    for p in paths:
        frame = pd.read_csv(p, low_memory=False)
        _require_columns(frame, LOG_COLUMNS, p.name)
        info["log_rows_read"] = info.get("log_rows_read", 0) + int(len(frame))
        if opts["drop_duplicates"]:
            # exact duplicates over every column of the file (not only the columns kept below)
            dup = frame.duplicated()
            info["exact_duplicates_dropped"] = info.get("exact_duplicates_dropped", 0) + int(dup.sum())
            frame = frame[~dup]
        frames.append(frame[LOG_COLUMNS])
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    bad = events[["user_id", "video_id", "date", "time_ms"]].isna().any(axis=1)
    if bad.any():
        raise SchemaError(f"kuairand: the log has {int(bad.sum())} rows without user_id, video_id, date or time_ms")
    label_cols = [TASKS[t][0] for t in TASKS]
    for c in label_cols:
        if events[c].isna().any():
            raise SchemaError(f"kuairand: log column {c!r} has {int(events[c].isna().sum())} missing labels")
    events["hourmin"] = events["hourmin"].fillna(-100)
    events["tab"] = events["tab"].fillna(MISSING_CODE)
    for c in ["user_id", "video_id", "date", "time_ms", "hourmin", "tab", *label_cols]:
        events[c] = events[c].astype(np.int64)
    return events.reset_index(drop=True)


def build(directory: Path, files: dict[str, list[Path]], opts: dict) -> RawDataset:
    info: dict = {"data_dir": str(directory), "files": {k: [p.name for p in v] for k, v in files.items()}}
    schema = build_schema(opts)
    events = _read_log(files, opts, info)

    tr, va, te = opts["train_dates"], opts["valid_dates"], opts["test_dates"]
    date = events["date"].to_numpy()
    split = np.full(len(events), -1, dtype=np.int8)  # -1: history-only (or dropped)
    for code, (lo, hi) in enumerate((tr, va, te)):
        split[(date >= lo) & (date <= hi)] = code
    pre = None
    if "user_sequences" in files:
        # The summary stands for the log before the slice: log rows dated before the train start would be counted
        # twice, so they are ignored when a summary is used.
        keep = date >= tr[0]
        seq = pd.read_parquet(files["user_sequences"][0])
        _require_columns(seq, ["user_id", "last_time_ms"], files["user_sequences"][0].name)
        columns = {b: BEHAVIOURS[b][1] for b in opts["behaviours"] if BEHAVIOURS[b][1] in seq.columns}
        pre = PrePeriod(
            user=seq["user_id"].to_numpy(np.int64),
            time=seq["last_time_ms"].to_numpy(np.int64),
            sequences={b: seq[c] for b, c in columns.items()},
        )
        info["pre_period_users"] = int(len(seq))
    else:
        keep = np.ones(len(events), dtype=bool)
    keep &= date <= te[1]  # later events can be nobody's history
    events = events[keep].reset_index(drop=True)
    split = split[keep]
    info["history_only_rows"] = int((split == -1).sum())

    # Requests: one user, one split, consecutive impressions with gaps < request_gap_seconds, at most max_size.
    rows = np.flatnonzero(split >= 0)
    user = events["user_id"].to_numpy()
    time_ms = events["time_ms"].to_numpy()
    request = np.full(len(events), -1, dtype=np.int64)
    request[rows] = group_requests(
        user[rows] * 3 + split[rows],
        time_ms[rows],
        max_gap=opts["request_gap_seconds"] * 1000.0,
        max_size=opts["request_max_size"],
        tiebreak=events["video_id"].to_numpy()[rows],
    )
    cutoff = np.zeros(len(events), dtype=np.int64)
    cutoff[rows] = request_start_times(request[rows], time_ms[rows])

    # Features.
    users = user_table(_read_csvs(files["user_features"]))
    videos = video_table(_read_csvs(files["video_basic"]))
    table = events.copy()
    table["request"] = request
    table["request_start_ms"] = cutoff
    table["split"] = split
    table["hour"] = np.where(table["hourmin"] >= 0, table["hourmin"] // 100, MISSING_CODE)
    table["weekday"] = pd.to_datetime(table["date"].astype(str), format="%Y%m%d", errors="coerce").dt.day_of_week
    table["weekday"] = table["weekday"].fillna(MISSING_CODE).astype(np.int64)
    table["duration"] = table["duration_ms"].to_numpy(dtype=np.float64) / 1000.0
    table["play_time"] = np.log1p(np.maximum(table["play_time_ms"].to_numpy(dtype=np.float64), 0.0) / 1000.0)
    for name, (column, _) in TASKS.items():
        if name != "play_time":
            table[name] = table[column]
    table = table.merge(users, on="user_id", how="left", validate="many_to_one")
    table = table.merge(videos, on="video_id", how="left", validate="many_to_one")
    info["rows_without_user_features"] = int(table["user_active_degree"].isna().sum())
    info["rows_without_video_features"] = int(table["author_id"].isna().sum())
    _fill_categorical(table, USER_CATEGORICAL + ITEM_CATEGORICAL)
    if opts["use_video_statistics"]:
        log.warning(
            "kuairand: use_video_statistics=True: the statistic file aggregates the whole log period, including "
            "validation and test days; its counts leak future interactions"
        )
        stats = statistic_table(_read_csvs(files["video_statistic"]))
        table = table.merge(stats, on="video_id", how="left", validate="many_to_one")

    # Histories: pre-period summary + log events strictly before the request start.
    masks = {}
    for b in opts["behaviours"]:
        column = BEHAVIOURS[b][0]
        masks[b] = None if column is None else events[column].to_numpy() > 0
    video = events["video_id"].to_numpy()
    splits = {}
    for code, split_name in enumerate(("train", "valid", "test")):
        part = table[table["split"] == code]
        part = part.sort_values(["user_id", "time_ms", "video_id"], kind="stable").reset_index(drop=True)
        if len(part) == 0:
            raise SchemaError(f"kuairand: the {split_name} dates {(tr, va, te)[code]} select no impression")
        histories = build_histories(
            user, time_ms, video, masks,
            query_user=part["user_id"].to_numpy(),
            query_cutoff=part["request_start_ms"].to_numpy(),
            max_len=opts["history_len"],
            pre_period=pre,
            with_times=opts["history_times"],
        )
        splits[split_name] = RawSplit(table=part, histories=histories, request=part["request"].to_numpy())
        info[f"{split_name}_rows"] = int(len(part))
        info[f"{split_name}_requests"] = size_distribution(pd.factorize(part["request"])[0])
        info[f"{split_name}_empty_history_share"] = {
            b: round(float((np.diff(h.offsets) == 0).mean()), 4) for b, h in histories.items()
        }
    info.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()})
    return RawDataset(
        name=NAME, schema=schema, item_table=videos, info=info,
        train=splits["train"], valid=splits["valid"], test=splits["test"],
    )


def load(data_dir: str | Path | None = None, cache_root: str | Path | None = None, tasks=None, **options):
    """KuaiRand as an ``EncodedDataset`` (cached). Options: see ``docs/datasets.md``; defaults reproduce the project's
    standard setting (tasks click / long_view / like, histories watched / long_viewed / liked of 50 items,
    train 20220425-20220505, valid 20220506, test 20220507-20220508, requests gap < 300 s, at most 20)."""
    if tasks is not None:
        options["tasks"] = tasks
    hash_buckets = options.pop("hash_buckets", None)  # {field: buckets}, load_or_build
    opts = _options(options)
    directory = resolve_data_dir(data_dir)
    files = find_files(directory, opts)
    key_parts = {
        "loader": NAME,
        "version": LOADER_VERSION,
        "options": opts,
        "files": {role: [file_fingerprint(p) for p in paths] for role, paths in sorted(files.items())},
    }
    ds = load_or_build(NAME, key_parts, lambda: build(directory, files, opts), cache_root, hash_buckets)
    ds.info["time_unit"] = "ms"  # time_ms: what a session_gap duration is converted to (data/sessions.py)
    return ds
