"""The fusion file: a checkpoint's fitted calibration and fusion, beside it and keyed to its bytes.

``runs/x/checkpoint.pt`` -> ``runs/x/checkpoint.fusion.json``. The file records the SHA-256 of the checkpoint it was
fitted on; loading it for any other checkpoint (retrained, fine-tuned, copied over) is an error, never a silent
application of stale calibration maps and weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onerank.fusion.calibration import Calibration
from onerank.fusion.forms import AnyFusion, fusion_from_dict
from onerank.fusion.policy import PolicyFusion
from onerank.training.checkpoint import file_sha256

FORMAT = 1
SUFFIX = ".fusion.json"


def default_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIX)


@dataclass
class FittedFusion:
    """Calibration (or None) and fusion (or None) fitted for the checkpoint whose hash is ``checkpoint_sha256``."""

    checkpoint_sha256: str
    calibration: Calibration | None = None
    fusion: AnyFusion | PolicyFusion | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what it was fitted for and how it did (value, k, figures)
    source: str | None = None  # the file it was read from

    def summary(self) -> dict[str, Any]:
        """What ``GET /model`` shows: where it comes from, the calibration per task, the fitted fusion's origin."""
        return {
            "file": self.source,
            "checkpoint_sha256": self.checkpoint_sha256,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "fusion": None if self.fusion is None else getattr(self.fusion, "summary", self.fusion.to_dict)(),
            "info": self.info,
        }

    def calibrate(self, predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.calibration(predictions) if self.calibration is not None else predictions

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "fusion": None if self.fusion is None else self.fusion.to_dict(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "FittedFusion":
        if raw.get("format") != FORMAT:
            raise ValueError(f"fusion file format {raw.get('format')!r} is not {FORMAT}")
        return cls(
            checkpoint_sha256=raw["checkpoint_sha256"],
            calibration=None if raw.get("calibration") is None else Calibration.from_dict(raw["calibration"]),
            fusion=None if raw.get("fusion") is None else _fusion_from_dict(raw["fusion"]),
            info=raw.get("info", {}),
        )

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write atomically; an existing file is replaced only with ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path


def _fusion_from_dict(raw: dict[str, Any]) -> AnyFusion | PolicyFusion:
    """A static fusion form, or a fusion policy (per-request weights from the session state, docs/rl_fusion.md)."""
    return PolicyFusion.from_dict(raw) if raw.get("kind") == "policy" else fusion_from_dict(raw)


def load_for_checkpoint(checkpoint: str | Path, path: str | Path | None = None,
                        checkpoint_sha256: str | None = None) -> FittedFusion | None:
    """The fusion file of ``checkpoint`` (``path``, default beside it), checked against the checkpoint's hash.

    None when no ``path`` is given and none lies beside the checkpoint; a ValueError when the file was fitted on
    other bytes than the checkpoint's.
    """
    explicit = path is not None
    path = Path(path) if explicit else default_path(checkpoint)
    if not path.exists():
        if explicit:
            raise FileNotFoundError(f"fusion file {path} does not exist")
        return None
    try:
        fitted = FittedFusion.from_dict(json.loads(path.read_text()))
        fitted.source = str(path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"fusion file {path} is unreadable ({exc}); fit it again with `onerank fuse`") from None
    sha = checkpoint_sha256 or file_sha256(checkpoint)
    if fitted.checkpoint_sha256 != sha:
        raise ValueError(
            f"fusion file {path} was fitted on checkpoint {fitted.checkpoint_sha256[:12]}, not on {checkpoint} "
            f"({sha[:12]}); fit it again with `onerank fuse --checkpoint {checkpoint} --overwrite`, or move it away"
        )
    return fitted
