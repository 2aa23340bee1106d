"""Generator fine-tuning: targets and the loss (pure), the SFT loop on tiny random models (a
2-layer Llama with a byte-level BPE chat tokenizer, a 2-layer T5 without a chat template; see
tests/tiny.py), LoRA and full saves, early stopping, resume after cancel; domain pre-training
(lm.py).
"""

from __future__ import annotations

import json
import random

import pydantic
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, T5ForConditionalGeneration

from services.evaluation import qa
from services.trainer import generator as sft
from services.trainer import lm, loop
from shared.datasets import QAItem
from shared.prompt import NO_ANSWER
from shared.schemas import Hit
from tests.tiny import CITIES, bpe_tokenizer, tiny_llama, tiny_t5, toy_task


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def config(**overrides) -> sft.GeneratorTrainConfig:
    base = {"lr": 3e-3, "warmup_steps": 2, "batch_size": 4, "epochs": 4, "eval_steps": 6,
            "eval_questions": 4, "eval_max_new_tokens": 6, "patience": None, "device": "cpu",
            "max_seq_len": 768, "abstain_fraction": 0.25, "extra_passages": 1}
    return sft.GeneratorTrainConfig(**{**base, **overrides})


# --- targets (pure) ---------------------------------------------------------------------------
PARIS = Hit(doc_id="fr", title="France", text="Its capital is Paris.", score=1.0)
LYON = Hit(doc_id="lyon", title="Lyon", text="Lyon is not Paris, the capital.", score=0.9)
BERLIN = Hit(doc_id="de", title="Germany", text="Its capital is Berlin.", score=0.8)
FRANCE_Q = QAItem(id="q", question="What is the capital of France?", answers=["Paris"],
                  doc_ids=["fr"], answerable=True)


def test_answer_target_cites_the_passage_holding_the_answer_gold_first():
    assert sft.answer_target(FRANCE_Q, [BERLIN, PARIS]) == "Paris [2]"
    # Lyon's passage names Paris too; the gold document wins although it ranks lower.
    assert sft.answer_target(FRANCE_Q, [LYON, BERLIN, PARIS]) == "Paris [3]"
    assert sft.answer_target(FRANCE_Q, [LYON, BERLIN]) == "Paris [1]"
    assert sft.answer_target(FRANCE_Q, [BERLIN]) == NO_ANSWER
    unknown = QAItem(id="u", question="?", answers=["Paris"], doc_ids=[], answerable=False)
    assert sft.answer_target(unknown, [PARIS]) == NO_ANSWER


def test_moved_puts_the_answers_passage_elsewhere_and_keeps_the_others_order():
    seen = set()
    for seed in range(20):
        order = sft.moved(FRANCE_Q, [PARIS, LYON, BERLIN], random.Random(seed), max_chars=50)
        assert sorted(h.doc_id for h in order) == ["de", "fr", "lyon"]
        assert order[0] is not PARIS and [h for h in order if h is not PARIS] == [LYON, BERLIN]
        seen.add(sft.answer_target(FRANCE_Q, order))
    assert seen == {"Paris [2]", "Paris [3]"}
    # the gold document is the source, though Lyon's passage (first) names Paris too
    assert sft.moved(FRANCE_Q, [LYON, PARIS], random.Random(0), max_chars=50) == [PARIS, LYON]
    assert sft.moved(FRANCE_Q, [PARIS], random.Random(0), max_chars=50) is None
    assert sft.moved(FRANCE_Q, [BERLIN, BERLIN], random.Random(0), max_chars=50) is None
    # the source is chosen among the passages as the prompt shows them: Paris past the cut of
    # the gold passage does not count, so Lyon's (which names it early) is the one moved
    late = PARIS.model_copy(update={"text": "France is a country in Western Europe. " * 2
                                            + "Its capital is Paris."})
    assert sft.moved(FRANCE_Q, [LYON, late], random.Random(0), max_chars=50) == [late, LYON]
    assert sft.moved(FRANCE_Q, [late, BERLIN], random.Random(0), max_chars=50) is None


def test_yes_no_answers_are_held_only_by_gold_documents():
    item = QAItem(id="y", question="Is Paris big?", answers=["yes"], doc_ids=["fr"],
                  answerable=True)
    yes = Hit(doc_id="x", title="Yes", text="yes yes", score=1.0)
    assert sft.answer_target(item, [yes]) == NO_ANSWER
    assert sft.answer_target(item, [yes, PARIS]) == "yes [2]"


