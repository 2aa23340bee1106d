"""BM25 tokenisation: one function, used for documents and queries alike.

``tokenize(text)``: NFKC-normalise and case-fold, fold accents off Latin letters, split into
runs of Unicode word characters, drop stop words. So "Reykjavík", "REYKJAVIK" and
"reykjavik" are the one token ``reykjavik``; "ﬁnance" (ligature) is ``finance``; "Straße"
is ``strasse``; "Łódź" and "Ørsted" are ``lodz`` and ``orsted``; "हिन्दी" stays one token.

Why fold accents: queries are mostly typed without diacritics ("Sao Paulo", "Zurich") while
the encyclopaedic corpus keeps them, and in an English-first corpus the words that folding
merges (Spanish "año"/"ano", German "schön"/"schon") are far rarer than those misses. Only
Latin letters are folded (as Lucene's ASCIIFoldingFilter does): Cyrillic "й" stays apart from
"и", and the vowel signs of Indic scripts, which are combining marks too, are kept.

Why the ``regex`` package: the standard ``re``'s ``\\w`` leaves out combining marks, so it
would cut "हिन्दी" into four pieces; ``regex``'s ``\\w`` is Unicode's word class (letters,
marks, digits, connector punctuation, joiners). Every token counts, one character long too
("C", "2" in "World War 2"). Scripts written without spaces (Chinese, Japanese, Thai) come
out as one token per run of text: this is a tokenizer for space-separated languages.
"""

from __future__ import annotations

import re
import unicodedata

import regex
from bm25s.stopwords import STOPWORDS_EN

# Stop-word lists by the name settings use (SparseSettings.stopwords). "en" is Lucene's
# EnglishAnalyzer list, as bm25s ships it (33 words).
STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset(STOPWORDS_EN),
    "none": frozenset(),
}

_WORD = regex.compile(r"\w+")
# Same tokens as _WORD on ASCII text, and about twice as fast: most documents take this path.
_ASCII_WORD = re.compile(r"\w+", re.ASCII)
_LATIN_MARKS = regex.compile(r"(?<=\p{Script=Latin})\p{Mn}+")
# Latin letters whose stroke, bar or ligature is part of the letter, so removing marks leaves
# them: folded as Lucene's ASCIIFoldingFilter folds them ("Łódź" ~ "Lodz", "Ørsted" ~
# "Orsted"). Lower case only, as they are looked up after case folding (which already makes
# "ß" "ss").
_LATIN_LETTERS = str.maketrans({
    "æ": "ae", "ð": "d", "đ": "d", "ħ": "h", "ı": "i", "ł": "l", "ø": "o", "œ": "oe",
    "þ": "th", "ŧ": "t",
})


def stopword_list(name: str) -> frozenset[str]:
    """The stop words called ``name``; ValueError listing the known names otherwise."""
    try:
        return STOPWORDS[name]
    except KeyError:
        raise ValueError(f"unknown stop-word list {name!r}; known: "
                         f"{', '.join(STOPWORDS)}") from None


def normalize(text: str) -> str:
    """NFKC, case-folded, with the accents of Latin letters removed and the letters with a
    built-in stroke or ligature folded to ASCII (then NFC again)."""
    if text.isascii():
        return text.lower()  # NFKC and casefold change nothing else in ASCII
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _LATIN_MARKS.sub("", unicodedata.normalize("NFD", text)).translate(_LATIN_LETTERS)
    return unicodedata.normalize("NFC", text)


def tokenize(text: str, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """The tokens of ``text`` in order (repeats kept), without those in ``stopwords``.

    Stop words are matched after normalisation, so "The" and "THE" are both "the".
    """
    text = normalize(text)
    words = (_ASCII_WORD if text.isascii() else _WORD).findall(text)
    if not stopwords:
        return words
    return [word for word in words if word not in stopwords]
