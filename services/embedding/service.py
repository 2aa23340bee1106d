"""The embedding service: encodes documents and queries, owns the dense index.

A plain class (no Ray, no Redis): the bus wiring calls ``ingest`` for each ``rag:ingest``
entry and ``search`` for each retrieval request. Both handlers are idempotent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.embedding.chunking import passages, spans
from services.embedding.index import DenseIndex
from shared.models.encoder import Encoder
from shared.schemas import IngestBatch, SearchRequest, SearchResult

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)


class EmbeddingService:
    """Dense retrieval over ``index`` with vectors from ``encoder`` (same dimension)."""

    def __init__(self, encoder: Encoder, index: DenseIndex, chunk_chars: int = 1_000,
                 chunk_overlap: int = 200) -> None:
        if encoder.dim != index.dim:
            raise ValueError(
                f"encoder makes {encoder.dim}-d vectors but the index holds {index.dim}-d ones"
            )
        spans("", chunk_chars, chunk_overlap)  # validates both now, not at the first ingest
        self.chunk_chars = chunk_chars
        self.chunk_overlap = chunk_overlap
        self.encoder = encoder
        self.index = index
        self._unflushed = False
        # Counting documents filters on the passage number, a scan on milvus-lite (~1.5 s on
        # 10k documents): counted once after each change, not on every search.
        self._count: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, milvus_uri: str) -> EmbeddingService:
        """Load the encoder and open (or create) ``settings.milvus.collection`` at milvus_uri."""
        from pymilvus import MilvusClient

        encoder = Encoder.from_settings(settings)
        client = MilvusClient(uri=milvus_uri)
        return cls(encoder, DenseIndex(client, settings.milvus.collection, encoder.dim),
                   settings.embedding.chunk_chars, settings.embedding.chunk_overlap)

    def ingest(self, batch: IngestBatch) -> None:
        """Encode and upsert every document of ``batch`` (keyed by doc_id).

        Idempotent: the same batch twice leaves one row per doc_id. Within a batch, a doc_id
        given twice keeps its last version.
        """
        latest = {doc.doc_id: doc for doc in batch.documents}
        docs = list(latest.values())
        parts = [p for doc in docs for p in passages(doc, self.chunk_chars, self.chunk_overlap)]
        # The title goes with every passage: it is often the best evidence of what it is about.
        vectors = self.encoder.encode([f"{p.doc.title}\n{p.text}" for p in parts])
        self.index.upsert(parts, vectors)
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
        if self._unflushed:
            # unflushed rows are searched by brute force, ~50x slower than the HNSW index
            self.index.flush()
            self._unflushed = False
        vector = self.encoder.encode([req.query])[0]
        hits = self.index.search(vector, req.top_k, req.filters)
        return SearchResult(hits=hits, count=self.count())

    def delete(self, doc_ids: list[str]) -> None:
        """Remove these documents from the dense index; unknown ids are ignored."""
        self.index.delete(doc_ids)
        self._count = None
        self.index.flush()

    def count(self) -> int:
        """Number of documents in the dense index."""
        if self._count is None:
            self._count = self.index.count()
        return self._count
