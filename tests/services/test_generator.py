"""Generator service: prompt helpers (pure), service mechanics on a tiny random Llama with a
byte-level tokenizer built in-process (packing the context, every decoding strategy, stop
sequences), the encoder-decoder path on a tiny random T5, device choice, model loading/caching,
and integration tests with the real packaged SmolLM2 (converted once into a temporary home,
~40 s)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch
from transformers import T5ForConditionalGeneration

from services.generator.service import (
    MIN_PARTIAL_CHARS,
    GenerationError,
    GeneratorService,
    plain_prompt,
)
from shared.bus import BadRequest
from shared.models import generator as gen_model
from shared.models.generator import (
    ModelLoadError,
    load_generator,
    packaged_model_dir,
    pick_device,
)
from shared.prompt import (
    NO_ANSWER,
    SYSTEM_PROMPT,
    build_messages,
    clean_answer,
    format_passages,
    parse_citations,
    shown,
    support,
    truncate_text,
    withhold,
)
from shared.schemas import DecodingOptions, GenerateRequest, Hit
from shared.settings import Settings
from tests.tiny import CHAT_TEMPLATE, per_byte_tokenizer, serving_llama, serving_t5

FRANCE = Hit(
    doc_id="wiki:France",
    title="France",
    text="France is a country in Western Europe. Its capital and largest city is Paris, "
    "a major centre of finance, diplomacy, commerce and culture.",
    score=0.9,
)
GERMANY = Hit(
    doc_id="wiki:Germany",
    title="Germany",
    text="Germany is a country in Central Europe. Its capital and most populous city is "
    "Berlin, and its financial centre is Frankfurt.",
    score=0.5,
)
JAPAN = Hit(
    doc_id="wiki:Japan",
    title="Japan",
    text="Japan is an island country in East Asia. Tokyo is its capital.",
    score=0.4,
)


# --- prompt: pure functions ---------------------------------------------------------------
def test_truncate_text_keeps_short_text_and_cuts_long_text_at_a_word_boundary():
    assert truncate_text("  Paris is big.  ", 50) == "Paris is big."
    text = "Paris is the capital of France"
    for limit in range(1, len(text)):
        cut = truncate_text(text, limit)
        assert len(cut) <= limit
        assert text.startswith(cut)
        # never half a word, unless the first word alone is longer than the limit
        if limit >= len("Paris"):
            assert text[len(cut)] == " "
    assert truncate_text("Paris is\nthe capital", 11) == "Paris is"
    assert truncate_text("Supercalifragilistic", 5) == "Super"


def test_truncate_text_refuses_a_non_positive_limit():
    with pytest.raises(ValueError, match="max_chars .* but is 0"):
        truncate_text("text", 0)


def test_format_passages_numbers_by_rank_shows_the_best_last_and_cuts_texts():
    text = format_passages([FRANCE, GERMANY], max_chars=40)
    first, second = text.split("\n\n")
    assert first.startswith("[2] Germany\nGermany is a country in Central")
    assert len(first.split("\n", 1)[1]) <= 40
    assert second == "[1] France\nFrance is a country in Western Europe."
    assert format_passages([], 40) == ""


def test_build_messages_gives_a_system_instruction_and_the_passages_then_the_question():
    messages = build_messages("  What is the capital of France? ", [FRANCE, GERMANY], 1_000)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert f'"{NO_ANSWER}"' in messages[0]["content"]
    assert "square brackets" in messages[0]["content"]
    user = messages[1]["content"]
    assert user.index("[2] Germany") < user.index("[1] France") < user.index("Question:")
    assert user.endswith("Question: What is the capital of France?")


@pytest.mark.parametrize(
    ("raw", "truncated", "expected"),
    [
        ("  Paris is the capital. It lies on the ", True, "Paris is the capital."),
        ("Paris is the capital. It lies on the", False, "Paris is the capital. It lies on the"),
        ("The capital is", True, "The capital is"),
        ("Paris is the capital. [1] It lies", True, "Paris is the capital. [1]"),
        ('He said "Paris." Then', True, 'He said "Paris."'),
        ("It has 2.1 million people", True, "It has 2.1 million people"),
        ("Is it Paris? Yes! It is", True, "Is it Paris? Yes!"),
        ("", True, ""),
        # a restated answer: the line after the first cue, whether or not generation was cut
        ("Paris is the capital of France.\nAnswer: Paris [1]", False, "Paris [1]"),
        ("Paris is the capital.\nAnswer: Paris [1]\nAnswer: Lyon [2]", True, "Paris [1]"),
        ("Paris is the capital.\n  Answer: Par", True, "Par"),
        ("Paris is the capital. It\nAnswer:", True, "Paris is the capital."),
        ("The answer: Paris", False, "The answer: Paris"),
    ],
)
def test_clean_answer_drops_only_a_trailing_fragment_of_a_truncated_answer(
    raw, truncated, expected
):
    assert clean_answer(raw, truncated=truncated) == expected


@pytest.mark.parametrize(
    ("raw", "truncated", "expected"),
    [
        ("Answer: Paris [1]", False, "Answer: Paris [1]"),
        ("Paris is the capital [2].\nAnswer: Paris", False,
         "Paris is the capital [2].\nAnswer: Paris"),
        ("Paris is the capital [2].\nAnswer: Paris", True, "Paris is the capital [2]."),
        ("  Answer: Paris.\nAnswer: Lima ", False, "Answer: Paris.\nAnswer: Lima"),
    ],
)
def test_clean_answer_keeps_the_answer_lines_of_a_generator_not_trained_to_restate(
    raw, truncated, expected
):
    assert clean_answer(raw, truncated=truncated, cued=False) == expected


def test_parse_citations_keeps_valid_markers_once_in_order_of_first_appearance():
    passages = [FRANCE, GERMANY, JAPAN]
    cites = parse_citations("Berlin [2], not Paris [1]; see [2] and [3, 1].", passages)
    assert [c.passage for c in cites] == [2, 1, 3]
    assert [c.doc_id for c in cites] == ["wiki:Germany", "wiki:France", "wiki:Japan"]
    assert [c.title for c in cites] == ["Germany", "France", "Japan"]


def test_parse_citations_ignores_markers_outside_the_passages():
    cites = parse_citations("Tokyo [0] [4] [12]", [FRANCE, JAPAN], question="Capital of Japan?")
    # no valid marker: falls back to overlap, "tokyo" is only in passage 2
    assert [c.passage for c in cites] == [2]
    assert parse_citations("Something else [5]", [FRANCE, JAPAN]) == []


def test_parse_citations_falls_back_to_the_passage_holding_the_answer_words():
    question = "What is the capital of France?"
    cites = parse_citations("The capital of France is Paris.", [GERMANY, FRANCE], question=question)
    assert [(c.passage, c.doc_id) for c in cites] == [(2, "wiki:France")]
    # Words copied from the question are no evidence: only "lyon" counts, and no passage has it.
    wrong = "The capital of France is Lyon."
    assert parse_citations(wrong, [GERMANY, FRANCE], question=question) == []
    assert [c.passage for c in parse_citations(wrong, [GERMANY, FRANCE])] == [2]


def test_parse_citations_needs_half_of_the_answer_words_in_one_passage():
    # content words {paris, lyon, marseille}: only "paris" is in a passage -> 1/3 < 0.5
    assert parse_citations("Paris, Lyon or Marseille.", [FRANCE, GERMANY]) == []
    # {paris, frankfurt}: passage 1 has paris, passage 2 frankfurt -> 1/2 each: the first
    assert [c.passage for c in parse_citations("Paris or Frankfurt.", [FRANCE, GERMANY])] == [1]


def test_parse_citations_breaks_overlap_ties_by_the_title_the_answer_names():
    usa = Hit(
        doc_id="us",
        title="United States",
        text="A country in North America, south of Canada.",
        score=1.0,
    )
    canada = Hit(
        doc_id="ca", title="Canada", text="Canada is a country in North America.", score=0.5
    )
    answer = "Canada is a country in North America."
    cites = parse_citations(answer, [usa, canada], question="What is the capital of Canada?")
    assert [c.doc_id for c in cites] == ["ca"]


@pytest.mark.parametrize("answer", [NO_ANSWER, "i don't know. [1]", "I don’t know", "", "  "])
def test_parse_citations_gives_none_for_no_answer(answer):
    assert parse_citations(answer, [FRANCE, GERMANY]) == []


def test_support_is_the_share_of_new_answer_words_found_in_the_passages():
    question = "What is the capital of France?"
    assert support("The capital of France is Paris [2].", [GERMANY, FRANCE],
                   question=question) == 1.0
    # "Lyon" is in no passage, "Paris" is: one of two new words
    assert support("Paris or Lyon", [FRANCE], question=question) == 0.5
    # words of several passages together back an answer
    assert support("Berlin and Tokyo", [GERMANY, JAPAN], question="Which capitals?") == 1.0
    assert support("The capital of Chile is Santiago.", [FRANCE, GERMANY],
                   question="What is the capital of Chile?") == 0.0
    # an answer that only restates the question gives nothing to back
    assert support("France is the capital of France.", [FRANCE], question=question) == 0.0
    assert support("Paris", [], question=question) == 0.0
    # a yes/no answer answers the question's claim: the question's words are what is backed
    is_it = "Is Paris the capital of France?"
    assert support("Yes, Paris is the capital of France.", [FRANCE], question=is_it) == 1.0
    assert support("No.", [FRANCE], question=is_it) == 1.0
    assert support("Yes, Lyon is.", [FRANCE], question="Is Lyon the capital?") == 0.5
    assert support("Nope, Lyon.", [FRANCE], question="What is the capital?") == 0.0
    costa_rica = Hit(doc_id="cr", title="Costa Rica", text="Its capital is San Jose.", score=1)
    assert support("San José", [costa_rica], question="What is the capital of Costa Rica?") == 1
    # a count in digits is backed by the same count in words, and the other way round
    cube = Hit(doc_id="cube", title="Cube", text="It has eight vertices and twelve edges.",
               score=1)
    edges = "How many edges does a cube have?"
    assert support("A cube has 12 edges.", [cube], question=edges) == 1.0
    assert support("8 [1]", [cube], question="And vertices?") == 1.0
    assert support("Eleven.", [cube], question=edges) == 0.0
    squares = Hit(doc_id="sq", title="Square", text="A square has 4 sides.", score=1)
    assert support("four", [squares], question="How many sides?") == 1.0
    assert support(NO_ANSWER, [FRANCE]) is None and support(" ", [FRANCE]) is None


def test_support_counts_only_words_in_sentences_that_speak_of_the_question():
    kiribati = Hit(doc_id="ki", title="Kiribati", score=1, text=(
        "Kiribati is an archipelagic country in the Pacific Ocean. The state comprises 32 "
        "atolls and one remote raised coral island, Banaba"))
    capital = "What is the capital of Kiribati?"
    # Banaba is named, but in no sentence that mentions the capital or Kiribati
    assert support("Banaba [1]", [kiribati], question=capital) == 0.0
    assert support("Banaba [1]", [kiribati], question=capital, by_sentence=False) == 1.0
    # a sentence on the question's topic backs its words; a cut last sentence counts too
    assert support("Banaba", [kiribati], question="Which island is raised coral?") == 1.0
    # words are compared by their first five letters: "bordered" meets "borders"
    kenya = Hit(doc_id="ke", title="Kenya", score=1, text="It is bordered by Uganda.")
    assert support("Uganda", [kenya], question="Which country borders Kenya?") == 1.0
    # the title of a passage that speaks of the question backs an answer too
    assert support("Japan", [JAPAN], question="Where is Tokyo?") == 1.0
    assert support("Japan", [JAPAN], question="Where is Kyoto?") == 0.0
    # a pronoun stands for the passage's subject; an initial's period ends no sentence
    xerxes = Hit(doc_id="x", title="Xerxes I", score=1, text=(
        "Xerxes I was a Persian king. He was the son of Darius and Atossa. Then L. Cassius "
        "came, and Cyrus"))
    assert support("Atossa", [xerxes], question="Who was the mother of Xerxes I?") == 1.0
    assert support("Cassius", [xerxes], question="Who came with Cyrus?") == 1.0
    assert support("Atossa", [xerxes], question="Who came with Cyrus?") == 0.0
    # a question of stopwords alone falls back to the words anywhere in the passages
    assert support("Banaba", [kiribati], question="What is it?") == 1.0


def test_withhold_replaces_an_answer_below_min_trust_and_keeps_it_as_the_draft():
    question = "What is the capital of Chile?"
    assert withhold("Santiago [1].", [FRANCE], question=question, min_trust=0.5) == (
        NO_ANSWER, 0.0, "Santiago [1].")
    assert withhold("Santiago [1].", [FRANCE], question=question, min_trust=0.0) == (
        "Santiago [1].", 0.0, None)
    assert withhold("Paris [1].", [FRANCE], question=question, min_trust=1.0) == (
        "Paris [1].", 1.0, None)
    assert withhold(NO_ANSWER, [FRANCE], question=question, min_trust=1.0) == (
        NO_ANSWER, None, None)


# --- service mechanics: tiny random Llama + byte-level tokenizer ---------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return per_byte_tokenizer()


def prompt_length(tokenizer, question, passages, max_chars):
    ids = tokenizer.apply_chat_template(
        build_messages(question, passages, max_chars),
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    return ids.shape[1]


def request(passages, max_new_tokens=8, question="What is the capital of France?", **decoding):
    return GenerateRequest(question=question, passages=passages, max_new_tokens=max_new_tokens,
                           decoding=DecodingOptions(**decoding))


def test_generate_decodes_only_new_tokens_and_counts_them(tokenizer):
    service = GeneratorService(serving_llama(tokenizer, force_token="a"), tokenizer, 1_000)
    result = service.generate(request([FRANCE, GERMANY], max_new_tokens=7))
    assert result.answer == "a" * 7
    assert result.completion_tokens == 7
    assert result.prompt_tokens == prompt_length(
        tokenizer, "What is the capital of France?", [FRANCE, GERMANY], 1_000
    )
    assert result.citations == []


def test_generate_stops_at_eos_and_reports_an_empty_completion_as_no_answer(tokenizer):
    model = serving_llama(tokenizer, force_token="<|im_end|>")
    service = GeneratorService(model, tokenizer, 1_000)
    result = service.generate(request([FRANCE], max_new_tokens=12))
    assert result.answer == NO_ANSWER
    assert result.completion_tokens == 0
    assert result.citations == []


def test_generate_is_greedy_and_repeatable(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    first = service.generate(request([FRANCE, GERMANY], max_new_tokens=10))
    second = service.generate(request([FRANCE, GERMANY], max_new_tokens=10))
    assert first == second
    assert 0 <= first.completion_tokens <= 10


def test_generate_cuts_passages_to_max_passage_chars(tokenizer):
    long = FRANCE.model_copy(update={"text": "word " * 500})
    service = GeneratorService(serving_llama(tokenizer, force_token="a"), tokenizer, 60)
    result = service.generate(request([long], max_new_tokens=2))
    assert result.prompt_tokens == prompt_length(
        tokenizer, "What is the capital of France?", [long], 60
    )
    assert result.prompt_tokens < 60 + 400
    assert result.shown_chars == [len(truncate_text(long.text, 60))]
    assert shown([long], result.shown_chars)[0].text == truncate_text(long.text, 60)


# --- packing passages into the context window ----------------------------------------------
QUESTION = "What is the capital of France?"


def test_pack_keeps_every_passage_whole_when_they_fit(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    kept, inputs = service.pack(QUESTION, [FRANCE, GERMANY, JAPAN], budget=2_000)
    assert kept == [FRANCE, GERMANY, JAPAN]
    assert inputs["input_ids"].shape[1] == prompt_length(tokenizer, QUESTION, kept, 1_000)


def test_pack_cuts_the_first_passage_that_does_not_fit_at_a_word_boundary(tokenizer):
    two = prompt_length(tokenizer, QUESTION, [FRANCE, GERMANY], 1_000)
    budget = two - 1  # all of Germany's text but its last word fits
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    kept, inputs = service.pack(QUESTION, [FRANCE, GERMANY, JAPAN], budget)
    assert [h.doc_id for h in kept] == ["wiki:France", "wiki:Germany"]  # Japan dropped
    assert kept[0] == FRANCE
    cut = kept[1].text
    assert GERMANY.text.startswith(cut) and GERMANY.text[len(cut)] == " "
    assert cut == GERMANY.text.rsplit(" ", 1)[0]  # the longest prefix that fits
    assert inputs["input_ids"].shape[1] == prompt_length(tokenizer, QUESTION, kept, 1_000)
    assert inputs["input_ids"].shape[1] <= budget


def test_pack_drops_the_passage_when_too_little_of_it_would_fit(tokenizer):
    one = prompt_length(tokenizer, QUESTION, [FRANCE], 1_000)
    # one token is one byte here: room for the header of passage 2 and under 100 characters
    budget = one + len("\n\n[2] Germany\n") + MIN_PARTIAL_CHARS - 10
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    kept, inputs = service.pack(QUESTION, [FRANCE, GERMANY, JAPAN], budget)
    assert kept == [FRANCE]
    assert inputs["input_ids"].shape[1] == one


def test_generate_cuts_even_the_first_passage_and_still_cites_its_document(tokenizer):
    long = Hit(doc_id="wiki:Long", title="Long", text="Paris is the capital. " * 60, score=1.0)
    whole = prompt_length(tokenizer, QUESTION, [long], 2_000)
    max_new = 4
    service = GeneratorService(serving_llama(tokenizer, force_token="a"), tokenizer, 2_000,
                               max_context_tokens=whole - 500 + max_new)
    result = service.generate(request([long, FRANCE], max_new_tokens=max_new))
    assert whole - 500 - len("capital. ") <= result.prompt_tokens <= whole - 500
    kept, _ = service.pack(QUESTION, [long, FRANCE], whole - 500)
    assert [h.doc_id for h in kept] == ["wiki:Long"]
    assert long.text.startswith(kept[0].text) and long.text[len(kept[0].text)] == " "
    cites = parse_citations("Paris [1]", kept)
    assert [(c.passage, c.doc_id) for c in cites] == [(1, "wiki:Long")]
    # what the prompt held: the cut first passage, not France
    assert result.shown_chars == [len(kept[0].text)]
    assert shown([long, FRANCE], result.shown_chars) == [kept[0]]


def test_generate_refuses_a_request_whose_first_passage_cannot_fit(tokenizer):
    least = FRANCE.model_copy(update={"text": truncate_text(FRANCE.text, MIN_PARTIAL_CHARS)})
    shortest = prompt_length(tokenizer, QUESTION, [least], 1_000)
    service = GeneratorService(
        serving_llama(tokenizer), tokenizer, 1_000, max_context_tokens=shortest - 1 + 4
    )
    with pytest.raises(GenerationError, match=r"even the first passage cut to 100 characters "
                                              rf"needs {shortest} prompt tokens, over the budget "
                                              rf"of {shortest - 1} tokens") as err:
        service.generate(request([FRANCE, GERMANY], max_new_tokens=4))
    assert isinstance(err.value, BadRequest)  # the bus answers it at once, never retries


def test_generate_refuses_max_new_tokens_that_fill_the_context(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000, max_context_tokens=64)
    with pytest.raises(GenerationError, match=r"max_new_tokens \(64\) leaves no room"):
        service.generate(request([FRANCE], max_new_tokens=64))


def test_generate_refuses_max_new_tokens_over_its_limit(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000,
                               max_new_tokens_limit=16)
    with pytest.raises(GenerationError, match=r"max_new_tokens \(17\) is over the limit of 16"):
        service.generate(request([FRANCE], max_new_tokens=17))
    assert service.generate(request([FRANCE], max_new_tokens=16)).completion_tokens <= 16


@pytest.mark.parametrize("options, message", [
    ({"strategy": "magic"}, "unknown decoding strategy 'magic'; known: greedy, beam, sample"),
    ({"strategy": "sample", "top_k": 0}, "`top_k` has to be a strictly positive integer, "
                                         "but is 0"),
    ({"strategy": "sample", "top_p": 1.5}, "`top_p` has to be a float > 0 and < 1, but is 1.5"),
])
def test_generate_turns_options_that_bypassed_validation_into_a_generation_error(
    tokenizer, options, message
):
    # model_construct skips the schema's checks, as a hand-built bus message could not:
    # the strategy table and the processors' constructors still refuse these values.
    decoding = DecodingOptions.model_construct(**options)
    req = GenerateRequest.model_construct(question=QUESTION, passages=[FRANCE], max_new_tokens=4,
                                          decoding=decoding)
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    with pytest.raises(GenerationError, match=re.escape(f"generator: {message}")):
        service.generate(req)


def test_generate_without_passages_answers_no_answer_without_the_model(tokenizer, monkeypatch):
    model = serving_llama(tokenizer)
    service = GeneratorService(model, tokenizer, 1_000)

    def fail(*args, **kwargs):
        raise AssertionError("the model must not run without passages")

    monkeypatch.setattr(model, "generate", fail)
    result = service.generate(request([]))
    assert (result.answer, result.citations) == (NO_ANSWER, [])
    assert (result.prompt_tokens, result.completion_tokens, result.shown_chars) == (0, 0, [])


def test_service_validates_its_arguments(tokenizer):
    model = serving_llama(tokenizer)
    with pytest.raises(ValueError, match="max_passage_chars.*but is 0"):
        GeneratorService(model, tokenizer, 0)
    with pytest.raises(ValueError, match="max_context_tokens.*but is 1"):
        GeneratorService(model, tokenizer, 100, max_context_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens_limit.*but is 0"):
        GeneratorService(model, tokenizer, 100, max_new_tokens_limit=0)
    assert GeneratorService(model, tokenizer, 100).max_context_tokens == 2048


# --- decoding strategies through the service -----------------------------------------------
def test_beam_search_with_one_beam_equals_greedy(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    greedy = service.generate(request([FRANCE], max_new_tokens=12))
    beam = service.generate(request([FRANCE], max_new_tokens=12, strategy="beam", num_beams=1))
    assert beam == greedy
    assert greedy.completion_tokens > 0


def test_beam_search_with_several_beams_runs_within_the_token_limit(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    result = service.generate(request([FRANCE], max_new_tokens=6, strategy="beam", num_beams=3,
                                      length_penalty=0.5, early_stopping=True))
    assert 0 <= result.completion_tokens <= 6
    forced = GeneratorService(serving_llama(tokenizer, force_token="a"), tokenizer, 1_000)
    assert forced.generate(request([FRANCE], max_new_tokens=5, strategy="beam")).answer == "aaaaa"


def test_sampling_with_top_k_1_is_greedy(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    greedy = service.generate(request([FRANCE], max_new_tokens=10))
    for seed in (0, 1):
        sampled = service.generate(request([FRANCE], max_new_tokens=10, strategy="sample",
                                           top_k=1, seed=seed))
        assert sampled == greedy


def test_a_seeded_sample_is_reproducible_and_another_seed_may_differ(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)

    def sample(seed):
        return service.generate(request([FRANCE], max_new_tokens=10, strategy="sample",
                                        temperature=1.5, top_p=0.95, seed=seed))

    assert sample(7) == sample(7)
    assert len({sample(seed).answer for seed in range(4)}) > 1
    # without a seed each request draws its own
    unseeded = {service.generate(request([FRANCE], max_new_tokens=10, strategy="sample")).answer
                for _ in range(3)}
    assert len(unseeded) > 1


def test_stop_sequences_cut_the_answer_before_them(tokenizer):
    service = GeneratorService(serving_llama(tokenizer), tokenizer, 1_000)
    free = service.generate(request([FRANCE], max_new_tokens=16))
    assert free.completion_tokens == 16, "the random model must not stop on its own here"
    text = tokenizer.decode(serving_llama(tokenizer).generate(
        **tokenizer.apply_chat_template(build_messages(QUESTION, [FRANCE], 1_000),
                                        add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt"),
        max_new_tokens=16, do_sample=False)[0, free.prompt_tokens:], skip_special_tokens=True)
    stop = text[6:8]
    start = text.find(stop)
    result = service.generate(request([FRANCE], max_new_tokens=16, stop=["zzz", stop]))
    assert stop not in result.answer
    assert result.answer == (clean_answer(text[:start], truncated=False, cued=False)
                             or NO_ANSWER)
    assert result.completion_tokens < 16  # generation stopped there, not at the limit


def test_stop_sequences_in_the_prompt_do_not_stop_the_answer(tokenizer):
    service = GeneratorService(serving_llama(tokenizer, force_token="a"), tokenizer, 1_000)
    result = service.generate(request([FRANCE], max_new_tokens=4, stop=["France"]))
    assert result.answer == "aaaa"


# --- encoder-decoder models: a tiny random T5 ---------------------------------------------
@pytest.fixture(scope="module")
def plain_tokenizer():
    """The byte-level tokenizer without a chat template, as many seq2seq tokenizers are."""
    return per_byte_tokenizer(chat_template=None)


@pytest.mark.parametrize("decoding", [{}, {"strategy": "beam", "num_beams": 2},
                                      {"strategy": "sample", "seed": 3, "top_k": 5}])
def test_encoder_decoder_generates_from_a_plain_text_prompt(plain_tokenizer, decoding):
    service = GeneratorService(serving_t5(plain_tokenizer, force_token="b"), plain_tokenizer,
                               1_000, max_context_tokens=1_024)
    assert service.encoder_decoder and not service.chat
    result = service.generate(request([FRANCE, GERMANY], max_new_tokens=3, **decoding))
    assert result.answer == "bbb"
    assert result.completion_tokens == 3
    prompt = plain_prompt(build_messages(QUESTION, [FRANCE, GERMANY], 1_000))
    assert prompt.startswith(f"{SYSTEM_PROMPT}\n\nPassages:\n[2] Germany\n")
    assert prompt.endswith(f"Question: {QUESTION}")
    assert result.prompt_tokens == len(plain_tokenizer(prompt)["input_ids"])


def test_encoder_decoder_budget_is_the_encoder_window(plain_tokenizer):
    prompt = plain_prompt(build_messages(QUESTION, [FRANCE], 1_000))
    length = len(plain_tokenizer(prompt)["input_ids"])
    model = serving_t5(plain_tokenizer)
    # the new tokens do not share the encoder's window: the whole prompt fits
    service = GeneratorService(model, plain_tokenizer, 1_000, max_context_tokens=length)
    result = service.generate(request([FRANCE], max_new_tokens=8))
    assert result.prompt_tokens == length and result.completion_tokens <= 8
    greedy = service.generate(request([FRANCE], max_new_tokens=8))
    assert service.generate(request([FRANCE], max_new_tokens=8, strategy="beam",
                                    num_beams=1)) == greedy
    with pytest.raises(ValueError, match="pass `max_context_tokens`"):
        GeneratorService(model, plain_tokenizer, 1_000)  # T5 names no window; neither does it


def test_the_context_window_falls_back_to_the_tokenizers_model_max_length():
    tok = per_byte_tokenizer(chat_template=None)
    tok.model_max_length = 300
    assert GeneratorService(serving_t5(tok), tok, 1_000).max_context_tokens == 300


# --- choosing the device --------------------------------------------------------------------
@pytest.mark.parametrize("setting, cuda, bf16, expected", [
    ("auto", False, False, ("cpu", torch.float32)),
    ("auto", True, True, ("cuda", torch.bfloat16)),
    ("auto", True, False, ("cuda", torch.float32)),
    ("cuda", True, True, ("cuda", torch.bfloat16)),
    ("cpu", True, True, ("cpu", torch.float32)),
])
def test_pick_device(monkeypatch, setting, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    device, dtype = pick_device(setting)
    assert (device.type, dtype) == expected


def test_pick_device_refuses_cuda_without_a_gpu_and_unknown_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="generator.device is 'cuda' but torch sees no CUDA"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="one of auto, cpu, cuda, but is 'tpu'"):
        pick_device("tpu")


# --- model loading --------------------------------------------------------------------------
def test_load_generator_reads_a_configured_local_model(tmp_path, tokenizer):
    folder = tmp_path / "tiny"
    serving_llama(tokenizer, force_token="b").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = Settings(home=tmp_path / "home", generator={"model": str(folder)})
    model, tok = load_generator(settings)
    assert not model.training
    assert tok.chat_template == CHAT_TEMPLATE
    assert not settings.model_cache_dir.exists()  # nothing converted for a configured model

    service = GeneratorService.from_settings(settings)
    result = service.generate(request([FRANCE], max_new_tokens=3))
    assert result.answer == "bbb"


def test_load_generator_reads_an_encoder_decoder_model(tmp_path, plain_tokenizer):
    folder = tmp_path / "tiny-t5"
    serving_t5(plain_tokenizer, force_token="c").save_pretrained(folder)
    plain_tokenizer.save_pretrained(folder)
    settings = Settings(home=tmp_path / "home", generator={"model": str(folder), "device": "cpu"})
    model, tok = load_generator(settings)
    assert isinstance(model, T5ForConditionalGeneration) and not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    service = GeneratorService(model, tok, 1_000, max_context_tokens=1_024)
    assert service.generate(request([FRANCE], max_new_tokens=2)).answer == "cc"


def test_packaged_model_is_converted_once_under_concurrent_starts(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, target):
        calls.append(gguf)
        time.sleep(0.2)  # widen the race window: other starters arrive meanwhile
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gen_model, "_convert_gguf", fake_convert)
    barrier = threading.Barrier(4)
    results = []

    def start():
        barrier.wait()
        results.append(packaged_model_dir(tmp_path / "models"))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "models" / "smollm2-135m-instruct"] * 4


def test_missing_packaged_model_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gen_model, "PACKAGED_MODULE", "no_such_package_ragtune")
    with pytest.raises(ModelLoadError, match="no_such_package_ragtune.*RAGTUNE_GENERATOR__MODEL"):
        packaged_model_dir(tmp_path / "models")


# --- the real packaged model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def packaged_settings(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("ragtune-home"))
    load_generator(settings)  # converts the GGUF once (~40 s)
    return settings


@pytest.mark.integration
def test_packaged_model_is_cached_as_plain_safetensors(packaged_settings):
    folder = packaged_settings.model_cache_dir / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    started = time.perf_counter()
    model, _ = load_generator(packaged_settings)
    assert time.perf_counter() - started < 10  # a reload never dequantises again (~0.5 s)
    assert not model.training


@pytest.mark.integration
def test_packaged_model_answers_from_the_right_passage(packaged_settings):
    service = GeneratorService.from_settings(packaged_settings)
    result = service.generate(request([GERMANY, FRANCE], max_new_tokens=24))
    assert "Paris" in result.answer
    assert [c.doc_id for c in result.citations] == ["wiki:France"]
    assert result.citations[0].passage == 2
    assert 0 < result.completion_tokens <= 24
    assert result.prompt_tokens > 50
