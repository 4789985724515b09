"""Calibrate a gallery's scores and decision thresholds on labelled data (`infer.py mode=calibrate`).

Every labelled picture (the gallery's own entries, or another labelled catalogue)
is searched once against all the others but its own encounter. Its shortlisted
pairs fit each matcher's map from raw score to P(same individual) (the maps stored
with the gallery); its encounter is then decided twice, as an enrolled animal seen
again and as a new animal (its individual left out), with scores from maps fitted
on the other half of the individuals, and the thresholds meet the error targets on
those decisions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from reid.catalogue import SEARCHED_SIDES
from reid.decisions import Thresholds, as_independent, calibrate, decide, lowest_safe_score
from reid.errors import Problem, ReidError
from reid.files import write_csv
from reid.fusion import (
    DEFAULT_CALIBRATION,
    CalibrationMethod,
    FusedScorer,
    ScoreFusion,
    fit_fusion,
    lnbnn_ranker,
)
from reid.gallery import Gallery, gallery_lock
from reid.importers import Source, load_source
from reid.keypoints import Features, KeypointConfig
from reid.matchers import extract_rows
from reid.models import Embedder, embed_images, model_fingerprint
from reid.workflows.common import Outcome
from reid.workflows.match import UNCALIBRATED, shortlist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSettings:
    """How scores and thresholds are calibrated (`calibration:` in conf/infer.yaml)."""

    method: CalibrationMethod = DEFAULT_CALIBRATION
    """auto | isotonic | logistic: how a raw score becomes P(same individual) (auto: isotonic on many pairs)."""
    max_wrong_id: float = 0.05
    """Of the IDs the software gives (known decisions), the share that may be wrong."""
    max_false_merge: float = 0.05
    """Of new animals, the share that may be given a known ID."""
    max_false_new: float = 0.05
    """Of known animals, the share that may be called new."""
    k: int = 50
    """Gallery entries retrieved per query before scores are pooled per individual (embedding scoring)."""
    seed: int = 0
    min_individuals: int = 5
    """Labelled individuals seen in two or more encounters needed to calibrate at all."""

    def __post_init__(self) -> None:
        for name in ("max_wrong_id", "max_false_merge", "max_false_new"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ReidError(f"calibration.{name}={value!r}: give a share from 0 to below 1, e.g. 0.05")
        for name, least in (("k", 1), ("min_individuals", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ReidError(f"calibration.{name}={value!r}: give a whole number of at least {least}")


def calibrate_thresholds(
    labelled: pd.DataFrame,
    embeddings: np.ndarray,
    *,
    features: list[Features] | None = None,
    keypoint_config: KeypointConfig | None = None,
    fusion: ScoreFusion | None = None,
    settings: CalibrationSettings | None = None,
    progress: bool = False,
) -> tuple[Thresholds, pd.DataFrame, ScoreFusion]:
    """Return thresholds chosen on labelled rows, the per-encounter scores used, and the fitted score fusion.

    With keypoint `features` (aligned with the rows) and a `fusion` that uses
    them, each matcher's score is calibrated first (module docstring).
    """
    settings = settings or CalibrationSettings()
    fusion = ScoreFusion() if fusion is None else fusion.uncalibrated()
    keep = labelled["individual_id"].notna().to_numpy()
    labelled, embeddings = labelled[keep].reset_index(drop=True), embeddings[keep]
    if features is not None:
        features = [f for f, kept in zip(features, keep, strict=True) if kept]
    _check_enough_labels(labelled, settings.min_individuals)
    if fusion.uses_keypoints and (features is None or keypoint_config is None):
        raise ReidError(
            f"score method {fusion.method} needs keypoint features: build the gallery with keypoints enabled"
        )
    candidates = _candidates(labelled, embeddings, features, keypoint_config, fusion, settings, progress)
    fusion = _fitted(fusion, candidates, np.ones(len(labelled), dtype=bool), settings)
    scores, unseen, similarity = _cross_fitted_scores(labelled, candidates, fusion, settings)
    per_encounter = _cross_fitted_decisions(labelled, candidates, scores, unseen)
    known = (per_encounter["role"] == "known").to_numpy()
    top = per_encounter["top_score"].fillna(-np.inf).to_numpy()
    margin = per_encounter["margin"].to_numpy()
    thresholds = calibrate(
        top[known],
        per_encounter["top_correct"].to_numpy()[known],
        top[~known],
        known_margin=margin[known],
        unseen_margin=margin[~known],
        known_individuals=per_encounter["individual_id"].to_numpy(dtype=object)[known],
        unseen_individuals=per_encounter["individual_id"].to_numpy(dtype=object)[~known],
        max_wrong_id=settings.max_wrong_id,
        max_false_merge=settings.max_false_merge,
        max_false_new=settings.max_false_new,
        # Calibrated scores are probabilities: no ID below 1 - max_wrong_id on its own (cosine is no probability).
        lowest_known=1.0 - settings.max_wrong_id if fusion.parts != ("embedding",) else -np.inf,
    )
    thresholds = replace(thresholds, group=_grouping_threshold(labelled, candidates, similarity, settings))
    for note in thresholds.notes:
        log.warning("calibration: %s", note)
    return thresholds, per_encounter, fusion


def calibrate_gallery(
    gallery: Gallery,
    gallery_dir: str | Path,
    *,
    labelled: pd.DataFrame | None = None,
    embedder: Embedder | None = None,
    fusion: ScoreFusion | None = None,
    settings: CalibrationSettings | None = None,
    keypoints: KeypointConfig | None = None,
    progress: bool = True,
) -> tuple[Thresholds, pd.DataFrame, list[Problem]]:
    """Calibrate the scores and thresholds on the gallery's own entries (or on `labelled` data); save them with it.

    `fusion` says which scores decide (embedding, keypoints or fused, and the
    shortlist); its calibrations are fitted here. Returns the thresholds, the
    per-encounter scores they were chosen on, and problems. `keypoints` (the run's
    settings) must name the matcher the gallery's features were made with.
    """
    problems: list[Problem] = []
    fusion = fusion or ScoreFusion()
    stored = gallery.require_keypoints(fusion, keypoints)
    features = list(stored.features) if stored is not None else None
    keypoint_config = stored.config if stored is not None else None
    if labelled is None:
        rows, embeddings = gallery.entries, gallery.embeddings
    else:
        if embedder is None:
            raise ReidError("calibrating on other labelled data needs the embedder")
        result = embed_images(embedder, labelled, progress=progress)
        problems += result.problems
        rows, embeddings = labelled[result.ok].reset_index(drop=True), result.embeddings
        if keypoint_config is not None:
            features, more = extract_rows(rows, keypoint_config, progress=progress)
            problems += more
    thresholds, scores, fitted = calibrate_thresholds(
        rows,
        embeddings,
        features=features,
        keypoint_config=keypoint_config,
        fusion=fusion,
        settings=settings,
        progress=progress,
    )
    gallery.thresholds = thresholds
    gallery.fusion = fitted
    gallery.save(gallery_dir)
    return thresholds, scores, problems


def run_calibrate(
    embedder: Embedder,
    gallery_dir: str | Path,
    out_dir: str | Path,
    *,
    labelled: Source | None = None,
    fusion: ScoreFusion | None = None,
    settings: CalibrationSettings | None = None,
    keypoints: KeypointConfig | None = None,
    progress: bool = True,
) -> Outcome:
    """`infer.py mode=calibrate`: calibrate on the gallery's entries (or a labelled source); write calibration.csv."""
    table, problems = load_source(labelled) if labelled is not None else (None, [])
    with gallery_lock(gallery_dir):
        gallery = Gallery.load(gallery_dir, embedder_fingerprint=model_fingerprint(embedder))
        thresholds, scores, more = calibrate_gallery(
            gallery,
            gallery_dir,
            labelled=table,
            embedder=embedder,
            fusion=fusion,
            settings=settings,
            keypoints=keypoints,
            progress=progress,
        )
    rates = {name.replace("_", " "): _stated(r) for name, r in thresholds.rates().items()}
    return Outcome(
        {"gallery": Path(gallery_dir), "scores": write_csv(scores, Path(out_dir) / "calibration.csv")},
        problems + more,
        {"thresholds": {"known": thresholds.known, "new": thresholds.new, "margin": thresholds.margin, **rates}},
    )


