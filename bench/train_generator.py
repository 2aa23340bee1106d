"""Generator fine-tuning on the packaged data: base SmolLM2 against the fine-tuned one.

    python bench/train_generator.py [--device auto|cpu|cuda] [--method full|lora]
                                    [--epochs N] [--max-steps N] [--batch-size N]
                                    [--activation-checkpointing] [--restate]
                                    [--eval-steps N] [--eval-questions N] [--seed N [N ...]]
                                    [--quick] [--run-dir PATH] [--out PATH]

The packaged SmolLM2-135M-Instruct, the packaged MiniLM retriever and the full corpus. Both
models answer the test splits through the offline serving pipeline
(``services/evaluation/qa.py``: hybrid retrieval, weighted_minmax with dense weight 0.9, top 3
passages, serving's prompt, greedy decoding, 48 new tokens), side by side, each scored twice:
as the generator said it, and as served (``<model> served``: answers whose trust is under
``answer.min_trust`` withheld, as the QA front withholds them):

- capitals (answerable): exact match, token F1, answer-contains, answered rate;
- capitals_unanswerable (capital not in the corpus): abstention rate ("I don't know.");
- FanOutQA sub-questions: EM / F1 / contains, overall and on the subset whose answer is in
  its evidence document (``answer_in_evidence``).

Training uses the train splits of all three sets (``services/trainer/generator.py``: answers
"<answer> [n]" citing the passage that holds them, "I don't know." when none does, plus
gold-removed abstention copies), checkpoints chosen on the dev splits. Two or more ``--seed``
values train one run per seed from the base model (``RUN_DIR/seed-N``) and average their
weights into a uniform soup (``services/trainer/soup.py``, ``RUN_DIR/soup``), judged beside
them. The issue's targets are printed with PASS/FAIL for every fine-tuned model, on its served
answers: EM >= 0.80 on capitals, contains >= +15 points over the base on the FanOutQA
in-evidence subset, abstention >= 0.80 on unanswerable capitals while answering >= 0.90 of
the answerable ones.

Retrieval results are cached in ``--cache`` (default bench/results/cache) as a passages file,
so a later run (or a machine without the retriever's weights) needs only that file.

``--quick`` is for a CPU (~5 minutes on 2 busy cores, where a full fine-tuning step of 2
examples takes ~25 s): the corpus is the documents the questions need plus a seeded sample
(1,000 in all), 6/3/6 test questions, 4 dev questions per set, 3 training steps of 2
examples, 24 new tokens. Its numbers only show that the pipeline runs. Results go to
bench/results/train_generator[-quick].json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.evaluation import qa
from services.trainer import loop
from services.trainer.generator import BASE_ANSWERS_FILE, GeneratorTrainConfig, train_generator
from services.trainer.soup import average_models
from shared.datasets import QAItem, answer_in_evidence, load_corpus, load_split
from shared.models.encoder import Encoder
from shared.models.generator import load_generator
from shared.schemas import Document, Hit
from shared.settings import GeneratorSettings, Settings

log = logging.getLogger("bench.train_generator")

RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("capitals", "capitals_unanswerable", "fanout")
IN_EVIDENCE = "fanout_in_evidence"
TOP_K = qa.SERVING_TOP_K
DEPTH = TOP_K + 3  # hits kept per question: top_k for prompts, 3 more for abstention copies
QUICK_CORPUS = 1_000
QUICK_TEST = {"capitals": 6, "capitals_unanswerable": 3, "fanout": 6}
QUICK_DEV = 4  # per set


def count(text: str) -> int:
    """An argparse type for counts (steps, questions, a batch size): a whole number >= 1, so
    that 0 is refused instead of silently meaning the default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"has to be 1 or more, not {value}")
    return value


