"""Retrieval metrics: top-k accuracy (CMC) and mean average precision.

The metric functions are pure functions over numpy arrays, in the style of
torchreid's `evaluate_rank`. `evaluate_retrieval` is the one place that turns
embeddings and catalogue rows into those numbers: it searches each query in the
gallery of its own side only (a left flank is never matched to a right flank),
so training validation and inference report the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reid.catalogue import SEARCHED_SIDES, SIDES
from reid.errors import ReidError
from reid.index import EmbeddingIndex

DEFAULT_TOPK = (1, 5)


def ranked_metrics(
    matches: np.ndarray, num_relevant: np.ndarray, topk: Sequence[int] = DEFAULT_TOPK
) -> dict[str, float]:
    """Return {"top<k>": CMC at k, "mAP": mean AP, "queries": count, "skipped": count} from ranked match flags.

    `matches` is (Q, K) bool: row q flags which of query q's ranked gallery items
    (best first) are true matches. `num_relevant` is (Q,): how many true matches
    query q has in its whole gallery, so AP is exact even when K is less than the
    gallery size (matches beyond K count as found at infinite rank). Queries with
    no true match cannot be scored: they are left out and counted as `skipped`.
    Metrics over no scorable query are NaN.
    """
    matches = np.asarray(matches, dtype=bool)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    if matches.ndim != 2 or num_relevant.shape != (matches.shape[0],):
        raise ReidError(f"matches must be (Q, K) and num_relevant (Q,), got {matches.shape} and {num_relevant.shape}")
    if (matches.sum(axis=1) > num_relevant).any():
        raise ReidError("a query has more ranked matches than num_relevant says it has")
    scorable = num_relevant > 0
    found, relevant = matches[scorable], num_relevant[scorable]
    out: dict[str, float] = {}
    for k in topk:
        out[f"top{k}"] = float(found[:, :k].any(axis=1).mean()) if len(found) else float("nan")
    hits = np.cumsum(found, axis=1)
    ranks = np.arange(1, found.shape[1] + 1)
    precision_at_hits = np.where(found, hits / ranks, 0.0)
    average_precision = precision_at_hits.sum(axis=1) / np.maximum(relevant, 1)
    out["mAP"] = float(average_precision.mean()) if len(found) else float("nan")
    out["queries"] = float(scorable.sum())
    out["skipped"] = float((~scorable).sum())
    return out


def retrieval_metrics(
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    topk: Sequence[int] = DEFAULT_TOPK,
    *,
    allowed: np.ndarray | None = None,
) -> dict[str, float]:
    """Return top-k accuracy and mAP from a (Q, G) similarity matrix (higher is more similar).

    `allowed`, (Q, G) bool, leaves pairs out of the ranking altogether (the query
    itself, pictures of the same encounter, the other flank). Ties are broken by
    gallery order, so the result is deterministic.
    """
    order, relevant = _ranking(scores, query_labels, gallery_labels, allowed)
    return ranked_metrics(np.take_along_axis(relevant, order, axis=1), relevant.sum(axis=1), topk)


def first_match_ranks(
    scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, *, allowed: np.ndarray | None = None
) -> np.ndarray:
    """Return (Q,) the 1-based rank of each query's first true match (0: no true match to find); a CMC curve's data."""
    order, relevant = _ranking(scores, query_labels, gallery_labels, allowed)
    matches = np.take_along_axis(relevant, order, axis=1)
    return np.where(matches.any(axis=1), matches.argmax(axis=1) + 1, 0)


def _ranking(
    scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float)
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    if scores.shape != (len(query_labels), len(gallery_labels)):
        raise ReidError(f"scores must be (Q, G) = ({len(query_labels)}, {len(gallery_labels)}), got {scores.shape}")
    relevant = gallery_labels[None, :] == query_labels[:, None]
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != scores.shape:
            raise ReidError(f"allowed must have the scores' shape {scores.shape}, got {allowed.shape}")
        # Left-out pairs sink below every real score and are never relevant.
        scores = np.where(allowed, scores, -np.inf)
        relevant &= allowed
    order = np.argsort(-scores, axis=1, kind="stable")
    return order, relevant


@dataclass(frozen=True)
class RetrievalResult:
    """Metrics of a same-side search, with each query's best gallery matches."""

    metrics: dict[str, float]
    top_ids: np.ndarray
    """(Q, k) gallery row positions of each query's best matches, best first; -1 where there are fewer."""
    top_scores: np.ndarray
    """(Q, k) cosine similarities of those matches; NaN where there are fewer."""


