"""Retriever fine-tuning: a bi-encoder trained on the user's questions and documents.

Two modes (``RetrieverTrainConfig.mode``):

- ``"query"``: only a copy of the encoder that embeds *questions* is trained; documents keep
  the vectors the original encoder gave them, so the dense index needs no rebuild. The
  passage side of every step is read from those frozen corpus vectors. The saved model is a
  query encoder (``ragtune.json``: ``"reindex": false``).
- ``"both"``: one encoder with shared weights embeds questions and passages (DPR shares
  nothing; sentence-transformers' MultipleNegativesRankingLoss setups share everything, which
  suits a small model and little data); the index must be rebuilt with the result
  (``"reindex": true``).

Each step scores a batch of questions against their positive passages, the other questions'
positives (in-batch negatives) and mined hard negatives (``services.trainer.mining``), with a
contrastive loss chosen by name from ``LOSSES``, plus ``anchor`` times ``anchor_penalty``: how
far the trained model's embeddings of the step's texts moved from the starting encoder's, so
that questions unlike the training ones keep the neighbours they had. ``pretrain_retriever``
is the unsupervised warm-up on the corpus alone: two random crops of one document are a
positive pair (Izacard et al. 2021, Contriever).

The loop is explicit (``_fit``), nanoGPT-style: schedule, periodic dev evaluation (dense
recall@1/5, MRR@10, nDCG@10), the best model by dev MRR@10 saved with ``loop.save_model``,
resumable state every ``save_steps``, cancellation between steps. A run folder resumes only
the run that made it: same config, same data, or a ValueError.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from services.evaluation.retrieval import corpus_embeddings, dense_search, score_ranking
from services.trainer import loop
from services.trainer.mining import NEGATIVE_SOURCES, candidate_rankings, mine_hard_negatives
from shared.datasets import QAItem
from shared.models.encoder import Encoder
from shared.schemas import Document, titled_text

log = logging.getLogger(__name__)

KIND = "retriever"  # the saved model's kind, whichever run made it
# A run's kind (its state and its progress reports): a resume never mixes the two objectives.
SUPERVISED_RUN = "retriever"
PRETRAIN_RUN = "retriever-pretrain"
MODES: tuple[str, ...] = ("query", "both")
# The anchor penalty's weight when a config leaves it out (RetrieverTrainConfig.anchor).
ANCHOR_BY_MODE: dict[str, float] = {"query": 1.0, "both": 0.0}
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")
# Dev metrics reported at each evaluation; the best model is chosen by BEST_METRIC.
DEV_METRICS: tuple[str, ...] = ("recall@1", "recall@5", "mrr@10", "ndcg@10")
BEST_METRIC = "mrr@10"


# --- losses: (queries, passages, targets, temperature, exclude) -> scalar -------------------
def _scores(queries: torch.Tensor, passages: torch.Tensor, temperature: float,
            exclude: torch.Tensor | None) -> torch.Tensor:
    scores = queries @ passages.T / temperature
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return scores


def info_nce(queries: torch.Tensor, passages: torch.Tensor, targets: torch.Tensor,
             temperature: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over every passage of the batch: mean over queries of
    -log softmax(q·p / temperature)[target] (Oord et al. 2018, CPC; Karpukhin et al. 2020,
    DPR eq. 2 with in-batch and hard negatives).

    ``queries`` (B, d) and ``passages`` (N, d) are unit vectors; ``targets`` (B,) long, the
    column of each query's positive; ``exclude`` (B, N) bool marks columns to leave out of a
    query's softmax (another copy of one of its positives: a false negative). Never the
    target. Returns a scalar; the inputs are not changed.
    """
    return F.cross_entropy(_scores(queries, passages, temperature, exclude), targets)


