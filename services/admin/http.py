"""HTTP API for training and model versions: ``/v1/train`` and ``/v1/models``.

A router the front includes beside ``/v1/qa``. Every call is one request to the trainer over
the bus; the trainer checks a job completely before queueing it, so a bad job is a 400 with
its reason (the front's bus-error handler maps it), never a failed run later; a job id the
trainer does not know is a 404 (its bus error has kind ``not_found``). Path and query
values are checked by FastAPI against the schema's own types and bounds (``JobId``,
``JobQuery.limit``), so a bad one is a 422 naming ``path.job_id`` / ``query.limit`` before
anything is sent.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from shared import keys
from shared.bus import Bus
from shared.schemas import (
    AverageRequest,
    AverageResult,
    InterpolateRequest,
    InterpolateResult,
    JobId,
    JobList,
    JobQuery,
    JobRef,
    JobStatus,
    ModelsQuery,
    PromoteRequest,
    PruneRequest,
    PruneResult,
    RegistryView,
    RollbackRequest,
    TrainJob,
)

_LIMIT = JobQuery.model_fields["limit"]
JobLimit = Annotated[int, Query(description="how many of the newest jobs"), *_LIMIT.metadata]


def admin_router(bus: Bus, timeout_s: float) -> APIRouter:
    router = APIRouter()

    async def ask(kind: str, body, model):
        # a bus error is answered by the front's handler: "not_found" (an unknown job) is a 404
        return await bus.request(keys.TRAINER, kind, body, timeout_s, model)

    @router.post("/v1/train", response_model=JobStatus, status_code=202)
    async def submit(job: TrainJob) -> JobStatus:
        """Queue a training job (pretrain, retriever, generator or joint); returns its status.
        Follow it with ``GET /v1/train/{job_id}`` or the ``train.progress`` events."""
        return await ask("submit", job, JobStatus)

    @router.get("/v1/train", response_model=JobList)
    async def jobs(limit: JobLimit = _LIMIT.default) -> JobList:
        """The newest training jobs, newest first."""
        return await ask("jobs", JobQuery(limit=limit), JobList)

    @router.get("/v1/train/{job_id}", response_model=JobStatus)
    async def job(job_id: Annotated[JobId, Path()]) -> JobStatus:
        """One job's status; 404 when the trainer has no job of that id."""
        found: JobList = await ask("jobs", JobQuery(job_id=job_id), JobList)
        return found.jobs[0]

    @router.post("/v1/train/{job_id}/cancel", response_model=JobStatus)
    async def cancel(job_id: Annotated[JobId, Path()]) -> JobStatus:
        """Stop a job after its current step; its last saved state stays for a resume.
        404 when the trainer has no job of that id."""
        return await ask("cancel", JobRef(job_id=job_id), JobStatus)

    @router.get("/v1/models", response_model=RegistryView)
    async def models() -> RegistryView:
        """Every model version and the one each model serves."""
        return await ask("models", ModelsQuery(), RegistryView)

    @router.post("/v1/models/promote", response_model=RegistryView)
    async def promote(req: PromoteRequest) -> RegistryView:
        """Serve a version (``version: null`` = the packaged base); replicas swap it in while
        serving, requests in flight finish on the old one."""
        return await ask("promote", req, RegistryView)

    @router.post("/v1/models/rollback", response_model=RegistryView)
    async def rollback(req: RollbackRequest) -> RegistryView:
        """Serve the version that served before the last promotion."""
        return await ask("rollback", req, RegistryView)

    @router.post("/v1/models/prune", response_model=PruneResult)
    async def prune(req: PruneRequest) -> PruneResult:
        """Delete the versions of a model that nothing needs (not serving, not a rollback
        target, not searched by a kept version), all but the newest ``keep``; their Milvus
        collections go too."""
        return await ask("prune", req, PruneResult)

    @router.post("/v1/models/average", response_model=AverageResult)
    async def average(req: AverageRequest) -> AverageResult:
        """Register the uniform average (a soup) of two or more generator versions fine-tuned
        from the same model as the next version, not serving; promote it to serve it."""
        return await ask("average", req, AverageResult)

    @router.post("/v1/models/interpolate", response_model=InterpolateResult)
    async def interpolate(req: InterpolateRequest) -> InterpolateResult:
        """Register ``(1 - alpha) * towards + alpha * version`` (WiSE-FT: a fine-tuned
        generator moved back towards the base, or towards another version) as the next
        version, not serving; promote it to serve it."""
        return await ask("interpolate", req, InterpolateResult)

    return router
