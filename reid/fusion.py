"""Calibrated fusion of the learned embedding and the keypoint matcher.

Each matcher's raw score (cosine similarity; verified keypoint correspondences)
is mapped to the probability that a pair of pictures shows the same individual,
fitted on labelled pairs, and the calibrated scores are averaged, as WildFusion
does. The keypoint matcher is too slow for a whole large gallery, so it re-ranks
the embedding's shortlist of the best `shortlist` entries; with a shortlist as
large as the gallery it ranks the whole gallery alone.

The fusion (method, shortlist, calibrations) is a small JSON document stored with
the gallery, so decisions are always made on the scale the thresholds were
calibrated on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from reid.errors import ReidError
from reid.keypoints import Features, KeypointConfig, score_pairs

log = logging.getLogger(__name__)

ScoreMethod = Literal["embedding", "keypoints", "fused"]
FusionRule = Literal["mean", "log_odds"]
CalibrationMethod = Literal["logistic", "isotonic", "auto"]
DEFAULT_CALIBRATION: CalibrationMethod = "auto"
MIN_ISOTONIC_PAIRS = 200
"""`auto` fits isotonic only when both kinds of pair number at least this many: on fewer, its steps make
plateaus where dozens of different candidates share one probability; a logistic curve stays smooth."""
"""Isotonic: the keypoint score is step-shaped (no correspondences, then many), which a logistic curve fits badly."""
SCORE_METHODS: tuple[str, ...] = ("embedding", "keypoints", "fused")
_EPS = 1e-6  # isotonic calibrations reach 0 and 1 exactly; log-odds need a finite value


@dataclass(frozen=True)
class Calibration:
    """A non-decreasing map from a raw score to P(same individual), fitted on labelled pairs.

    `logistic` (Platt scaling on the score, or on log(1 + inliers) for counts) is
    strictly increasing, so it never turns different raw scores into ties;
    `isotonic` assumes no shape but flattens the ranking inside each step.
    """

    method: Literal["logistic", "isotonic"]
    log_scale: bool = False
    """Whether the raw score is a count fitted as log(1 + count)."""
    coef: float = 0.0
    intercept: float = 0.0
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()
    n_same: int = 0
    n_different: int = 0

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Return the probabilities of the raw scores (same shape); NaN and -inf scores give 0."""
        raw = np.asarray(scores, dtype=float)
        x = _transform(raw, self.log_scale)
        if self.method == "logistic":
            prob = expit(self.coef * x + self.intercept)
        else:
            prob = np.interp(x, self.knots_x, self.knots_y)
        # No finite sample proves certainty: an isotonic step with no impostor in it would otherwise say
        # P = 1, and one chance match beyond the calibration data would outvote every other piece of evidence.
        floor = 1.0 / (min(self.n_same, self.n_different) + 2)
        return np.where(np.isfinite(raw), np.clip(prob, floor, 1.0 - floor), 0.0)


