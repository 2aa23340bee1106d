"""``ragtune train``, ``ragtune models`` and ``ragtune eval qa``.

With ragtune up, jobs go to the trainer actor over HTTP (``/v1/train``) and promotions swap
models into the running replicas (``/v1/models``). Without it (or with ``--local``), training
runs in this process and promotions only update the registry, which the next ``up`` serves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import get_args

from pydantic import ValidationError
from tqdm import tqdm

from shared.schemas import (
    AverageResult,
    InterpolateResult,
    JobStatus,
    PruneResult,
    RegistryView,
    TrainData,
    TrainJob,
    TrainKind,
)
from shared.settings import Settings

TRAIN_KINDS = get_args(TrainKind)
PACKAGED_SETS = ("capitals", "capitals_unanswerable", "fanout")


def _cli():
    # deploy.cli imports this module; import it lazily to keep the dependency one-way.
    from deploy import cli

    return cli


# --- building a job ---------------------------------------------------------------------------
def read_params(path: str | None) -> dict:
    """Hyper-parameters from a JSON or YAML file (a mapping); {} without a file. Raises
    ``CLIError`` naming the file when it is missing, unreadable, not UTF-8 or not valid
    JSON/YAML (with the line and column of the first problem)."""
    cli = _cli()
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise cli.CLIError(f"{file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise cli.CLIError(f"{file}: cannot parse: not UTF-8 text (byte "
                           f"0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise cli.CLIError(f"{file}: cannot read: {exc.strerror or exc}") from None
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            params = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # not a ValueError
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise cli.CLIError(f"{file}: cannot parse: not valid YAML{where}: {problem}"
                               ) from None
    else:
        try:
            params = json.loads(text)
        except json.JSONDecodeError as exc:
            raise cli.CLIError(f"{file}: cannot parse: not valid JSON at line {exc.lineno}, "
                               f"column {exc.colno}: {exc.msg}") from None
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise cli.CLIError(f"{file}: expected a mapping of parameter names to values")
    return params


def build_job(args: argparse.Namespace) -> TrainJob:
    cli = _cli()
    sets = [] if args.sets == "none" else [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in PACKAGED_SETS]
    if unknown:
        raise cli.CLIError(f"unknown question set(s) {', '.join(unknown)}; known: "
                           f"{', '.join(PACKAGED_SETS)} (or none)")
    try:
        data = TrainData(sets=sets, path=str(Path(args.data).resolve()) if args.data else None,
                         corpus=args.corpus, corpus_limit=args.corpus_limit)
        fields = {"kind": args.kind, "data": data, "params": read_params(args.config),
                  "seed": args.seed, "promote": args.promote}
        if args.job_id:
            fields["job_id"] = args.job_id
        return TrainJob(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise cli.CLIError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


# --- train ------------------------------------------------------------------------------------
def cmd_train(settings: Settings, args: argparse.Namespace) -> None:
    cli = _cli()
    if args.kind == "status":
        return _train_status(settings, args)
    if args.kind == "cancel":
        return _train_cancel(settings, args)
    job = build_job(args)
    state = None if args.local else cli.read_state(settings)
    if state is None:
        return _train_local(settings, job)
    status = JobStatus.model_validate(cli._request(
        "POST", f"{state['http_url']}/v1/train", settings.serve.request_timeout_s + 5,
        json=job.model_dump(mode="json")))
    if status.state == "queued":
        cli._out(f"job {status.job_id} queued on the trainer")
    else:  # an id submitted before, still running or done: the trainer keeps its state
        cli._out(f"job {status.job_id} was submitted before; it is {status.state}")
    if args.detach:
        return None
    try:
        _follow(state, status.job_id, settings)
    except KeyboardInterrupt:
        cli._out(f"\nstopped following; the job goes on (`ragtune train cancel {job.job_id}` "
                 "stops it)")
    return None


def _train_local(settings: Settings, job: TrainJob) -> None:
    cli = _cli()
    from services.trainer.service import JobError, TrainerService

    trainer = TrainerService(cli.with_running_milvus(settings))
    desc = f"{job.kind} {job.job_id}"
    bar = tqdm(total=0, unit="step", desc=desc)

    def on_status(status: JobStatus) -> None:
        _show_phase(bar, desc, status)
        _advance(bar, status)
        postfix = {"loss": f"{status.loss:.4f}"} if status.loss is not None else {}
        postfix.update({k: f"{v:.3f}" for k, v in list(status.metrics.items())[:3]})
        bar.set_postfix(postfix, refresh=False)

    try:
        trainer.submit(job)
        status = trainer.run(job, on_status=on_status)
    except JobError as exc:
        raise cli.CLIError(str(exc)) from None
    finally:
        bar.close()
    _report_finished(status, trainer.registry.run_dir(job.job_id))
    if status.state == "failed":
        raise cli.CLIError(f"job {job.job_id} failed: {status.error}")


def _show_phase(bar: tqdm, desc: str, status: JobStatus) -> None:
    """The bar's label: ``desc``, and what the job does before its first step, if anything."""
    label = f"{desc} ({status.phase})" if status.phase else desc
    if bar.desc.rstrip(": ") != label:
        bar.set_description(label)


