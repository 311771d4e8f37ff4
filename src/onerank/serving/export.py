"""Export of a checkpoint's model to ONNX, a torch.export program (``.pt2``) or an AOTInductor package, with a flat
tensor signature built from the feature space.

Models take a ``Batch`` of dicts; exporters need positional tensors. :class:`ExportableModel` wraps a model with a
flat, ordered signature (see :func:`signature`):

    categorical fields (schema order)   int64   [B]
    dense fields (schema order)          float32 [B]
    history.<sequence> (schema order)    int64   [B, max_len]   item-id codes, left-padded (0 = empty slot)

and returns one logit tensor ``[B]`` per task, in the schema's task order. History items' side features are looked
up inside the graph in the checkpoint's item table (a buffer of the wrapper), as the data pipeline does, so a caller
only sends item ids. The batch axis ``B`` is dynamic; ``max_len`` is fixed by the schema.

All ``B`` rows of a call form **one request** (the candidates of one user and context): point-wise models do not
care, list-wise models (OneRank) rank the rows against each other, as in ``model.score_pool``.

The ``.pt2`` program and the AOTInductor package take a batch of requests instead (:class:`RequestBatchModel`): every
input gains a leading request axis, ``[R, N]`` (``[R, N, max_len]`` for histories), plus a ``mask`` ``[R, N]`` of
the real candidates, and each task's logits come back as ``[R, N]``; both ``R`` and ``N`` are dynamic. A request with
fewer than ``N`` candidates is padded: its padded slots carry the request's user, context and history inputs (any
candidate fields) and ``False`` in ``mask``; list-wise models leave them out of the pool.

Exporters, as of torch 2.13: ONNX goes through the torch.export-based exporter (``torch.onnx.export(...,
dynamo=True)``, the default since torch 2.9; it needs ``onnxscript``), with a dynamic batch axis. ``pt2``:
``torch.export.export`` with dynamic request and candidate axes, saved by ``torch.export.save``; ``aoti``: that
program compiled ahead of time by AOTInductor (``torch._inductor.aoti_compile_and_package``) into a package that
Python (``aoti_load_package``) and C++ (``AOTIModelPackageLoader``) load. TorchScript is retired (docs/serving.md):
``torch.jit`` is deprecated since torch 2.13, and the ``.pt2`` program replaces it. See serving/pt2.py for how a
``.pt2`` file is loaded without running code from it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from onerank.data.batching import Batch
from onerank.data.encoding import Encoders
from onerank.features.space import FeatureSpace
from onerank.resources import require
from onerank.serving import pt2
from onerank.serving.request import EncodedRequest, RequestEncoder
from onerank.training.checkpoint import file_sha256

Format = Literal["onnx", "pt2", "aoti"]
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "aoti": ".aoti.pt2"}
RETIRED = {"torchscript": "TorchScript export was retired: torch.jit is deprecated since torch 2.13 and nothing in "
                          "onerank loads it; use --format pt2 (torch.export) or aoti (AOTInductor, loadable from C++)"}
PARITY_TOLERANCE = 1e-5

# Model families that cannot be exported, with the reason (tests/test_export.py checks that the exporter still fails
# on them, so an entry is dropped as soon as the model becomes exportable; docs/serving.md lists them).
UNSUPPORTED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class InputSpec:
    name: str
    kind: Literal["categorical", "dense", "history"]
    field: str
    dtype: torch.dtype
    length: int | None = None  # history length (second axis)


def signature(space: FeatureSpace) -> list[InputSpec]:
    """The exported graph's inputs, in order."""
    specs = [InputSpec(n, "categorical", n, torch.int64) for n in space.categorical_fields]
    specs += [InputSpec(n, "dense", n, torch.float32) for n in space.dense_fields]
    specs += [InputSpec(f"history.{s}", "history", s, torch.int64, space.max_len(s)) for s in space.sequences]
    return specs


