"""Knowledge distillation of the generator: a teacher teaches a smaller, faster student to answer
from retrieved passages (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

The examples are those of generator fine-tuning (``services/trainer/generator.py``
``build_examples``: serving's prompt with the question's top-k passages, the target
"<answer> [n]" or "I don't know.", gold-removed abstention copies). On each target token t,
with z the teacher's and s the student's logits there and T the temperature:

    loss = α · T² · KL(softmax(z/T) ‖ softmax(s/T)) + (1 − α) · CE(s, reference token)

averaged over the batch's target tokens. T² keeps the soft term's gradient on the scale of the
hard one when T changes (Hinton et al. 2015, section 2). The KL term is chosen by name from
``LOSSES``: ``forward_kl`` (Hinton), or ``reverse_kl`` (KL(q ‖ p), mode-seeking: Gu et al.
2024, "MiniLLM: Knowledge Distillation of Large Language Models").

The student is, by default, the teacher's architecture with ``layer_fraction`` of its decoder
layers, each initialised with a copy of the teacher's layer (``layer_subset``; DistilBERT, Sanh
et al. 2019, initialises from every other layer). Which layers: by default those left when the
layer whose absence raises the teacher's answer loss least on a few training examples is
dropped, one at a time, the first and the last kept (``greedy_layers``; SLEB, Song et al. 2024);
or evenly spaced (``pick_layers``, ``layer_choice: spaced``). On a CPU fine-tuned SmolLM2-135M,
12 greedy layers start at an answer loss of 6.9 nats per token, 12 evenly spaced ones at 15.4,
and after the same 80 steps only the greedy student answers at all (bench/RESULTS.md, "Generator
distillation"). The default keeps a third: on SmolLM2-135M the tied 49k-token embedding and
output head are 28M of its 134M parameters, so half the layers (53M + 28M) can at best be 1.65×
faster per decoded token, a third (35M + 28M) 2.1×. (Measured end to end on serving's ~500-token
prompts, where the prefill, which runs the head once, dominates: a third of the layers gave
2.5-3.9× the teacher's tokens/s on 2 busy CPU cores, ``bench/distill.py --quick``.) A smaller
model of another architecture can be the student instead, if it speaks the teacher's tokenizer
(``check_same_tokenizer``).

Why the teacher's outputs are cached: holding teacher and student in memory together, and
running the teacher forward at every step of every epoch, costs more than one teacher pass whose
result is kept — the teacher forward is ~2·N_teacher FLOPs per token, two thirds of the
student's whole step (6·N_student) for a student of half the teacher, as much as the whole step
for one of a third, paid again every epoch; its fp32 weights (0.54 GB for SmolLM2-135M) would
sit beside the student's weights, gradients and AdamW moments. So ``cache_teacher`` runs the
teacher once over the examples' target tokens, keeps the top ``cache_k`` logits and their ids
per token (k=32: 256 bytes a token, against 196 KB for SmolLM2's full 49,152 logits), writes
them into the run folder (``teacher_topk.pt``) and ``distill_generator`` drops the teacher
before the student trains. A resumed run reads the cache back: the teacher is loaded again (to
rebuild the student and recognise its cache) but not run.

Kept mass, measured on the packaged SmolLM2-135M-Instruct (not fine-tuned) over the
teacher-forced answer tokens of packaged training questions (``bench/distill.py --quick``; every
run records it as ``kept_mass``): the top 32 logits hold on average 0.94 of the probability mass
at T=1 (0.936 over 191 tokens, 0.938 over 68, 0.943 over 56; the worst token 0.59), not the 0.99
one might expect, and only 0.32-0.35 at T=2 (worst 0.09): the tail over SmolLM2's 49k tokens is
long, and T=2 flattens it. Hence the default temperature 1 (at T=2 the cached top-32 would
describe a third of the softened distribution); a larger ``cache_k`` keeps more.

The KL over a top-k cache renormalises *both* distributions over the cached ids: p and q are
softmax(z_K/T) and softmax(s_K/T) over the k cached ids K. The KL then compares the two on the
same k tokens and is 0 exactly when the student agrees with the teacher there; the student's
mass outside K is left to the cross-entropy term (which moves it onto the reference token).
The alternative, the student's full softmax against the renormalised teacher, would push all
of the student's mass into K: a sharper distribution than the real teacher's, which left
1 − kept mass outside K.

Prompt tokens too (``prompt_weight`` β > 0): the answer is a handful of tokens, about 1,100
target tokens over 225 packaged training questions, while the prompt that precedes it (the
passages and the question) is ~450 tokens per example. With β the teacher's top-k is cached at
every prompt position as well, and the loss gains β · T² · KL(teacher ‖ student) averaged over
the prompt positions (each predicting the next prompt token): the teacher's full next-token
distributions over the very passages the student learns to read, as pruned models are
retrained by logit distillation on all tokens (Minitron, Muralidharan et al. 2024). The
student's logits there are taken only at the cached ids (its last hidden state times those
rows of the output head), so the 49k-token head is not applied to the whole prompt. On the
CPU fine-tuned SmolLM2-135M, a healed 12-layer student's answerable F1 went from 0.75× the
teacher's without it to 0.97× with β = 1, the default (one seed; bench/RESULTS.md).

``distill_generator`` is the loop (nanoGPT-style): warm-up + cosine schedule, clipping, bf16
autocast on CUDA, non-finite steps skipped, dev EM/F1 (``services.evaluation.qa``) every
``eval_steps`` with the best student saved as a plain generator (``loop.save_model``, meta
kind="generator", ``distilled_from``), resumable state, a JSON + PNG report.
``compare_generators`` measures teacher and student side by side in one run: EM/F1 on the
same questions and passages, and tokens/s of the same decoding work, interleaved.
Decoder-only generators only: the layer subset and the target alignment assume one.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

from services.evaluation import qa
from services.trainer import loop
from services.trainer.generator import (
    ANSWER,
    IGNORE,
    BatchOrder,
    Encoding,
    Example,
    GeneratorTrainConfig,
    build_examples,
    checkpoint_activations,
    collate,
    end_token,
    keep_kwargs,
    target_logits,
    target_logprobs,
)
from shared.datasets import QAItem
from shared.files import atomic_open, write_text_atomic
from shared.prompt import NO_ANSWER

log = logging.getLogger(__name__)

KIND = "distill"  # the run's kind (state, progress); the saved student is a "generator"
CACHE_FILE = "teacher_topk.pt"
HEAL_DIR = "heal"  # the student's language-model run before distillation
LAYERS_FILE = "layers.json"  # a run's greedy layer choice


# --- the losses (pure): (student logits, teacher values, teacher ids, T) -> KL per token -------
def _renormalised(student_logits: torch.Tensor, teacher_values: torch.Tensor,
                  teacher_ids: torch.Tensor, temperature: float,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_T, log q_T) over the cached ids: teacher and student both renormalised there."""
    log_p = torch.log_softmax(teacher_values.float() / temperature, dim=-1)
    picked = student_logits.float().gather(-1, teacher_ids.long())
    log_q = torch.log_softmax(picked / temperature, dim=-1)
    return log_p, log_q


