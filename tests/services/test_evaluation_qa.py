"""Offline QA evaluation: scoring (pure), prompts identical to serving's, batched greedy
decoding equal to one-at-a-time decoding, hybrid retrieval over a tiny corpus with the packaged
MiniLM, and one end-to-end run whose generator is a fake that answers from the prompt it is
given (so every stage but the neural generator is the real one). Also bench/qa.py's scoring of
served answers, and the UTF-8 of the files these write and read."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.evaluation import qa
from shared.datasets import QAItem
from shared.prompt import NO_ANSWER, build_messages
from shared.schemas import Hit
from tests.tiny import bpe_tokenizer, tiny_llama, tiny_t5

ROOT = Path(__file__).resolve().parents[2]
PARIS = Hit(doc_id="geo-paris", title="Paris", text="Paris is the capital of France.", score=1)
TOKYO = Hit(doc_id="geo-tokyo", title="Tokyo", text="Tokyo is the capital of Japan.", score=.5)


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


# --- scoring (pure) ---------------------------------------------------------------------------
def test_strip_citations_removes_markers_only():
    assert qa.strip_citations("Paris [2]") == "Paris"
    assert qa.strip_citations("Paris [1, 3].") == "Paris."
    assert qa.strip_citations("In [1] Paris") == "In Paris"
    assert qa.strip_citations("[sic] Paris") == "[sic] Paris"


def test_rows_and_set_metrics_by_hand():
    item = QAItem(id="fr", question="What is the capital of France?", answers=["Paris"],
                  doc_ids=["geo-paris"], answerable=True)
    right = qa.score_row(item, "Paris [1]", [PARIS, TOKYO])
    assert (right.em, right.f1, right.contains) == (1.0, 1.0, 1.0)
    assert right.retrieved_gold and right.cited_gold and not right.abstained
    wrong_cite = qa.score_row(item, "The capital is Paris [2]", [PARIS, TOKYO])
    assert wrong_cite.em == 0.0 and wrong_cite.contains == 1.0 and not wrong_cite.cited_gold
    assert wrong_cite.f1 == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    unknown = QAItem(id="x", question="What is the capital of Atlantis?", answers=["Poseidonia"],
                     doc_ids=[], answerable=False)
    abstained = qa.score_row(unknown, NO_ANSWER, [TOKYO])
    answered = qa.score_row(unknown, "Tokyo [1]", [TOKYO])
    metrics = qa.summarise([right, wrong_cite, abstained, answered])
    assert (metrics.n, metrics.answerable, metrics.unanswerable) == (4, 2, 2)
    assert metrics.em == 0.5 and metrics.contains == 1.0 and metrics.answered_rate == 1.0
    assert metrics.abstention_rate == 0.5 and metrics.cited_gold == 0.5
    # F1 of each answerable row, 1 / 0 for the unanswerable one that abstained / answered
    assert metrics.score == pytest.approx((right.f1 + wrong_cite.f1 + 1.0 + 0.0) / 4, abs=1e-4)
    empty = qa.summarise([abstained])
    assert empty.em is None and empty.answered_rate is None and empty.abstention_rate == 1.0
    json.dumps(qa.QAReport(sets={"s": metrics}, rows={"s": [right]}, config={}, seconds=1.0,
                           questions_per_s=1.0).to_json())


def test_an_answer_below_min_trust_is_scored_as_an_abstention():
    unknown = QAItem(id="x", question="What is the capital of Atlantis?", answers=["Poseidonia"],
                     doc_ids=[], answerable=False)
    guessed = qa.score_row(unknown, "Poseidonia [1]", [TOKYO], min_trust=0.5)
    assert guessed.abstained and guessed.prediction == NO_ANSWER
    assert guessed.trust == 0.0 and guessed.draft == "Poseidonia [1]"
    item = QAItem(id="fr", question="What is the capital of France?", answers=["Paris"],
                  doc_ids=["geo-paris"], answerable=True)
    kept = qa.score_row(item, "Paris [1]", [PARIS], min_trust=0.5)
    assert (kept.em, kept.trust, kept.draft, kept.abstained) == (1.0, 1.0, None, False)
    withheld = qa.score_row(item, "Paris [1]", [TOKYO], min_trust=0.5)
    assert (withheld.em, withheld.contains, withheld.cited_gold) == (0.0, 0.0, False)
    assert qa.summarise([kept, withheld]).answered_rate == 0.5


def test_an_abstention_scores_nothing_even_when_it_shares_a_word_with_the_answer():
    leo = QAItem(id="lviv", question="After whom was Lviv named?",
                 answers=["Leo I of Galicia", "Leo I"], doc_ids=["Lviv"], answerable=True)
    row = qa.score_row(leo, NO_ANSWER, [PARIS])
    assert (row.em, row.f1, row.contains, row.abstained) == (0.0, 0.0, 0.0, True)
    assert qa.score_row(leo, "Leo I [1]", [PARIS]).f1 == 1.0


# --- prompts ----------------------------------------------------------------------------------
def test_prompt_is_serving_chat_prompt_or_plain_text_without_a_template(tokenizer):
    question = "What is the capital of France?"
    ids = qa.prompt_ids(tokenizer, question, [PARIS, TOKYO], 1200)
    serving = tokenizer.apply_chat_template(build_messages(question, [PARIS, TOKYO], 1200),
                                            add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"][0].tolist()
    assert ids == serving
    plain = bpe_tokenizer(chat_template=None)
    text = plain.decode(qa.prompt_ids(plain, question, [PARIS], 1200))
    system, user = (m["content"] for m in build_messages(question, [PARIS], 1200))
    assert text == f"{system}\n\n{user}"


def test_fit_prompt_drops_the_lowest_ranked_passages_then_refuses(tokenizer):
    question = "What is the capital of France?"
    one = len(qa.prompt_ids(tokenizer, question, [PARIS], 1200))
    two = len(qa.prompt_ids(tokenizer, question, [PARIS, TOKYO], 1200))
    kept, ids = qa.fit_prompt(tokenizer, question, [PARIS, TOKYO], 1200, two)
    assert kept == [PARIS, TOKYO] and len(ids) == two
    kept, ids = qa.fit_prompt(tokenizer, question, [PARIS, TOKYO], 1200, two - 1)
    assert kept == [PARIS] and len(ids) == one
    with pytest.raises(qa.PromptTooLong, match=f"needs {one} prompt tokens, over the budget"):
        qa.fit_prompt(tokenizer, question, [PARIS, TOKYO], 1200, one - 1)


# --- decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seq2seq", [False, True])
def test_batched_decoding_equals_one_prompt_at_a_time(seq2seq):
    tok = bpe_tokenizer(chat_template=None if seq2seq else bpe_tokenizer().chat_template)
    model = tiny_t5(tok) if seq2seq else tiny_llama(tok)
    prompts = [qa.prompt_ids(tok, q, passages, 1200) for q, passages in [
        ("What is the capital of France?", [PARIS, TOKYO]),
        ("Capital of Japan?", [TOKYO]),
        ("What is the capital of France, the country in Europe?", [PARIS])]]
    assert len({len(p) for p in prompts}) == 3  # padding is exercised
    batched = qa.generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=3)
    alone = [qa.generate_answers(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone
    assert all(a for a in batched)


def test_an_answer_that_ends_at_once_is_no_answer(tokenizer):
    model = tiny_llama(tokenizer)
    with torch.no_grad():  # dim 0 of every state is large; the head reads it into eos alone
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 1.0
    prompt = qa.prompt_ids(tokenizer, "Who?", [PARIS], 1200)
    assert qa.generate_answers(model, tokenizer, [prompt, prompt[3:]], max_new_tokens=4) == [
        NO_ANSWER, NO_ANSWER]


# --- retrieval --------------------------------------------------------------------------------
def test_hybrid_retrieval_finds_the_document_and_caches_as_json(encoder, corpus, tmp_path):
    with qa.HybridRetriever(encoder, corpus, cache_dir=tmp_path) as retriever:
        hits = retriever(["What is the capital of France?", "largest animal ever"], 3)
    assert [len(h) for h in hits] == [3, 3]
    assert hits[0][0].doc_id == "geo-paris" and hits[1][0].doc_id == "bio-whale"
    assert list(tmp_path.glob("embeddings-*.npy"))
    passages = {"q1": hits[0], "q2": hits[1]}
    qa.save_passages(tmp_path / "passages.json", passages)
    loaded = qa.load_passages(tmp_path / "passages.json")
    assert loaded == passages
    assert qa.retrieve(loaded, ["q2", "q1", "q2"], 2) == {"q2": hits[1][:2], "q1": hits[0][:2]}
    with pytest.raises(ValueError, match="no passages for 1 question.*'q3'"):
        qa.retrieve(loaded, ["q1", "q3"], 2)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a passages file"):
        qa.load_passages(tmp_path / "bad.json")


def test_hybrid_retriever_validates_its_options(encoder, corpus):
    with pytest.raises(ValueError, match="unknown fusion mode 'max'"):
        qa.HybridRetriever(encoder, corpus, mode="max")
    with pytest.raises(ValueError, match="doc_vectors"):
        qa.HybridRetriever(encoder, corpus, doc_vectors=torch.zeros(2, 3).numpy())


# --- end to end -------------------------------------------------------------------------------
class PromptReader(torch.nn.Module):
    """A fake generator: reads the question and numbered passages out of the prompt it gets
    and answers "<title> [n]" with the passage whose title ``answers`` names for that
    question, "I don't know." when none is there. Decodes like a model: eos, then padding."""

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.answers = answers
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"is_encoder_decoder": False,
                                          "eos_token_id": tokenizer.eos_token_id,
                                          "max_position_embeddings": 4096})()
        self.prompts: list[str] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            self.prompts.append(prompt)
            question = re.search(r"Question: (.*?)<\|im_end\|>", prompt).group(1)
            titles = re.findall(r"^\[(\d+)\] (.+)$", prompt, flags=re.M)
            wanted = self.answers.get(question)
            cited = [n for n, title in titles if title == wanted]
            text = f"{wanted} [{cited[0]}]" if cited else NO_ANSWER
            new = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(new[:max_new_tokens - 1] + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_qa_runs_the_serving_pipeline_and_scores_it(encoder, corpus, tokenizer,
                                                             tmp_path):
    sets = {
        "capitals": [
            QAItem(id="fr", question="What is the capital of France?", answers=["Paris"],
                   doc_ids=["geo-paris"], answerable=True),
            QAItem(id="jp", question="What is the capital of Japan?", answers=["Tokyo"],
                   doc_ids=["geo-tokyo"], answerable=True)],
        "unanswerable": [
            QAItem(id="at", question="What is the capital of Atlantis?",
                   answers=["Poseidonia"], doc_ids=[], answerable=False)],
        "animals": [
            QAItem(id="wh", question="Which animal is the largest ever?",
                   answers=["blue whale"], doc_ids=["bio-whale"], answerable=True)],
    }
    # France and Japan are answered from the passage titled with their capital; the animal
    # question is answered with a title that is not its answer.
    model = PromptReader(tokenizer, {"What is the capital of France?": "Paris",
                                     "What is the capital of Japan?": "Tokyo",
                                     "Which animal is the largest ever?": "Volcano"})
    with qa.HybridRetriever(encoder, corpus, cache_dir=tmp_path) as retriever:
        passages = qa.retrieve(retriever, [i.question for s in sets.values() for i in s], 3)
        report = qa.evaluate_qa(model, tokenizer, sets, retriever, top_k=3, batch_size=2,
                                max_new_tokens=16)
    # the prompts are serving's, built from the fused top 3
    france = next(p for p in model.prompts if "France?" in p)
    assert france == tokenizer.decode(qa.prompt_ids(tokenizer, "What is the capital of France?",
                                                    passages["What is the capital of France?"],
                                                    1200))
    capitals = report.sets["capitals"]
    assert (capitals.em, capitals.f1, capitals.contains) == (1.0, 1.0, 1.0)
    assert capitals.answered_rate == 1.0 and capitals.cited_gold == 1.0
    assert report.sets["unanswerable"].abstention_rate == 1.0
    assert report.sets["unanswerable"].em is None
    animals = report.rows["animals"][0]
    if "Volcano" in [h.title for h in passages["Which animal is the largest ever?"]]:
        assert animals.prediction.startswith("Volcano [") and animals.em == 0.0
    else:
        assert animals.abstained
    assert report.sets["animals"].retrieved_gold == 1.0
    body = json.loads(json.dumps(report.to_json()))
    assert body["sets"]["capitals"]["em"] == 1.0 and body["config"]["top_k"] == 3
    assert "capitals" in report.table()


# --- bench/qa.py and bench/handwritten.py ------------------------------------------------------
def _bench(name: str):
    """bench/<name>.py as a module (the benches import bench/train_generator.py as a sibling)."""
    folder = ROOT / "bench"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def _served(answer: str, passages: list[Hit], cited: list[Hit]) -> dict:
    """A ``POST /v1/qa`` body as bench/qa.py reads it."""
    return {"question": "?", "answer": answer, "request_id": "r", "timings_ms": {},
            "passages": [{"rank": n, **h.model_dump(include={"doc_id", "title", "text",
                                                            "score"})}
                         for n, h in enumerate(passages, start=1)],
            "citations": [{"passage": passages.index(h) + 1, "doc_id": h.doc_id,
                           "title": h.title} for h in cited]}


def test_bench_qa_scores_served_answers_as_the_evaluation_does(capsys):
    bench = _bench("qa")
    france = QAItem(id="fr", question="What is the capital of France?", answers=["Paris"],
                    doc_ids=["geo-paris"], answerable=True)
    row = bench.score_served(france, _served("Paris [1]", [PARIS, TOKYO], [PARIS]))
    offline = qa.score_row(france, "Paris [1]", [PARIS, TOKYO])
    assert (row["em"], row["f1"], row["contains"]) == (offline.em, offline.f1,
                                                         offline.contains) == (1.0, 1.0, 1.0)
    assert row["cited_gold"] and row["retrieved_gold"] and not row["abstained"]
    leo = QAItem(id="lviv", question="After whom was Lviv named?",
                 answers=["Leo I of Galicia", "Leo I"], doc_ids=["Lviv"], answerable=True)
    abstained = bench.score_served(leo, _served(NO_ANSWER, [TOKYO], []))
    assert abstained["abstained"] and (abstained["em"], abstained["f1"],
                                       abstained["contains"]) == (0.0, 0.0, 0.0)
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--limit", "0"])
    assert "argument --limit: has to be 1 or more, not 0" in capsys.readouterr().err


def test_passages_and_bench_results_are_utf8_whatever_the_locale(tmp_path):
    # An ASCII locale without Python's UTF-8 mode: reading or writing in the locale's
    # encoding fails on "São Tomé". The script is ASCII (a command line is decoded in the
    # locale too).
    script = """
import sys
from pathlib import Path
from services.evaluation import qa
from shared.schemas import Hit

out, name = Path(sys.argv[1]), "S\\u00e3o Tom\\u00e9"
hit = Hit(doc_id=name, title=name, text=name + " is an island.", score=1.0)
qa.save_passages(out / "passages.json", {name + "?": [hit]})
assert qa.load_passages(out / "passages.json") == {name + "?": [hit]}
sys.path.insert(0, "bench")
import importlib.util
spec = importlib.util.spec_from_file_location("bench_handwritten", "bench/handwritten.py")
handwritten = importlib.util.module_from_spec(spec)
spec.loader.exec_module(handwritten)
handwritten.write_results(out / "results" / "handwritten.json", {"answer": name})
"""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0",
           "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-X", "utf8=0", "-c", script, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = (tmp_path / "results" / "handwritten.json").read_bytes()
    assert json.loads(written.decode("utf-8")) == {"answer": "São Tomé"}
    assert "São Tomé".encode() in written  # kept as it is, not escaped
