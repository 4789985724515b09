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

from reid.catalogue import SEARCHED_SIDES
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
    """auto | isotonic | logistic: how a raw score becomes P(same individual) (auto: isotonic on many pairs)."""
    max_wrong_id: float = 0.05
    """Of the IDs the software gives (known decisions), the share that may be wrong."""
    max_false_merge: float = 0.05
    """Of new animals, the share that may be given a known ID."""
    max_false_new: float = 0.05
    """Of known animals, the share that may be called new."""
    unseen_fraction: float = 0.3
    """Of labelled individuals held out as 'new' in the split that calibrates the matchers' scores."""
    test_fraction: float = 0.3
    """Of labelled encounters held out as queries in that split."""
    k: int = 50
    """Gallery entries retrieved per query before scores are pooled per individual (embedding scoring)."""
    seed: int = 0
    min_individuals: int = 5
    """Labelled individuals seen in two or more encounters needed to calibrate at all."""


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
    _check_enough_labels(labelled, settings.min_individuals)
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
    per_encounter = _cross_validated_decisions(
        labelled, embeddings, features, keypoint_config, fusion, settings, progress
    )
    known = (per_encounter["role"] == "known").to_numpy()
    top = per_encounter["top_score"].fillna(-np.inf).to_numpy()
    margin = per_encounter["margin"].to_numpy()
    thresholds = calibrate(
        top[known],
        per_encounter["top_correct"].to_numpy()[known],
        top[~known],
        known_margin=margin[known],
        unseen_margin=margin[~known],
        max_wrong_id=settings.max_wrong_id,
        max_false_merge=settings.max_false_merge,
        max_false_new=settings.max_false_new,
    )
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


def _cross_validated_decisions(
    labelled: pd.DataFrame,
    embeddings: np.ndarray,
    features: list[Features] | None,
    keypoint_config: KeypointConfig | None,
    fusion: ScoreFusion,
    settings: CalibrationSettings,
    progress: bool,
) -> pd.DataFrame:
    """Return two rows per labelled encounter, one per role, with its truth, top candidate, score and margin.

    Every encounter is a query twice, against every other labelled picture: as an
    enrolled animal seen again ("known": only its own encounter left out, where its
    individual has another same-side picture) and as a new animal ("unseen": its
    whole individual left out). The reference is then as large as the gallery the
    thresholds will face: an impostor's best score grows with the number of animals
    enrolled, and a reference half the size once promised a tenth of the false merges
    the full gallery then made.
    """
    gallery = _in_memory_gallery(labelled, embeddings, np.ones(len(labelled), dtype=bool))
    if fusion.uses_keypoints:
        assert features is not None and keypoint_config is not None
        scorer = FusedScorer(fusion, embeddings, features, features, keypoint_config, progress=progress)
    else:
        scorer = FusedScorer(fusion, embeddings, progress=progress)
    encounters = labelled["encounter_id"].fillna("row:" + labelled["annotation_id"]).to_numpy(dtype=object)
    individuals = labelled["individual_id"].to_numpy(dtype=object)
    queries = labelled.assign(encounter_id=pd.array(encounters, dtype="string")).reset_index(drop=True)
    sides = queries["side"].fillna("unknown").to_numpy(dtype=object)

    def own_encounter(rows: np.ndarray) -> np.ndarray:
        return np.asarray(encounters[np.clip(rows, 0, None)] == encounters[:, None])

    scores, rows = scored_candidates(gallery, embeddings, sides, scorer, k=settings.k, exclude=own_encounter)
    own_individual = (rows >= 0) & (individuals[np.clip(rows, 0, None)] == individuals[:, None])
    entry_ids = gallery.entries["individual_id"].to_numpy(dtype=object)
    entry_annotations = gallery.entries["annotation_id"].to_numpy(dtype=object)
    roles = []
    for role, role_scores, role_rows in (
        ("known", scores, rows),
        ("unseen", np.where(own_individual, -np.inf, scores), np.where(own_individual, -1, rows)),
    ):
        result = decide(queries, role_scores, role_rows, entry_ids, entry_annotations, UNCALIBRATED)
        per_encounter = result.decisions.drop_duplicates("encounter_id").reset_index(drop=True)
        truth = pd.Series(individuals, index=queries["annotation_id"]).loc[per_encounter["query"]].to_numpy()
        per_encounter["individual_id"] = truth
        per_encounter["role"] = role
        if role == "known":
            # Only where the individual has another picture of a side this query searches (found or not).
            findable = pd.Series(_has_other_picture(queries), index=queries["annotation_id"])
            per_encounter = per_encounter[findable.loc[per_encounter["query"]].to_numpy()]
        roles.append(per_encounter)
    table = pd.concat(roles, ignore_index=True)
    table["top_correct"] = table["top_individual"] == table["individual_id"]
    return table[["encounter_id", "individual_id", "role", "top_individual", "top_score", "margin", "top_correct"]]


def _has_other_picture(queries: pd.DataFrame) -> np.ndarray:
    """Return, per row, whether its individual has a picture of a searched side in another encounter."""
    sides = queries["side"].fillna("unknown").to_numpy(dtype=object)
    encounters = queries["encounter_id"].to_numpy(dtype=object)
    found = np.zeros(len(queries), dtype=bool)
    for group in queries.groupby("individual_id").indices.values():
        for i in group:
            found[i] = any(encounters[j] != encounters[i] and sides[j] in SEARCHED_SIDES[sides[i]] for j in group)
    return found
