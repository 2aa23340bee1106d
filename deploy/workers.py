"""Bind the plain service classes to the bus: one ``Worker`` per service replica.

Each builder maps message kinds to the service's methods; CPU-bound calls run in a thread
so the worker's event loop keeps reading, reclaiming and acking. ``WorkerThread`` runs a
worker on its own event loop in a background thread (what a Ray Serve replica hosts).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from shared import keys
from shared.bus import FIELD, BadRequest, Bus, NotFound, ReplyStream, Route, Worker, routes
from shared.schemas import (
    AnswerChunk,
    AverageRequest,
    DeleteBatch,
    Event,
    Feedback,
    FeedbackQuery,
    GenerateRequest,
    IndexStats,
    IngestBatch,
    InterpolateRequest,
    JobQuery,
    JobRef,
    ModelsQuery,
    PromoteRequest,
    PruneRequest,
    RetrieveRequest,
    RollbackRequest,
    SearchRequest,
    SearchResult,
    StatsRequest,
    TrainJob,
    UpdateRequest,
)
from shared.settings import RedisSettings

log = logging.getLogger(__name__)


def retriever_worker(service, group: str, bus: Bus) -> Worker:
    """A dense or sparse retriever: ``search`` and ``stats`` requests, and the ``ingest`` and
    ``delete`` entries of ``rag:ingest`` (one stream, so each group applies them in order)."""

    async def search(req: SearchRequest) -> SearchResult:
        return await asyncio.to_thread(service.search, req)

    async def ingest(batch: IngestBatch) -> None:
        await asyncio.to_thread(service.ingest, batch)

    async def delete(batch: DeleteBatch) -> None:
        await asyncio.to_thread(service.delete, batch.doc_ids)

    async def stats(_req: StatsRequest) -> IndexStats:
        return IndexStats(documents=await asyncio.to_thread(service.count))

    return Worker(bus, group, [keys.request_stream(group), keys.INGEST],
                  routes(search=(SearchRequest, search), ingest=(IngestBatch, ingest),
                         delete=(DeleteBatch, delete), stats=(StatsRequest, stats)))


def ranker_worker(service, bus: Bus, concurrency: int = 8) -> Worker:
    """The hybrid ranker: I/O bound (it waits on two retrievers), so several at once."""
    return Worker(bus, keys.RANKER, [keys.request_stream(keys.RANKER)],
                  routes(retrieve=(RetrieveRequest, service.retrieve)), concurrency=concurrency)


def generator_worker(batcher, bus: Bus) -> Worker:
    """The generator through its ``services.generator.batching.Batcher``: ``generate`` (one
    reply) and ``generate_stream`` (``AnswerChunk``s while it generates, then the result).

    The worker holds two batches' worth of requests at once, so the next batch forms while
    one runs. A streamed request whose caller went away is cancelled in its batch.
    """

    async def generate(req: GenerateRequest):
        return await batcher.generate(req)

    async def generate_stream(req: GenerateRequest, reply: ReplyStream):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def sink(text: str) -> None:  # called in the batcher's thread
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        task = asyncio.ensure_future(batcher.generate(req, sink, reply.cancelled))
        # The pieces were queued before the result could be set, so None comes after them.
        task.add_done_callback(lambda _task: pieces.put_nowait(None))
        done = False
        while not done:
            texts = [await pieces.get()]
            while not pieces.empty():
                texts.append(pieces.get_nowait())
            if None in texts:
                done, texts = True, texts[: texts.index(None)]
            if texts:  # what queued up meanwhile goes as one chunk: one XADD
                await reply.send(AnswerChunk(text="".join(texts)))
        return task.result()

    return Worker(bus, keys.GENERATOR, [keys.request_stream(keys.GENERATOR)],
                  routes(generate=(GenerateRequest, generate),
                         generate_stream=Route(GenerateRequest, generate_stream, streams=True)),
                  concurrency=2 * batcher.max_batch_size)


def trainer_worker(runner, bus: Bus) -> Worker:
    """The trainer's requests, and the judged answers of ``rag:feedback`` (stored, an update
    started when enough arrived); each returns at once (training runs in the runner's
    thread). A job id the trainer does not know is a ``NotFound``; any other job or registry
    request that cannot be done is a ``BadRequest`` with the reason."""
    from services.trainer.service import JobError, UnknownJob
    from shared.registry import RegistryError

    def call(fn):
        async def handler(body):
            try:
                return await asyncio.to_thread(fn, body)
            except UnknownJob as exc:
                raise NotFound(str(exc)) from None
            except (JobError, RegistryError) as exc:
                raise BadRequest(str(exc)) from None
        return handler

    return Worker(bus, keys.TRAINER, [keys.request_stream(keys.TRAINER), keys.FEEDBACK], routes(
        submit=(TrainJob, call(runner.submit)), cancel=(JobRef, call(runner.cancel)),
        jobs=(JobQuery, call(runner.jobs)), models=(ModelsQuery, call(lambda _q: runner.models())),
        promote=(PromoteRequest, call(runner.promote)),
        rollback=(RollbackRequest, call(runner.rollback)),
        prune=(PruneRequest, call(runner.prune)),
        average=(AverageRequest, call(runner.average)),
        interpolate=(InterpolateRequest, call(runner.interpolate)),
        feedback=(Feedback, call(runner.feedback)),
        feedback_state=(FeedbackQuery, call(runner.feedback_state)),
        feedback_update=(UpdateRequest, call(runner.update))), concurrency=4)


def publish_sync(redis_url: str, settings: RedisSettings) -> Callable[[Event], None]:
    """A blocking ``rag:events`` publisher for threads outside any event loop (the trainer)."""
    import redis

    client = redis.Redis.from_url(redis_url)

    def publish(event: Event) -> None:
        client.xadd(keys.EVENTS, {FIELD: event.model_dump_json()},
                    maxlen=settings.stream_maxlen, approximate=True)

    return publish


def last_event_id(redis_url: str) -> str:
    """The id of the newest ``rag:events`` entry ("0-0" when there is none): an
    ``EventThread`` started from it sees every event published after this call."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        newest = client.xrevrange(keys.EVENTS, count=1)
    finally:
        client.close()
    return newest[0][0].decode() if newest else "0-0"


