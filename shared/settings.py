"""Typed settings for every ragtune process.

One class, read once at start (``Settings()``) and passed down; nothing else reads the
environment. Every value can be set as ``RAGTUNE_<SECTION>__<FIELD>``, e.g.
``RAGTUNE_REDIS__URL=redis://10.0.0.5:6380`` or ``RAGTUNE_SERVE__HTTP_PORT=9000``.

Unset ``redis.url`` / ``milvus.uri`` mean "embedded": ragtune starts a local valkey server
and a local milvus-lite server on free loopback ports (see ``shared.infra``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Section(BaseModel):
    """A settings section: an unknown field is an error at start-up (a misspelt
    ``RAGTUNE_SERVE__HTTP_HOTS`` would otherwise be dropped without a word)."""

    model_config = ConfigDict(extra="forbid")


class RedisSettings(_Section):
    url: str | None = Field(None, description="redis:// URL; unset starts an embedded valkey")
    stream_maxlen: int = Field(100_000, ge=100, description="approximate cap of every stream")
    max_backlog: int = Field(2_000, ge=1, description="waiting requests before a service is busy")
    claim_idle_ms: int = Field(30_000, ge=1, description="idle time before a pending entry of "
                               "a silent consumer is reclaimed by a live one (XAUTOCLAIM)")
    max_deliveries: int = Field(3, ge=1, description="deliveries before an entry is dead-lettered")
    block_ms: int = Field(1_000, ge=1, description="how long a consumer blocks on an empty stream")
    reply_ttl_s: int = Field(3_600, ge=10, description="a reply stream expires this long after use")


class MilvusSettings(_Section):
    uri: str | None = Field(None, description="Milvus URI; unset starts an embedded milvus-lite")
    collection: str = Field("ragtune_documents", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


class EmbeddingSettings(_Section):
    model: str | None = Field(None, description="HF id or local path; unset = packaged MiniLM")
    batch_size: int = Field(32, ge=1, le=1024)
    max_length: int = Field(256, ge=8, le=8192, description="tokens per text before truncation")
    pooling: Literal["mean", "cls"] = Field("mean", description="sentence vector from the "
                                            "token states: mean (MiniLM) or cls (BERT-style)")
    chunk_chars: int = Field(1_000, ge=50, description="longest passage of a document in the "
                             "dense index (about 250 tokens: MiniLM reads 256)")
    chunk_overlap: int = Field(200, ge=0, description="characters two passages share")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> EmbeddingSettings:
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be below chunk_chars "
                             f"({self.chunk_chars})")
        return self


class SparseSettings(_Section):
    """BM25 of the sparse service (Lucene variant, as bm25s computes it). Defaults are bm25s'
    (Lucene's are k1=1.2, b=0.75); Robertson & Zaragoza 2009 suggest k1 in [1.2, 2], b=0.75."""

    k1: float = Field(1.5, ge=0, le=10, description="term-frequency saturation (0 = binary)")
    b: float = Field(0.75, ge=0, le=1, description="length normalisation (0 = none, 1 = full)")
    stopwords: Literal["en", "none"] = Field(
        "en", description="stop words dropped from documents and queries: 'en' = Lucene's "
                          "English list (33 words), 'none' = keep every word")


class GeneratorSettings(_Section):
    model: str | None = Field(
        None, description="HF id or local path of a decoder-only or encoder-decoder (T5, BART) "
        "model; unset = packaged SmolLM2-135M-Instruct"
    )
    max_new_tokens: int = Field(48, ge=1, le=1024, description="answer length when a request "
                                "does not ask for one")
    max_new_tokens_limit: int = Field(512, ge=1, description="the most a request may ask for: "
                                      "a long answer holds the replica for all of it")
    max_passage_chars: int = Field(1_200, ge=50, description="each passage is cut to this")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when torch sees a GPU (bf16 where supported), else CPU")
    max_batch_size: int = Field(8, ge=1, le=256, description="requests decoded together in one "
                                "model.generate (same decoding options only)")
    batch_wait_ms: float = Field(10.0, ge=0, le=1_000, description="how long a request waits "
                                 "for others to share its batch")

    @model_validator(mode="after")
    def _default_within_limit(self) -> GeneratorSettings:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) exceeds "
                             f"max_new_tokens_limit ({self.max_new_tokens_limit})")
        return self


