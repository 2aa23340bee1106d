"""Ingestion speed by documents per ``rag:ingest`` entry, side by side in one process.

    python bench/ingest.py [--limit N] [--sizes 32,128,256] [--out PATH]

Each entry is one ``IngestBatch`` that the embedding and the sparse services index as their
bus workers do: ``EmbeddingService.ingest`` (passages, MiniLM, upsert into Milvus on an
embedded milvus-lite) then ``SparseService.ingest`` (the BM25 store). An entry's passages are
encoded together, sorted by length and cut into the encoder's batches (``embedding.batch_size``,
32), so a small entry pads every text to the longest of its few, and a larger one sorts more
texts and pads less. Every size indexes the first ``--limit`` packaged documents (2,048 by
default; 10,033 with ``--limit 0``) into its own fresh collection and store; the first size
is the baseline of the ratio column (32: ``limits.ingest_batch`` before it became 128). One
untimed encoder batch runs first.
The table also goes to bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from pymilvus import MilvusClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.embedding.index import DenseIndex
from services.embedding.service import EmbeddingService
from services.sparse.service import SparseService
from shared.datasets import load_corpus
from shared.infra import start_milvus
from shared.models.encoder import Encoder
from shared.schemas import IngestBatch, titled_text
from shared.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"


def sizes_arg(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, but are {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2048,
                        help="documents to index per size (0: the whole corpus)")
    parser.add_argument("--sizes", type=sizes_arg, default=[32, 128, 256],
                        help="documents per entry, comma-separated; the first is the baseline")
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    args = parser.parse_args()
    if args.limit < 0:
        parser.error(f"--limit must be 0 (the whole corpus) or a positive count, "
                     f"but is {args.limit}")
    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    corpus = load_corpus()
    documents = corpus[:args.limit] if args.limit > 0 else corpus
    encoder = Encoder.from_settings(settings)
    # one untimed batch first, so the first size does not also pay for torch's warm-up
    encoder.encode([titled_text(d.title, d.text) for d in documents[:encoder.batch_size]])
    rows = []
    with tempfile.TemporaryDirectory(prefix="ragtune-ingest-") as tmp:
        milvus = start_milvus(Path(tmp) / "milvus")
        try:
            client = MilvusClient(uri=milvus.url)
            for n, size in enumerate(args.sizes):
                index = DenseIndex(client, f"ingest_bench_{n}", encoder.dim)
                dense = EmbeddingService(encoder, index, settings.embedding.chunk_chars,
                                         settings.embedding.chunk_overlap)
                sparse = SparseService(Path(tmp) / f"sparse-{n}")
                batches = [IngestBatch(documents=documents[i:i + size])
                           for i in range(0, len(documents), size)]
                started = time.perf_counter()
                for batch in batches:
                    dense.ingest(batch)
                    sparse.ingest(batch)
                seconds = time.perf_counter() - started
                if dense.count() != len(documents) or sparse.count() != len(documents):
                    raise RuntimeError(f"size {size}: {dense.count()} dense and "
                                       f"{sparse.count()} sparse documents indexed, expected "
                                       f"{len(documents)}")
                sparse.close()
                rows.append({"docs_per_entry": size, "entries": len(batches),
                             "seconds": round(seconds, 1),
                             "docs_per_s": round(len(documents) / seconds, 1)})
        finally:
            milvus.stop()
    base = rows[0]["docs_per_s"]
    print(f"\ningest bench: {len(documents)} packaged documents, {encoder.dim}-d MiniLM, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio against "
          f"{rows[0]['docs_per_entry']} documents per entry")
    print(f"{'docs/entry':>10}{'entries':>9}{'seconds':>9}{'docs/s':>9}{'ratio':>7}"
          f"{'whole corpus, min':>19}")
    for row in rows:
        minutes = len(corpus) / row["docs_per_s"] / 60
        print(f"{row['docs_per_entry']:>10}{row['entries']:>9}{row['seconds']:>9.1f}"
              f"{row['docs_per_s']:>9.1f}{row['docs_per_s'] / base:>6.2f}x{minutes:>19.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"documents": len(documents), "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "rows": rows},
                                   indent=2) + "\n")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
