"""Calibrate a gallery's scores and decision thresholds on labelled data (`infer.py mode=calibrate`).

The labelled rows (the gallery's own entries, or another labelled catalogue) are
split open-set: some individuals appear only among the held-out queries. Each
matcher's raw score is first calibrated to P(same individual) on the shortlisted
pairs of one split; the thresholds are then chosen on another split, with every
held-out query searched against a reference as large as the real gallery, so
neither step is judged on the data it was fitted to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reid.decisions import Thresholds, calibrate, decide
from reid.errors import Problem, ReidError
from reid.files import write_csv
from reid.fusion import DEFAULT_CALIBRATION, CalibrationMethod, FusedScorer, ScoreFusion, fit_calibration
from reid.gallery import Gallery, gallery_lock
from reid.importers import Source, load_source
from reid.keypoints import Features, KeypointConfig, extract_rows
from reid.models import Embedder, embed_images, model_fingerprint
from reid.splits import split_catalogue
from reid.workflows.common import Outcome
from reid.workflows.match import UNCALIBRATED, scored_candidates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSettings:
    """How scores and thresholds are calibrated (`calibration:` in conf/infer.yaml)."""

    method: CalibrationMethod = DEFAULT_CALIBRATION
    """isotonic | logistic: how a raw score becomes P(same individual)."""
    max_false_merge: float = 0.05
    """Of new animals (and wrong top candidates) that may be given a known ID."""
    max_false_new: float = 0.05
    """Of known animals that may be called new."""
    unseen_fraction: float = 0.3
    """Of labelled individuals held out as 'new' in the calibration split."""
    test_fraction: float = 0.3
    """Of labelled encounters held out as queries."""
    k: int = 50
    """Gallery entries retrieved per query before scores are pooled per individual (embedding scoring)."""
    seed: int = 0


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
    fusion = ScoreFusion() if fusion is None else ScoreFusion(fusion.method, fusion.shortlist, fusion.rule)
    keep = labelled["individual_id"].notna().to_numpy()
    labelled, embeddings = labelled[keep].reset_index(drop=True), embeddings[keep]
    if features is not None:
        features = [f for f, kept in zip(features, keep, strict=True) if kept]
    seed = settings.seed
    if fusion.uses_keypoints:
        if features is None or keypoint_config is None:
            raise ReidError(
                f"score method {fusion.method} needs keypoint features: build the gallery with keypoints enabled"
            )
        pairs = _shortlist_pairs(labelled, embeddings, features, keypoint_config, fusion, settings, seed, progress)
        same = pairs["same"].to_numpy()
        fusion.keypoints = fit_calibration(pairs["inliers"].to_numpy(), same, method=settings.method, log_scale=True)
        if fusion.method == "fused":
            fusion.embedding = fit_calibration(pairs["cosine"].to_numpy(), same, method=settings.method)
        seed += 1
    per_encounter = _decisions_left_out(
        labelled, embeddings, features, keypoint_config, fusion, settings, seed, progress
    )
    top = per_encounter["top_score"].fillna(-np.inf).to_numpy()
    known = per_encounter["in_gallery"].to_numpy()
    thresholds = calibrate(
        top[known],
        per_encounter["top_correct"].to_numpy()[known],
        top[~known],
        max_false_merge=settings.max_false_merge,
        max_false_new=settings.max_false_new,
    )
    return thresholds, per_encounter, fusion


def calibrate_gallery(
    gallery: Gallery,
    gallery_dir: str | Path,
    *,
    labelled: pd.DataFrame | None = None,
    embedder: Embedder | None = None,
    fusion: ScoreFusion | None = None,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
) -> tuple[Thresholds, pd.DataFrame, list[Problem]]:
    """Calibrate the scores and thresholds on the gallery's own entries (or on `labelled` data); save them with it.

    `fusion` says which scores decide (embedding, keypoints or fused, and the
    shortlist); its calibrations are fitted here. Returns the thresholds, the
    per-encounter scores they were chosen on, and problems.
    """
    problems: list[Problem] = []
    fusion = fusion or ScoreFusion()
    stored = gallery.require_keypoints(fusion)
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
    progress: bool = True,
) -> Outcome:
    """`infer.py mode=calibrate`: calibrate on the gallery's entries (or a labelled source); write calibration.csv."""
    table, problems = load_source(labelled) if labelled is not None else (None, [])
    with gallery_lock(gallery_dir):
        gallery = Gallery.load(gallery_dir, embedder_fingerprint=model_fingerprint(embedder))
        thresholds, scores, more = calibrate_gallery(
            gallery, gallery_dir, labelled=table, embedder=embedder, fusion=fusion, settings=settings, progress=progress
        )
    log.info("%s", thresholds)
    return Outcome(
        {"gallery": Path(gallery_dir), "scores": write_csv(scores, Path(out_dir) / "calibration.csv")}, problems + more
    )


