"""Raw files -> validated, encoded, cached columns; batches; requests."""

from onerank.data.batching import Batch, BatchLoader, TensorSplit, tensor_splits
from onerank.data.dataset import EncodedDataset, EncodedSplit, RawDataset, RawSplit, load_or_build
from onerank.data.encoding import OOV, PAD, RaggedHistory
from onerank.data.registry import dataset_names, load_dataset, register_dataset
from onerank.data.schema import CategoricalField, DenseField, Schema, SchemaError, SequenceField, TaskSpec

__all__ = [
    "Batch", "BatchLoader", "TensorSplit", "tensor_splits", "EncodedDataset", "EncodedSplit", "RawDataset", "RawSplit",
    "load_or_build", "OOV", "PAD", "RaggedHistory", "dataset_names", "load_dataset", "register_dataset",
    "CategoricalField", "DenseField", "Schema", "SchemaError", "SequenceField", "TaskSpec",
]
