"""OneRank options as older checkpoints saved them, read as this release's ``OneRankConfig``.

Options added since the first release take the behaviour the model had before them (``ADDED``). Until issue 28 every
option sat at the top level: the paper's ablations that no suite runs were values of ``task_tokens`` (``projection``),
``contextualization`` (``random_sd``) and ``sd_representation`` (``mlp``), and the anchors and the cross-task block
form had their own options; they now sit in the ``experimental`` block. Before ``cross_task_block`` existed the
cross-task layer was the post-norm one. Options removed since load where they hold the value that stayed;
docs/onerank.md section 2 keeps their measured verdicts.
"""

from __future__ import annotations

from typing import Any

from onerank.data.schema import CANDIDATE_GROUPS, SchemaError
from onerank.features.space import FeatureSpace

# sd_tokens "auto" grouped the SD fields of a schema with more than this many (one token per field otherwise)
MANY_SD_FIELDS = 8
# options added since the first release -> the behaviour before them: task tokens entered the encoder bare (the
# template), no task owned item embeddings, no page attention (tests/test_checkpoint_formats.py checks each has one)
ADDED = {"task_token_input": "template", "task_item_embedding": "off", "page_attention": False}
# removed options -> the one value a checkpoint may hold for them
REMOVED = {"scorer": "dot", "attention": "structured", "cross_task_matrix": None, "sd_group_size": None}


def saved_options(options: dict[str, Any], space: FeatureSpace) -> dict[str, Any]:
    options = {**ADDED, **options}
    if "experimental" in options:  # written by this release
        return options
    for name, kept in REMOVED.items():
        value = options.pop(name, kept)
        if value != kept:
            raise SchemaError(f"onerank option {name}={value!r} was removed (docs/onerank.md section 2); "
                              "this checkpoint needs an onerank release from before issue 28")
    block = options.pop("cross_task_block", "post_norm")
    if block not in ("gated", "post_norm"):
        raise SchemaError(f"onerank option cross_task_block={block!r} was removed (docs/onerank.md section 2); "
                          "this checkpoint needs an onerank release from before issue 28")
    if options.get("sd_tokens") == "auto":
        num_sd = sum(f.group not in CANDIDATE_GROUPS for f in space.schema.categorical + space.schema.dense)
        options["sd_tokens"] = "group" if num_sd > MANY_SD_FIELDS else "field"
    experimental = {
        "anchor_sequences": options.pop("anchor_sequences", ()),
        "sd_mlp": options.pop("sd_representation", "pooled") == "mlp",
        "task_projections": options.get("task_tokens") == "projection",
        "random_sd": options.get("contextualization") == "random_sd",
        "cross_task_block": block,
    }
    if experimental["task_projections"]:
        options["task_tokens"] = "per_task"
    if experimental["random_sd"]:
        options["contextualization"] = "sd"
    return {**options, "experimental": experimental}