def _stated(rate: dict[str, float | int]) -> str:
    if not rate["decisions"]:
        return "no calibration decisions"
    return (
        f"{rate['rate']:.1%} ({rate['errors']}/{rate['decisions']}{as_independent(rate)}, "
        f"95% upper bound {rate['upper_bound']:.1%})"
    )


def _in_memory_gallery(labelled: pd.DataFrame, embeddings: np.ndarray, rows: np.ndarray) -> Gallery:
    gallery = Gallery.empty("calibration", embeddings.shape[1])
    # Annotation IDs serve as content keys: no file is hashed.
    gallery.add(labelled[rows], embeddings[rows], list(labelled.loc[rows, "annotation_id"]))
    return gallery


def _check_enough_labels(labelled: pd.DataFrame, min_individuals: int) -> None:
    """Refuse to calibrate on too few individuals seen twice: its error rates would promise nothing."""
    encounters = labelled["encounter_id"].fillna("row:" + labelled["annotation_id"])
    seen_twice = int((encounters.groupby(labelled["individual_id"]).nunique() >= 2).sum())
    if seen_twice < min_individuals:
        raise ReidError(
            f"calibration needs at least {min_individuals} labelled individuals seen in two or more encounters; "
            f"these data have {seen_twice}. Match without calibration (every capture goes to review), or calibrate "
            "on a larger labelled catalogue, e.g. a partner's: `python infer.py mode=calibrate calibrate_on=data "
            "data=labels_csv data.source.path=partner/labels.csv`"
        )


