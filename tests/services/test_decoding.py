"""Decoding rules without a model: each processor on hand-made logits over a 20-token
vocabulary, the strategy table, the plans it builds, stop strings, and the validation of
``DecodingOptions`` (the schema every request's decoding choices arrive in)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.generator.decoding import (
    DEFAULT_NUM_BEAMS,
    STRATEGIES,
    OnNewTokens,
    SampleWithGenerator,
    StopOnStrings,
    cut_at_stop,
    make_plan,
)
from shared.schemas import MIN_TEMPERATURE, DecodingOptions, DecodingStrategy, GenerateRequest

VOCAB = 20
IDS = torch.tensor([[3, 7, 7, 1]])


def uniform() -> torch.Tensor:
    return torch.zeros(1, VOCAB)


def distinct() -> torch.Tensor:
    """Logits with no ties (a random permutation of 0..19), so a top-k cut is unambiguous."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0)).float()[None, :]


def kept(scores: torch.Tensor) -> set[int]:
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


# --- one processor at a time ------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5, 19, 20])
def test_top_k_keeps_exactly_the_k_most_likely_tokens(k):
    scores = distinct()
    out = TopKLogitsWarper(k)(IDS, scores)
    assert kept(out) == set(scores[0].argsort(descending=True)[:k].tolist())
    assert torch.equal(out[torch.isfinite(out)], scores[torch.isfinite(out)])


def test_top_k_on_uniform_logits_keeps_the_ties():
    assert len(kept(TopKLogitsWarper(3)(IDS, uniform()))) == VOCAB


def _smallest_set_reaching(probs: torch.Tensor, p: float) -> set[int]:
    order = probs.argsort(descending=True).tolist()
    total, chosen = 0.0, set()
    for token in order:
        chosen.add(token)
        total += probs[token].item()
        if total >= p:
            break
    return chosen


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0])
def test_top_p_keeps_the_smallest_set_whose_probability_reaches_p(p):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1)) * 2
    out = TopPLogitsWarper(p)(IDS, logits)
    assert kept(out) == _smallest_set_reaching(torch.softmax(logits[0], -1), p)


def test_top_p_on_a_known_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2] + [0.1 / 17] * 17)
    logits = probs.log()[None, :]
    assert kept(TopPLogitsWarper(0.65)(IDS, logits)) == {0, 1}
    assert kept(TopPLogitsWarper(0.75)(IDS, logits)) == {0, 1, 2}
    assert kept(TopPLogitsWarper(0.3)(IDS, logits)) == {0}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    scores = distinct()
    out = TemperatureLogitsWarper(temperature)(IDS, scores)
    assert torch.allclose(out, scores / temperature)
    assert torch.equal(TemperatureLogitsWarper(temperature)(IDS, uniform()), uniform())
    top = torch.softmax(out, -1).max()
    before = torch.softmax(scores, -1).max()
    # below 1 sharpens, above 1 flattens
    assert (top > before) if temperature < 1 else (top <= before)


def test_repetition_penalty_counts_only_generated_tokens():
    scores = torch.full((1, VOCAB), 2.0)
    scores[0, 5] = -2.0
    ids = torch.tensor([[1, 2, 3, 4, 5]])  # prompt 1, 2, 3; generated 4, 5
    (rule,) = make_plan(DecodingOptions(repetition_penalty=2.0), 8, prompt_length=3).processors
    out = rule(ids, scores)
    assert out[0, 4] == 1.0  # positive logits are divided
    assert out[0, 5] == -4.0  # negative ones multiplied
    assert torch.equal(out[0, :4], scores[0, :4])  # prompt tokens are not penalised


def test_no_repeat_ngram_counts_only_generated_tokens():
    # prompt 5 6; generated 5 7 5: the bigram (5, 7) was generated, (5, 6) only prompted
    ids = torch.tensor([[5, 6, 5, 7, 5]])
    (rule,) = make_plan(DecodingOptions(no_repeat_ngram_size=2), 8, prompt_length=2).processors
    out = rule(ids, uniform())
    assert kept(out) == set(range(VOCAB)) - {7}
    # the plain transformers rule, seeing the prompt, would forbid copying it
    assert kept(NoRepeatNGramLogitsProcessor(2)(ids, uniform())) == set(range(VOCAB)) - {6, 7}


def test_sample_with_generator_keeps_one_token_drawn_from_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * 17)
    logits = probs.log()[None, :]
    rule = SampleWithGenerator(seed=0)
    counts = torch.zeros(VOCAB)
    for _ in range(3_000):
        out = rule(IDS, logits)
        (token,) = kept(out)
        assert out[0, token] == 0.0
        counts[token] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_sample_with_generator_is_reproducible_by_seed():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))

    def draws(seed):
        rule = SampleWithGenerator(seed)
        return [rule(IDS.repeat(2, 1), logits).argmax(-1).tolist() for _ in range(20)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5])
