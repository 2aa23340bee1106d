"""Generation throughput and latency: the generator service against plain ``model.generate``,
dynamic batching against one request at a time, time to first token. One run, side by side.

    python bench/generation.py [--quick] [--device auto|cpu|cuda] [--model PATH] [--no-bus]

Two workloads, greedy decoding, the same requests on every path (a question and two or three
short passages, packed by the service):
  QA    a question about one fact: answers of about ten tokens (at most ``--max-new-tokens``),
        so reading the prompt (prefill) is most of the work
  long  a long paragraph about two countries asked for: answers of up to
        ``--long-max-new-tokens``, so the decoding steps are most of the work
Rows:
  QA: plain model.generate, batch 1      the model alone, in process: the baseline
  QA: service via Batcher, batch 1       GeneratorService behind its Batcher, in process
  QA: service via worker + bus, batch 1  the same through the generator's bus worker and
                                         valkey, as a front calls it; overhead vs plain
                                         (target <= 15%)
  <workload>: 8 one after another        8 requests, each sent when the last one is answered
  <workload>: 8 concurrent, batched      the same 8 at once, batched by the Batcher (speed-up
                                         vs one after another: target >= 2.5x); the note
                                         counts the answers equal both ways, so a shorter
                                         batched answer cannot pass for a speed-up
  QA: time to first token p50            streamed requests, from send to the first text piece
Columns prompt and answer are mean tokens per request, tokens the generated tokens in all.
The batching and first-token rows go through the bus when valkey can start here; without a
valkey binary (or redis-py) the bus rows are skipped, said so, and those rows run in process
through the Batcher. Starts its own embedded valkey; needs no running ragtune.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from services.generator.batching import Batcher
from services.generator.service import GeneratorService
from shared.models.generator import load_generator
from shared.schemas import GenerateRequest, GenerateResult, Hit
from shared.settings import Settings

PASSAGES = {
    "France": "France is a country in Western Europe. Its capital and largest city is Paris, "
              "a major centre of finance, diplomacy, commerce and culture.",
    "Germany": "Germany is a country in Central Europe. Its capital and most populous city is "
               "Berlin, and its financial centre is Frankfurt.",
    "Japan": "Japan is an island country in East Asia. Tokyo is its capital and largest city.",
    "Kenya": "Kenya is a country in East Africa. Its capital and largest city is Nairobi.",
    "Peru": "Peru is a country in western South America. Its capital is Lima, on the coast.",
    "Italy": "Italy is a country in Southern Europe. Rome is its capital and largest city.",
    "Canada": "Canada is a country in North America. Its capital is Ottawa; its largest city "
              "is Toronto.",
    "Egypt": "Egypt is a country spanning the northeast corner of Africa. Cairo is its "
             "capital and largest city.",
}
# (question, passages): eight questions whose prompts differ in length
QUESTIONS = [
    ("What is the capital of Kenya?", ["Kenya", "Peru"]),
    ("What is the capital of France?", ["Germany", "France", "Italy"]),
    ("Which city is the capital of Japan?", ["Japan", "Canada"]),
    ("What is the capital of Peru?", ["Peru", "Egypt", "Kenya"]),
    ("What is the capital city of Italy?", ["Italy", "France"]),
    ("What is the capital of Canada, and what is its largest city?", ["Canada", "Japan",
                                                                      "Germany"]),
    ("Name the capital of Egypt.", ["Egypt", "Kenya"]),
    ("What is Germany's capital?", ["France", "Germany", "Peru"]),
]


# (country, country): eight requests for a long paragraph; with this wording every answer of
# the packaged SmolLM2 runs to the token limit instead of stopping after a sentence
LONG_PAIRS = [("Kenya", "Peru"), ("France", "Germany"), ("Japan", "Canada"), ("Egypt", "Italy"),
              ("Peru", "Japan"), ("Germany", "Egypt"), ("Canada", "France"), ("Italy", "Kenya")]
LONG_QUESTION = ("Write a long, detailed paragraph of at least eight sentences about {} and {}: "
                 "where each lies, its capital, its largest city, and how the two compare.")


def _request(question: str, titles: list[str], max_new_tokens: int) -> GenerateRequest:
    return GenerateRequest(question=question, max_new_tokens=max_new_tokens,
                           passages=[Hit(doc_id=t, title=t, text=PASSAGES[t], score=1.0)
                                     for t in titles])


def qa_requests(max_new_tokens: int) -> list[GenerateRequest]:
    return [_request(q, titles, max_new_tokens) for q, titles in QUESTIONS]


def long_requests(max_new_tokens: int) -> list[GenerateRequest]:
    return [_request(LONG_QUESTION.format(a, b), [a, b], max_new_tokens) for a, b in LONG_PAIRS]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Row:
    """Totals of one row: requests, their prompt and generated tokens, wall seconds.
    ``same`` counts answers (text and token count) equal to the one-after-another run's."""

    name: str
    requests: int = 0
    prompt_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0
    batches: list[int] = field(default_factory=list)
    same: int = 0
    note: str = ""

    def add(self, counts: list[tuple[int, int]], seconds: float) -> None:
        """``counts``: (prompt tokens, generated tokens) of each request answered in
        ``seconds``."""
        self.requests += len(counts)
        self.prompt_tokens += sum(p for p, _ in counts)
        self.tokens += sum(n for _, n in counts)
        self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def counts(results: list[GenerateResult]) -> list[tuple[int, int]]:
    return [(r.prompt_tokens, r.completion_tokens) for r in results]


