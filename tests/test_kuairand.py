"""KuaiRand loader: the shared slice (skipped where absent) and small hand-made releases in the official format."""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onerank.data.encoding import OOV, PAD
from onerank.data.kuairand import STATISTIC_COLUMNS, USER_CATEGORICAL, USER_DENSE, load
from onerank.data.registry import load_dataset
from onerank.data.schema import SchemaError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLICE = SHARED / "kuairand-pure"
needs_slice = pytest.mark.skipif(
    not (SLICE / "user_sequences_20220409_to_20220424.parquet").exists(),
    reason=f"the shared KuaiRand-Pure slice is not at {SLICE}",
)


# ---------------------------------------------------------------------------------------------------------------------
# The shared slice: preprocessed once per test session
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slice_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kuairand_cache")


@pytest.fixture(scope="module")
def kuairand(slice_cache):
    start = time.perf_counter()
    ds = load_dataset("kuairand", SLICE, slice_cache)
    ds.info["test_build_seconds"] = time.perf_counter() - start
    return ds


@needs_slice
def test_slice_sizes_tasks_and_cache(kuairand, slice_cache):
    ds = kuairand
    assert ds.info["cache_hit"] is False
    assert ds.info["preprocess_seconds"] < 60
    assert ds.schema.task_names == ["click", "long_view", "like"]
    assert [s.name for s in ds.schema.sequences] == ["watched", "long_viewed", "liked"]
    assert ds.info["exact_duplicates_dropped"] == 5460
    n = {s: len(ds.split(s)) for s in ("train", "valid", "test")}
    assert sum(n.values()) == 228329 - 5460
    assert n == {"train": ds.info["train_rows"], "valid": ds.info["valid_rows"], "test": ds.info["test_rows"]}
    # split by date: every validation impression is dated 2022-05-06 (Beijing time ~ UTC+8, give a day of slack)
    day = 86_400_000
    assert ds.valid.time.min() > ds.train.time.min() + 9 * day
    assert ds.test.time.min() > ds.valid.time.min()
    # value columns for offline evaluation, row-aligned with the labels
    assert set(ds.test.values) == {"play_time_ms", "duration_ms", "long_view"}
    assert np.array_equal(ds.test.values["long_view"], ds.test.labels["long_view"])
    assert ds.test.values["play_time_ms"].min() >= 0 and ds.test.values["play_time_ms"].mean() > 1000
    again = load_dataset("kuairand", SLICE, slice_cache)
    assert again.info["cache_hit"] is True
    assert np.array_equal(again.test.histories["liked"], ds.test.histories["liked"])


@needs_slice
def test_slice_histories_are_strictly_before_the_request_start(kuairand):
    for name in ("train", "valid", "test"):
        split = kuairand.split(name)
        assert split.request is not None
        # requests are contiguous, one user each, at most 20 candidates
        sizes = np.bincount(split.request)
        assert sizes.max() <= 20 and sizes.min() >= 1
        assert np.all(np.diff(split.request) >= 0)
        first = np.r_[0, np.cumsum(sizes)[:-1]]
        assert np.array_equal(split.user, np.repeat(split.user[first], sizes))
        start = np.minimum.reduceat(split.time, first)[split.request]
        for seq, times in split.history_times.items():
            codes = split.histories[seq]
            real = codes != PAD
            assert np.array_equal(real, times != -1), seq
            assert np.all(times[real] < np.broadcast_to(start[:, None], times.shape)[real]), seq
            # a request's candidates share one history
            assert np.array_equal(codes, codes[first][split.request]), seq


@needs_slice
def test_slice_users_absent_from_pre_period_start_empty(kuairand):
    seq = pd.read_parquet(SLICE / "user_sequences_20220409_to_20220424.parquet", columns=["user_id"])
    known = set(seq["user_id"])
    vocab = kuairand.encoders.vocabularies["user_id"]
    train = kuairand.train
    raw_users = np.asarray(vocab.to_list())[train.categorical["user_id"] - 2]
    absent = ~np.isin(raw_users, list(known))
    assert absent.any()
    # the first request of such a user has an empty history of every behaviour
    rows = np.flatnonzero(absent)
    user_rows = pd.DataFrame({"user": raw_users[rows], "time": train.time[rows], "row": rows})
    first_rows = user_rows.sort_values("time").groupby("user")["row"].first().to_numpy()
    for seq in ("watched", "long_viewed", "liked"):
        assert np.all(train.histories[seq][first_rows] == PAD)
    # users of the pre-period have a non-empty watched history from their first impression on
    present_first = np.flatnonzero(~absent)[:100]
    assert (train.histories["watched"][present_first] != PAD).any(axis=1).all()


