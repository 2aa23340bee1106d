"""Token streaming for the generator: the text of each answer while ``model.generate`` runs.

``BatchStreamer`` is a transformers ``BaseStreamer`` for a batch: ``generate`` hands it the
prompt once, then the next token of every row at each step; it decodes each row's tokens so
far and passes the new text to that row's sink. ``streamable`` decides what of a partial
answer is certain to stay in the final one, so the pieces a client receives concatenate to the
final answer (see its docstring for the exception). ``CancelRows`` is the stopping
criterion that ends the rows whose caller went away.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from services.generator.decoding import cut_at_stop
from shared.prompt import after_cue

log = logging.getLogger(__name__)

Sink = Callable[[str], None]
# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
_INCOMPLETE = "\ufffd"


def streamable(text: str, stop: Sequence[str], *, cued: bool = False) -> tuple[str, bool]:
    """``(prefix, stopped)``: the part of a partial completion ``text`` that will begin the
    answer whatever is generated next, and whether a stop string has ended it.

    The answer is the completion cut before the first stop string, then stripped, so leading
    whitespace is dropped and held back at the end are: an incomplete character (U+FFFD of a
    partial UTF-8 sequence), the longest suffix before it that could begin a stop string, and
    whitespace. Each prefix returned for a growing ``text`` extends the previous one. The final
    answer (``prompt.clean_answer`` with the same ``cued``) can still be shorter in one case:
    generation that hits ``max_new_tokens`` drops a trailing unfinished sentence, which may
    have streamed already.

    ``cued`` is for a generator trained with restated answers (a sentence, then a line
    "Answer: ..."), whose final answer is what follows the first cue (``prompt.after_cue``):
    nothing streams before a line starts with ``ANSWER_CUE``, then that line's text after it;
    a later cue changes nothing. Such an answer that never gives the cue (e.g. "I don't
    know.") streams in one piece at the end (``finish``). Without ``cued`` an "Answer:" line
    streams as any other text, as ``clean_answer(cued=False)`` keeps it.
    """
    # cut before stripping, as the final answer is (``GeneratorService._result``): a stop
    # string may begin with whitespace that stripping would remove
    cut, stopped = cut_at_stop(text, stop)
    if stopped:
        prefix = cut.strip()
    else:
        # an incomplete character may be the next one of a stop string: drop it before
        # looking for the start of one, or that start would be sent
        text = text.rstrip(_INCOMPLETE)
        held = 0
        for s in stop:
            held = max(held, next((k for k in range(min(len(s) - 1, len(text)), 0, -1)
                                   if text.endswith(s[:k])), 0))
        prefix = text[: len(text) - held].strip()
    if cued:
        prefix = after_cue(prefix) or ""
    return prefix, stopped


class BatchStreamer(BaseStreamer):
    """Streams each row of a batch to its sink (``None``: that row is not streamed).

    Called from the thread running ``model.generate``; sinks must be thread-safe. A row stops
    streaming at an end-of-sequence token (``eos_ids``), a stop string, or once its event in
    ``cancelled`` is set. ``emitted[row]`` is the text sent so far. ``cued``: the model answers
    after ``ANSWER_CUE`` (``streamable``).
    """

    def __init__(self, tokenizer, sinks: Sequence[Sink | None], eos_ids: Sequence[int],
                 stop: Sequence[str] = (), cancelled: Sequence[threading.Event | None] = (),
                 *, cued: bool = False):
        self.tokenizer = tokenizer
        self.cued = cued
        self.sinks = list(sinks)
        self.eos_ids = set(eos_ids)
        self.stop = tuple(stop)
        self.cancelled = list(cancelled) or [None] * len(self.sinks)
        self.tokens: list[list[int]] = [[] for _ in self.sinks]
        self.emitted = ["" for _ in self.sinks]
        self.done = [sink is None for sink in self.sinks]
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate passes the prompt (or decoder start) first
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.sinks), -1)[:, -1].tolist()):
            event = self.cancelled[row]
            if self.done[row] or (event is not None and event.is_set()):
                self.done[row] = True
                continue
            if token in self.eos_ids:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            prefix, stopped = streamable(text, self.stop, cued=self.cued)
            self.done[row] = stopped
            self._send(row, prefix)

    def end(self) -> None:
        """Nothing to flush: what is held back is decided by the final answer (``finish``)."""

    def finish(self, row: int, answer: str) -> None:
        """Send what the final ``answer`` adds to the streamed text (all of it for a row that
        streamed nothing: beam search, or an answer the model never produced)."""
        self._send(row, answer)

    def _send(self, row: int, prefix: str) -> None:
        sink = self.sinks[row]
        if sink is None or not prefix.startswith(self.emitted[row]):
            return
        delta = prefix[len(self.emitted[row]):]
        if delta:
            self.emitted[row] = prefix
            sink(delta)


class CancelRows(StoppingCriteria):
    """Done for each row whose event is set (its caller went away); ``None``: never."""

    def __init__(self, events: Sequence[threading.Event | None]):
        self.events = list(events)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs) -> torch.BoolTensor:
        done = torch.tensor([event is not None and event.is_set() for event in self.events],
                            dtype=torch.bool, device=input_ids.device)
        # beam search passes num_beams rows per request
        return done.repeat_interleave(input_ids.shape[0] // len(self.events))
