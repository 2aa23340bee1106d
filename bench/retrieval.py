"""Retrieval speed and fidelity, side by side in one process on the packaged corpus.

    python bench/retrieval.py [--limit-corpus N] [--limit-queries N] [--cache DIR]

Every part uses the same documents (the packaged 10,033 Wikipedia summaries; a document is
title + newline + extract) and the same queries (the FanOutQA sub-questions with evidence in
the corpus, then the 194 capital questions). One table per part:

a) BM25: ragtune's SparseService.search against bm25s and rank_bm25 (BM25Okapi) called
   directly. All three get the sparse service's tokenisation (services.sparse.tokenizer:
   NFKC, case- and accent-folded runs of word characters, its default English stop words)
   and k1=1.5, b=0.75. Queries are interleaved (each query goes through every engine, in
   rotating order) so load from other processes falls on all columns alike. "Equal scores"
   compares each top-10 with bm25s'. rank_bm25's IDF is log((N-n+.5)/(n+.5)) floored at
   0.25 x the mean IDF, not the Lucene log(1 + (N-n+.5)/(n+.5)) of bm25s: its scores differ
   by design.
b) Dense: DenseIndex (Milvus HNSW/COSINE on an embedded milvus-lite, flushed, searched only
   once latency has settled) top-10 latency and recall@10 against exact numpy cosine over
   the same vectors: per document (its best passage, as DenseIndex.search ranks) and, for an
   ef sweep of the raw client, per passage. Query encoding (one query per Encoder.encode
   call) is timed apart from search, with torch's default threads and with one thread.
c) Hybrid end to end: valkey + Embedding, Sparse and Ranker workers (deploy.workers, no Ray);
   ``Bus.request("ranker", "retrieve", ...)`` per query with the configured fusion mode and
   candidates, next to the same dense + sparse + fusion calls made in process, so the bus's
   share is visible.

Passage vectors are cached under --cache (default bench/results/cache) by encoder (model,
weights, max_length and pooling: services.evaluation.retrieval.encoder_fingerprint) and text.
The tables also go to bench/results/retrieval.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import torch
from pymilvus import MilvusClient
from rank_bm25 import BM25Okapi
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_generator as tg

from deploy.workers import WorkerThread, ranker_worker, retriever_worker
from services.embedding.chunking import Passage, passages
from services.embedding.index import DenseIndex
from services.embedding.service import EmbeddingService
from services.evaluation.retrieval import encoder_fingerprint
from services.ranker.fusion import fuse
from services.ranker.service import RankerService
from services.sparse.service import _STOPWORDS, SparseService  # the service's own stop words
from services.sparse.tokenizer import stopword_list
from services.sparse.tokenizer import tokenize as sparse_tokenize
from shared import keys
from shared.bus import Bus
from shared.datasets import load_capital_questions, load_corpus, load_fanout_subquestions
from shared.files import atomic_open
from shared.infra import start_milvus, start_valkey
from shared.models.encoder import Encoder
from shared.schemas import (
    Document,
    IngestBatch,
    RetrieveRequest,
    RetrieveResult,
    SearchRequest,
    SearchResult,
    titled_text,
)
from shared.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
TOP_K = 10
K1, B = 1.5, 0.75  # SparseSettings' defaults (bm25s')
SCORE_TOL = 1e-5  # float32 scores: equal within this
# Milvus HNSW search-time candidate list sizes to sweep (DenseIndex leaves ef to Milvus).
EF_SWEEP = (16, 32, 64, 128)
ENCODE_CHUNK = 256  # passages per Encoder.encode call while filling the vector cache
WARMUP_QUERIES = 5  # c) untimed first queries (fewer with few queries: half of them)


def log_step(message: str) -> None:
    print(f"[retrieval] {message}", file=sys.stderr, flush=True)


# --- small helpers ---------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_row(name: str, ms: list[float], **extra) -> dict:
    return {"path": name, "p50 ms": percentile(ms, .5), "p99 ms": percentile(ms, .99),
            "mean ms": statistics.mean(ms), **extra}


def timed(fn: Callable, *args):
    """(fn(*args), milliseconds it took)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - start) * 1000


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}" if value else "0"
    return str(value)


def print_table(title: str, rows: list[dict], notes: list[str] = ()) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(columns, widths, strict=True))))
    for r in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    for note in notes:
        print(f"  {note}")


