"""The embedding service: encoder (real MiniLM) and dense index (real milvus-lite).

The contract both retrievers keep is in test_retriever_contract.py (it runs this service too).
"""

from __future__ import annotations

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from services.embedding.chunking import whole
from services.embedding.index import MAX_TITLE, DenseIndex, live_collection, milvus_filter
from services.embedding.service import EmbeddingService
from shared.models.encoder import Encoder
from shared.schemas import Document, Filters, IngestBatch, SearchRequest, titled_text
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
def test_titled_text_is_title_newline_text():
    assert titled_text("Paris", "Capital of France.") == "Paris\nCapital of France."


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

    index.upsert(whole(docs("a", "b", "c")), unit([[1, 0, 0], [0, 1, 0], [1, 1, 0]]))
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
    index.upsert(whole(docs("a")), unit([[1, 0]]))
    index.upsert(whole([Document(doc_id="a", title="new", text="new text")]), unit([[0, 1]]))
    index.flush()
    assert index.count() == 1
    [hit] = index.search(unit([[0, 1]])[0], 5)
    assert (hit.doc_id, hit.title, hit.text) == ("a", "new", "new text")
    assert hit.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.integration
def test_index_equal_scores_are_ordered_by_doc_id(milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    index.upsert(whole(docs("z", "m", "a", "q")), unit([[1, 0]] * 3 + [[0, 1]]))
    index.flush()
    assert [h.doc_id for h in index.search(unit([[1, 0]])[0], 2)] == ["a", "m"]
    assert [h.doc_id for h in index.search(unit([[1, 0]])[0], 10)] == ["a", "m", "z", "q"]


@pytest.mark.integration
def test_index_reopened_keeps_its_rows(milvus_uri, milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    index.upsert(whole(docs("a", "b")), unit([[1, 0], [0, 1]]))
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
        index.upsert(whole(docs("a", "b")), unit([[1, 0, 0], [0, 1, 0]]))
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        index.search(np.ones(3, dtype=np.float32), 1)


@pytest.mark.integration
def test_index_cuts_fields_to_the_collection_byte_limits(milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    title = "é" * MAX_TITLE  # 2 bytes a character: twice the limit
    index.upsert(whole([Document(doc_id="a", title=title, text="t")]), unit([[1, 0]]))
    [hit] = index.search(unit([[1, 0]])[0], 1)
    assert hit.title == "é" * (MAX_TITLE // 2)


def test_milvus_filter_expressions():
    assert milvus_filter(None) == milvus_filter(Filters()) == ""
    assert milvus_filter(Filters(topic=["Science", "Arts"])) == 'topic in ["Science", "Arts"]'
    assert milvus_filter(Filters(source=["wiki"], date_from="2020-01-01")) == (
        'source in ["wiki"] and date != "" and date >= "2020-01-01"')
    # An undated document is stored as "", which would pass "<=" without the != clause.
    assert milvus_filter(Filters(date_to="2020-12-31")) == 'date != "" and date <= "2020-12-31"'


def test_milvus_filter_escapes_what_could_end_a_literal():
    value = 'a"b\\c\nd\re\tf\''
    assert milvus_filter(Filters(topic=[value])) == 'topic in ["a\\"b\\\\c\\nd\\re\tf\'"]'


@pytest.mark.integration
def test_index_stores_source_and_date_and_filters_on_them(milvus_client, collection):
    index = DenseIndex(milvus_client, collection, dim=2)
    index.upsert(whole([Document(doc_id="a", title="A", text="a", topic="t", source="wiki",
                                 date="2020-01-01"),
                        Document(doc_id="b", title="B", text="b", topic="t", source="news"),
                        Document(doc_id="c", title="C", text="c", topic="u", source="wiki",
                                 date="2021-06-30")]),
                 unit([[1, 0], [1, 0.1], [1, 0.2]]))
    rows = milvus_client.query(collection, filter="",
                               output_fields=["doc_id", "source", "date"])
    assert {r["doc_id"]: (r["source"], r["date"]) for r in rows} == {
        "a": ("wiki", "2020-01-01"), "b": ("news", ""), "c": ("wiki", "2021-06-30")}
    query = unit([[1, 0]])[0]

    def ids(**filters) -> list[str]:
        return [h.doc_id for h in index.search(query, 5, Filters(**filters))]

    assert ids() == ["a", "b", "c"]
    assert ids(source=["wiki"]) == ["a", "c"]
    assert ids(topic=["t"], source=["wiki", "news"]) == ["a", "b"]
    assert ids(date_to="2020-01-01") == ["a"]  # inclusive; undated b never matches
    assert ids(date_from="2020-01-02", date_to="2021-06-30") == ["c"]
    assert ids(topic=["nope"]) == []


@pytest.mark.integration
def test_index_refuses_a_collection_from_before_filters(milvus_client, collection):
    # The first release's schema: no source, no date (milvus-lite cannot add fields later).
    schema = milvus_client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("doc_id", DataType.VARCHAR, is_primary=True, max_length=256)
    for name in ("title", "text", "topic"):
        schema.add_field(name, DataType.VARCHAR, max_length=256)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
    milvus_client.create_collection(collection, schema=schema)
    with pytest.raises(ValueError, match=r"no 'passage_id', 'n', 'start', 'end', 'source', "
                                         r"'date' field: it was made by an older "
                                         r"ragtune.*drop_collection"):
        DenseIndex(milvus_client, collection, dim=2)


# --- embedding service -----------------------------------------------------------------------
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


@pytest.mark.integration
def test_a_restart_serves_the_live_collection_with_every_write(tmp_path, milvus_uri,
                                                               milvus_client, collection,
                                                               corpus, encoder):
    """A replica that starts after a both-encoders version was promoted serves that version's
    collection as it is (documents ingested there since), not a copy of the base one; one
    that starts after a promotion it never applied builds the collection from the live one."""
    import json

    from shared.registry import Registry

    settings = Settings(home=tmp_path, milvus={"collection": collection})
    registry = Registry(settings.checkpoint_dir)
    versions = []
    for seed in (5, 6):
        folder = tmp_path / f"both{seed}"
        other = perturbed(encoder, seed=seed)
        other.model.save_pretrained(folder)
        other.tokenizer.save_pretrained(folder)
        (folder / "ragtune.json").write_text(json.dumps({"reindex": True}))
        versions.append(registry.register("retriever", folder))
    try:
        first = EmbeddingService.from_settings(settings, milvus_uri)
        assert live_collection(milvus_client, collection) == collection
        first.ingest(IngestBatch(documents=corpus))
        registry.promote("retriever", versions[0].version)
        first.serve_version(versions[0], registry, settings)
        first.ingest(IngestBatch(documents=[Document(doc_id="new", title="Jade", text="x")]))

        restarted = EmbeddingService.from_settings(settings, milvus_uri)
        assert restarted.index.collection == f"{collection}_v0001"
        assert restarted.count() == len(corpus) + 1
        assert milvus_client.has_collection(collection)  # the rollback target stays

        registry.promote("retriever", versions[1].version)  # no replica applied it
        late = EmbeddingService.from_settings(settings, milvus_uri)
        assert late.index.collection == f"{collection}_v0002"
        assert live_collection(milvus_client, collection) == f"{collection}_v0002"
        assert late.count() == len(corpus) + 1
        hits = late.search(SearchRequest(query="capital of Japan", top_k=1)).hits
        assert hits[0].doc_id == "geo-tokyo"
    finally:
        for name in (f"{collection}_v0001", f"{collection}_v0002"):
            if milvus_client.has_collection(name):
                milvus_client.drop_collection(name)


@pytest.mark.integration
def test_long_documents_are_split_into_passages_with_offsets(milvus_client, collection,
                                                             encoder):
    text = ("The harbour of Velmora is small. " * 20 + "The lighthouse keeper is named "
            "Orsolya Brandt. " + "Fishing boats leave at dawn. " * 20)
    service = EmbeddingService(encoder, DenseIndex(milvus_client, collection, encoder.dim),
                               chunk_chars=300, chunk_overlap=60)
    service.ingest(IngestBatch(documents=[Document(doc_id="long", title="Velmora", text=text),
                                          Document(doc_id="short", title="Other",
                                                   text="Unrelated words.")]))
    rows = milvus_client.query(collection, filter='doc_id == "long"',
                               output_fields=["passage_id", "start", "end", "text"])
    assert len(rows) > 3 and all(r["text"] == text[r["start"]:r["end"]] for r in rows)
    assert service.count() == 2  # documents, not passages
    hit = service.search(SearchRequest(query="Who keeps the lighthouse?", top_k=5)).hits[0]
    assert hit.doc_id == "long" and "Orsolya Brandt" in hit.text
    assert text[hit.start:hit.end] == hit.text
    # a shorter new version leaves no stale passage behind; delete removes every passage
    service.ingest(IngestBatch(documents=[Document(doc_id="long", title="Velmora",
                                                   text="Now short.")]))
    assert len(milvus_client.query(collection, filter='doc_id == "long"',
                                   output_fields=["passage_id"])) == 1
    service.delete(["long"])
    assert milvus_client.query(collection, filter='doc_id == "long"',
                               output_fields=["passage_id"]) == []


@pytest.mark.integration
def test_whole_document_vectors_are_those_of_unchanged_one_passage_documents(
        milvus_client, collection, encoder, corpus):
    service = EmbeddingService(encoder, DenseIndex(milvus_client, collection, encoder.dim),
                               chunk_chars=300, chunk_overlap=60)
    long = Document(doc_id="long", title="Velmora", text="The harbour of Velmora is small. " * 20)
    service.ingest(IngestBatch(documents=[*corpus[:3], long]))
    changed = corpus[1].model_copy(update={"text": "Tokyo is very large."})
    asked = [corpus[0], changed, corpus[2], long, corpus[3]]  # corpus[3] was never indexed
    got = service.index.whole_document_vectors(asked)
    assert set(got) == {corpus[0].doc_id, corpus[2].doc_id}
    expected = encoder.encode([titled_text(corpus[2].title, corpus[2].text)])[0]
    np.testing.assert_allclose(got[corpus[2].doc_id], expected, atol=1e-5)


@pytest.mark.integration
def test_a_job_takes_the_corpus_vectors_the_serving_collection_holds(
        tmp_path, milvus_uri, milvus_client, collection, encoder, corpus, caplog):
    from services.trainer.jobs import corpus_vectors

    # stored vectors unlike the encoder's show that they are taken, not encoded again
    stored = np.random.default_rng(0).normal(size=(3, encoder.dim)).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    index = DenseIndex(milvus_client, collection, encoder.dim)
    index.upsert(whole(corpus[:3]), stored)
    encoded = encoder.encode([titled_text(doc.title, doc.text) for doc in corpus])
    settings = Settings(home=tmp_path / "up", milvus={"uri": milvus_uri,
                                                      "collection": collection})
    vectors = corpus_vectors(settings, encoder, None, corpus, progress=False)
    np.testing.assert_array_equal(vectors[:3], stored)
    np.testing.assert_allclose(vectors[3:], encoded[3:], atol=1e-5)
    index.delete([doc.doc_id for doc in corpus[:3]])  # the cache answers from now on
    np.testing.assert_array_equal(corpus_vectors(settings, encoder, None, corpus), vectors)
    # a local job (no Milvus), or a collection that cannot be read (another dimension, with a
    # warning): every document encoded
    local = Settings(home=tmp_path / "local")
    np.testing.assert_allclose(corpus_vectors(local, encoder, None, corpus), encoded, atol=1e-5)
    other = f"{collection}_8d"
    DenseIndex(milvus_client, other, 8)
    try:
        unreadable = Settings(home=tmp_path / "other", milvus={"uri": milvus_uri,
                                                               "collection": other})
        np.testing.assert_allclose(corpus_vectors(unreadable, encoder, None, corpus), encoded,
                                   atol=1e-5)
        assert f"could not read the passage vectors of Milvus collection '{other}'" in caplog.text
    finally:
        milvus_client.drop_collection(other)


# --- model versions ----------------------------------------------------------------------------
def perturbed(encoder: Encoder, seed: int = 0) -> Encoder:
    """Another encoder of the same dimension: MiniLM with noise on its word embeddings."""
    import copy

    import torch

    model = copy.deepcopy(encoder.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weights = model.embeddings.word_embeddings.weight
        weights.add_(0.02 * torch.randn(weights.shape, generator=generator))
    return Encoder(encoder.tokenizer, model, encoder.batch_size, encoder.max_length)


@pytest.mark.integration
def test_query_encoder_swap_keeps_passage_vectors(dense, corpus, encoder):
    dense.ingest(IngestBatch(documents=corpus))
    before = dense.index.client.query(dense.index.collection, filter='doc_id == "geo-paris"',
                                      output_fields=["vector"])[0]["vector"]
    other = perturbed(encoder)
    in_flight = dense.active
    dense.use_query_encoder(other)
    assert dense.active.query_encoder is other and dense.encoder is encoder
    assert in_flight.query_encoder is encoder  # a search that started keeps the old version
    hits = dense.search(SearchRequest(query="capital of France", top_k=1)).hits
    assert hits[0].doc_id == "geo-paris"
    after = dense.index.client.query(dense.index.collection, filter='doc_id == "geo-paris"',
                                     output_fields=["vector"])[0]["vector"]
    np.testing.assert_array_equal(before, after)


@pytest.mark.integration
def test_reindex_builds_a_new_collection_then_serves_from_it(dense, corpus, encoder,
                                                             milvus_client, collection):
    dense.ingest(IngestBatch(documents=corpus))
    other = perturbed(encoder, seed=1)
    new_name = f"{collection}_v2"
    try:
        old = dense.reindex(other, new_name, batch_size=3)
        assert old.collection == collection and milvus_client.has_collection(collection)
        assert dense.index.collection == new_name and dense.encoder is other
        assert dense.count() == len(corpus)
        row = milvus_client.query(new_name, filter='doc_id == "geo-paris"',
                                  output_fields=["vector", "text", "topic"])[0]
        assert row["topic"] == "Geography" and "Seine" in row["text"]
        expected = other.encode(["Paris\n" + row["text"]])[0]
        np.testing.assert_allclose(row["vector"], expected, atol=1e-5)
        hits = dense.search(SearchRequest(query="largest animal", top_k=1)).hits
        assert hits[0].doc_id == "bio-whale"
        dense.ingest(IngestBatch(documents=[Document(doc_id="new", title="New", text="x")]))
        assert dense.count() == len(corpus) + 1  # ingests now go to the new collection
        with pytest.raises(ValueError, match="in use"):
            dense.reindex(other, new_name)
    finally:
        if milvus_client.has_collection(new_name):
            milvus_client.drop_collection(new_name)


@pytest.mark.integration
def test_serve_version_swaps_query_side_or_reindexes_by_the_registry(
        dense, corpus, encoder, milvus_client, collection, tmp_path):
    import json

    from shared.registry import Registry

    dense.ingest(IngestBatch(documents=corpus))
    registry = Registry(tmp_path / "ckpt")
    versions = {}
    for name, reindex in (("query", False), ("both", True)):
        folder = tmp_path / name
        other = perturbed(encoder, seed=len(versions) + 2)
        other.model.save_pretrained(folder)
        other.tokenizer.save_pretrained(folder)
        (folder / "ragtune.json").write_text(json.dumps({"reindex": reindex}))
        versions[name] = registry.register("retriever", folder)
    settings = Settings(home=tmp_path, milvus={"collection": collection})
    try:
        dense.serve_version(versions["query"], registry, settings)
        assert dense.index.collection == collection and dense.encoder is encoder
        assert dense.active.query_encoder is not encoder
        dense.serve_version(versions["both"], registry, settings)
        assert dense.index.collection == f"{collection}_v0002"
        assert dense.count() == len(corpus)
        hits = dense.search(SearchRequest(query="capital of Japan", top_k=1)).hits
        assert hits[0].doc_id == "geo-tokyo"
        # Written after the swap: the base collection misses both, so a rollback rebuilds it
        # from the live one instead of serving it as it was (same count, other documents).
        dense.ingest(IngestBatch(documents=[Document(doc_id="new", title="Jade", text="x")]))
        dense.delete(["geo-paris"])
        assert live_collection(milvus_client, collection) == f"{collection}_v0002"
        dense.serve_version(None, registry, settings)  # roll back: the base collection again
        assert dense.index.collection == collection and dense.count() == len(corpus)
        assert live_collection(milvus_client, collection) == collection
        ids = {r["doc_id"] for r in milvus_client.query(collection, filter="n == 0",
                                                        output_fields=["doc_id"])}
        assert "new" in ids and "geo-paris" not in ids
        assert dense.drop_unused(registry, settings) == []  # v0002 may serve again
        assert registry.prune("retriever", keep=0)[0] == [versions["query"], versions["both"]]
        assert dense.drop_unused(registry, settings) == [f"{collection}_v0002"]
        assert not milvus_client.has_collection(f"{collection}_v0002")
        assert milvus_client.has_collection(collection) and dense.count() == len(corpus)
    finally:
        if milvus_client.has_collection(f"{collection}_v0002"):
            milvus_client.drop_collection(f"{collection}_v0002")
