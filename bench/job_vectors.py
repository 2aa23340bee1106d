"""A training job's corpus vectors: encoded again, or taken from the serving dense index.

    python bench/job_vectors.py [--limit N] [--out PATH]

A job needs one vector per document of its corpus (hard-negative mining, dev recall, the
prompts' retrieval). The baseline encodes every document with the passage encoder
(``corpus_embeddings``, what every job did). ``corpus_vectors`` (services/trainer/jobs.py)
first takes the vectors the serving Milvus collection already holds of documents indexed whole
and unchanged, and encodes only the others (documents split into several passages). Both run
side by side in one process on the first ``--limit`` packaged documents (2,048 by default;
10,033 with ``--limit 0``), indexed first (untimed) into a fresh collection of an embedded
milvus-lite, as ``ragtune up`` indexes them; neither reads or writes a cache. The table gives
each way's seconds, the ratio to the baseline, how many documents it encoded, and the largest
difference of its vectors from the baseline's. It also goes to bench/results/job_vectors.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pymilvus import MilvusClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.embedding.index import DenseIndex
from services.embedding.service import EmbeddingService
from services.evaluation.retrieval import corpus_embeddings
from services.trainer.jobs import indexed_vectors
from shared.datasets import load_corpus
from shared.infra import start_milvus
from shared.models.encoder import Encoder
from shared.schemas import IngestBatch
from shared.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
COLLECTION = "job_vectors_bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2048,
                        help="packaged documents to index and embed (0: the whole corpus)")
    parser.add_argument("--out", type=Path, default=RESULTS / "job_vectors.json")
    args = parser.parse_args()
    if args.limit < 0:
        parser.error(f"--limit must be 0 (the whole corpus) or a positive count, "
                     f"but is {args.limit}")
    logging.basicConfig(level=logging.WARNING)
    corpus = load_corpus()
    docs = corpus[:args.limit] if args.limit > 0 else corpus
    settings = Settings()
    encoder = Encoder.from_settings(settings)
    with tempfile.TemporaryDirectory(prefix="ragtune-job-vectors-") as tmp:
        milvus = start_milvus(Path(tmp) / "milvus")
        try:
            client = MilvusClient(uri=milvus.url)
            dense = EmbeddingService(encoder, DenseIndex(client, COLLECTION, encoder.dim),
                                     settings.embedding.chunk_chars,
                                     settings.embedding.chunk_overlap)
            for start in range(0, len(docs), 256):
                dense.ingest(IngestBatch(documents=docs[start:start + 256]))
            up = settings.model_copy(update={"milvus": settings.milvus.model_copy(
                update={"uri": milvus.url, "collection": COLLECTION})})

            started = time.perf_counter()
            encoded = corpus_embeddings(encoder, docs, None, progress=False)
            baseline_s = time.perf_counter() - started

            started = time.perf_counter()
            known = indexed_vectors(up, encoder, None, docs)()
            taken = corpus_embeddings(encoder, docs, None, progress=False, known=lambda: known)
            taken_s = time.perf_counter() - started
        finally:
            milvus.stop()
    rows = [{"way": "encode every document (baseline)", "seconds": round(baseline_s, 1),
             "ratio": 1.0, "encoded": len(docs), "max_abs_diff": 0.0},
            {"way": "take the indexed vectors", "seconds": round(taken_s, 1),
             "ratio": round(taken_s / baseline_s, 3), "encoded": len(docs) - len(known),
             "max_abs_diff": float(np.abs(taken - encoded).max())}]
    print(f"\njob vectors bench: {len(docs)} packaged documents, {encoder.dim}-d MiniLM, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'way':<34}{'encoded':>9}{'seconds':>9}{'ratio':>8}{'max |diff|':>12}")
    for row in rows:
        print(f"{row['way']:<34}{row['encoded']:>9}{row['seconds']:>9.1f}"
              f"{row['ratio']:>7.3f}x{row['max_abs_diff']:>12.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"documents": len(docs), "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "rows": rows},
                                   indent=2) + "\n")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
