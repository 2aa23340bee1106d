"""The retrieval harness: metrics by hand, the BEIR loader and its errors, the split seed of
the packaged sets, a tiny full run; and bench/retrieval.py's vector cache and hybrid part."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from services.evaluation.retrieval import (
    DEFAULT_SPLIT_SEED,
    METRICS,
    RetrievalSet,
    corpus_embeddings,
    dense_search,
    embedding_fingerprint,
    evaluate,
    load_beir,
    load_dataset,
    load_packaged,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    score_ranking,
    split_seed_for,
    tuning_split,
)
from services.ranker.fusion import MODES, WEIGHT_GRID
from shared import datasets
from shared.models.encoder import Encoder
from shared.schemas import Document, IngestBatch, ModelVersion, titled_text

BENCH = Path(__file__).resolve().parents[2] / "bench"


# --- metrics ------------------------------------------------------------------------------
def test_recall_by_hand():
    ranking = ["x", "a", "y", "b"]
    qrels = {"a": 1, "b": 1, "c": 1}
    assert recall_at_k(ranking, qrels, 1) == 0.0
    assert recall_at_k(ranking, qrels, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, qrels, 5) == pytest.approx(2 / 3)  # c never retrieved
    assert recall_at_k(["c", "b", "a"], qrels, 3) == 1.0


def test_mrr_by_hand():
    assert mrr_at_k(["x", "a", "b"], {"a": 1, "b": 1}) == 0.5
    assert mrr_at_k(["a"], {"a": 1}) == 1.0
    assert mrr_at_k([f"x{i}" for i in range(10)] + ["a"], {"a": 1}) == 0.0  # rank 11
    assert mrr_at_k(["x", "y", "a"], {"a": 1}, k=2) == 0.0


def test_ndcg_binary_by_hand():
    # relevant at ranks 2 and 4 of 3 relevant: DCG = 1/log2(3) + 1/log2(5);
    # ideal = 1 + 1/log2(3) + 1/log2(4)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / 2
    assert ndcg_at_k(["x", "a", "y", "b"], {"a": 1, "b": 1, "c": 1}) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "b"], {"a": 1, "b": 1}) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], {"a": 1}) == 0.0


def test_ndcg_graded_by_hand():
    # b (grade 1) before a (grade 2): DCG = 1 + 2/log2(3); ideal = 2 + 1/log2(3)
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert ndcg_at_k(["b", "a"], {"a": 2, "b": 1}) == pytest.approx(expected)
    assert ndcg_at_k(["a", "b"], {"a": 2, "b": 1}) == pytest.approx(1.0)


def test_grade_zero_is_not_relevant():
    qrels = {"a": 0, "b": 1}
    assert recall_at_k(["a", "b"], qrels, 1) == 0.0
    assert mrr_at_k(["a", "b"], qrels) == 0.5
    assert ndcg_at_k(["a", "b"], qrels) == pytest.approx(1 / math.log2(3))


def test_repeated_ids_count_once_at_their_first_rank():
    # counted twice, ["a", "a", "b"] gave nDCG 1.31
    qrels = {"a": 1, "b": 1}
    assert ndcg_at_k(["a", "a", "b"], qrels) == pytest.approx(1.0)
    assert ndcg_at_k(["a", "a", "a", "a"], {"a": 2, "b": 1}) <= 1.0
    # every metric ranks the deduplicated list: b is second, not third
    assert ndcg_at_k(["x", "x", "b"], qrels) == pytest.approx(ndcg_at_k(["x", "b"], qrels))
    assert mrr_at_k(["x", "x", "b"], qrels) == 0.5
    assert recall_at_k(["a", "a", "b"], qrels, 2) == 1.0
    assert score_ranking(["a", "a", "b"], qrels) == score_ranking(["a", "b"], qrels)


def test_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="`k` has to be a positive integer, but is 0"):
        recall_at_k(["a"], {"a": 1}, 0)
    with pytest.raises(ValueError, match="no relevant document"):
        ndcg_at_k(["a"], {"a": 0})


# --- BEIR layout --------------------------------------------------------------------------
def write_beir(folder, corpus=None, queries=None, qrels=None):
    corpus = corpus if corpus is not None else [
        {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
        {"_id": "d2", "title": "", "text": "Berlin is the capital of Germany."},
        {"_id": "d3", "title": "Bread", "text": "Bread is baked from flour and water."},
        {"_id": "d4", "title": "Violin", "text": "The violin is a string instrument."},
    ]
    queries = queries if queries is not None else [
        {"_id": "q1", "text": "capital of France"},
        {"_id": "q2", "text": "German capital city"},
        {"_id": "q3", "text": "how is bread made"},
        {"_id": "q4", "text": "a query judged not relevant only"},
    ]
    qrels = qrels if qrels is not None else {
        "test": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td1\t1\nq4\td4\t0\n",
        "dev": "query-id\tcorpus-id\tscore\nq3\td3\t1\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    for split, text in qrels.items():
        (folder / "qrels" / f"{split}.tsv").write_text(text)
    return folder


def test_beir_loader_reads_the_layout(tmp_path):
    folder = write_beir(tmp_path / "tiny")
    sets = load_beir(folder, ["test", "dev"])
    test, dev = sets["test"], sets["dev"]
    assert test.corpus is dev.corpus
    assert [d.doc_id for d in test.corpus] == ["d1", "d2", "d3", "d4"]
    assert test.corpus[1].title == "d2"  # no title: the id stands in
    assert test.queries == {"q1": "capital of France", "q2": "German capital city"}  # q4: 0 only
    assert test.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d1": 1}}
    assert (test.name, test.split, dev.split) == ("tiny", "test", "dev")
    assert dev.qrels == {"q3": {"d3": 1}}


def test_beir_limit_corpus_drops_judgements_outside_it(tmp_path):
    sets = load_beir(write_beir(tmp_path / "tiny"), ["test"], limit_corpus=1)
    assert [d.doc_id for d in sets["test"].corpus] == ["d1"]
    assert sets["test"].qrels == {"q1": {"d1": 1}, "q2": {"d1": 1}}


def test_beir_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_beir(tmp_path / "nowhere", ["test"])
    folder = write_beir(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match=r"qrels/train\.tsv: no such file; "
                                                r"qrels present for: dev, test"):
        load_beir(folder, ["train"])
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"corpus\.jsonl: no such file"):
        load_beir(folder, ["test"])


@pytest.mark.parametrize(("file", "content", "message"), [
    ("corpus.jsonl", '{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n',
     r"corpus\.jsonl:2: not valid JSON"),
    ("corpus.jsonl", '{"title": "t", "text": "no id"}\n', r"corpus\.jsonl:1: missing field '_id'"),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n\n{"_id": "d1", "text": "b"}\n',
     r"corpus\.jsonl:3: _id 'd1' repeats"),
    ("corpus.jsonl", '{"_id": "d1", "title": "", "text": " "}\n',
     r"corpus\.jsonl:1: both title and text are empty"),
    ("corpus.jsonl", '["d1", "text"]\n', r"corpus\.jsonl:1: expected a JSON object"),
    ("queries.jsonl", '{"_id": "q1", "text": ""}\n', r"queries\.jsonl:1: query 'q1' has an empty"),
    ("qrels/test.tsv", "qid\tdoc\tscore\nq1\td1\t1\n", r"test\.tsv:1: expected the header"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1 d1 1\n",
     r"test\.tsv:2: expected 3 tab-separated fields"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n",
     r"test\.tsv:2: score 'high' is not an integer"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td1\t1\n",
     r"test\.tsv:3: query-id 'q9' is not in queries\.jsonl"),
])
def test_beir_malformed_lines_name_file_and_line(tmp_path, file, content, message):
    folder = write_beir(tmp_path / "tiny")
    (folder / file).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_beir(folder, ["test"])


def test_tuning_split_never_is_the_reported_one():
    assert tuning_split("test", datasets.SPLITS) == "dev"
    assert tuning_split("dev", datasets.SPLITS) == "train"
    assert tuning_split("test", ["test", "train"]) == "train"
    assert tuning_split("test", ["test"]) is None


def test_load_dataset_picks_packaged_or_beir(tmp_path):
    with pytest.raises(ValueError,
                       match="unknown data set .squad.: use one of fanout, capitals, packaged"):
        load_dataset("squad", "test")
    test, tune = load_dataset(str(write_beir(tmp_path / "tiny")), "test")
    assert (test.split, tune.split) == ("test", "dev")
    test, tune = load_dataset(str(tmp_path / "tiny"), "dev")
    assert tune is None  # no train qrels: nothing to tune on but dev itself
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_dataset("fanout", "valid")


def test_packaged_sets_follow_the_shared_splits():
    sets = load_packaged("fanout", ["dev", "test"])
    for split in ("dev", "test"):
        items = datasets.load_split("fanout", split)
        assert list(sets[split].queries) == [item.id for item in items]
        assert all(sets[split].qrels[i.id] == {i.doc_ids[0]: 1} for i in items)
    assert not set(sets["dev"].queries) & set(sets["test"].queries)
    capitals = load_packaged("capitals", ["test"])["test"]
    assert capitals.queries and all(q.startswith("What is the capital of ")
                                    for q in capitals.queries.values())
    both = load_packaged("packaged", ["test"])["test"]
    assert both.queries == {**sets["test"].queries, **capitals.queries}


def test_packaged_sets_are_split_with_the_seed_asked_for():
    test, tune = load_dataset("fanout", "test", seed=7)
    assert list(test.queries) == [i.id for i in datasets.load_split("fanout", "test", seed=7)]
    assert (test.split_seed, tune.split_seed, tune.split) == (7, 7, "dev")
    default, _ = load_dataset("fanout", "test")
    assert default.split_seed == DEFAULT_SPLIT_SEED == 13
    assert list(default.queries) == [i.id for i in datasets.load_split("fanout", "test")]
    assert set(test.queries) != set(default.queries)


def _version(kind: str, name: str, split_seed: int | None) -> ModelVersion:
    return ModelVersion(kind=kind, version=name, path=f"{kind}/{name}", created=0.0,
                        split_seed=split_seed)


def test_the_split_seed_is_the_evaluated_versions_and_a_mismatch_is_refused():
    generator = _version("generator", "v0003", 7)
    retriever = _version("retriever", "v0002", 13)
    soup = _version("generator", "v0004", None)  # no job trained it
    assert split_seed_for([]) == split_seed_for([None, soup]) == DEFAULT_SPLIT_SEED
    assert split_seed_for([generator, None, soup]) == 7
    assert split_seed_for([generator, _version("retriever", "v0001", 7)]) == 7
    assert split_seed_for([None], seed=5) == 5
    assert split_seed_for([generator], seed=7) == 7
    with pytest.raises(ValueError, match=r"^generator v0003 was trained on split seed 7 and "
                                         r"retriever v0002 on 13: either seed's test split "
                                         r"would contain the other version's training"):
        split_seed_for([generator, None, retriever])
    with pytest.raises(ValueError, match=r"^--seed 13 differs from the seed 7 that generator "
                                         r"v0003 was trained on: the seed-13 test split would "
                                         r"contain generator v0003's training questions "
                                         r"\(leave --seed out to use 7\)$"):
        split_seed_for([generator, None], seed=13)


def test_retrieval_set_refuses_queries_without_relevant_documents():
    with pytest.raises(ValueError, match="query 'q1' has no relevant document"):
        RetrievalSet(name="x", split="test", corpus=[], queries={"q1": "?"},
                     qrels={"q1": {"d": 0}})
    with pytest.raises(ValueError, match="different query ids"):
        RetrievalSet(name="x", split="test", corpus=[], queries={"q1": "?"}, qrels={})


# --- retrieval ----------------------------------------------------------------------------
def test_dense_search_is_exact_and_breaks_ties_by_id():
    docs = [Document(doc_id=i, title=i, text=i) for i in ("c", "a", "b")]
    doc_vectors = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]], dtype=np.float32)
    [hits] = dense_search(np.array([[0.0, 1.0]], dtype=np.float32), doc_vectors, docs, 2)
    assert [h.doc_id for h in hits] == ["a", "b"]  # equal 0.8: ascending id, c (0.0) cut
    assert [h.score for h in hits] == pytest.approx([0.8, 0.8])


def tiny_sets() -> tuple[RetrievalSet, RetrievalSet]:
    """30 packaged documents; each query is the opening words of one document's text."""
    corpus = datasets.load_corpus(30)

    def make(split: str, docs: list[Document]) -> RetrievalSet:
        queries = {f"q-{d.doc_id}": " ".join(d.text.split()[:8]) for d in docs}
        return RetrievalSet(name="tiny", split=split, corpus=corpus, queries=queries,
                            qrels={f"q-{d.doc_id}": {d.doc_id: 1} for d in docs})

    return make("test", corpus[:6]), make("dev", corpus[10:16])


