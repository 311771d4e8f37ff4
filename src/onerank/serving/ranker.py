"""The Python ranker: load a checkpoint with its schema and vocabularies, score a raw request, fuse and sort.

    ranker = Ranker("runs/onerank/checkpoint.pt", fusion=Fusion("product", {"click": 1.0, "cart": 0.5}))
    result = ranker.rank({"user": {...}, "context": {...}, "histories": {...}, "candidates": [...]})
    result.order, result.scores, result.probabilities["click"]

Two backends compute the same logits: ``"torch"`` (the checkpoint's model, ``model.score_pool``: OneRank encodes the
request's context once and scores the pool ``chunk_size`` candidates at a time) and ``"onnx"`` (an export made by
``onerank export``, run in ONNX Runtime).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import onerank
from onerank.data.encoding import Encoders
from onerank.features.space import FeatureSpace
from onerank.training.checkpoint import file_sha256
from onerank.serving.request import (
    EncodedRequest, RankRequest, RequestEncoder, RequestError, RequestLimits, parse_request,
)

PRODUCT_EPS = 1e-12  # floor of a probability raised to a power in the product fusion (log of 0 is -inf)
# Candidates per model call. On CPU, chunks of 256 were the fastest of 128 / 256 / 512 / 1024 for OneRank and MMoE
# with 1000 and 4096 candidates (activations stay in cache); the scores do not depend on it.
DEFAULT_CHUNK_SIZE = 256


# ---------------------------------------------------------------------------------------------------------------------
# Fusion of per-task predictions into one score
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Fusion:
    """``weighted_sum``: ``sum_t w_t p_t``; ``product``: ``prod_t p_t ** w_t`` (computed as ``exp(sum_t w_t log p_t)``).

    ``weights`` defaults to 1 for every task; tasks it does not name have weight 0.
    """

    kind: Literal["weighted_sum", "product"] = "weighted_sum"
    weights: dict[str, float] | None = None

    def resolved(self, tasks: list[str], kinds: dict[str, str]) -> "Fusion":
        """A copy with explicit weights for ``tasks``, checked (errors name the task at fault)."""
        if self.kind not in ("weighted_sum", "product"):
            raise ValueError(f"fusion kind must be 'weighted_sum' or 'product', not {self.kind!r}")
        weights = {t: 1.0 for t in tasks} if self.weights is None else dict(self.weights)
        for task, w in weights.items():
            if task not in tasks:
                raise ValueError(f"fusion weight for unknown task {task!r}; the model's tasks are {tasks}")
            if not math.isfinite(w):
                raise ValueError(f"fusion weight of task {task!r} must be finite, got {w}")
            if self.kind == "product" and w != 0 and kinds[task] != "binary":
                raise ValueError(f"fusion 'product' needs probabilities; task {task!r} is a regression task")
        if not any(w != 0 for w in weights.values()):
            raise ValueError(f"fusion weights {weights} give every task weight 0")
        return Fusion(self.kind, {t: float(weights.get(t, 0.0)) for t in tasks})

    def __call__(self, predictions: dict[str, np.ndarray]) -> np.ndarray:
        weights = self.weights or {}
        active = [(t, w) for t, w in weights.items() if w != 0]
        if self.kind == "weighted_sum":
            return sum(w * predictions[t].astype(np.float64) for t, w in active)
        log_score = sum(w * np.log(np.maximum(predictions[t].astype(np.float64), PRODUCT_EPS)) for t, w in active)
        return np.exp(log_score)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": dict(self.weights or {})}


# ---------------------------------------------------------------------------------------------------------------------
# Backends: encoded request -> logits per task
# ---------------------------------------------------------------------------------------------------------------------
class TorchBackend:
    def __init__(self, model: torch.nn.Module, meta: dict, chunk_size: int) -> None:
        self.model = model.eval()
        self.chunk_size = chunk_size
        self.item_id = model.space.schema.item_id
        self.item_table = {k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in meta["item_table"].items()}

    def __call__(self, encoded: EncodedRequest) -> dict[str, np.ndarray]:
        batch = encoded.to_batch(self.item_table, self.item_id)
        with torch.inference_mode():
            logits = self.model.score_pool(batch, self.chunk_size)
        return {t: v.float().numpy() for t, v in logits.items()}


class OnnxBackend:
    def __init__(self, path: str | Path, space: FeatureSpace, threads: int | None) -> None:
        import onnxruntime as ort

        from onerank.serving.export import check_onnx_signature, input_arrays

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.space = space
        self.output_names = check_onnx_signature(self.session, space, path)
        self._input_arrays = input_arrays

    def __call__(self, encoded: EncodedRequest) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, self._input_arrays(encoded, self.space))
        return dict(zip(self.output_names, outputs))


# ---------------------------------------------------------------------------------------------------------------------
# Ranker
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RankResult:
    """Predictions in the request's candidate order, and ``order``: candidate indices, best first."""

    item_ids: list
    probabilities: dict[str, np.ndarray]  # task -> [N]: probability (binary task) or value (regression task)
    scores: np.ndarray  # [N] fused score
    order: np.ndarray  # [N] candidate indices sorted by score, best first (ties keep the request order)
    fusion: Fusion

    def to_dict(self, top_k: int | None = None) -> list[dict[str, Any]]:
        """The JSON-ready ranking (``RankResponse``'s ``ranking``), best first."""
        order = self.order if top_k is None else self.order[:top_k]
        probs = {t: v[order].tolist() for t, v in self.probabilities.items()}
        scores = self.scores[order].tolist()
        ids = [self.item_ids[i] for i in order.tolist()]
        return [
            {"rank": r + 1, "index": int(i), "item_id": ids[r], "score": scores[r],
             "probabilities": {t: probs[t][r] for t in probs}}
            for r, i in enumerate(order.tolist())
        ]


