"""Fusion strategies: how the dense and the sparse ranking become one.

Every strategy has one signature, ``(dense, sparse, k, weight) -> hits``, and is chosen by name
from ``_STRATEGIES`` through ``fuse``, which validates the options once. Each returns every
document of either input once, in descending fused score (ties: ascending doc_id); a document
keeps the title/text of the first list it appears in (dense before sparse). Inputs are never
changed: hits are frozen and copied with their new score.

Raw BM25 scores (unbounded, query-length dependent) and cosine similarities are not comparable,
so weighted fusion first normalises each retriever's scores over its own candidate list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from shared.schemas import Hit

RRF_K = 60  # Cormack, Clarke & Buettcher 2009, "Reciprocal rank fusion outperforms ...": k=60

# Weights tried by ``tune_weight``: 0.0, 0.1, ..., 1.0 (0 = sparse only, 1 = dense only).
WEIGHT_GRID = tuple(i / 10 for i in range(11))

Strategy = Callable[[list[Hit], list[Hit], int, float], list[Hit]]


def _ranked(scores: dict[str, float], first: dict[str, Hit]) -> list[Hit]:
    order = sorted(scores, key=lambda d: (-scores[d], d))
    return [first[d].model_copy(update={"score": scores[d]}) for d in order]


def rrf(rankings: list[list[Hit]], k: int = RRF_K) -> list[Hit]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank(d)), rank from 1.

    Returns every document that appears in any ranking once, with its fused score, in
    descending score order (ties: ascending doc_id). A document keeps the title/text of the
    first ranking it appears in. ``k`` must be >= 1 (raises ValueError).
    """
    if k < 1:
        raise ValueError(f"RRF k has to be a positive integer, but is {k}")
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + 1.0 / (k + rank)
            first.setdefault(hit.doc_id, hit)
    return _ranked(scores, first)


def minmax(scores: Sequence[float]) -> list[float]:
    """Scores mapped linearly onto [0, 1]: min -> 0, max -> 1.

    All-equal scores (one hit included) carry no ordering, only the retriever's choice of
    them, so each maps to 1, the top of the range (see ``weighted`` for the documents absent).
    """
    if not scores:
        return []
    low, high = min(scores), max(scores)
    if high == low:
        return [1.0] * len(scores)
    return [(s - low) / (high - low) for s in scores]


def zscore(scores: Sequence[float]) -> list[float]:
    """Standard scores (s - mean) / std with the population std; all-equal scores map to 0."""
    if not scores:
        return []
    if min(scores) == max(scores):
        # Tested on the scores, not on std: the float mean of equal scores can miss them by
        # an ulp, and a std of 1e-17 would turn every one into -1 or +1.
        return [0.0] * len(scores)
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    if std == 0:
        return [0.0] * len(scores)
    return [(s - mean) / std for s in scores]


def weighted(dense: list[Hit], sparse: list[Hit], weight: float,
             normalise: Callable[[Sequence[float]], list[float]]) -> list[Hit]:
    """score(d) = weight * dense_norm(d) + (1 - weight) * sparse_norm(d).

    Each list is normalised over its own candidates. A document missing from one list gets
    that list's minimum normalised value: it was not among that retriever's top candidates, so
    its score there is at most the lowest one seen; the minimum is the best bound known without
    the unseen scores, and anything higher (0 for z-scores is the list's mean) would reward a
    document for being absent. A list whose scores are all equal (one hit included) tells only
    which documents the retriever chose: its hits normalise to one value (1 for ``minmax``, 0
    for ``zscore``) and a missing document gets one unit less (0, -1), so it never counts as
    much as a hit. A list with no hits gives every document 0 (no information).
    """
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    parts = []
    for hits, w in ((dense, weight), (sparse, 1.0 - weight)):
        raw = [h.score for h in hits]
        normed = normalise(raw)
        parts.append((dict(zip((h.doc_id for h in hits), normed, strict=True)),
                      _absent(raw, normed), w))
        for h in hits:
            first.setdefault(h.doc_id, h)
    for doc_id in first:
        scores[doc_id] = sum(w * normed.get(doc_id, missing) for normed, missing, w in parts)
    return _ranked(scores, first)


def _absent(raw: Sequence[float], normed: Sequence[float]) -> float:
    # The normalised score of a document a list did not return (see ``weighted``).
    if not raw:
        return 0.0
    if min(raw) == max(raw):
        return min(normed) - 1.0  # presence-only: below every hit, not tied with them
    return min(normed)