# --- the three ways to call the model -------------------------------------------------------
def plain_generate(service: GeneratorService, req: GenerateRequest) -> tuple[int, int]:
    """``model.generate`` on exactly the prompt the service builds (and its stop tokens);
    returns (prompt tokens, tokens generated not counting a final end-of-sequence token)."""
    budget = service.max_context_tokens - req.max_new_tokens
    _, inputs = service.pack(req.question, req.passages, budget)
    with torch.inference_mode():
        out = service.model.generate(**inputs.to(service.model.device),
                                     max_new_tokens=req.max_new_tokens, do_sample=False,
                                     eos_token_id=service._eos_ids, pad_token_id=service._pad_id,
                                     temperature=None, top_p=None, top_k=None)
    sync(service.model.device)
    prompt = inputs["input_ids"].shape[1]
    new = out[0, prompt:].tolist()
    return prompt, len(new) - int(bool(new) and new[-1] in service._eos_ids)


class InProcess:
    """The service behind its Batcher, called in this process."""

    where = "in process"

    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def one(self, req: GenerateRequest) -> GenerateResult:
        return self.batcher.submit(req).result()

    def concurrent(self, reqs: list[GenerateRequest]) -> list[GenerateResult]:
        return [f.result() for f in [self.batcher.submit(r) for r in reqs]]

    def first_token_ms(self, req: GenerateRequest) -> float:
        stamp: list[float] = []
        start = time.perf_counter()
        self.batcher.submit(req, lambda _text: stamp.append(time.perf_counter())).result()
        return (stamp[0] - start) * 1000

    def close(self) -> None:
        pass


class OverBus:
    """The service behind its bus worker on an embedded valkey, called as a front calls it
    (a Bus on a private event loop)."""

    where = "over the bus"

    def __init__(self, batcher: Batcher, tmp: Path):
        from deploy.workers import WorkerThread, generator_worker
        from shared.bus import Bus
        from shared.infra import start_valkey
        from shared.settings import RedisSettings

        self.server = start_valkey(tmp, persist=False)
        self.worker = WorkerThread(lambda bus: generator_worker(batcher, bus), self.server.url,
                                   RedisSettings(), "generator")
        self.loop = asyncio.new_event_loop()
        self.bus = Bus.connect(self.server.url, RedisSettings())

    async def _ask(self, req: GenerateRequest) -> GenerateResult:
        from shared import keys

        return await self.bus.request(keys.GENERATOR, "generate", req, 600, GenerateResult)

    def one(self, req: GenerateRequest) -> GenerateResult:
        return self.loop.run_until_complete(self._ask(req))

    def concurrent(self, reqs: list[GenerateRequest]) -> list[GenerateResult]:
        async def all_at_once():
            return await asyncio.gather(*[self._ask(r) for r in reqs])
        return list(self.loop.run_until_complete(all_at_once()))

    def first_token_ms(self, req: GenerateRequest) -> float:
        from shared import keys
        from shared.schemas import AnswerChunk

        async def first() -> float:
            # read to the end: a stream closed early sends its cancel from a task of its own,
            # which the last request's would race with closing the connection
            start = time.perf_counter()
            stamps = [time.perf_counter() async for _item in self.bus.request_stream(
                keys.GENERATOR, "generate_stream", req, 600, AnswerChunk, GenerateResult)]
            return (stamps[0] - start) * 1000
        return self.loop.run_until_complete(first())

    def close(self) -> None:
        self.loop.run_until_complete(self.bus.close())
        self.loop.close()
        self.worker.stop()
        self.server.stop()


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def measure(service, batcher, caller, workloads: dict[str, list[GenerateRequest]], batch1,
            first_token, rounds: int) -> tuple[list[Row], list[float]]:
    """The rows and the first-token times. Paths that are compared run interleaved (one
    request of each in turn, or one round of each), so a machine whose load changes meanwhile
    slows them alike."""
    rows: dict[str, Row] = {}

    def row(name: str) -> Row:
        return rows.setdefault(name, Row(name))

    in_process = InProcess(batcher)
    batch1_paths = [("QA: plain model.generate, batch 1", lambda r: plain_generate(service, r)),
                    ("QA: service via Batcher, batch 1", lambda r: counts([in_process.one(r)])[0])]
    if isinstance(caller, OverBus):
        batch1_paths.append(("QA: service via worker + bus, batch 1",
                             lambda r: counts([caller.one(r)])[0]))
    for _name, call in batch1_paths:  # warm-up: a path's first call pays one-off costs
        call(batch1[0])
    for req in batch1:
        for name, call in batch1_paths:
            count, seconds = timed(call, req)
            row(name).add([count], seconds)
    # An untimed burst first: a client opens its pooled connections during its first burst,
    # which spreads that burst's arrivals over about the batcher's whole wait (batch_wait_ms).
    burst = next(iter(workloads.values()))
    caller.concurrent([r.model_copy(update={"max_new_tokens": 1}) for r in burst])
    for _ in range(rounds):
        for workload, reqs in workloads.items():
            alone, seconds = timed(lambda rs: [caller.one(r) for r in rs], reqs)
            row(f"{workload}: 8 one after another").add(counts(alone), seconds)
            before = len(batcher.sizes)
            together, seconds = timed(caller.concurrent, reqs)
            batched = row(f"{workload}: 8 concurrent, batched")
            batched.add(counts(together), seconds)
            batched.batches += list(batcher.sizes)[before:]
            batched.same += sum((a.answer, a.completion_tokens) == (b.answer, b.completion_tokens)
                                for a, b in zip(alone, together, strict=True))
    firsts = [caller.first_token_ms(r) for r in first_token]
    return list(rows.values()), firsts