class RetrievalSettings(_Section):
    top_k: int = Field(3, ge=1, description="passages handed to the generator by default")
    candidates: int = Field(100, ge=1, description="hits asked of each retriever before "
                            "fusion; the weighted default was tuned with 100")
    rrf_k: int = Field(60, ge=1, description="RRF constant, Cormack et al. 2009")
    mode: Literal["rrf", "weighted_minmax", "weighted_zscore", "dense", "sparse"] = Field(
        "weighted_minmax", description="default fusion mode (services/ranker/fusion.py). "
        "Measured with `ragtune eval retrieval`: equal-weight RRF (k=60) loses to dense alone "
        "on nDCG@10 here; min-max weighted fusion tuned on the dev splits does not")
    weight: float = Field(0.9, ge=0, le=1, description="dense share in weighted_* fusion; "
                          "0.9 was chosen on the dev splits of both packaged question sets")


class RerankSettings(_Section):
    model: Path | None = Field(None, description="folder of a trained cross-encoder "
                               "(services/ranker/rerank.py); unset = no reranking stage")
    candidates: int = Field(20, ge=1, description="fused hits the reranker re-scores")


class TrainerSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where training runs: "
                                                   "auto = CUDA (bf16) when present, else CPU")
    max_answer_chars: int = Field(500, ge=1, description="longest reference answer accepted")
    torch_threads: int = Field(0, ge=0, description="threads of the trainer's torch; 0 = all")


class FeedbackSettings(_Section):
    """The production loop: judged answers (``POST /v1/feedback``) go through ``rag:feedback``
    to the trainer, which keeps them until an update (a ``continual`` job) trains on them."""

    max_pending: int = Field(10_000, ge=1, description="feedback entries waiting for the "
                             "trainer before POST /v1/feedback answers 429; also the exact cap "
                             "of the rag:feedback stream")
    update_after: int = Field(200, ge=0, description="stored feedback items that start a "
                              "continual update by themselves; 0 = only on demand "
                              "(`ragtune feedback update`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the update job's "
                                   "params (services/trainer/jobs.py ContinualJobConfig: "
                                   "method, tolerance, regression set, ...)")


class AnswerSettings(_Section):
    """What the QA front does with the generator's answer before it returns it."""

    min_trust: float = Field(0.25, ge=0, le=1, description="answers whose trust (the share of "
                             "their content words found in the passages' sentences on the "
                             "question, shared.prompt.support) is below this are withheld: "
                             "the front answers \"I don't know.\" and returns the generator's "
                             "words as `draft`; 0 = never withhold")
    trust_by_sentence: bool = Field(True, description="count an answer's words only in passage "
                                    "sentences that share a word with the question (or a "
                                    "pronoun, for the passage's title); false: anywhere in its "
                                    "passages, for documents that state a fact far from where "
                                    "they name what it is about")


class LimitSettings(_Section):
    max_question_chars: int = Field(1_000, ge=1)
    max_title_chars: int = Field(1_000, ge=1)
    max_document_chars: int = Field(60_000, ge=1)
    max_documents_per_request: int = Field(1_000, ge=1)
    max_top_k: int = Field(20, ge=1)
    # An entry's passages are encoded together, sorted by length: 128 documents pad far less
    # than 32 and index ~1.7x as fast on 2 CPU cores (bench/ingest.py), while one entry (~2.6 s
    # there) holds a retriever replica's one slot, searches waiting behind it, only that long.
    ingest_batch: int = Field(128, ge=1, description="documents per rag:ingest entry")


