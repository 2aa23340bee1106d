"""The ranker over a fake bus: it asks both retrievers and fuses with the request's mode.

The fusion strategies themselves are tested in test_fusion.py.
"""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from services.ranker.service import RankerService
from shared import keys
from shared.bus import BadRequest
from shared.schemas import Filters, Hit, RetrieveRequest, SearchRequest, SearchResult


def hits(*ids: str) -> list[Hit]:
    return [Hit(doc_id=d, title=d.upper(), text=f"text {d}", score=10.0 - i)
            for i, d in enumerate(ids)]


def fake_ask(asked: list[tuple[str, SearchRequest]]):
    async def ask(service: str, kind: str, body: SearchRequest) -> SearchResult:
        asked.append((service, body))
        ranking = {keys.EMBEDDING: hits("a", "b", "c"), keys.SPARSE: hits("c", "a")}[service]
        return SearchResult(hits=ranking, count=3)
    return ask


def test_ranker_asks_both_retrievers_and_fuses():
    asked: list[tuple[str, SearchRequest]] = []
    result = asyncio.run(RankerService(fake_ask(asked)).retrieve(
        RetrieveRequest(question="q", top_k=2, candidates=5)))
    assert [h.doc_id for h in result.hits] == ["a", "c"]  # rrf by default
    assert sorted(s for s, _ in asked) == [keys.EMBEDDING, keys.SPARSE]
    assert all(b.top_k == 5 and b.query == "q" for _, b in asked)
    assert set(result.timings_ms) == {"dense", "sparse", "fusion"}


def test_ranker_passes_the_filters_to_both_retrievers():
    asked: list[tuple[str, SearchRequest]] = []
    filters = Filters(topic=["Science"], date_to="2020-12-31")
    asyncio.run(RankerService(fake_ask(asked)).retrieve(
        RetrieveRequest(question="q", top_k=2, candidates=5, filters=filters)))
    assert sorted(s for s, _ in asked) == [keys.EMBEDDING, keys.SPARSE]
    assert all(b.filters == filters for _, b in asked)


@pytest.mark.parametrize(("mode", "weight", "expected"), [
    ("dense", 0.5, ["a", "b", "c"]),
    ("sparse", 0.5, ["c", "a"]),
    # min-max: dense a 1, b .5, c 0; sparse c 1, a 0 (b missing: 0)
    ("weighted_minmax", 0.2, ["c", "a", "b"]),  # a .2, b .1, c .8
    ("weighted_minmax", 0.9, ["a", "b", "c"]),  # a .9, b .45, c .1
])
def test_ranker_uses_the_requested_mode_and_weight(mode, weight, expected):
    result = asyncio.run(RankerService(fake_ask([])).retrieve(
        RetrieveRequest(question="q", top_k=3, candidates=5, mode=mode, weight=weight)))
    assert [h.doc_id for h in result.hits] == expected


def test_ranker_k_comes_from_the_request_else_its_own():
    # rrf with k=1: a 1/2 + 1/3, b 1/3, c 1/4 + 1/2; with k=1000 a still wins but the score moves
    req = RetrieveRequest(question="q", top_k=3, candidates=5, rrf_k=1)
    result = asyncio.run(RankerService(fake_ask([]), rrf_k=1000).retrieve(req))
    assert result.hits[0].score == pytest.approx(1 / 2 + 1 / 3)
    req = RetrieveRequest(question="q", top_k=3, candidates=5)
    result = asyncio.run(RankerService(fake_ask([]), rrf_k=1000).retrieve(req))
    assert result.hits[0].score == pytest.approx(1 / 1001 + 1 / 1002)


def test_unknown_mode_is_a_bad_request_before_any_retriever_is_asked():
    asked: list[tuple[str, SearchRequest]] = []
    with pytest.raises(BadRequest, match="unknown fusion mode 'bm42'; known: rrf, "):
        asyncio.run(RankerService(fake_ask(asked)).retrieve(
            RetrieveRequest(question="q", top_k=2, candidates=5, mode="bm42")))
    assert asked == []


@pytest.mark.parametrize("field", [{"weight": 1.5}, {"weight": -0.1}, {"rrf_k": 0}])
def test_request_refuses_bad_weight_and_k(field):
    with pytest.raises(ValidationError):
        RetrieveRequest(question="q", top_k=2, candidates=5, **field)


def _ranker_with(reranker) -> RankerService:
    async def ask(service: str, kind: str, body: SearchRequest) -> SearchResult:
        ranking = {keys.EMBEDDING: hits("a", "b", "c"), keys.SPARSE: hits("a", "b", "c")}
        return SearchResult(hits=ranking[service], count=3)

    return RankerService(ask, reranker=reranker, rerank_candidates=3)


class _ReversingReranker:
    """Stands in for a trained CrossEncoder: prefers the later doc ids."""

    def score(self, question: str, passages: list[str]) -> list[float]:
        return [float(ord(p[0])) for p in passages]  # titles are the upper-cased ids


def test_reranker_reorders_fused_candidates_unless_turned_off():
    ranker = _ranker_with(_ReversingReranker())
    req = RetrieveRequest(question="q", top_k=2, candidates=3, mode="rrf")
    result = asyncio.run(ranker.retrieve(req))
    assert [h.doc_id for h in result.hits] == ["c", "b"] and "rerank" in result.timings_ms
    off = asyncio.run(ranker.retrieve(req.model_copy(update={"rerank": False})))
    assert [h.doc_id for h in off.hits] == ["a", "b"] and "rerank" not in off.timings_ms


def test_rerank_without_a_reranker_is_a_bad_request():
    req = RetrieveRequest(question="q", top_k=2, candidates=3, rerank=True)
    with pytest.raises(BadRequest, match="no reranker is configured"):
        asyncio.run(_ranker_with(None).retrieve(req))
    plain = asyncio.run(_ranker_with(None).retrieve(req.model_copy(update={"rerank": None})))
    assert [h.doc_id for h in plain.hits] == ["a", "b"]