def _grouping_threshold(
    labelled: pd.DataFrame, candidates: _Candidates, similarity: np.ndarray, settings: CalibrationSettings
) -> float:
    """Return the score from which two new encounters become one provisional individual.

    Pairs of labelled encounters (each picture with its shortlisted pictures of other
    encounters; the pair's score is its best picture pair) are joined from the top
    down; the threshold is the lowest at which the joined pairs of different animals
    stay within `max_wrong_id` (median-unbiased, as the known threshold is judged).
    New encounters are grouped on the mean of their pictures' best matches, never above
    the best picture pair, so a threshold chosen on best pairs groups no more readily.
    Lower than the known threshold as a rule: two new encounters are compared with
    each other, not with the best of a whole gallery, so the known threshold would
    split one new animal into several. inf (nothing grouped) when no threshold holds.
    """
    encounters = labelled["encounter_id"].fillna("row:" + labelled["annotation_id"]).to_numpy(dtype=object)
    query, slot = np.nonzero(candidates.rows >= 0)
    mine, theirs = encounters[query].astype(str), encounters[candidates.rows[query, slot]].astype(str)
    pairs = pd.DataFrame(
        {
            "a": np.where(mine < theirs, mine, theirs),
            "b": np.where(mine < theirs, theirs, mine),
            "score": similarity[query, slot],
            "same": candidates.same[query, slot],
        }
    )
    pairs = pairs[np.isfinite(pairs["score"]) & (pairs["a"] != pairs["b"])]
    best = pairs.groupby(["a", "b"]).agg(score=("score", "max"), same=("same", "max"))
    threshold = lowest_safe_score(best["score"].to_numpy(), ~best["same"].to_numpy(dtype=bool), settings.max_wrong_id)
    return float("inf") if threshold is None else threshold


def _has_other_picture(queries: pd.DataFrame) -> np.ndarray:
    """Return, per row, whether its individual has a picture of a searched side in another encounter."""
    sides = queries["side"].fillna("unknown").to_numpy(dtype=object)
    encounters = queries["encounter_id"].to_numpy(dtype=object)
    found = np.zeros(len(queries), dtype=bool)
    for group in queries.groupby("individual_id").indices.values():
        for i in group:
            found[i] = any(encounters[j] != encounters[i] and sides[j] in SEARCHED_SIDES[sides[i]] for j in group)
    return found


