"""AUC, GAUC, logloss, calibration per task."""

from onerank.metrics.ranking import auc, calibration, evaluate_predictions, gauc, logloss, monitor_value, task_metrics

__all__ = ["auc", "calibration", "evaluate_predictions", "gauc", "logloss", "monitor_value", "task_metrics"]