def test_without_answer_drops_gold_documents_and_passages_naming_the_answer():
    assert sft.without_answer(FRANCE_Q, [LYON, PARIS, BERLIN]) == [BERLIN]


def test_answer_cut_keeps_the_passages_but_not_the_sentences_stating_the_answer():
    france = Hit(doc_id="fr", title="France", score=1.0,
                 text="France is in Europe. Its capital is Paris. It has 68 million people.")
    cut = sft.answer_cut(FRANCE_Q, [france, LYON, BERLIN])
    # Lyon's only sentence names Paris: the passage goes; the others lose that sentence only
    assert [h.doc_id for h in cut] == ["fr", "de"]
    assert cut[0].text == "France is in Europe. It has 68 million people."
    assert all(sft.held_answer(FRANCE_Q, h) is None for h in cut)
    # a title naming the answer drops the passage; nothing left, or a yes/no answer: None
    titled = Hit(doc_id="p", title="Paris", text="A city on the Seine.", score=1.0)
    assert sft.answer_cut(FRANCE_Q, [titled, BERLIN]) == [BERLIN]
    assert sft.answer_cut(FRANCE_Q, [titled, LYON]) is None
    polar = QAItem(id="y", question="Is Paris in France?", answers=["yes"], doc_ids=["fr"],
                   answerable=True)
    assert sft.answer_cut(polar, [france]) is None


def test_a_restatement_is_the_base_answer_that_states_the_answer_else_the_passage_sentence():
    france = Hit(doc_id="fr", title="France", score=1.0,
                 text="France is in Europe. Its capital is Paris. It has 68 million people.")
    said = "The capital of France is Paris [2]."
    assert sft.restatement(FRANCE_Q, said, france) == "The capital of France is Paris."
    # a wrong, refusing, multi-line or already restated answer: the passage's sentence
    for said in ("The capital of France is Lyon [1].", NO_ANSWER, None, "",
                 "France.\nParis is its capital.", "Paris is it.\nAnswer: Paris [1]"):
        assert sft.restatement(FRANCE_Q, said, france) == "Its capital is Paris."
    assert sft.restatement(FRANCE_Q, None, BERLIN) is None
    assert sft.restated_target("Its capital is Paris.", "Paris [1]") == (
        "Its capital is Paris.\nAnswer: Paris [1]")


def test_answer_nll_is_the_mean_over_answer_tokens_only():
    logprobs = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft.answer_nll(logprobs, mask).item() == pytest.approx(2.0)
    # what the mask hides never counts
    assert sft.answer_nll(logprobs + (1 - mask) * -50.0, mask).item() == pytest.approx(2.0)


# --- examples and the masked loss -------------------------------------------------------------
def test_prompt_tokens_carry_no_loss_and_the_loss_is_cross_entropy_on_the_answer(tokenizer):
    model = tiny_llama(tokenizer)
    items, passages, unknown = toy_task(3)
    enc = sft.Encoding(tokenizer=tokenizer, seq2seq=False, end=tokenizer.eos_token_id,
                       context=2048)
    examples = sft.build_examples(items + unknown, passages, enc, config(), abstain_fraction=0)
    for example, item in zip(examples, items + unknown, strict=True):
        prompt = qa.prompt_ids(tokenizer, item.question, passages[item.question][:3], 1200)
        # the prompt is exactly serving's, and all of it is masked
        assert list(example.input_ids[:len(prompt)]) == prompt
        assert set(example.labels[:len(prompt)]) == {sft.IGNORE}
        target = tokenizer.decode(example.labels[len(prompt):], skip_special_tokens=False)
        assert target == example.target + tokenizer.eos_token
    assert [e.target for e in examples] == ["Amber [1]", "Bolt [2]", "Cove [3]", NO_ANSWER,
                                            NO_ANSWER]
    batch = sft.collate(examples, tokenizer.pad_token_id, seq2seq=False)
    lp, mask = sft.target_logprobs(model, batch, seq2seq=False)
    ours = sft.answer_nll(lp, mask)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                ignore_index=sft.IGNORE)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    # Padding changes nothing: each row scores the same alone, its target from column 0.
    assert len({len(e.input_ids) for e in examples}) > 1
    for r, example in enumerate(examples):
        alone = sft.collate([example], tokenizer.pad_token_id, seq2seq=False)
        lp_alone, mask_alone = sft.target_logprobs(model, alone, seq2seq=False)
        n = len(example.labels) - example.labels.count(sft.IGNORE)
        assert mask_alone[0].tolist() == [True] * n and mask[r, :n].all() and not mask[r, n:].any()
        assert torch.allclose(lp_alone[0], lp[r, :n], atol=1e-4)