@dataclass
class _Candidates:
    """Every labelled picture's same-side shortlist, its own encounter left out, with raw scores."""

    rows: np.ndarray
    """(N, K) gallery rows (the labelled rows themselves), -1 where there is none."""
    cosine: np.ndarray
    """(N, K) embedding similarities."""
    inliers: np.ndarray | None
    """(N, K) raw keypoint-matcher scores, None when the matcher takes no part."""
    lnbnn: np.ndarray | None
    """(N, K) raw LNBNN votes, None when LNBNN is no score."""
    same: np.ndarray
    """(N, K) whether the candidate is the picture's own individual."""
    lnbnn_unseen: np.ndarray | None = None
    """(N, K) LNBNN votes with the picture's whole individual out of the vote, as a new animal's would be: its
    own pictures, left in, would take the nearest neighbours that impostors get when it is not enrolled."""


def _candidates(
    labelled: pd.DataFrame,
    embeddings: np.ndarray,
    features: list[Features] | None,
    keypoint_config: KeypointConfig | None,
    fusion: ScoreFusion,
    settings: CalibrationSettings,
    progress: bool,
) -> _Candidates:
    """Search every labelled picture against all the others but its own encounter; keep the raw scores."""
    gallery = _in_memory_gallery(labelled, embeddings, np.ones(len(labelled), dtype=bool))
    encounters = labelled["encounter_id"].fillna("row:" + labelled["annotation_id"]).to_numpy(dtype=object)
    sides = labelled["side"].fillna("unknown").to_numpy(dtype=object)
    depth = fusion.shortlist if fusion.reranks else settings.k
    individuals = labelled["individual_id"].to_numpy(dtype=object)
    lnbnn = (
        lnbnn_ranker(features, sides, index_kind=fusion.lnbnn_index, config=keypoint_config)
        if fusion.uses_lnbnn and features is not None
        else None
    )

    def scorer_leaving_out(groups: np.ndarray) -> FusedScorer:
        """Return the scorer whose LNBNN leaves out each picture's whole group (its encounter, or its individual)."""
        if not fusion.uses_keypoints:
            return FusedScorer(fusion.uncalibrated(), embeddings, query_sides=sides)
        assert features is not None and keypoint_config is not None
        members = pd.Series(np.arange(len(labelled))).groupby(groups).indices
        return FusedScorer(
            fusion.uncalibrated(),
            embeddings,
            features,
            features,
            keypoint_config,
            query_sides=sides,
            lnbnn=lnbnn,
            lnbnn_exclude=[np.asarray(members[g]) for g in groups] if lnbnn is not None else None,
            progress=progress,
        )

    scorer = scorer_leaving_out(encounters)
    cosine, rows = shortlist(
        gallery, embeddings, sides, scorer, depth, lambda found: encounters[found] == encounters[:, None]
    )
    inliers, votes = scorer.raw_scores(rows)  # uncalibrated
    same = (rows >= 0) & (individuals[np.clip(rows, 0, None)] == individuals[:, None])
    unseen_votes = None
    if votes is not None:
        as_new = scorer_leaving_out(individuals).lnbnn_votes()
        found = np.take_along_axis(as_new, np.clip(rows, 0, None), axis=1).astype(np.float64)
        unseen_votes = np.where(rows >= 0, found, -np.inf)
    return _Candidates(rows, cosine, inliers, votes, same, unseen_votes)


def _fitted(
    fusion: ScoreFusion, candidates: _Candidates, queries: np.ndarray, settings: CalibrationSettings
) -> ScoreFusion:
    """Return `fusion` with its matchers' calibrations fitted on the shortlisted pairs of the `queries` rows.

    An impostor's LNBNN vote is the one it gets when the query's individual is not
    enrolled (`_Candidates.lnbnn_unseen`): its own pictures, when in, take the nearest
    neighbours and leave impostors less than a new animal's impostors collect, so a
    vote calibrated on them alone makes merges of new animals look certain.
    """
    valid = (candidates.rows >= 0) & queries[:, None]
    votes = candidates.lnbnn
    if votes is not None and candidates.lnbnn_unseen is not None:
        votes = np.where(candidates.same, votes, candidates.lnbnn_unseen)
    return fit_fusion(
        fusion,
        candidates.cosine[valid],
        None if candidates.inliers is None else candidates.inliers[valid],
        None if votes is None else votes[valid],
        candidates.same[valid],
        method=settings.method,
    )


