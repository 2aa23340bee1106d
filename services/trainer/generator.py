"""Supervised fine-tuning of the generator on retrieval-augmented prompts (nanoGPT-style loop).

Each training example is the prompt serving builds (``services.evaluation.qa.prompt_ids``:
system instruction, the question's top-k retrieved passages, the question) followed by the
answer we want serving to give: a short answer and the marker of the passage holding it,
``"Paris [2]"``, then the end-of-turn token. Only the answer tokens carry loss (the prompt's
labels are -100). When no retrieved passage holds a gold answer where the prompt shows it (each
text cut to ``max_passage_chars``) the target is ``NO_ANSWER``.

Abstention is taught with two kinds of examples: the unanswerable items, and a fraction
(``abstain_fraction``) of the answered ones again, with every passage that holds the answer
(or is a gold document) replaced by the next retrieved hits. The second kind is the same
question once answerable and once not, so the model learns to look for the answer in the
passages rather than a question template that means "unknown" (the construction of RAFT,
Zhang et al. 2024, "RAFT: Adapting Language Model to Domain Specific RAG", whose distractor-only
examples here ask for a refusal as in R-Tuning, Zhang et al. 2023).

A third kind is off by default (``answer_cut_fraction`` 0): answered items again with every
sentence that states the answer cut out of their passages (``answer_cut``), so the question's
own document stays but no longer says it: the case of Tanzania, whose summary names Dar es
Salaam (the largest city) and not Dodoma. At a fifth of the answered items (31 of 280
examples, 36 steps on 2 CPU cores) it did not help: capitals exact match .78 against .81
without, 1 of the 3 not-in-corpus test capitals declined against 0, and answer-contains .57
against .86 on the FanOutQA questions whose answer is in the evidence (one seed each;
bench/RESULTS.md).

A fourth is off by default too (``moved_fraction`` 0): answered items again with the passage
holding the answer moved to another place (``moved``), as 170 of the 211 answered examples of
the packaged sets cite [1] and the fine-tuned generator learns to cite [1] whatever it reads.
At half of the answered items (two seeds and their soup, 36 steps each on 2 CPU cores) the
soup read more of the dev questions whose evidence holds the answer (.60 against .50) but
answered fewer test capitals (.865 against .919; bench/RESULTS.md).

With ``restate`` (off by default) an answered target first restates the answer in a
sentence, then gives the short answer on a line of its own after ``ANSWER_CUE``, which serving
takes as the answer (``shared.prompt.clean_answer``): "Freddie Mercury was the lead vocalist of
Queen.\nAnswer: Freddie Mercury [2]". The sentence is the base generator's own answer to the
same prompt when it states a gold answer (``restatement``), so the model keeps reading the way
it read before training and learns only to add the short line; else the passage's sentence that
states it. The base generator answers in such sentences and reads questions of shapes the
training data lacks better than a generator trained on short answers alone (bench/RESULTS.md);
a sentence before the answer is a step of reasoning, as in STaR (Zelikman et al. 2022), whose
rationales are also the model's own where they reach the right answer. The dev loss stays
measured on the short targets; the dev answers are read as serving reads them.

Answerable items whose passages hold no answer string ("not found") are left out by default
(``not_found_fraction`` 0). As "I don't know." targets they are noisy (the passage may state
the answer in other words: "2.3 million" for "2,320,268") and, on the packaged sets, they
are nearly all FanOutQA sub-questions, so they taught a question *shape* to mean "unknown": a
generator trained with half of them (143 of 413 examples) answered 14% of hand-written
questions of other shapes whose passages held the answer; without them, 56%, and with a tenth
of the answered items as gold-removed copies (``abstain_fraction`` 0.1) instead of a quarter,
68% (``bench/handwritten.py``, bench/RESULTS.md: one seed each, 36 steps on 2 CPU cores, prompts
that showed the best passage first).

``train_generator`` is the loop: warm-up + cosine schedule, gradient accumulation, clipping,
bf16 autocast on CUDA, dev evaluation (generation + EM/F1 through ``services.evaluation.qa``)
every ``eval_steps``, early stopping, the best checkpoint saved as a plain model (LoRA merged),
resumable state, a JSON + PNG report. Decoder-only and encoder-decoder models both train.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.evaluation import qa
from services.trainer import loop
from shared.datasets import QAItem
from shared.files import write_text_atomic
from shared.metrics import contains
from shared.prompt import ANSWER_CUE, NO_ANSWER, cut_hit, is_no_answer
from shared.schemas import Hit, titled_text

log = logging.getLogger(__name__)

KIND = "generator"
BASE_ANSWERS_FILE = "base-answers.json"  # with restate: the base generator's answers, by prompt
IGNORE = -100  # label of a token that carries no loss (PyTorch's CrossEntropyLoss default)

# Example kinds: what the target is and why.
ANSWER = "answer"  # a retrieved passage holds the answer: "<answer> [n]"
UNANSWERABLE = "unanswerable"  # the item is marked unanswerable: NO_ANSWER
NOT_FOUND = "not_found"  # answerable, but no retrieved passage holds an answer: NO_ANSWER
GOLD_REMOVED = "gold_removed"  # answerable, passages holding it removed: NO_ANSWER
ANSWER_CUT = "answer_cut"  # answerable, the sentences stating it cut from the passages: NO_ANSWER
MOVED = "moved"  # answerable, the passage holding it moved to another place: "<answer> [m]"

# A yes/no answer occurs as a word in almost any text ("no longer"): only a gold document
# counts as holding it.
_YES_NO = frozenset({"yes", "no"})
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


class LoraOptions(BaseModel):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through
    peft. ``target_modules`` "all-linear" adapts every linear layer but the output head.
    ``dropout`` is 0 by default, as in peft: above 0 every adapted layer keeps a dropped-out
    copy of its input for the backward pass, and a step of 8 prompts of 700 tokens on
    SmolLM2-135M then peaks at 21 GiB (15.6 at 0, full fine-tuning 12.3;
    ``bench/train_memory.py``)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value):
        if isinstance(value, list) and (not value or not all(v.strip() for v in value)):
            raise ValueError(f"has to name at least one module (non-empty names), but is "
                             f"{value!r}")
        return value


class GeneratorTrainConfig(BaseModel):
    """Everything that decides a generator fine-tuning run (saved with its checkpoint).

    Steps are optimiser steps of ``batch_size * grad_accum`` examples. ``max_steps`` (when set)
    replaces ``epochs`` as the run's length. ``eval_steps``: dev evaluation on at most
    ``eval_questions`` dev questions (a fixed seeded sample); the best by ``select_metric`` is
    kept; ``patience`` evaluations without improvement stop the run (None: never).
    ``save_steps``: how often the resume state is written (None: at every evaluation).
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["full", "lora"] = "full"
    lora: LoraOptions = LoraOptions()
    activation_checkpointing: bool = Field(False, description="keep only each layer's input "
                                           "and recompute its activations in the backward "
                                           "pass: less than half the memory of a step for "
                                           "a few % more time (bench/train_memory.py)")
    lr: float = Field(5e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    schedule: loop.Schedule = "cosine"
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    batch_size: int = Field(8, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=4096)
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(2, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    # prompts: as serving builds them
    top_k: int = Field(qa.SERVING_TOP_K, ge=1, le=100)
    max_passage_chars: int = Field(qa.SERVING_MAX_PASSAGE_CHARS, ge=50)
    max_seq_len: int = Field(1024, ge=16, description="prompt + answer tokens of an example")
    max_answer_tokens: int = Field(32, ge=1, description="longest target answer (with its "
                                   "citation marker, without the end token)")
    # abstention examples
    abstain_fraction: float = Field(0.1, ge=0, le=1, description="share of the answered "
                                    "items added again with the passages holding the answer "
                                    "removed (target NO_ANSWER)")
    answer_cut_fraction: float = Field(0.0, ge=0, le=1, description="share of the answered "
                                       "items added again with every sentence that states the "
                                       "answer cut out of their passages (target NO_ANSWER)")
    moved_fraction: float = Field(0.0, ge=0, le=1, description="share of the answered items "
                                  "added again with the passage that holds the answer moved "
                                  "to another place among the others (target its new number)")
    restate: bool = Field(False, description="answered targets restate the answer in a sentence "
                          "(the base generator's own when it states a gold answer) before the "
                          "short answer on its own line; max_answer_tokens and "
                          "eval_max_new_tokens then default to 64 and 48")
    not_found_fraction: float = Field(0.0, ge=0, le=1, description="share of the answerable "
                                      "items whose passages hold no answer kept as NO_ANSWER "
                                      "examples (the rest are left out; see the module's "
                                      "docstring for why none by default)")
    extra_passages: int = Field(3, ge=0, description="hits retrieved beyond top_k to replace "
                                "removed passages in abstention examples")
    # evaluation and checkpoints
    eval_steps: int = Field(50, ge=1)
    eval_questions: int = Field(64, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    eval_max_new_tokens: int = Field(32, ge=1)
    select_metric: Literal["score", "em", "f1"] = "score"
    patience: int | None = Field(3, ge=1)
    save_steps: int | None = Field(None, ge=1)
    log_steps: int = Field(10, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _room_to_restate(self):
        """A restated answer is a sentence longer than a short one: more room by default."""
        if self.restate:
            if "max_answer_tokens" not in self.model_fields_set:
                self.max_answer_tokens = 64
            if "eval_max_new_tokens" not in self.model_fields_set:
                self.eval_max_new_tokens = 48
        return self


# --- targets (pure) ---------------------------------------------------------------------------
def held_answer(item: QAItem, hit: Hit) -> str | None:
    """The first of ``item.answers`` that ``hit`` holds (whole words after SQuAD normalisation,
    in its title or text), or None. A yes/no answer is held only by a gold document."""
    text = titled_text(hit.title, hit.text)
    for answer in item.answers:
        if answer.strip().lower() in _YES_NO:
            if hit.doc_id in item.doc_ids:
                return answer
            continue
        if contains(text, [answer]):
            return answer
    return None


def answer_source(item: QAItem, passages: Sequence[Hit]) -> tuple[int, str] | None:
    """(number, answer) of the passage an answer is taken from: the first that holds a gold
    answer, a gold document first when several do; None when none does or the item is
    unanswerable."""
    if not item.answerable:
        return None
    holders = [(n, answer) for n, hit in enumerate(passages, start=1)
               if (answer := held_answer(item, hit)) is not None]
    gold = [(n, a) for n, a in holders if passages[n - 1].doc_id in item.doc_ids]
    return (gold or holders or [None])[0]


def answer_target(item: QAItem, passages: Sequence[Hit]) -> str:
    """What serving should answer from ``passages``: ``"<answer> [n]"`` for the passage
    ``answer_source`` names, else ``NO_ANSWER`` (always for an unanswerable item)."""
    source = answer_source(item, passages)
    if source is None:
        return NO_ANSWER
    n, answer = source
    return f"{answer.strip()} [{n}]"


def restatement(item: QAItem, said: str | None, passage: Hit) -> str | None:
    """The sentence a restated target begins with: the base generator's answer ``said``, its
    citation markers removed, when it is one line that states a gold answer (whole words) and
    is no "I don't know."; else the first sentence of ``passage`` (the one the answer is taken
    from) that states it; None when neither does (a yes/no answer, an answer in the title)."""
    if said and "\n" not in said.strip() and ANSWER_CUE not in said and not is_no_answer(said):
        sentence = qa.strip_citations(said)
        if contains(sentence, item.answers):
            return sentence
    for sentence in _SENTENCE_SPLIT.split(passage.text.strip()):
        if contains(sentence, item.answers):
            return sentence.strip()
    return None


def restated_target(sentence: str, target: str) -> str:
    """A restated target: the sentence, then the short answer on its own line after the cue."""
    return f"{sentence.strip()}\n{ANSWER_CUE} {target}"


def moved(item: QAItem, hits: Sequence[Hit], rng: random.Random, *, max_chars: int,
          ) -> list[Hit] | None:
    """``hits`` with the passage the answer is taken from (``answer_source`` of the hits cut to
    ``max_chars``, as the prompt shows them) moved to another place, drawn from ``rng``, the
    others in their order: the same passages, the answer under another number. None when no
    shown passage holds an answer or there is a single passage."""
    source = answer_source(item, [cut_hit(h, max_chars) for h in hits])
    if source is None or len(hits) < 2:
        return None
    rest = list(hits)
    holder = rest.pop(source[0] - 1)
    place = rng.choice([p for p in range(len(hits)) if p != source[0] - 1])
    return rest[:place] + [holder] + rest[place:]


def without_answer(item: QAItem, hits: Sequence[Hit]) -> list[Hit]:
    """``hits`` without the gold documents and without every hit that holds an answer."""
    return [h for h in hits if h.doc_id not in item.doc_ids and held_answer(item, h) is None]


def answer_cut(item: QAItem, hits: Sequence[Hit]) -> list[Hit] | None:
    """``hits`` with every sentence that states an answer of ``item`` cut out: the same
    passages, the question's own document among them, that no longer say the answer. A hit
    whose title names the answer, or with no sentence left, is dropped. None when no passage
    is left, when the answers still occur (across a sentence split), or for a yes/no answer,
    which no sentence states."""
    if any(a.strip().lower() in _YES_NO for a in item.answers):
        return None
    kept = []
    for hit in hits:
        if contains(hit.title, item.answers):
            continue
        sentences = [s for s in _SENTENCE_SPLIT.split(hit.text.strip())
                     if s and not contains(s, item.answers)]
        if sentences:
            kept.append(hit.model_copy(update={"text": " ".join(sentences)}))
    if not kept or any(held_answer(item, h) is not None for h in kept):
        return None
    return kept


# --- examples ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One tokenised training example. Decoder-only: ``input_ids`` = prompt + target, ``labels``
    = -100 over the prompt, then the target ids. Encoder-decoder: ``input_ids`` = prompt,
    ``labels`` = target ids. The target ends with the end token."""

    id: str
    kind: str
    target: str
    passages: tuple[str, ...]
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def end_token(model, tokenizer) -> int:
    """The token a target ends with: the tokenizer's eos (ChatML's end of turn), else the
    model's."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    ids = qa.eos_ids(model, tokenizer)
    if not ids:
        raise ValueError("neither the tokenizer nor the model names an eos token")
    return ids[0]


def encode_example(prompt: Sequence[int], target_ids: Sequence[int], *, seq2seq: bool,
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input_ids, labels) of a prompt and its target ids (end token included)."""
    if seq2seq:
        return tuple(prompt), tuple(target_ids)
    return tuple(prompt) + tuple(target_ids), (IGNORE,) * len(prompt) + tuple(target_ids)


@dataclass(frozen=True)
class Encoding:
    """What building examples needs to know about the model."""

    tokenizer: Any
    seq2seq: bool
    end: int
    context: int


def _make_example(enc: Encoding, config: GeneratorTrainConfig, item: QAItem,
                  hits: Sequence[Hit], kind: str | None, suffix: str = "",
                  said: Mapping[str, str] | None = None) -> Example:
    limit = min(config.max_seq_len, enc.context)
    # Room for the longest answer allowed; an encoder-decoder's answer is not in its input.
    budget = limit if enc.seq2seq else limit - config.max_answer_tokens - 1
    try:
        kept, prompt = qa.fit_prompt(enc.tokenizer, item.question, hits,
                                     config.max_passage_chars, budget)
    except qa.PromptTooLong as exc:
        raise ValueError(f"item {item.id!r}: its prompt cannot fit max_seq_len="
                         f"{config.max_seq_len} (context {enc.context}): {exc}") from None
    # The target may cite only what the prompt shows: each passage cut as the prompt cuts it.
    shown = [cut_hit(h, config.max_passage_chars) for h in kept]
    target = NO_ANSWER if kind in (GOLD_REMOVED, ANSWER_CUT) else answer_target(item, shown)
    if kind is None:
        kind = ANSWER if target != NO_ANSWER else (
            NOT_FOUND if item.answerable else UNANSWERABLE)
    target_ids = list(enc.tokenizer(target, add_special_tokens=False)["input_ids"])
    if said is not None and kind in (ANSWER, MOVED):
        source = answer_source(item, shown)
        sentence = source and restatement(item, said.get(item.id), shown[source[0] - 1])
        if sentence:
            longer = restated_target(sentence, target)
            longer_ids = list(enc.tokenizer(longer, add_special_tokens=False)["input_ids"])
            if len(longer_ids) <= config.max_answer_tokens:  # else the short target alone
                target, target_ids = longer, longer_ids
    if len(target_ids) > config.max_answer_tokens:
        raise ValueError(f"item {item.id!r}: the answer {target!r} is {len(target_ids)} tokens, "
                         f"over max_answer_tokens={config.max_answer_tokens}")
    input_ids, labels = encode_example(prompt, target_ids + [enc.end], seq2seq=enc.seq2seq)
    return Example(id=item.id + suffix, kind=kind, target=target,
                   passages=tuple(h.doc_id for h in kept), input_ids=input_ids, labels=labels)


def build_examples(items: Sequence[QAItem], passages: Mapping[str, Sequence[Hit]],
                   enc: Encoding, config: GeneratorTrainConfig, *, abstain_fraction: float,
                   not_found_fraction: float = 1.0, answer_cut_fraction: float = 0.0,
                   moved_fraction: float = 0.0, said: Mapping[str, str] | None = None,
                   ) -> list[Example]:
    """One example per item from its first ``top_k`` hits — ``NOT_FOUND`` ones only for a
    seeded ``not_found_fraction`` of them — plus, for a seeded ``abstain_fraction`` of the
    ``ANSWER`` examples, a ``GOLD_REMOVED`` copy whose passages are the first ``top_k`` hits
    that neither are gold nor hold an answer (skipped when none is left): the same question
    once answerable, once not; and for a seeded ``answer_cut_fraction`` of them an
    ``ANSWER_CUT`` copy: the same passages with the sentences stating the answer cut out
    (``answer_cut``; skipped when it gives none); and for a seeded ``moved_fraction`` of them a
    ``MOVED`` copy: the same passages with the answer's one in another place (``moved``).
    With ``said`` (item id -> the base generator's answer to the item's prompt) the ``ANSWER``
    and ``MOVED`` targets are restated (``restatement``; the short target alone where no
    sentence states the answer or the restated one is over ``max_answer_tokens``). Raises
    ValueError naming the item for an answer over ``max_answer_tokens`` or a prompt that
    cannot fit."""
    rng = random.Random(config.seed)
    # Their own generators, so that adding cut or moved copies leaves the other picks alone.
    cut_rng = random.Random(f"{config.seed}/answer_cut")
    move_rng = random.Random(f"{config.seed}/moved")
    examples = []
    for item in items:
        hits = list(passages[item.question])
        example = _make_example(enc, config, item, hits[:config.top_k], None, said=said)
        # One draw per item for each choice, so either fraction leaves the other's picks alone.
        keep, copy_ = rng.random() < not_found_fraction, rng.random() < abstain_fraction
        if example.kind != NOT_FOUND or keep:
            examples.append(example)
        if example.kind == ANSWER and copy_:
            others = without_answer(item, hits)[:config.top_k]
            if others:
                examples.append(_make_example(enc, config, item, others, GOLD_REMOVED,
                                              "#gold_removed"))
        if example.kind == ANSWER and cut_rng.random() < answer_cut_fraction:
            cut = answer_cut(item, hits[:config.top_k])
            if cut:
                examples.append(_make_example(enc, config, item, cut, ANSWER_CUT,
                                              "#answer_cut"))
        if example.kind == ANSWER and move_rng.random() < moved_fraction:
            other_order = moved(item, hits[:config.top_k], move_rng,
                                max_chars=config.max_passage_chars)
            if other_order:
                examples.append(_make_example(enc, config, item, other_order, MOVED, "#moved",
                                              said))
    return examples


def collate(examples: Sequence[Example], pad: int, *, seq2seq: bool) -> dict[str, torch.Tensor]:
    """Pad a batch on the right: ``input_ids``, ``attention_mask``, ``labels`` (-100 where
    padded). Right, not left: a left-padded row's first pad attends to nothing (the causal
    mask allows only itself, the padding mask not even that), and fused attention kernels
    may return NaN for such a row, which the backward pass spreads into every gradient
    (0 * NaN) even though no loss depends on it."""
    n = len(examples)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    label_width = max(len(e.labels) for e in examples)
    labels = torch.full((n, label_width), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[r, :len(e.input_ids)] = 1
        labels[r, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many last positions of a ``collate``d batch with ``labels`` predict a target token:
    from the position before the batch's earliest target on."""
    labelled = labels != IGNORE
    return labels.shape[1] - int(labelled.int().argmax(-1).min()) + 1


def keep_kwargs(model, labels: torch.Tensor) -> dict[str, int]:
    """``logits_to_keep`` for ``model``'s forward when it accepts it (else no argument)."""
    return {"logits_to_keep": logits_to_keep(labels)} if _keeps_logits(model) else {}


def target_logits(model, batch: Mapping[str, torch.Tensor], *,
                  logits: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (B, S, V) float32, targets (B, S), mask (B, S) bool) of a decoder-only model on a
    ``collate``d batch: column j holds the logits that predict a row's j-th target token
    (aligned at the target's start, as ``target_logprobs`` aligns its log-probs); past a row's
    target the mask is False and the target -100. Only the logits from the batch's earliest
    target on are computed when the model accepts ``logits_to_keep`` (the vocabulary
    projection of a whole long prompt is the largest activation of a step). ``logits``: the
    model's output on the batch already computed (every position, or at least the last
    ``logits_to_keep``); the model is then not run."""
    labels = batch["labels"]
    labelled = labels != IGNORE
    width = labels.shape[1]
    lengths = labelled.sum(-1)
    starts = labelled.int().argmax(-1)  # a target's tokens are contiguous
    span, first = int(lengths.max()), int(starts.min())
    keep = width - first + 1  # logits from position first - 1, which predicts token first
    if logits is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       **keep_kwargs(model, labels)).logits
    logits = logits[:, -keep:]
    steps = torch.arange(span, device=labels.device)
    # target token j of row r sits at starts[r] + j; the logit before it is column
    # starts[r] + j - first of the kept ones
    columns = ((starts - first)[:, None] + steps[None, :]).clamp(max=keep - 1)
    logits = logits.gather(1, columns[..., None].expand(-1, -1, logits.shape[-1]))
    mask = steps[None, :] < lengths[:, None]
    targets = labels.gather(1, (starts[:, None] + steps[None, :]).clamp(max=width - 1))
    return logits.float(), targets.masked_fill(~mask, IGNORE), mask


def target_logprobs(model, batch: Mapping[str, torch.Tensor], *, seq2seq: bool,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token, mask) for a ``collate``d batch, both (batch, T) with T the
    longest target, aligned at the target's start: column j is a row's j-th target token
    (so rows with one target line up token by token, as RAG-Token needs); past a row's
    target the mask is 0 and the log-prob 0. Log-probs are float32.

    Decoder-only: ``target_logits``, so only the target positions go through log-softmax.
    """
    labels = batch["labels"]
    if seq2seq:
        decoder_ids = _base_model(model).prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_ids).logits
        targets = labels
        mask = targets != IGNORE
    else:
        logits, targets, mask = target_logits(model, batch)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


# --- the loss (pure) --------------------------------------------------------------------------
def answer_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per answer token: -Σ mask·log p / Σ mask, a scalar.

    Maximum likelihood of the reference answer given the prompt, the prompt itself carrying no
    loss (instruction tuning as in Ouyang et al. 2022, "Training language models to follow
    instructions with human feedback"; over retrieved passages as in RA-DIT, Lin et al. 2023).
    Every answer token weighs the same, so long answers are not down-weighted per token.
    """
    mask = mask.to(token_logprobs.dtype)
    return -(token_logprobs * mask).sum() / mask.sum().clamp(min=1.0)


# --- LoRA and saving --------------------------------------------------------------------------
def with_lora(model, options: LoraOptions):
    """``model`` wrapped by peft with LoRA adapters (its base weights frozen, adapted in place)."""
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if qa.is_seq2seq(model) else TaskType.CAUSAL_LM
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=options.target_modules, task_type=task)
    return get_peft_model(model, config)


def checkpoint_activations(model) -> None:
    """Activation checkpointing on ``model`` (a peft model's base model): each layer keeps only
    its input and recomputes its activations in the backward pass (non-reentrant, so frozen
    LoRA base weights need no special inputs)."""
    _base_model(model).activation_checkpointing_enable()


def plain_model(model):
    """A plain transformers model to save: ``model`` itself, or for a peft model a copy with
    the adapters merged into the base weights (serving loads it like any model)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()


def load_weights(model, folder: Path) -> None:
    """Copy the safetensors weights saved in ``folder`` into ``model`` (tied weights may be
    absent from the file). Raises ValueError when the file names weights the model lacks."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(path))
    if not weights:
        raise ValueError(f"{folder}: no safetensors weights")
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{folder}: weights the model lacks, e.g. {result.unexpected_keys[:3]}")


# --- the run ----------------------------------------------------------------------------------
@dataclass
class GeneratorTrainResult:
    """What a run made. ``model_dir`` holds the best checkpoint (a plain model, LoRA merged);
    ``best_metrics`` its dev metrics (empty without dev questions, when the last step is
    saved). ``examples`` counts the training examples by kind; ``examples_per_s`` is over the
    training steps alone (evaluation excluded)."""

    model_dir: Path
    steps: int
    total_steps: int
    best_step: int
    best_metrics: dict[str, float | None]
    stopped_early: bool
    resumed_from: int | None
    elapsed_s: float
    train_s: float
    examples: dict[str, int]
    examples_per_s: float
    report_path: Path
    plot_path: Path
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def total_steps(n_examples: int, config: GeneratorTrainConfig) -> int:
    """Optimiser steps of a run: ``max_steps``, else ``epochs`` passes over the examples."""
    if config.max_steps is not None:
        return config.max_steps
    batches = math.ceil(n_examples / config.batch_size)
    return math.ceil(batches * config.epochs / config.grad_accum)


class BatchOrder:
    """Micro-batch ``g`` of the run: epoch ``g // per_epoch`` in that epoch's seeded order, so
    the order depends only on (seed, g) and a resumed run sees the same batches."""

    def __init__(self, examples: Sequence[Any], batch_size: int, seed: int) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._epoch = -1
        self._order: list[int] = []

    def __call__(self, g: int) -> list[Any]:
        epoch, index = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=gen).tolist()
            self._epoch = epoch
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return [self.examples[i] for i in rows]


def _dev_sample(items: Sequence[QAItem], n: int, seed: int) -> list[QAItem]:
    items = list(items)
    if len(items) <= n:
        return items
    return random.Random(seed).sample(items, n)


@dataclass
class _Dev:
    items: list[QAItem]
    prompts: list[list[int]]
    passages: list[list[Hit]]
    examples: list[Example]


def _dev_set(dev_items: Sequence[QAItem], retrieval: qa.Retrieval, enc: Encoding,
             config: GeneratorTrainConfig) -> _Dev:
    """``config``'s seeded sample of ``dev_items`` with serving's prompts and their examples.
    Raises ValueError for ``select_metric`` "em"/"f1" and no answerable question in it."""
    items = _dev_sample(dev_items, config.eval_questions, config.seed)
    if config.select_metric in ("em", "f1") and items and not any(i.answerable for i in items):
        raise ValueError(f"select_metric {config.select_metric!r} needs answerable dev "
                         "questions; the dev sample has none (use 'score')")
    if not items:
        return _Dev([], [], [], [])
    passages = qa.retrieve(retrieval, [i.question for i in items], config.top_k)
    budget = enc.context - (0 if enc.seq2seq else config.eval_max_new_tokens)
    fitted = [qa.fit_prompt(enc.tokenizer, i.question, passages[i.question],
                            config.max_passage_chars, budget) for i in items]
    return _Dev(items, [ids for _, ids in fitted], [kept for kept, _ in fitted],
                build_examples(items, passages, enc, config, abstain_fraction=0.0))


def evaluate_generator(config: GeneratorTrainConfig, model, tokenizer,
                       dev_items: Sequence[QAItem], retrieval: qa.Retrieval,
                       ) -> dict[str, float | None]:
    """The dev metrics a ``train_generator`` run with ``config`` reports at an evaluation
    (``qa.summarise`` and ``dev_loss``, on the same seeded sample of ``dev_items``), for a
    model made otherwise (a soup of runs); empty for no dev item. ``model`` is left in eval
    mode on ``config``'s device."""
    device, amp = loop.pick_device(config.device)
    seq2seq = qa.is_seq2seq(model)
    enc = Encoding(tokenizer=tokenizer, seq2seq=seq2seq, end=end_token(model, tokenizer),
                   context=qa.context_size(model, tokenizer))
    dev = _dev_set(dev_items, retrieval, enc, config)
    if not dev.items:
        return {}
    model.to(device)
    metrics = _evaluate(model, tokenizer, dev, config, qa.pad_id(tokenizer, qa.eos_ids(
        model, tokenizer)), seq2seq, device, amp)
    model.eval()
    return metrics


def _evaluate(model, tokenizer, dev: _Dev, config: GeneratorTrainConfig, pad: int,
              seq2seq: bool, device: torch.device, amp: torch.dtype) -> dict[str, float | None]:
    """Dev metrics (``qa.summarise``) and the dev loss, the model left in train mode."""
    model.eval()
    answers = qa.generate_answers(model, tokenizer, dev.prompts,
                                  max_new_tokens=config.eval_max_new_tokens,
                                  batch_size=config.eval_batch_size)
    rows = [qa.score_row(item, answer, hits)
            for item, answer, hits in zip(dev.items, answers, dev.passages, strict=True)]
    metrics: dict[str, float | None] = dict(asdict(qa.summarise(rows)))
    total, count = 0.0, 0.0
    with torch.no_grad(), _autocast(device, amp):
        for start in range(0, len(dev.examples), config.eval_batch_size):
            batch = collate(dev.examples[start:start + config.eval_batch_size], pad,
                            seq2seq=seq2seq)
            lp, mask = target_logprobs(model, _to(batch, device), seq2seq=seq2seq)
            total += float(-(lp * mask).sum())
            count += float(mask.sum())
    metrics["dev_loss"] = round(total / count, 5) if count else None
    model.train()
    return metrics


def _autocast(device: torch.device, amp: torch.dtype):
    return torch.autocast(device.type, dtype=amp,
                          enabled=device.type == "cuda" and amp != torch.float32)


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def base_answers(model, tokenizer, examples: Sequence[Example], config: GeneratorTrainConfig,
                 *, seq2seq: bool, cache: Path) -> dict[str, str]:
    """item id -> ``model``'s greedy answer to the prompt of its ``ANSWER`` example (what a
    restated target starts from: ``restatement``), ``eval_max_new_tokens`` new tokens. The
    model is left in eval mode.

    ``cache`` (a JSON file, created if missing) keeps the answers by model name, token budget
    and prompt, so the other seeds of a job and a resumed run do not generate them again
    (minutes on a CPU)."""
    answered = [e for e in examples if e.kind == ANSWER]
    # a decoder-only example's prompt is its input up to the first label that carries loss
    prompts = [list(e.input_ids if seq2seq else e.input_ids[:e.labels.count(IGNORE)])
               for e in answered]
    name = str(getattr(model.config, "name_or_path", ""))
    keys = [loop.fingerprint([name, config.eval_max_new_tokens, prompt]) for prompt in prompts]
    known: dict[str, str] = json.loads(cache.read_text()) if cache.is_file() else {}
    todo = list({k: p for k, p in zip(keys, prompts, strict=True) if k not in known}.items())
    log.info("restate: the base generator answers %d of %d training prompts (the others were "
             "answered before or repeat one)", len(todo), len(prompts))
    if todo:
        answers = qa.generate_answers(model, tokenizer, [p for _, p in todo],
                                      max_new_tokens=config.eval_max_new_tokens,
                                      batch_size=config.eval_batch_size)
        known.update(zip([k for k, _ in todo], answers, strict=True))
        write_text_atomic(cache, json.dumps(known))
    return {e.id: known[k] for e, k in zip(answered, keys, strict=True)}


def train_generator(config: GeneratorTrainConfig, model, tokenizer,
                    train_items: Sequence[QAItem], dev_items: Sequence[QAItem],
                    retrieval: qa.Retrieval, run_dir: Path, *,
                    progress: loop.ProgressFn | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    resume: bool = True,
                    base_answers_file: Path | None = None) -> GeneratorTrainResult:
    """Fine-tune ``model`` (a causal or seq2seq LM, fp32) to answer from retrieved passages.

    ``retrieval`` gives each question's hits, best first (a retriever or precomputed passages,
    see ``services.evaluation.qa.retrieve``): the first ``top_k`` build the prompt, up to
    ``extra_passages`` more replace removed ones in abstention examples. ``dev_items`` may be
    empty (no evaluation; the last step is saved). With ``resume`` a state left in ``run_dir``
    by an earlier run of the same config and data is continued (ValueError for another config
    or data); without it the run starts over.

    Writes into ``run_dir``: ``model/`` (the best checkpoint, ``loop.save_model`` with meta
    kind="generator"), ``state.pt`` (resume state), ``report.json`` and ``report.png``; with
    ``restate``, the base generator's answers to ``base_answers_file`` (default
    ``run_dir / BASE_ANSWERS_FILE``; several runs from one base model may share one). On
    return ``model`` — the object passed in — holds the best checkpoint's weights as a plain
    model (LoRA adapters merged). Progress goes to ``progress`` every ``log_steps`` steps and
    after each evaluation; ``should_stop`` is asked between steps, and when it says so the
    state is saved and ``loop.Cancelled`` raised.

    Raises ValueError before training for no training item, an answer over
    ``max_answer_tokens``, a prompt that cannot fit ``max_seq_len``, a retrieval without
    passages for a question, or ``select_metric`` "em"/"f1" with no answerable dev question.
    """
    run_dir = Path(run_dir)
    if not train_items:
        raise ValueError("no training items: `train_items` is empty")
    started_wall = time.perf_counter()
    loop.seed_everything(config.seed)
    device, amp = loop.pick_device(config.device)
    seq2seq = qa.is_seq2seq(model)
    eos = qa.eos_ids(model, tokenizer)
    pad = qa.pad_id(tokenizer, eos)
    enc = Encoding(tokenizer=tokenizer, seq2seq=seq2seq, end=end_token(model, tokenizer),
                    context=qa.context_size(model, tokenizer))

    # --- data: prompts built once, as serving builds them -------------------------------------
    wanted = config.top_k + (config.extra_passages if config.abstain_fraction > 0 else 0)
    passages = qa.retrieve(retrieval, [i.question for i in train_items], wanted)
    fractions = {"abstain_fraction": config.abstain_fraction,
                 "not_found_fraction": config.not_found_fraction,
                 "answer_cut_fraction": config.answer_cut_fraction,
                 "moved_fraction": config.moved_fraction}
    examples = build_examples(train_items, passages, enc, config, **fractions)
    if config.restate:
        loop.check_cancel(should_stop)
        loop.Reporter(progress, KIND, 0, loop.Clock()).phase("the base answers (restate)")
        said = base_answers(model.to(device), tokenizer, examples, config, seq2seq=seq2seq,
                            cache=base_answers_file or run_dir / BASE_ANSWERS_FILE)
        examples = build_examples(train_items, passages, enc, config, **fractions, said=said)
    if not examples:
        raise ValueError("no training example left (every item was a left-out not-found one)")
    dev = _dev_set(dev_items, retrieval, enc, config)
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    data = loop.fingerprint([{"id": e.id, "input_ids": e.input_ids, "labels": e.labels}
                             for e in examples] + [{"dev": [i.id for i in dev.items]}])
    steps_total = total_steps(len(examples), config)
    log.info("generator SFT: %d examples %s, %d dev questions, %d steps", len(examples), counts,
             len(dev.items), steps_total)

    # --- model and optimiser ------------------------------------------------------------------
    base_model = model
    if config.method == "lora":
        model = with_lora(model, config.lora)
    if config.activation_checkpointing:
        checkpoint_activations(model)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    step, history = 0, {"train": [], "eval": []}
    best: dict[str, Any] = {"value": None, "step": None, "metrics": {}}
    bad_evals, seen, train_s, resumed_from = 0, 0, 0.0, None
    clock = loop.Clock()
    state = loop.load_state(run_dir) if resume else None
    if state is not None:
        loop.check_resumable(state, KIND, config, data, run_dir)
        loop.restore_training_state(state, model, optimizer)
        step, history, best = state["step"], state["history"], state["best"]
        bad_evals, seen, train_s = state["bad_evals"], state["seen"], state["train_s"]
        clock = loop.Clock(state["elapsed_s"])
        resumed_from = step
        log.info("resuming %s at step %d of %d", run_dir, step, steps_total)

    meta_base = {"kind": KIND, "method": config.method, "config": config.model_dump(mode="json"),
                 "data": data, "base_model": str(getattr(base_model.config, "name_or_path", "")),
                 "seq2seq": seq2seq, "target_format": (
                     f"<sentence>\n{ANSWER_CUE} <answer> [<passage number>]" if config.restate
                     else "<answer> [<passage number>]"),
                 "no_answer": NO_ANSWER, "examples": counts}

    def snapshot() -> dict[str, Any]:
        return {"kind": KIND, "config": config.model_dump(mode="json"), "data": data,
                "step": step, **loop.training_state(model, optimizer), "history": history,
                "best": best, "bad_evals": bad_evals, "seen": seen, "train_s": train_s,
                "elapsed_s": clock.elapsed()}

    report = loop.Reporter(progress, KIND, steps_total, clock)
    batches = BatchOrder(examples, config.batch_size, config.seed)
    micro_total = (batches.per_epoch * config.epochs if config.max_steps is None
                   else steps_total * config.grad_accum)
    stopped_early = bool(state is not None and state.get("stopped_early"))
    nonfinite = loop.NonFinite()
    while step < steps_total and not stopped_early:
        loop.stop_if_asked(should_stop, run_dir, snapshot)
        step_started = time.perf_counter()
        lr = loop.set_scheduled_lr(optimizer, config, step, steps_total)
        micro = [g for g in range(step * config.grad_accum, (step + 1) * config.grad_accum)
                 if g < micro_total]
        loss_value = 0.0
        for g in micro:
            batch = batches(g)
            with _autocast(device, amp):
                lp, mask = target_logprobs(model, _to(collate(batch, pad, seq2seq=seq2seq),
                                                      device), seq2seq=seq2seq)
            # Mean over the step's micro-batches: the same step size whatever grad_accum is.
            loss = answer_nll(lp, mask) / len(micro)
            loss.backward()
            loss_value += float(loss.detach())
            seen += len(batch)
        stepped = loop.optimizer_step([optimizer], [params], config.max_grad_norm, loss_value)
        nonfinite.count(stepped, step + 1, loss_value)
        step += 1
        train_s += time.perf_counter() - step_started
        history["train"].append({"step": step, "loss": round(loss_value, 5), "lr": lr,
                                 "elapsed_s": round(clock.elapsed(), 3),
                                 **({} if stepped else {"skipped": True})})

        evaluated = False
        if dev.items and (step % config.eval_steps == 0 or step == steps_total):
            metrics = _evaluate(model, tokenizer, dev, config, pad, seq2seq, device, amp)
            history["eval"].append({"step": step, **metrics})
            value = metrics[config.select_metric]
            if value is not None and (best["value"] is None or value > best["value"]):
                best = {"value": value, "step": step, "metrics": metrics}
                bad_evals = 0
                loop.save_model(run_dir, plain_model(model), tokenizer,
                                {**meta_base, "step": step, "metrics": metrics,
                                 "history": history["eval"]})
            else:
                bad_evals += 1
                stopped_early = config.patience is not None and bad_evals >= config.patience
            log.info("step %d: dev %s (best %s at step %s)", step,
                     {k: v for k, v in metrics.items() if k in ("em", "f1", "score",
                                                                "dev_loss")},
                     best["value"], best["step"])
            report(step, loss_value, lr, metrics)
            evaluated = True
        save_every = config.save_steps or (config.eval_steps if dev.items else None)
        if (save_every and step % save_every == 0) or evaluated or stopped_early:
            loop.save_state(run_dir, {**snapshot(), "stopped_early": stopped_early})
        if not evaluated and (step % config.log_steps == 0 or step == steps_total):
            report(step, loss_value, lr)

    model_dir = run_dir / loop.MODEL_DIR
    if best["step"] is None:  # no dev questions: the last step is the result
        best = {"value": None, "step": step, "metrics": {}}
        loop.save_model(run_dir, plain_model(model), tokenizer,
                        {**meta_base, "step": step, "metrics": {}, "history": []})
    # Hand the caller its own model object back, plain, with the best weights.
    final = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    if config.activation_checkpointing:
        final.activation_checkpointing_disable()
    if best["step"] != step:
        load_weights(final, model_dir)
    final.eval()
    if final is not base_model:  # peft adapts the base model in place; this never happens
        log.warning("the trained model is a new object; use the saved %s", model_dir)
    elapsed = clock.elapsed()
    result = GeneratorTrainResult(
        model_dir=model_dir, steps=step, total_steps=steps_total, best_step=best["step"],
        best_metrics=best["metrics"], stopped_early=stopped_early, resumed_from=resumed_from,
        elapsed_s=round(elapsed, 3), train_s=round(train_s, 3), examples=counts,
        examples_per_s=round(seen / train_s, 3) if train_s else 0.0,
        report_path=run_dir / loop.REPORT_JSON, plot_path=run_dir / loop.REPORT_PNG,
        history=history)
    loop.write_report(run_dir, {**{k: v for k, v in asdict(result).items() if k != "history"},
                                "config": config.model_dump(mode="json"), "data": data,
                                "dev_questions": len(dev.items), "history": history,
                                "wall_s": round(time.perf_counter() - started_wall, 3)},
                      f"generator fine-tuning ({config.method}), best step {best['step']}")
    return result
