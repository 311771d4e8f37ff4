"""The ``.pt2`` exports: a torch.export program and an AOTInductor package, and loading a program without running code
from the file.

``torch.export.load`` is not safe on a file from elsewhere (PyTorch's own docs say so): a program archive may hold
pickled tensors (unpickled with ``weights_only=False``), guard expressions that become Python code when the program
is called (``exec``), symbolic-shape expressions read by ``sympy.sympify`` (``eval``) and operator names resolved as
attributes of ``torch``, ``math`` or ``operator``. :func:`check_program_archive` therefore reads the archive as a zip
and checks every one of those against an allow-list before ``torch.export.load`` sees it:

- entries: only the JSON program, the JSON configs of weights and constants, raw tensor payloads, the archive's
  version files and onerank's metadata (no compiled code, no custom objects); the sample inputs must be readable by
  PyTorch's restricted unpickler (``torch.export.load`` would retry them with ``weights_only=False``);
- payloads: none pickled (``use_pickle: false``), constants are tensors;
- operators: ``torch.ops.aten.*``, ``torch.ops.prims.*`` and the arithmetic of ``operator`` that shape code uses;
- guards and shape expressions: parsed with ``ast`` and accepted only when they are arithmetic and comparisons of
  input sizes (``L['inputs'][0].size()[1]``), integers and the sympy functions of shape arithmetic.

An AOTInductor package is compiled native code: loading it runs that code by design, so onerank loads one only right
after compiling it itself (the export's parity check, :func:`load_own_package`); deploy it with
``torch._inductor.aoti_load_package`` or the C++ ``AOTIModelPackageLoader`` where you trust its origin. The ranker and
the service serve the ``.pt2`` program.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

METADATA_FILE = "onerank.json"  # the export's onerank metadata, an extra file of the archive

# What an archive written by save_program holds (after its top folder): nothing else is read
ALLOWED_ENTRIES = re.compile(
    r"(models/model\.json|data/weights/(weight_\d+|model_weights_config\.json)"
    r"|data/constants/(tensor_\d+|model_constants_config\.json)|data/sample_inputs/model\.pt"
    r"|archive_format|archive_version|byteorder"
    r"|\.data/version|\.data/serialization_id|extra/" + re.escape(METADATA_FILE) + ")"
)
OPERATOR_PREFIXES = ("torch.ops.aten.", "torch.ops.prims.")
PYTHON_OPERATORS = {f"_operator.{name}" for name in (
    "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "getitem", "eq", "ne", "lt", "le", "gt", "ge",
    "and_", "or_", "not_")}
# sympy's shape arithmetic, as torch writes it (srepr) in expressions and guards
SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Min", "Max", "Mod", "Abs", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "And", "Or", "Not", "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod", "ModularIndexing",
    "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "FloorToInt", "CeilToInt", "ToFloat", "Identity", "Infinity",
    "NegativeInfinity", "IntInfinity", "NegativeIntInfinity", "true", "false", "oo", "Sym_Min", "Sym_Max",
    "GreaterThan", "LessThan", "StrictGreaterThan", "StrictLessThan", "Equality", "Unequality", "BooleanTrue",
    "BooleanFalse",
}
SIZE_FUNCTIONS = {"Min", "Max", "Mod", "FloorDiv", "CeilDiv", "PythonMod", "sym_min", "sym_max"}


class UnsafeProgram(ValueError):
    """A .pt2 file holds something onerank does not load (the message names it); nothing of it was run."""


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------
def request_batch(requests: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Each request's signature inputs ([N_r, ...]) -> (mask [R, N], inputs [R, N, ...]) with N = max N_r; a padded
    slot repeats its request's first row (so it carries the request's user, context and history) and is masked."""
    width = max(len(inputs[0]) for inputs in requests)
    mask = torch.zeros(len(requests), width, dtype=torch.bool)
    padded: list[list[Tensor]] = [[] for _ in requests[0]]
    for r, inputs in enumerate(requests):
        n = len(inputs[0])
        mask[r, :n] = True
        for i, x in enumerate(inputs):
            padded[i].append(torch.cat([x, x[:1].expand(width - n, *x.shape[1:])]))
    return (mask, *(torch.stack(p) for p in padded))


