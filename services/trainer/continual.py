"""Continual learning of the generator: train on one task after another without forgetting the
earlier ones, measure how much is forgotten, and gate what reaches serving.

Two uses of the same loop (``train_task``):

- evaluation: a stream of tasks — the corpus's topics arriving one after another with their
  questions (``topic_tasks``) — trained in order with one method; after each task the test
  items of *every* task are answered (``run_stream``), giving the accuracy matrix
  ``R[i][j]`` (after training task i, on task j's test items), from which
  ``transfer_metrics`` computes average accuracy, backward transfer (forgetting) and forward
  transfer; ``stream_table`` / ``write_stream_report`` write it as text, JSON and a PNG.
- production: ``continual_update`` trains the serving generator on a batch of new
  question/answer pairs (a task = a batch of new data, ``batch_task``) with the chosen method,
  keeping a reservoir of earlier examples as JSONL in the run folder; ``gate`` then decides,
  from a frozen regression set and the new data's held-out part, whether the candidate may
  replace the serving version.

A method (``METHODS``, chosen by name) is two independent choices, each a small pure piece:

- what a batch holds: the new task's examples only, or those plus a share drawn from a
  reservoir memory of earlier examples (``Reservoir``, ``replay_count``, ``mix_batch``);
- a penalty added to the loss: none, EWC or L2 towards the weights before the task
  (``PENALTIES``; ``diagonal_fisher`` gives EWC its importances).

The loop is generic over examples and loss: ``train_task`` takes any examples and a
``loss_fn(model, examples) -> scalar``. The generator's is ``SFTLoss`` (``generator.py``'s
``collate`` + ``target_logprobs`` + ``answer_nll``); the retriever's is InfoNCE over the
corpus, with (question, positive rows) in the reservoir (``continual_retriever.py``).

Accuracy is *answer-contains* on the greedy answer with its citation markers removed
(``shared.metrics.contains``): a 0/1 score per question, so ``R`` holds accuracies as GEM
defines them, and it counts "The capital of France is Paris." as right. Exact match and token
F1 would score the base model's full-sentence answers near 0 (EM ~0, F1 .24 on capitals where
contains is .69, DATA.md), so forward transfer against the base model would measure the
answer format the first task teaches rather than knowledge. The price: an answer listing many
candidates would count; fine-tuned answers are one short "<answer> [n]", and unanswerable items
are left out of the tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.evaluation import qa
from services.trainer import loop
from services.trainer.generator import (
    BatchOrder,
    Encoding,
    Example,
    GeneratorTrainConfig,
    answer_nll,
    build_examples,
    collate,
    end_token,
    plain_model,
    target_logprobs,
)
from shared import datasets
from shared.datasets import QAItem
from shared.files import write_text_atomic
from shared.metrics import contains
from shared.prompt import cut_hit
from shared.schemas import Document, Hit

log = logging.getLogger(__name__)

KIND = "continual"
BUFFER_FILE = "replay.jsonl"
UPDATE_JSON = "update.json"
REPORT_JSON = "continual.json"
REPORT_PNG = "continual.png"


# --- methods: what a batch holds and what the loss adds ---------------------------------------
@dataclass(frozen=True)
class Method:
    """``replay``: batches mix in examples from the reservoir; ``penalty``: a key of
    ``PENALTIES`` or None; ``source``: the paper (or reason) behind it."""

    replay: bool
    penalty: str | None
    source: str


METHODS: dict[str, Method] = {
    "naive": Method(False, None, "plain fine-tuning on each new task: the lower bound of every "
                    "continual-learning comparison (catastrophic forgetting, McCloskey & Cohen "
                    "1989)"),
    "replay": Method(True, None, "experience replay from a reservoir memory, each batch the "
                     "new examples plus a share from memory: Rolnick et al. 2019, 'Experience "
                     "Replay for Continual Learning'; Chaudhry et al. 2019, 'On Tiny Episodic "
                     "Memories in Continual Learning'"),
    "ewc": Method(False, "ewc", "elastic weight consolidation, Kirkpatrick et al. 2017, "
                  "'Overcoming catastrophic forgetting in neural networks'; one penalty at the "
                  "latest weights with the Fisher of all earlier data (Huszar 2018, 'Note on the "
                  "quadratic penalties in elastic weight consolidation')"),
    "l2": Method(False, "l2", "L2 towards the weights before the task: the L2 baseline of "
                 "Kirkpatrick et al. 2017; L2-SP, Li et al. 2018, 'Explicit Inductive Bias for "
                 "Transfer Learning with Convolutional Networks'"),
    "replay+ewc": Method(True, "ewc", "both: replay for the data, EWC for the weights"),
}


def ewc_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                importance: Mapping[str, torch.Tensor] | None, strength: float) -> torch.Tensor:
    """EWC (Kirkpatrick et al. 2017): ``strength / 2 * sum_i F_i (theta_i - anchor_i)^2`` over
    the parameters named in ``anchor``, with ``importance`` the diagonal Fisher ``F``. A scalar
    tensor; zero at the anchor. Raises ValueError without importances or for a missing name."""
    if importance is None:
        raise ValueError("the EWC penalty needs importances (a diagonal Fisher), but got None")
    total = _zero(params)
    for name, centre in anchor.items():
        if name not in params or name not in importance:
            raise ValueError(f"parameter {name!r} has an anchor but no current value or "
                             "importance")
        total = total + (importance[name] * (params[name] - centre).pow(2)).sum()
    return 0.5 * strength * total


def l2_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
               importance: Mapping[str, torch.Tensor] | None, strength: float) -> torch.Tensor:
    """L2 towards the anchor (Kirkpatrick et al. 2017's baseline; L2-SP, Li et al. 2018):
    ``strength / 2 * sum_i (theta_i - anchor_i)^2`` — EWC with every importance 1
    (``importance`` is ignored). A scalar tensor; zero at the anchor."""
    total = _zero(params)
    for name, centre in anchor.items():
        if name not in params:
            raise ValueError(f"parameter {name!r} has an anchor but no current value")
        total = total + (params[name] - centre).pow(2).sum()
    return 0.5 * strength * total


def _zero(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    first = next(iter(params.values()), None)
    return torch.zeros((), device=None if first is None else first.device)


# name -> (params, anchor, importance, strength) -> scalar penalty
PenaltyFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor],
                      Mapping[str, torch.Tensor] | None, float], torch.Tensor]
PENALTIES: dict[str, PenaltyFn] = {"ewc": ewc_penalty, "l2": l2_penalty}


@dataclass
class Penalty:
    """A penalty ready to add to the loss: ``PENALTIES[name]`` with its anchor (the weights
    before the task), importances (EWC's Fisher; None for L2) and strength."""

    name: str
    anchor: dict[str, torch.Tensor]
    importance: dict[str, torch.Tensor] | None
    strength: float

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return PENALTIES[self.name](params, self.anchor, self.importance, self.strength)


# --- config -----------------------------------------------------------------------------------
class ContinualConfig(BaseModel):
    """Everything that decides a continual-learning update or stream (saved with its model).

    Each task (or update) trains ``steps_per_task`` optimiser steps — else ``epochs`` passes
    over its new examples — of ``batch_size`` new examples, plus, for a replay method,
    ``replay_count(batch_size, replay_ratio)`` examples from the reservoir, so that they make
    ``replay_ratio`` of the batch. The optimiser (AdamW) and the schedule start afresh with
    each task, as a production update starts from a saved model without optimiser state.
    ``train_last_layers`` trains only the last N decoder blocks and the final norm (decoder-only
    models): on a CPU it cuts the backward pass to those blocks.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = "replay"
    lr: float = Field(5e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    schedule: loop.Schedule = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    batch_size: int = Field(4, ge=1, le=4096, description="new examples per step")
    epochs: int = Field(1, ge=1, le=1000)
    steps_per_task: int | None = Field(None, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    train_last_layers: int | None = Field(None, ge=1)
    # replay
    replay_ratio: float = Field(0.5, ge=0, lt=1, description="share of each batch drawn from "
                                "the reservoir (replay methods)")
    buffer_size: int = Field(1000, ge=1, description="examples the reservoir holds")
    # penalty
    penalty_strength: float = Field(1.0, ge=0, description="lambda of EWC / L2")
    fisher_examples: int = Field(32, ge=1, description="earlier examples the Fisher is "
                                 "estimated on, sampled from the reservoir")
    # prompts: as serving builds them (see GeneratorTrainConfig)
    top_k: int = Field(qa.SERVING_TOP_K, ge=1, le=100)
    max_passage_chars: int = Field(qa.SERVING_MAX_PASSAGE_CHARS, ge=50)
    max_seq_len: int = Field(1024, ge=16)
    max_answer_tokens: int = Field(32, ge=1)
    abstain_fraction: float = Field(0.0, ge=0, le=1)
    # evaluation
    eval_max_new_tokens: int = Field(24, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; known: {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _method_has_what_it_needs(self) -> ContinualConfig:
        method = METHODS[self.method]
        if method.replay and self.replay_ratio == 0:
            raise ValueError(f"method {self.method!r} replays, so `replay_ratio` has to be > 0, "
                             "but is 0")
        if method.penalty is not None and self.penalty_strength == 0:
            raise ValueError(f"method {self.method!r} adds a {method.penalty} penalty, so "
                             "`penalty_strength` has to be > 0, but is 0")
        return self

    def sft_config(self) -> GeneratorTrainConfig:
        """The generator SFT options that build examples (prompt and answer limits, seed)."""
        return GeneratorTrainConfig(top_k=self.top_k, max_passage_chars=self.max_passage_chars,
                                    max_seq_len=self.max_seq_len,
                                    max_answer_tokens=self.max_answer_tokens,
                                    abstain_fraction=self.abstain_fraction, seed=self.seed,
                                    device=self.device)


def task_steps(n_examples: int, config: ContinualConfig) -> int:
    """Optimiser steps of one task: ``steps_per_task``, else ``epochs`` passes."""
    if config.steps_per_task is not None:
        return config.steps_per_task
    return math.ceil(n_examples / config.batch_size) * config.epochs


# --- the replay memory ------------------------------------------------------------------------
T = TypeVar("T")


def _unit_interval(seed: int, n: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, n): the reservoir's randomness is a function of
    how many items it has seen, so a reservoir reloaded from disk continues exactly."""
    digest = hashlib.sha256(f"reservoir\x00{seed}\x00{n}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Reservoir(Generic[T]):
    """A uniform sample of at most ``capacity`` of every item ever added (Vitter 1985,
    "Random Sampling with a Reservoir", algorithm R): the n-th item is kept with probability
    ``capacity / n``, replacing a uniformly chosen held one. After n additions each of them is
    held with probability ``min(1, capacity / n)``. Randomness comes from (seed, n), so the
    state is only (capacity, seed, seen, items) — what ``save`` writes."""

    def __init__(self, capacity: int, seed: int = 0, items: Iterable[T] = (),
                 seen: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"`capacity` has to be a positive integer, but is {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.items: list[T] = list(items)
        self.seen = len(self.items) if seen is None else seen
        if len(self.items) > capacity or self.seen < len(self.items):
            raise ValueError(f"a reservoir of capacity {capacity} cannot hold "
                             f"{len(self.items)} items after {self.seen} additions")

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: T) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return
        slot = int(_unit_interval(self.seed, self.seen) * self.seen)  # uniform in [0, seen)
        if slot < self.capacity:
            self.items[slot] = item

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.add(item)

    def copy(self) -> Reservoir[T]:
        return Reservoir(self.capacity, self.seed, list(self.items), self.seen)

    def save(self, path: Path, encode: Callable[[T], Any] = lambda x: x) -> Path:
        """Write as JSONL, atomically: a header line ``{"reservoir": {capacity, seed, seen}}``,
        then one line per held item (``encode(item)``, a JSON value)."""
        header = {"capacity": self.capacity, "seed": self.seed, "seen": self.seen}
        lines = [json.dumps({"reservoir": header}),
                 *(json.dumps(encode(item), ensure_ascii=False) for item in self.items)]
        return write_text_atomic(path, "".join(line + "\n" for line in lines))

    @classmethod
    def load(cls, path: Path, decode: Callable[[Any], T] = lambda x: x) -> Reservoir[T]:
        """A reservoir written by ``save``. Raises ValueError naming the file and line for a
        malformed one, FileNotFoundError when there is none."""
        path = Path(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])["reservoir"]
            capacity, seed, seen = int(header["capacity"]), int(header["seed"]), int(header["seen"])
        except (IndexError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}:1: not a reservoir header (expected "
                             '{"reservoir": {"capacity", "seed", "seen"}})') from None
        items = []
        for number, line in enumerate(lines[1:], start=2):
            try:
                items.append(decode(json.loads(line)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: not a reservoir item ({exc})") from None
        return cls(capacity, seed, items, seen)


def replay_count(batch_size: int, ratio: float) -> int:
    """Memory examples to add to ``batch_size`` new ones so they are ``ratio`` of the batch:
    the nearest whole number to ``batch_size * ratio / (1 - ratio)``, at least 1 when
    ``ratio > 0`` (so replay never silently stops). Pure."""
    if not 0 <= ratio < 1:
        raise ValueError(f"`ratio` has to be in [0, 1), but is {ratio}")
    if ratio == 0:
        return 0
    return max(1, round(batch_size * ratio / (1 - ratio)))


def mix_batch(new: Sequence[T], memory: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``new`` followed by ``count`` examples drawn from ``memory`` uniformly without
    replacement (all of it when it holds fewer). Chaudhry et al. 2019's experience replay:
    the two are one batch under one loss. ``memory`` is not changed."""
    drawn = rng.sample(list(memory), min(count, len(memory))) if count > 0 else []
    return list(new) + drawn


# --- EWC's importances ------------------------------------------------------------------------
LossFn = Callable[[Any, Sequence[Any]], torch.Tensor]


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimiser updates, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model, loss_fn: LossFn, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of the trainable parameters: the mean over ``examples`` of
    each example's squared gradient of ``loss_fn(model, [example])`` (one backward pass per
    example: the squared gradient of a batch mean would underestimate it), normalised to mean 1
    over all entries.

    The empirical Fisher (gradients at the gold answers) stands in for the true one (answers
    sampled from the model) as most EWC implementations do (see Kunstner et al. 2019 for its
    limits). Normalising makes ``penalty_strength`` scale-free: EWC with strength lambda puts
    the same total stiffness as L2 with lambda, moved to the parameters that matter. Gradients
    are cleared afterwards; the model keeps its train/eval mode. Raises ValueError for no
    example.
    """
    if not examples:
        raise ValueError("the Fisher needs at least one example, but got none")
    params = trainable(model)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model that is kept
    try:
        for example in examples:
            model.zero_grad(set_to_none=True)
            loss_fn(model, [example]).backward()
            for name, p in params.items():
                if p.grad is not None:
                    sums[name] += p.grad.detach().float().pow(2)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    fisher = {name: s / len(examples) for name, s in sums.items()}
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    if total > 0 and math.isfinite(total):
        scale = count / total
        fisher = {name: f * scale for name, f in fisher.items()}
    return fisher


def make_penalty(config: ContinualConfig, model, loss_fn: LossFn, memory: Sequence[Any],
                 ) -> Penalty | None:
    """The method's penalty for the next task, anchored at ``model``'s weights now; None for a
    method without one, and for EWC before any earlier example (L2 needs none: on the first
    task it holds the model near the weights it started from, as L2-SP does). EWC's Fisher is
    estimated on up to ``fisher_examples`` memory examples (a seeded sample): the reservoir is a
    uniform sample of every earlier task, so this is the Fisher of all of them at the latest
    weights — Huszar 2018's single-penalty correction of EWC — and it needs nothing saved but
    the reservoir."""
    name = METHODS[config.method].penalty
    if name is None or (name == "ewc" and not memory):
        return None
    anchor = {n: p.detach().clone() for n, p in trainable(model).items()}
    importance = None
    if name == "ewc":
        rng = random.Random(f"{config.seed}:fisher:{len(memory)}")
        sample = rng.sample(list(memory), min(config.fisher_examples, len(memory)))
        importance = diagonal_fisher(model, loss_fn, sample)
    return Penalty(name, anchor, importance, config.penalty_strength)


# --- the loop ---------------------------------------------------------------------------------
def _autocast(device: torch.device, amp: torch.dtype):
    return torch.autocast(device.type, dtype=amp,
                          enabled=device.type == "cuda" and amp != torch.float32)


@dataclass(frozen=True)
class SFTLoss:
    """The generator's answer loss over a list of ``Example``s: ``collate`` (right padding),
    ``target_logprobs``, ``answer_nll`` — the mean NLL per answer token of the batch."""

    pad: int
    seq2seq: bool
    device: torch.device
    amp: torch.dtype = torch.float32

    def __call__(self, model, examples: Sequence[Example]) -> torch.Tensor:
        batch = collate(examples, self.pad, seq2seq=self.seq2seq)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with _autocast(self.device, self.amp):
            lp, mask = target_logprobs(model, batch, seq2seq=self.seq2seq)
        return answer_nll(lp, mask)


def train_task(config: ContinualConfig, model, new: Sequence[Any], memory: Sequence[Any],
               loss_fn: LossFn, *, penalty: Penalty | None = None, task: int = 0,
               progress: loop.ProgressFn | None = None,
               should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place on one task: ``task_steps`` AdamW steps, each on the next
    ``batch_size`` of ``new`` (seeded epoch order, ``BatchOrder``) plus, for a replay method,
    ``replay_count`` examples drawn from ``memory``; the loss is ``loss_fn`` on that batch plus
    ``penalty`` (if any). Warm-up and schedule per ``config``; gradients clipped; a step with a
    non-finite loss or gradient is skipped (three in a row raise FloatingPointError).

    Returns one record per step (task, step, loss, penalty, replayed, lr). ``should_stop`` is
    asked before each step and raises ``loop.Cancelled``. Raises ValueError for no new example.
    """
    if not new:
        raise ValueError(f"task {task}: no new example to train on")
    method = METHODS[config.method]
    params = trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameter")
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps = task_steps(len(new), config)
    order = BatchOrder(new, config.batch_size, config.seed * 1_000_003 + task)
    count = replay_count(config.batch_size, config.replay_ratio) if method.replay else 0
    model.train()
    report = loop.Reporter(progress, KIND, steps, loop.Clock())
    history: list[dict[str, Any]] = []
    nonfinite = loop.NonFinite()
    for step in range(steps):
        loop.check_cancel(should_stop)
        lr = loop.set_scheduled_lr(optimizer, config, step, steps)
        # One generator per (seed, task, step): the draw does not depend on earlier draws, so a
        # task's batches are the same whatever ran before it.
        rng = random.Random(f"{config.seed}:{task}:{step}")
        fresh = order(step)
        batch = mix_batch(fresh, memory, count, rng) if count else list(fresh)
        data_loss = loss_fn(model, batch)
        reg = penalty(params) if penalty is not None else torch.zeros((), device=data_loss.device)
        loss = data_loss + reg
        loss.backward()
        value = float(loss.detach())
        stepped = loop.optimizer_step([optimizer], [list(params.values())],
                                      config.max_grad_norm, value)
        nonfinite.count(stepped, step + 1, value)
        history.append({"task": task, "step": step + 1,
                        "loss": round(float(data_loss.detach()), 5),
                        "penalty": round(float(reg.detach()), 6),
                        "replayed": len(batch) - len(fresh), "lr": lr,
                        **({} if stepped else {"skipped": True})})
        report(step + 1, value, lr)
    model.eval()
    return history


@contextmanager
def only_last_layers(model, n: int | None) -> Iterator[None]:
    """Within the block, only the last ``n`` decoder blocks and the parameters outside the
    blocks that are not embeddings (the final norm) train; ``None`` leaves the model as it is.
    The ``requires_grad`` flags are restored on exit. Raises ValueError for an encoder-decoder,
    a model without one list of blocks, or ``n`` over its depth."""
    if n is None:
        yield
        return
    if qa.is_seq2seq(model):
        raise ValueError("`train_last_layers` is for decoder-only models; this one is an "
                         "encoder-decoder")
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError("`train_last_layers`: the model has no list of decoder blocks")
    prefix, blocks = max(lists, key=lambda nm: len(nm[1]))
    if n > len(blocks):
        raise ValueError(f"`train_last_layers` is {n}, but the model has {len(blocks)} blocks")
    embedding_ids = {id(p) for m in (model.get_input_embeddings(),
                                     model.get_output_embeddings()) if m is not None
                     for p in m.parameters()}
    keep = tuple(f"{prefix}.{i}." for i in range(len(blocks) - n, len(blocks)))
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            in_blocks = name.startswith(prefix + ".")
            p.requires_grad_(name.startswith(keep) if in_blocks else id(p) not in embedding_ids)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])


# --- tasks ------------------------------------------------------------------------------------
OTHER_TOPICS = "*"  # in a topic group: every topic no other group names

DEFAULT_TOPIC_GROUPS: tuple[tuple[str, ...], ...] = (
    ("Geography",), ("Uncategorized",), ("People",), (OTHER_TOPICS,))


@dataclass(frozen=True)
class Task:
    """One task of a stream: its name, the corpus topics it covers (empty for a batch of new
    data), and its training and test items."""

    name: str
    topics: tuple[str, ...]
    train: list[QAItem]
    test: list[QAItem]


def topic_tasks(splits: Mapping[str, Sequence[QAItem]], corpus: Sequence[Document],
                groups: Sequence[Sequence[str]] = DEFAULT_TOPIC_GROUPS, *,
                min_tasks: int = 4) -> list[Task]:
    """The corpus's topics arriving one after another with their questions: one task per group
    of topics, in the order given, holding the items of ``splits["train"]`` /
    ``splits["test"]`` (the shared seed split) whose first gold document has one of the
    group's topics. ``OTHER_TOPICS`` in a group stands for every topic no other group names.
    Items without a gold document (unanswerable) belong to no task.

    Raises ValueError for fewer than ``min_tasks`` groups, a topic the corpus lacks or named
    twice, a gold document missing from ``corpus``, or a task without train or test items
    (each message names the value)."""
    if len(groups) < min_tasks:
        raise ValueError(f"a stream needs at least {min_tasks} tasks, but {len(groups)} topic "
                         "groups were given")
    topic_of = {d.doc_id: d.topic for d in corpus}
    known = sorted(set(topic_of.values()))
    named = [t for g in groups for t in g if t != OTHER_TOPICS]
    for topic in named:
        if topic not in known:
            raise ValueError(f"unknown topic {topic!r}; the corpus has: {', '.join(known)}")
    repeated = sorted({t for t in named if named.count(t) > 1})
    if repeated or sum(OTHER_TOPICS in g for g in groups) > 1:
        raise ValueError(f"a topic may be in one group only: {repeated or [OTHER_TOPICS]} "
                         "repeats")
    rest = tuple(t for t in known if t not in named)
    resolved = [tuple(x for t in g for x in (rest if t == OTHER_TOPICS else (t,)))
                for g in groups]
    group_of = {t: i for i, g in enumerate(resolved) for t in g}
    parts: dict[str, list[list[QAItem]]] = {s: [[] for _ in groups] for s in ("train", "test")}
    for split, buckets in parts.items():
        for item in splits.get(split, []):
            if not item.doc_ids:
                continue
            if item.doc_ids[0] not in topic_of:
                raise ValueError(f"item {item.id!r}: gold document {item.doc_ids[0]!r} is not "
                                 "in the corpus")
            index = group_of.get(topic_of[item.doc_ids[0]])
            if index is not None:
                buckets[index].append(item)
    tasks = []
    for i, (group, topics) in enumerate(zip(groups, resolved, strict=True)):
        name = "other topics" if tuple(group) == (OTHER_TOPICS,) else " + ".join(group)
        train, test = parts["train"][i], parts["test"][i]
        if not train or not test:
            raise ValueError(f"task {name!r} has {len(train)} train and {len(test)} test items; "
                             "each task needs both")
        tasks.append(Task(name, topics, train, test))
    return tasks


def batch_task(name: str, items: Sequence[QAItem], seed: int = 13) -> Task:
    """A batch of new question/answer pairs as a task: train = the seed split's train and dev
    parts, test = its test part (held out for the gate's new-data check). Raises ValueError
    for an empty batch or one whose split leaves no training item."""
    if not items:
        raise ValueError(f"batch {name!r} is empty")
    parts = datasets.split(items, seed=seed)
    train = parts["train"] + parts["dev"]
    if not train:
        raise ValueError(f"batch {name!r}: the seed split left no training item "
                         f"({len(items)} items)")
    return Task(name, (), train, parts["test"])


# --- generator examples from items ------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One replayable piece of data: an item and the passages its prompt was built from (so
    replaying it needs no retrieval). JSON through ``to_json`` / ``from_json``."""

    item: QAItem
    passages: tuple[Hit, ...]

    def to_json(self) -> dict[str, Any]:
        return {"item": asdict(self.item),
                "passages": [h.model_dump(mode="json") for h in self.passages]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Record:
        return cls(QAItem(**obj["item"]), tuple(Hit.model_validate(h) for h in obj["passages"]))


def records(items: Sequence[QAItem], retrieval: qa.Retrieval, depth: int) -> list[Record]:
    """Each item with its first ``depth`` hits (``qa.retrieve``)."""
    passages = qa.retrieve(retrieval, [i.question for i in items], depth)
    return [Record(i, tuple(passages[i.question])) for i in items]


class ExampleCache:
    """Tokenised examples of records, built once per record id (``build_examples`` on the
    passages cut to ``max_passage_chars``, as the prompt shows them)."""

    def __init__(self, enc: Encoding, config: ContinualConfig) -> None:
        self.enc = enc
        self.sft = config.sft_config()
        self._built: dict[str, list[Example]] = {}

    def __call__(self, recs: Iterable[Record]) -> list[Example]:
        out = []
        for rec in recs:
            key = rec.item.id
            if key not in self._built:
                # Targets from the passages as the prompt shows them (cut to
                # max_passage_chars): an answer past the cut is not in the prompt to cite.
                shown = [cut_hit(h, self.sft.max_passage_chars) for h in rec.passages]
                self._built[key] = build_examples(
                    [rec.item], {rec.item.question: shown}, self.enc, self.sft,
                    abstain_fraction=self.sft.abstain_fraction)
            out.extend(self._built[key])
        return out


def hits_needed(config: ContinualConfig) -> int:
    """Hits kept per question: ``top_k``, and 3 more to replace removed passages when
    abstention copies are made."""
    return config.top_k + (3 if config.abstain_fraction > 0 else 0)


def answer_accuracy(model, tokenizer, recs: Sequence[Record], config: ContinualConfig,
                    ) -> list[float]:
    """Answer-contains (0/1) of the greedy answer to each record's question, its prompt built
    from the record's first ``top_k`` passages as serving builds it. Empty for no record."""
    if not recs:
        return []
    questions = list(dict.fromkeys(r.item.question for r in recs))
    passages = {r.item.question: list(r.passages[:config.top_k]) for r in recs}
    answers, _ = qa.answer_questions(model, tokenizer, questions, passages,
                                     max_passage_chars=config.max_passage_chars,
                                     max_new_tokens=config.eval_max_new_tokens,
                                     batch_size=config.eval_batch_size)
    by_question = dict(zip(questions, answers, strict=True))
    return [contains(qa.strip_citations(by_question[r.item.question]), r.item.answers)
            for r in recs]


def _encoding(model, tokenizer) -> Encoding:
    return Encoding(tokenizer=tokenizer, seq2seq=qa.is_seq2seq(model),
                    end=end_token(model, tokenizer), context=qa.context_size(model, tokenizer))


def _loss_fn(model, tokenizer, device: torch.device, amp: torch.dtype) -> SFTLoss:
    return SFTLoss(qa.pad_id(tokenizer, qa.eos_ids(model, tokenizer)), qa.is_seq2seq(model),
                   device, amp)


# --- metrics (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferMetrics:
    """GEM's metrics (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual
    Learning", section 4) of a T x T accuracy matrix R (R[i][j]: after training task i, on task
    j's test items) and the accuracies b[j] of the model before any task:

    - ``acc`` = 1/T * sum_j R[T-1][j]: average accuracy over all tasks at the end;
    - ``bwt`` = 1/(T-1) * sum_{j<T-1} (R[T-1][j] - R[j][j]): backward transfer, negative when
      training later tasks lowered earlier ones (forgetting = -bwt);
    - ``fwt`` = 1/(T-1) * sum_{j>0} (R[j-1][j] - b[j]): forward transfer, what earlier tasks did
      for a task before it was trained;
    - ``newest`` = R[T-1][T-1]: accuracy on the newest task right after it.

    ``bwt`` and ``fwt`` are None for a single task."""

    acc: float
    bwt: float | None
    fwt: float | None
    newest: float


def transfer_metrics(matrix: Sequence[Sequence[float]], baseline: Sequence[float],
                     ) -> TransferMetrics:
    """``TransferMetrics`` of ``matrix`` (T x T) and ``baseline`` (T). Raises ValueError for a
    matrix that is empty or not square, or a baseline of another length."""
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError(f"the accuracy matrix has to be T x T with T >= 1, but its rows have "
                         f"lengths {[len(row) for row in matrix]}")
    if len(baseline) != t:
        raise ValueError(f"the baseline has {len(baseline)} accuracies for {t} tasks")
    last = matrix[-1]
    acc = statistics.fmean(last)
    if t == 1:
        return TransferMetrics(acc=acc, bwt=None, fwt=None, newest=last[-1])
    bwt = statistics.fmean(last[j] - matrix[j][j] for j in range(t - 1))
    fwt = statistics.fmean(matrix[j - 1][j] - baseline[j] for j in range(1, t))
    return TransferMetrics(acc=acc, bwt=bwt, fwt=fwt, newest=last[-1])


# --- the stream -------------------------------------------------------------------------------
@dataclass
class StreamResult:
    """One method over one stream: ``matrix[i][j]`` (accuracy on task j after task i),
    ``baseline[j]`` (before any task), their ``metrics``, the per-step ``history`` and timings;
    ``test_items[j]`` counts task j's test items."""

    method: str
    tasks: list[str]
    test_items: list[int]
    matrix: list[list[float]]
    baseline: list[float]
    metrics: TransferMetrics
    history: list[dict[str, Any]]
    train_s: float
    eval_s: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_stream(tasks: Sequence[Task], baseline: Sequence[float] | None) -> None:
    """Raise ValueError for fewer than two tasks or a baseline of another length."""
    if len(tasks) < 2:
        raise ValueError(f"a stream needs at least two tasks, but got {len(tasks)}")
    if baseline is not None and len(baseline) != len(tasks):
        raise ValueError(f"`baseline` has {len(baseline)} accuracies for {len(tasks)} tasks")


def stream_loop(config: ContinualConfig, model, loss_fn: LossFn, tasks: Sequence[Task],
                train: Sequence[Sequence[T]], evaluate: Callable[[], list[float]], *,
                test_items: Sequence[int], to_examples: Callable[[Sequence[T]], list] = list,
                baseline: Sequence[float] | None = None, measure: str = "accuracy",
                progress: loop.ProgressFn | None = None,
                should_stop: Callable[[], bool] | None = None) -> StreamResult:
    """The stream both models share: ``evaluate()`` (one accuracy per task) before the first
    task unless ``baseline`` is given, then per task: the penalty (if the method has one)
    anchored at the weights before it, with EWC's Fisher estimated on the reservoir;
    ``train_task`` on ``to_examples(train[i])``, the reservoir as memory; ``train[i]`` added to
    the reservoir (so a task replays only earlier ones); ``evaluate()`` again. ``measure``
    names the accuracy in the log. The model is trained in place and left in eval mode."""
    eval_s = 0.0

    def timed_evaluate() -> list[float]:
        nonlocal eval_s
        started = time.perf_counter()
        out = evaluate()
        eval_s += time.perf_counter() - started
        return out

    base = list(baseline) if baseline is not None else timed_evaluate()
    buffer: Reservoir[T] = Reservoir(config.buffer_size, config.seed)
    uses_memory = METHODS[config.method].replay or METHODS[config.method].penalty == "ewc"
    matrix: list[list[float]] = []
    history: list[dict[str, Any]] = []
    train_s = 0.0
    for i, task in enumerate(tasks):
        started = time.perf_counter()
        memory = to_examples(buffer.items) if uses_memory else []
        penalty = make_penalty(config, model, loss_fn, memory)
        history += train_task(config, model, to_examples(train[i]), memory, loss_fn,
                              penalty=penalty, task=i, progress=progress,
                              should_stop=should_stop)
        buffer.extend(train[i])
        train_s += time.perf_counter() - started
        matrix.append(timed_evaluate())
        log.info("%s: after task %d (%s) %s %s", config.method, i + 1, task.name, measure,
                 [round(a, 3) for a in matrix[-1]])
    model.eval()
    return StreamResult(method=config.method, tasks=[t.name for t in tasks],
                        test_items=list(test_items), matrix=matrix, baseline=base,
                        metrics=transfer_metrics(matrix, base), history=history,
                        train_s=round(train_s, 3), eval_s=round(eval_s, 3),
                        config=config.model_dump(mode="json"))


def run_stream(config: ContinualConfig, model, tokenizer, tasks: Sequence[Task],
               retrieval: qa.Retrieval, *, baseline: Sequence[float] | None = None,
               progress: loop.ProgressFn | None = None,
               should_stop: Callable[[], bool] | None = None) -> StreamResult:
    """Train ``model`` (in place) on ``tasks`` in order with ``config.method``, answering every
    task's test items before the first task (unless ``baseline`` is given, e.g. computed once
    for several methods) and after each one (``stream_loop``; the reservoir holds records).
    Raises ValueError for fewer than two tasks, a baseline of another length, or an item whose
    example cannot be built (``build_examples``).
    """
    check_stream(tasks, baseline)
    loop.seed_everything(config.seed)
    device, amp = loop.pick_device(config.device)
    model.to(device)
    enc = _encoding(model, tokenizer)
    loss_fn = _loss_fn(model, tokenizer, device, amp)
    examples = ExampleCache(enc, config)
    train_recs = [records(t.train, retrieval, hits_needed(config)) for t in tasks]
    test_recs = [records(t.test, retrieval, config.top_k) for t in tasks]
    for recs in train_recs:
        examples(recs)  # every example built (and checked) before anything trains

    def evaluate() -> list[float]:
        flat = [r for recs in test_recs for r in recs]
        scores = answer_accuracy(model, tokenizer, flat, config)
        out, start = [], 0
        for recs in test_recs:
            out.append(statistics.fmean(scores[start:start + len(recs)]))
            start += len(recs)
        return out

    with only_last_layers(model, config.train_last_layers):
        return stream_loop(config, model, loss_fn, tasks, train_recs, evaluate,
                           test_items=[len(t.test) for t in tasks], to_examples=examples,
                           baseline=baseline, progress=progress, should_stop=should_stop)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}" if value < 0 else f"{value:.3f}"


def stream_table(results: Sequence[StreamResult], accuracy: str = "answer-contains") -> str:
    """Each method's accuracy matrix (a row per "after task i", the baseline first), then one
    summary row per method: ACC, BWT, FWT, newest-task accuracy, seconds. ``accuracy`` names
    the measure in the headings."""
    lines = []
    for result in results:
        names = [f"T{j + 1}" for j in range(len(result.tasks))]
        lines.append(f"{result.method}: accuracy ({accuracy}) on each task's test items")
        lines.append(f"{'':<16}" + "".join(f"{n:>8}" for n in names))
        lines.append(f"{'before':<16}" + "".join(f"{v:>8.3f}" for v in result.baseline))
        for i, row in enumerate(result.matrix):
            lines.append(f"{f'after T{i + 1}':<16}" + "".join(f"{v:>8.3f}" for v in row))
        lines.append("")
    if results:
        tasks = results[0].tasks
        lines.append("tasks: " + "; ".join(f"T{j + 1} {name} ({n} test)" for j, (name, n)
                                             in enumerate(zip(tasks, results[0].test_items,
                                                              strict=True))))
    lines.append(f"{'method':<14}{'ACC':>8}{'BWT':>8}{'FWT':>8}{'newest':>8}{'train s':>9}"
                 f"{'eval s':>8}")
    for r in results:
        m = r.metrics
        lines.append(f"{r.method:<14}{_cell(m.acc):>8}{_cell(m.bwt):>8}{_cell(m.fwt):>8}"
                     f"{_cell(m.newest):>8}{r.train_s:>9.0f}{r.eval_s:>8.0f}")
    return "\n".join(lines)


def write_stream_report(out_dir: Path, results: Sequence[StreamResult],
                        extra: Mapping[str, Any] | None = None, stem: str = "continual",
                        accuracy: str = "answer-contains") -> tuple[Path, Path, Path]:
    """``<stem>.json`` (every result and ``extra``), ``<stem>.txt`` (``stream_table``) and
    ``<stem>.png`` (per method: accuracy on each task after each task; and ACC/BWT/FWT side by
    side) in ``out_dir``; returns their paths. ``accuracy`` names the measure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, text_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("json", "txt", "png"))
    json_path.write_text(json.dumps({**(extra or {}), "results": [r.to_json() for r in results]},
                                    indent=1, default=str))
    text_path.write_text(stream_table(results, accuracy) + "\n")
    figure = Figure(figsize=(4 * (len(results) + 1), 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(results) + 1, squeeze=False)[0]
    for axis, result in zip(axes, results, strict=False):
        t = len(result.tasks)
        xs = list(range(t + 1))
        for j in range(t):
            ys = [result.baseline[j]] + [row[j] for row in result.matrix]
            line, = axis.plot(xs[:j + 1], ys[:j + 1], ":", alpha=0.6)  # before it was trained
            axis.plot(xs[j:], ys[j:], "o-", color=line.get_color(), label=f"T{j + 1}")
        axis.set_xticks(xs, ["base"] + [f"T{i + 1}" for i in range(t)])
        axis.set_xlabel("after training")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(result.method)
    axes[0].set_ylabel(f"accuracy ({accuracy})")
    axes[0].legend(fontsize=8)
    summary = axes[-1]
    width = 0.8 / max(1, len(results))
    for k, result in enumerate(results):
        m = result.metrics
        values = [m.acc, m.bwt or 0.0, m.fwt or 0.0, m.newest]
        summary.bar([x + k * width for x in range(4)], values, width, label=result.method)
    summary.set_xticks([x + width * (len(results) - 1) / 2 for x in range(4)],
                       ["ACC", "BWT", "FWT", "newest"])
    summary.axhline(0, color="grey", linewidth=0.8)
    summary.legend(fontsize=8)
    summary.set_title("GEM metrics")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    return json_path, text_path, png_path


# --- production: one update and its gate ------------------------------------------------------
@dataclass
class UpdateResult:
    """What ``continual_update`` made: ``model`` is the candidate (the object passed in,
    trained in place, plain), saved in ``model_dir``; ``buffer`` the reservoir with the new
    records added, saved as ``buffer_path``."""

    model: Any
    buffer: Reservoir[Record]
    model_dir: Path
    buffer_path: Path
    steps: int
    examples: int
    replayed: int
    history: list[dict[str, Any]]
    seconds: float


def load_buffer(path: Path, capacity: int, seed: int = 0) -> Reservoir[Record]:
    """The reservoir saved at ``path`` (``replay.jsonl`` of the run that made the serving
    model), or an empty one when there is no file yet. Raises ValueError for a malformed file
    or one whose capacity is not ``capacity`` (a reservoir's sample is uniform only for the
    capacity it was drawn with)."""
    path = Path(path)
    if not path.is_file():
        return Reservoir(capacity, seed)
    buffer = Reservoir.load(path, Record.from_json)
    if buffer.capacity != capacity:
        raise ValueError(f"{path} holds a reservoir of capacity {buffer.capacity}, but "
                         f"buffer_size is {capacity}")
    return buffer


def continual_update(config: ContinualConfig, model, tokenizer, new_items: Sequence[QAItem],
                     buffer: Reservoir[Record], retrieval: qa.Retrieval, run_dir: Path, *,
                     progress: loop.ProgressFn | None = None,
                     should_stop: Callable[[], bool] | None = None) -> UpdateResult:
    """One production update: train ``model`` (the serving generator, fp32) on ``new_items``
    with ``config.method`` — replaying from ``buffer`` and/or penalised towards the weights it
    starts from, the Fisher estimated on ``buffer`` — and return the candidate and the buffer
    with the new items added.

    ``buffer`` itself is not changed (a rejected candidate leaves the caller's reservoir as it
    was); the updated copy is saved as ``run_dir/replay.jsonl``, the candidate with
    ``loop.save_model`` in ``run_dir/model`` (meta kind "generator", ``trained_by``
    "continual", method and config), and the step history in ``run_dir/update.json``. A
    restarted update starts over from the same inputs: the previous buffer file and the
    serving model are never written. Hold out the new data the gate checks (``batch_task``)
    before calling. Raises ValueError for no new item, a buffer of another capacity than
    ``buffer_size``, or an item whose example cannot be built; ``loop.Cancelled`` when
    ``should_stop`` says so.
    """
    if not new_items:
        raise ValueError("no new item to train on: `new_items` is empty")
    if buffer.capacity != config.buffer_size:
        raise ValueError(f"the buffer's capacity is {buffer.capacity}, but buffer_size is "
                         f"{config.buffer_size}")
    started = time.perf_counter()
    run_dir = Path(run_dir)
    loop.seed_everything(config.seed)
    device, amp = loop.pick_device(config.device)
    model.to(device)
    loss_fn = _loss_fn(model, tokenizer, device, amp)
    examples = ExampleCache(_encoding(model, tokenizer), config)
    new_recs = records(new_items, retrieval, hits_needed(config))
    new = examples(new_recs)
    method = METHODS[config.method]
    memory = examples(buffer.items) if method.replay or method.penalty == "ewc" else []
    with only_last_layers(model, config.train_last_layers):
        penalty = make_penalty(config, model, loss_fn, memory)
        history = train_task(config, model, new, memory, loss_fn, penalty=penalty,
                             task=buffer.seen, progress=progress, should_stop=should_stop)
    updated = buffer.copy()
    updated.extend(new_recs)
    buffer_path = updated.save(run_dir / BUFFER_FILE, Record.to_json)
    data = loop.fingerprint([r.to_json() for r in new_recs])
    meta = {"kind": "generator", "trained_by": KIND, "method": config.method,
            "config": config.model_dump(mode="json"), "data": data, "step": len(history),
            "buffer": {"held": len(updated), "seen": updated.seen},
            "base_model": str(getattr(model.config, "name_or_path", "")), "metrics": {}}
    model_dir = loop.save_model(run_dir, plain_model(model), tokenizer, meta)
    replayed = sum(h["replayed"] for h in history)
    (run_dir / UPDATE_JSON).write_text(json.dumps(
        {"method": config.method, "config": config.model_dump(mode="json"), "data": data,
         "new_items": len(new_items), "examples": len(new), "memory": len(memory),
         "replayed": replayed, "history": history}, indent=1))
    loop.write_report(run_dir, {"method": config.method, "steps": len(history),
                                "history": {"train": history, "eval": []}},
                      f"continual update ({config.method}), {len(history)} steps",
                      metrics=(), loss_label="loss on the new data (nats / answer token)")
    return UpdateResult(model=model, buffer=updated, model_dir=model_dir,
                        buffer_path=buffer_path, steps=len(history), examples=len(new),
                        replayed=replayed, history=history,
                        seconds=round(time.perf_counter() - started, 3))


REGRESSION = "regression"  # accuracy on a frozen regression set (never trained on)
NEW_DATA = "new_data"  # accuracy on the held-out part of the new data


def gate_metrics(model, tokenizer, regression: Sequence[QAItem], new_data: Sequence[QAItem],
                 retrieval: qa.Retrieval, config: ContinualConfig) -> dict[str, float]:
    """``{REGRESSION: accuracy, NEW_DATA: accuracy}`` of ``model`` (answer-contains), the two
    sets answered the same way for the candidate and the serving model. Raises ValueError for
    an empty set."""
    if not regression or not new_data:
        raise ValueError(f"the gate needs both sets: {len(regression)} regression and "
                         f"{len(new_data)} new-data items")
    out = {}
    for name, items in ((REGRESSION, regression), (NEW_DATA, new_data)):
        out[name] = statistics.fmean(
            answer_accuracy(model, tokenizer, records(items, retrieval, config.top_k), config))
    return out


def gate(candidate_metrics: Mapping[str, float], serving_metrics: Mapping[str, float],
         tolerance: float) -> tuple[bool, str]:
    """Whether the candidate replaces the serving version, and why. Pure.

    Promote only if the ``REGRESSION`` metric drops by at most ``tolerance`` (absolute, in the
    metric's units) and the ``NEW_DATA`` metric is not lower than serving's; the reason names
    the deciding metric with both values. Raises ValueError for a tolerance that is not a
    finite number >= 0, a missing metric or a non-finite value.
    """
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"`tolerance` has to be a finite number >= 0, but is {tolerance!r}")
    for who, metrics in (("candidate", candidate_metrics), ("serving", serving_metrics)):
        for key in (REGRESSION, NEW_DATA):
            if key not in metrics:
                raise ValueError(f"{who} metrics lack {key!r}; they have {sorted(metrics)}")
            if not math.isfinite(metrics[key]):
                raise ValueError(f"{who} {key!r} is {metrics[key]!r}, not a finite number")
    cand_reg, serv_reg = candidate_metrics[REGRESSION], serving_metrics[REGRESSION]
    cand_new, serv_new = candidate_metrics[NEW_DATA], serving_metrics[NEW_DATA]
    eps = 1e-9  # the metrics are means of 0/1 scores; only rounding may separate equal ones
    if serv_reg - cand_reg > tolerance + eps:
        return False, (f"kept serving: {REGRESSION} dropped from {serv_reg:.4f} (serving) to "
                       f"{cand_reg:.4f} (candidate), {serv_reg - cand_reg:.4f} over the "
                       f"tolerance of {tolerance:.4f}")
    if cand_new < serv_new - eps:
        return False, (f"kept serving: {NEW_DATA} got worse, {cand_new:.4f} (candidate) < "
                       f"{serv_new:.4f} (serving)")
    return True, (f"promoted: {REGRESSION} {cand_reg:.4f} (candidate) vs {serv_reg:.4f} "
                  f"(serving), within the tolerance of {tolerance:.4f}; {NEW_DATA} "
                  f"{cand_new:.4f} vs {serv_new:.4f}")
