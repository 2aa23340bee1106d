"""The trainer's store of judged answers, between ``rag:feedback`` and a continual update.

Each ``Feedback`` the trainer reads from ``rag:feedback`` is appended to
``<checkpoint dir>/feedback/pending.jsonl`` (one JSON object per line), at most once per
``feedback_id`` ever: the ids an update took are kept in ``taken.jsonl`` beside it (one JSON
string a line), so an entry re-delivered or re-sent after an update took it is not stored, nor
trained on, again. An update ``take``s everything stored into its run folder as a
question/answer JSONL file (``shared.datasets.load_qa_jsonl``'s format, the answer being
``Feedback.target()``), keeping the items themselves beside it, and trains on that file as a
``continual`` job; if the job cannot be queued, ``restore`` puts the items back (and forgets
that they were taken), so feedback is never lost between the stream and a job.

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
TAKEN_FILE = "taken.jsonl"  # the ids of every item an update took
DATA_FILE = "feedback.jsonl"  # in an update's run folder: what it trains on
ITEMS_FILE = "feedback-items.jsonl"  # beside it: the Feedback items themselves


def as_training_line(fb: Feedback) -> dict:
    """One line of a question/answer JSONL file (``load_qa_jsonl``) for ``fb``."""
    line = {"id": f"feedback:{fb.feedback_id}", "question": fb.question, "answer": fb.target()}
    if fb.doc_ids:
        line["doc_ids"] = list(fb.doc_ids)
    return line


class FeedbackStore:
    """Feedback kept in ``root/pending.jsonl`` until an update takes it; the ids taken kept in
    ``root/taken.jsonl``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / PENDING_FILE
        self.taken_path = self.root / TAKEN_FILE
        self._lock = threading.Lock()
        self._ids: set[str] | None = None  # ids of the stored items, read lazily
        self._taken: set[str] | None = None  # ids of the items updates took, read lazily

    def add(self, fb: Feedback) -> int:
        """Store ``fb`` unless an item with its id is stored or was taken by an update;
        returns how many are stored."""
        with self._lock:
            return self._add(fb)

    def count(self) -> int:
        with self._lock:
            return len(self._stored_ids())

    def take(self, run_dir: Path) -> int:
        """Move every stored item into ``run_dir``: ``feedback.jsonl`` (training lines,
        ``as_training_line``) and ``feedback-items.jsonl`` (the items themselves, for
        ``restore``); remember their ids as taken, then empty the store. Returns how many;
        writes nothing when empty.

        A crash part-way leaves the items in ``run_dir`` and possibly still stored: a run
        folder without a job is for the caller to ``restore`` (the trainer does at start)."""
        with self._lock:
            items = self._read()
            if not items:
                return 0
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_lines(run_dir / ITEMS_FILE, [fb.model_dump(mode="json") for fb in items])
            _write_lines(run_dir / DATA_FILE, [as_training_line(fb) for fb in items])
            # taken before the store empties: never a moment where an id is in neither
            taken = self._taken_ids()
            _append(self.taken_path, "".join(json.dumps(fb.feedback_id) + "\n" for fb in items))
            taken.update(fb.feedback_id for fb in items)
            self.path.unlink()
            self._ids = set()
            return len(items)

    def restore(self, run_dir: Path) -> int:
        """Put back the items ``take`` moved to ``run_dir`` (an update that could not be
        queued, or one the trainer stopped before queueing): their ids are no longer taken,
        and each is stored unless it already is. Returns how many are stored after."""
        path = run_dir / ITEMS_FILE
        items = []
        if path.is_file():
            items = [Feedback.model_validate_json(line)
                     for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        with self._lock:
            taken = self._taken_ids()
            back = {fb.feedback_id for fb in items} & taken
            if back:
                # forgotten before they are stored again: a crash between the two leaves them
                # in run_dir only, which a restore at the next start puts back
                taken -= back
                write_text_atomic(self.taken_path,
                                  "".join(json.dumps(i) + "\n" for i in sorted(taken)))
            for fb in items:
                self._add(fb)
            return len(self._stored_ids())

    def _add(self, fb: Feedback) -> int:
        ids = self._stored_ids()
        if fb.feedback_id not in ids and fb.feedback_id not in self._taken_ids():
            _append(self.path, fb.model_dump_json() + "\n")
            ids.add(fb.feedback_id)
        return len(ids)

    def _stored_ids(self) -> set[str]:
        if self._ids is None:
            self._ids = {fb.feedback_id for fb in self._read()}
        return self._ids

    def _taken_ids(self) -> set[str]:
        if self._taken is None:
            taken: set[str] = set()
            lines = (self.taken_path.read_text(encoding="utf-8").splitlines()
                     if self.taken_path.is_file() else [])
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    feedback_id = json.loads(line)
                except ValueError:
                    feedback_id = None
                if not isinstance(feedback_id, str):
                    raise ValueError(f"{self.taken_path}:{n}: not a taken feedback id (a JSON "
                                     f"string): {line[:80]!r}")
                taken.add(feedback_id)
            self._taken = taken
        return self._taken

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


def _append(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` and flush it to disk (the folder is created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_lines(path: Path, objects: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(o) + "\n" for o in objects))
