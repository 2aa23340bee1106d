"""Continual learning of the generator over a stream of topics: naive fine-tuning against replay
and EWC (or L2), side by side.

    python bench/continual.py [--quick] [--tiny] [--methods naive,replay,ewc]
                              [--device auto|cpu|cuda] [--steps N] [--lr LR] [--train N]
                              [--test N] [--top-k K] [--train-last-layers N] [--out-dir PATH]

The stream (``services/trainer/continual.py``: ``topic_tasks``): the packaged capital and
FanOutQA questions grouped by the topic of their gold document, four tasks in this order —
Uncategorized; People + Society and social sciences; every other topic; Geography (last: it
holds most questions whose answer the top passage holds, so the newest task carries the most
signal) — each with its train and test items from the shared seed split (13). Training
questions are a seeded sample of those whose top-k passages, as the prompt shows them, hold a
short gold answer (the generator can learn them from its prompt; the rest would be "I don't
know." targets); test questions are such ones first, then the others (outside Geography few
test questions have the answer in the top passage: answer-bearing FanOutQA sub-questions are
rare).

Per method, the packaged SmolLM2-135M-Instruct (fp32) starts from the same weights and is
trained task after task (``run_stream``); after each task it answers every task's test
questions (serving's prompt, top-k passages, greedy): the accuracy matrix R[i][j] (answer
contains the gold), average accuracy (ACC), backward transfer (BWT; forgetting = -BWT) and
forward transfer (FWT, against the untrained model) as GEM defines them. The issue's targets
are printed with PASS/FAIL: forgetting of replay and of the regulariser at most a third of
naive's, and their accuracy on the newest task within 5 points of naive's.

``--quick`` is for a busy 2-core CPU: 8 train and 3 test questions per task, 4 steps per task
of 2 new questions (+2 replayed), lr 3e-4, only the last 4 of SmolLM2's 30 blocks trained
(``train_last_layers``: the backward pass stops there), top 1 passage cut at 300 characters,
16 new tokens. At that size one question is 33 points of a task's accuracy and a few steps
at a high learning rate on the top blocks mostly teach the answer format and damage the
rest: its numbers show that the pipeline runs, not which method wins. The full run (no
``--quick``; a GPU) trains every layer at 5e-5 for 2 epochs of 32 questions per task.
``--tiny`` swaps in a random 2-layer Llama with SmolLM2's tokenizer (seconds; it learns nothing
of the real questions). Retrieval results come from bench/results/cache (the passages file
bench/train_generator.py writes; computed with the packaged MiniLM when absent). Results:
bench/results/continual[-quick][-tiny].{json,txt,png}.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_generator as tg

from services.trainer import continual as cl
from services.trainer import loop
from services.trainer.generator import answer_target
from shared.datasets import QAItem
from shared.prompt import NO_ANSWER, cut_hit
from shared.schemas import Document, Hit
from shared.settings import Settings

log = logging.getLogger("bench.continual")

RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("capitals", "fanout")
# Geography last: it holds most of the questions whose answer the top passage holds (capitals),
# so the newest task is the one with the most signal; the others come first to be forgotten.
GROUPS = (("Uncategorized",), ("People", "Society and social sciences"), (cl.OTHER_TOPICS,),
          ("Geography",))
REGULARISERS = ("ewc", "l2", "replay+ewc")


def learnable(item: QAItem, hits: Sequence[Hit], tokenizer, top_k: int, max_chars: int,
              max_answer_tokens: int) -> bool:
    """Whether the item's first ``top_k`` passages, cut to ``max_chars`` as the prompt shows
    them, hold a gold answer whose target ("<answer> [n]") fits ``max_answer_tokens``."""
    shown = [cut_hit(h, max_chars) for h in hits[:top_k]]
    target = answer_target(item, shown)
    return target != NO_ANSWER and len(
        tokenizer(target, add_special_tokens=False)["input_ids"]) <= max_answer_tokens


def stream(data: Mapping[str, Mapping[str, list[QAItem]]], corpus: Sequence[Document],
           passages: Mapping[str, Sequence[Hit]], tokenizer, *, top_k: int, max_chars: int,
           n_train: int, n_test: int, max_answer_tokens: int, seed: int = 0,
           ) -> list[cl.Task]:
    """The four topic tasks: a seeded sample of ``n_train`` learnable train items, and
    ``n_test`` test items — learnable ones first (seeded order), then the others (few test
    questions outside Geography have their answer in the top passage: the answer-bearing
    FanOutQA sub-questions are rare)."""
    splits = {split: [i for name in SETS for i in data[split][name]] for split in ("train",
                                                                                 "test")}
    tasks = []
    for task in cl.topic_tasks(splits, corpus, GROUPS):

        def ok(item: QAItem) -> bool:
            return learnable(item, passages[item.question], tokenizer, top_k, max_chars,
                             max_answer_tokens)

        train = [i for i in task.train if ok(i)]
        if not train:
            raise ValueError(f"task {task.name!r} has no learnable train question")
        # One generator per split: the test sample does not depend on --train.
        train = random.Random(f"{seed}:{task.name}:train").sample(train,
                                                                   min(n_train, len(train)))
        rng = random.Random(f"{seed}:{task.name}:test")
        good = [i for i in task.test if ok(i)]
        rest = [i for i in task.test if not ok(i)]
        test = (rng.sample(good, len(good)) + rng.sample(rest, len(rest)))[:n_test]
        tasks.append(cl.Task(task.name, task.topics, train, test))
    return tasks


def tiny_generator(settings: Settings):
    """A random 2-layer Llama with the packaged SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shared.models.generator import packaged_model_dir

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir(settings.model_cache_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config), tokenizer


