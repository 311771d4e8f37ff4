"""The serving fast path against its plain reference: the fused CPU prefix attention (``prefix_attention`` +
``merge_extra_keys``, taken without gradients) equals the explicit softmax over [prefix, in-group keys] (taken with
gradients, and by training and export), also for a request whose prefix has no valid key; OneRank's ranking path
(inference mode, context once, chunks) equals the explicit path end to end."""

from __future__ import annotations

import pytest
import torch

from onerank.nn.transformer import attention_bias, prefix_group_attention, prefix_self_attention


def _inputs(seed: int, R=3, H=2, N=5, S=4, P=7, dh=8):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    valid = torch.rand(R, P, generator=g) > 0.3
    valid[1] = False  # a request without any valid prefix key (empty history, no SD token)
    return randn(R, H, N, S, dh), randn(R, H, P, dh), randn(R, H, P, dh), attention_bias(valid), \
        randn(R, H, N, S, dh), randn(R, H, N, S, dh)


@pytest.mark.parametrize("first_query", [0, 1])
def test_fused_group_attention_equals_the_explicit_softmax(first_query):
    query, prefix_key, prefix_value, bias, group_key, group_value = _inputs(0)
    query = query[:, :, :, first_query:]
    with torch.enable_grad():
        explicit = prefix_group_attention(query, prefix_key, prefix_value, bias, group_key, group_value)
    with torch.inference_mode():
        fused = prefix_group_attention(query, prefix_key, prefix_value, bias, group_key, group_value)
    assert torch.isfinite(fused).all()
    assert (fused - explicit).abs().max() < 1e-5


def test_fused_self_attention_equals_the_explicit_softmax():
    query, prefix_key, prefix_value, bias, key, value = (t[:, :, :, 0] if t.dim() == 5 else t for t in _inputs(1))
    with torch.enable_grad():
        explicit = prefix_self_attention(query, prefix_key, prefix_value, bias, key, value)
    with torch.no_grad():
        fused = prefix_self_attention(query, prefix_key, prefix_value, bias, key, value)
    assert torch.isfinite(fused).all()
    assert (fused - explicit).abs().max() < 1e-5
