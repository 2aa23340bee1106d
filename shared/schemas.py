"""Wire schemas: every message that crosses a process boundary (bus or HTTP).

Each model carries ``schema_version``; a message of another version is refused (dead-lettered
on the bus, 422 over HTTP). Unknown fields are refused too, so a typo never passes silently.
Engine objects (tensors, Milvus rows) never travel: services convert with named functions.
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

SCHEMA_VERSION = 1

NonBlank = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_date(value: str) -> str:
    # The pattern first: date.fromisoformat also takes "20240105" and "2024-W01-1".
    if not _ISO_DATE.fullmatch(value):
        raise ValueError(f"must be an ISO date YYYY-MM-DD, got {value!r}")
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a calendar date") from None
    return value


# Kept as a string on the wire and in both indexes: ISO dates order the same as text, so
# Milvus and SQLite compare them with plain string comparisons.
IsoDate = Annotated[str, AfterValidator(_iso_date)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION


# --- documents and ingestion -------------------------------------------------------------
class Document(Wire):
    """One document of the knowledge base; ``doc_id`` is its identity (upserts replace)."""

    doc_id: Annotated[str, StringConstraints(min_length=1, max_length=256,
                                             pattern=r"^[^\s].*[^\s]$|^[^\s]$")]
    title: NonBlank
    text: NonBlank
    topic: str = ""
    source: str = ""
    date: IsoDate | None = Field(None, description="YYYY-MM-DD; None = undated (never "
                                                   "matches a date filter)")


class IngestBatch(Wire):
    """One ``rag:ingest`` entry: read by both the embedding and the sparse groups."""

    documents: list[Document] = Field(min_length=1)


class IngestRequest(Wire):
    """Body of ``POST /v1/documents``."""

    documents: list[Document] = Field(min_length=1)


class DeleteBatch(Wire):
    """A ``rag:ingest`` entry of kind ``delete``: both indexes drop these doc_ids."""

    doc_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        min_length=1)


class IngestAccepted(Wire):
    """HTTP reply to ``POST /v1/documents``: the bus entries that carry the documents."""

    accepted: int
    doc_ids: list[str]
    entries: list[str]
    indexed: bool = False


class StatsRequest(Wire):
    """Ask a retriever how many documents its index holds."""


class IndexStats(Wire):
    documents: int


# --- retrieval -------------------------------------------------------------------------------
# Filter values are compared with the stored metadata exactly (case and accents count).
FilterValues = Annotated[list[Annotated[str, StringConstraints(max_length=256)]],
                         Field(min_length=1, max_length=100)]


class Filters(Wire):
    """Metadata filters of a search: a document matches when it matches every field that is set.

    ``topic`` / ``source``: the document's value is one of the listed ones. ``date_from`` /
    ``date_to``: inclusive bounds on the document's ``date``; a document without a date never
    matches a date filter. Retrievers return the best matches among the matching documents
    (filtering happens before the top-k cut, not after it).
    """

    topic: FilterValues | None = None
    source: FilterValues | None = None
    date_from: IsoDate | None = None
    date_to: IsoDate | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        # extra="forbid" would refuse it too; this names the fields one can filter on.
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                known = ", ".join(f for f in cls.model_fields if f != "schema_version")
                raise ValueError(f"unknown filter field {unknown[0]!r}; known: {known}")
        return data

    @model_validator(mode="after")
    def _date_order(self) -> Filters:
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError(f"date_from ({self.date_from}) is after date_to ({self.date_to})")
        return self


class SearchRequest(Wire):
    query: NonBlank
    top_k: int = Field(ge=1)
    filters: Filters | None = None


class Hit(Wire):
    doc_id: str
    title: str
    text: str = Field(description="the document's text, or its best passage for dense hits")
    score: float
    start: int | None = Field(None, description="offset of ``text`` in the document's text")
    end: int | None = None


class SearchResult(Wire):
    """Hits in descending score order (ties: ascending doc_id)."""

    hits: list[Hit]
    count: int = Field(0, description="documents in the index when searched")


class RetrieveRequest(Wire):
    question: NonBlank
    top_k: int = Field(ge=1)
    candidates: int = Field(ge=1)
    mode: str = Field("rrf", description="fusion mode, one of services.ranker.fusion.MODES")
    weight: float = Field(0.5, ge=0, le=1,
                          description="dense share of weighted_* fusion (1 = dense only)")
    rrf_k: int | None = Field(None, ge=1,
                              description="RRF constant; None = the ranker's configured one")
    filters: Filters | None = Field(None, description="passed to both retrievers")
    rerank: bool | None = Field(None, description="run the reranking stage; None = when the "
                                                  "ranker has a trained reranker")


class RetrieveResult(Wire):
    hits: list[Hit]
    timings_ms: dict[str, float] = {}


# --- generation ------------------------------------------------------------------------------
class GenerateRequest(Wire):
    question: NonBlank
    passages: list[Hit]
    max_new_tokens: int = Field(ge=1)


class Citation(Wire):
    passage: int = Field(ge=1, description="1-based number of the passage in the prompt")
    doc_id: str
    title: str


class GenerateResult(Wire):
    answer: str
    citations: list[Citation]
    prompt_tokens: int
    completion_tokens: int


# --- the QA front ----------------------------------------------------------------------------
# The ranker's fusion modes (services/ranker/fusion.py holds one strategy per name; a test
# keeps the two lists equal). Named here so the front validates them at the edge.
FusionMode = Literal["rrf", "weighted_minmax", "weighted_zscore", "dense", "sparse"]
WEIGHTED_MODES = ("weighted_minmax", "weighted_zscore")


class FusionWeights(Wire):
    """Shares of the dense and the sparse score in weighted fusion; they sum to 1."""

    dense: float = Field(ge=0, le=1)
    sparse: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> FusionWeights:
        if abs(self.dense + self.sparse - 1) > 1e-6:
            raise ValueError(f"dense + sparse must be 1, got {self.dense} + {self.sparse} = "
                             f"{self.dense + self.sparse:g}")
        return self


class RetrievalOptions(Wire):
    """Per-request retrieval choices; unset fields take the server's ``retrieval`` settings."""

    mode: FusionMode | None = None
    weights: FusionWeights | None = Field(None, description="only for weighted_* modes")
    rrf_k: int | None = Field(None, ge=1, le=10_000, description="only for mode rrf")
    filters: Filters | None = Field(None, description="metadata filters (topic, source, date)")
    rerank: bool | None = Field(None, description="cross-encoder reranking; None = on when "
                                                  "a trained reranker is configured")


