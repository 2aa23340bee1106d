"""End to end on real parts: embedded valkey + milvus-lite, real Ray Serve, packaged models.

One stack for the module (start-up is the slow part): documents go in over HTTP, a grounded
question comes back answered and cited; the CLI talks to the same running system.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest

from deploy import cli
from deploy.stack import start_stack, state_path
from shared.datasets import load_corpus
from shared.infra import free_port
from shared.settings import RedisSettings, ServeSettings, Settings

pytestmark = pytest.mark.integration

COUNTRIES = ("France", "Germany", "Japan", "Kenya", "Peru", "Italy")


def _documents() -> list[dict]:
    corpus = load_corpus()
    by_title = {d.title: d for d in corpus}
    chosen = [by_title[t] for t in COUNTRIES] + [d for d in corpus[:24]]
    return [d.model_dump() for d in chosen]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home, serve=ServeSettings(http_port=free_port()),
                        redis=RedisSettings(claim_idle_ms=5_000))
    running = start_stack(settings, dashboard=False, timeout_s=900)
    # what `ragtune up`'s supervisor writes, so the CLI commands find this stack
    path = state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "http_url": running.http_url,
                                "redis_url": running.infra.redis_url,
                                "milvus_uri": running.infra.milvus_uri}))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def ingested(stack):
    documents = _documents()
    r = httpx.post(f"{stack.http_url}/v1/documents?wait=true", json={"documents": documents},
                   timeout=600)
    assert r.status_code == 202, r.text
    assert r.json()["indexed"] is True
    return documents


def test_grounded_question_is_answered_and_cited(stack, ingested):
    r = httpx.post(f"{stack.http_url}/v1/qa", json={"question": "What is the capital of Kenya?"},
                   timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Nairobi" in body["answer"]
    assert body["passages"][0]["doc_id"] == "Kenya"
    assert "Kenya" in [c["doc_id"] for c in body["citations"]]
    assert {"retrieve", "retrieve.dense", "retrieve.sparse", "generate"} <= set(body["timings_ms"])


def test_both_indexes_hold_each_document_once(stack, ingested):
    again = httpx.post(f"{stack.http_url}/v1/documents?wait=true",
                       json={"documents": ingested[:5]}, timeout=300)
    assert again.status_code == 202
    status = httpx.get(f"{stack.http_url}/v1/status", timeout=60).json()
    assert status["documents"] == {"embedding": len(ingested), "sparse": len(ingested)}
    assert status["dead_letters"] == 0
    assert all(s["pending"] == 0 for s in status["streams"])


def test_deleted_document_leaves_both_indexes(stack, ingested):
    doc = {"doc_id": "zz-gone", "title": "Ferry Velmora",
           "text": "The Velmora ferry crosses the Quillomar strait twice a day."}
    url = stack.http_url
    assert httpx.post(f"{url}/v1/documents?wait=true", json={"documents": [doc]},
                      timeout=300).status_code == 202
    before = httpx.get(f"{url}/v1/status", timeout=60).json()["documents"]
    r = httpx.delete(f"{url}/v1/documents/zz-gone?wait=true", timeout=300)
    assert r.status_code == 202 and r.json()["indexed"] is True
    after = httpx.get(f"{url}/v1/status", timeout=60).json()["documents"]
    assert after == {k: v - 1 for k, v in before.items()}
    answer = httpx.post(f"{url}/v1/qa", json={"question": "Which ferry crosses the Quillomar "
                                                          "strait?"}, timeout=300).json()
    assert "zz-gone" not in [p["doc_id"] for p in answer["passages"]]


def test_bad_input_on_the_real_server(stack):
    r = httpx.post(f"{stack.http_url}/v1/qa", json={"question": "   "}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "question"]
    r = httpx.post(f"{stack.http_url}/v1/documents",
                   json={"documents": [{"doc_id": "x", "title": "t", "text": ""}]}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "text"


def test_cli_ingest_ask_and_status(stack, ingested, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAGTUNE_HOME", str(stack.settings.home))
    monkeypatch.setenv("RAGTUNE_SERVE__HTTP_PORT", str(stack.settings.serve.http_port))
    lines = tmp_path / "docs.jsonl"
    lines.write_text(json.dumps({"doc_id": "zz-lake", "title": "Lake Quillomar",
                                 "text": "Lake Quillomar is a lake whose ferry is named "
                                         "Aurelian Swift."}) + "\n")
    cli.main(["ingest", str(lines)])
    cli.main(["ask", "What is the ferry on Lake Quillomar called?", "--json"])
    out = capsys.readouterr().out
    answer = json.loads(out[out.index("{"):])
    assert answer["passages"][0]["doc_id"] == "zz-lake"
    cli.main(["status"])
    assert f"{{'embedding': {len(ingested) + 1}, 'sparse': {len(ingested) + 1}}}" in (
        capsys.readouterr().out)
    cli.main(["delete", "zz-lake"])
    cli.main(["status"])
    assert f"{{'embedding': {len(ingested)}, 'sparse': {len(ingested)}}}" in (
        capsys.readouterr().out)


def test_cli_refuses_a_bad_jsonl_line(stack, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAGTUNE_HOME", str(stack.settings.home))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"doc_id": "a", "title": "A", "text": "ok"}\n{"doc_id": "b", "title": "B"}\n')
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ingest", str(bad)])
    assert exit_.value.code == 1
    assert "bad.jsonl:2: text: Field required" in capsys.readouterr().err
