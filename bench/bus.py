"""Bus round-trip overhead per hop versus an in-process call, side by side in one run.

    python bench/bus.py [--n 500]

One "hop" is a request from a caller to a service over Redis Streams and its reply: XADD to
``rag:req:<service>``, XREADGROUP by the service's worker, handler, reply + XACK in one
transaction, XREAD by the caller. The handler is the same trivial function in both columns,
so the difference is the bus. Starts its own embedded valkey; prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.workers import WorkerThread
from shared import keys
from shared.bus import Bus, Worker, routes
from shared.infra import start_valkey
from shared.schemas import Hit, SearchRequest, SearchResult
from shared.settings import RedisSettings

SERVICE = "bench"


def handler_result(req: SearchRequest) -> SearchResult:
    hits = [Hit(doc_id=f"d{i}", title="t", text="x" * 600, score=1.0 / (i + 1))
            for i in range(req.top_k)]
    return SearchResult(hits=hits, count=req.top_k)


async def handler(req: SearchRequest) -> SearchResult:
    return handler_result(req)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def in_process(n: int, req: SearchRequest) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        # the same work a hop does besides transport: validate in, serialise out and back
        body = SearchRequest.model_validate(req.model_dump())
        SearchResult.model_validate_json((await handler(body)).model_dump_json())
        times.append((time.perf_counter() - start) * 1000)
    return times


async def over_bus(n: int, req: SearchRequest, url: str, settings: RedisSettings) -> list[float]:
    bus = Bus.connect(url, settings)
    times = []
    try:
        await bus.request(SERVICE, "search", req, 10, SearchResult)  # warm-up
        for _ in range(n):
            start = time.perf_counter()
            await bus.request(SERVICE, "search", req, 10, SearchResult)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        await bus.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="requests per column")
    parser.add_argument("--top-k", type=int, default=10, help="hits in each reply")
    args = parser.parse_args()
    settings = RedisSettings(block_ms=1000)
    req = SearchRequest(query="what is the capital of france", top_k=args.top_k)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_valkey(Path(tmp), persist=False)
        worker = WorkerThread(
            lambda bus: Worker(bus, SERVICE, [keys.request_stream(SERVICE)],
                               routes(search=(SearchRequest, handler))),
            server.url, settings, "bench")
        try:
            local = asyncio.run(in_process(args.n, req))
            remote = asyncio.run(over_bus(args.n, req, server.url, settings))
        finally:
            worker.stop()
            server.stop()
    rows = [("in-process call", local), ("bus hop (valkey)", remote)]
    print(f"bus round-trip vs in-process call, n={args.n}, reply={args.top_k} hits")
    print(f"{'path':<20}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, values in rows:
        print(f"{name:<20}{statistics.mean(values):>10.3f}{percentile(values, .5):>10.3f}"
              f"{percentile(values, .99):>10.3f}")
    overhead = statistics.mean(remote) - statistics.mean(local)
    print(f"overhead per hop: {overhead:.3f} ms mean; ratio bus/in-process "
          f"{statistics.mean(remote) / statistics.mean(local):.1f}x (p50 "
          f"{percentile(remote, .5) / percentile(local, .5):.1f}x)")


if __name__ == "__main__":
    main()
