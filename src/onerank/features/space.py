"""The feature space: the schema plus fitted vocabulary sizes; everything a model needs to size itself."""

from __future__ import annotations

from dataclasses import dataclass

from onerank.data.dataset import EncodedDataset
from onerank.data.schema import CANDIDATE_GROUPS, Schema, TaskSpec
from onerank.features.item_vectors import ItemVectorSpec


@dataclass
class FeatureSpace:
    schema: Schema
    vocab_sizes: dict[str, int]
    # Item vectors read beside or in place of the item id embedding (features/item_vectors.py); None: ids only.
    item_vectors: ItemVectorSpec | None = None

    @classmethod
    def from_dataset(cls, ds: EncodedDataset, item_vectors: ItemVectorSpec | None = None) -> "FeatureSpace":
        return cls(schema=ds.schema, vocab_sizes=ds.vocab_sizes, item_vectors=item_vectors)

    def to_dict(self) -> dict:
        out = {"schema": self.schema.to_dict(), "vocab_sizes": dict(self.vocab_sizes)}
        if self.item_vectors is not None:
            out["item_vectors"] = self.item_vectors.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "FeatureSpace":
        vectors = ItemVectorSpec(**raw["item_vectors"]) if raw.get("item_vectors") else None
        return cls(schema=Schema.from_dict(raw["schema"]), vocab_sizes=dict(raw["vocab_sizes"]), item_vectors=vectors)

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.schema.tasks

    @property
    def task_names(self) -> list[str]:
        return self.schema.task_names

    @property
    def item_fields(self) -> list[str]:
        return self.schema.item_fields

    @property
    def context_fields(self) -> list[str]:
        """Categorical fields describing the request (user and context), not the candidate."""
        return [f.name for f in self.schema.categorical if f.group not in CANDIDATE_GROUPS]

    @property
    def categorical_fields(self) -> list[str]:
        return [f.name for f in self.schema.categorical]

    @property
    def dense_fields(self) -> list[str]:
        return [f.name for f in self.schema.dense]

    @property
    def sequences(self) -> list[str]:
        return [s.name for s in self.schema.sequences]

    def max_len(self, sequence: str) -> int:
        return next(s.max_len for s in self.schema.sequences if s.name == sequence)
