"""Against the real valkey: the ``rag:events`` reader replicas use for promotions, the worker
thread a replica hosts, and the trainer's error kinds on the bus."""

from __future__ import annotations

import queue

import pytest

from deploy.workers import EventThread, WorkerThread, last_event_id, publish_sync, trainer_worker
from shared import keys
from shared.bus import Bus, BusError
from shared.schemas import ErrorInfo, Event, JobQuery, JobRef


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


# --- worker threads ----------------------------------------------------------------------------
def test_a_worker_that_fails_to_start_fails_the_replica_with_its_cause(redis_url, redis_settings):
    def make_worker(_bus):
        raise OSError("no checkpoint folder")

    # Raised from the constructor: a deployment whose __init__ returned would be reported up
    # by Serve while nothing reads its requests.
    with pytest.raises(RuntimeError, match=r"worker broken did not start: OSError\('no "
                                           r"checkpoint folder'\)") as err:
        WorkerThread(make_worker, redis_url, redis_settings, "broken")
    assert isinstance(err.value.__cause__, OSError)


class _Runner:
    """The TrainerRunner methods trainer_worker routes to: ``jobs`` knows no job, ``cancel``
    refuses; the rest are never called here."""

    def jobs(self, query: JobQuery):
        from services.trainer.service import UnknownJob

        raise UnknownJob(f"no job {query.job_id!r}")

    def cancel(self, ref: JobRef):
        from services.trainer.service import JobError

        raise JobError(f"job {ref.job_id!r} cannot be cancelled")

    def __getattr__(self, name: str):
        return lambda *_args: None


def test_an_unknown_job_travels_as_not_found_and_other_job_errors_as_bad_request(
        redis_url, redis_settings, flush, run):
    thread = WorkerThread(lambda bus: trainer_worker(_Runner(), bus), redis_url, redis_settings,
                          "trainer")

    async def failure(kind: str, body) -> ErrorInfo:
        bus = Bus.connect(redis_url, redis_settings)
        try:
            with pytest.raises(BusError) as err:
                await bus.request(keys.TRAINER, kind, body, 10.0)
            return err.value.info
        finally:
            await bus.close()

    try:
        assert run(failure("jobs", JobQuery(job_id="nosuchjob"))) == ErrorInfo(
            service=keys.TRAINER, kind="not_found", message="no job 'nosuchjob'")
        assert run(failure("cancel", JobRef(job_id="done"))) == ErrorInfo(
            service=keys.TRAINER, kind="bad_request", message="job 'done' cannot be cancelled")
    finally:
        thread.stop()