def fit_calibration(
    scores: np.ndarray, same: np.ndarray, *, method: CalibrationMethod = DEFAULT_CALIBRATION, log_scale: bool = False
) -> Calibration:
    """Return the calibration of raw pair scores against whether each pair is the same individual."""
    scores, same = np.asarray(scores, dtype=float), np.asarray(same, dtype=bool)
    keep = np.isfinite(scores)
    scores, same = scores[keep], same[keep]
    n_same, n_different = int(same.sum()), int((~same).sum())
    if n_same < 2 or n_different < 2:
        raise ReidError(
            f"calibration needs at least 2 same-individual and 2 different-individual pairs, got {n_same} and "
            f"{n_different}; label more individuals with several pictures each"
        )
    x = _transform(scores, log_scale)
    if method == "auto":
        method = "isotonic" if min(n_same, n_different) >= MIN_ISOTONIC_PAIRS else "logistic"
        log.info("score calibration: %s (%d same, %d different pairs)", method, n_same, n_different)
    if method == "logistic":
        # Standardised for the solver, then folded back into one slope and intercept.
        mean, std = float(x.mean()), float(x.std()) or 1.0
        model = LogisticRegression(C=1e4, class_weight="balanced").fit(((x - mean) / std)[:, None], same)
        coef = float(model.coef_[0, 0]) / std
        intercept = float(model.intercept_[0]) - coef * mean
        if coef <= 0:
            # No information: a flat calibration (the balanced prior, 0.5) lets the other matcher decide alone.
            log.warning(
                "the score does not rise with identity on the %d calibration pairs (fitted slope %.3g); it is "
                "calibrated as uninformative. Check the data, or use another score method",
                len(x),
                coef,
            )
            coef, intercept = 0.0, 0.0
        return Calibration(
            "logistic",
            log_scale,
            coef,
            intercept,
            n_same=n_same,
            n_different=n_different,
        )
    if method == "isotonic":
        # Balanced like the logistic fit: a probability for a 50/50 prior, whatever the pair mix.
        weights = np.where(same, 0.5 / n_same, 0.5 / n_different)
        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        model.fit(x, same.astype(float), sample_weight=weights)
        return Calibration(
            "isotonic",
            log_scale,
            knots_x=tuple(float(v) for v in model.X_thresholds_),
            knots_y=tuple(float(v) for v in model.y_thresholds_),
            n_same=n_same,
            n_different=n_different,
        )
    raise ReidError(f"calibration method {method!r} is not one of auto, logistic, isotonic")