def forward_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor,
               teacher_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_T ‖ q_T) per position (Hinton et al. 2015): the student covers every token the
    teacher gives mass to.

    ``student_logits`` (..., V); ``teacher_values`` and ``teacher_ids`` (..., k): the teacher's
    top-k logits and their token ids. p_T = softmax(values / T), q_T = softmax(student logits at
    those ids / T): both renormalised over the k ids (with k = V, the full KL). Returns (...),
    float32, >= 0; the inputs are not changed.
    """
    log_p, log_q = _renormalised(student_logits, teacher_values, teacher_ids, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor,
               teacher_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(q_T ‖ p_T) per position (Gu et al. 2024, MiniLLM): mode-seeking, so a small student
    puts its mass on the teacher's main modes rather than spreading it over all of them.
    Same shapes and renormalisation as ``forward_kl``."""
    log_p, log_q = _renormalised(student_logits, teacher_values, teacher_ids, temperature)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


KLLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
LOSSES: dict[str, KLLoss] = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}


def kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
            teacher_values: torch.Tensor, teacher_ids: torch.Tensor, *, temperature: float,
            alpha: float, kl: str = "forward_kl") -> tuple[torch.Tensor, float, float]:
    """α·T²·mean KL + (1−α)·mean CE over the masked positions (Hinton et al. 2015).

    ``student_logits`` (B, S, V); ``targets`` (B, S) reference token ids; ``mask`` (B, S), 1 on
    target tokens; ``teacher_values``/``teacher_ids`` (B, S, k). Means are per target token.
    Returns (loss, mean KL, mean CE) — the last two as floats, for logging. ValueError for an
    unknown ``kl`` (listing the known ones).
    """
    if kl not in LOSSES:
        raise ValueError(f"unknown distillation loss {kl!r}; known: {', '.join(LOSSES)}")
    weights = mask.float()
    count = weights.sum().clamp(min=1.0)
    divergence = (LOSSES[kl](student_logits, teacher_values, teacher_ids, temperature)
                  * weights).sum() / count
    ce = F.cross_entropy(student_logits.float().flatten(0, 1),
                         targets.clamp(min=0).flatten(), reduction="none").view_as(weights)
    ce = (ce * weights).sum() / count
    loss = alpha * temperature ** 2 * divergence + (1.0 - alpha) * ce
    return loss, float(divergence.detach()), float(ce.detach())


