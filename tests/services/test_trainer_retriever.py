"""Retriever training: losses on hand-made vectors, hard-negative mining, the config's checks,
and the loop (learning, query mode, resume, refusals) on a tiny random BERT over 30 synthetic
documents. No downloaded weights."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import BertModel

from services.trainer import loop
from services.trainer.mining import mine_hard_negatives
from services.trainer.retriever import (
    Example,
    RetrieverTrainConfig,
    anchor_penalty,
    crop_batch,
    info_nce,
    pretrain_retriever,
    question_batch,
    random_crop,
    symmetric_info_nce,
    train_retriever,
)
from shared.datasets import QAItem
from shared.models.encoder import Encoder
from shared.schemas import Document
from tests.tiny import tiny_bert, word_tokenizer

N_DOCS = 30


# --- losses on hand-made vectors ------------------------------------------------------------
def _unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


Q = _unit([[1, 0, 0], [0, 1, 0]])
ALIGNED = _unit([[1, 0, 0], [0, 1, 0]])
SWAPPED = _unit([[0, 1, 0], [1, 0, 0]])
TARGETS = torch.tensor([0, 1])


def test_info_nce_is_lower_when_positives_align():
    aligned = info_nce(Q, ALIGNED, TARGETS, 0.05)
    swapped = info_nce(Q, SWAPPED, TARGETS, 0.05)
    # Two orthogonal passages: -log(e^(1/T) / (e^(1/T) + 1)) = log(1 + e^(-1/T)).
    assert aligned.item() == pytest.approx(math.log1p(math.exp(-20)), abs=1e-6)
    assert swapped.item() == pytest.approx(20 + math.log1p(math.exp(-20)), rel=1e-5)


def test_lower_temperature_sharpens_both_ways():
    assert info_nce(Q, ALIGNED, TARGETS, 0.05) < info_nce(Q, ALIGNED, TARGETS, 1.0)
    assert info_nce(Q, SWAPPED, TARGETS, 0.05) > info_nce(Q, SWAPPED, TARGETS, 1.0)
    assert info_nce(Q, ALIGNED, TARGETS, 1.0).item() == pytest.approx(math.log1p(math.exp(-1)))


def test_hard_negative_columns_raise_the_loss_and_excluded_columns_do_not_count():
    near = _unit([[0.9, 0.1, 0], [0.1, 0.9, 0]])  # close to both queries
    with_hard = info_nce(Q, torch.cat([ALIGNED, near]), TARGETS, 0.1)
    assert with_hard > info_nce(Q, ALIGNED, TARGETS, 0.1)
    exclude = torch.tensor([[False, False, True, True], [False, False, True, True]])
    masked = info_nce(Q, torch.cat([ALIGNED, near]), TARGETS, 0.1, exclude)
    assert masked.item() == pytest.approx(info_nce(Q, ALIGNED, TARGETS, 0.1).item())


def test_loss_leaves_its_inputs_alone_and_symmetric_needs_diagonal_targets():
    before = ALIGNED.clone()
    symmetric_info_nce(Q, ALIGNED, TARGETS, 0.05)
    assert torch.equal(ALIGNED, before)
    assert symmetric_info_nce(Q, ALIGNED, TARGETS, 0.05) < symmetric_info_nce(
        Q, SWAPPED, TARGETS, 0.05)
    with pytest.raises(ValueError, match="arange"):
        symmetric_info_nce(Q, ALIGNED, torch.tensor([1, 0]), 0.05)


def test_batch_shares_negatives_once_and_excludes_a_repeated_positive():
    texts = [f"doc {i}" for i in range(6)]
    # "a" and "b" share document 0 as their only positive; "b" also has 1 as a negative of
    # "a"'s, and 3 is a negative of both.
    examples = [Example("a", "qa", (0,), (1, 3)), Example("b", "qb", (0,), (3, 4)),
                Example("c", "qc", (5,), ())]
    batch = question_batch(examples, texts, 2, np.random.default_rng(0))
    assert batch.queries == ["qa", "qb", "qc"] and batch.targets == [0, 1, 2]
    assert batch.rows[:3] == [0, 0, 5]
    assert sorted(batch.rows[3:]) == [1, 3, 4]  # every negative once, shared by all
    assert batch.passages == [texts[r] for r in batch.rows]
    # Column 1 holds a's positive again (as b's target): left out of a's softmax, and
    # column 0 out of b's; nothing else is excluded.
    expected = [[False, True, False] + [False] * 3, [True, False, False] + [False] * 3,
                [False] * 6]
    assert batch.exclude == expected
    assert question_batch(examples[2:], texts, 2, np.random.default_rng(0)).exclude is None


def test_random_crop_keeps_the_share_and_stays_contiguous():
    words = [f"w{i}" for i in range(100)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        crop = random_crop(words, rng, 0.1, 0.5).split()
        assert 10 <= len(crop) <= 50
        first = int(crop[0][1:])
        assert crop == words[first:first + len(crop)]


# --- mining ---------------------------------------------------------------------------------
def _doc(doc_id: str, text: str) -> Document:
    return Document(doc_id=doc_id, title=doc_id, text=text)


def test_mining_drops_positives_and_answer_bearing_documents_and_interleaves():
    corpus = {d.doc_id: d for d in [
        _doc("China", "China is a country in East Asia."),
        _doc("Beijing", "Beijing is the capital of China."),  # holds the answer: not negative
        _doc("Shanghai", "Shanghai is the largest city of China."),
        _doc("Tokyo", "Tokyo is the capital of Japan."),
        _doc("Beijingers", "Beijingers live in a city."),  # "Beijing" not as a whole word
        _doc("Osaka", "Osaka is a city in Japan."),
    ]}
    item = QAItem(id="q1", question="What is the capital of China?", answers=["Beijing"],
                  doc_ids=["China"], answerable=True)
    rankings = {"bm25": {"q1": ["China", "Beijing", "Shanghai", "Osaka"]},
                "dense": {"q1": ["Beijing", "Tokyo", "Beijingers", "not-in-corpus"]}}
    mined = mine_hard_negatives([item], rankings, corpus, depth=10)
    assert mined == {"q1": ["Tokyo", "Shanghai", "Beijingers", "Osaka"]}
    assert mine_hard_negatives([item], rankings, corpus, depth=2) == {"q1": ["Tokyo", "Shanghai"]}
    assert mine_hard_negatives([item], {"bm25": {}}, corpus, depth=3) == {"q1": []}
    with pytest.raises(ValueError, match="-1"):
        mine_hard_negatives([item], rankings, corpus, depth=-1)


def test_mining_drops_documents_whose_title_names_the_answer():
    # The retriever embeds title and text together: a title naming the answer is a positive.
    corpus = {d.doc_id: d for d in [
        Document(doc_id="jade", title="Jade City", text="A 2017 fantasy novel by Fonda Lee."),
        Document(doc_id="jades", title="Jade Cityscapes", text="Paintings of green towers."),
        Document(doc_id="war", title="Jade War", text="The sequel, published in 2019."),
        Document(doc_id="yes", title="Yes", text="An English rock band."),
    ]}
    item = QAItem(id="q1", question="Which novel opens the Green Bone Saga?",
                  answers=["jade city"], doc_ids=["lee"], answerable=True)
    rankings = {"dense": {"q1": ["jade", "jades", "war", "yes"]}}
    assert mine_hard_negatives([item], rankings, corpus, depth=10) == {
        "q1": ["jades", "war", "yes"]}
    # a yes/no answer never counts, in the title either
    polar = QAItem(id="q1", question="Is Jade City a novel?", answers=["Yes"], doc_ids=["lee"],
                   answerable=True)
    assert mine_hard_negatives([polar], rankings, corpus, depth=10) == {
        "q1": ["jade", "jades", "war", "yes"]}


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "passage"}, "unknown mode 'passage'; known: query, both"),
    ({"negatives": "random"}, "unknown negatives 'random'; known: bm25, dense, both"),
    ({"loss": "triplet"}, "unknown loss 'triplet'; known: infonce, symmetric_infonce"),
    ({"temperature": 0.0}, "`temperature` has to be a positive number, but is 0.0"),
    ({"lr": -1e-5}, "`lr` has to be a positive number, but is -1e-05"),
    ({"batch_size": 0}, "`batch_size` has to be a strictly positive integer, but is 0"),
    ({"max_steps": 0}, "`max_steps` has to be None or a strictly positive integer, but is 0"),
    ({"hard_negatives": -1}, "`hard_negatives` has to be an integer >= 0, but is -1"),
    ({"hard_negatives": 5, "negative_depth": 3}, "`hard_negatives` \\(5\\) has to be at most"),
    ({"max_length": 4}, "`max_length` has to be at least 8 tokens, but is 4"),
    ({"crop_min": 0.6, "crop_max": 0.5}, "`crop_min` \\(0.6\\) has to be at most"),
    ({"anchor": -0.5}, "`anchor` has to be a number >= 0, but is -0.5"),
    ({"learning_rate": 1e-4}, "learning_rate"),
])
def test_bad_config_values_are_refused_by_name(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        RetrieverTrainConfig(**kwargs)


def test_the_anchor_defaults_by_mode_and_a_given_one_stays():
    assert RetrieverTrainConfig().anchor == 1.0
    assert RetrieverTrainConfig(mode="both").anchor == 0.0
    assert RetrieverTrainConfig.model_validate({"mode": "both", "anchor": None}).anchor == 0.0
    assert RetrieverTrainConfig(mode="both", anchor=2.0).anchor == 2.0
    assert RetrieverTrainConfig(mode="query", anchor=0.0).anchor == 0.0
    # The resolved weight is what a run records, so a resume compares like with like.
    assert RetrieverTrainConfig(mode="both").model_dump()["anchor"] == 0.0


def test_anchor_penalty_is_the_mean_cosine_distance_from_the_start():
    assert anchor_penalty(ALIGNED, ALIGNED).item() == pytest.approx(0.0, abs=1e-7)
    assert anchor_penalty(Q, -Q).item() == pytest.approx(2.0)
    # One row unmoved, one turned by 90 degrees: (0 + 1) / 2.
    assert anchor_penalty(Q, _unit([[1, 0, 0], [0, 0, 1]])).item() == pytest.approx(0.5)


# --- the loop on a tiny random BERT ---------------------------------------------------------
def _text(i: int) -> str:
    return f"k{i} is found near m{i * 7 % N_DOCS} and n{i % 5}"


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level tokenizer over the synthetic vocabulary, built in-process."""
    return word_tokenizer(w for i in range(N_DOCS) for w in f"d{i} {_text(i)} what is".split())


