"""Batched generation: a batch answers exactly as one request at a time (tiny random Llama,
prompts of different lengths), the batcher groups by decoding options, and the generator
worker batches concurrent bus requests and streams over the bus (real valkey)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deploy.workers import WorkerThread, generator_worker
from services.generator.batching import Batcher
from services.generator.service import GenerationError, GeneratorService, batch_key
from shared import keys
from shared.schemas import AnswerChunk, GenerateRequest, GenerateResult
from tests.conftest import make_bus
from tests.services.test_generator import (
    FRANCE,
    GERMANY,
    JAPAN,
    request,
)
from tests.shared.test_bus import until
from tests.tiny import per_byte_tokenizer, serving_llama

QUESTIONS = ["What is the capital of France?", "Who?", "What is the capital of Japan, and why?"]


def mixed_requests(**decoding) -> list[GenerateRequest]:
    """Three requests whose prompts differ in length (379..580 tokens)."""
    passages = [[FRANCE], [FRANCE, GERMANY], [JAPAN]]
    return [request(p, max_new_tokens=12, question=q, **decoding)
            for p, q in zip(passages, QUESTIONS, strict=True)]


@pytest.fixture(scope="module")
def tokenizer():
    return per_byte_tokenizer()


@pytest.fixture(scope="module")
def service(tokenizer):
    return GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)


@pytest.mark.parametrize("decoding", [{}, {"strategy": "beam", "num_beams": 3},
                                      {"strategy": "sample", "seed": 9, "temperature": 0.8}])
def test_a_batch_answers_as_each_request_alone(service, decoding):
    reqs = mixed_requests(**decoding)
    alone = [service.generate(r) for r in reqs]
    assert len({r.prompt_tokens for r in alone}) == 3
    assert service.generate_batch(reqs) == alone


def test_a_request_that_cannot_fit_fails_alone(tokenizer):
    small = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000, max_context_tokens=500)
    reqs = mixed_requests()
    reqs[1] = request([FRANCE], max_new_tokens=12, question="Why " * 150)  # ~900 tokens
    results = small.generate_batch(reqs)
    assert isinstance(results[1], GenerationError)
    assert results[0] == small.generate(reqs[0]) and results[2] == small.generate(reqs[2])


def test_a_batch_refuses_requests_that_decode_differently(service):
    with pytest.raises(ValueError, match="one decoding plan"):
        service.generate_batch([request([FRANCE]), request([FRANCE], strategy="beam")])
    with pytest.raises(ValueError, match="one decoding plan"):
        service.generate_batch([request([FRANCE], max_new_tokens=8),
                                request([FRANCE], max_new_tokens=9)])


def test_batch_key_groups_by_options_and_length():
    assert batch_key(request([FRANCE], max_new_tokens=8)) == batch_key(
        request([GERMANY], max_new_tokens=8, question="Other?"))
    assert batch_key(request([FRANCE], max_new_tokens=8)) == batch_key(
        GenerateRequest(question="q", passages=[], max_new_tokens=8,
                        decoding={"max_new_tokens": 8}))
    assert batch_key(request([FRANCE], max_new_tokens=8)) != batch_key(
        request([FRANCE], max_new_tokens=9))
    assert batch_key(request([FRANCE], strategy="sample", seed=1)) == batch_key(
        request([JAPAN], strategy="sample", seed=1))
    # unseeded samples draw seeds of their own: never one batch
    assert batch_key(request([FRANCE], strategy="sample")) != batch_key(
        request([FRANCE], strategy="sample"))


# --- the batcher ------------------------------------------------------------------------------
class Recorder:
    """A stand-in service that records the batches it is given and answers with the question."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.fail_on = fail_on

    def generate_batch(self, reqs, sinks, cancelled):
        self.batches.append([r.question for r in reqs])
        if self.fail_on in self.batches[-1]:
            raise RuntimeError("out of memory")
        return [GenerateResult(answer=r.question, citations=[], prompt_tokens=1,
                               completion_tokens=1, shown_chars=[]) for r in reqs]


def test_the_batcher_groups_by_key_in_arrival_order_up_to_its_size():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch_size=2, max_wait_ms=60_000)
    futures = [batcher.submit(request([FRANCE], question=f"g{i}")) for i in range(3)]
    futures += [batcher.submit(request([FRANCE], question=f"b{i}", strategy="beam"))
                for i in range(2)]
    futures.append(batcher.submit(request([FRANCE], question="g3")))
    batcher.close()  # ends the wait for a fuller batch; what was queued still runs
    assert [f.result(5).answer for f in futures] == ["g0", "g1", "g2", "b0", "b1", "g3"]
    assert recorder.batches == [["g0", "g1"], ["g2", "g3"], ["b0", "b1"]]
    assert list(batcher.sizes) == [2, 2, 2]


def test_a_failing_batch_fails_each_of_its_requests():
    batcher = Batcher(Recorder(fail_on="boom"), max_batch_size=4, max_wait_ms=60_000)
    futures = [batcher.submit(request([FRANCE], question=q)) for q in ("boom", "fine")]
    batcher.close()
    for future in futures:
        with pytest.raises(RuntimeError, match="out of memory"):
            future.result(5)


class Gated(Recorder):
    """A Recorder whose batches wait for ``release`` (at most 5 s): a batch that runs long."""

    def __init__(self):
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def generate_batch(self, reqs, sinks, cancelled):
        self.started.set()
        self.release.wait(5)
        return super().generate_batch(reqs, sinks, cancelled)


