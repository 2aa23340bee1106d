"""Decoding strategies: per-request ``DecodingOptions`` (wire) -> a ``DecodingPlan`` to run.

Every rule is a logits processor with transformers' contract ``(input_ids, scores) -> scores``
(``input_ids``: (batch, length) token ids so far; ``scores``: (batch, vocab) next-token logits;
a new tensor is returned, the input is never changed), and a list of them composes by appending.
transformers' own processors are used where they exist (temperature, top-k, top-p, repetition
penalty, no-repeat n-gram); two small ones are ours: ``OnNewTokens`` (a rule that must not see
the prompt) and ``SampleWithGenerator`` (sampling with a per-request random generator).

A strategy is a function in ``STRATEGIES``, chosen by name. The plan is handed to
``model.generate`` as greedy or beam search plus the processor list, so one path serves decoder-
only and encoder-decoder models alike; sampling happens inside the list, not in ``generate``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from shared.schemas import MAX_SEED, DecodingOptions

# Beam width when a beam request names none: the width the published BART-CNN and T5
# summarisation generation configs use.
DEFAULT_NUM_BEAMS = 4


@dataclass(frozen=True)
class DecodingPlan:
    """What ``model.generate`` runs for one request.

    ``processors`` apply in order to every step's scores; ``num_beams`` 1 is greedy selection
    (a sampling plan ends in ``SampleWithGenerator``, so greedy selection takes its draw).
    ``stop`` strings end the completion; ``cut_at_stop`` removes them from the text.
    """

    processors: LogitsProcessorList
    max_new_tokens: int
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    stop: tuple[str, ...] = ()

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate`` that carry this plan's decoding rules.

        Sampling, repetition and n-gram settings a model's ``generation_config`` may hold are
        neutralised, so that exactly this plan's processors run.
        """
        kwargs = {
            "logits_processor": self.processors,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "num_beams": self.num_beams,
            "temperature": None,
            "top_k": None,
            "top_p": None,
            "repetition_penalty": None,
            "no_repeat_ngram_size": None,
        }
        if self.num_beams > 1:
            kwargs |= {"length_penalty": self.length_penalty,
                       "early_stopping": self.early_stopping}
        return kwargs


class OnNewTokens(LogitsProcessor):
    """Run ``processor`` on the generated tokens only: ``input_ids[:, prompt_length:]``.

    Why: in RAG the answer should copy names and phrases from the passages; a no-repeat n-gram
    rule that saw the prompt would forbid exactly that.
    """

    def __init__(self, processor: LogitsProcessor, prompt_length: int):
        if not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"`prompt_length` has to be a non-negative integer, but is "
                             f"{prompt_length}")
        self.processor = processor
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.processor(input_ids[:, self.prompt_length:], scores)


class SampleWithGenerator(LogitsProcessor):
    """Draw the next token from softmax(scores) with a private ``torch.Generator``; return
    scores that are ``-inf`` everywhere except the drawn token (0), so argmax selects it.

    Why not ``generate(do_sample=True)``: that draws from torch's global generator, which
    every thread of the process shares, so a seed could not make one request reproducible
    while others run. Must be the last processor (it ends the distribution). Each row draws
    from a generator of its own, created on the scores' device at the first call and seeded
    with ``seed``: requests with the same seed batched together (services.generator.batching)
    each draw what they would alone.
    """

    def __init__(self, seed: int):
        if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"`seed` has to be an integer in [0, 2**63 - 1], but is {seed}")
        self.seed = seed
        self._generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        if len(self._generators) != rows or self._generators[0].device != scores.device:
            self._generators = [torch.Generator(device=scores.device).manual_seed(self.seed)
                                for _ in range(rows)]
        probs = torch.softmax(scores.float(), dim=-1)  # fp32 even for bf16 logits
        drawn = torch.cat([torch.multinomial(probs[i:i + 1], num_samples=1, generator=g)
                           for i, g in enumerate(self._generators)])
        return torch.full_like(scores, -float("inf")).scatter(1, drawn, 0.0)


