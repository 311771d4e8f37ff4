"""Multi-task fusion, after training and before serving: per-task calibration fitted on validation, fusion forms
(weighted sum, weighted product, a monotone network) fitted against a value of the data with CMA-ES, and the fusion
file the ranker reads beside its checkpoint. See docs/fusion.md."""

from onerank.fusion.calibration import Calibration, TaskCalibration, expected_calibration_error, reliability
from onerank.fusion.fitted import FittedFusion, default_path, file_sha256, load_for_checkpoint
from onerank.fusion.forms import AnyFusion, Fusion, MonotoneFusion, fusion_from_dict

__all__ = [
    "AnyFusion", "Calibration", "FittedFusion", "Fusion", "MonotoneFusion", "TaskCalibration", "default_path",
    "expected_calibration_error", "file_sha256", "fusion_from_dict", "load_for_checkpoint", "reliability",
]
