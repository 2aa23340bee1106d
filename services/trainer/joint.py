"""Joint training of the query encoder and the generator: RAG (Lewis et al. 2020,
"Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks").

The retrieved passage z is a latent variable. For a question x the query encoder gives
q = ``Encoder.embed(x)``; the top ``n_docs`` documents by q·d are retrieved from a *fixed*
document index (the paper keeps the document encoder and index fixed: re-embedding the corpus
every step is too costly, and the paper found it unnecessary), and

    p(z | x) = softmax_z(q·d_z / temperature)                      over those n_docs.

The generator reads each (x, z) as serving's prompt with that one passage and scores the
target y token by token. Two ways to marginalise over z (``variant``):

    RAG-Sequence:  p(y | x) = Σ_z p(z|x) Π_t p(y_t | x, z, y<t)
    RAG-Token:     p(y | x) = Π_t Σ_z p(z|x) p(y_t | x, z, y<t)

Both losses (-log p(y|x)) are pure functions of the retriever's scores and the generator's
token log-probabilities; their gradient trains the generator through the log-probabilities
and the query encoder through the scores. There is no retrieval label: passages that make the
answer likely gain prior mass.

The target y is the answer a serving prompt with that one passage should give: "<answer> [1]"
when a gold document of the item holds the answer, else (and for unanswerable items)
``NO_ANSWER`` — the same rule as ``services/trainer/generator.py``.

Both models are saved: ``run_dir/retriever`` (the query encoder; documents stay embedded by the
*base* encoder — serving must keep that index, or re-index and lose the match the training
assumed) and ``run_dir/generator`` (a plain model, LoRA merged).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from services.evaluation import qa
from services.trainer import loop
from services.trainer.generator import (
    BatchOrder,
    Encoding,
    Example,
    LoraOptions,
    checkpoint_activations,
    collate,
    encode_example,
    end_token,
    held_answer,
    plain_model,
    target_logprobs,
    with_lora,
)
from shared.datasets import QAItem
from shared.models.encoder import Encoder
from shared.prompt import NO_ANSWER
from shared.schemas import Document, Hit

log = logging.getLogger(__name__)

KIND = "joint"
RETRIEVER_DIR = "retriever"
GENERATOR_DIR = "generator"


# --- the losses (pure) ------------------------------------------------------------------------
def rag_sequence_nll(doc_scores: torch.Tensor, token_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """RAG-Sequence (Lewis et al. 2020, eq. 1): -log Σ_z p(z|x) Π_t p(y_t|x,z,y<t).

    ``doc_scores`` (B, K) retriever logits (q·d_z / temperature; p(z|x) is their softmax);
    ``token_logprobs`` (B, K, T) log p(y_t | x, z, y<t); ``mask`` (B, T) the target's tokens
    (1) and padding (0). Returns (B,) negative log-likelihoods, computed with logsumexp.
    """
    log_prior = torch.log_softmax(doc_scores.float(), dim=-1)
    sequence = (token_logprobs.float() * mask[:, None, :].float()).sum(-1)
    return -torch.logsumexp(log_prior + sequence, dim=-1)


def rag_token_nll(doc_scores: torch.Tensor, token_logprobs: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """RAG-Token (Lewis et al. 2020, eq. 2): -Σ_t log Σ_z p(z|x) p(y_t|x,z,y<t).

    Same shapes as ``rag_sequence_nll``; each target token may draw on a different passage.
    """
    log_prior = torch.log_softmax(doc_scores.float(), dim=-1)[:, :, None]
    per_token = torch.logsumexp(log_prior + token_logprobs.float(), dim=1)
    return -(per_token * mask.float()).sum(-1)


Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: dict[str, Loss] = {"sequence": rag_sequence_nll, "token": rag_token_nll}


def rag_loss(variant: str) -> Loss:
    """The loss of ``variant``; ValueError listing the known ones for another name."""
    if variant not in LOSSES:
        raise ValueError(f"unknown RAG variant {variant!r}; known: {', '.join(LOSSES)}")
    return LOSSES[variant]


# --- config -----------------------------------------------------------------------------------
class JointTrainConfig(BaseModel):
    """A joint RAG run. A step sees ``batch_size * grad_accum`` questions, each with
    ``n_docs`` passages (so ``n_docs`` generator sequences per question). ``temperature``
    divides the cosine similarities of unit vectors (0.05 as in SimCSE, Gao et al. 2021)."""

    model_config = ConfigDict(extra="forbid")

    variant: Literal["sequence", "token"] = "sequence"
    n_docs: int = Field(4, ge=1, le=64)
    temperature: float = Field(0.05, gt=0, le=10)
    generator_lr: float = Field(5e-5, gt=0, le=1)
    retriever_lr: float = Field(1e-5, ge=0, le=1, description="0 freezes the query encoder")
    method: Literal["full", "lora"] = "full"
    lora: LoraOptions = LoraOptions()
    activation_checkpointing: bool = Field(False, description="the generator keeps only each "
                                           "layer's input and recomputes its activations in "
                                           "the backward pass: a joint step runs n_docs "
                                           "sequences per question, so memory is what runs out")
    weight_decay: float = Field(0.0, ge=0, le=1)
    schedule: loop.Schedule = "cosine"
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    batch_size: int = Field(4, ge=1, le=1024)
    grad_accum: int = Field(1, ge=1, le=4096)
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    max_passage_chars: int = Field(qa.SERVING_MAX_PASSAGE_CHARS, ge=50)
    max_seq_len: int = Field(1024, ge=16)
    max_answer_tokens: int = Field(32, ge=1)
    save_steps: int | None = Field(None, ge=1, description="resume state every N steps; "
                                   "None: only when cancelled")
    log_steps: int = Field(10, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


# --- targets and prompts ----------------------------------------------------------------------
def joint_target(item: QAItem, corpus_by_id: Mapping[str, Document]) -> str:
    """"<answer> [1]" when a gold document of ``item`` holds a gold answer, else NO_ANSWER."""
    if not item.answerable:
        return NO_ANSWER
    for doc_id in item.doc_ids:
        doc = corpus_by_id.get(doc_id)
        if doc is None:
            continue
        answer = held_answer(item, _hit(doc, 0.0))
        if answer is not None:
            return f"{answer.strip()} [1]"
    return NO_ANSWER


def _hit(doc: Document, score: float) -> Hit:
    return Hit(doc_id=doc.doc_id, title=doc.title, text=doc.text, score=score)


@dataclass(frozen=True)
class _Target:
    item: QAItem
    text: str
    ids: tuple[int, ...]  # target token ids, end token included


@dataclass
class JointTrainResult:
    """``retriever_dir``/``generator_dir``: the saved models (``loop.save_model`` folders)."""

    retriever_dir: Path
    generator_dir: Path
    steps: int
    total_steps: int
    resumed_from: int | None
    elapsed_s: float
    train_s: float
    questions_per_s: float
    targets: dict[str, int]
    report_path: Path
    plot_path: Path
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def train_joint(config: JointTrainConfig, encoder: Encoder, generator, tokenizer,
                docs: Sequence[Document], doc_vectors: np.ndarray,
                train_items: Sequence[QAItem], run_dir: Path, *,
                progress: loop.ProgressFn | None = None,
                should_stop: Callable[[], bool] | None = None,
                resume: bool = True) -> JointTrainResult:
    """Train ``encoder`` (queries only) and ``generator`` together with the RAG loss.

    ``doc_vectors`` (len(docs), dim) unit rows are the fixed document index (e.g.
    ``services.evaluation.retrieval.corpus_embeddings`` of the base encoder). ``generator`` is
    a decoder-only or encoder-decoder LM with its ``tokenizer``. Both models are trained in
    place (a LoRA generator is merged back into the object passed in) and saved into
    ``run_dir/retriever`` and ``run_dir/generator``; ``report.json``/``report.png`` record the
    loss and the prior mass p(z|x) on gold documents over steps. Resumes a state of the same
    config and data in ``run_dir`` when ``resume``; ``loop.Cancelled`` (state saved) when
    ``should_stop`` says so.

    Raises ValueError for no training item, ``doc_vectors`` of the wrong shape, fewer
    documents than ``n_docs``, an answer over ``max_answer_tokens`` or a prompt that cannot
    fit ``max_seq_len`` with one passage.
    """
    run_dir = Path(run_dir)
    if not train_items:
        raise ValueError("no training items: `train_items` is empty")
    if doc_vectors.shape != (len(docs), encoder.dim):
        raise ValueError(f"`doc_vectors` has shape {doc_vectors.shape}, expected "
                         f"{(len(docs), encoder.dim)}")
    if len(docs) < config.n_docs:
        raise ValueError(f"n_docs={config.n_docs} is more than the {len(docs)} documents")
    loss_fn = rag_loss(config.variant)
    loop.seed_everything(config.seed)
    device, amp = loop.pick_device(config.device)
    seq2seq = qa.is_seq2seq(generator)
    pad = qa.pad_id(tokenizer, qa.eos_ids(generator, tokenizer))
    enc = Encoding(tokenizer=tokenizer, seq2seq=seq2seq, end=end_token(generator, tokenizer),
                    context=qa.context_size(generator, tokenizer))
    limit = min(config.max_seq_len, enc.context)
    budget = limit if seq2seq else limit - config.max_answer_tokens - 1

    corpus_by_id = {d.doc_id: d for d in docs}
    targets: list[_Target] = []
    counts: dict[str, int] = {}
    for item in train_items:
        text = joint_target(item, corpus_by_id)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > config.max_answer_tokens:
            raise ValueError(f"item {item.id!r}: the answer {text!r} is {len(ids)} tokens, "
                             f"over max_answer_tokens={config.max_answer_tokens}")
        targets.append(_Target(item, text, (*ids, enc.end)))
        kind = "no_answer" if text == NO_ANSWER else "answer"
        counts[kind] = counts.get(kind, 0) + 1
    # Every question with its longest document must fit: check once, before training.
    longest = max(docs, key=lambda d: len(d.title) + min(len(d.text), config.max_passage_chars))
    for t in targets:
        if len(qa.prompt_ids(tokenizer, t.item.question, [_hit(longest, 0.0)],
                             config.max_passage_chars)) > budget:
            raise ValueError(f"item {t.item.id!r}: its prompt with one passage cannot fit "
                             f"max_seq_len={config.max_seq_len} (context {enc.context})")
    data = loop.fingerprint([{"id": t.item.id, "q": t.item.question, "y": t.text}
                             for t in targets] + [{"docs": len(docs),
                                                   "vectors": float(doc_vectors.sum())}])
    per_epoch = math.ceil(len(targets) / config.batch_size)
    steps_total = config.max_steps or math.ceil(per_epoch * config.epochs / config.grad_accum)
    micro_total = (per_epoch * config.epochs if config.max_steps is None
                   else steps_total * config.grad_accum)

    base_generator = generator
    if config.method == "lora":
        generator = with_lora(generator, config.lora)
    if config.activation_checkpointing:
        checkpoint_activations(generator)
    generator.to(device).train()
    encoder.model.to(device).train()
    index = torch.from_numpy(np.ascontiguousarray(doc_vectors, dtype=np.float32)).to(device)
    gen_params = [p for p in generator.parameters() if p.requires_grad]
    ret_params = [p for p in encoder.model.parameters() if p.requires_grad]
    gen_opt = torch.optim.AdamW(gen_params, lr=config.generator_lr,
                                weight_decay=config.weight_decay)
    ret_opt = torch.optim.AdamW(ret_params, lr=config.retriever_lr,
                                weight_decay=config.weight_decay)
    autocast = torch.autocast(device.type, dtype=amp,
                              enabled=device.type == "cuda" and amp != torch.float32)

    step, history, seen, train_s, resumed_from = 0, {"train": [], "eval": []}, 0, 0.0, None
    clock = loop.Clock()
    state = loop.load_state(run_dir) if resume else None
    if state is not None:
        loop.check_resumable(state, KIND, config, data, run_dir)
        loop.restore_trainable(generator, state["generator"])
        loop.restore_trainable(encoder.model, state["retriever"])
        gen_opt.load_state_dict(state["generator_optimizer"])
        ret_opt.load_state_dict(state["retriever_optimizer"])
        loop.set_rng_state(state["rng"])
        step, history, seen, train_s = (state["step"], state["history"], state["seen"],
                                        state["train_s"])
        clock = loop.Clock(state["elapsed_s"])
        resumed_from = step

    def snapshot() -> dict[str, Any]:
        return {"kind": KIND, "config": config.model_dump(mode="json"), "data": data,
                "step": step, "generator": loop.trainable_state(generator),
                "retriever": loop.trainable_state(encoder.model),
                "generator_optimizer": gen_opt.state_dict(),
                "retriever_optimizer": ret_opt.state_dict(), "rng": loop.rng_state(),
                "history": history, "seen": seen, "train_s": train_s,
                "elapsed_s": clock.elapsed()}

    report = loop.Reporter(progress, KIND, steps_total, clock)
    batches = BatchOrder(targets, config.batch_size, config.seed)
    nonfinite = loop.NonFinite()
    while step < steps_total:
        loop.stop_if_asked(should_stop, run_dir, snapshot)
        started = time.perf_counter()
        gen_lr = loop.set_scheduled_lr(gen_opt, config, step, steps_total,
                                       lr=config.generator_lr)
        # retriever_lr 0 keeps the query encoder's rate at 0: frozen
        loop.set_scheduled_lr(ret_opt, config, step, steps_total, lr=config.retriever_lr)
        micro = [g for g in range(step * config.grad_accum, (step + 1) * config.grad_accum)
                 if g < micro_total]
        loss_value, gold_mass, recalled, with_gold = 0.0, 0.0, 0, 0
        for g in micro:
            batch: list[_Target] = batches(g)
            with autocast:
                queries = encoder.embed([t.item.question for t in batch]).float()
            with torch.no_grad():
                top = (queries.detach() @ index.T).topk(config.n_docs, dim=-1).indices
            # Scores through the query encoder only: the document vectors are constants.
            scores = (queries[:, None, :] * index[top]).sum(-1) / config.temperature
            examples = []
            for b, t in enumerate(batch):
                for z in top[b].tolist():
                    prompt = qa.prompt_ids(tokenizer, t.item.question, [_hit(docs[z], 0.0)],
                                           config.max_passage_chars)
                    input_ids, labels = encode_example(prompt, t.ids, seq2seq=seq2seq)
                    examples.append(Example(id=t.item.id, kind="joint", target=t.text,
                                            passages=(docs[z].doc_id,), input_ids=input_ids,
                                            labels=labels))
            tensors = {k: v.to(device) for k, v in collate(examples, pad,
                                                           seq2seq=seq2seq).items()}
            with autocast:
                lp, mask = target_logprobs(generator, tensors, seq2seq=seq2seq)
            lp = lp.view(len(batch), config.n_docs, -1)
            mask = mask.view(len(batch), config.n_docs, -1)[:, 0]
            loss = loss_fn(scores, lp, mask).mean() / len(micro)
            loss.backward()
            loss_value += float(loss.detach())
            with torch.no_grad():
                prior = torch.softmax(scores.detach().float(), dim=-1)
                for b, t in enumerate(batch):
                    gold = [k for k, z in enumerate(top[b].tolist())
                            if docs[z].doc_id in t.item.doc_ids]
                    gold_mass += float(prior[b, gold].sum()) if gold else 0.0
                    recalled += bool(gold)
                    with_gold += bool(t.item.doc_ids)
            seen += len(batch)
        stepped = loop.optimizer_step([gen_opt, ret_opt], [gen_params, ret_params],
                                      config.max_grad_norm, loss_value)
        nonfinite.count(stepped, step + 1, loss_value)
        step += 1
        train_s += time.perf_counter() - started
        # Over the questions that have a gold document (the unanswerable ones have none).
        history["train"].append({"step": step, "loss": round(loss_value, 5), "lr": gen_lr,
                                 "gold_prior": round(gold_mass / max(with_gold, 1), 4),
                                 "gold_recall": round(recalled / max(with_gold, 1), 4)})
        if config.save_steps and step % config.save_steps == 0:
            loop.save_state(run_dir, snapshot())
        if step % config.log_steps == 0 or step == steps_total:
            report(step, loss_value, gen_lr,
                   {"gold_prior": history["train"][-1]["gold_prior"]})

    if config.save_steps:
        loop.save_state(run_dir, snapshot())
    encoder.model.eval()
    final = generator.merge_and_unload() if hasattr(generator, "merge_and_unload") else generator
    if config.activation_checkpointing:
        final.activation_checkpointing_disable()
    final.eval()
    meta = {"config": config.model_dump(mode="json"), "data": data, "step": step,
            "history": history["train"][-20:], "trained_by": "joint (RAG-"
            f"{config.variant.capitalize()})"}
    retriever_dir = loop.save_model(
        run_dir, encoder.model, encoder.tokenizer,
        {**meta, "kind": "retriever", "pooling": encoder.pooling,
         "max_length": encoder.max_length,
         "documents": "embedded by the base encoder, fixed during training: embed only "
                      "queries with this model, or re-index knowing the match is not trained"},
        folder=RETRIEVER_DIR)
    generator_dir = loop.save_model(
        run_dir, plain_model(final), tokenizer,
        {**meta, "kind": "generator", "method": config.method, "seq2seq": seq2seq,
         "base_model": str(getattr(base_generator.config, "name_or_path", "")),
         "target_format": "<answer> [1] (one passage per prompt)", "no_answer": NO_ANSWER},
        folder=GENERATOR_DIR)
    elapsed = clock.elapsed()
    result = JointTrainResult(
        retriever_dir=retriever_dir, generator_dir=generator_dir, steps=step,
        total_steps=steps_total, resumed_from=resumed_from, elapsed_s=round(elapsed, 3),
        train_s=round(train_s, 3),
        questions_per_s=round(seen / train_s, 3) if train_s else 0.0, targets=counts,
        report_path=run_dir / loop.REPORT_JSON, plot_path=run_dir / loop.REPORT_PNG,
        history=history)
    loop.write_report(run_dir, {**{k: v for k, v in asdict(result).items() if k != "history"},
                                "config": config.model_dump(mode="json"), "history": history},
                      f"joint RAG-{config.variant.capitalize()} training")
    return result

