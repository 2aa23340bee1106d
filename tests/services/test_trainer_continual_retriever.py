"""Continual learning of the retriever: the corpus-wide InfoNCE, recall@1, and the stream (each
method) on a tiny random BERT over 24 synthetic documents. No downloaded weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.trainer import continual as cl
from services.trainer.continual_retriever import (
    CorpusInfoNCE,
    recall_at_1,
    run_retriever_stream,
    task_examples,
)
from services.trainer.retriever import Example
from shared.datasets import QAItem
from shared.models.encoder import Encoder
from shared.schemas import Document
from tests.tiny import tiny_bert, word_tokenizer

N_DOCS = 24


def _text(i: int) -> str:
    return f"k{i} lies near m{i * 5 % N_DOCS}"


CORPUS = [Document(doc_id=f"d{i:02d}", title=f"d{i:02d}", text=_text(i)) for i in range(N_DOCS)]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(w for i in range(N_DOCS) for w in f"d{i:02d} {_text(i)} what is".split())


def _encoder(tokenizer) -> Encoder:
    return Encoder(tokenizer, tiny_bert(tokenizer, layers=2, max_positions=64,
                                        pooler=False).eval(), batch_size=16, max_length=16)


def _item(i: int) -> QAItem:
    # "what is k3" -> d03: learnable from the one word the question shares with its document.
    return QAItem(id=f"q{i}", question=f"what is k{i}", answers=[f"m{i}"],
                  doc_ids=[f"d{i:02d}"], answerable=True)


def _tasks() -> list[cl.Task]:
    """Three tasks of 8 questions each; a task is tested on the questions it trains on (the
    stream's mechanics, not generalisation, are under test)."""
    return [cl.Task(f"t{t}", (), [_item(i) for i in range(8 * t, 8 * t + 8)],
                    [_item(i) for i in range(8 * t, 8 * t + 8)]) for t in range(3)]


def _config(**overrides) -> cl.ContinualConfig:
    values = {"method": "naive", "lr": 3e-3, "batch_size": 4, "epochs": 6, "seed": 1,
              "device": "cpu", "fisher_examples": 4, "penalty_strength": 1.0}
    return cl.ContinualConfig(**{**values, **overrides})


def _doc_vectors(encoder: Encoder) -> np.ndarray:
    return encoder.encode([d.text for d in CORPUS])


# --- loss and accuracy ------------------------------------------------------------------------
def test_corpus_info_nce_is_cross_entropy_over_every_document(tokenizer):
    encoder = _encoder(tokenizer)
    docs = torch.from_numpy(_doc_vectors(encoder))
    loss_fn = CorpusInfoNCE(tokenizer, docs, temperature=0.1, max_length=16)
    examples = [Example("a", "what is k1", (1,), ()), Example("b", "what is k2", (2, 5), ())]
    with torch.no_grad():
        loss = loss_fn(encoder.model, examples)
        queries = encoder.embed(["what is k1", "what is k2"])
    scores = queries @ docs.T / 0.1
    scores[1, 5] = float("-inf")  # b's second positive is not a negative for it
    expected = F.cross_entropy(scores, torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_corpus_info_nce_refuses_a_bad_temperature_and_no_example(tokenizer):
    docs = torch.zeros((2, 32))
    with pytest.raises(ValueError, match="`temperature` has to be > 0, but is 0"):
        CorpusInfoNCE(tokenizer, docs, temperature=0, max_length=16)
    loss_fn = CorpusInfoNCE(tokenizer, docs, temperature=0.1, max_length=16)
    with pytest.raises(ValueError, match="at least one example"):
        loss_fn(_encoder(tokenizer).model, [])


def test_recall_at_1_counts_a_positive_ranked_first(tokenizer):
    encoder = _encoder(tokenizer)
    vectors = _doc_vectors(encoder)
    # A question that is its document's text finds that document first.
    examples = [Example("a", _text(3), (3,), ()), Example("b", _text(4), (3,), ()),
                Example("c", _text(7), (9, 7), ())]
    assert recall_at_1(encoder, vectors, examples) == [1.0, 0.0, 1.0]
    assert recall_at_1(encoder, vectors, []) == []


def test_task_examples_need_a_gold_document_on_both_sides():
    unanswerable = QAItem(id="u", question="what is k99", answers=["x"], doc_ids=[],
                          answerable=False)
    train, test = task_examples(cl.Task("t", (), [_item(1), unanswerable], [_item(2)]), CORPUS)
    assert [e.positives for e in train] == [(1,)] and [e.positives for e in test] == [(2,)]
    with pytest.raises(ValueError, match="task 'empty' has 1 train and 0 test questions"):
        task_examples(cl.Task("empty", (), [_item(1)], [unanswerable]), CORPUS)


# --- the stream -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["naive", "replay", "ewc", "l2"])
def test_each_method_learns_each_task_and_reports_the_gem_metrics(tokenizer, method):
    encoder = _encoder(tokenizer)
    vectors = _doc_vectors(encoder)
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    result = run_retriever_stream(_config(method=method), encoder, vectors, CORPUS, _tasks(),
                                  temperature=0.1)
    assert result.method == method and result.test_items == [8, 8, 8]
    assert len(result.matrix) == 3 and all(len(row) == 3 for row in result.matrix)
    # Every task is learnt when it is trained: above what the random encoder found.
    for i in range(3):
        assert result.matrix[i][i] >= result.baseline[i] + 0.25, (i, result.matrix)
    assert result.metrics == cl.transfer_metrics(result.matrix, result.baseline)
    # The encoder was trained in place; the document vectors were not touched.
    changed = any(not torch.equal(before[k], v) for k, v in encoder.model.state_dict().items())
    assert changed and np.array_equal(vectors, _doc_vectors(_encoder(tokenizer)))
    replayed = {h["replayed"] for h in result.history if h["task"] > 0}
    assert replayed == ({4} if method == "replay" else {0})
    penalties = [h["penalty"] for h in result.history if h["task"] > 0]
    assert (max(penalties) > 0) == (method in ("ewc", "l2"))


def test_replay_forgets_less_than_naive_on_a_conflicting_stream(tokenizer):
    results = {}
    for method in ("naive", "replay"):
        encoder = _encoder(tokenizer)
        results[method] = run_retriever_stream(
            _config(method=method, epochs=10), encoder, _doc_vectors(encoder), CORPUS,
            _tasks(), temperature=0.1)
    naive, replay = results["naive"].metrics, results["replay"].metrics
    assert replay.bwt > naive.bwt
    assert replay.acc > naive.acc


def test_the_stream_refuses_what_it_cannot_run(tokenizer):
    encoder = _encoder(tokenizer)
    vectors = _doc_vectors(encoder)
    with pytest.raises(ValueError, match="at least two tasks, but got 1"):
        run_retriever_stream(_config(), encoder, vectors, CORPUS, _tasks()[:1])
    with pytest.raises(ValueError, match="`baseline` has 2 accuracies for 3 tasks"):
        run_retriever_stream(_config(), encoder, vectors, CORPUS, _tasks(), baseline=[0, 0])
    with pytest.raises(ValueError, match="`doc_vectors` has 23 rows for 24 documents"):
        run_retriever_stream(_config(), encoder, vectors[:-1], CORPUS, _tasks())
