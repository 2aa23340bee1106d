"""``ragtune feedback`` against a real HTTP front (uvicorn, real valkey) and a stand-in trainer
answering ``feedback_state`` / ``feedback_update`` on the bus, as a running stack would."""

from __future__ import annotations

import json
import os
import threading

import pytest
import redis
import uvicorn

from deploy import cli, feedback_cli
from deploy.stack import state_path
from deploy.workers import WorkerThread
from services.qa.http import create_app
from services.qa.service import QAService
from shared import keys
from shared.bus import BadRequest, Bus, Worker, routes
from shared.schemas import Feedback, FeedbackQuery, FeedbackState, JobStatus, UpdateRequest
from shared.settings import FeedbackSettings, RedisSettings, Settings

pytestmark = pytest.mark.usefixtures("flush")


class Trainer:
    """The trainer's side of the loop, in memory: what it stored and was asked."""

    def __init__(self):
        self.stored: list[Feedback] = []
        self.updates: list[UpdateRequest] = []
        self.last: JobStatus | None = None

    def requests(self, bus: Bus) -> Worker:
        async def state(_query: FeedbackQuery) -> FeedbackState:
            return FeedbackState(stored=len(self.stored), update_after=0, last_update=self.last)

        async def update(req: UpdateRequest) -> JobStatus:
            if not self.stored:
                raise BadRequest("no feedback stored: nothing to update on")
            self.updates.append(req)
            self.last = JobStatus(job_id="update-1", kind="continual", state="queued")
            return self.last

        return Worker(bus, keys.TRAINER, [keys.request_stream(keys.TRAINER)],
                      routes(feedback_state=(FeedbackQuery, state),
                             feedback_update=(UpdateRequest, update)))

    async def read_feedback(self, settings: Settings) -> None:
        """Store what waits on rag:feedback, then return (burst)."""
        bus = Bus.connect(settings.redis.url, settings.redis)

        async def store(item: Feedback) -> None:
            self.stored.append(item)

        await Worker(bus, keys.TRAINER, [keys.FEEDBACK],
                     routes(feedback=(Feedback, store))).run(burst=True)
        await bus.close()


@pytest.fixture
def server_settings(redis_url, tmp_path) -> Settings:
    redis_settings = RedisSettings(url=redis_url, block_ms=50)
    return Settings(home=tmp_path / "server", redis=redis_settings,
                    feedback=FeedbackSettings(max_pending=5))


@pytest.fixture
def stack(server_settings, tmp_path, monkeypatch):
    """The HTTP front on a free port, a stand-in trainer, and the state file `ragtune up`
    would write; yields the trainer."""
    qa = QAService(Bus.connect(server_settings.redis.url, server_settings.redis),
                   server_settings)
    server = uvicorn.Server(uvicorn.Config(create_app(qa), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    trainer = Trainer()
    worker = WorkerThread(trainer.requests, server_settings.redis.url, server_settings.redis,
                          "trainer")
    try:
        while not server.started:
            thread.join(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
        path = state_path(Settings())
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"pid": os.getpid(), "http_url": f"http://127.0.0.1:{port}",
                                    "redis_url": server_settings.redis.url,
                                    "milvus_uri": "http://unused"}))
        yield trainer
    finally:
        worker.stop()
        server.should_exit = True
        thread.join(10)


def ragtune(*args: str) -> int:
    """Run the command in this process; its exit code (0 when it returns)."""
    try:
        cli.main(list(args))
    except SystemExit as exc:
        return int(exc.code)
    return 0


def queued(redis_url) -> int:
    return redis.Redis.from_url(redis_url).xlen(keys.FEEDBACK)


def write_lines(path, *items) -> str:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return str(path)


RIGHT = {"question": "What is the capital of France?", "answer": "Paris", "verdict": "right"}
WRONG = {"question": "What is the capital of Kenya?", "answer": "Mombasa", "verdict": "wrong",
         "correct_answer": "Nairobi"}


