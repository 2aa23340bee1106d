"""Cutting long documents into overlapping passages for the dense index.

MiniLM reads at most ``embedding.max_length`` tokens (256 by default): a longer text is
truncated, so its tail would never be found. Each passage keeps its document id and its
character offsets into the document text, so a hit can be traced back.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas import Document


@dataclass(frozen=True)
class Passage:
    """``doc.text[start:end]``, the ``n``-th passage (from 0) of ``doc``."""

    doc: Document
    n: int
    start: int
    end: int

    @property
    def passage_id(self) -> str:
        return f"{self.doc.doc_id}#{self.n}"

    @property
    def text(self) -> str:
        return self.doc.text[self.start:self.end]


def spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans covering ``text``: each at most ``size`` long, consecutive ones sharing
    about ``overlap`` characters, cut at whitespace where one lies in the second half of the
    span and past the previous span's end (else mid-word). Starts and ends both strictly
    increase, and each span starts at or before the previous one's end, so no span lies inside
    another and no character is left out. A text of at most ``size`` characters is one span;
    "" gives [(0, 0)].

    Raises ValueError unless ``size >= 1`` and ``0 <= overlap < size``.
    """
    if size < 1:
        raise ValueError(f"passage size has to be a positive integer, but is {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"passage overlap has to be in [0, size={size}), but is {overlap}")
    if len(text) <= size:
        return [(0, len(text))]
    out: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + size, len(text))
        if end < len(text):
            # With overlap > size/2 the span's second half can begin before the previous end;
            # a cut there would make this passage lie inside the previous one.
            floor = max(start + size // 2, out[-1][1] + 1 if out else 0)
            cut = text.rfind(" ", floor, end)
            end = cut if cut > start else end
        out.append((start, end))
        if end >= len(text):
            return out
        next_start = max(end - overlap, start + 1)
        space = text.find(" ", next_start, end)  # begin the next passage on a word
        start = space + 1 if overlap and space != -1 else next_start


def passages(doc: Document, size: int, overlap: int) -> list[Passage]:
    """The passages of ``doc`` (see ``spans``), in order."""
    return [Passage(doc, n, start, end)
            for n, (start, end) in enumerate(spans(doc.text, size, overlap))]


def whole(docs: list[Document]) -> list[Passage]:
    """Each document as one passage (its whole text)."""
    return [Passage(doc, 0, 0, len(doc.text)) for doc in docs]
