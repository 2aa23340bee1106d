"""Trainer loop helpers: the schedule (pure), fingerprints, resumable state, saved models."""

from __future__ import annotations

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
