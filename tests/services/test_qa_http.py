"""The QA front over HTTP, on a real valkey, with stand-in backends on the bus.

The backends here are plain bus workers with canned answers (the real services have their
own tests and meet the front in tests/integration): this checks the front's validation,
error mapping and ingestion protocol.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient
from pydantic import SecretStr

from deploy.workers import WorkerThread, generator_worker
from services.generator.batching import Batcher
from services.generator.service import GeneratorService
from services.qa.http import _sse, create_app
from services.qa.service import BUS_UNREACHABLE_MESSAGE, InputError, QAService
from shared import keys
from shared.bus import BadRequest, Bus, Worker, routes
from shared.prompt import NO_ANSWER
from shared.schemas import (
    AnswerChunk,
    Citation,
    DecodingOptions,
    DeleteBatch,
    Envelope,
    Feedback,
    Filters,
    GenerateRequest,
    GenerateResult,
    Hit,
    IndexStats,
    IngestBatch,
    RetrieveRequest,
    RetrieveResult,
    StatsRequest,
)
from shared.settings import (
    AnswerSettings,
    FeedbackSettings,
    GeneratorSettings,
    LimitSettings,
    Settings,
)
from tests.tiny import per_byte_tokenizer, serving_llama

pytestmark = pytest.mark.usefixtures("flush")

INDEXED: dict[str, set[str]] = {keys.EMBEDDING: set(), keys.SPARSE: set()}


def _retriever(group: str):
    def make(bus: Bus) -> Worker:
        async def ingest(batch: IngestBatch) -> None:
            INDEXED[group].update(d.doc_id for d in batch.documents)

        async def delete(batch: DeleteBatch) -> None:
            INDEXED[group].difference_update(batch.doc_ids)

        async def stats(_req: StatsRequest) -> IndexStats:
            return IndexStats(documents=len(INDEXED[group]))

        return Worker(bus, group, [keys.request_stream(group), keys.INGEST],
                      routes(ingest=(IngestBatch, ingest), delete=(DeleteBatch, delete),
                             stats=(StatsRequest, stats)))
    return make


RANKED: list[RetrieveRequest] = []


def _ranker(bus: Bus) -> Worker:
    async def retrieve(req: RetrieveRequest) -> RetrieveResult:
        RANKED.append(req)
        hit = Hit(doc_id="France", title="France", text="Its capital is Paris.", score=0.9)
        return RetrieveResult(hits=[hit][: req.top_k], timings_ms={"dense": 1.0})

    return Worker(bus, keys.RANKER, [keys.request_stream(keys.RANKER)],
                  routes(retrieve=(RetrieveRequest, retrieve)))


GENERATED: list[GenerateRequest] = []


def _generator(bus: Bus) -> Worker:
    async def generate(req: GenerateRequest) -> GenerateResult:
        GENERATED.append(req)
        if "explode" in req.question:
            raise BadRequest("the prompt cannot fit")
        # the France passage names Paris, not Santiago: an answer it does not back
        answer = "Santiago [1]" if "Chile" in req.question else "Paris [1]"
        # "Briefly": as if the prompt had room for the passage's first 10 characters only
        shown = [10 if "Briefly" in req.question else len(p.text) for p in req.passages]
        return GenerateResult(answer=answer, prompt_tokens=10, completion_tokens=3,
                              citations=[Citation(passage=1, doc_id=req.passages[0].doc_id,
                                                  title=req.passages[0].title)],
                              shown_chars=shown)

    return Worker(bus, keys.GENERATOR, [keys.request_stream(keys.GENERATOR)],
                  routes(generate=(GenerateRequest, generate)))


@pytest.fixture
def settings(redis_url, redis_settings, tmp_path) -> Settings:
    return Settings(home=tmp_path, redis=redis_settings.model_copy(update={"url": redis_url}),
                    limits=LimitSettings(max_question_chars=200, max_document_chars=500,
                                         max_documents_per_request=5, max_top_k=5,
                                         ingest_batch=2),
                    generator=GeneratorSettings(max_new_tokens=48, max_new_tokens_limit=64),
                    feedback=FeedbackSettings(max_pending=5),
                    # the stand-ins and the tiny models answer words no passage holds: these
                    # tests see the generator's words as they are (the gate has its own test)
                    answer=AnswerSettings(min_trust=0.0))


@pytest.fixture
def unreachable(settings) -> Iterator[Settings]:
    """``settings`` with the bus on a port of 127.0.0.1 that is bound but not listening: every
    connection is refused, and no other process can take the port meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}"
        yield settings.model_copy(update={"redis": settings.redis.model_copy(
            update={"url": url})})


