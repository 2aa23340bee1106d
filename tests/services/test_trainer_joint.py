"""Joint RAG training: the RAG-Sequence and RAG-Token losses on hand-made log-probabilities
(pure), then the loop with a tiny random BERT query encoder and a tiny Llama or T5 generator."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch
from transformers import BertModel, LlamaForCausalLM, T5ForConditionalGeneration

from services.trainer import joint, loop
from shared.datasets import QAItem
from shared.models.encoder import Encoder
from shared.prompt import NO_ANSWER
from shared.schemas import Document
from tests.tiny import CITIES, bpe_tokenizer, tiny_bert, tiny_llama, tiny_t5

LOG = math.log


def lp(*rows):
    """(B=1, K, T) log-probabilities from per-passage token probabilities."""
    return torch.tensor([[[LOG(p) for p in row] for row in rows]])


# --- the losses (pure) ------------------------------------------------------------------------
@pytest.mark.parametrize("loss", [joint.rag_sequence_nll, joint.rag_token_nll])
def test_with_one_passage_both_losses_are_the_plain_nll(loss):
    token_lp = lp([0.5, 0.25, 0.9])
    mask = torch.tensor([[1, 1, 0]])
    assert loss(torch.tensor([[3.0]]), token_lp, mask).item() == pytest.approx(
        -(LOG(0.5) + LOG(0.25)))


def test_with_one_target_token_both_losses_agree():
    scores = torch.tensor([[0.3, -1.0, 2.0]])
    token_lp = lp([0.2], [0.7], [0.4])
    mask = torch.ones(1, 1)
    prior = torch.softmax(scores, -1)[0]
    expected = -LOG(float(prior @ torch.tensor([0.2, 0.7, 0.4])))
    assert joint.rag_sequence_nll(scores, token_lp, mask).item() == pytest.approx(expected)
    assert joint.rag_token_nll(scores, token_lp, mask).item() == pytest.approx(expected)


def test_a_certain_retriever_reduces_both_to_that_passage_nll():
    token_lp = lp([0.5, 0.5], [0.9, 0.1])
    mask = torch.ones(1, 2)
    scores = torch.tensor([[0.0, 1e4]])  # p(z=2 | x) = 1
    for loss in joint.LOSSES.values():
        assert loss(scores, token_lp, mask).item() == pytest.approx(-(LOG(0.9) + LOG(0.1)))


def test_token_marginal_wins_when_the_answer_is_spread_over_passages_sequence_when_not():
    mask = torch.ones(1, 2)
    scores = torch.zeros(1, 2)  # uniform prior
    # passage 1 explains the first token, passage 2 the second: only RAG-Token combines them
    spread = lp([0.9, 0.01], [0.01, 0.9])
    assert joint.rag_token_nll(scores, spread, mask) < joint.rag_sequence_nll(
        scores, spread, mask)
    # passage 1 explains the whole answer, passage 2 nothing: RAG-Sequence keeps the pair whole
    whole = lp([0.9, 0.9], [0.01, 0.01])
    assert joint.rag_sequence_nll(scores, whole, mask) < joint.rag_token_nll(
        scores, whole, mask)
    # by hand: sequence = -log(.5 * .81 + .5 * 1e-4), token = -2 log(.5 * .91)
    assert joint.rag_sequence_nll(scores, whole, mask).item() == pytest.approx(
        -LOG(0.5 * 0.81 + 0.5 * 1e-4))
    assert joint.rag_token_nll(scores, whole, mask).item() == pytest.approx(-2 * LOG(0.455))


def test_rag_sequence_nll_is_at_most_any_single_passage_bound():
    torch.manual_seed(0)
    scores = torch.randn(5, 4)
    token_lp = torch.log(torch.rand(5, 4, 6) * 0.9 + 0.05)
    mask = torch.ones(5, 6)
    mask[:, 4:] = 0
    nll = joint.rag_sequence_nll(scores, token_lp, mask)
    bound = -(torch.log_softmax(scores, -1) + (token_lp * mask[:, None]).sum(-1))
    assert torch.all(nll[:, None] <= bound + 1e-6)
    token = joint.rag_token_nll(scores, token_lp, mask)
    assert torch.all(token >= 0) and torch.all(nll >= 0)


@pytest.mark.parametrize("loss", [joint.rag_sequence_nll, joint.rag_token_nll])
def test_gradients_reach_the_retriever_scores_and_favour_the_explaining_passage(loss):
    scores = torch.zeros(1, 3, requires_grad=True)
    token_lp = lp([0.9, 0.8], [0.1, 0.2], [0.3, 0.3]).requires_grad_()
    loss(scores, token_lp, torch.ones(1, 2)).sum().backward()
    grad = scores.grad[0]
    assert grad[0] < 0 < grad[1]  # raising passage 1's score lowers the loss
    assert grad.sum().item() == pytest.approx(0.0, abs=1e-6)  # softmax: shifts do nothing
    assert token_lp.grad is not None and token_lp.grad.abs().sum() > 0


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown RAG variant 'marginal'; known: sequence, token"):
        joint.rag_loss("marginal")
    with pytest.raises(pydantic.ValidationError, match="input_value=0"):
        joint.JointTrainConfig(temperature=0)


# --- the loop ---------------------------------------------------------------------------------
def toy_corpus() -> tuple[list[Document], list[QAItem]]:
    docs = [Document(doc_id=f"c{i}", title=f"Land{i}",
                     text=f"Land{i} is a country. Its capital is {city}.")
            for i, city in enumerate(CITIES)]
    docs.append(Document(doc_id="sea", title="Sea", text="The sea is salty."))
    items = [QAItem(id=f"toy:{i}", question=f"What is the capital of Land{i}?",
                    answers=[CITIES[i]], doc_ids=[f"c{i}"], answerable=True) for i in range(6)]
    items.append(QAItem(id="toy:x", question="What is the capital of Nowhere?",
                        answers=["Utopia"], doc_ids=[], answerable=False))
    # answerable, but the gold document does not hold the answer
    items.append(QAItem(id="toy:s", question="What colour is the sea?", answers=["blue"],
                        doc_ids=["sea"], answerable=True))
    return docs, items


def tiny_encoder(tokenizer) -> Encoder:
    model = tiny_bert(tokenizer, max_positions=256)
    return Encoder(tokenizer, model.eval(), batch_size=8, max_length=64)


def test_joint_target_follows_the_gold_document():
    docs, items = toy_corpus()
    by_id = {d.doc_id: d for d in docs}
    assert [joint.joint_target(i, by_id) for i in items[:1] + items[-2:]] == [
        "Amber [1]", NO_ANSWER, NO_ANSWER]


@pytest.mark.parametrize(("variant", "seq2seq"), [("sequence", False), ("token", True)])
def test_joint_training_moves_both_models_and_saves_them(variant, seq2seq, tmp_path):
    tok = bpe_tokenizer(chat_template=None if seq2seq else bpe_tokenizer().chat_template)
    generator = tiny_t5(tok) if seq2seq else tiny_llama(tok)
    encoder = tiny_encoder(tok)
    docs, items = toy_corpus()
    doc_vectors = encoder.encode([f"{d.title}\n{d.text}" for d in docs])
    encoder_before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    generator_before = {k: v.clone() for k, v in generator.state_dict().items()}
    config = joint.JointTrainConfig(variant=variant, n_docs=3, batch_size=4, epochs=3,
                                    generator_lr=3e-3, retriever_lr=1e-3, warmup_steps=1,
                                    max_seq_len=512, device="cpu", log_steps=1)
    seen = []
    result = joint.train_joint(config, encoder, generator, tok, docs, doc_vectors, items,
                               tmp_path, progress=seen.append)
    assert result.steps == result.total_steps == 6 and seen[-1].step == 6
    assert result.targets == {"answer": 6, "no_answer": 2}
    losses = [r["loss"] for r in result.history["train"]]
    assert losses[-1] < losses[0]
    assert all(0 <= r["gold_prior"] <= 1 for r in result.history["train"])
    # the loss reached the query encoder through the retrieval scores
    assert any(not torch.equal(encoder_before[k], v)
               for k, v in encoder.model.state_dict().items())
    assert any(not torch.equal(generator_before[k], v) for k, v in generator.state_dict().items())
    assert loop.read_meta(result.retriever_dir)["kind"] == "retriever"
    meta = loop.read_meta(result.generator_dir)
    assert meta["kind"] == "generator" and meta["trained_by"].endswith(variant.capitalize() + ")")
    loaded = BertModel.from_pretrained(result.retriever_dir)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded(ids).last_hidden_state,
                          encoder.model(ids).last_hidden_state, atol=1e-5)
    cls = T5ForConditionalGeneration if seq2seq else LlamaForCausalLM
    assert cls.from_pretrained(result.generator_dir) is not None
    assert result.plot_path.is_file()


def test_joint_training_refuses_bad_inputs_and_resumes_after_cancel(tmp_path):
    tok = bpe_tokenizer()
    docs, items = toy_corpus()
    encoder = tiny_encoder(tok)
    vectors = encoder.encode([d.title for d in docs])
    config = joint.JointTrainConfig(n_docs=2, batch_size=4, max_steps=4, warmup_steps=1,
                                    device="cpu", method="lora",
                                    lora={"r": 2, "alpha": 4, "dropout": 0.0})
    with pytest.raises(ValueError, match="doc_vectors"):
        joint.train_joint(config, encoder, tiny_llama(tok), tok, docs, vectors[:3], items,
                          tmp_path)
    with pytest.raises(ValueError, match="no training items"):
        joint.train_joint(config, encoder, tiny_llama(tok), tok, docs, vectors, [], tmp_path)
    calls = iter(range(100))
    with pytest.raises(loop.Cancelled):
        joint.train_joint(config, encoder, tiny_llama(tok), tok, docs, vectors, items,
                          tmp_path, should_stop=lambda: next(calls) == 2)
    assert loop.load_state(tmp_path)["step"] == 2
    generator = tiny_llama(tok)
    result = joint.train_joint(config, encoder, generator, tok, docs,
                               np.asarray(vectors), items, tmp_path)
    assert result.resumed_from == 2 and result.steps == 4
    assert [r["step"] for r in result.history["train"]] == [1, 2, 3, 4]
    assert not any("lora" in k for k in generator.state_dict())  # merged into the caller's


def test_activation_checkpointing_trains_the_same_models_and_is_off_afterwards(tmp_path):
    tok = bpe_tokenizer()
    docs, items = toy_corpus()
    trained = {}
    for checkpointing in (False, True):
        encoder, generator = tiny_encoder(tok), tiny_llama(tok)
        vectors = encoder.encode([f"{d.title}\n{d.text}" for d in docs])
        config = joint.JointTrainConfig(n_docs=3, batch_size=4, max_steps=3, warmup_steps=1,
                                        generator_lr=3e-3, retriever_lr=1e-3, device="cpu",
                                        activation_checkpointing=checkpointing)
        result = joint.train_joint(config, encoder, generator, tok, docs, vectors, items,
                                   tmp_path / str(checkpointing))
        assert not generator.is_activation_checkpointing
        assert loop.read_meta(result.generator_dir)["config"]["activation_checkpointing"] \
            is checkpointing
        trained[checkpointing] = (encoder.model.state_dict(), generator.state_dict())
    for plain, checkpointed in zip(trained[False], trained[True], strict=True):
        for name, value in plain.items():
            torch.testing.assert_close(checkpointed[name], value, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(v, tiny_llama(tok).state_dict()[k])
               for k, v in trained[True][1].items())
