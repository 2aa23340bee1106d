"""Retrieval evaluation: dense, BM25 and every fusion mode, side by side on the same queries.

``evaluate`` runs in-process on the real retrieval code, without Ray, Redis or Milvus:

- dense: exact cosine search with numpy over ``Encoder`` embeddings (the served Milvus HNSW
  index is checked against exact search by ``bench/retrieval.py``, not here);
- BM25: a ``SparseService`` in a temporary folder, the class the stack serves;
- every mode of ``services.ranker.fusion`` over the top ``candidates`` of each retriever.

The ``weighted_*`` modes get their weight tuned on a tuning split (dev; train when dev is the
split reported) by nDCG@10, never on the split reported. Corpus embeddings are cached as .npy
files keyed by a fingerprint of the model weights, ``max_length``, the pooling and the documents.

The packaged question sets are split by ``shared.datasets.split`` with a seed: a fine-tuned
version has to be evaluated on the split of the seed its training job used, or its test split
holds questions it trained on (``split_seed_for``).

Metrics follow trec_eval / BEIR: a document is relevant when its grade is > 0; recall@k is the
fraction of a query's relevant documents in its top k; MRR@10 the reciprocal rank of the first
relevant document within the top 10 (0 when none); nDCG@10 uses gain = grade and the log2
discount, normalised by the ideal ordering of the query's grades. Scores are means over queries.
A doc id repeated in a ranking counts once, at its first rank (a BEIR run maps each document to
one score; a repeat counted twice would lift nDCG above 1).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.ranker.fusion import MODES, RRF_K, WEIGHTED_MODES, fuse, tune_weight
from services.sparse.service import SparseService
from shared import datasets
from shared.files import atomic_open
from shared.models.encoder import Encoder
from shared.schemas import Document, Hit, IngestBatch, ModelVersion, SearchRequest, titled_text

log = logging.getLogger(__name__)

METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
# The metric that tunes fusion weights (BEIR's headline metric).
TUNING_METRIC = "ndcg@10"
# Row order of the report: the single retrievers first, then the fusions.
ROW_ORDER = ("dense", "sparse", *(m for m in MODES if m not in ("dense", "sparse")))
# The seed that splits the packaged question sets for the packaged models, which no job
# trained (``shared.datasets.split``'s default, and ``ragtune train --seed``'s).
DEFAULT_SPLIT_SEED = 13


# --- metrics ------------------------------------------------------------------------------
def _check(qrels: Mapping[str, int], k: int) -> set[str]:
    if k < 1:
        raise ValueError(f"`k` has to be a positive integer, but is {k}")
    relevant = {doc_id for doc_id, grade in qrels.items() if grade > 0}
    if not relevant:
        raise ValueError("the query has no relevant document (every grade is <= 0)")
    return relevant


def _first_occurrences(ranking: Sequence[str]) -> list[str]:
    # A repeated doc id keeps its first rank only: later copies would be gains counted twice.
    return list(dict.fromkeys(ranking))


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """Fraction of the relevant documents (grade > 0) among the first ``k`` of ``ranking``.

    ``ranking`` holds doc ids, best first (a repeated id counts once, at its first rank, here
    and in every metric below); ``qrels`` maps doc id -> grade. In [0, 1]. Raises ValueError
    for ``k`` < 1 or a query without a relevant document.
    """
    relevant = _check(qrels, k)
    return len(relevant.intersection(_first_occurrences(ranking)[:k])) / len(relevant)


def mrr_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """1 / rank of the first relevant document within the first ``k`` (rank from 1), else 0.

    Ranks are counted after dropping repeated ids (see ``recall_at_k``).
    """
    relevant = _check(qrels, k)
    for rank, doc_id in enumerate(_first_occurrences(ranking)[:k], start=1):
        if doc_id in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """DCG@k / ideal DCG@k with gain = grade and discount 1 / log2(rank + 1), in [0, 1].

    Binary qrels (grade 1) are the special case; negative grades count as 0. Repeated ids
    count once, at their first rank (see ``recall_at_k``), which keeps the value <= 1.
    """
    _check(qrels, k)
    dcg = sum(max(qrels.get(doc_id, 0), 0) / math.log2(rank + 1)
              for rank, doc_id in enumerate(_first_occurrences(ranking)[:k], start=1))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, start=1))
    return dcg / idcg


def score_ranking(ranking: Sequence[str], qrels: Mapping[str, int]) -> dict[str, float]:
    """Every metric of METRICS for one query's ranking (repeated ids count once, first rank)."""
    return {
        "recall@1": recall_at_k(ranking, qrels, 1),
        "recall@5": recall_at_k(ranking, qrels, 5),
        "recall@10": recall_at_k(ranking, qrels, 10),
        "mrr@10": mrr_at_k(ranking, qrels, 10),
        "ndcg@10": ndcg_at_k(ranking, qrels, 10),
    }


