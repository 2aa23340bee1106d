"""The Ray Serve application, built from typed settings. The only module importing Serve.

Each deployment is a thin shell: it builds a plain service from settings, runs its bus
worker in a background thread, and reports health. The QA front is the HTTP ingress.
Resources are explicit; ``num_cpus=0`` lets every deployment schedule on a 2-core machine
(the work is bounded by the bus consumers, not by Ray's CPU accounting).
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve import Application

from deploy.workers import (
    Current,
    EventThread,
    WorkerThread,
    generator_worker,
    last_event_id,
    publish_sync,
    ranker_worker,
    retriever_worker,
    trainer_worker,
)
from shared import keys
from shared.bus import Bus
from shared.settings import Settings

log = logging.getLogger(__name__)


def _require_urls(settings: Settings) -> tuple[str, str]:
    if not settings.redis.url or not settings.milvus.uri:
        raise ValueError(
            "the Serve application needs RAGTUNE_REDIS__URL and RAGTUNE_MILVUS__URI; "
            "`ragtune up` starts embedded servers and sets them for you")
    return settings.redis.url, settings.milvus.uri


def _use_cores(threads: int) -> None:
    """Ray pins an actor's OpenMP pool to its CPU reservation (one thread for num_cpus=0);
    model replicas and the trainer take ``threads`` instead (0: every core of the machine,
    which in a container may be more than its CPU limit: set the setting there)."""
    import os

    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


class _WorkerDeployment:
    """Shared shell: one bus worker thread per replica, health from the thread."""

    runner: WorkerThread

    def check_health(self) -> None:
        self.runner.check()

    def stats(self) -> dict:
        worker = self.runner.worker
        return {} if worker is None else {
            "handled": worker.stats.handled, "failed": worker.stats.failed,
            "dead": worker.stats.dead, "reclaimed": worker.stats.reclaimed,
            "expired": worker.stats.expired}

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.stop()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Embedding(_WorkerDeployment):
    def __init__(self, settings: Settings):
        from services.embedding.service import EmbeddingService

        redis_url, milvus_uri = _require_urls(settings)
        _use_cores(settings.serve.torch_threads)
        start = last_event_id(redis_url)  # before the registry is read: see EventThread
        service = EmbeddingService.from_settings(settings, milvus_uri)
        self.runner = WorkerThread(lambda bus: retriever_worker(service, keys.EMBEDDING, bus),
                                   redis_url, settings.redis, "embedding")

        def versions(event) -> None:
            from shared.registry import Registry

            if event.data.get("kind") != "retriever":
                return
            registry = Registry(settings.checkpoint_dir)
            if event.kind == "model.pruned":
                service.drop_unused(registry, settings)
                return
            version = event.data.get("version")
            service.serve_version(None if version is None else registry.get("retriever", version),
                                  registry, settings)

        self.events = EventThread(redis_url, {"model.promoted", "model.pruned"}, versions,
                                  "embedding-events", start)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Sparse(_WorkerDeployment):
    def __init__(self, settings: Settings):
        from services.sparse.service import SparseService

        redis_url, _ = _require_urls(settings)
        service = SparseService.from_settings(settings)
        self.runner = WorkerThread(lambda bus: retriever_worker(service, keys.SPARSE, bus),
                                   redis_url, settings.redis, "sparse")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ranker(_WorkerDeployment):
    def __init__(self, settings: Settings):
        from services.ranker.service import RankerService
        from shared.schemas import SearchResult

        redis_url, _ = _require_urls(settings)
        timeout = settings.serve.request_timeout_s

        reranker = None
        if settings.rerank.model is not None:
            from services.ranker.rerank import CrossEncoder

            _use_cores(settings.serve.torch_threads)
            reranker = CrossEncoder.load(settings.rerank.model)

        def make(bus: Bus):
            async def ask(service: str, kind: str, body):
                return await bus.request(service, kind, body, timeout, SearchResult)
            return ranker_worker(RankerService(ask, settings.retrieval.rrf_k, reranker,
                                               settings.rerank.candidates), bus)

        self.runner = WorkerThread(make, redis_url, settings.redis, "ranker")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Generator(_WorkerDeployment):
    def __init__(self, settings: Settings):
        from services.generator.batching import Batcher
        from services.generator.service import GeneratorService

        redis_url, _ = _require_urls(settings)
        _use_cores(settings.serve.torch_threads)
        start = last_event_id(redis_url)  # before the registry is read: see EventThread
        service = Current(GeneratorService.from_settings(settings))
        batcher = Batcher(service, settings.generator.max_batch_size,
                          settings.generator.batch_wait_ms)
        self.runner = WorkerThread(lambda bus: generator_worker(batcher, bus), redis_url,
                                   settings.redis, "generator")

        def promoted(event) -> None:
            from shared.registry import Registry

            if event.data.get("kind") != "generator":
                return
            version = event.data.get("version")
            # None: the base model (the registry serves nothing since the rollback)
            path = None
            if version is not None:
                registry = Registry(settings.checkpoint_dir)
                path = str(registry.path_of(registry.get("generator", version)))
            fresh = GeneratorService.from_settings(settings, path)
            service.swap(fresh)
            log.info("generator now serves %s", version or "the base model")

        self.events = EventThread(redis_url, {"model.promoted"}, promoted, "generator-events",
                                  start)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Trainer(_WorkerDeployment):
    """The trainer actor: answers ``rag:req:trainer`` requests, trains one job at a time in
    its runner's thread (on the GPU when the deployment has one) and publishes events."""

    def __init__(self, settings: Settings):
        from services.trainer.runner import TrainerRunner
        from services.trainer.service import TrainerService

        redis_url, _ = _require_urls(settings)
        _use_cores(settings.trainer.torch_threads)
        self.trainer = TrainerRunner(TrainerService(settings),
                                     publish_sync(redis_url, settings.redis))
        self.runner = WorkerThread(lambda bus: trainer_worker(self.trainer, bus), redis_url,
                                   settings.redis, "trainer")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class QAFront:
    """HTTP ingress: ``/v1/qa``, ``/v1/documents``, ``/v1/feedback``, ``/v1/status``,
    ``/v1/health``; and the gRPC API's methods (services/qa/proto/qa.proto), which Serve's
    gRPC proxy calls by the RPC's name when it runs: under `ragtune up` when
    ``serve.grpc_port`` is set, under a Serve config (deploy/serve_config.yaml, the
    RayService) when the config's ``grpc_options`` name the servicer (k8s/README.md)."""

    def __init__(self, settings: Settings, *backends):
        # ``backends`` are the other deployments, bound here only so that they belong to
        # this application; the front reaches them over the bus, never through handles.
        from services.qa.grpc_api import QAGrpc
        from services.qa.service import QAService

        redis_url, _ = _require_urls(settings)
        self.qa = QAService(Bus.connect(redis_url, settings.redis, name=None), settings)
        self.grpc = QAGrpc(self.qa)

    async def Answer(self, request, grpc_context):  # noqa: N802 - the RPC's name
        from services.qa.grpc_api import serve_status

        with serve_status(grpc_context):
            return await self.grpc.answer(request, grpc_context.invocation_metadata())

    async def AnswerStream(self, request, grpc_context):  # noqa: N802
        from services.qa.grpc_api import serve_status

        with serve_status(grpc_context):
            async for event in self.grpc.answer_stream(request,
                                                       grpc_context.invocation_metadata()):
                yield event

    async def IngestDocuments(self, request, grpc_context):  # noqa: N802
        from services.qa.grpc_api import serve_status

        with serve_status(grpc_context):
            return await self.grpc.ingest_documents(request, grpc_context.invocation_metadata())

    async def SubmitFeedback(self, request, grpc_context):  # noqa: N802
        from services.qa.grpc_api import serve_status

        with serve_status(grpc_context):
            return await self.grpc.submit_feedback(request, grpc_context.invocation_metadata())

    def __serve_build_asgi_app__(self):
        from services.admin.http import admin_router
        from services.qa.http import create_app

        app = create_app(self.qa)
        app.include_router(admin_router(self.qa.bus, self.qa.settings.serve.request_timeout_s))
        return app

    async def check_health(self) -> None:
        await self.qa.bus.redis.ping()


