"""What every training loop of the trainer shares: the learning-rate schedule, seeding, progress
reports, cancellation, the guarded optimiser step, resumable state and the saved model folder.

The loops themselves (``generator.py``, ``distill.py``, ``joint.py``, ``lm.py``, ``continual.py``,
``retriever.py``, ``rerank_distill.py``) are explicit, nanoGPT-style: read them top to bottom.
This module holds only the scaffolding around their steps.

A *run folder* is where one training run writes:
  ``state.pt``      everything needed to resume (model and optimiser state, step, RNG, config)
                    rewritten atomically every ``save_steps``;
  ``model/``        the result: ``save_pretrained`` weights + tokenizer + ``ragtune.json``
                    (kind, config, data fingerprint, metrics, step) — what serving loads;
  ``report.json``   the run's losses and dev metrics over steps, and ``report.png`` plotting
                    them (``write_report``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel

from shared.files import atomic_open
from shared.registry import META_FILE, read_meta  # noqa: F401  (loop.read_meta for trainers)

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_DIR = "model"
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
GENERATOR_METRICS = ("em", "f1", "score", "abstention_rate", "answered_rate")

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


def set_scheduled_lr(optimizer: torch.optim.Optimizer, config: Any, step: int,
                     total_steps: int, lr: float | None = None) -> float:
    """Set every parameter group of ``optimizer`` to ``get_lr`` at ``step`` and return it: the
    peak is ``lr`` (default ``config.lr``), the shape ``config``'s ``warmup_steps``,
    ``schedule`` and ``min_lr_ratio`` (a loop whose config lacks one calls ``get_lr``)."""
    value = get_lr(step, lr=config.lr if lr is None else lr, warmup_steps=config.warmup_steps,
                   total_steps=total_steps, schedule=config.schedule,
                   min_ratio=config.min_lr_ratio)
    set_lr(optimizer, value)
    return value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) generators' states, for ``set_rng_state``."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """One progress report of a run; ``metrics`` holds dev metrics when an evaluation ran;
    ``phase`` says what a run does before its first step (e.g. "choosing layers 3/18"), None
    while it trains."""

    kind: str
    step: int
    total_steps: int
    loss: float | None
    lr: float
    elapsed_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    phase: str | None = None

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


@dataclass(frozen=True)
class Reporter:
    """Sends a run's ``Progress`` to ``progress`` (nothing when it is None), its elapsed time
    read from ``clock`` (make the reporter after a resume has set the clock)."""

    progress: ProgressFn | None
    kind: str
    total_steps: int
    clock: Clock

    def __call__(self, step: int, loss: float | None, lr: float,
                 metrics: dict[str, float] | None = None) -> None:
        if self.progress is not None:
            self.progress(Progress(kind=self.kind, step=step, total_steps=self.total_steps,
                                   loss=loss, lr=lr, elapsed_s=self.clock.elapsed(),
                                   metrics=metrics or {}))

    def phase(self, text: str) -> None:
        """Report work before the first step (step 0, no loss) that takes long enough to be
        worth saying, e.g. ``"caching the teacher"``."""
        if self.progress is not None:
            self.progress(Progress(kind=self.kind, step=0, total_steps=self.total_steps,
                                   loss=None, lr=0.0, elapsed_s=self.clock.elapsed(),
                                   phase=text))


def check_cancel(should_stop: Callable[[], bool] | None) -> None:
    """Raise ``Cancelled`` when the caller's ``should_stop`` says so (asked between steps, and
    between the parts of long work before them)."""
    if should_stop is not None and should_stop():
        raise Cancelled("training cancelled")


def stop_if_asked(should_stop: Callable[[], bool] | None, run_dir: Path,
                  snapshot: Callable[[], dict[str, Any]]) -> None:
    """``check_cancel``, saving ``snapshot()`` as ``run_dir``'s resume state before
    ``Cancelled`` is raised (``snapshot`` is called only then)."""
    if should_stop is not None and should_stop():
        save_state(run_dir, snapshot())
        raise Cancelled("training cancelled")


def optimizer_step(optimizers: Sequence[torch.optim.Optimizer],
                   param_groups: Sequence[Sequence[torch.nn.Parameter]],
                   max_grad_norm: float | None, loss: float) -> bool:
    """Clip each parameter group's gradient norm and step its optimiser; gradients are then
    cleared. Returns False — and steps nothing — when the loss or a gradient norm is not
    finite, so one bad batch cannot turn the weights into NaN (clipping an infinite norm
    multiplies by 0 and makes NaN)."""
    finite = math.isfinite(loss)
    for params in param_groups:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
        finite = finite and bool(torch.isfinite(norm))
    if finite:
        for optimizer in optimizers:
            optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return finite


MAX_SKIPPED_IN_A_ROW = 3


class NonFinite:
    """Counts the optimiser steps skipped in a row (``optimizer_step`` returned False)."""

    def __init__(self) -> None:
        self.in_a_row = 0

    def count(self, stepped: bool, step: int, loss: float) -> None:
        """Count optimiser step ``step`` (1-based), with a warning when it was skipped (its
        ``loss`` in it). Raises FloatingPointError once ``MAX_SKIPPED_IN_A_ROW`` steps in a
        row were skipped: the run diverged (or its data holds a broken example)."""
        if not stepped:
            log.warning("step %d: loss or gradients not finite (loss %s); step skipped",
                        step, loss)
        self.in_a_row = 0 if stepped else self.in_a_row + 1
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(f"the loss or gradients were not finite in {self.in_a_row} "
                                     f"steps in a row (up to step {step}): lower the learning "
                                     "rate or check the data")


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the resume state atomically (a crash mid-write leaves the previous one)."""
    with atomic_open(run_dir / STATE_FILE) as out:
        torch.save(state, out)


