"""What a model may know of the data (the feature space) and how fields, items and histories are embedded."""

from onerank.features.embedding import FeatureEmbedding
from onerank.features.space import FeatureSpace

__all__ = ["FeatureEmbedding", "FeatureSpace"]
