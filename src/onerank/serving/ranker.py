"""The Python ranker: load a checkpoint with its schema and vocabularies, score a raw request, fuse and sort.

    ranker = Ranker("runs/onerank/checkpoint.pt", fusion=Fusion("product", {"click": 1.0, "cart": 0.5}))
    result = ranker.rank({"user": {...}, "context": {...}, "histories": {...}, "candidates": [...]})
    result.order, result.scores, result.probabilities["click"]

Three backends compute the same logits: ``"torch"`` (the checkpoint's model, ``model.score_pool``: OneRank encodes
the request's context once and scores the pool ``chunk_size`` candidates at a time), ``"onnx"`` (an export made by
``onerank export --format onnx``, run in ONNX Runtime) and ``"pt2"`` (the torch.export program of ``onerank export
--format pt2``). Both run on the CPU by default, or on ``device="cuda"`` where a GPU is
present; the torch backend may compute in bfloat16 (``precision="bf16"``, autocast: matrix products in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import onerank
from onerank.data.encoding import Encoders
from onerank.data.schema import CANDIDATE_GROUPS
from onerank.features.space import FeatureSpace
from onerank.fusion import AnyFusion, Fusion, file_sha256, load_for_checkpoint
from onerank.fusion.policy import PolicyFusion
from onerank.resources import require
from onerank.serving.request import EncodedRequest, RequestEncoder, RequestLimits
from onerank.serving.wire import RankRequest, RequestError, parse_request

# Candidates per model call. On CPU, chunks of 256 were the fastest of 128 / 256 / 512 / 1024 for OneRank and MMoE
# with 1000 and 4096 candidates (activations stay in cache); the scores do not depend on it.
DEFAULT_CHUNK_SIZE = 256


# ---------------------------------------------------------------------------------------------------------------------
# Backends: encoded request -> logits per task
# ---------------------------------------------------------------------------------------------------------------------
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def serving_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> the device, or a one-line error when the GPU asked for is absent."""
    resolved = torch.device(device)
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', not {str(device)!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is visible to PyTorch {torch.__version__}; "
                             "serve with --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return resolved

CPU = torch.device("cpu")


class TorchBackend:
    def __init__(
        self, model: torch.nn.Module, meta: dict, chunk_size: int, device: torch.device = CPU,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        self.device = device
        self.model = model.eval().to(device)
        self.chunk_size = chunk_size
        self.autocast_dtype = PRECISIONS[precision]
        self.item_id = model.space.schema.item_id
        # the item table stays on the CPU: requests are encoded there, then the whole batch moves at once
        self.item_table = {k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in meta["item_table"].items()}

    def __call__(self, encoded: EncodedRequest) -> dict[str, np.ndarray]:
        batch = encoded.to_batch(self.item_table, self.item_id)
        if self.device.type != "cpu":
            batch = batch.to(self.device)
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                  enabled=self.autocast_dtype is not None)
        with torch.inference_mode(), autocast:
            logits = self.model.score_pool(batch, self.chunk_size)
        return {t: v.float().cpu().numpy() for t, v in logits.items()}


class OnnxBackend:
    def __init__(
        self, path: str | Path, space: FeatureSpace, threads: int | None, device: torch.device = CPU
    ) -> None:
        require("serve", "the onnx backend", "onnxruntime")
        import onnxruntime as ort

        from onerank.serving.export import check_onnx_signature, input_arrays

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("device 'cuda' with the onnx backend needs onnxruntime-gpu (this onnxruntime has "
                                 f"{ort.get_available_providers()}); use --backend torch or --device cpu")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.space = space
        self.output_names = check_onnx_signature(self.session, space, path)
        self._input_arrays = input_arrays

    def __call__(self, encoded: EncodedRequest) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, self._input_arrays(encoded, self.space))
        return dict(zip(self.output_names, outputs))


