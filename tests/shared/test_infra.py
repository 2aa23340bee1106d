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
        assert port != 6379 and not 10002 <= port <= 19999


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
