"""Small reusable blocks: MLP, attention, experts, gates, the Transformer block and the structured encoder."""

from onerank.nn.attention import TargetAttention
from onerank.nn.experts import CGCLayer, MixtureOfExperts, PLE
from onerank.nn.mlp import MLP

__all__ = ["TargetAttention", "CGCLayer", "MixtureOfExperts", "PLE", "MLP"]
