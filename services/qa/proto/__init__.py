"""The QA gRPC API: ``qa.proto`` and the Python modules generated from it.

``qa_pb2`` (messages) and ``qa_pb2_grpc`` (the ``QAStub`` client) are generated with
grpc_tools' protoc into this folder the first time this package is imported, and again
whenever ``qa.proto`` changes (a stamp file holds the hash they were made from). They are never
edited by hand nor committed (.gitignore here). The proto is compiled as
``services/qa/proto/qa.proto`` from the folder holding ``services``, so the generated modules
import each other as ``services.qa.proto.*`` and pickle by that name (Ray Serve's gRPC proxy
pickles the request messages it hands to a replica, which imports this package to read them).

Several processes start at once (the Serve proxy, the replicas, a client): generation runs
under an exclusive ``fcntl`` lock, re-checked once the lock is held, and each file appears by
an atomic rename, so no process imports half a module.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PROTO = HERE / "qa.proto"
GENERATED = ("qa_pb2.py", "qa_pb2.pyi", "qa_pb2_grpc.py")
_STAMP = HERE / "qa.proto.sha256"
_LOCK = HERE / ".qa.proto.lock"


class StubError(RuntimeError):
    """The stubs could not be generated (protoc's message or the missing tool is named)."""


def _digest() -> str:
    import grpc

    # The grpc version counts too: generated code checks it against the runtime at import.
    return hashlib.sha256(PROTO.read_bytes() + grpc.__version__.encode()).hexdigest()


def _current() -> bool:
    return (_STAMP.is_file() and _STAMP.read_text().strip() == _digest()
            and all((HERE / name).is_file() for name in GENERATED))


def ensure_generated() -> None:
    """Generate the stubs from ``qa.proto`` unless they are there and current."""
    if _current():
        return
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _current():
                _generate()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _generate() -> None:
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise StubError(f"generating the gRPC stubs needs grpcio-tools ({exc}); install "
                        "ragtune's dependencies") from None
    root = HERE.parents[2]  # the folder holding the `services` package
    relative = PROTO.relative_to(root).as_posix()
    includes = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(dir=HERE, prefix=".gen-") as out:
        code = protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{includes}",
                            f"--python_out={out}", f"--pyi_out={out}",
                            f"--grpc_python_out={out}", relative])
        if code != 0:
            raise StubError(f"protoc failed on {PROTO} (exit {code}); see its message above")
        made = Path(out) / Path(relative).parent
        for name in GENERATED:
            os.replace(made / name, HERE / name)
    _STAMP.write_text(_digest() + "\n")
    shutil.rmtree(HERE / "__pycache__", ignore_errors=True)  # bytecode of older stubs
    log.info("generated the gRPC stubs from %s", PROTO)


ensure_generated()

from services.qa.proto import qa_pb2, qa_pb2_grpc  # noqa: E402 - generated just above

__all__ = ["qa_pb2", "qa_pb2_grpc", "ensure_generated", "StubError"]