def symmetric_info_nce(queries: torch.Tensor, passages: torch.Tensor, targets: torch.Tensor,
                       temperature: float, exclude: torch.Tensor | None = None,
                       ) -> torch.Tensor:
    """Mean of query→passage InfoNCE and passage→query InfoNCE over the first B passages
    (Radford et al. 2021, CLIP; Chen et al. 2020, SimCLR's NT-Xent is the same idea): for two
    views of one text, where neither side is "the question". Needs ``targets`` == arange(B)
    (each query's positive in its own column; ValueError otherwise); hard negatives after
    the first B columns count in the first direction only.
    """
    b = queries.shape[0]
    if not torch.equal(targets.cpu(), torch.arange(b)):
        raise ValueError("symmetric_info_nce needs query i's positive in column i "
                         "(targets == arange(B))")
    scores = _scores(queries, passages, temperature, exclude)
    backward = scores[:, :b].T
    return 0.5 * (F.cross_entropy(scores, targets) + F.cross_entropy(backward, targets))


def anchor_penalty(trained: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(trained_i, start_i) over rows: (n, d) unit vectors of the same texts by
    the model in training and by the encoder it started from (no gradient). 0 when nothing
    moved, at most 2.

    The contrastive loss only asks the training questions to rank their positives first; a
    question shape that dominates the training data (113 of 114 packaged capital questions
    are grounded by the country's article) then pulls every question of that shape the same
    way, also those whose answer lies elsewhere. Keeping the embeddings near where they
    started is the output-preserving guard of Learning without Forgetting (Li & Hoiem 2016),
    with the embedding as the output.
    """
    return (1 - (trained * start).sum(dim=-1)).mean()


Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor | None],
                torch.Tensor]

LOSSES: dict[str, Loss] = {
    "infonce": info_nce,
    "symmetric_infonce": symmetric_info_nce,
}


# --- configuration ----------------------------------------------------------------------------
class RetrieverTrainConfig(BaseModel):
    """What a retriever run is; saved with its state and its model. Defaults suit MiniLM.

    ``epochs`` passes over the training questions, cut at ``max_steps`` when set.
    ``hard_negatives`` mined passages are added per question and step, drawn from the best
    ``negative_depth`` that ``negatives`` ("bm25", "dense", "both") found. ``eval_steps``:
    dev evaluation period; ``save_steps``: resume-state period. ``crop_min``/``crop_max``:
    share of a document's words in each crop of ``pretrain_retriever`` (Contriever: 0.1–0.5).
    ``anchor``: weight of ``anchor_penalty`` in the loss (0: none); left out, ANCHOR_BY_MODE
    chooses it. Both defaults are what dev preferred on the packaged data (bench/RESULTS.md):
    in "query" mode 1.0 scored higher on dev in 4 of 5 seeds (and tied in one) and kept the
    capitals' test recall@1 where the loss alone lowered it; in "both" mode the anchored run
    scored lower on dev than the plain one, so there it is 0.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: str = "query"
    loss: str = "infonce"
    temperature: float = 0.05  # sentence-transformers' MNRL scale 20 = 1/0.05
    lr: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int = 0
    schedule: str = "linear"
    grad_clip: float = 1.0
    hard_negatives: int = 2
    negatives: str = "both"
    negative_depth: int = 10
    eval_steps: int = 50
    save_steps: int = 50
    seed: int = 0
    max_length: int = 256
    crop_min: float = 0.1
    crop_max: float = 0.5
    anchor: float = ANCHOR_BY_MODE["query"]  # filled in by mode: see _default_anchor

    @model_validator(mode="before")
    @classmethod
    def _default_anchor(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("anchor") is None:
            mode = data.get("mode", cls.model_fields["mode"].default)
            if mode in ANCHOR_BY_MODE:  # an unknown mode is refused by name below
                data = {**data, "anchor": ANCHOR_BY_MODE[mode]}
        return data

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        return _known("mode", v, MODES)

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        return _known("loss", v, tuple(LOSSES))

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        return _known("schedule", v, SCHEDULES)

    @field_validator("negatives")
    @classmethod
    def _negatives(cls, v: str) -> str:
        return _known("negatives", v, NEGATIVE_SOURCES)

    @field_validator("temperature", "lr", "grad_clip")
    @classmethod
    def _positive_number(cls, v: float, info) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"`{info.field_name}` has to be a positive number, but is {v}")
        return v

    @field_validator("weight_decay", "anchor")
    @classmethod
    def _non_negative_number(cls, v: float, info) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"`{info.field_name}` has to be a number >= 0, but is {v}")
        return v

    @field_validator("batch_size", "epochs", "eval_steps", "save_steps")
    @classmethod
    def _positive_int(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"`{info.field_name}` has to be a strictly positive integer, "
                             f"but is {v}")
        return v

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"`max_steps` has to be None or a strictly positive integer, "
                             f"but is {v}")
        return v

    @field_validator("warmup_steps", "hard_negatives", "negative_depth", "seed")
    @classmethod
    def _non_negative_int(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"`{info.field_name}` has to be an integer >= 0, but is {v}")
        return v

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if v < 8:
            raise ValueError(f"`max_length` has to be at least 8 tokens, but is {v}")
        return v

    @field_validator("crop_min", "crop_max")
    @classmethod
    def _share(cls, v: float, info) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"`{info.field_name}` has to be in (0, 1], but is {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RetrieverTrainConfig:
        if self.hard_negatives > self.negative_depth:
            raise ValueError(f"`hard_negatives` ({self.hard_negatives}) has to be at most "
                             f"`negative_depth` ({self.negative_depth})")
        if self.crop_min > self.crop_max:
            raise ValueError(f"`crop_min` ({self.crop_min}) has to be at most `crop_max` "
                             f"({self.crop_max})")
        return self