def _encoder(tokenizer) -> Encoder:
    model = tiny_bert(tokenizer, layers=2, max_positions=64, pooler=False)
    model.eval()
    return Encoder(tokenizer, model, batch_size=16, max_length=32)


@pytest.fixture
def encoder(tokenizer) -> Encoder:
    return _encoder(tokenizer)


CORPUS = [_doc(f"d{i}", _text(i)) for i in range(N_DOCS)]
# "what is k3" → d3: learnable from the one word the question shares with its document.
ITEMS = [QAItem(id=f"q{i}", question=f"what is k{i}", answers=[f"m{i * 7 % N_DOCS}"],
                doc_ids=[f"d{i}"], answerable=True) for i in range(N_DOCS)]
UNANSWERABLE = QAItem(id="none", question="what is k99", answers=["x"], doc_ids=[],
                      answerable=False)

FAST = {"lr": 3e-3, "batch_size": 8, "temperature": 0.1, "hard_negatives": 1,
        "negative_depth": 3, "max_length": 32, "seed": 1}


def _load(model_dir) -> BertModel:
    # The tiny model has no pooler; loading one would add random weights.
    return BertModel.from_pretrained(model_dir, add_pooling_layer=False)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_both_mode_learns_the_toy_task_and_saves_a_reindex_model(encoder, tmp_path):
    reports: list[loop.Progress] = []
    config = RetrieverTrainConfig(mode="both", epochs=8, eval_steps=16, save_steps=16, **FAST)
    result = train_retriever(config, encoder, ITEMS + [UNANSWERABLE], ITEMS, CORPUS,
                             tmp_path / "run", progress=reports.append)
    assert [r.phase for r in reports if r.phase] == ["encoding the corpus",
                                                     "mining hard negatives"]
    steps = [r for r in reports if not r.phase]
    assert result.steps == 8 * math.ceil(N_DOCS / 8) == len(steps)
    assert result.skipped == 1 and result.examples == N_DOCS
    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.5 * first
    start = result.history[0]
    assert start["step"] == 0 and result.metrics["mrr@10"] > start["mrr@10"] + 0.2
    meta = loop.read_meta(result.model_dir)
    assert meta["kind"] == "retriever" and meta["objective"] == "questions"
    assert meta["mode"] == "both" and meta["reindex"] is True
    assert meta["step"] == result.best_step and meta["metrics"]["best"] == result.metrics
    assert meta["config"] == config.model_dump() and meta["data"] == result.data_fingerprint
    assert [r.step for r in reports if r.metrics] == [16, 32]
    trained = _load(result.model_dir).state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in encoder.model.state_dict().items())


