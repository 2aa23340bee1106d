"""Ranking distillation: the generator (the reader) teaches the two rankers — the query encoder
and the cross-encoder reranker — which passages help it answer.

For a training question x with gold answer y and its top ``n_passages`` retrieved passages
z_1..z_n, the reader reads each passage alone, in serving's prompt (one passage per prompt, as
``services/trainer/joint.py`` reads them), followed by y, and scores it by a log-likelihood
(``reader_signal``; one forward gives all three, ``reader_signals``):

    answer           ℓ_i = log p_reader(y | x, z_i)   (sum over y's tokens, no end token)
    question         ℓ_i = log p_reader(x | z_i)      (x as serving's prompt words it)
    question_answer  ℓ_i = log p_reader(x, y | z_i)   (both sums)

The target over the list is

    p(z_i | x, y) = softmax_i(ℓ_i / reader_temperature + w · s⁰_i)

with s⁰ the starting query encoder's logits and w = ``prior_weight``: w = 0 is the reader's
own distribution (Izacard & Grave 2021, "Distilling Knowledge from Reader to Retriever for
Question Answering"; with the answer signal, REPLUG's LM-supervised retrieval, Shi et al.
2023, eq. 4); w = 1 is Bayes' rule with the retriever as the prior — the posterior RAG
marginalises over (Lewis et al. 2020) and EMDR² trains towards (Sachan et al. 2021) — so the
reader reorders what the retriever ranks rather than replacing it. The question signal is how
well a passage explains the question (UPR, Sachan et al. 2022, "Improving Passage Retrieval
with Zero-Shot Question Generation"; ART, Sachan et al. 2023, trains a retriever from it).
The ranker's distribution over the same passages is trained towards the target with a loss
chosen by name from ``LOSSES`` (KL to the ranker's softmax by default). Izacard & Grave's
reader signal is the cross-attention of a fusion-in-decoder model; a decoder-only reader has
none over separate passages, hence likelihoods. Only question/answer pairs are needed: no
labelled positive document (``doc_ids`` are used by dev metrics only, when present).

The reader scores are computed once (``reader_loglik``) and kept in the run folder
(``cached_reader_scores``: ``reader_scores.json``, so a resumed job does not load the reader
again); the generator is not needed while the rankers train.

- query encoder (``distill_retriever``): p_ret(z_i | x) = softmax_i(q·d_i / temperature) with
  q the trained copy's embedding of x and d_i the *fixed* passage vectors of the index (as
  retriever mode "query": no re-index). Saved with ``loop.save_model``, meta kind="retriever",
  mode="query", reindex=false.
- reranker (``distill_reranker``): p_rr(z_i | x) = softmax_i(s_i), s_i the cross-encoder's logit
  for (x, z_i) (``services/ranker/rerank.py``). Listwise KL rather than pointwise BCE: a
  question with a long or rare answer has low likelihoods under every passage, so ℓ_i are not
  relevance probabilities across questions, only comparable within one; the listwise softmax
  uses exactly the within-question differences, which is all a ranking (and nDCG@10) depends
  on. Pointwise BCE needs a per-question calibration of the labels (here: the teacher's
  list softmax as the label, ``pointwise_bce``), which ties each passage's label to how many
  others the list holds.

One explicit loop (``_fit``) trains either ranker: schedule, clipping, dev evaluation, best by
dev metric (the last without dev questions), resumable state, cancellation between steps.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from services.evaluation import qa
from services.evaluation.retrieval import ndcg_at_k
from services.ranker.rerank import CrossEncoder
from services.trainer import loop
from services.trainer.generator import (
    IGNORE,
    Example,
    collate,
    encode_example,
    target_logprobs,
)
from services.trainer.retriever import dev_metrics
from shared.datasets import QAItem
from shared.files import write_text_atomic
from shared.models.encoder import Encoder
from shared.registry import META_FILE
from shared.schemas import Document, Hit, titled_text

log = logging.getLogger(__name__)

RETRIEVER_RUN = "distill_retriever"
RERANKER_RUN = "distill_reranker"
READER_FILE = "reader_scores.json"
ReaderSignal = Literal["answer", "question", "question_answer"]
SIGNALS: tuple[str, ...] = get_args(ReaderSignal)
RERANKER_DIR = "reranker"


# --- losses (pure): (student scores, teacher scores, mask) -> scalar ---------------------------
def listwise_kl(student: torch.Tensor, teacher: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over questions of KL(softmax(teacher) ‖ softmax(student)) over each question's
    passages (Izacard & Grave 2021, eq. 6; Shi et al. 2023, eq. 4).

    ``student``/``teacher`` (B, n) logits, temperatures already applied; ``mask`` (B, n) bool,
    False for padding columns (left out of both softmaxes). Returns a scalar >= 0; the inputs
    are not changed.
    """
    if mask is not None:
        student = student.masked_fill(~mask, float("-inf"))
        teacher = teacher.masked_fill(~mask, float("-inf"))
    log_q = torch.log_softmax(student.float(), dim=-1)
    log_p = torch.log_softmax(teacher.float(), dim=-1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.nan_to_num(terms, nan=0.0).sum(-1).mean()


def pointwise_bce(student: torch.Tensor, teacher: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of each passage's logit against the teacher's list softmax as its
    label (soft labels as in Hofstätter et al. 2020, "Improving Efficient Neural Ranking
    Models with Cross-Architecture Knowledge Distillation", who also compare pointwise and
    listwise targets). Mean over the unmasked passages. Same shapes as ``listwise_kl``."""
    if mask is None:
        mask = torch.ones_like(student, dtype=torch.bool)
    labels = torch.softmax(teacher.float().masked_fill(~mask, float("-inf")), dim=-1)
    labels = torch.nan_to_num(labels, nan=0.0)
    loss = F.binary_cross_entropy_with_logits(student.float(), labels, reduction="none")
    return (loss * mask.float()).sum() / mask.float().sum().clamp(min=1.0)


Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
LOSSES: dict[str, Loss] = {"kl": listwise_kl, "bce": pointwise_bce}


# --- the reader's scores ----------------------------------------------------------------------
@dataclass(frozen=True)
class ReaderList:
    """One question's passages (corpus doc ids, retrieval order) and the reader's answer
    log-likelihood given each (nats, <= 0)."""

    item_id: str
    question: str
    doc_ids: tuple[str, ...]
    loglik: tuple[float, ...]


def answer_target(item: QAItem) -> str:
    """The text whose likelihood scores a passage: the item's first gold answer."""
    return item.answers[0].strip()


def question_start(tokenizer, question: str, hit: Hit, max_passage_chars: int,
                   prompt: Sequence[int]) -> int:
    """Index in ``prompt`` (serving's prompt for ``question`` and ``hit`` alone) of the
    question's first token: where it parts from the same prompt with an empty question.
    Everything from there on is the question and the template's fixed end of the turn."""
    empty = qa.prompt_ids(tokenizer, "", [hit], max_passage_chars)
    shared = min(len(prompt), len(empty))
    start = next((k for k in range(shared) if prompt[k] != empty[k]), shared)
    if start >= len(prompt):
        raise ValueError(f"question {question!r} not found in its prompt")
    return start


def reader_signals(generator, tokenizer, items: Sequence[QAItem], retrieval: qa.Retrieval,
                   n_passages: int, *, max_passage_chars: int = qa.SERVING_MAX_PASSAGE_CHARS,
                   batch_size: int = 8, progress: bool = False) -> dict[str, list[ReaderList]]:
    """Every ``SIGNALS`` entry's lists from one forward per (question, passage): for every
    answerable item (the others are skipped: they have no answer to score), each of its
    first ``n_passages`` hits alone in serving's prompt, followed by the gold answer's tokens;
    "answer" sums the answer's log-probs, "question" the question's (from its first token to
    the end of the prompt: the template's end of turn is the same after every passage), and
    "question_answer" both. ``generator`` is a decoder-only or encoder-decoder LM, put in eval
    mode; an encoder-decoder reads the question in its encoder and gives "answer" only.
    ``progress`` shows a bar over the forwards. Raises ValueError for ``n_passages`` < 1 and
    for a retrieval without passages for a question."""
    if n_passages < 1:
        raise ValueError(f"`n_passages` has to be a positive integer, but is {n_passages}")
    usable = [i for i in items if i.answerable and i.answers and answer_target(i)]
    found = qa.retrieve(retrieval, [i.question for i in usable], n_passages)
    seq2seq = qa.is_seq2seq(generator)
    pad = qa.pad_id(tokenizer, qa.eos_ids(generator, tokenizer))
    generator.eval()
    device = next(generator.parameters()).device
    rows: list[tuple[int, int, int, Example]] = []  # (item, passage, answer tokens, example)
    for r, item in enumerate(usable):
        hits = found[item.question]
        if not hits:
            raise ValueError(f"item {item.id!r}: no passages retrieved")
        answer = list(tokenizer(answer_target(item), add_special_tokens=False)["input_ids"])
        for c, hit in enumerate(hits):
            prompt = qa.prompt_ids(tokenizer, item.question, [hit], max_passage_chars)
            # The answer's tokens only: what follows them (an end token, a citation marker,
            # the rest of a sentence) depends on the reader's answer format, not the passage.
            input_ids, labels = encode_example(prompt, answer, seq2seq=seq2seq)
            if not seq2seq:
                start = question_start(tokenizer, item.question, hit, max_passage_chars,
                                       prompt)
                labels = (IGNORE,) * start + input_ids[start:]
            rows.append((r, c, len(answer), Example(
                id=item.id, kind="reader", target="", passages=(hit.doc_id,),
                input_ids=input_ids, labels=labels)))
    scores: dict[tuple[int, int], tuple[float, float]] = {}  # (question, answer) sums
    # Similar lengths together: less padding per batch.
    rows.sort(key=lambda row: len(row[3].input_ids))
    for start in tqdm(range(0, len(rows), batch_size), desc="reader scores", unit="batch",
                      disable=not progress):
        chunk = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in
                 collate([e for *_, e in chunk], pad, seq2seq=seq2seq).items()}
        with torch.no_grad():
            lp, mask = target_logprobs(generator, batch, seq2seq=seq2seq)
        for (r, c, n_answer, _), row, n in zip(chunk, lp.tolist(), mask.sum(-1).tolist(),
                                               strict=True):
            n = int(n)
            scores[(r, c)] = (sum(row[:n - n_answer]), sum(row[n - n_answer:n]))
    parts = {"answer": lambda q, a: a, "question": lambda q, a: q,
             "question_answer": lambda q, a: q + a}
    signals = ("answer",) if seq2seq else SIGNALS
    return {signal: [
        ReaderList(item_id=item.id, question=item.question,
                   doc_ids=tuple(h.doc_id for h in found[item.question]),
                   loglik=tuple(round(parts[signal](*scores[(r, c)]), 5)
                                for c in range(len(found[item.question]))))
        for r, item in enumerate(usable)] for signal in signals}


def reader_loglik(generator, tokenizer, items: Sequence[QAItem], retrieval: qa.Retrieval,
                  n_passages: int, *, signal: str = "answer",
                  max_passage_chars: int = qa.SERVING_MAX_PASSAGE_CHARS,
                  batch_size: int = 8, progress: bool = False) -> list[ReaderList]:
    """``reader_signals``' lists for one ``signal``: ℓ_i = log p(answer | question, z_i)
    ("answer"), log p(question | z_i) ("question") or their sum, log p(question, answer | z_i)
    ("question_answer"). Raises ValueError for an unknown signal and for a question signal
    with an encoder-decoder reader (its question is encoder input, not scored)."""
    if signal not in SIGNALS:
        raise ValueError(f"unknown reader signal {signal!r}; known: {', '.join(SIGNALS)}")
    if signal != "answer" and qa.is_seq2seq(generator):
        raise ValueError(f"reader signal {signal!r} needs a decoder-only reader: an "
                         "encoder-decoder reads the question, it does not predict it")
    return reader_signals(generator, tokenizer, items, retrieval, n_passages,
                          max_passage_chars=max_passage_chars, batch_size=batch_size,
                          progress=progress)[signal]


def save_reader_scores(path: Path, lists: Sequence[ReaderList]) -> None:
    write_text_atomic(path, json.dumps([asdict(r) for r in lists]))


def load_reader_scores(path: Path) -> list[ReaderList]:
    """Lists written by ``save_reader_scores``; ValueError for a malformed file."""
    try:
        return [ReaderList(item_id=r["item_id"], question=r["question"],
                           doc_ids=tuple(r["doc_ids"]), loglik=tuple(r["loglik"]))
                for r in json.loads(Path(path).read_text())]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a reader scores file ({exc})") from None


def cached_reader_scores(run_dir: Path, compute: Callable[[], list[ReaderList]],
                         ) -> list[ReaderList]:
    """The reader scores ``run_dir`` holds (written by an earlier, interrupted run of the same
    job), else ``compute()``'s, written there first: a resumed job does not load the reader
    again."""
    path = Path(run_dir) / READER_FILE
    if path.is_file():
        return load_reader_scores(path)
    lists = compute()
    save_reader_scores(path, lists)
    return lists


# --- configuration ----------------------------------------------------------------------------
class RankDistillConfig(BaseModel):
    """A reader → ranker run (either ranker; saved with its state and model).

    ``n_passages``: passages per question the reader scores and the ranker is trained over.
    ``reader_signal`` (``reader_signals``): which tokens' log-likelihood scores a passage — the
    answer's (REPLUG, Atlas's perplexity distillation), the question's (UPR/ART: how well
    the passage explains the question) or both. ``reader_temperature`` divides the reader's
    log-likelihoods (1: the likelihoods themselves, REPLUG). ``prior_weight`` > 0 adds the
    starting query encoder's logits (query encoder only, see ``distill_retriever``). The
    defaults, question and 1, are the best on the packaged dev splits with the packaged
    reader (``bench/distill.py``, every signal with and without the prior): its answer
    likelihood follows how often a passage names the answer, not whether it is the one that
    answers (the Vilnius article outscores the Lithuania article for Lithuania's capital), and
    taught alone it lowers recall.
    ``temperature`` divides the query encoder's cosine similarities (0.05 as in the
    supervised retriever; the reranker's logits carry their own scale and use none).
    ``eval_steps``: dev evaluation period (retriever: dense MRR@10 on dev items with
    ``doc_ids``; reranker: nDCG@10 on dev candidate lists with ``doc_ids``), the best kept.
    """

    model_config = ConfigDict(extra="forbid")

    loss: str = "kl"
    n_passages: int = Field(8, ge=2, le=200)
    reader_signal: ReaderSignal = "question"
    reader_temperature: float = Field(1.0, gt=0, le=100)
    prior_weight: float = Field(1.0, ge=0, le=100)
    temperature: float = Field(0.05, gt=0, le=10)
    lr: float = Field(2e-5, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0, le=1)
    schedule: loop.Schedule = "linear"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1, le=4096)
    epochs: int = Field(2, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    max_passage_chars: int = Field(qa.SERVING_MAX_PASSAGE_CHARS, ge=50)
    reader_batch_size: int = Field(8, ge=1, le=4096)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in LOSSES:
            raise ValueError(f"unknown ranking distillation loss {value!r}; known: "
                             f"{', '.join(LOSSES)}")
        return value

    @field_validator("reader_temperature", "prior_weight", "temperature", "lr", "grad_clip")
    @classmethod
    def _finite(cls, value: float, info) -> float:
        if not math.isfinite(value):
            raise ValueError(f"`{info.field_name}` has to be a finite number, but is {value}")
        return value


@dataclass
class RankDistillResult:
    """What a run made: ``model_dir`` (the ranker's saved folder), ``kl_start``/``kl_end`` the
    mean listwise KL to the reader over the training lists before and after (from the model
    the run returns), ``metrics`` the best dev metrics ({} without dev data), ``losses`` every
    step's loss (resumed runs included)."""

    model_dir: Path
    run_kind: str
    steps: int
    best_step: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    losses: list[float]
    kl_start: float
    kl_end: float
    questions: int
    resumed_from: int | None
    elapsed_s: float
    meta: dict[str, Any] = field(default_factory=dict)


def _tensors(lists: Sequence[ReaderList], rows: Sequence[int], config: RankDistillConfig,
             prior: Sequence[Sequence[float]] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher logits (B, n) = loglik / reader_temperature [+ prior_weight · prior], mask
    (B, n)) for ``rows``."""
    width = max(len(lists[r].loglik) for r in rows)
    teacher = torch.zeros((len(rows), width))
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(lists[r].loglik)
        teacher[b, :n] = torch.tensor(lists[r].loglik) / config.reader_temperature
        if prior is not None:
            teacher[b, :n] += config.prior_weight * torch.tensor(prior[r])
        mask[b, :n] = True
    return teacher, mask


def _order(seed: int, epoch: int, n: int) -> list[int]:
    return np.random.default_rng([seed, 2, epoch]).permutation(n).tolist()


@dataclass(frozen=True)
class _Store:
    """Where a ranker is saved: ``save(step, metrics, history)`` writes it (with its meta) into
    ``folder``; ``load()`` copies the saved weights back into the trained model."""

    folder: Path
    save: Callable[[int, dict[str, float], list[dict[str, float]]], None]
    load: Callable[[], None]


def _fit(run_kind: str, config: RankDistillConfig, model: torch.nn.Module,
         lists: Sequence[ReaderList],
         student_scores: Callable[[Sequence[ReaderList]], torch.Tensor],
         evaluate: Callable[[], dict[str, float]] | None, best_metric: str, store: _Store,
         run_dir: Path, data: str, progress: loop.ProgressFn | None,
         should_stop: Callable[[], bool] | None, resume: bool,
         prior: Sequence[Sequence[float]] | None = None) -> RankDistillResult:
    """The loop both rankers share. Reads top to bottom: set-up, resume, steps, the result.

    ``model`` holds the trained weights; ``student_scores`` gives (B, n) logits for a batch of
    lists (padding columns are masked by the loss); ``evaluate`` (None: no dev data) returns
    dev metrics, the best by ``best_metric`` is saved, else the last step is. ``prior``:
    per list, the starting ranker's logits over its passages (the target is then the
    posterior, ``_tensors``)."""
    loss_fn = LOSSES[config.loss]
    device = next(model.parameters()).device
    per_epoch = math.ceil(len(lists) / config.batch_size)
    steps = config.max_steps or per_epoch * config.epochs
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    # No weight decay on biases and LayerNorm gains (as in BERT and nanoGPT).
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)

    def mean_kl() -> float:
        """Mean listwise KL to the target over every training list (eval mode, no
        dropout)."""
        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(lists), config.batch_size):
                rows = list(range(start, min(start + config.batch_size, len(lists))))
                teacher, mask = _tensors(lists, rows, config, prior)
                scores = student_scores([lists[r] for r in rows]).float().cpu()
                total += float(listwise_kl(scores, teacher, mask)) * len(rows)
        model.train()
        return total / len(lists)

    step, best, best_step, history, losses, resumed_from = 0, None, 0, [], [], None
    clock = loop.Clock()
    state = loop.load_state(run_dir) if resume else None
    if state is not None:
        loop.check_resumable(state, run_kind, config, data, run_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loop.set_rng_state(state["rng"])
        step, best, best_step = state["step"], state["best"], state["best_step"]
        history, losses, kl_start = state["history"], state["losses"], state["kl_start"]
        clock = loop.Clock(state["elapsed_s"])
        resumed_from = step
        log.info("%s: resuming %s at step %d of %d", run_kind, run_dir, step, steps)
    else:
        kl_start = mean_kl()
        if evaluate is not None:
            # The starting point is a candidate too: a run that only hurts keeps it.
            best = evaluate()
            model.train()
            history.append({"step": 0, **best})
            store.save(0, best, history)

    def snapshot() -> dict[str, Any]:
        return {"kind": run_kind, "config": config.model_dump(mode="json"), "data": data,
                "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": loop.rng_state(), "best": best, "best_step": best_step,
                "history": history, "losses": losses, "kl_start": kl_start,
                "elapsed_s": clock.elapsed()}

    report = loop.Reporter(progress, run_kind, steps, clock)
    model.train()
    params = decay + no_decay  # what the optimiser steps
    nonfinite = loop.NonFinite()
    while step < steps:
        loop.stop_if_asked(should_stop, run_dir, snapshot)
        # this config has no `min_lr_ratio`: get_lr's default floor
        lr = loop.get_lr(step, lr=config.lr, warmup_steps=config.warmup_steps,
                         total_steps=steps, schedule=config.schedule)
        loop.set_lr(optimizer, lr)
        epoch, index = divmod(step, per_epoch)
        rows = _order(config.seed, epoch, len(lists))[index * config.batch_size:
                                                     (index + 1) * config.batch_size]
        teacher, mask = _tensors(lists, rows, config, prior)
        scores = student_scores([lists[r] for r in rows])
        loss = loss_fn(scores.float(), teacher.to(device), mask.to(device))
        loss.backward()
        loss_value = float(loss.detach())
        stepped = loop.optimizer_step([optimizer], [params], config.grad_clip, loss_value)
        nonfinite.count(stepped, step + 1, loss_value)
        step += 1
        losses.append(loss_value)

        metrics: dict[str, float] = {}
        if evaluate is not None and (step % config.eval_steps == 0 or step == steps):
            metrics = evaluate()
            model.train()
            history.append({"step": step, **metrics})
            log.info("%s: step %d/%d loss %.4f dev %s", run_kind, step, steps, losses[-1],
                     metrics)
            if best is None or metrics[best_metric] > best[best_metric]:
                best, best_step = metrics, step
                store.save(step, metrics, history)
        if evaluate is None and step == steps:
            best_step = step
            store.save(step, {}, history)
        report(step, losses[-1], lr, metrics)
        if step % config.save_steps == 0 or step == steps:
            loop.save_state(run_dir, snapshot())

    if best_step != step:  # hand the best weights back, as saved
        store.load()
    kl_end = mean_kl()
    model.eval()
    loop.write_report(run_dir, {
        "run": run_kind, "steps": step, "best_step": best_step, "metrics": dict(best or {}),
        "kl_start": kl_start, "kl_end": kl_end, "config": config.model_dump(mode="json"),
        "data": data,
        "history": {"train": [{"step": i + 1, "loss": x} for i, x in enumerate(losses)],
                    "eval": history}},
        f"{run_kind}, best step {best_step}",
        metrics=tuple(dict.fromkeys(k for row in history for k in row if k != "step")),
        loss_label="listwise KL to the reader")
    return RankDistillResult(
        model_dir=store.folder, run_kind=run_kind, steps=step, best_step=best_step,
        metrics=dict(best or {}), history=list(history), losses=list(losses),
        kl_start=round(kl_start, 5), kl_end=round(kl_end, 5), questions=len(lists),
        resumed_from=resumed_from, elapsed_s=round(clock.elapsed(), 3),
        meta=loop.read_meta(store.folder))


def _check_lists(lists: Sequence[ReaderList], known: Mapping[str, Any]) -> None:
    if not lists:
        raise ValueError("no reader-scored question: give answerable training questions")
    for r in lists:
        if len(r.doc_ids) != len(r.loglik) or not r.doc_ids:
            raise ValueError(f"item {r.item_id!r}: {len(r.doc_ids)} passages but "
                             f"{len(r.loglik)} reader scores")
        missing = [d for d in r.doc_ids if d not in known]
        if missing:
            raise ValueError(f"item {r.item_id!r}: passage {missing[0]!r} is not in the corpus")


def _padded(values: Sequence[Sequence[Any]], fill: Any) -> list[list[Any]]:
    width = max(len(v) for v in values)
    return [list(v) + [fill] * (width - len(v)) for v in values]


# --- reader -> query encoder ------------------------------------------------------------------
def distill_retriever(config: RankDistillConfig, encoder: Encoder, lists: Sequence[ReaderList],
                      corpus: Sequence[Document], doc_vectors: np.ndarray, run_dir: Path, *,
                      dev_items: Sequence[QAItem] = (),
                      progress: loop.ProgressFn | None = None,
                      should_stop: Callable[[], bool] | None = None,
                      resume: bool = True) -> RankDistillResult:
    """Train a copy of ``encoder`` as a query encoder towards the reader's passage
    distributions ``lists`` (``reader_loglik``), against the fixed ``doc_vectors`` (rows of
    ``corpus``, unit rows: the index serving keeps). The caller's encoder is not changed.

    Saves ``run_dir/model`` (``loop.save_model``; meta kind="retriever", mode="query",
    reindex=false, objective="reader_distillation"): the best by dev MRR@10 over the
    ``dev_items`` that have ``doc_ids`` (the starting encoder included), else the last.
    With ``prior_weight`` w > 0 the target over a list is the posterior
    softmax(ℓ / reader_temperature + w · s⁰), s⁰ the starting encoder's logits (fixed): the
    reader reorders what the retriever already ranks rather than replacing it.
    Resumes a state of the same config and data. Raises ValueError for no list, a passage not
    in ``corpus``, ``doc_vectors`` of the wrong shape; ``loop.Cancelled`` on cancel.
    """
    run_dir = Path(run_dir)
    row_of = {d.doc_id: i for i, d in enumerate(corpus)}
    _check_lists(lists, row_of)
    if doc_vectors.shape != (len(corpus), encoder.dim):
        raise ValueError(f"`doc_vectors` has shape {doc_vectors.shape}, expected "
                         f"{(len(corpus), encoder.dim)}")
    loop.seed_everything(config.seed)
    device, _ = loop.pick_device(config.device)
    model = copy.deepcopy(encoder.model).float().to(device).train()
    trained = Encoder(encoder.tokenizer, model, encoder.batch_size, encoder.max_length,
                      encoder.pooling)
    index = torch.from_numpy(np.ascontiguousarray(doc_vectors, dtype=np.float32)).to(device)
    judged = [i for i in dev_items if i.doc_ids]
    data = loop.fingerprint([asdict(r) for r in lists]
                            + [{"vectors": float(doc_vectors.sum()), "docs": len(corpus),
                                "dev": [i.id for i in judged],
                                "base": str(getattr(encoder.model.config, "name_or_path", ""))}])

    def student_scores(batch: Sequence[ReaderList]) -> torch.Tensor:
        queries = trained.embed([r.question for r in batch])
        rows = torch.tensor(_padded([[row_of[d] for d in r.doc_ids] for r in batch], 0),
                            device=device)
        # Only the query side carries gradients: the passage vectors are the index's.
        return (queries[:, None, :] * index[rows]).sum(-1) / config.temperature

    prior: list[list[float]] | None = None
    if config.prior_weight:  # the starting encoder's logits, fixed: p(z | x) of the posterior
        model.eval()
        prior = []
        with torch.no_grad():
            for start in range(0, len(lists), config.batch_size):
                batch = lists[start:start + config.batch_size]
                logits = student_scores(batch).float().cpu().tolist()
                prior += [row[:len(r.loglik)] for row, r in zip(logits, batch, strict=True)]

    def evaluate() -> dict[str, float]:
        model.eval()
        return dev_metrics(trained, doc_vectors, corpus, judged)

    def save(step: int, metrics: dict[str, float], history: list[dict[str, float]]) -> None:
        loop.save_model(run_dir, model, encoder.tokenizer, {
            "kind": "retriever", "objective": "reader_distillation", "mode": "query",
            "reindex": False, "config": config.model_dump(mode="json"), "data": data,
            "step": step, "metrics": {"best": metrics, "history": history},
            "base_model": str(getattr(encoder.model.config, "name_or_path", "")),
            "pooling": encoder.pooling, "max_length": encoder.max_length,
            "questions": len(lists),
            "documents": "embedded by the base encoder, fixed during training"})

    def load() -> None:
        from services.trainer.generator import load_weights

        load_weights(model, run_dir / loop.MODEL_DIR)

    store = _Store(run_dir / loop.MODEL_DIR, save, load)
    return _fit(RETRIEVER_RUN, config, model, lists, student_scores,
                evaluate if judged else None, "mrr@10", store, run_dir, data, progress,
                should_stop, resume, prior)


# --- reader -> cross-encoder reranker ---------------------------------------------------------
def rerank_ndcg(reranker: CrossEncoder, items: Sequence[QAItem],
                candidates: Mapping[str, Sequence[Hit]], k: int = 10) -> dict[str, float]:
    """Mean nDCG@k over the ``items`` with ``doc_ids`` (binary relevance) of their
    ``candidates`` as given ("fused") and reordered by ``reranker`` ("reranked"), with the
    number of questions. Items without candidates count 0 in both."""
    from services.ranker.rerank import rerank

    judged = [i for i in items if i.doc_ids]
    if not judged:
        return {}
    fused, reranked = 0.0, 0.0
    for item in judged:
        hits = list(candidates.get(item.question, ()))
        if not hits:
            continue
        qrels = dict.fromkeys(item.doc_ids, 1)
        fused += ndcg_at_k([h.doc_id for h in hits], qrels, k)
        order = rerank(reranker, item.question, hits, top_n=len(hits))
        reranked += ndcg_at_k([h.doc_id for h in order], qrels, k)
    return {f"ndcg@{k}": reranked / len(judged), f"ndcg@{k}_fused": fused / len(judged),
            "questions": float(len(judged))}


def distill_reranker(config: RankDistillConfig, reranker: CrossEncoder,
                     lists: Sequence[ReaderList], corpus: Sequence[Document], run_dir: Path, *,
                     dev_items: Sequence[QAItem] = (),
                     dev_candidates: Mapping[str, Sequence[Hit]] | None = None,
                     progress: loop.ProgressFn | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     resume: bool = True) -> RankDistillResult:
    """Train ``reranker`` (in place) so that its softmax over each list's passages matches the
    reader's (``config.loss``; listwise KL by default, see the module docstring).

    Saves ``run_dir/reranker`` (``CrossEncoder.save`` plus ``ragtune.json``, kind="reranker";
    serving loads it through ``rerank.model``): the best by dev nDCG@10 of ``dev_candidates``
    reordered, over the ``dev_items`` with ``doc_ids`` (the starting reranker included), else
    the last. On return ``reranker`` holds the saved weights. Resumes a state of the same
    config and data. Raises ValueError for no list or a passage not in ``corpus``;
    ``loop.Cancelled`` on cancel. The target is the reader's own distribution: a new
    reranker's head is random, with no prior ranking to keep, so ``prior_weight`` (the query
    encoder's) is not used, and setting it above 0 for a reranker is refused.
    """
    from services.ranker.rerank import HEAD_FILE

    if "prior_weight" in config.model_fields_set and config.prior_weight:
        raise ValueError("`prior_weight` is for the query encoder: a new reranker has no "
                         "prior ranking to keep; use 0")
    run_dir = Path(run_dir)
    texts = {d.doc_id: titled_text(d.title, d.text) for d in corpus}
    _check_lists(lists, texts)
    loop.seed_everything(config.seed)
    device, _ = loop.pick_device(config.device)
    reranker.to(device).train()
    judged = [i for i in dev_items if i.doc_ids and dev_candidates
              and dev_candidates.get(i.question)]
    data = loop.fingerprint([asdict(r) for r in lists]
                            + [{"texts": loop.fingerprint(texts[d] for r in lists
                                                          for d in r.doc_ids),
                                "dev": [i.id for i in judged], "max_length":
                                reranker.max_length}])

    def student_scores(batch: Sequence[ReaderList]) -> torch.Tensor:
        questions = [r.question for r in batch for _ in r.doc_ids]
        passages = [texts[d] for r in batch for d in r.doc_ids]
        flat = reranker(questions, passages)
        width = max(len(r.doc_ids) for r in batch)
        out = flat.new_zeros((len(batch), width))
        at = 0
        for b, r in enumerate(batch):
            out[b, :len(r.doc_ids)] = flat[at:at + len(r.doc_ids)]
            at += len(r.doc_ids)
        return out

    def evaluate() -> dict[str, float]:
        return rerank_ndcg(reranker, judged, dev_candidates or {})

    folder = run_dir / RERANKER_DIR

    def save(step: int, metrics: dict[str, float], history: list[dict[str, float]]) -> None:
        tmp = run_dir / f".{RERANKER_DIR}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        reranker.save(tmp)
        (tmp / META_FILE).write_text(json.dumps({
            "kind": "reranker", "objective": "reader_distillation",
            "config": config.model_dump(mode="json"), "data": data, "step": step,
            "metrics": {"best": metrics, "history": history}, "questions": len(lists),
            "max_length": reranker.max_length}, indent=2, default=str))
        old = run_dir / f".{RERANKER_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)

    def load() -> None:
        from services.trainer.generator import load_weights

        load_weights(reranker.encoder, folder)
        reranker.head.load_state_dict(torch.load(folder / HEAD_FILE, weights_only=True))

    store = _Store(folder, save, load)
    return _fit(RERANKER_RUN, config, reranker, lists, student_scores,
                evaluate if judged else None, "ndcg@10", store, run_dir, data, progress,
                should_stop, resume)
