"""HTTP API of the QA front (FastAPI). ``deploy.app`` serves it as the Ray Serve ingress.

Errors: bad input → 422 with FastAPI's ``detail`` shape (``loc`` names the field), decoding
options, feedback items and path and query values included; input a backend refuses (a
prompt that cannot fit the generator's context) → 400 naming the service; a busy service →
503; a message bus (Redis) that cannot be reached → 503 with ``{"detail": ErrorInfo}`` (kind
``unavailable``), ``/v1/health`` included; feedback the trainer's backlog has no room for
(``feedback.max_pending``) → 429 with ``Retry-After`` and ``{"detail": ErrorInfo}`` (kind
``busy``), nothing of the request kept; a backend that did not answer in time → 504; a
backend failure → 502; a missing or wrong API key (when ``serve.api_key`` is set) → 401.

``POST /v1/qa?stream=true`` answers with server-sent events instead: ``token`` events (an
``AnswerChunk``: the answer's next piece) while the answer is generated, then one ``answer``
event (the ``QAResponse``, citations included), or an ``error`` event (``{"detail":
ErrorInfo}``) if a backend or the bus fails after the first event. Errors before it are the
status codes above. A client that disconnects stops the generation.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, get_args

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.qa.auth import UNAUTHENTICATED, authorized
from services.qa.service import (
    BUS_UNREACHABLE,
    BUS_UNREACHABLE_MESSAGE,
    FeedbackFull,
    InputError,
    QAService,
)
from shared.bus import BusError, Busy, RequestTimeout
from shared.schemas import (
    AnswerChunk,
    DeleteBatch,
    ErrorInfo,
    FeedbackAccepted,
    FeedbackRequest,
    IngestAccepted,
    IngestRequest,
    QARequest,
    QAResponse,
    Status,
)

log = logging.getLogger(__name__)

# Probes (Serve's, Kubernetes') and the API docs need no key.
OPEN_PATHS = frozenset({"/v1/health"})

# Retry-After of a 429 on /v1/feedback, in seconds: the backlog drains as the trainer reads
# it (it stores each item; training on them is a separate job), so a short wait suffices.
FEEDBACK_RETRY_AFTER_S = 10

# A doc_id as ``DeleteBatch`` takes it, so that FastAPI checks the path against the schema's
# own bounds: a bad one is a 422 naming ``path.doc_id``, as a bad body names its field.
DocId = get_args(DeleteBatch.model_fields["doc_ids"].annotation)[0]

# The 503 body when the bus cannot be reached, mid-stream the ``error`` event's.
BUS_DOWN = ErrorInfo(service="qa", kind="unavailable", message=BUS_UNREACHABLE_MESSAGE)

_SSE_DOC = {200: {"description": "with `stream=true`: server-sent events `token` (an "
                                 "AnswerChunk), then `answer` (the QAResponse) or `error`",
                  "content": {"text/event-stream": {}}}}


class RequireApiKey:
    """ASGI middleware: every ``/v1/`` request but ``OPEN_PATHS`` must present ``key``
    (``services.qa.auth``), else 401. Plain ASGI, so streamed responses stream as they are."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith("/v1/")
                and scope["path"] not in OPEN_PATHS):
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            if not authorized(self.key, headers):
                response = JSONResponse(
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                    content={"detail": ErrorInfo(service="qa", kind="unauthenticated",
                                                 message=UNAUTHENTICATED).model_dump()})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(qa: QAService) -> FastAPI:
    """The API over ``qa``; with ``qa.settings.serve.api_key`` set, every /v1 route but
    /v1/health needs it."""
    app = FastAPI(title="ragtune", version="0.1.0",
                  description="Retrieval-augmented question answering on your documents.")
    api_key = qa.settings.serve.api_key
    if api_key is not None:
        app.add_middleware(RequireApiKey, key=api_key.get_secret_value())

    @app.exception_handler(InputError)
    async def _input_error(_request: Request, exc: InputError) -> JSONResponse:
        loc = ["body", *exc.field.split(".")]
        loc = [int(p) if isinstance(p, str) and p.isdigit() else p for p in loc]
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": loc, "msg": exc.message, "type": "value_error"}]})

    @app.exception_handler(FeedbackFull)
    async def _feedback_full(_request: Request, exc: FeedbackFull) -> JSONResponse:
        log.warning("feedback refused: %s", exc)
        return JSONResponse(status_code=429,
                            headers={"Retry-After": str(FEEDBACK_RETRY_AFTER_S)},
                            content={"detail": ErrorInfo(service="qa", kind="busy",
                                                         message=str(exc)).model_dump()})

    async def _bus_unreachable(_request: Request, exc: Exception) -> JSONResponse:
        log.error("message bus unreachable: %s", exc)
        return JSONResponse(status_code=503, content={"detail": BUS_DOWN.model_dump()})

    for unreachable in BUS_UNREACHABLE:
        app.add_exception_handler(unreachable, _bus_unreachable)

    @app.exception_handler(BusError)
    async def _bus_error(_request: Request, exc: BusError) -> JSONResponse:
        status = {Busy: 503, RequestTimeout: 504}.get(type(exc), 502)
        # worded by the service: input it will never accept, or a thing it does not have
        status = {"bad_request": 400, "not_found": 404}.get(exc.info.kind, status)
        log.warning("request failed: %s", exc)
        return JSONResponse(status_code=status, content={"detail": exc.info.model_dump()})

    @app.post("/v1/qa", response_model=QAResponse, responses=_SSE_DOC)
    async def ask(req: QARequest, request: Request,
                  stream: bool = Query(False, description="stream the answer as server-sent "
                                                          "events")):
        """Answer a question from the indexed documents, citing the passages used."""
        request_id = uuid.uuid4().hex[:16]
        if not stream:
            return await qa.answer(req, request_id=request_id)
        events = qa.answer_stream(req, request_id=request_id)
        first = await anext(events)  # errors up to here are plain HTTP errors
        return StreamingResponse(_sse(first, events, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.post("/v1/documents", response_model=IngestAccepted, status_code=202)
    async def ingest(req: IngestRequest,
                     wait: bool = Query(False, description="return once both indexes hold "
                                                           "the documents")) -> IngestAccepted:
        """Add or replace documents (by doc_id) in both the dense and the sparse index."""
        return await qa.ingest(req.documents, wait=wait)

    @app.delete("/v1/documents/{doc_id:path}", response_model=IngestAccepted, status_code=202)
    async def delete(doc_id: Annotated[DocId, Path(description="the document's doc_id")],
                     wait: bool = Query(False, description="return once both indexes "
                                                           "dropped it")) -> IngestAccepted:
        """Remove a document from both the dense and the sparse index."""
        return await qa.delete([doc_id], wait=wait)

    @app.post("/v1/feedback", response_model=FeedbackAccepted, status_code=202,
              responses={429: {"description": "the trainer's feedback backlog is full; retry "
                                              "after `Retry-After` seconds"}})
    async def feedback(req: FeedbackRequest) -> FeedbackAccepted:
        """Judge answers (``right``, or ``wrong`` with the correct answer) for the trainer's
        next continual update; the items are queued all or none."""
        return await qa.feedback(req.items)

    @app.exception_handler(TimeoutError)
    async def _timeout(_request: Request, exc: TimeoutError) -> JSONResponse:
        return JSONResponse(status_code=504, content={"detail": {
            "service": "qa", "kind": "timeout",
            "message": "the indexes did not finish in time; the work is queued and will "
                       "complete"}})

    @app.get("/v1/status", response_model=Status)
    async def status() -> Status:
        return await qa.status()

    @app.get("/v1/health")
    async def health() -> dict:
        await qa.bus.redis.ping()
        return {"status": "ok"}

    return app


def sse_event(item: AnswerChunk | QAResponse | ErrorInfo) -> str:
    """One server-sent event: ``token``, ``answer`` or ``error``, its data one JSON line."""
    if isinstance(item, ErrorInfo):
        return f"event: error\ndata: {{\"detail\": {item.model_dump_json()}}}\n\n"
    name = "token" if isinstance(item, AnswerChunk) else "answer"
    return f"event: {name}\ndata: {item.model_dump_json()}\n\n"


async def _sse(first: AnswerChunk | QAResponse,
               events: AsyncIterator[AnswerChunk | QAResponse],
               request: Request) -> AsyncIterator[str]:
    item = first
    try:
        while True:
            yield sse_event(item)
            if isinstance(item, QAResponse):
                return
            # The server may notice a closed connection only when a write fails: look
            # before each token, so that a client that left stops the generation at once.
            if await request.is_disconnected():
                log.info("client left; stopping the generation")
                return
            item = await anext(events)
    except BusError as exc:
        log.warning("stream failed: %s", exc)
        yield sse_event(exc.info)
    except BUS_UNREACHABLE as exc:
        log.error("stream failed, message bus unreachable: %s", exc)
        yield sse_event(BUS_DOWN)
    finally:
        await events.aclose()  # before the answer: cancels the generation