class Pt2Backend:
    """The torch.export program of ``onerank export --format pt2``, checked before it is loaded (serving/pt2.py);
    a request is a batch of one ([1, N])."""

    def __init__(self, path: str | Path, space: FeatureSpace, device: torch.device = CPU) -> None:
        from onerank.serving import pt2
        from onerank.serving.export import input_arrays

        self.program = pt2.load_program(path, device)
        self.device = device
        self.space = space
        self._input_arrays = input_arrays

    def __call__(self, encoded: EncodedRequest) -> dict[str, np.ndarray]:
        inputs = [torch.from_numpy(a).unsqueeze(0).to(self.device) for a in
                  self._input_arrays(encoded, self.space).values()]
        mask = torch.ones(1, encoded.num_candidates, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            logits = self.program(mask, *inputs)
        return {t: v[0].float().cpu().numpy() for t, v in zip(self.space.task_names, logits)}


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
    fusion: AnyFusion

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


class Ranker:
    """Scores raw requests with a checkpoint's model (see the module docstring).

    ``chunk_size``: candidates scored at a time by ``model.score_pool`` (torch backend); the scores do not depend on
    it. ``threads``: intra-op threads of the backend (None: leave the library default). ``device``: ``"cpu"`` or
    ``"cuda[:N]"`` (an error when absent). ``precision``: ``"fp32"`` or ``"bf16"`` (torch backend, autocast).

    ``fusion_file``: the checkpoint's fitted calibration and fusion (``onerank fuse``); by default the
    ``checkpoint.fusion.json`` beside the checkpoint when there is one, ``False`` for none. Its calibration maps the
    probabilities, its fusion is the default fusion (``fusion`` or a request's own fusion override it). A file
    fitted on another checkpoint is refused.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        backend: Literal["torch", "onnx", "pt2"] = "torch",
        export_path: str | Path | None = None,
        fusion: Fusion | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        limits: RequestLimits | None = None,
        threads: int | None = None,
        fusion_file: str | Path | Literal[False] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        from onerank import api

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.device = serving_device(device)
        if precision != "fp32" and backend != "torch":
            raise ValueError(f"precision {precision!r} needs the torch backend; the {backend} backend runs in fp32")
        self.precision = precision
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
        self.fitted = None if fusion_file is False else load_for_checkpoint(checkpoint, fusion_file, self.checkpoint_sha256)
        fitted_fusion = self.fitted.fusion if self.fitted is not None else None
        self.fusion = (fusion or fitted_fusion or Fusion()).resolved(self.tasks, self.task_kinds)
        self.backend_name = backend
        if threads:
            torch.set_num_threads(threads)
        if backend == "torch":
            self.backend = TorchBackend(model, meta, chunk_size, self.device, precision)
        elif backend in ("onnx", "pt2"):
            from onerank.serving.export import check_export_source, default_export_path, export_metadata

            path = Path(export_path) if export_path else default_export_path(self.checkpoint, backend)
            if not path.exists():
                raise FileNotFoundError(
                    f"{backend} export {path} does not exist; write it with `onerank export --checkpoint "
                    f"{checkpoint} --format {backend}`"
                )
            # an export of an earlier checkpoint would serve other scores under this checkpoint's version
            check_export_source(export_metadata(path, backend), path, self.checkpoint, self.checkpoint_sha256, backend)
            self.backend = (OnnxBackend(path, self.space, threads, self.device) if backend == "onnx"
                            else Pt2Backend(path, self.space, self.device))
        else:
            raise ValueError(f"backend must be 'torch', 'onnx' or 'pt2', not {backend!r}")

    @property
    def limits(self) -> RequestLimits:
        return self.encoder.limits

    # ---- scoring -----------------------------------------------------------------------------------------------------
    def encode(self, request: RankRequest | dict) -> EncodedRequest:
        return self.encoder.encode(request)

    def predict(self, request: RankRequest | dict | EncodedRequest) -> dict[str, np.ndarray]:
        """Per task, every candidate's probability (binary; calibrated when the fusion file has a calibration) or
        value (regression), in the request's order."""
        encoded = request if isinstance(request, EncodedRequest) else self.encode(request)
        logits = self.backend(encoded)
        # regression outputs are learned in the task's transformed units (TaskSpec.transform): map them back
        predictions = self.encoder.encoders.to_label_units(
            {t: _sigmoid(logits[t]) if self.task_kinds[t] == "binary" else logits[t].astype(np.float32)
             for t in self.tasks}
        )
        return predictions if self.fitted is None else self.fitted.calibrate(predictions)

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
        if isinstance(fusion, PolicyFusion):  # this request's weights, from its session state
            try:
                fusion = fusion.for_request(req.user, req.state)
            except ValueError as exc:
                raise RequestError(("state",), str(exc)) from None
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
            "device": str(self.device),
            "precision": self.precision,
            "tasks": [{"name": t.name, "kind": t.kind, "space": t.space} for t in schema.tasks],
            "schema": {
                "user": [f.name for f in schema.categorical + schema.dense if f.group == "user"],
                "context": [f.name for f in schema.categorical + schema.dense if f.group == "context"],
                "candidate": [f.name for f in schema.categorical + schema.dense if f.group in CANDIDATE_GROUPS],
                "item_id": schema.item_id,
                "dense": [f.name for f in schema.dense],
                "histories": {s.name: {"max_len": s.max_len} for s in schema.sequences},
                "vocab_sizes": dict(self.space.vocab_sizes),
            },
            "limits": {"max_candidates": self.limits.max_candidates, "max_history": self.limits.max_history},
            "fusion": self.fusion.summary() if isinstance(self.fusion, PolicyFusion) else self.fusion.to_dict(),
            "fitted": None if self.fitted is None else self.fitted.summary(),
            "example_request": self.example_request(),
        }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # torch's sigmoid, so that the ranker's probabilities equal ``model.predict``'s bit for bit
    return torch.sigmoid(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

