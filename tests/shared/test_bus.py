"""The Streams protocol against a real valkey server: replies, acks, reclaim, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import redis.asyncio as aioredis

from shared import keys
from shared.bus import (
    FIELD,
    BadRequest,
    BusError,
    Busy,
    NotFound,
    ReplyStream,
    Route,
    Worker,
    dead_letters,
    routes,
)
from shared.infra import InfraError, check_redis, free_port
from shared.schemas import AnswerChunk, Envelope, Event, IngestBatch, SearchRequest, SearchResult
from tests.conftest import make_bus

pytestmark = pytest.mark.usefixtures("flush")

SERVICE = "echo"


async def until(predicate, timeout_s: float = 10.0) -> None:
    """Poll an async predicate; fail the test if it is not true in time."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def echo_worker(bus, calls: list | None = None, fail: Exception | None = None) -> Worker:
    async def search(req: SearchRequest) -> SearchResult:
        if calls is not None:
            calls.append(req.query)
        if fail is not None:
            raise fail
        return SearchResult(hits=[], count=len(req.query))

    return Worker(bus, SERVICE, [keys.request_stream(SERVICE)],
                  routes(search=(SearchRequest, search)))


async def request_with_worker(bus, worker, body, timeout_s=5.0):
    """Send one request, let the worker drain its stream in burst mode, return the reply."""
    stream = keys.request_stream(SERVICE)
    before = await bus.redis.xlen(stream)
    task = asyncio.create_task(bus.request(SERVICE, "search", body, timeout_s, SearchResult))
    await until(lambda: _has_entries(bus, stream, before))
    await worker.run(burst=True)
    return await task


async def _has_entries(bus, stream, more_than: int = 0) -> bool:
    return await bus.redis.xlen(stream) > more_than


