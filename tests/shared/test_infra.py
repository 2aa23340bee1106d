"""Embedded servers: started on loopback, reachable, and never left orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shared.infra import InfraError, check_milvus, free_port, start_infra


def test_embedded_servers_start_on_loopback_and_stop(tmp_path):
    infra = start_infra(None, None, tmp_path)
    try:
        assert infra.redis_url.startswith("redis://127.0.0.1:")
        assert infra.milvus_uri.startswith("http://127.0.0.1:")
        check_milvus(infra.milvus_uri)
        processes = [s.process for s in infra.servers]
    finally:
        infra.stop()
    assert all(p.poll() is not None for p in processes)


def test_configured_unreachable_milvus_is_a_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InfraError, match=f"Milvus is unreachable at {uri}"):
        start_infra(None, uri, tmp_path)


def test_free_port_avoids_ray_ports():
    for _ in range(50):
        port = free_port()
        assert port not in (6379, 8265, 10001, 52365) and not 10002 <= port <= 19999


def test_free_port_draws_again_when_the_os_offers_a_ray_port(monkeypatch):
    # The OS's choice of a free port cannot be forced: a stand-in socket offers Ray's dashboard
    # agent port first.
    offered = iter([52365, 6379, 41234])

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr("shared.infra.socket.socket", Socket)
    assert free_port() == 41234


def test_servers_die_with_a_killed_parent(tmp_path):
    script = textwrap.dedent(f"""
        import sys, pathlib
        from shared.infra import start_valkey
        server = start_valkey(pathlib.Path({str(tmp_path)!r}), persist=False)
        print(server.process.pid, flush=True)
        sys.stdin.read()
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("valkey outlived its killed parent")
