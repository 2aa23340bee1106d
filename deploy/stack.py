"""Start and stop the whole running system: infrastructure, Ray, and the Serve application.

``start_stack`` is what `ragtune up` runs in its background supervisor process (``main``) and
what the integration tests run in-process. The supervisor writes ``<home>/run/state.json``
(addresses and its pid) once everything answers, and stops everything on SIGTERM.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.files import write_text_atomic
from shared.infra import Infra, InfraError, start_infra
from shared.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "ragtune"
# What Serve's gRPC proxy registers (it imports this path in its own process).
GRPC_SERVICER = "services.qa.grpc_api.add_servicer"


@dataclass
class Stack:
    settings: Settings  # with the resolved Redis URL and Milvus URI
    infra: Infra
    http_url: str
    dashboard_url: str | None
    grpc_target: str | None = None  # host:port of the gRPC API, when serve.grpc_port is set

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.infra.stop()


def resolve(settings: Settings, infra: Infra) -> Settings:
    """Settings with the addresses of the servers actually in use."""
    return settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"url": infra.redis_url}),
        "milvus": settings.milvus.model_copy(update={"uri": infra.milvus_uri}),
    })


def check_ports(settings: Settings) -> None:
    """InfraError naming the port and its setting when the HTTP port (on ``serve.http_host``)
    or, when set, the gRPC port (on every interface, as Serve's gRPC proxy binds it) cannot be
    bound now.

    Without this a taken HTTP port shows only as a health check that never answers, or, when
    another ragtune serves there, as one that answers for the other instance.
    """
    serve = settings.serve
    wanted = [(serve.http_host, serve.http_port, "serve.http_port", "RAGTUNE_SERVE__HTTP_PORT")]
    if serve.grpc_port is not None:
        wanted.append(("0.0.0.0", serve.grpc_port, "serve.grpc_port",
                       "RAGTUNE_SERVE__GRPC_PORT"))
    for host, port, setting, variable in wanted:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as exc:
            raise InfraError(f"serve.http_host {host!r} is not an address of this machine: "
                             f"{exc.strerror or exc}") from None
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # As the servers do: a port in TIME_WAIT after an earlier run is free to them.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            raise InfraError(f"port {port} on {host} ({setting}) is not free: "
                             f"{exc.strerror or exc}; stop what listens there (another "
                             f"ragtune?) or set {variable} to a free port") from None


def start_stack(settings: Settings, dashboard: bool = True, timeout_s: float = 600) -> Stack:
    """Bring up infra, a local Ray, and the Serve app; return once ``/v1/health`` answers.

    Raises InfraError (before anything starts) when a port Serve needs is taken
    (``check_ports``), or when a server does not start or answer.
    """
    check_ports(settings)
    infra = start_infra(settings.redis.url, settings.milvus.uri, settings.home)
    try:
        return _start_serve(resolve(settings, infra), infra, dashboard, timeout_s)
    except BaseException:
        infra.stop()
        raise


def _start_serve(settings: Settings, infra: Infra, dashboard: bool, timeout_s: float) -> Stack:
    # One machine, never a model hub. Ray's own servers (GCS, raylet, workers) listen on
    # every interface whatever ray.init is told (measured on Ray 2.60 with
    # _node_ip_address=127.0.0.1): README says to firewall them on a shared network.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from deploy.app import build_app

    context = _init_ray(ray, dashboard)
    try:
        serve.start(http_options={"host": settings.serve.http_host,
                                  "port": settings.serve.http_port},
                    grpc_options=grpc_options(settings))
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        http_url = base_url(settings.serve.http_host, settings.serve.http_port)
        _wait_healthy(http_url, timeout_s)
    except BaseException:
        ray.shutdown()
        raise
    dashboard_url = getattr(context, "dashboard_url", None) or None
    if dashboard_url and not dashboard_url.startswith("http"):
        dashboard_url = f"http://{dashboard_url}"
    grpc_port = settings.serve.grpc_port
    return Stack(settings, infra, http_url, dashboard_url,
                 None if grpc_port is None else f"127.0.0.1:{grpc_port}")


def base_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 literal in brackets (RFC 3986): ``http://[::1]:8000``.
    Without them httpx refuses the URL (``InvalidURL``, not an ``HTTPError``)."""
    try:
        bracket = ipaddress.ip_address(host).version == 6
    except ValueError:  # a name, not an address
        bracket = False
    return f"http://[{host}]:{port}" if bracket else f"http://{host}:{port}"


def grpc_options(settings: Settings):
    """Serve's gRPC proxy options: the QA API on ``serve.grpc_port``, or None (no gRPC).

    Ray Serve binds its gRPC proxy on every interface (``[::]``), whatever ``http_host``
    says; settings therefore require ``serve.api_key`` whenever ``grpc_port`` is set.
    """
    from ray.serve.config import gRPCOptions

    if settings.serve.grpc_port is None:
        return None
    from services.qa.proto import ensure_generated

    ensure_generated()  # before Serve's proxy imports the servicer in its own process
    return gRPCOptions(port=settings.serve.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])


def _init_ray(ray, dashboard: bool, attempts: int = 3):
    """``ray.init`` a local node, retried: on a loaded 2-core machine the raylet sometimes
    misses Ray's fixed 30 s registration window ("The current node timed out during
    startup", a bare Exception), and a second start succeeds."""
    for attempt in range(1, attempts + 1):
        try:
            return ray.init(address="local", include_dashboard=dashboard,
                            dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                            log_to_driver=False, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
            if attempt == attempts:
                raise
            log.warning("Ray did not start (%s); retrying (%d/%d)", exc, attempt, attempts)
            ray.shutdown()
    raise RuntimeError(f"Ray did not start in {attempts} attempts")


def _wait_healthy(http_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{http_url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise InfraError(f"ragtune did not answer at {http_url} within {timeout_s:.0f} s")
        time.sleep(0.2)


# --- the background supervisor `ragtune up` starts ------------------------------------------
def state_path(settings: Settings) -> Path:
    """Where the supervisor writes its state: written whole (``write_text_atomic``), so a
    reader sees no file or all of it."""
    return settings.run_dir / "state.json"


def main() -> None:
    settings = Settings()
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    path = state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        stack = start_stack(settings)
    except Exception as exc:  # noqa: BLE001 - written for `ragtune up` to show, then exit 1
        log.exception("ragtune failed to start")
        write_text_atomic(path, json.dumps({"pid": os.getpid(), "error": str(exc)}))
        raise SystemExit(1) from None
    # After ray.init, which installs its own SIGTERM handler (exit at once, skipping ours).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    write_text_atomic(path, json.dumps({
        "pid": os.getpid(), "http_url": stack.http_url, "redis_url": stack.infra.redis_url,
        "milvus_uri": stack.infra.milvus_uri, "dashboard_url": stack.dashboard_url,
        "grpc_target": stack.grpc_target,
        "started_s": round(time.time() - started, 1),
    }))
    log.info("ragtune is up at %s (dashboard %s)", stack.http_url, stack.dashboard_url)
    stop.wait()
    log.info("stopping ragtune")
    try:
        stack.stop()
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
