import random

import pytest

from services.embedding.chunking import passages, spans
from shared.schemas import Document


def test_short_text_is_one_span():
    assert spans("Paris is in France.", 100, 20) == [(0, 19)]


def test_spans_cover_the_text_with_overlap_and_cut_at_spaces():
    text = " ".join(f"word{i:03d}" for i in range(200))  # 1,599 characters
    out = spans(text, 300, 60)
    assert out[0][0] == 0 and out[-1][1] == len(text)
    for (s1, e1), (s2, _e2) in zip(out, out[1:], strict=False):
        assert e1 - s1 <= 300
        assert s2 < e1  # overlap: nothing between two passages is lost
        assert e1 - s2 <= 60 + len("word000")
        assert text[e1] == " " and text[s2 - 1] == " "  # whole words at both ends


def test_no_overlap_tiles_exactly():
    text = "abcdefghij" * 5
    out = spans(text, 20, 0)
    assert out == [(0, 20), (20, 40), (40, 50)]


def test_a_large_overlap_never_puts_a_span_inside_the_previous_one():
    # overlap 8 > size/2: the old cut at the last space of the second half gave (6, 16) then
    # (11, 16), a passage wholly inside the one before it
    out = spans("alpha beta gamma delta epsilon zeta", 10, 8)
    assert (11, 16) not in out
    assert all(e2 > e1 for (_s1, e1), (_s2, e2) in zip(out, out[1:], strict=False))


@pytest.mark.parametrize("size, overlap", [(3, 1), (7, 4), (10, 8), (12, 9), (13, 12), (20, 5),
                                           (50, 0), (50, 49), (1000, 200)])
def test_spans_property_on_random_texts(size, overlap):
    rng = random.Random(size * 1_000 + overlap)
    for _ in range(100):
        words = ["x" * rng.randint(1, 15) for _ in range(rng.randint(1, 300))]
        text = "".join(w + " " * rng.choice((1, 1, 1, 2, 3)) for w in words)
        out = spans(text, size, overlap)
        assert out[0][0] == 0 and out[-1][1] == len(text)
        covered = set()
        for start, end in out:
            assert 0 < end - start <= size
            covered.update(range(start, end))
        assert covered == set(range(len(text)))  # no character left out
        for (s1, e1), (s2, e2) in zip(out, out[1:], strict=False):
            assert s1 < s2 <= e1 < e2  # each starts later and reaches further: none inside


@pytest.mark.parametrize("size, overlap, message", [
    (0, 0, "positive integer, but is 0"),
    (10, 10, r"overlap has to be in \[0, size=10\), but is 10"),
    (10, -1, "but is -1"),
])
def test_bad_sizes_are_refused(size, overlap, message):
    with pytest.raises(ValueError, match=message):
        spans("text", size, overlap)


def test_passages_keep_doc_id_offsets_and_text():
    doc = Document(doc_id="d1", title="T", text="alpha beta gamma delta epsilon zeta")
    parts = passages(doc, 12, 4)
    assert [p.passage_id for p in parts] == [f"d1#{i}" for i in range(len(parts))]
    assert all(p.text == doc.text[p.start:p.end] for p in parts)
    assert "".join(p.text for p in parts).replace(" ", "") != ""
    assert parts[-1].end == len(doc.text)
