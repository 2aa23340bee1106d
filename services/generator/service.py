"""The generator service as a plain class: question + passages -> grounded answer.

Model and tokenizer come in through the constructor (a tiny random model in unit tests);
``from_settings`` builds the real ones. No Ray, no Redis here: the deployment wraps this class.
Decoding rules live in ``services.generator.decoding``; this class packs the prompt into the
context window, runs ``model.generate`` over one request or a batch of them (left-padded for
a decoder-only model), streams the text of each as it is generated
(``services.generator.streaming``) and turns the output into ``GenerateResult``s. Forming the
batches out of concurrent requests is ``services.generator.batching``'s job.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

from services.generator.decoding import StopOnStrings, cut_at_stop, make_plan
from services.generator.streaming import BatchStreamer, CancelRows, Sink
from shared.bus import BadRequest
from shared.models.generator import eos_ids, load_generator
from shared.prompt import (
    NO_ANSWER,
    build_messages,
    clean_answer,
    cut_hit,
    parse_citations,
    truncate_text,
)
from shared.registry import META_FILE, Registry, read_meta
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


def trained_to_restate(model: str | None) -> bool:
    """Whether the model folder ``model`` was fine-tuned with ``restate`` (its ``ragtune.json``
    config says so); False for a folder without one, a hub id or ``None``."""
    if not model or not (Path(model) / META_FILE).is_file():
        return False
    return bool(read_meta(Path(model)).get("config", {}).get("restate", False))


def batch_key(req: GenerateRequest) -> str:
    """Requests with equal keys may share a batch: they decode by the same options to the same
    length. An unseeded sample draws a seed of its own, so its key is unique (never shared)."""
    if req.decoding.strategy == "sample" and req.decoding.seed is None:
        return f"unseeded:{uuid.uuid4().hex}"
    return _plan_key(req)


def _plan_key(req: GenerateRequest) -> str:
    decoding = req.decoding.model_copy(update={"max_new_tokens": None})  # resolved in req
    return f"{req.max_new_tokens}:{decoding.model_dump_json()}"


class GeneratorService:
    """Grounded answers from a decoder-only or an encoder-decoder LM, decoded per request.

    ``max_passage_chars`` cuts every passage text (see ``prompt.truncate_text``).
    ``max_context_tokens`` is the model's window: prompt + new tokens for a decoder-only model;
    the prompt (encoder input), and separately the new tokens, for an encoder-decoder one.
    ``None`` reads ``model.config.max_position_embeddings``, else ``n_positions``, else the
    tokenizer's ``model_max_length``. ``max_new_tokens_limit`` caps what a request may ask
    for (``None``: only the context window does). A tokenizer with a chat template gets chat
    messages, one without gets ``plain_prompt``. ``restated``: the model was fine-tuned to
    answer after ``ANSWER_CUE`` (a trained folder's ``ragtune.json`` says so,
    ``from_settings`` reads it); its answer, streamed and final, is what follows the first
    cue (``prompt.clean_answer``). Any other model's "Answer:" line is part of its answer.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_passage_chars: int,
        max_context_tokens: int | None = None,
        max_new_tokens_limit: int | None = None,
        restated: bool = False,
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
        self.restated = restated
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        self._eos_ids = eos_ids(model, tokenizer)
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
                   max_new_tokens_limit=settings.generator.max_new_tokens_limit,
                   restated=trained_to_restate(settings.generator.model))

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
        (result,) = self.generate_batch([req])
        if isinstance(result, GenerationError):
            raise result
        return result

    def generate_batch(
        self,
        reqs: Sequence[GenerateRequest],
        sinks: Sequence[Sink | None] | None = None,
        cancelled: Sequence[threading.Event | None] | None = None,
    ) -> list[GenerateResult | GenerationError]:
        """``generate`` for several requests in one ``model.generate`` call, in order; a
        request that cannot be answered gets its ``GenerationError`` in its place.

        All must have the same decoding options and ``max_new_tokens`` (ValueError
        otherwise); unseeded sampling requests batched here share one drawn seed.
        Prompts of different lengths are padded on the left for a decoder-only model (on the
        right for an encoder-decoder one) and masked, so each greedy answer is the one it gets
        alone. ``sinks[i]`` (called from this thread) receives request i's answer in pieces
        while it is generated; they concatenate to the final answer, except that an answer
        cut at ``max_new_tokens`` may have streamed a trailing fragment the answer drops
        (see ``streaming.streamable``). Beam search streams the whole answer at the end.
        Setting ``cancelled[i]`` ends request i early; its result holds what it had.
        """
        n = len(reqs)
        sinks = list(sinks) if sinks is not None else [None] * n
        cancelled = list(cancelled) if cancelled is not None else [None] * n
        if len({_plan_key(r) for r in reqs}) > 1 or len(sinks) != n or len(cancelled) != n:
            raise ValueError("a batch needs one decoding plan (equal options and "
                             "max_new_tokens) and one sink and one cancel event (or None) "
                             "per request")
        results: list[GenerateResult | GenerationError | None] = [None] * n
        rows: list[tuple[int, list[Hit], torch.Tensor]] = []
        for i, req in enumerate(reqs):
            if not req.passages:
                results[i] = GenerateResult(answer=NO_ANSWER, citations=[], prompt_tokens=0,
                                            completion_tokens=0, shown_chars=[])
                continue
            try:
                passages, inputs = self._prepare(req)
            except GenerationError as exc:
                results[i] = exc
                continue
            rows.append((i, passages, inputs["input_ids"][0]))
        streamer = None
        live = [i for i, _, _ in rows]
        if rows:
            try:
                outputs, streamer = self._run([reqs[i] for i in live], [ids for *_, ids in rows],
                                              [sinks[i] for i in live],
                                              [cancelled[i] for i in live])
            except GenerationError as exc:
                outputs = [exc] * len(rows)
            for (i, passages, _), out in zip(rows, outputs, strict=True):
                results[i] = out if isinstance(out, GenerationError) else \
                    self._result(reqs[i], passages, *out)
        for i, result in enumerate(results):
            if sinks[i] is None or isinstance(result, GenerationError):
                continue
            if streamer is not None and i in live:
                streamer.finish(live.index(i), result.answer)
            else:
                sinks[i](result.answer)
        return results

    def _prepare(self, req: GenerateRequest):
        """``(passages, inputs)`` of one request, or GenerationError for a length it may not
        have or a prompt that cannot fit."""
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
        return self.pack(req.question, req.passages, budget)

    def _run(self, reqs: list[GenerateRequest], prompts: list[torch.Tensor],
             sinks: list[Sink | None], cancelled: list[threading.Event | None]):
        """One ``model.generate`` over the prompts (1-D token ids each), decoded by the first
        request's plan. Returns ``([(new_ids, prompt_tokens, stop), ...], streamer)``:
        each row's generated ids up to and including its end-of-sequence token."""
        req = reqs[0]
        width = max(len(p) for p in prompts)
        pad = self._pad_id if self._pad_id is not None else 0
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            # Left padding for a decoder-only model: every row's next token follows its
            # prompt's last one, at the same column.
            span = slice(0, len(prompt)) if self.encoder_decoder else slice(width - len(prompt),
                                                                            width)
            input_ids[row, span] = prompt
            mask[row, span] = 1
        # Output rows start with what was not generated: the (padded) prompt for a decoder-only
        # model, the decoder start token for an encoder-decoder one.
        offset = 1 if self.encoder_decoder else width
        try:
            plan = make_plan(req.decoding, req.max_new_tokens, offset)
        except ValueError as exc:
            raise GenerationError(f"generator: {exc}") from exc
        criteria = [StopOnStrings(self.tokenizer, plan.stop, offset)] if plan.stop else []
        if any(event is not None for event in cancelled):
            criteria.append(CancelRows(cancelled))
        streamer = None
        if plan.num_beams == 1 and any(sink is not None for sink in sinks):
            streamer = BatchStreamer(self.tokenizer, sinks, self._eos_ids, plan.stop, cancelled,
                                     cued=self.restated)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                **plan.generate_kwargs(),
                stopping_criteria=StoppingCriteriaList(criteria),
                eos_token_id=self._eos_ids or None,
                pad_token_id=self._pad_id,
                streamer=streamer,
            )
        rows = [(self._trim(output[row, offset:].tolist()), len(prompt), plan.stop)
                for row, prompt in enumerate(prompts)]
        log.debug("%s: batch of %d, %d tokens in %.2f s", req.decoding.strategy, len(prompts),
                  sum(len(ids) for ids, _, _ in rows), time.perf_counter() - started)
        return rows, streamer

    def _trim(self, new_ids: list[int]) -> list[int]:
        """A row's generated ids up to its first end-of-sequence token (kept); in a batch, a
        row that ended early is padded after it, or after its stop string."""
        for end, token in enumerate(new_ids):
            if token in self._eos_ids:
                return new_ids[: end + 1]
        while new_ids and new_ids[-1] == self._pad_id:
            new_ids = new_ids[:-1]
        return new_ids

    def _result(self, req: GenerateRequest, passages: list[Hit], new_ids: list[int],
                prompt_tokens: int, stop: tuple[str, ...]) -> GenerateResult:
        ended = bool(new_ids) and new_ids[-1] in self._eos_ids
        raw, cut = cut_at_stop(self.tokenizer.decode(new_ids, skip_special_tokens=True), stop)
        # the streamer cuts at the cue by the same flag, so the stream begins this answer
        answer = clean_answer(raw, truncated=not (ended or cut), cued=self.restated) or NO_ANSWER
        return GenerateResult(
            answer=answer,
            citations=parse_citations(answer, passages, question=req.question),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_ids) - int(ended),
            shown_chars=[len(truncate_text(h.text, self.max_passage_chars)) for h in passages],
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
            shortest = self._encode(question, [cut_hit(passages[0], MIN_PARTIAL_CHARS)])
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
            cut = cut_hit(hit, middle)
            inputs = self._encode(question, [*kept, cut])
            if _length(inputs) <= budget:
                best, low = (cut, inputs), middle + 1
            else:
                high = middle - 1
        return best


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