def _known(name: str, value: str, known: Sequence[str]) -> str:
    if value not in known:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
    return value


@dataclass(frozen=True)
class RetrieverResult:
    """What a run made (``run_kind``: SUPERVISED_RUN or PRETRAIN_RUN). ``model_dir`` holds the
    best model (by dev MRR@10, or the last one
    without dev questions) and its ``ragtune.json``; ``metrics`` its dev metrics; ``history``
    every evaluation ({"step", metric: value}); ``losses`` the training loss of every step
    (resumed runs included); ``reindex`` whether documents must be embedded again;
    ``examples`` the usable training questions (documents for pre-training), ``skipped`` the
    questions left out, ``examples_seen`` the questions this call trained on (for
    throughput; a resumed call counts only its own steps)."""

    model_dir: Path
    run_kind: str
    mode: str
    reindex: bool
    steps: int
    best_step: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    losses: list[float]
    examples: int
    skipped: int
    elapsed_s: float
    examples_seen: int = 0
    data_fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


# --- dev evaluation ---------------------------------------------------------------------------
def dev_metrics(query_encoder: Encoder, doc_vectors: np.ndarray, corpus: Sequence[Document],
                items: Sequence[QAItem]) -> dict[str, float]:
    """Mean DEV_METRICS of exact dense search: questions embedded by ``query_encoder``,
    documents by ``doc_vectors`` (rows = ``corpus``). Items without ``doc_ids`` are left out;
    {} when none is left. Metrics as ``services.evaluation.retrieval`` defines them."""
    judged = [item for item in items if item.doc_ids]
    if not judged:
        return {}
    hits = dense_search(query_encoder.encode([item.question for item in judged]), doc_vectors,
                        corpus, 10)
    totals = dict.fromkeys(DEV_METRICS, 0.0)
    for item, row in zip(judged, hits, strict=True):
        scores = score_ranking([h.doc_id for h in row], dict.fromkeys(item.doc_ids, 1))
        for name in DEV_METRICS:
            totals[name] += scores[name]
    return {name: total / len(judged) for name, total in totals.items()}