# --- data sets ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalSet:
    """A corpus, queries and their relevance judgements, for one split named ``split``.

    ``queries`` maps query id -> text; ``qrels`` maps query id -> {doc_id: grade}. Every query
    has qrels with at least one grade > 0 and vice versa (raises ValueError otherwise). A
    judged doc_id need not be in ``corpus`` (it then only lowers recall, as in BEIR).
    ``split_seed``: the seed that split a packaged set (None: the data came split, as BEIR's).
    """

    name: str
    split: str
    corpus: list[Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split_seed: int | None = None

    def __post_init__(self) -> None:
        if set(self.queries) != set(self.qrels):
            extra = sorted(set(self.queries) ^ set(self.qrels))[:5]
            raise ValueError(f"{self.name}: queries and qrels name different query ids, "
                             f"e.g. {extra}")
        for qid, judged in self.qrels.items():
            if not any(g > 0 for g in judged.values()):
                raise ValueError(f"{self.name}: query {qid!r} has no relevant document")


_PACKAGED: dict[str, Callable[[Sequence[Document]], list[datasets.QAItem]]] = {
    # FanOutQA leaf sub-questions whose evidence page is in the corpus; qrel = that page.
    "fanout": datasets.load_fanout_subquestions,
    # Capital questions whose country article names the capital; qrel = that article.
    "capitals": lambda corpus: [
        item for item in datasets.load_capital_questions(corpus) if item.answerable],
}
# Both question sets together: the packaged data as a whole, the set the default mode is
# chosen for (each item keeps its own split, so this is the union of the two sets' splits).
_PACKAGED["packaged"] = lambda corpus: _PACKAGED["fanout"](corpus) + _PACKAGED["capitals"](corpus)
PACKAGED = tuple(_PACKAGED)


def load_packaged(name: str, splits: Sequence[str] = datasets.SPLITS, *,
                  limit_corpus: int | None = None,
                  seed: int = DEFAULT_SPLIT_SEED) -> dict[str, RetrievalSet]:
    """Packaged question sets on the packaged corpus, by ``shared.datasets.split``'s splits
    with ``seed`` (see ``split_seed_for``).

    ``name`` is one of PACKAGED. With ``limit_corpus`` the corpus is its first N documents and
    only questions whose evidence is among them are kept (splits stay those of the full set:
    an item's split depends on its id and the seed only). Raises ValueError for an unknown name
    or split.
    """
    if name not in _PACKAGED:
        raise ValueError(f"unknown packaged set {name!r}; known: {', '.join(PACKAGED)}")
    _check_splits(splits, datasets.SPLITS)
    corpus = datasets.load_corpus(limit_corpus)
    parts = datasets.split(_PACKAGED[name](corpus), seed=seed)
    return {s: RetrievalSet(name=name, split=s, corpus=corpus,
                            queries={item.id: item.question for item in parts[s]},
                            qrels={item.id: dict.fromkeys(item.doc_ids, 1) for item in parts[s]},
                            split_seed=seed)
            for s in splits}


def split_seed_for(versions: Sequence[ModelVersion | None], seed: int | None = None) -> int:
    """The seed to split the packaged question sets with when evaluating ``versions`` (None
    stands for a packaged base model): ``seed`` when given, else the ``split_seed`` of the
    versions a job trained, else DEFAULT_SPLIT_SEED.

    A version's test split is only unseen under the seed its job split with, so this raises
    ValueError, in one line naming the versions and seeds, when two versions were trained on
    different seeds or ``seed`` differs from a version's.
    """
    seeded = {f"{v.kind} {v.version}": v.split_seed for v in versions
              if v is not None and v.split_seed is not None}
    if seed is not None:
        for name, trained in seeded.items():
            if trained != seed:
                raise ValueError(f"--seed {seed} differs from the seed {trained} that {name} "
                                 f"was trained on: the seed-{seed} test split would contain "
                                 f"{name}'s training questions (leave --seed out to use "
                                 f"{trained})")
        return seed
    for (name, trained), (other, theirs) in itertools.pairwise(seeded.items()):
        if trained != theirs:
            raise ValueError(f"{name} was trained on split seed {trained} and {other} on "
                             f"{theirs}: either seed's test split would contain the other "
                             f"version's training questions; evaluate them apart")
    return next(iter(seeded.values()), DEFAULT_SPLIT_SEED)


def _check_splits(splits: Sequence[str], known: Sequence[str]) -> None:
    for s in splits:
        if s not in known:
            raise ValueError(f"unknown split {s!r}; known: {', '.join(known)}")


def beir_splits(folder: Path) -> list[str]:
    """Splits a BEIR folder has qrels for (the stems of ``qrels/*.tsv``), sorted."""
    return sorted(p.stem for p in (Path(folder) / "qrels").glob("*.tsv"))


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError names file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            yield number, obj


def _field(obj: dict, name: str, path: Path, number: int, *, required: bool = True) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise ValueError(f"{path}:{number}: missing field {name!r}")
        return ""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError(f"{path}:{number}: field {name!r} has to be a string")
    return str(value)


def _read_beir_corpus(path: Path, limit: int | None) -> list[Document]:
    docs: list[Document] = []
    seen: set[str] = set()
    for number, obj in _jsonl(path):
        if limit is not None and len(docs) >= limit:
            break
        doc_id = _field(obj, "_id", path, number)
        title = _field(obj, "title", path, number, required=False).strip()
        text = _field(obj, "text", path, number).strip()
        if doc_id in seen:
            raise ValueError(f"{path}:{number}: _id {doc_id!r} repeats an earlier line")
        if not text and not title:
            raise ValueError(f"{path}:{number}: both title and text are empty")
        seen.add(doc_id)
        # A Document needs a title and a text; many BEIR sets have no titles. The id stands
        # in for a missing title (one token more per document), the title for a missing text.
        try:
            docs.append(Document(doc_id=doc_id, title=title or doc_id, text=text or title,
                                 source=path.parent.name))
        except ValueError as exc:  # pydantic's ValidationError, e.g. an _id over 256 chars
            raise ValueError(f"{path}:{number}: {exc}") from None
    return docs


def _read_beir_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for number, obj in _jsonl(path):
        qid = _field(obj, "_id", path, number)
        text = _field(obj, "text", path, number).strip()
        if not text:
            raise ValueError(f"{path}:{number}: query {qid!r} has an empty text")
        queries[qid] = text
    return queries


_QRELS_HEADER = ("query-id", "corpus-id", "score")


def _read_qrels(path: Path, queries: Mapping[str, str]) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            cells = line.rstrip("\r\n").split("\t")
            if number == 1:
                if tuple(c.strip() for c in cells) != _QRELS_HEADER:
                    raise ValueError(f"{path}:1: expected the header "
                                     f"{'<TAB>'.join(_QRELS_HEADER)!r}, got {line.strip()!r}")
                continue
            if len(cells) != 3:
                raise ValueError(f"{path}:{number}: expected 3 tab-separated fields "
                                 f"(query-id, corpus-id, score), got {len(cells)}")
            qid, doc_id, grade = (c.strip() for c in cells)
            try:
                value = int(grade)
            except ValueError:
                raise ValueError(f"{path}:{number}: score {grade!r} is not an integer") from None
            if qid not in queries:
                raise ValueError(f"{path}:{number}: query-id {qid!r} is not in queries.jsonl")
            qrels.setdefault(qid, {})[doc_id] = value
    return qrels


def load_beir(folder: Path, splits: Sequence[str], *,
              limit_corpus: int | None = None) -> dict[str, RetrievalSet]:
    """A data set in the BEIR folder layout, one RetrievalSet per split, sharing one corpus.

    ``folder`` holds corpus.jsonl (``_id``, ``title``, ``text``), queries.jsonl (``_id``,
    ``text``) and qrels/<split>.tsv (header ``query-id corpus-id score``, tab-separated).
    Only queries with a grade > 0 in the split's qrels are kept. With ``limit_corpus`` the
    corpus is its first N documents, judgements of documents outside it are dropped, and so
    are queries left without a relevant document. Raises FileNotFoundError naming a missing
    file (and the splits present) and ValueError naming file and line of a malformed one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    for s in splits:
        if not (folder / "qrels" / f"{s}.tsv").is_file():
            raise FileNotFoundError(
                f"{folder / 'qrels' / f'{s}.tsv'}: no such file; qrels present for: "
                f"{', '.join(beir_splits(folder)) or 'none'}")
    corpus = _read_beir_corpus(folder / "corpus.jsonl", limit_corpus)
    doc_ids = {d.doc_id for d in corpus}
    queries = _read_beir_queries(folder / "queries.jsonl")
    out = {}
    for s in splits:
        qrels = _read_qrels(folder / "qrels" / f"{s}.tsv", queries)
        if limit_corpus is not None:
            qrels = {qid: {d: g for d, g in judged.items() if d in doc_ids}
                     for qid, judged in qrels.items()}
        qrels = {qid: judged for qid, judged in qrels.items()
                 if any(g > 0 for g in judged.values())}
        missing = sum(d not in doc_ids for judged in qrels.values() for d in judged)
        if missing:
            log.warning("%s: %d judged documents are not in the corpus", s, missing)
        out[s] = RetrievalSet(name=folder.name, split=s, corpus=corpus,
                              queries={qid: queries[qid] for qid in qrels}, qrels=qrels)
    return out


def tuning_split(split: str, available: Sequence[str]) -> str | None:
    """The split to tune on when reporting ``split``: dev, or train when reporting dev.

    None when that split is not available (weights then stay at their default).
    """
    for candidate in ("dev", "train"):
        if candidate != split and candidate in available:
            return candidate
    return None


def load_dataset(dataset: str, split: str, *, limit_corpus: int | None = None,
                 seed: int = DEFAULT_SPLIT_SEED) -> tuple[RetrievalSet, RetrievalSet | None]:
    """(reported set, tuning set or None) for the CLI; see ``tuning_split``.

    ``dataset`` is one of PACKAGED (split with ``seed``) or the path of a BEIR folder (split
    as it comes). Raises ValueError for an unknown name or split and the loaders' errors for
    bad files.
    """
    if dataset in _PACKAGED:
        _check_splits([split], datasets.SPLITS)
        tune = tuning_split(split, datasets.SPLITS)
        sets = load_packaged(dataset, [split, tune], limit_corpus=limit_corpus, seed=seed)
    else:
        folder = Path(dataset)
        if not folder.is_dir():
            raise ValueError(f"unknown data set {dataset!r}: use one of "
                             f"{', '.join(PACKAGED)} or the path of a BEIR folder")
        tune = tuning_split(split, beir_splits(folder))
        sets = load_beir(folder, [split] + ([tune] if tune else []), limit_corpus=limit_corpus)
    return sets[split], sets[tune] if tune else None


# --- retrieval ----------------------------------------------------------------------------
def _model_digest(model) -> str:
    # The weights themselves, so a model fine-tuned and saved under the same path misses the
    # cache; hashing MiniLM's 90 MB takes a fraction of a second.
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def encoder_fingerprint(encoder: Encoder) -> str:
    """Hex key of what makes an encoder's vectors: model name/path and weights, max_length
    and pooling (the same weights pooled by mean or by [CLS] give other vectors)."""
    h = hashlib.sha256()
    h.update(str(getattr(encoder.model.config, "name_or_path", "")).encode())
    h.update(_model_digest(encoder.model).encode())
    h.update(f"max_length={encoder.max_length}\x00pooling={encoder.pooling}".encode())
    return h.hexdigest()[:32]


def embedding_fingerprint(encoder: Encoder, docs: Sequence[Document]) -> str:
    """Hex key of (``encoder_fingerprint``, every doc_id and indexed text)."""
    h = hashlib.sha256()
    h.update(encoder_fingerprint(encoder).encode())
    for doc in docs:
        h.update(f"\x00{doc.doc_id}\x00{titled_text(doc.title, doc.text)}".encode())
    return h.hexdigest()[:32]


def corpus_embeddings(encoder: Encoder, docs: Sequence[Document], cache_dir: Path | None,
                      *, progress: bool = True,
                      known: Callable[[], Mapping[str, np.ndarray]] | None = None) -> np.ndarray:
    """(len(docs), dim) float32 unit rows of each document's ``titled_text``, row i for docs[i].

    Read from ``cache_dir/embeddings-<fingerprint>.npy`` when there, else encoded (with a
    progress bar) and written there; ``cache_dir`` None encodes without caching. ``known``,
    asked only when the cache misses, gives vectors this encoder has already made of some
    documents' ``titled_text`` ({doc_id: vector}, e.g. the dense index's): those rows are
    taken as they are and only the others encoded.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"embeddings-{embedding_fingerprint(encoder, docs)}.npy"
        if path.is_file():
            vectors = np.load(path)
            if vectors.shape == (len(docs), encoder.dim):
                log.info("corpus embeddings read from %s", path)
                return vectors
            log.warning("ignoring %s: shape %s, expected %s", path, vectors.shape,
                        (len(docs), encoder.dim))
    texts = [titled_text(d.title, d.text) for d in docs]
    vectors = np.empty((len(texts), encoder.dim), dtype=np.float32)
    have = dict(known()) if known is not None else {}
    todo = []
    for i, doc in enumerate(docs):
        if doc.doc_id in have:
            vectors[i] = have[doc.doc_id]
        else:
            todo.append(i)
    if have:
        log.info("%d of %d documents' vectors taken as they were, %d to encode",
                 len(docs) - len(todo), len(docs), len(todo))
    # Encoder.encode pads each batch to its longest text; chunks of similar length (sorted by
    # characters) keep that saving while the bar advances chunk by chunk.
    order = sorted(todo, key=lambda i: len(texts[i]))
    chunk = encoder.batch_size * 8
    with tqdm(total=len(order), unit="doc", desc="encoding corpus", disable=not progress) as bar:
        for start in range(0, len(order), chunk):
            rows = order[start:start + chunk]
            vectors[rows] = encoder.encode([texts[i] for i in rows])
            bar.update(len(rows))
    if path is not None:
        with atomic_open(path) as out:  # a concurrent or killed run never reads half a file
            np.save(out, vectors)
        log.info("corpus embeddings cached in %s", path)
    return vectors


