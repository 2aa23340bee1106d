"""Domain pre-training: continued causal-LM training of the generator on the corpus text.

Documents (title, newline, text, as every index reads them) are tokenised, joined with the end
token between them and cut into blocks of ``block_size`` tokens (GPT-2/nanoGPT packing: no
padding, a document may span two blocks). Every token carries loss. A seeded share of the
blocks is held out and its loss evaluated every ``eval_steps``; the best checkpoint is saved.
"Don't Stop Pretraining" (Gururangan et al. 2020) measured the gain of such domain-adaptive
pre-training before task fine-tuning; run ``services/trainer/generator.py`` on the result.

Decoder-only models only (an encoder-decoder would need a denoising objective).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from services.evaluation import qa
from services.trainer import loop
from services.trainer.generator import checkpoint_activations, end_token

log = logging.getLogger(__name__)

KIND = "generator-lm"


class LMTrainConfig(BaseModel):
    """A domain pre-training run. ``max_steps`` replaces ``epochs`` when set."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    dev_fraction: float = Field(0.05, ge=0, lt=1, description="blocks held out for dev loss")
    eval_steps: int = Field(100, ge=1)
    log_steps: int = Field(10, ge=1)
    activation_checkpointing: bool = Field(False, description="keep only each layer's input "
                                           "and recompute its activations in the backward "
                                           "pass: less memory for a little more time")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


def pack(token_lists: Sequence[Sequence[int]], block_size: int, end: int) -> torch.Tensor:
    """Documents' token ids joined, each followed by ``end``, cut into (n_blocks, block_size)
    rows; the remainder shorter than a block is dropped. Pure."""
    stream = [t for ids in token_lists for t in (*ids, end)]
    n = len(stream) // block_size
    return torch.tensor(stream[:n * block_size], dtype=torch.long).view(n, block_size)


def causal_lm_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of ``ids`` (batch, T) under ``logits``
    (batch, T, V): position t predicts t + 1 (Radford et al. 2018/2019, GPT)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                             ids[:, 1:].flatten())


@dataclass
class LMTrainResult:
    model_dir: Path
    steps: int
    best_step: int
    best_dev_loss: float | None
    blocks: int
    dev_blocks: int
    tokens_per_s: float
    elapsed_s: float
    report_path: Path


