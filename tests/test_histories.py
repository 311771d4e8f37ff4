import numpy as np
import pandas as pd
import pytest

from onerank.data.encoding import RaggedHistory
from onerank.data.histories import PrePeriod, build_histories, last_items_before, slice_history
from onerank.data.requests import group_requests, request_start_times


def rows(h: RaggedHistory) -> list[list]:
    return [list(h.values[h.offsets[i]:h.offsets[i + 1]]) for i in range(h.num_rows)]


def row_times(h: RaggedHistory) -> list[list]:
    return [list(h.times[h.offsets[i]:h.offsets[i + 1]]) for i in range(h.num_rows)]


def test_only_strictly_earlier_events_of_the_same_user():
    user = np.array([1, 1, 1, 2])
    time = np.array([10, 20, 30, 15])
    item = np.array([100, 101, 102, 200])
    h = last_items_before(user, time, item, query_user=np.array([1, 1, 2, 3]), query_cutoff=np.array([30, 10, 100, 50]))
    assert rows(h) == [[100, 101], [], [200], []]
    assert row_times(h)[0] == [10, 20]


def test_max_len_keeps_the_most_recent_items_oldest_first():
    user = np.zeros(5, dtype=np.int64)
    time = np.array([5, 1, 4, 2, 3])  # out of order
    item = np.array([50, 10, 40, 20, 30])
    h = last_items_before(user, time, item, np.array([0]), np.array([100]), max_len=3)
    assert rows(h) == [[30, 40, 50]]


def test_duplicate_at_same_timestamp_is_not_in_its_twin_history():
    # two exact duplicate impressions at t=20: neither sees the other, a later one sees both
    user = np.array([7, 7, 7, 7])
    time = np.array([10, 20, 20, 30])
    item = np.array([1, 2, 2, 3])
    h = last_items_before(user, time, item, user, time)
    assert rows(h) == [[], [1], [1], [1, 2, 2]]


def test_pre_period_comes_first_and_absent_users_have_empty_histories():
    pre = PrePeriod(
        user=np.array([1, 2]),
        time=np.array([999_999, 5]),  # user 1's summary time is after the log start: it is clipped below
        sequences={"watched": pd.Series([np.array([90, 91]), np.array([80])]), "liked": pd.Series([np.array([91]), np.array([], dtype=np.int64)])},
    )
    user = np.array([1, 1, 3, 3])
    time = np.array([100, 200, 100, 200])
    item = np.array([10, 11, 30, 31])
    liked = np.array([False, True, False, True])
    h = build_histories(user, time, item, {"watched": None, "liked": liked}, user, time, max_len=3, pre_period=pre)
    assert rows(h["watched"]) == [[90, 91], [90, 91, 10], [], [30]]
    assert rows(h["liked"]) == [[91], [91], [], []]
    # pre-period items get a time strictly before every log event and every cut-off
    assert max(row_times(h["watched"])[1][:2]) < 100
    # max_len applies to the concatenation: the oldest pre-period item falls off first
    h2 = build_histories(user, time, item, {"watched": None}, np.array([1]), np.array([300]), max_len=2, pre_period=pre)
    assert rows(h2["watched"]) == [[10, 11]]


def test_string_ids_and_delimited_pre_period():
    pre = PrePeriod(user=np.array(["u1"], dtype=object), time=np.array([0]), sequences={"watched": pd.Series(["a|b"])})
    user = np.array(["u1", "u2", "u1"], dtype=object)
    item = np.array(["c", "d", "e"], dtype=object)
    time = np.array([10, 10, 20])
    h = build_histories(user, time, item, {"watched": None}, user, time, pre_period=pre)
    assert rows(h["watched"]) == [["a", "b"], [], ["a", "b", "c"]]


def reference_histories(ev_user, ev_time, ev_item, q_user, q_cutoff, max_len):
    """Slow, obviously correct reference: per query, filter, sort by (time, item), keep the last max_len."""
    events = list(zip(ev_user, ev_time, ev_item))
    out = []
    for u, c in zip(q_user, q_cutoff):
        sel = sorted((t, i) for uu, t, i in events if uu == u and t < c)
        out.append([i for _, i in sel][-max_len:])
    return out


