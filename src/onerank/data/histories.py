"""Leakage-free behaviour histories, vectorised.

For every query row (an impression) and every behaviour type, the user's last ``max_len`` items of that behaviour,
oldest first, built only from events strictly earlier than the row's cut-off time:

* the pre-period summary first (per-user lists, oldest first, e.g. KuaiRand's ``user_sequences`` parquet), placed
  before every log event;
* then the events of the log itself with ``time < cutoff``.

Project rule: the cut-off of an impression is the start time of its *request* (see ``requests.request_start_times``),
so every candidate of a request shares the same history and point-wise and list-wise models see the same features.
Events at the same timestamp as the cut-off are not "earlier": an impression never sees itself, an exact duplicate of
itself, or anything else of its own request.

Pre-period items carry no per-item time. They get one time per user: the summary's time (e.g. the user's
``last_time_ms``) clipped to ``min(all event times, all cut-offs) - 1``, so they precede every log event and every
cut-off and are always eligible. Their relative order is the summary's order.

No Python loop runs over rows or users: events are sorted once by (user, time, tie-break), and each query finds the
end of its window with one ``searchsorted`` on a combined (user, time-rank) key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd

from onerank.data.encoding import RaggedHistory


def _as_array(values) -> np.ndarray:
    if isinstance(values, (pd.Series, pd.Index)):
        values = values.to_numpy()
    return np.asarray(values)


def _order_codes(values: np.ndarray) -> np.ndarray:
    """Integer codes that depend on the values only (not on row order): a deterministic tie-break key."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64, copy=False)
    if values.dtype.kind == "f" and not np.isnan(values).any():
        return values
    return pd.factorize(pd.Series(values).astype(str), sort=True)[0].astype(np.int64)


def last_items_before(
    event_user,
    event_time,
    event_item,
    query_user,
    query_cutoff,
    max_len: int = 50,
    event_order=None,
    with_times: bool = True,
) -> RaggedHistory:
    """For each query, the last ``max_len`` events of the same user with ``event_time < query_cutoff``, oldest first.

    Inputs may be in any order. Events with equal (user, time) are ordered by ``event_order`` (default: the item, so the
    result never depends on the input row order). Returns a ``RaggedHistory`` aligned with the queries.
    """
    eu, et, ei = _as_array(event_user), _as_array(event_time), _as_array(event_item)
    qu, qc = _as_array(query_user), _as_array(query_cutoff)
    n_ev, n_q = len(eu), len(qu)
    if not (len(et) == len(ei) == n_ev):
        raise ValueError("event_user, event_time and event_item must have the same length")
    if len(qc) != n_q:
        raise ValueError("query_user and query_cutoff must have the same length")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if n_ev == 0 or n_q == 0:
        return RaggedHistory(
            values=ei[:0], offsets=np.zeros(n_q + 1, dtype=np.int64), times=et[:0] if with_times else None
        )
    # One code space for users of events and queries; one rank space for event times and cut-offs.
    user_codes, uniques = pd.factorize(pd.Series(np.concatenate([eu, qu])), sort=False)
    if (user_codes < 0).any():
        raise ValueError("user ids must not be missing")
    time_rank = np.unique(np.concatenate([et, qc]), return_inverse=True)[1].reshape(-1).astype(np.int64)
    n_ranks = int(time_rank.max()) + 1
    if len(uniques) * n_ranks >= 2**62:
        raise ValueError("too many distinct (user, time) pairs for a 64-bit key")
    user_codes = user_codes.astype(np.int64)
    event_key = user_codes[:n_ev] * n_ranks + time_rank[:n_ev]
    query_key = user_codes[n_ev:] * n_ranks + time_rank[n_ev:]
    tie = _order_codes(ei) if event_order is None else _order_codes(_as_array(event_order))
    order = np.lexsort((tie, event_key))
    sorted_key = event_key[order]
    end = np.searchsorted(sorted_key, query_key, side="left")  # first event at or after the cut-off
    user_first = np.searchsorted(sorted_key, user_codes[n_ev:] * n_ranks, side="left")
    start = np.maximum(user_first, end - max_len)
    lengths = (end - start).astype(np.int64)
    offsets = np.zeros(n_q + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    take = order[np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - start, lengths)]
    return RaggedHistory(values=ei[take], offsets=offsets, times=et[take] if with_times else None)


