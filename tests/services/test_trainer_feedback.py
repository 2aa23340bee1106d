"""The production feedback loop on the trainer's side, with tiny random models: the feedback
store (idempotent, nothing lost), the runner starting an update when enough arrived or on
demand, the ``continual`` job's promotion gate blocking a deliberately bad update and
promoting a good one, and the trainer's worker reading ``rag:feedback`` from a real valkey."""

from __future__ import annotations

import json

import pytest

from deploy.workers import trainer_worker
from services.sparse.service import SparseService
from services.trainer import continual as cl
from services.trainer import jobs
from services.trainer.feedback import DATA_FILE, ITEMS_FILE, STORE_DIR, FeedbackStore
from services.trainer.runner import TrainerRunner
from services.trainer.service import STATUS_FILE, JobError, TrainerService
from shared import keys
from shared.bus import FIELD, dead_letters
from shared.datasets import QAItem, load_corpus, load_qa_jsonl, load_split
from shared.registry import Registry
from shared.schemas import (
    Document,
    Envelope,
    Feedback,
    IngestBatch,
    JobStatus,
    TrainData,
    TrainJob,
    UpdateRequest,
)
from tests.conftest import make_bus
from tests.services.test_trainer_service import (  # noqa: F401
    N_DOCS,
    QUICK,
    data_file,
    models,
    settings,
)
from tests.tiny import CITIES

TINY = {"top_k": 1, "max_passage_chars": 100, "max_seq_len": 512, "max_answer_tokens": 16,
        "eval_max_new_tokens": 12, "batch_size": 2, "buffer_size": 8, "seed_buffer": False}


def wrong(n: int, **fields) -> Feedback:
    return Feedback(question=f"What is the capital of Land{n}?", answer="Paris",
                    verdict="wrong", correct_answer=CITIES[n], **fields)


def wait_done(runner: TrainerRunner, job_id: str, timeout_s: float = 120.0):
    assert runner.wait_idle(timeout_s), f"job {job_id} did not finish in {timeout_s} s"
    return runner.service.status(job_id)


# --- the store --------------------------------------------------------------------------------
def test_the_store_keeps_each_item_once_and_hands_all_of_it_to_an_update(tmp_path):
    store = FeedbackStore(tmp_path / "feedback")
    first = wrong(0, feedback_id="a")
    assert store.add(first) == 1
    assert store.add(first) == 1  # a re-delivered entry is not stored twice
    right = Feedback(question="Capital of Land1?", answer=CITIES[1], verdict="right",
                     feedback_id="b", doc_ids=["d1"])
    assert store.add(right) == 2
    assert FeedbackStore(tmp_path / "feedback").count() == 2  # it is on disk
    run_dir = tmp_path / "runs" / "u1"
    assert store.take(run_dir) == 2 and store.count() == 0
    items = load_qa_jsonl(run_dir / DATA_FILE)
    assert [(i.id, i.answers, i.doc_ids) for i in items] == [
        ("feedback:a", [CITIES[0]], []), ("feedback:b", [CITIES[1]], ["d1"])]
    assert store.take(tmp_path / "runs" / "u2") == 0
    assert not (tmp_path / "runs" / "u2").exists()
    # an update that could not be queued gives everything back
    assert store.restore(run_dir) == 2
    assert [json.loads(x)["feedback_id"] for x in store.path.read_text().splitlines()] == \
        ["a", "b"]
    assert (run_dir / ITEMS_FILE).is_file()
    store.path.write_text(store.path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"pending.jsonl:3: not a stored feedback item"):
        FeedbackStore(tmp_path / "feedback").count()


