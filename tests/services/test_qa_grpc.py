"""The QA front over gRPC: the servicer on a plain grpc.aio server on 127.0.0.1, real valkey,
the ranker stand-in and the real generator service on a tiny random model; called with the
client in deploy/grpc_client.py. (Through Ray Serve's gRPC proxy: tests/integration.)"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from pydantic import SecretStr, ValidationError

from deploy.grpc_client import QAClient
from services.generator.service import GeneratorService
from services.qa.grpc_api import (
    SERVICE,
    QAGrpc,
    QAServicer,
    RpcFailure,
    add_servicer,
    qa_request,
)
from services.qa.proto import qa_pb2
from services.qa.service import BUS_UNREACHABLE_MESSAGE, QAService
from shared.bus import Bus
from shared.prompt import NO_ANSWER
from shared.schemas import (
    AnswerChunk,
    DecodingOptions,
    Document,
    Feedback,
    FusionWeights,
    QARequest,
    RetrievalOptions,
)
from shared.settings import AnswerSettings
from tests.services.test_qa_http import INDEXED, RANKED, _retriever, _serve_generator
from tests.services.test_qa_http import settings as settings  # noqa: F401 - a fixture
from tests.services.test_qa_http import unreachable as unreachable  # noqa: F401 - a fixture
from tests.tiny import per_byte_tokenizer, serving_llama

KEY = "g" * 20


class GrpcServer:
    """``QAServicer`` on a grpc.aio server in a thread with its own event loop."""

    def __init__(self, settings):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.qa, port = self._call(self._start(settings))
        self.target = f"127.0.0.1:{port}"

    def _call(self, coro, timeout_s: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def _start(self, settings):
        qa = QAService(Bus.connect(settings.redis.url, settings.redis), settings)
        server = grpc.aio.server()
        add_servicer(QAServicer(QAGrpc(qa)), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, qa, port

    def stop(self) -> None:
        self._call(self.server.stop(None))
        self._call(self.qa.bus.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def keyed(settings):  # noqa: F811
    serve = settings.serve.model_copy(update={"api_key": SecretStr(KEY)})
    return settings.model_copy(update={"serve": serve})


def _serve(keyed, service):
    serving = _serve_generator(keyed, service)
    next(serving)
    server = GrpcServer(keyed)
    yield server.target
    server.stop()
    next(serving, None)


@pytest.fixture
def target(keyed, flush):
    tok = per_byte_tokenizer()
    yield from _serve(keyed, GeneratorService(serving_llama(tok), tok, 1_000))


@pytest.fixture
def client(target):
    with QAClient(target, KEY, timeout_s=60) as c:
        yield c


QUESTION = QARequest(question="What is the capital of France?",
                     decoding=DecodingOptions(max_new_tokens=24))


def test_answer_and_stream_agree(client):
    unary = client.answer(QUESTION)
    assert unary.question == QUESTION.question and unary.passages[0].doc_id == "France"
    *chunks, final = list(client.answer_stream(QUESTION))
    assert len(chunks) > 1 and all(isinstance(c, AnswerChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == final.answer == unary.answer
    assert final.passages == unary.passages and final.citations == unary.citations
    assert "generate.first_token" in final.timings_ms


def test_a_withheld_answer_and_its_trust_reach_the_client(keyed, flush):
    # min_trust 1: the tiny model's bytes are not all in the France passage, so it is withheld
    strict = keyed.model_copy(update={"answer": AnswerSettings(min_trust=1.0)})
    tok = per_byte_tokenizer()
    served = _serve(strict, GeneratorService(serving_llama(tok), tok, 1_000))
    with QAClient(next(served), KEY, timeout_s=60) as client:
        unary = client.answer(QUESTION)
        *chunks, final = list(client.answer_stream(QUESTION))
    next(served, None)
    assert unary.answer == final.answer == NO_ANSWER and unary.citations == []
    assert unary.trust is not None and unary.trust < 1.0
    assert unary.draft and "".join(c.text for c in chunks) == final.draft == unary.draft


def _bad(**decoding):
    return QARequest.model_construct(question="capital?", top_k=None, retrieval=None,
                                     decoding=DecodingOptions.model_construct(**decoding))


@pytest.mark.parametrize("request_, message", [
    (_bad(strategy="magic"), "decoding.strategy: Value error, unknown decoding strategy "
                             "'magic'; known: greedy, beam, sample"),
    (_bad(strategy="sample", top_p=0.0), "decoding.top_p: Value error, `top_p` has to be in "
                                         "(0, 1], but is 0.0"),
    (_bad(strategy="sample", top_p=1.5), "`top_p` has to be in (0, 1], but is 1.5"),
    (_bad(strategy="sample", top_k=0), "decoding.top_k: Value error, `top_k` has to be a "
                                       "strictly positive integer, but is 0"),
    (_bad(strategy="beam", num_beams=0), "decoding.num_beams: Value error, `num_beams` has to "
                                         "be an integer in [1, 16], but is 0"),
    (_bad(max_new_tokens=65), "decoding.max_new_tokens: is 65; the limit is 64"),
    (_bad(top_p=0.5), "`top_p` only applies to strategy sample"),
    (QARequest.model_construct(question="   ", top_k=None, retrieval=None, decoding=None),
     "question: must not be empty or only whitespace"),
    (QARequest.model_construct(question="ok?", top_k=0, retrieval=None, decoding=None),
     "top_k: must be between 1 and 5, got 0"),
])
def test_bad_input_is_invalid_argument_on_both_calls(client, request_, message):
    for call in (client.answer, lambda r: list(client.answer_stream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()


def test_a_prompt_that_cannot_fit_is_invalid_argument(keyed, flush):
    tok = per_byte_tokenizer()
    small = GeneratorService(serving_llama(tok), tok, 1_000, max_context_tokens=200)
    for target in _serve(keyed, small):
        with QAClient(target, KEY) as client, pytest.raises(grpc.RpcError) as err:
            list(client.answer_stream(QUESTION))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("generator: the question with even "
                                              "the first passage")


@pytest.mark.parametrize("key", [None, "wrong-key-wrong-key"])
def test_a_missing_or_wrong_key_is_unauthenticated(target, key):
    with QAClient(target, key) as client:
        calls = [lambda: client.answer(QUESTION), lambda: list(client.answer_stream(QUESTION)),
                 lambda: client.ingest([Document(doc_id="d", title="T", text="x")])]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Authorization: Bearer <key>" in err.value.details()


def test_bytes_that_are_no_request_are_invalid_argument_and_the_server_goes_on(target, client):
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(f"/{SERVICE}/Answer")  # no serializer: bytes as they are
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff", metadata=[("x-api-key", KEY)], timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ragtune.qa.v1.AnswerRequest" in err.value.details()
    assert client.answer(QUESTION).answer  # still serving


@pytest.fixture
def retrievers(keyed):
    from deploy.workers import WorkerThread
    from shared import keys

    for group in INDEXED.values():
        group.clear()
    threads = [WorkerThread(_retriever(group), keyed.redis.url, keyed.redis, group)
               for group in (keys.EMBEDDING, keys.SPARSE)]
    yield
    for thread in threads:
        thread.stop()


@pytest.mark.usefixtures("retrievers")
def test_ingest_documents_reaches_both_indexes(client):
    documents = [Document(doc_id=f"d{i}", title=f"T{i}", text=f"Body {i}.", date="2024-01-0"
                          f"{i + 1}") for i in range(3)]
    accepted = client.ingest(documents, wait=True)
    assert accepted.accepted == 3 and accepted.indexed and len(accepted.entries) == 2
    assert INDEXED["embedding"] == INDEXED["sparse"] == {"d0", "d1", "d2"}
    bad = [documents[0], Document.model_construct(doc_id="x", title="T", text="", topic="",
                                                  source="", date=None)]
    with pytest.raises(grpc.RpcError) as err:
        client.ingest(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("documents.1.text: String should have at least 1")


def test_cancelling_the_stream_stops_the_generation(keyed, flush):
    tok = per_byte_tokenizer()
    results: list = []

    class Recording(GeneratorService):
        def generate_batch(self, *args):
            out = super().generate_batch(*args)
            results.extend(out)
            return out

    service = Recording(serving_llama(tok, force_token="a"), tok, 1_000)
    for target in _serve(keyed, service):
        with QAClient(target, KEY) as client:
            for item in client.answer_stream(QARequest(
                    question="capital?", decoding=DecodingOptions(max_new_tokens=64))):
                assert item.text.startswith("a")
                break  # cancels the call
            while not results:
                threading.Event().wait(0.05)
    (result,) = results
    assert result.completion_tokens < 64


@pytest.fixture
def feedback_client(keyed, flush):
    """The gRPC API with no backend at all: feedback needs none."""
    server = GrpcServer(keyed)
    with QAClient(server.target, KEY, timeout_s=30) as c:
        yield c
    server.stop()


def test_feedback_is_queued_then_refused_at_the_cap(feedback_client, keyed):
    import redis

    from shared import keys
    from shared.schemas import Envelope

    wrong = Feedback(question="Capital of Kenya?", answer="Mombasa", verdict="wrong",
                     correct_answer="Nairobi", doc_ids=["Kenya"])
    right = Feedback(question="Capital of France?", answer="Paris", verdict="right")
    accepted = feedback_client.submit_feedback([wrong, right, right.model_copy(
        update={"feedback_id": "fb-3"})])
    assert accepted.accepted == 3 and len(accepted.entries) == 3
    assert accepted.feedback_ids == [wrong.feedback_id, right.feedback_id, "fb-3"]
    entries = redis.Redis.from_url(keyed.redis.url).xrange(keys.FEEDBACK)
    sent = Envelope.model_validate_json(entries[0][1][b"msg"])
    assert sent.kind == "feedback" and Feedback.model_validate(sent.body) == wrong
    with pytest.raises(grpc.RpcError) as err:  # max_pending is 5: three more do not fit
        feedback_client.submit_feedback([Feedback(question="Capital?", answer=a,
                                                  verdict="right") for a in "ABC"])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == ("3 feedback items wait for the trainer and 3 more would "
                                   "pass the cap of 5; retry later")
    assert redis.Redis.from_url(keyed.redis.url).xlen(keys.FEEDBACK) == 3


@pytest.mark.parametrize("item, message", [
    (Feedback.model_construct(question="Capital?", answer="Mombasa", verdict="wrong",
                              doc_ids=[]),
     "items.0: Value error, a `wrong` verdict needs `correct_answer`"),
    (Feedback.model_construct(question="Capital?", answer="Paris", verdict="maybe",
                              doc_ids=[]),
     "items.0.verdict: Input should be 'right' or 'wrong'"),
    (Feedback.model_construct(question="", answer="Paris", verdict="right", doc_ids=[]),
     "items.0.question: String should have at least 1 character"),
    (Feedback(question="Capital?", answer="x" * 501, verdict="right"),
     "items.0.answer: is 501 characters; the limit is 500"),
])
def test_bad_feedback_is_invalid_argument_naming_the_problem(feedback_client, keyed, item,
                                                             message):
    import redis

    from shared import keys

    with pytest.raises(grpc.RpcError) as err:
        feedback_client.submit_feedback([item])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(message), err.value.details()
    assert redis.Redis.from_url(keyed.redis.url).xlen(keys.FEEDBACK) == 0


def test_the_proto_and_the_schemas_name_the_same_fields():
    from shared.schemas import DecodingOptions as Wire
    from shared.schemas import FeedbackAccepted

    for message, model in [(qa_pb2.DecodingOptions, Wire), (qa_pb2.Feedback, Feedback),
                           (qa_pb2.FeedbackAccepted, FeedbackAccepted)]:
        proto = {f.name for f in message.DESCRIPTOR.fields}
        assert proto == set(model.model_fields) - {"schema_version"}, message


def test_a_failure_survives_pickling():
    # Serve hands a replica's exception to its gRPC proxy pickled
    import pickle

    failure = pickle.loads(pickle.dumps(RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "top_p")))
    assert (failure.code, failure.message) == (grpc.StatusCode.INVALID_ARGUMENT, "top_p")


# --- fields whose zero MessageToDict leaves out -------------------------------------------------
def _weighted(**weights) -> qa_pb2.AnswerRequest:
    return qa_pb2.AnswerRequest(question="capital?", retrieval=qa_pb2.RetrievalOptions(
        mode="weighted_minmax", weights=qa_pb2.FusionWeights(**weights)))


@pytest.mark.parametrize("dense, sparse", [(1.0, 0.0), (0.0, 1.0), (0.25, 0.75)])
def test_fusion_weights_reach_the_schema_zeros_included(dense, sparse):
    weights = qa_request(_weighted(dense=dense, sparse=sparse)).retrieval.weights
    assert weights == FusionWeights(dense=dense, sparse=sparse)


def test_unset_or_zero_weights_are_the_schemas_to_judge():
    assert qa_request(qa_pb2.AnswerRequest(question="q", retrieval=qa_pb2.RetrievalOptions(
        mode="rrf"))).retrieval.weights is None
    with pytest.raises(ValidationError, match=r"dense \+ sparse must be 1, got 0.0 \+ 0.0"):
        qa_request(_weighted())  # set, both 0: not "Field required"


def test_a_zero_fusion_weight_reaches_the_ranker(client):
    RANKED.clear()
    client.answer(QUESTION.model_copy(update={"retrieval": RetrievalOptions(
        mode="weighted_zscore", weights=FusionWeights(dense=1.0, sparse=0.0))}))
    (sent,) = RANKED
    assert (sent.mode, sent.weight) == ("weighted_zscore", 1.0)


# Singular request fields without presence (MessageToDict leaves them out at their zero): each
# is copied by hand (qa_request, ingest_request, feedback_request, request.wait) or has a zero
# that means the schema's default (Feedback.answer: ""). A new one needs the same look.
ZERO_HANDLED = {"AnswerRequest.question", "FusionWeights.dense", "FusionWeights.sparse",
                "IngestDocumentsRequest.wait", "Document.doc_id", "Document.title",
                "Document.text", "Document.topic", "Document.source", "Feedback.question",
                "Feedback.answer", "Feedback.verdict"}


def test_every_request_field_that_loses_its_zero_is_handled():
    found, todo = set(), [qa_pb2.AnswerRequest.DESCRIPTOR,
                          qa_pb2.IngestDocumentsRequest.DESCRIPTOR,
                          qa_pb2.FeedbackRequest.DESCRIPTOR]
    while todo:
        message = todo.pop()
        for field in message.fields:
            if field.message_type is not None:
                todo.append(field.message_type)
            elif not field.has_presence and not field.is_repeated:
                found.add(f"{message.name}.{field.name}")
    assert found == ZERO_HANDLED


# --- the bus out of reach ----------------------------------------------------------------------
def test_an_unreachable_bus_is_unavailable_on_every_call(unreachable):
    server = GrpcServer(unreachable)
    feedback = Feedback(question="Capital of France?", answer="Paris", verdict="right")
    try:
        with QAClient(server.target, timeout_s=30) as client:
            for call in (lambda: client.answer(QUESTION),
                         lambda: list(client.answer_stream(QUESTION)),
                         lambda: client.ingest([Document(doc_id="d", title="T", text="x")]),
                         lambda: client.submit_feedback([feedback])):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert err.value.details() == BUS_UNREACHABLE_MESSAGE
    finally:
        server.stop()
