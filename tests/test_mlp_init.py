"""The MLP's initialisation keeps the signal's scale through its ReLU layers (the first-epoch fix of the zoo)."""

from __future__ import annotations

import torch

from onerank.nn.mlp import MLP


def test_relu_layers_keep_the_signal_scale_and_start_without_bias():
    torch.manual_seed(0)
    mlp = MLP(256, [256, 256, 256], output_dim=1)
    x = torch.randn(4096, 256)
    hidden = mlp.net[:-1](x)
    # He init: E[h^2] stays at E[x^2] = 1 through each Linear + ReLU (PyTorch's default shrinks it ~6x per layer)
    assert 0.7 < hidden.pow(2).mean().item() < 1.4
    # the output layer (gain 1) maps it to a logit of about unit scale, centred: no random offset to unlearn
    out = mlp(x)
    assert 0.5 < out.std().item() < 2.0
    assert all(m.bias.abs().max().item() == 0.0 for m in mlp.net if isinstance(m, torch.nn.Linear))


def test_sigmoid_mlps_use_gain_one():
    torch.manual_seed(0)
    mlp = MLP(512, [512], activation=torch.nn.Sigmoid)
    weight = mlp.net[0].weight
    assert abs(weight.std().item() - 512 ** -0.5) < 0.1 * 512 ** -0.5