def test_send_then_status_then_update(stack, server_settings, redis_url, capsys, run):
    assert ragtune("feedback", "send", "--question", "What is the capital of Kenya?", "--wrong",
                   "--answer", "Mombasa", "--correct", "Nairobi", "--doc-id", "Kenya",
                   "--doc-id", "Africa") == 0
    assert "queued for the trainer" in capsys.readouterr().out
    assert queued(redis_url) == 1
    run(stack.read_feedback(server_settings))
    (item,) = stack.stored
    assert (item.verdict, item.target(), item.doc_ids) == ("wrong", "Nairobi",
                                                           ["Kenya", "Africa"])

    assert ragtune("feedback", "status") == 0
    out = capsys.readouterr().out
    assert "feedback: 1 items stored for the next update" in out
    assert "only on demand" in out and "waiting on rag:feedback: 0" in out
    assert "last update: none yet" in out

    assert ragtune("feedback", "update", "--no-promote") == 0
    out = capsys.readouterr().out
    assert "update update-1 queued on the trainer; it registers the candidate" in out
    assert stack.updates == [UpdateRequest(promote=False)]
    assert ragtune("feedback", "status") == 0
    assert "last update: update-1  continual queued    step 0/0" in capsys.readouterr().out


def test_update_with_nothing_stored_is_one_line(stack, capsys):
    assert ragtune("feedback", "update") == 1
    err = capsys.readouterr().err
    assert err == "ragtune: trainer: no feedback stored: nothing to update on\n"
    assert stack.updates == []


@pytest.mark.parametrize("bad, message", [
    (RIGHT | {"verdict": "wrong"},
     ":2: line: Value error, a `wrong` verdict needs `correct_answer`"),
    (RIGHT | {"verdict": "maybe"}, ":2: verdict: Input should be 'right' or 'wrong'"),
    ("{not json", ":2: line: Invalid JSON"),
    (RIGHT | {"answer": "x" * 501}, ":2: answer: is 501 characters; the limit is 500"),
    (WRONG | {"correct_answer": "y" * 501}, ":2: correct_answer: is 501 characters"),
    (WRONG | {"feedback_id": "fb-1"}, ":2: feedback_id 'fb-1' is on line 1 too"),
])
def test_a_file_with_a_bad_line_names_it_and_sends_nothing(stack, redis_url, tmp_path,
                                                           capsys, bad, message):
    path = write_lines(tmp_path / "feedback.jsonl", RIGHT | {"feedback_id": "fb-1"}, bad, WRONG)
    assert ragtune("feedback", "send", "--file", path) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ragtune: {path}{message}"), err
    assert "Traceback" not in err and queued(redis_url) == 0


def test_a_file_is_sent_in_requests_and_a_full_backlog_says_what_was_queued(
        stack, redis_url, tmp_path, capsys, monkeypatch):
    path = write_lines(tmp_path / "feedback.jsonl", RIGHT, "", WRONG, RIGHT)
    assert ragtune("feedback", "send", "--file", path) == 0
    assert "3 feedback items queued for the trainer" in capsys.readouterr().out
    assert queued(redis_url) == 3

    # one item a request and max_pending 5: two more fit, the third is refused
    monkeypatch.setattr(feedback_cli, "ITEMS_PER_REQUEST", 1)
    path = write_lines(tmp_path / "more.jsonl", RIGHT, WRONG, RIGHT)
    assert ragtune("feedback", "send", "--file", path) == 1
    err = capsys.readouterr().err
    assert "429 from" in err and "5 feedback items wait for the trainer" in err
    assert "the items before line 3 were queued; send the rest again later" in err
    assert queued(redis_url) == 5


@pytest.mark.parametrize("args, message", [
    (["--wrong", "--question", "q?", "--answer", "a"],
     "--wrong needs --correct: the answer it should have been"),
    (["--right", "--question", "q?"], "--right needs --answer"),
    (["--right", "--question", "q?", "--answer", "a", "--correct", "b"],
     "--correct is for --wrong"),
    (["--question", "q?", "--answer", "a"], "say whether the answer was --right or --wrong"),
    (["--right", "--wrong", "--question", "q?"], "not allowed with argument"),
    (["--file", "f.jsonl", "--question", "q?", "--doc-id", "d"],
     "--file holds the items; drop --question, --doc-id"),
    ([], "give --question (with --right or --wrong), or --file"),
])
def test_flags_that_make_no_feedback_are_usage_errors(tmp_path, monkeypatch, capsys, args,
                                                      message):
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
    assert ragtune("feedback", "send", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ragtune feedback send") and message in err


def test_a_flag_item_over_the_limits_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
    assert ragtune("feedback", "send", "--question", " ", "--right", "--answer", "a") == 1
    assert "question: String should have at least 1 character" in capsys.readouterr().err
    assert ragtune("feedback", "send", "--question", "q?", "--right", "--answer",
                   "a" * 501) == 1
    assert capsys.readouterr().err == ("ragtune: answer: is 501 characters; the limit is "
                                       "500\n")
