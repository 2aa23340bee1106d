"""Hybrid retrieval: ask the dense and the sparse retriever, fuse their rankings.

The ranker owns no index. It asks ``embedding`` and ``sparse`` over the bus (through the
injected ``ask`` coroutine, so it tests without Redis) at the same time and fuses them with the
request's mode (``services.ranker.fusion``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from services.ranker.fusion import RRF_K, check, fuse, rrf
from services.ranker.rerank import CrossEncoder
from services.ranker.rerank import rerank as rerank_hits
from shared import keys
from shared.bus import BadRequest
from shared.schemas import RetrieveRequest, RetrieveResult, SearchRequest, SearchResult

__all__ = ["RRF_K", "RankerService", "rrf"]

# ask(service, kind, body) -> the service's reply; raises shared.bus.BusError on failure.
Ask = Callable[[str, str, SearchRequest], Awaitable[SearchResult]]


class RankerService:
    """Hybrid retrieval over the bus. ``ask`` reaches the embedding and sparse services.

    ``rrf_k`` is the RRF constant for requests that do not set their own. With a trained
    ``reranker``, the top ``rerank_candidates`` fused hits are re-scored by it (unless a
    request says ``rerank=False``).
    """

    def __init__(self, ask: Ask, rrf_k: int = RRF_K, reranker: CrossEncoder | None = None,
                 rerank_candidates: int = 20):
        self.ask = ask
        self.rrf_k = rrf_k
        self.reranker = reranker
        self.rerank_candidates = rerank_candidates

    async def retrieve(self, req: RetrieveRequest) -> RetrieveResult:
        """Top ``req.top_k`` hits fused by ``req.mode`` from ``req.candidates`` of each retriever,
        both asked with ``req.filters``.

        Raises BadRequest (answered at once, not retried) for an unknown mode or a bad k or
        weight, before asking any retriever.
        """
        k = self.rrf_k if req.rrf_k is None else req.rrf_k
        try:
            check(req.mode, k=k, weight=req.weight)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if req.rerank and self.reranker is None:
            raise BadRequest("rerank was asked for but no reranker is configured; set "
                             "RAGTUNE_RERANK__MODEL to a trained cross-encoder folder")
        rerank = self.reranker is not None and req.rerank is not False
        search = SearchRequest(query=req.question, top_k=max(req.candidates, req.top_k),
                               filters=req.filters)

        async def timed(service: str) -> tuple[SearchResult, float]:
            start = time.perf_counter()
            result = await self.ask(service, "search", search)
            return result, (time.perf_counter() - start) * 1000

        (dense, dense_ms), (sparse, sparse_ms) = await asyncio.gather(
            timed(keys.EMBEDDING), timed(keys.SPARSE))
        start = time.perf_counter()
        fused = fuse(req.mode, dense.hits, sparse.hits, k=k, weight=req.weight)
        timings = {"dense": round(dense_ms, 2), "sparse": round(sparse_ms, 2),
                   "fusion": round((time.perf_counter() - start) * 1000, 3)}
        if not rerank:
            return RetrieveResult(hits=fused[: req.top_k], timings_ms=timings)
        start = time.perf_counter()
        reranked = await asyncio.to_thread(
            rerank_hits, self.reranker, req.question,
            fused[: max(self.rerank_candidates, req.top_k)], req.top_k)
        timings["rerank"] = round((time.perf_counter() - start) * 1000, 2)
        return RetrieveResult(hits=reranked, timings_ms=timings)