class ExportableModel(nn.Module):
    """Flat tensors in :func:`signature` order -> a tuple of logits ``[B]`` in task order."""

    def __init__(self, model: nn.Module, item_table: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.model = model.eval()
        self.space: FeatureSpace = model.space
        self.specs = signature(self.space)
        self.side_fields = sorted(item_table)
        for name in self.side_fields:
            self.register_buffer(f"item_table_{name}", torch.as_tensor(np.asarray(item_table[name], dtype=np.int64)))

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        rows = torch.arange(inputs[0].shape[0], device=inputs[0].device)
        return self.logits(inputs, torch.zeros_like(rows), rows.unsqueeze(0),
                           torch.ones_like(rows, dtype=torch.bool).unsqueeze(0))

    def logits(self, inputs: tuple[Tensor, ...] | list[Tensor], request: Tensor, slot: Tensor,
               mask: Tensor) -> tuple[Tensor, ...]:
        """Flat inputs [B, ...] of the requests laid out by ``slot`` / ``mask`` ([R, N]: each request's rows, which
        are real) -> logits [B] per task. The list layout is given rather than computed (bincount + max is
        data-dependent, which graph capture cannot follow)."""
        categorical, dense, histories = {}, {}, {}
        for spec, x in zip(self.specs, inputs):
            if spec.kind == "categorical":
                categorical[spec.field] = x
            elif spec.kind == "dense":
                dense[spec.field] = x
            else:
                per_field = {self.space.schema.item_id: x}
                for name in self.side_fields:
                    per_field[name] = getattr(self, f"item_table_{name}")[x]
                histories[spec.field] = per_field
        batch = Batch(categorical=categorical, dense=dense, histories=histories, labels={}, label_mask={},
                      user=request, request=request, _lists=(slot, mask))
        logits = self.model(batch)
        return tuple(logits[t] for t in self.space.task_names)


class RequestBatchModel(ExportableModel):
    """``mask`` [R, N] and the signature's inputs with a leading request axis ([R, N, ...]) -> logits [R, N] per task
    (the layout of the ``.pt2`` program, see the module doc)."""

    def forward(self, mask: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        R, N = mask.shape
        rows = torch.arange(R * N, device=mask.device)
        flat = [x.reshape(R * N, *x.shape[2:]) for x in inputs]
        return tuple(t.reshape(R, N) for t in self.logits(flat, rows // N, rows.view(R, N), mask))


# ---------------------------------------------------------------------------------------------------------------------
# Inputs in signature order
# ---------------------------------------------------------------------------------------------------------------------
def flat_inputs(batch: Batch, space: FeatureSpace) -> tuple[Tensor, ...]:
    """A batch's tensors in signature order (request-level tensors materialised over the rows)."""
    out = []
    for spec in signature(space):
        if spec.kind == "categorical":
            out.append(batch.categorical[spec.field].contiguous())
        elif spec.kind == "dense":
            out.append(batch.dense[spec.field].float().contiguous())
        else:
            out.append(batch.histories[spec.field][space.schema.item_id].contiguous())
    return tuple(out)


def input_arrays(encoded: EncodedRequest, space: FeatureSpace) -> dict[str, np.ndarray]:
    """An encoded request as ONNX Runtime feeds: {input name: array}, in signature order."""
    n = encoded.num_candidates
    feeds = {}
    for spec in signature(space):
        if spec.kind == "history":
            feeds[spec.name] = np.ascontiguousarray(np.broadcast_to(encoded.histories[spec.field], (n, spec.length)))
        else:
            feeds[spec.name] = np.ascontiguousarray(encoded.column(spec.field, spec.kind))
    return feeds


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------
def default_export_path(checkpoint: str | Path, fmt: Format) -> Path:
    """``runs/x/checkpoint.pt`` -> ``runs/x/checkpoint.onnx`` / ``.pt2`` / ``.aoti.pt2``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


CHECKPOINT_KEY = "onerank.checkpoint_sha256"  # metadata key: the SHA-256 of the checkpoint an export was made from


def _metadata(wrapper: ExportableModel, model_name: str, checkpoint_sha256: str,
              fitted: dict | None = None) -> dict[str, str]:
    meta = {
        CHECKPOINT_KEY: checkpoint_sha256,
        "onerank.model": model_name,
        "onerank.inputs": json.dumps([spec.name for spec in wrapper.specs]),
        "onerank.tasks": json.dumps(wrapper.space.task_names),
    }
    if fitted is not None:
        # the checkpoint's calibration and fusion (its fusion file), so the export ranks as the ranker does
        meta["onerank.fusion"] = json.dumps(fitted)
    return meta


def export_onnx(wrapper: ExportableModel, example: tuple[Tensor, ...], path: str | Path, model_name: str,
                checkpoint_sha256: str = "", fitted: dict | None = None) -> Path:
    require("serve", "ONNX export", "onnx", "onnxscript", "onnxruntime")
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in wrapper.specs)
    with warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations inside torch, optional torchvision ops)
        program = torch.onnx.export(
            wrapper, example, dynamo=True, input_names=[s.name for s in wrapper.specs],
            output_names=list(wrapper.space.task_names), dynamic_shapes=(dynamic,), verbose=False,
        )
    proto = program.model_proto
    for graph_input in proto.graph.input:
        axis = graph_input.type.tensor_type.shape.dim[0]
        if not axis.dim_param:
            # The exporter falls back to static shapes when the code branches on the batch size; such a graph
            # would only accept requests of exactly the example's size.
            raise ValueError(f"model {model_name!r}: the ONNX exporter fixed the candidate axis of input "
                             f"{graph_input.name!r} to {axis.dim_value} (the model's code depends on the number of "
                             "candidates as a Python value)")
    for key, value in _metadata(wrapper, model_name, checkpoint_sha256, fitted).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))
    return path


def export_metadata(path: str | Path, fmt: Format) -> dict[str, str]:
    """The onerank metadata an export carries (model, inputs, tasks, the checkpoint's SHA-256), read without loading
    the model."""
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return pt2.read_metadata(path)


def check_export_source(metadata: dict[str, str], path: str | Path, checkpoint: str | Path, checkpoint_sha256: str,
                        fmt: Format) -> None:
    """Refuse an export that was not made from this very checkpoint (its recorded SHA-256 differs or is absent)."""
    recorded = metadata.get(CHECKPOINT_KEY)
    again = f"export it again: onerank export --checkpoint {checkpoint} --format {fmt}"
    if not recorded:
        raise ValueError(f"{path} does not record which checkpoint it was exported from (an older onerank); {again}")
    if recorded != checkpoint_sha256:
        raise ValueError(f"{path} was exported from another checkpoint (sha256 {recorded[:12]}) than {checkpoint} "
                         f"({checkpoint_sha256[:12]}, retrained since?); {again}")


def check_onnx_signature(session, space: FeatureSpace, path: str | Path) -> list[str]:
    """The session's output names, after checking its inputs are this feature space's signature."""
    expected = [s.name for s in signature(space)]
    found = [i.name for i in session.get_inputs()]
    if found != expected:
        raise ValueError(f"{path}: the ONNX graph's inputs {found} do not match the checkpoint's {expected}; "
                         "export it again from this checkpoint")
    outputs = [o.name for o in session.get_outputs()]
    if outputs != list(space.task_names):
        raise ValueError(
            f"{path}: the ONNX graph's outputs {outputs} are not the checkpoint's tasks {space.task_names}"
        )
    return outputs


@dataclass
class ExportReport:
    path: Path
    format: str
    model: str
    max_abs_diff: float  # exported vs PyTorch logits on requests of other sizes than the export example


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path | None = None) -> ExportReport:
    """Export a checkpoint's model and check the export against PyTorch on requests of other sizes.

    The checkpoint's fusion file (``onerank fuse``), when there is one, is embedded in the export's metadata
    (``onerank.fusion``)."""
    from onerank import api
    from onerank.fusion import load_for_checkpoint

    if fmt in RETIRED:
        raise ValueError(RETIRED[fmt])
    if fmt not in SUFFIXES:
        raise ValueError(f"export format must be one of {sorted(SUFFIXES)}, not {fmt!r}")
    if fmt == "onnx":
        require("serve", "ONNX export", "onnx", "onnxscript", "onnxruntime")
    model, meta = api.load_checkpoint(checkpoint)
    fitted = load_for_checkpoint(checkpoint)
    fitted = None if fitted is None else fitted.to_dict()
    reason = UNSUPPORTED.get((meta["model"], fmt))
    if reason:
        raise ValueError(f"model {meta['model']!r} cannot be exported to {fmt}: {reason}")
    out = Path(out) if out else default_export_path(checkpoint, fmt)
    wrapper = (ExportableModel if fmt == "onnx" else RequestBatchModel)(model, meta["item_table"])
    encoder = RequestEncoder(model.space, Encoders.from_state(meta["encoders"]), meta["item_table"])
    digest = file_sha256(checkpoint)
    # Written next to the target and renamed over it only once the parity check passed: a failed export never
    # replaces (or poses as) a good one at the path the service loads.
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{SUFFIXES[fmt]}", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        if fmt == "onnx":
            export_onnx(wrapper, request_inputs(encoder, wrapper, 3), tmp, meta["model"], digest, fitted)
        else:
            example = pt2.request_batch([request_inputs(encoder, wrapper, 3)] * 2)
            program = pt2.export_program(wrapper, example)
            metadata = _metadata(wrapper, meta["model"], digest, fitted)
            if fmt == "pt2":
                pt2.save_program(program, tmp, metadata)
            else:
                pt2.compile_package(program, tmp, metadata)
        # two requests of other sizes than the example's (a padded batch for the .pt2 layouts)
        checks = [request_inputs(encoder, wrapper, n) for n in (7, 4)]
        diff = max(max_abs_diff(wrapper_logits(wrapper, check), export_logits) for check, export_logits in
                   zip(checks, run_export(tmp, fmt, checks)))
        if not diff <= PARITY_TOLERANCE:
            raise ValueError(f"the {fmt} export of {checkpoint} differs from PyTorch by {diff:.1e} (more than "
                             f"{PARITY_TOLERANCE:.0e}) on an example request; nothing was written to {out}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, fmt, meta["model"], diff)


def request_inputs(encoder: RequestEncoder, wrapper: ExportableModel, num_candidates: int) -> tuple[Tensor, ...]:
    """Signature inputs of the encoder's example request with ``num_candidates`` candidates."""
    encoded = encoder.encode(encoder.example_request(num_candidates))
    return tuple(torch.from_numpy(a) for a in input_arrays(encoded, wrapper.space).values())


def wrapper_logits(wrapper: ExportableModel, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """PyTorch's logits of one request's signature inputs, whatever the wrapper's layout."""
    with torch.no_grad():
        return ExportableModel.forward(wrapper, *inputs)


def run_export(path: str | Path, fmt: Format, requests: list[tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
    """Logits of an exported file (ONNX Runtime, the .pt2 program, the AOTInductor package) for each request's
    signature inputs; the .pt2 layouts score them together, as one padded batch."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = []
        for inputs in requests:
            feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
            out.append(tuple(torch.from_numpy(o) for o in session.run(None, feeds)))
        return out
    # the package is the one export_checkpoint has just compiled itself (see serving/pt2.py on loading packages)
    run = pt2.load_program(path) if fmt == "pt2" else pt2.load_own_package(path)
    mask, *inputs = pt2.request_batch(requests)
    with torch.inference_mode():
        logits = run(mask, *inputs)
    return [tuple(t[r, :len(inputs_r[0])] for t in logits) for r, inputs_r in enumerate(requests)]


def max_abs_diff(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


class _quiet_exporter_logs:
    """The ONNX exporter logs a warning per optional torchvision op it skips; silence it during export."""

    def __enter__(self):
        self.logger = logging.getLogger("torch.onnx")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
