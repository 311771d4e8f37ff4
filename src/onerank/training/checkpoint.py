"""Atomic checkpoint files: written to a temporary file in the same folder, fsync'ed, then renamed over the
target, so an interrupted write never damages a checkpoint already on disk.

Every file starts with a header (:func:`header`): its format, what it holds (``model``: ``checkpoint.pt``, the best
epoch; ``resume``: ``last.pt``, the resumable state) and the onerank version that wrote it. :func:`load` checks the
header before anything is used, so a truncated, foreign or newer file ends with one line saying what the file is
and what was expected, never with a traceback from deep inside the unpickler.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import onerank

FORMAT = "onerank-checkpoint"
FORMAT_VERSION = 1  # bumped when a file written now could not be read by the previous release
KINDS = {"model": "a model checkpoint (checkpoint.pt: the best epoch)", "resume": "resumable state (last.pt)"}


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one, or not the one expected; the message says what it is."""


def header(kind: str) -> dict:
    """The keys that identify a checkpoint file (merged into what is saved)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "onerank_version": onerank.__version__}


def save_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | Path, kind: str | None = None) -> dict:
    """A checkpoint written by onerank, checked before use (see the module doc); ``kind``: ``model`` or ``resume``
    to insist on one (None: either)."""
    expected = KINDS[kind] if kind else "a checkpoint"
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        hint = " (use its checkpoint.pt)" if (path / "checkpoint.pt").exists() else ""
        raise CheckpointError(f"checkpoint {path} is a folder{hint}; give the checkpoint file written by onerank train")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); expected {expected} written by onerank train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load's note when it dispatches a TorchScript archive to torch.jit
        try:
            # Checkpoints hold plain Python containers next to tensors (configs, vocabularies, RNG states).
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            raise CheckpointError(f"{path} is not a readable checkpoint: {_sniff(path)}; expected {expected} "
                                  "written by onerank train") from None
    if isinstance(state, torch.jit.ScriptModule):
        raise CheckpointError(f"{path} is a TorchScript export, not a checkpoint; give the checkpoint.pt it was "
                              "exported from")
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
    return state


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
