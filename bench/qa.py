"""Answer quality and latency of a running ragtune on the packaged capital questions.

    ragtune up            # first, with the full corpus ingested
    python bench/qa.py [--split all|train|dev|test] [--limit N] [--url URL]

Asks every grounded capital question (and the not-in-corpus ones) through ``POST /v1/qa``,
one at a time, and prints answer-contains / exact match / token F1 / abstention, and the
p50/p95 latency of each stage. Answers are scored as ``ragtune eval qa`` scores them
(``services.evaluation.qa.score_row``: citation markers removed, an abstention scores 0).
Results also go to bench/results/qa.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_generator as tg

from deploy.cli import read_state
from services.evaluation.qa import score_row
from shared.datasets import QAItem, load_capital_questions, split
from shared.schemas import Hit
from shared.settings import Settings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def score_served(item: QAItem, body: dict) -> dict:
    """One ``POST /v1/qa`` answer (``body``, a QAResponse) to ``item`` as a results row, scored
    by ``score_row`` on the passages served. The server has already withheld an answer below
    ``answer.min_trust``, so nothing is withheld again; citations and trust are the server's."""
    passages = [Hit(doc_id=p["doc_id"], title=p["title"], text=p["text"], score=p["score"])
                for p in body["passages"]]
    row = score_row(item, body["answer"], passages)
    return {
        "id": item.id, "answerable": item.answerable, "answer": body["answer"],
        "gold": item.answers, "contains": row.contains, "em": row.em, "f1": row.f1,
        "abstained": row.abstained,
        "cited_gold": any(c["doc_id"] in item.doc_ids for c in body["citations"]),
        "retrieved_gold": row.retrieved_gold,
        "trust": body.get("trust"), "draft": body.get("draft"),
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="all", choices=["all", "train", "dev", "test"])
    parser.add_argument("--limit", type=tg.count, default=None, help="first N questions")
    parser.add_argument("--url", default=None, help="ragtune's HTTP address (default: the "
                                                    "one `ragtune up` started)")
    return parser


def main() -> None:
    args = parser().parse_args()
    url = args.url
    if url is None:
        state = read_state(Settings())
        if state is None or "http_url" not in state:
            sys.exit("ragtune is not running: start it with `ragtune up` or pass --url")
        url = state["http_url"]
    items = load_capital_questions()
    if args.split != "all":
        items = split(items)[args.split]
    items = items[:args.limit]
    rows, timings = [], {}
    started = time.perf_counter()
    with httpx.Client(timeout=300) as client:
        for n, item in enumerate(items, start=1):
            body = client.post(f"{url}/v1/qa", json={"question": item.question}).json()
            rows.append(score_served(item, body))
            for stage, ms in body["timings_ms"].items():
                timings.setdefault(stage, []).append(ms)
            if n % 20 == 0:
                print(f"  {n}/{len(items)} asked", file=sys.stderr)
    elapsed = time.perf_counter() - started

    def mean(key: str, subset: list[dict]) -> float:
        return statistics.mean(r[key] for r in subset) if subset else float("nan")

    print(f"ragtune QA on capital questions ({args.split} split), {len(items)} questions, "
          f"{elapsed:.0f} s")
    print(f"{'set':<28}{'n':>5}{'contains':>10}{'EM':>7}{'F1':>7}{'abstain':>9}"
          f"{'cited gold':>12}{'gold in top-k':>15}")
    for name, subset in [("grounded (answerable)", [r for r in rows if r["answerable"]]),
                         ("not in corpus", [r for r in rows if not r["answerable"]])]:
        print(f"{name:<28}{len(subset):>5}{mean('contains', subset):>10.3f}"
              f"{mean('em', subset):>7.3f}{mean('f1', subset):>7.3f}"
              f"{mean('abstained', subset):>9.3f}{mean('cited_gold', subset):>12.3f}"
              f"{mean('retrieved_gold', subset):>15.3f}")
    print(f"\n{'stage':<22}{'p50 ms':>10}{'p95 ms':>10}")
    for stage, values in timings.items():
        print(f"{stage:<22}{percentile(values, .5):>10.1f}{percentile(values, .95):>10.1f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "qa.json").write_text(json.dumps({"rows": rows, "timings_ms": timings}, indent=1))


if __name__ == "__main__":
    main()
