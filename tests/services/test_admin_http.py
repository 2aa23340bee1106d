"""The training and model API over HTTP: the front's app with the admin router, as deploy.app
builds it, on a real valkey with no trainer. Checks what the router does before the trainer
answers: path and query values, and the bus out of reach; and, with a stand-in trainer worker,
how it answers the trainer's refusals."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis
from fastapi.testclient import TestClient

from services.admin.http import admin_router
from services.qa.http import create_app
from services.qa.service import BUS_UNREACHABLE_MESSAGE, QAService
from shared import keys
from shared.bus import BadRequest, Bus, NotFound, Worker, routes
from shared.schemas import Envelope, ErrorInfo, JobList, JobQuery, JobRef, JobStatus
from tests.services.test_qa_http import settings as settings  # noqa: F401 - a fixture
from tests.services.test_qa_http import unreachable as unreachable  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("flush")

TRAINER = keys.request_stream(keys.TRAINER)


def _client(settings, timeout_s: float = 0.3) -> TestClient:
    qa = QAService(Bus.connect(settings.redis.url, settings.redis), settings)
    app = create_app(qa)
    app.include_router(admin_router(qa.bus, timeout_s))
    return TestClient(app)


def sent(redis_url) -> list[Envelope]:
    """The requests on the trainer's stream, oldest first."""
    entries = redis.Redis.from_url(redis_url).xrange(TRAINER)
    return [Envelope.model_validate_json(fields[b"msg"]) for _id, fields in entries]


@pytest.mark.parametrize("method, path, loc, message", [
    ("GET", "/v1/train/-bad", ["path", "job_id"],
     "job id '-bad' must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
     "or digit"),
    ("GET", f"/v1/train/{'j' * 65}", ["path", "job_id"], "must be 1 to 64 letters"),
    ("POST", "/v1/train/-bad/cancel", ["path", "job_id"], "job id '-bad' must be"),
    ("POST", "/v1/train/a%20b/cancel", ["path", "job_id"], "job id 'a b' must be"),
    ("GET", "/v1/train?limit=0", ["query", "limit"], "greater than or equal to 1"),
    ("GET", "/v1/train?limit=1001", ["query", "limit"], "less than or equal to 1000"),
])
def test_bad_path_and_query_values_are_422_and_nothing_is_sent(settings, redis_url, method,
                                                               path, loc, message):
    with _client(settings) as client:
        r = client.request(method, path)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == loc and message in error["msg"], r.text
    assert sent(redis_url) == []


@pytest.mark.parametrize("method, path, kind, body", [
    ("GET", "/v1/train", "jobs", JobQuery()),
    ("GET", "/v1/train?limit=1000", "jobs", JobQuery(limit=1000)),
    ("GET", f"/v1/train/{'j' * 64}", "jobs", JobQuery(job_id="j" * 64)),
    ("POST", "/v1/train/run.2_b-3/cancel", "cancel", JobRef(job_id="run.2_b-3")),
])
def test_good_values_reach_the_trainer(settings, redis_url, method, path, kind, body):
    with _client(settings) as client:
        r = client.request(method, path)
    assert r.status_code == 504, r.text  # sent, and no trainer answered
    (request,) = sent(redis_url)
    assert (request.kind, type(body).model_validate(request.body)) == (kind, body)


def test_an_unreachable_bus_is_503_saying_so(unreachable):
    with _client(unreachable) as client:
        r = client.get("/v1/train")
    assert r.status_code == 503, r.text
    assert r.json()["detail"]["message"] == BUS_UNREACHABLE_MESSAGE


def _refusing_trainer(settings) -> Worker:
    """A trainer worker that knows only job ``done`` and will not cancel it, as the real one
    words both (deploy.workers.trainer_worker raises NotFound for an UnknownJob)."""

    async def jobs(query: JobQuery) -> JobList:
        raise NotFound(f"no job {query.job_id!r}")

    async def cancel(ref: JobRef) -> JobStatus:
        if ref.job_id != "done":
            raise NotFound(f"no job {ref.job_id!r}")
        raise BadRequest(f"job {ref.job_id!r} cannot be cancelled")

    bus = Bus.connect(settings.redis.url, settings.redis)
    return Worker(bus, keys.TRAINER, [TRAINER], routes(jobs=(JobQuery, jobs),
                                                       cancel=(JobRef, cancel)))


@pytest.mark.parametrize("method, path, status, kind, message", [
    ("GET", "/v1/train/nosuchjob", 404, "not_found", "no job 'nosuchjob'"),
    ("POST", "/v1/train/nosuchjob/cancel", 404, "not_found", "no job 'nosuchjob'"),
    ("POST", "/v1/train/done/cancel", 400, "bad_request", "job 'done' cannot be cancelled"),
])
def test_an_unknown_job_is_404_and_another_refusal_400(settings, method, path, status, kind,
                                                       message):
    worker = _refusing_trainer(settings)
    loop = asyncio.new_event_loop()
    serving = threading.Thread(target=loop.run_until_complete, args=(worker.run(),))
    serving.start()
    try:
        with _client(settings, timeout_s=10) as client:
            r = client.request(method, path)
    finally:
        loop.call_soon_threadsafe(worker.stop)
        serving.join(10)
        loop.run_until_complete(worker.bus.close())
        loop.close()
    assert r.status_code == status, r.text
    assert r.json()["detail"] == ErrorInfo(service=keys.TRAINER, kind=kind,
                                           message=message).model_dump()
