"""Training and hot swap on the whole stack (real Ray Serve, valkey, milvus-lite), tiny models.

A user submits a generator job over HTTP, follows it to the end, and promotes the version it
made while a bounded load of questions is in flight: none of them fails, later answers come
from the new model, and a rollback brings the previous answers back. The same for a retriever
version (query encoder only: the passage vectors stay).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from deploy.stack import start_stack
from shared.datasets import load_corpus
from shared.infra import free_port
from shared.prompt import NO_ANSWER
from shared.registry import Registry
from shared.settings import Settings
from tests.tiny import bpe_tokenizer, save_tiny_models, tiny_bert

pytestmark = pytest.mark.integration

N_DOCS = 30
QUESTIONS = [f"What is known about {d.title}?" for d in load_corpus(8)]
IN_FLIGHT = 24


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    encoder, generator = save_tiny_models(tmp_path_factory.mktemp("tiny-models"))
    settings = Settings(home=tmp_path_factory.mktemp("home"),
                        serve={"http_port": free_port(), "request_timeout_s": 60},
                        embedding={"model": str(encoder), "max_length": 48},
                        generator={"model": str(generator), "max_new_tokens": 8},
                        trainer={"device": "cpu"},
                        # the tiny generator's words are in no passage: compare them unwithheld
                        answer={"min_trust": 0.0})
    running = start_stack(settings, dashboard=False, timeout_s=600)
    documents = [d.model_dump() for d in load_corpus(N_DOCS)]
    r = httpx.post(f"{running.http_url}/v1/documents?wait=true", json={"documents": documents},
                   timeout=300)
    assert r.status_code == 202, r.text
    yield running
    running.stop()


def answers(url: str) -> list[str]:
    return [httpx.post(f"{url}/v1/qa", json={"question": q}, timeout=60).json()["answer"]
            for q in QUESTIONS]


def wait_for(condition, what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.5)


def train(url: str, job: dict) -> dict:
    r = httpx.post(f"{url}/v1/train", json=job, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    def finished() -> bool:
        status = httpx.get(f"{url}/v1/train/{job_id}", timeout=30).json()
        return status["state"] not in ("queued", "running")

    wait_for(finished, f"job {job_id} finished", timeout_s=300)
    status = httpx.get(f"{url}/v1/train/{job_id}", timeout=30).json()
    assert status["state"] == "done", status
    return status


async def load_during(url: str, change) -> list[httpx.Response]:
    """``IN_FLIGHT`` questions at once, with ``change()`` (a promotion) sent among them."""
    async with httpx.AsyncClient(timeout=120) as client:
        async def ask(i: int) -> httpx.Response:
            return await client.post(f"{url}/v1/qa",
                                     json={"question": QUESTIONS[i % len(QUESTIONS)]})

        tasks = [asyncio.create_task(ask(i)) for i in range(IN_FLIGHT)]
        await asyncio.sleep(0.2)
        swap = await client.post(f"{url}/v1/models/{change[0]}", json=change[1])
        assert swap.status_code == 200, swap.text
        return await asyncio.gather(*tasks)


def test_bad_job_is_refused_before_it_queues(stack):
    r = httpx.post(f"{stack.http_url}/v1/train",
                   json={"kind": "generator", "params": {"lr": -1}}, timeout=60)
    assert r.status_code == 400 and "lr" in r.json()["detail"]["message"]
    r = httpx.post(f"{stack.http_url}/v1/train", json={"kind": "teach"}, timeout=60)
    assert r.status_code == 422


def test_generator_promotion_under_load_loses_nothing_and_rollback_restores(stack, tmp_path):
    url = stack.http_url
    before = answers(url)
    assert all(a != NO_ANSWER for a in before), before  # the random model babbles
    # Every training answer is "I don't know.": the trained model learns to say it.
    data = tmp_path / "abstain.jsonl"
    data.write_text("".join(json.dumps({"question": f"Where is {d.title} kept?",
                                        "answer": NO_ANSWER}) + "\n"
                            for d in load_corpus(N_DOCS)))
    status = train(url, {"kind": "generator", "data": {"sets": [], "path": str(data),
                                                       "corpus_limit": N_DOCS},
                         "params": {"max_steps": 40, "lr": 3e-3, "batch_size": 4,
                                    "warmup_steps": 0, "eval_steps": 40, "eval_questions": 2,
                                    "abstain_fraction": 0.0}})
    assert status["versions"] == ["generator/v0001"]

    responses = asyncio.run(load_during(url, ("promote",
                                              {"kind": "generator", "version": "v0001"})))
    assert [r.status_code for r in responses] == [200] * IN_FLIGHT
    wait_for(lambda: answers(url) == [NO_ANSWER] * len(QUESTIONS), "the new version answers")

    responses = asyncio.run(load_during(url, ("rollback", {"kind": "generator"})))
    assert [r.status_code for r in responses] == [200] * IN_FLIGHT
    wait_for(lambda: answers(url) == before, "the previous answers are back")
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert models["generator"]["serving"] is None
    assert [v["version"] for v in models["generator"]["versions"]] == ["v0001"]


def test_retriever_query_version_swaps_in_without_reindexing(stack):
    url = stack.http_url

    def top_hits() -> list[list[str]]:
        return [[p["doc_id"] for p in httpx.post(f"{url}/v1/qa", json={"question": q},
                                                 timeout=60).json()["passages"]]
                for q in QUESTIONS]

    before = top_hits()
    # A query encoder of other weights, registered as a query-only version (reindex false):
    # the passage vectors in Milvus stay those of the base encoder.
    settings = stack.settings
    folder = settings.home / "other-encoder"
    tokenizer = bpe_tokenizer()
    tiny_bert(tokenizer, seed=7).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "ragtune.json").write_text(json.dumps({"kind": "retriever", "reindex": False}))
    version = Registry(settings.checkpoint_dir).register("retriever", folder)
    responses = asyncio.run(load_during(url, ("promote", {"kind": "retriever",
                                                          "version": version.version})))
    assert [r.status_code for r in responses] == [200] * IN_FLIGHT
    wait_for(lambda: top_hits() != before, "the new query encoder ranks")
    counts = httpx.get(f"{url}/v1/status", timeout=60).json()["documents"]
    assert counts == {"embedding": N_DOCS, "sparse": N_DOCS}  # nothing re-indexed or lost
    asyncio.run(load_during(url, ("rollback", {"kind": "retriever"})))
    wait_for(lambda: top_hits() == before, "the base ranking is back")


def test_a_retriever_job_trains_and_registers_over_http(stack, tmp_path):
    data = tmp_path / "lookup.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is known about {d.title}?",
                                        "answer": d.title, "doc_ids": [d.doc_id]}) + "\n"
                            for d in load_corpus(N_DOCS)))
    status = train(stack.http_url, {
        "kind": "retriever", "data": {"sets": [], "path": str(data), "corpus_limit": N_DOCS},
        "params": {"mode": "query", "max_steps": 10, "epochs": 5, "lr": 3e-3, "batch_size": 8,
                   "eval_steps": 5, "hard_negatives": 1, "max_length": 48}})
    assert len(status["versions"]) == 1 and status["versions"][0].startswith("retriever/v")
    assert status["total_steps"] == 10
    version = status["versions"][0].split("/")[1]
    listed = httpx.get(f"{stack.http_url}/v1/models", timeout=30).json()["retriever"]
    assert version in [v["version"] for v in listed["versions"]]


def test_a_reindexed_version_serves_from_its_own_collection_until_pruned(stack):
    from pymilvus import MilvusClient

    url, settings = stack.http_url, stack.settings
    folder = settings.home / "both-encoder"
    tokenizer = bpe_tokenizer()
    tiny_bert(tokenizer, seed=8).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "ragtune.json").write_text(json.dumps({"kind": "retriever", "reindex": True}))
    version = Registry(settings.checkpoint_dir).register("retriever", folder).version
    collection = f"{settings.milvus.collection}_{version}"
    milvus = MilvusClient(uri=stack.infra.milvus_uri, timeout=30, dedicated=True)
    # The embedding replica handles these events in order: re-index, swap back, drop.
    for path, body in (("promote", {"kind": "retriever", "version": version}),
                       ("rollback", {"kind": "retriever"})):
        assert httpx.post(f"{url}/v1/models/{path}", json=body, timeout=60).status_code == 200
    wait_for(lambda: milvus.has_collection(collection), "the version's own collection")
    pruned = httpx.post(f"{url}/v1/models/prune", json={"kind": "retriever", "keep": 0},
                        timeout=60)
    assert pruned.status_code == 200, pruned.text
    assert version in pruned.json()["removed"] and pruned.json()["freed_bytes"] > 0
    assert pruned.json()["models"]["retriever"]["versions"] == []
    wait_for(lambda: not milvus.has_collection(collection), "the pruned collection dropped")
    assert milvus.has_collection(settings.milvus.collection)
    counts = httpx.get(f"{url}/v1/status", timeout=60).json()["documents"]
    assert counts == {"embedding": N_DOCS, "sparse": N_DOCS}
    bad = httpx.post(f"{url}/v1/models/prune", json={"kind": "retriever", "keep": -1},
                     timeout=60)
    assert bad.status_code == 422


def test_two_generator_versions_average_into_a_new_one_over_http(stack):
    from services.trainer import loop
    from tests.tiny import tiny_llama

    url, settings = stack.http_url, stack.settings
    registry, tokenizer = Registry(settings.checkpoint_dir), bpe_tokenizer()
    made = [registry.register("generator", loop.save_model(
        settings.home / f"seed{seed}", tiny_llama(tokenizer, seed=seed), tokenizer,
        {"kind": "generator", "base_model": "tiny"})).version for seed in (3, 4)]
    serving = registry.serving("generator")
    r = httpx.post(f"{url}/v1/models/average", json={"kind": "generator", "versions": made},
                   timeout=60)
    assert r.status_code == 200, r.text
    soup = r.json()["version"]
    assert soup not in made and soup in [v["version"]
                                         for v in r.json()["models"]["generator"]["versions"]]
    assert registry.serving("generator") == serving  # registered, not promoted
    r = httpx.post(f"{url}/v1/models/average", json={"kind": "generator", "versions": made[:1]},
                   timeout=60)
    assert r.status_code == 422
    r = httpx.post(f"{url}/v1/models/average",
                   json={"kind": "generator", "versions": [made[0], "v0999"]}, timeout=60)
    assert r.status_code == 400 and "v0999" in r.json()["detail"]["message"]


def test_a_generator_version_interpolates_towards_the_base_over_http(stack):
    from services.trainer import loop
    from tests.tiny import tiny_llama

    url, settings = stack.http_url, stack.settings
    registry, tokenizer = Registry(settings.checkpoint_dir), bpe_tokenizer()
    tuned = registry.register("generator", loop.save_model(
        settings.home / "wise", tiny_llama(tokenizer, seed=5), tokenizer,
        {"kind": "generator", "base_model": "tiny"})).version
    serving = registry.serving("generator")
    r = httpx.post(f"{url}/v1/models/interpolate",
                   json={"kind": "generator", "version": tuned, "alpha": 0.5}, timeout=60)
    assert r.status_code == 200, r.text
    made = registry.get("generator", r.json()["version"])
    meta = json.loads((registry.path_of(made) / "ragtune.json").read_text())
    assert meta["interpolated"]["base"] == settings.generator.model  # the served base
    assert registry.serving("generator") == serving  # registered, not promoted
    r = httpx.post(f"{url}/v1/models/interpolate",
                   json={"kind": "generator", "version": tuned, "alpha": 2}, timeout=60)
    assert r.status_code == 422
    r = httpx.post(f"{url}/v1/models/interpolate",
                   json={"kind": "generator", "version": "v0999", "alpha": 0.5}, timeout=60)
    assert r.status_code == 400 and "v0999" in r.json()["detail"]["message"]
