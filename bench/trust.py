"""Trust-gated answers: the generator's answers withheld below each ``answer.min_trust``, side
by side with no gate (0, the generator alone), on the packaged question sets.

    python bench/trust.py [--model PATH] [--device auto|cpu|cuda] [--quick] [--out PATH]

The generator (the packaged SmolLM2-135M-Instruct, or a fine-tuned one named by ``--model``)
answers the dev and test splits once, through the offline serving pipeline of
bench/train_generator.py (same splits and cached hybrid passages, top 3, serving's prompt,
greedy, serving's ``generator.max_new_tokens``: 48 unless ``RAGTUNE_GENERATOR__MAX_NEW_TOKENS``
says otherwise). Each answer's trust is ``shared.prompt.support``: the share of its
content words found in those sentences of its passages that share a word with the question
(as served) and, side by side, found anywhere in its passages (the gate before:
``by_sentence=False``). Every threshold is then applied to the same answers
(``services.evaluation.qa.score_row``, as the QA front applies ``answer.min_trust``):

- capitals: answered rate, exact match, answer-contains (a withheld answer counts as wrong);
- capitals_unanswerable (no corpus article states the capital): abstention rate;
- FanOutQA sub-questions, and the subset whose answer is in its evidence: contains, answered.

The threshold is chosen on dev by the mean of capitals contains, FanOutQA contains and
capitals_unanswerable abstention, for each way of counting, then reported on test beside 0.
``--quick`` answers a few questions per set on a 1,000-document corpus (pipeline check only).
Results go to bench/results/trust[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_generator as tg

from services.trainer import loop
from shared.datasets import QAItem, answer_in_evidence
from shared.settings import Settings

log = logging.getLogger("bench.trust")

THRESHOLDS = (0.0, 0.25, 0.34, 0.5, 0.67, 0.75, 1.0)
COLUMNS = ("capitals contains", "capitals EM", "capitals answered", "unanswerable abstained",
           "fanout contains", "fanout answered", "in-evidence contains", "in-evidence answered")


def metrics(sets: dict[str, list[QAItem]], answered: tg.Said, in_evidence: set[str],
            min_trust: float, by_sentence: bool = True) -> dict[str, float | None]:
    """One row of the table: the sets scored with answers below ``min_trust`` withheld
    (``tg.score``)."""
    scored, _ = tg.score(sets, answered, in_evidence, min_trust, by_sentence)
    cap, una = scored["capitals"], scored["capitals_unanswerable"]
    fan, ev = scored["fanout"], scored[tg.IN_EVIDENCE]
    values = (cap["contains"], cap["em"], cap["answered_rate"], una["abstention_rate"],
              fan["contains"], fan["answered_rate"], ev["contains"], ev["answered_rate"])
    out = dict(zip(COLUMNS, values, strict=True))
    chosen = [v for v in (cap["contains"], fan["contains"], una["abstention_rate"])
              if v is not None]
    out["selection score"] = round(statistics.fmean(chosen), 4) if chosen else None
    return out


def table(title: str, rows: dict[float | str, dict[str, float | None]]) -> str:
    """A threshold per row (or a label naming one)."""
    head = f"{'min_trust':>10}" + "".join(f"{c:>{len(c) + 2}}" for c in COLUMNS)
    lines = [title, head]
    for threshold, row in rows.items():
        cells = "".join(f"{tg.fmt(row[c]):>{len(c) + 2}}" for c in COLUMNS)
        label = f"{threshold:.2f}" if isinstance(threshold, float) else threshold
        lines.append(f"{label:>10}{cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="generator folder (default: packaged)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=Path, default=tg.RESULTS / "cache")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    settings = Settings()
    device, _ = loop.pick_device(args.device)
    data, corpus, in_evidence = tg.load_data(args.quick)
    by_id = {d.doc_id: d for d in corpus}
    in_evidence |= {i.id for i in data["dev"]["fanout"] if answer_in_evidence(i, by_id)}
    passages = tg.cached_passages(tg.all_questions(data), corpus, settings, args.cache)
    passages = {q: hits[:tg.TOP_K] for q, hits in passages.items()}
    model, tokenizer = tg.load_fp32_generator(settings, device, args.model)
    model = model.eval()
    batch = 64 if device.type == "cuda" else 8

    # scope: where an answer's words count (shared.prompt.support's by_sentence): in the
    # passages' sentences on the question (served), or anywhere in them (the gate before)
    results: dict[str, dict[str, dict[float, dict]]] = {"sentence": {}, "anywhere": {}}
    for split in ("dev", "test"):
        sets = data[split]
        t = time.perf_counter()
        answered = tg.answer_all(model, tokenizer, [i for s in sets.values() for i in s],
                                 passages, batch, settings.generator.max_new_tokens)
        log.info("%s: %d questions answered in %.0f s", split, len(answered),
                 time.perf_counter() - t)
        for scope, rows in results.items():
            rows[split] = {t: metrics(sets, answered, in_evidence, t, scope == "sentence")
                           for t in THRESHOLDS}
            print(table(f"\n{split} split, words {scope}", rows[split]), flush=True)
    chosen = {scope: max(THRESHOLDS, key=lambda t, r=rows: (
        r["dev"][t]["selection score"] or 0, -t)) for scope, rows in results.items()}
    print(f"\nchosen on dev: min_trust {chosen['sentence']} (sentences), "
          f"{chosen['anywhere']} (anywhere)")
    print(table("test: no gate, the gate on words anywhere, the gate on sentences (served)",
                {"0": results["sentence"]["test"][0.0],
                 f"{chosen['anywhere']:.2f} any": results["anywhere"]["test"][chosen["anywhere"]],
                 f"{chosen['sentence']:.2f}": results["sentence"]["test"][chosen["sentence"]]}))
    out = args.out or tg.RESULTS / f"trust{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "environment": tg.environment(device), "model": args.model or "packaged",
        "quick": args.quick, "chosen_min_trust": chosen["sentence"],
        "chosen_min_trust_anywhere": chosen["anywhere"],
        "questions": {s: {k: len(v) for k, v in data[s].items()} for s in ("dev", "test")},
        "results": {s: {str(t): row for t, row in r.items()}
                    for s, r in results["sentence"].items()},
        "results_anywhere": {s: {str(t): row for t, row in r.items()}
                             for s, r in results["anywhere"].items()},
        "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