class EventThread:
    """Read every ``rag:events`` broadcast after ``start`` (default: from now on; plain
    XREAD, no group: each replica sees each event) and call ``handle(event)`` for the kinds
    in ``kinds``, in this thread. A handler error is logged; the thread carries on.

    A replica takes ``start`` from ``last_event_id`` before it reads the registry, so a
    promotion made while it loads is applied once it runs rather than missed."""

    def __init__(self, redis_url: str, kinds: set[str], handle: Callable[[Event], None],
                 name: str = "events", start: str = "$"):
        import redis

        self._client = redis.Redis.from_url(redis_url)
        self._start = start
        self._kinds = kinds
        self._handle = handle
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        import redis

        last = self._start
        while not self._stopping.is_set():
            try:
                got = self._client.xread({keys.EVENTS: last}, block=1000, count=10)
            except redis.RedisError as exc:
                log.warning("events: %s; retrying in 1 s", exc)
                self._stopping.wait(1.0)
                continue
            for _stream, entries in got or []:
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        event = Event.model_validate_json(fields[FIELD.encode()])
                    except (KeyError, ValueError):
                        log.warning("events: malformed entry %s skipped", entry_id)
                        continue
                    if event.kind in self._kinds:
                        try:
                            self._handle(event)
                        except Exception:  # noqa: BLE001 - one bad event must not stop us
                            log.exception("events: handling %s failed", event.kind)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout_s)


class Current:
    """The service version serving now. Attribute reads go to it; ``swap`` replaces it whole,
    so a call that already started (holding the old service's bound method) finishes on the
    old version while new calls get the new one."""

    def __init__(self, service) -> None:
        self.service = service

    def swap(self, service) -> None:
        self.service = service

    def __getattr__(self, name: str):
        return getattr(self.service, name)


class WorkerThread:
    """Run ``make_worker(bus)`` on a fresh event loop in a daemon thread until ``stop()``.

    The constructor waits (up to 30 s) for the worker to be made and raises RuntimeError,
    chained to the cause, when making it (or its first moments) failed."""

    def __init__(self, make_worker: Callable[[Bus], Worker], redis_url: str,
                 settings: RedisSettings, name: str):
        self._make_worker = make_worker
        self._redis_url = redis_url
        self._settings = settings
        self.worker: Worker | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self.error is not None:
            # Raised, not only kept for check(): a deployment constructor that returns makes
            # Serve report the replica up while nothing reads its requests.
            raise RuntimeError(f"worker {name} did not start: {self.error!r}") from self.error

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - kept for check(), which raises it
            self.error = exc
            log.exception("worker thread %s died", self._thread.name)
        finally:
            self._started.set()
            self._loop.close()

    async def _serve(self) -> None:
        bus = Bus.connect(self._redis_url, self._settings)
        try:
            self.worker = self._make_worker(bus)
            self._started.set()
            await self.worker.run()
        finally:
            await bus.close()

    def check(self) -> None:
        """Raise if the worker has died (Serve's health check restarts the replica)."""
        if self.error is not None:
            raise RuntimeError(f"worker {self._thread.name} died: {self.error!r}")
        if not self._thread.is_alive():
            raise RuntimeError(f"worker {self._thread.name} stopped")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.worker is not None and self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.worker.stop)
        self._thread.join(timeout_s)