def prompt_positions(labels: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """(B, S) bool of a right-padded ``collate``d batch: the positions whose next token is a
    prompt token (no label) of the same row, i.e. 0 .. prompt length - 2 of each row."""
    nxt = (labels[:, 1:] == IGNORE) & attention[:, 1:].bool() & attention[:, :-1].bool()
    return torch.cat([nxt, torch.zeros_like(nxt[:, :1])], dim=1)


def prompt_kl(hidden: torch.Tensor, head: torch.nn.Module, positions: torch.Tensor,
              teacher_values: torch.Tensor, teacher_ids: torch.Tensor, *, temperature: float,
              kl: str = "forward_kl") -> torch.Tensor:
    """Mean KL over ``positions`` (B, S) bool, the student's logits taken at the teacher's ids
    only: ``hidden`` (B, S, H) is the student's last hidden state (after its final norm),
    ``head`` its output layer; ``teacher_values``/``teacher_ids`` (N, k) in the order of the
    True positions (row by row). 0 (with a gradient) when there is no position."""
    chosen = hidden[positions]  # (N, H)
    if not len(chosen):
        return hidden.sum() * 0.0
    rows = head.weight[teacher_ids.long()]  # (N, k, H)
    picked = torch.einsum("nh,nkh->nk", chosen.float(), rows.float())
    if getattr(head, "bias", None) is not None:
        picked = picked + head.bias[teacher_ids.long()].float()
    own = torch.arange(picked.shape[-1], device=picked.device).expand_as(picked)
    return LOSSES[kl](picked, teacher_values, own, temperature).mean()


# --- the student ------------------------------------------------------------------------------
def pick_layers(n_layers: int, fraction: float) -> list[int]:
    """``max(1, round(n_layers * fraction))`` layer indices, evenly spaced over
    0..n_layers-1 with the first and the last kept (a one-layer student keeps the last).
    ValueError for ``n_layers`` < 1 or ``fraction`` outside (0, 1]."""
    if n_layers < 1:
        raise ValueError(f"`n_layers` has to be a positive integer, but is {n_layers}")
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` has to be in (0, 1], but is {fraction}")
    keep = max(1, round(n_layers * fraction))
    if keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def _layer_list(model) -> torch.nn.ModuleList:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `{model.base_model_prefix}.layers` "
                         "list of decoder layers (a LlamaForCausalLM-like model is needed)")
    return layers


def _cut_config(config, layers: Sequence[int]) -> None:
    """Make ``config`` describe only ``layers`` of its decoder layers: their number, and the
    per-layer ``layer_types`` list where there is one."""
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]


@contextmanager
def only_layers(model, layers: Sequence[int]):
    """Run ``model`` with just ``layers`` of its decoder layers (in place, without copying;
    restored on exit). The KV cache is off meanwhile: its slots follow layer positions."""
    base = getattr(model, model.base_model_prefix)
    full, config = base.layers, model.config
    saved = (config.num_hidden_layers, config.use_cache, getattr(config, "layer_types", None))
    base.layers = torch.nn.ModuleList([full[i] for i in layers])
    _cut_config(config, layers)
    config.use_cache = False
    try:
        yield
    finally:
        base.layers = full
        config.num_hidden_layers, config.use_cache = saved[0], saved[1]
        if isinstance(saved[2], list):
            config.layer_types = saved[2]


@torch.no_grad()
def target_nll(model, examples: Sequence[Example], pad: int, batch_size: int,
               device: torch.device) -> float:
    """Mean negative log-likelihood per target token of ``examples`` under ``model`` (every
    token weighs the same across batches)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in
                 collate(examples[start:start + batch_size], pad, seq2seq=False).items()}
        logprobs, mask = target_logprobs(model, batch, seq2seq=False)
        total -= float(logprobs.sum())  # zero past each target
        count += int(mask.sum())
    return total / max(count, 1)


def greedy_removal(model, examples: Sequence[Example], pad: int, keep: int, *,
                   batch_size: int = 8, device: torch.device | None = None,
                   progress: bool = False,
                   on_drop: Callable[[int, int], None] | None = None,
                   ) -> list[tuple[int, float]]:
    """Greedy layer removal down to ``keep`` layers: one at a time, drop the layer whose
    absence raises the target-token loss on ``examples`` least (the first and the last layer
    stay; SLEB, Song et al. 2024, removes blocks the same way by perplexity). Returns the
    dropped layers in order, each with the loss without it and those dropped before it; the
    layers kept at any size on the way are the others. ``model`` is left as it was. Costs
    ~n²/2 passes over ``examples`` for n layers: ``progress`` shows a bar, ``on_drop(done,
    total)`` is called before the first removal (done = 0) and after each. ValueError for
    ``keep`` outside 2..n-1 or no example."""
    n = len(_layer_list(model))
    if not 2 <= keep < n:
        raise ValueError(f"`keep` has to lie in 2..{n - 1} (the model has {n} layers), "
                         f"but is {keep}")
    if not examples:
        raise ValueError("greedy layer choice needs at least one example")
    device = device or next(model.parameters()).device
    kept, dropped = list(range(n)), []
    with tqdm(total=n - keep, desc="choosing layers", disable=not progress) as bar:
        if on_drop is not None:
            on_drop(0, n - keep)
        while len(kept) > keep:
            losses = {}
            for layer in kept[1:-1]:
                with only_layers(model, [i for i in kept if i != layer]):
                    losses[layer] = target_nll(model, examples, pad, batch_size, device)
            drop = min(losses, key=lambda layer: (losses[layer], layer))
            kept.remove(drop)
            dropped.append((drop, losses[drop]))
            log.info("layer %d dropped: %d left, target loss %.3f", drop, len(kept), losses[drop])
            bar.update(1)
            if on_drop is not None:
                on_drop(len(dropped), n - keep)
    return dropped


def greedy_layers(model, examples: Sequence[Example], pad: int, keep: int, *,
                  batch_size: int = 8, device: torch.device | None = None,
                  progress: bool = False,
                  on_drop: Callable[[int, int], None] | None = None) -> list[int]:
    """The ``keep`` layers ``greedy_removal`` leaves. Which layers matter is uneven, and one
    removal changes which others do, hence one at a time."""
    n = len(_layer_list(model))
    dropped = {layer for layer, _ in greedy_removal(model, examples, pad, keep,
                                                    batch_size=batch_size, device=device,
                                                    progress=progress, on_drop=on_drop)}
    return [i for i in range(n) if i not in dropped]


def layer_subset(model, layers: Sequence[int]):
    """A new model of ``model``'s class and config with only ``layers`` (teacher indices, in
    increasing order) as its decoder layers, each a copy of the teacher's layer; every other
    weight (embeddings, final norm, output head) is copied too. Pure: ``model`` is unchanged.

    For LlamaForCausalLM-like models (``<prefix>.layers`` a ModuleList, config
    ``num_hidden_layers``; a per-layer ``layer_types`` list is cut the same way). The student
    is in eval mode, in the teacher's dtype. ValueError for an empty, unsorted or repeating
    selection, an index out of range, or a model without a decoder-layer list.
    """
    n = len(_layer_list(model))
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` has to name at least one layer, but is empty")
    if layers != sorted(set(layers)):
        raise ValueError(f"`layers` has to be increasing without repeats, but is {layers}")
    if layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"`layers` has to lie in 0..{n - 1}, but is {layers}")
    config = deepcopy(model.config)
    _cut_config(config, layers)
    student = type(model)(config)
    prefix = re.escape(f"{model.base_model_prefix}.layers.")
    pattern = re.compile(rf"^({prefix})(\d+)(\..*)$")
    new_index = {old: new for new, old in enumerate(layers)}
    weights = {}
    for name, tensor in model.state_dict().items():
        found = pattern.match(name)
        if found is None:
            weights[name] = tensor.detach().clone()
        elif int(found.group(2)) in new_index:
            weights[f"{found.group(1)}{new_index[int(found.group(2))]}{found.group(3)}"] = \
                tensor.detach().clone()
    student.load_state_dict(weights, strict=True)
    if getattr(model, "generation_config", None) is not None:
        student.generation_config = deepcopy(model.generation_config)
    dtype = next(model.parameters()).dtype
    return student.to(dtype).eval()


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher=None,
                         student=None) -> None:
    """Raise ValueError unless the student reads the teacher's prompts token for token: the
    same vocabulary, special tokens and chat template (and, given the models, output heads of
    the same width, since the cached ids index the student's logits)."""
    a, b = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(f"the student's tokenizer differs from the teacher's ({len(b)} vs "
                         f"{len(a)} tokens; e.g. {differ}): distillation needs the same "
                         "tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(teacher_tokenizer, name) != getattr(student_tokenizer, name):
            raise ValueError(f"the student's tokenizer has another {name} "
                             f"({getattr(student_tokenizer, name)} vs "
                             f"{getattr(teacher_tokenizer, name)})")
    if getattr(teacher_tokenizer, "chat_template", None) != getattr(
            student_tokenizer, "chat_template", None):
        raise ValueError("the student's chat template differs from the teacher's: its prompts "
                         "would not be the ones the teacher's outputs were cached on")
    if teacher is not None and student is not None:
        width = teacher.get_output_embeddings().weight.shape[0]
        other = student.get_output_embeddings().weight.shape[0]
        if width != other:
            raise ValueError(f"the student's output head has {other} logits, the teacher's "
                             f"{width}")


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the teacher cache ------------------------------------------------------------------------
@dataclass
class TeacherCache:
    """The teacher's top-k logits on every target token of ``examples``: row ``offsets[i] + j``
    of ``values``/``ids`` (float32 / int32, (tokens, k)) is example i's j-th target token.
    ``kept_mass``: mean and minimum over tokens of the top-k's probability at T=1, T=2 and
    the run's T (``mean_T1``, ``min_T2``, ``mean_T``, ...). ``fingerprint`` names the
    examples and the teacher it was made from. ``prompt_*``: the same at every prompt
    position (``prompt_positions``) when the cache was made with ``prompt=True``, else empty;
    ``prompt_values`` is float16 (a prompt is ~450 positions, its answer ~5)."""

    values: torch.Tensor
    ids: torch.Tensor
    offsets: list[int]
    lengths: list[int]
    k: int
    fingerprint: str
    teacher: str
    kept_mass: dict[str, float]
    prompt_values: torch.Tensor | None = None
    prompt_ids: torch.Tensor | None = None
    prompt_offsets: list[int] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)

    @property
    def has_prompt(self) -> bool:
        return self.prompt_values is not None

    def prompt_batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(values float32, ids), each (N, k): examples ``rows``' prompt positions in order,
        as ``prompt_positions`` selects them from their batch."""
        if not self.has_prompt:
            raise ValueError("this teacher cache holds no prompt positions")
        parts = [slice(self.prompt_offsets[i], self.prompt_offsets[i] + self.prompt_lengths[i])
                 for i in rows]
        return (torch.cat([self.prompt_values[p] for p in parts]).float(),
                torch.cat([self.prompt_ids[p] for p in parts]).long())

    def batch(self, rows: Sequence[int], span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids), each (len(rows), span, k), for examples ``rows`` aligned like
        ``target_logits``; zeros past an example's target (masked out by the loss)."""
        values = torch.zeros((len(rows), span, self.k), dtype=torch.float32)
        ids = torch.zeros((len(rows), span, self.k), dtype=torch.long)
        for r, i in enumerate(rows):
            n = min(self.lengths[i], span)
            values[r, :n] = self.values[self.offsets[i]:self.offsets[i] + n]
            ids[r, :n] = self.ids[self.offsets[i]:self.offsets[i] + n].long()
        return values, ids

    def save(self, path: Path) -> None:
        """Write atomically (a crash mid-write leaves no half file)."""
        with atomic_open(path) as out:
            torch.save(asdict(self), out)

    @classmethod
    def load(cls, path: Path) -> TeacherCache | None:
        """The cache at ``path``, or None when there is none."""
        if not path.is_file():
            return None
        return cls(**torch.load(path, map_location="cpu", weights_only=False))


