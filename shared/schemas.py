"""Wire schemas: every message that crosses a process boundary (bus or HTTP).

Each model carries ``schema_version``; a message of another version is refused (dead-lettered
on the bus, 422 over HTTP). Unknown fields are refused too, so a typo never passes silently.
Engine objects (tensors, Milvus rows) never travel: services convert with named functions.
"""

from __future__ import annotations

import datetime
import math
import re
import uuid
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

NonBlank = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_date(value: str) -> str:
    # The pattern first: date.fromisoformat also takes "20240105" and "2024-W01-1".
    if not _ISO_DATE.fullmatch(value):
        raise ValueError(f"must be an ISO date YYYY-MM-DD, got {value!r}")
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a calendar date") from None
    return value


# Kept as a string on the wire and in both indexes: ISO dates order the same as text, so
# Milvus and SQLite compare them with plain string comparisons.
IsoDate = Annotated[str, AfterValidator(_iso_date)]

# A job id names its run folder, ``<checkpoint dir>/runs/<job id>``: it must start with a letter
# or digit, so that "." and ".." (the runs folder and the checkpoint directory themselves, which
# a finished job's tidy-up would empty) are never job ids.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _job_id(value: str) -> str:
    if not _JOB_ID.fullmatch(value):
        raise ValueError(f"job id {value!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


JobId = Annotated[str, AfterValidator(_job_id)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION


# --- documents and ingestion -------------------------------------------------------------
class Document(Wire):
    """One document of the knowledge base; ``doc_id`` is its identity (upserts replace)."""

    doc_id: Annotated[str, StringConstraints(min_length=1, max_length=256,
                                             pattern=r"^[^\s].*[^\s]$|^[^\s]$")]
    title: NonBlank
    text: NonBlank
    topic: str = ""
    source: str = ""
    date: IsoDate | None = Field(None, description="YYYY-MM-DD; None = undated (never "
                                                   "matches a date filter)")


def titled_text(title: str, text: str) -> str:
    """The text every model reads of a document or one of its passages: title, newline, text.

    The dense and sparse indexes, the reranker, the trainers and the generator's answer
    matching all read this one form, so a vector one part makes is the vector another expects.
    """
    return f"{title}\n{text}"


class IngestBatch(Wire):
    """One ``rag:ingest`` entry: read by both the embedding and the sparse groups."""

    documents: list[Document] = Field(min_length=1)


class IngestRequest(Wire):
    """Body of ``POST /v1/documents``."""

    documents: list[Document] = Field(min_length=1)


class DeleteBatch(Wire):
    """A ``rag:ingest`` entry of kind ``delete``: both indexes drop these doc_ids."""

    doc_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        min_length=1)


class IngestAccepted(Wire):
    """HTTP reply to ``POST /v1/documents``: the bus entries that carry the documents."""

    accepted: int
    doc_ids: list[str]
    entries: list[str]
    indexed: bool = False


class StatsRequest(Wire):
    """Ask a retriever how many documents its index holds."""


class IndexStats(Wire):
    documents: int


# --- retrieval -------------------------------------------------------------------------------
# Filter values are compared with the stored metadata exactly (case and accents count).
FilterValues = Annotated[list[Annotated[str, StringConstraints(max_length=256)]],
                         Field(min_length=1, max_length=100)]


class Filters(Wire):
    """Metadata filters of a search: a document matches when it matches every field that is set.

    ``topic`` / ``source``: the document's value is one of the listed ones. ``date_from`` /
    ``date_to``: inclusive bounds on the document's ``date``; a document without a date never
    matches a date filter. Retrievers return the best matches among the matching documents
    (filtering happens before the top-k cut, not after it).
    """

    topic: FilterValues | None = None
    source: FilterValues | None = None
    date_from: IsoDate | None = None
    date_to: IsoDate | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        # extra="forbid" would refuse it too; this names the fields one can filter on.
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                known = ", ".join(f for f in cls.model_fields if f != "schema_version")
                raise ValueError(f"unknown filter field {unknown[0]!r}; known: {known}")
        return data

    @model_validator(mode="after")
    def _date_order(self) -> Filters:
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError(f"date_from ({self.date_from}) is after date_to ({self.date_to})")
        return self


class SearchRequest(Wire):
    query: NonBlank
    top_k: int = Field(ge=1)
    filters: Filters | None = None


class Hit(Wire):
    doc_id: str
    title: str
    text: str = Field(description="the document's text, or its best passage for dense hits")
    score: float
    start: int | None = Field(None, description="offset of ``text`` in the document's text")
    end: int | None = None


class SearchResult(Wire):
    """Hits in descending score order (ties: ascending doc_id)."""

    hits: list[Hit]
    count: int = Field(0, description="documents in the index when searched")


class RetrieveRequest(Wire):
    question: NonBlank
    top_k: int = Field(ge=1)
    candidates: int = Field(ge=1)
    mode: str = Field("rrf", description="fusion mode, one of services.ranker.fusion.MODES")
    weight: float = Field(0.5, ge=0, le=1,
                          description="dense share of weighted_* fusion (1 = dense only)")
    rrf_k: int | None = Field(None, ge=1,
                              description="RRF constant; None = the ranker's configured one")
    filters: Filters | None = Field(None, description="passed to both retrievers")
    rerank: bool | None = Field(None, description="run the reranking stage; None = when the "
                                                  "ranker has a trained reranker")


class RetrieveResult(Wire):
    hits: list[Hit]
    timings_ms: dict[str, float] = {}


# --- generation ------------------------------------------------------------------------------
# The generator's decoding strategies (services/generator/decoding.py holds one per name; a test
# keeps the two lists equal). Named here so the front validates them at the edge.
DecodingStrategy = Literal["greedy", "beam", "sample"]
SAMPLE_FIELDS = ("temperature", "top_k", "top_p", "seed")
BEAM_FIELDS = ("num_beams", "length_penalty", "early_stopping")
# Each beam is one more sequence in every forward pass; 16 is well past where beam search stops
# helping short answers, and keeps one request from holding a replica for long.
MAX_BEAMS = 16
# As many stop sequences as OpenAI's completions API takes: enough for "\n", "Question:" and
# the like, and the stopping check decodes the completion once per step for each of them.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**63 - 1
# Below this, logits / temperature overflow float32 (1e-39 turns a logit of 1 into inf) and the
# draw fails for the whole batch; 1e-3 already makes the most likely token all but certain.
MIN_TEMPERATURE = 1e-3


def _positive_int(name: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"`{name}` has to be a strictly positive integer, but is {value}")
    return value


def _finite(name: str, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"`{name}` has to be a finite number, but is {value}")
    return value


class DecodingOptions(Wire):
    """How the generator picks each next token; unset fields take the defaults named below.

    ``strategy`` (one of ``DecodingStrategy``): ``greedy`` takes the most likely token;
    ``beam`` keeps ``num_beams`` hypotheses and returns the best by log-probability divided by
    length ** ``length_penalty``; ``sample`` draws from softmax(logits / ``temperature``)
    restricted to the ``top_k`` most likely tokens and then to the smallest set whose
    probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020), reproducibly for a
    given ``seed``. Every strategy takes ``repetition_penalty`` (CTRL, Keskar et al. 2019),
    ``no_repeat_ngram_size`` (both count only generated tokens, so copying the passages is
    never penalised), ``stop`` (the answer ends before the first of these strings, which it
    never contains) and ``max_new_tokens`` (default: ``generator.max_new_tokens``; at most
    ``generator.max_new_tokens_limit``, checked by the front). Sampling fields with another
    strategy, or beam fields with another strategy, are refused rather than ignored.
    """

    strategy: DecodingStrategy = "greedy"
    max_new_tokens: int | None = Field(None, description="tokens to generate at most; "
                                                         "None = generator.max_new_tokens")
    temperature: float | None = Field(None, description=f"sample: at least {MIN_TEMPERATURE}, "
                                                        "default 1.0")
    top_k: int | None = Field(None, description="sample: keep the k most likely tokens")
    top_p: float | None = Field(None, description="sample: in (0, 1], default 1.0 (all)")
    seed: int | None = Field(None, description="sample: same seed, same answer; None = random")
    num_beams: int | None = Field(None, description=f"beam: 1..{MAX_BEAMS}, default 4")
    length_penalty: float | None = Field(None, description="beam: > 0 favours longer "
                                                           "answers, < 0 shorter; default 1.0")
    early_stopping: bool | None = Field(None, description="beam: stop once num_beams "
                                                          "hypotheses ended; default false")
    repetition_penalty: float | None = Field(None, description="> 0; 1.0 = none, > 1 "
                                                               "discourages repeats")
    no_repeat_ngram_size: int | None = Field(None, description="no n-gram of this size twice")
    stop: list[str] = Field([], description=f"up to {MAX_STOP_SEQUENCES} strings that end the "
                                            "answer (not included)")

    @field_validator("strategy", mode="before")
    @classmethod
    def _known_strategy(cls, value: Any) -> Any:
        known = get_args(DecodingStrategy)
        if isinstance(value, str) and value not in known:
            raise ValueError(f"unknown decoding strategy {value!r}; known: {', '.join(known)}")
        return value

    @field_validator("max_new_tokens", "top_k", "no_repeat_ngram_size")
    @classmethod
    def _positive(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _positive_int(info.field_name, value)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value == 0:
            raise ValueError('`temperature` 0 means always taking the most likely token: use '
                             'strategy "greedy" instead')
        if value is not None and not value > 0:
            raise ValueError(f"`temperature` has to be a strictly positive float, but is {value}")
        if _finite("temperature", value) is not None and value < MIN_TEMPERATURE:
            raise ValueError(f"`temperature` has to be at least {MIN_TEMPERATURE}, but is "
                             f"{value}; to always take the most likely token use strategy "
                             '"greedy"')
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"`top_p` has to be in (0, 1], but is {value}")
        return value

    @field_validator("num_beams")
    @classmethod
    def _num_beams(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_BEAMS:
            raise ValueError(f"`num_beams` has to be an integer in [1, {MAX_BEAMS}], "
                             f"but is {value}")
        return value

    @field_validator("length_penalty")
    @classmethod
    def _length_penalty(cls, value: float | None) -> float | None:
        return _finite("length_penalty", value)

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError(f"`repetition_penalty` has to be a strictly positive float "
                             f"(1.0 = no penalty), but is {value}")
        return _finite("repetition_penalty", value)

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"`seed` has to be an integer in [0, 2**63 - 1], but is {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"`stop` holds {len(value)} strings; at most "
                             f"{MAX_STOP_SEQUENCES} are allowed")
        for text in value:
            if not text or len(text) > MAX_STOP_CHARS:
                raise ValueError(f"each `stop` string has to be 1..{MAX_STOP_CHARS} characters, "
                                 f"but {text!r} is {len(text)}")
        return value

    @model_validator(mode="after")
    def _fields_of_the_strategy(self) -> DecodingOptions:
        for strategy, fields in (("sample", SAMPLE_FIELDS), ("beam", BEAM_FIELDS)):
            for name in fields:
                if getattr(self, name) is not None and self.strategy != strategy:
                    raise ValueError(f"`{name}` only applies to strategy {strategy}; strategy "
                                     f"is {self.strategy}")
        return self


class GenerateRequest(Wire):
    """A question to answer from passages. ``max_new_tokens`` is the resolved answer length;
    ``decoding.max_new_tokens``, when set, must equal it."""

    question: NonBlank
    passages: list[Hit]
    max_new_tokens: int = Field(ge=1)
    decoding: DecodingOptions = DecodingOptions()

    @model_validator(mode="after")
    def _one_max_new_tokens(self) -> GenerateRequest:
        asked = self.decoding.max_new_tokens
        if asked is not None and asked != self.max_new_tokens:
            raise ValueError(f"decoding.max_new_tokens ({asked}) disagrees with max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


class AnswerChunk(Wire):
    """A piece of an answer while it is generated (a ``generate_stream`` chunk on the bus, a
    ``token`` event over SSE and gRPC): ``text`` continues the text streamed so far."""

    text: str


class Citation(Wire):
    passage: int = Field(ge=1, description="1-based number of the passage in the prompt")
    doc_id: str
    title: str


class GenerateResult(Wire):
    answer: str
    citations: list[Citation]
    prompt_tokens: int
    completion_tokens: int
    shown_chars: list[int] = Field(
        description="characters of each passage's text the prompt held, in the order given; "
                    "passages past the list's end did not fit (see shared.prompt.shown)")


# --- the QA front ----------------------------------------------------------------------------
# The ranker's fusion modes (services/ranker/fusion.py holds one strategy per name; a test
# keeps the two lists equal). Named here so the front validates them at the edge.
FusionMode = Literal["rrf", "weighted_minmax", "weighted_zscore", "dense", "sparse"]
WEIGHTED_MODES = ("weighted_minmax", "weighted_zscore")


class FusionWeights(Wire):
    """Shares of the dense and the sparse score in weighted fusion; they sum to 1."""

    dense: float = Field(ge=0, le=1)
    sparse: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> FusionWeights:
        if abs(self.dense + self.sparse - 1) > 1e-6:
            raise ValueError(f"dense + sparse must be 1, got {self.dense} + {self.sparse} = "
                             f"{self.dense + self.sparse:g}")
        return self


class RetrievalOptions(Wire):
    """Per-request retrieval choices; unset fields take the server's ``retrieval`` settings."""

    mode: FusionMode | None = None
    weights: FusionWeights | None = Field(None, description="only for weighted_* modes")
    rrf_k: int | None = Field(None, ge=1, le=10_000, description="only for mode rrf")
    filters: Filters | None = Field(None, description="metadata filters (topic, source, date)")
    rerank: bool | None = Field(None, description="cross-encoder reranking; None = on when "
                                                  "a trained reranker is configured")


class QARequest(Wire):
    question: str = Field(description="the question, 1..limits.max_question_chars characters")
    top_k: int | None = Field(None, description="passages to ground the answer on")
    retrieval: RetrievalOptions | None = None
    decoding: DecodingOptions | None = Field(None, description="how the answer is decoded; "
                                                               "None = greedy")


class Passage(Wire):
    rank: int
    doc_id: str
    title: str
    text: str
    score: float


class QAResponse(Wire):
    question: str
    answer: str
    citations: list[Citation]
    passages: list[Passage]
    timings_ms: dict[str, float]
    request_id: str
    trust: float | None = Field(None, description="share of the generator's answer that its "
                                "passages back (shared.prompt.support), 0..1; None when it "
                                "said it does not know")
    draft: str | None = Field(None, description="the generator's answer when its trust was "
                              "below answer.min_trust and `answer` says \"I don't know.\" "
                              "instead; None otherwise")


class StreamStatus(Wire):
    stream: str
    group: str
    length: int
    pending: int
    lag: int
    consumers: int


class Status(Wire):
    """``GET /v1/status``: what a operator needs to see at a glance."""

    services: dict[str, str]
    documents: dict[str, int | None]
    streams: list[StreamStatus]
    dead_letters: int


# --- bus envelopes ---------------------------------------------------------------------------
class ErrorInfo(Wire):
    service: str
    kind: str = Field(description="bad_request | not_found | failed | dead_letter | timeout "
                                  "| busy")
    message: str


class Envelope(Wire):
    """What every stream entry carries (as JSON in its ``msg`` field)."""

    id: str
    kind: str
    body: dict
    reply_to: str | None = None
    deadline: float | None = Field(None, description="unix time after which it is dropped")


class Reply(Wire):
    id: str
    ok: bool
    body: dict | None = None
    error: ErrorInfo | None = None


class ReplyChunk(Wire):
    """One streamed piece of a reply, before the request's final ``Reply``: the ``seq``-th
    (from 0) chunk for request ``id``, its ``body`` a wire model's dict."""

    id: str
    seq: int = Field(ge=0)
    body: dict


class DeadLetter(Wire):
    stream: str
    group: str
    entry_id: str
    deliveries: int
    reason: str
    raw: str = Field(description="the original entry's msg field, whole (to replay it)")


class Event(Wire):
    """A broadcast on ``rag:events`` that every replica sees."""

    kind: str
    data: dict = {}


# --- training and model versions ------------------------------------------------------------
MODEL_KINDS = ("retriever", "generator")
TrainKind = Literal["pretrain", "retriever", "generator", "joint", "distill",
                    "distill_retriever", "continual"]
PackagedSet = Literal["capitals", "capitals_unanswerable", "fanout"]


class TrainData(Wire):
    """What a job trains on: packaged question sets and/or a user JSONL file (see
    ``shared.datasets.load_qa_jsonl``); every set is split train/dev/test by ``seed``."""

    sets: list[PackagedSet] = Field(
        default_factory=lambda: ["capitals", "capitals_unanswerable", "fanout"])
    path: str | None = Field(None, description="a question/answer JSONL file")
    corpus: Literal["packaged", "indexed"] = Field(
        "packaged", description="what training retrieves passages from: the packaged corpus, "
        "or every document the indexes hold (ingested ones included; read from the sparse "
        "store under the trainer's home)")
    corpus_limit: int | None = Field(None, ge=1, description="only the first N documents (a "
                                     "quick trial; questions keep their splits)")

    @model_validator(mode="after")
    def _some_data(self) -> TrainData:
        if not self.sets and self.path is None:
            raise ValueError("no training data: name packaged `sets` or a JSONL `path`")
        return self


class TrainJob(Wire):
    """A ``rag:train`` job. ``params`` are the kind's hyper-parameters (validated by its config
    class before anything trains); ``promote`` serves the result when it is done and its dev
    metrics do not regress."""

    job_id: JobId = Field(default_factory=lambda: datetime.datetime.now(datetime.UTC)
                          .strftime("%Y%m%d-%H%M%S-%f"))
    kind: TrainKind
    data: TrainData = Field(default_factory=TrainData)
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 13
    promote: bool = False


JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class JobStatus(Wire):
    job_id: str
    kind: TrainKind
    state: JobState
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_s: float | None = None
    phase: str | None = Field(None, description="what the job does before its first step "
                              "(e.g. 'choosing layers 3/18'); None while it trains")
    metrics: dict[str, float] = Field(default_factory=dict)
    versions: list[str] = Field(default_factory=list, description="registered, as kind/vNNNN")
    promoted: list[str] = Field(default_factory=list, description="of ``versions``, those "
                                "the job put into serving")
    note: str | None = Field(None, description="what the user should know about the versions: "
                             "why one was or was not promoted (the continual update's gate), "
                             "what a seeds job's soup is")
    error: str | None = None
    updated: float = 0.0


class ModelVersion(Wire):
    kind: Literal["retriever", "generator"]
    version: str
    path: str = Field(description="folder relative to the checkpoint directory")
    created: float
    job_id: str | None = None
    made_from: str | None = Field(None, description="a version no job trained: what it was "
                                                    "made of, e.g. \"the average of v0002, v0003\"")
    metrics: dict[str, float] = Field(default_factory=dict)
    reindex: bool = Field(False, description="passages must be re-embedded to serve it")
    passage_version: str | None = Field(
        None, description="retriever trained for queries only: the version whose passage "
                          "vectors it was trained against (None = the base model's)")
    split_seed: int | None = Field(
        None, description="the seed that split the job's questions into train/dev/test: its "
                          "test split is the one it never saw (None: no job trained it)")


class KindRecord(Wire):
    serving: str | None = None
    history: list[str | None] = Field(default_factory=list)
    versions: list[ModelVersion] = Field(default_factory=list)
    numbered: int = Field(0, description="versions numbered so far: a pruned version's number "
                                         "is never given again")


class RegistryView(Wire):
    retriever: KindRecord = Field(default_factory=KindRecord)
    generator: KindRecord = Field(default_factory=KindRecord)


class PromoteRequest(Wire):
    kind: Literal["retriever", "generator"]
    version: str | None = Field(None, description="None = the packaged base model")


class JobRef(Wire):
    job_id: JobId


class JobQuery(Wire):
    job_id: JobId | None = None
    limit: int = Field(20, ge=1, le=1000)


class JobList(Wire):
    jobs: list[JobStatus]


class ModelsQuery(Wire):
    pass


class RollbackRequest(Wire):
    kind: Literal["retriever", "generator"]


class PruneRequest(Wire):
    kind: Literal["retriever", "generator"]
    keep: int = Field(2, ge=0,
                      description="the newest versions kept besides those the registry needs")


class PruneResult(Wire):
    removed: list[str] = Field(default_factory=list, description="versions deleted, oldest first")
    freed_bytes: int = 0
    models: RegistryView


class AverageRequest(Wire):
    kind: Literal["retriever", "generator"]
    versions: list[str] = Field(min_length=2, max_length=16,
                                description="registered versions fine-tuned from the same "
                                            "model, e.g. [\"v0002\", \"v0003\"] (retrievers: "
                                            "also in the same mode, against the same passage "
                                            "vectors)")


class AverageResult(Wire):
    version: str = Field(description="the new version: the average of the named ones, "
                                     "not serving")
    models: RegistryView


class InterpolateRequest(Wire):
    kind: Literal["retriever", "generator"]
    version: str = Field(description="the fine-tuned version to move, e.g. \"v0004\"")
    alpha: float = Field(ge=0, le=1, description="its share of the weights: 0 gives "
                                                 "`towards`, 1 the version itself")
    towards: str = Field("base", description="`base` (the model served before any "
                                             "training) or another registered version")


class InterpolateResult(Wire):
    version: str = Field(description="the new version: (1 - alpha) * towards + alpha * version, "
                                     "not serving")
    models: RegistryView


# --- feedback: the production loop --------------------------------------------------------------
_ID = r"^[A-Za-z0-9._:-]{1,64}$"


def _new_id() -> str:
    return uuid.uuid4().hex


class Feedback(Wire):
    """A judged answer: ``right`` (``answer`` is correct; it is reinforced) or ``wrong`` (then
    ``correct_answer`` says what it should have been). One ``rag:feedback`` entry; the trainer
    keeps it (idempotent by ``feedback_id``) until a continual update trains on it as the
    question/answer pair ``(question, target())``. Lengths are checked against
    ``limits.max_question_chars`` / ``trainer.max_answer_chars`` where it enters."""

    feedback_id: str = Field(default_factory=_new_id, pattern=_ID)
    question: NonBlank
    answer: str = Field("", description="the answer that was given")
    verdict: Literal["right", "wrong"]
    correct_answer: str | None = Field(None, description="required when the verdict is "
                                       "wrong: the answer it should have been")
    doc_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=20, description="documents that hold the answer")
    request_id: str | None = Field(None, max_length=64, description="the answered request")

    @model_validator(mode="after")
    def _verdict_has_its_answer(self) -> Feedback:
        if self.verdict == "wrong" and not (self.correct_answer or "").strip():
            raise ValueError("a `wrong` verdict needs `correct_answer`: the answer it should "
                             "have been")
        if self.verdict == "right" and not self.answer.strip():
            raise ValueError("a `right` verdict needs `answer`: the answer that was right")
        if self.verdict == "right" and self.correct_answer is not None:
            raise ValueError("`correct_answer` is for a `wrong` verdict; a `right` one "
                             "confirms `answer`")
        return self

    def target(self) -> str:
        """The answer a model should give: the correction, else the confirmed answer."""
        return (self.correct_answer if self.verdict == "wrong" else self.answer).strip()

    def over_limits(self, max_question_chars: int,
                    max_answer_chars: int) -> list[tuple[str, int, int]]:
        """``(field, characters, limit)`` of each stripped text over its limit: the question,
        the answer given and, for a wrong verdict, the correction (so ``target()`` is always
        covered). One rule for the front that receives feedback and the trainer that stores
        it."""
        texts = [("question", self.question.strip(), max_question_chars),
                 ("answer", self.answer.strip(), max_answer_chars)]
        if self.verdict == "wrong":  # a right verdict's target is its answer
            texts.append(("correct_answer", self.target(), max_answer_chars))
        return [(field, len(text), limit) for field, text, limit in texts
                if len(text) > limit]


class FeedbackRequest(Wire):
    """Body of ``POST /v1/feedback``."""

    items: list[Feedback] = Field(min_length=1, max_length=100)


class FeedbackAccepted(Wire):
    """Reply to ``POST /v1/feedback``: the ``rag:feedback`` entries that carry the items."""

    accepted: int
    feedback_ids: list[str]
    entries: list[str]


class FeedbackQuery(Wire):
    """Ask the trainer what feedback it holds."""


class UpdateRequest(Wire):
    """Start a continual update on the stored feedback now (``ragtune feedback update``)."""

    promote: bool = Field(True, description="serve the candidate if the gate passes it")


class FeedbackState(Wire):
    """What the trainer holds: ``stored`` items waiting for an update, which starts by itself
    at ``update_after`` (0 = only on demand), and the newest update job, if any."""

    stored: int
    update_after: int
    last_update: JobStatus | None = None