# An API key shorter than this is refused: 16 random characters of a URL-safe alphabet hold
# ~96 bits, out of reach of guessing over a network (`python -c "import secrets;
# print(secrets.token_urlsafe(32))"` makes one of 43).
MIN_API_KEY_CHARS = 16


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); a name that is not an
    address counts as reachable from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeSettings(_Section):
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(None, ge=1, le=65535, description="port of the gRPC API "
                                  "(services/qa/proto/qa.proto); unset = no gRPC. Ray Serve's "
                                  "gRPC proxy listens on every interface, so it needs api_key")
    api_key: SecretStr | None = Field(None, description="clients send it as `Authorization: "
                                      "Bearer <key>` or `x-api-key` (HTTP header or gRPC "
                                      "metadata); unset = no authentication, allowed only "
                                      "while nothing listens beyond loopback")
    request_timeout_s: float = Field(120.0, gt=0)
    embedding_replicas: int = Field(1, ge=1)
    sparse_replicas: int = Field(1, ge=1)
    ranker_replicas: int = Field(1, ge=1)
    generator_replicas: int = Field(1, ge=1)
    qa_replicas: int = Field(1, ge=1)
    torch_threads: int = Field(0, ge=0, description="threads for each model replica's torch; "
                               "0 = every core (Ray would otherwise give a 0-CPU actor one)")
    sparse_node_resource: str | None = Field(
        None, min_length=1, description="a custom Ray resource that exactly one node of the "
        "cluster holds: the deployments opening the sparse index's SQLite database (sparse "
        "replicas, trainer) each ask for a sliver of it, so all of them run on that node "
        "(SQLite's WAL works only between processes of one host, not over a network "
        "filesystem). Unset = no constraint, as on one machine (`ragtune up`)")

    @model_validator(mode="after")
    def _ports_differ(self) -> ServeSettings:
        # Serve's gRPC proxy binds every interface, so it collides with the HTTP proxy on any
        # http_host; without this, the second bind fails only once Serve starts.
        if self.grpc_port is not None and self.grpc_port == self.http_port:
            raise ValueError(f"serve.http_port and serve.grpc_port are both {self.http_port}: "
                             f"set RAGTUNE_SERVE__HTTP_PORT or RAGTUNE_SERVE__GRPC_PORT to "
                             f"another port")
        return self

    @model_validator(mode="after")
    def _key_beyond_loopback(self) -> ServeSettings:
        if self.api_key is not None and len(self.api_key.get_secret_value()) < MIN_API_KEY_CHARS:
            raise ValueError(f"serve.api_key has to be at least {MIN_API_KEY_CHARS} characters")
        if self.api_key is None and not is_loopback(self.http_host):
            raise ValueError(f"serve.http_host {self.http_host!r} is reachable beyond this "
                             f"machine: set serve.api_key (RAGTUNE_SERVE__API_KEY) as well")
        if self.api_key is None and self.grpc_port is not None:
            raise ValueError("serve.grpc_port is set, and Ray Serve's gRPC proxy listens on "
                             "every interface: set serve.api_key (RAGTUNE_SERVE__API_KEY) too")
        return self


class Settings(BaseSettings):
    """All of ragtune's configuration. ``home`` holds indexes, caches, logs and run state."""

    model_config = SettingsConfigDict(
        env_prefix="RAGTUNE_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".ragtune")
    redis: RedisSettings = RedisSettings()
    milvus: MilvusSettings = MilvusSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    sparse: SparseSettings = SparseSettings()
    generator: GeneratorSettings = GeneratorSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    rerank: RerankSettings = RerankSettings()
    trainer: TrainerSettings = TrainerSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    answer: AnswerSettings = AnswerSettings()
    limits: LimitSettings = LimitSettings()
    serve: ServeSettings = ServeSettings()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.retrieval.top_k > self.limits.max_top_k:
            raise ValueError(
                f"retrieval.top_k ({self.retrieval.top_k}) exceeds limits.max_top_k "
                f"({self.limits.max_top_k})"
            )
        if self.retrieval.candidates < self.retrieval.top_k:
            raise ValueError("retrieval.candidates must be >= retrieval.top_k")
        return self

    # Paths under home: one place names them all.
    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def milvus_data_dir(self) -> Path:
        return self.home / "milvus"

    @property
    def valkey_data_dir(self) -> Path:
        return self.home / "valkey"

    @property
    def sparse_dir(self) -> Path:
        return self.home / "sparse"

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"

    @property
    def checkpoint_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"
