"""Retrieval metrics match values computed by hand; the same-side search never crosses flanks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from reid.errors import ReidError
from reid.metrics import evaluate_retrieval, first_match_ranks, ranked_metrics, retrieval_metrics


def test_retrieval_metrics_match_hand_computed_values() -> None:
    gallery = np.array(["a", "b", "a", "c", "b"])
    queries = np.array(["a", "b", "d"])
    scores = np.array(
        [
            # ranking b, a, c, a, b: a found at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 0.5
            [0.8, 0.9, 0.3, 0.5, 0.1],
            # ranking b, a, a, c, b: b at ranks 1 and 5 -> AP = (1/1 + 2/5) / 2 = 0.7
            [0.7, 0.95, 0.6, 0.2, 0.1],
            # d is not in the gallery: not scorable
            [0.1, 0.2, 0.3, 0.4, 0.5],
        ]
    )
    metrics = retrieval_metrics(scores, queries, gallery, topk=(1, 2))
    assert metrics["top1"] == pytest.approx(0.5)
    assert metrics["top2"] == pytest.approx(1.0)
    assert metrics["mAP"] == pytest.approx((0.5 + 0.7) / 2)
    assert metrics["queries"] == 2 and metrics["skipped"] == 1


def test_ties_are_broken_by_gallery_order() -> None:
    metrics = retrieval_metrics(np.ones((1, 3)), np.array(["x"]), np.array(["y", "x", "x"]), topk=(1,))
    # ranking y, x, x -> AP = (1/2 + 2/3) / 2
    assert metrics["top1"] == 0.0
    assert metrics["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_ranked_metrics_count_matches_beyond_the_searched_depth() -> None:
    # One of two true matches found at rank 1 within the 3 searched: AP = (1/1) / 2.
    metrics = ranked_metrics(np.array([[True, False, False]]), np.array([2]), topk=(1,))
    assert metrics["mAP"] == pytest.approx(0.5)


def test_ranked_metrics_with_no_scorable_query_are_nan() -> None:
    metrics = ranked_metrics(np.zeros((2, 3), bool), np.zeros(2, int))
    assert math.isnan(metrics["top1"]) and math.isnan(metrics["mAP"]) and metrics["skipped"] == 2


def test_ranked_metrics_reject_inconsistent_counts() -> None:
    with pytest.raises(ReidError, match="more ranked matches"):
        ranked_metrics(np.array([[True, True]]), np.array([1]))


def _table(ids: list[str | None], sides: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"individual_id": pd.array(ids, dtype="string"), "side": sides})


def _unit(vectors: list[list[float]]) -> np.ndarray:
    array = np.array(vectors, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_evaluate_retrieval_searches_the_query_side_only() -> None:
    gallery = _table(["A", "B", "A"], ["left", "left", "right"])
    # The right-flank gallery image of A is the closest, but a left query must not see it.
    gallery_emb = _unit([[1, 0.2, 0], [0, 1, 0], [1, 0, 0]])
    queries = _table(["A", "A"], ["left", "right"])
    query_emb = _unit([[1, 0, 0], [0, 1, 0]])
    result = evaluate_retrieval(query_emb, queries, gallery_emb, gallery, topk=(1,), keep=3)
    assert result.top_ids[0].tolist() == [0, 1, -1]  # left gallery rows only
    assert result.top_ids[1].tolist() == [2, -1, -1]  # the right gallery row only
    assert result.metrics["top1"] == 1.0 and result.metrics["mAP"] == 1.0
    assert np.isnan(result.top_scores[0, 2])


def test_evaluate_retrieval_matches_bruteforce_per_side() -> None:
    rng = np.random.default_rng(3)
    gallery = _table([f"I{i % 7}" for i in range(40)], ["left" if i % 3 else "right" for i in range(40)])
    queries = _table([f"I{i % 9}" for i in range(25)], ["left" if i % 2 else "right" for i in range(25)])
    gallery_emb = _unit(rng.normal(size=(40, 16)).tolist())
    query_emb = _unit(rng.normal(size=(25, 16)).tolist())
    result = evaluate_retrieval(query_emb, queries, gallery_emb, gallery)
    per_side = []
    for side in ("left", "right"):
        q, g = (queries["side"] == side).to_numpy(), (gallery["side"] == side).to_numpy()
        m = retrieval_metrics(
            query_emb[q] @ gallery_emb[g].T,
            queries["individual_id"][q].to_numpy(),
            gallery["individual_id"][g].to_numpy(),
        )
        per_side.append(m)
    scorable = sum(m["queries"] for m in per_side)
    expected_map = sum(m["mAP"] * m["queries"] for m in per_side) / scorable
    assert result.metrics["queries"] == scorable
    assert result.metrics["mAP"] == pytest.approx(expected_map, abs=1e-6)


def test_unknown_sides_search_both_and_unlabelled_rows_never_match() -> None:
    gallery = _table(["A", None, "A"], ["right", "left", "unknown"])
    gallery_emb = _unit([[1, 0], [1, 0.01], [0, 1]])
    queries = _table(["A", None], ["unknown", "left"])
    query_emb = _unit([[1, 0], [1, 0]])
    result = evaluate_retrieval(query_emb, queries, gallery_emb, gallery, topk=(1,), keep=3)
    assert sorted(result.top_ids[0].tolist()) == [0, 1, 2]  # unknown side: the whole gallery
    assert sorted(result.top_ids[1][result.top_ids[1] >= 0].tolist()) == [1, 2]  # left and unknown rows
    assert result.metrics["queries"] == 1 and result.metrics["skipped"] == 1
    # A's ranking: A, unlabelled, A -> AP = (1/1 + 2/3) / 2
    assert result.metrics["top1"] == 1.0 and result.metrics["mAP"] == pytest.approx((1 + 2 / 3) / 2)


def test_left_out_pairs_are_neither_ranked_nor_relevant() -> None:
    # Query 0 (A) would find its own encounter's picture (column 0) first; it is left out.
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.2, 0.9, 0.3, 0.4]])
    allowed = np.array([[False, True, True, True], [True, True, True, False]])
    query, gallery = np.array(["A", "B"]), np.array(["A", "C", "A", "B"])
    metrics = retrieval_metrics(scores, query, gallery, topk=(1, 2), allowed=allowed)
    # Query 0: C, A, A(left out) -> first match at rank 2, AP = 1/2. Query 1: its only B is left out -> skipped.
    assert metrics["top1"] == 0.0 and metrics["top2"] == 1.0
    assert metrics["mAP"] == pytest.approx(0.5)
    assert metrics["queries"] == 1 and metrics["skipped"] == 1
    assert first_match_ranks(scores, query, gallery, allowed=allowed).tolist() == [2, 0]
