"""Reciprocal rank fusion on hand-made rankings, and the ranker over a fake bus."""

from __future__ import annotations

import asyncio

import pytest

from services.ranker.service import RankerService, rrf
from shared import keys
from shared.schemas import Hit, RetrieveRequest, SearchRequest, SearchResult


def hits(*ids: str) -> list[Hit]:
    return [Hit(doc_id=d, title=d.upper(), text=f"text {d}", score=10.0 - i)
            for i, d in enumerate(ids)]


def test_rrf_scores_by_hand():
    fused = rrf([hits("a", "b", "c"), hits("b", "d")], k=60)
    expected = {"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 63, "d": 1 / 62}
    assert [h.doc_id for h in fused] == ["b", "a", "d", "c"]
    for h in fused:
        assert h.score == pytest.approx(expected[h.doc_id])


def test_rrf_ties_break_by_doc_id_and_keeps_first_payload():
    fused = rrf([hits("z", "y"), hits("y", "z")], k=1)
    assert [h.doc_id for h in fused] == ["y", "z"]  # equal scores, ascending id
    assert fused[0].title == "Y" and fused[0].text == "text y"


def test_rrf_empty_and_single():
    assert rrf([[], []]) == []
    assert [h.doc_id for h in rrf([hits("a", "b")])] == ["a", "b"]


def test_rrf_rejects_bad_k():
    with pytest.raises(ValueError, match="k has to be a positive integer, but is 0"):
        rrf([hits("a")], k=0)


def test_ranker_asks_both_retrievers_and_fuses():
    asked: list[tuple[str, SearchRequest]] = []

    async def ask(service: str, kind: str, body: SearchRequest) -> SearchResult:
        asked.append((service, body))
        ranking = {keys.EMBEDDING: hits("a", "b", "c"), keys.SPARSE: hits("c", "a")}[service]
        return SearchResult(hits=ranking, count=3)

    result = asyncio.run(RankerService(ask).retrieve(
        RetrieveRequest(question="q", top_k=2, candidates=5)))
    assert [h.doc_id for h in result.hits] == ["a", "c"]
    assert sorted(s for s, _ in asked) == [keys.EMBEDDING, keys.SPARSE]
    assert all(b.top_k == 5 and b.query == "q" for _, b in asked)
    assert set(result.timings_ms) == {"dense", "sparse", "fusion"}