@pytest.fixture
def backends(settings, flush):
    for group in INDEXED.values():
        group.clear()
    threads = [WorkerThread(make, settings.redis.url, settings.redis, name) for name, make in [
        ("embedding", _retriever(keys.EMBEDDING)), ("sparse", _retriever(keys.SPARSE)),
        ("ranker", _ranker), ("generator", _generator)]]
    yield
    for thread in threads:
        thread.stop()


@pytest.fixture
def qa(settings) -> QAService:
    return QAService(Bus.connect(settings.redis.url, settings.redis), settings)


@pytest.fixture
def client(qa):
    with TestClient(create_app(qa)) as c:
        yield c


def _field(response) -> list:
    return response.json()["detail"][0]["loc"]


@pytest.mark.usefixtures("backends")
def test_answer_with_citations_passages_and_timings(client):
    r = client.post("/v1/qa", json={"question": "  What is the capital of France?  "})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["question"] == "What is the capital of France?"
    assert body["answer"] == "Paris [1]"
    assert body["citations"] == [{"schema_version": 1, "passage": 1, "doc_id": "France",
                                  "title": "France"}]
    assert body["passages"][0]["rank"] == 1 and body["passages"][0]["score"] == 0.9
    assert {"retrieve", "retrieve.dense", "generate", "total"} <= set(body["timings_ms"])
    assert body["trust"] == 1.0 and body["draft"] is None


@pytest.mark.usefixtures("backends")
def test_an_answer_its_passages_do_not_back_is_withheld_below_min_trust(settings, qa):
    chile = {"question": "What is the capital of Chile?"}
    with TestClient(create_app(qa)) as client:  # min_trust 0: nothing is withheld
        body = client.post("/v1/qa", json=chile).json()
    assert (body["answer"], body["trust"], body["draft"]) == ("Santiago [1]", 0.0, None)
    assert body["citations"]
    strict = settings.model_copy(update={"answer": AnswerSettings(min_trust=0.5)})
    front = QAService(Bus.connect(settings.redis.url, settings.redis), strict)
    with TestClient(create_app(front)) as client:
        body = client.post("/v1/qa", json=chile).json()
        assert (body["answer"], body["trust"], body["draft"]) == (NO_ANSWER, 0.0, "Santiago [1]")
        assert body["citations"] == [] and body["passages"][0]["doc_id"] == "France"
        backed = client.post("/v1/qa", json={"question": "What is the capital of France?"})
        assert backed.json()["answer"] == "Paris [1]" and backed.json()["trust"] == 1.0
        # Trust counts what the generator was shown, not the whole retrieved passage.
        unseen = client.post("/v1/qa", json={"question": "Briefly, France's capital?"}).json()
        assert (unseen["answer"], unseen["trust"], unseen["draft"]) == (NO_ANSWER, 0.0,
                                                                        "Paris [1]")
        assert unseen["passages"][0]["text"] == "Its capital is Paris."
        # "Paris" is in the passage, but in no sentence on the question's words
        largest = {"question": "Which city is the largest?"}
        body = client.post("/v1/qa", json=largest).json()
        assert (body["answer"], body["trust"], body["draft"]) == (NO_ANSWER, 0.0, "Paris [1]")
    anywhere = strict.model_copy(update={"answer": AnswerSettings(min_trust=0.5,
                                                                  trust_by_sentence=False)})
    front = QAService(Bus.connect(settings.redis.url, settings.redis), anywhere)
    with TestClient(create_app(front)) as client:
        body = client.post("/v1/qa", json=largest).json()
        assert (body["answer"], body["trust"], body["draft"]) == ("Paris [1]", 1.0, None)


@pytest.mark.parametrize("payload, field, message", [
    ({"question": ""}, "question", "empty"),
    ({"question": "   \n\t"}, "question", "whitespace"),
    ({"question": "x" * 201}, "question", "limit is 200"),
    ({"question": 42}, "question", "valid string"),
    ({"question": ["a"]}, "question", "valid string"),
    ({}, "question", "required"),
    ({"question": "ok?", "top_k": 0}, "top_k", "between 1 and 5"),
    ({"question": "ok?", "top_k": 99}, "top_k", "between 1 and 5"),
    ({"question": "ok?", "top_k": "many"}, "top_k", "integer"),
    ({"question": "ok?", "colour": "red"}, "colour", "Extra inputs"),
])
def test_bad_questions_are_422_naming_the_field(client, payload, field, message):
    r = client.post("/v1/qa", json=payload)
    assert r.status_code == 422, r.text
    assert _field(r)[-1] == field
    assert message in r.json()["detail"][0]["msg"]


