"""What every training loop of the trainer shares: the learning-rate schedule, seeding, progress
reports, cancellation, resumable state and the saved model folder.

The loops themselves (``retriever.py``, ``generator.py``, ``joint.py``, ``pretrain.py``) are
explicit, nanoGPT-style: read them top to bottom. This module holds only the pieces they all use.

A *run folder* is where one training run writes:
  ``state.pt``      everything needed to resume (model and optimiser state, step, RNG, config)
                    rewritten atomically every ``save_steps``;
  ``model/``        the result: ``save_pretrained`` weights + tokenizer + ``ragtune.json``
                    (kind, config, data fingerprint, metrics, step) — what serving loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from shared.registry import META_FILE

STATE_FILE = "state.pt"
MODEL_DIR = "model"

Schedule = Literal["cosine", "linear", "constant"]


def get_lr(step: int, *, lr: float, warmup_steps: int, total_steps: int,
           schedule: Schedule = "cosine", min_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup_steps`` to ``lr``, then
    cosine or linear decay to ``lr * min_ratio`` at ``total_steps`` (or constant). Pure."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    factor = 1.0 - progress if schedule == "linear" else cosine
    return lr * (min_ratio + (1.0 - min_ratio) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(setting: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``"auto"`` → CUDA in bf16 when a GPU is present (fp32 if it lacks bf16), else CPU fp32.
    ``"cpu"``/``"cuda"`` force one. Raises ValueError for an unknown name or absent CUDA."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {setting!r}; known: auto, cpu, cuda")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.device("cuda"), dtype


def fingerprint(records: Iterable[Any]) -> str:
    """SHA-256 (16 hex digits) of the records' JSON: which data produced a checkpoint."""
    digest = hashlib.sha256()
    for record in records:
        if hasattr(record, "__dataclass_fields__"):
            record = asdict(record)
        elif hasattr(record, "model_dump"):
            record = record.model_dump(mode="json")
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


@dataclass
class Progress:
    """One progress report of a run; ``metrics`` holds dev metrics when an evaluation ran."""

    kind: str
    step: int
    total_steps: int
    loss: float | None
    lr: float
    elapsed_s: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def eta_s(self) -> float | None:
        if self.step <= 0:
            return None
        return self.elapsed_s / self.step * max(0, self.total_steps - self.step)


ProgressFn = Callable[[Progress], None]


class Cancelled(RuntimeError):
    """The run was asked to stop; its last saved state stays for a resume."""


class Clock:
    """Elapsed time of a run, continued across a resume (``offset`` = time spent before)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.started = time.perf_counter() - offset

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def check_cancel(should_stop: Callable[[], bool] | None) -> None:
    """Raise ``Cancelled`` when the caller's ``should_stop`` says so (between steps only)."""
    if should_stop is not None and should_stop():
        raise Cancelled("training cancelled")


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the resume state atomically (a crash mid-write leaves the previous one)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / STATE_FILE)


def load_state(run_dir: Path) -> dict[str, Any] | None:
    """The last saved resume state of ``run_dir``, or None when the run never saved one."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def save_model(run_dir: Path, model, tokenizer, meta: dict[str, Any],
               folder: str = MODEL_DIR) -> Path:
    """Save ``model`` (``save_pretrained``), ``tokenizer`` and ``meta`` as ``ragtune.json`` into
    ``run_dir / folder``, replacing an older one atomically; returns that folder."""
    target = run_dir / folder
    tmp = run_dir / f".{folder}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if target.exists():
        old = run_dir / f".{folder}.old"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def read_meta(model_dir: Path) -> dict[str, Any]:
    """The ``ragtune.json`` of a saved model folder."""
    return json.loads((model_dir / META_FILE).read_text())