def _advance(bar: tqdm, status: JobStatus) -> None:
    """The bar at the job's step; a step below the bar's starts it over (a job that trains one
    run per seed reports each run's steps from 1)."""
    if status.total_steps and bar.total != status.total_steps:
        bar.total = status.total_steps
        bar.refresh()
    if status.step < bar.n:
        bar.reset(total=bar.total)
    bar.update(status.step - bar.n)


def _follow(state: dict, job_id: str, settings: Settings) -> None:
    cli = _cli()
    bar = tqdm(total=0, unit="step", desc=job_id)
    try:
        while True:
            status = JobStatus.model_validate(cli._request(
                "GET", f"{state['http_url']}/v1/train/{job_id}", 30))
            _show_phase(bar, job_id, status)
            _advance(bar, status)
            if status.loss is not None:
                bar.set_postfix(loss=f"{status.loss:.4f}", refresh=False)
            if status.state not in ("queued", "running"):
                break
            time.sleep(1.0)
    finally:
        bar.close()
    _report_finished(status, settings.checkpoint_dir / "runs" / job_id)
    if status.state == "failed":
        raise cli.CLIError(f"job {job_id} failed: {status.error}")


def _report_finished(status: JobStatus, run_dir: Path) -> None:
    cli = _cli()
    cli._out(f"job {status.job_id}: {status.state}")
    if status.metrics:
        cli._out("dev metrics: " + ", ".join(f"{k} {v:.3f}" for k, v in status.metrics.items()))
    for version in status.versions:
        if version in status.promoted:
            cli._out(f"registered {version}, now serving")
        else:
            cli._out(f"registered {version} (serve it: `ragtune models promote "
                     f"{version.replace('/', ' ')}`)")
    if status.note:
        cli._out(status.note)
    cli._out(f"run folder: {run_dir}")
    reports = sorted(run_dir.rglob("report.png"))
    if reports:
        cli._out("report: " + ", ".join(str(p) for p in reports) + " (and report.json beside)")


def _train_status(settings: Settings, args: argparse.Namespace) -> None:
    cli = _cli()
    state = cli.read_state(settings)
    if state is not None:
        url = f"{state['http_url']}/v1/train"
        if args.job_id:
            statuses = [JobStatus.model_validate(cli._request("GET", f"{url}/{args.job_id}", 30))]
        else:
            statuses = [JobStatus.model_validate(j) for j in cli._request("GET", url, 30)["jobs"]]
    else:
        from services.trainer.service import TrainerService

        trainer = TrainerService(settings)
        if args.job_id:
            found = trainer.status(args.job_id)
            if found is None:
                raise cli.CLIError(f"no job {args.job_id!r}")
            statuses = [found]
        else:
            statuses = trainer.statuses()
    if not statuses:
        cli._out("no training jobs yet")
    for s in statuses:
        cli._out(job_line(s))