@needs_slice
def test_slice_item_table_gives_history_items_side_features(kuairand):
    table = kuairand.item_table
    assert set(table) >= {"author_id", "video_type", "upload_type", "music_type", "tag"}
    n_items = len(kuairand.encoders.vocabularies["video_id"])
    for column in table.values():
        assert len(column) == n_items and column[PAD] == PAD
    # most known videos have a known author (side-field vocabularies are fitted on train candidates, so videos seen
    # only in histories have OOV side features)
    assert (table["author_id"][2:] != OOV).mean() > 0.8


# ---------------------------------------------------------------------------------------------------------------------
# Hand-made releases in the official file layout
# ---------------------------------------------------------------------------------------------------------------------
def write_release(directory: Path, shuffle_seed: int | None = None, with_sequences: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    days = [20220420, 20220425, 20220426, 20220506, 20220507]
    for user in range(6):
        for d_i, day in enumerate(days):
            base = int(pd.Timestamp(str(day)).value // 1_000_000)
            for k in range(3):
                rows.append({
                    "user_id": user, "video_id": int(rng.integers(0, 5)), "date": day, "hourmin": 1200,
                    "time_ms": base + 3_600_000 * (user + 1) + 60_000 * k, "is_click": int(rng.random() < 0.5),
                    "is_like": int(k == 0), "is_follow": 0, "is_comment": 0, "is_forward": 0, "is_hate": 0,
                    "long_view": int(rng.random() < 0.3), "play_time_ms": int(rng.integers(0, 60_000)),
                    "duration_ms": 30_000, "profile_stay_time": 0, "comment_stay_time": 0, "is_profile_enter": 0,
                    "is_rand": 0, "tab": 1,
                })
    log = pd.DataFrame(rows)
    log.loc[len(log)] = {**log.iloc[-1].to_dict(), "video_id": 99}  # test-only video, absent from the video file
    log.loc[len(log)] = log.iloc[5].to_dict()  # an exact duplicate row
    if shuffle_seed is not None:
        log = log.sample(frac=1.0, random_state=shuffle_seed)
    early = log["date"] < 20220422
    log[early].to_csv(directory / "log_standard_4_08_to_4_21_pure.csv", index=False)
    log[~early].to_csv(directory / "log_standard_4_22_to_5_08_pure.csv", index=False)
    users = pd.DataFrame({"user_id": range(6)})
    for c in USER_CATEGORICAL:
        users[c] = ["a", "b", None, "a", "b", "a"] if c.endswith("_range") or c == "user_active_degree" else [0, 1, 1, np.nan, 0, 1]
    for c in USER_DENSE:
        users[c] = [1.0, 10.0, 100.0, np.nan, 5.0, 0.0]
    users.to_csv(directory / "user_features_pure.csv", index=False)
    videos = pd.DataFrame({
        "video_id": range(5), "author_id": [10, 11, 10, 12, 13], "video_type": ["NORMAL", "AD", "NORMAL", None, "NORMAL"],
        "upload_dt": "2022-04-10", "upload_type": ["Web", "Web", None, "Kmovie", "Web"], "visible_status": 0.0,
        "video_duration": [5000.0, np.nan, 70000.0, 20000.0, 400000.0], "server_width": 720.0, "server_height": 1280.0,
        "music_id": 1, "music_type": [9.0, np.nan, 4.0, 9.0, 9.0], "tag": ["1,2", "3", None, "4", "5,6"],
    })
    videos.to_csv(directory / "video_features_basic_pure.csv", index=False)
    if with_sequences:
        seq = pd.DataFrame({
            "user_id": [0, 1], "history_len": [2, 1], "last_time_ms": [1, 2],
            "watch_seq": [[3, 4], [2]], "like_seq": [[4], []], "long_watch_seq": [[], [2]],
        })
        seq.to_parquet(directory / "user_sequences_20220409_to_20220424.parquet")
    return log


OPTS = dict(train_dates="20220425-20220426", valid_dates="20220506", test_dates="20220507", request_gap_seconds=90)


def test_missing_files_raise_a_clear_error(tmp_path):
    write_release(tmp_path)
    (tmp_path / "video_features_basic_pure.csv").unlink()
    (tmp_path / "user_features_pure.csv").unlink()
    with pytest.raises(SchemaError, match=r"video_features_basic_\*\.csv.*video side features"):
        load(tmp_path, tmp_path / "cache")
    with pytest.raises(SchemaError, match=r"user_features_\*\.csv"):
        load(tmp_path, tmp_path / "cache")
    write_release(tmp_path)
    with pytest.raises(SchemaError, match=r"video_features_statistic_\*\.csv"):
        load(tmp_path, tmp_path / "cache", use_video_statistics=True, **OPTS)
    with pytest.raises(SchemaError, match=r"log_random_\*\.csv"):
        load(tmp_path, tmp_path / "cache", include_random_log=True, **OPTS)
    with pytest.raises(SchemaError, match="does not exist"):
        load(tmp_path / "nowhere", tmp_path / "cache")
    with pytest.raises(SchemaError, match="unknown"):
        load(tmp_path, tmp_path / "cache", tasks=["click", "dwell"])


def test_full_release_layout_oov_videos_nan_features_and_history_only_days(tmp_path):
    write_release(tmp_path)
    ds = load(tmp_path, tmp_path / "cache", tasks="is_click,like,play_time", **OPTS)
    assert ds.schema.task_names == ["click", "like", "play_time"]
    assert ds.schema.task("play_time").kind == "regression"
    assert len(ds.info["files"]["log_standard"]) == 2
    assert ds.info["exact_duplicates_dropped"] == 1
    assert ds.info["history_only_rows"] == 6 * 3  # 2022-04-20: history only
    assert {s: len(ds.split(s)) for s in ("train", "valid", "test")} == {"train": 36, "valid": 18, "test": 19}
    # the test-only video absent from the video file: OOV id, no crash; its side features are OOV too
    test = ds.test
    vocab = ds.encoders.vocabularies["video_id"]
    assert 99 not in vocab.to_list()
    assert (test.categorical["video_id"] == OOV).sum() == 1
    # histories: the first train request of every user already holds the history-only day's three impressions
    # (requests are numbered in (user, time) order: each user's 04-25 request, then their 04-26 request)
    first = np.r_[0, np.cumsum(np.bincount(ds.train.request))[:-1]]
    assert (ds.train.histories["watched"][first] != PAD).sum(axis=1).tolist() == [3, 6] * 6
    # play_time is log1p(seconds)
    assert ds.train.labels["play_time"].max() < np.log1p(61)
    # requests: three impressions one minute apart with a 90 s gap rule form one request
    assert np.bincount(ds.train.request).max() == 3


def test_opt_in_random_log_and_video_statistics(tmp_path):
    log = write_release(tmp_path)
    random_log = log[log["date"] == 20220426].head(4).assign(is_rand=1, time_ms=lambda f: f["time_ms"] + 1)
    random_log.to_csv(tmp_path / "log_random_4_22_to_5_08_pure.csv", index=False)
    stats = pd.DataFrame({"video_id": range(5)})
    for c in STATISTIC_COLUMNS:
        stats[c] = [1.0, 2.0, np.nan, 4.0, 5.0]
    stats.to_csv(tmp_path / "video_features_statistic_pure.csv", index=False)
    plain = load(tmp_path, tmp_path / "cache", **OPTS)
    ds = load(tmp_path, tmp_path / "cache", include_random_log=True, use_video_statistics=True, **OPTS)
    assert len(ds.train) == len(plain.train) + 4
    assert "stat_play_cnt" in ds.train.dense and np.isfinite(ds.train.dense["stat_play_cnt"]).all()
    assert "stat_play_cnt" not in plain.train.dense  # off by default: the counts cover future days
    assert plain.info["files"].keys() == {"log_standard", "user_features", "video_basic"}


def test_pre_period_file_and_users_absent_from_it(tmp_path):
    write_release(tmp_path, with_sequences=True)
    ds = load(tmp_path, tmp_path / "cache", **OPTS)
    assert ds.info["history_only_rows"] == 0  # with a summary, the early log file is not counted twice
    vocab = ds.encoders.vocabularies["video_id"]
    users = ds.encoders.vocabularies["user_id"].to_list()
    train = ds.train
    first = np.r_[0, np.cumsum(np.bincount(train.request))[:-1]]
    first_user = np.asarray(users)[train.categorical["user_id"][first] - 2]
    first_of_user = {}
    for row, u in zip(first, first_user):
        if u not in first_of_user or train.time[row] < train.time[first_of_user[u]]:
            first_of_user[u] = row
    watched = train.histories["watched"]
    assert watched[first_of_user[0]].tolist()[-2:] == vocab.encode(np.array([3, 4])).tolist()
    assert watched[first_of_user[1]].tolist()[-1] == vocab.encode(np.array([2]))[0]
    assert np.all(watched[first_of_user[2]] == PAD)  # absent from the pre-period: empty
    # pre-period items carry a time before every log event
    times = train.history_times["watched"][first_of_user[0]]
    assert np.all(times[times != -1] < train.time.min())


def test_shuffled_log_gives_the_same_dataset(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_release(a)
    write_release(b, shuffle_seed=7)
    da = load(a, tmp_path / "cache", **OPTS)
    db = load(b, tmp_path / "cache", **OPTS)
    assert db.info["cache_hit"] is False  # different files, different cache entries
    for split in ("train", "valid", "test"):
        xa, xb = da.split(split).arrays(), db.split(split).arrays()
        assert set(xa) == set(xb)
        for key in xa:
            assert np.array_equal(xa[key], xb[key]), (split, key)