# --- data (shared with bench/train_joint.py) --------------------------------------------------
def load_data(quick: bool, seed: int = 13) -> tuple[dict[str, dict[str, list[QAItem]]],
                                                    list[Document], set[str]]:
    """({split: {set: items}}, corpus, ids of FanOutQA test items whose answer is in the
    evidence). ``quick`` keeps a few test questions per set (in-evidence FanOutQA ones first)
    and a corpus of the documents the questions need plus a seeded sample."""
    corpus = load_corpus()
    by_id = {d.doc_id: d for d in corpus}
    data = {split: {name: load_split(name, split, seed) for name in SETS}
            for split in ("train", "dev", "test")}
    in_evidence = {i.id for i in data["test"]["fanout"] if answer_in_evidence(i, by_id)}
    if quick:
        test = data["test"]
        fanout = ([i for i in test["fanout"] if i.id in in_evidence][:QUICK_TEST["fanout"] // 2]
                  + [i for i in test["fanout"] if i.id not in in_evidence])
        test["fanout"] = fanout[:QUICK_TEST["fanout"]]
        for name in ("capitals", "capitals_unanswerable"):
            test[name] = test[name][:QUICK_TEST[name]]
        data["dev"] = {name: items[:QUICK_DEV] for name, items in data["dev"].items()}
        needed = {d for split in data.values() for items in split.values() for i in items
                  for d in i.doc_ids}
        others = [d for d in corpus if d.doc_id not in needed]
        keep = needed | {d.doc_id for d in random.Random(seed).sample(
            others, max(0, QUICK_CORPUS - len(needed)))}
        corpus = [d for d in corpus if d.doc_id in keep]
    return data, corpus, in_evidence


def all_questions(data: dict[str, dict[str, list[QAItem]]]) -> list[str]:
    return list(dict.fromkeys(i.question for split in data.values() for items in split.values()
                              for i in items))


def cached_passages(questions: Sequence[str], corpus: Sequence[Document], settings: Settings,
                    cache: Path, depth: int = DEPTH) -> dict[str, list[Hit]]:
    """Hybrid top ``depth`` hits per question, from ``cache/passages-<key>.json`` when there
    (key: questions, documents, depth), else retrieved with the packaged MiniLM and written."""
    digest = hashlib.sha256()
    for text in (*questions, "\x00", *(d.doc_id for d in corpus), f"depth={depth}",
                 f"{qa.SERVING_MODE}/{qa.SERVING_WEIGHT}/{qa.SERVING_CANDIDATES}"):
        digest.update(text.encode() + b"\n")
    path = cache / f"passages-{digest.hexdigest()[:12]}.json"
    if path.is_file():
        log.info("passages read from %s", path)
        return qa.load_passages(path)
    started = time.perf_counter()
    encoder = Encoder.from_settings(settings)
    with qa.HybridRetriever(encoder, corpus, cache_dir=cache, progress=True) as retriever:
        passages = qa.retrieve(retriever, questions, depth)
    qa.save_passages(path, passages)
    log.info("retrieved %d questions in %.0f s; cached in %s", len(passages),
             time.perf_counter() - started, path)
    return passages


def load_fp32_generator(settings: Settings, device: torch.device, model: str | None = None):
    """The packaged generator, or the one in folder ``model``, in fp32 (trained in fp32 under
    bf16 autocast), on ``device``."""
    cpu = settings.model_copy(update={"generator": GeneratorSettings(device="cpu",
                                                                     model=model)})
    model, tokenizer = load_generator(cpu)
    return model.float().to(device), tokenizer


Said = dict[str, tuple[str, list[Hit]]]  # question -> (answer, the passages its prompt held)


def evaluate(model, tokenizer, test: dict[str, list[QAItem]], passages, in_evidence: set[str],
             max_new_tokens: int, batch_size: int) -> tuple[dict[str, dict], Said]:
    """Per-set metrics (plus the FanOutQA in-evidence subset) of the generator's own answers
    from each question's top ``TOP_K`` passages, and those answers."""
    said = answer_all(model, tokenizer, [i for items in test.values() for i in items],
                      {q: hits[:TOP_K] for q, hits in passages.items()}, batch_size,
                      max_new_tokens)
    return score(test, said, in_evidence)[0], said


def answer_all(model, tokenizer, items: Sequence[QAItem], passages: dict[str, list[Hit]],
               batch_size: int, max_new_tokens: int = qa.SERVING_MAX_NEW_TOKENS) -> Said:
    """Every distinct question of ``items`` answered once from its ``passages[question]`` (all
    of them: cut them to the top k first), greedy, through serving's prompt
    (``qa.answer_questions``)."""
    questions = list(dict.fromkeys(i.question for i in items))
    answers, kept = qa.answer_questions(model, tokenizer, questions, passages,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size)
    return dict(zip(questions, zip(answers, kept, strict=True), strict=True))


def score(test: dict[str, list[QAItem]], said: Said, in_evidence: set[str],
          min_trust: float = 0.0, by_sentence: bool = True,
          ) -> tuple[dict[str, dict], dict[str, list[qa.QARow]]]:
    """(per-set metrics plus the in-evidence subset's, rows) of ``said``, with answers whose
    trust is under ``min_trust`` withheld as the QA front withholds them (0: none)."""
    rows = {name: [qa.score_row(i, *said[i.question], min_trust=min_trust,
                                by_sentence=by_sentence) for i in items]
            for name, items in test.items()}
    metrics = {name: vars(qa.summarise(r)) for name, r in rows.items()}
    metrics[IN_EVIDENCE] = vars(qa.summarise([r for r in rows["fanout"] if r.id in in_evidence]))
    return metrics, rows


COLUMNS = ("em", "f1", "contains", "answered_rate", "abstention_rate")


def fmt(value: float | None) -> str:
    """A metric as the benches' tables print it: three decimals, "-" for none."""
    return "-" if value is None else f"{value:.3f}"


def side_by_side(columns: dict[str, dict[str, dict]]) -> str:
    """One row per (set, metric), one column per model."""
    names = list(columns)
    first = columns[names[0]]
    lines = [f"{'set':<24}{'metric':<17}" + "".join(f"{n:>14}" for n in names)]
    for set_name in first:
        for metric in COLUMNS:
            values = [columns[n][set_name].get(metric) for n in names]
            if all(v is None for v in values):
                continue
            cells = "".join(f"{fmt(v):>14}" for v in values)
            lines.append(f"{set_name:<24}{metric:<17}{cells}")
        lines.append(f"{'':<24}{'n':<17}" + "".join(f"{columns[n][set_name]['n']:>14}"
                                                    for n in names))
    return "\n".join(lines)


def targets(base: dict[str, dict], tuned: dict[str, dict]) -> dict[str, dict]:
    """The issue's targets, each with the value reached and whether it passed."""
    gain = (tuned[IN_EVIDENCE]["contains"] or 0) - (base[IN_EVIDENCE]["contains"] or 0)
    checks = {
        "capitals EM >= 0.80": tuned["capitals"]["em"],
        "fanout in-evidence contains >= base + 0.15": gain,
        "unanswerable abstention >= 0.80": tuned["capitals_unanswerable"]["abstention_rate"],
        "capitals answered >= 0.90": tuned["capitals"]["answered_rate"],
    }
    thresholds = [0.80, 0.15, 0.80, 0.90]
    return {name: {"value": value, "pass": value is not None and value >= t - 1e-9}
            for (name, value), t in zip(checks.items(), thresholds, strict=True)}


def environment(device: torch.device) -> dict[str, str]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device), "python": sys.version.split()[0]}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None,
                        help="default 1e-4 (full) / 5e-4 (lora)")
    parser.add_argument("--batch-size", type=count, default=None,
                        help="examples per step (default 16; 2 with --quick)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (less memory)")
    parser.add_argument("--abstain-fraction", type=float, default=0.1)
    parser.add_argument("--answer-cut-fraction", type=float, default=0.0,
                        help="share of the answered questions added again with the sentences "
                             "stating the answer cut out of their passages (I don't know.)")
    parser.add_argument("--moved-fraction", type=float, default=0.0,
                        help="share of the answered questions added again with the passage "
                             "holding the answer moved to another place among the others")
    parser.add_argument("--restate", action="store_true",
                        help="answered targets restate the answer in a sentence (the base "
                             "generator's own where it states the answer) before the short "
                             "answer on a line of its own ('Answer: Paris [1]'); 64 answer "
                             "tokens and 48 new tokens at dev evaluations with it")
    parser.add_argument("--not-found-fraction", type=float, default=0.0,
                        help="share of answerable questions whose passages lack the answer "
                             "kept as 'I don't know.' examples")
    parser.add_argument("--eval-steps", type=count, default=None,
                        help="dev evaluation period (default 20; 3 with --quick)")
    parser.add_argument("--eval-questions", type=count, default=None,
                        help="dev questions per evaluation (default 96; 4 with --quick)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="training seed: example order, abstention picks, dev sample (the "
                             "train/dev/test split stays fixed); two or more train one run "
                             "each (RUN_DIR/seed-N) and their uniform soup (RUN_DIR/soup)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    wall = time.perf_counter()
    settings = Settings()
    device, _ = loop.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))

    data, corpus, in_evidence = load_data(args.quick)
    passages = cached_passages(all_questions(data), corpus, settings, args.cache)
    train = [i for items in data["train"].values() for i in items]
    dev = [i for items in data["dev"].values() for i in items]
    log.info("train %d, dev %d, test %s; corpus %d documents", len(train), len(dev),
             {k: len(v) for k, v in data["test"].items()}, len(corpus))

    gate = settings.answer
    eval_batch = 64 if device.type == "cuda" else 8
    # the served answer length (RAGTUNE_GENERATOR__MAX_NEW_TOKENS), as bench/trust.py reads it
    max_new = 24 if args.quick else settings.generator.max_new_tokens
    columns: dict[str, dict[str, dict]] = {}  # "<model>" (its own words) / "<model> served"
    samples: dict[str, dict[str, list[qa.QARow]]] = {}

    test_items = [i for items in data["test"].values() for i in items]
    top = {q: hits[:TOP_K] for q, hits in passages.items()}

    def judge(name: str, model, tokenizer) -> float:
        started = time.perf_counter()
        said = answer_all(model, tokenizer, test_items, top, eval_batch, max_new)
        columns[name] = score(data["test"], said, in_evidence)[0]
        columns[f"{name} served"], samples[name] = score(
            data["test"], said, in_evidence, gate.min_trust, gate.trust_by_sentence)
        seconds = time.perf_counter() - started
        log.info("%s evaluated in %.0f s", name, seconds)
        return seconds

    model, tokenizer = load_fp32_generator(settings, device)
    eval_s = {"base": judge("base", model, tokenizer)}

    lr = args.lr or (1e-4 if args.method == "full" else 5e-4)
    run_root = args.run_dir or RESULTS / "runs" / f"generator-{args.method}" \
        f"{'-quick' if args.quick else ''}"
    several = len(args.seed) > 1
    runs: dict[str, dict] = {}
    for seed in args.seed:
        name = f"seed {seed}" if several else "fine-tuned"
        config = GeneratorTrainConfig(
            method=args.method, lr=lr, epochs=args.epochs,
            max_steps=3 if args.quick and args.max_steps is None else args.max_steps,
            batch_size=args.batch_size or (2 if args.quick else 16),
            warmup_steps=1 if args.quick else 10, abstain_fraction=args.abstain_fraction,
            not_found_fraction=args.not_found_fraction,
            answer_cut_fraction=args.answer_cut_fraction, moved_fraction=args.moved_fraction,
            eval_steps=args.eval_steps or (3 if args.quick else 20),
            eval_questions=args.eval_questions or (4 if args.quick else 96),
            eval_batch_size=eval_batch,
            eval_max_new_tokens=12 if args.quick else (max_new if args.restate else 32),
            restate=args.restate,
            activation_checkpointing=args.activation_checkpointing,
            patience=3, device=args.device, seed=seed)
        if several:  # every seed starts from the base model
            model, tokenizer = load_fp32_generator(settings, device)
        result = train_generator(
            config, model, tokenizer, train, dev, passages,
            run_root / f"seed-{seed}" if several else run_root, resume=False,
            base_answers_file=run_root / BASE_ANSWERS_FILE,
            progress=lambda p, n=name: log.info(
                "%s: step %d/%d loss %.3f lr %.2e %s", n, p.step, p.total_steps, p.loss or 0,
                p.lr, {k: v for k, v in p.metrics.items() if k in ("em", "f1", "score",
                                                                    "dev_loss")}))
        eval_s[name] = judge(name, model, tokenizer)
        runs[name] = {"config": config.model_dump(mode="json"), "steps": result.steps,
                      "best_step": result.best_step, "stopped_early": result.stopped_early,
                      "examples": result.examples, "train_s": result.train_s,
                      "examples_per_s": result.examples_per_s,
                      "dev_history": result.history["eval"], "model_dir": str(result.model_dir)}
    if several:
        del model
        soup_dir = average_models([Path(r["model_dir"]) for r in runs.values()],
                                  run_root / "soup")
        model, tokenizer = load_fp32_generator(settings, device, str(soup_dir))
        eval_s["soup"] = judge("soup", model, tokenizer)

    served = [n for n in columns if n.endswith(" served") and not n.startswith("base")]
    checks = {n: targets(columns["base served"], columns[n]) for n in served}
    print(f"\ngenerator fine-tuning ({args.method}{', quick' if args.quick else ''}) on "
          f"{environment(device)['device']}: {len(train)} train questions; "
          + "; ".join(f"{n}: {sum(r['examples'].values())} examples, {r['steps']} steps "
                      f"(best {r['best_step']}{', stopped early' if r['stopped_early'] else ''})"
                      for n, r in runs.items())
          + ("; soup: the uniform average of the seeds' weights" if several else ""))
    print(f"'served': answers with trust under answer.min_trust={gate.min_trust} withheld "
          f"(trust_by_sentence={gate.trust_by_sentence}), as the QA front serves them")
    print(side_by_side(columns))
    for n, r in runs.items():
        print(f"{n}: training {r['train_s']:.1f} s ({r['examples_per_s']:.2f} examples/s)")
    print("evaluation " + ", ".join(f"{n} {s:.1f} s" for n, s in eval_s.items())
          + f"; wall {time.perf_counter() - wall:.0f} s")
    print(f"\n{'target (served answers)':<46}" + "".join(f"{n:>16}" for n in served))
    for check in checks[served[0]]:
        cells = "".join(f"{_verdict(checks[n][check]):>16}" for n in served)
        print(f"{check:<46}{cells}")
    out = args.out or RESULTS / f"train_generator{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "environment": environment(device), "quick": args.quick,
        "answer_gate": {"min_trust": gate.min_trust,
                        "trust_by_sentence": gate.trust_by_sentence},
        "corpus_documents": len(corpus),
        "questions": {split: {k: len(v) for k, v in sets.items()}
                      for split, sets in data.items()},
        "metrics": columns, "targets": checks, "training": runs,
        "soup": str(run_root / "soup") if several else None,
        "seconds": {"eval": {n: round(s, 1) for n, s in eval_s.items()},
                    "wall": round(time.perf_counter() - wall, 1)},
        "answers": said_and_served(data["test"], samples)}, indent=1))
    print(f"results: {out}")


def said_and_served(test: dict[str, list[QAItem]],
                    samples: dict[str, dict[str, list[qa.QARow]]]) -> list[dict]:
    """Per test question: each model's own words and its served answer."""
    out = []
    for set_name, items in test.items():
        for i, item in enumerate(items):
            row = {"set": set_name, "id": item.id, "question": item.question,
                   "gold": item.answers}
            for name, rows in samples.items():
                served = rows[set_name][i]
                row[name], row[f"{name} served"] = served.draft or served.prediction, \
                    served.prediction
            out.append(row)
    return out


def _verdict(check: dict) -> str:
    value = "-" if check["value"] is None else f"{check['value']:.3f}"
    return f"{'PASS' if check['pass'] else 'FAIL'} {value}"


if __name__ == "__main__":
    main()