def evaluate_retrieval(
    query_embeddings: np.ndarray,
    query_table: pd.DataFrame,
    gallery_embeddings: np.ndarray,
    gallery_table: pd.DataFrame,
    *,
    topk: Sequence[int] = DEFAULT_TOPK,
    keep: int = 5,
) -> RetrievalResult:
    """Return metrics of searching each query among the gallery rows of its own side, and its `keep` best matches.

    Embeddings are (Q, D) and (G, D), L2-normalised, aligned with the rows of the
    tables (columns `individual_id` and `side`). A left query is searched among
    left gallery rows, a right one among right rows; gallery rows of unknown side
    are searched from both, and a query of unknown side searches the whole gallery,
    because an unknown flank could be either. A match is the same `individual_id`.
    """
    query_embeddings = np.asarray(query_embeddings, dtype=np.float32)
    gallery_embeddings = np.asarray(gallery_embeddings, dtype=np.float32)
    if len(query_embeddings) != len(query_table) or len(gallery_embeddings) != len(gallery_table):
        raise ReidError(
            f"embeddings and tables differ in length: queries {len(query_embeddings)} vs {len(query_table)} rows, "
            f"gallery {len(gallery_embeddings)} vs {len(gallery_table)} rows"
        )
    # Unlabelled rows get placeholders that match nothing, so they are never counted as matches.
    query_ids = query_table["individual_id"].astype("string").fillna("\0query").to_numpy(dtype=object)
    gallery_ids = gallery_table["individual_id"].astype("string").fillna("\0gallery").to_numpy(dtype=object)
    query_sides = query_table["side"].astype(str).to_numpy()
    gallery_sides = gallery_table["side"].astype(str).to_numpy()
    depth = max(max(topk), keep, 1)

    width = len(gallery_table)
    matches = np.zeros((len(query_table), width), dtype=bool)
    num_relevant = np.zeros(len(query_table), dtype=np.int64)
    top_ids = np.full((len(query_table), depth), -1, dtype=np.int64)
    top_scores = np.full((len(query_table), depth), np.nan, dtype=np.float32)
    for side in np.unique(query_sides):
        queries = np.flatnonzero(query_sides == side)
        allowed = np.flatnonzero(np.isin(gallery_sides, SEARCHED_SIDES.get(side, SIDES)))
        if len(allowed) == 0:
            continue
        index = EmbeddingIndex(gallery_embeddings.shape[1])
        index.add(gallery_embeddings[allowed])
        # Every allowed row is ranked, so average precision is exact.
        scores, found = index.search(query_embeddings[queries], len(allowed))
        ranked = allowed[found]
        labels = query_ids[queries]
        matches[queries, : len(allowed)] = gallery_ids[ranked] == labels[:, None]
        num_relevant[queries] = (gallery_ids[allowed][None, :] == labels[:, None]).sum(axis=1)
        shown = min(depth, len(allowed))
        top_ids[queries, :shown] = ranked[:, :shown]
        top_scores[queries, :shown] = scores[:, :shown]
    metrics = ranked_metrics(matches, num_relevant, topk)
    return RetrievalResult(metrics=metrics, top_ids=top_ids[:, :keep], top_scores=top_scores[:, :keep])
