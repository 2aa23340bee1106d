"""The embedding service: encoder (real MiniLM), dense index (real milvus-lite), and the
retriever contract that the dense and the sparse services both keep."""

from __future__ import annotations

import numpy as np
import pytest
from pymilvus import MilvusClient

from services.embedding.encoder import Encoder, index_text
from services.embedding.index import MAX_TITLE, DenseIndex
from services.embedding.service import EmbeddingService
from services.sparse.service import SparseService
from shared.schemas import Document, IngestBatch, SearchRequest
from shared.settings import Settings

TEXTS = [
    "A short one.",
    "The violin is a wooden string instrument played with a bow; it has four strings tuned "
    "in perfect fifths and is the smallest member of its family.",
    "Chess.",
    "Plants convert sunlight, water and carbon dioxide into glucose and oxygen.",
    "Tokyo is the capital of Japan.",
    "",
    "The Roman Empire ruled the Mediterranean world for centuries after Augustus became its "
    "first emperor, and its law and language shaped Europe long after its fall.",
]


# --- encoder ---------------------------------------------------------------------------------
def test_index_text_is_title_newline_text():
    doc = Document(doc_id="d", title="Paris", text="Capital of France.")
    assert index_text(doc) == "Paris\nCapital of France."


def test_encode_returns_unit_float32_rows(encoder):
    vectors = encoder.encode(TEXTS)
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(TEXTS), encoder.dim) == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_empty_list_has_shape_zero_by_dim(encoder):
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_encode_is_deterministic(encoder):
    np.testing.assert_array_equal(encoder.encode(TEXTS), encoder.encode(TEXTS))


