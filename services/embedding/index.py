"""The dense index: one Milvus collection of passages, their metadata and their vectors.

A row is one passage of a document (``services.embedding.chunking``), keyed by
``<doc_id>#<n>``, carrying the document id and the passage's character offsets; searches
return documents (the best passage of each).

The same client code serves the embedded milvus-lite server and a real Milvus. Converting
between ragtune's records (Document, Hit, Filters) and Milvus rows and expressions happens
here and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pymilvus import DataType, MilvusClient

from services.embedding.chunking import Passage
from shared.schemas import Document, Filters, Hit

log = logging.getLogger(__name__)

# VARCHAR limits of the collection. Real Milvus counts UTF-8 bytes against max_length
# (milvus-lite 3.2 counts characters), so rows are cut to these many bytes before writing.
MAX_DOC_ID = 256
MAX_PASSAGE_ID = MAX_DOC_ID + 12  # "<doc_id>#<n>"
MAX_TITLE = 1024
MAX_TEXT = 65_535
MAX_TOPIC = 256
MAX_SOURCE = 256
MAX_DATE = 10  # ISO YYYY-MM-DD; "" for an undated document
# Fields a collection needs beyond the vector (metadata filters need topic/source/date;
# passages need their document id, number and offsets).
_FIELDS = ("passage_id", "doc_id", "n", "start", "end", "title", "text", "topic", "source",
           "date")
# Passages fetched per wanted document, so that documents with several close passages still
# fill top_k after keeping each document's best passage.
_PASSAGES_PER_DOC = 4
# Milvus refuses a search limit above 16384 (its `topk` cap).
MAX_LIMIT = 16_384
# Extra candidates fetched beyond top_k so that equal scores at the cut are ordered by doc_id
# (duplicate texts under different ids score exactly the same).
_TIE_MARGIN = 8
# HNSW build parameters (Malkov & Yashunin 2018); M=16, efConstruction=200 are Milvus' usual
# recommendation for recall > 0.95 at this corpus size.
_HNSW = {"M": 16, "efConstruction": 200}
_HNSW_EF = 128  # search-time candidate list (measured in bench/retrieval.py)


class DenseIndex:
    """Documents with unit vectors of ``dim`` dimensions in the Milvus collection ``collection``.

    Creates the collection (HNSW, cosine) when it is missing and loads it (Milvus hands
    collections back released after a restart). Raises ValueError when an existing collection
    holds vectors of another dimension, or lacks a field (one made before metadata filters
    has no ``source`` and ``date``: milvus-lite cannot add fields to a collection, so it has to
    be re-created and the documents sent again).
    """

    def __init__(self, client: MilvusClient, collection: str, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"`dim` has to be a strictly positive integer, but is {dim}")
        self.client = client
        self.collection = collection
        self.dim = dim
        if client.has_collection(collection):
            description = client.describe_collection(collection)
            existing = _vector_dim(description)
            if existing is None:
                raise ValueError(
                    f"Milvus collection {collection!r} has no 'vector' field: it is not a "
                    "ragtune collection; name another one (milvus.collection)"
                )
            if existing != dim:
                raise ValueError(
                    f"Milvus collection {collection!r} holds {existing}-d vectors but the "
                    f"encoder makes {dim}-d ones; use another collection (milvus.collection) "
                    "or drop it and re-index"
                )
            names = {field["name"] for field in description["fields"]}
            missing = [name for name in _FIELDS if name not in names]
            if missing:
                raise ValueError(
                    f"Milvus collection {collection!r} has no {', '.join(map(repr, missing))} "
                    "field: it was made by an older ragtune, before metadata filters and "
                    "passages. Drop it "
                    f"(pymilvus: MilvusClient(uri).drop_collection({collection!r})) and send "
                    "the documents again, or name a new collection (milvus.collection)"
                )
        else:
            self._create()
        client.load_collection(collection)

    def _create(self) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("passage_id", DataType.VARCHAR, is_primary=True,
                         max_length=MAX_PASSAGE_ID)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_DOC_ID)
        schema.add_field("n", DataType.INT64)
        schema.add_field("start", DataType.INT64)
        schema.add_field("end", DataType.INT64)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("topic", DataType.VARCHAR, max_length=MAX_TOPIC)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE)
        # Not nullable (Milvus before 2.5 has no nullable fields): "" stands for "no date".
        schema.add_field("date", DataType.VARCHAR, max_length=MAX_DATE)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        index_params = self.client.prepare_index_params()
        index_params.add_index(
            field_name="vector", index_type="HNSW", metric_type="COSINE", params=_HNSW
        )
        # Strong consistency: a search right after an upsert sees it (idempotent re-delivery
        # and "ingest, then ask" both rely on that).
        self.client.create_collection(
            self.collection, schema=schema, index_params=index_params,
            consistency_level="Strong",
        )
        log.info("created Milvus collection %s (%d-d, HNSW/COSINE)", self.collection, self.dim)

    def upsert(self, parts: list[Passage], vectors: np.ndarray) -> None:
        """Replace the documents of ``parts`` by these passages, with ``vectors`` of shape
        (len(parts), dim).

        Every earlier passage of those documents is removed first, so a document that now has
        fewer passages leaves none behind. Titles, texts, topics and sources longer than the
        collection allows (in UTF-8 bytes) are cut, with a warning.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(parts), self.dim):
            raise ValueError(
                f"vectors have shape {vectors.shape}, expected ({len(parts)}, {self.dim})"
            )
        if not parts:
            return
        rows = [
            {
                "passage_id": part.passage_id,
                "doc_id": part.doc.doc_id,
                "n": part.n,
                "start": part.start,
                "end": part.end,
                "title": _fit(part.doc.title, MAX_TITLE, part.doc.doc_id, "title"),
                "text": _fit(part.text, MAX_TEXT, part.doc.doc_id, "text"),
                "topic": _fit(part.doc.topic, MAX_TOPIC, part.doc.doc_id, "topic"),
                "source": _fit(part.doc.source, MAX_SOURCE, part.doc.doc_id, "source"),
                "date": part.doc.date or "",
                "vector": vector.tolist(),
            }
            for part, vector in zip(parts, vectors, strict=True)
        ]
        self.delete(sorted({part.doc.doc_id for part in parts}))
        self.client.insert(self.collection, rows)

    def search(self, vector: np.ndarray, top_k: int,
               filters: Filters | None = None) -> list[Hit]:
        """The ``top_k`` documents nearest to ``vector`` (shape (dim,)) among those ``filters``
        allows (None: all).

        Scores are cosine similarities in [-1, 1], descending; equal scores by ascending doc_id.
        Fewer hits when fewer documents match. top_k above 16384 (Milvus' cap) is cut. Milvus
        applies the filter inside the HNSW search, so the hits are the nearest matching
        documents, not the matching part of the unfiltered top_k.
        """
        if top_k < 1:
            raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k}")
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dim,):
            raise ValueError(f"query vector has shape {vector.shape}, expected ({self.dim},)")
        top_k = min(top_k, MAX_LIMIT)
        limit = min((top_k + _TIE_MARGIN) * _PASSAGES_PER_DOC, MAX_LIMIT)
        results = self.client.search(
            self.collection,
            data=[vector.tolist()],
            limit=limit,
            filter=milvus_filter(filters),
            output_fields=["doc_id", "title", "text", "start", "end"],
            # bench/retrieval.py: recall@10 against exact search is .934 at ef=16, .994 at
            # Milvus' default and .999 at ef=128, for about the same latency. ef >= limit.
            search_params={"metric_type": "COSINE", "params": {"ef": max(_HNSW_EF, limit)}},
        )
        best: dict[str, Hit] = {}
        for row in results[0]:
            entity = row["entity"]
            hit = Hit(doc_id=str(entity["doc_id"]), title=entity["title"], text=entity["text"],
                      score=float(row["distance"]), start=int(entity["start"]),
                      end=int(entity["end"]))
            kept = best.get(hit.doc_id)
            if kept is None or hit.score > kept.score:
                best[hit.doc_id] = hit
        hits = sorted(best.values(), key=lambda hit: (-hit.score, hit.doc_id))
        return hits[:top_k]

    def delete(self, doc_ids: list[str]) -> None:
        """Remove every passage of these documents; unknown ids are ignored."""
        if doc_ids:
            quoted = ", ".join(_quote(doc_id) for doc_id in doc_ids)
            self.client.delete(self.collection, filter=f"doc_id in [{quoted}]")

    def rows(self, batch_size: int = 512):
        """Every passage row (all fields but the vector), in batches of at most
        ``batch_size`` dicts: what a re-index re-embeds."""
        fields = list(_FIELDS)
        for batch in self._batches("", fields, batch_size):
            yield [{name: row[name] for name in fields} for row in batch]

    def whole_document_vectors(self, docs: Sequence[Document], batch_size: int = 1024,
                               ) -> dict[str, np.ndarray]:
        """{doc_id: stored vector} of each of ``docs`` held whole in one passage with the same
        title and text, so that its vector is the encoding of the document's ``titled_text`` that
        ``corpus_embeddings`` makes. Documents split into several passages, changed since, or
        absent are left out."""
        wanted = {doc.doc_id: doc for doc in docs}
        out: dict[str, np.ndarray] = {}
        for batch in self._batches("n == 0", ["doc_id", "title", "text", "vector"], batch_size):
            for row in batch:
                doc = wanted.get(row["doc_id"])
                if doc is not None and (row["title"], row["text"]) == (doc.title, doc.text):
                    out[doc.doc_id] = np.asarray(row["vector"], dtype=np.float32)
        return out

    def _batches(self, expr: str, fields: list[str], batch_size: int):
        """The rows matching ``expr`` ("" for all), ``fields`` of each, in batches of at most
        ``batch_size``."""
        iterator = self.client.query_iterator(self.collection, batch_size=batch_size,
                                              filter=expr, output_fields=fields)
        try:
            while batch := iterator.next():
                yield batch
        finally:
            iterator.close()

    def insert_rows(self, rows: list[dict], vectors: np.ndarray) -> None:
        """Insert rows as ``rows`` yields them, with new ``vectors`` (len(rows), dim)."""
        if rows:
            self.client.insert(self.collection, [
                {**row, "vector": vector.tolist()}
                for row, vector in zip(rows, np.asarray(vectors, dtype=np.float32), strict=True)])

    def drop(self) -> None:
        """Delete the whole collection (a re-index replaced it)."""
        self.client.drop_collection(self.collection)

    def count(self) -> int:
        """Number of documents in the index (each has exactly one passage number 0)."""
        rows = self.client.query(self.collection, filter="n == 0", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def flush(self) -> None:
        """Seal what was written so it gets indexed: Milvus searches unflushed rows by brute
        force (measured ~130-200 ms per search on milvus-lite 3.2, against ~4 ms after)."""
        self.client.flush(self.collection)


# --- the live collection -------------------------------------------------------------------
# The collection that serves and takes every ingest and delete: after a re-index it is a
# version's own collection, and the base one stops receiving writes. A Milvus alias records
# which, switched only once a re-index is complete, so a replica that starts later (or a
# rollback) knows which collection holds the documents as they are now.
def live_alias(base: str) -> str:
    """The alias naming the live collection among ``base`` and its ``<base>_vNNNN``."""
    return f"{base}_live"


def live_collection(client: MilvusClient, base: str) -> str | None:
    """The collection ``live_alias(base)`` names; None before the first one was recorded."""
    alias = live_alias(base)
    if alias not in client.list_aliases()["aliases"]:
        return None
    return client.describe_alias(alias)["collection_name"]


def set_live(client: MilvusClient, base: str, collection: str) -> None:
    """Point ``live_alias(base)`` at ``collection`` (created or moved in one call)."""
    alias = live_alias(base)
    if alias in client.list_aliases()["aliases"]:
        client.alter_alias(collection, alias)
    else:
        client.create_alias(collection, alias)


def milvus_filter(filters: Filters | None) -> str:
    """The Milvus boolean expression for ``filters``; "" (everything) for None.

    Fields combine with ``and``, the values of one field with ``in [...]``. Values become
    string literals through ``_quote``, so no value can close its literal and add to the
    expression. An undated document (stored as "") never matches a date bound.
    """
    if filters is None:
        return ""
    clauses = []
    for field, values in (("topic", filters.topic), ("source", filters.source)):
        if values is not None:
            clauses.append(f"{field} in [{', '.join(map(_quote, values))}]")
    if filters.date_from is not None or filters.date_to is not None:
        clauses.append('date != ""')
    if filters.date_from is not None:
        clauses.append(f"date >= {_quote(filters.date_from)}")
    if filters.date_to is not None:
        clauses.append(f"date <= {_quote(filters.date_to)}")
    return " and ".join(clauses)


# Escapes of a double-quoted Milvus string literal. Its grammar ends a literal only at an
# unescaped '"' and forbids raw CR and LF; every other character may stand as it is (and
# milvus-lite 3.2 knows no \u or \x escapes, nor filter templates, so none are used).
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def _quote(value: str) -> str:
    return f'"{value.translate(_ESCAPES)}"'


def _vector_dim(description: dict) -> int | None:
    for field in description["fields"]:
        if field["name"] == "vector":
            return int(field["params"]["dim"])
    return None


def _fit(value: str, max_bytes: int, doc_id: str, field: str) -> str:
    data = value.encode("utf-8")
    if len(data) <= max_bytes:
        return value
    log.warning("document %s: %s cut from %d to %d bytes for Milvus", doc_id, field,
                len(data), max_bytes)
    return data[:max_bytes].decode("utf-8", errors="ignore")
