"""The question-answering front: validate, retrieve, generate; accept documents and feedback.

Plain class over an injected ``Bus``; ``services.qa.http`` puts HTTP in front of it and
``deploy.app`` makes it a Ray Serve ingress. It never imports another service: everything it
needs from them travels over the bus as wire models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.bus import Bus, BusError
from shared.prompt import shown, withhold
from shared.schemas import (
    WEIGHTED_MODES,
    AnswerChunk,
    DecodingOptions,
    DeleteBatch,
    Document,
    Envelope,
    Feedback,
    FeedbackAccepted,
    GenerateRequest,
    GenerateResult,
    IndexStats,
    IngestAccepted,
    IngestBatch,
    Passage,
    QARequest,
    QAResponse,
    RetrievalOptions,
    RetrieveRequest,
    RetrieveResult,
    StatsRequest,
    Status,
    StreamStatus,
)
from shared.settings import AnswerSettings, Settings

log = logging.getLogger(__name__)

# What redis-py raises when the bus cannot be reached (refused, reset, timed out, still
# loading): every ``QAService`` call that touches the bus may raise them. The fronts answer
# 503 / UNAVAILABLE with ``BUS_UNREACHABLE_MESSAGE`` (the address stays in the log).
BUS_UNREACHABLE = (RedisConnectionError, RedisTimeoutError)
BUS_UNREACHABLE_MESSAGE = "the message bus (Redis) is unreachable; try again later"


class InputError(ValueError):
    """Input the front refuses; ``field`` names where it is (e.g. ``documents.3.text``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class FeedbackFull(RuntimeError):
    """The trainer's feedback backlog has no room for the items; the caller should retry
    later (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, waiting: int, items: int, cap: int):
        super().__init__(f"{waiting} feedback items wait for the trainer and {items} more would "
                         f"pass the cap of {cap}; retry later")
        self.waiting = waiting
        self.items = items
        self.cap = cap


def check_document(doc: Document, settings: Settings, prefix: str = "") -> None:
    """InputError (field ``<prefix>title`` or ``<prefix>text``) for a title over
    ``limits.max_title_chars`` or a text over ``limits.max_document_chars``; the schema has
    checked everything else. The CLI applies it to every line of a file before sending any."""
    limits = settings.limits
    if len(doc.title) > limits.max_title_chars:
        raise InputError(f"{prefix}title", f"is {len(doc.title)} characters; the limit is "
                                           f"{limits.max_title_chars}")
    if len(doc.text) > limits.max_document_chars:
        raise InputError(f"{prefix}text", f"is {len(doc.text)} characters; the limit is "
                                          f"{limits.max_document_chars}")


def check_feedback(item: Feedback, settings: Settings, prefix: str = "") -> None:
    """InputError (field ``<prefix>question``, ``answer`` or ``correct_answer``) for stripped
    text over ``limits.max_question_chars`` (the question) or ``trainer.max_answer_chars`` (the
    answer and the target); the schema has checked everything else."""
    over = item.over_limits(settings.limits.max_question_chars,
                            settings.trainer.max_answer_chars)
    if over:
        field, length, limit = over[0]
        raise InputError(f"{prefix}{field}", f"is {length} characters; the limit is {limit}")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _response(question: str, retrieved: RetrieveResult, generated: GenerateResult,
              retrieve_ms: float, generate_timings: dict[str, float], request_id: str,
              gate: AnswerSettings) -> QAResponse:
    """The response; an answer whose trust (measured on the passages as the generator's prompt
    held them) is below ``gate.min_trust`` is withheld: ``answer`` becomes ``NO_ANSWER``
    without citations and ``draft`` keeps the generator's words."""
    evidence = shown(retrieved.hits, generated.shown_chars)
    answer, trust, draft = withhold(generated.answer, evidence, question=question,
                                    min_trust=gate.min_trust,
                                    by_sentence=gate.trust_by_sentence)
    citations = [] if draft is not None else generated.citations
    return QAResponse(
        question=question, answer=answer, citations=citations, trust=trust, draft=draft,
        passages=[Passage(rank=i, doc_id=h.doc_id, title=h.title, text=h.text, score=h.score)
                  for i, h in enumerate(retrieved.hits, start=1)],
        timings_ms={"retrieve": retrieve_ms,
                    **{f"retrieve.{k}": v for k, v in retrieved.timings_ms.items()},
                    **generate_timings,
                    "total": round(retrieve_ms + generate_timings["generate"], 2)},
        request_id=request_id)


class QAService:
    def __init__(self, bus: Bus, settings: Settings):
        self.bus = bus
        self.settings = settings

    # --- questions ----------------------------------------------------------------------
    def check_question(self, req: QARequest) -> tuple[str, int]:
        """The stripped question and top_k, or InputError naming the bad field."""
        limits = self.settings.limits
        question = req.question.strip()
        if not question:
            raise InputError("question", "must not be empty or only whitespace")
        if len(question) > limits.max_question_chars:
            raise InputError("question", f"is {len(question)} characters; the limit is "
                                         f"{limits.max_question_chars}")
        top_k = self.settings.retrieval.top_k if req.top_k is None else req.top_k
        if not 1 <= top_k <= limits.max_top_k:
            raise InputError("top_k", f"must be between 1 and {limits.max_top_k}, got {top_k}")
        return question, top_k

    def retrieve_request(self, question: str, top_k: int,
                         options: RetrievalOptions | None) -> RetrieveRequest:
        """The ranker request for these per-request options over the server defaults."""
        defaults = self.settings.retrieval
        options = options or RetrievalOptions()
        mode = options.mode or defaults.mode
        if options.weights is not None and mode not in WEIGHTED_MODES:
            raise InputError("retrieval.weights", f"only apply to the modes "
                                                  f"{', '.join(WEIGHTED_MODES)}; mode is {mode}")
        if options.rrf_k is not None and mode != "rrf":
            raise InputError("retrieval.rrf_k", f"only applies to mode rrf; mode is {mode}")
        return RetrieveRequest(
            question=question, top_k=top_k, candidates=max(top_k, defaults.candidates),
            mode=mode, rrf_k=options.rrf_k, filters=options.filters, rerank=options.rerank,
            weight=defaults.weight if options.weights is None else options.weights.dense)

    def check_decoding(self, options: DecodingOptions | None) -> tuple[DecodingOptions, int]:
        """The request's decoding options (None = greedy) and the answer length they resolve
        to (``generator.max_new_tokens`` unless they name one), or InputError when that is
        over ``generator.max_new_tokens_limit``."""
        options = options or DecodingOptions()
        settings = self.settings.generator
        max_new = options.max_new_tokens or settings.max_new_tokens  # validated >= 1
        if max_new > settings.max_new_tokens_limit:
            raise InputError("decoding.max_new_tokens", f"is {max_new}; the limit is "
                                                        f"{settings.max_new_tokens_limit}")
        return options, max_new

    async def answer(self, req: QARequest, request_id: str) -> QAResponse:
        """Retrieve passages for the question and generate a grounded, cited answer.

        Raises InputError for bad input and shared.bus.BusError (Busy, RequestTimeout, ...)
        when a backend service fails or refuses the request (kind ``bad_request``, e.g. a
        prompt that cannot fit the generator's context).
        """
        question, generate, retrieved, retrieve_ms = await self._retrieve(req)
        start = time.perf_counter()
        generated: GenerateResult = await self.bus.request(
            keys.GENERATOR, "generate", generate, self.settings.serve.request_timeout_s,
            GenerateResult)
        timings = {"generate": _ms(start)}
        log.info("request %s answered in %.0f ms", request_id, retrieve_ms + timings["generate"])
        return _response(question, retrieved, generated, retrieve_ms, timings, request_id,
                         self.settings.answer)

    async def answer_stream(self, req: QARequest,
                            request_id: str) -> AsyncIterator[AnswerChunk | QAResponse]:
        """``answer``, streamed: ``AnswerChunk``s while the answer is generated, then the
        ``QAResponse`` (always last; its ``answer`` is the authority, see
        ``services.generator.streaming.streamable``, and says "I don't know." when the
        streamed answer's trust is below ``answer.min_trust``; ``timings_ms`` adds
        ``generate.first_token``).

        Raises as ``answer`` does, input errors before anything is yielded. Closing the
        iterator early (the client went away) stops the generation.
        """
        question, generate, retrieved, retrieve_ms = await self._retrieve(req)
        start = time.perf_counter()
        timings: dict[str, float] = {}
        async for item in self.bus.request_stream(
                keys.GENERATOR, "generate_stream", generate,
                self.settings.serve.request_timeout_s, AnswerChunk, GenerateResult):
            if isinstance(item, AnswerChunk):
                timings.setdefault("generate.first_token", _ms(start))
                yield item
                continue
            timings["generate"] = _ms(start)
            log.info("request %s streamed in %.0f ms", request_id,
                     retrieve_ms + timings["generate"])
            yield _response(question, retrieved, item, retrieve_ms, timings, request_id,
                            self.settings.answer)

    async def _retrieve(self, req: QARequest):
        """``(question, generate request, retrieved, retrieve ms)`` for a question, checked."""
        question, top_k = self.check_question(req)
        retrieve = self.retrieve_request(question, top_k, req.retrieval)
        decoding, max_new_tokens = self.check_decoding(req.decoding)
        start = time.perf_counter()
        retrieved: RetrieveResult = await self.bus.request(
            keys.RANKER, "retrieve", retrieve, self.settings.serve.request_timeout_s,
            RetrieveResult)
        generate = GenerateRequest(question=question, passages=retrieved.hits,
                                   max_new_tokens=max_new_tokens, decoding=decoding)
        return question, generate, retrieved, _ms(start)

    # --- documents ----------------------------------------------------------------------
    def check_documents(self, documents: list[Document]) -> None:
        """InputError naming the first bad field; checks every document before any is sent."""
        limits = self.settings.limits
        if not documents:
            raise InputError("documents", "must hold at least one document")
        if len(documents) > limits.max_documents_per_request:
            raise InputError("documents", f"holds {len(documents)} documents; the limit per "
                                          f"request is {limits.max_documents_per_request}")
        seen: set[str] = set()
        for i, doc in enumerate(documents):
            if doc.doc_id in seen:
                raise InputError(f"documents.{i}.doc_id", f"{doc.doc_id!r} appears twice")
            seen.add(doc.doc_id)
            check_document(doc, self.settings, prefix=f"documents.{i}.")

    async def ingest(self, documents: list[Document], wait: bool = False) -> IngestAccepted:
        """Put the documents on ``rag:ingest`` (atomically, in batches) for both indexes.

        Idempotent by doc_id: sending a document again replaces it. With ``wait``, returns
        once both the embedding and the sparse group have indexed every batch (or raises
        TimeoutError after ``serve.request_timeout_s``).
        """
        self.check_documents(documents)
        size = self.settings.limits.ingest_batch
        batches = [IngestBatch(documents=documents[i:i + size])
                   for i in range(0, len(documents), size)]
        entries = await self._enqueue([
            Envelope(id=f"ingest-{b.documents[0].doc_id}", kind="ingest", body=b.model_dump())
            for b in batches], wait)
        return IngestAccepted(accepted=len(documents), doc_ids=[d.doc_id for d in documents],
                              entries=entries, indexed=wait)

    async def delete(self, doc_ids: list[str], wait: bool = False) -> IngestAccepted:
        """Remove documents from both indexes (unknown ids are ignored); InputError (field
        ``doc_ids.<i>``) for a doc_id ``DeleteBatch`` refuses, before anything is sent.

        Goes through ``rag:ingest`` like an upsert, so each index applies ingests and deletes
        in the order they were sent. ``wait`` as for ``ingest``.
        """
        if not doc_ids:
            raise InputError("doc_ids", "must hold at least one doc_id")
        try:
            batch = DeleteBatch(doc_ids=doc_ids)
        except ValidationError as exc:  # an empty or too long doc_id
            error = exc.errors()[0]
            raise InputError(".".join(str(p) for p in error["loc"]), error["msg"]) from None
        entries = await self._enqueue([Envelope(
            id=f"delete-{doc_ids[0]}", kind="delete", body=batch.model_dump())], wait)
        return IngestAccepted(accepted=len(doc_ids), doc_ids=doc_ids, entries=entries,
                              indexed=wait)

    async def _enqueue(self, envelopes: list[Envelope], wait: bool) -> list[str]:
        """Add entries to ``rag:ingest`` atomically; with ``wait``, return once both index
        groups processed them (TimeoutError after ``serve.request_timeout_s``)."""
        for group in keys.INGEST_GROUPS:
            await self.bus.ensure_group(keys.INGEST, group)
        entries = await self.bus.add_many(keys.INGEST, envelopes)
        if wait:
            await asyncio.wait_for(self.wait_indexed(entries),
                                   self.settings.serve.request_timeout_s)
        return entries

    async def wait_indexed(self, entries: list[str], poll_s: float = 0.1) -> None:
        """Return once every ingest group has processed every entry."""
        for group in keys.INGEST_GROUPS:
            for entry in entries:
                while not await self.bus.processed(keys.INGEST, group, entry):
                    await asyncio.sleep(poll_s)

    # --- feedback -----------------------------------------------------------------------
    def check_feedback(self, items: list[Feedback]) -> None:
        """InputError naming the first bad field (``items.3.correct_answer``); checks every
        item before any is sent."""
        cap = self.settings.feedback.max_pending
        if not items:
            raise InputError("items", "must hold at least one item")
        if len(items) > cap:
            raise InputError("items", f"holds {len(items)} items; at most {cap} can wait for "
                                      "the trainer (feedback.max_pending)")
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.feedback_id in seen:
                raise InputError(f"items.{i}.feedback_id",
                                 f"{item.feedback_id!r} appears twice")
            seen.add(item.feedback_id)
            check_feedback(item, self.settings, prefix=f"items.{i}.")

    async def feedback(self, items: list[Feedback]) -> FeedbackAccepted:
        """Put judged answers on ``rag:feedback`` for the trainer, all or none.

        Raises InputError for a bad item and FeedbackFull when the trainer's backlog (entries
        it has not finished) plus the items would pass ``feedback.max_pending``; then nothing
        is added.
        """
        self.check_feedback(items)
        cap = self.settings.feedback.max_pending
        await self.bus.ensure_group(keys.FEEDBACK, keys.TRAINER)
        waiting = await self.bus.backlog(keys.FEEDBACK, keys.TRAINER)
        if waiting + len(items) > cap:
            raise FeedbackFull(waiting, len(items), cap)
        envelopes = [Envelope(id=f"feedback-{item.feedback_id}", kind="feedback",
                              body=item.model_dump()) for item in items]
        # Exact, not approximate: fronts that pass the check above at the same moment still
        # cannot grow the stream past the cap (the oldest entries are trimmed instead).
        entries = await self.bus.add_many(keys.FEEDBACK, envelopes, maxlen=cap,
                                          approximate=False)
        log.info("feedback: %d items queued (%d were waiting)", len(items), waiting)
        return FeedbackAccepted(accepted=len(items),
                                feedback_ids=[item.feedback_id for item in items],
                                entries=entries)

    # --- status -------------------------------------------------------------------------
    async def status(self) -> Status:
        """Stream lengths, pending entries and lag per group (the feedback backlog included),
        index sizes, dead letters."""
        pairs = [(keys.request_stream(s), s) for s in keys.SERVICES]
        pairs += [(keys.INGEST, g) for g in keys.INGEST_GROUPS]
        pairs += [(keys.FEEDBACK, keys.TRAINER)]
        streams = [await self._stream_status(stream, group) for stream, group in pairs]
        services = {s.group: f"{s.consumers} consumer(s)" if s.consumers else "no consumers"
                    for s in streams[: len(keys.SERVICES)]}
        documents: dict[str, int | None] = {}
        for service in keys.INGEST_GROUPS:
            try:
                stats = await self.bus.request(service, "stats", StatsRequest(), 10.0,
                                               IndexStats)
                documents[service] = stats.documents
            except BusError as exc:
                log.warning("status: %s", exc)
                documents[service] = None
        return Status(services=services, documents=documents, streams=streams,
                      dead_letters=await self.bus.redis.xlen(keys.DEAD))

    async def _stream_status(self, stream: str, group: str) -> StreamStatus:
        info: dict = {}
        with contextlib.suppress(ResponseError):  # no such stream yet
            for candidate in await self.bus.redis.xinfo_groups(stream):
                if candidate["name"] in (group, group.encode()):
                    info = candidate
        return StreamStatus(stream=stream, group=group, length=await self.bus.redis.xlen(stream),
                            pending=int(info.get("pending", 0)), lag=int(info.get("lag") or 0),
                            consumers=int(info.get("consumers", 0)))