def dense_search(query_vectors: np.ndarray, doc_vectors: np.ndarray,
                 docs: Sequence[Document], top_k: int) -> list[list[Hit]]:
    """Exact cosine top ``top_k`` per query (rows are unit vectors): score = dot product.

    Descending score, ties by ascending doc_id (the order the services return).
    """
    id_rank = np.empty(len(docs), dtype=np.int64)
    id_rank[np.argsort([d.doc_id for d in docs], kind="stable")] = np.arange(len(docs))
    kk = min(top_k, len(docs))
    out: list[list[Hit]] = []
    for start in range(0, len(query_vectors), 256):
        scores = query_vectors[start:start + 256] @ doc_vectors.T
        for row in scores:
            if kk == 0:
                out.append([])
                continue
            # Every document scoring at least the k-th best, so ties at the cut sort by id.
            threshold = row[np.argpartition(-row, kk - 1)[kk - 1]]
            cand = np.flatnonzero(row >= threshold)
            best = cand[np.lexsort((id_rank[cand], -row[cand]))][:kk]
            out.append([Hit(doc_id=docs[i].doc_id, title=docs[i].title, text=docs[i].text,
                            score=float(row[i])) for i in best])
    return out


# --- the run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeResult:
    """One row of the report: a mode's mean metrics on the reported split.

    ``weight`` is the dense share used by a weighted mode (None for others), ``k`` RRF's
    constant for "rrf"; ``tuning`` maps each weight tried to its tuning-split nDCG@10.
    ``per_query`` holds each query's nDCG@10, for paired comparisons.
    """

    mode: str
    metrics: dict[str, float]
    weight: float | None = None
    k: int | None = None
    tuning: dict[str, float] | None = None
    per_query: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    dataset: str
    split: str
    tuned_on: str | None
    queries: int
    tuning_queries: int
    documents: int
    candidates: int
    results: list[ModeResult]
    seconds: dict[str, float]
    prefer_weight: float = 0.5  # untuned weight, and where tuning weights tie
    split_seed: int | None = None  # the reported set's (None: the data came split)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The results as a fixed-width text table, one row per mode."""
        tuned = (f"weights tuned on {self.tuned_on} ({self.tuning_queries} queries, "
                 f"{TUNING_METRIC}; ties go to {self.prefer_weight:g})" if self.tuned_on
                 else f"weights not tuned (no tuning split): {self.prefer_weight:g}")
        seed = "" if self.split_seed is None else f" (split seed {self.split_seed})"
        lines = [f"{self.dataset} / {self.split}{seed}: {self.queries} queries, "
                 f"{self.documents} documents, {self.candidates} candidates per retriever; "
                 f"{tuned}",
                 f"{'mode':<17}{'weight':>7}" + "".join(f"{m:>11}" for m in METRICS)]
        for r in self.results:
            weight = "" if r.weight is None else f"{r.weight:.1f}"
            lines.append(f"{r.mode:<17}{weight:>7}"
                         + "".join(f"{r.metrics[m]:>11.3f}" for m in METRICS))
        return "\n".join(lines)


