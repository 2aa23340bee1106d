"""Files written whole or not at all: a reader (or a resumed run) never sees half a file; and
the lines of a UTF-8 text file read with the place of a byte that is not UTF-8."""

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


class NotUtf8(ValueError):
    """A byte of ``path`` that is not UTF-8: its value ``byte``, its ``line`` and ``column``
    (from 1; the column in characters of that line) and ``offset`` (bytes before it)."""

    def __init__(self, path: Path, line: int, column: int, byte: int, offset: int) -> None:
        self.path, self.line, self.column, self.byte, self.offset = (path, line, column, byte,
                                                                     offset)
        super().__init__(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x} at column "
                         f"{column}, offset {offset} of the file)")


def utf8_lines(path: Path) -> Iterator[str]:
    """The lines of the UTF-8 text file ``path``, read as they are consumed (split where
    ``open`` splits them, ends kept). Raises ``NotUtf8`` at the first byte that is not UTF-8,
    and OSError as ``open`` does."""
    offset = 0
    # Undecodable bytes read as surrogates, so that the line holding one can be named (the
    # decoder's own error, raised while reading ahead in chunks, does not say which).
    with Path(path).open(encoding="utf-8", errors="surrogateescape", newline="") as lines:
        for number, line in enumerate(lines, 1):
            try:
                size = len(line.encode("utf-8"))
            except UnicodeEncodeError as exc:
                before = len(line[:exc.start].encode("utf-8", "surrogateescape"))
                raise NotUtf8(path, number, exc.start + 1, ord(line[exc.start]) - 0xDC00,
                              offset + before) from None
            offset += size
            yield line

