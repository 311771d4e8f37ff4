"""One file per model, all with the interface ``model(batch) -> {task: logits}``."""

from onerank.models.base import MultiTaskModel, build_config, build_model, model_class, model_names, register_model

__all__ = ["MultiTaskModel", "build_config", "build_model", "model_class", "model_names", "register_model"]