def _cross_fitted_scores(
    labelled: pd.DataFrame, candidates: _Candidates, fusion: ScoreFusion, settings: CalibrationSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the (N, K) final scores of every picture's candidates, as an enrolled animal's and as a new animal's
    (LNBNN voting without its individual), and their similarity as new captures compare.

    Cross-fitted: a picture's candidates are scored with matcher calibrations fitted
    on the other half of the individuals, so the thresholds are not chosen on scores
    calibrated on the same pairs (in-sample, isotonic steps separate them too well
    and promise fewer wrong IDs than come). The similarity is what `FusedScorer.similarity`
    gives two queries: LNBNN, a vote over the gallery, takes no part.
    """
    individuals = labelled["individual_id"].to_numpy(dtype=object)
    scores, similarity = candidates.cosine.copy(), candidates.cosine.copy()
    unseen = scores.copy()
    if fusion.parts != ("embedding",):
        names = np.array(sorted(set(individuals)), dtype=object)
        half = np.random.default_rng(settings.seed).permutation(len(names)) % 2
        fold = dict(zip(names, half, strict=True))
        in_fold = np.array([fold[i] for i in individuals])
        for k in (0, 1):
            fitted = _fitted(fusion, candidates, in_fold != k, settings)
            rows = in_fold == k
            inliers = None if candidates.inliers is None else candidates.inliers[rows]
            votes = None if candidates.lnbnn is None else candidates.lnbnn[rows]
            scores[rows] = fitted.combine(candidates.cosine[rows], inliers, votes)
            as_new = None if candidates.lnbnn_unseen is None else candidates.lnbnn_unseen[rows]
            unseen[rows] = fitted.combine(candidates.cosine[rows], inliers, as_new)
            if fusion.parts != ("lnbnn",):
                similarity[rows] = fitted.combine(candidates.cosine[rows], inliers, None, absent_is_neutral=True)
    return scores, unseen, similarity


def _cross_fitted_decisions(
    labelled: pd.DataFrame, candidates: _Candidates, scores: np.ndarray, unseen: np.ndarray
) -> pd.DataFrame:
    """Return two rows per labelled encounter, one per role, with its truth, top candidate, score and margin.

    Every encounter is a query twice, against every other labelled picture: as an
    enrolled animal seen again ("known": only its own encounter left out, where its
    individual has another same-side picture) and as a new animal ("unseen": its
    whole individual left out). The reference is then as large as the gallery the
    thresholds will face: an impostor's best score grows with the number of animals
    enrolled. `scores` and `unseen` are the candidates' cross-fitted scores in each role (`_cross_fitted_scores`).
    """
    individuals = labelled["individual_id"].to_numpy(dtype=object)
    encounters = labelled["encounter_id"].fillna("row:" + labelled["annotation_id"]).astype("string")
    queries = labelled.assign(encounter_id=encounters).reset_index(drop=True)
    gallery_ids = labelled["individual_id"].to_numpy(dtype=object)
    annotations = labelled["annotation_id"].to_numpy(dtype=object)
    roles = []
    for role, role_scores, role_rows in (
        ("known", scores, candidates.rows),
        (
            "unseen",
            np.where(candidates.same, -np.inf, unseen),
            np.where(candidates.same, -1, candidates.rows),
        ),
    ):
        # Thresholds that decide nothing: every encounter keeps its raw top score, and no new IDs are grouped.
        result = decide(queries, role_scores, role_rows, gallery_ids, annotations, UNCALIBRATED)
        per_encounter = result.decisions.drop_duplicates("encounter_id").reset_index(drop=True)
        position = pd.Series(np.arange(len(queries)), index=queries["annotation_id"]).loc[per_encounter["query"]]
        per_encounter["individual_id"] = individuals[position.to_numpy()]
        per_encounter["role"] = role
        if role == "known":
            # Only where the individual has another picture of a side this query searches (found or not).
            per_encounter = per_encounter[_has_other_picture(queries)[position.to_numpy()]]
        roles.append(per_encounter)
    table = pd.concat(roles, ignore_index=True)
    table["top_correct"] = table["top_individual"] == table["individual_id"]
    return table[["encounter_id", "individual_id", "role", "top_individual", "top_score", "margin", "top_correct"]]
