"""Answer quality and latency of a running ragtune on the packaged capital questions.

    ragtune up            # first, with the full corpus ingested
    python bench/qa.py [--split all|train|dev|test] [--limit N] [--url URL]

Asks every grounded capital question (and the not-in-corpus ones) through ``POST /v1/qa``,
one at a time, and prints answer-contains / exact match / token F1 / abstention, and the
p50/p95 latency of each stage. Results also go to bench/results/qa.json.
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

from deploy.cli import read_state
from shared.datasets import load_capital_questions, split
from shared.metrics import contains, exact_match, token_f1
from shared.prompt import is_no_answer
from shared.settings import Settings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="all", choices=["all", "train", "dev", "test"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--url", default=None, help="ragtune's HTTP address (default: the "
                                                    "one `ragtune up` started)")
    args = parser.parse_args()
    url = args.url
    if url is None:
        state = read_state(Settings())
        if state is None or "http_url" not in state:
            sys.exit("ragtune is not running: start it with `ragtune up` or pass --url")
        url = state["http_url"]
    items = load_capital_questions()
    if args.split != "all":
        items = split(items)[args.split]
    items = items[: args.limit] if args.limit else items
    rows, timings = [], {}
    started = time.perf_counter()
    with httpx.Client(timeout=300) as client:
        for n, item in enumerate(items, start=1):
            body = client.post(f"{url}/v1/qa", json={"question": item.question}).json()
            answer = body["answer"]
            rows.append({
                "id": item.id, "answerable": item.answerable, "answer": answer,
                "gold": item.answers, "contains": contains(answer, item.answers),
                "em": exact_match(answer, item.answers), "f1": token_f1(answer, item.answers),
                "abstained": is_no_answer(answer),
                "cited_gold": any(c["doc_id"] in item.doc_ids for c in body["citations"]),
                "retrieved_gold": any(p["doc_id"] in item.doc_ids for p in body["passages"]),
                "trust": body.get("trust"), "draft": body.get("draft"),
            })
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