def doc(i, **over) -> dict:
    return {"doc_id": f"d{i}", "title": f"Title {i}", "text": f"Body of {i}."} | over


@pytest.mark.parametrize("documents, loc, message", [
    ([], ["documents"], "at least 1"),
    ([doc(1), doc(2, text="   ")], ["documents", 1, "text"], "at least 1"),
    ([doc(1, title="")], ["documents", 0, "title"], "at least 1"),
    ([doc(1), doc(2, text="x" * 501)], ["documents", 1, "text"], "limit is 500"),
    ([doc(1, text=7)], ["documents", 0, "text"], "valid string"),
    ([doc(1), doc(1)], ["documents", 1, "doc_id"], "appears twice"),
    ([doc(i) for i in range(6)], ["documents"], "limit per request is 5"),
    ([doc(1, doc_id=" padded")], ["documents", 0, "doc_id"], "pattern"),
])
def test_bad_documents_are_422_and_nothing_is_half_ingested(client, redis_url, documents,
                                                           loc, message):
    r = client.post("/v1/documents", json={"documents": documents})
    assert r.status_code == 422, r.text
    assert _field(r)[1:] == loc and message in r.json()["detail"][0]["msg"]
    assert redis.Redis.from_url(redis_url).xlen(keys.INGEST) == 0


@pytest.mark.usefixtures("backends")
def test_ingest_waits_for_both_indexes_and_is_idempotent(client):
    documents = [doc(i) for i in range(5)]
    r = client.post("/v1/documents?wait=true", json={"documents": documents})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 5 and body["indexed"] is True and len(body["entries"]) == 3
    assert INDEXED[keys.EMBEDDING] == INDEXED[keys.SPARSE] == {f"d{i}" for i in range(5)}
    client.post("/v1/documents?wait=true", json={"documents": documents[:2]})
    status = client.get("/v1/status").json()
    assert status["documents"] == {"embedding": 5, "sparse": 5}
    assert status["dead_letters"] == 0
    ingest = [s for s in status["streams"] if s["stream"] == keys.INGEST]
    assert {s["group"] for s in ingest} == {"embedding", "sparse"}
    assert all(s["pending"] == 0 and s["lag"] == 0 for s in ingest)


@pytest.mark.usefixtures("backends")
@pytest.mark.parametrize("options, mode, weight, rrf_k", [
    (None, "weighted_minmax", 0.9, None),  # the server's defaults
    ({"mode": "weighted_zscore", "weights": {"dense": 0.7, "sparse": 0.3}},
     "weighted_zscore", 0.7, None),
    ({"mode": "rrf", "rrf_k": 10}, "rrf", 0.9, 10),
    ({"mode": "dense"}, "dense", 0.9, None),
])
def test_retrieval_options_reach_the_ranker(client, options, mode, weight, rrf_k):
    RANKED.clear()
    r = client.post("/v1/qa", json={"question": "capital?", "top_k": 2, "retrieval": options})
    assert r.status_code == 200, r.text
    (sent,) = RANKED
    assert (sent.mode, sent.weight, sent.rrf_k, sent.top_k) == (mode, weight, rrf_k, 2)


