"""HotSpotter's LNBNN vote (Crall et al. 2013): a whole-gallery ranker over the local features of every picture.

Each query descriptor finds its K + 1 nearest gallery descriptors (one FAISS index per
side, through reid.index) and votes for the individual of each of the first K with
weight d(K+1) - d(i): a descriptor whose neighbours are all about as near (a patch of
background or a coat texture many animals share) gives little, a distinctive one gives
much. Each query descriptor votes at most once per individual (its nearest neighbour of
that individual). Distances are Euclidean between L2-normalised descriptors (0 to 2),
or their squares (0 to 4, `distance="squared"`, what an L2 FAISS index returns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from reid.errors import ReidError
from reid.index import EmbeddingIndex, IndexKind
from reid.matchers.base import LocalFeatures

__all__ = ["LnbnnRanker", "lnbnn_votes"]

UNKNOWN_SIDE = "unknown"


def lnbnn_votes(distances: np.ndarray, labels: np.ndarray, n_labels: int, k: int) -> np.ndarray:
    """Return (n_labels,) float64 summed votes from each row's K + 1 nearest neighbours.

    `distances` (Q, >= K + 1) ascending per row and `labels` (Q, >= K + 1) int (the
    label of each neighbour; -1 marks a neighbour to ignore). Rows with fewer than K + 1
    usable neighbours have no normaliser and give no vote.
    """
    distances, labels = np.asarray(distances, np.float64), np.asarray(labels, np.int64)
    usable = labels >= 0
    rank = np.cumsum(usable, axis=1)
    # Keep each row's first K + 1 usable neighbours, in order.
    kept = usable & (rank <= k + 1)
    complete = kept.sum(axis=1) == k + 1
    kept &= complete[:, None]
    rows = np.flatnonzero(complete)
    if not len(rows):
        return np.zeros(n_labels, np.float64)
    d = distances[kept].reshape(len(rows), k + 1)
    lab = labels[kept].reshape(len(rows), k + 1)
    weights = d[:, k : k + 1] - d[:, :k]
    lab = lab[:, :k]
    # One vote per label per query descriptor: its nearest neighbour of that label (largest weight).
    row_of = np.repeat(np.arange(len(rows)), k)
    flat_lab, flat_w = lab.ravel(), weights.ravel()
    order = np.lexsort((-flat_w, flat_lab, row_of))
    row_of, flat_lab, flat_w = row_of[order], flat_lab[order], flat_w[order]
    first = np.ones(len(order), bool)
    first[1:] = (row_of[1:] != row_of[:-1]) | (flat_lab[1:] != flat_lab[:-1])
    votes = np.zeros(n_labels, np.float64)
    np.add.at(votes, flat_lab[first], np.maximum(flat_w[first], 0.0))
    return votes


@dataclass
class _SideIndex:
    index: EmbeddingIndex
    picture: np.ndarray
    """(T,) int64 gallery picture of each indexed descriptor."""


class LnbnnRanker:
    """Per-individual LNBNN scores of a query against a whole gallery, one FAISS index per side.

    Build it once from the gallery's local features (any one matcher's), their
    individual ids and sides; then `individual_scores` ranks every individual of the
    query's side, and `picture_scores` scores every gallery picture the same way.
    """

    def __init__(
        self,
        features: Sequence[LocalFeatures],
        individual_ids: Sequence[str],
        sides: Sequence[str] | None = None,
        *,
        k: int = 4,
        index_kind: IndexKind = "flat",
        distance: Literal["euclidean", "squared"] = "euclidean",
    ) -> None:
        if len(individual_ids) != len(features) or (sides is not None and len(sides) != len(features)):
            raise ReidError(
                f"LNBNN needs one individual id and side per gallery picture: {len(features)} features, "
                f"{len(individual_ids)} ids, {len(sides) if sides is not None else 'no'} sides"
            )
        if distance not in ("euclidean", "squared"):
            raise ReidError(f"LNBNN distance {distance!r} is not one of euclidean, squared")
        if int(k) < 1:
            raise ReidError(f"LNBNN k must be at least 1 (HotSpotter uses 4), got {k}")
        dims = {f.dim for f in features}
        if len(dims) > 1:
            raise ReidError(f"LNBNN needs features of one matcher, got descriptor widths {sorted(dims)}")
        self.k = int(k)
        self.distance = distance
        self.dim = dims.pop() if dims else 0
        self.individuals, self.picture_label = np.unique(
            np.asarray(individual_ids, dtype=object).astype(str), return_inverse=True
        )
        self.picture_label = self.picture_label.astype(np.int64)
        given_sides = sides if sides is not None else [UNKNOWN_SIDE] * len(features)
        self.sides = np.asarray(given_sides, dtype=object).astype(str)
        self.n_descriptors = np.array([len(f) for f in features], dtype=np.int64)
        self._groups: dict[str, _SideIndex] = {}
        for side in sorted(set(self.sides)):
            pictures = np.flatnonzero(self.sides == side)
            parts = [features[i].descriptors for i in pictures.tolist() if len(features[i])]
            if not parts:
                continue
            descriptors = np.concatenate(parts)
            descriptors /= np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
            owner = np.repeat(pictures, self.n_descriptors[pictures])
            self._groups[side] = _SideIndex(EmbeddingIndex.build(descriptors, kind=index_kind), owner)

    def __len__(self) -> int:
        """Return the number of gallery pictures."""
        return len(self.sides)

    def individual_scores(
        self,
        query: LocalFeatures,
        side: str = UNKNOWN_SIDE,
        *,
        exclude: Sequence[int] | np.ndarray = (),
        lookahead: int | None = None,
    ) -> np.ndarray:
        """Return (I,) float64 LNBNN scores, one per individual of `self.individuals` (0 where none voted).

        A query of side left or right is compared with gallery pictures of its side and
        of unknown side; an unknown side with every side, each individual keeping its best
        side's score. `exclude` lists gallery pictures to leave out (the query's own
        encounter, when the query is itself in the gallery). Exact exclusion looks past
        every excluded descriptor; `lookahead` caps that at so many extra neighbours (a
        benchmark's leave-one-out is then far cheaper; a query descriptor that still
        finds fewer than K + 1 usable neighbours casts no vote).
        """
        return self._scores(query, side, exclude, lookahead, self.picture_label, len(self.individuals))

    def picture_scores(
        self,
        query: LocalFeatures,
        side: str = UNKNOWN_SIDE,
        *,
        exclude: Sequence[int] | np.ndarray = (),
        lookahead: int | None = None,
    ) -> np.ndarray:
        """Return (G,) float64 LNBNN scores, one per gallery picture: each picture votes as if it were an individual."""
        return self._scores(query, side, exclude, lookahead, np.arange(len(self), dtype=np.int64), len(self))

    def _scores(
        self,
        query: LocalFeatures,
        side: str,
        exclude: Sequence[int] | np.ndarray,
        lookahead: int | None,
        label_of_picture: np.ndarray,
        n_labels: int,
    ) -> np.ndarray:
        if len(query) and query.dim != self.dim and self.dim:
            raise ReidError(
                f"LNBNN gallery has {self.dim}-wide descriptors, the query {query.dim}-wide; extract both with one matcher"
            )
        excluded = np.zeros(len(self), bool)
        excluded[np.asarray(exclude, dtype=np.int64)] = True
        if side in (UNKNOWN_SIDE, "", None):
            groups = list(self._groups)
        else:
            groups = [g for g in (side, UNKNOWN_SIDE) if g in self._groups]
        best = np.zeros(n_labels, np.float64)
        if not len(query):
            return best
        descriptors = query.descriptors / np.maximum(np.linalg.norm(query.descriptors, axis=1, keepdims=True), 1e-12)
        for name in groups:
            group = self._groups[name]
            # Excluded pictures' descriptors may crowd out the others: look that much further.
            hidden = int(self.n_descriptors[excluded & (self.sides == name)].sum())
            if lookahead is not None:
                hidden = min(hidden, max(0, int(lookahead)))
            similarity, ids = group.index.search(descriptors, self.k + 1 + hidden)
            distances = np.maximum(2.0 - 2.0 * similarity.astype(np.float64), 0.0)
            if self.distance == "euclidean":
                distances = np.sqrt(distances)
            pictures = group.picture[np.maximum(ids, 0)]
            labels = np.where((ids >= 0) & ~excluded[pictures], label_of_picture[pictures], -1)
            best = np.maximum(best, lnbnn_votes(distances, labels, n_labels, self.k))
        return best
