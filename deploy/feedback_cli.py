"""``ragtune feedback``: judge served answers for the production loop, see what the trainer
holds, start an update.

``send`` posts to the running stack's ``POST /v1/feedback``, which queues the items on
``rag:feedback`` for the trainer, all or none (429 while the trainer's backlog is at
``feedback.max_pending``). ``status`` and ``update`` ask the trainer over the bus
(``feedback_state``, ``feedback_update``). All of them need ragtune up.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from deploy.train_cli import job_line
from shared import keys
from shared.bus import Bus, BusError
from shared.schemas import Feedback, FeedbackQuery, FeedbackState, JobStatus, UpdateRequest
from shared.settings import Settings

# FeedbackRequest's limit: a longer file goes in several requests, each queued all or none.
ITEMS_PER_REQUEST = 100


def _cli():
    # deploy.cli imports this module; import it lazily to keep the dependency one-way.
    from deploy import cli

    return cli


# --- send -------------------------------------------------------------------------------------
def flag_item(args: argparse.Namespace) -> Feedback:
    """The one item ``--question`` / ``--right`` / ``--wrong`` / ``--answer`` / ``--correct`` /
    ``--doc-id`` describe; a usage error (exit code 2) for a combination that cannot be one."""
    error = args.usage_error
    if args.question is None:
        error("give --question (with --right or --wrong), or --file")
    if args.verdict is None:
        error("say whether the answer was --right or --wrong")
    if args.verdict == "right" and args.answer is None:
        error("--right needs --answer: the answer that was right")
    if args.verdict == "right" and args.correct is not None:
        error("--correct is for --wrong; --right confirms --answer")
    if args.verdict == "wrong" and args.correct is None:
        error("--wrong needs --correct: the answer it should have been")
    try:
        return Feedback(question=args.question, answer=args.answer or "", verdict=args.verdict,
                        correct_answer=args.correct, doc_ids=args.doc_ids)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise _cli().CLIError(f"{where + ': ' if where else ''}{err['msg']}") from None


def read_items(path: Path, settings: Settings) -> list[tuple[int, Feedback]]:
    """``(line number, item)`` for each item of a JSONL file, the whole file checked first:
    CLIError naming the first bad line (schema, a length over this configuration's limits,
    a ``feedback_id`` seen before), so a bad file sends nothing."""
    from services.qa.service import InputError, check_feedback

    cli = _cli()
    items = cli.read_models(path, Feedback)
    if not items:
        raise cli.CLIError(f"{path}: no feedback items")
    seen: dict[str, int] = {}
    for number, item in items:
        try:
            check_feedback(item, settings)
        except InputError as exc:
            raise cli.CLIError(f"{path}:{number}: {exc}") from None
        if item.feedback_id in seen:
            raise cli.CLIError(f"{path}:{number}: feedback_id {item.feedback_id!r} is on line "
                               f"{seen[item.feedback_id]} too")
        seen[item.feedback_id] = number
    return items


def _send(settings: Settings, args: argparse.Namespace) -> None:
    from services.qa.service import InputError, check_feedback

    cli = _cli()
    if args.file is not None:
        given = [flag for flag, value in [("--question", args.question),
                                          ("--right/--wrong", args.verdict),
                                          ("--answer", args.answer),
                                          ("--correct", args.correct),
                                          ("--doc-id", args.doc_ids or None)]
                 if value is not None]
        if given:
            args.usage_error(f"--file holds the items; drop {', '.join(given)}")
        items = read_items(Path(args.file), settings)
    else:
        item = flag_item(args)
        try:
            check_feedback(item, settings)
        except InputError as exc:
            raise cli.CLIError(str(exc)) from None
        items = [(0, item)]
    url = f"{cli._require_state(settings)['http_url']}/v1/feedback"
    sent = 0
    for start in range(0, len(items), ITEMS_PER_REQUEST):
        chunk = items[start:start + ITEMS_PER_REQUEST]
        body = {"items": [item.model_dump(mode="json") for _number, item in chunk]}
        try:
            cli._request("POST", url, settings.serve.request_timeout_s + 5, json=body)
        except cli.CLIError as exc:
            if sent:  # earlier requests were queued: say where to go on from
                raise cli.CLIError(f"{exc}\nthe items before line {chunk[0][0]} were queued; "
                                   "send the rest again later") from None
            raise
        sent += len(chunk)
    if args.file is None:
        cli._out(f"feedback {items[0][1].feedback_id} queued for the trainer")
    else:
        cli._out(f"{sent} feedback items queued for the trainer")


# --- status / update --------------------------------------------------------------------------
async def _ask_trainer(settings: Settings, state: dict, kind: str, body: BaseModel,
                       reply: type[BaseModel]) -> tuple[BaseModel, int]:
    """The trainer's reply to one request, and the feedback entries it has not read yet."""
    bus = Bus.connect(state["redis_url"], settings.redis)
    try:
        answer = await bus.request(keys.TRAINER, kind, body, settings.serve.request_timeout_s,
                                   reply)
        return answer, await bus.backlog(keys.FEEDBACK, keys.TRAINER)
    except BusError as exc:
        raise _cli().CLIError(str(exc)) from None
    except RedisError as exc:
        raise _cli().CLIError(f"cannot reach Redis at {state['redis_url']}: {exc}") from None
    finally:
        await bus.close()


