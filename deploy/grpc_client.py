"""A small Python client of ragtune's gRPC API (services/qa/proto/qa.proto).

    python -m deploy.grpc_client "What is the capital of Kenya?" [--stream] [--json]
        [--target HOST:PORT] [--top-k N]

The target defaults to 127.0.0.1 on ``serve.grpc_port``, the key to ``serve.api_key``
(``RAGTUNE_SERVE__GRPC_PORT``, ``RAGTUNE_SERVE__API_KEY``). In code::

    with QAClient("127.0.0.1:9000", api_key) as client:
        for item in client.answer_stream(QARequest(question="...")):
            ...  # AnswerChunk pieces, then the QAResponse

Requests and answers are ragtune's wire models (shared/schemas.py); a refused call raises
``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import grpc
from google.protobuf import json_format

from services.qa.proto import qa_pb2, qa_pb2_grpc
from shared.schemas import (
    AnswerChunk,
    Document,
    Feedback,
    FeedbackAccepted,
    IngestAccepted,
    QARequest,
    QAResponse,
)
from shared.settings import Settings


def _to_message(model, message_type):
    return json_format.ParseDict(model.model_dump(exclude_none=True), message_type(),
                                 ignore_unknown_fields=True)  # schema_version


def _answer(message) -> QAResponse:
    return QAResponse.model_validate(json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


class QAClient:
    """A channel to the QA service; each call sends ``api_key`` (if any) as a bearer token and
    fails with ``grpc.RpcError`` after ``timeout_s``."""

    def __init__(self, target: str, api_key: str | None = None, timeout_s: float = 120.0):
        self.channel = grpc.insecure_channel(target)
        self.stub = qa_pb2_grpc.QAStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self.timeout_s = timeout_s

    def answer(self, request: QARequest) -> QAResponse:
        return _answer(self.stub.Answer(_to_message(request, qa_pb2.AnswerRequest),
                                        metadata=self.metadata, timeout=self.timeout_s))

    def answer_stream(self, request: QARequest) -> Iterator[AnswerChunk | QAResponse]:
        """The answer's pieces as they are generated, then the ``QAResponse`` (last). Leaving
        the loop early cancels the call, which stops the generation."""
        call = self.stub.AnswerStream(_to_message(request, qa_pb2.AnswerRequest),
                                      metadata=self.metadata, timeout=self.timeout_s)
        try:
            for event in call:
                if event.WhichOneof("event") == "token":
                    yield AnswerChunk(text=event.token)
                else:
                    yield _answer(event.answer)
        finally:
            call.cancel()  # a no-op once the call has ended

    def ingest(self, documents: list[Document], wait: bool = False) -> IngestAccepted:
        request = qa_pb2.IngestDocumentsRequest(
            documents=[_to_message(d, qa_pb2.Document) for d in documents], wait=wait)
        reply = self.stub.IngestDocuments(request, metadata=self.metadata,
                                          timeout=self.timeout_s)
        return IngestAccepted(accepted=reply.accepted, doc_ids=list(reply.doc_ids),
                              entries=list(reply.entries), indexed=reply.indexed)

    def submit_feedback(self, items: list[Feedback]) -> FeedbackAccepted:
        """Queue judged answers for the trainer, all or none; RESOURCE_EXHAUSTED when its
        feedback backlog has no room for them (retry later)."""
        request = qa_pb2.FeedbackRequest(items=[_to_message(f, qa_pb2.Feedback) for f in items])
        reply = self.stub.SubmitFeedback(request, metadata=self.metadata,
                                         timeout=self.timeout_s)
        return FeedbackAccepted(accepted=reply.accepted, feedback_ids=list(reply.feedback_ids),
                                entries=list(reply.entries))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> QAClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.grpc_client",
                                     description="ask ragtune over gRPC")
    parser.add_argument("question")
    parser.add_argument("--target", default=None, help="HOST:PORT (default: 127.0.0.1 on "
                                                       "serve.grpc_port)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--stream", action="store_true", help="print the answer as it comes")
    parser.add_argument("--json", action="store_true", help="print the whole response")
    args = parser.parse_args(argv)
    settings = Settings()
    target = args.target
    if target is None:
        if settings.serve.grpc_port is None:
            sys.exit("ragtune: set RAGTUNE_SERVE__GRPC_PORT or pass --target")
        target = f"127.0.0.1:{settings.serve.grpc_port}"
    key = settings.serve.api_key.get_secret_value() if settings.serve.api_key else None
    request = QARequest(question=args.question, top_k=args.top_k)
    try:
        with QAClient(target, key) as client:
            if args.stream:
                for item in client.answer_stream(request):
                    if isinstance(item, AnswerChunk):
                        sys.stdout.write(item.text)
                        sys.stdout.flush()
                    else:
                        response = item
                sys.stdout.write("\n")
            else:
                response = client.answer(request)
    except grpc.RpcError as exc:
        sys.exit(f"ragtune: {exc.code().name}: {exc.details()}")
    if args.json:
        sys.stdout.write(json.dumps(response.model_dump(), indent=2) + "\n")
    elif not args.stream:
        sys.stdout.write(response.answer + "\n")
    for c in response.citations:
        sys.stdout.write(f"   [{c.passage}] {c.title} ({c.doc_id})\n")


if __name__ == "__main__":
    main()