def test_an_item_an_update_took_is_not_stored_again_until_it_is_restored(tmp_path):
    """The bus delivers at least once and clients resend: an id an update took stays known,
    also to the store a restarted trainer opens."""
    store = FeedbackStore(tmp_path / "feedback")
    fb = wrong(0, feedback_id="a")
    assert store.add(fb) == 1 and store.add(fb) == 1
    run1 = tmp_path / "runs" / "u1"
    assert store.take(run1) == 1
    assert store.add(fb) == 0  # re-delivered after the update took it
    assert FeedbackStore(tmp_path / "feedback").add(fb) == 0  # and after a restart
    assert store.add(wrong(1, feedback_id="b")) == 1  # others still arrive
    run2 = tmp_path / "runs" / "u2"
    assert store.take(run2) == 1
    assert [i.id for i in load_qa_jsonl(run2 / DATA_FILE)] == ["feedback:b"]  # not "a" again
    # an update that could not be queued: its items are stored again, and taken again later
    assert store.restore(run1) == 1 and store.add(fb) == 1
    assert FeedbackStore(tmp_path / "feedback").count() == 1
    assert FeedbackStore(tmp_path / "feedback").add(wrong(1, feedback_id="b")) == 1  # u2 kept it
    assert store.take(tmp_path / "runs" / "u3") == 1 and store.add(fb) == 0
    store.taken_path.write_text(store.taken_path.read_text() + "{torn\n")
    with pytest.raises(ValueError, match=r"taken.jsonl:3: not a taken feedback id"):
        FeedbackStore(tmp_path / "feedback").add(fb)


def test_feedback_an_update_took_but_never_queued_is_stored_again_at_start(settings):  # noqa: F811
    """A trainer stopped between taking the items and queueing their job leaves them only in a
    run folder without a status: the next start puts them back; a queued update keeps its own."""
    trainer = TrainerService(settings)
    store = FeedbackStore(trainer.registry.root / STORE_DIR)
    store.add(wrong(0, feedback_id="queued"))
    queued = trainer.registry.run_dir("feedback-1-queued")
    store.take(queued)
    (queued / STATUS_FILE).write_text(JobStatus(job_id=queued.name, kind="continual",
                                                state="done").model_dump_json())
    for n in (1, 2):
        store.add(wrong(n, feedback_id=f"lost-{n}"))
    lost = trainer.registry.run_dir("feedback-2-lost")
    store.take(lost)
    runner = TrainerRunner(trainer, lambda _event: None)
    try:
        assert runner.feedback_state().stored == 2
        assert not lost.exists() and (queued / ITEMS_FILE).is_file()
        runner.feedback(wrong(1, feedback_id="lost-1"))  # stored once, as before
        runner.feedback(wrong(0, feedback_id="queued"))  # still taken by its update
        assert runner.feedback_state().stored == 2
        assert [json.loads(x)["feedback_id"] for x in store.path.read_text().splitlines()] == \
            ["lost-1", "lost-2"]
    finally:
        runner.stop()


# --- the runner: enough feedback, or on demand, starts an update -------------------------------
def test_progress_events_are_throttled_but_a_new_phase_always_goes_out(settings):  # noqa: F811
    events = []
    runner = TrainerRunner(TrainerService(settings), events.append)
    try:
        def status(step, phase=None, state="running"):
            return JobStatus(job_id="j", kind="distill", state=state, step=step, phase=phase)

        for s in (status(0, "choosing layers 0/2"), status(0, "choosing layers 1/2"),
                  status(0, "caching the teacher"), status(1), status(2), status(3),
                  status(3, state="done")):
            runner._on_status(s)  # all within a second
        assert [(e.kind, e.data["step"], e.data["phase"]) for e in events] == [
            ("train.progress", 0, "choosing layers 0/2"),
            ("train.progress", 0, "choosing layers 1/2"),
            ("train.progress", 0, "caching the teacher"),
            ("train.progress", 1, None), ("train.finished", 3, None)]
    finally:
        runner.stop()


