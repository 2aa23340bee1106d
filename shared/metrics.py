"""Answer quality metrics (SQuAD-style normalisation), used by benchmarks and evaluation.

All functions take a prediction string and a list of acceptable gold answers and return the
best score over the golds, in [0, 1].
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "\u2019\u2018\u201c\u201d")


def normalize(text: str) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse whitespace."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _ARTICLES.sub(" ", text.translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    pred = normalize(prediction)
    return float(any(pred == normalize(g) for g in golds))


def contains(prediction: str, golds: list[str]) -> float:
    """1.0 when a gold answer occurs in the prediction as whole words (after normalising)."""
    pred = f" {normalize(prediction)} "
    return float(any(normalize(g) and f" {normalize(g)} " in pred for g in golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    pred = normalize(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