# --- batches ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One step's texts. Query i's positive is ``passages[targets[i]]``; ``rows`` are the
    passages' corpus rows (None for texts that are not whole documents, e.g. crops);
    ``exclude[i][c]`` leaves column c out of query i's softmax."""

    queries: list[str]
    passages: list[str]
    targets: list[int]
    rows: list[int] | None = None
    exclude: list[list[bool]] | None = None


@dataclass(frozen=True)
class Example:
    """A training question: its corpus rows that answer it and its mined negative rows."""

    item_id: str
    question: str
    positives: tuple[int, ...]
    negatives: tuple[int, ...]


def training_examples(items: Sequence[QAItem], corpus: Sequence[Document],
                      ) -> tuple[list[Example], int]:
    """(examples, skipped): one Example per item with at least one ``doc_id`` in ``corpus``;
    the others (unanswerable items, evidence outside the corpus) are counted as skipped.
    Negatives are empty here (see ``mine_hard_negatives``)."""
    row_of = {doc.doc_id: i for i, doc in enumerate(corpus)}
    examples = []
    for item in items:
        rows = tuple(row_of[d] for d in item.doc_ids if d in row_of)
        if rows:
            examples.append(Example(item.id, item.question, rows, ()))
    return examples, len(items) - len(examples)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed
    run sees the batches an uninterrupted one would."""
    return np.random.default_rng([seed, 0, epoch]).permutation(n)


def step_rng(seed: int, step: int) -> np.random.Generator:
    """Random numbers of one step (which positive, which negatives, which crops)."""
    return np.random.default_rng([seed, 1, step])


def question_batch(examples: Sequence[Example], texts: Sequence[str], hard_negatives: int,
                   rng: np.random.Generator) -> Batch:
    """A supervised batch: each question with one of its positives (column i = question i)
    and ``hard_negatives`` of its negatives drawn without replacement; negatives are shared
    by every question (DPR), each document once. A column holding a document that is one of
    question i's positives, but is not its target, is excluded for question i."""
    rows = [int(ex.positives[rng.integers(len(ex.positives))]) for ex in examples]
    seen = set(rows)
    for ex in examples:
        k = min(hard_negatives, len(ex.negatives))
        for row in rng.choice(np.asarray(ex.negatives, dtype=np.int64), size=k, replace=False):
            if int(row) not in seen:
                seen.add(int(row))
                rows.append(int(row))
    exclude = [[c != i and row in ex.positives for c, row in enumerate(rows)]
               for i, ex in enumerate(examples)]
    return Batch(queries=[ex.question for ex in examples], passages=[texts[r] for r in rows],
                 targets=list(range(len(examples))), rows=rows,
                 exclude=exclude if any(map(any, exclude)) else None)


def random_crop(words: Sequence[str], rng: np.random.Generator, min_share: float,
                max_share: float) -> str:
    """A contiguous span of ``words`` holding a share in [min_share, max_share] of them (at
    least one word), at a random start, joined by spaces (Izacard et al. 2021: independent
    cropping makes better positive pairs than inverse cloze)."""
    if not words:
        return ""
    share = rng.uniform(min_share, max_share)
    length = min(len(words), max(1, round(share * len(words))))
    start = int(rng.integers(len(words) - length + 1))
    return " ".join(words[start:start + length])


def crop_batch(docs: Sequence[Sequence[str]], rng: np.random.Generator, min_share: float,
               max_share: float) -> Batch:
    """Two independent crops of each document: query i and passage i are a positive pair."""
    queries = [random_crop(words, rng, min_share, max_share) for words in docs]
    passages = [random_crop(words, rng, min_share, max_share) for words in docs]
    return Batch(queries=queries, passages=passages, targets=list(range(len(docs))))


