"""The serving fast path against its plain reference: the fused CPU prefix attention (``prefix_attention`` +
``merge_extra_keys``, taken without gradients) equals the explicit softmax over [prefix, in-group keys] (taken with
gradients, and by training and export), also for a request whose prefix has no valid key; OneRank's ranking path
(inference mode, context once, chunks) equals the explicit path end to end; the DNN encoder's target attention
over one history shared by a pool equals the per-row attention; bf16 stays close to fp32; ``device``
gives a one-line error where the GPU asked for is absent (and, on a machine with one, the same scores as the CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from onerank import api
from onerank.models.encoders import shares_one_history
from onerank.nn.attention import TargetAttention
from onerank.nn.transformer import attention_bias, prefix_group_attention
from onerank.serving import Ranker


def _inputs(seed: int, R=3, H=2, N=5, S=4, P=7, dh=8):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    valid = torch.rand(R, P, generator=g) > 0.3
    valid[1] = False  # a request without any valid prefix key (empty history, no SD token)
    return randn(R, H, N, S, dh), randn(R, H, P, dh), randn(R, H, P, dh), attention_bias(valid), \
        randn(R, H, N, S, dh), randn(R, H, N, S, dh)


def _group_inputs(first_query: int) -> tuple:
    query, prefix_key, prefix_value, bias, group_key, group_value = _inputs(0)
    return query[:, :, :, first_query:], prefix_key, prefix_value, bias, group_key, group_value


@pytest.mark.parametrize("attention, inputs", [
    (prefix_group_attention, lambda: _group_inputs(0)),
    (prefix_group_attention, lambda: _group_inputs(1)),  # the last layer: the anchor's query is skipped
])
def test_fused_prefix_attention_equals_the_explicit_softmax(attention, inputs):
    args = inputs()
    with torch.enable_grad():
        explicit = attention(*args)
    with torch.inference_mode():
        fused = attention(*args)
    assert torch.isfinite(fused).all()
    assert (fused - explicit).abs().max() < 1e-5


def _pool_batch(ranker: Ranker, n: int):
    return ranker.encode(ranker.example_request(n)).to_batch(ranker.backend.item_table, "item_id")


def test_the_rankers_path_equals_the_explicit_path_end_to_end(tiny_checkpoint):
    """The ranker (inference mode: fused attention, context once, chunks of 64) against the model's training path
    (gradients on: explicit softmax, one pass) on a pool of 300 candidates."""
    checkpoint = tiny_checkpoint("onerank")
    ranker = Ranker(checkpoint, chunk_size=64)
    request = ranker.example_request(300)
    served = ranker.predict(request)
    model, _ = api.load_checkpoint(checkpoint)
    with torch.enable_grad():
        reference = model(_pool_batch(ranker, 300))
    for task in ranker.tasks:
        np.testing.assert_allclose(served[task], torch.sigmoid(reference[task]).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["onerank", "mmoe"])
def test_bf16_predictions_stay_close_to_fp32(name, tiny_checkpoint):
    checkpoint = tiny_checkpoint(name)
    fp32, bf16 = Ranker(checkpoint, chunk_size=64), Ranker(checkpoint, chunk_size=64, precision="bf16")
    request = fp32.example_request(200)
    a, b = fp32.predict(request), bf16.predict(request)
    for task in fp32.tasks:
        assert np.abs(a[task] - b[task]).max() < 0.02  # bf16 keeps 8 bits of mantissa: ~0.4% relative per product
        assert not np.array_equal(a[task], b[task])  # bf16 did run
    assert bf16.describe()["precision"] == "bf16"


def test_bf16_is_refused_for_onnx_and_unknown_precisions(tiny_checkpoint):
    with pytest.raises(ValueError, match="torch backend"):
        Ranker(tiny_checkpoint("mmoe"), backend="onnx", precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        Ranker(tiny_checkpoint("mmoe"), precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is present")
def test_cuda_without_a_gpu_is_a_one_line_error(tiny_checkpoint):
    with pytest.raises(ValueError, match="no CUDA GPU") as info:
        Ranker(tiny_checkpoint("mmoe"), device="cuda")
    assert "\n" not in str(info.value) and "--device cpu" in str(info.value)
    with pytest.raises(ValueError, match="cpu' or 'cuda"):
        Ranker(tiny_checkpoint("mmoe"), device="mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["onerank", "mmoe"])
def test_cuda_scores_equal_the_cpu(name, tiny_checkpoint):
    cpu, gpu = Ranker(tiny_checkpoint(name)), Ranker(tiny_checkpoint(name), device="cuda")
    request = cpu.example_request(500)
    a, b = cpu.predict(request), gpu.predict(request)
    for task in cpu.tasks:
        np.testing.assert_allclose(a[task], b[task], atol=1e-4)


@pytest.mark.parametrize("valid", [[1, 1, 0, 1, 0, 1, 1], [0] * 7])  # padded slots; an empty history
def test_target_attention_over_one_shared_history_equals_the_per_row_attention(valid):
    torch.manual_seed(0)
    attention = TargetAttention(12, (8, 4)).eval()
    target, keys = torch.randn(9, 12), torch.randn(7, 12)
    mask = torch.tensor(valid, dtype=torch.bool)
    per_row = attention(target, keys.expand(9, -1, -1), mask.expand(9, -1))
    shared = attention(target, keys, mask)
    assert (shared - per_row).abs().max() < 1e-5
    if not any(valid):
        assert shared.abs().max() == 0


def test_a_pool_sharing_one_history_scores_as_its_rows_one_by_one(tiny_checkpoint):
    """The ranker's pool broadcasts one history over the candidates (stride 0): the DNN encoder embeds and attends to
    it once (``shares_one_history``); a contiguous copy of the same batch takes the per-row path."""
    ranker = Ranker(tiny_checkpoint("mmoe"))
    batch = _pool_batch(ranker, 50)
    assert shares_one_history(batch.histories["clicked"])
    copied = dataclasses.replace(batch, histories={s: {k: v.contiguous() for k, v in codes.items()}
                                                   for s, codes in batch.histories.items()})
    assert not shares_one_history(copied.histories["clicked"])
    with torch.no_grad():
        shared, per_row = ranker.backend.model(batch), ranker.backend.model(copied)
    for task in ranker.tasks:
        assert (shared[task] - per_row[task]).abs().max() < 1e-5