def test_query_mode_trains_a_copy_and_leaves_the_passage_encoder_unchanged(encoder, tmp_path):
    before = _weights(encoder.model)
    doc_vectors = encoder.encode([f"{d.title}\n{d.text}" for d in CORPUS])
    config = RetrieverTrainConfig(mode="query", epochs=6, eval_steps=100, **FAST)
    result = train_retriever(config, encoder, ITEMS, ITEMS, CORPUS, tmp_path / "run",
                             doc_vectors=doc_vectors)
    after = _weights(encoder.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(
        encoder.encode([f"{d.title}\n{d.text}" for d in CORPUS]), doc_vectors)
    meta = loop.read_meta(result.model_dir)
    assert meta["reindex"] is False and meta["mode"] == "query" and not result.reindex
    query_model = _load(result.model_dir)
    assert any(not torch.equal(v, before[k]) for k, v in query_model.state_dict().items())
    assert result.metrics["mrr@10"] > result.history[0]["mrr@10"]


@pytest.mark.parametrize("mode", ["query", "both"])
def test_the_anchor_keeps_the_embeddings_nearer_where_they_started(tokenizer, tmp_path, mode):
    start = _encoder(tokenizer)
    questions = [item.question for item in ITEMS]
    before = start.encode(questions)

    def moved(anchor: float) -> float:
        config = RetrieverTrainConfig(mode=mode, epochs=4, eval_steps=100, anchor=anchor,
                                      **FAST)
        result = train_retriever(config, start, ITEMS, [], CORPUS, tmp_path / f"{anchor}")
        assert result.losses[-1] < result.losses[0]  # the anchor does not stop learning
        trained = Encoder(tokenizer, _load(result.model_dir).eval(), 16, 32)
        return float(np.mean(1 - np.sum(trained.encode(questions) * before, axis=1)))

    assert moved(10.0) < 0.5 * moved(0.0)


def test_resume_after_a_cancel_continues_from_the_saved_step(tokenizer, tmp_path):
    config = RetrieverTrainConfig(mode="both", epochs=2, eval_steps=3, save_steps=4, **FAST)
    whole = train_retriever(config, _encoder(tokenizer), ITEMS, ITEMS, CORPUS, tmp_path / "a")
    calls = 0

    def stop_after_six() -> bool:
        nonlocal calls
        calls += 1
        return calls > 6

    with pytest.raises(loop.Cancelled):
        train_retriever(config, _encoder(tokenizer), ITEMS, ITEMS, CORPUS, tmp_path / "b",
                        should_stop=stop_after_six)
    assert loop.load_state(tmp_path / "b")["step"] == 4
    seen: list[int] = []
    resumed = train_retriever(config, _encoder(tokenizer), ITEMS, ITEMS, CORPUS, tmp_path / "b",
                              progress=lambda p: p.phase or seen.append(p.step))
    assert seen[0] == 5 and resumed.steps == whole.steps == 8
    assert len(resumed.losses) == 8
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-4)
    a = _load(whole.model_dir).state_dict()
    b = _load(resumed.model_dir).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert resumed.best_step == whole.best_step


