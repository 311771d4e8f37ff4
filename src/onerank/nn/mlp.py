from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """Linear -> activation -> dropout per hidden layer; ``output_dim`` adds a final plain linear layer."""

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

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
