"""The sparse (BM25) service over its SQLite store, and its tokenizer; no servers needed.

The contract both retrievers keep (filters included) is in test_retriever_contract.py.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.sparse.service import DB_NAME, SparseService
from services.sparse.tokenizer import STOPWORDS, stopword_list, tokenize
from shared.schemas import Document, Filters, IngestBatch, SearchRequest
from shared.settings import Settings, SparseSettings


def ask(service: SparseService, query: str, top_k: int = 5) -> list[str]:
    return [h.doc_id for h in service.search(SearchRequest(query=query, top_k=top_k)).hits]


@pytest.fixture
def sparse(tmp_path, corpus) -> SparseService:
    service = SparseService(tmp_path / "sparse")
    service.ingest(IngestBatch(documents=corpus))
    yield service
    service.close()


# --- BM25 scores, by hand ------------------------------------------------------------------
# Three documents; indexed text is "title\ntext", stop words ("the") dropped:
#   d1 "Cats\nCats chase mice."   -> cats cats chase mice   |d1| = 4
#   d2 "Dogs\nDogs chase cats."   -> dogs dogs chase cats   |d2| = 4
#   d3 "Birds\nThe birds sing."   -> birds birds sing       |d3| = 3
# N = 3, avgdl = 11/3. bm25s' default is method="lucene" (Kamphuis et al. 2020):
#   idf(t)    = ln(1 + (N - df + 0.5) / (df + 0.5))
#   score(d)  = sum over query terms t of idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))
# (no (k1 + 1) factor in the numerator: Lucene dropped it, it does not change the ranking).
THREE = [Document(doc_id="d1", title="Cats", text="Cats chase mice."),
         Document(doc_id="d2", title="Dogs", text="Dogs chase cats."),
         Document(doc_id="d3", title="Birds", text="The birds sing.")]
IDF_DF2 = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # cats, chase: ln 1.6    = 0.470004
IDF_DF1 = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))  # mice:        ln (8/3)  = 0.980829
# k1 = 1.5, b = 0.75, |d| = 4: k1 * (0.25 + 0.75 * 4 / (11/3)) = 1.5 * 47/44 = 1.602273
TF1 = 1 / (1 + 1.5 * 47 / 44)  # tf = 1: 0.384279
TF2 = 2 / (2 + 1.5 * 47 / 44)  # tf = 2: 0.555205


def scores(service: SparseService, query: str) -> dict[str, float]:
    return {h.doc_id: h.score for h in service.search(SearchRequest(query=query, top_k=5)).hits}


@pytest.fixture
def three(tmp_path) -> SparseService:
    service = SparseService(tmp_path / "three")
    service.ingest(IngestBatch(documents=THREE))
    yield service
    service.close()


def test_bm25_scores_match_the_lucene_formula_by_hand(three):
    assert abs(IDF_DF2 - 0.4700036) < 1e-6
    assert abs(IDF_DF1 - 0.9808293) < 1e-6
    cats = scores(three, "cats")
    assert list(cats) == ["d1", "d2"]  # d3 has no "cats": no hit rather than a 0 score
    assert cats["d1"] == pytest.approx(IDF_DF2 * TF2, abs=1e-6)
    assert cats["d1"] == pytest.approx(0.2609484, abs=1e-6)  # 0.470004 * 0.555205
    assert cats["d2"] == pytest.approx(IDF_DF2 * TF1, abs=1e-6)
    assert cats["d2"] == pytest.approx(0.1806127, abs=1e-6)  # 0.470004 * 0.384279
    chase_mice = scores(three, "chase mice")
    assert chase_mice["d1"] == pytest.approx(IDF_DF2 * TF1 + IDF_DF1 * TF1, abs=1e-6)
    assert chase_mice["d1"] == pytest.approx(0.5575253, abs=1e-6)  # 0.180613 + 0.376912
    assert chase_mice["d2"] == pytest.approx(0.1806127, abs=1e-6)
    # Query stop words and case do not count.
    assert scores(three, "The CATS") == cats


def test_bm25_uses_the_configured_k1_and_b(tmp_path):
    # b = 0: no length normalisation, so tf / (tf + k1) with k1 = 1.2.
    settings = Settings(home=tmp_path, sparse=SparseSettings(k1=1.2, b=0.0))
    service = SparseService.from_settings(settings)
    assert (service.k1, service.b) == (1.2, 0.0)
    service.ingest(IngestBatch(documents=THREE))
    cats = scores(service, "cats")
    assert cats["d1"] == pytest.approx(IDF_DF2 * 2 / (2 + 1.2), abs=1e-6)  # 0.293752
    assert cats["d2"] == pytest.approx(IDF_DF2 * 1 / (1 + 1.2), abs=1e-6)  # 0.213638
    service.close()


def test_stop_words_can_be_kept(tmp_path):
    # With "none", "the" is a term (only d3 has it) and counts in |d3|, which becomes 4.
    settings = Settings(home=tmp_path, sparse=SparseSettings(stopwords="none"))
    service = SparseService.from_settings(settings)
    service.ingest(IngestBatch(documents=THREE))
    the = scores(service, "the")
    assert list(the) == ["d3"]
    assert the["d3"] == pytest.approx(IDF_DF1 * 1 / (1 + 1.5 * (0.25 + 0.75 * 4 / 4)), abs=1e-6)
    service.close()


# --- tokenizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, tokens", [
    ("Paris is the capital of France.", ["paris", "capital", "france"]),
    ("Reykjavík REYKJAVIK reykjavik", ["reykjavik"] * 3),  # accents folded, case folded
    ("São Paulo, Zürich; naïve café", ["sao", "paulo", "zurich", "naive", "cafe"]),
    ("Straße", ["strasse"]),  # case folding, not only lower-casing
    ("ﬁnance Ｔｏｋｙｏ", ["finance", "tokyo"]),  # NFKC: ligature, full-width letters
    ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # combining vowel signs stay inside the word
    ("Йогурт и йод", ["йогурт", "и", "йод"]),  # only Latin letters lose accents: й is kept
    # letters with a stroke or ligature, which hold no mark to remove; either case
    ("Łódź ŁÓDŹ Ørsted Đakovo Þórr Ħamrun Diyarbakır", ["lodz", "lodz", "orsted", "dakovo",
                                                       "thorr", "hamrun", "diyarbakir"]),
    ("Æthelstan Œuvre encyclopædia", ["aethelstan", "oeuvre", "encyclopaedia"]),
    ("The C language & World War 2", ["c", "language", "world", "war", "2"]),
    ("?! -- ...", []),
])
def test_tokenize(text, tokens):
    assert tokenize(text, STOPWORDS["en"]) == tokens


def test_tokenize_keeps_stop_words_without_a_list():
    assert tokenize("The Cat") == ["the", "cat"]
    assert tokenize("The Cat", stopword_list("none")) == ["the", "cat"]


def test_unknown_stop_word_list_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown stop-word list 'fr'; known: en, none"):
        SparseService(tmp_path, stopwords="fr")


def test_accented_and_plain_spellings_find_each_other(sparse):
    sparse.ingest(IngestBatch(documents=[
        Document(doc_id="reykjavik", title="Reykjavík", text="Capital of Iceland."),
        Document(doc_id="sao-paulo", title="Sao Paulo", text="Largest city of Brazil."),
    ]))
    assert ask(sparse, "Reykjavik")[:1] == ask(sparse, "reykjavík")[:1] == ["reykjavik"]
    assert ask(sparse, "São Paulo")[:1] == ["sao-paulo"]


def test_letters_with_a_stroke_and_their_plain_spellings_find_each_other(sparse):
    sparse.ingest(IngestBatch(documents=[
        Document(doc_id="lodz", title="Łódź", text="Third-largest city of Poland."),
        Document(doc_id="orsted", title="Hans Christian Orsted", text="Danish physicist."),
    ]))
    assert ask(sparse, "Lodz")[:1] == ask(sparse, "ŁÓDŹ")[:1] == ["lodz"]
    assert ask(sparse, "Ørsted")[:1] == ["orsted"]


# --- ranking -----------------------------------------------------------------------------------
def test_bm25_ranks_the_obvious_document_first(sparse):
    assert ask(sparse, "capital of Japan")[0] == "geo-tokyo"
    assert ask(sparse, "lava eruption")[:1] == ["sci-volcano"]
    # Titles are indexed with the text ("Python" is in both, "programming" only in the title).
    assert ask(sparse, "programming")[:1] == ["tech-python"]


def test_scores_are_positive_and_only_matching_documents_come_back(sparse):
    hits = sparse.search(SearchRequest(query="capital", top_k=10)).hits
    assert sorted(h.doc_id for h in hits) == ["geo-paris", "geo-tokyo"]
    assert all(h.score > 0 for h in hits)


def test_matching_is_case_insensitive(sparse):
    assert ask(sparse, "VOLCANO") == ask(sparse, "volcano") == ["sci-volcano"]


@pytest.mark.parametrize("query", ["the of and is", "zyzzyva", "?!", "a"])
def test_query_without_indexed_tokens_gives_no_hits(sparse, corpus, query):
    result = sparse.search(SearchRequest(query=query, top_k=5))
    assert result.hits == [] and result.count == len(corpus)


def test_documents_survive_a_restart(tmp_path, sparse, corpus):
    before = sparse.search(SearchRequest(query="capital city", top_k=5))
    sparse.close()
    reopened = SparseService(tmp_path / "sparse")
    assert reopened.count() == len(corpus)
    assert reopened.search(SearchRequest(query="capital city", top_k=5)) == before
    reopened.close()


def test_upsert_is_idempotent_and_replaces_by_doc_id(sparse, corpus):
    sparse.ingest(IngestBatch(documents=corpus))
    assert sparse.count() == len(corpus)
    sparse.ingest(IngestBatch(documents=[
        Document(doc_id="food-bread", title="Sourdough", text="Sourdough rises with wild yeast.")
    ]))
    assert sparse.count() == len(corpus)
    assert ask(sparse, "sourdough") == ["food-bread"]
    assert ask(sparse, "flour dough") == []


def test_delete_removes_documents_and_ignores_unknown_ids(sparse, corpus):
    sparse.delete(["geo-tokyo", "never-ingested"])
    assert sparse.count() == len(corpus) - 1
    assert ask(sparse, "capital of Japan") == ["geo-paris"]
    sparse.delete(list(d.doc_id for d in corpus))
    assert sparse.count() == 0
    assert sparse.search(SearchRequest(query="capital", top_k=5)).hits == []


def test_a_second_instance_on_the_same_store_sees_the_writes(tmp_path, sparse):
    # Two replicas sharing one store: each ingest entry reaches only one of them.
    other = SparseService(tmp_path / "sparse")
    assert ask(other, "krill") == []
    sparse.ingest(IngestBatch(documents=[Document(doc_id="krill", title="Krill",
                                                  text="Small crustaceans.")]))
    assert ask(other, "krill") == ["krill"]
    other.delete(["krill"])
    assert ask(sparse, "krill") == []
    other.close()


def test_concurrent_ingest_and_search(sparse, corpus):
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(20):
                if n == 0:
                    sparse.ingest(IngestBatch(documents=[
                        Document(doc_id=f"extra-{i}", title=f"Extra {i}", text="volcano notes")
                    ]))
                else:
                    assert "sci-volcano" in ask(sparse, "volcano lava", top_k=30)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert errors == []
    assert sparse.count() == len(corpus) + 20
    assert len(ask(sparse, "volcano", top_k=50)) == 21


def test_from_settings_stores_under_sparse_dir(tmp_path):
    settings = Settings(home=tmp_path)
    service = SparseService.from_settings(settings)
    assert service.store_dir == settings.sparse_dir
    assert any(settings.sparse_dir.iterdir())
    service.close()


@pytest.mark.parametrize(("k1", "b"), [(-0.1, 0.75), (1.5, 1.5)])
def test_refuses_bad_bm25_parameters(tmp_path, k1, b):
    with pytest.raises(ValueError, match="has to be"):
        SparseService(tmp_path, k1=k1, b=b)


def test_a_document_of_stop_words_only_is_stored_but_never_found(tmp_path):
    service = SparseService(tmp_path)
    service.ingest(IngestBatch(documents=[Document(doc_id="a", title="The", text="a")]))
    assert service.count() == 1
    assert service.search(SearchRequest(query="the a", top_k=3)).hits == []
    service.close()


def test_a_store_from_before_filters_gets_the_new_columns(tmp_path):
    # The schema of the first release: no source, no date.
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.execute("CREATE TABLE docs (doc_id TEXT PRIMARY KEY, title TEXT NOT NULL, "
                   "text TEXT NOT NULL, topic TEXT NOT NULL DEFAULT '')")
        db.execute("INSERT INTO docs VALUES ('old', 'Old', 'An old volcano.', 'Science')")
    db.close()
    service = SparseService(tmp_path)
    assert ask(service, "volcano") == ["old"]
    # It has no date and source until sent again, so those filters leave it out.
    assert service.search(SearchRequest(query="volcano", top_k=3, filters=Filters(
        date_to="2100-01-01"))).hits == []
    service.ingest(IngestBatch(documents=[Document(doc_id="old", title="Old", source="wiki",
                                                   text="An old volcano.", date="2001-02-03")]))
    assert service.search(SearchRequest(query="volcano", top_k=3, filters=Filters(
        source=["wiki"], date_to="2100-01-01"))).hits[0].doc_id == "old"
    service.close()


def test_changing_only_metadata_is_an_update(sparse, corpus):
    dated = corpus[0].model_copy(update={"date": "2020-05-05"})
    only_2020 = Filters(date_from="2020-01-01", date_to="2020-12-31")
    assert sparse.search(SearchRequest(query="Paris", top_k=3, filters=only_2020)).hits == []
    sparse.ingest(IngestBatch(documents=[dated]))
    assert [h.doc_id for h in sparse.search(
        SearchRequest(query="Paris", top_k=3, filters=only_2020)).hits] == ["geo-paris"]