def load_queries(limit: int | None) -> list[str]:
    """FanOutQA sub-questions (evidence in the full corpus), then the capital questions."""
    questions = [item.question for item in load_fanout_subquestions()]
    questions += [item.question for item in load_capital_questions()]
    return questions[:limit]


# --- a) BM25 ---------------------------------------------------------------------------------
Ranked = list[tuple[str, float]]  # (doc_id, score), best first, scores > 0
STOPWORDS = stopword_list(_STOPWORDS)


def tokenize(texts: list[str]) -> list[list[str]]:
    """The sparse service's tokenisation (documents and queries alike)."""
    return [sparse_tokenize(text, STOPWORDS) for text in texts]


def top_positive(scores: np.ndarray, doc_ids: list[str], k: int) -> Ranked:
    """Best k of a full score vector with score > 0; equal scores by position (= doc_id)."""
    matched = np.flatnonzero(scores > 0)
    order = matched[np.lexsort((matched, -scores[matched]))][:k]
    return [(doc_ids[i], float(scores[i])) for i in order]


@dataclass
class Engine:
    name: str
    search: Callable[[str], Ranked]
    build_s: float
    store_s: float | None = None


def sparse_engine(docs: list[Document], store: Path) -> tuple[Engine, SparseService]:
    """ragtune's SparseService: SQLite ingest (store), then the index build of the first search."""
    service = SparseService(store, k1=K1, b=B)
    start = time.perf_counter()
    for i in range(0, len(docs), 500):
        service.ingest(IngestBatch(documents=docs[i:i + 500]))
    stored = time.perf_counter()
    service.search(SearchRequest(query="build the index", top_k=1))
    built = time.perf_counter()

    def search(query: str) -> Ranked:
        result = service.search(SearchRequest(query=query, top_k=TOP_K))
        return [(hit.doc_id, hit.score) for hit in result.hits]

    return Engine("ragtune SparseService.search", search, built - stored, stored - start), service


def bm25s_engine(docs: list[Document]) -> Engine:
    doc_ids = [doc.doc_id for doc in docs]
    start = time.perf_counter()
    corpus = tokenize([titled_text(d.title, d.text) for d in docs])
    retriever = bm25s.BM25(k1=K1, b=B)
    retriever.index(corpus, show_progress=False)
    build_s = time.perf_counter() - start
    k = min(TOP_K, len(docs))

    def search(query: str) -> Ranked:
        found, scores = retriever.retrieve(tokenize([query]), k=k, show_progress=False)
        return [(doc_ids[i], float(s)) for i, s in zip(found[0], scores[0], strict=True)
                if s > 0]

    return Engine("bm25s BM25.retrieve", search, build_s)


def rank_bm25_engine(docs: list[Document]) -> Engine:
    doc_ids = [doc.doc_id for doc in docs]
    start = time.perf_counter()
    model = BM25Okapi(tokenize([titled_text(d.title, d.text) for d in docs]), k1=K1, b=B)
    build_s = time.perf_counter() - start

    def search(query: str) -> Ranked:
        return top_positive(model.get_scores(tokenize([query])[0]), doc_ids, TOP_K)

    return Engine("rank_bm25 BM25Okapi", search, build_s)


def agreement(ref: Ranked, other: Ranked) -> tuple[bool, bool, float]:
    """(identical ids in order, identical up to the order among equal scores, max |Δscore|).

    Up to ties: the scores agree rank by rank, and so do the ids scoring above the lowest
    score of the list (who fills the last places among equal scores is arbitrary). The score
    difference is taken rank by rank, so equal scores in another order cost nothing.
    """
    ids_ref, ids_other = [d for d, _ in ref], [d for d, _ in other]
    s_ref = np.array([s for _, s in ref])
    s_other = np.array([s for _, s in other])
    n = min(len(ref), len(other))
    diff = float(np.max(np.abs(s_ref[:n] - s_other[:n]), initial=0.0))
    if len(ref) != len(other):
        return False, False, diff
    if ids_ref == ids_other:
        return True, True, diff
    cut = float(s_ref.min()) if n else 0.0

    def above(ranked: Ranked) -> set[str]:
        return {d for d, s in ranked if s > cut + SCORE_TOL}

    return False, diff <= SCORE_TOL and above(ref) == above(other), diff


