"""Hard negatives for retriever training: documents a retriever ranks high for a question that
are not its answer.

Random in-batch negatives are mostly easy (a question about Paris against a passage about
whales); the passages that teach a bi-encoder most are the ones it, or BM25, already confuses
with the answer (Karpukhin et al. 2020, DPR, section 3.2: one BM25 negative per question added
several points of top-20 accuracy; Xiong et al. 2021, ANCE: negatives from the dense index
itself). Mining is two steps:

- ``candidate_rankings`` (impure): each source's top documents per question — BM25 through the
  served ``SparseService`` in a temporary folder, dense through exact cosine search over corpus
  embeddings, as ``services/evaluation/retrieval.py`` does;
- ``mine_hard_negatives`` (pure): merge those rankings per question, drop the known positives
  and every document that contains a gold answer, keep the best ``depth``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from services.evaluation.retrieval import dense_search
from services.sparse.service import SparseService
from shared.datasets import QAItem, answer_in_evidence
from shared.models.encoder import Encoder
from shared.schemas import Document, IngestBatch, SearchRequest, titled_text

log = logging.getLogger(__name__)

NegativeSource = Literal["bm25", "dense", "both"]
NEGATIVE_SOURCES: tuple[str, ...] = ("bm25", "dense", "both")

# A ranking per source: source -> item id -> doc ids, best first.
Rankings = Mapping[str, Mapping[str, Sequence[str]]]


def _sources(negatives: str) -> tuple[str, ...]:
    if negatives not in NEGATIVE_SOURCES:
        raise ValueError(f"unknown negative source {negatives!r}; "
                         f"known: {', '.join(NEGATIVE_SOURCES)}")
    return ("bm25", "dense") if negatives == "both" else (negatives,)


def mine_hard_negatives(items: Sequence[QAItem], rankings: Rankings,
                        corpus_by_id: Mapping[str, Document], *, depth: int,
                        ) -> dict[str, list[str]]:
    """Hard-negative doc ids per item id, best first, at most ``depth`` each. Pure.

    ``rankings`` maps each source ("bm25", "dense") to item id -> doc ids, best first. The
    sources are interleaved rank by rank (bm25 #1, dense #1, bm25 #2, ...; a document seen
    before is skipped), so neither retriever's confusions crowd out the other's. Dropped:
    the item's ``doc_ids``, ids not in ``corpus_by_id``, and every document whose title or text
    (``titled_text``, what the retriever embeds) contains one of the item's answers as whole
    words (case-insensitive; yes/no answers never count), so a page titled "Jade City" is no
    negative for the answer "Jade City" though its text never repeats the name.
    That last rule avoids *false* negatives: the labels name one evidence page, but the
    question "What is the capital of China?" is answered just as well by the article on
    Beijing; pushing such a passage away teaches the model to bury correct answers (Qu et al.
    2021, RocketQA, found about 70% of top-ranked "negatives" in MS MARCO were unlabelled
    positives). The rule uses ``shared.datasets.answer_in_evidence`` (on the titled text), the
    test that decides whether a question is grounded, so "4" does not match "1964" and
    "Democrat" does not match "Democratic". Items without a ranking get an empty list. Raises
    ValueError for ``depth`` < 0.
    """
    if depth < 0:
        raise ValueError(f"`depth` has to be >= 0, but is {depth}")
    out: dict[str, list[str]] = {}
    for item in items:
        lists = [rankings[source].get(item.id, ()) for source in sorted(rankings)]
        excluded = set(item.doc_ids)
        chosen: list[str] = []
        for rank in range(max((len(r) for r in lists), default=0)):
            if len(chosen) >= depth:
                break
            for ranking in lists:
                if rank >= len(ranking) or len(chosen) >= depth:
                    continue
                doc_id = ranking[rank]
                if doc_id in excluded or doc_id not in corpus_by_id:
                    continue
                excluded.add(doc_id)
                doc = corpus_by_id[doc_id]
                seen = doc.model_copy(update={"text": titled_text(doc.title, doc.text)})
                if answer_in_evidence(replace(item, doc_ids=[doc_id]), {doc_id: seen}):
                    continue
                chosen.append(doc_id)
        out[item.id] = chosen
    return out


def candidate_rankings(items: Sequence[QAItem], corpus: Sequence[Document], negatives: str, *,
                       top_k: int, encoder: Encoder | None = None,
                       doc_vectors: np.ndarray | None = None) -> dict[str, dict[str, list[str]]]:
    """Each asked-for source's top ``top_k`` doc ids per item id (see ``mine_hard_negatives``).

    ``negatives`` is "bm25", "dense" or "both". BM25 indexes ``corpus`` in a temporary
    ``SparseService`` (the served class, its default BM25 settings); dense encodes the
    questions with ``encoder`` and searches ``doc_vectors`` (rows = ``corpus``, unit vectors,
    e.g. ``corpus_embeddings``), both needed for a dense source (ValueError otherwise).
    """
    sources = _sources(negatives)
    out: dict[str, dict[str, list[str]]] = {}
    if "bm25" in sources:
        with tempfile.TemporaryDirectory(prefix="ragtune-mining-") as folder:
            sparse = SparseService(Path(folder))
            try:
                sparse.ingest(IngestBatch(documents=list(corpus)))
                out["bm25"] = {
                    item.id: [h.doc_id for h in sparse.search(
                        SearchRequest(query=item.question, top_k=top_k)).hits]
                    for item in items}
            finally:
                sparse.close()
    if "dense" in sources:
        if encoder is None or doc_vectors is None:
            raise ValueError("dense negatives need an `encoder` and the corpus `doc_vectors`")
        hits = dense_search(encoder.encode([item.question for item in items]), doc_vectors,
                            corpus, top_k)
        out["dense"] = {item.id: [h.doc_id for h in row]
                        for item, row in zip(items, hits, strict=True)}
    return out