def test_request_reply_roundtrip(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        worker = echo_worker(bus)
        reply = await request_with_worker(bus, worker, SearchRequest(query="abcd", top_k=3))
        assert reply == SearchResult(hits=[], count=4)
        # acked after the work: nothing pending, entry counted as processed
        stream = keys.request_stream(SERVICE)
        assert await bus.backlog(stream, SERVICE) == 0
        entry_id = (await bus.redis.xrange(stream))[0][0].decode()
        assert await bus.processed(stream, SERVICE, entry_id)
        await bus.close()

    run(main())


@pytest.mark.parametrize("raw, reason", [
    ("{not json", "malformed entry"),
    ('{"schema_version": 2, "id": "x", "kind": "search", "body": {}}', "schema_version"),
])
def test_malformed_entry_is_dead_lettered_and_worker_keeps_serving(
        redis_url, redis_settings, run, raw, reason):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        worker = echo_worker(bus)
        await bus.ensure_group(keys.request_stream(SERVICE), SERVICE)
        await bus.redis.xadd(keys.request_stream(SERVICE), {FIELD: raw})
        reply = await request_with_worker(bus, worker, SearchRequest(query="ok", top_k=1))
        assert reply.count == 2  # still serving after the bad entry
        dead = await dead_letters(bus)
        assert len(dead) == 1 and reason in dead[0].reason and dead[0].raw == raw
        await bus.close()

    run(main())


def test_wrong_body_version_gets_error_reply_and_dead_letter(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        worker = echo_worker(bus)
        body = SearchRequest(query="q", top_k=1).model_dump() | {"schema_version": 9}
        task = asyncio.create_task(_raw_request(bus, body))
        await until(lambda: _has_entries(bus, keys.request_stream(SERVICE)))
        await worker.run(burst=True)
        with pytest.raises(BusError) as err:
            await task
        assert err.value.info.kind == "bad_request" and "schema_version" in str(err.value)
        assert "schema_version" in (await dead_letters(bus))[0].reason
        await bus.close()

    run(main())


async def _raw_request(bus, body: dict):
    class Raw(SearchRequest):
        def model_dump(self, **kwargs):
            return body

    return await bus.request(SERVICE, "search", Raw(query="q", top_k=1), 5.0, SearchResult)


def test_unknown_kind_is_refused_with_known_kinds(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        worker = echo_worker(bus)
        task = asyncio.create_task(bus.request(SERVICE, "frobnicate",
                                               SearchRequest(query="q", top_k=1), 5.0))
        await until(lambda: _has_entries(bus, keys.request_stream(SERVICE)))
        await worker.run(burst=True)
        with pytest.raises(BusError, match=r"unknown kind 'frobnicate'.*\['search'\]"):
            await task
        await bus.close()

    run(main())


def test_bad_request_from_handler_is_answered_not_retried(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        calls: list = []
        worker = echo_worker(bus, calls, fail=BadRequest("top_k too large"))
        with pytest.raises(BusError, match="top_k too large") as err:
            await request_with_worker(bus, worker, SearchRequest(query="q", top_k=1))
        assert err.value.info.kind == "bad_request" and calls == ["q"]
        assert await bus.backlog(keys.request_stream(SERVICE), SERVICE) == 0
        await bus.close()

    run(main())


def test_not_found_from_handler_is_its_own_kind_answered_not_retried(redis_url, redis_settings,
                                                                     run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        calls: list = []
        worker = echo_worker(bus, calls, fail=NotFound("no job 'x'"))
        with pytest.raises(BusError, match="no job 'x'") as err:
            await request_with_worker(bus, worker, SearchRequest(query="q", top_k=1))
        assert err.value.info.kind == "not_found" and calls == ["q"]
        assert await bus.backlog(keys.request_stream(SERVICE), SERVICE) == 0
        await bus.close()

    run(main())


def test_failing_handler_is_retried_then_dead_lettered_with_its_error(
        redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        calls: list = []
        worker = echo_worker(bus, calls, fail=RuntimeError("disk on fire"))
        task = asyncio.create_task(bus.request(SERVICE, "search",
                                               SearchRequest(query="q", top_k=1), 10.0))
        await until(lambda: _has_entries(bus, keys.request_stream(SERVICE)))

        async def dead_lettered():
            await worker.run(burst=True)
            return bool(await dead_letters(bus))

        await until(dead_lettered)
        with pytest.raises(BusError, match="disk on fire") as err:
            await task
        assert err.value.info.kind == "failed"
        assert len(calls) == redis_settings.max_deliveries
        letter = (await dead_letters(bus))[0]
        assert "RuntimeError: disk on fire" in letter.reason
        assert letter.deliveries == redis_settings.max_deliveries
        assert await bus.backlog(keys.request_stream(SERVICE), SERVICE) == 0
        await bus.close()

    run(main())


def test_request_read_after_deadline_is_dropped(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        calls: list = []
        worker = echo_worker(bus, calls)
        stream = keys.request_stream(SERVICE)
        await bus.ensure_group(stream, SERVICE)
        late = Envelope(id="late", kind="search", body=SearchRequest(query="q", top_k=1)
                        .model_dump(), reply_to=bus.reply_stream, deadline=time.time() - 1)
        await bus.add(stream, late)
        await worker.run(burst=True)
        assert calls == [] and worker.stats.expired == 1
        assert await bus.backlog(stream, SERVICE) == 0
        assert await bus.redis.xlen(bus.reply_stream) == 0
        await bus.close()

    run(main())


DOOMED = textwrap.dedent("""
    import asyncio, os, signal, sys
    from shared import keys
    from shared.bus import Bus, Worker, routes
    from shared.schemas import IngestBatch, SearchRequest
    from shared.settings import RedisSettings

    async def die(_body):
        os.kill(os.getpid(), signal.SIGKILL)  # read, not acked: a consumer killed mid-work

    async def main():
        bus = Bus.connect(sys.argv[1], RedisSettings(block_ms=50))
        worker = Worker(bus, sys.argv[2], [sys.argv[3]],
                        routes(search=(SearchRequest, die), ingest=(IngestBatch, die)),
                        consumer="doomed")
        await worker.run(burst=True)

    asyncio.run(main())
""")


def _kill_a_consumer_mid_work(redis_url: str, group: str, stream: str) -> None:
    proc = subprocess.run([sys.executable, "-c", DOOMED, redis_url, group, stream],
                          timeout=60, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_killed_consumer_request_is_answered_once_by_another(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        calls: list = []
        stream = keys.request_stream(SERVICE)
        await bus.ensure_group(stream, SERVICE)
        task = asyncio.create_task(bus.request(SERVICE, "search",
                                               SearchRequest(query="once", top_k=1), 20.0,
                                               SearchResult))
        await until(lambda: _has_entries(bus, stream))
        await asyncio.to_thread(_kill_a_consumer_mid_work, redis_url, SERVICE, stream)
        pending = await bus.redis.xpending(stream, SERVICE)
        assert pending["pending"] == 1  # the dead consumer holds it

        survivor = echo_worker(bus, calls)

        async def handled():
            await survivor.run(burst=True)
            return survivor.stats.handled > 0

        await until(handled)
        assert (await task).count == 4
        assert calls == ["once"] and survivor.stats.reclaimed == 1
        assert await bus.redis.xlen(bus.reply_stream) == 1  # answered exactly once
        await bus.close()

    run(main())


def test_killed_ingest_consumer_document_indexed_exactly_once(redis_url, redis_settings, run,
                                                             tmp_path):
    from services.sparse.service import SparseService

    async def main():
        bus = make_bus(redis_url, redis_settings)
        index = SparseService(tmp_path / "sparse")

        async def ingest(batch: IngestBatch) -> None:
            await asyncio.to_thread(index.ingest, batch)

        await bus.ensure_group(keys.INGEST, keys.SPARSE)
        batch = IngestBatch(documents=[{"doc_id": "d1", "title": "Lima", "text": "Lima is the "
                                        "capital of Peru."}])
        entry = await bus.add(keys.INGEST, Envelope(id="e1", kind="ingest",
                                                    body=batch.model_dump()))
        await asyncio.to_thread(_kill_a_consumer_mid_work, redis_url, keys.SPARSE, keys.INGEST)
        assert not await bus.processed(keys.INGEST, keys.SPARSE, entry)

        survivor = Worker(bus, keys.SPARSE, [keys.INGEST], routes(ingest=(IngestBatch, ingest)))

        async def done():
            await survivor.run(burst=True)
            return await bus.processed(keys.INGEST, keys.SPARSE, entry)

        await until(done)
        # a second delivery of the same entry (e.g. a late retry) must not duplicate it
        await ingest(batch)
        assert index.count() == 1
        hits = index.search(SearchRequest(query="capital of Peru", top_k=5)).hits
        assert [h.doc_id for h in hits] == ["d1"]
        await bus.close()

    run(main())


def test_full_backlog_answers_busy(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings.model_copy(update={"max_backlog": 3}))
        stream = keys.request_stream(SERVICE)
        await bus.ensure_group(stream, SERVICE)
        for i in range(3):
            await bus.add(stream, Envelope(id=str(i), kind="search", body={}))
        with pytest.raises(Busy, match="try again later"):
            await bus.request(SERVICE, "search", SearchRequest(query="q", top_k=1), 1.0)
        await bus.close()

    run(main())


def test_streams_are_capped(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings.model_copy(update={"stream_maxlen": 100}))
        for i in range(0, 1000, 100):
            await bus.add_many("rag:test", [Event(kind=f"e{j}") for j in range(i, i + 100)])
        assert await bus.redis.xlen("rag:test") <= 300
        await bus.close()

    run(main())


def test_add_many_can_cap_a_stream_exactly(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        for i in range(0, 12, 4):
            await bus.add_many("rag:test", [Event(kind=f"e{j}") for j in range(i, i + 4)],
                               maxlen=5, approximate=False)
        entries = await bus.redis.xrange("rag:test")
        # the oldest go first: the newest five are kept, in order
        assert [Event.model_validate_json(f[FIELD.encode()]).kind for _, f in entries] == [
            f"e{j}" for j in range(7, 12)]
        await bus.close()

    run(main())


def test_events_reach_every_listener(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)

        async def first(n: int) -> list[str]:
            seen = []
            async for event in bus.events(since="0-0", block_ms=50):
                seen.append(event.kind)
                if len(seen) == n:
                    return seen

        await bus.publish(Event(kind="checkpoint.ready", data={"version": 2}))
        await bus.publish(Event(kind="index.swapped"))
        a, b = await asyncio.gather(first(2), first(2))
        assert a == b == ["checkpoint.ready", "index.swapped"]
        await bus.close()

    run(main())


def test_request_times_out_without_a_worker(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        with pytest.raises(BusError, match="no reply to search within"):
            await bus.request(SERVICE, "search", SearchRequest(query="q", top_k=1), 0.2)
        await bus.close()

    run(main())


def test_unreachable_redis_is_a_clear_error():
    url = f"redis://127.0.0.1:{free_port()}"
    with pytest.raises(InfraError, match=f"Redis is unreachable at {url}"):
        check_redis(url, timeout_s=0.5)



# --- streamed replies ------------------------------------------------------------------------
def stream_worker(bus, handler) -> Worker:
    return Worker(bus, SERVICE, [keys.request_stream(SERVICE)],
                  routes(search=Route(SearchRequest, handler, streams=True)))


async def collect(stream, items: list) -> list:
    async for item in stream:
        items.append(item)
    return items


def _stream(bus, timeout_s: float = 5.0):
    return bus.request_stream(SERVICE, "search", SearchRequest(query="q", top_k=1), timeout_s,
                              AnswerChunk, SearchResult)


def test_a_streamed_reply_yields_its_chunks_then_the_result(redis_url, redis_settings, run):
    async def handler(req: SearchRequest, reply: ReplyStream) -> SearchResult:
        for text in ("Par", "is", " [1]"):
            assert await reply.send(AnswerChunk(text=text))
        return SearchResult(hits=[], count=3)

    async def main():
        bus = make_bus(redis_url, redis_settings)
        task = asyncio.create_task(collect(_stream(bus), []))
        await until(lambda: _has_entries(bus, keys.request_stream(SERVICE)))
        await stream_worker(bus, handler).run(burst=True)
        assert await task == [AnswerChunk(text="Par"), AnswerChunk(text="is"),
                              AnswerChunk(text=" [1]"), SearchResult(hits=[], count=3)]
        assert await bus.backlog(keys.request_stream(SERVICE), SERVICE) == 0
        await bus.close()

    run(main())


def test_a_retried_stream_does_not_repeat_chunks(redis_url, redis_settings, run):
    calls = []

    async def handler(req: SearchRequest, reply: ReplyStream) -> SearchResult:
        calls.append(1)
        for text in ("a", "b"):
            await reply.send(AnswerChunk(text=text))
        if len(calls) == 1:
            raise RuntimeError("replica lost its GPU")
        await reply.send(AnswerChunk(text="c"))
        return SearchResult(hits=[], count=len(calls))

    async def main():
        bus = make_bus(redis_url, redis_settings)
        worker = stream_worker(bus, handler)
        task = asyncio.create_task(collect(_stream(bus), []))
        await until(lambda: _has_entries(bus, keys.request_stream(SERVICE)))

        async def answered():
            await worker.run(burst=True)
            return task.done()

        await until(answered)
        assert [getattr(i, "text", None) for i in task.result()] == ["a", "b", "c", None]
        assert task.result()[-1] == SearchResult(hits=[], count=2)
        await bus.close()

    run(main())


def test_closing_a_stream_early_stops_the_handler(redis_url, redis_settings, run):
    sent = []

    async def handler(req: SearchRequest, reply: ReplyStream) -> SearchResult:
        while len(sent) < 10_000 and await reply.send(AnswerChunk(text="x")):
            sent.append(1)
        assert reply.cancelled.is_set() or len(sent) == 10_000
        return SearchResult(hits=[], count=len(sent))

    async def main():
        bus = make_bus(redis_url, redis_settings)
        worker = asyncio.create_task(stream_worker(bus, handler).run(burst=False))
        stream = _stream(bus)
        first = await anext(stream)
        await stream.aclose()  # the client went away
        assert first == AnswerChunk(text="x")
        await until(lambda: _exists(bus, keys.cancel_key("*")))

        async def handled():
            return await bus.backlog(keys.request_stream(SERVICE), SERVICE) == 0

        await until(handled)
        assert 1 <= len(sent) < 10_000
        worker.cancel()
        await bus.close()

    run(main())


async def _exists(bus, pattern: str) -> bool:
    return bool(await bus.redis.keys(pattern))


def test_an_error_after_some_chunks_reaches_the_caller(redis_url, redis_settings, run):
    async def handler(req: SearchRequest, reply: ReplyStream) -> SearchResult:
        await reply.send(AnswerChunk(text="Par"))
        raise BadRequest("the prompt cannot fit")

    async def main():
        bus = make_bus(redis_url, redis_settings)
        items: list = []
        task = asyncio.create_task(collect(_stream(bus), items))
        await until(lambda: _has_entries(bus, keys.request_stream(SERVICE)))
        await stream_worker(bus, handler).run(burst=True)
        with pytest.raises(BusError, match="cannot fit") as err:
            await task
        assert items == [AnswerChunk(text="Par")] and err.value.info.kind == "bad_request"
        await bus.close()

    run(main())


def test_a_stream_without_a_worker_times_out_and_is_cancelled(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        with pytest.raises(BusError, match="did not finish within 0.2 s"):
            await collect(_stream(bus, timeout_s=0.2), [])
        await until(lambda: _exists(bus, keys.cancel_key("*")))
        await bus.close()

    run(main())


# --- slow handlers, ack bookkeeping, dead-letter payloads ------------------------------------
# Handlers take 1 s, over three times claim_idle_ms; a heartbeat every 100 ms keeps their
# entries fresh with 200 ms to spare for a busy test machine.
SLOW_CLAIM_IDLE_MS = 300


def slow_worker(bus, calls: list, seconds: float, name: str) -> Worker:
    async def search(req: SearchRequest) -> SearchResult:
        calls.append(req.query)
        await asyncio.sleep(seconds)  # the work: far longer than claim_idle_ms
        return SearchResult(hits=[], count=len(req.query))

    return Worker(bus, SERVICE, [keys.request_stream(SERVICE)],
                  routes(search=(SearchRequest, search)), consumer=name, concurrency=2)


def test_slow_handlers_run_once_across_replicas(redis_url, redis_settings, run):
    """Entries a replica is still handling are neither reclaimed by it nor by another."""
    async def main():
        settings = redis_settings.model_copy(update={"claim_idle_ms": SLOW_CLAIM_IDLE_MS})
        caller = make_bus(redis_url, settings)
        replicas = [make_bus(redis_url, settings) for _ in range(2)]
        calls: list = []
        workers = [slow_worker(b, calls, 1.0, f"replica-{i}") for i, b in enumerate(replicas)]
        serving = [asyncio.create_task(w.run()) for w in workers]
        queries = ["a", "bb", "ccc"]
        replies = await asyncio.gather(
            *(caller.request(SERVICE, "search", SearchRequest(query=q, top_k=1), 10.0,
                             SearchResult) for q in queries),
            return_exceptions=True)
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*serving), 5)
        assert replies == [SearchResult(hits=[], count=len(q)) for q in queries]
        assert sorted(calls) == queries  # each handled exactly once
        assert [w.stats.reclaimed for w in workers] == [0, 0]
        assert await dead_letters(caller) == []
        assert await caller.backlog(keys.request_stream(SERVICE), SERVICE) == 0
        for b in (caller, *replicas):
            await b.close()

    run(main())


def test_heartbeat_survives_a_redis_error(redis_url, redis_settings, run):
    """While a slow handler runs, its entry never looks idle for claim_idle_ms, even after a
    heartbeat found Redis gone; the heartbeat stops with the worker."""
    async def main():
        before = asyncio.all_tasks()
        settings = redis_settings.model_copy(update={"claim_idle_ms": SLOW_CLAIM_IDLE_MS})
        bus = make_bus(redis_url, settings)
        calls: list = []
        worker = slow_worker(bus, calls, 1.0, "replica")
        real_xclaim = bus.redis.xclaim
        failures: list = []

        async def flaky_xclaim(*args, **kwargs):
            if not failures:  # the first beat finds Redis gone; the next ones get through
                failures.append(1)
                raise aioredis.ConnectionError("connection reset by peer")
            return await real_xclaim(*args, **kwargs)

        bus.redis.xclaim = flaky_xclaim
        stream = keys.request_stream(SERVICE)
        await bus.ensure_group(stream, SERVICE)
        serving = asyncio.create_task(worker.run())
        task = asyncio.create_task(bus.request(SERVICE, "search",
                                               SearchRequest(query="q", top_k=1), 10.0,
                                               SearchResult))
        idle_ms = []
        while not task.done():  # watch the entry as another replica's XAUTOCLAIM would
            idle_ms += [p["time_since_delivered"]
                        for p in await bus.redis.xpending_range(stream, SERVICE, "-", "+", 10)]
            await asyncio.sleep(0.02)
        assert (await task).count == 1 and calls == ["q"] and failures == [1]
        assert len(idle_ms) > 10 and max(idle_ms) < SLOW_CLAIM_IDLE_MS
        worker.stop()
        await asyncio.wait_for(serving, 5)
        await bus.close()
        assert asyncio.all_tasks() == before  # the heartbeat stopped with the worker

    run(main())


def test_a_long_request_does_not_hold_up_a_short_one(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        short_done = asyncio.Event()
        long_working = asyncio.Event()

        async def search(req: SearchRequest) -> SearchResult:
            if req.query == "long":
                # The work: long enough for the worker to pass its reclaim step meanwhile.
                await asyncio.sleep(redis_settings.claim_idle_ms / 1000)
                long_working.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(short_done.wait(), 3.0)
                return SearchResult(hits=[], count=int(short_done.is_set()))
            short_done.set()
            return SearchResult(hits=[], count=0)

        worker = Worker(bus, SERVICE, [keys.request_stream(SERVICE)],
                        routes(search=(SearchRequest, search)), concurrency=2)
        serving = asyncio.create_task(worker.run())
        long = asyncio.create_task(bus.request(SERVICE, "search",
                                               SearchRequest(query="long", top_k=1), 10.0,
                                               SearchResult))
        await asyncio.wait_for(long_working.wait(), 5)
        await bus.request(SERVICE, "search", SearchRequest(query="short", top_k=1), 10.0)
        assert (await long).count == 1  # the short one finished while the long one ran
        worker.stop()
        await asyncio.wait_for(serving, 5)
        await bus.close()

    run(main())


def test_a_dead_letter_keeps_the_whole_payload(redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        stream = keys.request_stream(SERVICE)
        await bus.ensure_group(stream, SERVICE)
        passages = [{"doc_id": f"d{i}", "text": "word " * 400} for i in range(5)]
        envelope = Envelope(id="big", kind="generate", body={"passages": passages})
        await bus.add(stream, envelope)
        await echo_worker(bus).run(burst=True)
        letter = (await dead_letters(bus))[0]
        assert len(letter.raw) > 4096 and "unknown kind" in letter.reason
        assert Envelope.model_validate_json(letter.raw) == envelope  # replayable
        await bus.close()

    run(main())


def test_a_failed_request_that_expires_leaves_no_error_behind(redis_url, redis_settings, run):
    async def main():
        # retried until its deadline passes, never dead-lettered first
        bus = make_bus(redis_url, redis_settings.model_copy(update={"max_deliveries": 50}))
        calls: list = []
        worker = echo_worker(bus, calls, fail=RuntimeError("flaky"))
        stream = keys.request_stream(SERVICE)
        await bus.ensure_group(stream, SERVICE)
        await bus.add(stream, Envelope(id="soon", kind="search", reply_to=bus.reply_stream,
                                       body=SearchRequest(query="q", top_k=1).model_dump(),
                                       deadline=time.time() + 1.0))
        await worker.run(burst=True)
        assert calls == ["q"] and await bus.redis.hlen(keys.ERRORS) == 1

        async def dropped():
            await worker.run(burst=True)
            return worker.stats.expired == 1

        await until(dropped)  # reclaimed after its deadline: acked, not retried
        assert await bus.backlog(stream, SERVICE) == 0 and await dead_letters(bus) == []
        assert await bus.redis.hlen(keys.ERRORS) == 0
        await bus.close()

    run(main())


def test_a_failed_entry_trimmed_while_pending_leaves_no_error_behind(
        redis_url, redis_settings, run):
    async def main():
        bus = make_bus(redis_url, redis_settings)
        calls: list = []
        worker = echo_worker(bus, calls, fail=RuntimeError("flaky"))
        stream = keys.request_stream(SERVICE)
        await bus.ensure_group(stream, SERVICE)
        entry = await bus.add(stream, Envelope(id="gone", kind="search", body=SearchRequest(
            query="q", top_k=1).model_dump()))
        await worker.run(burst=True)
        assert await bus.redis.hlen(keys.ERRORS) == 1
        await bus.redis.xdel(stream, entry)  # as MAXLEN trimming does to an old entry

        async def forgotten():
            await worker.run(burst=True)
            return not (await bus.redis.xpending(stream, SERVICE))["pending"]

        await until(forgotten)
        assert calls == ["q"] and await bus.redis.hlen(keys.ERRORS) == 0
        await bus.close()

    run(main())