def bench_bm25(docs: list[Document], queries: list[str], store: Path) -> tuple[list[dict],
                                                                             SparseService]:
    log_step("a) building the three BM25 indexes")
    service_engine, service = sparse_engine(docs, store)
    engines = [service_engine, bm25s_engine(docs), rank_bm25_engine(docs)]
    for engine in engines:  # warm-up, untimed
        for query in queries[:5]:
            engine.search(query)
    ms: dict[str, list[float]] = {e.name: [] for e in engines}
    ranked: dict[str, list[Ranked]] = {e.name: [] for e in engines}
    for n, query in enumerate(tqdm(queries, desc="a) BM25 queries", unit="q")):
        for engine in engines[n % 3:] + engines[:n % 3]:
            out, took = timed(engine.search, query)
            ms[engine.name].append(took)
            ranked[engine.name].append(out)
    ref = engines[1].name
    ref_qps = 1000 * len(queries) / sum(ms[ref])
    rows = []
    for engine in engines:
        checks = [agreement(a, b) for a, b in zip(ranked[ref], ranked[engine.name], strict=True)]
        qps = 1000 * len(queries) / sum(ms[engine.name])
        rows.append({
            "engine": engine.name, "store s": engine.store_s, "build s": engine.build_s,
            "q/s": qps, "p50 ms": percentile(ms[engine.name], .5),
            "p99 ms": percentile(ms[engine.name], .99), "x bm25s q/s": qps / ref_qps,
            "top-10 identical": statistics.fmean(c[0] for c in checks),
            "same up to ties": statistics.fmean(c[1] for c in checks),
            "max |dscore|": max(c[2] for c in checks),
        })
    return rows, service


# --- b) dense --------------------------------------------------------------------------------
@dataclass
class DenseCorpus:
    """The rows of the dense index: the passages EmbeddingService.ingest cuts documents into.

    A document's passages are contiguous; ``starts[i]`` is the row of document i's first one.
    """

    parts: list[Passage]
    texts: list[str]  # what is embedded for each passage
    doc_ids: list[str]
    starts: np.ndarray

    @classmethod
    def of(cls, docs: list[Document], settings: Settings) -> DenseCorpus:
        size, overlap = settings.embedding.chunk_chars, settings.embedding.chunk_overlap
        parts = [p for doc in docs for p in passages(doc, size, overlap)]
        # As EmbeddingService.ingest embeds a passage: the title goes with every one.
        texts = [titled_text(p.doc.title, p.text) for p in parts]
        starts = np.flatnonzero([p.n == 0 for p in parts])
        return cls(parts, texts, [doc.doc_id for doc in docs], starts)

    def doc_scores(self, passage_scores: np.ndarray) -> np.ndarray:
        """A document scores as its best passage (what DenseIndex.search returns)."""
        return np.maximum.reduceat(passage_scores, self.starts)