def _trainer_gpus(settings: Settings) -> int:
    """GPUs the trainer asks Ray for: one with ``trainer.device`` cuda; with auto, one when
    the process building the app sees one. (Under a Serve config that process is a task Serve
    runs, as a rule on the head, which may have no GPU while a GPU worker group exists: set
    RAGTUNE_TRAINER__DEVICE=cuda there.)"""
    if settings.trainer.device == "cuda":
        return 1
    if settings.trainer.device == "cpu":
        return 0
    import torch

    return 1 if torch.cuda.is_available() else 0


# A share of ``serve.sparse_node_resource`` small enough that any number of replicas fit on
# the one node holding a unit of it.
_SPARSE_NODE_SHARE = 0.001


def _on_sparse_node(settings: Settings, options: dict) -> dict:
    """``options`` (ray_actor_options) of a deployment that opens the sparse index's SQLite
    database, with a share of ``serve.sparse_node_resource`` when that is set: all such
    replicas then run on the one node holding it (WAL needs them on one host)."""
    name = settings.serve.sparse_node_resource
    return options if name is None else {**options, "resources": {name: _SPARSE_NODE_SHARE}}


def build_app(settings: Settings) -> Application:
    """The whole ragtune application; the QA front is its ingress."""
    serve_cfg = settings.serve
    sparse_options = _on_sparse_node(settings, {"num_cpus": 0})
    trainer_options = _on_sparse_node(settings, {"num_cpus": 0,
                                                 "num_gpus": _trainer_gpus(settings)})
    parts = [
        Embedding.options(num_replicas=serve_cfg.embedding_replicas).bind(settings),
        Sparse.options(num_replicas=serve_cfg.sparse_replicas,
                       ray_actor_options=sparse_options).bind(settings),
        Ranker.options(num_replicas=serve_cfg.ranker_replicas).bind(settings),
        Generator.options(num_replicas=serve_cfg.generator_replicas).bind(settings),
        Trainer.options(ray_actor_options=trainer_options).bind(settings),
    ]
    return QAFront.options(num_replicas=serve_cfg.qa_replicas).bind(settings, *parts)


