"""Export of a checkpoint's model to ONNX or TorchScript, with a flat tensor signature built from the feature space.

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

Exporters, as of torch 2.13: ONNX goes through the torch.export-based exporter (``torch.onnx.export(...,
dynamo=True)``, the default since torch 2.9; it needs ``onnxscript``), with a dynamic batch axis. The legacy
TorchScript-based ONNX exporter also works for these models but is deprecated, so it is not offered. TorchScript
goes through ``torch.jit.trace`` (deprecated in torch 2.13 in favour of torch.export, still supported): tracing
records the ops of one example, so :func:`export_checkpoint` checks the traced graph on a batch of another size.
"""

from __future__ import annotations

import json
import logging
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
from onerank.serving.request import EncodedRequest, RequestEncoder

Format = Literal["onnx", "torchscript"]
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
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
        rows = torch.arange(inputs[0].shape[0], device=inputs[0].device)
        # One request: the list layout is given rather than computed (bincount + max is data-dependent, which
        # graph capture cannot follow).
        batch = Batch(
            categorical=categorical, dense=dense, histories=histories, labels={}, label_mask={},
            user=torch.zeros_like(rows), request=torch.zeros_like(rows),
            _lists=(rows.unsqueeze(0), torch.ones_like(rows, dtype=torch.bool).unsqueeze(0)),
        )
        logits = self.model(batch)
        return tuple(logits[t] for t in self.space.task_names)


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
    """``runs/x/checkpoint.pt`` -> ``runs/x/checkpoint.onnx`` / ``runs/x/checkpoint.torchscript.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


def _metadata(wrapper: ExportableModel, model_name: str, fitted: dict | None = None) -> dict[str, str]:
    meta = {
        "onerank.model": model_name,
        "onerank.inputs": json.dumps([spec.name for spec in wrapper.specs]),
        "onerank.tasks": json.dumps(wrapper.space.task_names),
    }
    if fitted is not None:
        # the checkpoint's calibration and fusion (its fusion file), so the export ranks as the ranker does
        meta["onerank.fusion"] = json.dumps(fitted)
    return meta


def export_onnx(wrapper: ExportableModel, example: tuple[Tensor, ...], path: str | Path, model_name: str,
                fitted: dict | None = None) -> Path:
    import onnx

    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter builds the graph with it)
    except ImportError:
        raise ValueError("ONNX export needs onnxscript: pip install -e '.[serve]'") from None
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
    for key, value in _metadata(wrapper, model_name, fitted).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))
    return path


def export_torchscript(wrapper: ExportableModel, example: tuple[Tensor, ...], path: str | Path,
                       model_name: str, fitted: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch.jit is deprecated in torch 2.13 but still the way to produce a TorchScript file; tracer warnings
        # about Python values are checked by the parity test on a batch of another size instead.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"onerank.json": json.dumps(_metadata(wrapper, model_name, fitted))})
    return path


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


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
    max_abs_diff: float  # exported vs PyTorch logits on a request of another size than the export example


def export_checkpoint(checkpoint: str | Path, fmt: Format, out: str | Path | None = None) -> ExportReport:
    """Export a checkpoint's model and check the export against PyTorch on a request of another size.

    The checkpoint's fusion file (``onerank fuse``), when there is one, is embedded in the export's metadata
    (``onerank.fusion``)."""
    from onerank import api
    from onerank.fusion import load_for_checkpoint

    if fmt not in SUFFIXES:
        raise ValueError(f"export format must be one of {sorted(SUFFIXES)}, not {fmt!r}")
    model, meta = api.load_checkpoint(checkpoint)
    fitted = load_for_checkpoint(checkpoint)
    fitted = None if fitted is None else fitted.to_dict()
    reason = UNSUPPORTED.get((meta["model"], fmt))
    if reason:
        raise ValueError(f"model {meta['model']!r} cannot be exported to {fmt}: {reason}")
    out = Path(out) if out else default_export_path(checkpoint, fmt)
    wrapper = ExportableModel(model, meta["item_table"])
    encoder = RequestEncoder(model.space, Encoders.from_state(meta["encoders"]), meta["item_table"])
    example = request_inputs(encoder, wrapper, 3)
    if fmt == "onnx":
        export_onnx(wrapper, example, out, meta["model"], fitted)
    else:
        export_torchscript(wrapper, example, out, meta["model"], fitted)
    check = request_inputs(encoder, wrapper, 7)
    diff = max_abs_diff(wrapper(*check), run_export(out, fmt, check))
    if not diff <= PARITY_TOLERANCE:
        raise ValueError(f"the {fmt} export {out} differs from PyTorch by {diff:.1e} (more than "
                         f"{PARITY_TOLERANCE:.0e}) on an example request; do not serve it")
    return ExportReport(out, fmt, meta["model"], diff)


def request_inputs(encoder: RequestEncoder, wrapper: ExportableModel, num_candidates: int) -> tuple[Tensor, ...]:
    """Signature inputs of the encoder's example request with ``num_candidates`` candidates."""
    encoded = encoder.encode(encoder.example_request(num_candidates))
    return tuple(torch.from_numpy(a) for a in input_arrays(encoded, wrapper.space).values())


def run_export(path: str | Path, fmt: Format, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Logits of an exported file (ONNX Runtime or TorchScript) on signature inputs."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feeds))
    with torch.inference_mode():
        return tuple(load_torchscript(path)(*inputs))


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