def test_enough_feedback_starts_a_gated_update_and_nothing_is_lost(settings, tmp_path):  # noqa: F811
    params = {**TINY, "steps_per_task": 2, "regression_sets": ["capitals"],
              "regression_limit": 2}
    settings = settings.model_copy(update={"feedback": settings.feedback.model_copy(
        update={"update_after": 3, "params": params})})
    runner = TrainerRunner(TrainerService(settings), lambda _event: None)
    try:
        with pytest.raises(JobError, match="no feedback stored"):
            runner.update(UpdateRequest())
        with pytest.raises(JobError, match="answer of 501 characters is over the limit"):
            runner.feedback(wrong(0).model_copy(update={"correct_answer": "x" * 501}))
        runner.feedback(wrong(0))
        runner.feedback(wrong(1))
        state = runner.feedback_state()
        assert state.stored == 2 and state.update_after == 3 and state.last_update is None
        runner.feedback(wrong(2))  # the third starts the update
        state = runner.feedback_state()
        assert state.stored == 0 and state.last_update is not None
        job_id = state.last_update.job_id
        assert job_id.startswith("feedback-") and state.last_update.kind == "continual"
        runner.feedback(wrong(3))  # arrives while the update runs: kept for the next one
        status = wait_done(runner, job_id)
        assert status.state == "done", status.error
        assert status.versions == ["generator/v0001"]
        assert status.note and status.note.startswith(("promoted", "kept serving"))
        assert {"serving_regression", "candidate_new_data"} <= set(status.metrics)
        gate = json.loads((runner.service.registry.run_dir(job_id) / jobs.GATE_FILE)
                          .read_text())
        assert gate["new_items"] == 3 and gate["regression_items"] == 2
        assert runner.feedback_state().stored == 1
        # a job that cannot pass its checks puts the items back
        runner.service.settings = settings.model_copy(update={"feedback": settings.feedback
                                                       .model_copy(update={"params": {
                                                           "method": "forgetful"}})})
        with pytest.raises(JobError, match="unknown method 'forgetful'"):
            runner.update(UpdateRequest())
        assert runner.feedback_state().stored == 1
    finally:
        runner.stop()


def test_an_update_retrieves_from_the_indexed_documents_ingested_ones_included(
        settings, tmp_path):  # noqa: F811
    """A correction whose answer only a newly ingested document holds is trained as that
    answer, not as "I don't know.": the update retrieves from what the indexes hold."""
    settings = settings.model_copy(update={
        "retrieval": settings.retrieval.model_copy(update={"mode": "sparse"}),
        "feedback": settings.feedback.model_copy(update={"params": {
            **TINY, "steps_per_task": 1, "regression_sets": ["capitals"],
            "regression_limit": 2}})})
    trainer = TrainerService(settings)
    with pytest.raises(JobError, match="no indexed documents under"):
        trainer.check(TrainJob(kind="continual", data=TrainData(
            sets=["capitals"], corpus="indexed")))
    new_doc = Document(doc_id="Zubrowka", title="Zubrowka",
                       text="Zubrowka is a small country. Its capital is Qwertyville.")
    store = SparseService.from_settings(settings)
    store.ingest(IngestBatch(documents=[*load_corpus(20), new_doc]))
    store.close()
    runner = TrainerRunner(trainer, lambda _event: None)
    try:
        runner.feedback(Feedback(question="What is the capital of Zubrowka?", answer="Paris",
                                 verdict="wrong", correct_answer="Qwertyville"))
        job_id = runner.update(UpdateRequest(promote=False)).job_id
        status = wait_done(runner, job_id)
    finally:
        runner.stop()
    assert status.state == "done", status.error
    assert trainer.job(job_id).data.corpus == "indexed"
    buffer = cl.load_buffer(trainer.registry.run_dir(job_id) / cl.BUFFER_FILE, 8)
    [record] = [r for r in buffer.items if r.item.question.endswith("Zubrowka?")]
    assert record.passages[0].doc_id == "Zubrowka"
    assert jobs.shows_answer(record, jobs.ContinualJobConfig(**TINY))


# --- the gate, end to end through continual jobs ----------------------------------------------
# Training is grounded: an answer the retrieved passages do not hold is trained as "not in the
# knowledge base". So these questions name a packaged document's title (BM25 alone retrieves
# it first) and their answer is the longest word its passage shows.
def qa_file(path, docs):
    def answer(doc) -> str:
        return max((w.strip(".,;:()") for w in doc.text[:90].split()), key=len)

    path.write_text("".join(json.dumps({"question": f"What is {d.title} about?",
                                        "answer": answer(d)}) + "\n" for d in docs))
    return path