def test_sample_with_generator_refuses_a_bad_seed(seed):
    with pytest.raises(ValueError, match=r"`seed` has to be an integer in \[0, 2\*\*63 - 1\]"):
        SampleWithGenerator(seed)


def test_on_new_tokens_refuses_a_negative_prompt_length():
    with pytest.raises(ValueError, match="`prompt_length` .* but is -1"):
        OnNewTokens(NoRepeatNGramLogitsProcessor(2), -1)


def _every_processor():
    return [
        TopKLogitsWarper(3),
        TopPLogitsWarper(0.5),
        TemperatureLogitsWarper(0.7),
        RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=1),
        OnNewTokens(NoRepeatNGramLogitsProcessor(2), 1),
        SampleWithGenerator(0),
        *make_plan(DecodingOptions(strategy="sample", temperature=0.5, top_k=4, top_p=0.9,
                                   repetition_penalty=1.2, no_repeat_ngram_size=2), 8,
                   prompt_length=1).processors,
    ]


@pytest.mark.parametrize("processor", _every_processor(), ids=lambda p: type(p).__name__)
def test_no_processor_changes_its_inputs(processor):
    ids = torch.tensor([[3, 7, 3, 7, 3]])
    scores = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    ids_before, scores_before = ids.clone(), scores.clone()
    out = processor(ids, scores)
    assert torch.equal(ids, ids_before) and torch.equal(scores, scores_before)
    assert out.shape == scores.shape


# --- strategies and plans ---------------------------------------------------------------
def test_the_strategy_table_knows_exactly_the_wire_names():
    assert set(STRATEGIES) == set(get_args(DecodingStrategy))


def test_an_unknown_strategy_is_an_error_listing_the_known_ones():
    options = DecodingOptions.model_construct(strategy="magic")  # skips the schema's check
    with pytest.raises(ValueError, match="unknown decoding strategy 'magic'; known: greedy, "
                                         "beam, sample"):
        make_plan(options, 8, prompt_length=0)


def test_make_plan_refuses_a_non_positive_max_new_tokens():
    with pytest.raises(ValueError, match="`max_new_tokens` .* but is 0"):
        make_plan(DecodingOptions(), 0, prompt_length=0)


def test_the_default_plan_is_plain_greedy():
    plan = make_plan(DecodingOptions(), 48, prompt_length=10)
    assert list(plan.processors) == [] and plan.num_beams == 1 and plan.stop == ()
    kwargs = plan.generate_kwargs()
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 48
    assert "length_penalty" not in kwargs and "early_stopping" not in kwargs
    # sampling settings a model's generation_config may hold are switched off
    assert all(kwargs[k] is None for k in ("temperature", "top_k", "top_p",
                                           "repetition_penalty", "no_repeat_ngram_size"))


def test_a_beam_plan_takes_its_width_and_penalty():
    plan = make_plan(DecodingOptions(strategy="beam"), 8, prompt_length=0)
    assert (plan.num_beams, plan.length_penalty, plan.early_stopping) == (DEFAULT_NUM_BEAMS,
                                                                          1.0, False)
    plan = make_plan(DecodingOptions(strategy="beam", num_beams=3, length_penalty=-0.5,
                                     early_stopping=True), 8, prompt_length=0)
    kwargs = plan.generate_kwargs()
    assert (kwargs["num_beams"], kwargs["length_penalty"], kwargs["early_stopping"]) == (
        3, -0.5, True)
    one = make_plan(DecodingOptions(strategy="beam", num_beams=1), 8, prompt_length=0)
    assert one.generate_kwargs() == make_plan(DecodingOptions(), 8, 0).generate_kwargs()


def test_a_sample_plan_applies_penalties_then_warpers_then_the_draw():
    options = DecodingOptions(strategy="sample", temperature=0.7, top_k=5, top_p=0.9, seed=1,
                              repetition_penalty=1.1, no_repeat_ngram_size=3, stop=["\n"])
    plan = make_plan(options, 16, prompt_length=4)
    assert [type(p) for p in plan.processors] == [
        RepetitionPenaltyLogitsProcessor, OnNewTokens, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper, SampleWithGenerator]
    assert plan.processors[-1].seed == 1 and plan.stop == ("\n",)
    out = plan.processors(torch.tensor([[1, 2, 3, 4, 5]]), distinct())
    assert len(kept(out)) == 1 and kept(out) <= kept(TopKLogitsWarper(5)(IDS, distinct()))
    unseeded = [make_plan(DecodingOptions(strategy="sample"), 8, 0).processors[-1].seed
                for _ in range(3)]
    assert len(set(unseeded)) == 3


# --- stop strings -----------------------------------------------------------------------
@pytest.mark.parametrize("text, stop, expected", [
    ("Paris.\nQuestion: next", ["\n"], ("Paris.", True)),
    ("Paris. END and more", ["more", "END"], ("Paris. ", True)),
    ("Paris.", ["END"], ("Paris.", False)),
    ("Paris.", [], ("Paris.", False)),
    ("STOP at once", ["STOP"], ("", True)),
])
def test_cut_at_stop_cuts_before_the_earliest_stop_string(text, stop, expected):
    assert cut_at_stop(text, stop) == expected