@dataclass
class PrePeriod:
    """A per-user summary of behaviour before the log starts.

    ``user``: one id per summary row; ``time``: one time per row for all its items (clipped below the log, see module
    doc); ``sequences``: behaviour name -> a column of item lists (arrays, lists or delimited strings), oldest first,
    row-aligned with ``user``. Behaviours absent here simply have no pre-period items.
    """

    user: np.ndarray
    time: np.ndarray
    sequences: dict[str, pd.Series] = field(default_factory=dict)
    separator: str = "|"

    def events(self, behaviour: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(user, time, item, position) of every pre-period item of ``behaviour``."""
        user, time = _as_array(self.user), _as_array(self.time)
        if behaviour not in self.sequences:
            empty = np.zeros(0, dtype=np.int64)
            return user[:0], time[:0], empty, empty
        values, offsets = _flatten_lists(self.sequences[behaviour], self.separator)
        lengths = np.diff(offsets)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        position = np.arange(len(rows), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        return user[rows], time[rows], values, position


def _flatten_lists(column, separator: str) -> tuple[np.ndarray, np.ndarray]:
    """A column of arrays / lists / delimited strings -> (flat values, offsets); numpy arrays take a fast path."""
    items = list(column)
    if items and all(isinstance(x, np.ndarray) for x in items):
        lengths = np.fromiter((len(x) for x in items), dtype=np.int64, count=len(items))
        values = np.concatenate(items) if lengths.sum() else np.zeros(0, dtype=np.int64)
    else:
        ragged = RaggedHistory.from_lists(pd.Series(items, dtype=object), separator=separator)
        lengths = np.diff(ragged.offsets)
        values = pd.Series(ragged.values, dtype=object).infer_objects().to_numpy()
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return values, offsets


def build_histories(
    event_user,
    event_time,
    event_item,
    behaviours: Mapping[str, np.ndarray | None],
    query_user,
    query_cutoff,
    max_len: int = 50,
    pre_period: PrePeriod | None = None,
    with_times: bool = True,
) -> dict[str, RaggedHistory]:
    """One ``RaggedHistory`` per behaviour, aligned with the queries.

    ``behaviours``: name -> boolean mask over the events saying which events are of that behaviour (``None``: every
    event, e.g. "watched" = every exposure). The pre-period summary, when given, contributes its items first.
    """
    eu, et, ei = _as_array(event_user), _as_array(event_time), _as_array(event_item)
    qu, qc = _as_array(query_user), _as_array(query_cutoff)
    out: dict[str, RaggedHistory] = {}
    pre_time = None
    if pre_period is not None:
        floor = min([v.min() for v in (et, qc) if len(v)], default=None)
        pre_time = _as_array(pre_period.time)
        if floor is not None:
            pre_time = np.minimum(pre_time, floor - 1)
    for name, mask in behaviours.items():
        m = np.ones(len(eu), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if len(m) != len(eu):
            raise ValueError(f"behaviour {name!r}: mask has {len(m)} rows, the events {len(eu)}")
        users, times, items = eu[m], et[m], ei[m]
        tie = _order_codes(items)
        if pre_period is not None:
            clipped = PrePeriod(pre_period.user, pre_time, pre_period.sequences, pre_period.separator)
            pu, pt, pi, pos = clipped.events(name)
            if len(pi):
                # Pre-period items sit strictly before every log event, so their tie-break (position) never meets
                # a log event's tie-break (item code) at the same (user, time).
                users = np.concatenate([pu, users])
                times = np.concatenate([pt.astype(times.dtype, copy=False), times])
                items = _concat_items(pi, items)
                tie = np.concatenate([pos.astype(tie.dtype), tie])
        out[name] = last_items_before(users, times, items, qu, qc, max_len, event_order=tie, with_times=with_times)
    return out


def _concat_items(pre: np.ndarray, log: np.ndarray) -> np.ndarray:
    """Pre-period items then log items, in one dtype (pre-period ids read as strings follow integer log ids)."""
    if log.dtype.kind in "iu" and pre.dtype.kind not in "iu":
        try:
            pre = pre.astype(np.int64)
        except (TypeError, ValueError):
            pass
    if pre.dtype.kind in "iu" and log.dtype.kind in "iu":
        return np.concatenate([pre.astype(np.int64), log.astype(np.int64)])
    return np.concatenate([pre.astype(object), log.astype(object)])


def slice_history(history: RaggedHistory, rows: np.ndarray) -> RaggedHistory:
    """The histories of ``rows`` (any order, repeats allowed), vectorised."""
    rows = np.asarray(rows, dtype=np.int64)
    start = history.offsets[rows]
    lengths = history.offsets[rows + 1] - start
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    take = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - start, lengths)
    times = None if history.times is None else np.asarray(history.times)[take]
    return RaggedHistory(values=np.asarray(history.values)[take], offsets=offsets, times=times)