@pytest.mark.parametrize("options, loc, message", [
    ({"mode": "magic"}, ["retrieval", "mode"], "'rrf', 'weighted_minmax', 'weighted_zscore'"),
    ({"mode": "weighted_minmax", "weights": {"dense": 0.9, "sparse": 0.4}},
     ["retrieval", "weights"], "dense + sparse must be 1, got 0.9 + 0.4 = 1.3"),
    ({"mode": "weighted_minmax", "weights": {"dense": -0.5, "sparse": 1.5}},
     ["retrieval", "weights", "dense"], "greater than or equal to 0"),
    ({"mode": "rrf", "weights": {"dense": 0.5, "sparse": 0.5}}, ["retrieval", "weights"],
     "only apply to the modes weighted_minmax, weighted_zscore; mode is rrf"),
    ({"mode": "dense", "rrf_k": 5}, ["retrieval", "rrf_k"], "only applies to mode rrf"),
    ({"rrf_k": 0}, ["retrieval", "rrf_k"], "greater than or equal to 1"),
    ({"filters": {"colour": ["red"]}}, ["retrieval", "filters"],
     "unknown filter field 'colour'; known: topic, source, date_from, date_to"),
    ({"filters": {"topic": ["x"], "topics": ["y"]}}, ["retrieval", "filters"],
     "unknown filter field 'topics'"),
    ({"filters": {"date_from": "2024-05-01", "date_to": "2024-04-30"}}, ["retrieval", "filters"],
     "date_from (2024-05-01) is after date_to (2024-04-30)"),
    ({"filters": {"date_from": "yesterday"}}, ["retrieval", "filters", "date_from"],
     "must be an ISO date YYYY-MM-DD, got 'yesterday'"),
    ({"filters": {"date_to": "2024-5-1"}}, ["retrieval", "filters", "date_to"],
     "must be an ISO date YYYY-MM-DD"),
    ({"filters": {"date_to": "2023-02-29"}}, ["retrieval", "filters", "date_to"],
     "'2023-02-29' is not a calendar date"),
    ({"filters": {"date_from": 20240101}}, ["retrieval", "filters", "date_from"],
     "valid string"),
    ({"filters": {"topic": "x"}}, ["retrieval", "filters", "topic"], "valid list"),
    ({"filters": {"source": []}}, ["retrieval", "filters", "source"], "at least 1 item"),
])
def test_bad_retrieval_options_are_422(client, options, loc, message):
    r = client.post("/v1/qa", json={"question": "capital?", "retrieval": options})
    assert r.status_code == 422, r.text
    assert _field(r)[1:] == loc and message in r.json()["detail"][0]["msg"], r.text


@pytest.mark.usefixtures("backends")
def test_filters_reach_the_ranker(client):
    RANKED.clear()
    filters = {"topic": ["Geography", "History"], "source": ["wiki"],
               "date_from": "2020-01-01", "date_to": "2020-01-01"}
    r = client.post("/v1/qa", json={"question": "capital?", "retrieval": {"filters": filters}})
    assert r.status_code == 200, r.text
    (sent,) = RANKED
    assert sent.filters == Filters(**filters)
    RANKED.clear()
    client.post("/v1/qa", json={"question": "capital?", "retrieval": {"mode": "sparse"}})
    assert RANKED[0].filters is None


def test_bad_document_dates_are_422(client):
    r = client.post("/v1/documents", json={"documents": [doc(1, date="01/02/2024")]})
    assert r.status_code == 422, r.text
    assert _field(r)[1:] == ["documents", 0, "date"]


def test_front_knows_exactly_the_ranker_modes():
    from typing import get_args

    from services.ranker.fusion import MODES
    from shared.schemas import FusionMode

    assert set(get_args(FusionMode)) == set(MODES)


@pytest.mark.usefixtures("backends")
def test_delete_reaches_both_indexes_in_order(client):
    client.post("/v1/documents", json={"documents": [doc(1), doc(2)]})  # not waited for
    r = client.delete("/v1/documents/d1?wait=true")
    assert r.status_code == 202 and r.json()["indexed"] is True
    # the delete was queued after the ingest on the same stream, so it applied last
    assert INDEXED[keys.EMBEDDING] == INDEXED[keys.SPARSE] == {"d2"}
    client.post("/v1/documents?wait=true", json={"documents": [doc(3, doc_id="wiki/AC/DC")]})
    assert client.delete("/v1/documents/wiki%2FAC%2FDC?wait=true").status_code == 202
    assert INDEXED[keys.EMBEDDING] == INDEXED[keys.SPARSE] == {"d2"}


@pytest.mark.parametrize("doc_id, message", [
    ("a" * 257, "String should have at most 256 characters"),
    ("", "String should have at least 1 character"),
])
def test_a_bad_doc_id_to_delete_is_422_and_nothing_is_queued(client, redis_url, doc_id,
                                                             message):
    r = client.delete(f"/v1/documents/{doc_id}")
    assert r.status_code == 422, r.text
    assert _field(r) == ["path", "doc_id"] and message in r.json()["detail"][0]["msg"], r.text
    assert redis.Redis.from_url(redis_url).xlen(keys.INGEST) == 0
    assert client.delete(f"/v1/documents/{'a' * 256}").status_code == 202  # the longest


