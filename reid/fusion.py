"""Calibrated fusion of the learned embedding, the local-feature matcher and the LNBNN vote.

Each score (cosine similarity; the configured matcher's verified correspondences or
confident matches; HotSpotter's LNBNN vote over the whole gallery's local features)
is mapped to the probability that a pair of pictures shows the same individual,
fitted on labelled pairs, and any set of them is fused: by the sum of their
log-odds (independent evidence), by their mean, as WildFusion does, or by a
weighted sum of their log-odds fitted on the same pairs ("stacked"), which does
not count twice the evidence of two scores made from the same features. The pair matcher
is too slow for a whole large gallery, so it re-ranks a shortlist of the best
`shortlist` entries, ranked by the embedding, by LNBNN, or the union of both
(`ranker`); with a shortlist as large as the gallery it ranks the whole gallery.

The fusion (method, shortlist, calibrations) is a small JSON document stored with
the gallery, so decisions are always made on the scale the thresholds were
calibrated on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from reid.errors import ReidError
from reid.index import IndexKind
from reid.keypoints import Features, KeypointConfig
from reid.matchers import LnbnnRanker, local_features, score_pairs

log = logging.getLogger(__name__)

ScoreMethod = str
"""embedding | keypoints | lnbnn | fused (= embedding+keypoints) | any set of scores joined by +, e.g.
embedding+keypoints+lnbnn."""
Ranker = Literal["embedding", "lnbnn", "union"]
RANKERS: tuple[str, ...] = get_args(Ranker)
SCORES: tuple[str, ...] = ("embedding", "keypoints", "lnbnn")
FusionRule = Literal["mean", "log_odds", "stacked"]
LnbnnVote = Literal["relative", "raw"]
CalibrationMethod = Literal["logistic", "isotonic", "auto"]
DEFAULT_CALIBRATION: CalibrationMethod = "auto"
MIN_ISOTONIC_PAIRS = 200
"""`auto` fits isotonic only when both kinds of pair number at least this many: on fewer, its steps make
plateaus where dozens of different candidates share one probability; a logistic curve stays smooth."""
"""Isotonic: the keypoint score is step-shaped (no correspondences, then many), which a logistic curve fits badly."""
SCORE_METHODS: tuple[str, ...] = ("embedding", "keypoints", "lnbnn", "fused")
_LNBNN_LOOKAHEAD = 64
"""A query that is itself in the gallery (calibration) looks this many neighbours past its own encounter's."""
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
    """How candidate scores are made: which scores (embedding, keypoints, lnbnn), calibrated and fused, on which shortlist."""

    method: ScoreMethod = "embedding"
    """One score (embedding, keypoints, lnbnn), fused (embedding+keypoints), or any set joined by +."""
    shortlist: int = 200
    """B: gallery entries re-scored by the keypoint matcher, per query. Generous by default: a young
    catalogue's embedding is weak, and a match outside the shortlist cannot be found (200 pairs take about
    0.1 s per query)."""
    rule: FusionRule = "log_odds"
    """How calibrated probabilities are fused: their mean (WildFusion); the sum of their log-odds (independent
    evidence, naive Bayes), which lets a confident matcher outweigh an uninformative one; or stacked: a weighted
    sum of their log-odds, the weights fitted on labelled pairs (a logistic regression, no weight below 0), so
    that two scores of the same features (keypoints and LNBNN) are not counted as two independent witnesses."""
    ranker: Ranker = "embedding"
    """Where the shortlist comes from: the embedding's nearest entries, the entries LNBNN votes for most over the
    whole gallery, or the union of both (up to 2B entries)."""
    lnbnn_index: IndexKind = "flat"
    """How LNBNN searches the gallery's descriptors: flat (exact; about 1 s per query against 300 pictures of
    512 features on 2 cores) or ivf / hnsw (approximate, with 8-bit codes: several times faster, built once per
    run)."""
    lnbnn_vote: LnbnnVote = "relative"
    """What LNBNN's score is: a picture's vote over the mean vote of the pictures searched (relative), or the raw
    vote (leopard-reid 0.3, and fusions stored without this field). A raw vote grows as the gallery shrinks (each
    query feature's K votes fall on fewer pictures: a gallery 40 % the size gave impostors half as much again), so
    a calibration fitted on one catalogue over-trusted impostors in a smaller one; relative to the mean, chance
    votes stay where they were, and a true match's score falls as the gallery shrinks (fewer IDs, more encounters
    called new, never more merges)."""
    embedding: Calibration | None = None
    keypoints: Calibration | None = None
    lnbnn: Calibration | None = None
    weights: tuple[float, ...] = ()
    """Rule stacked: the weight of each part's log-odds, in the order of `parts` (fitted by `fit_fusion`)."""
    bias: float = 0.0
    """Rule stacked: added to the weighted log-odds."""

    def __post_init__(self) -> None:
        parts = self.method.split("+") if isinstance(self.method, str) else []
        if self.method != "fused" and (
            not parts or any(p not in SCORES for p in parts) or len(set(parts)) != len(parts)
        ):
            raise ReidError(
                f"score method {self.method!r} is not one of {', '.join(SCORE_METHODS)} or a set of "
                f"{', '.join(SCORES)} joined by + (e.g. embedding+keypoints+lnbnn)"
            )
        if self.rule not in get_args(FusionRule):
            raise ReidError(f"fusion rule {self.rule!r} is not one of {', '.join(get_args(FusionRule))}")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.ranker not in RANKERS:
            raise ReidError(f"scoring.ranker={self.ranker!r} is not one of {', '.join(RANKERS)}")
        if self.shortlist < 1:
            raise ReidError(f"shortlist must be at least 1, got {self.shortlist}")
        if self.lnbnn_index not in get_args(IndexKind):
            raise ReidError(f"scoring.lnbnn_index={self.lnbnn_index!r} is not one of {', '.join(get_args(IndexKind))}")
        if self.lnbnn_vote not in get_args(LnbnnVote):
            raise ReidError(f"scoring.lnbnn_vote={self.lnbnn_vote!r} is not one of {', '.join(get_args(LnbnnVote))}")

    def uncalibrated(self) -> ScoreFusion:
        """Return these settings without the calibrations (and stacked weights) fitted to them."""
        return dataclasses.replace(self, embedding=None, keypoints=None, lnbnn=None, weights=(), bias=0.0)

    @property
    def parts(self) -> tuple[str, ...]:
        """Return the scores that are fused, in the order of SCORES."""
        named = ("embedding", "keypoints") if self.method == "fused" else tuple(self.method.split("+"))
        return tuple(p for p in SCORES if p in named)

    @property
    def uses_keypoints(self) -> bool:
        """Whether the gallery's local features take part (the pair matcher, or LNBNN as a score or a ranker)."""
        return "keypoints" in self.parts or self.uses_lnbnn

    @property
    def uses_pair_matcher(self) -> bool:
        """Whether the local-feature matcher re-scores the shortlisted pairs."""
        return "keypoints" in self.parts

    @property
    def uses_lnbnn(self) -> bool:
        """Whether LNBNN votes over the whole gallery (as a score or as the ranker)."""
        return "lnbnn" in self.parts or self.ranker != "embedding"

    @property
    def reranks(self) -> bool:
        """Whether a shortlist of B entries is re-scored (anything beyond the embedding's own ranking)."""
        return self.parts != ("embedding",) or self.ranker != "embedding"

    @property
    def calibrated(self) -> bool:
        """Whether every calibration the method needs is fitted."""
        parts = self.parts
        if parts == ("embedding",):
            return True
        stacked = self.rule != "stacked" or len(parts) == 1 or len(self.weights) == len(parts)
        return stacked and all(getattr(self, p) is not None for p in parts)

    def combine(
        self,
        cosine: np.ndarray,
        inliers: np.ndarray | None = None,
        lnbnn: np.ndarray | None = None,
        *,
        absent_is_neutral: bool = False,
    ) -> np.ndarray:
        """Return the final scores of pairs from their cosine similarities, keypoint scores and LNBNN votes.

        Embedding alone keeps the cosine; one other score alone is its calibrated
        P(same), or the raw score before calibration; several are fused: the mean of
        their probabilities, or with rule log_odds the probability whose log-odds are
        their sum. `absent_is_neutral` lets a score that could not be computed for these
        pairs (None) add no evidence instead of failing.
        """
        cosine = np.asarray(cosine, dtype=float)
        parts = self.parts
        if parts == ("embedding",):
            return cosine
        raw: dict[str, np.ndarray | None] = {"embedding": cosine, "keypoints": inliers, "lnbnn": lnbnn}
        for name in ("keypoints", "lnbnn"):
            value = raw[name]
            if value is not None:
                raw[name] = np.where(np.isfinite(cosine), np.asarray(value, dtype=float), -np.inf)
            elif name in parts and not absent_is_neutral:
                what = "keypoint scores" if name == "keypoints" else "LNBNN votes"
                raise ReidError(f"score method {self.method} needs {what}")
        if len(parts) == 1:
            value, calibration = raw[parts[0]], getattr(self, parts[0])
            assert value is not None
            return calibration(value) if calibration is not None else value
        missing = [p for p in parts if getattr(self, p) is None]
        if missing:
            raise ReidError(
                f"score method {self.method} needs calibrations of {', '.join(missing)}; run calibration "
                "(`python infer.py mode=calibrate`)"
            )
        if self.rule == "stacked" and len(self.weights) != len(parts):
            raise ReidError(
                f"fusion rule stacked needs its weights fitted for {', '.join(parts)}; run calibration "
                "(`python infer.py mode=calibrate`)"
            )
        probabilities, weights = [], []
        for k, name in enumerate(parts):
            value = raw[name]
            if value is None:
                continue
            calibration = getattr(self, name)
            probabilities.append(np.clip(calibration(value), _EPS, 1 - _EPS))
            weights.append(self.weights[k] if self.rule == "stacked" else 1.0)
        if self.rule == "mean":
            fused = np.mean(probabilities, axis=0)
        else:
            # Every calibration assumes a 50/50 prior, so the prior's log-odds (0) need not be subtracted.
            bias = self.bias if self.rule == "stacked" else 0.0
            fused = expit(bias + np.sum([w * logit(p) for w, p in zip(weights, probabilities, strict=True)], axis=0))
        return np.where(np.isfinite(cosine), fused, -np.inf)

    def to_json(self) -> str:
        """Return the fusion as JSON (stored with the gallery)."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> ScoreFusion:
        """Read a fusion written by `to_json` (also those written before LNBNN took part)."""
        try:
            data = json.loads(text)
            calibrations = {
                name: Calibration(
                    **{**data[name], "knots_x": tuple(data[name]["knots_x"]), "knots_y": tuple(data[name]["knots_y"])}
                )
                if data.get(name)
                else None
                for name in SCORES
            }
            return cls(
                method=data["method"],
                shortlist=int(data["shortlist"]),
                rule=data.get("rule", "log_odds"),
                ranker=data.get("ranker", "embedding"),
                lnbnn_index=data.get("lnbnn_index", "flat"),
                # Calibrated before votes were relative: keep the votes its LNBNN calibration was fitted on.
                lnbnn_vote=data.get("lnbnn_vote", "raw"),
                weights=tuple(data.get("weights", ())),
                bias=float(data.get("bias", 0.0)),
                **calibrations,
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ReidError(f"not a score-fusion file ({err}); run calibration again") from err


def fit_fusion(
    fusion: ScoreFusion,
    cosine: np.ndarray,
    inliers: np.ndarray | None,
    lnbnn: np.ndarray | None,
    same: np.ndarray,
    *,
    method: CalibrationMethod = DEFAULT_CALIBRATION,
) -> ScoreFusion:
    """Return `fusion` with every calibration its parts need fitted on labelled pairs (and, rule stacked, the weights).

    The pairs are 1-D: their cosine similarities, raw matcher scores and LNBNN votes
    (None where the part takes no part), and whether each is the same individual.
    The embedding keeps its cosine when it is the only part.
    """
    fitted = fusion.uncalibrated()
    parts = fitted.parts
    if parts == ("embedding",):
        return fitted
    same = np.asarray(same, dtype=bool)
    for part, raw, log_scale in (("keypoints", inliers, True), ("lnbnn", lnbnn, True), ("embedding", cosine, False)):
        if part in parts:
            if raw is None:
                raise ReidError(f"score method {fusion.method} needs {part} scores to be calibrated")
            setattr(fitted, part, fit_calibration(raw, same, method=method, log_scale=log_scale))
    if fitted.rule != "stacked" or len(parts) == 1:
        return fitted
    raw_scores = {"embedding": cosine, "keypoints": inliers, "lnbnn": lnbnn}
    columns = []
    for part in parts:
        probability = getattr(fitted, part)(np.asarray(raw_scores[part], dtype=float))
        columns.append(logit(np.clip(probability, _EPS, 1 - _EPS)))
    x = np.column_stack(columns)
    keep = np.isfinite(np.asarray(cosine, dtype=float))
    x, y = x[keep], same[keep]
    active = list(range(len(parts)))
    weights = np.zeros(len(parts))
    bias = 0.0
    while active:
        # Balanced, as each calibration is: a probability for a 50/50 prior, whatever the pair mix.
        model = LogisticRegression(C=1e4, class_weight="balanced").fit(x[:, active], y)
        coef = model.coef_[0]
        if (coef >= 0).all():
            weights[active], bias = coef, float(model.intercept_[0])
            break
        # A score may not lower the probability as it rises: drop the most negative and fit again.
        active.pop(int(np.argmin(coef)))
    log.info("stacked fusion: weights %s", dict(zip(parts, np.round(weights, 3).tolist(), strict=True)))
    return dataclasses.replace(fitted, weights=tuple(float(w) for w in weights), bias=bias)


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
        query_sides: Sequence[str] | np.ndarray | None = None,
        lnbnn: LnbnnRanker | None = None,
        lnbnn_exclude: Sequence[np.ndarray] | None = None,
        precomputed_votes: np.ndarray | None = None,
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
        self.query_sides = (
            np.asarray(query_sides, dtype=object)
            if query_sides is not None
            else np.full(len(query_embeddings), "unknown")
        )
        if fusion.uses_lnbnn and lnbnn is None:
            raise ReidError(
                f"score method {fusion.method} with ranker {fusion.ranker} needs the gallery's LNBNN ranker"
            )
        self.lnbnn = lnbnn
        self.lnbnn_exclude = lnbnn_exclude
        self._votes = None if precomputed_votes is None else np.asarray(precomputed_votes, dtype=np.float32)
        self.progress = progress

    @property
    def depth(self) -> int:
        """Return how many entries each query's shortlist holds when it is re-scored."""
        return self.fusion.shortlist

    def lnbnn_votes(self) -> np.ndarray:
        """Return the (Q, G) LNBNN votes of every query for every gallery entry (computed once)."""
        if self._votes is None:
            if self.lnbnn is None or self.query_features is None:
                raise ReidError(f"score method {self.fusion.method} needs LNBNN over the gallery's keypoint features")
            votes = np.zeros((len(self.query_features), len(self.lnbnn)), dtype=np.float32)
            for q, features in enumerate(self.query_features):
                exclude = self.lnbnn_exclude[q] if self.lnbnn_exclude is not None else ()
                votes[q] = self.lnbnn.picture_scores(
                    local_features(features),
                    str(self.query_sides[q]),
                    exclude=exclude,
                    lookahead=_LNBNN_LOOKAHEAD if len(exclude) else None,
                    frame_xy=features.frame_xy,
                    relative=self.fusion.lnbnn_vote == "relative",
                )
            self._votes = votes
        return self._votes

    def raw_scores(self, rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Return the raw (Q, k) keypoint scores and LNBNN votes of the queries' gallery rows (None where unused)."""
        valid = np.argwhere(rows >= 0)
        inliers = votes = None
        if self.fusion.uses_pair_matcher:
            assert self.query_features is not None and self.gallery_features is not None
            pairs = np.stack([valid[:, 0], rows[valid[:, 0], valid[:, 1]]], axis=1)
            inliers = np.full(rows.shape, -np.inf)
            inliers[valid[:, 0], valid[:, 1]] = score_pairs(
                self.query_features, self.gallery_features, pairs, self.keypoint_config, progress=self.progress
            )
        if "lnbnn" in self.fusion.parts:
            votes = np.take_along_axis(self.lnbnn_votes(), np.clip(rows, 0, None), axis=1).astype(np.float64)
            votes = np.where(rows >= 0, votes, -np.inf)
        return inliers, votes

    def rescore(self, cosine: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Return final (Q, k) scores of the queries' shortlisted gallery rows (-inf where a row is -1)."""
        cosine = np.where(rows >= 0, cosine, -np.inf)
        if self.fusion.parts == ("embedding",):
            return cosine
        inliers, votes = self.raw_scores(rows)
        return self.fusion.combine(cosine, inliers, votes)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Return the (len(a), len(b)) final scores between query captures a and b (indices into the queries).

        LNBNN votes over the gallery, not between two queries: between queries it adds no evidence.
        """
        cosine = np.asarray(self.query_embeddings[a] @ self.query_embeddings[b].T)
        if self.fusion.parts == ("embedding",):
            return cosine
        inliers = None
        if self.fusion.uses_pair_matcher:
            assert self.query_features is not None
            pairs = np.array([(i, j) for i in a for j in b], dtype=np.int64).reshape(-1, 2)
            # The matcher compares two pictures the same way whichever is the query.
            scored = score_pairs(self.query_features, self.query_features, pairs, self.keypoint_config)
            inliers = scored.reshape(len(a), len(b))
        if self.fusion.parts == ("lnbnn",):
            return cosine
        return self.fusion.combine(cosine, inliers, None, absent_is_neutral=True)


def lnbnn_ranker(
    features: Sequence[Features],
    sides: Sequence[str] | np.ndarray | None,
    *,
    k: int = 4,
    index_kind: IndexKind = "flat",
    config: KeypointConfig | None = None,
) -> LnbnnRanker:
    """Return the LNBNN ranker over a gallery's stored features, every entry its own label, searched by side.

    `index_kind` hnsw or ivf searches the descriptors approximately: far faster on large galleries. With the
    keypoint `config` the features were made with, a fixed camera's scene does not vote (its `static_background`
    and `camera_shift`, as the pair matcher)."""
    return LnbnnRanker(
        [local_features(f) for f in features],
        [str(i) for i in range(len(features))],
        None if sides is None else [str(s) for s in sides],
        k=k,
        index_kind=index_kind,
        frame_xy=[f.frame_xy for f in features] if config is not None else None,
        static=config.static_background if config is not None else 0.0,
        camera_shift=config.camera_shift if config is not None else 0.0,
    )


def _transform(scores: np.ndarray, log_scale: bool) -> np.ndarray:
    finite = np.where(np.isfinite(scores), scores, 0.0)
    return np.log1p(np.clip(finite, 0, None)) if log_scale else finite
