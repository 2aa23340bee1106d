"""The generator service as a plain class: question + passages -> grounded answer.

Model and tokenizer come in through the constructor (a tiny random model in unit tests);
``from_settings`` builds the real ones. No Ray, no Redis here: the deployment wraps this class.
Decoding rules live in ``services.generator.decoding``; this class packs the prompt into the
context window, runs ``model.generate`` and turns its output into a ``GenerateResult``.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import StoppingCriteriaList

from services.generator.decoding import StopOnStrings, cut_at_stop, make_plan
from shared.bus import BadRequest
from shared.models.generator import load_generator
from shared.prompt import (
    NO_ANSWER,
    build_messages,
    clean_answer,
    parse_citations,
    truncate_text,
)
from shared.registry import Registry
from shared.schemas import GenerateRequest, GenerateResult, Hit
from shared.settings import Settings

log = logging.getLogger(__name__)

# The last passage that does not fit whole is cut to what fits, unless less than this many
# characters would be left: about one sentence, below which a cut passage rarely still holds
# a fact and only adds a number the model may cite.
MIN_PARTIAL_CHARS = 100
# tokenizer.model_max_length is this large (transformers' VERY_LARGE_INTEGER) when unknown.
_UNSET_MAX_LENGTH = 10**9


class GenerationError(BadRequest):
    """The request cannot be answered as given: its prompt cannot fit the context, it asks for
    more new tokens than allowed, or its decoding options are refused. A ``BadRequest``, so
    the bus answers it at once (HTTP 400 at the front) instead of retrying it."""


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """The chat messages as one plain-text prompt, for tokenizers without a chat template
    (T5, BART): the same system instruction, passages and question, joined by blank lines
    (as services/evaluation/qa.py builds it, so evaluation and serving see one prompt)."""
    return "\n\n".join(m["content"] for m in messages)


class GeneratorService:
    """Grounded answers from a decoder-only or an encoder-decoder LM, decoded per request.

    ``max_passage_chars`` cuts every passage text (see ``prompt.truncate_text``).
    ``max_context_tokens`` is the model's window: prompt + new tokens for a decoder-only model;
    the prompt (encoder input), and separately the new tokens, for an encoder-decoder one.
    ``None`` reads ``model.config.max_position_embeddings``, else ``n_positions``, else the
    tokenizer's ``model_max_length``. ``max_new_tokens_limit`` caps what a request may ask
    for (``None``: only the context window does). A tokenizer with a chat template gets chat
    messages, one without gets ``plain_prompt``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_passage_chars: int,
        max_context_tokens: int | None = None,
        max_new_tokens_limit: int | None = None,
    ) -> None:
        if max_passage_chars < 1:
            raise ValueError(
                f"`max_passage_chars` has to be a positive integer, but is {max_passage_chars}"
            )
        if max_context_tokens is None:
            max_context_tokens = _context_window(model, tokenizer)
            if max_context_tokens is None:
                raise ValueError(
                    "neither model.config (max_position_embeddings, n_positions) nor the "
                    "tokenizer (model_max_length) gives a context window: pass "
                    "`max_context_tokens`"
                )
        if max_context_tokens < 2:
            raise ValueError(
                f"`max_context_tokens` has to be at least 2, but is {max_context_tokens}"
            )
        if max_new_tokens_limit is not None and max_new_tokens_limit < 1:
            raise ValueError(f"`max_new_tokens_limit` has to be a positive integer, but is "
                             f"{max_new_tokens_limit}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_passage_chars = max_passage_chars
        self.max_context_tokens = max_context_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        self._eos_ids = _eos_ids(model, tokenizer)
        self._pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (self._eos_ids[0] if self._eos_ids else None)
        )

    @classmethod
    def from_settings(cls, settings: Settings, path: str | None = None) -> GeneratorService:
        """The model in folder ``path``, else the registry's serving generator version, else
        ``settings.generator.model`` (or the packaged SmolLM2)."""
        if path is None:
            serving = Registry(settings.checkpoint_dir).serving_path("generator")
            path = None if serving is None else str(serving)
        if path is not None:
            settings = settings.model_copy(update={
                "generator": settings.generator.model_copy(update={"model": path})})
        model, tokenizer = load_generator(settings)
        return cls(model, tokenizer, max_passage_chars=settings.generator.max_passage_chars,
                   max_new_tokens_limit=settings.generator.max_new_tokens_limit)

    def generate(self, req: GenerateRequest) -> GenerateResult:
        """Answer ``req.question`` from ``req.passages``, decoded as ``req.decoding`` says.

        With no passages the answer is ``NO_ANSWER`` without running the model (nothing to
        ground on; 0 tokens reported). Passages are packed by ``pack``: whole in rank order
        while they fit, the first that does not fit cut at a word boundary to what fits, the
        rest dropped; citation numbers refer to the passages as given, in that order. The
        answer ends at end-of-sequence, at ``req.max_new_tokens`` (then a trailing unfinished
        sentence is dropped) or before the first stop string, which it never contains. An
        empty answer is reported as ``NO_ANSWER``. ``prompt_tokens`` counts the formatted
        prompt, ``completion_tokens`` the generated tokens without a final end-of-sequence
        token. Raises ``GenerationError`` when ``max_new_tokens`` is over the limit or leaves
        no room for a prompt, when not even a useful part of the first passage fits, or when
        the decoding options are refused.
        """
        if not req.passages:
            return GenerateResult(
                answer=NO_ANSWER, citations=[], prompt_tokens=0, completion_tokens=0
            )
        max_new = req.max_new_tokens
        if self.max_new_tokens_limit is not None and max_new > self.max_new_tokens_limit:
            raise GenerationError(f"generator: max_new_tokens ({max_new}) is over the limit "
                                  f"of {self.max_new_tokens_limit}")
        budget = self.max_context_tokens - (0 if self.encoder_decoder else max_new)
        if budget < 1 or max_new > self.max_context_tokens:
            raise GenerationError(
                f"generator: max_new_tokens ({max_new}) leaves no room for a prompt "
                f"in a context of {self.max_context_tokens} tokens"
            )
        passages, inputs = self.pack(req.question, req.passages, budget)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        # Output rows start with what was not generated: the prompt for a decoder-only model,
        # the decoder start token for an encoder-decoder one.
        offset = 1 if self.encoder_decoder else prompt_tokens
        try:
            plan = make_plan(req.decoding, max_new, offset)
        except ValueError as exc:
            raise GenerationError(f"generator: {exc}") from exc
        stopping = StoppingCriteriaList(
            [StopOnStrings(self.tokenizer, plan.stop, offset)] if plan.stop else [])

        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                **inputs.to(self.model.device),
                **plan.generate_kwargs(),
                stopping_criteria=stopping,
                eos_token_id=self._eos_ids or None,
                pad_token_id=self._pad_id,
            )
        new_ids = output[0, offset:].tolist()
        ended = bool(new_ids) and new_ids[-1] in self._eos_ids
        completion_tokens = len(new_ids) - int(ended)
        raw, cut = cut_at_stop(self.tokenizer.decode(new_ids, skip_special_tokens=True),
                               plan.stop)
        answer = clean_answer(raw, truncated=not (ended or cut)) or NO_ANSWER
        log.debug(
            "%s: %d tokens in %.2f s from %d passages",
            req.decoding.strategy,
            completion_tokens,
            time.perf_counter() - started,
            len(passages),
        )
        return GenerateResult(
            answer=answer,
            citations=parse_citations(answer, passages, question=req.question),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def _encode(self, question: str, passages: list[Hit]):
        """The model inputs (``input_ids``, ``attention_mask``: (1, tokens)) of the prompt."""
        messages = build_messages(question, passages, self.max_passage_chars)
        if self.chat:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        return self.tokenizer(plain_prompt(messages), return_tensors="pt")

    def pack(self, question: str, passages: list[Hit], budget: int):
        """``(kept, inputs)``: the passages that fit a prompt of at most ``budget`` tokens.

        Whole passages in rank order while they fit; the first that does not fit whole is cut
        at a word boundary to the longest prefix that fits, if that keeps at least
        ``MIN_PARTIAL_CHARS`` characters, else dropped; later passages are dropped. Every
        length is measured by tokenizing the prompt, so it never overflows. Raises
        ``GenerationError`` when not even a cut first passage fits.
        """
        inputs = self._encode(question, passages)
        if _length(inputs) <= budget:
            return passages, inputs
        kept: list[Hit] = []
        for hit in passages:
            candidate = self._encode(question, [*kept, hit])
            if _length(candidate) > budget:
                break
            kept, inputs = [*kept, hit], candidate
        partial = self._longest_prefix(question, kept, passages[len(kept)], budget)
        if partial is not None:
            kept, inputs = [*kept, partial[0]], partial[1]
        if not kept:
            shortest = self._encode(question, [_cut(passages[0], MIN_PARTIAL_CHARS)])
            raise GenerationError(
                f"generator: the question with even the first passage cut to "
                f"{MIN_PARTIAL_CHARS} characters needs {_length(shortest)} prompt tokens, over "
                f"the budget of {budget} tokens left in a {self.max_context_tokens}-token "
                f"context; shorten the question or ask for fewer new tokens"
            )
        log.warning("prompt too long: kept %d of %d passages%s (%d tokens, budget %d)",
                    len(kept), len(passages), ", the last cut" if partial else "",
                    _length(inputs), budget)
        return kept, inputs

    def _longest_prefix(self, question: str, kept: list[Hit], hit: Hit, budget: int):
        """``(cut hit, inputs)`` for the longest word-boundary prefix of ``hit``'s text (at
        least ``MIN_PARTIAL_CHARS``) whose prompt after ``kept`` fits ``budget``, or None.

        Binary search over the cut length: a longer prefix never has fewer tokens.
        """
        text = truncate_text(hit.text, self.max_passage_chars)
        low, high, best = MIN_PARTIAL_CHARS, len(text) - 1, None
        while low <= high:
            middle = (low + high) // 2
            cut = _cut(hit, middle)
            inputs = self._encode(question, [*kept, cut])
            if _length(inputs) <= budget:
                best, low = (cut, inputs), middle + 1
            else:
                high = middle - 1
        return best


def _cut(hit: Hit, max_chars: int) -> Hit:
    return hit.model_copy(update={"text": truncate_text(hit.text, max_chars)})


def _length(inputs) -> int:
    return int(inputs["input_ids"].shape[1])


def _context_window(model, tokenizer) -> int | None:
    """Tokens the model reads at most, from its config or else its tokenizer; None if unknown."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if value and value < _UNSET_MAX_LENGTH else None


def _eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the model's eos id(s) and the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
