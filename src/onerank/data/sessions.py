"""Sessions: one user's consecutive requests in time order, cut where the gap between two requests reaches a limit.

A session-level model (HEROES, models/heroes.py) reads a session's impressions in order and scores each from the
impressions up to and including it. The data layer gives it sessions the way it gives list-wise models requests:

* ``group_sessions`` assigns a session to every row. A session is made of **whole requests** (a request is never
  split), so a session batch also holds whole requests and every request-level convention (histories cut at the
  request start, request-level fields) still holds.
* ``apply_session_rule`` attaches the sessions to an encoded dataset and reorders each split so that every session's
  rows are contiguous and in time order (requests by start time, rows of a request by time, ties in the loader's row
  order, e.g. a synthetic request's candidates in display order). Requests and sessions are renumbered 0..R-1 /
  0..S-1 in row order, which is what ``TensorSplit`` and the batch loader expect.
* ``session_order="shuffled"`` is the control of the session benchmarks: each request's rows are permuted and the
  requests of each session are put in a random order (seeded), so the session holds the same impressions with their
  order destroyed. Requests stay whole and contiguous.

The rule is a dataset option of every loader (``session_gap``, ``session_max_size``, ``session_order``), applied after
the cache: the cached columns never change, and the same options give the same sessions. Without a rule a
session-level model treats each request as a session (``TensorSplit``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from onerank.data.dataset import SPLITS, EncodedDataset, EncodedSplit
from onerank.data.requests import size_distribution
from onerank.data.schema import SchemaError

log = logging.getLogger(__name__)

OPTIONS = ("session_gap", "session_max_size", "session_order")
ORDERS = ("time", "shuffled")
# Seconds per unit of a dataset's timestamp column (``EncodedDataset.info["time_unit"]``), for durations like "30min".
TIME_UNITS = {"s": 1.0, "ms": 1e-3}


@dataclass(frozen=True)
class SessionRule:
    """``max_gap``: a new session starts at a request beginning ``max_gap`` or more (timestamp units) after the end of
    the user's previous request. ``max_size``: a session is cut at the first request that starts after ``max_size``
    impressions (so a chunk holds fewer than ``max_size`` plus one request's impressions). ``order``: ``time`` or
    ``shuffled`` (the control, module docstring); ``seed`` draws the shuffle."""

    max_gap: float
    max_size: int | None = None
    order: str = "time"
    seed: int = 0


def session_rule(options: dict, info: dict) -> SessionRule | None:
    """The rule named by a loader's session options (popped from ``options``), or None when none is given.

    ``session_gap`` is a number in the timestamp's unit or a duration such as ``"30min"`` (converted with the
    dataset's ``info["time_unit"]``)."""
    given = {k: options.pop(k) for k in OPTIONS if k in options}
    if not given:
        return None
    if "session_gap" not in given:
        raise SchemaError(f"session options {sorted(given)} need session_gap (a number in the timestamp's unit or a "
                          "duration like 30min)")
    order = str(given.get("session_order", "time"))
    if order not in ORDERS:
        raise SchemaError(f"session_order={order!r}: expected one of {ORDERS}")
    max_size = given.get("session_max_size")
    if max_size is not None:
        try:
            max_size = int(max_size)
        except (TypeError, ValueError):
            raise SchemaError(f"session_max_size={max_size!r} must be a whole number") from None
        if max_size < 1:
            raise SchemaError(f"session_max_size must be >= 1, got {max_size}")
    return SessionRule(_gap(given["session_gap"], info.get("time_unit")), max_size, order)


def _gap(value, unit: str | None) -> float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        if unit not in TIME_UNITS:
            raise SchemaError(f"session_gap={value!r}: this dataset does not say its time unit; give a number in the "
                              "timestamp's unit")
        try:
            seconds = pd.Timedelta(value).total_seconds()
        except ValueError:
            raise SchemaError(f"session_gap={value!r} is not a number or a duration like '30min'") from None
        return seconds / TIME_UNITS[unit]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise SchemaError(f"session_gap={value!r} must be a number >= 0 or a duration like '30min'")
    return float(value)


def group_sessions(
    user: np.ndarray, time: np.ndarray, request: np.ndarray, max_gap: float, max_size: int | None = None
) -> np.ndarray:
    """Session index (0..S-1, numbered in (user, time) order) of every row, aligned with the input.

    Requests are the units: each request's span is [first time, last time] of its rows and its user is its rows'
    user (a request mixing users is an error). Vectorised: one sort of the requests, a diff and a cumsum."""
    user, time, request = np.asarray(user), np.asarray(time), np.asarray(request, dtype=np.int64)
    if not len(user) == len(time) == len(request):
        raise ValueError(f"user, time and request have {len(user)}, {len(time)} and {len(request)} rows")
    if len(request) == 0:
        return np.zeros(0, dtype=np.int64)
    req, row_req = np.unique(request, return_inverse=True)
    n_req = len(req)
    first_user = np.full(n_req, -1, dtype=np.int64)
    first_user[row_req] = user
    if (first_user[row_req] != user).any():
        raise SchemaError("a request holds impressions of several users; sessions need one user per request")
    start = np.full(n_req, np.inf)
    end = np.full(n_req, -np.inf)
    np.minimum.at(start, row_req, time.astype(np.float64))
    np.maximum.at(end, row_req, time.astype(np.float64))
    order = np.lexsort((np.arange(n_req), start, first_user))
    su, ss, se = first_user[order], start[order], end[order]
    new = np.ones(n_req, dtype=bool)
    new[1:] = (su[1:] != su[:-1]) | (ss[1:] - se[:-1] >= max_gap)
    if max_size is not None:
        sizes = np.bincount(row_req, minlength=n_req)[order]
        run = np.cumsum(new) - 1
        before = np.cumsum(sizes) - sizes  # impressions before each request, over all runs
        position = before - before[np.flatnonzero(new)][run]  # ... within its run
        chunk = position // max_size
        new[1:] |= (run[1:] == run[:-1]) & (chunk[1:] != chunk[:-1])
    session_of_request = np.empty(n_req, dtype=np.int64)
    session_of_request[order] = np.cumsum(new) - 1
    return session_of_request[row_req]


def apply_session_rule(ds: EncodedDataset, rule: SessionRule) -> EncodedDataset:
    """``ds`` with sessions attached and every split reordered so that sessions are contiguous and time-ordered."""
    missing = [what for what, arr in (("user ids", ds.train.user), ("timestamps", ds.train.time)) if arr is None]
    if missing:
        raise SchemaError(f"{ds.name}: sessions need {' and '.join(missing)} (schema user_id / timestamp)")
    splits = {}
    info = dict(ds.info)
    for offset, name in enumerate(SPLITS):
        split = ds.split(name)
        request = split.request if split.request is not None else np.arange(len(split), dtype=np.int64)
        session = group_sessions(split.user, split.time, request, rule.max_gap, rule.max_size)
        rng = np.random.default_rng([rule.seed, offset]) if rule.order == "shuffled" else None
        splits[name] = _session_ordered(split, request, session, rng)
        info[f"{name}_sessions"] = size_distribution(splits[name].session)
    info["session_rule"] = dataclasses.asdict(rule)
    log.info("sessions (%s): train %s", rule, info["train_sessions"])
    return dataclasses.replace(ds, info=info, **splits)


def _session_ordered(
    split: EncodedSplit, request: np.ndarray, session: np.ndarray, rng: np.random.Generator | None
) -> EncodedSplit:
    """Rows sorted by (session, request start, request, time, original row); with ``rng``, the request order within
    each session and the row order within each request are random instead. Ids renumbered in the new order."""
    n = len(request)
    time = split.time.astype(np.float64)
    _, row_req = np.unique(request, return_inverse=True)
    start = np.full(row_req.max() + 1 if n else 0, np.inf)
    np.minimum.at(start, row_req, time)
    if rng is None:
        request_key, row_key = start[row_req], time
    else:
        request_key = rng.random(len(start))[row_req]
        row_key = rng.random(n)
    order = np.lexsort((np.arange(n), row_key, row_req, request_key, session))
    arrays = {k: v[order] for k, v in split.arrays().items()}
    arrays["request"] = _renumber(row_req[order])
    arrays["session"] = _renumber(session[order])
    return EncodedSplit.from_arrays(arrays)


def _renumber(ids: np.ndarray) -> np.ndarray:
    """Contiguous runs of ids -> 0, 1, 2, ... in order."""
    new = np.ones(len(ids), dtype=bool)
    new[1:] = ids[1:] != ids[:-1]
    return (np.cumsum(new) - 1).astype(np.int64)
