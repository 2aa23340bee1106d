"""End to end with gRPC and an API key: real Ray Serve (its gRPC proxy), valkey, milvus-lite
and the packaged models. Documents go in over gRPC; the packaged generator's answer streamed
over gRPC and over server-sent events equals its unary answer (greedy decoding); feedback sent
over gRPC and HTTP reaches the trainer deployment's store."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import pytest

from deploy.grpc_client import QAClient
from deploy.stack import start_stack
from shared import keys
from shared.bus import Bus
from shared.datasets import load_corpus
from shared.infra import free_port
from shared.schemas import (
    AnswerChunk,
    DecodingOptions,
    Feedback,
    FeedbackQuery,
    FeedbackState,
    QARequest,
)
from shared.settings import RedisSettings, ServeSettings, Settings

pytestmark = pytest.mark.integration

KEY = "integration-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
COUNTRIES = ("France", "Germany", "Japan", "Kenya", "Peru", "Italy")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("home"),
                        serve=ServeSettings(http_port=free_port(), grpc_port=free_port(),
                                            api_key=KEY),
                        redis=RedisSettings(claim_idle_ms=5_000))
    running = start_stack(settings, dashboard=False, timeout_s=900)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack):
    with QAClient(stack.grpc_target, KEY, timeout_s=600) as c:
        yield c


@pytest.fixture(scope="module")
def ingested(client):
    by_title = {d.title: d for d in load_corpus()}
    documents = [by_title[t] for t in COUNTRIES]
    accepted = client.ingest(documents, wait=True)
    assert accepted.indexed and accepted.accepted == len(documents)
    return documents


def test_the_http_api_needs_the_key(stack):
    question = {"question": "What is the capital of Kenya?"}
    assert httpx.post(f"{stack.http_url}/v1/qa", json=question, timeout=60).status_code == 401
    assert httpx.get(f"{stack.http_url}/v1/status", timeout=60).status_code == 401
    assert httpx.get(f"{stack.http_url}/v1/status", headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(f"{stack.http_url}/v1/health", timeout=60).status_code == 200


def test_streams_over_grpc_and_sse_equal_the_unary_answer(stack, client, ingested):
    request = QARequest(question="What is the capital of Kenya?",
                        decoding=DecodingOptions(max_new_tokens=48))
    unary = client.answer(request)
    assert "Nairobi" in unary.answer and "Kenya" in [c.doc_id for c in unary.citations]
    assert unary.trust is not None and unary.trust >= 0.5 and unary.draft is None

    *chunks, final = list(client.answer_stream(request))
    assert all(isinstance(c, AnswerChunk) for c in chunks) and len(chunks) > 1
    assert "".join(c.text for c in chunks) == final.answer == unary.answer
    assert final.citations == unary.citations

    tokens, answer = [], None
    with httpx.stream("POST", f"{stack.http_url}/v1/qa?stream=true", headers=AUTH,
                      json=request.model_dump(exclude_none=True), timeout=600) as r:
        assert r.status_code == 200
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "token":
                    tokens.append(data["text"])
                else:
                    answer = data
    assert answer is not None and "".join(tokens) == answer["answer"] == unary.answer


@pytest.mark.parametrize("key, request_, code, message", [
    (KEY, QARequest.model_construct(question="capital?", top_k=None, retrieval=None,
                                    decoding=DecodingOptions.model_construct(strategy="magic")),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown decoding strategy 'magic'"),
    (KEY, QARequest.model_construct(question="capital?", top_k=None, retrieval=None,
                                    decoding=DecodingOptions.model_construct(max_new_tokens=999)),
     grpc.StatusCode.INVALID_ARGUMENT, "decoding.max_new_tokens: is 999; the limit is 512"),
    (None, QARequest(question="capital?"), grpc.StatusCode.UNAUTHENTICATED, "API key"),
])
def test_the_serve_grpc_proxy_answers_refusals_with_their_codes(stack, key, request_, code,
                                                                 message):
    with QAClient(stack.grpc_target, key, timeout_s=60) as client:
        for call in (client.answer, lambda r: list(client.answer_stream(r))):
            with pytest.raises(grpc.RpcError) as err:
                call(request_)
            assert err.value.code() == code and message in err.value.details()


def test_feedback_over_grpc_and_http_reaches_the_trainer(stack, client):
    wrong = Feedback(question="What is the capital of Kenya?", answer="Mombasa",
                     verdict="wrong", correct_answer="Nairobi")
    right = Feedback(question="What is the capital of Peru?", answer="Lima", verdict="right")
    assert client.submit_feedback([wrong]).feedback_ids == [wrong.feedback_id]
    r = httpx.post(f"{stack.http_url}/v1/feedback", headers=AUTH, timeout=60,
                   json={"items": [right.model_dump(mode="json")]})
    assert r.status_code == 202, r.text
    malformed = Feedback.model_construct(question="Capital?", answer="", verdict="wrong",
                                         correct_answer=None, doc_ids=[], request_id=None,
                                         feedback_id="x")
    with pytest.raises(grpc.RpcError) as err:
        client.submit_feedback([malformed])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "correct_answer" in err.value.details()

    async def stored_once_read() -> FeedbackState:
        settings = stack.settings
        bus = Bus.connect(settings.redis.url, settings.redis)
        try:
            deadline = time.monotonic() + 120
            while await bus.backlog(keys.FEEDBACK, keys.TRAINER):  # the trainer reads them
                assert time.monotonic() < deadline, "the trainer did not read its feedback"
                await asyncio.sleep(0.2)
            return await bus.request(keys.TRAINER, "feedback_state", FeedbackQuery(), 60.0,
                                     FeedbackState)
        finally:
            await bus.close()

    state = asyncio.run(stored_once_read())
    assert state.stored == 2 and state.update_after == stack.settings.feedback.update_after