# --- the runs ---------------------------------------------------------------------------------
def train_retriever(config: RetrieverTrainConfig, encoder: Encoder, train_items: Sequence[QAItem],
                    dev_items: Sequence[QAItem], corpus: Sequence[Document], run_dir: Path,
                    progress: loop.ProgressFn | None = None,
                    should_stop: Callable[[], bool] | None = None, *,
                    doc_vectors: np.ndarray | None = None,
                    cache_dir: Path | None = None,
                    known_vectors: Callable[[], Mapping[str, np.ndarray]] | None = None,
                    ) -> RetrieverResult:
    """Fine-tune ``encoder`` on (question, positive documents) pairs; see the module docstring.

    ``train_items``' ``doc_ids`` are the positives; items with none in ``corpus`` are skipped
    (and counted). ``dev_items`` are evaluated every ``config.eval_steps`` (dense only, against
    ``corpus`` embedded by the frozen encoder in "query" mode or by the current model in
    "both"). ``doc_vectors``: ``encoder``'s embeddings of ``corpus`` if already computed,
    else they come from ``corpus_embeddings`` (cached under ``cache_dir`` when given, taking
    what ``known_vectors`` gives: its ``known``). The caller's ``encoder`` is never changed: a
    copy is trained where ``encoder.model`` is (CUDA: bf16 autocast). Raises ValueError for no
    usable training question, an empty corpus, or a ``run_dir`` holding another run's state;
    ``loop.Cancelled`` when ``should_stop`` says so (the last saved state stays for a resume).
    """
    if not corpus:
        raise ValueError("the corpus is empty: nothing to retrieve")
    examples, skipped = training_examples(train_items, corpus)
    if skipped:
        log.info("retriever training: %d of %d questions skipped (no positive document in the "
                 "corpus, e.g. unanswerable)", skipped, len(train_items))
    if not examples:
        raise ValueError(f"no training question with a positive document in the corpus "
                         f"({len(train_items)} given, {skipped} without one)")
    data = _data_fingerprint(encoder, examples, dev_items, corpus)
    state = _resumable(run_dir, SUPERVISED_RUN, config, data)
    before_steps = loop.Reporter(progress, SUPERVISED_RUN, 0, loop.Clock())
    if doc_vectors is None:
        before_steps.phase("encoding the corpus")
        doc_vectors = corpus_embeddings(encoder, corpus, cache_dir, progress=False,
                                        known=known_vectors)
    if doc_vectors.shape != (len(corpus), encoder.dim):
        raise ValueError(f"`doc_vectors` has shape {doc_vectors.shape}, expected "
                         f"{(len(corpus), encoder.dim)}")

    if state is not None:
        pools = state["negatives"]
    elif config.hard_negatives > 0:
        loop.check_cancel(should_stop)
        before_steps.phase("mining hard negatives")
        usable = {ex.item_id for ex in examples}
        to_mine = [item for item in train_items if item.id in usable]
        # Deeper than kept: positives and answer-bearing documents are dropped from the top.
        rankings = candidate_rankings(to_mine, corpus, config.negatives,
                                      top_k=2 * config.negative_depth + 5, encoder=encoder,
                                      doc_vectors=doc_vectors)
        mined = mine_hard_negatives(to_mine, rankings, {d.doc_id: d for d in corpus},
                                    depth=config.negative_depth)
        row_of = {doc.doc_id: i for i, doc in enumerate(corpus)}
        pools = {item_id: [row_of[d] for d in ids] for item_id, ids in mined.items()}
    else:
        pools = {}
    examples = [Example(ex.item_id, ex.question, ex.positives, tuple(pools.get(ex.item_id, ())))
                for ex in examples]
    short = sum(len(ex.negatives) < config.hard_negatives for ex in examples)
    if short:
        log.info("%d of %d questions have fewer than %d hard negatives", short, len(examples),
                 config.hard_negatives)
    texts = [titled_text(doc.title, doc.text) for doc in corpus]

    def make_batch(step: int) -> Batch:
        chosen = _batch_indices(config, step, len(examples))
        return question_batch([examples[i] for i in chosen], texts, config.hard_negatives,
                              step_rng(config.seed, step))

    return _fit(SUPERVISED_RUN, config, encoder, make_batch, len(examples), skipped, dev_items,
                corpus, doc_vectors, run_dir, data, state, {"negatives": pools}, progress,
                should_stop)