class LetterTokenizer:
    """Token i decodes to the i-th lower-case letter: enough for StopOnStrings."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(ord("a") + i) for i in row.tolist()) for row in rows]


def test_stop_on_strings_looks_at_generated_tokens_only():
    criterion = StopOnStrings(LetterTokenizer(), ("cd",), prompt_length=2)
    ids = torch.tensor([[2, 3, 0, 1], [0, 1, 2, 3]])  # "cd|ab", "ab|cd"
    assert criterion(ids, None).tolist() == [False, True]
    with pytest.raises(ValueError, match="non-empty strings"):
        StopOnStrings(LetterTokenizer(), ("",), prompt_length=0)


# --- DecodingOptions: validated once, at the edge ------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"strategy": "magic"}, "unknown decoding strategy 'magic'; known: greedy, beam, sample"),
    ({"strategy": "sample", "temperature": 0}, 'use strategy "greedy" instead'),
    ({"strategy": "sample", "temperature": -1}, "`temperature` has to be a strictly positive "
                                                "float, but is -1"),
    ({"strategy": "sample", "temperature": float("inf")}, "has to be a finite number"),
    ({"strategy": "sample", "temperature": 1e-39}, "`temperature` has to be at least 0.001, but "
                                                   'is 1e-39; to always take the most likely '
                                                   'token use strategy "greedy"'),
    ({"strategy": "sample", "top_p": 0}, "`top_p` has to be in (0, 1], but is 0"),
    ({"strategy": "sample", "top_p": 1.01}, "`top_p` has to be in (0, 1], but is 1.01"),
    ({"strategy": "sample", "top_k": 0}, "`top_k` has to be a strictly positive integer, "
                                         "but is 0"),
    ({"strategy": "sample", "seed": -3}, "`seed` has to be an integer in [0, 2**63 - 1], "
                                         "but is -3"),
    ({"strategy": "beam", "num_beams": 0}, "`num_beams` has to be an integer in [1, 16], "
                                           "but is 0"),
    ({"strategy": "beam", "num_beams": 17}, "but is 17"),
    ({"max_new_tokens": 0}, "`max_new_tokens` has to be a strictly positive integer, but is 0"),
    ({"repetition_penalty": 0}, "`repetition_penalty` has to be a strictly positive float "
                                "(1.0 = no penalty), but is 0"),
    ({"no_repeat_ngram_size": 0}, "`no_repeat_ngram_size` has to be a strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` holds 5 strings; at most 4"),
    ({"stop": [""]}, "each `stop` string has to be 1..64 characters, but '' is 0"),
    ({"top_k": 5}, "`top_k` only applies to strategy sample; strategy is greedy"),
    ({"strategy": "beam", "temperature": 0.5}, "`temperature` only applies to strategy sample"),
    ({"strategy": "sample", "num_beams": 2}, "`num_beams` only applies to strategy beam; "
                                             "strategy is sample"),
    ({"colour": "red"}, "Extra inputs are not permitted"),
])
def test_bad_decoding_options_name_the_bad_value(options, message):
    with pytest.raises(ValidationError) as err:
        DecodingOptions(**options)
    assert message in str(err.value)


def test_the_lowest_temperature_still_draws_from_large_logits():
    # a temperature below MIN_TEMPERATURE overflows such logits to inf and the draw raises
    options = DecodingOptions(strategy="sample", temperature=MIN_TEMPERATURE, seed=0)
    scores = distinct() * 5  # logits up to 95, as a real model's can be
    out = make_plan(options, 8, prompt_length=0).processors(IDS, scores)
    assert kept(out) == {int(scores.argmax())}


def test_good_decoding_options_keep_their_values():
    options = DecodingOptions(strategy="sample", temperature=0.3, top_k=1, top_p=1.0, seed=0,
                              max_new_tokens=5, stop=["\n", " "])
    assert (options.temperature, options.top_k, options.top_p, options.seed) == (0.3, 1, 1.0, 0)
    assert DecodingOptions().strategy == "greedy"


def test_generate_request_holds_one_max_new_tokens():
    GenerateRequest(question="q?", passages=[], max_new_tokens=5,
                    decoding=DecodingOptions(max_new_tokens=5))
    with pytest.raises(ValidationError, match=r"decoding.max_new_tokens \(6\) disagrees with "
                                              r"max_new_tokens \(5\)"):
        GenerateRequest(question="q?", passages=[], max_new_tokens=5,
                        decoding=DecodingOptions(max_new_tokens=6))
    default = GenerateRequest(question="q?", passages=[], max_new_tokens=5)
    assert default.decoding == DecodingOptions()