@dataclass
class ScoreFusion:
    """How candidate scores are made: embedding alone, keypoints alone, or both calibrated and averaged."""

    method: ScoreMethod = "embedding"
    shortlist: int = 200
    """B: embedding neighbours re-scored by the keypoint matcher, per query. Generous by default: a young
    catalogue's embedding is weak, and a match outside the shortlist cannot be found (200 pairs take about
    0.1 s per query)."""
    rule: FusionRule = "log_odds"
    """How calibrated probabilities are fused: their mean (WildFusion), or the sum of their log-odds (independent
    evidence, naive Bayes), which lets a confident matcher outweigh an uninformative one."""
    embedding: Calibration | None = None
    keypoints: Calibration | None = None

    def __post_init__(self) -> None:
        if self.method not in SCORE_METHODS:
            raise ReidError(f"score method {self.method!r} is not one of {', '.join(SCORE_METHODS)}")
        if self.rule not in ("mean", "log_odds"):
            raise ReidError(f"fusion rule {self.rule!r} is not one of mean, log_odds")
        if self.shortlist < 1:
            raise ReidError(f"shortlist must be at least 1, got {self.shortlist}")

    @property
    def uses_keypoints(self) -> bool:
        """Whether the keypoint matcher takes part."""
        return self.method != "embedding"

    @property
    def calibrated(self) -> bool:
        """Whether every calibration the method needs is fitted."""
        return not (
            (self.method in ("keypoints", "fused") and self.keypoints is None)
            or (self.method == "fused" and self.embedding is None)
        )

    def combine(self, cosine: np.ndarray, inliers: np.ndarray | None) -> np.ndarray:
        """Return the final scores of pairs from their cosine similarities and keypoint inlier counts.

        Embedding alone keeps the cosine; keypoints alone is P(same | inliers),
        or the raw count before calibration; fused is the mean of both probabilities,
        or with rule log_odds the probability whose log-odds are the sum of theirs.
        """
        cosine = np.asarray(cosine, dtype=float)
        if self.method == "embedding":
            return cosine
        if inliers is None:
            raise ReidError(f"score method {self.method} needs keypoint inlier counts")
        inliers = np.where(np.isfinite(cosine), np.asarray(inliers, dtype=float), -np.inf)
        if self.method == "keypoints":
            return self.keypoints(inliers) if self.keypoints is not None else inliers
        if self.embedding is None or self.keypoints is None:
            raise ReidError("fused scores need both calibrations; run calibration (`python infer.py mode=calibrate`)")
        p_embedding, p_keypoints = self.embedding(cosine), self.keypoints(inliers)
        if self.rule == "mean":
            fused = (p_embedding + p_keypoints) / 2
        else:
            # Both calibrations assume a 50/50 prior, so the prior's log-odds (0) need not be subtracted.
            fused = expit(logit(np.clip(p_embedding, _EPS, 1 - _EPS)) + logit(np.clip(p_keypoints, _EPS, 1 - _EPS)))
        return np.where(np.isfinite(cosine), fused, -np.inf)

    def to_json(self) -> str:
        """Return the fusion as JSON (stored with the gallery)."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> ScoreFusion:
        """Read a fusion written by `to_json`."""
        try:
            data = json.loads(text)
            calibrations = {
                name: Calibration(
                    **{**data[name], "knots_x": tuple(data[name]["knots_x"]), "knots_y": tuple(data[name]["knots_y"])}
                )
                if data.get(name)
                else None
                for name in ("embedding", "keypoints")
            }
            return cls(
                method=data["method"],
                shortlist=int(data["shortlist"]),
                rule=data.get("rule", "log_odds"),
                **calibrations,
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ReidError(f"not a score-fusion file ({err}); run calibration again") from err


class FusedScorer:
    """Scores query captures against gallery entries (and each other) the way a `ScoreFusion` says."""

    def __init__(
        self,
        fusion: ScoreFusion,
        query_embeddings: np.ndarray,
        query_features: Sequence[Features] | None = None,
        gallery_features: Sequence[Features] | None = None,
        keypoint_config: KeypointConfig | None = None,
        *,
        progress: bool = False,
    ) -> None:
        if fusion.uses_keypoints and (query_features is None or gallery_features is None or keypoint_config is None):
            raise ReidError(
                f"score method {fusion.method} needs keypoint features of the queries and of the gallery; rebuild the "
                "gallery with keypoints enabled"
            )
        self.fusion = fusion
        self.query_embeddings = np.asarray(query_embeddings, dtype=np.float32)
        self.query_features, self.gallery_features = query_features, gallery_features
        self.keypoint_config = keypoint_config or KeypointConfig()
        self.progress = progress

    @property
    def depth(self) -> int:
        """Return how many embedding neighbours each query needs: the shortlist when keypoints re-rank."""
        return self.fusion.shortlist

    def rescore(self, cosine: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Return final (Q, k) scores of the queries' shortlisted gallery rows (-inf where a row is -1)."""
        cosine = np.where(rows >= 0, cosine, -np.inf)
        if not self.fusion.uses_keypoints:
            return cosine
        assert self.query_features is not None and self.gallery_features is not None
        valid = np.argwhere(rows >= 0)
        pairs = np.stack([valid[:, 0], rows[valid[:, 0], valid[:, 1]]], axis=1)
        inliers = np.full(rows.shape, -np.inf)
        inliers[valid[:, 0], valid[:, 1]] = score_pairs(
            list(self.query_features),
            list(self.gallery_features),
            pairs,
            self.keypoint_config,
            progress=self.progress,
        )
        return self.fusion.combine(cosine, inliers)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Return the (len(a), len(b)) final scores between query captures a and b (indices into the queries)."""
        cosine = np.asarray(self.query_embeddings[a] @ self.query_embeddings[b].T)
        if not self.fusion.uses_keypoints:
            return cosine
        assert self.query_features is not None
        pairs = np.array([(i, j) for i in a for j in b], dtype=np.int64).reshape(-1, 2)
        # The matcher compares two pictures the same way whichever is the query.
        inliers = score_pairs(list(self.query_features), list(self.query_features), pairs, self.keypoint_config)
        return self.fusion.combine(cosine, inliers.reshape(len(a), len(b)))


def _transform(scores: np.ndarray, log_scale: bool) -> np.ndarray:
    finite = np.where(np.isfinite(scores), scores, 0.0)
    return np.log1p(np.clip(finite, 0, None)) if log_scale else finite