def checkpoint_version(path: str | Path) -> str:
    """A short content hash: two checkpoints with the same version hold the same bytes."""
    return file_sha256(path)[:12]


class Ranker:
    """Scores raw requests with a checkpoint's model (see the module docstring).

    ``chunk_size``: candidates scored at a time by ``model.score_pool`` (torch backend); the scores do not depend on
    it. ``threads``: intra-op threads of the backend (None: leave the library default).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        backend: Literal["torch", "onnx"] = "torch",
        onnx_path: str | Path | None = None,
        fusion: Fusion | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        limits: RequestLimits | None = None,
        threads: int | None = None,
    ) -> None:
        from onerank import api

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        model, meta = api.load_checkpoint(checkpoint)
        self.checkpoint = Path(checkpoint)
        self.meta = meta
        self.model_name = meta["model"]
        self.space: FeatureSpace = model.space
        self.tasks = self.space.task_names
        self.task_kinds = {t.name: t.kind for t in self.space.tasks}
        self.checkpoint_sha256 = file_sha256(checkpoint)
        self.version = self.checkpoint_sha256[:12]
        self.encoder = RequestEncoder(self.space, Encoders.from_state(meta["encoders"]), meta["item_table"], limits)
        self.fusion = (fusion or Fusion()).resolved(self.tasks, self.task_kinds)
        self.backend_name = backend
        if threads:
            torch.set_num_threads(threads)
        if backend == "torch":
            self.backend = TorchBackend(model, meta, chunk_size)
        elif backend == "onnx":
            from onerank.serving.export import check_export_source, default_export_path

            path = Path(onnx_path) if onnx_path else default_export_path(self.checkpoint, "onnx")
            if not path.exists():
                raise FileNotFoundError(
                    f"ONNX file {path} does not exist; write it with `onerank export --checkpoint {checkpoint} "
                    "--format onnx`"
                )
            self.backend = OnnxBackend(path, self.space, threads)
            # an export of an earlier checkpoint would serve other scores under this checkpoint's version
            check_export_source(self.backend.session.get_modelmeta().custom_metadata_map, path, self.checkpoint,
                                self.checkpoint_sha256, "onnx")
        else:
            raise ValueError(f"backend must be 'torch' or 'onnx', not {backend!r}")

    @property
    def limits(self) -> RequestLimits:
        return self.encoder.limits

    # ---- scoring -----------------------------------------------------------------------------------------------------
    def encode(self, request: RankRequest | dict) -> EncodedRequest:
        return self.encoder.encode(request)

    def predict(self, request: RankRequest | dict | EncodedRequest) -> dict[str, np.ndarray]:
        """Per task, every candidate's probability (binary) or value (regression), in the request's order."""
        encoded = request if isinstance(request, EncodedRequest) else self.encode(request)
        logits = self.backend(encoded)
        return {t: _sigmoid(logits[t]) if self.task_kinds[t] == "binary" else logits[t].astype(np.float32)
                for t in self.tasks}

    def rank(self, request: RankRequest | dict, fusion: Fusion | None = None) -> RankResult:
        """Predictions, fused scores and the candidates sorted best first.

        ``fusion`` (or the request's own ``fusion``) overrides the ranker's default for this request.
        """
        req = parse_request(request)
        if fusion is None and req.fusion is not None:
            fusion = Fusion(req.fusion.kind, req.fusion.weights)
        try:
            fusion = self.fusion if fusion is None else fusion.resolved(self.tasks, self.task_kinds)
        except ValueError as exc:
            raise RequestError(("fusion",), str(exc)) from None
        encoded = self.encode(req)
        probabilities = self.predict(encoded)
        scores = fusion(probabilities)
        order = np.argsort(-scores, kind="stable")
        return RankResult(encoded.item_ids, probabilities, scores, order, fusion)

    def respond(self, request: RankRequest | dict) -> dict[str, Any]:
        """The ``POST /rank`` response body for a request."""
        req = parse_request(request)
        result = self.rank(req)
        return {
            "model": self.model_name,
            "version": self.version,
            "tasks": self.tasks,
            "fusion": result.fusion.to_dict(),
            "num_candidates": len(result.order),
            "ranking": result.to_dict(req.top_k),
        }

    # ---- description -------------------------------------------------------------------------------------------------
    def example_request(self, num_candidates: int = 3) -> dict[str, Any]:
        return self.encoder.example_request(num_candidates)

    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` returns: name, tasks, version, schema, limits, fusion and an example request."""
        schema = self.space.schema
        return {
            "name": self.model_name,
            "version": self.version,
            "onerank_version": onerank.__version__,
            "backend": self.backend_name,
            "tasks": [{"name": t.name, "kind": t.kind, "space": t.space} for t in schema.tasks],
            "schema": {
                "user": [f.name for f in schema.categorical + schema.dense if f.group == "user"],
                "context": [f.name for f in schema.categorical + schema.dense if f.group == "context"],
                "candidate": [f.name for f in schema.categorical + schema.dense if f.group == "item"],
                "item_id": schema.item_id,
                "dense": [f.name for f in schema.dense],
                "histories": {s.name: {"max_len": s.max_len} for s in schema.sequences},
                "vocab_sizes": dict(self.space.vocab_sizes),
            },
            "limits": {"max_candidates": self.limits.max_candidates, "max_history": self.limits.max_history},
            "fusion": self.fusion.to_dict(),
            "example_request": self.example_request(),
        }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # torch's sigmoid, so that the ranker's probabilities equal ``model.predict``'s bit for bit
    return torch.sigmoid(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

