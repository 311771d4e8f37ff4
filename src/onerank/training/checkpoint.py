"""Atomic checkpoint files, and loading them without running code from them.

Writing: to a temporary file in the same folder, fsync'ed, then renamed over the target, so an interrupted write
never damages a checkpoint already on disk. Every file starts with a header (:func:`header`): its format, what it
holds (``model``: ``checkpoint.pt``, the best epoch; ``resume``: ``last.pt``, the resumable state) and the onerank
version that wrote it.

What is written is plain data only: dicts, lists, tuples, strings, numbers, None and tensors (numpy arrays are stored
as tensors, numpy scalars as Python numbers; see :func:`storable`). Such a file loads with ``torch.load(path)``'s
default ``weights_only=True``, PyTorch's restricted unpickler, which builds those types and nothing else.

Reading (:func:`load`) uses that unpickler too: a file that names any other Python object (a function, a class with
a ``__reduce__``: what a crafted pickle uses to run code) is refused with one line before anything of it is built.
Files of format 1 and of the first release hold numpy arrays as numpy pickles them, so the unpickler also accepts
exactly the numpy pieces those need (:data:`LEGACY_GLOBALS`: the array and scalar constructors and the numeric
dtypes), data types that run no code of the file's choosing. The header is then checked before anything is used, so
a truncated, foreign or newer file ends with one line saying what the file is and what was expected.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import onerank

FORMAT = "onerank-checkpoint"
# Bumped when a file written now could not be read by the previous release. 2: plain data and tensors only (numpy
# arrays as tensors); 1: a header, numpy arrays pickled by numpy; no header: the first release.
FORMAT_VERSION = 2
KINDS = {"model": "a model checkpoint (checkpoint.pt: the best epoch)", "resume": "resumable state (last.pt)"}


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one, or not the one expected; the message says what it is."""


def header(kind: str) -> dict:
    """The keys that identify a checkpoint file (merged into what is saved)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "onerank_version": onerank.__version__}


def storable(obj: Any) -> Any:
    """``obj`` as plain data and tensors (what ``torch.load(weights_only=True)`` reads without an allow-list):
    numpy arrays become tensors, numpy scalars Python numbers; containers are copied, everything else is kept."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError("an object array cannot be stored as plain data")
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, storable(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(storable(v) for v in obj)
    return obj


def save_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(storable(obj), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _legacy_globals() -> list:
    """The numpy pieces that files of format 1 and of the first release name (numpy arrays in the metadata and in
    numpy's RNG state), under the module names numpy 1 and numpy 2 pickle them with. Nothing else."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    dtypes = [type(np.dtype(name)) for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
        "float64")]
    named = [(fn, f"{module}.{fn.__name__}") for fn in (reconstruct, scalar)
             for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    return [np.ndarray, np.dtype, *dtypes, *named]


LEGACY_GLOBALS = _legacy_globals()


def read_plain(path: str | Path) -> Any:
    """``torch.load`` through PyTorch's restricted unpickler, allowing the numpy data types of older files
    (:data:`LEGACY_GLOBALS`) and nothing else. Raises ``pickle.UnpicklingError`` naming what it refused."""
    with torch.serialization.safe_globals(LEGACY_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def load(path: str | Path, kind: str | None = None) -> dict:
    """A checkpoint written by onerank, read without running code from it and checked before use (see the module
    doc); ``kind``: ``model`` or ``resume`` to insist on one (None: either)."""
    expected = KINDS[kind] if kind else "a checkpoint"
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        hint = " (use its checkpoint.pt)" if (path / "checkpoint.pt").exists() else ""
        raise CheckpointError(f"checkpoint {path} is a folder{hint}; give the checkpoint file written by onerank train")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); expected {expected} written by onerank train")
    if _is_torchscript(path):
        raise CheckpointError(f"{path} is a TorchScript export, not a checkpoint; give the checkpoint.pt it was "
                              "exported from")
    try:
        state = read_plain(path)
    except Exception as exc:
        refused = _refused(exc) if isinstance(exc, pickle.UnpicklingError) else None
        if refused:
            raise CheckpointError(f"{path} holds Python objects that are not plain data (it names {refused}); "
                                  f"refused without running them: not {expected} written by onerank train, or a "
                                  "tampered file") from None
        raise CheckpointError(f"{path} is not a readable checkpoint: {_sniff(path)}; expected {expected} "
                              "written by onerank train") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not an onerank checkpoint; expected "
                              f"{expected} written by onerank train")
    if state.get("format", FORMAT) != FORMAT or not {"model", "meta"} <= set(state):
        raise CheckpointError(f"{path} is a PyTorch file with keys {sorted(map(str, state))[:8]}, not an onerank "
                              f"checkpoint; expected {expected} written by onerank train")
    if state.get("format_version", FORMAT_VERSION) > FORMAT_VERSION or _newer(state.get("onerank_version")):
        raise CheckpointError(f"{path} was written by onerank {state.get('onerank_version')} (checkpoint format "
                              f"{state.get('format_version')}); this is onerank {onerank.__version__}: upgrade onerank")
    # files of the first release carry no header: what they hold shows in their keys
    found = state.get("kind") or ("resume" if "optimizers" in state else "model")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path} holds {KINDS[found]}, not {KINDS[kind]}")
    if not isinstance(state["meta"], dict) or "model" not in state["meta"]:
        raise CheckpointError(f"{path}: the checkpoint's metadata is damaged (no model name); train it again")
    # the metadata's arrays (item tables) travel as tensors since format 2; the code that reads them takes numpy
    state["meta"] = _numpy_arrays(state["meta"])
    return state


def _numpy_arrays(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _numpy_arrays(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_numpy_arrays(v) for v in obj)
    return obj


def _refused(exc: pickle.UnpicklingError) -> str | None:
    """The object the restricted unpickler refused to build, from its message (``GLOBAL posix.system``, ``got
    <class 'x.Y'>``); None when it stopped at bytes that are no pickle at all."""
    found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(exc))
    return (found.group(1) or found.group(2)) if found else None


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip with code/ and constants.pkl), told apart without loading it."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _newer(version: str | None) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())

    return version is not None and parts(str(version)) > parts(onerank.__version__)


def _sniff(path: Path) -> str:
    """What a file that torch.load cannot read looks like, for the error message."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK"):
        return "a damaged or truncated zip archive (an interrupted copy?)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if head.startswith(b"\x08") and b"pytorch" in head.lower() or path.suffix == ".onnx":
        return "an ONNX model"
    if head.lstrip()[:1].isalpha() and head.isascii():
        return "a text file"
    return "unknown binary content"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex): what identifies a checkpoint to the exports and services made from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)  # a dict, its key array as plain ints: storable as it is
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # the dict of format 2, or format 1's tuple
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """A run's one seeding point: what is built inside (parameters, learnt parts of the objective and the weighting)
    draws from the seeded random streams, and afterwards the streams are back at the seed, so training's own draws
    (dropout, OOV dropout) start from the same point whatever was built before them."""
    seed_everything(seed)
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