def _mean_scores(rankings: Mapping[str, list[str]], rset: RetrievalSet,
                 ) -> tuple[dict[str, float], dict[str, float]]:
    per_query = {qid: score_ranking(rankings[qid], rset.qrels[qid]) for qid in rset.queries}
    n = max(len(per_query), 1)
    means = {m: sum(s[m] for s in per_query.values()) / n for m in METRICS}
    return means, {qid: s[TUNING_METRIC] for qid, s in per_query.items()}


def evaluate(test: RetrievalSet, tune: RetrievalSet | None, encoder: Encoder, *,
             cache_dir: Path | None, candidates: int = 100, rrf_k: int = RRF_K,
             progress: bool = True, query_encoder: Encoder | None = None,
             prefer_weight: float = 0.5,
             known_vectors: Callable[[], Mapping[str, np.ndarray]] | None = None) -> Report:
    """Every fusion mode on ``test``'s queries, weights tuned on ``tune`` (when given).
    ``encoder`` embeds the documents and, unless ``query_encoder`` is given (a retriever
    fine-tuned on the query side only), the queries. ``prefer_weight``: the weight used
    without a tuning set, and where tuning weights score the same (``tune_weight``'s
    ``prefer``; the CLI passes the serving weight). ``known_vectors``: ``corpus_embeddings``'
    ``known`` (the CLI passes the running dense index's).

    ``test`` and ``tune`` must share one corpus. Each retriever returns its top
    ``candidates`` (>= 10) before fusion; RRF uses ``rrf_k``. A tuning set without queries
    counts as none. Raises ValueError for an empty ``test``, fewer candidates or a tuning set
    on another corpus.
    """
    if not test.queries:
        raise ValueError(f"{test.name} / {test.split}: no query to evaluate")
    if candidates < 10:
        raise ValueError(f"`candidates` has to be at least 10 (the metrics' cut), "
                         f"but is {candidates}")
    if tune is not None and tune.corpus is not test.corpus and tune.corpus != test.corpus:
        raise ValueError("the tuning set has to share the reported set's corpus")
    if tune is not None and not tune.queries:
        log.warning("the tuning split %s has no query: weights stay at %g", tune.split,
                    prefer_weight)
        tune = None
    docs = test.corpus
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    doc_vectors = corpus_embeddings(encoder, docs, cache_dir, progress=progress,
                                    known=known_vectors)
    seconds["corpus_embeddings"] = time.perf_counter() - started

    queries = dict(test.queries)
    if tune is not None:
        queries.update(tune.queries)
    qids = list(queries)
    with tempfile.TemporaryDirectory(prefix="ragtune-eval-") as sparse_dir:
        sparse = SparseService(Path(sparse_dir))
        try:
            started = time.perf_counter()
            sparse.ingest(IngestBatch(documents=list(docs)))
            # The first search builds the BM25 index.
            sparse_hits = [sparse.search(SearchRequest(query=queries[q], top_k=candidates)).hits
                           for q in qids]
            seconds["sparse_index_and_search"] = time.perf_counter() - started
        finally:
            sparse.close()
    started = time.perf_counter()
    query_vectors = (query_encoder or encoder).encode([queries[q] for q in qids])
    dense_hits = dense_search(query_vectors, doc_vectors, docs, candidates)
    seconds["dense_search"] = time.perf_counter() - started
    lists = {q: (d, s) for q, d, s in zip(qids, dense_hits, sparse_hits, strict=True)}

    def rankings(rset: RetrievalSet, mode: str, weight: float) -> dict[str, list[str]]:
        return {q: [h.doc_id for h in fuse(mode, *lists[q], k=rrf_k, weight=weight)[:10]]
                for q in rset.queries}

    started = time.perf_counter()
    results = []
    for mode in ROW_ORDER:
        weight, tuning = None, None
        if mode in WEIGHTED_MODES:
            weight = prefer_weight
            if tune is not None:
                tuning = {}

                def dev_score(w: float, mode: str = mode, tuning: dict = tuning) -> float:
                    score = _mean_scores(rankings(tune, mode, w), tune)[0][TUNING_METRIC]
                    tuning[f"{w:g}"] = score
                    return score

                weight = tune_weight(dev_score, prefer=prefer_weight)
                log.info("%s: weight %.1f (%s %s %.4f)", mode, weight, tune.split,
                         TUNING_METRIC, tuning[f"{weight:g}"])
        means, per_query = _mean_scores(rankings(test, mode,
                                                 prefer_weight if weight is None else weight),
                                        test)
        results.append(ModeResult(mode=mode, metrics=means, weight=weight,
                                  k=rrf_k if mode == "rrf" else None, tuning=tuning,
                                  per_query=per_query))
    seconds["fusion_and_scoring"] = time.perf_counter() - started
    return Report(dataset=test.name, split=test.split, tuned_on=tune.split if tune else None,
                  queries=len(test.queries), tuning_queries=len(tune.queries) if tune else 0,
                  documents=len(docs), candidates=candidates, results=results,
                  seconds={k: round(v, 3) for k, v in seconds.items()},
                  prefer_weight=prefer_weight, split_seed=test.split_seed)