def targets(results: Mapping[str, cl.StreamResult]) -> dict[str, dict]:
    """The issue's targets for each non-naive method, with the values and PASS/FAIL; a
    forgetting target is not measurable (None) when naive does not forget."""
    naive = results["naive"].metrics
    naive_forgetting = max(0.0, -(naive.bwt or 0.0))
    out = {}
    for method, result in results.items():
        if method == "naive":
            continue
        m = result.metrics
        forgetting = max(0.0, -(m.bwt or 0.0))
        out[f"{method}: forgetting <= naive's / 3"] = {
            "value": forgetting, "naive": naive_forgetting,
            "pass": None if naive_forgetting == 0 else forgetting <= naive_forgetting / 3 + 1e-9}
        out[f"{method}: newest-task accuracy within 0.05 of naive's"] = {
            "value": m.newest, "naive": naive.newest,
            "pass": m.newest >= naive.newest - 0.05 - 1e-9}
    return out


def print_targets(checks: Mapping[str, dict]) -> None:
    """One line per target of ``targets``: PASS / FAIL / n/a, the value and naive's."""
    for name, check in checks.items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[check["pass"]]
        print(f"  {verdict}  {name}: {check['value']:.3f} (naive {check['naive']:.3f})")


def task_records(tasks: Sequence[cl.Task]) -> list[dict]:
    """The stream's tasks for the JSON report: name, topics, train and test item ids."""
    return [{"name": t.name, "topics": list(t.topics), "train": [i.id for i in t.train],
             "test": [i.id for i in t.test]} for t in tasks]


