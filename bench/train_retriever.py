"""Retriever fine-tuning on the packaged data: base MiniLM against the fine-tuned one.

    python bench/train_retriever.py [--device auto] [--mode query|both|all] [--epochs N]
                                    [--max-steps N] [--anchor W] [--seed N [N ...]] [--quick]
                                    [--out PATH] [--cache DIR]

On a GPU the whole run (both modes, full corpus) takes a few minutes at most. On a 2-core CPU,
``--mode query`` takes ~1.5 minutes once the base corpus embeddings are cached (~5 minutes to
make them); "both" re-embeds the corpus at each dev evaluation (~5 minutes each there).

Trains on the train splits of FanOutQA sub-questions and capital questions together (the
model selected by dev MRR@10 over both dev splits), then reports on each test split and on
the answerable hand-written questions (bench/data/handwritten*.jsonl, which no run trains on),
base and fine-tuned side by side: dense recall@1/5, MRR@10, nDCG@10, and the hybrid the stack
serves (weighted_minmax, dense weight 0.9, 100 candidates per retriever; BM25 is the
same for both rows). In "query" mode documents keep the base model's vectors (no re-index);
in "both" mode the corpus is embedded again with the fine-tuned model.

On 2 CPU cores, ``--mode query`` (defaults: 4 epochs = 64 steps of 32 questions, lr 2e-5,
temperature 0.05, 2 hard negatives from BM25 + dense, anchor 1), whole run 52 s with cached
corpus embeddings; dense recall@1, base -> fine-tuned (``--anchor 0`` in brackets):

    fanout (75) .827 -> .893 (.907)    capitals (37) .946 -> .946 (.892)
    handwritten (50) .900 -> .920 (.920)    held out (40) .950 -> .950 (.950)

Measured earlier on one H200, before the anchor and with the capital labels of then (torch
2.11, transformers 5.17; MiniLM carried as fp16 weights and run in fp32 with bf16 autocast for
training), whole run 89 s:

    test split      fanout (75)           capitals (35)
    dense R@1       base .827             base .943
                    query .920 both .933  query .971 both .971
    hybrid R@1      base .840             base .943
                    query .920 both .920  query .971 both 1.00

On fanout the gain holds for questions whose document no training question names (31:
.806 -> .903 query, .935 both), not only for the 44 whose document one does.

With two or more seeds (``--seed 0 1 2``) each mode trains once per seed and the table adds
their uniform weight average (``services/trainer/soup.py``, what a retriever job with
``seeds`` registers) as one more row, with its dev metrics printed.

``--quick`` is for a CPU: the corpus is the documents the questions need plus a seeded
sample (1,000 in all), "query" mode only unless --mode says otherwise, training stops after
30 steps. Numbers from it are not comparable with the full-corpus ones. Results go to
bench/results/train_retriever[-quick].json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.evaluation.retrieval import corpus_embeddings, dense_search, score_ranking
from services.ranker.fusion import fuse
from services.sparse.service import SparseService
from services.trainer import loop
from services.trainer.retriever import RetrieverTrainConfig, dev_metrics, train_retriever
from services.trainer.soup import average_models
from shared.datasets import QAItem, load_corpus, load_qa_jsonl, load_split
from shared.models.encoder import Encoder
from shared.schemas import Document, Hit, IngestBatch, SearchRequest
from shared.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent / "data"
SETS = ("fanout", "capitals")
# Questions no training run reads, of shapes the packaged sets do not have (bench/handwritten.py):
# the answerable ones, each with its gold document, are test sets here too.
HANDWRITTEN = {"handwritten": DATA / "handwritten.jsonl",
               "handwritten-heldout": DATA / "handwritten-heldout.jsonl"}
METRICS = ("recall@1", "recall@5", "mrr@10", "ndcg@10")
CANDIDATES = 100  # the serving default (settings.retrieval.candidates)
QUICK_CORPUS = 1_000
QUICK_STEPS = 30

log = logging.getLogger("bench.train_retriever")


def quick_corpus(corpus: Sequence[Document], items: Sequence[QAItem], size: int,
                 seed: int = 0) -> list[Document]:
    """Every document a question names, then a seeded sample of the rest up to ``size``."""
    needed = {d for item in items for d in item.doc_ids}
    rest = [doc for doc in corpus if doc.doc_id not in needed]
    sample = random.Random(seed).sample(rest, max(0, min(len(rest), size - len(needed))))
    keep = needed | {doc.doc_id for doc in sample}
    return [doc for doc in corpus if doc.doc_id in keep]


def bm25_hits(corpus: Sequence[Document], queries: Sequence[str]) -> list[list[Hit]]:
    with tempfile.TemporaryDirectory(prefix="bench-bm25-") as folder:
        sparse = SparseService(Path(folder))
        try:
            sparse.ingest(IngestBatch(documents=list(corpus)))
            return [sparse.search(SearchRequest(query=q, top_k=CANDIDATES)).hits
                    for q in queries]
        finally:
            sparse.close()


def scores(query_encoder: Encoder, doc_vectors: np.ndarray, corpus: Sequence[Document],
           items: Sequence[QAItem], sparse: Sequence[list[Hit]], weight: float,
           seen_docs: set[str]) -> dict[str, dict[str, float]]:
    """{"dense": metrics, "hybrid": metrics}, means over ``items``; "dense_seen" /
    "dense_unseen": dense recall@1 and count over the questions whose gold document is / is
    not a positive of some training question."""
    dense = dense_search(query_encoder.encode([i.question for i in items]), doc_vectors,
                         corpus, CANDIDATES)
    out = {}
    for name, rankings in (
            ("dense", [[h.doc_id for h in row[:10]] for row in dense]),
            ("hybrid", [[h.doc_id for h in fuse("weighted_minmax", d, s, weight=weight)[:10]]
                        for d, s in zip(dense, sparse, strict=True)])):
        per = [score_ranking(r, dict.fromkeys(i.doc_ids, 1))
               for r, i in zip(rankings, items, strict=True)]
        out[name] = {m: sum(p[m] for p in per) / len(per) for m in METRICS}
        if name == "dense":
            for part, keep in (("seen", True), ("unseen", False)):
                hits = [p["recall@1"] for p, i in zip(per, items, strict=True)
                        if bool(seen_docs.intersection(i.doc_ids)) == keep]
                out[f"dense_{part}"] = {"questions": len(hits),
                                        "recall@1": sum(hits) / len(hits) if hits else 0.0}
    return out


def table(rows: dict[str, dict], test_sizes: dict[str, int]) -> str:
    names = list(rows)
    lines = []
    for set_name in test_sizes:
        lines.append(f"\n{set_name} / test ({test_sizes[set_name]} questions)")
        lines.append(f"{'retriever':<10}{'model':<16}" + "".join(f"{m:>10}" for m in METRICS))
        for kind in ("dense", "hybrid"):
            for name in names:
                values = rows[name][set_name][kind]
                lines.append(f"{kind:<10}{name:<16}"
                             + "".join(f"{values[m]:>10.3f}" for m in METRICS))
        seen, unseen = (rows[names[0]][set_name][f"dense_{p}"] for p in ("seen", "unseen"))
        lines.append(f"dense recall@1 on questions whose document a training question also "
                     f"names ({seen['questions']}) / does not ({unseen['questions']}): "
                     + ", ".join(f"{name} {rows[name][set_name]['dense_seen']['recall@1']:.3f}"
                                 f" / {rows[name][set_name]['dense_unseen']['recall@1']:.3f}"
                                 for name in names))
    return "\n".join(lines)


def load_encoder(model_dir: Path, base: Encoder, device: torch.device) -> Encoder:
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return Encoder(AutoTokenizer.from_pretrained(model_dir), model, base.batch_size,
                   base.max_length, base.pooling)


def train_run(config: RetrieverTrainConfig, base: Encoder, train: Sequence[QAItem],
              dev: Sequence[QAItem], corpus: Sequence[Document], base_vectors: np.ndarray,
              cache: Path, run_dir: Path) -> dict:
    """One fine-tuning run, from the start (``run_dir``'s earlier run, if any, is removed:
    ``train_retriever`` would resume it); what the report keeps of it, with its
    ``model_dir``."""
    shutil.rmtree(run_dir, ignore_errors=True)
    ticks: list[tuple[float, bool]] = []
    t0 = time.perf_counter()
    result = train_retriever(
        config, base, train, dev, corpus, run_dir, doc_vectors=base_vectors, cache_dir=cache,
        progress=lambda p: ticks.append((time.perf_counter(), bool(p.metrics))))
    train_s = time.perf_counter() - t0
    # Step throughput: the intervals between progress reports without an evaluation.
    step_s = [b[0] - a[0] for a, b in zip(ticks, ticks[1:], strict=False) if not b[1]]
    per_s = config.batch_size * len(step_s) / sum(step_s) if step_s else float("nan")
    print(f"{config.mode} seed {config.seed}: {result.steps} steps, {result.examples_seen} "
          f"questions in {train_s:.1f} s (mining and dev evaluations included; training "
          f"steps alone {per_s:.1f} questions/s), best dev MRR@10 "
          f"{result.metrics.get('mrr@10', float('nan')):.3f} at step {result.best_step}")
    return {"model_dir": result.model_dir, "config": config.model_dump(),
            "steps": result.steps, "best_step": result.best_step, "dev_best": result.metrics,
            "dev_history": result.history, "train_s": round(train_s, 1),
            "questions_per_s_steps_only": round(per_s, 1),
            "questions_seen": result.examples_seen, "first_losses": result.losses[:5],
            "last_losses": result.losses[-5:], "skipped_questions": result.skipped}


def reembed(encoder: Encoder, mode: str, corpus: Sequence[Document], base_vectors: np.ndarray,
            record: dict) -> np.ndarray:
    """The document vectors ``encoder`` is served with: the base's in "query" mode, else the
    corpus embedded again (its time goes into ``record``)."""
    if mode == "query":
        return base_vectors
    t0 = time.perf_counter()
    vectors = corpus_embeddings(encoder, corpus, None, progress=False)
    record["reindex_s"] = round(time.perf_counter() - t0, 1)
    print(f"corpus re-embedded in {record['reindex_s']:.1f} s")
    return vectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--mode", default=None, choices=["query", "both", "all"],
                        help="which side to train; 'all' (the default; 'query' with --quick) "
                             "makes one run of each")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="default: the config's")
    parser.add_argument("--hard-negatives", type=int, default=None)
    parser.add_argument("--negatives", default=None, choices=["bm25", "dense", "both"])
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--anchor", type=float, default=None,
                        help="weight of the anchor penalty (default: the config's; 0: none)")
    parser.add_argument("--seed", type=int, nargs="+", default=None,
                        help="default: the config's; two or more: one run per seed, and "
                             "their average (soup) beside them")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_CORPUS} documents, {QUICK_STEPS} steps: for a CPU")
    parser.add_argument("--cache", type=Path, default=None,
                        help="corpus embedding cache (default: <settings.home>/cache)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="training run folders, emptied first (default: a temporary "
                             "folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("bm25s", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()

    settings = Settings()
    device, _ = loop.pick_device(args.device)
    base = Encoder.from_settings(settings)
    # fp32 master weights whatever the checkpoint holds; a GPU takes bigger encode batches.
    base.model.to(device=device, dtype=torch.float32)
    if device.type == "cuda":
        base.batch_size = max(base.batch_size, 256)
    cache = args.cache if args.cache is not None else settings.home / "cache"

    train = [i for s in SETS for i in load_split(s, "train")]
    dev = [i for s in SETS for i in load_split(s, "dev")]
    test = {s: load_split(s, "test") for s in SETS}
    test |= {name: [i for i in load_qa_jsonl(path) if i.doc_ids]
             for name, path in HANDWRITTEN.items()}
    corpus = load_corpus()
    if args.quick:
        corpus = quick_corpus(corpus, train + dev + [i for t in test.values() for i in t],
                              QUICK_CORPUS)
    log.info("corpus %d documents; train %d, dev %d, test %s questions; device %s",
             len(corpus), len(train), len(dev), {s: len(t) for s, t in test.items()}, device)

    t0 = time.perf_counter()
    base_vectors = corpus_embeddings(base, corpus, cache, progress=True)
    timings = {"base_corpus_embeddings_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    sparse = {s: bm25_hits(corpus, [i.question for i in test[s]]) for s in test}
    timings["bm25_s"] = time.perf_counter() - t0
    weight = settings.retrieval.weight
    seen_docs = {d for item in train for d in item.doc_ids}

    rows = {"base": {s: scores(base, base_vectors, corpus, test[s], sparse[s], weight,
                               seen_docs) for s in test}}
    overrides = {k: v for k, v in {"lr": args.lr, "hard_negatives": args.hard_negatives,
                                   "negatives": args.negatives,
                                   "temperature": args.temperature,
                                   "anchor": args.anchor}.items()
                 if v is not None}
    seeds = args.seed or [RetrieverTrainConfig.model_fields["seed"].default]
    max_steps = QUICK_STEPS if args.quick and args.max_steps is None else args.max_steps
    runs = {}
    mode_arg = args.mode or ("query" if args.quick else "all")
    modes = ("query", "both") if mode_arg == "all" else (mode_arg,)
    with tempfile.TemporaryDirectory(prefix="bench-train-retriever-") as tmp:
        run_root = args.run_dir if args.run_dir is not None else Path(tmp)
        for mode in modes:
            folders = []
            for seed in seeds:
                config = RetrieverTrainConfig(
                    mode=mode, epochs=args.epochs, max_steps=max_steps, eval_steps=10,
                    save_steps=10_000, warmup_steps=5, seed=seed, **overrides)
                name = f"fine-tuned:{mode}" if len(seeds) == 1 else f"{mode} seed {seed}"
                result = train_run(config, base, train, dev, corpus, base_vectors, cache,
                                   run_root / (mode if len(seeds) == 1 else f"{mode}-{seed}"))
                folders.append(result["model_dir"])
                tuned = load_encoder(result.pop("model_dir"), base, device)
                vectors = reembed(tuned, mode, corpus, base_vectors, result)
                rows[name] = {s: scores(tuned, vectors, corpus, test[s], sparse[s], weight,
                                        seen_docs) for s in test}
                runs[name] = result
            if len(folders) > 1:
                name = f"{mode} soup"
                soup = load_encoder(average_models(folders, run_root / f"{mode}-soup"), base,
                                    device)
                runs[name] = {"soup_of": seeds}
                vectors = reembed(soup, mode, corpus, base_vectors, runs[name])
                runs[name]["dev"] = dev_metrics(soup, vectors, corpus, dev)
                rows[name] = {s: scores(soup, vectors, corpus, test[s], sparse[s], weight,
                                        seen_docs) for s in test}
                print(f"{name} of seeds {', '.join(map(str, seeds))}: dev MRR@10 "
                      f"{runs[name]['dev']['mrr@10']:.3f}, recall@1 "
                      f"{runs[name]['dev']['recall@1']:.3f}")
    wall = time.perf_counter() - started
    sizes = {s: len(t) for s, t in test.items()}
    print(table(rows, sizes))
    print(f"\nwall time {wall:.1f} s on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    report = {
        "device": str(device), "quick": args.quick, "corpus_documents": len(corpus),
        "train_questions": len(train), "dev_questions": len(dev), "test_questions": sizes,
        "hybrid": {"mode": "weighted_minmax", "weight": weight, "candidates": CANDIDATES},
        "results": rows, "runs": runs, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_s": round(wall, 1),
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers")},
        "python": sys.version.split()[0],
    }
    out = args.out or RESULTS / f"train_retriever{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
