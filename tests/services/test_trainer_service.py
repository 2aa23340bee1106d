"""The trainer service end to end with tiny random models: every job kind runs, registers its
models and can be promoted; bad jobs are refused before any training; the runner publishes
progress and promotions and resumes jobs a crash left behind. Real files, the packaged corpus
(its first 40 documents), no Ray or Redis (the runner's publisher is a list)."""

from __future__ import annotations

import json
import re

import pytest

from services.trainer.runner import TrainerRunner
from services.trainer.service import JobError, TrainerService, UnknownJob
from shared.datasets import load_corpus
from shared.registry import Registry
from shared.schemas import JobQuery, JobRef, PromoteRequest, RollbackRequest, TrainData, TrainJob
from shared.settings import Settings
from tests.tiny import save_tiny_models

N_DOCS = 40

QUICK = {
    "retriever": {"max_steps": 2, "batch_size": 4, "eval_steps": 1, "hard_negatives": 1,
                  "max_length": 48},
    "generator": {"max_steps": 2, "batch_size": 2, "eval_steps": 2, "eval_questions": 2,
                  "warmup_steps": 0, "max_seq_len": 1024},
    "joint": {"max_steps": 1, "batch_size": 2, "n_docs": 2, "warmup_steps": 0},
    "pretrain": {"retriever": {"max_steps": 1, "batch_size": 4, "max_length": 48},
                 "generator": {"max_steps": 1, "block_size": 32, "batch_size": 2,
                               "eval_steps": 1}},
    "distill": {"max_steps": 2, "batch_size": 2, "eval_steps": 2, "eval_questions": 2,
                "warmup_steps": 0, "cache_k": 8, "teacher_batch_size": 4, "heal_steps": 1,
                "heal_block_size": 16},
    "distill_retriever": {"max_steps": 2, "batch_size": 4, "n_passages": 2, "eval_steps": 2,
                          "reader_batch_size": 4},
    "continual": {"steps_per_task": 2, "batch_size": 2, "buffer_size": 8, "top_k": 1,
                  "max_passage_chars": 100, "max_seq_len": 512, "eval_max_new_tokens": 4,
                  "regression_limit": 3},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a tiny BERT encoder and a tiny Llama generator (one byte-level tokenizer)."""
    root = tmp_path_factory.mktemp("tiny-models")
    save_tiny_models(root)
    return root


@pytest.fixture
def settings(models, tmp_path):
    return Settings(home=tmp_path / "home",
                    embedding={"model": str(models / "encoder"), "max_length": 48},
                    generator={"model": str(models / "generator"), "max_new_tokens": 8},
                    trainer={"device": "cpu"})


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Questions about the first documents of the packaged corpus, each naming its document."""
    path = tmp_path_factory.mktemp("data") / "mine.jsonl"
    docs = load_corpus(N_DOCS)
    lines = [{"question": f"What is {d.title} about?", "answer": d.text.split()[0],
              "doc_ids": [d.doc_id]} for d in docs[:24]]
    lines.append({"question": "What is the capital of Atlantis?", "answer": "I don't know."})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def job(kind: str, data_file, **fields) -> TrainJob:
    data = TrainData(sets=[], path=str(data_file), corpus_limit=N_DOCS)
    return TrainJob(kind=kind, data=data, params=QUICK[kind], **fields)


@pytest.mark.parametrize("kind", ["retriever", "generator", "joint", "pretrain", "distill",
                                  "distill_retriever", "continual"])
def test_every_kind_trains_registers_and_promotes(settings, data_file, kind):
    trainer = TrainerService(settings)
    seen = []
    status = trainer.run(job(kind, data_file, promote=True), on_status=seen.append)
    assert status.state == "done", status.error
    expected = {"retriever": ["retriever/v0001"], "generator": ["generator/v0001"],
                "joint": ["retriever/v0001", "generator/v0001"],
                "pretrain": ["retriever/v0001", "generator/v0001"],
                "distill": ["generator/v0001"], "distill_retriever": ["retriever/v0001"],
                "continual": ["generator/v0001"]}[kind]
    assert status.versions == status.promoted == expected
    assert seen[0].state == "running" and seen[-1].state == "done"
    phases = {"distill": ["caching the teacher", "healing the student 0/1",  # before step 1
                          "healing the student 1/1"],
              "distill_retriever": ["encoding the corpus", "reading the passages"],
              "retriever": ["encoding the corpus", "mining hard negatives"],
              "pretrain": ["encoding the corpus"]}
    assert [s.phase for s in seen if s.phase] == phases.get(kind, [])
    assert seen[-1].phase is None
    registry = Registry(settings.checkpoint_dir)
    for ref in expected:
        model_kind, version = ref.split("/")
        assert registry.serving(model_kind).version == version
        assert (registry.serving_path(model_kind) / "ragtune.json").is_file()
    assert trainer.status(status.job_id).state == "done"
    # the finished run keeps its record; models (registered copies), state and caches go
    left = {p.name for p in registry.run_dir(status.job_id).rglob("*") if p.is_file()}
    assert {"job.json", "status.json", "report.json", "report.png"} <= left
    assert kind != "continual" or "replay.jsonl" in left  # the next update replays it
    assert all(name.endswith((".json", ".jsonl", ".png")) for name in left), left
    assert not any(p.name == "model" for p in registry.run_dir(status.job_id).rglob("*"))


def run_seeds_job(settings, data_file, kind: str):
    """A ``kind`` job with ``seeds: [3, 5]``, run to its end: (status, every status seen, its
    soup's version record, the soup's ragtune.json, the job's run folder)."""
    seen = []
    status = TrainerService(settings).run(job(kind, data_file).model_copy(update={"params": {
        **QUICK[kind], "seeds": [3, 5]}}), on_status=seen.append)
    assert status.state == "done", status.error
    assert status.versions == [f"{kind}/v0001"]  # the soup alone
    registry = Registry(settings.checkpoint_dir)
    version = registry.get(kind, "v0001")
    meta = json.loads((registry.path_of(version) / "ragtune.json").read_text())
    run_dir = registry.run_dir(status.job_id)
    assert meta["soup_of"] == [str(run_dir / f"seed-{s}" / "model") for s in (3, 5)]
    for seed in (3, 5):  # each run's record stays, its model goes (the soup is registered)
        record = json.loads((run_dir / f"seed-{seed}" / "report.json").read_text())
        assert record["config"]["seed"] == seed and "seeds" not in record["config"]
    assert not any(p.name == "model" for p in run_dir.rglob("*"))
    return status, seen, version, meta


def test_a_generator_job_with_seeds_trains_each_and_registers_their_soup(settings, data_file):
    status, seen, version, meta = run_seeds_job(settings, data_file, "generator")
    assert status.note == ("the version is the average of the runs of seeds 3, 5; its dev "
                           "metrics on seed 3's dev sample, as that run measured its own")
    assert list(dict.fromkeys(s.phase for s in seen if s.phase)) == [
        "seed 3, 1 of 2", "seed 5, 2 of 2", "soup: dev evaluation"]
    assert seen[-1].phase is None
    # the soup's own dev evaluation: the version's metrics, and the job's last ones
    assert {"em", "f1", "score", "dev_loss"} <= meta["metrics"].keys()
    assert version.metrics == pytest.approx(status.metrics)
    assert version.metrics["dev_loss"] == pytest.approx(meta["metrics"]["dev_loss"])


def test_a_retriever_job_with_seeds_registers_the_soup_of_its_runs(settings, data_file):
    status, seen, version, meta = run_seeds_job(settings, data_file, "retriever")
    assert status.note == ("the version is the average of the runs of seeds 3, 5; its dev "
                           "metrics on the job's dev split")
    phases = list(dict.fromkeys(s.phase for s in seen if s.phase))
    assert phases[0] == "seed 3, 1 of 2: encoding the corpus"
    assert {"seed 3, 1 of 2", "seed 5, 2 of 2: mining hard negatives"} <= set(phases)
    assert phases[-1] == "soup: dev evaluation" and seen[-1].phase is None
    assert not version.reindex and version.passage_version is None  # query mode, base vectors
    assert meta["kind"] == "retriever" and meta["mode"] == "query"
    # the soup's own dev evaluation: the version's metrics, and the job's last ones
    assert set(version.metrics) == {f"best.{m}" for m in ("recall@1", "recall@5", "mrr@10",
                                                          "ndcg@10")}
    assert status.metrics == pytest.approx({k.removeprefix("best."): v
                                            for k, v in version.metrics.items()})


@pytest.mark.parametrize(("kind", "params", "message"), [
    ("retriever", {"temperature": 0}, "temperature"),
    ("generator", {"lr": -1}, "params: lr"),
    ("generator", {"epoch": 2}, "params: epoch: Extra inputs are not permitted"),
    ("generator", {"seeds": [1]}, "params: seeds: List should have at least 2 items"),
    ("generator", {"seeds": [1, 1]}, "params: seeds: Value error, seeds must differ"),
    ("retriever", {"seeds": [2, 2]}, "params: seeds: Value error, seeds must differ"),
    ("joint", {"variant": "tokens"}, "variant"),
    ("pretrain", {"target": "everything"}, "target"),
    # checked with the job, not after the retriever's warm-up has trained
    ("pretrain", {"generator": {"lr": -1}}, "params: generator.lr: Input should be greater"),
    ("pretrain", {"generator": {"block": 8}}, "params: generator.block: Extra inputs"),
])
def test_bad_params_are_refused_before_training(settings, data_file, kind, params, message):
    trainer = TrainerService(settings)
    bad = job(kind, data_file).model_copy(update={"params": params})
    with pytest.raises(JobError, match=message):
        trainer.submit(bad)
    assert trainer.statuses() == []  # nothing queued, nothing trained


def test_bad_data_is_refused_before_training(settings, tmp_path):
    trainer = TrainerService(settings)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long_answer = tmp_path / "long.jsonl"
    long_answer.write_text(json.dumps({"question": "q?", "answer": "x" * 600}) + "\n")
    for path, message in ((empty, "no question/answer pairs"), (long_answer, "over the limit"),
                          (tmp_path / "absent.jsonl", "no such file")):
        bad = TrainJob(kind="generator", data=TrainData(sets=[], path=str(path)))
        with pytest.raises(JobError, match=message):
            trainer.submit(bad)


@pytest.mark.parametrize("text", [
    "",  # empty
    '{"question": "q", "answer": "a"}\nnot json\n',  # malformed
    '{"question": "Capital of Atlantis?", "answer": "I don\'t know."}\n',  # none answerable
])
def test_a_bad_regression_file_is_refused_before_training(settings, data_file, tmp_path, text):
    trainer = TrainerService(settings)
    regression = tmp_path / "regression.jsonl"
    regression.write_text(text)
    bad = job("continual", data_file).model_copy(update={"params": {
        **QUICK["continual"], "regression_path": str(regression)}})
    with pytest.raises(JobError, match=re.escape(f"continual job: regression_path: {regression}")):
        trainer.submit(bad)
    assert trainer.statuses() == []


def test_job_ids_cannot_leave_the_checkpoint_directory():
    with pytest.raises(ValueError, match="job_id"):
        TrainJob(kind="generator", job_id="../../etc")


@pytest.mark.parametrize("job_id", [".", "..", "-x", "a" * 65])
def test_job_ids_must_start_with_a_letter_or_digit(job_id):
    # "." and ".." are the runs folder and the checkpoint directory: a finished job's
    # tidy-up would delete registered weights
    message = f"job id {job_id!r} must be 1 to 64 letters, digits"
    for schema in (TrainJob, JobRef, JobQuery):
        fields = {"kind": "generator"} if schema is TrainJob else {}
        with pytest.raises(ValueError, match=re.escape(message)):
            schema(job_id=job_id, **fields)
    assert TrainJob(kind="generator", job_id="a.b-c_9").job_id == "a.b-c_9"


def test_runner_publishes_progress_and_promotion_and_answers_requests(settings, data_file):
    events = []
    runner = TrainerRunner(TrainerService(settings), events.append)
    try:
        status = runner.submit(job("retriever", data_file, promote=True, job_id="r1"))
        assert status.state == "queued"
        assert runner.wait_idle(120), "the job did not finish in 120 s"
        assert runner.jobs(JobQuery(job_id="r1")).jobs[0].state == "done"
        kinds = [e.kind for e in events]
        assert kinds[-2:] == ["train.finished", "model.promoted"]
        assert events[-1].data == {"kind": "retriever", "version": "v0001"}
        view = runner.rollback(RollbackRequest(kind="retriever"))
        assert view.retriever.serving is None and events[-1].data["version"] is None
        view = runner.promote(PromoteRequest(kind="retriever", version="v0001"))
        assert view.retriever.serving == "v0001"
        with pytest.raises(UnknownJob, match="no job 'nope'"):
            runner.cancel(JobRef(job_id="nope"))
    finally:
        runner.stop()


def test_a_rollback_between_a_promotion_and_its_event_is_what_the_event_names(settings,
                                                                              data_file):
    events = []
    trainer = TrainerService(settings)

    def publish(event):
        events.append(event)
        if event.kind == "train.finished":  # promoted by now; its event not yet sent
            trainer.registry.rollback("retriever")

    runner = TrainerRunner(trainer, publish)
    try:
        runner.submit(job("retriever", data_file, promote=True, job_id="raced"))
        assert runner.wait_idle(120), "the job did not finish in 120 s"
    finally:
        runner.stop()
    assert trainer.registry.serving("retriever") is None
    assert [e.data for e in events if e.kind == "model.promoted"] == [
        {"kind": "retriever", "version": None}]


def test_a_job_submitted_again_before_it_ran_runs_once(settings, data_file):
    trainer = TrainerService(settings)
    queued = job("retriever", data_file, job_id="twice")
    trainer.submit(queued)
    events = []
    runner = TrainerRunner(trainer, events.append)  # queues it as pending
    try:
        assert runner.submit(queued).state in ("queued", "running", "done")
        assert runner.wait_idle(120), "the job did not finish in 120 s"
    finally:
        runner.stop()
    assert [e.data["job_id"] for e in events if e.kind == "train.finished"] == ["twice"]


def test_a_job_resumed_after_it_registered_its_model_adds_no_second_version(settings,
                                                                            data_file):
    trainer = TrainerService(settings)
    crashed = job("retriever", data_file, job_id="registered", promote=True)
    trainer.submit(crashed)
    assert trainer.run(crashed).versions == ["retriever/v0001"]
    # as if the trainer died after registering and promoting, before it recorded "done"
    status = trainer.status("registered").model_copy(update={"state": "running"})
    trainer._write_status(trainer.registry.run_dir("registered"), status)
    assert [j.job_id for j in trainer.pending()] == ["registered"]
    again = trainer.run(crashed)
    assert again.state == "done" and again.versions == ["retriever/v0001"]
    view = trainer.registry.view().retriever
    assert [v.version for v in view.versions] == ["v0001"] and view.serving == "v0001"
    assert view.versions[0].split_seed == crashed.seed  # evaluation's test split is its own


def test_a_job_left_running_by_a_crash_is_resumed_at_start(settings, data_file):
    trainer = TrainerService(settings)
    left = job("retriever", data_file, job_id="crashed")
    trainer.submit(left)
    status = trainer.status("crashed").model_copy(update={"state": "running", "step": 1})
    trainer._write_status(trainer.registry.run_dir("crashed"), status)
    assert [j.job_id for j in trainer.pending()] == ["crashed"]
    runner = TrainerRunner(trainer, lambda _event: None)
    try:
        assert runner.wait_idle(120), "the resumed job did not finish in 120 s"
        assert trainer.status("crashed").state == "done"
    finally:
        runner.stop()


def test_a_queued_job_failing_its_check_when_it_runs_is_recorded_failed(settings, tmp_path):
    # the data file emptied between submit and run: the runner must not leave it queued
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    trainer = TrainerService(settings)
    trainer.submit(TrainJob(kind="generator", job_id="emptied",
                            data=TrainData(sets=[], path=str(data))))
    data.write_text("")
    events = []
    runner = TrainerRunner(trainer, events.append)  # resumes what is queued
    try:
        assert runner.wait_idle(60), "the refused job was not taken off the queue in 60 s"
    finally:
        runner.stop()
    status = trainer.status("emptied")
    assert status.state == "failed"
    assert status.error == f"generator job: {data}: no question/answer pairs in the file"
    assert trainer.pending() == []  # not retried at the next start
    assert [e.data["state"] for e in events if e.kind == "train.finished"] == ["failed"]


def test_a_cancelled_job_submitted_again_is_queued_and_resumes(settings, data_file,
                                                               monkeypatch):
    from services.trainer import runner as runner_module

    # every step's progress is published (not once a second), so the steps seen are all
    monkeypatch.setattr(runner_module, "PROGRESS_EVERY_S", 0.0)
    trainer = TrainerService(settings)
    long_job = job("generator", data_file, job_id="again").model_copy(
        update={"params": {**QUICK["generator"], "max_steps": 4, "save_steps": 1}})
    trainer.submit(long_job)

    def on_status(status):
        if status.step >= 1:
            trainer.cancel("again")

    assert trainer.run(long_job, on_status=on_status).state == "cancelled"
    changed = long_job.model_copy(update={"seed": 7})
    with pytest.raises(JobError, match="'again' is cancelled and was submitted with other seed"):
        trainer.submit(changed)
    events = []
    runner = TrainerRunner(trainer, events.append)  # nothing pending: it was cancelled
    try:
        assert runner.submit(long_job).state == "queued"
        # the runner's thread may have taken it already
        assert trainer.status("again").state in ("queued", "running", "done")
        assert runner.wait_idle(120), "the resubmitted job did not finish in 120 s"
    finally:
        runner.stop()
    steps = [e.data["step"] for e in events if e.kind == "train.progress" and e.data["step"]]
    assert trainer.status("again").state == "done"
    assert steps and min(steps) > 1  # went on from its saved state, not from step 1


def test_cancel_stops_a_job_and_keeps_it_resumable(settings, data_file):
    trainer = TrainerService(settings)
    long_job = job("generator", data_file, job_id="long").model_copy(
        update={"params": {**QUICK["generator"], "max_steps": 50, "save_steps": 1}})
    trainer.submit(long_job)
    cancelled = []

    def on_status(status):
        if status.step >= 1 and not cancelled:
            trainer.cancel("long")
            cancelled.append(status.step)

    status = trainer.run(long_job, on_status=on_status)
    assert status.state == "cancelled" and status.step < 50
    assert (trainer.registry.run_dir("long") / "state.pt").is_file()


@pytest.mark.parametrize("kind", ["generator", "retriever"])
def test_a_cancelled_seeds_job_resumes_without_training_a_finished_seed_again(settings,
                                                                              data_file, kind):
    trainer = TrainerService(settings)
    seeds_job = job(kind, data_file, job_id="seeds").model_copy(update={"params": {
        **QUICK[kind], "max_steps": 4, "save_steps": 1, "seeds": [3, 5]}})
    trainer.submit(seeds_job)

    def on_status(status):
        if status.phase == "seed 5, 2 of 2" and status.step >= 1:
            trainer.cancel("seeds")

    assert trainer.run(seeds_job, on_status=on_status).state == "cancelled"
    seen = []
    status = trainer.run(seeds_job, on_status=seen.append)
    assert status.state == "done" and status.versions == [f"{kind}/v0001"]
    # seed 3 was done: no step of it again; seed 5 goes on from its last state
    assert not [s for s in seen if (s.phase or "").startswith("seed 3") and s.step > 0]
    assert min(s.step for s in seen if s.phase == "seed 5, 2 of 2") > 1
    assert "soup: dev evaluation" in {s.phase for s in seen}