def parse_methods(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """``--methods``: comma-separated names of ``cl.METHODS``, naive first (the baseline the
    targets compare with); a parser error otherwise."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in cl.METHODS]
    if unknown or not methods or methods[0] != "naive":
        parser.error(f"--methods has to start with naive and name known methods "
                     f"({', '.join(cl.METHODS)}), but is {text!r}")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama instead "
                        "of SmolLM2 (checks the pipeline only)")
    parser.add_argument("--methods", default="naive,replay,ewc",
                        help=f"comma-separated, naive first; known: {', '.join(cl.METHODS)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--train", type=tg.count, default=None, help="train questions per task")
    parser.add_argument("--test", type=tg.count, default=None, help="test questions per task")
    parser.add_argument("--steps", type=tg.count, default=None, help="steps per task")
    parser.add_argument("--batch-size", type=tg.count, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--max-passage-chars", type=int, default=300)
    parser.add_argument("--train-last-layers", type=tg.count, default=None)
    parser.add_argument("--replay-ratio", type=float, default=0.5)
    parser.add_argument("--penalty-strength", type=float, default=10.0)
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    methods = parse_methods(parser, args.methods)
    wall = time.perf_counter()
    settings = Settings()
    device, _ = loop.pick_device(args.device)
    quick = args.quick

    data, corpus, _ = tg.load_data(False)
    passages = tg.cached_passages(tg.all_questions(data), corpus, settings, args.cache)
    started = time.perf_counter()
    if args.tiny:
        model, tokenizer = tiny_generator(settings)
        model.to(device)
    else:
        model, tokenizer = tg.load_fp32_generator(settings, device)
    load_s = time.perf_counter() - started
    max_answer_tokens = 16
    tasks = stream(data, corpus, passages, tokenizer, top_k=args.top_k,
                   max_chars=args.max_passage_chars, n_train=args.train or (8 if quick else 32),
                   n_test=args.test or (3 if quick else 24),
                   max_answer_tokens=max_answer_tokens)
    log.info("tasks: %s", [(t.name, len(t.train), len(t.test)) for t in tasks])

    base = {
        "lr": args.lr or (3e-4 if quick else 5e-5),
        "batch_size": args.batch_size or (2 if quick else 8),
        "steps_per_task": args.steps or (4 if quick else None), "epochs": 1 if quick else 2,
        "warmup_steps": 0, "schedule": "constant", "replay_ratio": args.replay_ratio,
        "penalty_strength": args.penalty_strength, "fisher_examples": 3 if quick else 32,
        "train_last_layers": args.train_last_layers or (4 if quick and not args.tiny else None),
        "top_k": args.top_k, "max_passage_chars": args.max_passage_chars,
        "max_answer_tokens": max_answer_tokens, "max_seq_len": 1024,
        "eval_max_new_tokens": 16 if quick else 24,
        "eval_batch_size": 64 if device.type == "cuda" else 16, "device": args.device,
        "seed": 0}
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = cl.ContinualConfig(**{**base, "method": methods[0]})
    started = time.perf_counter()
    baseline_recs = [cl.records(t.test, passages, first.top_k) for t in tasks]
    scores = [cl.answer_accuracy(model, tokenizer, recs, first) for recs in baseline_recs]
    baseline = [sum(s) / len(s) for s in scores]
    log.info("baseline %s in %.0f s", [round(b, 3) for b in baseline],
             time.perf_counter() - started)

    results: dict[str, cl.StreamResult] = {}
    for method in methods:
        model.load_state_dict(initial)
        config = cl.ContinualConfig(**{**base, "method": method})
        results[method] = cl.run_stream(
            config, model, tokenizer, tasks, passages, baseline=baseline,
            progress=lambda p, m=method: log.info("%s step %d/%d loss %.3f", m, p.step,
                                                  p.total_steps, p.loss or 0))
        log.info("%s done: %s", method, results[method].metrics)

    checks = targets(results)
    stem = "continual" + ("-quick" if quick else "") + ("-tiny" if args.tiny else "")
    name = "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct"
    print(f"\ncontinual learning, {len(tasks)} tasks, {name} on {device}"
          f"{', quick' if quick else ''}")
    print(cl.stream_table(list(results.values())))
    print_targets(checks)
    total = time.perf_counter() - wall
    print(f"wall {total:.0f} s (model load {load_s:.0f} s)")
    paths = cl.write_stream_report(
        args.out_dir, list(results.values()),
        {"environment": tg.environment(device), "quick": quick, "tiny": args.tiny,
         "tasks": task_records(tasks), "targets": checks, "wall_s": round(total, 1)},
        stem=stem)
    print("results: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
