"""Memory and time of one generator training step: full fine-tuning, LoRA, and each with
activation checkpointing, side by side against full fine-tuning without it.

    python bench/train_memory.py [--batch-size N] [--tokens N] [--steps N] [--quick]
                                 [--model PATH] [--out PATH]

Each configuration runs in a fresh process (so its peak resident memory is its own): the
packaged SmolLM2-135M-Instruct (fp32, CPU) takes ``--steps`` optimiser steps (AdamW) of the
loss ``services/trainer/generator.py`` trains with (``target_logprobs`` + ``answer_nll``) on a
batch of ``--batch-size`` prompts of ``--tokens`` random tokens whose last 10 are the target
(memory depends on the shapes, not on the text). Reported per configuration: peak RSS, the
median seconds of the steps after the first, and both as ratios to full fine-tuning without
checkpointing. LoRA is ``LoraOptions``'s (r 16, all linear layers), with dropout 0 (the
default) and 0.05. ``--quick``: 2 prompts of 128 tokens, 2 steps (a pipeline check).
Results: bench/results/train_memory[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# (name, method, LoRA dropout, activation checkpointing); the first is the baseline
CONFIGS = (("full", "full", 0.0, False), ("full + checkpointing", "full", 0.0, True),
           ("lora", "lora", 0.0, False), ("lora + checkpointing", "lora", 0.0, True),
           ("lora, dropout 0.05", "lora", 0.05, False),
           ("lora, dropout 0.05 + checkpointing", "lora", 0.05, True))


def one(model_path: str, method: str, dropout: float, checkpointing: bool, batch_size: int,
        tokens: int, steps: int) -> dict:
    """Run in the child: ``steps`` training steps of one configuration; its peak RSS and
    step times."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer.generator import (
        LoraOptions,
        answer_nll,
        checkpoint_activations,
        target_logprobs,
        with_lora,
    )

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if method == "lora":
        model = with_lora(model, LoraOptions(dropout=dropout))
    if checkpointing:
        checkpoint_activations(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, tokens))
    labels = torch.full_like(ids, -100)
    labels[:, -10:] = ids[:, -10:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        lp, mask = target_logprobs(model, batch, seq2seq=False)
        answer_nll(lp, mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "step_s": statistics.median(times[1:] or times),
            "trained_params": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=700)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="default: the packaged generator")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.tokens, args.steps = 2, 128, 2
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from shared.models.generator import packaged_model_dir
        from shared.settings import Settings

        args.model = str(packaged_model_dir(Settings().model_cache_dir))
    if args.child is not None:
        name, method, dropout, checkpointing = next(c for c in CONFIGS if c[0] == args.child)
        print(json.dumps(one(args.model, method, dropout, checkpointing, args.batch_size,
                             args.tokens, args.steps)))
        return

    rows = {}
    for name, *_ in CONFIGS:
        print(f"{name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--child", name, "--model", args.model,
             "--batch-size", str(args.batch_size), "--tokens", str(args.tokens),
             "--steps", str(args.steps)],
            cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            rows[name] = {"error": (done.stderr.strip().splitlines() or ["killed"])[-1],
                          "returncode": done.returncode}
            continue
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = rows[CONFIGS[0][0]]
    print(f"\none training step of {args.batch_size} prompts x {args.tokens} tokens, "
          f"{args.model}, CPU fp32")
    print(f"{'configuration':<36}{'trained':>12}{'peak GiB':>10}{'x full':>8}{'step s':>8}"
          f"{'x full':>8}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<36}  failed (exit {row['returncode']}): {row['error']}")
            continue
        print(f"{name:<36}{row['trained_params']:>12,}{row['peak_rss_gib']:>10.1f}"
              f"{row['peak_rss_gib'] / base['peak_rss_gib']:>8.2f}{row['step_s']:>8.1f}"
              f"{row['step_s'] / base['step_s']:>8.2f}")
    out = args.out or RESULTS / f"train_memory{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch_size": args.batch_size, "tokens": args.tokens,
                               "steps": args.steps, "model": args.model, "rows": rows},
                              indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