def test_evaluate_end_to_end_on_a_tiny_corpus(encoder, tmp_path):
    test, dev = tiny_sets()
    report = evaluate(test, dev, encoder, cache_dir=tmp_path / "cache", candidates=10,
                      progress=False)
    assert sorted(r.mode for r in report.results) == sorted(MODES)
    assert (report.queries, report.tuning_queries, report.documents) == (6, 6, 30)
    assert report.tuned_on == "dev"
    for r in report.results:
        assert set(r.metrics) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for v in r.metrics.values()), r
        assert set(r.per_query) == set(test.queries)
        if r.mode.startswith("weighted_"):
            assert r.weight in WEIGHT_GRID and len(r.tuning) == len(WEIGHT_GRID)
        else:
            assert r.weight is None and r.tuning is None
    by_mode = {r.mode: r for r in report.results}
    # The queries quote their document: both retrievers find it in their top 5.
    assert by_mode["dense"].metrics["recall@5"] == 1.0
    assert by_mode["sparse"].metrics["recall@5"] == 1.0
    assert by_mode["rrf"].k == 60
    table = report.table()
    assert all(m in table for m in MODES) and "weights tuned on dev (6 queries" in table
    json.dumps(report.to_json())  # serialisable as written by the CLI
    assert len(list((tmp_path / "cache").glob("embeddings-*.npy"))) == 1


