"""The Redis Streams bus: the whole protocol between ragtune's services lives here.

- Request/reply: ``Bus.request`` adds an ``Envelope`` (``id``, ``reply_to``, ``deadline``) to
  ``rag:req:<service>`` and waits on the caller's own reply stream; one listener task per
  ``Bus`` routes replies to waiting callers by request id (a second reply for an id is dropped).
- Work distribution: ``Worker`` reads its streams with ``XREADGROUP`` as one consumer of the
  service's group and acks only after the handler is done; the reply and the ack are written
  in one MULTI/EXEC, so a request is answered exactly once even if a consumer dies.
- Reclaim: a consumer that dies leaves its entries pending; live ones take them over with
  ``XAUTOCLAIM`` after ``claim_idle_ms``. After ``max_deliveries`` an entry goes to ``rag:dead``
  with the last error and its whole payload, to replay (handlers are idempotent: keyed by
  document id / request id).
- Heartbeat: while a handler runs, its worker re-claims the entry for itself every
  ``claim_idle_ms / 3`` (``XCLAIM ... 0 JUSTID``: idle time back to 0, no delivery counted), so
  a handler slower than ``claim_idle_ms`` is neither taken over nor dead-lettered while it runs;
  a worker never starts an entry it is still handling again.
- Malformed entries (not JSON, wrong schema version, unknown kind) are dead-lettered at once
  with the reason; the worker keeps serving.
- Deadlines: a request read after its deadline is acked and dropped, never processed.
- Broadcast: ``publish`` / ``events`` on ``rag:events``, read with plain ``XREAD`` (no group).
- Every ``XADD`` is capped (``MAXLEN ~``); a request stream whose backlog exceeds
  ``max_backlog`` refuses new requests with ``Busy`` instead of queueing forever.
- Streaming: ``Bus.request_stream`` is ``request`` for a handler that answers in pieces. The
  worker appends ``ReplyChunk`` entries (field ``chunk``, numbered from 0) to the caller's reply
  stream while the handler runs, then the final ``Reply`` as usual; the caller yields each chunk,
  then the result. A caller that stops listening before the result sets ``rag:cancel:<id>``; the
  handler's ``ReplyStream`` notices it at its next ``send`` and sets ``cancelled``.
- ``Worker.run(burst=True)`` drains what is there and returns, so tests need no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError, ResponseError

from shared import keys
from shared.schemas import DeadLetter, Envelope, ErrorInfo, Event, Reply, ReplyChunk
from shared.settings import RedisSettings

log = logging.getLogger(__name__)

FIELD = "msg"  # every entry carries one field: the JSON of a wire model
CHUNK_FIELD = "chunk"  # ... except a streamed reply's pieces: the JSON of a ReplyChunk


class BusError(RuntimeError):
    """A request failed; ``info`` says which service, what kind of failure and why."""

    def __init__(self, info: ErrorInfo):
        super().__init__(f"{info.service}: {info.message}")
        self.info = info


class Busy(BusError):
    """The service's backlog is full; the caller should retry later (HTTP 503)."""


class RequestTimeout(BusError):
    """No reply before the deadline."""


class BadRequest(ValueError):
    """Raised by a handler for input it will never accept: answered at once, not retried.
    The caller's ``BusError`` carries ``kind`` (``ErrorInfo.kind``)."""

    kind = "bad_request"