def test_a_target_cites_only_what_the_prompt_shows_of_a_passage(tokenizer):
    # The prompt cuts each passage to max_passage_chars: an answer past the cut is not shown.
    filler = "Land is a country with many hills and rivers. "  # 47 characters
    shown = Hit(doc_id="c0", title="Land0", text=f"Its capital is Amber. {filler}", score=1.0)
    hidden = Hit(doc_id="c1", title="Land1", text=f"{filler}Its capital is Bolt.", score=1.0)
    items = [QAItem(id=f"cut:{n}", question=f"What is the capital of Land{n}?",
                    answers=[answer], doc_ids=[f"c{n}"], answerable=True)
             for n, answer in enumerate(["Amber", "Bolt"])]
    passages = {items[0].question: [shown], items[1].question: [hidden]}
    enc = sft.Encoding(tokenizer=tokenizer, seq2seq=False, end=tokenizer.eos_token_id,
                       context=2048)
    said = {i.id: f"The capital is {i.answers[0]} [1]." for i in items}
    examples = sft.build_examples(items, passages, enc, config(max_passage_chars=50),
                                  abstain_fraction=0, moved_fraction=1.0, said=said)
    assert [(e.id, e.kind, e.target) for e in examples] == [
        ("cut:0", sft.ANSWER, "The capital is Amber.\nAnswer: Amber [1]"),
        ("cut:1", sft.NOT_FOUND, NO_ANSWER)]
    assert "Bolt" not in tokenizer.decode(examples[1].input_ids)
    # shown whole, the same passage answers
    whole = sft.build_examples(items, passages, enc, config(max_passage_chars=100),
                               abstain_fraction=0)
    assert [(e.kind, e.target) for e in whole] == [(sft.ANSWER, "Amber [1]"),
                                                   (sft.ANSWER, "Bolt [1]")]


def test_gold_removed_examples_keep_only_passages_without_the_answer(tokenizer):
    items, passages, _ = toy_task(8)
    enc = sft.Encoding(tokenizer=tokenizer, seq2seq=False, end=tokenizer.eos_token_id,
                       context=2048)
    examples = sft.build_examples(items, passages, enc, config(), abstain_fraction=1.0)
    removed = [e for e in examples if e.kind == sft.GOLD_REMOVED]
    assert len(removed) == len(items)
    for e in removed:
        item = next(i for i in items if e.id == i.id + "#gold_removed")
        assert e.target == NO_ANSWER and item.doc_ids[0] not in e.passages and e.passages
    # answerable, but no passage holds the answer: NO_ANSWER, kept for the share asked for
    lost = [QAItem(id=f"lost:{n}", question=f"Where is Land{n} lost?", answers=["Atlantis"],
                   doc_ids=[f"c{n}"], answerable=True) for n in range(20)]
    hidden = {i.question: passages[items[0].question] for i in lost}
    kept = sft.build_examples(lost, hidden, enc, config(), abstain_fraction=1.0,
                              not_found_fraction=0.5)
    assert {e.kind for e in kept} == {sft.NOT_FOUND} and 3 <= len(kept) <= 17
    assert sft.build_examples(lost, hidden, enc, config(), abstain_fraction=1.0,
                              not_found_fraction=0.0) == []


def test_answer_cut_copies_ask_for_no_answer_and_leave_the_other_picks_alone(tokenizer):
    items, passages, _ = toy_task(8)
    enc = sft.Encoding(tokenizer=tokenizer, seq2seq=False, end=tokenizer.eos_token_id,
                       context=2048)
    plain = sft.build_examples(items, passages, enc, config(), abstain_fraction=0.5)
    examples = sft.build_examples(items, passages, enc, config(), abstain_fraction=0.5,
                                  answer_cut_fraction=1.0)
    assert [e for e in examples if e.kind != sft.ANSWER_CUT] == plain
    cut = [e for e in examples if e.kind == sft.ANSWER_CUT]
    assert len(cut) == len(items)
    for e in cut:
        item = next(i for i in items if e.id == i.id + "#answer_cut")
        assert e.target == NO_ANSWER and item.answers[0] not in tokenizer.decode(e.input_ids)


