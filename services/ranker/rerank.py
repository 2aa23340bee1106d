"""The optional reranking stage: a cross-encoder scores (question, passage) pairs jointly.

No reranker ships trained here (shared/DATA.md), so the stage is off by default: a
``CrossEncoder`` is an encoder (MiniLM by default) plus a one-logit head on the first token,
trained by ``train_step`` (binary cross-entropy on relevant / not-relevant pairs — the hook
the fine-tuning and distillation work calls) and saved with ``save`` / loaded with ``load``.
It is switched on only once a trained one exists and is shown to improve nDCG@10.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from shared.schemas import Hit, titled_text

HEAD_FILE = "rerank_head.pt"
CONFIG_FILE = "rerank.json"


class CrossEncoder(nn.Module):
    """``encoder`` (a Hugging Face encoder model) + a linear head on its first token.

    ``score`` returns one relevance logit per pair (higher = more relevant); it is
    deterministic in eval mode. ``max_length`` bounds the joint question+passage tokens: the
    longer of the two is cut first, so a short question stays whole and the passage fills the
    rest, while a question too long to leave room shares ``max_length`` about evenly with it.
    """

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int = 256):
        super().__init__()
        if max_length < 8:
            raise ValueError(f"max_length has to be at least 8, but is {max_length}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 1)
        self.max_length = max_length

    @classmethod
    def from_encoder(cls, name_or_path: str | Path, max_length: int = 256) -> CrossEncoder:
        """A new (untrained) cross-encoder on top of a pretrained encoder."""
        from transformers import AutoModel, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name_or_path),
                   AutoModel.from_pretrained(name_or_path), max_length)

    def forward(self, questions: list[str], passages: list[str]) -> torch.Tensor:
        """Logits of shape (n,) for n (question, passage) pairs."""
        if len(questions) != len(passages):
            raise ValueError(f"{len(questions)} questions but {len(passages)} passages")
        # longest_first, not only_second: only_second raises when the question alone is over
        # max_length (questions may be 1,000 characters), and cuts the passage to nothing
        # when the question nearly fills it; for a short question the two are the same.
        batch = self.tokenizer(questions, passages, padding=True, truncation="longest_first",
                               max_length=self.max_length, return_tensors="pt")
        batch = batch.to(self.head.weight.device)  # the model may be on a GPU (training)
        hidden = self.encoder(**batch).last_hidden_state[:, 0]
        return self.head(hidden).squeeze(-1)

    @torch.inference_mode()
    def score(self, question: str, passages: list[str], batch_size: int = 32) -> list[float]:
        """Relevance logits of each passage for ``question``, in input order."""
        self.eval()
        scores: list[float] = []
        for i in range(0, len(passages), batch_size):
            chunk = passages[i:i + batch_size]
            scores += self([question] * len(chunk), chunk).tolist()
        return scores

    def train_step(self, questions: list[str], passages: list[str], labels: list[float],
                   optimizer: torch.optim.Optimizer) -> float:
        """One optimisation step of binary cross-entropy; labels in [0, 1] (soft targets
        allowed, e.g. a teacher's relevance). Returns the loss."""
        self.train()
        target = torch.tensor(labels, dtype=torch.float32)
        loss = nn.functional.binary_cross_entropy_with_logits(self(questions, passages),
                                                              target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        torch.save(self.head.state_dict(), folder / HEAD_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({"max_length": self.max_length}))

    @classmethod
    def load(cls, folder: Path) -> CrossEncoder:
        """A trained cross-encoder saved by ``save``; FileNotFoundError names what is missing."""
        head = folder / HEAD_FILE
        if not head.exists():
            raise FileNotFoundError(f"{folder} holds no trained reranker ({HEAD_FILE} missing)")
        config = json.loads((folder / CONFIG_FILE).read_text())
        model = cls.from_encoder(folder, config["max_length"])
        model.head.load_state_dict(torch.load(head, weights_only=True))
        return model.eval()


def rerank(model: CrossEncoder, question: str, hits: list[Hit], top_n: int) -> list[Hit]:
    """The ``top_n`` of ``hits`` by cross-encoder score (descending; ties: earlier rank),
    each carrying its reranker logit as ``score``. Hits are not changed in place."""
    if top_n < 1:
        raise ValueError(f"top_n has to be a positive integer, but is {top_n}")
    scores = model.score(question, [titled_text(h.title, h.text) for h in hits])
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))[:top_n]
    return [hits[i].model_copy(update={"score": scores[i]}) for i in order]
