"""Dynamic batching: concurrent generate requests share one ``model.generate`` call.

A ``Batcher`` owns the thread that runs the model. A request waits at most ``max_wait_ms`` for
others to join it, up to ``max_batch_size`` in all; only requests with the same
``batch_key`` (same decoding options and answer length) share a batch, and one whose key
differs waits, in arrival order, for the next batch without a second wait. The KV cache is
``model.generate``'s own; padding is the service's (``GeneratorService.generate_batch``).

Why batch: at batch 1 each decoding step reads every weight of the model to produce one token;
a batch of 8 reads them once for 8 tokens, so throughput grows nearly with the batch while
the model's memory bandwidth, not its arithmetic, is the limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from services.generator.service import batch_key
from services.generator.streaming import Sink
from shared.schemas import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)


@dataclass
class _Job:
    req: GenerateRequest
    key: str
    sink: Sink | None
    cancelled: threading.Event | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """Runs ``service.generate_batch`` on batches of submitted requests, one batch at a time,
    in a daemon thread. ``service`` is read at every batch, so a ``deploy.workers.Current``
    that swaps models serves the next batch with the new one while the running batch ends on
    the old one. ``sizes`` holds the sizes of recent batches (for tests and the bench).
    A batch whose service call raises fails each of its requests with that error, and the
    thread goes on to the next batch.
    """

    def __init__(self, service, max_batch_size: int, max_wait_ms: float):
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` has to be a strictly positive integer, but is "
                             f"{max_batch_size}")
        if not max_wait_ms >= 0:
            raise ValueError(f"`max_wait_ms` has to be a non-negative number, but is "
                             f"{max_wait_ms}")
        self.service = service
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.sizes: deque[int] = deque(maxlen=1000)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: deque[_Job] = deque()  # read while forming a batch of another key
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="generator-batcher",
                                        daemon=True)
        self._thread.start()

    def submit(self, req: GenerateRequest, sink: Sink | None = None,
               cancelled: threading.Event | None = None) -> concurrent.futures.Future:
        """Queue ``req``; the future holds its ``GenerateResult`` or its ``GenerationError``.
        ``sink`` and ``cancelled`` as in ``GeneratorService.generate_batch``."""
        if self._stopping:
            raise RuntimeError("the batcher is closed")
        job = _Job(req, batch_key(req), sink, cancelled)
        self._queue.put(job)
        return job.future

    async def generate(self, req: GenerateRequest, sink: Sink | None = None,
                       cancelled: threading.Event | None = None) -> GenerateResult:
        """``submit`` and wait; raises ``GenerationError`` for a request refused as given.

        A caller that stops waiting (a timeout, its task cancelled) cancels the request if no
        batch has taken it yet; one already running runs on (set ``cancelled`` to end it)
        and its result is dropped. Either way the batcher serves the requests after it."""
        return await asyncio.wrap_future(self.submit(req, sink, cancelled))

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued requests, then stop the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _main(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.sizes.append(len(batch))
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 - the thread serves every later batch
                log.exception("a batch of %d failed", len(batch))
                for job in batch:
                    _settle(job.future, exc)

    def _run(self, batch: list[_Job]) -> None:
        """One batch through the service; each future gets its result or its error."""
        results = self.service.generate_batch(
            [job.req for job in batch], [job.sink for job in batch],
            [job.cancelled for job in batch])
        for job, result in zip(batch, results, strict=True):
            _settle(job.future, result)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest request and up to ``max_batch_size - 1`` of the same key: those held from
        before, then any arriving within ``max_wait_s`` (and any already queued after that).
        None once closed and drained."""
        while True:
            first = self._held.popleft() if self._held else self._queue.get()
            if first is None:
                return None
            if _claim(first):
                break
        batch = [first]
        for job in list(self._held):
            if len(batch) < self.max_batch_size and job.key == first.key:
                self._held.remove(job)
                if _claim(job):
                    batch.append(job)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # closing: run this batch and what is held, then stop
                self._queue.put(None)
                break
            if job.key != first.key:
                self._held.append(job)  # claimed when its batch forms: it may be cancelled
            elif _claim(job):
                batch.append(job)
        return batch


def _claim(job: _Job) -> bool:
    """Mark ``job``'s future running; False (drop the job) for one its caller cancelled while
    it waited, e.g. ``asyncio.wait_for`` around ``Batcher.generate``, which costs no compute."""
    if job.future.set_running_or_notify_cancel():
        return True
    log.debug("dropped a request cancelled while it waited for a batch")
    return False


def _settle(future: concurrent.futures.Future, outcome) -> None:
    """Give ``future`` its result, or its exception for a ``BaseException`` ``outcome``;
    nothing if it is already done (its caller cancelled it while the batch ran)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