def test_evaluate_without_a_tuning_set_keeps_weight_one_half(encoder):
    test, _ = tiny_sets()
    report = evaluate(test, None, encoder, cache_dir=None, candidates=10, progress=False)
    assert report.tuned_on is None and "weights not tuned" in report.table()
    assert {r.weight for r in report.results if r.mode.startswith("weighted_")} == {0.5}
    served = evaluate(test, None, encoder, cache_dir=None, candidates=10, progress=False,
                      prefer_weight=0.9)  # the CLI passes the serving weight
    assert {r.weight for r in served.results if r.mode.startswith("weighted_")} == {0.9}
    assert "weights not tuned (no tuning split): 0.9" in served.table()
    with pytest.raises(ValueError, match=r"`candidates` has to be at least 10 .*, but is 5"):
        evaluate(test, None, encoder, cache_dir=None, candidates=5)


def test_the_report_names_the_split_seed(encoder):
    test, _ = tiny_sets()
    seeded = evaluate(dataclasses.replace(test, split_seed=7), None, encoder, cache_dir=None,
                      candidates=10, progress=False)
    assert seeded.split_seed == 7 and seeded.to_json()["split_seed"] == 7
    assert seeded.table().startswith("tiny / test (split seed 7): 6 queries")
    unseeded = evaluate(test, None, encoder, cache_dir=None, candidates=10, progress=False)
    assert unseeded.split_seed is None and unseeded.table().startswith("tiny / test: 6 queries")


