"""Fixtures for the retriever services: one milvus-lite server, the packaged MiniLM, the dense
service over a fresh collection, a corpus."""

from __future__ import annotations

import uuid

import pytest

from shared.infra import start_milvus
from shared.schemas import Document


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory):
    """URI of one milvus-lite server for the whole session (tests use their own collections)."""
    server = start_milvus(tmp_path_factory.mktemp("milvus-data") / "milvus")
    yield server.url
    server.stop()


@pytest.fixture
def milvus_client(milvus_uri):
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    # gRPC shares one connection among clients of the same address; after many tests the
    # server may close it ("too_many_pings" GOAWAY) and the next client's first call fails
    # once while a fresh connection is made. Three tries, then the error stands.
    for attempt in range(3):
        try:
            client = MilvusClient(uri=milvus_uri)
            break
        except MilvusException:
            if attempt == 2:
                raise
    yield client
    client.close()


@pytest.fixture
def collection(milvus_client):
    """A fresh collection name, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    yield name
    if milvus_client.has_collection(name):
        milvus_client.drop_collection(name)


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    """The packaged all-MiniLM-L6-v2 (real weights, loads in seconds), small batches."""
    from shared.models.encoder import Encoder
    from shared.settings import EmbeddingSettings, Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"),
                        embedding=EmbeddingSettings(batch_size=4, max_length=128))
    return Encoder.from_settings(settings)


@pytest.fixture
def dense(encoder, milvus_client, collection):
    """The embedding service over a fresh collection of the session's milvus-lite."""
    from services.embedding.index import DenseIndex
    from services.embedding.service import EmbeddingService

    return EmbeddingService(encoder, DenseIndex(milvus_client, collection, encoder.dim))


CORPUS = [
    ("geo-paris", "Paris", "Paris is the capital and largest city of France, on the river Seine.",
     "Geography"),
    ("geo-tokyo", "Tokyo", "Tokyo is the capital of Japan and one of the most populous cities "
     "in the world.", "Geography"),
    ("sci-volcano", "Volcano", "A volcano is a rupture in the crust where lava, ash and gases "
     "escape during an eruption.", "Science"),
    ("sci-photosynthesis", "Photosynthesis", "Plants convert sunlight, water and carbon dioxide "
     "into glucose and oxygen.", "Science"),
    ("food-bread", "Bread", "Bread is baked from a dough of flour and water, usually leavened "
     "with yeast.", "Food"),
    ("game-chess", "Chess", "Chess is a board game for two players; each controls sixteen pieces "
     "and aims to checkmate the opposing king.", "Games"),
    ("music-violin", "Violin", "The violin is a wooden string instrument played with a bow.",
     "Arts"),
    ("tech-python", "Python (programming language)", "Python is a programming language known "
     "for its readable syntax and a large standard library.", "Technology"),
    ("hist-rome", "Roman Empire", "The Roman Empire ruled the Mediterranean world for centuries "
     "after Augustus became its first emperor.", "History"),
    ("bio-whale", "Blue whale", "The blue whale is a marine mammal and the largest animal known "
     "to have ever lived.", "Biology"),
]


@pytest.fixture
def corpus() -> list[Document]:
    """Ten one-sentence documents on unrelated subjects."""
    return [Document(doc_id=i, title=t, text=x, topic=p) for i, t, x, p in CORPUS]