def test_the_service_refuses_a_doc_id_to_delete_naming_it(qa, redis_url, run):
    with pytest.raises(InputError, match="^doc_ids.1: String should have at most 256 "):
        run(qa.delete(["d1", "a" * 257]))
    assert redis.Redis.from_url(redis_url).xlen(keys.INGEST) == 0


@pytest.mark.usefixtures("backends")
def test_backend_bad_request_is_400(client):
    r = client.post("/v1/qa", json={"question": "explode please"})
    assert r.status_code == 400
    assert r.json()["detail"]["service"] == "generator"
    assert "cannot fit" in r.json()["detail"]["message"]


def test_no_backend_is_504_and_full_backlog_is_503(client, qa, settings):
    short = settings.serve.model_copy(update={"request_timeout_s": 0.3})
    qa.settings = settings.model_copy(update={"serve": short})
    r = client.post("/v1/qa", json={"question": "anyone there?"})
    assert r.status_code == 504 and "no reply" in r.json()["detail"]["message"]
    qa.bus.settings = qa.bus.settings.model_copy(update={"max_backlog": 1})
    r = client.post("/v1/qa", json={"question": "anyone there?"})
    assert r.status_code == 503 and "try again later" in r.json()["detail"]["message"]


# --- decoding options -----------------------------------------------------------------------
@pytest.mark.usefixtures("backends")
@pytest.mark.parametrize("options, max_new_tokens", [
    (None, 48),  # the server's default: greedy, generator.max_new_tokens
    ({"strategy": "sample", "temperature": 0.7, "top_k": 40, "top_p": 0.9, "seed": 7,
      "max_new_tokens": 20, "stop": ["\n"], "repetition_penalty": 1.1}, 20),
    ({"strategy": "beam", "num_beams": 3, "length_penalty": 0.5, "early_stopping": True,
      "no_repeat_ngram_size": 3}, 48),
    ({"strategy": "greedy", "max_new_tokens": 64}, 64),
])
def test_decoding_options_reach_the_generator(client, options, max_new_tokens):
    GENERATED.clear()
    r = client.post("/v1/qa", json={"question": "capital?", "decoding": options})
    assert r.status_code == 200, r.text
    (sent,) = GENERATED
    assert sent.decoding == DecodingOptions(**(options or {}))
    assert sent.max_new_tokens == max_new_tokens


@pytest.mark.parametrize("options, loc, message", [
    ({"strategy": "magic"}, ["decoding", "strategy"],
     "unknown decoding strategy 'magic'; known: greedy, beam, sample"),
    ({"strategy": "sample", "top_p": 0}, ["decoding", "top_p"], "in (0, 1], but is 0"),
    ({"strategy": "sample", "top_p": 1.5}, ["decoding", "top_p"], "in (0, 1], but is 1.5"),
    ({"strategy": "sample", "top_k": 0}, ["decoding", "top_k"], "strictly positive integer, "
                                                                "but is 0"),
    ({"strategy": "sample", "temperature": 0}, ["decoding", "temperature"],
     'use strategy "greedy" instead'),
    ({"strategy": "beam", "num_beams": 0}, ["decoding", "num_beams"], "but is 0"),
    ({"max_new_tokens": 65}, ["decoding", "max_new_tokens"], "is 65; the limit is 64"),
    ({"max_new_tokens": 0}, ["decoding", "max_new_tokens"], "strictly positive integer"),
    ({"top_p": 0.5}, ["decoding"], "`top_p` only applies to strategy sample; strategy is "
                                   "greedy"),
    ({"stop": [""]}, ["decoding", "stop"], "each `stop` string has to be 1..64 characters"),
    ({"strategy": 3}, ["decoding", "strategy"], "'greedy', 'beam' or 'sample'"),
])
def test_bad_decoding_options_are_422(client, options, loc, message):
    r = client.post("/v1/qa", json={"question": "capital?", "decoding": options})
    assert r.status_code == 422, r.text
    assert _field(r)[1:] == loc and message in r.json()["detail"][0]["msg"], r.text


def test_the_front_resolves_and_limits_max_new_tokens(qa):
    assert qa.check_decoding(None) == (DecodingOptions(), 48)
    options = DecodingOptions(strategy="sample", max_new_tokens=64)
    assert qa.check_decoding(options) == (options, 64)
    with pytest.raises(InputError, match="decoding.max_new_tokens: is 65; the limit is 64"):
        qa.check_decoding(DecodingOptions(max_new_tokens=65))


