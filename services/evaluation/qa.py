"""Offline retrieval-augmented QA: the serving pipeline, in-process, scored against gold answers.

The same steps as ``POST /v1/qa``, without Ray, Redis or Milvus:

1. retrieve: dense (``Encoder`` + exact cosine search over ``corpus_embeddings``) and BM25 (a
   ``SparseService`` in a temporary folder), each returning ``candidates`` hits, fused with
   ``services.ranker.fusion`` — by default ``weighted_minmax`` with dense weight 0.9, the
   serving default (``RetrievalSettings``), cut to ``top_k``. One difference: the served dense
   index holds passages of at most ``embedding.chunk_chars`` characters, this one whole
   documents (the packaged summaries average ~615 characters, so they rarely differ);
2. prompt: ``shared.prompt.build_messages`` through the tokenizer's chat template with
   ``add_generation_prompt=True``, as ``services/generator/service.py`` builds it. A
   tokenizer without a chat template (a seq2seq model such as T5) gets the plain text of the
   same two messages joined by a blank line. Passages are dropped from the end while the
   prompt does not fit the context (serving also keeps a cut part of the first passage that
   does not fit whole: the two differ only for prompts at the context limit, which the
   packaged model's 8k window never reaches here);
3. greedy decoding in batches (left padding for decoder-only models), answers cleaned as
   serving cleans them (``clean_answer``; an empty answer becomes ``NO_ANSWER``);
4. scoring with ``shared.metrics`` on the answer with its citation markers ("[1]") removed.

Retrieval results are plain data (question -> list of ``Hit``): ``retrieve`` computes them once
from a retriever, ``save_passages`` / ``load_passages`` keep them in a JSON file, and every
function that needs passages takes either (``Retrieval``).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from services.evaluation.retrieval import corpus_embeddings, dense_search
from services.ranker.fusion import RRF_K, fuse
from services.sparse.service import SparseService
from shared.datasets import QAItem
from shared.files import write_text_atomic
from shared.metrics import contains, exact_match, token_f1
from shared.models.encoder import Encoder
from shared.models.generator import eos_ids
from shared.prompt import (
    NO_ANSWER,
    build_messages,
    clean_answer,
    cut_hit,
    is_no_answer,
    parse_citations,
    withhold,
)
from shared.schemas import Document, Hit, IngestBatch, SearchRequest
from shared.settings import GeneratorSettings, RetrievalSettings

log = logging.getLogger(__name__)

# Serving defaults, read from the settings classes so the two never drift apart.
SERVING_TOP_K = RetrievalSettings().top_k
SERVING_CANDIDATES = RetrievalSettings().candidates
SERVING_MODE = RetrievalSettings().mode
SERVING_WEIGHT = RetrievalSettings().weight
SERVING_MAX_PASSAGE_CHARS = GeneratorSettings().max_passage_chars
SERVING_MAX_NEW_TOKENS = GeneratorSettings().max_new_tokens

# "[2]", "[1, 3]" with the space before them: what the generator appends to cite passages.
_CITATION = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")

# question texts, top_k -> top_k hits per question, best first.
Retriever = Callable[[Sequence[str], int], list[list[Hit]]]
# A retriever, or its results computed earlier: question text -> hits, best first.
Retrieval = Retriever | Mapping[str, Sequence[Hit]]


class PromptTooLong(ValueError):
    """Even the question with one passage does not fit the token budget (names the question)."""


# --- retrieval --------------------------------------------------------------------------------
class HybridRetriever:
    """Dense + BM25 retrieval fused as serving fuses them, in-process.

    ``encoder`` embeds the questions; ``doc_vectors`` (row i for ``docs[i]``, unit rows) are
    the document index — computed here with ``corpus_embeddings`` (cached in ``cache_dir``)
    when not given, which is how a query encoder trained against a fixed document index
    (``services/trainer/joint.py``) is evaluated. ``mode``/``weight``/``rrf_k`` are those of
    ``services.ranker.fusion.fuse`` (raises its ValueError for bad ones). Call ``close`` (or use
    it as a context manager) to remove the BM25 store.
    """

    def __init__(self, encoder: Encoder, docs: Sequence[Document], *,
                 doc_vectors: np.ndarray | None = None, cache_dir: Path | None = None,
                 candidates: int = SERVING_CANDIDATES, mode: str = SERVING_MODE,
                 weight: float = SERVING_WEIGHT, rrf_k: int = RRF_K,
                 progress: bool = False) -> None:
        if not docs:
            raise ValueError("`docs` has to hold at least one document, but is empty")
        if candidates < 1:
            raise ValueError(f"`candidates` has to be a positive integer, but is {candidates}")
        fuse(mode, [], [], k=rrf_k, weight=weight)  # validates the fusion options once
        self.encoder = encoder
        self.docs = list(docs)
        if doc_vectors is None:
            doc_vectors = corpus_embeddings(encoder, self.docs, cache_dir, progress=progress)
        if doc_vectors.shape != (len(self.docs), encoder.dim):
            raise ValueError(f"`doc_vectors` has shape {doc_vectors.shape}, expected "
                             f"{(len(self.docs), encoder.dim)}")
        self.doc_vectors = doc_vectors
        self.candidates = candidates
        self.mode = mode
        self.weight = weight
        self.rrf_k = rrf_k
        self._tmp = tempfile.TemporaryDirectory(prefix="ragtune-qa-sparse-")
        self.sparse = SparseService(Path(self._tmp.name))
        self.sparse.ingest(IngestBatch(documents=self.docs))

    def __call__(self, questions: Sequence[str], top_k: int) -> list[list[Hit]]:
        """Top ``top_k`` fused hits per question (descending fused score)."""
        if top_k < 1:
            raise ValueError(f"`top_k` has to be a positive integer, but is {top_k}")
        if not questions:
            return []
        wide = max(self.candidates, top_k)
        dense = dense_search(self.encoder.encode(list(questions)), self.doc_vectors,
                             self.docs, wide)
        out = []
        for question, dense_hits in zip(questions, dense, strict=True):
            sparse_hits = self.sparse.search(SearchRequest(query=question, top_k=wide)).hits
            out.append(fuse(self.mode, dense_hits, sparse_hits, k=self.rrf_k,
                            weight=self.weight)[:top_k])
        return out

    def close(self) -> None:
        self.sparse.close()
        self._tmp.cleanup()

    def __enter__(self) -> HybridRetriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def retrieve(retrieval: Retrieval, questions: Sequence[str], top_k: int) -> dict[str, list[Hit]]:
    """question -> its first ``top_k`` hits, for each distinct question of ``questions``.

    A retriever is asked once for all questions; precomputed results are looked up (and cut to
    ``top_k``). Raises ValueError naming a question the precomputed results lack.
    """
    if top_k < 1:
        raise ValueError(f"`top_k` has to be a positive integer, but is {top_k}")
    distinct = list(dict.fromkeys(questions))
    if callable(retrieval):
        return {q: list(hits)[:top_k]
                for q, hits in zip(distinct, retrieval(distinct, top_k), strict=True)}
    missing = [q for q in distinct if q not in retrieval]
    if missing:
        raise ValueError(f"no passages for {len(missing)} question(s), e.g. {missing[0]!r}: "
                         "retrieve them first (services.evaluation.qa.retrieve)")
    return {q: list(retrieval[q])[:top_k] for q in distinct}


def save_passages(path: Path, passages: Mapping[str, Sequence[Hit]]) -> None:
    """Write retrieval results as JSON (question -> hits), atomically."""
    body = {q: [h.model_dump(mode="json") for h in hits] for q, hits in passages.items()}
    write_text_atomic(path, json.dumps(body, ensure_ascii=False))


def load_passages(path: Path) -> dict[str, list[Hit]]:
    """Retrieval results written by ``save_passages``. Raises ValueError for a malformed file."""
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
        return {q: [Hit.model_validate(h) for h in hits] for q, hits in body.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"{path}: not a passages file ({exc})") from None


# --- prompts ----------------------------------------------------------------------------------
def is_seq2seq(model) -> bool:
    """Whether ``model`` is an encoder-decoder (T5, BART) rather than a decoder-only LM."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def prompt_ids(tokenizer, question: str, passages: Sequence[Hit],
               max_passage_chars: int) -> list[int]:
    """Token ids of the prompt serving builds for ``question`` and ``passages``.

    With a chat template: ``build_messages`` through ``apply_chat_template`` with the
    generation prompt (exactly ``GeneratorService``'s prompt). Without one: the system and user
    messages' text joined by a blank line, tokenised with the tokenizer's special tokens.
    """
    messages = build_messages(question, list(passages), max_passage_chars)
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)
        ids = encoded["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)
    text = "\n\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])


def fit_prompt(tokenizer, question: str, passages: Sequence[Hit], max_passage_chars: int,
               budget: int) -> tuple[list[Hit], list[int]]:
    """The longest prefix of ``passages`` whose prompt has at most ``budget`` tokens, and that
    prompt's ids — serving's rule (the lowest-ranked passages go first). Without passages the
    prompt is built from none. Raises ``PromptTooLong`` when not even one passage fits."""
    passages = list(passages)
    length = 0
    for keep in range(len(passages), 0, -1):
        ids = prompt_ids(tokenizer, question, passages[:keep], max_passage_chars)
        length = len(ids)
        if length <= budget:
            return passages[:keep], ids
    if not passages:
        ids = prompt_ids(tokenizer, question, [], max_passage_chars)
        if len(ids) <= budget:
            return [], ids
        length = len(ids)
    raise PromptTooLong(f"the question {question[:80]!r} with even one passage needs {length} "
                        f"prompt tokens, over the budget of {budget}")


def context_size(model, tokenizer) -> int:
    """The model's context window in tokens: ``max_position_embeddings`` (decoder-only),
    ``n_positions`` (T5-style configs), else the tokenizer's ``model_max_length``."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return int(min(tokenizer.model_max_length, 1_000_000))


def pad_id(tokenizer, eos: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos:
        return int(eos[0])
    raise ValueError("the tokenizer has neither a pad nor an eos token")


# --- generation -------------------------------------------------------------------------------
def generate_answers(model, tokenizer, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int = SERVING_MAX_NEW_TOKENS,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to tokenised prompts, cleaned as serving cleans them.

    Prompts are batched by length (padding on the left for decoder-only models, on the right
    for encoder-decoders) and answers returned in input order. Generation stops at an eos id
    (``eos_ids``); an answer cut by ``max_new_tokens`` loses its unfinished last sentence
    (``clean_answer``); an empty answer is ``NO_ANSWER``. On CUDA an fp32 model runs under
    bf16 autocast. The model is put in eval mode and left there.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` has to be a positive integer, but is "
                         f"{max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` has to be a positive integer, but is {batch_size}")
    seq2seq = is_seq2seq(model)
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and _is_fp32(model))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(prompts[i])
            cols = slice(0, n) if seq2seq else slice(width - n, width)
            ids[r, cols] = torch.tensor(list(prompts[i]), dtype=torch.long)
            mask[r, cols] = 1
        with torch.inference_mode(), autocast:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos or None, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
        # decoder-only: the prompt comes back first; encoder-decoder: the decoder start token
        new = out[:, 1:] if seq2seq else out[:, width:]
        for r, i in enumerate(rows):
            tokens = new[r].tolist()
            stop = next((j for j, t in enumerate(tokens) if t in eos), None)
            if stop is not None:
                tokens = tokens[:stop]
            raw = tokenizer.decode(tokens, skip_special_tokens=True)
            answers[i] = clean_answer(raw, truncated=stop is None) or NO_ANSWER
    return answers


def _is_fp32(model) -> bool:
    return next(model.parameters()).dtype == torch.float32


# --- scoring ----------------------------------------------------------------------------------
def strip_citations(answer: str) -> str:
    """The answer without citation markers: "Paris [2]." -> "Paris."."""
    return _CITATION.sub("", answer).strip()


@dataclass(frozen=True)
class QARow:
    """One question's answer and scores. ``em``/``f1``/``contains`` compare the answer without
    citation markers with the gold answers (0 for an abstention); ``abstained`` is
    ``is_no_answer``; ``retrieved_gold`` whether a gold document was among the passages;
    ``cited_gold`` whether the answer cites one (``parse_citations``)."""

    id: str
    question: str
    answers: list[str]
    answerable: bool
    prediction: str
    passages: list[str]
    em: float
    f1: float
    contains: float
    abstained: bool
    retrieved_gold: bool
    cited_gold: bool
    trust: float | None = None
    draft: str | None = None


def score_row(item: QAItem, prediction: str, passages: Sequence[Hit], *,
              min_trust: float = 0.0, by_sentence: bool = True) -> QARow:
    """Score one answer to ``item`` given the passages its prompt held. As the QA front does
    (``shared.prompt.withhold``), an answer whose trust is below ``min_trust`` is scored as
    ``NO_ANSWER``; ``draft`` keeps it (``by_sentence``: see ``shared.prompt.support``). An
    abstention scores 0 on EM, F1 and contains, whatever words it shares with the answer
    ("I don't know." and "Leo I" share "I")."""
    hits = list(passages)
    prediction, trust, draft = withhold(prediction, hits, question=item.question,
                                        min_trust=min_trust, by_sentence=by_sentence)
    answer = strip_citations(prediction)
    abstained = is_no_answer(prediction)
    gold = set(item.doc_ids)
    cited = parse_citations(prediction, hits, question=item.question)

    def score(metric) -> float:
        return 0.0 if abstained else metric(answer, item.answers)

    return QARow(
        id=item.id, question=item.question, answers=list(item.answers),
        answerable=item.answerable, prediction=prediction,
        passages=[h.doc_id for h in passages],
        em=score(exact_match), f1=score(token_f1), contains=score(contains),
        abstained=abstained,
        retrieved_gold=any(h.doc_id in gold for h in passages),
        cited_gold=any(c.doc_id in gold for c in cited), trust=trust, draft=draft)


@dataclass(frozen=True)
class SetMetrics:
    """Means over one question set. ``em``/``f1``/``contains``/``answered_rate``/
    ``retrieved_gold``/``cited_gold`` are over its answerable questions, ``abstention_rate``
    over its unanswerable ones; a mean over no question is None. ``score`` is the
    per-question mean of token F1 (answerable) and abstained-or-not (unanswerable): the one
    number a training run selects checkpoints by."""

    n: int
    answerable: int
    unanswerable: int
    em: float | None
    f1: float | None
    contains: float | None
    answered_rate: float | None
    abstention_rate: float | None
    retrieved_gold: float | None
    cited_gold: float | None
    score: float | None


def summarise(rows: Sequence[QARow]) -> SetMetrics:
    """``SetMetrics`` of ``rows`` (any subset of a report's rows, e.g. one chosen by id)."""
    answerable = [r for r in rows if r.answerable]
    unanswerable = [r for r in rows if not r.answerable]

    def mean(values: list[float]) -> float | None:
        return round(statistics.fmean(values), 4) if values else None

    return SetMetrics(
        n=len(rows), answerable=len(answerable), unanswerable=len(unanswerable),
        em=mean([r.em for r in answerable]), f1=mean([r.f1 for r in answerable]),
        contains=mean([r.contains for r in answerable]),
        answered_rate=mean([float(not r.abstained) for r in answerable]),
        abstention_rate=mean([float(r.abstained) for r in unanswerable]),
        retrieved_gold=mean([float(r.retrieved_gold) for r in answerable]),
        cited_gold=mean([float(r.cited_gold) for r in answerable]),
        score=mean([r.f1 for r in answerable] + [float(r.abstained) for r in unanswerable]))


@dataclass(frozen=True)
class QAReport:
    """Per-set metrics and rows of one evaluation; ``to_json`` is JSON-serialisable."""

    sets: dict[str, SetMetrics]
    rows: dict[str, list[QARow]]
    config: dict[str, object]
    seconds: float
    questions_per_s: float
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self, title: str = "") -> str:
        """The per-set metrics as a fixed-width text table."""
        return metrics_table({name: m for name, m in self.sets.items()}, title)


_COLUMNS = ("em", "f1", "contains", "answered_rate", "abstention_rate", "retrieved_gold")


def metrics_table(sets: Mapping[str, SetMetrics], title: str = "") -> str:
    """Rows of ``SetMetrics`` as a fixed-width table ('-' for an undefined mean)."""
    lines = [title] if title else []
    lines.append(f"{'set':<28}{'n':>5}" + "".join(f"{c:>16}" for c in _COLUMNS))
    for name, m in sets.items():
        cells = "".join(f"{'-' if getattr(m, c) is None else f'{getattr(m, c):.3f}':>16}"
                        for c in _COLUMNS)
        lines.append(f"{name:<28}{m.n:>5}{cells}")
    return "\n".join(lines)


# --- the run ----------------------------------------------------------------------------------
def answer_questions(model, tokenizer, questions: Sequence[str],
                     passages: Mapping[str, Sequence[Hit]], *,
                     max_passage_chars: int = SERVING_MAX_PASSAGE_CHARS,
                     max_new_tokens: int = SERVING_MAX_NEW_TOKENS, batch_size: int = 8,
                     max_context_tokens: int | None = None,
                     ) -> tuple[list[str], list[list[Hit]]]:
    """(answers, passages each prompt held, their texts cut to ``max_passage_chars`` as the
    prompt shows them) for ``questions``, each prompted with its ``passages[question]`` fitted
    into the context as serving fits it. Raises ``PromptTooLong`` for a question that cannot
    fit with one passage."""
    context = max_context_tokens or context_size(model, tokenizer)
    # An encoder-decoder's answer is not part of its input (serving's rule too).
    budget = context if is_seq2seq(model) else context - max_new_tokens
    if budget < 1:
        raise ValueError(f"`max_new_tokens` ({max_new_tokens}) leaves no room for a prompt in a "
                         f"context of {context} tokens")
    fitted = [fit_prompt(tokenizer, q, passages[q], max_passage_chars, budget)
              for q in questions]
    answers = generate_answers(model, tokenizer, [ids for _, ids in fitted],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    return answers, [[cut_hit(h, max_passage_chars) for h in kept] for kept, _ in fitted]


def evaluate_qa(model, tokenizer, sets: Mapping[str, Sequence[QAItem]], retrieval: Retrieval,
                *, top_k: int = SERVING_TOP_K,
                max_passage_chars: int = SERVING_MAX_PASSAGE_CHARS,
                max_new_tokens: int = SERVING_MAX_NEW_TOKENS, batch_size: int = 8,
                max_context_tokens: int | None = None, min_trust: float = 0.0,
                by_sentence: bool = True) -> QAReport:
    """Answer every question of every named set from its top ``top_k`` passages and score it.

    ``sets`` maps a set name to its items; ``retrieval`` is a retriever or precomputed
    passages (see ``retrieve``). Questions shared by several sets are answered once. Answers
    whose trust is below ``min_trust`` count as abstentions (``score_row``), as the QA front
    withholds them at ``answer.min_trust`` (``by_sentence``: ``answer.trust_by_sentence``).
    Raises ValueError when there is no question, for bad options and for missing passages.
    """
    if not any(sets.values()):
        raise ValueError("no question to evaluate: every set is empty")
    started = time.perf_counter()
    questions = list(dict.fromkeys(item.question for items in sets.values() for item in items))
    passages = retrieve(retrieval, questions, top_k)
    answers, kept = answer_questions(model, tokenizer, questions, passages,
                                     max_passage_chars=max_passage_chars,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     max_context_tokens=max_context_tokens)
    by_question = dict(zip(questions, zip(answers, kept, strict=True), strict=True))
    rows = {name: [score_row(item, *by_question[item.question], min_trust=min_trust,
                             by_sentence=by_sentence)
                   for item in items] for name, items in sets.items()}
    seconds = time.perf_counter() - started
    return QAReport(
        sets={name: summarise(r) for name, r in rows.items()}, rows=rows,
        config={"top_k": top_k, "max_passage_chars": max_passage_chars,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "decoding": "greedy", "min_trust": min_trust, "trust_by_sentence": by_sentence},
        seconds=round(seconds, 3), questions_per_s=round(len(questions) / seconds, 3))