class StopOnStrings(StoppingCriteria):
    """Done for each sequence whose generated text contains one of ``stop``.

    ``prompt_length`` tokens at the start of ``input_ids`` are not generated (the prompt, or
    an encoder-decoder's decoder start token). The generated tokens are decoded whole at every
    step: at most ``max_new_tokens`` short decodes, where a token-level match would miss stop
    strings that span token boundaries.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_length: int):
        if not stop or not all(stop):
            raise ValueError(f"`stop` has to hold non-empty strings, but is {stop!r}")
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:],
                                            skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest occurrence of any ``stop`` string, and whether it was cut."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not ends:
        return text, False
    return text[: min(ends)], True


# --- strategies -----------------------------------------------------------------------------
def _penalties(options: DecodingOptions, prompt_length: int) -> list[LogitsProcessor]:
    """The rules every strategy takes, each when set; both count generated tokens only (see
    OnNewTokens)."""
    rules: list[LogitsProcessor] = []
    if options.repetition_penalty is not None:
        rules.append(RepetitionPenaltyLogitsProcessor(
            float(options.repetition_penalty), prompt_ignore_length=prompt_length))
    if options.no_repeat_ngram_size is not None:
        rules.append(OnNewTokens(NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size),
                                 prompt_length))
    return rules


def greedy(options: DecodingOptions, max_new_tokens: int, prompt_length: int) -> DecodingPlan:
    """The most likely token at every step (the served default)."""
    return DecodingPlan(LogitsProcessorList(_penalties(options, prompt_length)), max_new_tokens,
                        stop=tuple(options.stop))


def beam(options: DecodingOptions, max_new_tokens: int, prompt_length: int) -> DecodingPlan:
    """Beam search: the best of ``num_beams`` hypotheses by log-probability / length **
    ``length_penalty``; with 1 beam it is greedy."""
    return DecodingPlan(
        LogitsProcessorList(_penalties(options, prompt_length)), max_new_tokens,
        num_beams=options.num_beams or DEFAULT_NUM_BEAMS,
        length_penalty=1.0 if options.length_penalty is None else options.length_penalty,
        early_stopping=bool(options.early_stopping), stop=tuple(options.stop))


def sample(options: DecodingOptions, max_new_tokens: int, prompt_length: int) -> DecodingPlan:
    """Temperature, then top-k, then top-p (transformers' order), each when set, then a seeded
    draw.

    Without a seed one is drawn from the OS, so unseeded answers vary between requests.
    """
    rules = _penalties(options, prompt_length)
    if options.temperature is not None:
        rules.append(TemperatureLogitsWarper(float(options.temperature)))
    if options.top_k is not None:
        rules.append(TopKLogitsWarper(options.top_k))
    if options.top_p is not None:
        rules.append(TopPLogitsWarper(float(options.top_p)))
    seed = secrets.randbelow(MAX_SEED + 1) if options.seed is None else options.seed
    rules.append(SampleWithGenerator(seed))
    return DecodingPlan(LogitsProcessorList(rules), max_new_tokens, stop=tuple(options.stop))


Strategy = Callable[[DecodingOptions, int, int], DecodingPlan]
STRATEGIES: dict[str, Strategy] = {"greedy": greedy, "beam": beam, "sample": sample}


def make_plan(options: DecodingOptions, max_new_tokens: int, prompt_length: int) -> DecodingPlan:
    """The plan for ``options`` generating at most ``max_new_tokens`` after ``prompt_length``
    tokens that are not generated (0 for none).

    Raises ``ValueError`` for an unknown strategy (listing the known ones), a non-positive
    ``max_new_tokens``, or a value a processor's constructor refuses.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` has to be a strictly positive integer, but is "
                         f"{max_new_tokens}")
    strategy = STRATEGIES.get(options.strategy)
    if strategy is None:
        raise ValueError(f"unknown decoding strategy {options.strategy!r}; known: "
                         f"{', '.join(STRATEGIES)}")
    return strategy(options, max_new_tokens, prompt_length)