def test_length_sorted_batching_keeps_the_input_order(encoder):
    # batch_size 4 over 7 texts of very different lengths: batches mix positions, and padding
    # differs from one-by-one encoding, which must not change any row.
    assert encoder.batch_size < len(TEXTS)
    batched = encoder.encode(TEXTS)
    single = np.stack([encoder.encode([text])[0] for text in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert not np.allclose(batched[0], batched[1], atol=1e-2)


def test_encode_truncates_to_max_length(encoder):
    long = "word " * 2_000  # far beyond max_length=128 tokens
    head = " ".join(["word"] * 126)  # 126 words + [CLS] + [SEP] = 128 tokens
    np.testing.assert_allclose(encoder.encode([long]), encoder.encode([head]), atol=1e-5)


def test_similar_meaning_scores_higher(encoder):
    query, near, far = encoder.encode(
        ["What is the capital of Japan?", "Tokyo is the capital of Japan.", "Bread is baked."]
    )
    assert float(query @ near) > float(query @ far) + 0.3


@pytest.mark.parametrize(("batch_size", "max_length"), [(0, 128), (4, 1)])
def test_encoder_refuses_bad_sizes(encoder, batch_size, max_length):
    with pytest.raises(ValueError, match="has to be"):
        Encoder(encoder.tokenizer, encoder.model, batch_size, max_length)


# --- dense index -----------------------------------------------------------------------------
def unit(rows: list[list[float]]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def docs(*ids: str) -> list[Document]:
    return [Document(doc_id=i, title=f"title {i}", text=f"text {i}", topic="t") for i in ids]


@pytest.mark.integration
def test_index_upsert_search_count_delete(milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=3)
    assert index.count() == 0
    assert index.search(unit([[1, 0, 0]])[0], 5) == []

    index.upsert(docs("a", "b", "c"), unit([[1, 0, 0], [0, 1, 0], [1, 1, 0]]))
    index.flush()
    assert index.count() == 3
    hits = index.search(unit([[1, 0.1, 0]])[0], 2)
    assert [h.doc_id for h in hits] == ["a", "c"]
    assert hits[0].title == "title a" and hits[0].text == "text a"
    assert hits[0].score == pytest.approx(float(unit([[1, 0.1, 0]])[0] @ unit([[1, 0, 0]])[0]),
                                          abs=1e-5)

    index.delete(["a", "not-there"])
    index.flush()
    assert index.count() == 2
    assert [h.doc_id for h in index.search(unit([[1, 0, 0]])[0], 5)] == ["c", "b"]


@pytest.mark.integration
def test_index_upsert_replaces_by_doc_id(milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    index.upsert(docs("a"), unit([[1, 0]]))
    index.upsert([Document(doc_id="a", title="new", text="new text")], unit([[0, 1]]))
    index.flush()
    assert index.count() == 1
    [hit] = index.search(unit([[0, 1]])[0], 5)
    assert (hit.doc_id, hit.title, hit.text) == ("a", "new", "new text")
    assert hit.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.integration
def test_index_equal_scores_are_ordered_by_doc_id(milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    index.upsert(docs("z", "m", "a", "q"), unit([[1, 0]] * 3 + [[0, 1]]))
    index.flush()
    assert [h.doc_id for h in index.search(unit([[1, 0]])[0], 2)] == ["a", "m"]
    assert [h.doc_id for h in index.search(unit([[1, 0]])[0], 10)] == ["a", "m", "z", "q"]


@pytest.mark.integration
def test_index_reopened_keeps_its_rows(milvus_uri, milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    index.upsert(docs("a", "b"), unit([[1, 0], [0, 1]]))
    index.flush()
    milvus_client.release_collection(collection)  # what a server restart leaves behind

    reopened = DenseIndex(MilvusClient(uri=milvus_uri), collection, dim=2)
    assert reopened.count() == 2
    assert reopened.search(unit([[0, 1]])[0], 1)[0].doc_id == "b"


@pytest.mark.integration
def test_index_refuses_another_dimension(milvus_client, collection):
    DenseIndex(milvus_client, collection, dim=2)
    with pytest.raises(ValueError, match="holds 2-d vectors but the encoder makes 3-d"):
        DenseIndex(milvus_client, collection, dim=3)


@pytest.mark.integration
def test_index_refuses_vectors_of_the_wrong_shape(milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        index.upsert(docs("a", "b"), unit([[1, 0, 0], [0, 1, 0]]))
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        index.search(np.ones(3, dtype=np.float32), 1)


@pytest.mark.integration
def test_index_cuts_fields_to_the_collection_byte_limits(milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    title = "é" * MAX_TITLE  # 2 bytes a character: twice the limit
    index.upsert([Document(doc_id="a", title=title, text="t")], unit([[1, 0]]))
    [hit] = index.search(unit([[1, 0]])[0], 1)
    assert hit.title == "é" * (MAX_TITLE // 2)


# --- embedding service -----------------------------------------------------------------------
@pytest.fixture
def dense(encoder, milvus_client, collection) -> EmbeddingService:
    return EmbeddingService(encoder, DenseIndex(milvus_client, collection, encoder.dim))


@pytest.mark.integration
def test_service_finds_the_obvious_document(dense, corpus):
    dense.ingest(IngestBatch(documents=corpus))
    result = dense.search(SearchRequest(query="Which city is the capital of Japan?", top_k=3))
    assert result.hits[0].doc_id == "geo-tokyo"
    assert result.count == len(corpus)


@pytest.mark.integration
def test_service_double_ingest_keeps_one_row_per_doc(dense, corpus):
    batch = IngestBatch(documents=corpus)
    dense.ingest(batch)
    first = dense.search(SearchRequest(query="lava", top_k=3))
    dense.ingest(batch)
    assert dense.count() == len(corpus)
    again = dense.search(SearchRequest(query="lava", top_k=3))
    assert [h.doc_id for h in again.hits] == [h.doc_id for h in first.hits]
    assert again.hits[0].doc_id == "sci-volcano"


@pytest.mark.integration
def test_service_delete(dense, corpus):
    dense.ingest(IngestBatch(documents=corpus))
    dense.delete(["geo-tokyo"])
    result = dense.search(SearchRequest(query="capital of Japan", top_k=20))
    assert "geo-tokyo" not in [h.doc_id for h in result.hits]
    assert result.count == len(corpus) - 1


@pytest.mark.integration
def test_service_from_settings(tmp_path, milvus_uri, collection, corpus):
    settings = Settings(home=tmp_path, milvus={"collection": collection})
    service = EmbeddingService.from_settings(settings, milvus_uri)
    assert service.index.collection == collection and service.encoder.dim == 384
    service.ingest(IngestBatch(documents=corpus[:2]))
    assert service.count() == 2


# --- the retriever contract: every retriever service keeps it --------------------------------
@pytest.fixture(params=["dense", "sparse"])
def retriever(request, tmp_path):
    if request.param == "dense":
        return request.getfixturevalue("dense")
    return SparseService(tmp_path / "sparse")


QUERIES = ["capital city", "largest animal in the sea", "lava and ash", "string instrument"]


@pytest.mark.integration
def test_contract_empty_index_gives_no_hits(retriever):
    result = retriever.search(SearchRequest(query="capital city", top_k=5))
    assert result.hits == [] and result.count == 0


@pytest.mark.integration
def test_contract_top_k_beyond_the_corpus(retriever, corpus):
    retriever.ingest(IngestBatch(documents=corpus))
    result = retriever.search(SearchRequest(query="capital city of France", top_k=1_000))
    ids = [h.doc_id for h in result.hits]
    assert result.count == len(corpus)
    assert 1 <= len(ids) <= len(corpus) and len(set(ids)) == len(ids)
    assert set(ids) <= {d.doc_id for d in corpus}
    assert ids[0] == "geo-paris"


@pytest.mark.integration
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
        assert hits == sorted(hits, key=lambda h: (-h.score, h.doc_id)), query
    hits = retriever.search(SearchRequest(query="krill crustaceans", top_k=2)).hits
    assert [h.doc_id for h in hits] == ["a1", "z2"]
    assert hits[0].score == hits[1].score


@pytest.mark.integration
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
