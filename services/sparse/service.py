"""The sparse service: BM25 keyword retrieval, with metadata filters.

Documents live in a SQLite file under ``store_dir``: that file is the source of truth and
survives restarts. The BM25 index (bm25s) is only a cache in memory, rebuilt from SQLite on the
first search after a change: a rebuild of the 10k-document corpus takes well under a second,
far cheaper than keeping an on-disk index in step with upserts and deletes.

Several replicas may share one ``store_dir`` on one machine: each notices the others' writes
through SQLite's ``PRAGMA data_version`` and rebuilds.

Filters (topic, source, date) are applied to the metadata read from SQLite together with the
texts at the last rebuild (``_Metadata``: integer codes and day numbers, so a filter costs
well under a millisecond; asking SQLite each time scanned every row, ~7 ms on 10k documents).
bm25s scores every document and its ``weight_mask`` zeroes the disallowed ones before the
top-k cut, so a filtered search returns the true best matches among the allowed documents.
IDF stays that of the whole corpus (as a Lucene filter query leaves it), so a document scores
the same with or without a filter.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import bm25s
import numpy as np

from services.sparse.tokenizer import stopword_list, tokenize
from shared.schemas import (
    Document,
    Filters,
    Hit,
    IngestBatch,
    SearchRequest,
    SearchResult,
    titled_text,
)

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

DB_NAME = "documents.sqlite3"
# The default stop-word list (services.sparse.tokenizer.STOPWORDS); bench/retrieval.py reads it.
_STOPWORDS = "en"
_CHUNK = 500

# ``date`` is ISO YYYY-MM-DD, or NULL for an undated document (never matches a date filter).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    doc_id TEXT PRIMARY KEY,
    title  TEXT NOT NULL,
    text   TEXT NOT NULL,
    topic  TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    date   TEXT
)
"""
# Stores made before metadata filters lack these; they are added in place (see _migrate).
_ADDED_COLUMNS = {"source": "TEXT NOT NULL DEFAULT ''", "date": "TEXT"}
# The WHERE makes re-delivering an unchanged document a no-op, so it costs no rebuild.
_UPSERT = """
INSERT INTO docs (doc_id, title, text, topic, source, date) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (doc_id) DO UPDATE SET title = excluded.title, text = excluded.text,
                                   topic = excluded.topic, source = excluded.source,
                                   date = excluded.date
WHERE title != excluded.title OR text != excluded.text OR topic != excluded.topic
      OR source != excluded.source OR date IS NOT excluded.date
"""


class _Metadata:
    """Topic, source and date of the indexed documents, row i = index row i."""

    def __init__(self, topics: list[str], sources: list[str], dates: list[str | None]) -> None:
        self.topics = _Codes(topics)
        self.sources = _Codes(sources)
        # YYYYMMDD as an integer orders like the date; 0 = undated, below every real date.
        self.days = np.array([_day(d) if d else 0 for d in dates], dtype=np.int32)

    def allowed(self, filters: Filters) -> np.ndarray:
        """Boolean mask of the rows ``filters`` allows (AND over fields, OR over values)."""
        mask = np.ones(len(self.days), dtype=bool)
        if filters.topic is not None:
            mask &= self.topics.isin(filters.topic)
        if filters.source is not None:
            mask &= self.sources.isin(filters.source)
        if filters.date_from is not None:
            mask &= self.days >= _day(filters.date_from)
        if filters.date_to is not None:
            mask &= (self.days <= _day(filters.date_to)) & (self.days > 0)
        return mask


class _Codes:
    """A column of strings as integer codes, for vectorised ``in`` tests."""

    def __init__(self, values: list[str]) -> None:
        self.index: dict[str, int] = {}
        self.codes = np.array([self.index.setdefault(v, len(self.index)) for v in values],
                              dtype=np.int32)

    def isin(self, values: list[str]) -> np.ndarray:
        wanted = [self.index[v] for v in values if v in self.index]
        return np.isin(self.codes, wanted)


def _day(iso_date: str) -> int:
    return int(iso_date.replace("-", ""))