class NotFound(BadRequest):
    """Raised by a handler for a thing it does not have (an unknown job id): answered at once,
    not retried, with kind ``not_found`` so that the caller can tell it apart (HTTP 404)."""

    kind = "not_found"


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _cancelled() -> bool:
    """True inside a task that was asked to stop, whatever its awaits raised or returned:
    redis-py may report a cancelled read as a connection error, and Python 3.11's
    ``asyncio.wait_for`` (inside redis-py) drops a cancellation that races a reply."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Bus:
    """One Redis connection pool and the caller side of the protocol.

    ``name`` identifies this process's reply stream (``rag:reply:<name>``); make it unique per
    replica. All methods are coroutines bound to the event loop that first uses the Bus.
    """

    def __init__(self, redis: aioredis.Redis, settings: RedisSettings, name: str | None = None):
        self.redis = redis
        self.settings = settings
        self.name = name or uuid.uuid4().hex[:12]
        self.reply_stream = keys.reply_stream(self.name)
        self._waiting: dict[str, asyncio.Queue[Reply | ReplyChunk]] = {}
        self._listener: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._closing = False

    @classmethod
    def connect(cls, url: str, settings: RedisSettings, name: str | None = None) -> Bus:
        return cls(aioredis.Redis.from_url(url), settings, name)

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._listener, 5)
            self._listener = None
        await self.redis.aclose()

    # --- adding -------------------------------------------------------------------------
    async def add(self, stream: str, model: BaseModel) -> str:
        """Append a wire model to a capped stream; returns the entry id."""
        entry = await self.redis.xadd(
            stream, {FIELD: model.model_dump_json()}, maxlen=self.settings.stream_maxlen,
            approximate=True,
        )
        return _decode(entry)

    async def add_many(self, stream: str, models: list[BaseModel], *, maxlen: int | None = None,
                       approximate: bool = True) -> list[str]:
        """Append several entries atomically (all or none: nothing is half-ingested).

        The stream is capped at ``maxlen`` (default ``stream_maxlen``), roughly unless
        ``approximate`` is False: an exact cap trims the oldest entries down to ``maxlen``.
        """
        pipe = self.redis.pipeline(transaction=True)
        cap = self.settings.stream_maxlen if maxlen is None else maxlen
        for model in models:
            pipe.xadd(stream, {FIELD: model.model_dump_json()}, maxlen=cap,
                      approximate=approximate)
        return [_decode(entry) for entry in await pipe.execute()]

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create a consumer group (and the stream) reading from the start, if missing."""
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def backlog(self, stream: str, group: str) -> int:
        """Entries of ``stream`` that ``group`` has not finished: pending + not yet read.

        Without the group (no replica has started yet) every entry of the stream waits.
        """
        with contextlib.suppress(ResponseError):
            for info in await self.redis.xinfo_groups(stream):
                if _decode(info["name"]) == group:
                    return int(info.get("pending") or 0) + int(info.get("lag") or 0)
        return await self.redis.xlen(stream)

    async def processed(self, stream: str, group: str, entry_id: str) -> bool:
        """True once ``group`` has read *and* acked ``entry_id`` (or dead-lettered it)."""
        last = None
        with contextlib.suppress(ResponseError):
            for info in await self.redis.xinfo_groups(stream):
                if _decode(info["name"]) == group:
                    last = _decode(info["last-delivered-id"])
        if last is None or _id_tuple(last) < _id_tuple(entry_id):
            return False
        pending = await self.redis.xpending_range(stream, group, entry_id, entry_id, 1)
        return not pending

    # --- request / reply ---------------------------------------------------------------
    async def request(
        self, service: str, kind: str, body: BaseModel, timeout_s: float,
        reply_model: type[BaseModel] | None = None,
    ) -> BaseModel | dict:
        """Send ``body`` to ``service`` and wait for its reply.

        Returns ``reply_model`` validated from the reply body (or the raw dict without one).
        Raises Busy when the service's backlog is full, RequestTimeout after ``timeout_s``,
        BusError when the service answered with an error.
        """
        stream = await self._open(service)
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue[Reply | ReplyChunk] = asyncio.Queue()
        self._waiting[request_id] = queue
        envelope = Envelope(id=request_id, kind=kind, body=body.model_dump(),
                            reply_to=self.reply_stream, deadline=time.time() + timeout_s)
        try:
            await self.add(stream, envelope)
            try:
                reply = await asyncio.wait_for(queue.get(), timeout_s)
            except TimeoutError:
                raise RequestTimeout(ErrorInfo(
                    service=service, kind="timeout",
                    message=f"no reply to {kind} within {timeout_s:.1f} s")) from None
        finally:
            self._waiting.pop(request_id, None)
        if not reply.ok:
            raise BusError(reply.error or ErrorInfo(service=service, kind="failed",
                                                    message="error without details"))
        return reply_model.model_validate(reply.body) if reply_model else (reply.body or {})

    async def request_stream(
        self, service: str, kind: str, body: BaseModel, timeout_s: float,
        chunk_model: type[BaseModel], reply_model: type[BaseModel],
    ) -> AsyncIterator[BaseModel]:
        """Send ``body`` to a streaming handler of ``service``; yield each chunk it sends as a
        ``chunk_model``, then its result as a ``reply_model`` (always the last item).

        ``timeout_s`` bounds the whole stream. Raises as ``request`` does: Busy before
        anything is sent, RequestTimeout, BusError (possibly after some chunks). Closing the
        iterator before the result (the client went away) asks the handler to stop, through
        ``rag:cancel:<id>``. Chunks a retried handler sends again (same ``seq``) are skipped.
        """
        stream = await self._open(service)
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue[Reply | ReplyChunk] = asyncio.Queue()
        self._waiting[request_id] = queue
        deadline = time.time() + timeout_s
        envelope = Envelope(id=request_id, kind=kind, body=body.model_dump(),
                            reply_to=self.reply_stream, deadline=deadline)
        finished = False
        next_seq = 0
        try:
            await self.add(stream, envelope)
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(deadline - time.time(), 0))
                except TimeoutError:
                    raise RequestTimeout(ErrorInfo(
                        service=service, kind="timeout",
                        message=f"{kind} did not finish within {timeout_s:.1f} s")) from None
                if isinstance(item, ReplyChunk):
                    if item.seq >= next_seq:
                        next_seq = item.seq + 1
                        yield chunk_model.model_validate(item.body)
                    continue
                finished = True
                if not item.ok:
                    raise BusError(item.error or ErrorInfo(service=service, kind="failed",
                                                           message="error without details"))
                yield reply_model.model_validate(item.body)
                return
        finally:
            self._waiting.pop(request_id, None)
            if not finished:
                # A task of its own: this generator may be closing inside a cancelled task
                # (a client that disconnected), where any await of ours would be cancelled.
                task = asyncio.get_running_loop().create_task(self.cancel(request_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def cancel(self, request_id: str) -> None:
        """Ask the handler of a streamed request to stop (it checks at its next chunk)."""
        try:
            await self.redis.set(keys.cancel_key(request_id), 1, ex=self.settings.reply_ttl_s)
        except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            log.warning("could not cancel request %s: %s", request_id, exc)

    async def _open(self, service: str) -> str:
        """The service's request stream, once it has room (else Busy); starts the listener."""
        stream = keys.request_stream(service)
        if await self.backlog(stream, service) >= self.settings.max_backlog:
            raise Busy(ErrorInfo(service=service, kind="busy",
                                 message=f"{service} has {self.settings.max_backlog} requests "
                                         "waiting; try again later"))
        self._ensure_listener()
        return stream

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        # From the start of this caller's private stream, so no reply that lands before the
        # first read is missed; replies nobody waits for any more are dropped below.
        last = "0-0"
        while not self._closing and not _cancelled():
            try:
                got = await self.redis.xread({self.reply_stream: last}, block=1000, count=100)
                await self.redis.expire(self.reply_stream, self.settings.reply_ttl_s)
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                # redis-py may turn a cancelled read into a connection error: the flag and the
                # task, not the exception, say whether we are closing or cancelled.
                if self._closing or _cancelled():
                    return
                log.warning("reply listener %s: %s; retrying", self.reply_stream, exc)
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in got or []:
                for entry_id, fields in entries:
                    last = _decode(entry_id)
                    try:
                        if CHUNK_FIELD.encode() in fields:
                            chunk = ReplyChunk.model_validate_json(fields[CHUNK_FIELD.encode()])
                            queue = self._waiting.get(chunk.id)
                            if queue is not None:  # else: nobody listens to that stream now
                                queue.put_nowait(chunk)
                            continue
                        reply = Reply.model_validate_json(fields[FIELD.encode()])
                    except (KeyError, ValidationError) as exc:
                        log.error("dropping malformed reply %s: %s", last, exc)
                        continue
                    queue = self._waiting.pop(reply.id, None)
                    if queue is not None:  # else: a late or duplicate reply
                        queue.put_nowait(reply)

    # --- broadcast events ---------------------------------------------------------------
    async def publish(self, event: Event) -> str:
        return await self.add(keys.EVENTS, event)

    async def events(self, since: str = "$", block_ms: int = 1000) -> AsyncIterator[Event]:
        """Yield every event published after ``since`` (forever; cancel to stop)."""
        last = since
        while True:
            got = await self.redis.xread({keys.EVENTS: last}, block=block_ms, count=100)
            for _stream, entries in got or []:
                for entry_id, fields in entries:
                    last = _decode(entry_id)
                    try:
                        yield Event.model_validate_json(fields[FIELD.encode()])
                    except (KeyError, ValidationError) as exc:
                        log.error("skipping malformed event %s: %s", last, exc)


Handler = Callable[[BaseModel], Awaitable[BaseModel | None]]


class ReplyStream:
    """A streaming handler's line back to its caller.

    ``send`` appends a chunk to the caller's reply stream (numbered in order) and, in the same
    round trip, checks whether the caller asked to stop; once it has, ``cancelled`` is set.
    ``cancelled`` is a ``threading.Event`` so that work running in another thread (a model's
    stopping criterion) can read it.
    """

    def __init__(self, bus: Bus, envelope: Envelope):
        self.bus = bus
        self.envelope = envelope
        self.cancelled = threading.Event()
        self._seq = 0

    async def send(self, chunk: BaseModel) -> bool:
        """Send one chunk; returns False once the caller has stopped listening."""
        if self.cancelled.is_set():
            return False
        pipe = self.bus.redis.pipeline(transaction=False)
        if self.envelope.reply_to:
            piece = ReplyChunk(id=self.envelope.id, seq=self._seq, body=chunk.model_dump())
            pipe.xadd(self.envelope.reply_to, {CHUNK_FIELD: piece.model_dump_json()},
                      maxlen=self.bus.settings.stream_maxlen, approximate=True)
        pipe.exists(keys.cancel_key(self.envelope.id))
        *_, cancelled = await pipe.execute()
        self._seq += 1
        if cancelled:
            self.cancelled.set()
        return not cancelled


StreamHandler = Callable[[BaseModel, ReplyStream], Awaitable[BaseModel | None]]


@dataclass
class Route:
    """How a worker handles one message kind: validate the body as ``model``, call ``fn``.

    With ``streams``, ``fn(body, reply_stream)`` may send chunks before it returns (callers
    use ``Bus.request_stream``); its result is the final reply as for any handler.
    """

    model: type[BaseModel]
    fn: Handler | StreamHandler
    streams: bool = False


@dataclass
class Stats:
    handled: int = 0
    failed: int = 0
    dead: int = 0
    expired: int = 0
    reclaimed: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))


