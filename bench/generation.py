"""Generation throughput and latency: the generator service against plain ``model.generate``,
dynamic batching against one request at a time, time to first token. One run, side by side.

    python bench/generation.py [--quick] [--device auto|cpu|cuda] [--model PATH] [--no-bus]

Rows (greedy decoding, the same prompts everywhere: a question and two or three short
passages, packed by the service; up to ``--max-new-tokens`` new tokens each):
  plain model.generate, batch 1      the model alone, in process: the baseline
  service via Batcher, batch 1       GeneratorService behind its Batcher, in process
  service via worker + bus, batch 1  the same through the generator's bus worker and valkey,
                                     as a front calls it; overhead vs plain (target <= 15%)
  8 one after another                 8 requests, each sent when the last one is answered
  8 concurrent, dynamic batching     the same 8 at once: batched by the Batcher
                                     (speed-up vs one after another: target >= 2.5x)
  time to first token p50            streamed requests, from send to the first text piece
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


def requests(max_new_tokens: int) -> list[GenerateRequest]:
    return [GenerateRequest(question=q, max_new_tokens=max_new_tokens,
                            passages=[Hit(doc_id=t, title=t, text=PASSAGES[t], score=1.0)
                                      for t in titles])
            for q, titles in QUESTIONS]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Row:
    def __init__(self, name: str, requests: int, tokens: int, seconds: float,
                 batches: list[int] | None = None):
        self.name, self.requests, self.tokens, self.seconds = name, requests, tokens, seconds
        self.batches = batches or []
        self.note = ""

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


# --- the three ways to call the model -------------------------------------------------------
def plain_generate(service: GeneratorService, req: GenerateRequest) -> int:
    """``model.generate`` on exactly the prompt the service builds (and its stop tokens);
    returns the tokens generated, not counting a final end-of-sequence token."""
    budget = service.max_context_tokens - req.max_new_tokens
    _, inputs = service.pack(req.question, req.passages, budget)
    with torch.inference_mode():
        out = service.model.generate(**inputs.to(service.model.device),
                                     max_new_tokens=req.max_new_tokens, do_sample=False,
                                     eos_token_id=service._eos_ids, pad_token_id=service._pad_id,
                                     temperature=None, top_p=None, top_k=None)
    sync(service.model.device)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return len(new) - int(bool(new) and new[-1] in service._eos_ids)


class InProcess:
    """The service behind its Batcher, called in this process."""

    where = "in process"

    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def one(self, req: GenerateRequest) -> int:
        return self.batcher.submit(req).result().completion_tokens

    def concurrent(self, reqs: list[GenerateRequest]) -> int:
        return sum(f.result().completion_tokens for f in [self.batcher.submit(r) for r in reqs])

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

    def one(self, req: GenerateRequest) -> int:
        return self.loop.run_until_complete(self._ask(req)).completion_tokens

    def concurrent(self, reqs: list[GenerateRequest]) -> int:
        async def all_at_once():
            return await asyncio.gather(*[self._ask(r) for r in reqs])
        return sum(r.completion_tokens for r in self.loop.run_until_complete(all_at_once()))

    def first_token_ms(self, req: GenerateRequest) -> float:
        from shared import keys
        from shared.schemas import AnswerChunk

        async def first() -> float:
            start = time.perf_counter()
            stream = self.bus.request_stream(keys.GENERATOR, "generate_stream", req, 600,
                                             AnswerChunk, GenerateResult)
            async for _item in stream:
                elapsed = (time.perf_counter() - start) * 1000
                await stream.aclose()
                return elapsed
            raise RuntimeError("the stream ended without a piece")
        return self.loop.run_until_complete(first())

    def close(self) -> None:
        self.loop.run_until_complete(self.bus.close())
        self.loop.close()
        self.worker.stop()
        self.server.stop()


def timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - start


def measure(service, batcher, caller, reqs, batch1, first_token, rounds: int) -> list:
    """The rows, then the first-token times. Paths that are compared run interleaved (one
    request of each in turn, or one round of each), so a machine whose load changes meanwhile
    slows them alike."""
    rows = {name: Row(name, 0, 0, 0.0) for name in (
        "plain model.generate, batch 1", "service via Batcher, batch 1",
        "service via worker + bus, batch 1", "8 one after another",
        "8 concurrent, dynamic batching")}
    batch1_paths = [("plain model.generate, batch 1", lambda r: plain_generate(service, r)),
                    ("service via Batcher, batch 1", InProcess(batcher).one)]
    if isinstance(caller, OverBus):
        batch1_paths.append(("service via worker + bus, batch 1", caller.one))
    for req in batch1:
        for name, call in batch1_paths:
            tokens, seconds = timed(call, req)
            rows[name].requests += 1
            rows[name].tokens += tokens
            rows[name].seconds += seconds
    for _ in range(rounds):
        for name, call in (("8 one after another", lambda rs: sum(caller.one(r) for r in rs)),
                           ("8 concurrent, dynamic batching", caller.concurrent)):
            before = len(batcher.sizes)
            tokens, seconds = timed(call, reqs)
            row = rows[name]
            row.requests, row.tokens, row.seconds = (row.requests + len(reqs),
                                                     row.tokens + tokens, row.seconds + seconds)
            if name.startswith("8 concurrent"):
                row.batches += list(batcher.sizes)[before:]
    firsts = [caller.first_token_ms(r) for r in first_token]
    return [r for r in rows.values() if r.requests] + [firsts]


# --- the table --------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per row")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default=None, help="HF id or local path (default: the "
                                                      "packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
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
        reqs = requests(args.max_new_tokens)
        batch1 = reqs[:3] if args.quick else reqs
        first_token = reqs[:3] if args.quick else reqs
        service.generate(reqs[0])  # warm-up
        why_not = "--no-bus" if args.no_bus else None
        caller: InProcess | OverBus = InProcess(batcher)
        if not args.no_bus:
            try:
                caller = OverBus(batcher, Path(tmp))
            except (ImportError, OSError, RuntimeError) as exc:  # no valkey binary, no redis-py
                why_not = f"{type(exc).__name__}: {exc}"
        try:
            rows = measure(service, batcher, caller, reqs, batch1, first_token,
                           rounds=1 if args.quick else 2)
        finally:
            caller.close()
        firsts = rows.pop()
        prompt_tokens = statistics.mean(
            len(service.pack(r.question, r.passages, 10**6)[1]["input_ids"][0]) for r in reqs)
        batcher.close()

    by = {r.name: r for r in rows}
    plain = by["plain model.generate, batch 1"]
    for name in ("service via Batcher, batch 1", "service via worker + bus, batch 1"):
        if name in by:
            by[name].note = f"overhead {1 - by[name].rate / plain.rate:+.1%} (target <= 15%)"
    concurrent = by["8 concurrent, dynamic batching"]
    concurrent.note = (f"{concurrent.rate / by['8 one after another'].rate:.2f}x one after "
                       f"another (target >= 2.5x); batches of {concurrent.batches}")

    name = args.model or "packaged SmolLM2-135M-Instruct"
    print(f"generation bench: {name} on {model.device} ({model.dtype}), greedy, up to "
          f"{args.max_new_tokens} new tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{', quick' if args.quick else ''}; prompts of "
          f"~{prompt_tokens:.0f} tokens")
    if why_not is not None:
        print(f"bus rows skipped: no valkey here ({why_not}); the batching and first-token "
              f"rows run in process through the Batcher")
    print(f"{'row':<36}{'reqs':>5}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}  note")
    for r in rows:
        print(f"{r.name:<36}{r.requests:>5}{r.tokens:>8}{r.seconds:>9.2f}{r.rate:>10.1f}  "
              f"{r.note}")
    print(f"{'time to first token p50':<36}{len(firsts):>5}{statistics.median(firsts):>17.0f} "
          f"ms  (streamed {caller.where}, from send to the first piece)")


if __name__ == "__main__":
    main()
