"""Versioned checkpoints and which version of each model serves.

Layout under ``root`` (``settings.checkpoint_dir``)::

    registry.json                  the record below, rewritten atomically under a file lock
    <kind>/v0001/                  one version: a saved model folder (``loop.save_model``)
    runs/<job id>/                 a training run's working folder (resume state, report)

A version is immutable once registered. ``serving`` is the version each model serves (None =
the packaged base model); ``history`` is the stack of earlier serving versions, so ``rollback``
returns to the one before; ``prune`` deletes the versions nothing needs any more. Every
process (CLI, trainer actor, serving replicas) reads the same file; a lock (``fcntl``)
serialises writers.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.files import write_text_atomic
from shared.schemas import MODEL_KINDS, ModelVersion, RegistryView

REGISTRY_FILE = "registry.json"
META_FILE = "ragtune.json"  # inside every saved model folder: kind, config, data, metrics


def read_meta(model_dir: Path) -> dict[str, Any]:
    """The ``ragtune.json`` of a saved model folder."""
    return json.loads((Path(model_dir) / META_FILE).read_text())


class RegistryError(ValueError):
    """A registry operation cannot be done as asked (unknown kind or version, bad path)."""


class Registry:
    """The checkpoint store rooted at ``root`` (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # --- reading ---------------------------------------------------------------------------
    def view(self) -> RegistryView:
        """Every version and the serving one, per kind."""
        return RegistryView.model_validate(self._read())

    def serving(self, kind: str) -> ModelVersion | None:
        """The version ``kind`` serves, or None for the packaged base model."""
        _check_kind(kind)
        record = self._read()[kind]
        if record["serving"] is None:
            return None
        return _find(record, kind, record["serving"])

    def serving_path(self, kind: str) -> Path | None:
        """Folder of the serving version of ``kind`` (None = packaged base model)."""
        version = self.serving(kind)
        return None if version is None else self.root / version.path

    def get(self, kind: str, version: str) -> ModelVersion:
        _check_kind(kind)
        return _find(self._read()[kind], kind, version)

    def path_of(self, version: ModelVersion) -> Path:
        return self.root / version.path

    def inside(self, path: Path) -> Path:
        """``path`` resolved, if it lies inside the checkpoint root; else ``RegistryError``.
        Keeps a job from reading or writing checkpoints anywhere on the machine."""
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        root = self.root.resolve()
        if resolved != root and root not in resolved.parents:
            raise RegistryError(f"checkpoint path {path} is outside the checkpoint directory "
                                f"{root}")
        return resolved

    def run_dir(self, job_id: str) -> Path:
        """The working folder of the training run ``job_id``, resolved: a folder directly
        under ``<root>/runs``. Raises ``RegistryError`` for an id that names anything else
        ("." or ".." would be the runs folder or the root itself, whose weights a finished
        job's tidy-up deletes; "a/b" a folder of another run)."""
        runs = (self.root / "runs").resolve()
        path = self.inside(runs / job_id)
        if path.parent != runs:
            raise RegistryError(f"job id {job_id!r} does not name a run folder of its own "
                                f"directly under {runs}")
        return path

    def passage_side(self, version: ModelVersion | None) -> ModelVersion | None:
        """The retriever version whose encoder made the passage vectors that ``version``
        searches (None = the base model's): itself when it re-indexes, else the one it was
        trained against."""
        if version is None or version.reindex:
            return version
        if version.passage_version is None:
            return None
        return self.get("retriever", version.passage_version)

    # --- writing ---------------------------------------------------------------------------
    def register(self, kind: str, model_dir: Path, *, job_id: str | None = None,
                 passage_version: str | None = None,
                 made_from: str | None = None,
                 split_seed: int | None = None) -> ModelVersion:
        """Copy the saved model folder ``model_dir`` in as the next version of ``kind``
        (``made_from``: what a version that no job trained was made of, for the listing;
        ``split_seed``: the seed that split the job's questions, which evaluation reuses).

        ``model_dir`` must hold ``ragtune.json`` (``loop.save_model`` writes it); its metrics
        are kept in the record. Not promoted: serving is unchanged.
        """
        _check_kind(kind)
        meta_path = model_dir / META_FILE
        if not meta_path.is_file():
            raise RegistryError(f"{model_dir} is not a saved model folder (no {META_FILE})")
        meta = read_meta(model_dir)
        with self._locked() as data:
            record = data[kind]
            number = 1 + _numbered(record)
            record["numbered"] = number
            name = f"v{number:04d}"
            target = self.root / kind / name
            tmp = self.root / kind / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(model_dir, tmp)
            shutil.rmtree(target, ignore_errors=True)  # left by a crash before it was recorded
            os.replace(tmp, target)
            entry = ModelVersion(kind=kind, version=name, path=f"{kind}/{name}",
                                 created=time.time(), job_id=job_id, made_from=made_from,
                                 metrics=_flat_metrics(meta.get("metrics", {})),
                                 reindex=bool(meta.get("reindex", False)),
                                 passage_version=passage_version, split_seed=split_seed)
            record["versions"].append(entry.model_dump(mode="json"))
            return entry

    def promote(self, kind: str, version: str | None) -> ModelVersion | None:
        """Serve ``version`` of ``kind`` (None = back to the packaged base); returns it.
        The previous serving version goes onto the history for ``rollback``."""
        _check_kind(kind)
        with self._locked() as data:
            record = data[kind]
            entry = None if version is None else _find(record, kind, version)
            if record["serving"] == version:
                return entry
            record["history"].append(record["serving"])
            record["serving"] = version
            return entry

    def rollback(self, kind: str) -> ModelVersion | None:
        """Serve the version that served before the last promotion; returns it (None = base).
        Raises ``RegistryError`` when there is nothing to roll back to."""
        _check_kind(kind)
        with self._locked() as data:
            record = data[kind]
            if not record["history"]:
                raise RegistryError(f"{kind}: no earlier serving version to roll back to")
            previous = record["history"].pop()
            record["serving"] = previous
            return None if previous is None else _find(record, kind, previous)

    def prune(self, kind: str, keep: int = 2) -> tuple[list[ModelVersion], int]:
        """Delete the versions of ``kind`` that nothing needs, all but the newest ``keep`` of
        them. Always kept: the serving version, every version ``rollback`` can return to and
        every retriever version whose passage vectors a kept version searches. Returns the
        deleted versions (oldest first) and the bytes their folders held; their numbers are
        never given again (a Milvus collection or a cache may still carry the name)."""
        _check_kind(kind)
        if keep < 0:
            raise RegistryError(f"keep must be 0 or more, got {keep}")
        with self._locked() as data:
            record = data[kind]
            record["numbered"] = _numbered(record)
            versions = [ModelVersion.model_validate(v) for v in record["versions"]]
            needed = {record["serving"], *record["history"]}
            spare = [v for v in versions if v.version not in needed]
            drop = {v.version for v in spare[:max(0, len(spare) - keep)]}
            # versions re-indexing their passages name none themselves: one level suffices
            drop -= {v.passage_version for v in versions if v.version not in drop}
            record["versions"] = [v for v in record["versions"] if v["version"] not in drop]
            removed = [v for v in versions if v.version in drop]
        freed = 0
        for version in removed:  # the record no longer names them: nothing serves or loads them
            folder = self.path_of(version)
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
        return removed, freed

    # --- storage ---------------------------------------------------------------------------
    def _empty(self) -> dict[str, Any]:
        return {kind: {"serving": None, "history": [], "versions": []} for kind in MODEL_KINDS}

    def _read(self) -> dict[str, Any]:
        path = self.root / REGISTRY_FILE
        data = self._empty()
        if path.is_file():
            data.update(json.loads(path.read_text()))
        return data

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the record under an exclusive lock; written only on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        for kind in MODEL_KINDS:
            (self.root / kind).mkdir(exist_ok=True)
        with open(self.root / ".registry.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._read()
                yield data
                write_text_atomic(self.root / REGISTRY_FILE,
                                  json.dumps(data, indent=2, sort_keys=True))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise RegistryError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def _find(record: dict[str, Any], kind: str, version: str) -> ModelVersion:
    for entry in record["versions"]:
        if entry["version"] == version:
            return ModelVersion.model_validate(entry)
    known = ", ".join(v["version"] for v in record["versions"]) or "none yet"
    raise RegistryError(f"{kind}: no version {version!r}; known: {known}")


def _numbered(record: dict[str, Any]) -> int:
    """The highest version number ``record`` ever gave (registries written before pruning
    existed only know it from their versions)."""
    return max([record.get("numbered", 0)]
               + [int(v["version"][1:]) for v in record["versions"]])


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric top-level metrics of a model's meta (histories and nested dicts dropped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[key] = float(value)
        elif isinstance(value, dict):
            for sub, number in value.items():
                if isinstance(number, int | float) and not isinstance(number, bool):
                    out[f"{key}.{sub}"] = float(number)
    return out


def collection_for(base: str, passage_version: ModelVersion | None) -> str:
    """Milvus collection holding passages encoded by ``passage_version`` (None = base model)."""
    return base if passage_version is None else f"{base}_{passage_version.version}"
