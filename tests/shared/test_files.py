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
