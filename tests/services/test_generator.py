"""Generator service: prompt helpers (pure), service mechanics on a tiny random Llama with a
byte-level tokenizer built in-process, model loading/caching, and one integration test with
the real packaged SmolLM2 (converted once into a temporary home, ~40 s)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.generator.service import GenerationError, GeneratorService
from shared.models import generator as gen_model
from shared.models.generator import ModelLoadError, load_generator, packaged_model_dir
from shared.prompt import (
    NO_ANSWER,
    build_messages,
    clean_answer,
    format_passages,
    parse_citations,
    truncate_text,
)
from shared.schemas import GenerateRequest, Hit
from shared.settings import Settings

# SmolLM2's own chat template (ChatML with a default system turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

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


def test_format_passages_numbers_from_one_and_cuts_texts():
    text = format_passages([FRANCE, GERMANY], max_chars=40)
    first, second = text.split("\n\n")
    assert first == "[1] France\nFrance is a country in Western Europe."
    assert second.startswith("[2] Germany\nGermany is a country in Central")
    assert len(second.split("\n", 1)[1]) <= 40
    assert format_passages([], 40) == ""


def test_build_messages_gives_a_system_instruction_and_the_passages_then_the_question():
    messages = build_messages("  What is the capital of France? ", [FRANCE, GERMANY], 1_000)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert f'"{NO_ANSWER}"' in messages[0]["content"]
    assert "square brackets" in messages[0]["content"]
    user = messages[1]["content"]
    assert user.index("[1] France") < user.index("[2] Germany") < user.index("Question:")
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
    ],
)
def test_clean_answer_drops_only_a_trailing_fragment_of_a_truncated_answer(
    raw, truncated, expected
):
    assert clean_answer(raw, truncated=truncated) == expected


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


# --- service mechanics: tiny random Llama + byte-level tokenizer ---------------------------
@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE with no merges (every byte one token): encodes any text, offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(tokenizer, force_token: str | None = None) -> LlamaForCausalLM:
    """A 2-layer random Llama; with ``force_token`` it predicts that token at every step.

    Forcing: embedding dim 0 is a large constant for every token, the final norm keeps only
    dim 0 and the head reads dim 0 into one row, so that logit alone is positive.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if force_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(force_token)
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 100.0
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[token_id, 0] = 1.0
    return model.eval()


def prompt_length(tokenizer, question, passages, max_chars):
    ids = tokenizer.apply_chat_template(
        build_messages(question, passages, max_chars),
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    return ids.shape[1]


def request(passages, max_new_tokens=8, question="What is the capital of France?"):
    return GenerateRequest(question=question, passages=passages, max_new_tokens=max_new_tokens)


def test_generate_decodes_only_new_tokens_and_counts_them(tokenizer):
    service = GeneratorService(tiny_model(tokenizer, force_token="a"), tokenizer, 1_000)
    result = service.generate(request([FRANCE, GERMANY], max_new_tokens=7))
    assert result.answer == "a" * 7
    assert result.completion_tokens == 7
    assert result.prompt_tokens == prompt_length(
        tokenizer, "What is the capital of France?", [FRANCE, GERMANY], 1_000
    )
    assert result.citations == []


def test_generate_stops_at_eos_and_reports_an_empty_completion_as_no_answer(tokenizer):
    service = GeneratorService(tiny_model(tokenizer, force_token="<|im_end|>"), tokenizer, 1_000)
    result = service.generate(request([FRANCE], max_new_tokens=12))
    assert result.answer == NO_ANSWER
    assert result.completion_tokens == 0
    assert result.citations == []


def test_generate_is_greedy_and_repeatable(tokenizer):
    service = GeneratorService(tiny_model(tokenizer), tokenizer, 1_000)
    first = service.generate(request([FRANCE, GERMANY], max_new_tokens=10))
    second = service.generate(request([FRANCE, GERMANY], max_new_tokens=10))
    assert first == second
    assert 0 <= first.completion_tokens <= 10


def test_generate_cuts_passages_to_max_passage_chars(tokenizer):
    long = FRANCE.model_copy(update={"text": "word " * 500})
    service = GeneratorService(tiny_model(tokenizer, force_token="a"), tokenizer, 60)
    result = service.generate(request([long], max_new_tokens=2))
    assert result.prompt_tokens == prompt_length(
        tokenizer, "What is the capital of France?", [long], 60
    )
    assert result.prompt_tokens < 60 + 400


def test_generate_drops_passages_from_the_end_until_the_prompt_fits(tokenizer):
    question = "What is the capital of France?"
    one = prompt_length(tokenizer, question, [FRANCE], 1_000)
    two = prompt_length(tokenizer, question, [FRANCE, GERMANY], 1_000)
    max_new = 4
    service = GeneratorService(
        tiny_model(tokenizer, force_token="a"),
        tokenizer,
        1_000,
        max_context_tokens=two - 1 + max_new,
    )
    result = service.generate(request([FRANCE, GERMANY, JAPAN], max_new_tokens=max_new))
    assert result.prompt_tokens == one
    assert result.completion_tokens == max_new


def test_generate_refuses_a_request_whose_first_passage_cannot_fit(tokenizer):
    one = prompt_length(tokenizer, "What is the capital of France?", [FRANCE], 1_000)
    service = GeneratorService(
        tiny_model(tokenizer), tokenizer, 1_000, max_context_tokens=one - 1 + 4
    )
    with pytest.raises(GenerationError, match="even one passage needs") as err:
        service.generate(request([FRANCE, GERMANY], max_new_tokens=4))
    assert isinstance(err.value, ValueError)


def test_generate_refuses_max_new_tokens_that_fill_the_context(tokenizer):
    service = GeneratorService(tiny_model(tokenizer), tokenizer, 1_000, max_context_tokens=64)
    with pytest.raises(GenerationError, match=r"max_new_tokens \(64\) leaves no room"):
        service.generate(request([FRANCE], max_new_tokens=64))


def test_generate_without_passages_answers_no_answer_without_the_model(tokenizer, monkeypatch):
    model = tiny_model(tokenizer)
    service = GeneratorService(model, tokenizer, 1_000)

    def fail(*args, **kwargs):
        raise AssertionError("the model must not run without passages")

    monkeypatch.setattr(model, "generate", fail)
    result = service.generate(request([]))
    assert (result.answer, result.citations) == (NO_ANSWER, [])
    assert (result.prompt_tokens, result.completion_tokens) == (0, 0)


def test_service_validates_its_arguments(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(ValueError, match="max_passage_chars.*but is 0"):
        GeneratorService(model, tokenizer, 0)
    with pytest.raises(ValueError, match="max_context_tokens.*but is 1"):
        GeneratorService(model, tokenizer, 100, max_context_tokens=1)
    assert GeneratorService(model, tokenizer, 100).max_context_tokens == 2048


# --- model loading --------------------------------------------------------------------------
def test_load_generator_reads_a_configured_local_model(tmp_path, tokenizer):
    folder = tmp_path / "tiny"
    tiny_model(tokenizer, force_token="b").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = Settings(home=tmp_path / "home", generator={"model": str(folder)})
    model, tok = load_generator(settings)
    assert not model.training
    assert tok.chat_template == CHAT_TEMPLATE
    assert not settings.model_cache_dir.exists()  # nothing converted for a configured model

    service = GeneratorService.from_settings(settings)
    result = service.generate(request([FRANCE], max_new_tokens=3))
    assert result.answer == "bbb"


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
