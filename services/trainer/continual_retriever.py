"""Continual learning of the retriever: the query encoder trained on one topic after another
with the methods of ``services/trainer/continual.py`` (naive, replay, EWC, L2), and how much of
the earlier topics' retrieval it forgets.

The generator's stream (``continual.run_stream``) measures what a fine-tuned reader keeps; this
one measures what a fine-tuned *retriever* keeps, with everything else shared: the methods
(``continual.METHODS``), the loop (``continual.train_task``), the reservoir, EWC's Fisher and
the GEM metrics (``continual.transfer_metrics``) into a ``continual.StreamResult``.

What differs is the example, the loss and the accuracy:

- an example is a question with the corpus rows that answer it (``retriever.Example``);
- only the query encoder trains ("query" mode of ``services/trainer/retriever.py``): documents
  keep the vectors the base encoder gave them, so no task needs a re-index and the dense index
  in serving stays valid between updates;
- the loss (``CorpusInfoNCE``) is InfoNCE of each question over the *whole* frozen corpus
  matrix: every other document is a negative (with 10k documents of 384 dimensions one
  (batch x 10k) product per step, cheaper than mining; DPR's in-batch negatives approximate
  this softmax because re-encoding every document per step is what they cannot afford, and
  frozen document vectors remove that cost);
- accuracy is recall@1 of exact dense search (0/1 per question), the retriever's counterpart of
  answer-contains.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.trainer import continual as cl
from services.trainer import loop
from services.trainer.retriever import Example, info_nce, training_examples
from shared.models.encoder import Encoder
from shared.schemas import Document


@dataclass(frozen=True)
class CorpusInfoNCE:
    """``loss_fn(model, examples)`` for ``continual.train_task``: mean InfoNCE of the examples'
    questions, embedded by ``model`` (with autograd), over every row of ``doc_vectors``
    (N, d) unit vectors on the model's device. A question's target is its first positive row;
    its other positives are left out of its softmax (they are not negatives). ``tokenizer``,
    ``max_length`` and ``pooling`` embed as the serving encoder does."""

    tokenizer: object
    doc_vectors: torch.Tensor
    temperature: float
    max_length: int
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"`temperature` has to be > 0, but is {self.temperature}")

    def __call__(self, model, examples: Sequence[Example]) -> torch.Tensor:
        if not examples:
            raise ValueError("the loss needs at least one example, but got none")
        encoder = Encoder(self.tokenizer, model, len(examples), self.max_length, self.pooling)
        queries = encoder.embed([ex.question for ex in examples])
        targets = torch.tensor([ex.positives[0] for ex in examples], device=queries.device)
        exclude = None
        if any(len(ex.positives) > 1 for ex in examples):
            exclude = torch.zeros((len(examples), self.doc_vectors.shape[0]), dtype=torch.bool,
                                  device=queries.device)
            for i, ex in enumerate(examples):
                exclude[i, list(ex.positives[1:])] = True
        return info_nce(queries.float(), self.doc_vectors, targets, self.temperature, exclude)


def recall_at_1(encoder: Encoder, doc_vectors: np.ndarray, examples: Sequence[Example],
                ) -> list[float]:
    """Per example, 1.0 if exact dense search (``encoder`` on the question, ``doc_vectors``
    (N, d) for the corpus rows) ranks one of its positive rows first, else 0.0. Ties go to
    the lower row. Empty for no example; the model is left in eval mode."""
    if not examples:
        return []
    encoder.model.eval()
    queries = encoder.encode([ex.question for ex in examples])
    best = np.argmax(queries @ doc_vectors.T, axis=1)
    return [float(int(row) in ex.positives) for row, ex in zip(best, examples, strict=True)]


def task_examples(task: cl.Task, corpus: Sequence[Document]) -> tuple[list[Example],
                                                                       list[Example]]:
    """(train, test) examples of ``task``: its items that have a gold document in ``corpus``
    (``retriever.training_examples``). Raises ValueError when either side is left empty."""
    train, _ = training_examples(task.train, corpus)
    test, _ = training_examples(task.test, corpus)
    if not train or not test:
        raise ValueError(f"task {task.name!r} has {len(train)} train and {len(test)} test "
                         "questions with a gold document in the corpus; it needs both")
    return train, test


def run_retriever_stream(config: cl.ContinualConfig, encoder: Encoder, doc_vectors: np.ndarray,
                         corpus: Sequence[Document], tasks: Sequence[cl.Task], *,
                         temperature: float = 0.05, baseline: Sequence[float] | None = None,
                         progress: loop.ProgressFn | None = None,
                         should_stop: Callable[[], bool] | None = None) -> cl.StreamResult:
    """Train ``encoder.model`` (in place: the query encoder) on ``tasks`` in order with
    ``config.method``; recall@1 on every task's test questions before the first task (unless
    ``baseline`` is given) and after each one, against ``doc_vectors`` (the corpus rows as
    the frozen document encoder embedded them).

    The loop is ``continual.stream_loop`` (the generator's too), the reservoir holding the
    examples themselves. The config's generator fields (prompts, decoding) are not used.
    Raises ValueError for fewer than two tasks, a baseline of another length, ``doc_vectors``
    whose rows are not ``corpus``, or a task without train or test questions.
    """
    cl.check_stream(tasks, baseline)
    if doc_vectors.shape[0] != len(corpus):
        raise ValueError(f"`doc_vectors` has {doc_vectors.shape[0]} rows for {len(corpus)} "
                         "documents")
    loop.seed_everything(config.seed)
    device, _ = loop.pick_device(config.device)
    model = encoder.model.float().to(device)
    loss_fn = CorpusInfoNCE(encoder.tokenizer, torch.from_numpy(doc_vectors).to(device),
                            temperature, encoder.max_length, encoder.pooling)
    parts = [task_examples(task, corpus) for task in tasks]

    def evaluate() -> list[float]:
        return [statistics.fmean(recall_at_1(encoder, doc_vectors, test)) for _, test in parts]

    return cl.stream_loop(config, model, loss_fn, tasks, [train for train, _ in parts], evaluate,
                          test_items=[len(test) for _, test in parts], baseline=baseline,
                          measure="recall@1", progress=progress, should_stop=should_stop)
