"""Continual learning of the retriever over a stream of topics: naive fine-tuning against replay
and EWC (or L2), side by side.

    python bench/continual_retriever.py [--quick] [--methods naive,replay,ewc,l2]
                                        [--device auto|cpu|cuda] [--epochs N] [--steps N]
                                        [--batch-size N] [--lr LR] [--temperature T]
                                        [--replay-ratio R] [--penalty-strength L]
                                        [--seeds 0,1,2] [--out-dir PATH]

The stream is bench/continual.py's (``services/trainer/continual.py``: ``topic_tasks``): the
packaged capital and FanOutQA questions grouped by the topic of their gold document, four tasks
in this order — Uncategorized; People + Society and social sciences; every other topic;
Geography. Each task trains on its questions of the shared seed split's train part and is
tested on its dev and test parts together (nothing here is tuned on dev: held out twice the
questions, so one question weighs less in a task's accuracy).

Per method, the packaged MiniLM query encoder starts from the same weights and is trained task
after task (``services/trainer/continual_retriever.py``: ``run_retriever_stream``): InfoNCE of
each question over the whole frozen corpus matrix (the base encoder's document vectors, cached
under bench/results/cache), so no task re-indexes. After each task it searches for every task's
held-out questions: the accuracy matrix R[i][j] (recall@1 of exact dense search), average
accuracy (ACC), backward transfer (BWT; forgetting = -BWT) and forward transfer (FWT) as GEM
defines them. Two targets are printed with PASS/FAIL: forgetting of replay and of the
regulariser at most a third of naive's, and their accuracy on the newest task within 5 points
of naive's.

Each method runs once per seed (``--seeds``: batch order, dropout, replay draws); the tables and
targets are of the mean over seeds (the matrix averaged cell by cell: ACC, BWT, FWT and the
newest-task accuracy are linear in it, so they are the means of the per-seed values, which the
JSON keeps).

Defaults (2-core CPU, about 15 minutes for the four methods and three seeds): 3 epochs of
batches of 16 questions per task at lr 3e-4, constant schedule, temperature 0.05, replay half of
each batch from a reservoir of 1,000, penalty strength 10 (EWC's Fisher on 32 reservoir
questions, normalised to mean 1, so L2 with the same strength has the same total stiffness).
The learning rate is high on purpose: at 1e-4 naive fine-tuning forgets 2.8 points of recall@1,
too close to what one question of a 16-question task weighs (6 points) to rank the methods; at
3e-4 it forgets 9. ``--quick``: 2 steps per task and one seed (pipeline check). Results:
bench/results/continual-retriever[-quick].{json,txt,png}.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import continual as generator_bench
import train_generator as tg

from services.evaluation.retrieval import corpus_embeddings
from services.trainer import continual as cl
from services.trainer import loop
from services.trainer.continual_retriever import run_retriever_stream
from shared.datasets import load_split
from shared.models.encoder import Encoder
from shared.settings import Settings

log = logging.getLogger("bench.continual_retriever")

SETS = generator_bench.SETS
GROUPS = generator_bench.GROUPS


def mean_result(runs: list[cl.StreamResult]) -> cl.StreamResult:
    """One method's runs (one per seed, same tasks) as one result: matrix and baseline averaged
    cell by cell, metrics of that mean, times summed, history and config of the first run."""
    if not runs:
        raise ValueError("no run to average")
    n = len(runs)
    matrix = [[sum(r.matrix[i][j] for r in runs) / n for j in range(len(runs[0].tasks))]
              for i in range(len(runs[0].tasks))]
    baseline = [sum(r.baseline[j] for r in runs) / n for j in range(len(runs[0].tasks))]
    first = runs[0]
    return cl.StreamResult(method=first.method, tasks=first.tasks, test_items=first.test_items,
                           matrix=matrix, baseline=baseline,
                           metrics=cl.transfer_metrics(matrix, baseline), history=first.history,
                           train_s=sum(r.train_s for r in runs),
                           eval_s=sum(r.eval_s for r in runs), config=first.config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", default="naive,replay,ewc,l2",
                        help=f"comma-separated, naive first; known: {', '.join(cl.METHODS)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=3, help="passes over a task's questions")
    parser.add_argument("--steps", type=int, default=None, help="steps per task (instead of "
                        "--epochs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--replay-ratio", type=float, default=0.5)
    parser.add_argument("--penalty-strength", type=float, default=10.0)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; --quick: the first")
    parser.add_argument("--cache", type=Path, default=tg.RESULTS / "cache")
    parser.add_argument("--out-dir", type=Path, default=tg.RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    methods = generator_bench.parse_methods(parser, args.methods)
    if not args.temperature > 0:
        parser.error(f"--temperature has to be > 0, but is {args.temperature}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds has to be comma-separated integers, but is {args.seeds!r}")
    if not seeds:
        parser.error("--seeds names no seed")
    seeds = seeds[:1] if args.quick else seeds
    wall = time.perf_counter()
    settings = Settings()
    device, _ = loop.pick_device(args.device)

    _, corpus, _ = tg.load_data(False)
    splits = {"train": [i for name in SETS for i in load_split(name, "train")],
              "test": [i for name in SETS for split in ("dev", "test")
                       for i in load_split(name, split)]}
    tasks = cl.topic_tasks(splits, corpus, GROUPS)
    log.info("tasks: %s", [(t.name, len(t.train), len(t.test)) for t in tasks])
    base = Encoder.from_settings(settings)
    doc_vectors = corpus_embeddings(base, corpus, args.cache, progress=True)

    config = {
        "lr": args.lr, "batch_size": args.batch_size,
        "steps_per_task": 2 if args.quick else args.steps, "epochs": args.epochs,
        "warmup_steps": 0, "schedule": "constant", "replay_ratio": args.replay_ratio,
        "penalty_strength": args.penalty_strength, "fisher_examples": 4 if args.quick else 32,
        "device": args.device}
    runs: dict[str, list[cl.StreamResult]] = {}
    baseline = None
    for method in methods:
        for seed in seeds:
            encoder = copy.copy(base)
            encoder.model = copy.deepcopy(base.model)
            run = run_retriever_stream(
                cl.ContinualConfig(**{**config, "method": method, "seed": seed}), encoder,
                doc_vectors, corpus, tasks, temperature=args.temperature, baseline=baseline)
            baseline = run.baseline
            runs.setdefault(method, []).append(run)
            log.info("%s seed %d done: %s", method, seed, run.metrics)
    results = {method: mean_result(r) for method, r in runs.items()}

    checks = generator_bench.targets(results)
    stem = "continual-retriever" + ("-quick" if args.quick else "")
    print(f"\ncontinual learning of the retriever, {len(tasks)} tasks, MiniLM query encoder on "
          f"{device}{', quick' if args.quick else ''}; mean of seeds {seeds}")
    print(cl.stream_table(list(results.values()), accuracy="recall@1"))
    generator_bench.print_targets(checks)
    total = time.perf_counter() - wall
    print(f"wall {total:.0f} s")
    paths = cl.write_stream_report(
        args.out_dir, list(results.values()),
        {"environment": tg.environment(device), "quick": args.quick,
         "temperature": args.temperature, "seeds": seeds,
         "per_seed": {m: [asdict(r.metrics) for r in rs] for m, rs in runs.items()},
         "tasks": generator_bench.task_records(tasks), "targets": checks,
         "wall_s": round(total, 1)}, stem=stem, accuracy="recall@1")
    print("results: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