def job_line(s: JobStatus) -> str:
    """One job as ``ragtune train status`` prints it: id, kind, state, step, loss, the versions
    it registered (those it put into serving starred) and when; then its note and error."""
    loss = f"loss {s.loss:.4f}" if s.loss is not None else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.updated))
    versions = " ".join(v + ("*" if v in s.promoted else "") for v in s.versions)
    phase = f" ({s.phase})" if s.phase else ""
    line = (f"{s.job_id}  {s.kind:<9} {s.state:<9} step {s.step}/{s.total_steps}{phase} "
            f"{loss}  {versions}  {when}")
    return line + "".join(f"\n    {extra}" for extra in (s.note, s.error) if extra)


def _train_cancel(settings: Settings, args: argparse.Namespace) -> None:
    cli = _cli()
    if not args.job_id:
        raise cli.CLIError("name the job: ragtune train cancel JOB_ID")
    state = cli.read_state(settings)
    if state is not None:
        cli._request("POST", f"{state['http_url']}/v1/train/{args.job_id}/cancel", 30)
    else:
        from services.trainer.service import JobError, TrainerService

        try:
            TrainerService(settings).cancel(args.job_id)
        except JobError as exc:
            raise cli.CLIError(str(exc)) from None
    cli._out(f"asked job {args.job_id} to stop after its current step")


# --- models -----------------------------------------------------------------------------------
def cmd_models(settings: Settings, args: argparse.Namespace) -> None:
    cli = _cli()
    from shared.registry import Registry, RegistryError

    state = cli.read_state(settings)
    if args.models_command == "average":
        _average(settings, args, state)
        return
    if args.models_command == "interpolate":
        _interpolate(settings, args, state)
        return
    if args.models_command == "prune":
        _prune(settings, args, state)
        return
    if args.models_command == "list":
        view = (RegistryView.model_validate(
            cli._request("GET", f"{state['http_url']}/v1/models", 30))
            if state is not None else Registry(settings.checkpoint_dir).view())
    elif state is not None:
        path = "promote" if args.models_command == "promote" else "rollback"
        body = {"kind": args.kind}
        if path == "promote":
            body["version"] = None if args.version == "base" else args.version
        view = RegistryView.model_validate(cli._request(
            "POST", f"{state['http_url']}/v1/models/{path}", settings.serve.request_timeout_s,
            json=body))
    else:
        registry = Registry(settings.checkpoint_dir)
        try:
            if args.models_command == "promote":
                registry.promote(args.kind, None if args.version == "base" else args.version)
            else:
                registry.rollback(args.kind)
        except RegistryError as exc:
            raise cli.CLIError(str(exc)) from None
        view = registry.view()
        cli._out("ragtune is not running: the next `ragtune up` serves this")
    _print_models(view)


def _average(settings: Settings, args: argparse.Namespace, state: dict | None) -> None:
    """``ragtune models average retriever|generator VERSION VERSION [...]``: the uniform soup of
    registered versions (``services/trainer/soup.py``), registered as the next version, not
    serving; ``models promote`` serves it."""
    versions = list(dict.fromkeys(args.versions))
    if len(versions) < 2:
        raise _cli().CLIError("name two or more different versions to average")

    def locally(registry):
        from services.trainer.soup import average_versions

        return average_versions(registry, args.kind, versions)

    _make_version(settings, state, args.kind, f"averaging {', '.join(versions)}",
                  "average", {"kind": args.kind, "versions": versions}, AverageResult, locally)


def _interpolate(settings: Settings, args: argparse.Namespace, state: dict | None) -> None:
    """``ragtune models interpolate KIND VERSION --alpha A [--towards base|VERSION]``:
    ``(1 - A) * towards + A * VERSION`` (WiSE-FT, ``services/trainer/soup.py``), registered as
    the next version, not serving."""
    if not 0 <= args.alpha <= 1:
        raise _cli().CLIError(f"--alpha has to be in [0, 1] (0: {args.towards}, 1: "
                              f"{args.version}), not {args.alpha:g}")

    def locally(registry):
        from services.trainer.soup import interpolate_version, served_base

        return interpolate_version(registry, args.kind, args.version, args.alpha, args.towards,
                                   served_base(settings, args.kind))

    _make_version(settings, state, args.kind,
                  f"moving {args.version} towards {args.towards} (alpha {args.alpha:g})",
                  "interpolate", {"kind": args.kind, "version": args.version,
                                  "alpha": args.alpha, "towards": args.towards},
                  InterpolateResult, locally)


