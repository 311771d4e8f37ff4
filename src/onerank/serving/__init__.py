"""Serving: the Python ranker (load a checkpoint, score a raw request), the HTTP service, and export."""

from onerank.serving.ranker import Fusion, Ranker, RankResult
from onerank.serving.request import RequestLimits
from onerank.serving.wire import RankRequest, RequestError, RequestTooLarge

__all__ = ["Fusion", "Ranker", "RankResult", "RankRequest", "RequestError", "RequestLimits", "RequestTooLarge"]