def pretrain_retriever(config: RetrieverTrainConfig, encoder: Encoder,
                       corpus: Sequence[Document], run_dir: Path,
                       progress: loop.ProgressFn | None = None,
                       should_stop: Callable[[], bool] | None = None, *,
                       dev_items: Sequence[QAItem] = (), doc_vectors: np.ndarray | None = None,
                       cache_dir: Path | None = None,
                       known_vectors: Callable[[], Mapping[str, np.ndarray]] | None = None,
                       ) -> RetrieverResult:
    """Unsupervised contrastive warm-up on ``corpus``: each step's batch is ``batch_size``
    documents, two random crops of each a positive pair, the other documents' crops the
    negatives (Izacard et al. 2021, Contriever). Same loop, modes, state, saved model and
    errors as ``train_retriever`` (meta ``"objective": "crops"``); ``dev_items`` optional
    (without them the last model is saved). ``hard_negatives`` is not used.
    """
    docs = [titled_text(doc.title, doc.text).split() for doc in corpus]
    if not any(docs):
        raise ValueError("the corpus is empty: nothing to pre-train on")
    data = _data_fingerprint(encoder, [], dev_items, corpus)
    state = _resumable(run_dir, PRETRAIN_RUN, config, data)
    if doc_vectors is None and any(item.doc_ids for item in dev_items):
        loop.Reporter(progress, PRETRAIN_RUN, 0, loop.Clock()).phase("encoding the corpus")
        doc_vectors = corpus_embeddings(encoder, corpus, cache_dir, progress=False,
                                        known=known_vectors)

    def make_batch(step: int) -> Batch:
        chosen = _batch_indices(config, step, len(docs))
        return crop_batch([docs[i] for i in chosen], step_rng(config.seed, step),
                          config.crop_min, config.crop_max)

    return _fit(PRETRAIN_RUN, config, encoder, make_batch, len(docs), 0, dev_items, corpus,
                doc_vectors, run_dir, data, state, {}, progress, should_stop)


def total_steps(config: RetrieverTrainConfig, examples: int) -> int:
    """Steps of a run over ``examples``: epochs × ceil(examples / batch_size), cut at
    ``max_steps``."""
    steps = config.epochs * math.ceil(examples / config.batch_size)
    return steps if config.max_steps is None else min(steps, config.max_steps)