def export_program(wrapper: torch.nn.Module, example: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of a ``RequestBatchModel`` with dynamic request and candidate axes."""
    requests, candidates = torch.export.Dim("requests", min=1), torch.export.Dim("candidates", min=1)
    axes = {0: requests, 1: candidates}
    mask, *inputs = example
    return torch.export.export(wrapper.eval(), (mask, *inputs), dynamic_shapes=(axes, tuple(axes for _ in inputs)))


def save_program(program: torch.export.ExportedProgram, path: str | Path, metadata: dict[str, str]) -> None:
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def compile_package(program: torch.export.ExportedProgram, path: str | Path, metadata: dict[str, str]) -> None:
    """AOTInductor: the program compiled for this machine's CPU (or the GPU its tensors are on) into a package, with
    onerank's metadata beside the compiled model (``extra/onerank.json``)."""
    from torch._inductor import aoti_compile_and_package

    aoti_compile_and_package(program, package_path=str(path))
    with zipfile.ZipFile(path, "a") as archive:
        top = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{top}/extra/{METADATA_FILE}", json.dumps(metadata))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The onerank metadata of a .pt2 program or package, read from the zip (nothing is loaded)."""
    with _open_archive(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")]
        return json.loads(archive.read(names[0])) if names else {}


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def load_program(path: str | Path, device: torch.device | None = None) -> Callable[..., tuple[Tensor, ...]]:
    """The program of a .pt2 file written by ``onerank export --format pt2``, after :func:`check_program_archive`
    (an ``UnsafeProgram`` naming what it refused otherwise), on ``device`` (default: where it was exported, the
    CPU)."""
    check_program_archive(path)
    program = torch.export.load(str(path))
    if device is not None and device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)  # weights and the constants the graph holds
    return program.module()


def load_own_package(path: str | Path) -> Callable[..., tuple[Tensor, ...]]:
    """An AOTInductor package that this process has just compiled (see the module doc: a package is native code)."""
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


def check_program_archive(path: str | Path) -> None:
    """Refuse (``UnsafeProgram``) a .pt2 file that holds anything beyond the allow-lists of the module doc."""
    with _open_archive(path) as archive:
        names = archive.namelist()
        tops = {n.split("/")[0] for n in names}
        if len(tops) != 1:
            raise UnsafeProgram(f"{path}: holds {len(tops)} archives ({sorted(tops)[:3]}); expected one program")
        (top,) = tops
        for name in names:
            inner = name[len(top) + 1:]
            if "/aotinductor/" in f"/{inner}":
                raise UnsafeProgram(f"{path} is an AOTInductor package (compiled code): onerank serves the .pt2 "
                                    "program (onerank export --format pt2)")
            if not ALLOWED_ENTRIES.fullmatch(inner):
                raise UnsafeProgram(f"{path}: holds {inner!r}, which a program exported by onerank does not")
        for kind in ("weights", "constants"):
            config_name = f"{top}/data/{kind}/model_{kind}_config.json"
            config = json.loads(archive.read(config_name)).get("config", {}) if config_name in names else {}
            for fqn, payload in config.items():
                if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise UnsafeProgram(f"{path}: {kind} entry {fqn!r} is stored as a pickle or an object, which "
                                        "loading would run")
        samples = f"{top}/data/sample_inputs/model.pt"
        if samples in names:
            # torch.export.load reads it with weights_only=True, and on failure again with weights_only=False: a file
            # whose sample inputs the restricted unpickler cannot read never gets that far
            try:
                torch.load(io.BytesIO(archive.read(samples)), weights_only=True)
            except Exception:
                raise UnsafeProgram(f"{path}: its sample inputs are not plain tensors (a pickle that loading would "
                                    "run)") from None
        if f"{top}/models/model.json" not in names:
            raise UnsafeProgram(f"{path}: no program (models/model.json); not a .pt2 written by onerank export")
        program = json.loads(archive.read(f"{top}/models/model.json"))
    _check_program(program, path)


def _open_archive(path: str | Path) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise UnsafeProgram(f"{path} is not a .pt2 archive (not a zip file)")
    return zipfile.ZipFile(path)


def _check_program(program: dict, path: str | Path) -> None:
    for guard in program.get("guards_code") or []:
        _check_expression(guard, path, "guard")
    for symbol, bounds in (program.get("range_constraints") or {}).items():
        if not re.fullmatch(r"[a-z]+\d+", symbol) or not all(
                v is None or isinstance(v, int) for v in (bounds.get("min_val"), bounds.get("max_val"))):
            raise UnsafeProgram(f"{path}: range constraint {symbol!r}: {bounds!r} is not a size range")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "target" and isinstance(value, str):
                    if not (value.startswith(OPERATOR_PREFIXES) or value in PYTHON_OPERATORS):
                        raise UnsafeProgram(f"{path}: calls {value!r}, which is not a PyTorch operator")
                elif key == "expr_str" and isinstance(value, str):
                    _check_expression(value, path, "shape expression")
                elif key in ("as_custom_obj", "as_custom_objs", "as_graph", "as_opaque"):
                    raise UnsafeProgram(f"{path}: holds a {key[3:]} argument, which a onerank program does not")
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(program.get("graph_module", {}))


def _check_expression(text: str, path: str | Path, what: str) -> None:
    """A guard or shape expression: only input sizes, integers, arithmetic, comparisons and sympy's shape
    functions (called by name, with constant arguments or such expressions)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise UnsafeProgram(f"{path}: {what} {text[:80]!r} is not an expression") from None
    for node in ast.walk(tree):
        allowed = isinstance(node, (
            ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.operator, ast.unaryop, ast.boolop,
            ast.cmpop, ast.Load, ast.keyword, ast.Subscript))
        if isinstance(node, ast.Constant):
            allowed = isinstance(node.value, (int, float, str, bool)) or node.value is None
        elif isinstance(node, ast.Name):
            allowed = node.id == "L" or node.id in SYMPY_NAMES or node.id in SIZE_FUNCTIONS
        elif isinstance(node, ast.Attribute):
            allowed = node.attr == "size" and isinstance(node.value, ast.Subscript)
        elif isinstance(node, ast.Call):
            func = node.func
            allowed = (isinstance(func, ast.Name) and (func.id in SYMPY_NAMES or func.id in SIZE_FUNCTIONS)) or (
                isinstance(func, ast.Attribute) and func.attr == "size" and not node.args and not node.keywords)
        if not allowed:
            raise UnsafeProgram(f"{path}: {what} {text[:80]!r} holds {type(node).__name__} "
                                f"{ast.unparse(node)[:40]!r}, which is not shape arithmetic")
