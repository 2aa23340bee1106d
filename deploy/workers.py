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
from shared.bus import Bus, Worker, routes
from shared.schemas import (
    DeleteBatch,
    GenerateRequest,
    IndexStats,
    IngestBatch,
    RetrieveRequest,
    SearchRequest,
    SearchResult,
    StatsRequest,
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


def generator_worker(service, bus: Bus) -> Worker:
    async def generate(req: GenerateRequest):
        return await asyncio.to_thread(service.generate, req)

    return Worker(bus, keys.GENERATOR, [keys.request_stream(keys.GENERATOR)],
                  routes(generate=(GenerateRequest, generate)))


class WorkerThread:
    """Run ``make_worker(bus)`` on a fresh event loop in a daemon thread until ``stop()``."""

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