def _make_version(settings: Settings, state: dict | None, kind: str, doing: str,
                  endpoint: str, body: dict, result_model, locally) -> None:
    """Make a version from registered ones, through the trainer (``POST /v1/models/
    <endpoint>`` with ``body``, answered as ``result_model``) when ragtune is up, else in this
    process (``locally(registry)``, a ``RegistryError`` becoming the CLI's one-line error);
    then say what was registered (its record's ``made_from``) and list the versions."""
    cli = _cli()
    from shared.registry import Registry, RegistryError

    cli._out(f"{doing} ...")
    if state is not None:
        result = result_model.model_validate(cli._request(
            "POST", f"{state['http_url']}/v1/models/{endpoint}",
            settings.serve.request_timeout_s, json=body))
        version, view = result.version, result.models
    else:
        registry = Registry(settings.checkpoint_dir)
        try:
            version = locally(registry).version
        except RegistryError as exc:
            raise cli.CLIError(str(exc)) from None
        view = registry.view()
    made_from = next(v.made_from for v in getattr(view, kind).versions if v.version == version)
    cli._out(f"registered {kind}/{version}: {made_from} "
             f"(not serving; `ragtune models promote {kind} {version}` serves it)")
    _print_models(view)


def _prune(settings: Settings, args: argparse.Namespace, state: dict | None) -> None:
    """``ragtune models prune KIND [--keep N]``: through the trainer when ragtune is up (the
    embedding replicas drop the pruned versions' collections at once), else on the registry
    (the collections go at the next ``ragtune up``)."""
    cli = _cli()
    from shared.registry import Registry, RegistryError

    if args.keep < 0:
        raise cli.CLIError(f"--keep must be 0 or more, got {args.keep}")
    if state is not None:
        result = PruneResult.model_validate(cli._request(
            "POST", f"{state['http_url']}/v1/models/prune", settings.serve.request_timeout_s,
            json={"kind": args.kind, "keep": args.keep}))
    else:
        registry = Registry(settings.checkpoint_dir)
        try:
            removed, freed = registry.prune(args.kind, args.keep)
        except RegistryError as exc:
            raise cli.CLIError(str(exc)) from None
        result = PruneResult(removed=[v.version for v in removed], freed_bytes=freed,
                             models=registry.view())
    if result.removed:
        cli._out(f"deleted {args.kind} {', '.join(result.removed)} "
                 f"({result.freed_bytes / 2**20:.1f} MiB freed)")
    else:
        cli._out(f"nothing to delete: every {args.kind} version is serving, a rollback target, "
                 f"searched by a kept one or among the newest {args.keep}")
    _print_models(result.models)


def _print_models(view: RegistryView) -> None:
    cli = _cli()
    for kind in ("retriever", "generator"):
        record = getattr(view, kind)
        cli._out(f"{kind}: serving {record.serving or 'base (packaged)'}")
        for v in record.versions:
            mark = "*" if v.version == record.serving else " "
            metrics = ", ".join(f"{k} {x:.3f}" for k, x in list(v.metrics.items())[:4])
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created))
            origin = f"job {v.job_id}" if v.job_id else v.made_from or "job -"
            cli._out(f"  {mark} {v.version}  {when}  {origin}  {metrics}")


