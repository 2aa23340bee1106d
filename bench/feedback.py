"""The production feedback loop on real parts: judged answers go into the trainer's store, a
continual update trains the packaged SmolLM2-135M-Instruct on them, and the promotion gate
decides — once with sound corrections and once with deliberately wrong ones, side by side.

    python bench/feedback.py [--quick] [--device auto|cpu|cuda] [--items N] [--method NAME]

Both runs start from the same serving model (the packaged one) and go through what serving
runs: ``TrainerRunner.feedback`` for each item (the store), ``TrainerRunner.update`` (a
``continual`` job), the trainer's thread training and gating it. The items are capital
questions of the packaged train split (``--items`` of them, seeded): "sound" corrects each
to its capital; "wrong" corrects each to another country's capital, a deliberately bad
update. Training is grounded, so a correction the passages do not hold is learnt as "I don't
know.": the wrong update teaches the model to abstain where the passages do hold the answer.

The gate (``services/trainer/continual.py``: ``gate``) answers the frozen regression set (the
first ``regression_limit`` answerable capital and FanOutQA dev questions) and the new items
it held out of training (``jobs.hold_out``: about 15% of them, by the job's seed) with the
serving model and with the candidate (answer-contains, greedy, serving's prompt over
the hybrid top 3 of the full corpus) and promotes only if regression accuracy drops by at most
the tolerance (0.02) and the new items are answered at least as well. Expected: sound
promoted, wrong kept out.

``--quick`` (a 2-core CPU): 12 items, 20 regression questions, 6 steps of 4 new + 4 replayed
examples, only SmolLM2's last 4 blocks trained. The full run (a GPU): 64 items, 40 regression
questions, 2 epochs over all blocks. ``--updates``, ``--steps``, ``--lr``,
``--train-last-layers`` change that. Results: bench/results/feedback[-quick]-<updates>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_generator as tg

from services.trainer import jobs, loop
from services.trainer.runner import TrainerRunner
from services.trainer.service import TrainerService
from shared.datasets import load_split
from shared.schemas import Feedback, JobStatus, UpdateRequest
from shared.settings import Settings

log = logging.getLogger("bench.feedback")

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 13


def feedback_items(n: int, wrong: bool) -> list[Feedback]:
    """``n`` seeded capital questions of the train split, each corrected to its capital or,
    with ``wrong``, to the next one's."""
    items = [i for i in load_split("capitals", "train", seed=SEED) if i.answerable]
    picked = random.Random(SEED).sample(items, n)
    out = []
    for k, item in enumerate(picked):
        answer = picked[(k + 1) % n].answers[0] if wrong else item.answers[0]
        out.append(Feedback(feedback_id=f"{'wrong' if wrong else 'sound'}-{k}",
                            question=item.question, verdict="wrong", correct_answer=answer))
    return out


