"""Wire schemas: every message that crosses a process boundary (bus or HTTP).

Each model carries ``schema_version``; a message of another version is refused (dead-lettered
on the bus, 422 over HTTP). Unknown fields are refused too, so a typo never passes silently.
Engine objects (tensors, Milvus rows) never travel: services convert with named functions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION = 1

NonBlank = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


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


class IngestBatch(Wire):
    """One ``rag:ingest`` entry: read by both the embedding and the sparse groups."""

    documents: list[Document] = Field(min_length=1)


class IngestRequest(Wire):
    """Body of ``POST /v1/documents``."""

    documents: list[Document] = Field(min_length=1)


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
class SearchRequest(Wire):
    query: NonBlank
    top_k: int = Field(ge=1)


class Hit(Wire):
    doc_id: str
    title: str
    text: str
    score: float


class SearchResult(Wire):
    """Hits in descending score order (ties: ascending doc_id)."""

    hits: list[Hit]
    count: int = Field(0, description="documents in the index when searched")


class RetrieveRequest(Wire):
    question: NonBlank
    top_k: int = Field(ge=1)
    candidates: int = Field(ge=1)


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
class QARequest(Wire):
    question: str = Field(description="the question, 1..limits.max_question_chars characters")
    top_k: int | None = Field(None, description="passages to ground the answer on")


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