def train_lm(config: LMTrainConfig, model, tokenizer, texts: Sequence[str], run_dir: Path, *,
             progress: loop.ProgressFn | None = None,
             should_stop: Callable[[], bool] | None = None,
             resume: bool = True) -> LMTrainResult:
    """Continue training causal LM ``model`` on ``texts``; the best checkpoint (lowest dev loss;
    the last step without dev blocks) goes to ``run_dir/model`` with meta kind="generator-lm".

    Resumes a state of the same config and data in ``run_dir`` (ValueError otherwise; see
    ``loop.check_resumable``). Raises ValueError for an encoder-decoder model or texts
    too short for one training block; ``loop.Cancelled`` (state saved) when ``should_stop``.
    """
    run_dir = Path(run_dir)
    if qa.is_seq2seq(model):
        raise ValueError("domain pre-training needs a decoder-only (causal) model; "
                         f"{type(model).__name__} is an encoder-decoder")
    loop.seed_everything(config.seed)
    device, amp = loop.pick_device(config.device)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if t.strip()]
    blocks = pack(ids, config.block_size, end_token(model, tokenizer))
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(blocks), generator=gen)
    n_dev = int(len(blocks) * config.dev_fraction)
    dev, train = blocks[order[:n_dev]], blocks[order[n_dev:]]
    if len(train) == 0:
        raise ValueError(f"the texts make {len(blocks)} block(s) of {config.block_size} tokens, "
                         f"{n_dev} of them held out: nothing to train on")
    data = loop.fingerprint([blocks.sum().item(), blocks.shape[0], blocks[:, :8].tolist()])
    per_epoch = math.ceil(len(train) / config.batch_size)
    steps_total = config.max_steps or math.ceil(per_epoch * config.epochs / config.grad_accum)

    if config.activation_checkpointing:
        checkpoint_activations(model)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    autocast = torch.autocast(device.type, dtype=amp,
                              enabled=device.type == "cuda" and amp != torch.float32)
    step, history, best, tokens, train_s = 0, {"train": [], "eval": []}, None, 0, 0.0
    best_step = 0
    clock = loop.Clock()
    state = loop.load_state(run_dir) if resume else None
    if state is not None:
        loop.check_resumable(state, KIND, config, data, run_dir)
        loop.restore_training_state(state, model, optimizer)
        step, history, best, best_step = (state["step"], state["history"], state["best"],
                                          state["best_step"])
        tokens, train_s = state["tokens"], state["train_s"]
        clock = loop.Clock(state["elapsed_s"])

    def snapshot():
        return {"kind": KIND, "config": config.model_dump(mode="json"), "data": data,
                "step": step, **loop.training_state(model, optimizer), "history": history,
                "best": best, "best_step": best_step, "tokens": tokens, "train_s": train_s,
                "elapsed_s": clock.elapsed()}

    def dev_loss() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad(), autocast:
            for start in range(0, len(dev), config.batch_size):
                chunk = dev[start:start + config.batch_size].to(device)
                total += float(causal_lm_nll(model(input_ids=chunk).logits, chunk)) * len(chunk)
        model.train()
        return total / len(dev)

    report = loop.Reporter(progress, KIND, steps_total, clock)
    nonfinite = loop.NonFinite()
    meta = {"kind": KIND, "config": config.model_dump(mode="json"), "data": data,
            "base_model": str(getattr(model.config, "name_or_path", ""))}
    while step < steps_total:
        loop.stop_if_asked(should_stop, run_dir, snapshot)
        started = time.perf_counter()
        # this config has no `schedule`: get_lr's default, cosine
        lr = loop.get_lr(step, lr=config.lr, warmup_steps=config.warmup_steps,
                         total_steps=steps_total, min_ratio=config.min_lr_ratio)
        loop.set_lr(optimizer, lr)
        loss_value = 0.0
        for g in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            epoch, index = divmod(g, per_epoch)
            perm = torch.randperm(len(train),
                                  generator=torch.Generator().manual_seed(config.seed + epoch))
            chunk = train[perm[index * config.batch_size:(index + 1) * config.batch_size]]
            chunk = chunk.to(device)
            with autocast:
                loss = causal_lm_nll(model(input_ids=chunk).logits, chunk) / config.grad_accum
            loss.backward()
            loss_value += float(loss.detach())
            tokens += chunk.numel()
        stepped = loop.optimizer_step([optimizer], [params], config.max_grad_norm, loss_value)
        nonfinite.count(stepped, step + 1, loss_value)
        step += 1
        train_s += time.perf_counter() - started
        history["train"].append({"step": step, "loss": round(loss_value, 5), "lr": lr})
        metrics = {}
        if len(dev) and (step % config.eval_steps == 0 or step == steps_total):
            value = dev_loss()
            metrics = {"dev_loss": round(value, 5)}
            history["eval"].append({"step": step, **metrics})
            if best is None or value < best:
                best, best_step = value, step
                loop.save_model(run_dir, model, tokenizer,
                                {**meta, "step": step, "metrics": metrics,
                                 "history": history["eval"]})
            loop.save_state(run_dir, snapshot())
        if metrics or step % config.log_steps == 0 or step == steps_total:
            report(step, loss_value, lr, metrics)
    if best is None:
        best_step = step
        loop.save_model(run_dir, model, tokenizer, {**meta, "step": step, "metrics": {},
                                                    "history": []})
    if config.activation_checkpointing:
        model.activation_checkpointing_disable()
    elapsed = clock.elapsed()
    report_path, _ = loop.write_report(run_dir, {"history": history, "best_step": best_step,
                                                 "best_dev_loss": best,
                                                 "config": config.model_dump(mode="json")},
                                       "domain pre-training")
    return LMTrainResult(model_dir=run_dir / loop.MODEL_DIR, steps=step, best_step=best_step,
                         best_dev_loss=best, blocks=len(train), dev_blocks=len(dev),
                         tokens_per_s=round(tokens / train_s, 1) if train_s else 0.0,
                         elapsed_s=round(elapsed, 3), report_path=report_path)
