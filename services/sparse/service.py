"""The sparse service: BM25 keyword retrieval.

Documents live in a SQLite file under ``store_dir``: that file is the source of truth and
survives restarts. The BM25 index (bm25s) is only a cache in memory, rebuilt from SQLite on the
first search after a change: a rebuild of the 10k-document corpus takes well under a second,
far cheaper than keeping an on-disk index in step with upserts and deletes.

Several replicas may share one ``store_dir`` on one machine: each notices the others' writes
through SQLite's ``PRAGMA data_version`` and rebuilds.
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

from shared.schemas import Hit, IngestBatch, SearchRequest, SearchResult

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

DB_NAME = "documents.sqlite3"
# bm25s' English stop-word list; tokens are lower-cased runs of 2+ word characters.
_STOPWORDS = "en"
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    doc_id TEXT PRIMARY KEY,
    title  TEXT NOT NULL,
    text   TEXT NOT NULL,
    topic  TEXT NOT NULL DEFAULT ''
)
"""
# The WHERE makes re-delivering an unchanged document a no-op, so it costs no rebuild.
_UPSERT = """
INSERT INTO docs (doc_id, title, text, topic) VALUES (?, ?, ?, ?)
ON CONFLICT (doc_id) DO UPDATE SET title = excluded.title, text = excluded.text,
                                   topic = excluded.topic
WHERE title != excluded.title OR text != excluded.text OR topic != excluded.topic
"""


def _index_text(doc_title: str, doc_text: str) -> str:
    # Same text the dense index embeds (services import nothing from each other).
    return f"{doc_title}\n{doc_text}"


class SparseService:
    """BM25 (Robertson et al.; Lucene variant, k1=1.5, b=0.75 by default) over ``store_dir``.

    Thread-safe: one lock serialises writes, index rebuilds and searches.
    """

    def __init__(self, store_dir: Path, *, k1: float = 1.5, b: float = 0.75) -> None:
        if k1 < 0:
            raise ValueError(f"`k1` has to be non-negative, but is {k1}")
        if not 0 <= b <= 1:
            raise ValueError(f"`b` has to be in [0, 1], but is {b}")
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
        self._db.commit()
        # Index state: rebuilt when _dirty (our own writes) or data_version moved (others').
        self._dirty = True
        self._data_version = -1
        self._retriever: bm25s.BM25 | None = None
        self._doc_ids: list[str] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> SparseService:
        return cls(settings.sparse_dir)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writes -----------------------------------------------------------------------------
    def ingest(self, batch: IngestBatch) -> None:
        """Upsert every document of ``batch`` keyed by doc_id (idempotent; last one wins)."""
        rows = [(d.doc_id, d.title, d.text, d.topic) for d in batch.documents]
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

    def search(self, req: SearchRequest) -> SearchResult:
        """The req.top_k best BM25 matches: scores > 0, descending, ties by ascending doc_id.

        A query with no indexed token (only stop words, or words no document has) gives no
        hits; so does an empty index. ``count`` is the number of documents searched.
        """
        tokens = bm25s.tokenize(
            [req.query], lower=True, stopwords=_STOPWORDS, return_ids=False,
            show_progress=False,
        )[0]
        with self._lock:
            self._refresh()
            count = len(self._doc_ids)
            if self._retriever is None:
                return SearchResult(hits=[], count=count)
            token_ids = self._retriever.get_tokens_ids(tokens)
            if not token_ids:
                return SearchResult(hits=[], count=count)
            scores = self._retriever.get_scores_from_ids(token_ids)
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
            "SELECT doc_id, title, text FROM docs ORDER BY doc_id"
        ).fetchall()
        self._doc_ids = [row[0] for row in rows]
        self._retriever = None
        if rows:
            corpus = bm25s.tokenize(
                [_index_text(row[1], row[2]) for row in rows], lower=True,
                stopwords=_STOPWORDS, show_progress=False,
            )
            retriever = bm25s.BM25(k1=self.k1, b=self.b)
            retriever.index(corpus, show_progress=False)
            self._retriever = retriever
        self._dirty = False
        self._data_version = version
        log.info("BM25 index rebuilt over %d documents in %.2f s", len(rows),
                 time.perf_counter() - started)
