"""Every fusion strategy on hand-made rankings, scores worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from services.ranker.fusion import (
    MODES,
    WEIGHT_GRID,
    fuse,
    minmax,
    rrf,
    tune_weight,
    zscore,
)
from shared.schemas import Hit


def scored(*pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(doc_id=d, title=d.upper(), text=f"text {d}", score=s) for d, s in pairs]


def ranked(*ids: str) -> list[Hit]:
    return scored(*((d, 10.0 - i) for i, d in enumerate(ids)))


def ids(hits: list[Hit]) -> list[str]:
    return [h.doc_id for h in hits]


# dense cosines and sparse BM25 scores for four documents; c only dense, d only sparse.
DENSE = scored(("a", 0.9), ("b", 0.7), ("c", 0.5))
SPARSE = scored(("b", 12.0), ("d", 6.0), ("a", 3.0))


# --- rrf ----------------------------------------------------------------------------------
def test_rrf_scores_by_hand():
    fused = rrf([ranked("a", "b", "c"), ranked("b", "d")], k=60)
    expected = {"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 63, "d": 1 / 62}
    assert ids(fused) == ["b", "a", "d", "c"]
    for h in fused:
        assert h.score == pytest.approx(expected[h.doc_id])


def test_rrf_ties_break_by_doc_id_and_keeps_first_payload():
    fused = rrf([ranked("z", "y"), ranked("y", "z")], k=1)
    assert ids(fused) == ["y", "z"]  # 1/2 + 1/3 each: equal scores, ascending id
    assert fused[0].title == "Y" and fused[0].text == "text y"


def test_rrf_empty_and_single():
    assert rrf([[], []]) == []
    assert ids(rrf([ranked("a", "b")])) == ["a", "b"]


def test_rrf_rejects_bad_k():
    with pytest.raises(ValueError, match="k has to be a positive integer, but is 0"):
        rrf([ranked("a")], k=0)


def test_fuse_rrf_is_rrf_of_both_lists_with_k():
    fused = fuse("rrf", DENSE, SPARSE, k=1)
    # ranks: a 1 (dense), 3 (sparse); b 2, 1; c 3, -; d -, 2
    expected = {"a": 1 / 2 + 1 / 4, "b": 1 / 3 + 1 / 2, "c": 1 / 4, "d": 1 / 3}
    assert ids(fused) == ["b", "a", "d", "c"]
    assert {h.doc_id: h.score for h in fused} == pytest.approx(expected)


# --- normalisation ------------------------------------------------------------------------
def test_minmax_by_hand():
    assert minmax([0.9, 0.7, 0.5]) == pytest.approx([1.0, 0.5, 0.0])
    assert minmax([12.0, 6.0, 3.0]) == pytest.approx([1.0, 1 / 3, 0.0])


def test_zscore_by_hand():
    # mean 7, population variance (25 + 1 + 16) / 3 = 14
    assert zscore([12.0, 6.0, 3.0]) == pytest.approx(
        [5 / math.sqrt(14), -1 / math.sqrt(14), -4 / math.sqrt(14)])


@pytest.mark.parametrize("normalise, value", [(minmax, 1.0), (zscore, 0.0)])
def test_all_equal_lists_normalise_to_one_value(normalise, value):
    assert normalise([]) == []
    assert normalise([0.3]) == [value]
    assert normalise([2.0, 2.0]) == [value, value]
    # the float mean of three 0.1s is not 0.1: the std must not come out as 1e-17
    assert normalise([0.1, 0.1, 0.1]) == [value] * 3


# --- weighted fusion ----------------------------------------------------------------------
def test_weighted_minmax_by_hand_with_missing_documents():
    # dense norm a 1, b .5, c 0; sparse norm b 1, d 1/3, a 0. Missing: c in sparse, d in dense
    # take that list's minimum, 0.
    fused = fuse("weighted_minmax", DENSE, SPARSE, weight=0.5)
    expected = {"a": 0.5, "b": 0.25 + 0.5, "c": 0.0, "d": 0.5 / 3}
    assert ids(fused) == ["b", "a", "d", "c"]
    assert {h.doc_id: h.score for h in fused} == pytest.approx(expected)

    fused = fuse("weighted_minmax", DENSE, SPARSE, weight=0.8)
    expected = {"a": 0.8, "b": 0.4 + 0.2, "c": 0.0, "d": 0.2 / 3}
    assert ids(fused) == ["a", "b", "d", "c"]
    assert {h.doc_id: h.score for h in fused} == pytest.approx(expected)


def test_weighted_zscore_by_hand_with_missing_documents():
    # dense: mean .7, std sqrt(.08 / 3) -> a +sqrt(1.5), b 0, c -sqrt(1.5)
    # sparse: mean 7, std sqrt(14) -> b 5/sqrt(14), d -1/sqrt(14), a -4/sqrt(14)
    # c missing from sparse gets -4/sqrt(14); d missing from dense gets -sqrt(1.5).
    d_min, s_min = -math.sqrt(1.5), -4 / math.sqrt(14)
    fused = fuse("weighted_zscore", DENSE, SPARSE, weight=0.5)
    expected = {
        "a": 0.5 * math.sqrt(1.5) + 0.5 * s_min,
        "b": 0.5 * 0.0 + 0.5 * 5 / math.sqrt(14),
        "c": 0.5 * d_min + 0.5 * s_min,
        "d": 0.5 * d_min + 0.5 * -1 / math.sqrt(14),
    }
    assert ids(fused) == ["b", "a", "d", "c"]
    assert {h.doc_id: h.score for h in fused} == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["weighted_minmax", "weighted_zscore"])
def test_weight_one_is_dense_order_and_zero_is_sparse_order(mode):
    assert ids(fuse(mode, DENSE, SPARSE, weight=1.0))[:3] == ["a", "b", "c"]
    assert ids(fuse(mode, DENSE, SPARSE, weight=0.0))[:3] == ["b", "d", "a"]


@pytest.mark.parametrize("mode", ["weighted_minmax", "weighted_zscore"])
def test_weighted_ties_break_by_doc_id(mode):
    # z first in dense, y first in sparse: mirror images, equal fused scores at weight .5
    dense = scored(("z", 0.9), ("y", 0.5))
    sparse = scored(("y", 10.0), ("z", 2.0))
    fused = fuse(mode, dense, sparse, weight=0.5)
    assert ids(fused) == ["y", "z"]
    assert fused[0].score == pytest.approx(fused[1].score)


@pytest.mark.parametrize("mode, hit, missing", [("weighted_minmax", 1.0, 0.0),
                                                ("weighted_zscore", 0.0, -1.0)])
def test_weighted_single_element_lists(mode, hit, missing):
    # a one-hit list is presence only: its hit gets `hit`, a document it lacks one unit less
    fused = fuse(mode, scored(("b", 0.3)), scored(("a", 5.0)), weight=0.5)
    assert ids(fused) == ["a", "b"]
    assert [h.score for h in fused] == pytest.approx([0.5 * hit + 0.5 * missing] * 2)


def test_weighted_minmax_counts_a_lone_sparse_hit_above_a_miss():
    # dense norm a 1, b .5, c 0; sparse [c] alone: c 1, a and b (missing) 0
    dense = scored(("a", 0.9), ("b", 0.8), ("c", 0.7))
    fused = fuse("weighted_minmax", dense, scored(("c", 12.0)), weight=0.5)
    assert {h.doc_id: h.score for h in fused} == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.5})
    assert ids(fused) == ["a", "c", "b"]  # a and c tie: ascending id


@pytest.mark.parametrize("mode", ["weighted_minmax", "weighted_zscore"])
def test_weighted_missing_documents_rank_below_a_presence_only_lists_hits(mode):
    # the sparse list's hits tie (a, b) and sparse misses c; dense ties all three
    dense = scored(("a", 0.5), ("b", 0.5), ("c", 0.5))
    sparse = scored(("a", 7.0), ("b", 7.0))
    fused = {h.doc_id: h.score for h in fuse(mode, dense, sparse, weight=0.5)}
    assert fused["a"] == fused["b"] > fused["c"]


def test_weighted_minmax_a_weaker_second_hit_does_not_raise_the_first():
    dense = scored(("a", 0.9), ("b", 0.8), ("c", 0.7))
    one = {h.doc_id: h.score for h in fuse("weighted_minmax", dense, scored(("c", 12.0)))}
    two = {h.doc_id: h.score
           for h in fuse("weighted_minmax", dense, scored(("c", 12.0), ("b", 3.0)))}
    assert two["c"] == pytest.approx(one["c"])
    assert two["a"] == pytest.approx(one["a"])  # a stays missing from sparse: 0 there


def test_weighted_with_one_empty_list_follows_the_other():
    fused = fuse("weighted_minmax", DENSE, [], weight=0.5)
    assert ids(fused) == ["a", "b", "c"]
    assert [h.score for h in fused] == pytest.approx([0.5, 0.25, 0.0])
    assert ids(fuse("weighted_zscore", [], SPARSE, weight=0.5)) == ["b", "d", "a"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_on_empty_lists(mode):
    assert fuse(mode, [], []) == []


def test_weighted_keeps_the_dense_payload_and_leaves_inputs_alone():
    dense = [Hit(doc_id="a", title="dense title", text="dense text", score=0.9)]
    sparse = [Hit(doc_id="a", title="sparse title", text="sparse text", score=4.0)]
    fused = fuse("weighted_minmax", dense, sparse)
    assert (fused[0].title, fused[0].text) == ("dense title", "dense text")
    assert dense[0].score == 0.9 and sparse[0].score == 4.0


# --- single retrievers --------------------------------------------------------------------
def test_dense_and_sparse_modes_pass_one_list_through():
    assert ids(fuse("dense", DENSE, SPARSE)) == ["a", "b", "c"]
    assert [h.score for h in fuse("sparse", DENSE, SPARSE)] == [12.0, 6.0, 3.0]
    # put in the output contract even if the input was not: ties by ascending doc_id
    assert ids(fuse("dense", scored(("b", 1.0), ("a", 1.0), ("c", 2.0)), [])) == ["c", "a", "b"]


# --- validation ---------------------------------------------------------------------------
def test_unknown_mode_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        fuse("linear", DENSE, SPARSE)
    message = str(info.value)
    assert "'linear'" in message
    assert all(mode in message for mode in MODES)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_bad_weight_is_named(weight):
    with pytest.raises(ValueError, match=r"`weight` has to be a number in \[0, 1\], but is"):
        fuse("weighted_minmax", DENSE, SPARSE, weight=weight)
    with pytest.raises(ValueError, match=f"but is {weight}"):
        fuse("rrf", DENSE, SPARSE, weight=weight)  # checked whatever the mode


@pytest.mark.parametrize("k", [0, -3])
def test_bad_k_is_named(k):
    with pytest.raises(ValueError, match=f"`k` has to be a positive integer, but is {k}"):
        fuse("rrf", DENSE, SPARSE, k=k)


# --- tuning -------------------------------------------------------------------------------
def test_tune_weight_picks_the_best():
    assert tune_weight(lambda w: -(w - 0.3) ** 2) == 0.3
    assert tune_weight(lambda w: w) == 1.0


def test_tune_weight_ties_go_to_the_weight_nearest_one_half():
    assert tune_weight(lambda w: 1.0) == 0.5
    assert tune_weight(lambda w: 1.0 if w in (0.2, 0.7) else 0.0) == 0.7
    assert tune_weight(lambda w: 1.0, grid=(0.75, 0.25)) == 0.25  # equally near: smaller


def test_tune_weight_ties_go_to_the_preferred_weight_when_one_is_given():
    assert tune_weight(lambda w: 1.0, prefer=0.9) == 0.9
    assert tune_weight(lambda w: 1.0 if w in (0.2, 0.7) else 0.0, prefer=0.1) == 0.2
    assert tune_weight(lambda w: w, prefer=0.0) == 1.0  # a better score still wins
    with pytest.raises(ValueError):
        tune_weight(lambda w: 1.0, prefer=1.5)


def test_tune_weight_tries_every_grid_weight_once():
    tried = []
    tune_weight(lambda w: tried.append(w) or 0.0)
    assert tried == list(WEIGHT_GRID)
    assert WEIGHT_GRID[0] == 0.0 and WEIGHT_GRID[-1] == 1.0


def test_tune_weight_rejects_bad_grids():
    with pytest.raises(ValueError, match="at least one weight"):
        tune_weight(lambda w: 0.0, grid=())
    with pytest.raises(ValueError, match="but is 2"):
        tune_weight(lambda w: 0.0, grid=(0.5, 2))
