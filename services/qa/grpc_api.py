"""The QA API over gRPC (``services/qa/proto/qa.proto``): the same service and checks as HTTP.

``QAGrpc`` is the API, whatever server hosts it: each method takes the request message and
the call's metadata, returns response messages, and raises ``RpcFailure`` (a status code and
a message). Two thin hosts call it: ``QAServicer`` on a plain ``grpc.aio`` server (the tests,
a standalone server) and the Serve ingress (``deploy.app.QAFront``), whose gRPC proxy calls
methods named as the RPCs and reads the status from ``serve_status``.

Requests become the pydantic wire models (``QARequest``, ``IngestRequest``,
``FeedbackRequest``) and are checked by them and by ``QAService``, so what HTTP refuses with
422 is INVALID_ARGUMENT here, its message naming the field (``decoding.top_p: ...``,
``items.0: Value error, a `wrong` verdict needs `correct_answer` ...``). Bytes that do not
parse as the request message reach the API as ``Unparsed`` (``add_servicer`` installs that
lenient parsing) and are INVALID_ARGUMENT too, never a server error. Other codes:
UNAUTHENTICATED (missing or wrong API key), INVALID_ARGUMENT also for a prompt the generator
cannot fit, RESOURCE_EXHAUSTED (a busy service, or feedback the trainer's backlog has no room
for: retry later), DEADLINE_EXCEEDED (a backend too slow), UNAVAILABLE (a backend failed, or
the message bus cannot be reached).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from services.qa.auth import UNAUTHENTICATED, authorized
from services.qa.proto import qa_pb2
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
    FeedbackAccepted,
    FeedbackRequest,
    IngestRequest,
    QARequest,
    QAResponse,
)

log = logging.getLogger(__name__)

SERVICE = qa_pb2.DESCRIPTOR.services_by_name["QA"].full_name  # ragtune.qa.v1.QA
Metadata = Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Unparsed:
    """A request whose bytes are not a valid ``message`` (``error`` says why)."""

    message: str
    error: str


class RpcFailure(Exception):
    """The call ends with ``code`` and ``message`` (the status details)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):
        # Serve pickles a replica's exception back to its gRPC proxy.
        return type(self), (self.code, self.message)


def _lenient(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Unparsed(message_type.DESCRIPTOR.full_name, str(exc) or "cannot be parsed")
    return parse


def add_servicer(servicer, server) -> None:
    """Register ``servicer``'s ``Answer``, ``AnswerStream``, ``IngestDocuments`` and
    ``SubmitFeedback`` on ``server`` (a ``grpc.aio`` server, or Serve's gRPC proxy through
    ``gRPCOptions.grpc_servicer_functions``): the generated ``add_QAServicer_to_server``, but
    a request that does not parse reaches the servicer as ``Unparsed``."""
    pb = qa_pb2
    handlers = {
        "Answer": grpc.unary_unary_rpc_method_handler(
            servicer.Answer, request_deserializer=_lenient(pb.AnswerRequest),
            response_serializer=pb.AnswerResponse.SerializeToString),
        "AnswerStream": grpc.unary_stream_rpc_method_handler(
            servicer.AnswerStream, request_deserializer=_lenient(pb.AnswerRequest),
            response_serializer=pb.AnswerEvent.SerializeToString),
        "IngestDocuments": grpc.unary_unary_rpc_method_handler(
            servicer.IngestDocuments, request_deserializer=_lenient(pb.IngestDocumentsRequest),
            response_serializer=pb.IngestDocumentsResponse.SerializeToString),
        "SubmitFeedback": grpc.unary_unary_rpc_method_handler(
            servicer.SubmitFeedback, request_deserializer=_lenient(pb.FeedbackRequest),
            response_serializer=pb.FeedbackAccepted.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


# --- messages <-> wire models -----------------------------------------------------------------
def qa_request(message) -> QARequest:
    """The ``QARequest`` of an ``AnswerRequest``; unset optional fields stay unset.

    ``MessageToDict`` leaves out a field without presence that holds its zero, so those whose
    zero means something are copied as they are: the question (an empty one is the service's
    to refuse) and both fusion weights once ``weights`` is set (``{dense: 1, sparse: 0}`` is a
    weighting, not a missing ``sparse``). Every other request field has presence, or a zero
    that means the schema's default (an empty filter list: no filter).
    """
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    data["question"] = message.question
    if message.retrieval.HasField("weights"):
        weights = message.retrieval.weights
        data["retrieval"]["weights"] = {"dense": weights.dense, "sparse": weights.sparse}
    return QARequest.model_validate(data)


def ingest_request(message) -> IngestRequest:
    return IngestRequest.model_validate({"documents": [
        {"doc_id": d.doc_id, "title": d.title, "text": d.text, "topic": d.topic,
         "source": d.source, "date": d.date if d.HasField("date") else None}
        for d in message.documents]})


def feedback_request(message) -> FeedbackRequest:
    """The ``FeedbackRequest`` of one; unset optional fields stay unset, an empty question or
    verdict is the schema's to refuse."""
    return FeedbackRequest.model_validate({"items": [
        {**json_format.MessageToDict(item, preserving_proto_field_name=True),
         "question": item.question, "verdict": item.verdict}
        for item in message.items]})


def feedback_message(accepted: FeedbackAccepted):
    return qa_pb2.FeedbackAccepted(accepted=accepted.accepted,
                                   feedback_ids=accepted.feedback_ids, entries=accepted.entries)


def answer_message(response: QAResponse):
    return json_format.ParseDict(response.model_dump(), qa_pb2.AnswerResponse(),
                                 ignore_unknown_fields=True)  # schema_version


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
                     for e in exc.errors())


@contextlib.contextmanager
def _failures() -> Iterator[None]:
    """Turn the service's errors into ``RpcFailure``s with the matching status code."""
    try:
        yield
    except ValidationError as exc:
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, _validation_message(exc)) from None
    except InputError as exc:
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    except FeedbackFull as exc:
        log.warning("feedback refused: %s", exc)
        raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
    except BUS_UNREACHABLE as exc:
        log.error("message bus unreachable: %s", exc)
        raise RpcFailure(grpc.StatusCode.UNAVAILABLE, BUS_UNREACHABLE_MESSAGE) from None
    except BusError as exc:
        code = {Busy: grpc.StatusCode.RESOURCE_EXHAUSTED,
                RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED}.get(
                    type(exc), grpc.StatusCode.UNAVAILABLE)
        message = str(exc)  # "<service>: <message>"
        if exc.info.kind == "bad_request":  # worded by the service, which names itself
            code, message = grpc.StatusCode.INVALID_ARGUMENT, exc.info.message
        elif exc.info.kind == "not_found":
            code, message = grpc.StatusCode.NOT_FOUND, exc.info.message
        log.warning("request failed: %s", exc)
        raise RpcFailure(code, message) from None
    except TimeoutError:
        raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED,
                         "the indexes did not finish in time; the work is queued and will "
                         "complete") from None