def _status(settings: Settings, _args: argparse.Namespace) -> None:
    cli = _cli()
    state = cli._require_state(settings)
    held, unread = asyncio.run(_ask_trainer(settings, state, "feedback_state", FeedbackQuery(),
                                            FeedbackState))
    start = (f"an update starts by itself at {held.update_after}" if held.update_after
             else "updates start only on demand (`ragtune feedback update`)")
    cli._out(f"feedback: {held.stored} items stored for the next update; {start}")
    cli._out(f"waiting on {keys.FEEDBACK}: {unread} (cap {settings.feedback.max_pending})")
    cli._out("last update: " + (job_line(held.last_update) if held.last_update else "none yet"))


def _update(settings: Settings, args: argparse.Namespace) -> None:
    cli = _cli()
    state = cli._require_state(settings)
    promote = not args.no_promote
    job, _unread = asyncio.run(_ask_trainer(settings, state, "feedback_update",
                                            UpdateRequest(promote=promote), JobStatus))
    outcome = ("serves the candidate if the gate passes it" if promote
               else "registers the candidate without serving it")
    cli._out(f"update {job.job_id} queued on the trainer; it {outcome} "
             f"(follow it: `ragtune train status {job.job_id}`)")


FEEDBACK_COMMANDS = {"send": _send, "status": _status, "update": _update}


def cmd_feedback(settings: Settings, args: argparse.Namespace) -> None:
    FEEDBACK_COMMANDS[args.feedback_command](settings, args)


# --- argument parsing --------------------------------------------------------------------------
def add_parsers(sub) -> None:
    feedback = sub.add_parser("feedback", help="judge served answers for the trainer's next "
                                               "update; what it holds; start an update")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True)
    send = feedback_sub.add_parser(
        "send", help="judge an answer (--question Q --right --answer A | --wrong --correct C) "
                     "or every line of --file")
    send.set_defaults(usage_error=send.error)  # combinations argparse cannot express
    send.add_argument("--question", default=None, help="the question that was answered")
    verdict = send.add_mutually_exclusive_group()
    verdict.add_argument("--right", dest="verdict", action="store_const", const="right",
                         help="the answer (--answer) was right")
    verdict.add_argument("--wrong", dest="verdict", action="store_const", const="wrong",
                         help="the answer was wrong; --correct says what it should have been")
    send.add_argument("--answer", default=None, help="the answer that was given")
    send.add_argument("--correct", default=None, help="with --wrong: the right answer")
    send.add_argument("--doc-id", dest="doc_ids", action="append", default=[], metavar="ID",
                      help="a document that holds the answer (repeatable)")
    send.add_argument("--file", default=None,
                      help="JSONL, one Feedback object a line (question, answer, verdict, "
                           "[correct_answer, doc_ids, feedback_id, request_id])")
    feedback_sub.add_parser("status", help="feedback the trainer holds and its last update")
    update = feedback_sub.add_parser("update", help="start a continual update on the stored "
                                                    "feedback now")
    update.add_argument("--no-promote", action="store_true",
                        help="register the candidate but keep serving the current model")
