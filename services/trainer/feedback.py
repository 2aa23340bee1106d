"""The trainer's store of judged answers, between ``rag:feedback`` and a continual update.

Each ``Feedback`` the trainer reads from ``rag:feedback`` is appended to
``<checkpoint dir>/feedback/pending.jsonl`` (one JSON object per line, at most once per
``feedback_id``: a re-delivered entry is not stored twice). An update ``take``s everything
stored into its run folder as a question/answer JSONL file (``shared.datasets.load_qa_jsonl``'s
format, the answer being ``Feedback.target()``), keeping the items themselves beside it, and
trains on that file as a ``continual`` job; if the job cannot be queued, ``restore`` puts the
items back, so feedback is never lost between the stream and a job.

Thread-safe within one process (the trainer's request handlers run in threads); one trainer
replica owns the folder.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from shared.files import write_text_atomic
from shared.schemas import Feedback

STORE_DIR = "feedback"
PENDING_FILE = "pending.jsonl"
DATA_FILE = "feedback.jsonl"  # in an update's run folder: what it trains on
ITEMS_FILE = "feedback-items.jsonl"  # beside it: the Feedback items themselves


def as_training_line(fb: Feedback) -> dict:
    """One line of a question/answer JSONL file (``load_qa_jsonl``) for ``fb``."""
    line = {"id": f"feedback:{fb.feedback_id}", "question": fb.question, "answer": fb.target()}
    if fb.doc_ids:
        line["doc_ids"] = list(fb.doc_ids)
    return line


class FeedbackStore:
    """Feedback kept in ``root/pending.jsonl`` until an update takes it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / PENDING_FILE
        self._lock = threading.Lock()
        self._ids: set[str] | None = None  # ids of the stored items, read lazily

    def add(self, fb: Feedback) -> int:
        """Store ``fb`` unless an item with its id is stored; returns how many are stored."""
        with self._lock:
            ids = self._stored_ids()
            if fb.feedback_id not in ids:
                self.root.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(fb.model_dump_json() + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                ids.add(fb.feedback_id)
            return len(ids)

    def count(self) -> int:
        with self._lock:
            return len(self._stored_ids())

    def take(self, run_dir: Path) -> int:
        """Move every stored item into ``run_dir``: ``feedback.jsonl`` (training lines,
        ``as_training_line``) and ``feedback-items.jsonl`` (the items themselves, for
        ``restore``); then empty the store. Returns how many; writes nothing when empty."""
        with self._lock:
            items = self._read()
            if not items:
                return 0
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_lines(run_dir / ITEMS_FILE, [fb.model_dump(mode="json") for fb in items])
            _write_lines(run_dir / DATA_FILE, [as_training_line(fb) for fb in items])
            self.path.unlink()
            self._ids = set()
            return len(items)

    def restore(self, run_dir: Path) -> int:
        """Put back the items ``take`` moved to ``run_dir`` (an update that could not be
        queued); returns how many are stored after."""
        stored = self.count()
        path = run_dir / ITEMS_FILE
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    stored = self.add(Feedback.model_validate_json(line))
        return stored

    def _stored_ids(self) -> set[str]:
        if self._ids is None:
            self._ids = {fb.feedback_id for fb in self._read()}
        return self._ids

    def _read(self) -> list[Feedback]:
        if not self.path.is_file():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(Feedback.model_validate_json(line))
            except ValueError as exc:
                raise ValueError(f"{self.path}:{n}: not a stored feedback item: {exc}") from None
        return out


def _write_lines(path: Path, objects: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(o) + "\n" for o in objects))