@pytest.fixture
def tiny_generator(settings, flush):
    """The ranker stand-in and the real generator service on a tiny random model whose
    context window (200 tokens) the chat prompt alone overflows."""
    tok = per_byte_tokenizer()
    service = GeneratorService(serving_llama(tok), tok, 1_000, max_context_tokens=200,
                               max_new_tokens_limit=settings.generator.max_new_tokens_limit)
    yield from _serve_generator(settings, service)


def _serve_generator(settings, service):
    batcher = Batcher(service, settings.generator.max_batch_size,
                      settings.generator.batch_wait_ms)
    threads = [WorkerThread(_ranker, settings.redis.url, settings.redis, "ranker"),
               WorkerThread(lambda bus: generator_worker(batcher, bus), settings.redis.url,
                            settings.redis, "generator")]
    yield service
    for thread in threads:
        thread.stop()
    batcher.close()


@pytest.mark.usefixtures("tiny_generator")
@pytest.mark.parametrize("options, budget", [(None, 200 - 48),
                                             ({"strategy": "beam", "max_new_tokens": 64}, 136)])
def test_a_prompt_that_cannot_fit_is_400_naming_the_generator(client, options, budget):
    # 400 at once: the generator's GenerationError is a BadRequest, never retried
    r = client.post("/v1/qa", json={"question": "What is the capital of France?",
                                    "decoding": options})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert (detail["service"], detail["kind"]) == ("generator", "bad_request")
    assert f"prompt tokens, over the budget of {budget} tokens" in detail["message"]


