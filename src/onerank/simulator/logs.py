"""The real KuaiRand log the simulator is fitted on: impressions with their responses, grouped into sessions.

Read straight from the raw files (the same patterns and date split as the ``kuairand`` loader, docs/datasets.md), not
from a ranker's encoded dataset: the simulator stands for the users, so it is built from the log on its own and
shares nothing with the rankers it judges but the raw ids. A session is a user's run of impressions whose gaps are
shorter than ``session_gap_seconds`` (one hour by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from onerank.data.kuairand import find_files, resolve_data_dir

# the behaviours a simulated user responds with (binary), in the order the response chain draws them
BEHAVIOURS = ("click", "long_view", "like", "comment", "forward")
LOG_LABELS = {"click": "is_click", "long_view": "long_view", "like": "is_like", "comment": "is_comment",
              "forward": "is_forward"}
USER_FIELDS = ("user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
               "follow_user_num_range", "register_days_range")
DEFAULT_DATES = {"train": (20220425, 20220505), "valid": (20220506, 20220506), "test": (20220507, 20220508)}


@dataclass
class KuaiRandLog:
    """Every impression of the slice (duplicates dropped), sorted by (user, time), with its split, session, position
    in the session and responses; and the user and video side tables (raw values)."""

    impressions: pd.DataFrame
    users: pd.DataFrame  # user_id + USER_FIELDS (raw values, missing as "<NA>")
    videos: pd.DataFrame  # video_id, duration_s, video_type, upload_type, tag (first tag, -1 when missing)
    session_gap_seconds: float

    def split(self, name: str) -> pd.DataFrame:
        return self.impressions[self.impressions["split"] == name]

    def session_lengths(self, split: str) -> np.ndarray:
        """Impressions per session among the sessions that start in ``split``."""
        part = self.split(split)
        return part.groupby("session").size().to_numpy()


def read_kuairand(data_dir: str | Path | None = None, session_gap_seconds: float = 3600.0,
                  dates: dict[str, tuple[int, int]] | None = None) -> KuaiRandLog:
    directory = resolve_data_dir(data_dir)
    files = find_files(directory, {"include_random_log": False, "use_video_statistics": False,
                                   "use_user_sequences": False})
    dates = dict(DEFAULT_DATES if dates is None else dates)
    log = pd.concat([pd.read_csv(p, low_memory=False) for p in files["log_standard"]], ignore_index=True)
    missing = [c for c in ["user_id", "video_id", "date", "time_ms", "play_time_ms", "duration_ms",
                           *LOG_LABELS.values()] if c not in log.columns]
    if missing:
        raise ValueError(f"kuairand log {files['log_standard'][0].name} lacks columns {missing}")
    log = log[~log.duplicated()].sort_values(["user_id", "time_ms", "video_id"], kind="stable").reset_index(drop=True)
    frame = pd.DataFrame({"user_id": log["user_id"].to_numpy(np.int64), "video_id": log["video_id"].to_numpy(np.int64),
                          "date": log["date"].to_numpy(np.int64), "time_ms": log["time_ms"].to_numpy(np.int64)})
    for name, column in LOG_LABELS.items():
        frame[name] = (log[column].fillna(0).to_numpy() > 0).astype(np.int8)
    play_s = np.maximum(log["play_time_ms"].fillna(0).to_numpy(np.float64), 0.0) / 1000.0
    duration_s = np.maximum(log["duration_ms"].fillna(0).to_numpy(np.float64), 0.0) / 1000.0
    frame["play_s"] = play_s
    frame["duration_s"] = duration_s
    frame["completion"] = ((play_s >= duration_s) & (duration_s > 0)).astype(np.int8)
    frame["split"] = "none"
    for name, (lo, hi) in dates.items():
        frame.loc[(frame["date"] >= lo) & (frame["date"] <= hi), "split"] = name
    frame = frame[frame["split"] != "none"].reset_index(drop=True)

    user = frame["user_id"].to_numpy()
    time_ms = frame["time_ms"].to_numpy()
    new = np.ones(len(frame), dtype=bool)
    new[1:] = (user[1:] != user[:-1]) | (np.diff(time_ms) >= session_gap_seconds * 1000.0)
    session = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    frame["session"] = session
    frame["position"] = np.arange(len(frame)) - starts[session]
    # a session belongs to the split of its first impression (sessions crossing midnight stay whole)
    frame["split"] = frame["split"].to_numpy()[starts[session]]

    users = pd.concat([pd.read_csv(p, low_memory=False) for p in files["user_features"]], ignore_index=True)
    users = users.drop_duplicates(subset=["user_id"], keep="last")
    for field in USER_FIELDS:
        if field not in users.columns:
            raise ValueError(f"kuairand user features lack column {field!r}")
        users[field] = users[field].astype(object).where(users[field].notna(), "<NA>").astype(str)
    videos = pd.concat([pd.read_csv(p, low_memory=False) for p in files["video_basic"]], ignore_index=True)
    videos = videos.drop_duplicates(subset=["video_id"], keep="last")
    tag = videos["tag"].astype(str).str.split(",").str[0]
    videos = pd.DataFrame({
        "video_id": videos["video_id"].to_numpy(np.int64),
        "video_duration_s": videos["video_duration"].to_numpy(np.float64) / 1000.0,
        "video_type": (videos["video_type"].astype(str) == "AD").astype(np.int8),
        "upload_type": pd.factorize(videos["upload_type"].astype(str), sort=True)[0].astype(np.int16),
        "tag": pd.to_numeric(tag, errors="coerce").fillna(-1).astype(np.int64),
    })
    return KuaiRandLog(frame, users[["user_id", *USER_FIELDS]].reset_index(drop=True), videos, session_gap_seconds)
