"""Each job kind as one function: load what it trains on and from, run its loop, return the
saved model folders. A table maps the kind to its config class and its function.

Every kind starts from what serves now (the registry's serving versions, else the packaged
models) and trains on the packaged corpus with the job's questions, split train/dev/test by
the job's seed (test is never seen). A retriever trained for queries only keeps the passage
vectors of the version it started from; its record says which (``passage_version``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.evaluation.retrieval import corpus_embeddings
from services.trainer import continual, loop
from services.trainer.distill import DistillConfig, distill_generator
from services.trainer.generator import (
    BASE_ANSWERS_FILE,
    GeneratorTrainConfig,
    answer_target,
    evaluate_generator,
    load_weights,
    train_generator,
)
from services.trainer.joint import JointTrainConfig, train_joint
from services.trainer.lm import LMTrainConfig, train_lm
from services.trainer.rerank_distill import (
    RankDistillConfig,
    cached_reader_scores,
    distill_retriever,
    reader_loglik,
)
from services.trainer.retriever import (
    RetrieverTrainConfig,
    dev_metrics,
    pretrain_retriever,
    train_retriever,
)
from services.trainer.soup import average_models
from shared import datasets
from shared.datasets import QAItem
from shared.models.encoder import Encoder
from shared.prompt import NO_ANSWER, cut_hit
from shared.registry import META_FILE, Registry, collection_for
from shared.schemas import Document, ModelVersion, PackagedSet, TrainJob, titled_text
from shared.settings import Settings

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"  # a continual update's gate: both models' metrics and the decision



class Output(NamedTuple):
    """One model a job made: its kind, its saved folder, the passage version a query-only
    retriever was trained against; ``promote`` False keeps it out of serving even when the
    job asks to promote; ``note`` says why (the continual update's gate), or what the model
    is (a seeds job's soup)."""

    kind: str
    folder: Path
    passage_version: str | None = None
    promote: bool = True
    note: str | None = None



@dataclass
class Prepared:
    """A checked job: its validated config and its questions by split."""

    job: TrainJob
    config: BaseModel
    splits: dict[str, list[QAItem]]


# --- data -----------------------------------------------------------------------------------
def load_questions(job: TrainJob, settings: Settings) -> dict[str, list[QAItem]]:
    """train/dev/test questions of the job's packaged sets and JSONL file (split by seed).
    Raises ``DataFileError`` (a ValueError) for a bad file."""
    splits: dict[str, list[QAItem]] = {name: [] for name in datasets.SPLITS}
    # A continual update gets every new item as training data and holds out the part its gate
    # checks itself (``run_continual``); of packaged sets it takes the train split, as other
    # kinds do.
    fractions = (1.0, 0.0, 0.0) if job.kind == "continual" else datasets.SPLIT_FRACTIONS
    for name in job.data.sets:
        for split in datasets.SPLITS:
            splits[split] += datasets.load_split(name, split, seed=job.seed)
    if job.data.path is not None:
        items = datasets.load_qa_jsonl(Path(job.data.path),
                                       max_answer_chars=settings.trainer.max_answer_chars,
                                       max_question_chars=settings.limits.max_question_chars)
        for split, part in datasets.split(items, seed=job.seed, fractions=fractions).items():
            splits[split] += part
    if not splits["train"]:
        raise ValueError("the training split is empty: give more questions")
    return splits


def job_corpus(job: TrainJob, settings: Settings) -> list[Document]:
    """The documents the job retrieves passages from (``TrainData.corpus``): the packaged
    corpus, or every document the sparse store under ``settings.home`` holds — what serving
    retrieves from, documents ingested since included. ``corpus_limit`` keeps the first N.
    Raises ValueError when the indexed corpus is asked for and the store holds none."""
    if job.data.corpus == "packaged":
        return datasets.load_corpus(job.data.corpus_limit)
    from services.sparse.service import SparseService

    docs: list[Document] = []
    if has_indexed_corpus(settings):  # never create a store just to find it empty
        store = SparseService.from_settings(settings)
        try:
            docs = store.documents()
        finally:
            store.close()
    if not docs:
        raise ValueError(f"no indexed documents under {settings.sparse_dir}: ingest some "
                         "first, or train on the packaged corpus (data.corpus: packaged)")
    return docs[:job.data.corpus_limit] if job.data.corpus_limit else docs


def has_indexed_corpus(settings: Settings) -> bool:
    """Whether a sparse store (what ``ragtune up`` indexes into) lies under ``settings``' home."""
    from services.sparse.service import DB_NAME

    return (settings.sparse_dir / DB_NAME).is_file()


# --- models: what serves now ------------------------------------------------------------------
def chosen_version(registry: Registry, kind: str, version: str | None) -> ModelVersion | None:
    """The registered ``version`` of ``kind`` (``RegistryError`` for an unknown one); None
    names the serving one, "base" the configured/packaged model (None)."""
    if version is None:
        return registry.serving(kind)
    return None if version == "base" else registry.get(kind, version)


def serving_encoders(settings: Settings, registry: Registry, device, version: str | None = None,
                     ) -> tuple[Encoder, ModelVersion | None, Encoder, ModelVersion | None]:
    """(passage encoder, its version, query encoder, its version) of the serving retriever;
    with ``version``, of that registered version ("base": the configured/packaged encoder)
    instead (``RegistryError`` for an unknown one)."""
    serving = chosen_version(registry, "retriever", version)
    passage = registry.passage_side(serving)

    def load(version: ModelVersion | None) -> Encoder:
        return _encoder_on(settings, None if version is None else registry.path_of(version),
                           device)

    passage_encoder = load(passage)
    query_encoder = passage_encoder if serving == passage else load(serving)
    return passage_encoder, passage, query_encoder, serving


def corpus_vectors(settings: Settings, passage_encoder: Encoder,
                   passage_version: ModelVersion | None, corpus: list[Document],
                   progress: bool = True) -> np.ndarray:
    """``corpus_embeddings`` of the serving passage encoder (``passage_version``'s), cached
    under the home, taking what ``indexed_vectors`` finds on a cache miss."""
    return corpus_embeddings(passage_encoder, corpus, settings.home / "cache", progress=progress,
                             known=indexed_vectors(settings, passage_encoder, passage_version,
                                                   corpus))


def indexed_vectors(settings: Settings, passage_encoder: Encoder,
                    passage_version: ModelVersion | None, corpus: list[Document],
                    ) -> Callable[[], dict[str, np.ndarray]]:
    """For ``corpus_embeddings``' ``known``: with ragtune up, the vectors that
    ``passage_version``'s Milvus collection already holds of ``corpus`` (documents indexed whole
    and unchanged: nearly all of the packaged corpus), so that a first job after ``ragtune up``
    does not encode them again. Without a Milvus URI (ragtune down), or when reading it fails
    (a warning), none."""

    def read() -> dict[str, np.ndarray]:
        if not settings.milvus.uri:
            return {}
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        from services.embedding.index import DenseIndex

        collection = collection_for(settings.milvus.collection, passage_version)
        try:
            client = MilvusClient(uri=settings.milvus.uri)
            try:
                if not client.has_collection(collection):
                    return {}
                index = DenseIndex(client, collection, passage_encoder.dim)
                return index.whole_document_vectors(corpus)
            finally:
                client.close()
        except (MilvusException, ValueError) as exc:
            log.warning("could not read the passage vectors of Milvus collection %r (%s): "
                        "encoding the corpus instead", collection, exc)
            return {}

    return read


def _encoder_on(settings: Settings, folder: Path | None, device) -> Encoder:
    """The encoder saved in ``folder`` (None: the configured/packaged one) on ``device``."""
    encoder = Encoder.from_settings(settings, None if folder is None else str(folder))
    encoder.model.to(device)
    return encoder


def serving_generator(settings: Settings, registry: Registry, version: str | None = None):
    """(model, tokenizer) of the serving generator version, else the configured/packaged one,
    fp32 on the CPU; with ``version``, that registered version ("base": the configured/packaged
    one) instead of the serving one (``RegistryError`` for an unknown one)."""
    from shared.models.generator import load_generator

    # Loaded in fp32 on the CPU: the loops move it to their device and use bf16 autocast
    # there (a bf16 copy, as serving loads it on CUDA, would train in bf16 throughout).
    update: dict[str, Any] = {"device": "cpu"}
    chosen = chosen_version(registry, "generator", version)
    if chosen is not None:
        update["model"] = str(registry.path_of(chosen))
    return load_generator(settings.model_copy(update={
        "generator": settings.generator.model_copy(update=update)}))


def _retrieval(settings: Settings, registry: Registry, corpus: list[Document], device):
    """The serving retrieval (hybrid, serving fusion), in-process, for building prompts."""
    from services.evaluation.qa import HybridRetriever

    passage_encoder, passage_version, query_encoder, _ = serving_encoders(settings, registry,
                                                                         device)
    vectors = corpus_vectors(settings, passage_encoder, passage_version, corpus)
    return HybridRetriever(query_encoder, corpus, doc_vectors=vectors,
                           candidates=settings.retrieval.candidates,
                           mode=settings.retrieval.mode, weight=settings.retrieval.weight,
                           rrf_k=settings.retrieval.rrf_k)


# --- the kinds --------------------------------------------------------------------------------
Context = dict[str, Any]


class SeededRuns(BaseModel):
    """``seeds``: train once per seed (example order, negatives or abstention picks, dev
    sample; the split stays the job's) and register the uniform average of the runs, a soup
    (``services/trainer/soup.py``). bench/RESULTS.md: the soup of two generator seeds met every
    capital target where neither seed did; the soup of three query-encoder seeds kept the
    capitals that one run in several loses."""

    seeds: list[int] | None = Field(None, min_length=2, max_length=8,
                                    description="train once per seed and register the average "
                                                "of the runs (None: one run, seed `seed`)")

    @field_validator("seeds")
    @classmethod
    def _different(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must differ, got {seeds}")
        return seeds


def _one_run_per_seed(config: BaseModel, run_class: type[BaseModel]) -> list[BaseModel]:
    """``config`` (a ``SeededRuns``) as one ``run_class`` config per seed."""
    seeds = config.seeds or [config.seed]
    return [run_class.model_validate({**config.model_dump(exclude={"seeds"}), "seed": seed})
            for seed in seeds]


def _seed_progress(progress: loop.ProgressFn, seed: int, n: int, runs: int,
                   last: list[loop.Progress]) -> loop.ProgressFn:
    """``progress`` with "seed S, N of RUNS" as the phase (before the run's own phase, if it
    has one); ``last`` keeps the latest step, without metrics, for the soup's reports."""
    if runs == 1:
        return progress
    label = f"seed {seed}, {n} of {runs}"

    def report(step: loop.Progress) -> None:
        progress(replace(step, phase=f"{label}: {step.phase}" if step.phase else label))
        last[:] = [replace(step, metrics={})]
    return report


def _soup_note(seeds: list[int], metrics: dict[str, Any], measured_on: str) -> str:
    """The job's note on its soup: what it averages, where its metrics come from."""
    dev = f"its dev metrics {measured_on}" if metrics else "not evaluated (no dev question)"
    return f"the version is the average of the runs of seeds {', '.join(map(str, seeds))}; {dev}"


class RetrieverJobConfig(RetrieverTrainConfig, SeededRuns):
    """A ``retriever`` job: one fine-tuning run, or with ``seeds`` one run per seed averaged
    into one encoder (``SeededRuns``)."""


def run_retriever(p: Prepared, settings: Settings, run_dir: Path, progress, should_stop,
                  ) -> list[Output]:
    """One run into ``run_dir``; with ``seeds``, one run per seed into ``run_dir/seed-N``
    (each resumable on its own) and their soup, evaluated on dev against the passage vectors
    it serves with (the serving ones in "query" mode, the corpus embedded again in "both")."""
    config: RetrieverJobConfig = p.config
    registry = Registry(settings.checkpoint_dir)
    device, _ = loop.pick_device(settings.trainer.device)
    corpus = job_corpus(p.job, settings)
    passage_encoder, passage_version, _, _ = serving_encoders(settings, registry, device)
    runs = _one_run_per_seed(config, RetrieverTrainConfig)
    results = []
    last: list[loop.Progress] = []
    for n, one in enumerate(runs, start=1):
        results.append(train_retriever(
            one, passage_encoder, p.splits["train"], p.splits["dev"], corpus,
            run_dir if len(runs) == 1 else run_dir / f"seed-{one.seed}",
            _seed_progress(progress, one.seed, n, len(runs), last), should_stop,
            cache_dir=settings.home / "cache",
            known_vectors=indexed_vectors(settings, passage_encoder, passage_version, corpus)))
    keep = None if results[0].reindex or passage_version is None else passage_version.version
    if len(results) == 1:
        return [Output("retriever", results[0].model_dir, keep)]
    soup = average_models([r.model_dir for r in results], run_dir / loop.MODEL_DIR)
    if last:
        progress(replace(last[0], phase="soup: dev evaluation"))
    encoder = _encoder_on(settings, soup, device)
    vectors = (corpus_embeddings(encoder, corpus, None, progress=True) if results[0].reindex
               else corpus_vectors(settings, passage_encoder, passage_version, corpus))
    metrics = dev_metrics(encoder, vectors, corpus, p.splits["dev"])
    _record_metrics(soup, {"best": metrics})
    if last and metrics:
        progress(replace(last[0], phase=None, metrics=metrics))
    note = _soup_note([r.seed for r in runs], metrics, "on the job's dev split")
    return [Output("retriever", soup, keep, note=note)]


class GeneratorJobConfig(GeneratorTrainConfig, SeededRuns):
    """A ``generator`` job: one fine-tuning run, or with ``seeds`` one run per training seed
    averaged into one model (``SeededRuns``)."""


def run_generator(p: Prepared, settings: Settings, run_dir: Path, progress, should_stop,
                  ) -> list[Output]:
    """One run into ``run_dir``; with ``seeds``, one run per seed into ``run_dir/seed-N``
    (each resumable on its own: a finished one resumes at its end) and their soup, evaluated
    on the first seed's dev sample (its metrics are the version's)."""
    config: GeneratorJobConfig = p.config
    registry = Registry(settings.checkpoint_dir)
    device, _ = loop.pick_device(config.device)
    corpus = job_corpus(p.job, settings)
    runs = _one_run_per_seed(config, GeneratorTrainConfig)
    folders: list[Path] = []
    last: list[loop.Progress] = []
    with _retrieval(settings, registry, corpus, device) as retrieval:
        for n, one in enumerate(runs, start=1):
            model, tokenizer = serving_generator(settings, registry)  # each seed starts afresh
            result = train_generator(
                one, model, tokenizer, p.splits["train"], p.splits["dev"], retrieval,
                run_dir if len(runs) == 1 else run_dir / f"seed-{one.seed}",
                progress=_seed_progress(progress, one.seed, n, len(runs), last),
                should_stop=should_stop, base_answers_file=run_dir / BASE_ANSWERS_FILE)
            folders.append(result.model_dir)
            del model
        if len(folders) == 1:
            return [Output("generator", folders[0])]
        soup = average_models(folders, run_dir / loop.MODEL_DIR)
        if last:
            progress(replace(last[0], phase="soup: dev evaluation"))
        model, tokenizer = serving_generator(settings, registry)
        load_weights(model, soup)
        metrics = evaluate_generator(runs[0], model, tokenizer, p.splits["dev"], retrieval)
    _record_metrics(soup, metrics)
    if last and metrics:
        progress(replace(last[0], phase=None, metrics=metrics))
    note = _soup_note([r.seed for r in runs], metrics,
                      f"on seed {runs[0].seed}'s dev sample, as that run measured its own")
    return [Output("generator", soup, note=note)]


def _record_metrics(model_dir: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` into the saved model's ``ragtune.json`` (what the registry records)."""
    meta = loop.read_meta(model_dir)
    meta["metrics"] = metrics
    (model_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def run_joint(p: Prepared, settings: Settings, run_dir: Path, progress, should_stop,
              ) -> list[Output]:
    """Joint RAG training: the query encoder (against the serving passage vectors, which stay)
    and the generator, together, through the answer loss."""
    config: JointTrainConfig = p.config
    registry = Registry(settings.checkpoint_dir)
    device, _ = loop.pick_device(config.device)
    corpus = job_corpus(p.job, settings)
    passage_encoder, passage_version, query_encoder, _ = serving_encoders(settings, registry,
                                                                         device)
    vectors = corpus_vectors(settings, passage_encoder, passage_version, corpus)
    model, tokenizer = serving_generator(settings, registry)
    result = train_joint(config, query_encoder, model, tokenizer, corpus, vectors,
                         p.splits["train"], run_dir, progress=progress, should_stop=should_stop)
    keep = None if passage_version is None else passage_version.version
    return [Output("retriever", result.retriever_dir, keep),
            Output("generator", result.generator_dir)]


class PretrainParams(BaseModel):
    """``pretrain`` job: continued LM training of the generator on the corpus text and/or the
    unsupervised contrastive warm-up of the retriever (two crops of one document).
    ``generator`` is validated with the job (an error names ``generator.<field>``); the
    fields it leaves unset take the job's ``seed`` and the trainer's device."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field("both", pattern="^(generator|retriever|both)$")
    retriever: RetrieverTrainConfig = Field(default_factory=RetrieverTrainConfig)
    generator: LMTrainConfig = Field(default_factory=LMTrainConfig)


def run_pretrain(p: Prepared, settings: Settings, run_dir: Path, progress, should_stop,
                 ) -> list[Output]:
    params: PretrainParams = p.config
    registry = Registry(settings.checkpoint_dir)
    device, _ = loop.pick_device(settings.trainer.device)
    corpus = job_corpus(p.job, settings)
    outputs: list[Output] = []
    if params.target in ("retriever", "both"):
        passage_encoder, passage_version, _, _ = serving_encoders(settings, registry, device)
        result = pretrain_retriever(params.retriever, passage_encoder, corpus,
                                    run_dir / "retriever", progress, should_stop,
                                    dev_items=p.splits["dev"], cache_dir=settings.home / "cache",
                                    known_vectors=indexed_vectors(settings, passage_encoder,
                                                                  passage_version, corpus))
        keep = None if result.reindex or passage_version is None else passage_version.version
        outputs.append(Output("retriever", result.model_dir, keep))
    if params.target in ("generator", "both"):
        config = LMTrainConfig.model_validate(
            {"device": settings.trainer.device, "seed": p.job.seed,
             **params.generator.model_dump(exclude_unset=True)})
        model, tokenizer = serving_generator(settings, registry)
        result = train_lm(config, model, tokenizer, [titled_text(d.title, d.text) for d in corpus],
                          run_dir / "generator", progress=progress, should_stop=should_stop)
        outputs.append(Output("generator", result.model_dir))
    return outputs


def run_distill(p: Prepared, settings: Settings, run_dir: Path, progress, should_stop,
                ) -> list[Output]:
    """Generator teacher -> student (``services/trainer/distill.py``): the serving generator
    teaches a smaller one (a subset of its layers, or ``student_model``) on serving's prompts;
    the student is a generator version."""
    config: DistillConfig = p.config
    registry = Registry(settings.checkpoint_dir)
    device, _ = loop.pick_device(config.device)
    corpus = job_corpus(p.job, settings)
    heal_texts = [titled_text(d.title, d.text) for d in corpus] if config.heal_steps else []
    with _retrieval(settings, registry, corpus, device) as retrieval:
        result = distill_generator(config, lambda: serving_generator(settings, registry),
                                   p.splits["train"], p.splits["dev"], retrieval, run_dir,
                                   heal_texts=heal_texts, progress=progress,
                                   should_stop=should_stop)
    return [Output("generator", result.model_dir)]


def run_distill_retriever(p: Prepared, settings: Settings, run_dir: Path, progress,
                          should_stop) -> list[Output]:
    """Reader -> query encoder (``services/trainer/rerank_distill.py``): the serving
    generator's likelihoods (``reader_signal``) over each training question's retrieved
    passages, with the serving query encoder as the prior (``prior_weight``), teach that
    encoder; documents keep the serving passage vectors (no re-index). No document labels
    needed. (The reranker's distillation has no job kind yet: the registry
    holds no "reranker" kind to version it under.)"""
    config: RankDistillConfig = p.config
    registry = Registry(settings.checkpoint_dir)
    device, _ = loop.pick_device(config.device)
    corpus = job_corpus(p.job, settings)
    passage_encoder, passage_version, query_encoder, _ = serving_encoders(settings, registry,
                                                                         device)
    before_steps = loop.Reporter(progress, p.job.kind, 0, loop.Clock())
    before_steps.phase("encoding the corpus")
    vectors = corpus_vectors(settings, passage_encoder, passage_version, corpus)

    def score():
        before_steps.phase("reading the passages")
        with _retrieval(settings, registry, corpus, device) as retrieval:
            model, tokenizer = serving_generator(settings, registry)
            return reader_loglik(model, tokenizer, p.splits["train"], retrieval,
                                 config.n_passages, signal=config.reader_signal,
                                 max_passage_chars=config.max_passage_chars,
                                 batch_size=config.reader_batch_size)

    lists = cached_reader_scores(run_dir, score)  # a resumed job does not load the reader
    result = distill_retriever(config, query_encoder, lists, corpus, vectors, run_dir,
                               dev_items=p.splits["dev"], progress=progress,
                               should_stop=should_stop)
    keep = None if passage_version is None else passage_version.version
    return [Output("retriever", result.model_dir, keep)]


class ContinualJobConfig(continual.ContinualConfig):
    """``continual`` job: one production update of the serving generator on new
    question/answer pairs (``ContinualConfig``), then the promotion gate.

    The gate answers a frozen regression set — ``regression_path`` (a question/answer JSONL
    file), else the first ``regression_limit`` answerable questions of the ``regression_sets``'
    dev split drawn with ``regression_seed`` (never trained on: updates take train splits) —
    and the new items' held-out part (``hold_out``), with the serving model and with the
    candidate; the candidate may serve only if its regression accuracy drops by at most
    ``tolerance`` and it is not worse on those new items (``continual.gate``).

    The replay reservoir is the one saved by the update that made the serving generator; with
    none (the serving model came from elsewhere), it starts from the ``regression_sets``'
    train split (unless ``seed_buffer`` is off) — the questions whose passages show their
    answer —, so that replay has earlier examples from the first update on.
    """

    tolerance: float = Field(0.02, ge=0, le=1, description="regression accuracy the "
                             "candidate may lose (absolute)")
    regression_sets: list[PackagedSet] = Field(default_factory=lambda: ["capitals", "fanout"])
    regression_path: str | None = None
    regression_limit: int = Field(40, ge=1)
    regression_seed: int = 13
    seed_buffer: bool = Field(True, description="start an empty reservoir from the "
                              "regression sets' train split")

    @field_validator("regression_path")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"no such regression file {value!r}")
        return value


def regression_set(config: ContinualJobConfig, settings: Settings) -> list[QAItem]:
    """The gate's frozen regression questions (see ``ContinualJobConfig``): at least one.
    Raises ``DataFileError`` (a ValueError) naming ``regression_path`` for a bad file or one
    without an answerable question, ValueError when ``regression_sets`` give none."""
    if config.regression_path is not None:
        path = Path(config.regression_path)
        try:
            items = datasets.load_qa_jsonl(
                path, max_answer_chars=settings.trainer.max_answer_chars,
                max_question_chars=settings.limits.max_question_chars)
        except datasets.DataFileError as exc:
            raise datasets.DataFileError(f"regression_path: {exc}") from None
        answerable = [i for i in items if i.answerable][:config.regression_limit]
        if not answerable:
            raise datasets.DataFileError(
                f"regression_path: {path}: no answerable question (every answer is "
                f"{NO_ANSWER!r}): the gate's regression set needs some")
        return answerable
    items = [i for name in config.regression_sets
             for i in datasets.load_split(name, "dev", seed=config.regression_seed)
             if i.answerable]
    if not items:
        raise ValueError(f"regression_sets {config.regression_sets} hold no answerable dev "
                         "question: name capitals or fanout, or a regression_path")
    return items[:config.regression_limit]


def serving_buffer(config: ContinualJobConfig, registry: Registry,
                   retrieval) -> continual.Reservoir:
    """The replay reservoir saved by the update that made the serving generator, else one
    seeded with the regression sets' train split, retrieved with ``retrieval`` (see
    ``ContinualJobConfig``)."""
    serving = registry.serving("generator")
    if serving is not None and serving.job_id is not None:
        path = registry.run_dir(serving.job_id) / continual.BUFFER_FILE
        if path.is_file():
            return continual.load_buffer(path, config.buffer_size, config.seed)
    buffer: continual.Reservoir = continual.Reservoir(config.buffer_size, config.seed)
    if not config.seed_buffer:
        return buffer
    earlier = [i for name in config.regression_sets
               for i in datasets.load_split(name, "train", seed=config.regression_seed)]
    recs = continual.records(earlier, retrieval, continual.hits_needed(config))
    # Only questions whose prompt shows their answer: the others would train "I don't know."
    # (grounded targets), a behaviour the serving model may never have had; replaying them
    # taught the packaged model to abstain on questions it answered.
    buffer.extend(r for r in recs if shows_answer(r, config))
    return buffer


def shows_answer(rec: continual.Record, config: continual.ContinualConfig) -> bool:
    """Whether ``rec``'s first ``top_k`` passages, cut as the prompt shows them, hold one of
    its answers (its training target is an answer, not "I don't know.")."""
    shown = [cut_hit(h, config.max_passage_chars) for h in rec.passages[:config.top_k]]
    return answer_target(rec.item, shown) != NO_ANSWER


def hold_out(job: TrainJob, items: list[QAItem]) -> tuple[continual.Task, bool]:
    """The update's new items as a task (``continual.batch_task``, split by the job's seed):
    it trains on ``train``, and the gate's new-data check answers ``test``, items it never
    trained on; True when so. A batch too small for the split to hold an item out (or to leave
    one to train on) trains on every item and is checked on those same items: False."""
    try:
        task = continual.batch_task(job.job_id, items, seed=job.seed)
    except ValueError:  # every item fell in the held-out part (``items`` is never empty)
        task = None
    if task is None or not task.test:
        return continual.Task(job.job_id, (), list(items), list(items)), False
    return task, True


def run_continual(p: Prepared, settings: Settings, run_dir: Path, progress, should_stop,
                  ) -> list[Output]:
    """One continual update of the serving generator on the job's questions, gated: the
    candidate is registered either way, promoted (with ``job.promote``) only if the gate
    passes it; the gate's metrics and reason go into the version, ``gate.json`` and the job's
    note. The update trains on the questions but a held-out part, which the gate's new-data
    check answers (``hold_out``; on the trained ones when the batch is too small, and
    ``gate.json``'s ``new_data_held_out`` and the note say so)."""
    config: ContinualJobConfig = p.config
    registry = Registry(settings.checkpoint_dir)
    device, _ = loop.pick_device(config.device)
    corpus = job_corpus(p.job, settings)
    task, held_out = hold_out(p.job, p.splits["train"])
    regression = regression_set(config, settings)
    with _retrieval(settings, registry, corpus, device) as retrieval:
        buffer = serving_buffer(config, registry, retrieval)
        model, tokenizer = serving_generator(settings, registry)
        model.to(device)
        serving = continual.gate_metrics(model, tokenizer, regression, task.test, retrieval,
                                         config)
        result = continual.continual_update(config, model, tokenizer, task.train, buffer,
                                            retrieval, run_dir, progress=progress,
                                            should_stop=should_stop)
        candidate = continual.gate_metrics(result.model, tokenizer, regression, task.test,
                                           retrieval, config)
    promote, reason = continual.gate(candidate, serving, config.tolerance)
    if not held_out:
        reason += (f" ({continual.NEW_DATA} measured on the {len(task.train)} trained items: "
                   "too few new items to hold any out)")
    metrics = {**{f"serving_{k}": v for k, v in serving.items()},
               **{f"candidate_{k}": v for k, v in candidate.items()}}
    _record_metrics(result.model_dir, metrics)
    (run_dir / GATE_FILE).write_text(json.dumps(
        {"promote": promote, "reason": reason, "tolerance": config.tolerance,
         "regression_items": len(regression), "new_items": len(p.splits["train"]),
         "train_items": len(task.train), "held_out_items": len(task.test) if held_out else 0,
         "new_data_held_out": held_out, **metrics}, indent=1))
    log.info("continual update %s: %s", p.job.job_id, reason)
    progress(loop.Progress(kind=continual.KIND, step=result.steps, total_steps=result.steps,
                           loss=result.history[-1]["loss"] if result.history else None,
                           lr=0.0, elapsed_s=result.seconds, metrics=metrics))
    return [Output("generator", result.model_dir, promote=promote, note=reason)]


# kind -> (config class validated from the job's params, runner)
Runner = Callable[[Prepared, Settings, Path, loop.ProgressFn, Callable[[], bool]], list[Output]]
KINDS: dict[str, tuple[type[BaseModel], Runner]] = {
    "retriever": (RetrieverJobConfig, run_retriever),
    "generator": (GeneratorJobConfig, run_generator),
    "pretrain": (PretrainParams, run_pretrain),
    "joint": (JointTrainConfig, run_joint),
    "distill": (DistillConfig, run_distill),
    "distill_retriever": (RankDistillConfig, run_distill_retriever),
    "continual": (ContinualJobConfig, run_continual),
}


def prepare(job: TrainJob, settings: Settings) -> Prepared:
    """Validate the job's params against its kind's config and load its questions.
    Raises ValueError (pydantic's ValidationError included) naming what is wrong."""
    if job.kind not in KINDS:
        raise ValueError(f"unknown job kind {job.kind!r}; known: {', '.join(KINDS)}")
    config_class, _ = KINDS[job.kind]
    params = dict(job.params)
    if "seed" in config_class.model_fields and "seed" not in params:
        params["seed"] = job.seed
    if "device" in config_class.model_fields and "device" not in params:
        params["device"] = settings.trainer.device
    config = config_class.model_validate(params)
    if job.data.corpus == "indexed":
        job_corpus(job, settings)  # refused now, not after the questions and models load
    if isinstance(config, ContinualJobConfig):
        regression_set(config, settings)  # the same: a bad regression file is refused now
    return Prepared(job=job, config=config, splits=load_questions(job, settings))


def execute(p: Prepared, settings: Settings, run_dir: Path, progress: loop.ProgressFn,
            should_stop: Callable[[], bool]) -> list[Output]:
    """Run the prepared job; returns what it saved. Raises ``loop.Cancelled`` on cancel."""
    _, runner = KINDS[p.job.kind]
    return runner(p, settings, run_dir, progress, should_stop)