class QAGrpc:
    """The gRPC API over a ``QAService``; with ``serve.api_key`` set, each call's metadata
    must present it."""

    def __init__(self, qa: QAService):
        self.qa = qa
        key = qa.settings.serve.api_key
        self._key = None if key is None else key.get_secret_value()

    def _check(self, request, metadata: Metadata) -> None:
        pairs = [(k, v) for k, v in metadata if isinstance(v, str)]  # "-bin" values are bytes
        if not authorized(self._key, pairs):
            raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        if isinstance(request, Unparsed):
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the request is not a valid {request.message}: {request.error}")

    async def answer(self, request, metadata: Metadata):
        self._check(request, metadata)
        with _failures():
            return answer_message(await self.qa.answer(qa_request(request),
                                                       request_id=uuid.uuid4().hex[:16]))

    async def answer_stream(self, request, metadata: Metadata) -> AsyncIterator:
        """``AnswerEvent``s: ``token`` while generating, then ``answer``."""
        self._check(request, metadata)
        with _failures():
            events = self.qa.answer_stream(qa_request(request), request_id=uuid.uuid4().hex[:16])
            try:
                async for item in events:
                    if isinstance(item, AnswerChunk):
                        yield qa_pb2.AnswerEvent(token=item.text)
                    else:
                        yield qa_pb2.AnswerEvent(answer=answer_message(item))
            finally:
                await events.aclose()  # a cancelled call stops the generation

    async def ingest_documents(self, request, metadata: Metadata):
        self._check(request, metadata)
        with _failures():
            accepted = await self.qa.ingest(ingest_request(request).documents,
                                            wait=request.wait)
        return qa_pb2.IngestDocumentsResponse(accepted=accepted.accepted,
                                              doc_ids=accepted.doc_ids,
                                              entries=accepted.entries,
                                              indexed=accepted.indexed)

    async def submit_feedback(self, request, metadata: Metadata):
        self._check(request, metadata)
        with _failures():
            return feedback_message(await self.qa.feedback(feedback_request(request).items))


class QAServicer:
    """``QAGrpc`` on a plain ``grpc.aio`` server: ``add_servicer(QAServicer(api), server)``."""

    def __init__(self, api: QAGrpc):
        self.api = api

    async def Answer(self, request, context):  # noqa: N802 - the RPC's name
        try:
            return await self.api.answer(request, context.invocation_metadata() or ())
        except RpcFailure as failure:
            await context.abort(failure.code, failure.message)

    async def AnswerStream(self, request, context):  # noqa: N802
        try:
            async for event in self.api.answer_stream(request,
                                                      context.invocation_metadata() or ()):
                yield event
        except RpcFailure as failure:
            await context.abort(failure.code, failure.message)

    async def IngestDocuments(self, request, context):  # noqa: N802
        try:
            return await self.api.ingest_documents(request, context.invocation_metadata() or ())
        except RpcFailure as failure:
            await context.abort(failure.code, failure.message)

    async def SubmitFeedback(self, request, context):  # noqa: N802
        try:
            return await self.api.submit_feedback(request, context.invocation_metadata() or ())
        except RpcFailure as failure:
            await context.abort(failure.code, failure.message)


@contextlib.contextmanager
def serve_status(context) -> Iterator[None]:
    """For Serve's gRPC proxy: an ``RpcFailure`` sets the call's code and details on its
    ``RayServegRPCContext`` (the proxy answers with them) and propagates."""
    try:
        yield
    except RpcFailure as failure:
        context.set_code(failure.code)
        context.set_details(failure.message)
        raise
