"""Hybrid retrieval: ask the dense and the sparse retriever, fuse their rankings.

The ranker owns no index. It asks ``embedding`` and ``sparse`` over the bus (through the
injected ``ask`` coroutine, so it tests without Redis) at the same time and fuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from shared import keys
from shared.schemas import Hit, RetrieveRequest, RetrieveResult, SearchRequest, SearchResult

# ask(service, kind, body) -> the service's reply; raises shared.bus.BusError on failure.
Ask = Callable[[str, str, SearchRequest], Awaitable[SearchResult]]

RRF_K = 60  # Cormack, Clarke & Buettcher 2009, "Reciprocal rank fusion outperforms ...": k=60


def rrf(rankings: list[list[Hit]], k: int = RRF_K) -> list[Hit]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank(d)), rank from 1.

    Returns every document that appears in any ranking once, with its fused score, in
    descending score order (ties: ascending doc_id). A document keeps the title/text of the
    first ranking it appears in. ``k`` must be >= 1.
    """
    if k < 1:
        raise ValueError(f"RRF k has to be a positive integer, but is {k}")
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + 1.0 / (k + rank)
            first.setdefault(hit.doc_id, hit)
    order = sorted(scores, key=lambda d: (-scores[d], d))
    return [first[d].model_copy(update={"score": scores[d]}) for d in order]


class RankerService:
    """Hybrid retrieval over the bus. ``ask`` reaches the embedding and sparse services."""

    def __init__(self, ask: Ask, rrf_k: int = RRF_K):
        self.ask = ask
        self.rrf_k = rrf_k

    async def retrieve(self, req: RetrieveRequest) -> RetrieveResult:
        """Top ``req.top_k`` fused hits from ``req.candidates`` asked of each retriever."""
        search = SearchRequest(query=req.question, top_k=max(req.candidates, req.top_k))

        async def timed(service: str) -> tuple[SearchResult, float]:
            start = time.perf_counter()
            result = await self.ask(service, "search", search)
            return result, (time.perf_counter() - start) * 1000

        (dense, dense_ms), (sparse, sparse_ms) = await asyncio.gather(
            timed(keys.EMBEDDING), timed(keys.SPARSE))
        start = time.perf_counter()
        fused = rrf([dense.hits, sparse.hits], self.rrf_k)[: req.top_k]
        return RetrieveResult(hits=fused, timings_ms={
            "dense": round(dense_ms, 2), "sparse": round(sparse_ms, 2),
            "fusion": round((time.perf_counter() - start) * 1000, 3)})
