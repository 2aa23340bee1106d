"""Joint RAG training against retriever-then-generator, on the same budget.

    python bench/train_joint.py [--device auto|cpu|cuda] [--variant sequence|token]
                                [--steps N] [--method full|lora] [--activation-checkpointing]
                                [--quick] [--out PATH]

Both arms start from the packaged MiniLM and SmolLM2-135M-Instruct and train on the train
splits of the capital, unanswerable-capital and FanOutQA sets:

- pipeline: the query encoder is fine-tuned first (``services/trainer/retriever.py``, "query"
  mode: documents keep the base vectors) for at most ``--steps`` steps, then the generator
  (``services/trainer/generator.py``) for ``--steps`` steps on prompts retrieved with it;
- joint: ``services/trainer/joint.py`` trains both together for ``--steps`` steps with the
  RAG loss (``--variant``), ``--n-docs`` passages per question, documents fixed.

Same budget for the generators: the same number of optimiser steps over batches of the same
number of questions (the joint arm's generator reads ``n_docs`` one-passage prompts per
question, the pipeline's one three-passage prompt: about the same tokens). The query encoders
differ by design: the pipeline's trains contrastively at 32 questions per step (in-batch
negatives need the larger batch) for one pass over the training questions with a gold
document, cut at ``--steps``; the joint arm's gets the answer loss's gradient at every joint
step. Wall times are reported for both. Each arm is then evaluated as served: hybrid
retrieval with its query encoder over the base document vectors, top 3, greedy decoding
(``services/evaluation/qa.py``) on the test splits, with dense recall@3 of the gold document
beside it.

``--quick`` is for a CPU (~5 minutes): the small corpus and test subsets of
bench/train_generator.py --quick, 2 steps of 2 questions, 2 passages per question. Results go to
bench/results/train_joint[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_generator as tg

from services.evaluation import qa
from services.evaluation.retrieval import corpus_embeddings, dense_search
from services.trainer import loop
from services.trainer.generator import GeneratorTrainConfig, train_generator
from services.trainer.joint import JointTrainConfig, train_joint
from services.trainer.retriever import RetrieverTrainConfig, train_retriever
from shared.models.encoder import Encoder
from shared.settings import Settings

log = logging.getLogger("bench.train_joint")


def load_encoder(settings: Settings, device: torch.device, folder: Path | None = None) -> Encoder:
    """The packaged MiniLM (or a saved query encoder from ``folder``) on ``device``."""
    encoder = Encoder.from_settings(settings)
    if folder is not None:
        encoder = Encoder(AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder),
                          encoder.batch_size, encoder.max_length, encoder.pooling)
    encoder.model.to(device).eval()
    return encoder


def dense_recall(encoder: Encoder, doc_vectors, corpus, test, k: int = tg.TOP_K) -> dict:
    """Share of answerable test questions whose gold document is in the dense top ``k``."""
    out = {}
    for name, items in test.items():
        judged = [i for i in items if i.doc_ids]
        if not judged:
            continue
        hits = dense_search(encoder.encode([i.question for i in judged]), doc_vectors, corpus, k)
        out[name] = round(sum(any(h.doc_id in i.doc_ids for h in row)
                              for i, row in zip(judged, hits, strict=True)) / len(judged), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--variant", default="sequence", choices=["sequence", "token"])
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("--steps", type=tg.count, default=None, help="default 80 (2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per step")
    parser.add_argument("--n-docs", type=int, default=4)
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="the generators recompute activations in the backward pass "
                             "(less memory; both arms, so the budget stays the same)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=Path, default=tg.RESULTS / "cache")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    wall = time.perf_counter()
    settings = Settings()
    device, _ = loop.pick_device(args.device)
    steps = args.steps or (2 if args.quick else 80)
    batch = 2 if args.quick else args.batch_size
    n_docs = 2 if args.quick else args.n_docs
    runs = tg.RESULTS / "runs" / f"joint{'-quick' if args.quick else ''}"
    gen_lr = 1e-4 if args.method == "full" else 5e-4

    data, corpus, in_evidence = tg.load_data(args.quick)
    questions = tg.all_questions(data)
    train = [i for items in data["train"].values() for i in items]
    dev = [i for items in data["dev"].values() for i in items]
    base_encoder = load_encoder(settings, device)
    doc_vectors = corpus_embeddings(base_encoder, corpus, args.cache, progress=True)
    eval_batch = 64 if device.type == "cuda" else 8
    max_new = 24 if args.quick else qa.SERVING_MAX_NEW_TOKENS
    recall = {"base": dense_recall(base_encoder, doc_vectors, corpus, data["test"])}
    arms: dict[str, dict] = {}

    # --- pipeline: retriever, then generator on what it retrieves -----------------------------
    # train_retriever resumes a state it finds; a benchmark starts over.
    shutil.rmtree(runs / "pipeline-retriever", ignore_errors=True)
    started = time.perf_counter()
    # anchor 0: the joint arm's query encoder has no such term either, so the two arms differ
    # in the loss alone (and bench/RESULTS.md's figures were measured so).
    retriever = train_retriever(
        RetrieverTrainConfig(mode="query", batch_size=32 if not args.quick else 8,
                             max_steps=steps, eval_steps=steps, save_steps=steps,
                             warmup_steps=min(10, steps // 4), anchor=0.0),
        base_encoder, train, dev, corpus, runs / "pipeline-retriever", doc_vectors=doc_vectors)
    retriever_s = time.perf_counter() - started
    encoder = load_encoder(settings, device, retriever.model_dir)
    recall["pipeline"] = dense_recall(encoder, doc_vectors, corpus, data["test"])
    with qa.HybridRetriever(encoder, corpus, doc_vectors=doc_vectors) as hybrid:
        passages = qa.retrieve(hybrid, questions, tg.DEPTH)
    model, tokenizer = tg.load_fp32_generator(settings, device)
    started = time.perf_counter()
    generator = train_generator(
        # The joint arm's targets: every not-found question is "I don't know.", and there are
        # no gold-removed copies (its retriever decides which passages a question sees).
        GeneratorTrainConfig(method=args.method, lr=gen_lr, batch_size=batch, max_steps=steps,
                             abstain_fraction=0.0, not_found_fraction=1.0,
                             warmup_steps=min(10, steps // 4), eval_steps=steps,
                             eval_questions=4 if args.quick else 64, patience=None,
                             eval_batch_size=eval_batch, device=args.device,
                             activation_checkpointing=args.activation_checkpointing),
        model, tokenizer, train, dev, passages, runs / "pipeline-generator", resume=False)
    generator_s = time.perf_counter() - started
    metrics, _ = tg.evaluate(model, tokenizer, data["test"], passages, in_evidence, max_new,
                             eval_batch)
    arms["pipeline"] = {"metrics": metrics, "train_s": {"retriever": round(retriever_s, 1),
                                                        "generator": round(generator_s, 1),
                                                        "generator_steps": generator.train_s},
                        "generator_examples_per_s": generator.examples_per_s}
    del model

    # --- joint --------------------------------------------------------------------------------
    encoder = load_encoder(settings, device)
    model, tokenizer = tg.load_fp32_generator(settings, device)
    started = time.perf_counter()
    result = train_joint(
        JointTrainConfig(variant=args.variant, n_docs=n_docs, batch_size=batch, max_steps=steps,
                         warmup_steps=min(10, steps // 4), generator_lr=gen_lr,
                         retriever_lr=2e-5, method=args.method, device=args.device,
                         activation_checkpointing=args.activation_checkpointing,
                         log_steps=max(1, steps // 8)),
        encoder, model, tokenizer, corpus, doc_vectors, train, runs / "joint", resume=False,
        progress=lambda p: log.info("joint step %d/%d loss %.3f gold prior %.3f", p.step,
                                    p.total_steps, p.loss or 0,
                                    p.metrics.get("gold_prior", 0)))
    joint_s = time.perf_counter() - started
    encoder.model.eval()
    recall["joint"] = dense_recall(encoder, doc_vectors, corpus, data["test"])
    with qa.HybridRetriever(encoder, corpus, doc_vectors=doc_vectors) as hybrid:
        passages = qa.retrieve(hybrid, questions, tg.TOP_K)
    metrics, _ = tg.evaluate(model, tokenizer, data["test"], passages, in_evidence, max_new,
                             eval_batch)
    arms["joint"] = {"metrics": metrics, "train_s": {"joint": round(joint_s, 1),
                                                     "joint_steps": result.train_s},
                     "questions_per_s": result.questions_per_s,
                     "gold_prior": [r["gold_prior"] for r in result.history["train"]]}

    print(f"\njoint RAG-{args.variant.capitalize()} vs retriever-then-generator "
          f"({args.method}{', quick' if args.quick else ''}) on {device}: {steps} steps of "
          f"{batch} questions each; joint reads {n_docs} passages per question")
    print(tg.side_by_side({name: arm["metrics"] for name, arm in arms.items()}))
    print(f"\n{'dense recall@3 of the gold document':<40}" + "".join(
        f"{name:>12}" for name in recall))
    for set_name in recall["base"]:
        print(f"{set_name:<40}" + "".join(f"{recall[n].get(set_name, 0):>12.3f}"
                                          for n in recall))
    print(f"\ntraining time: pipeline {retriever_s:.1f} s retriever + {generator_s:.1f} s "
          f"generator; joint {joint_s:.1f} s; wall {time.perf_counter() - wall:.0f} s")
    # the pipeline generator's time includes its dev evaluation and save; the joint run has none
    print(f"steps alone: pipeline generator {generator.train_s:.1f} s, joint "
          f"{result.train_s:.1f} s")
    gold = arms["joint"]["gold_prior"]
    if gold:
        print(f"joint prior mass on the gold document: first step {gold[0]:.3f}, "
              f"last step {gold[-1]:.3f}")
    out = args.out or tg.RESULTS / f"train_joint{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "environment": tg.environment(device), "quick": args.quick, "steps": steps,
        "batch_questions": batch, "n_docs": n_docs, "variant": args.variant,
        "method": args.method, "corpus_documents": len(corpus), "dense_recall@3": recall,
        "arms": arms, "wall_s": round(time.perf_counter() - wall, 1)}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