def run_update(runner: TrainerRunner, items: list[Feedback], timeout_s: float) -> JobStatus:
    for fb in items:
        runner.feedback(fb)
    job_id = runner.update(UpdateRequest(promote=True)).job_id
    if not runner.wait_idle(timeout_s):
        raise TimeoutError(f"update {job_id} did not finish in {timeout_s:.0f} s")
    return runner.service.status(job_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--items", type=tg.count, default=None)
    parser.add_argument("--method", default="replay")
    parser.add_argument("--steps", type=tg.count, default=None, help="optimiser steps per update")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--train-last-layers", type=tg.count, default=None)
    parser.add_argument("--updates", default="wrong,sound",
                        help="which updates to run, of wrong,sound")
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("bm25s", "httpx", "transformers", "services.evaluation.qa"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quick = args.quick
    n_items = args.items or (12 if quick else 64)
    params = {"method": args.method, "tolerance": 0.02, "lr": 1e-4 if quick else 5e-5,
              "batch_size": 4 if quick else 8, "buffer_size": 256,
              "regression_limit": 20 if quick else 40, "eval_batch_size": 8 if quick else 32}
    params |= ({"steps_per_task": 6, "train_last_layers": 4} if quick else {"epochs": 2})
    params |= {k: v for k, v in {"steps_per_task": args.steps, "lr": args.lr,
                                 "train_last_layers": args.train_last_layers}.items()
               if v is not None}
    updates = [u.strip() for u in args.updates.split(",")]
    if not updates or set(updates) - {"wrong", "sound"}:
        parser.error(f"--updates takes wrong and/or sound, not {args.updates!r}")
    device, _ = loop.pick_device(args.device)

    # Fresh homes; the corpus embeddings come from the benchmarks' cache (or are made there).
    home = RESULTS / "runs" / f"feedback{'-quick' if quick else ''}"
    shutil.rmtree(home, ignore_errors=True)
    (RESULTS / "cache").mkdir(parents=True, exist_ok=True)

    rows = {}
    wall = time.perf_counter()
    for name in updates:
        # each from the packaged model: a registry of its own
        settings = Settings(home=home / name, trainer={"device": args.device},
                            feedback={"update_after": 0, "params": params})
        settings.home.mkdir(parents=True)
        (settings.home / "cache").symlink_to(RESULTS / "cache", target_is_directory=True)
        # the packaged generator, converted once for every home
        (RESULTS / "cache" / "models").mkdir(exist_ok=True)
        settings.model_cache_dir.symlink_to(RESULTS / "cache" / "models",
                                            target_is_directory=True)
        runner = TrainerRunner(TrainerService(settings), lambda _event: None)
        started = time.perf_counter()
        try:
            status = run_update(runner, feedback_items(n_items, name == "wrong"),
                                args.timeout_s)
        finally:
            runner.stop()
        if status.state != "done":
            raise SystemExit(f"{name} update {status.job_id} {status.state}: {status.error}")
        gate = json.loads((runner.service.registry.run_dir(status.job_id)
                           / jobs.GATE_FILE).read_text())
        rows[name] = {"job_id": status.job_id, "promoted": bool(status.promoted),
                      "note": status.note, "metrics": status.metrics,
                      "trained_items": gate["train_items"],
                      "held_out_items": gate["held_out_items"] if gate["new_data_held_out"]
                      else 0,
                      "wall_s": round(time.perf_counter() - started, 1)}

    print(f"\nfeedback loop{' (quick)' if quick else ''} on {device}: packaged SmolLM2, "
          f"{n_items} corrected capital questions per update, method {args.method}, "
          f"regression set {params['regression_limit']} dev questions, tolerance "
          f"{params['tolerance']}")
    head = f"{'update':<8}{'regression':>22}{'new items':>22}{'decision':>11}{'wall s':>9}"
    print(head + "\n" + f"{'':<8}{'serving > candidate':>22}{'serving > candidate':>22}")
    for name, row in rows.items():
        m = row["metrics"]
        print(f"{name:<8}{m['serving_regression']:>12.3f} > {m['candidate_regression']:.3f}"
              f"{m['serving_new_data']:>12.3f} > {m['candidate_new_data']:.3f}"
              f"{'promoted' if row['promoted'] else 'kept out':>11}{row['wall_s']:>9.0f}")
    for name, row in rows.items():
        scored = (f"the {row['held_out_items']} held out" if row["held_out_items"]
                  else "the trained ones (too few to hold some out)")
        print(f"{name}: {row['note']} (trained on {row['trained_items']} items; new items "
              f"scored on {scored})")
    for name, row in rows.items():
        m = row["metrics"]
        regressed = m["candidate_regression"] < m["serving_regression"] - params["tolerance"]
        print(f"{name}: the candidate {'regressed' if regressed else 'did not regress'} and "
              f"was {'promoted' if row['promoted'] else 'kept out'}"
              + ("" if name == "sound" or not row["promoted"] else " (FAIL: a wrong update)"))
    wall_s = time.perf_counter() - wall
    print(f"wall {wall_s:.0f} s; load average at the end {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    out = RESULTS / f"feedback{'-quick' if quick else ''}-{'-'.join(updates)}.json"
    out.write_text(json.dumps({"quick": quick, "device": str(device), "items": n_items,
                               "params": params, "updates": rows, "wall_s": round(wall_s, 1)},
                              indent=1))


if __name__ == "__main__":
    main()
