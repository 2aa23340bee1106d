"""Generalisation to questions of shapes never trained on: the packaged generator beside
fine-tuned ones on hand-written questions over the corpus.

    python bench/handwritten.py [--model PATH ...] [--data FILE] [--top-k N]
                                [--device auto|cpu|cuda] [--out PATH]

The questions (``bench/data/handwritten.jsonl``, the format ``ragtune train --data`` reads):
50 written by hand over a seeded sample of the corpus, 4-5 per topic (who / what / when /
where / which / how many; no "capital of" template, no FanOutQA question), each with its short
answer as the document states it and that document as its gold; and 10 about corpus entities
whose summaries do not state the fact asked for (answer "I don't know."). No training set or
tuning run reads them. ``bench/data/handwritten-heldout.jsonl`` (``--data``) holds 48 more of
the same kinds (40 + 8), written over another seeded sample after the prompt's passage order
was chosen on the first file (``shared/prompt.py``): the check that the choice generalises.

Every generator (the packaged SmolLM2-135M-Instruct as ``base``, then each ``--model`` folder,
named by it) answers every question once, through the offline serving pipeline
(``bench/train_generator.py`` ``answer_all``: hybrid top-3 passages over the full corpus, as
served, or ``--top-k``, cached in bench/results/cache; serving's prompt; greedy; serving's
``generator.max_new_tokens``, 48 unless ``RAGTUNE_GENERATOR__MAX_NEW_TOKENS`` says otherwise).
The answers are scored three times: as generated (min_trust 0), with serving's trust gate
(``answer.min_trust``: an answer whose content words the passages' sentences on the question do
not back is withheld; ``shared.prompt.support``) and, as ``<min_trust> any``, with the gate
before it (the words anywhere in the passages: ``by_sentence=False``). Per
model and gate: answer-contains, exact match, token F1 and answered rate on the 50, abstention
on the 10, and how often a gold document is among the passages. Results go to
bench/results/handwritten.json with every answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_generator as tg

from services.evaluation import qa
from services.trainer import loop
from shared.datasets import QAItem, load_corpus, load_qa_jsonl
from shared.files import write_text_atomic
from shared.settings import Settings

log = logging.getLogger("bench.handwritten")

DATA = Path(__file__).resolve().parent / "data" / "handwritten.jsonl"
COLUMNS = ("contains", "em", "f1", "answered_rate", "abstention_rate", "retrieved_gold")


def model_name(path: str) -> str:
    """A run's model folder (``.../<run>/model``) by its run's name, any other by its own."""
    folder = Path(path)
    return folder.parent.name if folder.name == "model" else folder.name


def score(items: list[QAItem], answered: dict[str, tuple[str, list]], min_trust: float,
          by_sentence: bool = True) -> tuple[qa.SetMetrics, list[qa.QARow]]:
    rows = [qa.score_row(item, *answered[item.question], min_trust=min_trust,
                         by_sentence=by_sentence) for item in items]
    return qa.summarise(rows), rows


def table(results: dict[str, dict[str, dict]]) -> str:
    head = f"{'generator':<24}{'min_trust':>10}" + "".join(f"{c:>17}" for c in COLUMNS)
    lines = [head]
    for name, by_gate in results.items():
        for gate, metrics in by_gate.items():
            cells = "".join(f"{tg.fmt(metrics[c]):>17}" for c in COLUMNS)
            lines.append(f"{name:<24}{gate:>10}{cells}")
    return "\n".join(lines)


def write_results(path: Path, results: dict) -> None:
    """``results`` as indented JSON to ``path``, in UTF-8 whatever the locale (answers keep
    their accents: no ``\\u`` escapes), atomically; the folder is made if missing."""
    write_text_atomic(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[],
                        help="a fine-tuned generator folder (repeatable); the packaged one "
                             "always runs as `base`")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--top-k", type=int, default=tg.TOP_K, choices=range(1, tg.DEPTH + 1),
                        metavar=f"1..{tg.DEPTH}", help="passages per prompt (default: as served)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--cache", type=Path, default=tg.RESULTS / "cache")
    parser.add_argument("--out", type=Path, default=tg.RESULTS / "handwritten.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("bm25s", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    names = ["base", *(model_name(m) for m in args.model)]
    if len(set(names)) != len(names):
        parser.error(f"two generators would share a name: {names}")
    started = time.perf_counter()
    settings = Settings()
    device, _ = loop.pick_device(args.device)
    items = load_qa_jsonl(args.data)  # checked whole before any model loads
    corpus = load_corpus()
    questions = list(dict.fromkeys(i.question for i in items))
    passages = tg.cached_passages(questions, corpus, settings, args.cache)
    passages = {q: hits[:args.top_k] for q, hits in passages.items()}
    gate = settings.answer.min_trust
    # label: (min_trust, by_sentence); "any": the words anywhere in the passages back an answer
    gates = {"0": (0.0, True), f"{gate:g} any": (gate, False),
             f"{gate:g}": (gate, settings.answer.trust_by_sentence)}
    batch = 64 if device.type == "cuda" else 8

    results: dict[str, dict[str, dict]] = {}
    answers: dict[str, list[dict]] = {}
    for name, path in zip(names, [None, *args.model], strict=True):
        model, tokenizer = tg.load_fp32_generator(settings, device, path)
        model = model.eval()
        t = time.perf_counter()
        answered = tg.answer_all(model, tokenizer, items, passages, batch,
                                 settings.generator.max_new_tokens)
        log.info("%s answered %d questions in %.0f s", name, len(answered),
                 time.perf_counter() - t)
        scored = {label: score(items, answered, *g) for label, g in gates.items()}
        results[name] = {label: vars(metrics) for label, (metrics, _) in scored.items()}
        answers[name] = [vars(r) for r in scored[f"{gate:g}"][1]]
        del model

    n_ok = sum(i.answerable for i in items)
    print(f"\nhand-written questions ({args.data.name}): {n_ok} answerable, "
          f"{len(items) - n_ok} not in the corpus; hybrid top-{args.top_k} passages, greedy, "
          f"on {device}")
    print(table(results))
    total = time.perf_counter() - started
    print(f"wall {total:.0f} s")
    write_results(args.out, {
        "environment": tg.environment(device), "data": str(args.data), "top_k": args.top_k,
        "models": dict(zip(names, ["packaged", *args.model], strict=True)),
        "results": results, "answers": answers, "wall_s": round(total, 1)})
    print(f"results written to {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
