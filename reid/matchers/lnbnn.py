"""HotSpotter's LNBNN vote (Crall et al. 2013): a whole-gallery ranker over the local features of every picture.

Each query descriptor finds its K + 1 nearest gallery descriptors (one FAISS index per
side, through reid.index; approximate ones hold 8-bit codes) and votes for the
individual of each of the first K with weight d(K+1) - d(i): a descriptor whose
neighbours are all about as near (a patch of background or a coat texture many
animals share) gives little, a distinctive one gives much. Each query descriptor
votes at most once per individual (its nearest neighbour of that individual).
Distances are Euclidean between L2-normalised descriptors (0 to 2), or their squares
(0 to 4, `distance="squared"`, what an L2 FAISS index returns).

Pictures cut from camera frames know where each descriptor sat in the frame: a
neighbour that is the fixed camera's scene (at the same frame place, or moved with
the rest of the scene by a re-mounted camera: `reid.keypoints.scene_matches`) is
ignored, as the pair matcher ignores it; LNBNN's discount of shared features only
covers features that many individuals share, and a station's scene is shared by the
few animals that passed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from reid.errors import ReidError
from reid.index import EmbeddingIndex, IndexKind
from reid.keypoints import scene_matches
from reid.matchers.base import LocalFeatures

__all__ = ["LnbnnRanker", "lnbnn_votes"]

UNKNOWN_SIDE = "unknown"
_SCENE_SAMPLE = 3
"""Neighbours of one gallery picture that moved together by a small shift count as its scene beyond this many
(the affine RANSAC sample, as the pair matcher counts)."""


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
    frame: np.ndarray | None = None
    """(T, 2) float32 frame position of each indexed descriptor (NaN where unknown), None when none is known."""


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
        frame_xy: Sequence[np.ndarray | None] | None = None,
        static: float = 0.0,
        camera_shift: float = 0.0,
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
        if frame_xy is not None and len(frame_xy) != len(features):
            raise ReidError(f"LNBNN needs one frame_xy (or None) per gallery picture: {len(features)} features")
        self.k = int(k)
        self.distance = distance
        self.static, self.camera_shift = float(static), float(camera_shift)
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
            frame = None
            if frame_xy is not None and self.static > 0 and any(frame_xy[i] is not None for i in pictures.tolist()):
                frame = np.concatenate(
                    [
                        np.full((self.n_descriptors[i], 2), np.nan, np.float32)
                        if frame_xy[i] is None
                        else np.asarray(frame_xy[i], np.float32).reshape(-1, 2)
                        for i in pictures.tolist()
                        if len(features[i])
                    ]
                )
            # 8-bit codes where approximate: a vote is a difference of distances, not moved by their last bits.
            index = EmbeddingIndex.build(descriptors, kind=index_kind, eight_bit=True)
            self._groups[side] = _SideIndex(index, owner, frame)

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
        frame_xy: np.ndarray | None = None,
    ) -> np.ndarray:
        """Return (I,) float64 LNBNN scores, one per individual of `self.individuals` (0 where none voted).

        A query of side left or right is compared with gallery pictures of its side and
        of unknown side; an unknown side with every side, each individual keeping its best
        side's score. `exclude` lists gallery pictures to leave out (the query's own
        encounter, when the query is itself in the gallery). Exact exclusion looks past
        every excluded descriptor; `lookahead` caps that at so many extra neighbours (a
        benchmark's leave-one-out is then far cheaper; a query descriptor that still
        finds fewer than K + 1 usable neighbours casts no vote). `frame_xy`, the query's
        keypoints' frame positions, lets the camera's scene be ignored (module docstring).
        """
        return self._scores(query, side, exclude, lookahead, self.picture_label, len(self.individuals), frame_xy)

    def picture_scores(
        self,
        query: LocalFeatures,
        side: str = UNKNOWN_SIDE,
        *,
        exclude: Sequence[int] | np.ndarray = (),
        lookahead: int | None = None,
        frame_xy: np.ndarray | None = None,
        relative: bool = False,
    ) -> np.ndarray:
        """Return (G,) float64 LNBNN scores, one per gallery picture: each picture votes as if it were an individual.

        `relative` divides them by the mean score of the pictures searched (not excluded,
        of the sides compared): chance votes then no longer grow as the gallery shrinks
        (the query's K votes per feature fall on fewer pictures), while a picture that
        truly matches stands out the more, the more pictures it beats.
        """
        pictures = np.arange(len(self), dtype=np.int64)
        scores = self._scores(query, side, exclude, lookahead, pictures, len(self), frame_xy)
        if relative:
            searched = np.isin(self.sides, self._compared_sides(side))
            searched[np.asarray(exclude, dtype=np.int64)] = False
            mean = float(scores[searched].mean()) if searched.any() else 0.0
            scores = scores / mean if mean > 0 else scores
        return scores

    def _compared_sides(self, side: str) -> list[str]:
        """Return the indexed sides a query of `side` is compared with (its own and unknown; unknown: every side)."""
        if side in (UNKNOWN_SIDE, "", None):
            return list(self._groups)
        return [g for g in (side, UNKNOWN_SIDE) if g in self._groups]

    def _scores(
        self,
        query: LocalFeatures,
        side: str,
        exclude: Sequence[int] | np.ndarray,
        lookahead: int | None,
        label_of_picture: np.ndarray,
        n_labels: int,
        frame_xy: np.ndarray | None = None,
    ) -> np.ndarray:
        if len(query) and query.dim != self.dim and self.dim:
            raise ReidError(
                f"LNBNN gallery has {self.dim}-wide descriptors, the query {query.dim}-wide; extract both with one matcher"
            )
        excluded = np.zeros(len(self), bool)
        excluded[np.asarray(exclude, dtype=np.int64)] = True
        groups = self._compared_sides(side)
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
            scene_filter = group.frame is not None and frame_xy is not None
            # Neighbours dropped as scene: look a little further for the normaliser.
            similarity, ids = group.index.search(descriptors, self.k + 1 + hidden + (self.k if scene_filter else 0))
            distances = np.maximum(2.0 - 2.0 * similarity.astype(np.float64), 0.0)
            if self.distance == "euclidean":
                distances = np.sqrt(distances)
            pictures = group.picture[np.maximum(ids, 0)]
            usable = (ids >= 0) & ~excluded[pictures]
            if scene_filter:
                assert group.frame is not None and frame_xy is not None
                usable &= ~self._scene(np.asarray(frame_xy, np.float32).reshape(-1, 2), group.frame, ids, pictures)
            labels = np.where(usable, label_of_picture[pictures], -1)
            best = np.maximum(best, lnbnn_votes(distances, labels, n_labels, self.k))
        return best

    def _scene(self, query_xy: np.ndarray, frame: np.ndarray, ids: np.ndarray, pictures: np.ndarray) -> np.ndarray:
        """Return (Q, K') which neighbours are a fixed camera's scene (`reid.keypoints.scene_matches`, per picture)."""
        displacement = query_xy[:, None, :] - frame[np.maximum(ids, 0)]
        known = (ids >= 0) & np.isfinite(displacement).all(axis=2)
        scene = np.zeros(ids.shape, bool)
        rows, cols = np.nonzero(known)
        if not len(rows):
            return scene
        hit_pictures = pictures[rows, cols]
        order = np.argsort(hit_pictures, kind="stable")
        starts = np.flatnonzero(np.r_[True, hit_pictures[order][1:] != hit_pictures[order][:-1]])
        for hits in np.split(order, starts[1:]):
            found = scene_matches(displacement[rows[hits], cols[hits]], self.static, self.camera_shift, _SCENE_SAMPLE)
            scene[rows[hits[found]], cols[hits[found]]] = True
        return scene