def test_the_gate_blocks_a_deliberately_bad_update_and_promotes_a_good_one(
        settings, tmp_path):  # noqa: F811
    settings = settings.model_copy(update={"retrieval": settings.retrieval.model_copy(
        update={"mode": "sparse"})})
    trainer = TrainerService(settings)
    registry = Registry(settings.checkpoint_dir)
    docs = load_corpus(N_DOCS)
    # batches too small for the job's seed split to hold an item out ("known:1", "known:2",
    # "new:1", "new:2"): each update trains on all of its file and its gate checks those items
    regression = qa_file(tmp_path / "known.jsonl", docs[3:5])
    new = qa_file(tmp_path / "new.jsonl", docs[5:7])
    for path in (regression, new):
        assert not cl.batch_task("batch", load_qa_jsonl(path), seed=13).test
    base = {**TINY, "regression_path": str(regression), "tolerance": 0.5}

    def update(job_id: str, data, **params):
        return trainer.run(TrainJob(job_id=job_id, kind="continual", promote=True,
                                    data=TrainData(sets=[], path=str(data),
                                                   corpus_limit=N_DOCS),
                                    params={**base, **params}))

    # teach the serving model the regression questions (its gate sees them learnt)
    taught = update("teach", regression, method="naive", lr=3e-3, steps_per_task=40)
    assert taught.promoted == ["generator/v0001"], taught.note
    assert taught.metrics["candidate_regression"] == 1.0, taught.metrics
    # a deliberately bad update (a huge learning rate, no clipping) wrecks it: kept out
    bad = update("bad", new, method="naive", lr=0.5, max_grad_norm=None, steps_per_task=5)
    assert bad.state == "done" and bad.versions == ["generator/v0002"] and bad.promoted == []
    assert bad.note.startswith("kept serving: regression dropped from 1.0000"), bad.note
    assert registry.serving("generator").version == "v0001"
    # a sound update (replaying what the serving model knew) learns the new items: served
    good = update("good", new, method="replay", lr=3e-3, steps_per_task=40)
    assert good.promoted == ["generator/v0003"], good.note
    assert good.note.startswith("promoted") and good.metrics["candidate_new_data"] == 1.0
    assert good.note.endswith("(new_data measured on the 2 trained items: too few new items "
                              "to hold any out)"), good.note
    gate = json.loads((registry.run_dir("good") / jobs.GATE_FILE).read_text())
    assert (gate["new_data_held_out"], gate["train_items"], gate["held_out_items"]) == \
        (False, 2, 0)
    assert registry.serving("generator").version == "v0003"


def test_the_gate_checks_new_items_the_update_did_not_train_on(
        settings, data_file, monkeypatch):  # noqa: F811
    """The gate's new-data check answers the batch's held-out part: a candidate is not judged
    on the very pairs it was trained on."""
    trained, checked = [], []
    update, metrics = cl.continual_update, cl.gate_metrics

    def continual_update(config, model, tokenizer, new_items, *args, **kwargs):
        trained.append([i.id for i in new_items])
        return update(config, model, tokenizer, new_items, *args, **kwargs)

    def gate_metrics(model, tokenizer, regression, new_data, *args):
        checked.append([i.id for i in new_data])
        return metrics(model, tokenizer, regression, new_data, *args)

    monkeypatch.setattr(cl, "continual_update", continual_update)
    monkeypatch.setattr(cl, "gate_metrics", gate_metrics)
    trainer = TrainerService(settings)
    status = trainer.run(TrainJob(job_id="held-out", kind="continual", params=QUICK["continual"],
                                  data=TrainData(sets=[], path=str(data_file),
                                                 corpus_limit=N_DOCS)))
    assert status.state == "done", status.error
    [train], [serving, candidate] = trained, checked
    assert serving == candidate and candidate  # both models answer the same held-out items
    assert not set(train) & set(candidate)
    every = [i.id for i in load_qa_jsonl(data_file)]
    assert sorted(train + candidate) == sorted(every)
    gate = json.loads((trainer.registry.run_dir("held-out") / jobs.GATE_FILE).read_text())
    assert gate["new_data_held_out"] is True and "too few" not in status.note
    assert (gate["new_items"], gate["train_items"], gate["held_out_items"]) == \
        (len(every), len(train), len(candidate))