def _passthrough(hits: list[Hit]) -> list[Hit]:
    # One retriever's own ranking, put in the fused order contract (ties by doc_id).
    return sorted(hits, key=lambda h: (-h.score, h.doc_id))


# --- the table: name -> strategy --------------------------------------------------------------
def _rrf(dense: list[Hit], sparse: list[Hit], k: int, weight: float) -> list[Hit]:
    """RRF over both rankings (Cormack et al. 2009): ranks only, so no normalisation needed."""
    return rrf([dense, sparse], k)


def _weighted_minmax(dense: list[Hit], sparse: list[Hit], k: int, weight: float) -> list[Hit]:
    """Convex combination of min-max normalised scores (Lee, "Analysis of fusion methods",
    1997; Bruch et al. 2023, "An analysis of fusion functions for hybrid retrieval")."""
    return weighted(dense, sparse, weight, minmax)


def _weighted_zscore(dense: list[Hit], sparse: list[Hit], k: int, weight: float) -> list[Hit]:
    """Convex combination of z-scores (Montague & Aslam 2001 "Relevance score normalization";
    Bruch et al. 2023): robust to one outlying top score that squeezes min-max."""
    return weighted(dense, sparse, weight, zscore)


def _dense(dense: list[Hit], sparse: list[Hit], k: int, weight: float) -> list[Hit]:
    """The dense ranking alone: a baseline, and a choice for purely semantic questions."""
    return _passthrough(dense)


def _sparse(dense: list[Hit], sparse: list[Hit], k: int, weight: float) -> list[Hit]:
    """The BM25 ranking alone: a baseline, and a choice for exact keywords and names."""
    return _passthrough(sparse)


_STRATEGIES: dict[str, Strategy] = {
    "rrf": _rrf,
    "weighted_minmax": _weighted_minmax,
    "weighted_zscore": _weighted_zscore,
    "dense": _dense,
    "sparse": _sparse,
}
MODES: tuple[str, ...] = tuple(_STRATEGIES)
# Modes whose ``weight`` matters (``tune_weight`` applies to these only).
WEIGHTED_MODES: tuple[str, ...] = ("weighted_minmax", "weighted_zscore")


def check(mode: str, *, k: int = RRF_K, weight: float = 0.5) -> None:
    """Raise ValueError, naming the bad value, unless ``fuse`` accepts these options.

    ``mode`` one of MODES; ``k`` an integer >= 1; ``weight`` a number in [0, 1]. All three are
    checked whatever the mode, so a bad option never passes silently.
    """
    if mode not in _STRATEGIES:
        raise ValueError(f"unknown fusion mode {mode!r}; known: {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` has to be a positive integer, but is {k!r}")
    _check_weight(weight)


def _check_weight(weight: float) -> None:
    # NaN fails the range test too.
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
        raise ValueError(f"`weight` has to be a number in [0, 1], but is {weight!r}")


def fuse(mode: str, dense: list[Hit], sparse: list[Hit], *, k: int = RRF_K,
         weight: float = 0.5) -> list[Hit]:
    """Fuse a dense and a sparse ranking with the strategy named ``mode`` (one of MODES).

    ``k`` is RRF's constant (used by "rrf"); ``weight`` the dense share of weighted fusion
    (used by "weighted_*": 1 = dense only, 0 = sparse only). Returns every document of either
    input once (only the chosen list's for "dense"/"sparse"), descending score, ties by
    ascending doc_id. Raises ValueError for an unknown mode (listing MODES), ``k`` < 1 or
    ``weight`` outside [0, 1].
    """
    check(mode, k=k, weight=weight)
    return _STRATEGIES[mode](dense, sparse, k, float(weight))


def tune_weight(evaluate: Callable[[float], float],
                grid: Iterable[float] = WEIGHT_GRID, prefer: float = 0.5) -> float:
    """The weight of ``grid`` with the highest ``evaluate(weight)`` (e.g. dev-split nDCG@10).

    Ties go to the weight closest to ``prefer`` (0.5, the least committed one, unless the
    caller has a better prior, e.g. the weight that serves), then to the smaller weight.
    Raises ValueError for an empty grid or a weight outside [0, 1]. Call it on a dev split,
    never on the split you report.
    """
    weights = list(grid)
    if not weights:
        raise ValueError("`grid` has to hold at least one weight, but is empty")
    for w in [*weights, prefer]:
        _check_weight(w)
    scored = [(evaluate(w), w) for w in weights]
    return max(scored, key=lambda sw: (sw[0], -abs(sw[1] - prefer), -sw[1]))[1]
