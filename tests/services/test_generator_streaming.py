"""Token streaming: what of a partial answer may be sent (pure), and the generator service's
streamed pieces on a tiny random Llama (they concatenate to its answer; a cancelled request
stops early)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from services.generator.service import GeneratorService
from services.generator.streaming import BatchStreamer, streamable
from shared.prompt import NO_ANSWER, clean_answer
from shared.registry import META_FILE
from shared.settings import Settings
from tests.services.test_generator import (
    FRANCE,
    GERMANY,
    JAPAN,
    request,
)
from tests.tiny import per_byte_tokenizer, serving_llama


@pytest.mark.parametrize("text, stop, expected", [
    ("  Paris", (), ("Paris", False)),
    ("Paris is \n", (), ("Paris is", False)),
    ("Paris\ufffd", (), ("Paris", False)),
    ("Paris.\nQu", ("\nQuestion:",), ("Paris.", False)),
    ("Paris.\nQuestion: next", ("\nQuestion:",), ("Paris.", True)),
    ("Paris END", ("END", "x"), ("Paris", True)),
    ("Paris EN", ("END",), ("Paris", False)),
    ("Paris ENDS", ("ENDS", "END"), ("Paris", True)),
    ("", ("END",), ("", False)),
    # the next character of a stop string has not all arrived: its start is held back too
    ("Paris. Вопро\ufffd", ("Вопрос:",), ("Paris.", False)),
    # cut before stripping, as the final answer is: the stop may begin with whitespace
    ("\nQuestion", ("\nQuestion:",), ("", False)),
    ("\nQuestion: x", ("\nQuestion:",), ("", True)),
])
def test_streamable_holds_back_what_may_still_change(text, stop, expected):
    assert streamable(text, stop) == expected


def test_each_streamable_prefix_extends_the_last_and_ends_as_the_answer():
    completion = " The capital is Paris. [2]\nQuestion: and Berlin?"
    stop = ("\nQuestion:", "[3]")
    sent = ""
    for end in range(len(completion) + 1):
        prefix, stopped = streamable(completion[:end], stop)
        assert prefix.startswith(sent)
        sent = prefix
        if stopped:
            break
    assert sent == "The capital is Paris. [2]"


@pytest.mark.parametrize("text, stop, expected", [
    ("Paris is the capital.", (), ("", False)),
    ("Paris is the capital.\nAnswer", (), ("", False)),
    ("Paris is the capital.\nAnswer: ", (), ("", False)),
    ("Paris is the capital.\nAnswer:  Par", (), ("Par", False)),
    ("Paris is the capital.\nAnswer: Paris [1]\nMore", (), ("Paris [1]", False)),
    ("Paris.\nAnswer: Paris END more", ("END",), ("Paris", True)),
    ("I don't know. END", ("END",), ("", True)),
    ("Answer: Paris.\nAnswer: Lima", (), ("Paris.", False)),  # the first cue answers
])
def test_a_restated_answer_streams_only_after_its_cue(text, stop, expected):
    assert streamable(text, stop, cued=True) == expected


def test_a_cued_streamer_sends_the_answer_line_and_never_the_sentence(tokenizer):
    completion = "Freddie Mercury was the lead vocalist of Queen.\nAnswer: Freddie Mercury [2]"
    pieces: list[str] = []
    streamer = BatchStreamer(tokenizer, [pieces.append], eos_ids=[tokenizer.eos_token_id],
                             cued=True)
    streamer.put(torch.tensor([[0]]))  # the prompt
    for token in tokenizer(completion, add_special_tokens=False).input_ids:
        streamer.put(torch.tensor([[token]]))
    streamer.finish(0, clean_answer(completion, truncated=False, cued=True))
    assert "".join(pieces) == "Freddie Mercury [2]"
    assert len(pieces) > 3 and "Queen" not in "".join(pieces)


# A model's own "Answer:" lines: (completion, final answer of a base model, of one trained to
# restate). Each streams its whole final answer before the end.
ANSWER_LINES = [
    ("Answer: Paris [1]", "Answer: Paris [1]", "Paris [1]"),
    ("Paris is the capital [2].\nAnswer: Paris", "Paris is the capital [2].\nAnswer: Paris",
     "Paris"),
    ("Answer: Paris.\nAnswer: Lima", "Answer: Paris.\nAnswer: Lima", "Paris."),
]


@pytest.mark.parametrize("cued", [False, True])
@pytest.mark.parametrize("completion, plain, restated", ANSWER_LINES)
def test_a_stream_with_answer_lines_is_its_final_answer(tokenizer, completion, plain, restated,
                                                        cued):
    pieces: list[str] = []
    streamer = BatchStreamer(tokenizer, [pieces.append], eos_ids=[tokenizer.eos_token_id],
                             cued=cued)
    streamer.put(torch.tensor([[0]]))  # the prompt
    for token in tokenizer(completion, add_special_tokens=False).input_ids:
        streamer.put(torch.tensor([[token]]))
    answer = clean_answer(completion, truncated=False, cued=cued)
    assert answer == (restated if cued else plain)
    assert "".join(pieces) == answer  # all of it streamed before the end
    streamer.finish(0, answer)
    assert "".join(pieces) == answer


class Scripted:
    """A stand-in decoder-only model that writes ``completion`` and then its end-of-sequence
    token whatever the prompt, as ``model.generate`` streams: the prompt, then a token a step."""

    def __init__(self, tokenizer, completion: str):
        self.config = serving_llama(tokenizer).config
        self.device = torch.device("cpu")
        self.ids = [*tokenizer(completion, add_special_tokens=False).input_ids,
                    tokenizer.eos_token_id]

    def eval(self):
        return self

    def generate(self, input_ids, streamer=None, **kwargs):
        new = torch.tensor([self.ids] * input_ids.shape[0])
        if streamer is not None:
            streamer.put(input_ids)
            for step in range(new.shape[1]):
                streamer.put(new[:, step])
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("cued", [False, True])
@pytest.mark.parametrize("completion, plain, restated", ANSWER_LINES)
def test_the_service_streams_its_final_answer_with_answer_lines(tokenizer, completion, plain,
                                                                restated, cued):
    service = GeneratorService(Scripted(tokenizer, completion), tokenizer, 1_000,
                               restated=cued)
    pieces: list[str] = []
    (result,) = service.generate_batch([request([FRANCE], max_new_tokens=64)],
                                       sinks=[pieces.append])
    assert result.answer == (restated if cued else plain)
    assert "".join(pieces) == result.answer
    assert len(pieces) > 3  # it streamed, not only sent the answer at the end


@pytest.mark.parametrize("completion, stop, answer", [
    ("Paris. Вопрос: next", ["Вопрос:"], "Paris."),  # a stop of two-byte characters
    ("巴黎。问题：下一个", ["问题："], "巴黎。"),  # of three-byte characters
    ("\nQuestion: x", ["\nQuestion:"], NO_ANSWER),  # a stop that begins the completion
])
def test_the_service_streams_only_its_final_answer_before_a_stop(tokenizer, completion, stop,
                                                                 answer):
    # per-byte tokens: a character of the stop arrives one byte (and one U+FFFD) at a time
    service = GeneratorService(Scripted(tokenizer, completion), tokenizer, 1_000)
    pieces: list[str] = []
    (result,) = service.generate_batch([request([FRANCE], max_new_tokens=64, stop=stop)],
                                       sinks=[pieces.append])
    assert result.answer == answer
    assert "".join(pieces) == answer  # nothing sent that the answer does not begin with


@pytest.fixture(scope="module")
def tokenizer():
    return per_byte_tokenizer()


@pytest.fixture(scope="module")
def service(tokenizer):
    return GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)


@pytest.mark.parametrize("decoding", [{}, {"strategy": "sample", "seed": 5, "top_k": 3},
                                      {"strategy": "beam", "num_beams": 2}])
def test_streamed_pieces_concatenate_to_the_answer(service, decoding):
    # the random model does not end on its own within 16 tokens, so nothing is cut as
    # unfinished: the pieces are the whole answer
    req = request([FRANCE, GERMANY], max_new_tokens=16, **decoding)
    pieces: list[str] = []
    (streamed,) = service.generate_batch([req], sinks=[pieces.append])
    assert streamed == service.generate(req)
    assert "".join(pieces) == streamed.answer
    if decoding.get("strategy") == "beam":
        assert pieces == [streamed.answer]  # beam search ends before it knows its answer
    else:
        assert len(pieces) > 3


def test_stop_strings_never_stream(service, tokenizer):
    free = service.generate(request([FRANCE], max_new_tokens=16))
    stop = free.answer[6:8]
    pieces: list[str] = []
    req = request([FRANCE], max_new_tokens=16, stop=[stop])
    (result,) = service.generate_batch([req], sinks=[pieces.append])
    assert "".join(pieces) == result.answer == service.generate(req).answer
    assert stop not in "".join(pieces)


def test_a_request_without_passages_streams_no_answer(service):
    pieces: list[str] = []
    service.generate_batch([request([])], sinks=[pieces.append])
    assert pieces == [NO_ANSWER]


def test_each_row_of_a_batch_streams_to_its_own_sink(service):
    reqs = [request([FRANCE], max_new_tokens=12),
            request([JAPAN], max_new_tokens=12, question="What is the capital of Japan, and why?")]
    pieces: list[list[str]] = [[], []]
    results = service.generate_batch(reqs, sinks=[p.append for p in pieces])
    assert ["".join(p) for p in pieces] == [r.answer for r in results]
    assert results[0].answer != results[1].answer


def test_a_cancelled_request_stops_early_and_its_batch_goes_on(tokenizer):
    forced = GeneratorService(serving_llama(tokenizer, force_token="a"), tokenizer, 1_000)
    stop = threading.Event()

    def sink(text: str) -> None:
        stop.set()  # the caller goes away after its first piece

    reqs = [request([FRANCE], max_new_tokens=64), request([GERMANY], max_new_tokens=64)]
    cancelled, kept = forced.generate_batch(reqs, sinks=[sink, None], cancelled=[stop, None])
    assert cancelled.completion_tokens < 5
    assert kept.answer == "a" * 64


def test_a_model_trained_to_restate_streams_its_answer_at_the_end(tmp_path, tokenizer):
    # ragtune.json of a generator trained with restate; the forced model never gives the cue,
    # so its answer streams whole when it is known
    folder = tmp_path / "restated"
    serving_llama(tokenizer, force_token="b").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / META_FILE).write_text(json.dumps({"kind": "generator", "config": {"restate": True}}))
    service = GeneratorService.from_settings(Settings(home=tmp_path / "home",
                                                      generator={"model": str(folder)}))
    assert service.restated
    pieces: list[str] = []
    (result,) = service.generate_batch([request([FRANCE], max_new_tokens=6)],
                                       sinks=[pieces.append])
    assert pieces == [result.answer] == ["bbbbbb"]

    (folder / META_FILE).write_text(json.dumps({"kind": "generator", "config": {}}))
    assert not GeneratorService.from_settings(
        Settings(home=tmp_path / "home", generator={"model": str(folder)})).restated


# --- the real packaged model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    return GeneratorService.from_settings(Settings(home=tmp_path_factory.mktemp("home")))


@pytest.mark.integration
def test_the_packaged_model_streams_its_unary_answer(packaged):
    reqs = [request([GERMANY, FRANCE], max_new_tokens=32),
            request([JAPAN, FRANCE], max_new_tokens=32, question="What is the capital of Japan?")]
    alone = [packaged.generate(r) for r in reqs]
    assert "Paris" in alone[0].answer and "Tokyo" in alone[1].answer
    pieces: list[list[str]] = [[], []]
    batched = packaged.generate_batch(reqs, sinks=[p.append for p in pieces])
    assert batched == alone  # batched, left-padded: the same greedy answers
    assert ["".join(p) for p in pieces] == [r.answer for r in alone]
    assert all(len(p) > 3 for p in pieces)