class SparseService:
    """BM25 over ``store_dir``: bm25s' default variant (Lucene's, after Kamphuis et al. 2020),
    k1 and b as given, documents and queries tokenised by ``tokenizer.tokenize`` with the
    stop-word list called ``stopwords`` ("en" or "none").

    Thread-safe: one lock serialises writes, index rebuilds and searches.
    """

    def __init__(self, store_dir: Path, *, k1: float = 1.5, b: float = 0.75,
                 stopwords: str = _STOPWORDS) -> None:
        if k1 < 0:
            raise ValueError(f"`k1` has to be non-negative, but is {k1}")
        if not 0 <= b <= 1:
            raise ValueError(f"`b` has to be in [0, 1], but is {b}")
        self.stopwords = stopword_list(stopwords)
        self.store_dir = Path(store_dir)
        self.k1 = k1
        self.b = b
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.store_dir / DB_NAME, timeout=10.0, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._migrate()
        self._db.commit()
        # Index state: rebuilt when _dirty (our own writes) or data_version moved (others').
        self._dirty = True
        self._data_version = -1
        self._retriever: bm25s.BM25 | None = None
        self._doc_ids: list[str] = []
        self._metadata = _Metadata([], [], [])

    @classmethod
    def from_settings(cls, settings: Settings) -> SparseService:
        """The store under ``settings.sparse_dir`` with ``settings.sparse``'s BM25 settings."""
        bm25 = settings.sparse
        return cls(settings.sparse_dir, k1=bm25.k1, b=bm25.b, stopwords=bm25.stopwords)

    def _migrate(self) -> None:
        """Add the metadata columns a store from before metadata filters lacks."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(docs)")}
        for column, decl in _ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE docs ADD COLUMN {column} {decl}")
                log.warning("sparse store %s: added column %r; documents indexed before have "
                            "none until they are sent again", self.store_dir, column)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writes -----------------------------------------------------------------------------
    def ingest(self, batch: IngestBatch) -> None:
        """Upsert every document of ``batch`` keyed by doc_id (idempotent; last one wins)."""
        rows = [(d.doc_id, d.title, d.text, d.topic, d.source, d.date)
                for d in batch.documents]
        with self._lock:
            before = self._db.total_changes
            with self._db:
                self._db.executemany(_UPSERT, rows)
            if self._db.total_changes != before:
                self._dirty = True
        log.info("indexed %d documents (sparse)", len(rows))

    def delete(self, doc_ids: list[str]) -> None:
        """Remove these documents; unknown ids are ignored."""
        with self._lock:
            before = self._db.total_changes
            with self._db:
                self._db.executemany("DELETE FROM docs WHERE doc_id = ?",
                                     [(doc_id,) for doc_id in doc_ids])
            if self._db.total_changes != before:
                self._dirty = True

    # --- reads ------------------------------------------------------------------------------
    def count(self) -> int:
        """Number of documents stored."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def documents(self) -> list[Document]:
        """Every stored document, ordered by doc_id (what both indexes hold: the trainer
        retrieves from them for a job on the indexed corpus)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT doc_id, title, text, topic, source, date FROM docs ORDER BY doc_id"
            ).fetchall()
        return [Document(doc_id=r[0], title=r[1], text=r[2], topic=r[3], source=r[4],
                         date=r[5]) for r in rows]

    def search(self, req: SearchRequest) -> SearchResult:
        """The req.top_k best BM25 matches among the documents req.filters allows: scores > 0,
        descending, ties by ascending doc_id.

        A query with no indexed token (only stop words, or words no document has) gives no
        hits; so does an empty index, or filters no document matches. ``count`` is the number
        of documents in the index (filtered or not).
        """
        tokens = tokenize(req.query, self.stopwords)
        with self._lock:
            self._refresh()
            count = len(self._doc_ids)
            if self._retriever is None:
                return SearchResult(hits=[], count=count)
            token_ids = self._retriever.get_tokens_ids(tokens)
            if not token_ids:
                return SearchResult(hits=[], count=count)
            mask = None
            if req.filters is not None:
                allowed = self._metadata.allowed(req.filters)
                if not allowed.any():
                    return SearchResult(hits=[], count=count)
                mask = allowed.astype(np.float32)
            # Every document is scored; the mask zeroes the disallowed ones before the cut.
            scores = self._retriever.get_scores_from_ids(token_ids, weight_mask=mask)
            matched = np.flatnonzero(scores > 0)
            # Rows are in doc_id order, so the position breaks score ties by doc_id.
            order = matched[np.lexsort((matched, -scores[matched]))][: req.top_k]
            hits = self._hits([self._doc_ids[i] for i in order], scores[order])
        return SearchResult(hits=hits, count=count)

    def _hits(self, doc_ids: list[str], scores: np.ndarray) -> list[Hit]:
        if not doc_ids:
            return []
        found = {}
        # Chunked: SQLite caps the number of parameters of one statement.
        for start in range(0, len(doc_ids), _CHUNK):
            chunk = doc_ids[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                f"SELECT doc_id, title, text FROM docs WHERE doc_id IN ({marks})", chunk
            ):
                found[row[0]] = row
        return [
            Hit(doc_id=doc_id, title=found[doc_id][1], text=found[doc_id][2], score=float(s))
            for doc_id, s in zip(doc_ids, scores, strict=True)
            if doc_id in found
        ]

    def _refresh(self) -> None:
        """Rebuild the BM25 index if the documents changed since the last build (lock held)."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if not self._dirty and version == self._data_version:
            return
        started = time.perf_counter()
        rows = self._db.execute(
            "SELECT doc_id, title, text, topic, source, date FROM docs ORDER BY doc_id"
        ).fetchall()
        self._doc_ids = [row[0] for row in rows]
        self._metadata = _Metadata([r[3] for r in rows], [r[4] for r in rows],
                                   [r[5] for r in rows])
        self._retriever = None
        corpus = [tokenize(titled_text(row[1], row[2]), self.stopwords) for row in rows]
        if any(corpus):  # bm25s cannot index a corpus without a single token
            retriever = bm25s.BM25(k1=self.k1, b=self.b)
            retriever.index(corpus, show_progress=False)
            self._retriever = retriever
        self._dirty = False
        self._data_version = version
        log.info("BM25 index rebuilt over %d documents in %.2f s", len(rows),
                 time.perf_counter() - started)