def teacher_id(model) -> str:
    """A short name of a teacher's weights (path, size and a checksum of its embeddings)."""
    emb = model.get_input_embeddings().weight
    return (f"{getattr(model.config, 'name_or_path', '') or type(model).__name__}"
            f"|{parameter_count(model)}|{float(emb.detach().float().abs().sum()):.6e}")


def _starts(lengths: Sequence[int]) -> list[int]:
    """Where each of consecutive runs of ``lengths`` starts: [0, l0, l0 + l1, ...]."""
    return [0, *itertools.accumulate(lengths[:-1])] if lengths else [0]


@torch.no_grad()
def cache_teacher(teacher, examples: Sequence[Example], pad: int, *, k: int,
                  temperature: float, batch_size: int = 8, fingerprint: str = "",
                  device: torch.device | None = None, prompt: bool = False) -> TeacherCache:
    """Run ``teacher`` once over ``examples`` (teacher forcing on the reference target) and keep
    the top ``k`` logits of every target token, and with ``prompt`` of every prompt position
    too. ``fingerprint`` is stored to recognise the cache later. The teacher is left in eval
    mode."""
    if k < 1:
        raise ValueError(f"`k` has to be a positive integer, but is {k}")
    device = device or next(teacher.parameters()).device
    teacher.eval()
    values, ids, lengths = [], [], []
    prompt_values, prompt_ids, prompt_lengths = [], [], []
    mass = {"T1": [], "T2": [], "T": []}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {name: t.to(device) for name, t in collate(chunk, pad, seq2seq=False).items()}
        every = None
        if prompt:
            every = teacher(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
            positions = prompt_positions(batch["labels"], batch["attention_mask"])
            top_prompt = every[positions].float().topk(min(k, every.shape[-1]), dim=-1)
            prompt_values.append(top_prompt.values.half().cpu())
            prompt_ids.append(top_prompt.indices.to(torch.int32).cpu())
            prompt_lengths.extend(int(n) for n in positions.sum(-1))
        logits, _, mask = target_logits(teacher, batch, logits=every)
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        for name, t in (("T1", 1.0), ("T2", 2.0), ("T", temperature)):
            probs = torch.softmax(logits / t, dim=-1).gather(-1, top.indices).sum(-1)
            mass[name].append(probs[mask].cpu())
        for r in range(len(chunk)):
            n = int(mask[r].sum())
            values.append(top.values[r, :n].cpu())
            ids.append(top.indices[r, :n].to(torch.int32).cpu())
            lengths.append(n)
    offsets, prompt_offsets = _starts(lengths), _starts(prompt_lengths)
    kept = {}
    for name, parts in mass.items():
        joined = torch.cat(parts) if parts else torch.zeros(0)
        kept[f"mean_{name}"] = round(float(joined.mean()), 4) if len(joined) else 0.0
        kept[f"min_{name}"] = round(float(joined.min()), 4) if len(joined) else 0.0
    return TeacherCache(values=torch.cat(values) if values else torch.zeros((0, k)),
                        ids=torch.cat(ids) if ids else torch.zeros((0, k), dtype=torch.int32),
                        offsets=offsets, lengths=lengths, k=min(k, top.values.shape[-1]),
                        fingerprint=fingerprint, teacher=teacher_id(teacher), kept_mass=kept,
                        prompt_values=torch.cat(prompt_values) if prompt else None,
                        prompt_ids=torch.cat(prompt_ids) if prompt else None,
                        prompt_offsets=prompt_offsets if prompt else [],
                        prompt_lengths=prompt_lengths)


# --- configuration ----------------------------------------------------------------------------
class DistillConfig(BaseModel):
    """A teacher → student run of the generator (saved with its state and its model).

    ``temperature``/``alpha``/``loss``: the KD loss (module docstring). ``prompt_weight`` (β):
    the weight of the same KL on the prompt's positions (0: the answer's tokens only; module
    docstring; 1 took a healed 12-layer student from 0.75× its teacher's F1 to 0.97×:
    bench/RESULTS.md).
    ``cache_k``: teacher logits kept per token. The student: ``student_model`` (a smaller
    model's folder or Hugging Face id, read with the teacher's tokenizer) when given, else
    ``layers`` (teacher layer indices) when given, else ``layer_fraction`` of the teacher's
    layers, chosen by ``layer_choice``: ``greedy`` (``greedy_layers`` on the teacher's loss over
    ``layer_choice_examples`` answered training examples, a seeded sample; kept in the run
    folder for a resume) or ``spaced`` (``pick_layers``; a one-layer student is the last layer
    either way); the caller's own student overrides all.
    ``heal_steps``: before distillation the student trains that many steps as a causal LM on
    the corpus text (``lm.train_lm``: ``heal_block_size``-token blocks, ``batch_size`` a step,
    lr ``heal_lr``; 0: none). A cut student's kept layers relearn to work together there (its
    answer loss starts at 10–15 nats; on the corpus text 300 steps took its loss from 10.3 to
    3.9, and the F1 of a student distilled on answer tokens only from 0.53× the teacher's to
    0.75×: bench/RESULTS.md).
    Prompt fields are those of ``GeneratorTrainConfig`` (serving's prompts), but
    ``abstain_fraction`` is 0: the student learns to decline from the unanswerable questions
    and the teacher's soft targets, and its answered questions again without their passages
    made a small student decline half the answerable ones (bench/RESULTS.md). ``eval_steps``:
    dev EM/F1 on at most ``eval_questions`` dev questions, the best student by
    ``select_metric`` kept.
    ``save_steps``: resume-state period (None: at each evaluation, and on cancel).
    """

    model_config = ConfigDict(extra="forbid")

    loss: str = "forward_kl"
    temperature: float = Field(1.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1)
    prompt_weight: float = Field(1.0, ge=0, le=100)
    cache_k: int = Field(32, ge=1, le=100_000)
    layer_fraction: float = Field(1 / 3, gt=0, le=1)
    layer_choice: Literal["greedy", "spaced"] = "greedy"
    layer_choice_examples: int = Field(4, ge=1, le=4096)
    layers: list[int] | None = None
    student_model: str | None = Field(None, min_length=1)
    heal_steps: int = Field(300, ge=0)
    heal_lr: float = Field(2e-4, gt=0, le=1)
    heal_block_size: int = Field(256, ge=8)
    lr: float = Field(2e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    schedule: loop.Schedule = "cosine"
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    batch_size: int = Field(8, ge=1, le=4096)
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(3, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    teacher_batch_size: int = Field(8, ge=1, le=4096)
    activation_checkpointing: bool = Field(False, description="the student keeps only each "
                                           "layer's input and recomputes its activations in "
                                           "the backward pass while it is healed and "
                                           "distilled (less memory for a little more time)")
    # prompts: as serving builds them (generator.py's fields)
    top_k: int = Field(qa.SERVING_TOP_K, ge=1, le=100)
    max_passage_chars: int = Field(qa.SERVING_MAX_PASSAGE_CHARS, ge=50)
    max_seq_len: int = Field(1024, ge=16)
    max_answer_tokens: int = Field(32, ge=1)
    abstain_fraction: float = Field(0.0, ge=0, le=1)
    not_found_fraction: float = Field(0.0, ge=0, le=1)
    extra_passages: int = Field(3, ge=0)
    # evaluation and checkpoints
    eval_steps: int = Field(50, ge=1)
    eval_questions: int = Field(64, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    eval_max_new_tokens: int = Field(32, ge=1)
    select_metric: Literal["score", "em", "f1"] = "score"
    save_steps: int | None = Field(None, ge=1)
    log_steps: int = Field(10, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in LOSSES:
            raise ValueError(f"unknown distillation loss {value!r}; known: {', '.join(LOSSES)}")
        return value

    @field_validator("temperature")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"`temperature` has to be a finite number > 0, but is {value}")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or value != sorted(set(value)) or value[0] < 0):
            raise ValueError(f"`layers` has to be non-empty, increasing, without repeats and "
                             f">= 0, but is {value}")
        return value

    @model_validator(mode="after")
    def _student_smaller(self) -> DistillConfig:
        if self.layers is None and self.layer_fraction == 1:
            raise ValueError("`layer_fraction` 1 keeps every layer: the student has to be "
                             "smaller than the teacher (use a fraction below 1)")
        return self

    def prompts(self) -> GeneratorTrainConfig:
        """The example-building fields as ``generator.build_examples`` reads them."""
        return GeneratorTrainConfig(
            top_k=self.top_k, max_passage_chars=self.max_passage_chars,
            max_seq_len=self.max_seq_len, max_answer_tokens=self.max_answer_tokens,
            abstain_fraction=self.abstain_fraction, not_found_fraction=self.not_found_fraction,
            extra_passages=self.extra_passages, seed=self.seed, device=self.device)


@dataclass
class DistillResult:
    """What a run made. ``model_dir``: the best student (a plain generator folder);
    ``layers``: the teacher layers it started from (None for a caller's student);
    ``kept_mass``: the cache's top-k mass (see ``TeacherCache``); ``teacher_cached``: whether
    this call ran the teacher (False: the cache in the run folder was reused)."""

    model_dir: Path
    cache_path: Path
    steps: int
    total_steps: int
    best_step: int
    best_metrics: dict[str, float | None]
    resumed_from: int | None
    layers: list[int] | None
    teacher_params: int
    student_params: int
    kept_mass: dict[str, float]
    teacher_cached: bool
    examples: dict[str, int]
    elapsed_s: float
    train_s: float
    report_path: Path
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _autocast(device: torch.device, amp: torch.dtype):
    return torch.autocast(device.type, dtype=amp,
                          enabled=device.type == "cuda" and amp != torch.float32)


def _dev_metrics(model, tokenizer, items: Sequence[QAItem], prompts: Sequence[Sequence[int]],
                 passages, config: DistillConfig) -> dict[str, float | None]:
    answers = qa.generate_answers(model, tokenizer, prompts,
                                  max_new_tokens=config.eval_max_new_tokens,
                                  batch_size=config.eval_batch_size)
    rows = [qa.score_row(item, answer, hits)
            for item, answer, hits in zip(items, answers, passages, strict=True)]
    return dict(asdict(qa.summarise(rows)))


def _greedy_choice(teacher, examples: Sequence[Example], pad: int, keep: int,
                   config: DistillConfig, data: str, run_dir: Path, device: torch.device,
                   on_drop: Callable[[int, int], None] | None = None) -> list[int]:
    """``greedy_layers`` of ``teacher`` over a seeded sample of the answered examples (all
    examples when none is answered), read from ``run_dir/layers.json`` when a run of the same
    data and size chose them already (a resume does not pay for the choice again)."""
    path = run_dir / LAYERS_FILE
    key = {"data": data, "keep": keep, "examples": config.layer_choice_examples,
           "seed": config.seed}
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in key} == key:
            return list(saved["layers"])
    answered = [e for e in examples if e.kind == ANSWER] or list(examples)
    sample = random.Random(config.seed).sample(answered,
                                               min(config.layer_choice_examples, len(answered)))
    started = time.perf_counter()
    teacher.to(device)
    with _autocast(device, torch.bfloat16):
        layers = greedy_layers(teacher, sample, pad, keep,
                               batch_size=config.teacher_batch_size, device=device,
                               progress=True, on_drop=on_drop)
    log.info("greedy layer choice: %s, %.1f s", layers, time.perf_counter() - started)
    write_text_atomic(path, json.dumps({**key, "layers": layers}))
    return layers


def _heal(model, tokenizer, texts: Sequence[str], config: DistillConfig, run_dir: Path,
          before_steps: loop.Reporter, should_stop: Callable[[], bool] | None, resume: bool):
    """``model`` trained ``config.heal_steps`` steps as a causal LM on ``texts``
    (``lm.train_lm``, resumable in ``run_dir``), read back from its saved folder; ``model``
    itself (a warning logged) when the texts do not fill one block."""
    from services.trainer.lm import LMTrainConfig, train_lm

    tokens = 0
    for text in texts:
        if text.strip():
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if tokens >= config.heal_block_size:
            break
    else:
        log.warning("the corpus text makes %d tokens, less than one %d-token block: the "
                    "student is distilled without healing", tokens, config.heal_block_size)
        return model

    lm_config = LMTrainConfig(block_size=config.heal_block_size, batch_size=config.batch_size,
                              lr=config.heal_lr, max_steps=config.heal_steps,
                              warmup_steps=min(10, config.heal_steps), dev_fraction=0.01,
                              eval_steps=config.heal_steps, log_steps=10, seed=config.seed,
                              activation_checkpointing=config.activation_checkpointing,
                              device=config.device)

    def on_step(p: loop.Progress) -> None:
        before_steps.phase(f"healing the student {p.step}/{p.total_steps}")

    before_steps.phase(f"healing the student 0/{config.heal_steps}")
    result = train_lm(lm_config, model.float(), tokenizer, texts, run_dir, progress=on_step,
                      should_stop=should_stop, resume=resume)
    log.info("student healed: %d LM steps, dev loss %s", result.steps, result.best_dev_loss)
    return type(model).from_pretrained(result.model_dir, dtype=torch.float32)


def distill_generator(config: DistillConfig, load_teacher: Callable[[], tuple[Any, Any]],
                      train_items: Sequence[QAItem], dev_items: Sequence[QAItem],
                      retrieval: qa.Retrieval, run_dir: Path, *,
                      student: tuple[Any, Any] | None = None,
                      heal_texts: Sequence[str] = (),
                      progress: loop.ProgressFn | None = None,
                      should_stop: Callable[[], bool] | None = None,
                      resume: bool = True) -> DistillResult:
    """Distil the teacher ``load_teacher()`` returns — ``(model, tokenizer)``, a decoder-only
    LM — into a student, on serving's prompts for ``train_items``.

    The teacher comes as a loader so that this function decides how long it lives: it builds
    the student (``layer_subset`` of it, unless ``student`` = (model, tokenizer) names a
    smaller model with the same tokenizer, or ``config.student_model`` one), runs it once
    over the examples' targets (``cache_teacher``; a cache of the same examples and teacher
    in ``run_dir`` is reused), and lets it go before the student trains. ``retrieval`` gives
    each question's hits (a retriever or precomputed passages, ``qa.retrieve``). With
    ``config.heal_steps`` the student first trains as a language model on ``heal_texts`` (the
    corpus's documents; in ``run_dir/heal``, skipped when the student's own loop resumes).

    Writes into ``run_dir``: ``teacher_topk.pt``, ``model/`` (the best student by dev
    ``select_metric``; the last one without dev questions: ``loop.save_model``, meta
    kind="generator"), ``state.pt`` and ``report.json``/``report.png``. With ``resume`` a state
    of the same config and data continues (ValueError for another). ``should_stop`` is asked
    between steps (the state is saved and ``loop.Cancelled`` raised) and between the greedy
    choice's removals and the healing steps. ``progress`` hears the steps, and before them the
    phases: "choosing layers i/n", "caching the teacher", "healing the student i/n".

    Raises ValueError before training for no training item, an encoder-decoder teacher, a
    student that is not smaller or reads another tokenizer, bad ``layers``, and the errors of
    ``generator.build_examples``.
    """
    run_dir = Path(run_dir)
    if not train_items:
        raise ValueError("no training items: `train_items` is empty")
    if config.heal_steps and not any(text.strip() for text in heal_texts):
        raise ValueError("`heal_steps` trains the student on the corpus text, but "
                         "`heal_texts` is empty")
    started_wall = time.perf_counter()
    loop.seed_everything(config.seed)
    device, amp = loop.pick_device(config.device)

    # --- the teacher: build the student from it, cache its outputs, let it go -----------------
    teacher, tokenizer = load_teacher()
    if qa.is_seq2seq(teacher):
        raise ValueError(f"distillation needs a decoder-only teacher; "
                         f"{type(teacher).__name__} is an encoder-decoder")
    teacher_params = parameter_count(teacher)
    layers: list[int] | None = None
    if student is None and config.student_model is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        student = (AutoModelForCausalLM.from_pretrained(config.student_model,
                                                        dtype=torch.float32),
                   AutoTokenizer.from_pretrained(config.student_model))
    model = None
    if student is None:
        n = len(_layer_list(teacher))
        layers = config.layers or pick_layers(n, config.layer_fraction)
        if layers[-1] >= n:
            raise ValueError(f"`layers` has to lie in 0..{n - 1} (the teacher has {n}), "
                             f"but is {layers}")
        if len(layers) >= n:
            raise ValueError(f"the student keeps all {n} layers: it has to be smaller")
    else:
        model, student_tokenizer = student
        if qa.is_seq2seq(model):
            raise ValueError("distillation needs a decoder-only student")
        check_same_tokenizer(tokenizer, student_tokenizer, teacher, model)
        if parameter_count(model) >= teacher_params:
            raise ValueError(f"the student has {parameter_count(model):,} parameters, the "
                             f"teacher {teacher_params:,}: it has to be smaller")
    eos = qa.eos_ids(teacher, tokenizer)
    pad = qa.pad_id(tokenizer, eos)
    # A layer subset has the teacher's context: only a named student's can be shorter.
    enc = Encoding(tokenizer=tokenizer, seq2seq=False, end=end_token(teacher, tokenizer),
                   context=min(qa.context_size(teacher, tokenizer),
                               qa.context_size(model if model is not None else teacher,
                                               tokenizer)))
    prompt_config = config.prompts()
    wanted = config.top_k + (config.extra_passages if config.abstain_fraction > 0 else 0)
    passages = qa.retrieve(retrieval, [i.question for i in train_items], wanted)
    examples = build_examples(train_items, passages, enc, prompt_config,
                              abstain_fraction=config.abstain_fraction,
                              not_found_fraction=config.not_found_fraction)
    if not examples:
        raise ValueError("no training example left (every item was a left-out not-found one)")
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    dev_subset = list(dev_items)[:config.eval_questions]
    dev_prompts, dev_passages = [], []
    if dev_subset:
        found = qa.retrieve(retrieval, [i.question for i in dev_subset], config.top_k)
        budget = enc.context - config.eval_max_new_tokens
        for item in dev_subset:
            kept, ids = qa.fit_prompt(tokenizer, item.question, found[item.question],
                                      config.max_passage_chars, budget)
            dev_prompts.append(ids)
            dev_passages.append(kept)
    who = teacher_id(teacher)
    data = loop.fingerprint([{"id": e.id, "input_ids": e.input_ids, "labels": e.labels}
                             for e in examples]
                            + [{"dev": [i.id for i in dev_subset], "teacher": who}])
    before_steps = loop.Reporter(progress, KIND, 0, loop.Clock())
    if model is None:
        # greedy keeps the first and the last layer; a one-layer student keeps the last
        if config.layers is None and config.layer_choice == "greedy" and len(layers) >= 2:
            def on_drop(done: int, total: int) -> None:
                before_steps.phase(f"choosing layers {done}/{total}")
                loop.check_cancel(should_stop)

            layers = _greedy_choice(teacher, examples, pad, len(layers), config, data, run_dir,
                                    device, on_drop)
        model = layer_subset(teacher, layers).float()
    cache_path = run_dir / CACHE_FILE
    cache = TeacherCache.load(cache_path)
    teacher_cached = False
    if (cache is None or cache.fingerprint != data or cache.k != config.cache_k
            or (config.prompt_weight > 0 and not cache.has_prompt)):
        before_steps.phase("caching the teacher")
        teacher.to(device)
        cache_started = time.perf_counter()
        with _autocast(device, amp):
            cache = cache_teacher(teacher, examples, pad, k=config.cache_k,
                                  temperature=config.temperature,
                                  batch_size=config.teacher_batch_size, fingerprint=data,
                                  device=device, prompt=config.prompt_weight > 0)
        cache.save(cache_path)
        teacher_cached = True
        log.info("teacher cached: %d target tokens, top-%d, kept mass %s, %.1f s",
                 len(cache.values), cache.k, cache.kept_mass,
                 time.perf_counter() - cache_started)
    # The caller holds no reference (it gave a loader): this frees the teacher.
    del teacher
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if config.heal_steps and not (resume and (run_dir / loop.STATE_FILE).is_file()):
        model = _heal(model, tokenizer, heal_texts, config, run_dir / HEAL_DIR, before_steps,
                      should_stop, resume)

    # --- the student's loop -------------------------------------------------------------------
    if config.activation_checkpointing:
        checkpoint_activations(model)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(examples) / config.batch_size)
    steps_total = config.max_steps or per_epoch * config.epochs
    step, history = 0, {"train": [], "eval": []}
    best: dict[str, Any] = {"value": None, "step": None, "metrics": {}}
    train_s, resumed_from = 0.0, None
    clock = loop.Clock()
    state = loop.load_state(run_dir) if resume else None
    if state is not None:
        loop.check_resumable(state, KIND, config, data, run_dir)
        loop.restore_training_state(state, model, optimizer)
        step, history, best, train_s = (state["step"], state["history"], state["best"],
                                        state["train_s"])
        clock = loop.Clock(state["elapsed_s"])
        resumed_from = step
        log.info("resuming %s at step %d of %d", run_dir, step, steps_total)

    student_params = parameter_count(model)
    meta_base = {"kind": "generator", "method": "distill", "trained_by": "distill",
                 "config": config.model_dump(mode="json"), "data": data,
                 "distilled_from": who, "layers": layers, "teacher_params": teacher_params,
                 "student_params": student_params, "kept_mass": cache.kept_mass,
                 "seq2seq": False, "target_format": "<answer> [<passage number>]",
                 "no_answer": NO_ANSWER, "examples": counts}

    def snapshot() -> dict[str, Any]:
        return {"kind": KIND, "config": config.model_dump(mode="json"), "data": data,
                "step": step, **loop.training_state(model, optimizer), "history": history,
                "best": best, "train_s": train_s, "elapsed_s": clock.elapsed()}

    report = loop.Reporter(progress, KIND, steps_total, clock)
    index = {e.id: i for i, e in enumerate(examples)}
    batches = BatchOrder(examples, config.batch_size, config.seed)
    nonfinite = loop.NonFinite()
    while step < steps_total:
        loop.stop_if_asked(should_stop, run_dir, snapshot)
        step_started = time.perf_counter()
        lr = loop.set_scheduled_lr(optimizer, config, step, steps_total)
        batch = batches(step)
        tensors = {k: v.to(device) for k, v in collate(batch, pad, seq2seq=False).items()}
        rows = [index[e.id] for e in batch]
        with _autocast(device, amp):
            out = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                        output_hidden_states=config.prompt_weight > 0,
                        **keep_kwargs(model, tensors["labels"]))
            logits, targets, mask = target_logits(model, tensors, logits=out.logits)
        values, ids = cache.batch(rows, logits.shape[1])
        loss, kl, ce = kd_loss(logits, targets, mask, values.to(device), ids.to(device),
                               temperature=config.temperature, alpha=config.alpha,
                               kl=config.loss)
        extra = {}
        if config.prompt_weight > 0:
            p_values, p_ids = cache.prompt_batch(rows)
            with _autocast(device, amp):
                p_kl = prompt_kl(out.hidden_states[-1],
                                 model.get_output_embeddings(),
                                 prompt_positions(tensors["labels"],
                                                  tensors["attention_mask"]),
                                 p_values.to(device), p_ids.to(device),
                                 temperature=config.temperature, kl=config.loss)
            loss = loss + config.prompt_weight * config.temperature ** 2 * p_kl
            extra = {"prompt_kl": round(float(p_kl.detach()), 5)}
        del out
        loss.backward()
        loss_value = float(loss.detach())
        stepped = loop.optimizer_step([optimizer], [params], config.max_grad_norm, loss_value)
        nonfinite.count(stepped, step + 1, loss_value)
        step += 1
        train_s += time.perf_counter() - step_started
        history["train"].append({"step": step, "loss": round(loss_value, 5), "kl": round(kl, 5),
                                 "ce": round(ce, 5), **extra, "lr": lr,
                                 **({} if stepped else {"skipped": True})})

        evaluated = False
        if dev_subset and (step % config.eval_steps == 0 or step == steps_total):
            metrics = _dev_metrics(model, tokenizer, dev_subset, dev_prompts, dev_passages,
                                   config)
            model.train()
            history["eval"].append({"step": step, **metrics})
            value = metrics[config.select_metric]
            if value is not None and (best["value"] is None or value > best["value"]):
                best = {"value": value, "step": step, "metrics": metrics}
                loop.save_model(run_dir, model, tokenizer,
                                {**meta_base, "step": step, "metrics": metrics})
            report(step, loss_value, lr, {k: v for k, v in metrics.items() if v is not None})
            evaluated = True
        save_every = config.save_steps or (config.eval_steps if dev_subset else None)
        if (save_every and step % save_every == 0) or evaluated:
            loop.save_state(run_dir, snapshot())
        if not evaluated and (step % config.log_steps == 0 or step == steps_total):
            report(step, loss_value, lr)

    if best["step"] is None:  # no dev questions (or none scored): the last step is the result
        best = {"value": None, "step": step, "metrics": {}}
        loop.save_model(run_dir, model, tokenizer, {**meta_base, "step": step, "metrics": {}})
    if config.activation_checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    result = DistillResult(
        model_dir=run_dir / loop.MODEL_DIR, cache_path=cache_path, steps=step,
        total_steps=steps_total, best_step=best["step"], best_metrics=best["metrics"],
        resumed_from=resumed_from, layers=layers, teacher_params=teacher_params,
        student_params=student_params, kept_mass=cache.kept_mass,
        teacher_cached=teacher_cached, examples=counts, elapsed_s=round(clock.elapsed(), 3),
        train_s=round(train_s, 3), report_path=run_dir / loop.REPORT_JSON, history=history)
    loop.write_report(run_dir, {**{k: v for k, v in asdict(result).items() if k != "history"},
                                "config": config.model_dump(mode="json"), "history": history,
                                "wall_s": round(time.perf_counter() - started_wall, 3)},
                      f"generator distillation ({len(layers) if layers else 'own'} layers), "
                      f"best step {best['step']}")
    return result


