"""The ranking service's wire models (pydantic): what a request and a response hold, what ``GET /model`` describes,
and the request errors in FastAPI's layout. ``serving/request.py`` turns a validated request into model inputs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"expected a string, a number or null, got {type(value).__name__}")


def _item_id(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected an item id (a string or an integer), got {value!r}")


# One validator per raw value type, so that a wrong value gets one error naming its field (a Union would report one
# error per member of the union).
Scalar = Annotated[Any, AfterValidator(_scalar), WithJsonSchema({"type": ["string", "number", "boolean", "null"]})]
ItemId = Annotated[Any, AfterValidator(_item_id), WithJsonSchema({"type": ["string", "integer"]})]


# ---------------------------------------------------------------------------------------------------------------------
# Request and response models
# ---------------------------------------------------------------------------------------------------------------------
class FusionSpec(BaseModel):
    """How per-task predictions become one ranking score.

    ``weighted_sum``: ``sum_t w_t p_t``. ``product``: ``prod_t p_t ** w_t`` (e.g. ``p_click^a * p_cart^b``); tasks
    absent from ``weights`` have weight 0.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["weighted_sum", "product"] = "weighted_sum"
    weights: dict[str, float] | None = Field(None, description="task -> weight; default 1 for every task")


class RankRequest(BaseModel):
    """One ranking request in raw values; ``serving/request.py`` says what is required and what falls back."""

    model_config = ConfigDict(extra="forbid")
    user: dict[str, Scalar] = Field(default_factory=dict, description="user fields of the schema")
    context: dict[str, Scalar] = Field(default_factory=dict, description="context fields of the schema")
    histories: dict[str, list[ItemId]] = Field(
        default_factory=dict, description="behaviour sequence -> raw item ids, oldest first"
    )
    candidates: list[dict[str, Scalar]] = Field(min_length=1, description="candidates with their item fields")
    fusion: FusionSpec | None = Field(None, description="overrides the service's fusion for this request")
    state: dict[str, float] | None = Field(
        None, description="the session's state, read by a fusion policy (docs/rl_fusion.md): requests and "
        "impressions so far and the recent interactions; absent: the session's first request")
    top_k: int | None = Field(None, ge=1, description="return only the best top_k candidates")


class RankedCandidate(BaseModel):
    rank: int
    index: int = Field(description="position of the candidate in the request")
    item_id: ItemId | None
    score: float
    probabilities: dict[str, float] = Field(description="per task: probability (binary) or value (regression)")


class RankResponse(BaseModel):
    model: str
    version: str
    tasks: list[str]
    fusion: dict[str, Any] = Field(description="the fusion used: its kind and parameters (a FusionSpec, or a fitted "
                                               "monotone fusion's network)")
    num_candidates: int
    ranking: list[RankedCandidate]


class TaskDescription(BaseModel):
    name: str
    kind: Literal["binary", "regression"]
    space: str | None = Field(None, description="the impression space the task's labels live in (e.g. click)")


class SchemaDescription(BaseModel):
    user: list[str] = Field(description="user fields (categorical and dense)")
    context: list[str] = Field(description="context fields (categorical and dense)")
    candidate: list[str] = Field(description="item fields a candidate may carry")
    item_id: str | None
    dense: list[str] = Field(description="dense fields (optional in a request)")
    histories: dict[str, dict[str, int]] = Field(description="behaviour sequence -> {max_len}")
    vocab_sizes: dict[str, int]


class LimitsDescription(BaseModel):
    max_candidates: int
    max_history: int


class ModelDescription(BaseModel):
    """``GET /model``: what is served, on what, and how to call it."""

    model_config = ConfigDict(populate_by_name=True)
    name: str
    version: str = Field(description="content hash of the checkpoint file")
    onerank_version: str
    backend: Literal["torch", "onnx", "pt2"]
    device: str
    precision: Literal["fp32", "bf16"]
    tasks: list[TaskDescription]
    request_schema: SchemaDescription = Field(alias="schema")
    limits: LimitsDescription
    fusion: dict[str, Any] = Field(description="the default fusion: a FusionSpec, or a fitted monotone fusion's network")
    fitted: dict[str, Any] | None = Field(
        None, description="the fusion file (onerank fuse): path, checkpoint hash, calibration per task, fitted fusion"
    )
    example_request: RankRequest


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A request that cannot be ranked. ``errors`` follow FastAPI's layout: ``{"loc", "msg", "type"}``."""

    def __init__(self, loc: tuple, msg: str, kind: str = "value_error", status: int = 422) -> None:
        super().__init__(f"{'.'.join(str(p) for p in loc)}: {msg}")
        self.errors = [{"loc": ["body", *loc], "msg": msg, "type": kind}]
        self.status = status

    @classmethod
    def from_validation(cls, exc: ValidationError) -> "RequestError":
        first = exc.errors()[0]
        err = cls(tuple(first["loc"]), first["msg"], first["type"])
        err.errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return err


class RequestTooLarge(RequestError):
    def __init__(self, loc: tuple, msg: str) -> None:
        super().__init__(loc, msg, kind="too_large", status=413)


def parse_request(request: RankRequest | dict) -> RankRequest:
    if isinstance(request, RankRequest):
        return request
    if not isinstance(request, dict):
        raise RequestError((), f"a request is a JSON object, got {type(request).__name__}", "type_error")
    try:
        return RankRequest.model_validate(request)
    except ValidationError as exc:
        raise RequestError.from_validation(exc) from None