def unapplied_proxy_settings(settings: Settings) -> list[str]:
    """Why each proxy setting set away from its default does nothing under a Serve config:
    there Serve's proxies listen where the config's ``http_options`` / ``grpc_options`` say,
    and only `ragtune up` (deploy/stack.py) starts them from ``serve.http_port`` and
    ``serve.grpc_port``. (``serve.http_host`` still decides whether the API key is required,
    so it is left out: set it to the config's ``http_options.host``.)"""
    serve_cfg = settings.serve
    defaults = type(serve_cfg).model_fields
    unapplied = []
    if serve_cfg.http_port != defaults["http_port"].default:
        unapplied.append(f"serve.http_port={serve_cfg.http_port} (RAGTUNE_SERVE__HTTP_PORT) is "
                         f"not applied under a Serve config: set http_options.port in it")
    if serve_cfg.grpc_port is not None:
        unapplied.append(f"serve.grpc_port={serve_cfg.grpc_port} (RAGTUNE_SERVE__GRPC_PORT) is "
                         f"not applied under a Serve config: gRPC is served only when its "
                         f"grpc_options name the servicer (k8s/README.md)")
    return unapplied


def app_from_config(args: dict) -> Application:
    """``import_path`` target of deploy/serve_config.yaml: settings from the environment,
    overridden by the config's ``args`` (nested sections as dicts). Logs a warning for each
    setting this path ignores (``unapplied_proxy_settings``)."""
    settings = Settings(**args)
    for message in unapplied_proxy_settings(settings):
        log.warning(message)
    return build_app(settings)
