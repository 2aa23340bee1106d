"""The trainer's scheduling shell: a queue of jobs run one at a time in a thread.

What the Ray actor hosts (``deploy/app.py``): requests (submit, cancel, status, models,
promote, rollback) arrive from the bus and return at once; training happens in this runner's
thread; progress and promotions go out through ``publish`` as ``rag:events`` broadcasts
(``train.progress`` at most once a second per job, ``train.finished``, ``model.promoted``),
which the serving replicas act on. Jobs a crash interrupted are queued again at start and
resume from their last saved state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from services.trainer.service import JobError, TrainerService
from shared.registry import RegistryError
from shared.schemas import (
    Event,
    JobList,
    JobQuery,
    JobRef,
    JobStatus,
    ModelVersion,
    PromoteRequest,
    RegistryView,
    RollbackRequest,
    TrainJob,
)

log = logging.getLogger(__name__)

PublishFn = Callable[[Event], None]
PROGRESS_EVERY_S = 1.0


class TrainerRunner:
    """Runs ``service``'s jobs in a background thread; ``publish`` sends events."""

    def __init__(self, service: TrainerService, publish: PublishFn) -> None:
        self.service = service
        self.publish = publish
        self._jobs: queue.Queue[TrainJob | None] = queue.Queue()
        self._last_progress: dict[str, float] = {}
        self._thread = threading.Thread(target=self._main, name="trainer", daemon=True)
        for job in service.pending():
            log.info("resuming interrupted job %s", job.job_id)
            self._jobs.put(job)
        self._thread.start()

    # --- requests (answered at once) -------------------------------------------------------
    def submit(self, job: TrainJob) -> JobStatus:
        """Check and queue ``job``; raises ``JobError`` before queueing a bad one."""
        status = self.service.submit(job)
        if status.state == "queued":
            self._jobs.put(job)
        return status

    def cancel(self, ref: JobRef) -> JobStatus:
        return self.service.cancel(ref.job_id)

    def jobs(self, query: JobQuery) -> JobList:
        if query.job_id is not None:
            status = self.service.status(query.job_id)
            if status is None:
                raise JobError(f"no job {query.job_id!r}")
            return JobList(jobs=[status])
        return JobList(jobs=self.service.statuses(query.limit))

    def models(self) -> RegistryView:
        return self.service.registry.view()

    def promote(self, req: PromoteRequest) -> RegistryView:
        version = self.service.registry.promote(req.kind, req.version)
        self._announce(req.kind, version)
        return self.models()

    def rollback(self, req: RollbackRequest) -> RegistryView:
        version = self.service.registry.rollback(req.kind)
        self._announce(req.kind, version)
        return self.models()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)

    # --- the training thread ---------------------------------------------------------------
    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                status = self.service.run(job, on_status=self._on_status)
            except (JobError, RegistryError) as exc:
                log.error("job %s refused: %s", job.job_id, exc)
                continue
            if status.state == "done" and job.promote:
                for ref in status.versions:
                    kind, version = ref.split("/")
                    self._announce(kind, self.service.registry.get(kind, version))

    def _on_status(self, status: JobStatus) -> None:
        now = time.monotonic()
        final = status.state != "running"
        if not final and now - self._last_progress.get(status.job_id, 0.0) < PROGRESS_EVERY_S:
            return
        self._last_progress[status.job_id] = now
        kind = "train.finished" if final else "train.progress"
        self._send(Event(kind=kind, data=status.model_dump(mode="json")))

    def _announce(self, kind: str, version: ModelVersion | None) -> None:
        self._send(Event(kind="model.promoted", data={
            "kind": kind, "version": None if version is None else version.version}))

    def _send(self, event: Event) -> None:
        try:
            self.publish(event)
        except Exception:  # noqa: BLE001 - an event lost must not stop training
            log.exception("could not publish %s", event.kind)