def test_a_batch_too_small_to_hold_an_item_out_is_trained_and_checked_whole():
    def batch(*ids):
        return [QAItem(id=i, question=f"{i}?", answers=["a"], doc_ids=[], answerable=True)
                for i in ids]

    job = TrainJob(job_id="small", kind="continual", seed=13, data=TrainData(sets=["capitals"]))
    # seed 13: "new:1" and "new:2" both fall in the training part, "taught:1" in the held-out one
    for items in (batch("new:1", "new:2"), batch("taught:1")):
        task, held_out = jobs.hold_out(job, items)
        assert not held_out and task.train == task.test == items
    items = batch(*(f"new:{n}" for n in range(40)))
    task, held_out = jobs.hold_out(job, items)
    assert held_out and task.test and not {i.id for i in task.train} & {i.id for i in task.test}
    assert sorted(i.id for i in task.train + task.test) == sorted(i.id for i in items)


def test_a_first_update_replays_only_packaged_questions_whose_passages_show_the_answer(
        settings):  # noqa: F811
    """With no reservoir yet, replay starts from the packaged train split, but not from the
    questions whose passages miss the answer: their grounded target is "I don't know.", and
    replaying them taught the packaged model to abstain (bench/feedback.py)."""
    config = jobs.ContinualJobConfig(**{**TINY, "seed_buffer": True, "buffer_size": 2000,
                                        "regression_sets": ["capitals"]})
    # BM25 finds the capitals' country articles among the first 3,000 (by title) documents (a
    # tiny random encoder would not)
    settings = settings.model_copy(update={"retrieval": settings.retrieval.model_copy(
        update={"mode": "sparse"})})
    registry = Registry(settings.checkpoint_dir)
    with jobs._retrieval(settings, registry, load_corpus(3000), "cpu") as retrieval:
        buffer = jobs.serving_buffer(config, registry, retrieval)
    assert buffer.items and all(jobs.shows_answer(r, config) for r in buffer.items)
    assert buffer.seen == len(buffer) < len(load_split("capitals", "train"))
    shown = buffer.items[0]
    hidden = cl.Record(shown.item, tuple(
        h.model_copy(update={"title": "Elsewhere", "text": "Nothing here."})
        for h in shown.passages))
    assert not jobs.shows_answer(hidden, config)


# --- the trainer's worker reads rag:feedback ---------------------------------------------------
def test_the_trainer_worker_stores_feedback_from_the_stream_and_dead_letters_bad_entries(
        settings, redis_url, redis_settings, flush, run):  # noqa: F811
    runner = TrainerRunner(TrainerService(settings), lambda _event: None)

    async def main():
        bus = make_bus(redis_url, redis_settings)
        worker = trainer_worker(runner, bus)
        await bus.ensure_group(keys.FEEDBACK, keys.TRAINER)
        good = [wrong(n) for n in range(3)]
        await bus.add_many(keys.FEEDBACK, [
            Envelope(id=f"feedback-{fb.feedback_id}", kind="feedback", body=fb.model_dump())
            for fb in [*good, good[0]]])  # the first twice, as a re-delivery would
        bad = {"question": "Capital?", "verdict": "wrong", "schema_version": 1}
        await bus.redis.xadd(keys.FEEDBACK, {FIELD: Envelope(
            id="feedback-bad", kind="feedback", body=bad).model_dump_json()})
        await worker.run(burst=True)
        dead = await dead_letters(bus)
        await bus.close()
        return dead

    try:
        dead = run(main())
        assert runner.feedback_state().stored == 3
        assert len(dead) == 1 and "needs `correct_answer`" in dead[0].reason
    finally:
        runner.stop()