def test_a_run_whose_loss_is_not_finite_stops_and_keeps_the_starting_weights(encoder,
                                                                             tmp_path):
    # A temperature this small makes every score infinite, so the loss is NaN at every step.
    config = RetrieverTrainConfig(mode="both", epochs=2, eval_steps=100,
                                  **{**FAST, "temperature": 1e-45})
    with pytest.raises(FloatingPointError, match="not finite in 3 steps in a row .up to step 3"):
        train_retriever(config, encoder, ITEMS, ITEMS, CORPUS, tmp_path / "run")
    # The step-0 model (the start, judged on dev) is the one saved: no NaN reached it.
    saved = _load(tmp_path / "run" / loop.MODEL_DIR).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in encoder.model.state_dict().items())


def test_a_run_folder_refuses_another_config_or_other_data(encoder, tmp_path):
    config = RetrieverTrainConfig(mode="query", max_steps=2, eval_steps=1, save_steps=1, **FAST)
    train_retriever(config, encoder, ITEMS, ITEMS, CORPUS, tmp_path)
    other = RetrieverTrainConfig(mode="query", max_steps=3, eval_steps=1, save_steps=1, **FAST)
    with pytest.raises(ValueError, match="another config \\(differs in max_steps\\)"):
        train_retriever(other, encoder, ITEMS, ITEMS, CORPUS, tmp_path)
    with pytest.raises(ValueError, match="other data"):
        train_retriever(config, encoder, ITEMS[:-1], ITEMS, CORPUS, tmp_path)
    with pytest.raises(ValueError, match="'retriever' run"):
        pretrain_retriever(config, encoder, CORPUS, tmp_path)


