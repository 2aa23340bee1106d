"""Resident memory of every process of a running ragtune (`ragtune up`), grouped.

    python bench/footprint.py

Walks the supervisor's process tree (Ray's GCS, raylet, dashboard, every Serve replica, the
embedded valkey and milvus-lite) and prints RSS per process and in total.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.cli import read_state
from shared.settings import Settings


def label(proc: psutil.Process) -> str:
    cmd = " ".join(proc.cmdline()[:3])
    for key in ("ServeReplica", "ServeController", "ProxyActor", "gcs_server", "raylet",
                "dashboard", "valkey-server", "milvus-lite", "log_monitor", "deploy.stack"):
        if key in cmd or key in proc.name():
            return f"{key} {cmd.split(':')[-1] if key == 'ServeReplica' else ''}".strip()
    return proc.name()


def main() -> None:
    state = read_state(Settings())
    if state is None:
        sys.exit("ragtune is not running: start it with `ragtune up`")
    root = psutil.Process(int(state["pid"]))
    procs = [root, *root.children(recursive=True)]
    rows = sorted(((label(p), p.memory_info().rss / 2**20) for p in procs),
                  key=lambda r: -r[1])
    print(f"{'process':<40}{'RSS MiB':>10}")
    for name, rss in rows:
        print(f"{name:<40}{rss:>10.0f}")
    print(f"{'total (' + str(len(rows)) + ' processes)':<40}{sum(r for _, r in rows):>10.0f}")


if __name__ == "__main__":
    main()
