"""Ranking requests encoded into model inputs (the wire models a request arrives as are in ``serving/wire.py``).

A request holds raw values as in the training data (strings or ids): the user and context fields, the behaviour
histories (raw item ids, oldest first) and a list of candidates with their fields. Encoding follows the checkpoint's
schema and the vocabularies and scalers fitted on train, vectorised over candidates:

* categorical values go through the saved vocabularies; unseen values become OOV (code 1), never an error. ``null``
  stands for a missing value and is encoded as training encoded missing values (``"<NA>"`` for string fields,
  ``-1`` for integer fields), which is OOV unless the training data held missing values;
* every user / context categorical field is required (``null`` is allowed), and so is each candidate's item id;
* a candidate's other item fields are optional: absent or ``null`` values are read from the checkpoint's item table
  (OOV for items the table does not know);
* dense fields are optional: an absent or ``null`` value is the schema's ``fill_value`` when declared, else the train
  mean (0 after scaling);
* histories are truncated to the schema's ``max_len`` (the most recent items kept) and left-padded; an absent
  sequence is an empty history.

Every problem raises a :class:`RequestError` whose ``loc`` names the field at fault (FastAPI's error layout), with
status 422, or 413 for requests past the limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from onerank.data.batching import Batch
from onerank.data.encoding import OOV, PAD, Encoders
from onerank.data.schema import CANDIDATE_GROUPS
from onerank.features.space import FeatureSpace
from onerank.serving.wire import RankRequest, RequestError, RequestTooLarge, parse_request


# ---------------------------------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RequestLimits:
    """Past these a request is refused with 413 (histories longer than ``max_len`` but within the limit are
    truncated to the most recent ``max_len`` items)."""

    max_candidates: int = 4096
    max_history: int = 1000  # raw items per behaviour sequence

    def __post_init__(self) -> None:
        if self.max_candidates < 1 or self.max_history < 0:
            raise ValueError(f"request limits must be positive, got {self}")


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EncodedRequest:
    """One request as codes: request-level values once, candidate values per candidate, histories as [L] item codes.

    ``to_batch`` expands the request-level tensors over the candidates without copying.
    """

    num_candidates: int
    item_ids: list  # raw item id of each candidate, echoed in the response
    categorical: dict[str, np.ndarray]  # field -> [N] codes, or a 0-d array for request-level fields
    dense: dict[str, np.ndarray]  # field -> [N] scaled values, or a 0-d array for request-level fields
    histories: dict[str, np.ndarray] = field(default_factory=dict)  # sequence -> [L] item codes, left-padded

    def column(self, name: str, kind: str = "categorical") -> np.ndarray:
        """[N] values of one field (request-level values repeated)."""
        values = (self.categorical if kind == "categorical" else self.dense)[name]
        return values if values.ndim else np.full(self.num_candidates, values, dtype=values.dtype)

    def to_batch(self, item_table: dict[str, torch.Tensor], item_id: str | None) -> Batch:
        n = self.num_candidates

        def expand(values: np.ndarray) -> torch.Tensor:
            if values.ndim == 0:
                return torch.as_tensor(values.item(), dtype=torch.from_numpy(values.reshape(1)).dtype).expand(n)
            return torch.from_numpy(values)

        histories = {}
        for seq, codes in self.histories.items():
            items = torch.from_numpy(codes).unsqueeze(0)
            per_field = {item_id: items, **{name: table[items] for name, table in item_table.items()}}
            histories[seq] = {name: x.expand(n, -1) for name, x in per_field.items()}
        return Batch(
            categorical={k: expand(v) for k, v in self.categorical.items()},
            dense={k: expand(v) for k, v in self.dense.items()},
            histories=histories,
            labels={},
            label_mask={},
            user=torch.zeros(n, dtype=torch.long),
            request=torch.zeros(n, dtype=torch.long),
        )


class RequestEncoder:
    """Raw request -> :class:`EncodedRequest`, with the checkpoint's schema, vocabularies, scalers and item table."""

    def __init__(self, space: FeatureSpace, encoders: Encoders, item_table: dict[str, np.ndarray],
                 limits: RequestLimits | None = None) -> None:
        self.space = space
        self.schema = space.schema
        self.encoders = encoders
        self.item_table = {k: np.asarray(v, dtype=np.int64) for k, v in item_table.items()}
        self.limits = limits or RequestLimits()
        self.kinds = {name: v.value_kind for name, v in encoders.vocabularies.items()}
        schema = self.schema
        self.request_categorical = [f for f in schema.categorical if f.group not in CANDIDATE_GROUPS]
        self.item_categorical = [f for f in schema.categorical if f.group in CANDIDATE_GROUPS]
        self.request_dense = [f for f in schema.dense if f.group not in CANDIDATE_GROUPS]
        self.item_dense = [f for f in schema.dense if f.group in CANDIDATE_GROUPS]
        self.candidate_fields = {f.name for f in self.item_categorical} | {f.name for f in self.item_dense}
        self.request_fields = {f.name: f.group for f in self.request_categorical + self.request_dense}
        # Scaled value of a missing dense value: the scaled fill_value when the schema declares one, else the mean.
        self.dense_fallback = {
            f.name: float(encoders.scalers[f.name].transform(np.array([f.fill_value]))[0]) if f.fill_value is not None
            else 0.0
            for f in schema.dense
        }

    # ---- public ------------------------------------------------------------------------------------------------------
    def encode(self, request: RankRequest | dict) -> EncodedRequest:
        req = parse_request(request)
        self._check_limits(req)
        values = self._request_values(req)
        candidates = req.candidates
        self._check_candidate_fields(candidates)
        item_id = self.schema.item_id
        categorical: dict[str, np.ndarray] = {}
        dense: dict[str, np.ndarray] = {}
        for f in self.request_categorical:
            if f.name not in values:
                raise RequestError((f.group, f.name), f"field required: {f.group} field {f.name!r} "
                                   "(send null for an unknown value)", "missing")
            categorical[f.name] = self._codes(f.name, [values[f.name]], (f.group, f.name)).reshape(())
        for f in self.request_dense:
            dense[f.name] = self._dense(f.name, [values.get(f.name)], (f.group, f.name)).reshape(())

        raw_ids: list = []
        item_codes = None
        if item_id is not None:
            raw_ids = [c.get(item_id) for c in candidates]
            if None in raw_ids:
                i = raw_ids.index(None)
                raise RequestError(("candidates", i, item_id), f"field required: the item id {item_id!r}", "missing")
            for i, v in enumerate(raw_ids):
                if isinstance(v, bool) or isinstance(v, float) and not v.is_integer():
                    raise RequestError(("candidates", i, item_id), f"expected an item id (a string or an integer), "
                                       f"got {v!r}", "type_error")
            item_codes = self._codes(item_id, raw_ids, ("candidates", item_id))
        for f in self.item_categorical:
            if f.name == item_id:
                categorical[f.name] = item_codes
                continue
            column = [c.get(f.name) for c in candidates]
            given = np.array([v is not None for v in column], dtype=bool)
            from_table = self._from_item_table(f.name, item_codes, len(candidates))
            if not given.any():
                categorical[f.name] = from_table
                continue
            codes = self._codes(f.name, [v for v in column if v is not None], ("candidates", f.name),
                                np.flatnonzero(given))
            out = from_table.copy()
            out[given] = codes
            categorical[f.name] = out
        for f in self.item_dense:
            dense[f.name] = self._dense(f.name, [c.get(f.name) for c in candidates], ("candidates", f.name))

        histories = {seq.name: self._history(seq.name, seq.max_len, req.histories.get(seq.name, []))
                     for seq in self.schema.sequences}
        return EncodedRequest(
            num_candidates=len(candidates),
            item_ids=raw_ids or list(range(len(candidates))),
            categorical=categorical,
            dense=dense,
            histories=histories,
        )

    def example_request(self, num_candidates: int = 3) -> dict[str, Any]:
        """A request this model accepts, built from values seen in training (for ``GET /model`` and the docs)."""
        def known(name: str, k: int) -> list:
            values = self.encoders.vocabularies[name].to_list()
            return [values[i % len(values)] for i in range(k)] if values else [None] * k

        request: dict[str, Any] = {"user": {}, "context": {}, "histories": {}, "candidates": []}
        for f in self.request_categorical:
            request[f.group][f.name] = known(f.name, 1)[0]
        for f in self.request_dense:
            request[f.group][f.name] = self._typical(f.name)
        item_id = self.schema.item_id
        if item_id is not None:
            items = known(item_id, num_candidates + 4)
            for seq in self.schema.sequences:
                request["histories"][seq.name] = items[num_candidates:]
            request["candidates"] = [{item_id: v} for v in items[:num_candidates]]
        else:
            request["candidates"] = [{} for _ in range(num_candidates)]
        for f in self.item_categorical:
            if f.name != item_id:
                for cand, value in zip(request["candidates"], known(f.name, num_candidates)):
                    cand[f.name] = value
        for f in self.item_dense:
            for cand in request["candidates"]:
                cand[f.name] = self._typical(f.name)
        return request

    def _typical(self, dense_field: str) -> float:
        """The raw value the scaler maps to 0 (the train mean, before log1p where the schema asks for it)."""
        scaler = self.encoders.scalers[dense_field]
        return round(float(np.expm1(scaler.mean) if scaler.log1p else scaler.mean), 3)

    # ---- checks ------------------------------------------------------------------------------------------------------
    def _check_limits(self, req: RankRequest) -> None:
        n = len(req.candidates)
        if n > self.limits.max_candidates:
            raise RequestTooLarge(("candidates",), f"{n} candidates; at most {self.limits.max_candidates} per request")
        known = {s.name for s in self.schema.sequences}
        for seq, items in req.histories.items():
            if seq not in known:
                raise RequestError(("histories", seq), f"unknown behaviour sequence {seq!r}; "
                                   f"the model's sequences are {sorted(known)}", "unknown_field")
            if len(items) > self.limits.max_history:
                raise RequestTooLarge(("histories", seq), f"{len(items)} items; at most {self.limits.max_history}")

    def _request_values(self, req: RankRequest) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for group in ("user", "context"):
            for name, value in getattr(req, group).items():
                if name not in self.request_fields:
                    hint = " (an item field: give it per candidate)" if name in self.candidate_fields else ""
                    raise RequestError((group, name), f"unknown field {name!r}{hint}; the model's user and context "
                                       f"fields are {sorted(self.request_fields)}", "unknown_field")
                if name in values:
                    raise RequestError((group, name), f"field {name!r} is given in both user and context")
                values[name] = value
        return values

    def _check_candidate_fields(self, candidates: list[dict]) -> None:
        seen: set = set()
        for c in candidates:
            seen.update(c)
        unknown = seen - self.candidate_fields
        if unknown:
            name = sorted(unknown, key=str)[0]
            i = next(i for i, c in enumerate(candidates) if name in c)
            hint = " (a user / context field: give it once in user or context)" if name in self.request_fields else ""
            raise RequestError(("candidates", i, name), f"unknown candidate field {name!r}{hint}; the model's item "
                               f"fields are {sorted(self.candidate_fields)}", "unknown_field")

    # ---- values -> codes ---------------------------------------------------------------------------------------------
    def _codes(self, name: str, values: list, loc: tuple, positions: np.ndarray | None = None) -> np.ndarray:
        """Vocabulary codes of raw values (vectorised); ``loc`` names the field in errors (``positions`` maps the
        values back to candidate indices when only some candidates gave the field)."""
        kind = self.kinds[name]
        if kind == "str":
            # As in training: missing -> "<NA>", anything else by its string form.
            normalised = np.array(["<NA>" if v is None else v if isinstance(v, str) else str(v) for v in values],
                                  dtype=object)
        else:
            normalised = self._numeric(values, kind, loc, positions)
        return self.encoders.vocabularies[name].encode(normalised)

    @staticmethod
    def _numeric(values: list, kind: str, loc: tuple, positions: np.ndarray | None) -> np.ndarray:
        fast = np.array(values) if values else np.zeros(0, dtype=np.int64)
        if fast.dtype.kind in "iub":  # the common case: a list of integer ids
            return fast.astype(np.int64)
        if kind == "float" and fast.dtype.kind == "f":
            return fast
        series = pd.Series(values, dtype=object)
        missing = series.isna().to_numpy()
        is_bool = np.array([isinstance(v, bool) for v in values], dtype=bool)
        numbers = pd.to_numeric(series.where(~is_bool), errors="coerce").to_numpy(dtype=np.float64)
        numbers = np.where(is_bool, series.where(is_bool, 0).to_numpy(dtype=np.float64), numbers)
        bad = ~missing & ~np.isfinite(numbers)
        if kind == "int":
            bad |= ~missing & np.isfinite(numbers) & (numbers != np.floor(np.nan_to_num(numbers)))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            where = _locate(loc, j, positions)
            expected = "an integer id" if kind == "int" else "a number"
            raise RequestError(where, f"expected {expected} (the training values of this field are numbers), "
                               f"got {values[j]!r}", "type_error")
        if kind == "int":
            # As in training: a missing integer id is -1.
            return np.where(missing, -1, np.nan_to_num(numbers)).astype(np.int64)
        return numbers

    def _from_item_table(self, name: str, item_codes: np.ndarray | None, n: int) -> np.ndarray:
        if item_codes is None or name not in self.item_table:
            return np.full(n, OOV, dtype=np.int64)
        return self.item_table[name][item_codes]

    def _dense(self, name: str, values: list, loc: tuple) -> np.ndarray:
        raw = np.array(values) if values else np.zeros(0)
        # None (missing), or a value of the wrong type somewhere; a bool mixed with numbers hides in a numeric array
        if raw.dtype.kind not in "iuf" or any(isinstance(v, bool) for v in values):
            wrong = [j for j, v in enumerate(values)
                     if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]
            if wrong:
                j = wrong[0]
                raise RequestError(_locate(loc, j, None), f"expected a number, got {values[j]!r}", "type_error")
            # NaN sent as a value is an error: null is how a missing value is sent
            present = np.array([v is not None for v in values], dtype=bool)
            raw = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
        else:
            present = np.ones(len(raw), dtype=bool)
        raw = raw.astype(np.float64)
        if not np.isfinite(raw[present]).all():
            j = int(np.flatnonzero(present & ~np.isfinite(raw))[0])
            raise RequestError(_locate(loc, j, None), f"expected a finite number (null for a missing value), "
                               f"got {raw[j]}")
        missing = ~present
        scaled = self.encoders.scalers[name].transform(np.where(missing, 0.0, raw))
        return np.where(missing, np.float32(self.dense_fallback[name]), scaled).astype(np.float32)

    def _history(self, seq: str, max_len: int, items: list) -> np.ndarray:
        out = np.full(max_len, PAD, dtype=np.int64)
        if not items:
            return out
        recent = items[-max_len:]
        offset = len(items) - len(recent)
        positions = np.arange(offset, len(items))  # errors name the position in the request's list
        codes = self._codes(self.schema.item_id, recent, ("histories", seq), positions)
        out[max_len - len(codes):] = codes
        return out


def _locate(loc: tuple, j: int, positions: np.ndarray | None) -> tuple:
    """Error location of the j-th value (``positions[j]``: its index in the request's list, when they differ):
    ('candidates', 'brand') -> ('candidates', 7, 'brand'); ('histories', 'clicked') -> ('histories', 'clicked', 7)."""
    index = j if positions is None else int(positions[j])
    if loc and loc[0] == "candidates":
        return ("candidates", index, *loc[1:])
    if loc and loc[0] == "histories":
        return (*loc, index)
    return loc
