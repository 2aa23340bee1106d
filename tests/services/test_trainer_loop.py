"""Trainer loop helpers: the schedule (pure), fingerprints, resumable state, saved models, the
step's scaffolding (scheduled lr, cancel with a saved state, non-finite steps, progress)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertModel

from services.trainer import loop


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    kw = {"lr": 1.0, "warmup_steps": 4, "total_steps": 14}
    assert [loop.get_lr(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert loop.get_lr(4, **kw) == pytest.approx(1.0)
    assert loop.get_lr(14, **kw) == pytest.approx(0.1)
    decay = [loop.get_lr(s, **kw) for s in range(4, 15)]
    assert decay == sorted(decay, reverse=True)
    assert loop.get_lr(9, **kw, schedule="linear") == pytest.approx(0.1 + 0.9 * 0.5)
    assert loop.get_lr(9, **kw, schedule="constant") == 1.0


def test_fingerprint_depends_on_content_and_order():
    a = loop.fingerprint([{"q": "a"}, {"q": "b"}])
    assert a == loop.fingerprint([{"q": "a"}, {"q": "b"}])
    assert a != loop.fingerprint([{"q": "b"}, {"q": "a"}])


def test_state_round_trips_and_absent_state_is_none(tmp_path):
    assert loop.load_state(tmp_path) is None
    loop.save_state(tmp_path, {"step": 3, "weights": torch.ones(2)})
    state = loop.load_state(tmp_path)
    assert state["step"] == 3 and torch.equal(state["weights"], torch.ones(2))


def test_saved_model_carries_its_meta_and_is_replaced_whole(tmp_path):
    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=50))
    folder = loop.save_model(tmp_path, model, None, {"kind": "retriever", "step": 1})
    assert loop.read_meta(folder)["step"] == 1
    loop.save_model(tmp_path, model, None, {"kind": "retriever", "step": 2})
    assert loop.read_meta(folder)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_cancel_raises_only_when_asked():
    loop.check_cancel(None)
    loop.check_cancel(lambda: False)
    with pytest.raises(loop.Cancelled):
        loop.check_cancel(lambda: True)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="known: auto, cpu, cuda"):
        loop.pick_device("tpu")
    assert loop.pick_device("cpu") == (torch.device("cpu"), torch.float32)


def test_scheduled_lr_is_set_on_every_group_from_the_config():
    config = SimpleNamespace(lr=1.0, warmup_steps=4, schedule="linear", min_lr_ratio=0.5)
    weights = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [weights]}, {"params": [], "lr": 9.0}], lr=0.1)
    assert loop.set_scheduled_lr(optimizer, config, 1, 14) == 0.5
    lr = loop.set_scheduled_lr(optimizer, config, 9, 14, lr=2.0)
    assert lr == pytest.approx(loop.get_lr(9, lr=2.0, warmup_steps=4, total_steps=14,
                                           schedule="linear", min_ratio=0.5))
    assert [g["lr"] for g in optimizer.param_groups] == [lr, lr]


def test_stop_if_asked_saves_the_snapshot_then_raises(tmp_path):
    def snapshot():
        raise AssertionError("a run that goes on needs no snapshot")

    loop.stop_if_asked(None, tmp_path, snapshot)
    loop.stop_if_asked(lambda: False, tmp_path, snapshot)
    assert loop.load_state(tmp_path) is None
    with pytest.raises(loop.Cancelled):
        loop.stop_if_asked(lambda: True, tmp_path, lambda: {"step": 7})
    assert loop.load_state(tmp_path) == {"step": 7}


def test_a_non_finite_loss_or_gradient_skips_the_step_and_clears_the_gradients():
    weights = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weights], lr=1.0)
    (weights * float("nan")).sum().backward()
    assert not loop.optimizer_step([optimizer], [[weights]], 1.0, 0.5)
    assert weights.grad is None and torch.equal(weights.detach(), torch.ones(2))
    (weights * 3.0).sum().backward()
    assert loop.optimizer_step([optimizer], [[weights]], 1.0, 0.5)
    # the gradient (3, 3) clipped to norm 1
    assert torch.allclose(weights.detach(), torch.ones(2) - 2 ** -0.5)


def test_non_finite_steps_raise_only_when_they_come_in_a_row(caplog):
    nonfinite = loop.NonFinite()
    with caplog.at_level(logging.WARNING, logger=loop.__name__):
        for step, stepped in enumerate([False, False, True, False, False], start=1):
            nonfinite.count(stepped, step, float("nan"))
    assert nonfinite.in_a_row == 2
    # every skipped step is said, with its loss; the one that stepped is not
    assert [r.getMessage() for r in caplog.records] == [
        f"step {n}: loss or gradients not finite (loss nan); step skipped" for n in (1, 2, 4, 5)]
    with pytest.raises(FloatingPointError, match="not finite in 3 steps in a row .up to step 6"):
        nonfinite.count(False, 6, float("inf"))


def test_reporter_sends_progress_timed_by_its_clock_or_nothing():
    sent = []
    report = loop.Reporter(sent.append, "generator", 10, loop.Clock(offset=5.0))
    report(2, 0.5, 1e-3)
    report(4, None, 2e-3, {"em": 0.25})
    assert [(p.kind, p.step, p.total_steps, p.loss, p.lr, p.metrics) for p in sent] == [
        ("generator", 2, 10, 0.5, 1e-3, {}), ("generator", 4, 10, None, 2e-3, {"em": 0.25})]
    assert all(p.elapsed_s >= 5.0 for p in sent)
    loop.Reporter(None, "generator", 10, loop.Clock())(1, 0.5, 1e-3)  # no progress: nothing