def text_key(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def cached_vectors(texts: list[str], encoder: Encoder, cache: Path) -> np.ndarray:
    """(len(texts), dim) float32 unit vectors of ``texts``.

    Cached in one .npz per encoder (``encoder_fingerprint``: model, weights, max_length and
    pooling, as the evaluation's cache is keyed), keyed by a hash of each text, so a change of
    corpus or chunking encodes only the texts not seen before.
    """
    path = cache / f"vectors-{encoder_fingerprint(encoder)}.npz"
    keys_: list[str] = []
    vectors = np.zeros((0, encoder.dim), dtype=np.float32)
    if path.exists():
        with np.load(path) as stored:
            keys_, vectors = stored["keys"].tolist(), stored["vectors"]
    row = {key: i for i, key in enumerate(keys_)}
    wanted = [text_key(text) for text in texts]
    first = {key: i for i, key in reversed(list(enumerate(wanted))) if key not in row}
    # Chunks of similar length pad little; Encoder.encode sorts only within one call.
    missing = sorted(first.values(), key=lambda i: len(texts[i]))
    log_step(f"b) {len(texts) - len(missing)} of {len(texts)} passage vectors from {path}")
    if missing:
        new = np.empty((len(missing), encoder.dim), dtype=np.float32)
        with tqdm(total=len(missing), desc="b) encoding passages", unit="passage") as bar:
            for start in range(0, len(missing), ENCODE_CHUNK):
                chunk = missing[start:start + ENCODE_CHUNK]
                new[start:start + len(chunk)] = encoder.encode([texts[i] for i in chunk])
                bar.update(len(chunk))
        for offset, i in enumerate(missing):
            row[wanted[i]] = len(keys_) + offset
        keys_ += [wanted[i] for i in missing]
        vectors = np.concatenate([vectors, new])
        with atomic_open(path) as out:  # a concurrent run never reads half a file
            np.savez(out, keys=np.array(keys_), vectors=vectors)
    return vectors[[row[key] for key in wanted]]


def build_dense_index(index: DenseIndex, corpus: DenseCorpus, vectors: np.ndarray,
                      probe: np.ndarray) -> dict:
    """Upsert, flush, then wait until searches use the HNSW index.

    milvus-lite 3.2 has no call that tells (describe_index says "Finished" from the start, the
    segment calls are unimplemented), so this watches latency: unflushed rows are searched by
    brute force, flushed ones too until the index is built, and then latency drops by an
    order of magnitude. Waits for that drop (to a third of the first flushed window) for at
    most 10 s + 10 ms per document; a small corpus may show no drop at all.
    """
    def window() -> float:
        return statistics.median(timed(index.search, probe, TOP_K)[1] for _ in range(10))

    start = time.perf_counter()
    # Whole documents per call: an upsert first deletes every passage of its documents.
    bounds = [*corpus.starts[::1000].tolist(), len(corpus.parts)]
    for lo, hi in itertools.pairwise(bounds):
        index.upsert(corpus.parts[lo:hi], vectors[lo:hi])
    upserted = time.perf_counter()
    unflushed = window()
    index.flush()
    flushed = time.perf_counter()
    sealed = latest = window()
    deadline = time.monotonic() + 10 + len(corpus.doc_ids) / 100
    while time.monotonic() < deadline:
        latest = window()
        if latest <= sealed / 3:
            latest = window()  # one more window past the switch
            break
    return {"upsert s": upserted - start, "unflushed p50 ms": unflushed,
            "flushed p50 ms": sealed, "index wait s": time.perf_counter() - flushed,
            "indexed p50 ms": latest}


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest scores, descending, ties by row (= doc_id order)."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def exact_search(matrix: np.ndarray, corpus: DenseCorpus, vector: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact cosine: (all passage scores, top-k passage rows, top-k document rows)."""
    scores = matrix @ vector
    return scores, top_rows(scores, TOP_K), top_rows(corpus.doc_scores(scores), TOP_K)


def recall(found: list[str], exact: list[str], score: dict[str, float]) -> tuple[float, float]:
    """(share of the exact top-k found, share of found scoring at least the exact k-th: the
    second counts a hit tied with the k-th as correct, as ann-benchmarks does)."""
    k = len(exact)
    kth = score[exact[-1]]
    return (len(set(found) & set(exact)) / k,
            sum(score.get(d, -2.0) >= kth - 1e-6 for d in found[:k]) / k)


def encode_ms_one_thread(encoder: Encoder, queries: list[str]) -> list[float]:
    """Per-query encoding time with torch limited to one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [timed(encoder.encode, [query])[1] for query in queries]
    finally:
        torch.set_num_threads(before)


def bench_dense(corpus: DenseCorpus, queries: list[str], encoder: Encoder, vectors: np.ndarray,
                index: DenseIndex) -> tuple[list[dict], dict]:
    query_vectors, encode_ms = [], []
    for query in queries:
        vector, took = timed(encoder.encode, [query])
        query_vectors.append(vector[0])
        encode_ms.append(took)
    log_step("b) upserting into Milvus, flushing, waiting for the HNSW index")
    build = build_dense_index(index, corpus, vectors, query_vectors[0])
    passage_ids = [p.passage_id for p in corpus.parts]
    exact_ms, exact = [], []
    for vector in query_vectors:
        (scores, passage_rows, doc_rows), took = timed(exact_search, vectors, corpus, vector)
        exact_ms.append(took)
        exact.append((scores, [passage_ids[i] for i in passage_rows],
                      [corpus.doc_ids[i] for i in doc_rows]))

    def recall_row(name: str, level: str, search: Callable[[np.ndarray], list[str]]) -> dict:
        ms, by_id, by_score = [], [], []
        for vector, (scores, passage_top, doc_top) in zip(query_vectors, exact, strict=True):
            found, took = timed(search, vector)
            ms.append(took)
            if level == "document":
                truth = dict(zip(corpus.doc_ids, corpus.doc_scores(scores).tolist(),
                                 strict=True))
                r_id, r_score = recall(found, doc_top, truth)
            else:
                truth = dict(zip(passage_ids, scores.tolist(), strict=True))
                r_id, r_score = recall(found, passage_top, truth)
            by_id.append(r_id)
            by_score.append(r_score)
        return latency_row(name, ms, **{"level": level, "recall@10": statistics.mean(by_id),
                                        "recall@10 ties ok": statistics.mean(by_score)})

    def raw(ef: int) -> Callable[[np.ndarray], list[str]]:
        def search(vector: np.ndarray) -> list[str]:
            found = index.client.search(
                index.collection, data=[vector.tolist()], limit=TOP_K,
                search_params={"metric_type": "COSINE", "params": {"ef": ef}})
            return [str(row["passage_id"]) for row in found[0]]
        return search

    rows = [latency_row(f"query encoding, {torch.get_num_threads()} torch threads", encode_ms),
            latency_row("query encoding, 1 torch thread", encode_ms_one_thread(encoder, queries)),
            recall_row("HNSW DenseIndex.search (best passage per doc)", "document",
                       lambda v: [h.doc_id for h in index.search(v, TOP_K)])]
    rows += [recall_row(f"HNSW client.search ef={ef}, ids only", "passage", raw(ef))
             for ef in EF_SWEEP]
    rows.append(latency_row("exact numpy (matrix @ q, both levels)", exact_ms,
                            **{"recall@10": 1.0, "recall@10 ties ok": 1.0}))
    # A filtered scan on milvus-lite; EmbeddingService counts once per change, not per search.
    rows.append(latency_row("DenseIndex.count(), 5 calls", [timed(index.count)[1]
                                                             for _ in range(5)]))
    return rows, build


# --- c) hybrid over the bus ------------------------------------------------------------------
def in_process(embedding: EmbeddingService, sparse: SparseService, req: RetrieveRequest,
               rrf_k: int) -> tuple[list[str], dict[str, float]]:
    """What the ranker does for ``req``, with direct calls instead of bus hops."""
    search = SearchRequest(query=req.question, top_k=max(req.candidates, req.top_k))
    dense, dense_ms = timed(embedding.search, search)
    lexical, sparse_ms = timed(sparse.search, search)
    start = time.perf_counter()
    fused = fuse(req.mode, dense.hits, lexical.hits, k=rrf_k, weight=req.weight)
    fusion_ms = (time.perf_counter() - start) * 1000
    ids = [hit.doc_id for hit in fused[:req.top_k]]
    return ids, {"dense": dense_ms, "sparse": sparse_ms, "fusion": fusion_ms,
                 "sum": dense_ms + sparse_ms + fusion_ms}


async def hybrid_runs(bus: Bus, embedding: EmbeddingService, sparse: SparseService,
                      queries: list[str], settings: Settings) -> tuple[dict, dict, float]:
    """Interleaved per query: the in-process calls, then the same retrieval over the bus.
    The first WARMUP_QUERIES (at most half of the queries, so that one is always timed) are
    not timed."""
    timeout = settings.serve.request_timeout_s
    retrieval = settings.retrieval
    warmup = min(WARMUP_QUERIES, len(queries) // 2)
    local: dict[str, list[float]] = {}
    remote: dict[str, list[float]] = {"bus": []}
    same = 0
    for n, query in enumerate(tqdm(queries, desc="c) hybrid queries", unit="q")):
        req = RetrieveRequest(question=query, top_k=TOP_K, candidates=retrieval.candidates,
                              mode=retrieval.mode, weight=retrieval.weight)
        ids, parts = in_process(embedding, sparse, req, retrieval.rrf_k)
        start = time.perf_counter()
        result = await bus.request(keys.RANKER, "retrieve", req, timeout, RetrieveResult)
        took = (time.perf_counter() - start) * 1000
        if n < warmup:
            continue
        for name, ms in parts.items():
            local.setdefault(name, []).append(ms)
        remote["bus"].append(took)
        for name, ms in result.timings_ms.items():
            remote.setdefault(name, []).append(ms)
        same += [hit.doc_id for hit in result.hits] == ids
    return local, remote, same / max(1, len(queries) - warmup)


def bench_hybrid(sparse: SparseService, encoder: Encoder, milvus_uri: str, collection: str,
                 queries: list[str], settings: Settings, tmp: Path) -> list[dict]:
    index = DenseIndex(MilvusClient(uri=milvus_uri), collection, encoder.dim)
    embedding = EmbeddingService(encoder, index, chunk_chars=settings.embedding.chunk_chars,
                                 chunk_overlap=settings.embedding.chunk_overlap)
    valkey = start_valkey(tmp / "valkey", persist=False)
    workers: list[WorkerThread] = []

    def make_ranker(bus: Bus):
        async def ask(service: str, kind: str, body: SearchRequest) -> SearchResult:
            return await bus.request(service, kind, body, settings.serve.request_timeout_s,
                                     SearchResult)
        return ranker_worker(RankerService(ask, settings.retrieval.rrf_k), bus)

    try:
        for name, make in [
            ("embedding", lambda bus: retriever_worker(embedding, keys.EMBEDDING, bus)),
            ("sparse", lambda bus: retriever_worker(sparse, keys.SPARSE, bus)),
            ("ranker", make_ranker),
        ]:
            workers.append(WorkerThread(make, valkey.url, settings.redis, name))
            workers[-1].check()

        async def run() -> tuple[dict, dict, float]:
            bus = Bus.connect(valkey.url, settings.redis)
            try:
                return await hybrid_runs(bus, embedding, sparse, queries, settings)
            finally:
                await bus.close()

        local, remote, same = asyncio.run(run())
    finally:
        for worker in workers:
            worker.stop()
        valkey.stop()
    return [
        latency_row("in process: EmbeddingService.search", local["dense"]),
        latency_row("in process: SparseService.search", local["sparse"]),
        latency_row(f"in process: fuse({settings.retrieval.mode})", local["fusion"]),
        latency_row("in process: dense + sparse + fusion", local["sum"]),
        latency_row("ranker's view: embedding hop (bus)", remote["dense"]),
        latency_row("ranker's view: sparse hop (bus)", remote["sparse"]),
        latency_row("Bus.request(ranker, retrieve)", remote["bus"], **{"same top-10": same}),
    ]


# --- the run ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-corpus", type=tg.count, default=None,
                        help="first N documents (by title) instead of all 10,033")
    parser.add_argument("--limit-queries", type=tg.count, default=None,
                        help="first N queries instead of all")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache",
                        help="folder for cached corpus vectors")
    return parser


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs each index build at DEBUG
    started = time.perf_counter()
    settings = Settings()
    docs = load_corpus(args.limit_corpus)
    queries = load_queries(args.limit_queries)
    collection = settings.milvus.collection
    log_step(f"{len(docs)} documents, {len(queries)} queries")
    report: dict = {"documents": len(docs), "queries": len(queries), "top_k": TOP_K}

    with tempfile.TemporaryDirectory(prefix="ragtune-bench-") as name:
        tmp = Path(name)
        bm25_rows, sparse = bench_bm25(docs, queries, tmp / "sparse")
        try:
            print_table(f"a) BM25, {len(docs)} docs, {len(queries)} queries, top-{TOP_K}, "
                        f"k1={K1} b={B}, same tokenisation", bm25_rows, [
                            "store s: SQLite ingest (service only); build s: tokenise + index",
                            "identical/ties/|dscore| against bm25s's top-10 (scores > 0); "
                            "rank_bm25 uses another IDF, so it differs by design"])
            report["bm25"] = bm25_rows
            encoder = Encoder.from_settings(settings)
            corpus = DenseCorpus.of(docs, settings)
            vectors = cached_vectors(corpus.texts, encoder, args.cache)
            milvus = start_milvus(tmp / "milvus")
            try:
                index = DenseIndex(MilvusClient(uri=milvus.url), collection, encoder.dim)
                dense_rows, build = bench_dense(corpus, queries, encoder, vectors, index)
                print_table(f"b) dense, {len(docs)} docs in {len(corpus.parts)} passages x "
                            f"{encoder.dim}-d, top-{TOP_K}; Milvus "
                            + ", ".join(f"{k} {fmt(v)}" for k, v in build.items()), dense_rows,
                            ["recall against exact numpy cosine over the same vectors, per "
                             "document (its best passage) or per passage;",
                             "'ties ok' counts a hit tied with the exact 10th as correct"])
                report["dense"] = {"build": build, "rows": dense_rows}
                hybrid_rows = bench_hybrid(sparse, encoder, milvus.url, collection, queries,
                                           settings, tmp)
                retrieval = settings.retrieval
                print_table(f"c) hybrid end to end, top-{TOP_K} of {retrieval.candidates} "
                            f"candidates each, fusion {retrieval.mode} (weight "
                            f"{retrieval.weight}, RRF k {retrieval.rrf_k})", hybrid_rows,
                            ["same top-10: the bus answer equals the in-process fusion"])
                report["hybrid"] = hybrid_rows
            finally:
                milvus.stop()
        finally:
            sparse.close()
    report["wall s"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieval.json").write_text(json.dumps(report, indent=1))
    print(f"\nwall time {report['wall s']:.0f} s; tables in {RESULTS / 'retrieval.json'}")


if __name__ == "__main__":
    main()