# --- eval qa ----------------------------------------------------------------------------------
def cmd_eval_qa(settings: Settings, args: argparse.Namespace) -> None:
    """Answer the packaged question sets (their ``--split``) and/or a question/answer JSONL
    file of the user's (``--data``, evaluated whole) offline with the serving models (registry
    versions or the packaged ones; ``--generator`` another generator version, to judge it
    before promoting it) through the serving pipeline, withholding answers below
    ``answer.min_trust`` as the QA front does, and print EM / F1 / contains / abstention per
    set. The packaged sets are split with ``--seed``, by default the seed the evaluated
    versions were trained on (``split_seed_for``), so that their test split is one they never
    saw."""
    cli = _cli()
    import logging

    from services.evaluation.qa import evaluate_qa
    from services.evaluation.retrieval import split_seed_for
    from services.trainer import jobs
    from services.trainer.loop import pick_device
    from shared import datasets
    from shared.registry import Registry

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    text = args.sets if args.sets is not None else ("none" if args.data else
                                                     ",".join(PACKAGED_SETS))
    names = [s.strip() for s in text.split(",") if s.strip() and s.strip() != "none"]
    unknown = [s for s in names if s not in PACKAGED_SETS]
    if unknown:
        raise cli.CLIError(f"unknown question set(s) {', '.join(unknown)}; known: "
                           f"{', '.join(PACKAGED_SETS)}")
    if not (names or args.data):
        raise cli.CLIError("nothing to evaluate: name packaged question sets (--sets) or a "
                           "question/answer file (--data)")
    if args.limit is not None and args.limit < 1:
        raise cli.CLIError(f"--limit has to be at least 1, but is {args.limit}")
    if args.seed is not None and not names:
        raise cli.CLIError("--seed splits the packaged question sets; --data is evaluated whole")
    try:
        registry = Registry(settings.checkpoint_dir)
        # an unknown version (a RegistryError, a ValueError) fails before any data or model;
        # the answers come from the generator and the serving retrieval's passages
        retriever = registry.serving("retriever")
        evaluated_versions = [jobs.chosen_version(registry, "generator", args.generator), retriever,
                              registry.passage_side(retriever)]
        seed = split_seed_for(evaluated_versions, args.seed) if names else None
        sets = {n: datasets.load_split(n, args.split, seed=seed)[:args.limit] for n in names}
        if args.data:  # checked whole before any model loads
            data = Path(args.data)
            name = data.stem if data.stem not in sets else f"{data.stem} (file)"
            sets[name] = datasets.load_qa_jsonl(
                data, max_answer_chars=settings.trainer.max_answer_chars,
                max_question_chars=settings.limits.max_question_chars)[:args.limit]
        device, _ = pick_device(settings.trainer.device)
        model, tokenizer = jobs.serving_generator(settings, registry, args.generator)
        model.to(device)
        corpus = datasets.load_corpus(args.limit_corpus)
        with jobs._retrieval(cli.with_running_milvus(settings), registry, corpus,
                             device) as retrieval:
            report = evaluate_qa(model, tokenizer, sets, retrieval,
                                 top_k=settings.retrieval.top_k,
                                 max_passage_chars=settings.generator.max_passage_chars,
                                 max_new_tokens=settings.generator.max_new_tokens,
                                 min_trust=settings.answer.min_trust,
                                 by_sentence=settings.answer.trust_by_sentence)
    except ValueError as exc:
        raise cli.CLIError(str(exc)) from None
    serving = {k: getattr(registry.view(), k).serving or "base" for k in ("retriever",
                                                                         "generator")}
    evaluated = {**serving, "generator": args.generator or serving["generator"]}
    generator = cli.versus_serving(evaluated["generator"], serving["generator"])
    what = ", ".join([*([f"{args.split} split (seed {seed})"] if names else []),
                      *([Path(args.data).name] if args.data else [])])
    cli._out(report.table(f"{what}; retriever {serving['retriever']}, "
                          f"generator {generator}, min_trust {settings.answer.min_trust}"))
    stem = "-".join([*([args.split] if names else []),
                     *([Path(args.data).stem] if args.data else [])])
    output = Path(args.output) if args.output else settings.home / "eval" / f"qa-{stem}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"serving": serving, "evaluated": evaluated,
                                  "split_seed": seed, **report.to_json()}, indent=2) + "\n")
    cli._out(f"results written to {output}")


