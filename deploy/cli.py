"""The ``ragtune`` command: up, ask, ingest, status, down, eval, train, models, feedback.

``up`` starts a background supervisor (``deploy.stack``) that owns the embedded servers, Ray
and the Serve application; the other commands talk to it over HTTP (and read ingestion
progress from the bus). ``eval`` runs in this process and needs no running stack.
Errors are one clear line on stderr and exit code 1, never a trace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from deploy import feedback_cli, train_cli
from deploy.stack import state_path
from shared import keys
from shared.bus import Bus
from shared.files import NotUtf8, utf8_lines
from shared.schemas import Document
from shared.settings import Settings

log = logging.getLogger("ragtune")

M = TypeVar("M", bound=BaseModel)

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Who developed the theory of general relativity?",
    "What is photosynthesis?",
)


# The API key header for every request, from serve.api_key (set by main from the settings).
_AUTH: dict[str, str] = {}


class CLIError(RuntimeError):
    """A failure to report as one line, exit code 1."""


def versus_serving(evaluated: str, serving: str) -> str:
    """The evaluated version's name, with the serving one beside it when they differ."""
    return evaluated if evaluated == serving else f"{evaluated} (serving: {serving})"


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --- the running supervisor --------------------------------------------------------------
# The module `ragtune up` runs as the supervisor (``python -m deploy.stack``).
SUPERVISOR_MODULE = "deploy.stack"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_supervisor(pid: int) -> bool | None:
    """Whether process ``pid`` runs ``python -m deploy.stack`` (its /proc cmdline); None where
    there is no /proc to tell. A process that is gone or unreadable is not ours."""
    if not Path("/proc/self/cmdline").exists():
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    module = SUPERVISOR_MODULE.encode()
    return any(a == b"-m" and b == module for a, b in zip(argv, argv[1:], strict=False))