def random_log(seed: int, n: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "user": rng.integers(0, 15, n),
        "time": rng.integers(0, 400, n) * 10,  # many equal timestamps
        "item": rng.integers(0, 60, n),
        "like": rng.random(n) < 0.3,
    })
    dupes = frame.sample(40, random_state=seed)
    frame = pd.concat([frame, dupes], ignore_index=True)  # exact duplicate impressions
    frame["row"] = np.arange(len(frame))
    return frame


def histories_for(frame: pd.DataFrame, max_len: int = 5) -> tuple[dict, np.ndarray]:
    request = group_requests(frame["user"], frame["time"], max_gap=25, max_size=4, tiebreak=frame["item"])
    start = request_start_times(request, frame["time"].to_numpy())
    h = build_histories(
        frame["user"].to_numpy(), frame["time"].to_numpy(), frame["item"].to_numpy(),
        {"watched": None, "liked": frame["like"].to_numpy()}, frame["user"].to_numpy(), start, max_len=max_len,
    )
    return h, start


def test_every_history_event_is_before_the_request_start_and_matches_a_reference():
    frame = random_log(0)
    h, start = histories_for(frame)
    for name, hist in h.items():
        lengths = np.diff(hist.offsets)
        owner_start = np.repeat(start, lengths)
        assert np.all(hist.times < owner_start), name  # explicit time check: nothing at or after the request start
        # and nothing of another user
        owner_user = np.repeat(frame["user"].to_numpy(), lengths)
        keyed = frame.set_index(["user", "time", "item"]).index
        assert set(zip(owner_user, hist.times, hist.values)) <= set(keyed)
    for name, mask in (("watched", np.ones(len(frame), dtype=bool)), ("liked", frame["like"].to_numpy())):
        ref = reference_histories(
            frame["user"][mask], frame["time"][mask], frame["item"][mask], frame["user"], start, max_len=5
        )
        assert rows(h[name]) == ref, name


def test_no_impression_sees_itself_or_its_request():
    frame = random_log(1)
    h, start = histories_for(frame, max_len=1000)
    request = group_requests(frame["user"], frame["time"], max_gap=25, max_size=4, tiebreak=frame["item"])
    hist = h["watched"]
    for r in range(len(frame)):
        seen = set(zip(hist.times[hist.offsets[r]:hist.offsets[r + 1]], hist.values[hist.offsets[r]:hist.offsets[r + 1]]))
        same_request = frame[(request == request[r])]
        for t, i in zip(same_request["time"], same_request["item"]):
            assert (t, i) not in seen
        assert (frame["time"].iloc[r], frame["item"].iloc[r]) not in seen


def test_shuffling_the_input_gives_the_same_histories_per_impression():
    frame = random_log(2)
    h, _ = histories_for(frame)
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    h2, _ = histories_for(shuffled)
    for name in h:
        a = rows(h[name])
        b = rows(h2[name])
        ta, tb = row_times(h[name]), row_times(h2[name])
        for new_pos, original in enumerate(shuffled["row"]):
            assert b[new_pos] == a[original], name
            assert tb[new_pos] == ta[original], name


def test_slice_history_and_empty_inputs():
    h = RaggedHistory(values=np.array([1, 2, 3]), offsets=np.array([0, 1, 1, 3]), times=np.array([5, 6, 7]))
    s = slice_history(h, np.array([2, 0, 1]))
    assert rows(s) == [[2, 3], [1], []]
    assert row_times(s) == [[6, 7], [5], []]
    empty = last_items_before(np.zeros(0), np.zeros(0), np.zeros(0), np.array([1, 2]), np.array([3, 4]))
    assert empty.num_rows == 2 and len(empty.values) == 0
    with pytest.raises(ValueError):
        last_items_before(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(1), np.zeros(1), max_len=0)