def test_corpus_embeddings_are_cached_by_content(encoder, tmp_path, monkeypatch):
    docs = datasets.load_corpus(5)
    first = corpus_embeddings(encoder, docs, tmp_path, progress=False)
    assert first.shape == (5, encoder.dim) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)

    def refuse(texts):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(encoder, "encode", refuse)
    assert np.array_equal(corpus_embeddings(encoder, docs, tmp_path, progress=False), first)
    changed = [docs[0].model_copy(update={"text": "Something else entirely."}), *docs[1:]]
    with pytest.raises(AssertionError, match="encoded again"):
        corpus_embeddings(encoder, changed, tmp_path, progress=False)  # new text: new key


def _cls_pooled(encoder: Encoder) -> Encoder:
    """The same weights and max_length as ``encoder``, pooled by the [CLS] token."""
    return Encoder(encoder.tokenizer, encoder.model, encoder.batch_size, encoder.max_length,
                   pooling="cls")


def test_corpus_embeddings_of_another_pooling_are_not_read_from_the_cache(encoder, tmp_path):
    docs = datasets.load_corpus(5)
    cls = _cls_pooled(encoder)
    assert embedding_fingerprint(cls, docs) != embedding_fingerprint(encoder, docs)
    mean = corpus_embeddings(encoder, docs, tmp_path, progress=False)
    pooled = corpus_embeddings(cls, docs, tmp_path, progress=False)
    assert not np.allclose(pooled, mean, atol=1e-3)
    texts = [titled_text(d.title, d.text) for d in docs]
    assert np.allclose(pooled, cls.encode(texts), atol=1e-5)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 2