# --- teacher and student side by side ---------------------------------------------------------
@torch.inference_mode()
def tokens_per_s(model, tokenizer, prompts: Sequence[Sequence[int]], *, new_tokens: int = 24,
                 batch_size: int = 8) -> float:
    """Generated tokens per second of greedy decoding over ``prompts`` (left-padded batches of
    ``batch_size``), each prompt made to produce exactly ``new_tokens`` (the end token is
    held back until then), so two models are timed on the same work."""
    if new_tokens < 1 or batch_size < 1 or not prompts:
        raise ValueError(f"`new_tokens` ({new_tokens}) and `batch_size` ({batch_size}) have to "
                         f"be positive and `prompts` non-empty ({len(prompts)})")
    pad = qa.pad_id(tokenizer, qa.eos_ids(model, tokenizer))
    device = next(model.parameters()).device
    model.eval()
    generated, seconds = 0, 0.0
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, p in enumerate(rows):
            ids[r, width - len(p):] = torch.tensor(list(p))
            mask[r, width - len(p):] = 1
        began = time.perf_counter()
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - began
        generated += (out.shape[1] - width) * len(rows)
    return generated / seconds


@dataclass(frozen=True)
class Comparison:
    """One model of ``compare_generators``: per-set metrics (``qa.SetMetrics`` as dicts),
    tokens/s (median over rounds) and every round's value."""

    sets: dict[str, dict[str, Any]]
    tokens_per_s: float
    rounds: list[float]
    parameters: int


