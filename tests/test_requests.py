import numpy as np
import pytest

from onerank.data.requests import group_requests, request_sizes, request_start_times, size_distribution


def test_gaps_below_threshold_join_and_at_threshold_split():
    user = np.zeros(6, dtype=np.int64)
    time = np.array([0, 10, 20, 50, 60, 100])
    # gaps 10, 10, 30, 10, 40 ; max_gap 30: a gap of exactly 30 starts a new request
    assert group_requests(user, time, max_gap=30).tolist() == [0, 0, 0, 1, 1, 2]
    assert group_requests(user, time, max_gap=31).tolist() == [0, 0, 0, 0, 0, 1]


def test_equal_timestamps_join_unless_max_gap_is_zero():
    user = np.zeros(3, dtype=np.int64)
    time = np.array([5, 5, 5])
    assert group_requests(user, time, max_gap=1).tolist() == [0, 0, 0]
    assert group_requests(user, time, max_gap=0).tolist() == [0, 1, 2]


def test_max_size_splits_long_runs_into_chunks():
    user = np.zeros(7, dtype=np.int64)
    time = np.arange(7)
    out = group_requests(user, time, max_gap=10, max_size=3)
    assert out.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert request_sizes(out).tolist() == [3, 3, 1]
    # without a size limit the whole run is one request
    assert set(group_requests(user, time, max_gap=10).tolist()) == {0}


def test_users_are_never_mixed_even_at_equal_times():
    user = np.array([1, 2, 1, 2, 1, 2])
    time = np.array([0, 0, 1, 1, 2, 2])
    out = group_requests(user, time, max_gap=100)
    for r in np.unique(out):
        assert len(set(user[out == r])) == 1
    assert len(np.unique(out)) == 2


def test_string_user_ids():
    out = group_requests(np.array(["b", "a", "b"]), np.array([0, 0, 1]), max_gap=5)
    assert out[0] == out[2] and out[1] != out[0]


def test_unsorted_input_returns_ids_aligned_with_input():
    rng = np.random.default_rng(0)
    n = 500
    user = rng.integers(0, 20, n)
    time = rng.integers(0, 2000, n)
    item = rng.integers(0, 1000, n)
    ref = group_requests(user, time, max_gap=30, max_size=4, tiebreak=item)
    perm = rng.permutation(n)
    shuffled = group_requests(user[perm], time[perm], max_gap=30, max_size=4, tiebreak=item[perm])
    # same request for the same impression (ids are numbered in (user, time) order, so they match exactly)
    assert np.array_equal(shuffled, ref[perm])
    # every request: one user, at most 4 rows, consecutive gaps < 30 in time order
    for r in np.unique(ref):
        rows = np.flatnonzero(ref == r)
        assert len(rows) <= 4 and len(set(user[rows])) == 1
        assert np.all(np.diff(np.sort(time[rows])) < 30)


def test_request_ids_are_dense_and_start_times_are_minima():
    user = np.array([0, 0, 1, 0])
    time = np.array([30, 10, 5, 12])
    out = group_requests(user, time, max_gap=5)
    assert sorted(np.unique(out).tolist()) == list(range(len(np.unique(out))))
    start = request_start_times(out, time)
    assert start.tolist() == [30, 10, 5, 10]


def test_errors_and_empty_input():
    assert group_requests(np.zeros(0), np.zeros(0), max_gap=1).shape == (0,)
    with pytest.raises(ValueError):
        group_requests(np.zeros(3), np.zeros(2), max_gap=1)
    with pytest.raises(ValueError):
        group_requests(np.zeros(2), np.zeros(2), max_gap=1, max_size=0)
    with pytest.raises(ValueError):
        group_requests(np.zeros(2), np.array([0.0, np.nan]), max_gap=1)


def test_size_distribution_summary():
    summary = size_distribution(np.array([0, 0, 1, 2, 2, 2]))
    assert summary["requests"] == 3 and summary["impressions"] == 6
    assert summary["histogram"] == {1: 1, 2: 1, 3: 1}
    assert summary["max_size"] == 3