class Worker:
    """One consumer of ``group`` over ``streams``, dispatching entries to ``routes`` by kind.

    Handlers are coroutines (run CPU work with ``asyncio.to_thread``) and must be idempotent.
    A handler raising ``BadRequest`` gets an error reply and an ack; any other exception leaves
    the entry pending for a retry (by this or another consumer) until ``max_deliveries``.
    """

    def __init__(self, bus: Bus, group: str, streams: list[str], routes: dict[str, Route],
                 consumer: str | None = None, concurrency: int = 1):
        self.bus = bus
        self.group = group
        self.streams = streams
        self.routes = routes
        self.consumer = consumer or f"{group}-{uuid.uuid4().hex[:8]}"
        self.concurrency = concurrency
        self.stats = Stats()
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()
        # stream -> ids of the entries this worker has taken and not finished (heartbeated)
        self._inflight: dict[str, set[str]] = {s: set() for s in streams}

    @property
    def settings(self) -> RedisSettings:
        return self.bus.settings

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, burst: bool = False) -> None:
        """Serve until ``stop()``; with ``burst`` return once nothing is left to do."""
        for stream in self.streams:
            await self.bus.ensure_group(stream, self.group)
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat())
        try:
            await self._serve(burst)
            await self._drain()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _serve(self, burst: bool) -> None:
        next_claim = 0.0
        while not self._stopping.is_set():
            if _cancelled():  # a cancellation redis-py swallowed (3.11's wait_for can)
                raise asyncio.CancelledError
            did = 0
            try:
                if time.monotonic() >= next_claim:
                    did += await self._reclaim(drain=burst)
                    next_claim = time.monotonic() + self.settings.claim_idle_ms / 2000
                did += await self._read(block=not burst)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group vanished (a Redis without persistence restarted, an
                # operator deleted it): recreate and carry on.
                log.warning("%s: %s; recreating the consumer groups", self.consumer, exc)
                for stream in self.streams:
                    await self.bus.ensure_group(stream, self.group)
                continue
            except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                if _cancelled():  # a cancelled read, as redis-py may report it
                    raise asyncio.CancelledError from exc
                log.warning("%s lost Redis (%s); retrying in 1 s", self.consumer, exc)
                await asyncio.sleep(1.0)
                continue
            if burst and did == 0:
                return

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self, block: bool) -> int:
        free = self.concurrency - len(self._tasks)
        if free <= 0:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            return 1
        got = await self.bus.redis.xreadgroup(
            self.group, self.consumer, {s: ">" for s in self.streams}, count=free,
            block=self.settings.block_ms if block else None,
        )
        n = 0
        for stream, entries in got or []:
            for entry_id, fields in entries:
                await self._spawn(_decode(stream), _decode(entry_id), fields)
                n += 1
        if not block:
            await self._drain()
        return n

    async def _heartbeat(self) -> None:
        """Every ``claim_idle_ms / 3``, reset the idle time of this worker's in-flight entries,
        so that no ``XAUTOCLAIM`` (another replica's or ours) takes one whose handler still
        runs. ``JUSTID`` makes the re-claim count no delivery. Runs until cancelled; a Redis
        error is logged and the next beat tries again."""
        interval = self.settings.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            for stream, inflight in self._inflight.items():
                if not inflight:
                    continue
                try:
                    await self.bus.redis.xclaim(stream, self.group, self.consumer, 0,
                                                sorted(inflight), justid=True)
                except (OSError, RedisError) as exc:
                    log.warning("%s could not refresh %d in-flight entries of %s: %s",
                                self.consumer, len(inflight), stream, exc)

    async def _reclaim(self, drain: bool) -> int:
        """Take over entries left pending longer than ``claim_idle_ms`` (by a consumer that died,
        or by a handler that failed); with ``drain``, wait until they are handled."""
        n = 0
        for stream in self.streams:
            start = "0-0"
            while True:
                result = await self.bus.redis.xautoclaim(
                    stream, self.group, self.consumer, self.settings.claim_idle_ms,
                    start_id=start, count=50,
                )
                start, entries = _decode(result[0]), result[1]
                # Entries deleted (trimmed) while pending: Redis >= 7 lists their ids third and
                # drops them from the group itself, older servers return them without fields.
                gone = [_decode(i) for i in (result[2] if len(result) > 2 else [])]
                gone += [_decode(i) for i, fields in entries if fields is None]
                if gone:
                    await self._ack(stream, gone)
                for entry_id, fields in entries:
                    entry_id = _decode(entry_id)
                    if fields is None:
                        continue
                    if entry_id in self._inflight[stream]:
                        # Still being handled here (a beat came late): never run it twice.
                        continue
                    info = await self.bus.redis.xpending_range(stream, self.group, entry_id,
                                                               entry_id, 1)
                    deliveries = int(info[0]["times_delivered"]) if info else 1
                    self.stats.reclaimed += 1
                    log.info("%s reclaimed %s %s (delivery %d)", self.consumer, stream,
                             entry_id, deliveries)
                    if deliveries > self.settings.max_deliveries:
                        await self._dead_letter_failed(stream, entry_id, fields, deliveries)
                    else:
                        await self._spawn(stream, entry_id, fields)
                    n += 1
                if start == "0-0":
                    break
        if drain:
            await self._drain()
        return n

    async def _spawn(self, stream: str, entry_id: str, fields: dict) -> None:
        # In flight from now on, while it waits for a slot too: the heartbeat keeps it ours.
        inflight = self._inflight[stream]
        inflight.add(entry_id)
        try:
            await self._slots.acquire()
        except BaseException:
            inflight.discard(entry_id)
            raise
        task = asyncio.get_running_loop().create_task(self._handle(stream, entry_id, fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def done(_task: asyncio.Task) -> None:
            inflight.discard(entry_id)
            self._slots.release()

        task.add_done_callback(done)

    async def _handle(self, stream: str, entry_id: str, fields: dict) -> None:
        raw = fields.get(FIELD.encode(), fields.get(FIELD, b""))
        raw_text = _decode(raw) if raw else ""
        try:
            envelope = Envelope.model_validate_json(raw_text)
        except ValidationError as exc:
            await self._dead_letter(stream, entry_id, raw_text, 1,
                                    f"malformed entry: {_first_error(exc)}")
            return
        route = self.routes.get(envelope.kind)
        if route is None:
            await self._dead_letter(
                stream, entry_id, raw_text, 1,
                f"unknown kind {envelope.kind!r}; {self.group} handles {sorted(self.routes)}",
                reply_to=envelope, kind="bad_request")
            return
        if envelope.deadline is not None and time.time() > envelope.deadline:
            self.stats.expired += 1
            log.info("%s dropped %s %s: read after its deadline", self.consumer, envelope.kind,
                     envelope.id)
            await self._ack(stream, [entry_id])
            return
        try:
            body = route.model.model_validate(envelope.body)
        except ValidationError as exc:
            await self._dead_letter(stream, entry_id, raw_text, 1,
                                    f"bad {envelope.kind} body: {_first_error(exc)}",
                                    reply_to=envelope, kind="bad_request")
            return
        try:
            if route.streams:
                result = await route.fn(body, ReplyStream(self.bus, envelope))
            else:
                result = await route.fn(body)
        except BadRequest as exc:
            await self._finish(stream, entry_id, envelope, Reply(
                id=envelope.id, ok=False,
                error=ErrorInfo(service=self.group, kind=exc.kind, message=str(exc))))
            return
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried, then dead
            self.stats.failed += 1
            message = f"{type(exc).__name__}: {exc}"
            self.stats.errors.append(message)
            log.exception("%s failed on %s %s (request %s)", self.consumer, stream, entry_id,
                          envelope.id)
            await self.bus.redis.hset(keys.ERRORS, f"{stream}|{entry_id}", message[:2000])
            return  # not acked: reclaimed later, dead-lettered after max_deliveries
        reply = Reply(id=envelope.id, ok=True,
                      body=result.model_dump() if result is not None else None)
        await self._finish(stream, entry_id, envelope, reply)
        self.stats.handled += 1

    async def _finish(self, stream: str, entry_id: str, envelope: Envelope,
                      reply: Reply | None) -> None:
        """Reply (if the sender asked for one) and ack in one transaction."""
        pipe = self.bus.redis.pipeline(transaction=True)
        if envelope.reply_to and reply is not None:
            pipe.xadd(envelope.reply_to, {FIELD: reply.model_dump_json()},
                      maxlen=self.settings.stream_maxlen, approximate=True)
        self._queue_ack(pipe, stream, [entry_id])
        await pipe.execute()

    async def _ack(self, stream: str, entry_ids: list[str]) -> None:
        """Ack entries that get no reply (dropped, deleted) with their errors, in one go."""
        pipe = self.bus.redis.pipeline(transaction=True)
        self._queue_ack(pipe, stream, entry_ids)
        await pipe.execute()

    def _queue_ack(self, pipe: aioredis.client.Pipeline, stream: str, entry_ids: list[str]) -> None:
        """Every ack goes with the removal of the entries' last errors, or ``rag:errors``
        would keep one per entry that failed and was then dropped."""
        pipe.xack(stream, self.group, *entry_ids)
        pipe.hdel(keys.ERRORS, *(f"{stream}|{entry_id}" for entry_id in entry_ids))

    async def _dead_letter_failed(self, stream: str, entry_id: str, fields: dict,
                                  deliveries: int) -> None:
        raw = _decode(fields.get(FIELD.encode(), b""))
        error = await self.bus.redis.hget(keys.ERRORS, f"{stream}|{entry_id}")
        reason = _decode(error) if error else "consumer died or failed without an error"
        envelope = None
        with contextlib.suppress(ValidationError):
            envelope = Envelope.model_validate_json(raw)
        await self._dead_letter(stream, entry_id, raw, deliveries - 1,
                                f"gave up after {deliveries - 1} deliveries: {reason}",
                                reply_to=envelope, kind="failed")

    async def _dead_letter(self, stream: str, entry_id: str, raw: str, deliveries: int,
                           reason: str, reply_to: Envelope | None = None,
                           kind: str = "dead_letter") -> None:
        self.stats.dead += 1
        log.warning("%s dead-lettered %s %s: %s", self.consumer, stream, entry_id, reason)
        letter = DeadLetter(stream=stream, group=self.group, entry_id=entry_id,
                            deliveries=deliveries, reason=reason, raw=raw)
        pipe = self.bus.redis.pipeline(transaction=True)
        pipe.xadd(keys.DEAD, {FIELD: letter.model_dump_json()},
                  maxlen=self.settings.stream_maxlen, approximate=True)
        if reply_to is not None and reply_to.reply_to:
            reply = Reply(id=reply_to.id, ok=False,
                          error=ErrorInfo(service=self.group, kind=kind, message=reason))
            pipe.xadd(reply_to.reply_to, {FIELD: reply.model_dump_json()},
                      maxlen=self.settings.stream_maxlen, approximate=True)
        self._queue_ack(pipe, stream, [entry_id])
        await pipe.execute()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "entry"
    return f"{where}: {err.get('msg', 'invalid')}"


async def dead_letters(bus: Bus, count: int = 100) -> list[DeadLetter]:
    """The newest dead letters, newest first."""
    entries = await bus.redis.xrevrange(keys.DEAD, count=count)
    return [DeadLetter.model_validate_json(fields[FIELD.encode()]) for _id, fields in entries]


def routes(**table: tuple[type[BaseModel], Handler] | Route) -> dict[str, Route]:
    """``routes(search=(SearchRequest, fn))`` → the kind → Route table a Worker takes; a
    streaming handler comes as ``Route(Model, fn, streams=True)``."""
    return {kind: entry if isinstance(entry, Route) else Route(*entry)
            for kind, entry in table.items()}
