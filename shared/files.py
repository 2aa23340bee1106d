"""Files written whole or not at all: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, e.g. ``with atomic_open(p) as out:
    torch.save(state, out)``.

    The bytes go to a temporary file beside ``path`` (same folder, so the rename is atomic;
    named by the process id, so concurrent writers do not mix). On a clean exit it replaces
    ``path`` in one ``os.replace``: a reader sees the old file or the new one. On an error the
    temporary file is removed and ``path`` is left as it was. The folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            yield out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_open``; returns ``path``."""
    with atomic_open(path) as out:
        out.write(text.encode("utf-8"))
    return Path(path)