@pytest.mark.usefixtures("tiny_generator")
def test_a_prompt_that_cannot_fit_is_400_before_any_event(client):
    r = client.post("/v1/qa?stream=true", json={"question": "What is the capital of France?"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["detail"]["service"] == "generator"


# --- streaming: server-sent events ----------------------------------------------------------
def read_events(lines) -> list[tuple[str, dict]]:
    """``(event, data)`` pairs of a server-sent event stream."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


@pytest.fixture
def tiny_streamer(settings, flush):
    """The ranker stand-in and the real generator on a tiny random model."""
    tok = per_byte_tokenizer()
    yield from _serve_generator(settings, GeneratorService(serving_llama(tok), tok, 1_000))


@pytest.mark.usefixtures("tiny_streamer")
def test_sse_streams_tokens_then_the_answer_with_citations(client):
    question = {"question": "What is the capital of France?", "decoding": {"max_new_tokens": 24}}
    with client.stream("POST", "/v1/qa?stream=true", json=question) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r.iter_lines())
    *tokens, (last, answer) = events
    assert last == "answer" and len(tokens) > 1 and {name for name, _ in tokens} == {"token"}
    assert "".join(data["text"] for _, data in tokens) == answer["answer"]
    unary = client.post("/v1/qa", json=question).json()
    assert answer["answer"] == unary["answer"] and answer["passages"] == unary["passages"]
    assert answer["citations"] == unary["citations"]
    assert 0 < answer["timings_ms"]["generate.first_token"] <= answer["timings_ms"]["generate"]


def test_sse_bad_input_is_422(client):
    r = client.post("/v1/qa?stream=true", json={"question": "ok?", "decoding": {"top_k": 3}})
    assert r.status_code == 422 and _field(r)[1:] == ["decoding"]


def test_a_client_that_disconnects_stops_the_generation(settings, flush, qa):
    """Over a real HTTP server: the client reads one token event and hangs up."""
    tok = per_byte_tokenizer()
    results: list = []

    class Recording(GeneratorService):
        def generate_batch(self, *args):
            out = super().generate_batch(*args)
            results.extend(out)
            return out

    service = Recording(serving_llama(tok, force_token="a"), tok, 1_000)
    serving = _serve_generator(settings, service)
    next(serving)
    server = uvicorn.Server(uvicorn.Config(create_app(qa), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/qa?stream=true", timeout=60,
                          json={"question": "capital?", "decoding": {"max_new_tokens": 64}},
                          ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["text"].startswith("a")
                    break
        while not results:  # the generation ends soon after the hang-up, not at 64 tokens
            thread.join(0.05)
        (result,) = results
        assert result.completion_tokens < 64
    finally:
        server.should_exit = True
        thread.join(10)
        next(serving, None)


# --- API key -------------------------------------------------------------------------------
KEY = "k" * 24


@pytest.fixture
def keyed_client(settings):
    serve = settings.serve.model_copy(update={"api_key": SecretStr(KEY)})
    qa = QAService(Bus.connect(settings.redis.url, settings.redis),
                   settings.model_copy(update={"serve": serve}))
    with TestClient(create_app(qa)) as c:
        yield c


@pytest.mark.usefixtures("backends")
@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong-key-wrong-key"}, 401),
    ({"Authorization": KEY}, 401),  # not a bearer token
    ({"x-api-key": KEY[:-1]}, 401),
    ({"Authorization": f"Bearer {KEY}"}, 200),
    ({"authorization": f"bearer {KEY}"}, 200),
    ({"x-api-key": KEY}, 200),
])
def test_the_api_key_is_required_when_set(keyed_client, headers, status):
    r = keyed_client.post("/v1/qa", json={"question": "capital?"}, headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"]["kind"] == "unauthenticated"
        assert keyed_client.post("/v1/qa?stream=true", json={"question": "capital?"},
                                 headers=headers).status_code == 401
        assert keyed_client.get("/v1/status", headers=headers).status_code == 401
        assert keyed_client.post("/v1/documents", json={"documents": [doc(1)]},
                                 headers=headers).status_code == 401


def test_health_and_docs_need_no_key(keyed_client):
    assert keyed_client.get("/v1/health").status_code == 200
    assert keyed_client.get("/openapi.json").status_code == 200


# --- feedback --------------------------------------------------------------------------------
RIGHT = {"question": "What is the capital of France?", "answer": "Paris", "verdict": "right"}
WRONG = {"question": "What is the capital of Kenya?", "answer": "Mombasa", "verdict": "wrong",
         "correct_answer": "Nairobi", "doc_ids": ["Kenya"], "request_id": "r1"}


def queued(redis_url) -> list[Envelope]:
    """The envelopes on rag:feedback, oldest first."""
    entries = redis.Redis.from_url(redis_url).xrange(keys.FEEDBACK)
    return [Envelope.model_validate_json(fields[b"msg"]) for _id, fields in entries]


def test_feedback_is_queued_for_the_trainer(client, redis_url):
    r = client.post("/v1/feedback", json={"items": [RIGHT, WRONG | {"feedback_id": "fb-1"}]})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 2 and len(body["entries"]) == 2
    assert body["feedback_ids"][1] == "fb-1"
    envelopes = queued(redis_url)
    assert [e.kind for e in envelopes] == ["feedback", "feedback"]
    items = [Feedback.model_validate(e.body) for e in envelopes]
    assert [e.id for e in envelopes] == [f"feedback-{i}" for i in body["feedback_ids"]]
    assert [f.feedback_id for f in items] == body["feedback_ids"]
    assert [f.target() for f in items] == ["Paris", "Nairobi"]
    assert (items[1].doc_ids, items[1].request_id) == (["Kenya"], "r1")
    (backlog,) = [s for s in client.get("/v1/status").json()["streams"]
                  if s["stream"] == keys.FEEDBACK]
    assert (backlog["group"], backlog["length"], backlog["lag"]) == ("trainer", 2, 2)


@pytest.mark.parametrize("items, loc, message", [
    ([RIGHT | {"verdict": "wrong"}], ["items", 0],
     "a `wrong` verdict needs `correct_answer`: the answer it should have been"),
    ([WRONG | {"correct_answer": "  "}], ["items", 0], "a `wrong` verdict needs"),
    ([RIGHT | {"answer": ""}], ["items", 0], "a `right` verdict needs `answer`"),
    ([RIGHT | {"correct_answer": "Lyon"}], ["items", 0], "is for a `wrong` verdict"),
    ([RIGHT | {"verdict": "maybe"}], ["items", 0, "verdict"], "'right' or 'wrong'"),
    ([RIGHT | {"question": " "}], ["items", 0, "question"], "at least 1 character"),
    ([RIGHT | {"feedback_id": "has space"}], ["items", 0, "feedback_id"], "pattern"),
    ([RIGHT | {"colour": "red"}], ["items", 0, "colour"], "Extra inputs"),
    ([], ["items"], "at least 1 item"),
    ([RIGHT, RIGHT | {"answer": "x" * 501}], ["items", 1, "answer"],
     "is 501 characters; the limit is 500"),
    ([WRONG | {"correct_answer": "y" * 501}], ["items", 0, "correct_answer"],
     "is 501 characters; the limit is 500"),
    ([RIGHT | {"question": "q" * 201}], ["items", 0, "question"],
     "is 201 characters; the limit is 200"),
    ([WRONG | {"feedback_id": "same"}, RIGHT | {"feedback_id": "same"}],
     ["items", 1, "feedback_id"], "'same' appears twice"),
    ([RIGHT] * 6, ["items"], "holds 6 items; at most 5 can wait for the trainer"),
])
def test_bad_feedback_is_422_naming_the_problem_and_adds_nothing(client, redis_url, items,
                                                                loc, message):
    r = client.post("/v1/feedback", json={"items": items})
    assert r.status_code == 422, r.text
    assert _field(r)[1:] == loc and message in r.json()["detail"][0]["msg"], r.text
    assert redis.Redis.from_url(redis_url).xlen(keys.FEEDBACK) == 0


def test_a_feedback_flood_is_refused_at_the_cap(client, redis_url):
    # max_pending is 5 and no trainer reads: the sixth item on is refused, nothing is lost
    statuses = [client.post("/v1/feedback", json={"items": [RIGHT | {"answer": f"Paris {i}"}]})
                for i in range(8)]
    assert [r.status_code for r in statuses] == [202] * 5 + [429] * 3
    for refused in statuses[5:]:
        assert int(refused.headers["retry-after"]) > 0
        detail = refused.json()["detail"]
        assert (detail["service"], detail["kind"]) == ("qa", "busy")
        assert detail["message"] == ("5 feedback items wait for the trainer and 1 more would "
                                     "pass the cap of 5; retry later")
    assert redis.Redis.from_url(redis_url).xlen(keys.FEEDBACK) == 5
    assert [Feedback.model_validate(e.body).answer for e in queued(redis_url)] == [
        f"Paris {i}" for i in range(5)]


def test_feedback_over_the_room_left_adds_none_of_it(client, redis_url, settings, run):
    assert client.post("/v1/feedback", json={"items": [RIGHT] * 3}).status_code == 202
    r = client.post("/v1/feedback", json={"items": [WRONG, RIGHT, WRONG]})
    assert r.status_code == 429 and "3 feedback items wait" in r.json()["detail"]["message"]
    assert len(queued(redis_url)) == 3
    assert client.post("/v1/feedback", json={"items": [WRONG] * 2}).status_code == 202

    # the trainer reading (and acking) the backlog makes room again
    read: list[Feedback] = []

    async def drain():
        bus = Bus.connect(settings.redis.url, settings.redis)

        async def store(item: Feedback) -> None:
            read.append(item)

        await Worker(bus, keys.TRAINER, [keys.FEEDBACK],
                     routes(feedback=(Feedback, store))).run(burst=True)
        await bus.close()

    run(drain())
    assert [f.verdict for f in read] == ["right"] * 3 + ["wrong"] * 2
    assert client.post("/v1/feedback", json={"items": [WRONG] * 5}).status_code == 202
    assert redis.Redis.from_url(redis_url).xlen(keys.FEEDBACK) == 5  # the exact cap


# --- the bus out of reach ----------------------------------------------------------------------
DOWN = {"schema_version": 1, "service": "qa", "kind": "unavailable",
        "message": BUS_UNREACHABLE_MESSAGE}


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/qa", {"question": "capital?"}),
    ("POST", "/v1/qa?stream=true", {"question": "capital?"}),
    ("POST", "/v1/documents", {"documents": [doc(1)]}),
    ("DELETE", "/v1/documents/d1", None),
    ("POST", "/v1/feedback", {"items": [RIGHT]}),
    ("GET", "/v1/status", None),
    ("GET", "/v1/health", None),
])
def test_an_unreachable_bus_is_503_saying_so(unreachable, method, path, body):
    qa = QAService(Bus.connect(unreachable.redis.url, unreachable.redis), unreachable)
    with TestClient(create_app(qa)) as client:
        r = client.request(method, path, json=body)
    assert r.status_code == 503, r.text
    assert r.json()["detail"] == DOWN


class _Connected:
    async def is_disconnected(self) -> bool:
        return False


def test_a_bus_lost_mid_stream_ends_it_with_an_error_event(run):
    # A fake: losing Redis between two tokens cannot be caused cheaply.
    async def events():
        raise redis.ConnectionError("Connection reset by peer")
        yield  # an async generator

    async def stream() -> list[str]:
        return [event async for event in _sse(AnswerChunk(text="Par"), events(), _Connected())]

    sent = read_events("".join(run(stream())).splitlines())
    assert [name for name, _ in sent] == ["token", "error"]
    assert sent[1][1] == {"detail": DOWN}
