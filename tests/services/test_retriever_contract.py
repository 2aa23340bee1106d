"""The retriever contract: every retriever service (dense over milvus-lite, sparse BM25 over
SQLite) passes the same checks through the same interface (ingest, search, delete, count).

Dense scores every document (cosine), sparse only those sharing a word with the query, so the
checks ask for what both promise: hits are a subset of the allowed documents, in order.
"""

from __future__ import annotations

import pytest

from services.sparse.service import SparseService
from shared.schemas import Document, Filters, IngestBatch, SearchRequest


@pytest.fixture(params=[pytest.param("dense", marks=pytest.mark.integration), "sparse"])
def retriever(request, tmp_path):
    if request.param == "dense":
        yield request.getfixturevalue("dense")
        return
    service = SparseService(tmp_path / "sparse")
    yield service
    service.close()


QUERIES = ["capital city", "largest animal in the sea", "lava and ash", "string instrument"]
SOURCES = ("wiki", "atlas")


@pytest.fixture
def documents(corpus) -> list[Document]:
    """The corpus with sources alternating wiki/atlas and dates 2010-06-01, 2011-06-01, ...;
    the last document (bio-whale) has no date."""
    return [doc.model_copy(update={"source": SOURCES[i % 2],
                                   "date": None if i == len(corpus) - 1 else f"{2010 + i}-06-01"})
            for i, doc in enumerate(corpus)]


def search(retriever, query: str, top_k: int = 20, filters: Filters | None = None) -> list[str]:
    return [h.doc_id for h in retriever.search(
        SearchRequest(query=query, top_k=top_k, filters=filters)).hits]


def allows(filters: Filters, doc: Document) -> bool:
    """The filter semantics, written out: AND over fields, OR over values, inclusive dates,
    an undated document never within a date bound."""
    dated = doc.date is not None
    return ((filters.topic is None or doc.topic in filters.topic)
            and (filters.source is None or doc.source in filters.source)
            and (filters.date_from is None or (dated and doc.date >= filters.date_from))
            and (filters.date_to is None or (dated and doc.date <= filters.date_to)))


# --- size and order --------------------------------------------------------------------------
def test_contract_empty_index_gives_no_hits(retriever):
    result = retriever.search(SearchRequest(query="capital city", top_k=5))
    assert result.hits == [] and result.count == 0
    assert search(retriever, "capital city", filters=Filters(topic=["Geography"])) == []


def test_contract_top_k_beyond_the_corpus(retriever, corpus):
    retriever.ingest(IngestBatch(documents=corpus))
    result = retriever.search(SearchRequest(query="capital city of France", top_k=1_000))
    ids = [h.doc_id for h in result.hits]
    assert result.count == len(corpus)
    assert 1 <= len(ids) <= len(corpus) and len(set(ids)) == len(ids)
    assert set(ids) <= {d.doc_id for d in corpus}
    assert ids[0] == "geo-paris"


def test_contract_scores_descend_and_ties_go_by_doc_id(retriever, corpus):
    retriever.ingest(IngestBatch(documents=corpus))
    # Two copies of one document under two ids score exactly the same.
    twin = "Krill are small crustaceans eaten by baleen whales in cold oceans."
    retriever.ingest(IngestBatch(documents=[
        Document(doc_id=i, title="Krill", text=twin) for i in ("z2", "a1")
    ]))
    for query in [*QUERIES, "krill crustaceans"]:
        hits = retriever.search(SearchRequest(query=query, top_k=8)).hits
        assert hits, query
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False)), query
        assert hits == sorted(hits, key=lambda h: (-h.score, h.doc_id)), query
    hits = retriever.search(SearchRequest(query="krill crustaceans", top_k=2)).hits
    assert [h.doc_id for h in hits] == ["a1", "z2"]
    assert hits[0].score == hits[1].score


# --- stability -------------------------------------------------------------------------------
def test_contract_repeated_searches_give_the_same_hits(retriever, documents):
    retriever.ingest(IngestBatch(documents=documents))
    for query in QUERIES:
        first = retriever.search(SearchRequest(query=query, top_k=5))
        for _ in range(3):
            again = retriever.search(SearchRequest(query=query, top_k=5))
            assert [h.doc_id for h in again.hits] == [h.doc_id for h in first.hits], query
            assert [h.score for h in again.hits] == pytest.approx(
                [h.score for h in first.hits], abs=1e-6)


def test_contract_ids_are_stable(retriever, corpus):
    retriever.ingest(IngestBatch(documents=corpus))
    before = {q: retriever.search(SearchRequest(query=q, top_k=3)) for q in QUERIES}
    retriever.ingest(IngestBatch(documents=list(reversed(corpus))))
    for query, result in before.items():
        after = retriever.search(SearchRequest(query=query, top_k=3))
        assert [h.doc_id for h in after.hits] == [h.doc_id for h in result.hits]
        assert [h.score for h in after.hits] == pytest.approx([h.score for h in result.hits],
                                                              abs=1e-5)
        by_id = {d.doc_id: d for d in corpus}
        assert all(h.title == by_id[h.doc_id].title and h.text == by_id[h.doc_id].text
                   for h in after.hits)