def test_no_usable_training_question_fails_before_training(encoder, tmp_path, caplog):
    with pytest.raises(ValueError, match="no training question"):
        train_retriever(RetrieverTrainConfig(), encoder, [UNANSWERABLE], ITEMS, CORPUS, tmp_path)
    with pytest.raises(ValueError, match="no training question"):
        train_retriever(RetrieverTrainConfig(), encoder, [], ITEMS, CORPUS, tmp_path)
    assert not any(tmp_path.iterdir())
    with caplog.at_level(logging.INFO, logger="services.trainer.retriever"):
        train_retriever(RetrieverTrainConfig(max_steps=1, **FAST), encoder,
                        ITEMS[:8] + [UNANSWERABLE], [], CORPUS, tmp_path)
    assert "1 of 9 questions skipped" in caplog.text


def test_pretraining_on_crops_lowers_its_loss_and_saves_the_last_model(encoder, tmp_path):
    docs = [f"{d.title}\n{d.text}".split() for d in CORPUS]
    held_out = crop_batch(docs, np.random.default_rng(123), 0.1, 0.5)  # crops never trained on

    def crop_loss(enc: Encoder) -> float:
        return info_nce(torch.from_numpy(enc.encode(held_out.queries)),
                        torch.from_numpy(enc.encode(held_out.passages)),
                        torch.arange(len(docs)), 0.1).item()

    config = RetrieverTrainConfig(mode="both", epochs=6, save_steps=100, **FAST)
    result = pretrain_retriever(config, encoder, CORPUS, tmp_path)
    assert result.steps == 24 and result.best_step == 24 and result.metrics == {}
    trained = Encoder(encoder.tokenizer, _load(result.model_dir).eval(), 16, 32)
    assert crop_loss(trained) < crop_loss(encoder) - 0.1
    meta = loop.read_meta(result.model_dir)
    assert meta["kind"] == "retriever" and meta["objective"] == "crops"
    assert meta["reindex"] is True and result.run_kind == "retriever-pretrain"