def add_eval_qa_parser(eval_sub) -> None:
    qa = eval_sub.add_parser("qa", help="EM, F1, answer-contains and abstention of the serving "
                                        "models on the packaged question sets or your own")
    qa.add_argument("--sets", default=None,
                    help="packaged question sets, comma-separated, or none (default: all; "
                         "none when --data is given)")
    qa.add_argument("--data", default=None,
                    help="your own question/answer JSONL file (the format `train --data` "
                         "reads), evaluated whole")
    qa.add_argument("--split", default="test", choices=("train", "dev", "test"),
                    help="split of the packaged sets (default: test)")
    qa.add_argument("--generator", default=None, metavar="VERSION",
                    help="evaluate this generator version (or base: the one served before any "
                         "training) instead of the serving one; serving is unchanged")
    qa.add_argument("--seed", type=int, default=None,
                    help="seed that splits the packaged sets (default: the one the evaluated "
                         "versions were trained with, else 13); versions trained on another "
                         "seed are refused")
    qa.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    qa.add_argument("--limit-corpus", type=int, default=None,
                    help="only the first N documents (quick trial)")
    qa.add_argument("--output", default=None,
                    help="JSON results file (default: <home>/eval/qa-<split>.json, or "
                         "qa-<data file stem>.json with --data alone)")


# --- argument parsing --------------------------------------------------------------------------
def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="fine-tune the retriever and/or generator; "
                                         "`train status`, `train cancel JOB_ID`")
    train.add_argument("kind", choices=(*TRAIN_KINDS, "status", "cancel"))
    train.add_argument("job_id", nargs="?", default=None,
                       help="for status/cancel: the job; for training: an id to give the job")
    train.add_argument("--config", default=None,
                       help="JSON or YAML file of hyper-parameters (see README: Training)")
    train.add_argument("--data", default=None,
                       help="question/answer JSONL file: question, answer(s), [doc_ids]")
    train.add_argument("--sets", default=",".join(PACKAGED_SETS),
                       help="packaged question sets to train on, comma-separated, or none "
                            "(default: all)")
    train.add_argument("--corpus", default="packaged", choices=("packaged", "indexed"),
                       help="retrieve passages from the packaged corpus or from every "
                            "document the indexes hold (ingested ones included)")
    train.add_argument("--corpus-limit", type=int, default=None,
                       help="only the first N documents (a quick trial)")
    train.add_argument("--seed", type=int, default=13, help="split and training seed")
    train.add_argument("--promote", action="store_true",
                       help="serve the result when the job is done")
    train.add_argument("--local", action="store_true",
                       help="train in this process even if ragtune is up")
    train.add_argument("--detach", action="store_true",
                       help="queue the job and return (ragtune up only)")

    models = sub.add_parser("models", help="model versions: list, promote, rollback, average, "
                                           "interpolate, prune")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="every version and the serving one")
    promote = models_sub.add_parser("promote", help="serve a version (or `base`)")
    promote.add_argument("kind", choices=("retriever", "generator"))
    promote.add_argument("version", help="e.g. v0002, or base for the packaged model")
    rollback = models_sub.add_parser("rollback", help="serve the previous version again")
    rollback.add_argument("kind", choices=("retriever", "generator"))
    average = models_sub.add_parser(
        "average", help="register the uniform average (soup) of two or more versions' weights "
                        "as a new version, not serving")
    average.add_argument("kind", choices=("retriever", "generator"))
    average.add_argument("versions", nargs="+", help="e.g. v0002 v0003: runs fine-tuned from "
                                                     "the same model (different seeds)")
    interpolate = models_sub.add_parser(
        "interpolate", help="register a fine-tuned version moved back towards the base "
                            "(WiSE-FT: (1 - alpha) * base + alpha * version) as a new version, "
                            "not serving")
    interpolate.add_argument("kind", choices=("retriever", "generator"))
    interpolate.add_argument("version", help="the fine-tuned version, e.g. v0004")
    interpolate.add_argument("--alpha", type=float, default=0.75,
                             help="the version's share of the weights: 1 keeps it, 0 gives "
                                  "--towards (default 0.75)")
    interpolate.add_argument("--towards", default="base",
                             help="base (the model served before any training, the "
                                  "default) or another version")
    prune = models_sub.add_parser(
        "prune", help="delete the versions nothing needs (not serving, not a rollback target)")
    prune.add_argument("kind", choices=("retriever", "generator"))
    prune.add_argument("--keep", type=int, default=2,
                       help="newest versions kept besides those still needed (default 2)")
