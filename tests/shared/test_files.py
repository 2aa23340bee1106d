"""shared/files.py: a file is replaced whole, or left as it was."""

import pytest
import torch

from shared.files import atomic_open, write_text_atomic


def test_write_text_atomic_creates_the_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "new" / "status.json"
    assert write_text_atomic(path, "first ✓") == path
    assert path.read_text(encoding="utf-8") == "first ✓"
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]  # no temporary left


def test_an_error_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    with atomic_open(path) as out:
        torch.save({"step": 1}, out)
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(path) as out:
        out.write(b"half a checkpoint")
        raise RuntimeError("disk full")
    assert torch.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_utf8_lines_names_the_line_column_and_offset_of_a_bad_byte(tmp_path):
    from shared.files import NotUtf8, utf8_lines

    path = tmp_path / "mixed.txt"
    path.write_bytes("é\r\n".encode() + b"ab\xe9c\n")  # a CRLF line, then Latin-1
    lines = utf8_lines(path)
    assert next(lines) == "é\r\n"  # ends kept, as the file has them
    with pytest.raises(NotUtf8) as caught:
        next(lines)
    assert (caught.value.line, caught.value.column, caught.value.byte,
            caught.value.offset) == (2, 3, 0xE9, len("é\r\nab".encode()))
    assert str(caught.value) == (f"{path}:2: not UTF-8 text (byte 0xe9 at column 3, "
                                 "offset 6 of the file)")
