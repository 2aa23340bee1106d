"""Tiny random models and tokenizers, built in-process (no network, no downloaded weights), for
the unit and integration tests.

Tokenizers (both byte-level, so they encode any text; both speak SmolLM2's ChatML template
unless given ``chat_template=None``, as many seq2seq tokenizers are):

- ``per_byte_tokenizer``: no merges, every byte one token (a prompt is ~600 tokens);
- ``bpe_tokenizer``: merges learnt from the system prompt and the toy task's words (a prompt
  is ~150 tokens), for tests that train on many prompts;
- ``word_tokenizer``: one token per word of a given vocabulary, for encoders over synthetic
  documents.

Models (every builder seeds torch itself, so the same call gives the same weights):

- ``tiny_llama``: a 2-layer Llama, in training mode; ``serving_llama``: the same weights in
  eval mode, optionally forced to predict one token at every step;
- ``tiny_t5``: a 2-layer T5 without dropout, for training; ``serving_t5``: a smaller T5 in eval
  mode, optionally forced like ``serving_llama``;
- ``tiny_bert``: a BERT of hidden size 32;
- ``save_tiny_models``: a tiny BERT encoder and a tiny Llama generator saved as folders that
  ``Settings`` can name (``embedding.model``, ``generator.model``).

The toy task (``CITIES``, ``toy_task``) is made-up countries and their capitals; the BPE
tokenizer's merges are learnt from its words.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from shared.datasets import QAItem
from shared.prompt import SYSTEM_PROMPT
from shared.schemas import Hit

# SmolLM2's own chat template (ChatML with a default system turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CITIES = ["Amber", "Bolt", "Cove", "Dune", "Elm", "Fjord", "Glen", "Haze", "Isle", "Jade"]


# --- tokenizers -------------------------------------------------------------------------------
def _chat_tokenizer(backend: Tokenizer, chat_template: str | None) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def per_byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte one token, ids 0-2 are ``SPECIALS``."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return _chat_tokenizer(backend, chat_template)


def word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level (whitespace and punctuation split) over ``words`` plus ``[PAD]`` (id 0) and
    ``[UNK]`` (id 1), for encoders over synthetic documents; no chat template."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                   unk_token="[UNK]")


def bpe_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (700 tokens) with merges learnt in-process from the system prompt and the
    toy task's words, so a prompt is ~150 tokens rather than ~600 bytes: the tests train on
    many of them."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [SYSTEM_PROMPT, CHAT_TEMPLATE, "Passages:\n[1] [2] [3] Question: What is the "
             "capital of Nowhere Erewhon Utopia? is a country. Its capital is"]
    texts += [f"Land{i} {city}" for i, city in enumerate(CITIES)]
    backend.train_from_iterator(texts * 3, trainer)
    return _chat_tokenizer(backend, chat_template)


# --- generators -------------------------------------------------------------------------------
def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden size 64, untied head, 2048 positions) in training mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def serving_llama(tokenizer, force_token: str | None = None) -> LlamaForCausalLM:
    """``tiny_llama(tokenizer)`` in eval mode; with ``force_token`` it predicts that token at
    every step.

    Forcing: embedding dim 0 is a large constant for every token, the final norm keeps only
    dim 0 and the head reads dim 0 into one row, so that logit alone is positive.
    """
    model = tiny_llama(tokenizer)
    if force_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(force_token)
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 100.0
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[token_id, 0] = 1.0
    return model.eval()


def tiny_t5(tokenizer, seed: int = 0) -> T5ForConditionalGeneration:
    """A 2-layer random T5 (d_model 64, no dropout, 2048 positions) in training mode."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                      num_heads=4, dropout_rate=0.0, n_positions=2048,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5ForConditionalGeneration(config)


def serving_t5(tokenizer, force_token: str | None = None) -> T5ForConditionalGeneration:
    """A smaller 2-layer random T5 (d_model 32, seed 0) in eval mode; with ``force_token`` its
    decoder predicts that token at every step.

    T5's head is tied to its embeddings, so forcing differs from ``serving_llama``'s: embedding
    dim 0 is large for every token and twice as large for the forced one, and the decoder's
    final norm keeps only dim 0, so the forced token's logit is far ahead of all others.
    """
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    if force_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(force_token)
        with torch.no_grad():
            model.shared.weight[:, 0] = 100.0
            model.shared.weight[token_id, 0] = 200.0
            model.decoder.final_layer_norm.weight.zero_()
            model.decoder.final_layer_norm.weight[0] = 1.0
    return model.eval()


# --- encoders ---------------------------------------------------------------------------------
def tiny_bert(tokenizer, seed: int = 0, layers: int = 1, max_positions: int = 128,
              pooler: bool = True) -> BertModel:
    """A random BERT of hidden size 32 (2 heads, feed-forward 64) over ``tokenizer``'s
    vocabulary and padding id, in training mode; ``pooler=False`` leaves out the pooling layer
    (a model saved without one loads without random pooler weights)."""
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, vocab_size=len(tokenizer),
                        max_position_embeddings=max_positions,
                        pad_token_id=tokenizer.pad_token_id)
    return BertModel(config, add_pooling_layer=pooler)


def save_tiny_models(root: Path) -> tuple[Path, Path]:
    """Save ``tiny_bert`` and ``tiny_llama`` (seed 0), each with ``bpe_tokenizer()``, as
    ``root/encoder`` and ``root/generator``; returns those two folders."""
    tokenizer = bpe_tokenizer()
    encoder, generator = root / "encoder", root / "generator"
    tiny_bert(tokenizer).save_pretrained(encoder)
    tiny_llama(tokenizer).save_pretrained(generator)
    for folder in (encoder, generator):
        tokenizer.save_pretrained(folder)
    return encoder, generator


# --- the toy task -----------------------------------------------------------------------------
def toy_task(n: int = 8) -> tuple[list[QAItem], dict[str, list[Hit]], list[QAItem]]:
    """``n`` (at most 10) answerable capital questions about made-up countries, each with its
    passage and two others (the gold one at a varying rank) and a fourth, and two unanswerable
    ones. Returns (items, passages by question, unanswerable items)."""
    hits = [Hit(doc_id=f"c{i}", title=f"Land{i}",
                text=f"Land{i} is a country. Its capital is {CITIES[i]}.", score=1.0)
            for i in range(len(CITIES))]
    items, passages = [], {}
    for i in range(n):
        others = [hits[(i + 3) % len(hits)], hits[(i + 5) % len(hits)]]
        ranked = others[:i % 3] + [hits[i]] + others[i % 3:]
        question = f"What is the capital of Land{i}?"
        items.append(QAItem(id=f"toy:{i}", question=question, answers=[CITIES[i]],
                            doc_ids=[f"c{i}"], answerable=True))
        passages[question] = ranked + [hits[(i + 7) % len(hits)]]
    unknown = []
    for name in ("Nowhere", "Erewhon"):
        question = f"What is the capital of {name}?"
        unknown.append(QAItem(id=f"toy:{name}", question=question, answers=["Utopia"],
                              doc_ids=[], answerable=False))
        passages[question] = hits[:4]
    return items, passages, unknown
