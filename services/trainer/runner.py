"""The trainer's scheduling shell: a queue of jobs run one at a time in a thread.

What the Ray actor hosts (``deploy/app.py``): requests (submit, cancel, status, models,
promote, rollback, average, interpolate, prune) arrive from the bus and return at once;
training happens in this runner's thread; progress and promotions go out through
``publish`` as ``rag:events`` broadcasts (``train.progress`` at most once a second per job,
``train.finished``, ``model.promoted``, ``model.pruned``), which the serving replicas act on.
Jobs a crash interrupted are queued again at start and resume from their last saved state.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable

from services.trainer import soup
from services.trainer.feedback import DATA_FILE, ITEMS_FILE, STORE_DIR, FeedbackStore
from services.trainer.jobs import has_indexed_corpus
from services.trainer.service import STATUS_FILE, JobError, TrainerService, UnknownJob
from shared.registry import RegistryError
from shared.schemas import (
    AverageRequest,
    AverageResult,
    Event,
    Feedback,
    FeedbackQuery,
    FeedbackState,
    InterpolateRequest,
    InterpolateResult,
    JobList,
    JobQuery,
    JobRef,
    JobStatus,
    PromoteRequest,
    PruneRequest,
    PruneResult,
    RegistryView,
    RollbackRequest,
    TrainData,
    TrainJob,
    UpdateRequest,
)

log = logging.getLogger(__name__)

PublishFn = Callable[[Event], None]
PROGRESS_EVERY_S = 1.0
UPDATE_PREFIX = "feedback-"  # job ids of the updates the feedback loop starts


class TrainerRunner:
    """Runs ``service``'s jobs in a background thread; ``publish`` sends events."""

    def __init__(self, service: TrainerService, publish: PublishFn) -> None:
        self.service = service
        self.publish = publish
        self._jobs: queue.Queue[TrainJob | None] = queue.Queue()
        self._last_progress: dict[str, tuple[float, str | None]] = {}  # job -> (when, phase)
        self.feedback_store = FeedbackStore(service.registry.root / STORE_DIR)
        self._update_lock = threading.Lock()
        # ids queued or running: a job submitted again before it ran to the end (its status
        # may still say queued) is not queued twice
        self._queued: set[str] = set()
        self._queue_lock = threading.Lock()
        # held from reading the registry to publishing model.promoted: see _announce
        self._announce_lock = threading.Lock()
        # the newest feedback update, also across a restart
        updates = [st for st in service.statuses(limit=10_000)
                   if st.kind == "continual" and st.job_id.startswith(UPDATE_PREFIX)]
        self._last_update: str | None = updates[0].job_id if updates else None
        self._restore_unqueued_updates()
        self._thread = threading.Thread(target=self._main, name="trainer", daemon=True)
        for job in service.pending():
            log.info("resuming interrupted job %s", job.job_id)
            self._enqueue(job)
        self._thread.start()

    # --- requests (answered at once) -------------------------------------------------------
    def submit(self, job: TrainJob) -> JobStatus:
        """Check and queue ``job``; raises ``JobError`` before queueing a bad one."""
        status = self.service.submit(job)
        if status.state == "queued":
            self._enqueue(job)
        return status

    def _enqueue(self, job: TrainJob) -> None:
        with self._queue_lock:
            if job.job_id not in self._queued:
                self._queued.add(job.job_id)
                self._jobs.put(job)

    def cancel(self, ref: JobRef) -> JobStatus:
        return self.service.cancel(ref.job_id)

    def jobs(self, query: JobQuery) -> JobList:
        if query.job_id is not None:
            status = self.service.status(query.job_id)
            if status is None:
                raise UnknownJob(f"no job {query.job_id!r}")
            return JobList(jobs=[status])
        return JobList(jobs=self.service.statuses(query.limit))

    def models(self) -> RegistryView:
        return self.service.registry.view()

    def promote(self, req: PromoteRequest) -> RegistryView:
        self.service.registry.promote(req.kind, req.version)
        self._announce(req.kind)
        return self.models()

    def rollback(self, req: RollbackRequest) -> RegistryView:
        self.service.registry.rollback(req.kind)
        self._announce(req.kind)
        return self.models()

    def prune(self, req: PruneRequest) -> PruneResult:
        """Delete the versions nothing needs but the newest ``req.keep`` (``Registry.prune``);
        ``model.pruned`` tells the embedding replicas to drop the pruned versions'
        collections."""
        removed, freed = self.service.registry.prune(req.kind, req.keep)
        if removed:
            self._send(Event(kind="model.pruned", data={
                "kind": req.kind, "versions": [v.version for v in removed]}))
        return PruneResult(removed=[v.version for v in removed], freed_bytes=freed,
                           models=self.models())

    def average(self, req: AverageRequest) -> AverageResult:
        """The uniform soup of ``req.versions`` registered as the next version, not serving
        (``soup.average_versions``; raises ``RegistryError`` with the reason)."""
        version = soup.average_versions(self.service.registry, req.kind, req.versions)
        return AverageResult(version=version.version, models=self.models())

    def interpolate(self, req: InterpolateRequest) -> InterpolateResult:
        """``req.version`` moved towards ``req.towards`` (WiSE-FT) registered as the next
        version, not serving (``soup.interpolate_version``; raises ``RegistryError`` with the
        reason)."""
        base = soup.served_base(self.service.settings, req.kind)
        version = soup.interpolate_version(self.service.registry, req.kind, req.version,
                                           req.alpha, req.towards, base)
        return InterpolateResult(version=version.version, models=self.models())

    # --- feedback: the production loop ------------------------------------------------------
    def feedback(self, fb: Feedback) -> None:
        """Store one judged answer (idempotent by id, also once an update took it); at
        ``feedback.update_after`` stored items, start an update unless one is queued or
        running. Raises ``JobError`` for a question or answer over the limits (the front
        checks them too; an entry put on the stream by hand must not stall every later
        update)."""
        settings = self.service.settings
        over = fb.over_limits(settings.limits.max_question_chars,
                              settings.trainer.max_answer_chars)
        if over:
            field, length, limit = over[0]
            raise JobError(f"feedback {fb.feedback_id}: {field} of {length} characters is over "
                           f"the limit of {limit}")
        stored = self.feedback_store.add(fb)
        after = settings.feedback.update_after
        if after and stored >= after and self._running_update() is None:
            try:
                status = self.update(UpdateRequest())
                log.info("%d feedback items stored: started update %s", stored, status.job_id)
            except JobError as exc:
                log.warning("feedback update not started: %s", exc)

    def feedback_state(self, _query: FeedbackQuery | None = None) -> FeedbackState:
        last = None if self._last_update is None else self.service.status(self._last_update)
        return FeedbackState(stored=self.feedback_store.count(),
                             update_after=self.service.settings.feedback.update_after,
                             last_update=last)

    def update(self, req: UpdateRequest) -> JobStatus:
        """Queue a continual update on every stored feedback item now (job kind
        ``continual``, params ``settings.feedback.params``). Raises ``JobError`` when nothing
        is stored, an update is still queued or running, or the job does not pass its checks
        (the items are then stored again: nothing is lost)."""
        with self._update_lock:
            running = self._running_update()
            if running is not None:
                raise JobError(f"update {running.job_id} is still {running.state}; "
                               "feedback keeps arriving in the store meanwhile")
            job_id = UPDATE_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + \
                f"-{time.time_ns() % 1_000_000:06d}"
            run_dir = self.service.registry.run_dir(job_id)
            if self.feedback_store.take(run_dir) == 0:
                raise JobError("no feedback stored: send some first (POST /v1/feedback or "
                               "`ragtune feedback send`)")
            # What serving retrieves from, documents ingested since included (a correction
            # whose answer is only in a new document is learnt as that answer, not as "I
            # don't know."); the packaged corpus where this trainer sees no index.
            corpus = "indexed" if has_indexed_corpus(self.service.settings) else "packaged"
            job = TrainJob(job_id=job_id, kind="continual",
                           data=TrainData(sets=[], path=str(run_dir / DATA_FILE),
                                          corpus=corpus),
                           params=self.service.settings.feedback.params, promote=req.promote)
            try:
                status = self.submit(job)
            except JobError:
                self.feedback_store.restore(run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            self._last_update = job_id
            return status

    def _restore_unqueued_updates(self) -> None:
        """Put back the feedback of update run folders that hold it but no job status (the
        trainer stopped between ``take`` and ``submit``, or after a failed submit's
        ``restore``), and remove those folders: no job would ever train on it."""
        runs = self.service.registry.root / "runs"
        for run_dir in sorted(runs.glob(UPDATE_PREFIX + "*")):
            if (run_dir / ITEMS_FILE).is_file() and not (run_dir / STATUS_FILE).exists():
                stored = self.feedback_store.restore(run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
                log.warning("update %s was never queued: its feedback is stored again (%d "
                            "stored)", run_dir.name, stored)

    def _running_update(self) -> JobStatus | None:
        if self._last_update is None:
            return None
        status = self.service.status(self._last_update)
        return status if status is not None and status.state in ("queued", "running") else None

    def stop(self, timeout_s: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)

    # --- the training thread ---------------------------------------------------------------
    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every job queued so far has run and its events are published (what a
        test or a benchmark waits for, instead of polling); False if ``timeout_s`` passed
        first."""
        deadline = time.monotonic() + timeout_s
        with self._jobs.all_tasks_done:
            while self._jobs.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._jobs.all_tasks_done.wait(left)
        return True

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._run(job)
            finally:
                if job is not None:  # queued again only once it ran: see _enqueue
                    with self._queue_lock:
                        self._queued.discard(job.job_id)
                self._jobs.task_done()

    def _run(self, job: TrainJob) -> None:
        try:
            status = self.service.run(job, on_status=self._on_status)
        except (JobError, RegistryError) as exc:
            log.error("job %s refused: %s", job.job_id, exc)
            return
        if status.state == "done":
            for kind in dict.fromkeys(ref.split("/")[0] for ref in status.promoted):
                self._announce(kind)

    def _on_status(self, status: JobStatus) -> None:
        """Publish ``train.progress`` at most every ``PROGRESS_EVERY_S`` per job, but always
        when the job's phase changes, and ``train.finished``."""
        now = time.monotonic()
        final = status.state != "running"
        when, phase = self._last_progress.get(status.job_id, (0.0, None))
        if (not final and status.phase == phase
                and now - when < PROGRESS_EVERY_S):
            return
        self._last_progress[status.job_id] = (now, status.phase)
        kind = "train.finished" if final else "train.progress"
        self._send(Event(kind=kind, data=status.model_dump(mode="json")))

    def _announce(self, kind: str) -> None:
        """Broadcast ``model.promoted`` with the version the registry serves now (None: the
        base model). Read at sending time under one lock, so the last event of a kind names
        what serves even when a rollback lands between a job's promotion and its event."""
        with self._announce_lock:
            version = self.service.registry.serving(kind)
            self._send(Event(kind="model.promoted", data={
                "kind": kind, "version": None if version is None else version.version}))

    def _send(self, event: Event) -> None:
        try:
            self.publish(event)
        except Exception:  # noqa: BLE001 - an event lost must not stop training
            log.exception("could not publish %s", event.kind)