def compare_generators(models: Mapping[str, Any], tokenizer,
                       sets: Mapping[str, Sequence[QAItem]], retrieval: qa.Retrieval, *,
                       top_k: int = qa.SERVING_TOP_K, max_new_tokens: int = 24,
                       batch_size: int = 8, speed_prompts: int = 16, speed_tokens: int = 24,
                       rounds: int = 3) -> dict[str, Comparison]:
    """EM/F1 (``qa.evaluate_qa``) of every named model on the same questions and passages, and
    tokens/s on the same ``speed_prompts`` prompts (the first questions' serving prompts),
    measured in interleaved rounds (model A, B, A, B, ...) so that a machine whose load
    changes slows each model alike; the median round is reported."""
    if rounds < 1:
        raise ValueError(f"`rounds` has to be a positive integer, but is {rounds}")
    questions = list(dict.fromkeys(i.question for items in sets.values() for i in items))
    found = qa.retrieve(retrieval, questions, top_k)
    context = min(qa.context_size(m, tokenizer) for m in models.values())
    prompts = [qa.fit_prompt(tokenizer, q, found[q], qa.SERVING_MAX_PASSAGE_CHARS,
                             context - max(max_new_tokens, speed_tokens))[1]
               for q in questions[:speed_prompts]]
    reports = {name: qa.evaluate_qa(model, tokenizer, sets, found, top_k=top_k,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size)
               for name, model in models.items()}
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            speeds[name].append(tokens_per_s(model, tokenizer, prompts,
                                             new_tokens=speed_tokens, batch_size=batch_size))
    return {name: Comparison(sets={s: asdict(m) for s, m in reports[name].sets.items()},
                             tokens_per_s=round(statistics.median(speeds[name]), 2),
                             rounds=[round(v, 2) for v in speeds[name]],
                             parameters=parameter_count(models[name]))
            for name in models}
