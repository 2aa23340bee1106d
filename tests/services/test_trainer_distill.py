"""Knowledge distillation: the KD losses on hand-made logits (pure), the layer-subset student,
the teacher cache and the student's loop (tiny random Llamas), teacher/student comparison;
ranking distillation: the listwise losses (pure), reader scores, reader -> query encoder and
reader -> reranker on toy tasks (tiny random BERTs). No downloaded weights."""

from __future__ import annotations

import gc
import json
import math
import weakref

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from services.evaluation import qa
from services.ranker.rerank import CrossEncoder
from services.trainer import distill, loop
from services.trainer import rerank_distill as rd
from services.trainer.generator import (
    IGNORE,
    Encoding,
    Example,
    build_examples,
    collate,
    target_logprobs,
)
from services.trainer.retriever import dev_metrics
from shared.datasets import QAItem
from shared.models.encoder import Encoder
from shared.schemas import Document, Hit, titled_text
from tests.tiny import bpe_tokenizer, tiny_bert, tiny_llama, tiny_t5, toy_task

V = 20  # vocabulary of the hand-made logits


def logits(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def full_kl(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(teacher/t) || softmax(student/t)) per position, written out."""
    p = torch.softmax(teacher / t, -1)
    return (p * (torch.log_softmax(teacher / t, -1) - torch.log_softmax(student / t, -1))).sum(-1)


ALL_IDS = torch.arange(V).expand(2, 3, V)


# --- the KD losses (pure) ---------------------------------------------------------------------
def test_alpha_zero_is_the_cross_entropy_on_the_reference_tokens():
    student, teacher = logits(0, 2, 3, V), logits(1, 2, 3, V)
    targets = torch.tensor([[3, 7, IGNORE], [1, 2, 5]])
    mask = targets != IGNORE
    top = teacher.topk(5, -1)
    loss, _, ce = distill.kd_loss(student, targets, mask, top.values, top.indices,
                                  temperature=2.0, alpha=0.0)
    expected = F.cross_entropy(student[mask], targets[mask])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert ce == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_alpha_one_is_t_squared_times_the_kl_at_temperature_t(t):
    student, teacher = logits(2, 2, 3, V), logits(3, 2, 3, V)
    targets = torch.tensor([[3, 7, 0], [1, 2, 5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, kl, _ = distill.kd_loss(student, targets, mask, teacher, ALL_IDS, temperature=t,
                                  alpha=1.0)
    expected = full_kl(teacher, student, t)[mask].mean()
    assert kl == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(t * t * expected.item(), rel=1e-5)
    # the soft term is a real KL: F.kl_div agrees
    reference = F.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1),
                         log_target=True, reduction="none").sum(-1)[mask].mean()
    assert kl == pytest.approx(reference.item(), rel=1e-5)


def test_a_higher_temperature_softens_both_sides_and_lowers_the_kl():
    student, teacher = logits(4, 6, V), logits(5, 6, V)
    ids = torch.arange(V).expand(6, V)
    kls = [distill.forward_kl(student, teacher, ids, t).mean().item() for t in (1, 2, 8)]
    assert kls[0] > kls[1] > kls[2] > 0


@pytest.mark.parametrize("name", list(distill.LOSSES))
def test_identical_teacher_and_student_give_zero_kl(name):
    z = logits(6, 2, 3, V)
    top = z.topk(4, -1)
    for values, ids in ((z, ALL_IDS), (top.values, top.indices)):
        assert distill.LOSSES[name](z, values, ids, 2.0).abs().max().item() < 1e-6
    other = logits(7, 2, 3, V)
    assert distill.LOSSES[name](other, z, ALL_IDS, 2.0).min().item() > 0


def test_top_k_kl_renormalises_both_sides_over_the_cached_ids():
    student, teacher = logits(8, 4, V), logits(9, 4, V)
    top = teacher.topk(5, -1)
    t = 2.0
    got = distill.forward_kl(student, top.values, top.indices, t)
    p = torch.softmax(top.values / t, -1)
    q = torch.softmax(student.gather(-1, top.indices) / t, -1)
    assert torch.allclose(got, (p * (p.log() - q.log())).sum(-1), atol=1e-6)
    # the student's logits outside the cached ids do not enter the KL
    moved = student.clone()
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, top.indices, False)
    moved[outside] += 5.0
    assert torch.allclose(distill.forward_kl(moved, top.values, top.indices, t), got, atol=1e-6)
    # and the reverse one is KL(q || p) over the same ids
    assert torch.allclose(distill.reverse_kl(student, top.values, top.indices, t),
                          (q * (q.log() - p.log())).sum(-1), atol=1e-6)
    assert not torch.equal(got, torch.zeros_like(got))


def test_kd_loss_leaves_its_inputs_alone_and_names_the_known_losses():
    student, teacher = logits(10, 1, 2, V), logits(11, 1, 2, V)
    copies = student.clone(), teacher.clone()
    distill.kd_loss(student, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool),
                    teacher, torch.arange(V).expand(1, 2, V), temperature=2.0, alpha=0.5)
    assert torch.equal(student, copies[0]) and torch.equal(teacher, copies[1])
    with pytest.raises(ValueError, match="unknown distillation loss 'l2'; known: forward_kl, "
                                         "reverse_kl"):
        distill.kd_loss(student, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool),
                        teacher, torch.arange(V).expand(1, 2, V), temperature=1, alpha=1,
                        kl="l2")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": 0}, "input_value=0"),
    ({"temperature": math.inf}, "temperature"),
    ({"alpha": 1.5}, "input_value=1.5"),
    ({"loss": "l2"}, "unknown distillation loss 'l2'; known: forward_kl, reverse_kl"),
    ({"cache_k": 0}, "input_value=0"),
    ({"layer_fraction": 1.0}, "has to be smaller"),
    ({"layers": [3, 1]}, r"increasing.*\[3, 1\]"),
    ({"teacher": "x"}, "Extra inputs are not permitted"),
])
def test_distill_config_refuses_bad_values_by_name(kwargs, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        distill.DistillConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss": "mse"}, "unknown ranking distillation loss 'mse'; known: kl, bce"),
    ({"n_passages": 1}, "input_value=1"),
    ({"reader_temperature": -1}, "input_value=-1"),
    ({"reader_signal": "words"}, "reader_signal"),
    ({"prior_weight": float("nan")}, "prior_weight"),
    ({"doc_ids": ["a"]}, "Extra inputs are not permitted"),
])
def test_rank_distill_config_refuses_bad_values_by_name(kwargs, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        rd.RankDistillConfig(**kwargs)


# --- the student ------------------------------------------------------------------------------
def test_pick_layers_spreads_the_kept_layers_and_keeps_first_and_last():
    assert distill.pick_layers(30, 1 / 3) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert distill.pick_layers(30, 0.5)[::7] == [0, 14, 29] and len(
        distill.pick_layers(30, 0.5)) == 15
    assert distill.pick_layers(4, 0.5) == [0, 3]
    assert distill.pick_layers(2, 0.3) == [1]
    with pytest.raises(ValueError, match=r"`fraction` has to be in \(0, 1\], but is 0"):
        distill.pick_layers(4, 0)


def deep_llama(tokenizer, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def test_layer_subset_copies_the_chosen_layers_exactly_and_runs(tok):
    teacher = deep_llama(tok)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = distill.layer_subset(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    s, t = student.state_dict(), teacher.state_dict()
    for new, old in ((0, 0), (1, 3)):
        layer = {k.split(f"layers.{new}.", 1)[1]: v for k, v in s.items()
                 if k.startswith(f"model.layers.{new}.")}
        assert layer and all(torch.equal(v, t[f"model.layers.{old}.{k}"])
                             for k, v in layer.items())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name])
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert s["model.layers.0.self_attn.q_proj.weight"].data_ptr() != \
        t["model.layers.0.self_attn.q_proj.weight"].data_ptr()  # copies, not shared
    assert distill.parameter_count(student) < distill.parameter_count(teacher)
    ids = torch.tensor([tok("Land1 Amber")["input_ids"]])
    out = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 3)
    # keeping every layer rebuilds the teacher exactly
    whole = distill.layer_subset(teacher, [0, 1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(whole(ids).logits, teacher(ids).logits, atol=1e-6)
    for bad, message in (([], "at least one"), ([3, 1], "increasing"), ([0, 4], r"0\.\.3")):
        with pytest.raises(ValueError, match=message):
            distill.layer_subset(teacher, bad)


def test_greedy_layers_drop_a_layer_that_does_nothing_and_leave_the_model_as_it_was(tok):
    teacher = deep_llama(tok, layers=5, seed=1)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: an identity
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    items, passages, _ = toy_task(4)
    examples = answer_examples(tok, items, passages)
    ids = torch.tensor([tok("Land1 Amber")["input_ids"]])
    with torch.no_grad():
        before = teacher(ids).logits
    full = distill.target_nll(teacher, examples, tok.pad_token_id, 8, torch.device("cpu"))
    (layer, loss), = distill.greedy_removal(teacher, examples, tok.pad_token_id, 4)
    assert layer == 2 and loss == pytest.approx(full, rel=1e-5)  # nothing lost without it
    assert distill.greedy_layers(teacher, examples, tok.pad_token_id, 4) == [0, 1, 3, 4]
    chosen = distill.greedy_layers(teacher, examples, tok.pad_token_id, 2, batch_size=3)
    assert chosen[0] == 0 and chosen[-1] == 4 and len(chosen) == 2
    assert len(teacher.model.layers) == teacher.config.num_hidden_layers == 5
    assert teacher.config.use_cache
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, before)
    for keep in (1, 5):
        with pytest.raises(ValueError, match=r"`keep` has to lie in 2\.\.4"):
            distill.greedy_layers(teacher, examples, tok.pad_token_id, keep)
    with pytest.raises(ValueError, match="at least one example"):
        distill.greedy_layers(teacher, [], tok.pad_token_id, 3)


def test_a_greedy_student_is_chosen_once_per_run_and_trains(tok, tmp_path):
    items, passages, _ = toy_task(4)
    config = kd_config(max_steps=2, eval_steps=100, batch_size=2, layer_choice="greedy",
                       layer_choice_examples=3, log_steps=1)
    # a cancel between removals stops the choice; nothing of it is saved
    with pytest.raises(loop.Cancelled):
        distill.distill_generator(config, Loader(tok), items, [], passages, tmp_path,
                                  should_stop=lambda: True)
    assert not (tmp_path / distill.LAYERS_FILE).exists()
    heard: list[loop.Progress] = []
    first = distill.distill_generator(config, Loader(tok), items, [], passages, tmp_path,
                                      progress=heard.append)
    # the work before the first step is reported as phases, then the steps
    assert [(p.phase, p.step) for p in heard] == [
        ("choosing layers 0/2", 0), ("choosing layers 1/2", 0), ("choosing layers 2/2", 0),
        ("caching the teacher", 0), (None, 1), (None, 2)]
    saved = json.loads((tmp_path / distill.LAYERS_FILE).read_text())
    assert first.layers == saved["layers"] and len(first.layers) == 2
    assert first.layers[0] == 0 and first.layers[-1] == 3
    assert loop.read_meta(first.model_dir)["layers"] == first.layers
    # a later run in the same folder (a resume) reads the choice back, not choosing again
    other = [1, 3] if first.layers != [1, 3] else [2, 3]
    (tmp_path / distill.LAYERS_FILE).write_text(json.dumps({**saved, "layers": other}))
    again = distill.distill_generator(config, Loader(tok), items, [], passages, tmp_path)
    assert again.layers == other
    one = distill.distill_generator(config.model_copy(update={"layer_fraction": 0.25}),
                                    Loader(tok), items, [], passages, tmp_path / "one")
    assert one.layers == [3]  # one layer: the last, as spaced keeps it
    with pytest.raises(pydantic.ValidationError, match="layer_choice"):
        kd_config(layer_choice="best")


def test_a_student_must_read_the_teachers_tokenizer(tok):
    distill.check_same_tokenizer(tok, bpe_tokenizer())
    with pytest.raises(ValueError, match="chat template differs"):
        distill.check_same_tokenizer(tok, bpe_tokenizer(chat_template=None))
    backend = Tokenizer(models.WordLevel(vocab={"[PAD]": 0, "[UNK]": 1, "a": 2},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                    unk_token="[UNK]")
    with pytest.raises(ValueError, match="tokenizer differs from the teacher's"):
        distill.check_same_tokenizer(tok, words)


# --- the cache and the student's loop ---------------------------------------------------------
def kd_config(**overrides) -> distill.DistillConfig:
    base = {"lr": 3e-3, "warmup_steps": 2, "batch_size": 4, "max_steps": 10, "eval_steps": 5,
            "eval_questions": 4, "eval_max_new_tokens": 6, "device": "cpu", "max_seq_len": 768,
            "abstain_fraction": 0.25, "extra_passages": 1, "cache_k": 8, "temperature": 2.0,
            "layer_fraction": 0.5, "teacher_batch_size": 4, "heal_steps": 0}
    return distill.DistillConfig(**{**base, **overrides})


def answer_examples(tok, items, passages) -> list:
    """``build_examples`` of ``items`` as the tests' distillation runs build them."""
    return build_examples(items, passages, Encoding(
        tokenizer=tok, seq2seq=False, end=tok.eos_token_id, context=2048),
        kd_config().prompts(), abstain_fraction=0.0)


def sharp_teacher(tokenizer) -> LlamaForCausalLM:
    """A 4-layer random Llama whose output head is scaled up: a random model's next-token
    distribution is nearly uniform (nothing to distil); this one's is peaked."""
    model = deep_llama(tokenizer, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


class Loader:
    """Builds a fresh teacher per call and keeps only a weak reference to it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.teacher = None

    def __call__(self):
        model = sharp_teacher(self.tokenizer)
        self.teacher = weakref.ref(model)
        return model, self.tokenizer

    def alive(self) -> bool:
        gc.collect()
        return self.teacher is not None and self.teacher() is not None


def test_the_cache_round_trips_and_the_student_learns_from_it_without_the_teacher(tok, tmp_path):
    items, passages, unknown = toy_task(6)
    loader = Loader(tok)
    teacher_alive: list[bool] = []
    result = distill.distill_generator(
        kd_config(eval_steps=10), loader, items + unknown, items[:4], passages, tmp_path,
        progress=lambda p: p.phase or teacher_alive.append(loader.alive()))
    assert teacher_alive and not any(teacher_alive)  # freed before the first step
    assert result.teacher_cached and result.layers == [0, 3] and result.steps == 10
    assert result.student_params < result.teacher_params
    cache = distill.TeacherCache.load(result.cache_path)
    assert cache.k == 8 and cache.values.shape == cache.ids.shape == (sum(cache.lengths), 8)
    assert len(cache.lengths) == sum(result.examples.values())
    assert 0 < cache.kept_mass["mean_T"] <= cache.kept_mass["mean_T1"] <= 1
    # the cache holds the teacher's top-k logits: recompute one example's with a new teacher
    teacher = sharp_teacher(tok)
    example = answer_examples(tok, items[:1], passages)[0]
    with torch.no_grad():
        full, _, mask = distill.target_logits(teacher, collate([example], tok.pad_token_id,
                                                               seq2seq=False))
    top = full[0, :int(mask.sum())].topk(8, -1)
    # items[0]'s answer example is the first one built, so the cache's first rows
    values, ids = cache.batch([0], int(mask.sum()))
    assert cache.lengths[0] == int(mask.sum())
    assert torch.allclose(values[0], top.values, atol=1e-4)
    assert torch.equal(ids[0], top.indices)
    for part in ("loss", "kl"):  # the whole loss falls, and the student nears the teacher
        values = [r[part] for r in result.history["train"]]
        assert np.mean(values[-3:]) < 0.6 * np.mean(values[:3]), part
    meta = loop.read_meta(result.model_dir)
    assert meta["kind"] == "generator" and meta["layers"] == [0, 3]
    assert meta["distilled_from"] and meta["kept_mass"] == cache.kept_mass
    saved = LlamaForCausalLM.from_pretrained(result.model_dir)
    assert saved.config.num_hidden_layers == 2
    assert result.report_path.is_file() and result.best_step == 10
    assert set(result.best_metrics) >= {"em", "f1", "score"}


def test_prompt_kl_at_the_cached_ids_equals_the_kl_of_the_full_logits(tok):
    items, passages, _ = toy_task(3)
    model = tiny_llama(tok)
    examples = answer_examples(tok, items, passages)
    batch = collate(examples, tok.pad_token_id, seq2seq=False)
    positions = distill.prompt_positions(batch["labels"], batch["attention_mask"])
    # each row: its prompt's positions but the last (whose next token is the answer's first)
    for r, e in enumerate(examples):
        prompt = sum(1 for label in e.labels if label == -100)
        assert positions[r].nonzero().flatten().tolist() == list(range(prompt - 1))
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                output_hidden_states=True)
    teacher = logits(5, *out.logits.shape)
    top = teacher[positions].topk(6, -1)
    got = distill.prompt_kl(out.hidden_states[-1], model.get_output_embeddings(), positions,
                            top.values, top.indices, temperature=2.0)
    want = distill.forward_kl(out.logits[positions], top.values, top.indices, 2.0).mean()
    assert torch.allclose(got, want, atol=1e-5)
    got.backward()  # the gradient reaches the student's layers
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_a_prompt_weight_caches_the_prompts_and_distils_them_too(tok, tmp_path):
    items, passages, unknown = toy_task(6)
    train = items + unknown
    first = distill.distill_generator(kd_config(max_steps=2, prompt_weight=0.0), Loader(tok),
                                      train, [], passages, tmp_path)
    assert not distill.TeacherCache.load(first.cache_path).has_prompt
    # the same run folder: a cache without the prompts is not reused for a prompt weight
    result = distill.distill_generator(
        kd_config(eval_steps=10, prompt_weight=1.0), Loader(tok), train, items[:4], passages,
        tmp_path, resume=False)
    assert result.teacher_cached
    cache = distill.TeacherCache.load(result.cache_path)
    assert cache.has_prompt and cache.prompt_values.dtype == torch.float16
    assert len(cache.prompt_lengths) == len(cache.lengths)
    assert cache.prompt_values.shape == cache.prompt_ids.shape == (sum(cache.prompt_lengths), 8)
    # the cached prompt top-k is the teacher's: recompute the first example's
    example = answer_examples(tok, items[:1], passages)[0]
    batch = collate([example], tok.pad_token_id, seq2seq=False)
    with torch.no_grad():
        full = sharp_teacher(tok)(input_ids=batch["input_ids"]).logits
    top = full[distill.prompt_positions(batch["labels"], batch["attention_mask"])].topk(8, -1)
    values, ids = cache.prompt_batch([0])
    assert torch.allclose(values, top.values, atol=2e-2)  # float16
    assert torch.equal(ids, top.indices)
    prompt_kl = [r["prompt_kl"] for r in result.history["train"]]
    assert np.mean(prompt_kl[-3:]) < np.mean(prompt_kl[:3])
    assert "prompt_kl" not in first.history["train"][0]


def test_activation_checkpointing_distils_the_same_student(tok, tmp_path):
    items, passages, unknown = toy_task(6)
    students = {}
    for checkpointing in (False, True):
        result = distill.distill_generator(
            kd_config(max_steps=3, prompt_weight=1.0, activation_checkpointing=checkpointing),
            Loader(tok), items + unknown, [], passages, tmp_path / str(checkpointing))
        assert loop.read_meta(result.model_dir)["config"]["activation_checkpointing"] \
            is checkpointing
        saved = LlamaForCausalLM.from_pretrained(result.model_dir)
        assert not saved.is_activation_checkpointing
        students[checkpointing] = saved.state_dict()
    for name, value in students[False].items():
        torch.testing.assert_close(students[True][name], value, atol=1e-5, rtol=1e-4)


def test_target_logits_agree_with_the_sft_log_probabilities(tok):
    items, passages, _ = toy_task(3)
    model = tiny_llama(tok)
    examples = answer_examples(tok, items, passages)
    batch = collate(examples, tok.pad_token_id, seq2seq=False)
    with torch.no_grad():
        full, targets, mask = distill.target_logits(model, batch)
        lp, lp_mask = target_logprobs(model, batch, seq2seq=False)
    picked = torch.log_softmax(full, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.equal(mask, lp_mask)
    assert torch.allclose(picked * mask, lp, atol=1e-5)


def test_resume_after_cancel_reuses_the_cache_and_continues(tok, tmp_path):
    items, passages, _ = toy_task(4)
    # spaced layers: should_stop below counts the asks between steps only
    config = kd_config(max_steps=4, eval_steps=100, save_steps=2, log_steps=1, batch_size=2,
                       layer_choice="spaced")
    whole = distill.distill_generator(config, Loader(tok), items, [], passages, tmp_path / "a")
    calls = iter(range(100))
    with pytest.raises(loop.Cancelled):
        distill.distill_generator(config, Loader(tok), items, [], passages, tmp_path / "b",
                                  should_stop=lambda: next(calls) == 2)
    assert loop.load_state(tmp_path / "b")["step"] == 2
    seen: list[int] = []
    resumed = distill.distill_generator(config, Loader(tok), items, [], passages,
                                        tmp_path / "b", progress=lambda p: seen.append(p.step))
    assert resumed.resumed_from == 2 and resumed.steps == 4 and not resumed.teacher_cached
    assert seen == [3, 4]
    np.testing.assert_allclose([r["loss"] for r in resumed.history["train"]],
                               [r["loss"] for r in whole.history["train"]], rtol=1e-4)
    with pytest.raises(ValueError, match="another config"):
        distill.distill_generator(config.model_copy(update={"max_steps": 5}), Loader(tok),
                                  items, [], passages, tmp_path / "b")


def test_bad_students_and_data_are_refused_before_training(tok, tmp_path):
    items, passages, _ = toy_task(4)
    with pytest.raises(ValueError, match="no training items"):
        distill.distill_generator(kd_config(), Loader(tok), [], [], passages, tmp_path)
    bigger = deep_llama(tok, layers=5)
    with pytest.raises(ValueError, match="has to be smaller"):
        distill.distill_generator(kd_config(), Loader(tok), items, [], passages, tmp_path,
                                  student=(bigger, tok))
    with pytest.raises(ValueError, match="chat template differs"):
        distill.distill_generator(kd_config(), Loader(tok), items, [], passages, tmp_path,
                                  student=(tiny_llama(tok), bpe_tokenizer(chat_template=None)))
    with pytest.raises(ValueError, match=r"0\.\.3"):
        distill.distill_generator(kd_config(layers=[0, 7]), Loader(tok), items, [], passages,
                                  tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_healed_student_trains_on_the_corpus_text_first(tok, tmp_path):
    items, passages, _ = toy_task(4)
    texts = [f"{h.title}\n{h.text}" for hits in passages.values() for h in hits] * 8
    config = kd_config(max_steps=4, eval_steps=100, save_steps=2, log_steps=1,
                       layer_choice="spaced", heal_steps=3, heal_block_size=16, batch_size=2)
    with pytest.raises(ValueError, match="`heal_texts` is empty"):
        distill.distill_generator(config, Loader(tok), items, [], passages, tmp_path / "x")
    seen: list[loop.Progress] = []
    with pytest.raises(loop.Cancelled):  # stopped after the student's second step
        distill.distill_generator(config, Loader(tok), items, [], passages, tmp_path / "run",
                                  heal_texts=texts, progress=seen.append,
                                  should_stop=lambda: any(p.step == 2 and not p.phase
                                                          for p in seen))
    assert [p.phase for p in seen if p.phase] == ["caching the teacher",
                                                  "healing the student 0/3",
                                                  "healing the student 3/3"]
    healed = loop.read_meta(tmp_path / "run" / distill.HEAL_DIR / loop.MODEL_DIR)
    assert healed["kind"] == "generator-lm" and healed["step"] == 3
    seen.clear()  # the student's own loop resumes without healing again
    result = distill.distill_generator(config, Loader(tok), items, [], passages,
                                       tmp_path / "run", heal_texts=texts, progress=seen.append)
    assert result.resumed_from == 2 and result.steps == 4 and result.layers == [0, 3]
    assert [p.phase for p in seen if p.phase] == []
    # a corpus too short for one block: distilled without healing, nothing refused
    seen.clear()
    short = distill.distill_generator(config, Loader(tok), items, [], passages,
                                      tmp_path / "short", heal_texts=["a few words"],
                                      progress=seen.append)
    assert short.steps == 4 and not (tmp_path / "short" / distill.HEAL_DIR).exists()
    assert [p.phase for p in seen if p.phase] == ["caching the teacher"]


def test_a_named_smaller_student_trains_too(tok, tmp_path):
    items, passages, _ = toy_task(4)
    student = tiny_llama(tok, seed=5)  # 2 layers, its own random weights, saved as a folder
    student.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    config = kd_config(max_steps=3, eval_steps=100, student_model=str(tmp_path / "small"))
    result = distill.distill_generator(config, Loader(tok), items, [], passages,
                                       tmp_path / "run")
    assert result.layers is None and result.steps == 3
    assert loop.read_meta(result.model_dir)["layers"] is None


def test_teacher_and_student_are_compared_side_by_side(tok):
    items, passages, unknown = toy_task(3)
    teacher = deep_llama(tok)
    student = distill.layer_subset(teacher, [0, 3])
    out = distill.compare_generators({"teacher": teacher, "student": student}, tok,
                                     {"toy": items, "unknown": unknown}, passages,
                                     max_new_tokens=3, batch_size=4, speed_prompts=2,
                                     speed_tokens=3, rounds=2)
    assert list(out) == ["teacher", "student"]
    for c in out.values():
        assert set(c.sets) == {"toy", "unknown"} and c.sets["toy"]["n"] == 3
        assert c.tokens_per_s > 0 and len(c.rounds) == 2
    assert out["student"].parameters < out["teacher"].parameters
    prompt = qa.prompt_ids(tok, items[0].question, passages[items[0].question][:1], 500)
    assert distill.tokens_per_s(student, tok, [prompt], new_tokens=5, batch_size=1) > 0


# --- ranking distillation: the losses (pure) --------------------------------------------------
def test_listwise_kl_is_zero_for_matching_lists_and_ignores_padding():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [1.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert rd.listwise_kl(teacher, teacher, mask).item() == pytest.approx(0, abs=1e-7)
    shifted = teacher + torch.tensor([[5.0], [-2.0]])  # a per-question shift changes nothing
    assert rd.listwise_kl(shifted, teacher, mask).item() == pytest.approx(0, abs=1e-6)
    padded = teacher.clone()
    padded[1, 2] = 99.0  # a padding column's score does not count
    assert rd.listwise_kl(padded, teacher, mask).item() == pytest.approx(0, abs=1e-6)
    student = torch.tensor([[0.0, 2.0, -1.0], [3.0, 1.0, 0.0]])
    p = torch.softmax(teacher[0], -1)
    q = torch.softmax(student[0], -1)
    row0 = (p * (p.log() - q.log())).sum()
    p1, q1 = torch.softmax(teacher[1, :2], -1), torch.softmax(student[1, :2], -1)
    row1 = (p1 * (p1.log() - q1.log())).sum()
    assert rd.listwise_kl(student, teacher, mask).item() == pytest.approx(
        ((row0 + row1) / 2).item(), rel=1e-5)


def test_pointwise_bce_uses_the_teachers_list_softmax_as_labels():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # softmax: 0.25, 0.75
    student = torch.tensor([[0.5, -0.5]])
    expected = F.binary_cross_entropy_with_logits(student, torch.tensor([[0.25, 0.75]]))
    assert rd.pointwise_bce(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)


# --- reader scores and reader -> query encoder ------------------------------------------------
def bert_encoder(tokenizer, seed: int = 0, max_length: int = 64) -> Encoder:
    model = tiny_bert(tokenizer, seed=seed, max_positions=512, pooler=False)
    return Encoder(tokenizer, model.eval(), batch_size=8, max_length=max_length)


def test_reader_scores_each_passage_alone_and_skips_unanswerable_items(tok, tmp_path):
    items, passages, unknown = toy_task(3)
    reader = tiny_llama(tok)
    lists = rd.reader_loglik(reader, tok, items + unknown, passages, 3, batch_size=4)
    assert [r.item_id for r in lists] == [i.id for i in items]
    assert all(len(r.loglik) == 3 and max(r.loglik) < 0 for r in lists)
    assert lists[0].doc_ids == tuple(h.doc_id for h in passages[items[0].question][:3])
    # one (question, passage) pair scored on its own gives the same number
    item, hit = items[1], passages[items[1].question][2]
    prompt = qa.prompt_ids(tok, item.question, [hit], qa.SERVING_MAX_PASSAGE_CHARS)
    answer = tok(item.answers[0], add_special_tokens=False)["input_ids"]  # no end token
    example = Example(id="x", kind="x", target="", passages=(), labels=tuple(
        [IGNORE] * len(prompt) + answer), input_ids=tuple(prompt + answer))
    with torch.no_grad():
        lp, mask = target_logprobs(reader, collate([example], tok.pad_token_id, seq2seq=False),
                                   seq2seq=False)
    assert lists[1].loglik[2] == pytest.approx(float((lp * mask).sum()), abs=1e-3)
    rd.save_reader_scores(tmp_path / "r.json", lists)
    assert rd.load_reader_scores(tmp_path / "r.json") == lists
    with pytest.raises(ValueError, match="n_passages"):
        rd.reader_loglik(reader, tok, items, passages, 0)


def test_reader_signals_score_the_question_and_the_answer_in_one_forward(tok):
    """"question" sums the log-probs from the question's first token to the end of the
    prompt, "answer" the answer's, "question_answer" both: each checked against a hand-built
    example of the same prompt."""
    items, passages, _ = toy_task(2)
    reader = tiny_llama(tok)
    signals = rd.reader_signals(reader, tok, items, passages, 3, batch_size=2)
    assert set(signals) == set(rd.SIGNALS)
    assert signals["answer"] == rd.reader_loglik(reader, tok, items, passages, 3)
    item, hit = items[1], passages[items[1].question][2]
    prompt = qa.prompt_ids(tok, item.question, [hit], qa.SERVING_MAX_PASSAGE_CHARS)
    start = rd.question_start(tok, item.question, hit, qa.SERVING_MAX_PASSAGE_CHARS, prompt)
    assert tok.decode(prompt[start:]).strip().startswith(item.question.strip())
    assert item.question not in tok.decode(prompt[:start])
    example = Example(id="x", kind="x", target="", passages=(), input_ids=tuple(prompt),
                      labels=tuple([IGNORE] * start + prompt[start:]))
    with torch.no_grad():
        lp, mask = target_logprobs(reader, collate([example], tok.pad_token_id, seq2seq=False),
                                   seq2seq=False)
    question = float((lp * mask).sum())
    assert signals["question"][1].loglik[2] == pytest.approx(question, abs=1e-3)
    assert signals["question_answer"][1].loglik[2] == pytest.approx(
        question + signals["answer"][1].loglik[2], abs=2e-3)
    with pytest.raises(ValueError, match="unknown reader signal 'words'"):
        rd.reader_loglik(reader, tok, items, passages, 3, signal="words")


def test_an_encoder_decoder_reader_gives_the_answer_signal_only(tok):
    items, passages, _ = toy_task(2)
    reader = tiny_t5(tok)
    assert set(rd.reader_signals(reader, tok, items, passages, 2)) == {"answer"}
    with pytest.raises(ValueError, match="needs a decoder-only reader"):
        rd.reader_loglik(reader, tok, items, passages, 2, signal="question")


def toy_lists(n: int = 12, width: int = 4) -> tuple[list[Document], list[rd.ReaderList],
                                                  list[QAItem]]:
    """Documents "k<i> holds m<i>"; question i's list holds its document and ``width - 1``
    others, the reader preferring its own document; dev items name it (for metrics only)."""
    docs = [Document(doc_id=f"d{i}", title=f"t{i}", text=f"k{i} holds m{i}") for i in range(n)]
    lists, dev = [], []
    for i in range(n):
        others = [f"d{(i + j) % n}" for j in range(1, width)]
        ids = others[:i % width] + [f"d{i}"] + others[i % width:]
        lists.append(rd.ReaderList(item_id=f"q{i}", question=f"what is k{i}", doc_ids=tuple(ids),
                                   loglik=tuple(-0.3 if d == f"d{i}" else -6.0 for d in ids)))
        dev.append(QAItem(id=f"q{i}", question=f"what is k{i}", answers=[f"m{i}"],
                          doc_ids=[f"d{i}"], answerable=True))
    return docs, lists, dev


@pytest.fixture(scope="module")
def words():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "is", "holds", "lacks", "it"]
    vocab += [f"{p}{i}" for p in "ktmde" for i in range(12)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


# The reader's own target (prior_weight 0): these toy readers are what the rankers must learn.
FAST = {"lr": 3e-3, "batch_size": 4, "temperature": 0.1, "device": "cpu", "warmup_steps": 1,
        "n_passages": 4, "prior_weight": 0.0}


def test_reader_to_retriever_lowers_the_kl_and_leaves_the_index_alone(words, tmp_path):
    docs, lists, dev = toy_lists()
    encoder = bert_encoder(words)
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    vectors = encoder.encode([titled_text(d.title, d.text) for d in docs])
    start = dev_metrics(encoder, vectors, docs, dev)
    config = rd.RankDistillConfig(epochs=12, eval_steps=12, save_steps=100, **FAST)
    result = rd.distill_retriever(config, encoder, lists, docs, vectors, tmp_path,
                                  dev_items=dev)
    assert result.kl_end < 0.5 * result.kl_start
    assert result.metrics["mrr@10"] > start["mrr@10"]
    assert all(torch.equal(v, before[k]) for k, v in encoder.model.state_dict().items())
    meta = loop.read_meta(result.model_dir)
    assert meta["kind"] == "retriever" and meta["mode"] == "query" and meta["reindex"] is False
    assert meta["objective"] == "reader_distillation" and meta["step"] == result.best_step
    trained = BertModel.from_pretrained(result.model_dir, add_pooling_layer=False)
    assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items())


def test_reader_to_retriever_needs_no_doc_ids(tok, tmp_path):
    """From question/answer pairs alone: the reader scores the retrieved passages, the query
    encoder learns the reader's preferences (no dev data: the last model is saved)."""
    items, passages, _ = toy_task(6)
    no_labels = [QAItem(id=i.id, question=i.question, answers=i.answers, doc_ids=[],
                        answerable=True) for i in items]
    lists = rd.reader_loglik(tiny_llama(tok), tok, no_labels, passages, 4)
    docs = list({h.doc_id: Document(doc_id=h.doc_id, title=h.title, text=h.text)
                 for hits in passages.values() for h in hits}.values())
    encoder = bert_encoder(tok, max_length=32)
    vectors = encoder.encode([titled_text(d.title, d.text) for d in docs])
    config = rd.RankDistillConfig(epochs=10, save_steps=100, **{**FAST, "temperature": 0.05})
    result = rd.distill_retriever(config, encoder, lists, docs, vectors, tmp_path,
                                  dev_items=no_labels)
    assert result.kl_end < result.kl_start and result.best_step == result.steps
    assert result.metrics == {} and loop.read_meta(result.model_dir)["kind"] == "retriever"


def test_with_the_retriever_as_prior_an_uninformative_reader_keeps_its_ranking(words, tmp_path):
    """A reader that scores every passage alike: its target alone is uniform and unlearns the
    ranking; with prior_weight 1 the target is the starting encoder's own distribution, so
    the run starts at KL 0 and keeps the dev ranking."""
    docs, lists, dev = toy_lists()
    flat = [rd.ReaderList(r.item_id, r.question, r.doc_ids, (-2.0,) * len(r.doc_ids))
            for r in lists]
    encoder = bert_encoder(words)
    vectors = encoder.encode([titled_text(d.title, d.text) for d in docs])
    taught = rd.distill_retriever(rd.RankDistillConfig(epochs=12, save_steps=100, **FAST),
                                  encoder, lists, docs, vectors, tmp_path / "taught")
    trained = Encoder(encoder.tokenizer, BertModel.from_pretrained(
        taught.model_dir, add_pooling_layer=False).eval(), 8, 64)
    start = dev_metrics(trained, vectors, docs, dev)
    config = rd.RankDistillConfig(epochs=6, save_steps=100, **{**FAST, "prior_weight": 1.0})
    kept = rd.distill_retriever(config, trained, flat, docs, vectors, tmp_path / "kept")
    assert kept.kl_start == pytest.approx(0.0, abs=1e-4)
    again = Encoder(encoder.tokenizer, BertModel.from_pretrained(
        kept.model_dir, add_pooling_layer=False).eval(), 8, 64)
    assert dev_metrics(again, vectors, docs, dev)["mrr@10"] == pytest.approx(
        start["mrr@10"], abs=0.05)
    alone = rd.distill_retriever(config.model_copy(update={"prior_weight": 0.0}), trained,
                                 flat, docs, vectors, tmp_path / "alone")
    assert alone.kl_start > 0.1


def test_ranking_distillation_refuses_bad_inputs_and_resumes_after_cancel(words, tmp_path):
    docs, lists, dev = toy_lists()
    encoder = bert_encoder(words)
    vectors = encoder.encode([titled_text(d.title, d.text) for d in docs])
    config = rd.RankDistillConfig(max_steps=6, save_steps=2, **FAST)
    with pytest.raises(ValueError, match="'d11' is not in the corpus"):
        rd.distill_retriever(config, encoder, lists, docs[:-1], vectors[:-1], tmp_path)
    with pytest.raises(ValueError, match="doc_vectors"):
        rd.distill_retriever(config, encoder, lists, docs, vectors[:3], tmp_path)
    with pytest.raises(ValueError, match="no reader-scored question"):
        rd.distill_retriever(config, encoder, [], docs, vectors, tmp_path)
    whole = rd.distill_retriever(config, encoder, lists, docs, vectors, tmp_path / "a")
    calls = iter(range(100))
    with pytest.raises(loop.Cancelled):
        rd.distill_retriever(config, encoder, lists, docs, vectors, tmp_path / "b",
                             should_stop=lambda: next(calls) == 3)
    assert loop.load_state(tmp_path / "b")["step"] == 3
    resumed = rd.distill_retriever(config, encoder, lists, docs, vectors, tmp_path / "b")
    assert resumed.resumed_from == 3 and resumed.steps == 6
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-4)
    assert resumed.kl_end == pytest.approx(whole.kl_end, rel=1e-3)


def test_ranking_distillation_whose_loss_is_not_finite_stops_with_a_clear_error(words,
                                                                                 tmp_path):
    docs, lists, _ = toy_lists()
    encoder = bert_encoder(words)
    vectors = encoder.encode([titled_text(d.title, d.text) for d in docs])
    # A temperature this small makes every score infinite, so the loss is NaN at every step.
    config = rd.RankDistillConfig(max_steps=6, save_steps=100, **{**FAST, "temperature": 1e-45})
    with pytest.raises(FloatingPointError, match="not finite in 3 steps in a row .up to step 3"):
        rd.distill_retriever(config, encoder, lists, docs, vectors, tmp_path)


# --- reader -> reranker -----------------------------------------------------------------------
def answer_lists(n: int = 12) -> tuple[list[Document], list[rd.ReaderList], list[QAItem]]:
    """Question i's list: "k<i> holds m<i>" and three "k<j> lacks it" passages (one naming
    k<i> too), in a rotating order; the reader prefers the passage that holds an answer."""
    docs = [Document(doc_id=f"d{i}", title=f"t{i}", text=f"k{i} holds m{i}") for i in range(n)]
    docs += [Document(doc_id=f"e{i}", title=f"t{i}", text=f"k{i} lacks it") for i in range(n)]
    lists, dev = [], []
    for i in range(n):
        others = [f"e{i}", f"e{(i + 1) % n}", f"e{(i + 2) % n}"]
        ids = others[:i % 4] + [f"d{i}"] + others[i % 4:]
        lists.append(rd.ReaderList(item_id=f"q{i}", question=f"what is k{i}", doc_ids=tuple(ids),
                                   loglik=tuple(-0.3 if d[0] == "d" else -6.0 for d in ids)))
        dev.append(QAItem(id=f"q{i}", question=f"what is k{i}", answers=[f"m{i}"],
                          doc_ids=[f"d{i}"], answerable=True))
    return docs, lists, dev


def test_reranker_distillation_improves_a_toy_ranking(words, tmp_path):
    docs, lists, dev = answer_lists(8)
    reranker = CrossEncoder(words, tiny_bert(words, layers=2, max_positions=64), max_length=32)
    by_id = {d.doc_id: d for d in docs}
    candidates = {r.question: [Hit(doc_id=d, title=by_id[d].title, text=by_id[d].text,
                                   score=1.0) for d in r.doc_ids] for r in lists}
    before = rd.rerank_ndcg(reranker, dev, candidates)
    config = rd.RankDistillConfig(epochs=12, eval_steps=24, save_steps=100,
                                  **{**FAST, "lr": 1e-3})
    result = rd.distill_reranker(config, reranker, lists, docs, tmp_path, dev_items=dev,
                                 dev_candidates=candidates)
    after = rd.rerank_ndcg(reranker, dev, candidates)
    # the order is learnt first; the reader's near-certainty (p ~ 0.99) takes longer
    assert result.kl_end < 0.95 * result.kl_start
    assert after["ndcg@10"] > before["ndcg@10"] + 0.1 and after["ndcg@10"] > 0.9
    assert after["ndcg@10_fused"] == before["ndcg@10_fused"]
    assert result.metrics["ndcg@10"] == pytest.approx(after["ndcg@10"], abs=1e-6)
    loaded = CrossEncoder.load(result.model_dir)
    question = lists[0].question
    texts = [titled_text(by_id[d].title, by_id[d].text) for d in lists[0].doc_ids]
    assert loaded.score(question, texts) == pytest.approx(reranker.score(question, texts),
                                                          abs=1e-4)
    assert loop.read_meta(result.model_dir)["kind"] == "reranker"
    with pytest.raises(ValueError, match="`prior_weight` is for the query encoder"):
        rd.distill_reranker(config.model_copy(update={"prior_weight": 1.0}), reranker, lists,
                            docs, tmp_path / "prior")


def test_job_kinds_wire_the_distillation_configs():
    from services.trainer import jobs

    assert jobs.KINDS["distill"] == (distill.DistillConfig, jobs.run_distill)
    assert jobs.KINDS["distill_retriever"] == (rd.RankDistillConfig, jobs.run_distill_retriever)
    with pytest.raises(pydantic.ValidationError, match="input_value=2"):
        jobs.KINDS["distill"][0].model_validate({"alpha": 2})