def test_moved_copies_cite_the_new_place_and_leave_the_other_picks_alone(tokenizer):
    items, passages, _ = toy_task(8)
    enc = sft.Encoding(tokenizer=tokenizer, seq2seq=False, end=tokenizer.eos_token_id,
                       context=2048)
    plain = sft.build_examples(items, passages, enc, config(), abstain_fraction=0.5,
                               answer_cut_fraction=0.5)
    examples = sft.build_examples(items, passages, enc, config(), abstain_fraction=0.5,
                                  answer_cut_fraction=0.5, moved_fraction=1.0)
    assert [e for e in examples if e.kind != sft.MOVED] == plain
    answered = {e.id: e for e in plain if e.kind == sft.ANSWER}
    copies = [e for e in examples if e.kind == sft.MOVED]
    assert len(copies) == len(answered) == len(items)
    for e in copies:
        first = answered[e.id.removesuffix("#moved")]
        answer, number = e.target.rsplit(" ", 1)
        assert answer == first.target.rsplit(" ", 1)[0] and number != first.target.split()[-1]
        assert sorted(e.passages) == sorted(first.passages) and e.passages != first.passages
        assert e.passages[int(number.strip("[]")) - 1] == first.passages[
            int(first.target.split()[-1].strip("[]")) - 1]


def test_restated_targets_end_with_the_short_answer_on_its_own_line(tokenizer):
    items, passages, unknown = toy_task(6)
    enc = sft.Encoding(tokenizer=tokenizer, seq2seq=False, end=tokenizer.eos_token_id,
                       context=2048)
    plain = sft.build_examples(items + unknown, passages, enc, config(), abstain_fraction=0.5,
                               moved_fraction=1.0)
    said = {i.id: f"The capital of Land{n} is {CITIES[n]} [1]." for n, i in enumerate(items)}
    said[items[1].id] = "I don't know."  # the base missed it: the passage's sentence instead
    examples = sft.build_examples(items + unknown, passages, enc, config(), abstain_fraction=0.5,
                                  moved_fraction=1.0, said=said)
    assert [(e.id, e.kind, e.passages) for e in examples] == [
        (e.id, e.kind, e.passages) for e in plain]
    for e, before in zip(examples, plain, strict=True):
        if e.kind not in (sft.ANSWER, sft.MOVED):
            assert e.target == before.target  # "I don't know." stays as it is
            continue
        n = int(e.id.split(":")[1].split("#")[0])
        sentence = (f"Its capital is {CITIES[n]}." if n == 1
                    else f"The capital of Land{n} is {CITIES[n]}.")
        assert e.target == f"{sentence}\nAnswer: {before.target}"
        assert tokenizer.decode(e.labels[e.labels.count(sft.IGNORE):],
                                skip_special_tokens=True) == e.target
    # a restated target over the answer limit falls back to the short one
    short = sft.build_examples(items, passages, enc, config(max_answer_tokens=8),
                               abstain_fraction=0, said=said)
    assert [e.target for e in short] == [e.target for e in plain if e.kind == sft.ANSWER]


def test_config_names_the_bad_value_and_refuses_unknown_fields():
    with pytest.raises(pydantic.ValidationError, match="lr") as err:
        sft.GeneratorTrainConfig(lr=0)
    assert "input_value=0" in str(err.value)
    with pytest.raises(pydantic.ValidationError, match="'full' or 'lora'"):
        sft.GeneratorTrainConfig(method="qlora")
    with pytest.raises(pydantic.ValidationError, match="learning_rate"):
        sft.GeneratorTrainConfig(learning_rate=1e-4)
    with pytest.raises(pydantic.ValidationError, match="target_modules"):
        sft.GeneratorTrainConfig(lora={"target_modules": []})


def test_restating_makes_room_for_the_sentence_unless_told_otherwise():
    plain, restated = sft.GeneratorTrainConfig(), sft.GeneratorTrainConfig(restate=True)
    assert (plain.max_answer_tokens, plain.eval_max_new_tokens) == (32, 32)
    assert (restated.max_answer_tokens, restated.eval_max_new_tokens) == (64, 48)
    told = sft.GeneratorTrainConfig(restate=True, max_answer_tokens=40)
    assert (told.max_answer_tokens, told.eval_max_new_tokens) == (40, 48)
    assert sft.GeneratorTrainConfig(**told.model_dump()) == told  # a saved config reloads


