from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """Linear -> activation -> dropout per hidden layer; ``output_dim`` adds a final plain linear layer.

    Initialisation: He (Kaiming) normal for the hidden layers (gain of the activation: sqrt(2) for ReLU), fan-in
    normal with gain 1 for the output layer, zero biases. PyTorch's default for ``nn.Linear`` (uniform, variance
    1 / (3 fan_in), random biases) shrinks the signal about six-fold per ReLU layer, so small embeddings reach the
    towers as little more than the random biases and the first epoch is spent before anything ranks
    (benchmarks/first_epoch.py, BENCHMARKS.md "Learning in the first epoch").
    """

    def __init__(
        self,
        input_dim: int,
        hidden: list[int] | tuple[int, ...],
        output_dim: int | None = None,
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        self.net = nn.Sequential(*layers)
        self.output_dim = width
        gain = "relu" if activation in (nn.ReLU, nn.LeakyReLU) else "linear"
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for i, layer in enumerate(linears):
            is_output = output_dim is not None and i == len(linears) - 1
            nn.init.kaiming_normal_(layer.weight, nonlinearity="linear" if is_output else gain)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
