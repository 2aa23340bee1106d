"""The trainer as a plain class: check a job, run it, record its state, register what it made.

The Ray actor (``deploy/app.py``) only schedules: it hands ``rag:train`` jobs to ``run`` one at
a time in a thread and publishes what ``run`` reports. Everything here works without Ray or
Redis, so the CLI's ``--local`` mode, the benchmarks and the tests call it directly.

A job's folder is ``<checkpoint dir>/runs/<job id>/``: ``job.json`` (the job as submitted),
``status.json`` (its ``JobStatus``, rewritten as it runs), the loop's resume state and report,
and ``CANCEL`` when someone asked it to stop. A job found ``queued`` or ``running`` when the
trainer starts was interrupted by a crash: ``pending()`` lists it and ``run`` resumes it from
its last saved state. Once a job is done its folder keeps only its record (the ``.json``,
``.jsonl`` and ``.png`` files: job, status, report, gate, the data it trained on); its model
folders (the registry holds copies), resume state and caches (gigabytes for a generator) go.
A cancelled or failed job keeps everything: submitted again unchanged, it is queued again and
resumes from its last saved state (a continual update starts over: ``continual_update``). A
queued job that no longer passes ``check`` when it is run is recorded as failed.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from services.trainer import jobs
from services.trainer.loop import MODEL_DIR, Cancelled, Progress
from shared.files import write_text_atomic
from shared.registry import Registry, RegistryError
from shared.schemas import JobStatus, ModelVersion, TrainJob
from shared.settings import Settings

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
STATUS_FILE = "status.json"
CANCEL_FILE = "CANCEL"
# What a finished run's folder keeps: its record, and the replay buffer (``replay.jsonl``) that
# the next continual update of the version it made starts from.
RECORD_SUFFIXES = (".json", ".jsonl", ".png")

StatusFn = Callable[[JobStatus], None]


class JobError(ValueError):
    """A job cannot run as submitted; the message says what to change. Raised before any
    training starts."""


class UnknownJob(JobError):
    """No job has the id asked for (HTTP 404)."""


class TrainerService:
    """Runs training jobs against the checkpoint registry of ``settings``."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry(settings.checkpoint_dir)

    # --- before training -------------------------------------------------------------------
    def check(self, job: TrainJob) -> jobs.Prepared:
        """Validate ``job`` completely (hyper-parameters, data files, answers, paths) without
        training; returns what ``run`` needs. Raises ``JobError`` naming the problem."""
        try:
            self.registry.run_dir(job.job_id)
            return jobs.prepare(job, self.settings)
        except ValidationError as exc:
            raise JobError(f"{job.kind} job: bad params: {_first_error(exc)}") from None
        except (ValueError, RegistryError) as exc:
            raise JobError(f"{job.kind} job: {exc}") from None

    def submit(self, job: TrainJob) -> JobStatus:
        """Check ``job`` and record it as queued; returns its status.

        Idempotent by job id: a job already known keeps its state, except that a ``cancelled``
        or ``failed`` job submitted again as it was recorded (same kind, data, params, seed
        and promote) is queued again and resumes from its last saved state. Raises
        ``JobError`` when ``job`` does not pass ``check``, or when a cancelled or failed job
        of that id was recorded with other fields (resume it as it was, or use a new id)."""
        self.check(job)
        run_dir = self.registry.run_dir(job.job_id)
        existing = self.status(job.job_id)
        if existing is not None and existing.state in ("cancelled", "failed"):
            return self._requeue(job, existing, run_dir)
        if existing is not None:
            return existing
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / JOB_FILE).write_text(job.model_dump_json(indent=2))
        status = JobStatus(job_id=job.job_id, kind=job.kind, state="queued",
                           updated=time.time())
        self._write_status(run_dir, status)
        return status

    def _requeue(self, job: TrainJob, existing: JobStatus, run_dir: Path) -> JobStatus:
        """``existing`` (cancelled or failed) queued again when ``job`` is the recorded one."""
        recorded = self.job(job.job_id)
        fields = ("kind", "data", "params", "seed", "promote")
        changed = [f for f in fields if getattr(recorded, f) != getattr(job, f)]
        if changed:
            raise JobError(f"job {job.job_id!r} is {existing.state} and was submitted with "
                           f"other {', '.join(changed)}: submit it as it was to resume it, "
                           "or give the new job another id")
        (run_dir / CANCEL_FILE).unlink(missing_ok=True)  # a cancel asked while it was queued
        status = existing.model_copy(update={"state": "queued", "error": None, "eta_s": None,
                                             "phase": None, "updated": time.time()})
        self._write_status(run_dir, status)
        return status

    # --- training --------------------------------------------------------------------------
    def run(self, job: TrainJob, on_status: StatusFn | None = None) -> JobStatus:
        """Train ``job`` to the end (resuming from its saved state if it was interrupted),
        register the models it made and, with ``job.promote``, serve those its kind lets
        through (a continual update's gate may keep its candidate out: ``note`` says why).

        Never raises for a training failure: the returned status says ``failed`` and why, or
        ``cancelled``. Raises ``JobError`` only when the job does not pass ``check``.
        """
        try:
            prepared = self.check(job)
        except JobError as exc:
            self._refuse(job, exc, on_status)
            raise
        run_dir = self.registry.run_dir(job.job_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / JOB_FILE).exists():
            (run_dir / JOB_FILE).write_text(job.model_dump_json(indent=2))
        now: dict = {"job_id": job.job_id, "kind": job.kind, "state": "running"}
        self._publish(run_dir, now, on_status)

        def progress(p: Progress) -> None:
            now.update(step=p.step, total_steps=p.total_steps, loss=p.loss, eta_s=p.eta_s,
                       phase=p.phase)
            if p.metrics:
                now["metrics"] = {k: float(v) for k, v in p.metrics.items()
                                  if isinstance(v, int | float) and not isinstance(v, bool)}
            self._publish(run_dir, now, on_status)

        def should_stop() -> bool:
            return (run_dir / CANCEL_FILE).exists()

        try:
            outputs = jobs.execute(prepared, self.settings, run_dir, progress, should_stop)
            versions = self._register(job, outputs)
            now["versions"] = [f"{v.kind}/{v.version}" for v in versions]
            notes = [out.note for out in outputs if out.note]
            now["note"] = "; ".join(notes) if notes else None
            if job.promote:
                promoted = [v for v, out in zip(versions, outputs, strict=True) if out.promote]
                for version in promoted:
                    self.promote(version)
                now["promoted"] = [f"{v.kind}/{v.version}" for v in promoted]
            now["state"], now["phase"] = "done", None
        except Cancelled:
            now["state"] = "cancelled"
            (run_dir / CANCEL_FILE).unlink(missing_ok=True)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded, the trainer lives on
            log.exception("job %s failed", job.job_id)
            now["state"] = "failed"
            now["error"] = f"{type(exc).__name__}: {exc}"
        status = self._publish(run_dir, now, on_status)
        if status.state == "done":  # recorded first: a crash before this only leaves files
            _tidy(run_dir, [out.folder for out in outputs])
        return status

    def _register(self, job: TrainJob, outputs: list[jobs.Output]) -> list[ModelVersion]:
        """The registry's versions of ``outputs``: registered now, or the one this job
        registered of that kind before a crash cut it short (a job makes at most one model of
        each kind), so that resuming it adds no copy that a rollback would then land on."""
        view = self.registry.view()
        before = {v.kind: v for record in (view.retriever, view.generator)
                  for v in record.versions if v.job_id == job.job_id}
        return [before.get(out.kind) or self.registry.register(
                    out.kind, out.folder, job_id=job.job_id,
                    passage_version=out.passage_version, split_seed=job.seed)
                for out in outputs]

    def _refuse(self, job: TrainJob, exc: JobError, on_status: StatusFn | None) -> None:
        """Record a queued or running ``job`` that no longer passes ``check`` (its data file
        changed since it was submitted) as failed, with why: left queued, it would be retried
        at every start and hold back the feedback loop's next update."""
        status = self.status(job.job_id)
        if status is None or status.state not in ("queued", "running"):
            return
        fields = status.model_dump(exclude={"schema_version", "updated"})
        fields.update(state="failed", error=str(exc), eta_s=None, phase=None)
        self._publish(self.registry.run_dir(job.job_id), fields, on_status)

    def promote(self, version: ModelVersion) -> None:
        self.registry.promote(version.kind, version.version)

    def cancel(self, job_id: str) -> JobStatus:
        """Ask job ``job_id`` to stop after its current step (its saved state stays)."""
        status = self.status(job_id)
        if status is None:
            raise UnknownJob(f"no job {job_id!r}")
        if status.state in ("queued", "running"):
            (self.registry.run_dir(job_id) / CANCEL_FILE).touch()
        return status

    # --- state -----------------------------------------------------------------------------
    def job(self, job_id: str) -> TrainJob:
        """The job ``job_id`` as submitted; ``JobError`` when there is none."""
        path = self._run_file(job_id, JOB_FILE)
        if path is None or not path.is_file():
            raise UnknownJob(f"no job {job_id!r}")
        return TrainJob.model_validate_json(path.read_text())

    def status(self, job_id: str) -> JobStatus | None:
        """The recorded status of job ``job_id``; None when there is none."""
        path = self._run_file(job_id, STATUS_FILE)
        if path is None or not path.is_file():
            return None
        return JobStatus.model_validate_json(path.read_text())

    def _run_file(self, job_id: str, name: str) -> Path | None:
        """``name`` in the run folder of ``job_id``; None for an id no job can have ("..")."""
        try:
            return self.registry.run_dir(job_id) / name
        except RegistryError:
            return None

    def statuses(self, limit: int = 20) -> list[JobStatus]:
        """The newest ``limit`` jobs, newest first."""
        runs = self.registry.root / "runs"
        if not runs.is_dir():
            return []
        found = [JobStatus.model_validate_json(p.read_text())
                 for p in runs.glob(f"*/{STATUS_FILE}")]
        return sorted(found, key=lambda s: s.updated, reverse=True)[:limit]

    def pending(self) -> list[TrainJob]:
        """Jobs left queued or running (a crash interrupted them), oldest first."""
        left = [s for s in self.statuses(limit=10_000) if s.state in ("queued", "running")]
        return [self.job(s.job_id) for s in sorted(left, key=lambda s: s.updated)]

    def _publish(self, run_dir: Path, fields: dict, on_status: StatusFn | None) -> JobStatus:
        status = JobStatus(**fields, updated=time.time())
        self._write_status(run_dir, status)
        if on_status is not None:
            on_status(status)
        return status

    @staticmethod
    def _write_status(run_dir: Path, status: JobStatus) -> None:
        write_text_atomic(run_dir / STATUS_FILE, status.model_dump_json(indent=2))


def _tidy(run_dir: Path, model_folders: list[Path]) -> None:
    """Delete what a finished run no longer needs: its saved models (registered copies serve;
    a part's ``model/`` folders too, e.g. a distilled student's healing run), resume state
    and caches; its record (``RECORD_SUFFIXES``) stays."""
    inside = run_dir.resolve()
    for folder in [*model_folders, *run_dir.rglob(MODEL_DIR)]:
        if folder.is_dir() and inside in folder.resolve().parents:
            shutil.rmtree(folder, ignore_errors=True)
    for path in sorted(run_dir.rglob("*"), reverse=True):  # files before their folders
        if path.is_file() and path.suffix not in RECORD_SUFFIXES:
            path.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "params"
    return f"{where}: {err.get('msg', 'invalid')}"