# --- the table --------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per row")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default=None, help="HF id or local path (default: the "
                                                      "packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="QA answers")
    parser.add_argument("--long-max-new-tokens", type=int, default=128, help="long answers")
    parser.add_argument("--no-bus", action="store_true", help="skip the bus rows, as on a "
                                                              "machine without valkey")
    parser.add_argument("--home", default=None, help="ragtune home holding the converted "
                                                     "packaged model (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(args.home or tmp),
                            generator={"model": args.model, "device": args.device})
        model, tokenizer = load_generator(settings)
        service = GeneratorService(model, tokenizer, settings.generator.max_passage_chars)
        batcher = Batcher(service, settings.generator.max_batch_size,
                          settings.generator.batch_wait_ms)
        qa = qa_requests(args.max_new_tokens)
        workloads = {"QA": qa, "long": long_requests(args.long_max_new_tokens)}
        batch1 = qa[:3] if args.quick else qa
        first_token = qa[:3] if args.quick else qa
        why_not = "--no-bus" if args.no_bus else None
        caller: InProcess | OverBus = InProcess(batcher)
        if not args.no_bus:
            try:
                caller = OverBus(batcher, Path(tmp))
            except (ImportError, OSError, RuntimeError) as exc:  # no valkey binary, no redis-py
                why_not = f"{type(exc).__name__}: {exc}"
        try:
            rows, firsts = measure(service, batcher, caller, workloads, batch1, first_token,
                                   rounds=1 if args.quick else 2)
        finally:
            caller.close()
        batcher.close()

    by = {r.name: r for r in rows}
    plain = by["QA: plain model.generate, batch 1"]
    for name in ("QA: service via Batcher, batch 1", "QA: service via worker + bus, batch 1"):
        if name in by:
            # extra time per token over the plain call (not throughput lost, which reads lower)
            by[name].note = f"overhead {plain.rate / by[name].rate - 1:+.1%} (target <= 15%)"
    for workload in workloads:
        alone = by[f"{workload}: 8 one after another"]
        batched = by[f"{workload}: 8 concurrent, batched"]
        batched.note = (f"{batched.rate / alone.rate:.2f}x one after another (target >= 2.5x); "
                        f"same answers {batched.same}/{batched.requests}; batches "
                        f"{batched.batches}")

    name = args.model or "packaged SmolLM2-135M-Instruct"
    print(f"generation bench: {name} on {model.device} ({model.dtype}), greedy, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads"
          f"{', quick' if args.quick else ''}; QA answers up to {args.max_new_tokens} new "
          f"tokens, long answers up to {args.long_max_new_tokens}; prompt and answer: mean "
          f"tokens per request")
    if why_not is not None:
        print(f"bus rows skipped: no valkey here ({why_not}); the batching and first-token "
              f"rows run in process through the Batcher")
    print(f"{'row':<38}{'reqs':>5}{'prompt':>7}{'answer':>7}{'tokens':>7}{'seconds':>8}"
          f"{'tokens/s':>9}  note")
    for r in rows:
        print(f"{r.name:<38}{r.requests:>5}{r.prompt_tokens / r.requests:>7.0f}"
              f"{r.tokens / r.requests:>7.1f}{r.tokens:>7}{r.seconds:>8.2f}{r.rate:>9.1f}  "
              f"{r.note}")
    print(f"{'QA: time to first token p50':<38}{len(firsts):>5}{statistics.median(firsts):>24.0f} "
          f"ms  (streamed {caller.where}, from send to the first piece)")


if __name__ == "__main__":
    main()
