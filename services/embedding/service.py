"""The embedding service: encodes documents and queries, owns the dense index.

A plain class (no Ray, no Redis): the bus wiring calls ``ingest`` for each ``rag:ingest``
entry and ``search`` for each retrieval request. Both handlers are idempotent.

Model versions swap while serving: the encoders and the index in use are one immutable
``Active`` record, read once per call and replaced whole, so a search in flight finishes on the
version it started with. A query-encoder-only version swaps the query side alone (passage
vectors stay valid); a version that re-encodes passages is first built into a new collection
from the current one's rows (``reindex``), then swapped in; ingests wait for that. The Milvus
alias ``<collection>_live`` names the collection that takes the writes: a replica starts on
it, and a rollback rebuilds the earlier collection from it rather than serve it as it was.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.embedding.chunking import passages, spans
from services.embedding.index import DenseIndex, live_collection, set_live
from shared.models.encoder import Encoder
from shared.registry import Registry, collection_for
from shared.schemas import IngestBatch, ModelVersion, SearchRequest, SearchResult, titled_text

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Active:
    """What serves now: queries are encoded by ``query_encoder``, passages by
    ``passage_encoder`` into ``index`` (one model for both unless a query-only version)."""

    query_encoder: Encoder
    passage_encoder: Encoder
    index: DenseIndex


class EmbeddingService:
    """Dense retrieval over ``index`` with vectors from ``encoder`` (same dimension);
    ``query_encoder`` (default: ``encoder``) encodes queries."""

    def __init__(self, encoder: Encoder, index: DenseIndex, chunk_chars: int = 1_000,
                 chunk_overlap: int = 200, query_encoder: Encoder | None = None) -> None:
        query_encoder = query_encoder or encoder
        for name, enc in (("encoder", encoder), ("query encoder", query_encoder)):
            if enc.dim != index.dim:
                raise ValueError(
                    f"{name} makes {enc.dim}-d vectors but the index holds {index.dim}-d ones")
        spans("", chunk_chars, chunk_overlap)  # validates both now, not at the first ingest
        self.chunk_chars = chunk_chars
        self.chunk_overlap = chunk_overlap
        self.active = Active(query_encoder, encoder, index)
        # Ingests and re-indexes exclude each other: a re-index copies a complete index.
        self._writing = threading.Lock()
        self._unflushed = False
        # Counting documents filters on the passage number, a scan on milvus-lite (~1.5 s on
        # 10k documents): counted once after each change, not on every search.
        self._count: int | None = None

    @property
    def index(self) -> DenseIndex:
        return self.active.index

    @property
    def encoder(self) -> Encoder:
        """The passage encoder in use."""
        return self.active.passage_encoder

    @classmethod
    def from_settings(cls, settings: Settings, milvus_uri: str) -> EmbeddingService:
        """Load the registry's serving retriever version (the packaged model when none) and
        open the live collection at milvus_uri (``settings.milvus.collection`` on a first
        start). When the serving version needs another collection (its promotion or rollback
        was cut short), that one is first built from the live one."""
        from pymilvus import MilvusClient

        base = settings.milvus.collection
        registry = Registry(settings.checkpoint_dir)
        serving = registry.serving("retriever")
        passage = registry.passage_side(serving)
        passage_encoder = _load(passage, registry, settings)
        query_encoder = (passage_encoder if passage == serving
                         else _load(serving, registry, settings))
        wanted = collection_for(base, passage)
        client = MilvusClient(uri=milvus_uri)
        # No alias yet (a first start, or a store from before it): the serving version's
        # collection holds the documents if it exists, as it took every write since then.
        live = live_collection(client, base) or (
            wanted if client.has_collection(wanted) else base)
        service = cls(passage_encoder, DenseIndex(client, live, passage_encoder.dim),
                      settings.embedding.chunk_chars, settings.embedding.chunk_overlap,
                      query_encoder)
        if wanted == live:
            set_live(client, base, live)
        else:  # nothing is served before this returns: the rows are copied, not searched
            service.reindex(passage_encoder, wanted, query_encoder, live=base)
        service.drop_unused(registry, settings)  # versions pruned while ragtune was down
        return service

    def serve_version(self, version: ModelVersion | None, registry: Registry,
                      settings: Settings) -> None:
        """Serve retriever ``version`` (None = the base model) from the registry.

        A version searching the current passage vectors swaps the query encoder only. One
        needing other passage vectors serves from its own collection: the live one if another
        replica already built it, else built by ``reindex`` from the current rows (minutes on
        a large corpus). An older copy of that collection is never served as it is: documents
        ingested or deleted since it was live would be wrong in it.
        """
        base = settings.milvus.collection
        passage = registry.passage_side(version)
        collection = collection_for(base, passage)
        query_encoder = _load(version, registry, settings)
        if collection == self.active.index.collection:
            self.use_query_encoder(query_encoder)
            return
        passage_encoder = (query_encoder if passage == version
                           else _load(passage, registry, settings))
        with self._writing:
            client = self.active.index.client
            if live_collection(client, base) == collection:
                ready = DenseIndex(client, collection, passage_encoder.dim)
                self.active = Active(query_encoder, passage_encoder, ready)
                self._count = None
                log.info("serving retriever %s from the live collection %s",
                         version.version if version else "base", collection)
                return
        self.reindex(passage_encoder, collection, query_encoder, live=base)

    def drop_unused(self, registry: Registry, settings: Settings) -> list[str]:
        """Drop the collections of retriever versions the registry no longer holds (``ragtune
        models prune``): ``<milvus.collection>_vNNNN`` that no recorded version needs and this
        replica does not search. Version numbers are never reused, so such a collection can
        never serve again. Returns the names dropped."""
        base = settings.milvus.collection
        needed = {collection_for(base, registry.passage_side(v))
                  for v in registry.view().retriever.versions}
        client = self.active.index.client
        needed |= {self.active.index.collection, live_collection(client, base)}
        pattern = re.compile(rf"{re.escape(base)}_v\d{{4,}}")
        stale = sorted(c for c in client.list_collections()
                       if pattern.fullmatch(c) and c not in needed)
        dropped = []
        for name in stale:
            try:
                client.drop_collection(name)
            except Exception as exc:  # noqa: BLE001 - another replica's drop; retried next time
                log.warning("could not drop the collection %s: %s", name, exc)
                continue
            dropped.append(name)
            log.info("dropped the collection %s of a pruned retriever version", name)
        return dropped

    def ingest(self, batch: IngestBatch) -> None:
        """Encode and upsert every document of ``batch`` (keyed by doc_id).

        Idempotent: the same batch twice leaves one row per doc_id. Within a batch, a doc_id
        given twice keeps its last version.
        """
        latest = {doc.doc_id: doc for doc in batch.documents}
        docs = list(latest.values())
        parts = [p for doc in docs for p in passages(doc, self.chunk_chars, self.chunk_overlap)]
        with self._writing:
            active = self.active
            # The title goes with every passage: it is often the best evidence of what it is
            # about.
            texts = [titled_text(p.doc.title, p.text) for p in parts]
            vectors = active.passage_encoder.encode(texts)
            active.index.upsert(parts, vectors)
        # No flush here: on milvus-lite a flush per batch seals a segment and builds its index,
        # which took as much CPU as encoding during a bulk ingest. The next search flushes.
        self._unflushed = True
        self._count = None
        log.info("indexed %d documents (dense)", len(docs))

    def search(self, req: SearchRequest) -> SearchResult:
        """The req.top_k nearest documents to the query (cosine, descending; ties by doc_id)
        among those req.filters allows.

        ``count`` is the index size when searched (filtered or not); an empty index gives no
        hits.
        """
        active = self.active
        if self._unflushed:
            # unflushed rows are searched by brute force, ~50x slower than the HNSW index
            active.index.flush()
            self._unflushed = False
        vector = active.query_encoder.encode([req.query])[0]
        hits = active.index.search(vector, req.top_k, req.filters)
        return SearchResult(hits=hits, count=self.count())

    def delete(self, doc_ids: list[str]) -> None:
        """Remove these documents from the dense index; unknown ids are ignored."""
        with self._writing:
            index = self.active.index
            index.delete(doc_ids)
            self._count = None
            index.flush()

    def count(self) -> int:
        """Number of documents in the dense index."""
        if self._count is None:
            self._count = self.active.index.count()
        return self._count

    # --- model versions ----------------------------------------------------------------------
    def use_query_encoder(self, query_encoder: Encoder) -> None:
        """Encode queries with ``query_encoder`` from now on; passages keep their vectors."""
        active = self.active
        if query_encoder.dim != active.index.dim:
            raise ValueError(f"query encoder makes {query_encoder.dim}-d vectors but the index "
                             f"holds {active.index.dim}-d ones")
        self.active = Active(query_encoder, active.passage_encoder, active.index)
        log.info("query encoder swapped")

    def reindex(self, encoder: Encoder, collection: str, query_encoder: Encoder | None = None,
                batch_size: int = 256, live: str | None = None) -> DenseIndex:
        """Re-encode every passage of the current index with ``encoder`` into the new
        collection ``collection``, then serve from it (queries by ``query_encoder``, default
        ``encoder``); with ``live`` (a base collection name), its live alias names the new
        collection once it is complete. The old collection stays until ``drop_unused`` removes
        it (a search in flight may still read it). Ingests wait until the swap. Returns the
        old index."""
        with self._writing:
            old = self.active
            client = old.index.client
            if collection == old.index.collection:
                raise ValueError(f"re-index into {collection!r}: that collection is in use")
            if client.has_collection(collection):
                client.drop_collection(collection)  # a half-built one from a crash
            new = DenseIndex(client, collection, encoder.dim)
            old.index.flush()
            copied = 0
            for rows in old.index.rows(batch_size):
                vectors = encoder.encode([titled_text(r["title"], r["text"]) for r in rows])
                new.insert_rows(rows, vectors)
                copied += len(rows)
            new.flush()
            if live is not None:
                set_live(client, live, collection)
            self.active = Active(query_encoder or encoder, encoder, new)
            self._count = None
            log.info("re-indexed %d passages into %s", copied, collection)
            return old.index


def _load(version: ModelVersion | None, registry: Registry, settings: Settings) -> Encoder:
    """The encoder of retriever ``version`` (None: the configured/packaged model)."""
    if version is None:
        return Encoder.from_settings(settings)
    return Encoder.from_settings(settings, str(registry.path_of(version)))