class Short(Recorder):
    """Answers a batch that asks ``fail_on`` with one answer too few (a broken service)."""

    def generate_batch(self, reqs, sinks, cancelled):
        results = Recorder().generate_batch(reqs, sinks, cancelled)
        return results[:-1] if self.fail_on in [r.question for r in reqs] else results


def test_a_caller_that_stops_waiting_leaves_the_batcher_serving(run):
    service = Gated()
    batcher = Batcher(service, max_batch_size=4, max_wait_ms=0)

    async def main():
        first = asyncio.ensure_future(batcher.generate(request([FRANCE], question="first")))
        assert await asyncio.to_thread(service.started.wait, 5)
        with pytest.raises(TimeoutError):  # the caller gives up while its batch runs
            await asyncio.wait_for(first, 0.1)
        service.release.set()
        return await asyncio.wait_for(batcher.generate(request([FRANCE], question="second")),
                                      5)

    try:
        assert run(main(), timeout_s=10).answer == "second"
        assert service.batches == [["first"], ["second"]]
    finally:
        batcher.close(5)
    assert not batcher._thread.is_alive()


def test_a_request_cancelled_before_its_batch_never_runs():
    service = Gated()
    batcher = Batcher(service, max_batch_size=4, max_wait_ms=0)
    running = batcher.submit(request([FRANCE], question="running"))
    assert service.started.wait(5)
    kept = batcher.submit(request([FRANCE], question="kept"))
    held = batcher.submit(request([FRANCE], question="held", strategy="beam"))
    gone = batcher.submit(request([FRANCE], question="gone"))
    later = batcher.submit(request([FRANCE], question="later"))
    assert held.cancel() and gone.cancel()
    service.release.set()
    batcher.close(5)
    assert [f.result(5).answer for f in (running, kept, later)] == ["running", "kept", "later"]
    assert service.batches == [["running"], ["kept", "later"]]
    assert list(batcher.sizes) == [1, 2]


@pytest.mark.parametrize("broken, error", [(Recorder, "out of memory"),
                                           (Short, "shorter than argument 1")])
def test_the_batcher_outlives_a_batch_that_fails(broken, error):
    batcher = Batcher(broken(fail_on="boom"), max_batch_size=4, max_wait_ms=0)
    try:
        with pytest.raises(Exception, match=error):
            batcher.submit(request([FRANCE], question="boom")).result(5)
        assert batcher.submit(request([FRANCE], question="fine")).result(5).answer == "fine"
    finally:
        batcher.close(5)


def test_the_batcher_validates_its_arguments():
    with pytest.raises(ValueError, match="max_batch_size.*but is 0"):
        Batcher(Recorder(), 0, 10)
    with pytest.raises(ValueError, match="max_wait_ms.*but is -1"):
        Batcher(Recorder(), 1, -1)


# --- through the bus --------------------------------------------------------------------------
class Results:
    """Wraps a service, keeping every result it returns."""

    def __init__(self, service):
        self.service = service
        self.results: list = []

    def generate_batch(self, *args):
        results = self.service.generate_batch(*args)
        self.results += results
        return results


@pytest.fixture
def worker(redis_url, redis_settings, flush, service):
    """The generator worker on the tiny model, batching up to 4 within 300 ms."""
    results = Results(service)
    batcher = Batcher(results, max_batch_size=4, max_wait_ms=300)
    thread = WorkerThread(lambda bus: generator_worker(batcher, bus), redis_url, redis_settings,
                          "generator")
    yield batcher, results
    thread.stop()
    batcher.close()


def test_concurrent_requests_over_the_bus_are_batched(worker, service, redis_url,
                                                      redis_settings, run):
    batcher, _ = worker
    reqs = mixed_requests()

    async def main():
        bus = make_bus(redis_url, redis_settings)
        try:
            return await asyncio.gather(*[bus.request(keys.GENERATOR, "generate", r, 30,
                                                      GenerateResult) for r in reqs])
        finally:
            await bus.close()

    assert run(main()) == [service.generate(r) for r in reqs]
    assert max(batcher.sizes) > 1


def test_a_stream_over_the_bus_equals_the_unary_answer(worker, service, redis_url,
                                                       redis_settings, run):
    req = mixed_requests()[2]

    async def main():
        bus = make_bus(redis_url, redis_settings)
        try:
            return [item async for item in bus.request_stream(
                keys.GENERATOR, "generate_stream", req, 30, AnswerChunk, GenerateResult)]
        finally:
            await bus.close()

    *chunks, result = run(main())
    assert result == service.generate(req)
    assert len(chunks) > 1 and "".join(c.text for c in chunks) == result.answer


def test_a_client_that_goes_away_stops_its_generation(redis_url, redis_settings, flush,
                                                      tokenizer, run):
    results = Results(GeneratorService(serving_llama(tokenizer, force_token="a"), tokenizer,
                                       1_000))
    batcher = Batcher(results, max_batch_size=4, max_wait_ms=0)
    thread = WorkerThread(lambda bus: generator_worker(batcher, bus), redis_url, redis_settings,
                          "generator")
    req = request([FRANCE], max_new_tokens=1_000)

    async def main():
        bus = make_bus(redis_url, redis_settings)
        stream = bus.request_stream(keys.GENERATOR, "generate_stream", req, 60, AnswerChunk,
                                    GenerateResult)
        first = await anext(stream)
        await stream.aclose()

        async def finished():
            return bool(results.results)

        await until(finished, timeout_s=60)
        await bus.close()
        return first

    try:
        assert run(main(), timeout_s=90).text.startswith("a")
        (result,) = results.results
        assert result.completion_tokens < 200  # of 1,000: it stopped soon after the close
        assert result.answer == "a" * result.completion_tokens
    finally:
        thread.stop()
        batcher.close()