# --- bench/retrieval.py --------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_retrieval():
    """bench/retrieval.py as a module (it imports bench/train_generator.py as a sibling)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_retrieval", BENCH / "retrieval.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    yield module
    sys.modules.pop(spec.name, None)


def test_bench_vector_cache_is_keyed_by_pooling(bench_retrieval, encoder, tmp_path):
    texts = [d.text for d in datasets.load_corpus(4)]
    mean = bench_retrieval.cached_vectors(texts, encoder, tmp_path)
    pooled = bench_retrieval.cached_vectors(texts, _cls_pooled(encoder), tmp_path)
    assert np.allclose(pooled, _cls_pooled(encoder).encode(texts), atol=1e-5)
    assert not np.allclose(pooled, mean, atol=1e-3)
    assert len(list(tmp_path.glob("vectors-*.npz"))) == 2


def test_bench_counts_are_refused_below_one(bench_retrieval, capsys):
    for option in ("--limit-queries", "--limit-corpus"):
        with pytest.raises(SystemExit):
            bench_retrieval.parser().parse_args([option, "0"])
        assert f"argument {option}: has to be 1 or more, not 0" in capsys.readouterr().err
    assert bench_retrieval.parser().parse_args(["--limit-queries", "3"]).limit_queries == 3


def test_bench_hybrid_part_times_a_run_of_few_queries(bench_retrieval, encoder, dense,
                                                      milvus_uri, collection, tmp_path):
    from services.sparse.service import SparseService
    from shared.settings import Settings

    docs = datasets.load_corpus(12)
    dense.ingest(IngestBatch(documents=docs))
    sparse = SparseService(tmp_path / "sparse")
    try:
        sparse.ingest(IngestBatch(documents=docs))
        queries = [" ".join(d.text.split()[:6]) for d in docs[:3]]  # fewer than the warm-up
        rows = bench_retrieval.bench_hybrid(sparse, encoder, milvus_uri, collection, queries,
                                            Settings(home=tmp_path / "home"), tmp_path)
    finally:
        sparse.close()
    by_path = {row["path"]: row for row in rows}
    assert by_path["Bus.request(ranker, retrieve)"]["same top-10"] == 1.0
    assert all(row["p50 ms"] > 0 for row in rows)