def _load_state(path: Path) -> dict | None:
    """The state file's object (with an int ``pid``), or None when there is none.

    Raises ValueError saying what is wrong with a file that is not such an object, and
    CLIError when the file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CLIError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        state = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(state, dict) or type(state.get("pid")) is not int:
        raise ValueError("not a state object with an integer pid")
    return state


def read_state(settings: Settings) -> dict | None:
    """The running supervisor's state, or None when ragtune is not up.

    A state file whose process is gone is stale: removed, None. A corrupt state file (not
    JSON, no pid) is treated as not running as well: a warning names it, it is removed, None
    (without a readable pid no supervisor can be found or stopped through it). CLIError when
    the file cannot be read at all (permissions).
    """
    path = state_path(settings)
    try:
        state = _load_state(path)
    except ValueError as exc:
        log.warning("%s is %s; removed it and treating ragtune as not running", path, exc)
        path.unlink(missing_ok=True)
        return None
    if state is None:
        return None
    if not _alive(state["pid"]):
        path.unlink(missing_ok=True)
        return None
    return state


def with_running_milvus(settings: Settings) -> Settings:
    """``settings`` with the Milvus URI of the running ragtune when none is set: what runs in
    this process (a local job, an evaluation) then takes the corpus vectors its dense index
    holds rather than encoding them again (``services.trainer.jobs.indexed_vectors``)."""
    state = read_state(settings)
    if settings.milvus.uri or state is None or not state.get("milvus_uri"):
        return settings
    return settings.model_copy(update={
        "milvus": settings.milvus.model_copy(update={"uri": state["milvus_uri"]})})


def _require_state(settings: Settings) -> dict:
    state = read_state(settings)
    if state is None or "http_url" not in state:
        raise CLIError("ragtune is not running; start it with `ragtune up`")
    return state


def _request(method: str, url: str, timeout: float, **kwargs) -> dict:
    try:
        response = httpx.request(method, url, timeout=timeout, headers=_AUTH, **kwargs)
    except httpx.HTTPError as exc:
        raise CLIError(f"cannot reach ragtune at {url}: {exc}") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        raise CLIError(f"{response.status_code} from {url}: {_detail_text(detail)}")
    return response.json()


def _detail_text(detail) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}"
                         for d in detail)
    if isinstance(detail, dict):
        return detail.get("message", json.dumps(detail))
    return str(detail)


# --- up / down -----------------------------------------------------------------------------
def cmd_up(settings: Settings, args: argparse.Namespace) -> None:
    started = time.monotonic()
    state = read_state(settings)
    if state is not None and "http_url" in state:
        _out(f"ragtune is already running at {state['http_url']}")
    else:
        state = _start_supervisor(settings, args.timeout)
        _out(f"ragtune is up at {state['http_url']} in {time.monotonic() - started:.1f} s"
             f" (Ray dashboard: {state.get('dashboard_url') or 'off'})")
    _ensure_corpus(settings, state, args.corpus_limit)
    _out(f"ready in {time.monotonic() - started:.1f} s")
    if not args.no_demo:
        for question in DEMO_QUESTIONS:
            _print_answer(_ask(state, question, None, settings))


def _start_supervisor(settings: Settings, timeout_s: float) -> dict:
    path = state_path(settings)
    path.unlink(missing_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / "ragtune.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", SUPERVISOR_MODULE], stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _out(f"starting ragtune (log: {log_path}) ...")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # The supervisor writes the file whole (stack.main): once it exists it is complete.
        try:
            state = _load_state(path)
        except ValueError as exc:
            proc.terminate()
            raise CLIError(f"ragtune wrote a state file that is {exc}: {path} "
                           f"(log: {log_path})") from None
        if state is not None:
            if "error" in state:
                proc.wait(30)
                raise CLIError(f"ragtune failed to start: {state['error']} (log: {log_path})")
            return state
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise CLIError(f"ragtune exited with code {proc.returncode} while starting; "
                           f"last log lines:\n{tail}")
        time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGTERM)
    raise CLIError(f"ragtune did not come up within {timeout_s:.0f} s (log: {log_path})")


def cmd_down(settings: Settings, _args: argparse.Namespace) -> None:
    """Stop the supervisor the state file names. A live pid that is not a ragtune supervisor
    (the pid was reused after a crash) is stale state: reported and removed, never signalled."""
    state = read_state(settings)
    if state is None:
        _out("ragtune is not running")
        return
    pid = state["pid"]
    if is_supervisor(pid) is False:
        state_path(settings).unlink(missing_ok=True)
        _out(f"ragtune is not running: the state file {state_path(settings)} was stale (its "
             f"pid {pid} is now another program, left alone); removed it")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
        _out("ragtune did not stop in 60 s; killed it")
    else:
        _out("ragtune stopped")
    state_path(settings).unlink(missing_ok=True)


# --- documents -----------------------------------------------------------------------------
def _ensure_corpus(settings: Settings, state: dict, limit: int | None) -> None:
    """First run: ingest the packaged corpus. Later runs: reuse the persisted indexes."""
    from shared.datasets import load_corpus

    corpus = load_corpus(limit)
    counts = _document_counts(state)
    if min(counts.values()) >= len(corpus):
        _out(f"index holds {counts} documents; reusing it")
        return
    backlog = _ingest_backlog(state)
    if backlog:
        _out(f"finishing an earlier ingestion ({backlog} batches waiting)")
        asyncio.run(_track(settings, state, None, backlog))
        counts = _document_counts(state)
        if min(counts.values()) >= len(corpus):
            return
    _out(f"ingesting the packaged corpus: {len(corpus)} Wikipedia summaries (CC BY-SA 4.0)")
    _ingest(settings, state, corpus)


def _document_counts(state: dict) -> dict[str, int]:
    status = _request("GET", f"{state['http_url']}/v1/status", 60)
    counts = status["documents"]
    missing = [name for name, n in counts.items() if n is None]
    if missing:
        raise CLIError(f"the {', '.join(missing)} service does not answer; see `ragtune status`")
    return counts


def _ingest_backlog(state: dict) -> int:
    status = _request("GET", f"{state['http_url']}/v1/status", 60)
    return max((s["pending"] + s["lag"] for s in status["streams"]
                if s["stream"] == keys.INGEST), default=0)


def _ingest(settings: Settings, state: dict, documents: list[Document],
            lines: list[int] | None = None) -> None:
    """Post the documents in requests of ``limits.max_documents_per_request`` and follow their
    indexing. ``lines``: each document's line in its file, for messages (else its position).

    Check the documents first (``read_jsonl``): a request refused after earlier ones were
    queued leaves those queued; the CLIError then says where the refused request began.
    """
    step = settings.limits.max_documents_per_request
    unit, positions = ("line", lines) if lines else ("document", range(1, len(documents) + 1))
    entries: list[str] = []
    for i in range(0, len(documents), step):
        body = {"documents": [d.model_dump() for d in documents[i:i + step]]}
        try:
            entries += _request("POST", f"{state['http_url']}/v1/documents", 120,
                                json=body)["entries"]
        except CLIError as exc:
            if i == 0:
                raise
            raise CLIError(f"{exc}\nthat request began at {unit} {positions[i]} (documents.N "
                           f"counts from there); the documents before it were queued: send "
                           f"the rest again") from None
    asyncio.run(_track(settings, state, entries, len(entries)))


async def _track(settings: Settings, state: dict, entries: list[str] | None,
                 total: int) -> None:
    """A progress bar over ingest batches indexed by both the dense and the sparse group."""
    bus = Bus.connect(state["redis_url"], settings.redis)
    try:
        with tqdm(total=total, unit="batch", desc="indexing") as bar:
            while True:
                if entries is None:  # an earlier run's backlog: follow the groups' lag
                    left = max([await bus.backlog(keys.INGEST, g) for g in keys.INGEST_GROUPS])
                    done = total - left
                else:
                    done = min([await _done_prefix(bus, g, entries) for g in
                                keys.INGEST_GROUPS])
                bar.update(done - bar.n)
                if done >= total:
                    return
                await asyncio.sleep(0.5)
    finally:
        await bus.close()


async def _done_prefix(bus: Bus, group: str, entries: list[str]) -> int:
    """How many entries, from the start, ``group`` has processed (binary search)."""
    lo, hi = 0, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if await bus.processed(keys.INGEST, group, entries[mid]):
            lo = mid + 1
        else:
            hi = mid
    return lo


def read_models(path: Path, model: type[M]) -> list[tuple[int, M]]:
    """``(line number, model)`` for each non-blank line of a JSONL file, one JSON object a line.

    Raises CLIError naming the line and the field for the first bad line.
    """
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    models = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            models.append((number, model.model_validate_json(line)))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "line"
            raise CLIError(f"{path}:{number}: {field}: {err['msg']}") from None
    return models


def _read_lines(path: Path) -> Iterator[str]:
    """``shared.files.utf8_lines``; CLIError naming the file when it cannot be read, and the
    line, column and byte offset of the first byte that is not UTF-8."""
    try:
        yield from utf8_lines(path)
    except NotUtf8 as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_jsonl(path: Path, settings: Settings) -> list[tuple[int, Document]]:
    """``(line number, document)`` from a JSONL file (one object per line: doc_id, title,
    text, [topic, source, date]), the whole file checked before anything is sent.

    Raises CLIError naming the line and the field for the first bad line: not UTF-8, not the
    schema, over this configuration's limits (the check the server applies,
    ``services.qa.service.check_document``) or a ``doc_id`` on an earlier line too. The file goes in
    several requests, so a check left to the server could refuse a later one after earlier
    ones were queued.
    """
    from services.qa.service import InputError, check_document

    documents = read_models(path, Document)
    if not documents:
        raise CLIError(f"{path}: no documents")
    seen: dict[str, int] = {}
    for number, document in documents:
        try:
            check_document(document, settings)
        except InputError as exc:
            raise CLIError(f"{path}:{number}: {exc.field}: {exc.message}") from None
        if document.doc_id in seen:
            raise CLIError(f"{path}:{number}: doc_id {document.doc_id!r} is on line "
                           f"{seen[document.doc_id]} too")
        seen[document.doc_id] = number
    return documents


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> None:
    state = _require_state(settings)
    numbered = read_jsonl(Path(args.file), settings)
    _ingest(settings, state, [d for _n, d in numbered], [n for n, _d in numbered])
    _out(f"indexed {len(numbered)} documents")


def cmd_delete(settings: Settings, args: argparse.Namespace) -> None:
    state = _require_state(settings)
    for doc_id in args.doc_ids:
        _request("DELETE", f"{state['http_url']}/v1/documents/{quote(doc_id, safe='')}",
                 settings.serve.request_timeout_s + 5, params={"wait": "true"})
    _out(f"deleted {len(args.doc_ids)} documents from both indexes")


# --- questions and status ----------------------------------------------------------------
def _ask(state: dict, question: str, top_k: int | None, settings: Settings) -> dict:
    return _request("POST", f"{state['http_url']}/v1/qa", settings.serve.request_timeout_s + 5,
                    json={"question": question, "top_k": top_k})


def _print_answer(answer: dict) -> None:
    _out(f"\nQ: {answer['question']}\nA: {answer['answer']}")
    if answer.get("draft"):
        _out(f"   (withheld, trust {answer['trust']:.2f}: {answer['draft']})")
    elif answer.get("trust") is not None:
        _out(f"   trust {answer['trust']:.2f}")
    for c in answer["citations"]:
        _out(f"   [{c['passage']}] {c['title']} ({c['doc_id']})")
    t = answer["timings_ms"]
    _out(f"   ({t['total']:.0f} ms: retrieve {t['retrieve']:.0f}, generate {t['generate']:.0f})")


def cmd_ask(settings: Settings, args: argparse.Namespace) -> None:
    answer = _ask(_require_state(settings), args.question, args.top_k, settings)
    if args.json:
        _out(json.dumps(answer, indent=2))
    else:
        _print_answer(answer)
        for p in answer["passages"]:
            _out(f"   passage {p['rank']}: {p['title']} (score {p['score']:.4f})")


def cmd_status(settings: Settings, args: argparse.Namespace) -> None:
    state = _require_state(settings)
    status = _request("GET", f"{state['http_url']}/v1/status", 30)
    if args.json:
        _out(json.dumps(status, indent=2))
        return
    _out(f"ragtune at {state['http_url']}  dashboard {state.get('dashboard_url') or 'off'}")
    _out(f"redis {state['redis_url']}  milvus {state['milvus_uri']}")
    for name, text in status["services"].items():
        _out(f"  {name:<10} {text}")
    _out(f"documents: {status['documents']}")
    _out(f"{'stream':<22}{'group':<12}{'length':>8}{'pending':>9}{'lag':>7}{'consumers':>11}")
    for s in status["streams"]:
        _out(f"{s['stream']:<22}{s['group']:<12}{s['length']:>8}{s['pending']:>9}{s['lag']:>7}"
             f"{s['consumers']:>11}")
    _out(f"dead letters: {status['dead_letters']}")


# --- evaluation ----------------------------------------------------------------------------
def cmd_eval_retrieval(settings: Settings, args: argparse.Namespace) -> None:
    """Dense, BM25 and every fusion mode on one split, with the serving retriever (or
    ``--retriever`` VERSION / base, to judge one before promoting it): print the table, write
    the JSON. A packaged set is split with ``--seed``, by default the seed the evaluated
    version was trained on (``split_seed_for``), so that its test split is one it never saw."""
    from services.evaluation.retrieval import (
        DEFAULT_SPLIT_SEED,
        PACKAGED,
        evaluate,
        load_dataset,
        split_seed_for,
    )
    from services.trainer import jobs
    from services.trainer.loop import pick_device
    from shared.registry import Registry

    # bm25s sets its own logger to DEBUG, which would print through our root handler.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if args.limit_corpus is not None and args.limit_corpus < 1:
        raise CLIError(f"--limit-corpus has to be at least 1, but is {args.limit_corpus}")
    packaged = args.dataset in PACKAGED
    if args.seed is not None and not packaged:
        raise CLIError("--seed splits the packaged question sets; a BEIR folder comes split")
    try:
        registry = Registry(settings.checkpoint_dir)
        # an unknown version (a RegistryError, a ValueError) fails before any data or model
        chosen = jobs.chosen_version(registry, "retriever", args.retriever)
        # the seed a packaged set is split with (a BEIR folder's splits ignore it)
        seed = (split_seed_for([chosen, registry.passage_side(chosen)], args.seed)
                if packaged else DEFAULT_SPLIT_SEED)
        test, tune = load_dataset(args.dataset, args.split, limit_corpus=args.limit_corpus,
                                  seed=seed)
        if not test.queries:
            raise CLIError(f"{args.dataset} / {args.split}: no query has a relevant document "
                           f"in the corpus")
        device, _ = pick_device(settings.trainer.device)
        passage_encoder, passage_version, query_encoder, chosen = jobs.serving_encoders(
            settings, registry, device, args.retriever)
        known = jobs.indexed_vectors(with_running_milvus(settings), passage_encoder,
                                     passage_version, test.corpus)
        report = evaluate(test, tune, passage_encoder, query_encoder=query_encoder,
                          cache_dir=settings.home / "cache", candidates=args.candidates,
                          prefer_weight=settings.retrieval.weight, known_vectors=known)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    serving = registry.view().retriever.serving or "base"
    evaluated = "base" if chosen is None else chosen.version
    _out(f"retriever {versus_serving(evaluated, serving)}")
    _out(report.table())
    output = (Path(args.output) if args.output else
              settings.home / "eval" / f"retrieval-{report.dataset}-{report.split}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"retriever": evaluated, "serving": serving,
                                  **report.to_json()}, indent=2) + "\n")
    _out(f"results written to {output}")


EVAL_COMMANDS = {"retrieval": cmd_eval_retrieval, "qa": train_cli.cmd_eval_qa}


def cmd_eval(settings: Settings, args: argparse.Namespace) -> None:
    EVAL_COMMANDS[args.eval_command](settings, args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ragtune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start ragtune on embedded defaults (ingests on first run)")
    up.add_argument("--corpus-limit", type=int, default=None,
                    help="ingest only the first N packaged documents (quick trial)")
    up.add_argument("--no-demo", action="store_true", help="skip the demo questions")
    up.add_argument("--timeout", type=float, default=900, help="seconds to wait for start-up")
    sub.add_parser("down", help="stop ragtune and its embedded servers")
    ask = sub.add_parser("ask", help="ask a question")
    ask.add_argument("question")
    ask.add_argument("--top-k", type=int, default=None, help="passages to ground on")
    ask.add_argument("--json", action="store_true", help="print the raw response")
    ingest = sub.add_parser("ingest", help="add documents from a JSONL file")
    ingest.add_argument("file")
    delete = sub.add_parser("delete", help="remove documents from both indexes")
    delete.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    status = sub.add_parser("status", help="services, streams, pending, dead letters")
    status.add_argument("--json", action="store_true")
    evaluation = sub.add_parser("eval", help="measure quality offline (no `up` needed)")
    eval_sub = evaluation.add_subparsers(dest="eval_command", required=True)
    retrieval = eval_sub.add_parser(
        "retrieval", help="recall@1/5/10, MRR@10, nDCG@10 of dense, BM25 and each fusion mode")
    retrieval.add_argument("--dataset", default="packaged",
                           help="packaged (both question sets, the default), fanout, capitals, "
                                "or the path of a BEIR folder")
    retrieval.add_argument("--split", default="test", help="split to report (default: test)")
    retrieval.add_argument("--limit-corpus", type=int, default=None,
                           help="only the first N documents (quick trial)")
    retrieval.add_argument("--retriever", default=None, metavar="VERSION",
                           help="evaluate this retriever version (or base: the encoder served "
                                "before any training) instead of the serving one")
    retrieval.add_argument("--seed", type=int, default=None,
                           help="seed that splits the packaged sets (default: the one the "
                                "evaluated version was trained with, else 13); a version "
                                "trained on another seed is refused")
    retrieval.add_argument("--candidates", type=int, default=100,
                           help="hits asked of each retriever before fusion (default: 100)")
    retrieval.add_argument("--output", default=None,
                           help="JSON results file (default: <home>/eval/retrieval-<set>-"
                                "<split>.json)")
    train_cli.add_eval_qa_parser(eval_sub)
    train_cli.add_parsers(sub)
    feedback_cli.add_parsers(sub)
    return p


COMMANDS = {"up": cmd_up, "down": cmd_down, "ask": cmd_ask, "ingest": cmd_ingest,
            "delete": cmd_delete,
            "status": cmd_status, "eval": cmd_eval, "train": train_cli.cmd_train,
            "models": train_cli.cmd_models, "feedback": feedback_cli.cmd_feedback}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
        _AUTH.clear()
        if settings.serve.api_key is not None:
            _AUTH["Authorization"] = f"Bearer {settings.serve.api_key.get_secret_value()}"
        COMMANDS[args.command](settings, args)
    except (CLIError, ValidationError) as exc:
        sys.stderr.write(f"ragtune: {exc}\n")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: deploy.train_cli and
    # deploy.feedback_cli raise deploy.cli.CLIError, which must be the class main catches.
    from deploy import cli as _imported

    _imported.main()
