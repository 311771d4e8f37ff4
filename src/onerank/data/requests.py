"""Grouping impressions into requests (the candidate lists a list-wise model ranks together).

A request is a run of one user's impressions, consecutive in time, where each gap to the previous impression is
below ``max_gap``; runs longer than ``max_size`` impressions are cut into chunks of at most ``max_size``. Everything is
vectorised (sort + diff + cumsum); the input may be in any order and the returned ids are aligned with it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _codes(values) -> np.ndarray:
    """Dense integer codes that depend only on the values (sorted), never on the row order."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    return pd.factorize(pd.Series(arr), sort=True)[0].astype(np.int64)


def group_requests(
    user,
    time,
    max_gap: float,
    max_size: int | None = None,
    tiebreak=None,
) -> np.ndarray:
    """Request index (0..R-1) of every row, aligned with the input order.

    ``user``: any hashable ids (a request never mixes users; pass a combined key to also keep splits apart).
    ``time``: numeric event times; ``max_gap`` is in the same unit: a row joins the previous row's request when
    ``time - previous_time < max_gap`` (so ``max_gap=0`` puts every impression in its own request, except that equal
    timestamps still need ``max_gap > 0`` to join).
    ``max_size``: longest request; longer runs are cut into consecutive chunks of ``max_size`` (the last one shorter).
    ``tiebreak``: optional extra sort key (e.g. the item id) for rows of one user with equal times, so the assignment
    does not depend on the input order when a chunk boundary falls inside a group of equal timestamps.

    Requests are numbered in (user, time) order, so a shuffled input gets the same id for the same impression.
    """
    u = _codes(user)
    t = np.asarray(time)
    n = len(u)
    if len(t) != n:
        raise ValueError(f"user has {n} rows but time has {len(t)}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(t.dtype, np.floating) and np.isnan(t).any():
        raise ValueError("time holds NaN values; requests need a time for every impression")
    keys = [t, u] if tiebreak is None else [_codes(tiebreak), t, u]
    order = np.lexsort(keys)
    su, st = u[order], t[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (su[1:] != su[:-1]) | ((st[1:] - st[:-1]) >= max_gap)
    if max_size is not None:
        run = np.cumsum(new) - 1
        run_start = np.flatnonzero(new)
        position = np.arange(n) - run_start[run]
        new |= (position % max_size) == 0
    out = np.empty(n, dtype=np.int64)
    out[order] = np.cumsum(new) - 1
    return out


def request_start_times(request: np.ndarray, time) -> np.ndarray:
    """Per row, the earliest time of its request (the cut-off for request-level histories)."""
    request = np.asarray(request, dtype=np.int64)
    t = np.asarray(time)
    if len(request) == 0:
        return t.copy()
    fill = np.iinfo(t.dtype).max if t.dtype.kind in "iu" else np.inf
    first = np.full(int(request.max()) + 1, fill, dtype=t.dtype)
    np.minimum.at(first, request, t)
    return first[request]


def request_sizes(request: np.ndarray) -> np.ndarray:
    """Number of impressions of each request (index = request id)."""
    return np.bincount(np.asarray(request, dtype=np.int64))


def size_distribution(request: np.ndarray, top: int = 20) -> dict:
    """Summary used in logs and docs: requests, mean size, share of singletons and a histogram of sizes."""
    sizes = request_sizes(request)
    sizes = sizes[sizes > 0]
    if len(sizes) == 0:
        return {"requests": 0}
    hist = np.bincount(sizes)
    return {
        "requests": int(len(sizes)),
        "impressions": int(sizes.sum()),
        "mean_size": round(float(sizes.mean()), 3),
        "max_size": int(sizes.max()),
        "share_single": round(float((sizes == 1).mean()), 4),
        "histogram": {int(k): int(v) for k, v in enumerate(hist[: top + 1]) if v > 0 and k > 0},
    }