def _batch_indices(config: RetrieverTrainConfig, step: int, n: int) -> np.ndarray:
    per_epoch = math.ceil(n / config.batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(config.seed, epoch, n)
    return order[index * config.batch_size:(index + 1) * config.batch_size]


def _data_fingerprint(encoder: Encoder, examples: Sequence[Example],
                      dev_items: Sequence[QAItem], corpus: Sequence[Document]) -> str:
    base = {"model": str(getattr(encoder.model.config, "name_or_path", "")),
            "max_length": encoder.max_length, "pooling": encoder.pooling}
    return loop.fingerprint([base, loop.fingerprint(examples), loop.fingerprint(dev_items),
                             loop.fingerprint({"id": d.doc_id, "text": titled_text(d.title, d.text)}
                                              for d in corpus)])


def _resumable(run_dir: Path, kind: str, config: RetrieverTrainConfig,
               data: str) -> dict[str, Any] | None:
    """The saved state of ``run_dir`` when it is this run's, None when there is none."""
    state = loop.load_state(run_dir)
    if state is None:
        return None
    if state.get("kind") != kind:
        raise ValueError(f"{run_dir} holds the state of a {state.get('kind')!r} run, not "
                         f"{kind!r}: use another run folder")
    if state["config"] != config.model_dump():
        changed = sorted(k for k, v in config.model_dump().items()
                         if state["config"].get(k) != v)
        raise ValueError(f"{run_dir} holds a run with another config (differs in "
                         f"{', '.join(changed)}): resume with the same config or use another "
                         f"run folder")
    if state["data"] != data:
        raise ValueError(f"{run_dir} holds a run on other data (fingerprint {state['data']}, "
                         f"now {data}): resume with the same data or use another run folder")
    log.info("%s: resuming %s at step %d", run_dir, kind, state["step"])
    return state


def _autocast(device: torch.device):
    # bf16 autocast on a GPU; the master weights and AdamW stay fp32.
    if device.type == "cuda":
        _, dtype = loop.pick_device("cuda")
        if dtype != torch.float32:
            return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _fit(run_kind: str, config: RetrieverTrainConfig, encoder: Encoder,
         make_batch: Callable[[int], Batch], examples: int, skipped: int,
         dev_items: Sequence[QAItem], corpus: Sequence[Document], doc_vectors: np.ndarray | None,
         run_dir: Path, data: str, state: dict[str, Any] | None, extra_state: dict[str, Any],
         progress: loop.ProgressFn | None,
         should_stop: Callable[[], bool] | None) -> RetrieverResult:
    """The training loop both runs share. Reads top to bottom: set-up, resume, steps."""
    run_dir = Path(run_dir)
    device = encoder.model.device
    steps = total_steps(config, examples)
    loss_fn = LOSSES[config.loss]
    reindex = config.mode == "both"
    loop.seed_everything(config.seed)

    # The trained copy; the caller's encoder stays the frozen passage side of "query" mode.
    model = copy.deepcopy(encoder.model).float().train()
    trained = Encoder(encoder.tokenizer, model, encoder.batch_size, config.max_length,
                      encoder.pooling)
    # Evaluation embeds like serving does: the served max_length, eval mode.
    evaluator = Encoder(encoder.tokenizer, model, encoder.batch_size, encoder.max_length,
                        encoder.pooling)
    frozen_vectors = None if doc_vectors is None else torch.from_numpy(doc_vectors).to(device)
    # The starting encoder at the training max_length: anchor_penalty's reference.
    start = Encoder(encoder.tokenizer, encoder.model, encoder.batch_size, config.max_length,
                    encoder.pooling)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    # No weight decay on biases and LayerNorm gains (as in BERT and nanoGPT).
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    judged_dev = [item for item in dev_items if item.doc_ids]
    if dev_items and not judged_dev:
        log.warning("%s: no dev question has a positive document: no evaluation", run_kind)

    step, best, best_step, history, losses, elapsed = 0, None, 0, [], [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best, best_step = state["step"], state["best"], state["best_step"]
        history, losses, elapsed = state["history"], state["losses"], state["elapsed_s"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    clock = loop.Clock(elapsed)

    def evaluate() -> dict[str, float]:
        model.eval()
        try:
            vectors = doc_vectors
            if reindex and step > 0:
                vectors = corpus_embeddings(evaluator, corpus, None, progress=False)
            return dev_metrics(evaluator, vectors, corpus, judged_dev)
        finally:
            model.train()

    def meta(at_step: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {"kind": KIND, "objective": "crops" if run_kind == PRETRAIN_RUN else "questions",
                "mode": config.mode, "reindex": reindex,
                "config": config.model_dump(), "data": data, "step": at_step,
                "metrics": {"best": metrics, "history": history},
                "base_model": str(getattr(encoder.model.config, "name_or_path", "")),
                "pooling": encoder.pooling, "max_length": encoder.max_length,
                "examples": examples}

    def save_state() -> None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        loop.save_state(run_dir, {
            "kind": run_kind, "config": config.model_dump(), "data": data, "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best,
            "best_step": best_step, "history": history, "losses": losses,
            "elapsed_s": clock.elapsed(), "rng": rng, **extra_state})

    if state is None and judged_dev:
        # The starting point is a candidate too: a run that only hurts keeps the base model.
        best = evaluate()
        history.append({"step": 0, **best})
        loop.save_model(run_dir, model, encoder.tokenizer, meta(0, best))
        log.info("%s: step 0 dev %s", run_kind, _fmt(best))
    report = loop.Reporter(progress, run_kind, steps, clock)
    examples_seen = 0  # by this call, for throughput
    params = decay + no_decay  # what the optimiser steps
    nonfinite = loop.NonFinite()
    while step < steps:
        loop.check_cancel(should_stop)
        # this config has no `min_lr_ratio`: get_lr's default floor
        lr = loop.get_lr(step, lr=config.lr, warmup_steps=config.warmup_steps,
                         total_steps=steps, schedule=config.schedule)
        loop.set_lr(optimizer, lr)
        batch = make_batch(step)
        with _autocast(device):
            queries = trained.embed(batch.queries)
            if reindex:
                passages = trained.embed(batch.passages)
            elif batch.rows is not None and frozen_vectors is not None:
                passages = frozen_vectors[batch.rows]
            else:
                with torch.no_grad():
                    passages = torch.from_numpy(encoder.encode(batch.passages)).to(device)
        targets = torch.tensor(batch.targets, device=device)
        exclude = (None if batch.exclude is None
                   else torch.tensor(batch.exclude, dtype=torch.bool, device=device))
        loss = loss_fn(queries.float(), passages.float(), targets, config.temperature, exclude)
        if config.anchor > 0:
            moved = [(queries, batch.queries, None)]
            if reindex:
                moved.append((passages, batch.passages, batch.rows))
            for embedded, texts, rows in moved:
                if rows is not None and frozen_vectors is not None:
                    started = frozen_vectors[rows]  # the starting encoder's corpus vectors
                else:
                    started = torch.from_numpy(start.encode(texts)).to(device)
                loss = loss + config.anchor * anchor_penalty(embedded.float(), started)
        loss.backward()
        loss_value = float(loss.detach())
        stepped = loop.optimizer_step([optimizer], [params], config.grad_clip, loss_value)
        nonfinite.count(stepped, step + 1, loss_value)
        step += 1
        examples_seen += len(batch.queries)
        losses.append(loss_value)

        metrics: dict[str, float] = {}
        if judged_dev and (step % config.eval_steps == 0 or step == steps):
            metrics = evaluate()
            history.append({"step": step, **metrics})
            log.info("%s: step %d/%d loss %.4f dev %s", run_kind, step, steps, losses[-1],
                     _fmt(metrics))
            if best is None or metrics[BEST_METRIC] > best[BEST_METRIC]:
                best, best_step = metrics, step
                loop.save_model(run_dir, model, encoder.tokenizer, meta(step, metrics))
        if not judged_dev and step == steps:
            best_step = step
            loop.save_model(run_dir, model, encoder.tokenizer, meta(step, {}))
        report(step, losses[-1], lr, metrics)
        if step % config.save_steps == 0 or step == steps:
            save_state()

    model_dir = run_dir / loop.MODEL_DIR
    saved = loop.read_meta(model_dir)
    loop.write_report(run_dir, {
        "run": run_kind, "mode": config.mode, "steps": step, "best_step": best_step,
        "metrics": dict(best or {}), "config": config.model_dump(mode="json"), "data": data,
        "history": {"train": [{"step": i + 1, "loss": x} for i, x in enumerate(losses)],
                    "eval": history}},
        f"retriever {run_kind} ({config.mode}), best step {best_step}", metrics=DEV_METRICS,
        loss_label="contrastive loss")
    # The meta's history stops at the best step; the result's holds every evaluation.
    return RetrieverResult(model_dir=model_dir, run_kind=run_kind, mode=config.mode,
                           reindex=reindex, steps=step, best_step=best_step,
                           metrics=dict(best or {}), history=list(history),
                           losses=list(losses), examples=examples,
                           skipped=skipped, elapsed_s=clock.elapsed(),
                           examples_seen=examples_seen, data_fingerprint=data, meta=saved)


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
