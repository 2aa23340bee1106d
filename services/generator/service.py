"""The generator service as a plain class: question + passages -> grounded answer.

Model and tokenizer come in through the constructor (a tiny random model in unit tests);
``from_settings`` builds the real ones. No Ray, no Redis here: the deployment wraps this class.
"""

from __future__ import annotations

import logging
import time

import torch

from shared.models.generator import load_generator
from shared.prompt import (
    NO_ANSWER,
    build_messages,
    clean_answer,
    parse_citations,
)
from shared.schemas import GenerateRequest, GenerateResult, Hit
from shared.settings import Settings

log = logging.getLogger(__name__)


class GenerationError(ValueError):
    """The request cannot be answered as given (e.g. its prompt cannot fit the context)."""


class GeneratorService:
    """Greedy, grounded answers from a causal chat LM.

    ``max_passage_chars`` cuts every passage text (see ``prompt.truncate_text``).
    ``max_context_tokens`` is the model's window (prompt + new tokens); ``None`` reads
    ``model.config.max_position_embeddings``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_passage_chars: int,
        max_context_tokens: int | None = None,
    ) -> None:
        if max_passage_chars < 1:
            raise ValueError(
                f"`max_passage_chars` has to be a positive integer, but is {max_passage_chars}"
            )
        if max_context_tokens is None:
            max_context_tokens = getattr(model.config, "max_position_embeddings", None)
            if max_context_tokens is None:
                raise ValueError(
                    "model.config has no max_position_embeddings: pass `max_context_tokens`"
                )
        if max_context_tokens < 2:
            raise ValueError(
                f"`max_context_tokens` has to be at least 2, but is {max_context_tokens}"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_passage_chars = max_passage_chars
        self.max_context_tokens = max_context_tokens
        self._eos_ids = _eos_ids(model, tokenizer)
        self._pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (self._eos_ids[0] if self._eos_ids else None)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> GeneratorService:
        model, tokenizer = load_generator(settings)
        return cls(model, tokenizer, max_passage_chars=settings.generator.max_passage_chars)

    def generate(self, req: GenerateRequest) -> GenerateResult:
        """Answer ``req.question`` from ``req.passages`` by greedy decoding.

        With no passages the answer is ``NO_ANSWER`` without running the model (nothing to
        ground on; 0 tokens reported). When the prompt would not leave ``req.max_new_tokens``
        in the context window, passages are dropped from the end (the lowest ranked) until it
        fits; citation numbers still refer to ``req.passages``. An empty completion is
        reported as ``NO_ANSWER``. ``prompt_tokens`` counts the chat-formatted prompt,
        ``completion_tokens`` the new tokens without a final end-of-sequence token. Raises
        ``GenerationError`` when ``max_new_tokens`` alone fills the window or not even the
        first passage fits.
        """
        if not req.passages:
            return GenerateResult(
                answer=NO_ANSWER, citations=[], prompt_tokens=0, completion_tokens=0
            )
        budget = self.max_context_tokens - req.max_new_tokens
        if budget < 1:
            raise GenerationError(
                f"generator: max_new_tokens ({req.max_new_tokens}) leaves no room for a prompt "
                f"in a context of {self.max_context_tokens} tokens"
            )
        passages, inputs = self._fit(req.question, req.passages, budget)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        inputs = inputs.to(self.model.device)

        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=req.max_new_tokens,
                eos_token_id=self._eos_ids or None,
                pad_token_id=self._pad_id,
                # greedy: unset the sampling defaults a generation_config may carry
                temperature=None,
                top_p=None,
                top_k=None,
            )
        new_ids = output[0, prompt_tokens:].tolist()
        stopped = bool(new_ids) and new_ids[-1] in self._eos_ids
        completion_tokens = len(new_ids) - int(stopped)
        raw = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        answer = clean_answer(raw, truncated=not stopped) or NO_ANSWER
        log.debug(
            "generated %d tokens in %.2f s from %d passages",
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

    def _fit(self, question: str, passages: list[Hit], budget: int):
        """The longest prefix of ``passages`` whose prompt is at most ``budget`` tokens."""
        for keep in range(len(passages), 0, -1):
            inputs = self.tokenizer.apply_chat_template(
                build_messages(question, passages[:keep], self.max_passage_chars),
                add_generation_prompt=True,
                return_dict=True,
                return_tensors="pt",
            )
            length = int(inputs["input_ids"].shape[1])
            if length <= budget:
                if keep < len(passages):
                    log.warning(
                        "prompt too long: kept %d of %d passages (%d tokens, budget %d)",
                        keep,
                        len(passages),
                        length,
                        budget,
                    )
                return passages[:keep], inputs
        raise GenerationError(
            f"generator: the question with even one passage needs {length} prompt tokens, "
            f"over the budget of {budget} (context {self.max_context_tokens} minus "
            f"max_new_tokens); shorten the question or generator.max_passage_chars"
        )


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
