"""HTTP API of the QA front (FastAPI). ``deploy.app`` serves it as the Ray Serve ingress.

Errors: bad input → 422 with FastAPI's ``detail`` shape (``loc`` names the field), decoding
options included; input a backend refuses (a prompt that cannot fit the generator's context)
→ 400 naming the service; a busy service → 503; a backend that did not answer in time → 504;
a backend failure → 502.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from services.qa.service import InputError, QAService
from shared.bus import BusError, Busy, RequestTimeout
from shared.schemas import IngestAccepted, IngestRequest, QARequest, QAResponse, Status

log = logging.getLogger(__name__)


def create_app(qa: QAService) -> FastAPI:
    app = FastAPI(title="ragtune", version="0.1.0",
                  description="Retrieval-augmented question answering on your documents.")

    @app.exception_handler(InputError)
    async def _input_error(_request: Request, exc: InputError) -> JSONResponse:
        loc = ["body", *exc.field.split(".")]
        loc = [int(p) if isinstance(p, str) and p.isdigit() else p for p in loc]
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": loc, "msg": exc.message, "type": "value_error"}]})

    @app.exception_handler(BusError)
    async def _bus_error(_request: Request, exc: BusError) -> JSONResponse:
        status = {Busy: 503, RequestTimeout: 504}.get(type(exc), 502)
        if exc.info.kind == "bad_request":
            status = 400
        log.warning("request failed: %s", exc)
        return JSONResponse(status_code=status, content={"detail": exc.info.model_dump()})

    @app.post("/v1/qa", response_model=QAResponse)
    async def ask(req: QARequest) -> QAResponse:
        """Answer a question from the indexed documents, citing the passages used."""
        return await qa.answer(req, request_id=uuid.uuid4().hex[:16])

    @app.post("/v1/documents", response_model=IngestAccepted, status_code=202)
    async def ingest(req: IngestRequest,
                     wait: bool = Query(False, description="return once both indexes hold "
                                                           "the documents")) -> IngestAccepted:
        """Add or replace documents (by doc_id) in both the dense and the sparse index."""
        return await qa.ingest(req.documents, wait=wait)

    @app.delete("/v1/documents/{doc_id:path}", response_model=IngestAccepted, status_code=202)
    async def delete(doc_id: str,
                     wait: bool = Query(False, description="return once both indexes "
                                                           "dropped it")) -> IngestAccepted:
        """Remove a document from both the dense and the sparse index."""
        return await qa.delete([doc_id], wait=wait)

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