def test_bad_data_is_refused_before_training(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    items, passages, _ = toy_task(2)
    with pytest.raises(ValueError, match="no training items"):
        sft.train_generator(config(), model, tokenizer, [], [], passages, tmp_path)
    with pytest.raises(ValueError, match="toy:0.*over max_answer_tokens=3"):
        sft.train_generator(config(max_answer_tokens=3), model, tokenizer, items, [], passages,
                            tmp_path)
    with pytest.raises(ValueError, match="toy:0.*cannot fit max_seq_len=64"):
        sft.train_generator(config(max_seq_len=64), model, tokenizer, items, [], passages,
                            tmp_path)
    with pytest.raises(ValueError, match="no passages for 2 question"):
        sft.train_generator(config(), model, tokenizer, items, [], {}, tmp_path)
    assert not (tmp_path / "model").exists()


# --- the loop ---------------------------------------------------------------------------------
def test_sft_lowers_the_answer_loss_and_saves_a_loadable_model(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    items, passages, unknown = toy_task(8)
    seen = []
    result = sft.train_generator(config(epochs=6, abstain_fraction=0.5), model, tokenizer,
                                 items + unknown,
                                 items[:2] + unknown[:1], passages, tmp_path,
                                 progress=seen.append)
    losses = [r["loss"] for r in result.history["train"]]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    dev_losses = [r["dev_loss"] for r in result.history["eval"]]
    assert dev_losses[-1] < dev_losses[0]
    removed = result.examples["gold_removed"]
    assert result.examples == {"answer": 8, "unanswerable": 2, "gold_removed": removed}
    assert 1 <= removed <= 7
    assert result.steps == result.total_steps == 6 * -(-(10 + removed) // 4)
    assert seen and seen[-1].step == result.steps and isinstance(seen[-1], loop.Progress)
    meta = loop.read_meta(result.model_dir)
    assert meta["kind"] == "generator" and meta["method"] == "full"
    assert meta["step"] == result.best_step and meta["config"]["lr"] == 3e-3
    report = json.loads(result.report_path.read_text())
    assert report["best_step"] == result.best_step
    assert result.plot_path.read_bytes()[:4] == b"\x89PNG"
    loaded = LlamaForCausalLM.from_pretrained(result.model_dir)
    probe = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(loaded(probe).logits, model(probe).logits, atol=1e-5)


def test_restated_training_starts_from_the_base_answers_and_says_so(tokenizer, tmp_path,
                                                                     monkeypatch):
    items, passages, unknown = toy_task(4)
    asked = []
    real = sft.base_answers

    def spy(model, tok, examples, cfg, *, seq2seq, cache):
        said = real(model, tok, examples, cfg, seq2seq=seq2seq, cache=cache)
        asked.append(said)
        return said

    monkeypatch.setattr(sft, "base_answers", spy)
    seen = []
    result = sft.train_generator(config(max_steps=2, restate=True, max_answer_tokens=40),
                                 tiny_llama(tokenizer), tokenizer, items + unknown, items[:1],
                                 passages, tmp_path, progress=seen.append)
    # the random base model answered each answered item once, before any step, and said so
    assert len(asked) == 1 and sorted(asked[0]) == sorted(i.id for i in items)
    assert seen[0].phase == "the base answers (restate)" and seen[0].step == 0
    assert result.steps == 2
    assert loop.read_meta(result.model_dir)["target_format"] == (
        "<sentence>\nAnswer: <answer> [<passage number>]")


def test_the_base_answers_are_kept_for_the_next_seed_and_a_resumed_run(tokenizer, tmp_path,
                                                                        monkeypatch):
    items, passages, unknown = toy_task(4)
    asked: list[int] = []
    real = sft.qa.generate_answers

    def spy(model, tok, prompts, **options):
        asked.append(len(prompts))
        return real(model, tok, prompts, **options)

    monkeypatch.setattr(sft.qa, "generate_answers", spy)
    kept = tmp_path / sft.BASE_ANSWERS_FILE

    def run(seed: int, **options):
        return sft.train_generator(
            config(max_steps=1, restate=True, max_answer_tokens=40, seed=seed),
            tiny_llama(tokenizer), tokenizer, items + unknown, [], passages,
            tmp_path / f"seed-{seed}", **options)

    run(0, base_answers_file=kept)
    assert asked == [4] and len(json.loads(kept.read_text())) == 4
    run(1, base_answers_file=kept)
    assert asked == [4]  # the second seed's prompts were all answered already
    run(2)  # a run on its own keeps them in its folder
    assert asked == [4, 4] and (tmp_path / "seed-2" / sft.BASE_ANSWERS_FILE).is_file()


def test_lora_trains_adapters_only_and_saves_a_plain_merged_model(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items, passages, unknown = toy_task(4)
    result = sft.train_generator(
        config(method="lora", epochs=2, lora={"r": 4, "alpha": 8, "dropout": 0.0}), model,
        tokenizer, items + unknown, items[:2], passages, tmp_path)
    assert loop.read_meta(result.model_dir)["method"] == "lora"
    after = model.state_dict()
    assert set(after) == set(before)  # the caller's object is plain again
    assert any(not torch.equal(before[k], after[k]) for k in before)
    loaded = LlamaForCausalLM.from_pretrained(result.model_dir)
    assert not any("lora" in k for k in loaded.state_dict())
    probe = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(loaded(probe).logits, model(probe).logits, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_activation_checkpointing_trains_the_same_weights_and_is_off_afterwards(
        method, tokenizer, tmp_path):
    items, passages, unknown = toy_task(4)
    models = {}
    for checkpointing in (False, True):
        model = tiny_llama(tokenizer)
        result = sft.train_generator(
            config(method=method, epochs=2, activation_checkpointing=checkpointing), model,
            tokenizer, items + unknown, [], passages, tmp_path / str(checkpointing))
        assert not model.is_activation_checkpointing
        assert loop.read_meta(result.model_dir)["config"]["activation_checkpointing"] \
            is checkpointing
        models[checkpointing] = model
    probe = torch.tensor([[5, 6, 7, 8]])
    before = tiny_llama(tokenizer)(probe).logits
    assert not torch.allclose(models[False](probe).logits, before, atol=1e-4)
    assert torch.allclose(models[True](probe).logits, models[False](probe).logits, atol=1e-5)


def test_encoder_decoder_generators_train_without_a_chat_template(tmp_path):
    tok = bpe_tokenizer(chat_template=None)
    model = tiny_t5(tok)
    items, passages, unknown = toy_task(4)
    result = sft.train_generator(config(epochs=3, abstain_fraction=0.0), model, tok,
                                 items + unknown, items[:2], passages, tmp_path)
    losses = [r["loss"] for r in result.history["train"]]
    assert losses[-1] < losses[0]
    assert loop.read_meta(result.model_dir)["seq2seq"] is True
    loaded = T5ForConditionalGeneration.from_pretrained(result.model_dir)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                          model(input_ids=ids, decoder_input_ids=ids).logits, atol=1e-5)


def test_early_stopping_keeps_the_best_checkpoint(tokenizer, tmp_path, monkeypatch):
    scores = iter([0.2, 0.6, 0.4, 0.3, 0.9])
    snapshots = {}

    def scripted(model, *args, **kwargs):
        step = len(snapshots) + 1
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"score": next(scores), "em": 0.0, "f1": 0.0, "dev_loss": 1.0}

    monkeypatch.setattr(sft, "_evaluate", scripted)
    model = tiny_llama(tokenizer)
    items, passages, _ = toy_task(4)
    result = sft.train_generator(config(eval_steps=1, patience=2, max_steps=10), model,
                                 tokenizer, items, items[:1], passages, tmp_path)
    assert result.stopped_early and result.steps == 4
    assert result.best_step == 2 and result.best_metrics["score"] == 0.6
    assert loop.read_meta(result.model_dir)["step"] == 2
    for name, tensor in model.state_dict().items():  # the caller gets step 2's weights back
        assert torch.equal(tensor, snapshots[2][name]), name


def test_a_step_with_a_non_finite_loss_is_skipped_and_repeated_ones_stop_the_run(
        tokenizer, tmp_path, monkeypatch):
    calls = iter(range(100))
    real = sft.answer_nll

    def broken_second_batch(lp, mask):
        loss = real(lp, mask)
        return loss * float("nan") if next(calls) == 1 else loss

    monkeypatch.setattr(sft, "answer_nll", broken_second_batch)
    model = tiny_llama(tokenizer)
    items, passages, _ = toy_task(4)
    result = sft.train_generator(config(max_steps=3, abstain_fraction=0.0), model, tokenizer,
                                 items, [], passages, tmp_path)
    assert [r.get("skipped", False) for r in result.history["train"]] == [False, True, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    monkeypatch.setattr(sft, "answer_nll", lambda lp, mask: real(lp, mask) * float("inf"))
    with pytest.raises(FloatingPointError, match="not finite in 3 steps in a row"):
        sft.train_generator(config(max_steps=5), tiny_llama(tokenizer), tokenizer, items, [],
                            passages, tmp_path / "diverged")


def test_resume_after_cancel_continues_from_the_saved_step(tokenizer, tmp_path):
    items, passages, unknown = toy_task(4)
    data = items + unknown
    straight = tiny_llama(tokenizer)
    cfg = config(max_steps=6, eval_steps=3)
    full_run = sft.train_generator(cfg, straight, tokenizer, data, items[:1], passages,
                                   tmp_path / "straight")

    calls = iter(range(100))
    model = tiny_llama(tokenizer)
    with pytest.raises(loop.Cancelled):
        sft.train_generator(cfg, model, tokenizer, data, items[:1], passages,
                            tmp_path / "run", should_stop=lambda: next(calls) == 4)
    assert loop.load_state(tmp_path / "run")["step"] == 4
    with pytest.raises(ValueError, match="another config.*lr: saved 0.003, now 0.001"):
        sft.train_generator(cfg.model_copy(update={"lr": 1e-3}), tiny_llama(tokenizer),
                            tokenizer, data, items[:1], passages, tmp_path / "run")
    with pytest.raises(ValueError, match="other data"):
        sft.train_generator(cfg, tiny_llama(tokenizer), tokenizer, items, items[:1], passages,
                            tmp_path / "run")
    resumed = tiny_llama(tokenizer, seed=1)  # the state, not the fresh weights, must count
    result = sft.train_generator(cfg, resumed, tokenizer, data, items[:1], passages,
                                 tmp_path / "run")
    assert result.resumed_from == 4 and result.steps == 6
    assert [r["step"] for r in result.history["train"]] == list(range(1, 7))
    assert [r["loss"] for r in result.history["train"]] == pytest.approx(
        [r["loss"] for r in full_run.history["train"]], abs=1e-4)
    for name, tensor in straight.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], tensor, atol=1e-5), name


# --- domain pre-training ----------------------------------------------------------------------
def test_pack_joins_documents_with_the_end_token_into_full_blocks():
    blocks = lm.pack([[1, 2, 3], [4, 5], [6]], block_size=3, end=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert lm.pack([[1]], block_size=4, end=0).shape == (0, 4)


def test_domain_pretraining_lowers_dev_loss_and_refuses_encoder_decoders(tokenizer, tmp_path):
    texts = [f"Land{i}\nLand{i} is a country. Its capital is {c}." for i, c in
             enumerate(CITIES)] * 6
    model = tiny_llama(tokenizer)
    cfg = lm.LMTrainConfig(block_size=64, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=20,
                           eval_steps=5, dev_fraction=0.2, device="cpu")
    result = lm.train_lm(cfg, model, tokenizer, texts, tmp_path)
    history = json.loads(result.report_path.read_text())["history"]["eval"]
    assert history[-1]["dev_loss"] < history[0]["dev_loss"]
    assert loop.read_meta(result.model_dir)["kind"] == "generator-lm"
    with pytest.raises(ValueError, match="decoder-only"):
        lm.train_lm(cfg, tiny_t5(tokenizer), tokenizer, texts, tmp_path / "t5")


def test_domain_pretraining_with_activation_checkpointing_trains_the_same_model(tokenizer,
                                                                                tmp_path):
    texts = [f"Land{i}\nLand{i} is a country. Its capital is {c}." for i, c in
             enumerate(CITIES)] * 3
    trained = {}
    for checkpointing in (False, True):
        model = tiny_llama(tokenizer)
        cfg = lm.LMTrainConfig(block_size=64, batch_size=4, lr=3e-3, warmup_steps=1,
                               max_steps=3, dev_fraction=0.0, device="cpu",
                               activation_checkpointing=checkpointing)
        lm.train_lm(cfg, model, tokenizer, texts, tmp_path / str(checkpointing))
        assert not model.is_activation_checkpointing
        trained[checkpointing] = model.state_dict()
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(v, tiny_llama(tokenizer).state_dict()[k])
               for k, v in trained[True].items())
