"""The sparse (BM25) service over its SQLite store; no servers needed.

The contract both retrievers keep is in test_embedding.py (it runs this service too).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.sparse.service import SparseService
from shared.schemas import Document, IngestBatch, SearchRequest
from shared.settings import Settings


def ask(service: SparseService, query: str, top_k: int = 5) -> list[str]:
    return [h.doc_id for h in service.search(SearchRequest(query=query, top_k=top_k)).hits]


@pytest.fixture
def sparse(tmp_path, corpus) -> SparseService:
    service = SparseService(tmp_path / "sparse")
    service.ingest(IngestBatch(documents=corpus))
    yield service
    service.close()


def test_bm25_ranks_the_obvious_document_first(sparse):
    assert ask(sparse, "capital of Japan")[0] == "geo-tokyo"
    assert ask(sparse, "lava eruption")[:1] == ["sci-volcano"]
    # Titles are indexed with the text ("Python" is in both, "programming" only in the title).
    assert ask(sparse, "programming")[:1] == ["tech-python"]


def test_scores_are_positive_and_only_matching_documents_come_back(sparse):
    hits = sparse.search(SearchRequest(query="capital", top_k=10)).hits
    assert sorted(h.doc_id for h in hits) == ["geo-paris", "geo-tokyo"]
    assert all(h.score > 0 for h in hits)


def test_matching_is_case_insensitive(sparse):
    assert ask(sparse, "VOLCANO") == ask(sparse, "volcano") == ["sci-volcano"]


@pytest.mark.parametrize("query", ["the of and is", "zyzzyva", "?!", "a"])
def test_query_without_indexed_tokens_gives_no_hits(sparse, corpus, query):
    result = sparse.search(SearchRequest(query=query, top_k=5))
    assert result.hits == [] and result.count == len(corpus)


def test_documents_survive_a_restart(tmp_path, sparse, corpus):
    before = sparse.search(SearchRequest(query="capital city", top_k=5))
    sparse.close()
    reopened = SparseService(tmp_path / "sparse")
    assert reopened.count() == len(corpus)
    assert reopened.search(SearchRequest(query="capital city", top_k=5)) == before
    reopened.close()


def test_upsert_is_idempotent_and_replaces_by_doc_id(sparse, corpus):
    sparse.ingest(IngestBatch(documents=corpus))
    assert sparse.count() == len(corpus)
    sparse.ingest(IngestBatch(documents=[
        Document(doc_id="food-bread", title="Sourdough", text="Sourdough rises with wild yeast.")
    ]))
    assert sparse.count() == len(corpus)
    assert ask(sparse, "sourdough") == ["food-bread"]
    assert ask(sparse, "flour dough") == []


def test_delete_removes_documents_and_ignores_unknown_ids(sparse, corpus):
    sparse.delete(["geo-tokyo", "never-ingested"])
    assert sparse.count() == len(corpus) - 1
    assert ask(sparse, "capital of Japan") == ["geo-paris"]
    sparse.delete(list(d.doc_id for d in corpus))
    assert sparse.count() == 0
    assert sparse.search(SearchRequest(query="capital", top_k=5)).hits == []


def test_a_second_instance_on_the_same_store_sees_the_writes(tmp_path, sparse):
    # Two replicas sharing one store: each ingest entry reaches only one of them.
    other = SparseService(tmp_path / "sparse")
    assert ask(other, "krill") == []
    sparse.ingest(IngestBatch(documents=[Document(doc_id="krill", title="Krill",
                                                  text="Small crustaceans.")]))
    assert ask(other, "krill") == ["krill"]
    other.delete(["krill"])
    assert ask(sparse, "krill") == []
    other.close()


def test_concurrent_ingest_and_search(sparse, corpus):
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(20):
                if n == 0:
                    sparse.ingest(IngestBatch(documents=[
                        Document(doc_id=f"extra-{i}", title=f"Extra {i}", text="volcano notes")
                    ]))
                else:
                    assert "sci-volcano" in ask(sparse, "volcano lava", top_k=30)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert errors == []
    assert sparse.count() == len(corpus) + 20
    assert len(ask(sparse, "volcano", top_k=50)) == 21


def test_from_settings_stores_under_sparse_dir(tmp_path):
    settings = Settings(home=tmp_path)
    service = SparseService.from_settings(settings)
    assert service.store_dir == settings.sparse_dir
    assert any(settings.sparse_dir.iterdir())
    service.close()


@pytest.mark.parametrize(("k1", "b"), [(-0.1, 0.75), (1.5, 1.5)])
def test_refuses_bad_bm25_parameters(tmp_path, k1, b):
    with pytest.raises(ValueError, match="has to be"):
        SparseService(tmp_path, k1=k1, b=b)
