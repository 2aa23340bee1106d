"""The ``rag:events`` reader replicas use for promotions, against the real valkey."""

from __future__ import annotations

import queue

import pytest

from deploy.workers import EventThread, last_event_id, publish_sync
from shared.schemas import Event


def promoted(version: str) -> Event:
    return Event(kind="model.promoted", data={"kind": "generator", "version": version})


@pytest.mark.integration
def test_an_event_thread_from_last_event_id_misses_nothing_published_while_loading(
        redis_url, redis_settings, flush):
    assert last_event_id(redis_url) == "0-0"  # no events yet: every later one is seen
    publish = publish_sync(redis_url, redis_settings)
    publish(promoted("v0001"))  # before the replica read the registry: already applied
    start = last_event_id(redis_url)
    publish(promoted("v0002"))  # while the replica loads its model
    publish(Event(kind="model.pruned", data={"kind": "generator"}))  # not asked for
    seen: queue.Queue[Event] = queue.Queue()
    thread = EventThread(redis_url, {"model.promoted"}, seen.put, start=start)
    try:
        publish(promoted("v0003"))
        got = [seen.get(timeout=10).data["version"] for _ in range(2)]
        assert got == ["v0002", "v0003"]
        assert seen.empty()
    finally:
        thread.stop()