def load_state(run_dir: Path) -> dict[str, Any] | None:
    """The last saved resume state of ``run_dir``, or None when the run never saved one."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def check_resumable(state: Mapping[str, Any], kind: str, config: BaseModel, data: str,
                    run_dir: Path) -> None:
    """Raise ValueError unless ``state`` is a run of this kind, config and data (the device may
    change between runs)."""
    if state.get("kind") != kind:
        raise ValueError(f"{run_dir} holds a {state.get('kind')!r} run, not a {kind!r} run")
    saved = {k: v for k, v in state["config"].items() if k != "device"}
    now = {k: v for k, v in config.model_dump(mode="json").items() if k != "device"}
    if saved != now:
        diff = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
                for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        raise ValueError(f"{run_dir} holds a run with another config ({'; '.join(diff)}): "
                         "use another run_dir, or resume=False to start over")
    if state["data"] != data:
        raise ValueError(f"{run_dir} holds a run on other data (fingerprint {state['data']}, "
                         f"now {data}): use another run_dir, or resume=False to start over")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained parameters by name, on the CPU (all of them, or only the LoRA adapters)."""
    return {name: p.detach().to("cpu", copy=True)
            for name, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``trainable_state``'s tensors back into ``model``; ValueError when it names a
    parameter the model lacks."""
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise ValueError(f"the saved state names parameters the model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def training_state(model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The part of a resume state that one optimiser's run holds: ``trainable``
    (``trainable_state``), ``optimizer`` (its state dict) and ``rng`` (``rng_state``)."""
    return {"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
            "rng": rng_state()}


def restore_training_state(state: Mapping[str, Any], model,
                           optimizer: torch.optim.Optimizer) -> None:
    """Put back what ``training_state`` saved into ``state``: the trained parameters, the
    optimiser's state and the random generators'."""
    restore_trainable(model, state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])


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


# --- the report -------------------------------------------------------------------------------
def write_report(run_dir: Path, report: Mapping[str, Any], title: str,
                 metrics: Sequence[str] = GENERATOR_METRICS,
                 loss_label: str = "loss (nats / answer token)") -> tuple[Path, Path]:
    """``report.json`` and ``report.png`` in ``run_dir``: ``report["history"]["train"]``'s loss
    and ``["eval"]``'s dev loss and ``metrics`` over steps, ``report["best_step"]`` marked.
    Returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / REPORT_JSON
    json_path.write_text(json.dumps(report, indent=2, default=str))
    train = report["history"]["train"]
    evals = report["history"]["eval"]
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals and any(r.get("dev_loss") is not None for r in evals):
        left.plot([r["step"] for r in evals], [r.get("dev_loss") for r in evals], "o-",
                  label="dev loss")
    left.set_xlabel("step")
    left.set_ylabel(loss_label)
    left.legend()
    for metric in metrics:
        values = [r.get(metric) for r in evals]
        if any(v is not None for v in values):
            right.plot([r["step"] for r in evals], values, "o-", label=metric)
    right.set_xlabel("step")
    right.set_ylabel("dev metric")
    right.set_ylim(-0.02, 1.02)
    best = report.get("best_step")
    if best is not None:
        for axis in (left, right):
            axis.axvline(best, color="grey", linestyle=":")
    if right.get_legend_handles_labels()[0]:
        right.legend()
    figure.suptitle(title)
    figure.tight_layout()
    png_path = run_dir / REPORT_PNG
    figure.savefig(png_path, dpi=100)
    return json_path, png_path