class QARequest(Wire):
    question: str = Field(description="the question, 1..limits.max_question_chars characters")
    top_k: int | None = Field(None, description="passages to ground the answer on")
    retrieval: RetrievalOptions | None = None


class Passage(Wire):
    rank: int
    doc_id: str
    title: str
    text: str
    score: float


class QAResponse(Wire):
    question: str
    answer: str
    citations: list[Citation]
    passages: list[Passage]
    timings_ms: dict[str, float]
    request_id: str


class StreamStatus(Wire):
    stream: str
    group: str
    length: int
    pending: int
    lag: int
    consumers: int


class Status(Wire):
    """``GET /v1/status``: what a operator needs to see at a glance."""

    services: dict[str, str]
    documents: dict[str, int | None]
    streams: list[StreamStatus]
    dead_letters: int


# --- bus envelopes ---------------------------------------------------------------------------
class ErrorInfo(Wire):
    service: str
    kind: str = Field(description="bad_request | failed | dead_letter | timeout | busy")
    message: str


class Envelope(Wire):
    """What every stream entry carries (as JSON in its ``msg`` field)."""

    id: str
    kind: str
    body: dict
    reply_to: str | None = None
    deadline: float | None = Field(None, description="unix time after which it is dropped")


class Reply(Wire):
    id: str
    ok: bool
    body: dict | None = None
    error: ErrorInfo | None = None


class DeadLetter(Wire):
    stream: str
    group: str
    entry_id: str
    deliveries: int
    reason: str
    raw: str = Field(description="the original entry's msg field, cut to 4 kB")


class Event(Wire):
    """A broadcast on ``rag:events`` that every replica sees."""

    kind: str
    data: dict = {}
