"""Fixtures shared by every test: a real valkey server, and a Bus on it."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from shared.bus import Bus
from shared.infra import start_valkey
from shared.settings import RedisSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = start_valkey(tmp_path_factory.mktemp("valkey"), persist=False)
    yield server.url
    server.stop()


@pytest.fixture
def redis_settings() -> RedisSettings:
    # Short timeouts so reclaim and dead-letter paths run in well under a second.
    return RedisSettings(claim_idle_ms=200, max_deliveries=2, block_ms=50, max_backlog=50)


@pytest.fixture
def flush(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield
    client.close()


@pytest.fixture
def run():
    """Run a coroutine to completion on a fresh event loop (no pytest-asyncio needed)."""
    def _run(coro, timeout_s: float = 30.0):
        return asyncio.run(asyncio.wait_for(coro, timeout_s))
    return _run


def make_bus(redis_url: str, settings: RedisSettings, name: str | None = None) -> Bus:
    return Bus.connect(redis_url, settings, name)


# --- leaving ---------------------------------------------------------------------------------
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's exit status once everything is reported, without the interpreter's
    finalisation: a native library (torch, gRPC, Ray's core worker) has been seen to crash
    while Python tears its modules down after every test had passed, which turned a green run
    into exit 139. Every server and child process a test started is stopped by its fixture
    before this point; nothing is left to finalise but the interpreter itself."""
    if _EXIT_STATUS not in config.stash:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[_EXIT_STATUS])