# --- filters ---------------------------------------------------------------------------------
FILTERS = [
    Filters(topic=["Geography"]),
    Filters(topic=["Science", "Food"]),
    Filters(source=["atlas"]),
    Filters(topic=["Geography", "Science"], source=["wiki"]),
    Filters(date_from="2012-06-01", date_to="2014-06-01"),  # both bounds are dates of docs
    Filters(date_from="2016-01-01"),
    Filters(date_to="2100-01-01"),  # every dated document, never the undated one
    Filters(topic=["Biology"], date_to="2100-01-01"),  # bio-whale is undated: nothing
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: f.model_dump_json(exclude_none=True,
                                                                             exclude={"schema_version"}))
def test_contract_filters_never_return_a_non_matching_document(retriever, documents, filters):
    retriever.ingest(IngestBatch(documents=documents))
    allowed = {d.doc_id for d in documents if allows(filters, d)}
    for query in [*QUERIES, "capital city lava water flour largest"]:
        ids = search(retriever, query, filters=filters)
        assert set(ids) <= allowed, (query, ids)
        assert ids == [i for i in search(retriever, query, top_k=1_000) if i in allowed], query


@pytest.mark.parametrize("filters, expected", [
    (Filters(topic=["Geography", "Science"], source=["wiki"]), {"geo-paris", "sci-volcano"}),
    (Filters(date_from="2012-06-01", date_to="2014-06-01"),
     {"sci-volcano", "sci-photosynthesis", "food-bread"}),
])
def test_contract_filters_keep_every_matching_document(retriever, documents, filters, expected):
    # Each of these documents shares a word with the query, so sparse finds them too.
    retriever.ingest(IngestBatch(documents=documents))
    assert set(search(retriever, "capital city lava water flour", filters=filters)) == expected


def test_contract_filters_apply_before_the_top_k_cut(retriever, documents):
    retriever.ingest(IngestBatch(documents=documents))
    assert search(retriever, "largest city of France", top_k=1) == ["geo-paris"]
    # Filtering the unfiltered top-1 would leave nothing; the best *matching* document comes.
    assert search(retriever, "largest city of France", top_k=1,
                  filters=Filters(topic=["Biology"])) == ["bio-whale"]


def test_contract_undated_documents_never_match_a_date_filter(retriever, documents):
    retriever.ingest(IngestBatch(documents=documents))
    assert search(retriever, "blue whale", top_k=1) == ["bio-whale"]
    for filters in [Filters(date_to="2100-01-01"), Filters(date_from="1900-01-01")]:
        ids = search(retriever, "blue whale largest animal", filters=filters)
        assert ids and "bio-whale" not in ids


def test_contract_filter_matching_nothing_gives_no_hits(retriever, documents):
    retriever.ingest(IngestBatch(documents=documents))
    result = retriever.search(SearchRequest(query="capital city", top_k=5,
                                            filters=Filters(source=["nowhere"])))
    assert result.hits == [] and result.count == len(documents)


@pytest.mark.parametrize("value", [
    'Q"uote', "back\\slash", "single ' quote", "new\nline", "tab\tand ünïcödé",
    '" or doc_id != "', "') OR 1=1 --",
])
def test_contract_filter_values_are_data_not_syntax(retriever, documents, value):
    odd = Document(doc_id="odd", title="Capital city", text="A capital city with an odd topic.",
                   topic=value, source=value)
    retriever.ingest(IngestBatch(documents=[*documents, odd]))
    assert search(retriever, "capital city", filters=Filters(topic=[value])) == ["odd"]
    assert search(retriever, "capital city", filters=Filters(source=[value, "wiki"]))[:1] == [
        "odd"]
    # An attempt to break out of the quoted value matches no document instead of all of them.
    assert search(retriever, "capital city", filters=Filters(topic=[value + '" or "1"="1'])) == []


# --- deletes ---------------------------------------------------------------------------------
def test_contract_delete_removes_the_document(retriever, documents):
    retriever.ingest(IngestBatch(documents=documents))
    assert search(retriever, "capital of Japan", top_k=1) == ["geo-tokyo"]
    retriever.delete(["geo-tokyo", "never-ingested"])
    assert retriever.count() == len(documents) - 1
    assert "geo-tokyo" not in search(retriever, "capital of Japan", top_k=1_000)
    assert "geo-tokyo" not in search(retriever, "capital of Japan",
                                     filters=Filters(topic=["Geography"]))
    retriever.ingest(IngestBatch(documents=documents[1:2]))  # and it can come back
    assert search(retriever, "capital of Japan", top_k=1) == ["geo-tokyo"]
