import numpy as np
import torch

from onerank.data.batching import BatchLoader, TensorSplit


def split_of(ds, name="train"):
    return TensorSplit(ds.split(name), ds.item_table, ds.schema.item_id)


def test_shuffling_is_deterministic_by_seed_and_epoch(tiny_dataset):
    s = split_of(tiny_dataset)
    first = [b.user.tolist() for b in BatchLoader(s, 64, shuffle=True, seed=3).epoch(0)]
    again = [b.user.tolist() for b in BatchLoader(s, 64, shuffle=True, seed=3).epoch(0)]
    other_epoch = [b.user.tolist() for b in BatchLoader(s, 64, shuffle=True, seed=3).epoch(1)]
    other_seed = [b.user.tolist() for b in BatchLoader(s, 64, shuffle=True, seed=4).epoch(0)]
    assert first == again and first != other_epoch and first != other_seed


def test_every_row_is_served_once_per_epoch(tiny_dataset):
    s = split_of(tiny_dataset)
    for by_request in (False, True):
        seen = sum(b.size for b in BatchLoader(s, 37, shuffle=True, by_request=by_request).epoch(0))
        assert seen == s.n


def test_resuming_mid_epoch_yields_the_remaining_batches(tiny_dataset):
    loader = BatchLoader(split_of(tiny_dataset), 50, shuffle=True, seed=1)
    full = [b.labels["click"] for b in loader.epoch(2)]
    rest = [b.labels["click"] for b in loader.epoch(2, start_step=3)]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], rest))


def test_request_batches_keep_requests_whole_and_layout_is_consistent(tiny_dataset):
    s = split_of(tiny_dataset)
    for batch in BatchLoader(s, 23, shuffle=True, by_request=True).epoch(0):
        slot, mask = batch.list_layout()
        assert mask.sum() == batch.size
        # every request of the batch holds one user (the tiny data has one user per request)
        users = batch.to_lists(batch.user)
        assert bool(((users == users[:, :1]) | ~mask).all())
        assert torch.equal(batch.request_rows(), slot[:, 0])
        assert int(batch.request.max()) + 1 == slot.shape[0]


def test_history_side_features_come_from_the_item_table(tiny_dataset):
    s = split_of(tiny_dataset)
    batch = next(iter(BatchLoader(s, 32)))
    items = batch.histories["clicked"]["item_id"]
    np.testing.assert_array_equal(
        batch.histories["clicked"]["category"].numpy(), tiny_dataset.item_table["category"][items.numpy()]
    )


def test_slice_renumbers_requests(tiny_dataset):
    batch = next(BatchLoader(split_of(tiny_dataset), 40, by_request=True).epoch(0))
    part = batch.slice(10, 20)
    assert part.size == 10 and int(part.request[0]) == 0
    assert torch.equal(part.labels["click"], batch.labels["click"][10:20])