def _open_set_split(labelled: pd.DataFrame, settings: CalibrationSettings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (reference, query) masks of an open-set split of labelled rows."""
    split = split_catalogue(
        labelled, "open_set", test_fraction=settings.test_fraction, unseen_fraction=settings.unseen_fraction, seed=seed
    )
    reference, queries = (split == "train").to_numpy(), (split == "test").to_numpy()
    if not reference.any() or not queries.any():
        raise ReidError("calibration needs labelled individuals with several encounters; add more labelled data")
    return reference, queries


def _in_memory_gallery(labelled: pd.DataFrame, embeddings: np.ndarray, rows: np.ndarray) -> Gallery:
    gallery = Gallery.empty("calibration", embeddings.shape[1])
    # Annotation IDs serve as content keys: no file is hashed.
    gallery.add(labelled[rows], embeddings[rows], list(labelled.loc[rows, "annotation_id"]))
    return gallery


def _subset(features: list[Features] | None, mask: np.ndarray) -> list[Features] | None:
    return None if features is None else [f for f, m in zip(features, mask, strict=True) if m]


def _shortlist_pairs(
    labelled: pd.DataFrame,
    embeddings: np.ndarray,
    features: list[Features],
    keypoint_config: KeypointConfig,
    fusion: ScoreFusion,
    settings: CalibrationSettings,
    seed: int,
    progress: bool,
) -> pd.DataFrame:
    """Return the (query, shortlisted gallery entry) pairs of an open-set split with cosine, inliers and same."""
    reference, queries = _open_set_split(labelled, settings, seed)
    gallery = _in_memory_gallery(labelled, embeddings, reference)
    scorer = FusedScorer(
        ScoreFusion("keypoints", fusion.shortlist),
        embeddings[queries],
        _subset(features, queries),
        _subset(features, reference),
        keypoint_config,
        progress=progress,
    )
    sides = labelled.loc[queries, "side"].fillna("unknown").to_numpy(dtype=object)
    cosine, rows = gallery.search(embeddings[queries], sides, fusion.shortlist)
    inliers = scorer.rescore(cosine, rows)
    valid = rows >= 0
    query_ids = labelled.loc[queries, "individual_id"].to_numpy(dtype=object)
    gallery_ids = gallery.entries["individual_id"].to_numpy(dtype=object)
    return pd.DataFrame(
        {
            "cosine": cosine[valid],
            "inliers": inliers[valid],
            "same": (gallery_ids[rows[valid]] == np.broadcast_to(query_ids[:, None], rows.shape)[valid]),
        }
    )


def _decisions_left_out(
    labelled: pd.DataFrame,
    embeddings: np.ndarray,
    features: list[Features] | None,
    keypoint_config: KeypointConfig | None,
    fusion: ScoreFusion,
    settings: CalibrationSettings,
    seed: int,
    progress: bool,
) -> pd.DataFrame:
    """Return one row per query encounter of an open-set split: truth, whether enrolled, top candidate and score.

    Each query is searched against every labelled picture but its own encounter (an
    enrolled animal seen again) or, for the split's unseen individuals, its own
    individual (a new animal). The gallery is then as large as the one the
    thresholds will face: an impostor's best score grows with the number of
    animals enrolled, and a reference half the size promised a tenth of the
    false merges the full gallery then made.
    """
    reference, queries = _open_set_split(labelled, settings, seed)
    gallery = _in_memory_gallery(labelled, embeddings, np.ones(len(labelled), dtype=bool))
    if fusion.uses_keypoints:
        assert features is not None and keypoint_config is not None
        scorer = FusedScorer(
            fusion, embeddings[queries], _subset(features, queries), features, keypoint_config, progress=progress
        )
    else:
        scorer = FusedScorer(fusion, embeddings[queries], progress=progress)
    asked = labelled[queries].reset_index(drop=True)
    enrolled = set(labelled.loc[reference, "individual_id"])
    unseen = ~asked["individual_id"].isin(enrolled).to_numpy()
    encounters = labelled["encounter_id"].fillna("row:" + labelled["annotation_id"]).to_numpy(dtype=object)
    own_encounter = encounters[queries]
    individuals = labelled["individual_id"].to_numpy(dtype=object)
    own_individual = asked["individual_id"].to_numpy(dtype=object).copy()
    own_individual[~unseen] = None  # an enrolled animal keeps its other encounters in the gallery

    def left_out(rows: np.ndarray) -> np.ndarray:
        safe = np.clip(rows, 0, None)
        return np.asarray((encounters[safe] == own_encounter[:, None]) | (individuals[safe] == own_individual[:, None]))

    sides = asked["side"].fillna("unknown").to_numpy(dtype=object)
    scores, rows = scored_candidates(gallery, embeddings[queries], sides, scorer, k=settings.k, exclude=left_out)
    # Thresholds that decide nothing: every encounter keeps its raw top score, and no new IDs are grouped.
    result = decide(
        asked,
        scores,
        rows,
        gallery.entries["individual_id"].to_numpy(dtype=object),
        gallery.entries["annotation_id"].to_numpy(dtype=object),
        UNCALIBRATED,
    )
    per_encounter = result.decisions.drop_duplicates("encounter_id").merge(
        labelled[["annotation_id", "individual_id"]], left_on="query", right_on="annotation_id"
    )
    per_encounter["in_gallery"] = per_encounter["individual_id"].isin(enrolled)
    per_encounter["top_correct"] = per_encounter["top_individual"] == per_encounter["individual_id"]
    return per_encounter[["encounter_id", "individual_id", "in_gallery", "top_individual", "top_score", "top_correct"]]
