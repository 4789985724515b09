"""The analyst's workflows behind infer.py: build a gallery, calibrate, match a card of captures, count.

Each function takes plain arguments (tables, an embedder, folders), reports bad
inputs as problems and writes its results atomically into a run folder, so it
runs the same from infer.py, a notebook or a test.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from reid.catalogue import BBOX_COLUMNS, COLUMN_NAMES, load_catalogue, validate
from reid.census import count_individuals
from reid.errors import Problem, ReidError, log
from reid.files import atomic_write, sha256_file
from reid.fusion import (
    DEFAULT_CALIBRATION,
    FUSION_FILE,
    KEYPOINTS_FILE,
    CalibrationMethod,
    FusedScorer,
    ScoreFusion,
    fit_calibration,
)
from reid.gallery import Gallery, GalleryError
from reid.images import ImageReadError
from reid.importers import ImportResult
from reid.index import IndexKind
from reid.keypoints import (
    Features,
    KeypointConfig,
    draw_correspondences,
    extract_rows,
    features_from_bytes,
    features_to_bytes,
)
from reid.keypoints import (
    match as match_keypoints,
)
from reid.keypoints import (
    read_crop as read_keypoint_crop,
)
from reid.matching import KNOWN, NEW, MatchResult, Thresholds, calibrate, match_captures
from reid.models import CONFIG_FILE as EMBEDDER_CONFIG_FILE
from reid.models import Embedder, create_embedder, embed_images, export_embedder, load_embedder, model_fingerprint
from reid.report import write_report
from reid.splits import split_catalogue

THRESHOLDS_FILE = "thresholds.json"
UNREADABLE = "unreadable"


@dataclass
class Outcome:
    """What a workflow produced and every input it had to skip."""

    files: dict[str, Path] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def build_gallery(
    catalogue: pd.DataFrame,
    embedder: Embedder,
    gallery_dir: str | Path,
    *,
    index_kind: IndexKind = "flat",
    keypoints: KeypointConfig | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[Gallery, list[Problem]]:
    """Create or extend the gallery in `gallery_dir` with the catalogue's identified rows; return it and the problems.

    An existing gallery is extended, never rebuilt: it must have been built with
    the same embedder. Rows without an individual, unreadable images and images
    already enrolled are reported and skipped. With `keypoints`, every entry's
    keypoint features are computed once and stored with the gallery; a gallery
    that has features keeps extending them with its own settings.
    """
    fingerprint = model_fingerprint(embedder)
    gallery_dir = Path(gallery_dir)
    try:
        gallery = Gallery.load(gallery_dir, embedder_fingerprint=fingerprint)
    except GalleryError:
        if (gallery_dir / "CURRENT").exists():
            raise
        gallery = Gallery.empty(fingerprint, embedder.embedding_dim, index_kind)
    problems = [
        Problem(
            str(r.source or r.image_path), str(r.source_row or ""), "no individual_id: not enrolled; identify it first"
        )
        for r in catalogue[catalogue["individual_id"].isna()].itertuples()
    ]
    rows = catalogue[catalogue["individual_id"].notna()].reset_index(drop=True)
    hashes, readable = _content_hashes(rows, problems, progress)
    rows = rows[readable].reset_index(drop=True)
    hashes = [h for h, ok in zip(hashes, readable, strict=True) if ok]
    known = set(gallery.entries["content_hash"].dropna())
    fresh = np.array([h not in known for h in hashes], dtype=bool)
    result = embed_images(embedder, rows[fresh], batch_size=batch_size, progress=progress)
    problems += result.problems
    embedded = rows[fresh][result.ok]
    chosen = [h for h, f in zip(hashes, fresh, strict=True) if f]
    chosen = [h for h, ok in zip(chosen, result.ok, strict=True) if ok]
    n_before = len(gallery)
    problems += gallery.add(embedded, result.embeddings, chosen)
    stored = gallery_keypoints(gallery, expected=n_before)
    if stored is not None or keypoints is not None:
        features, config = stored if stored is not None else ([], keypoints)
        assert config is not None
        added, more = extract_rows(gallery.entries.iloc[n_before:], config, progress=progress)
        problems += more
        gallery.extra_files[KEYPOINTS_FILE] = features_to_bytes([*features, *added], config)
    n_dup = int((~fresh).sum())
    if n_dup:
        problems.append(Problem(str(gallery_dir), "", f"{n_dup} images already in the gallery were skipped"))
    gallery.save(gallery_dir)
    return gallery, problems


def calibrate_thresholds(
    labelled: pd.DataFrame,
    embeddings: np.ndarray,
    *,
    features: list[Features] | None = None,
    keypoint_config: KeypointConfig | None = None,
    scoring: ScoreFusion | None = None,
    calibration_method: CalibrationMethod = DEFAULT_CALIBRATION,
    unseen_fraction: float = 0.3,
    test_fraction: float = 0.3,
    max_false_merge: float = 0.05,
    max_false_new: float = 0.05,
    k: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Thresholds, pd.DataFrame, ScoreFusion]:
    """Return thresholds chosen on labelled rows, the per-encounter scores used, and the fitted score fusion.

    The rows are split open-set (some individuals only among the queries); a
    gallery of the reference part is searched with the query part, exactly as
    `match` does, and the thresholds meet the error targets there. With keypoint
    `features` (aligned with the rows) and a `scoring` that uses them, each
    matcher's score is first calibrated to P(same individual) on the shortlisted
    pairs of one split, and the thresholds are then chosen on another split, so
    neither step is judged on the data it was fitted to.
    """
    scoring = ScoreFusion() if scoring is None else ScoreFusion(scoring.method, scoring.shortlist, scoring.rule)
    keep = labelled["individual_id"].notna().to_numpy()
    labelled, embeddings = labelled[keep].reset_index(drop=True), embeddings[keep]
    if features is not None:
        features = [f for f, kept in zip(features, keep, strict=True) if kept]
    options: dict[str, Any] = dict(test_fraction=test_fraction, unseen_fraction=unseen_fraction, k=k, progress=progress)
    if scoring.uses_keypoints:
        if features is None or keypoint_config is None:
            raise ReidError(
                f"score method {scoring.method} needs keypoint features: build the gallery with keypoints enabled"
            )
        pairs = _shortlist_pairs(
            labelled,
            embeddings,
            features,
            keypoint_config,
            scoring,
            test_fraction=test_fraction,
            unseen_fraction=unseen_fraction,
            seed=seed,
            progress=progress,
        )
        same = pairs["same"].to_numpy()
        scoring.keypoints = fit_calibration(
            pairs["inliers"].to_numpy(), same, method=calibration_method, log_scale=True
        )
        if scoring.method == "fused":
            scoring.embedding = fit_calibration(pairs["cosine"].to_numpy(), same, method=calibration_method)
        seed += 1
    per_encounter = _decisions_left_out(labelled, embeddings, features, keypoint_config, scoring, seed=seed, **options)
    top = per_encounter["top_score"].fillna(-np.inf).to_numpy()
    known = per_encounter["in_gallery"].to_numpy()
    thresholds = calibrate(
        top[known],
        per_encounter["top_correct"].to_numpy()[known],
        top[~known],
        max_false_merge=max_false_merge,
        max_false_new=max_false_new,
    )
    return thresholds, per_encounter, scoring


def _open_set_split(
    labelled: pd.DataFrame, *, test_fraction: float, unseen_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (reference, query) masks of an open-set split of labelled rows."""
    split = split_catalogue(
        labelled, "open_set", test_fraction=test_fraction, unseen_fraction=unseen_fraction, seed=seed
    )
    reference, queries = (split == "train").to_numpy(), (split == "test").to_numpy()
    if not reference.any() or not queries.any():
        raise ReidError("calibration needs labelled individuals with several encounters; add more labelled data")
    return reference, queries


def _reference_gallery(labelled: pd.DataFrame, embeddings: np.ndarray, reference: np.ndarray) -> Gallery:
    gallery = Gallery.empty("calibration", embeddings.shape[1])
    # An in-memory gallery: annotation IDs serve as content keys, no file is hashed.
    gallery.add(labelled[reference], embeddings[reference], list(labelled.loc[reference, "annotation_id"]))
    return gallery


def _scorer(
    scoring: ScoreFusion,
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    query_features: list[Features] | None,
    gallery_features: list[Features] | None,
    keypoint_config: KeypointConfig | None,
    progress: bool,
) -> FusedScorer:
    return FusedScorer(
        scoring,
        query_embeddings,
        gallery_embeddings,
        query_features if scoring.uses_keypoints else None,
        gallery_features if scoring.uses_keypoints else None,
        keypoint_config,
        progress=progress,
    )


def _subset(features: list[Features] | None, mask: np.ndarray) -> list[Features] | None:
    return None if features is None else [f for f, m in zip(features, mask, strict=True) if m]


def _shortlist_pairs(
    labelled: pd.DataFrame,
    embeddings: np.ndarray,
    features: list[Features],
    keypoint_config: KeypointConfig,
    scoring: ScoreFusion,
    *,
    test_fraction: float,
    unseen_fraction: float,
    seed: int,
    progress: bool,
) -> pd.DataFrame:
    """Return the (query, shortlisted gallery entry) pairs of an open-set split with cosine, inliers and same."""
    reference, queries = _open_set_split(
        labelled, test_fraction=test_fraction, unseen_fraction=unseen_fraction, seed=seed
    )
    gallery = _reference_gallery(labelled, embeddings, reference)
    scorer = FusedScorer(
        ScoreFusion("keypoints", scoring.shortlist),
        embeddings[queries],
        gallery.embeddings,
        _subset(features, queries),
        _subset(features, reference),
        keypoint_config,
        progress=progress,
    )
    sides = labelled.loc[queries, "side"].fillna("unknown").to_numpy(dtype=object)
    cosine, rows = gallery.search(embeddings[queries], sides, scoring.shortlist)
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
    scoring: ScoreFusion,
    *,
    test_fraction: float,
    unseen_fraction: float,
    k: int,
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
    reference, queries = _open_set_split(
        labelled, test_fraction=test_fraction, unseen_fraction=unseen_fraction, seed=seed
    )
    everything = np.ones(len(labelled), dtype=bool)
    gallery = _reference_gallery(labelled, embeddings, everything)
    scorer = _scorer(
        scoring,
        embeddings[queries],
        gallery.embeddings,
        _subset(features, queries),
        features,
        keypoint_config,
        progress,
    )
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
        return (encounters[safe] == own_encounter[:, None]) | (individuals[safe] == own_individual[:, None])

    # Thresholds that decide nothing: every encounter keeps its raw top score, and no new IDs are grouped.
    result = match_captures(
        gallery, asked, embeddings[queries], Thresholds(np.inf, -np.inf), k=k, scorer=scorer, exclude=left_out
    )
    per_encounter = result.decisions.drop_duplicates("encounter_id").merge(
        labelled[["annotation_id", "individual_id"]], left_on="query", right_on="annotation_id"
    )
    per_encounter["in_gallery"] = per_encounter["individual_id"].isin(enrolled)
    per_encounter["top_correct"] = per_encounter["top_individual"] == per_encounter["individual_id"]
    return per_encounter[["encounter_id", "individual_id", "in_gallery", "top_individual", "top_score", "top_correct"]]


def gallery_keypoints(gallery: Gallery, *, expected: int | None = None) -> tuple[list[Features], KeypointConfig] | None:
    """Return the gallery's stored keypoint features (one per entry) and their settings, or None if it has none."""
    data = gallery.extra_files.get(KEYPOINTS_FILE)
    if data is None:
        return None
    features, config = features_from_bytes(data)
    n = len(gallery) if expected is None else expected
    if len(features) != n:
        raise GalleryError(
            f"the gallery's {KEYPOINTS_FILE} has features of {len(features)} entries, but it has {n}; rebuild the "
            "gallery (`python infer.py mode=build`)"
        )
    return features, config


def match(
    queries: pd.DataFrame,
    embedder: Embedder,
    gallery: Gallery,
    thresholds: Thresholds,
    out_dir: str | Path,
    *,
    k: int = 50,
    top_n: int = 5,
    new_prefix: str | None = None,
    count_by: tuple[str, ...] = ("country",),
    period: str | None = None,
    scoring: ScoreFusion | None = None,
    evidence: bool = True,
    import_problems: list[Problem] | None = None,
    progress: bool = True,
) -> tuple[MatchResult, Outcome]:
    """Match query captures against the gallery and write matches.csv, decisions.csv, counts.json and report.html.

    Unreadable queries are listed (decision "unreadable", with the reason) and the
    run finishes with the rest. New individuals get provisional IDs
    `<new_prefix>-0001`, ...; by default the queries' country namespace, `KZ-NEW`.
    `scoring` defaults to the gallery's calibrated one (`scoring_of`); with
    keypoints and `evidence`, the report shows each candidate's verified
    correspondences.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    in_use = model_fingerprint(embedder)
    if in_use != gallery.embedder_fingerprint:
        raise GalleryError(
            f"the gallery was built with embedder {gallery.embedder_fingerprint[:12]}, but the embedder in use is "
            f"{in_use[:12]}; use the gallery's embedder or rebuild the gallery"
        )
    queries = queries.reset_index(drop=True)
    outcome = Outcome(problems=list(import_problems or []))
    embedded = embed_images(embedder, queries, progress=progress)
    outcome.problems += embedded.problems
    readable = queries[embedded.ok].reset_index(drop=True)
    if new_prefix is None:
        countries = set(readable["country"].dropna())
        new_prefix = f"{countries.pop()}-NEW" if len(countries) == 1 else "NEW"
    result, keypoint_config = score_queries(
        gallery,
        readable,
        embedded.embeddings,
        thresholds,
        scoring=scoring,
        k=k,
        top_n=top_n,
        new_prefix=new_prefix,
        problems=outcome.problems,
        progress=progress,
    )
    failed = queries[~embedded.ok]
    reasons = {p.source: p.message for p in embedded.problems}
    unreadable = pd.DataFrame(
        {
            "query": failed["annotation_id"],
            "image_path": failed["image_path"],
            "side": failed["side"],
            "decision": UNREADABLE,
            "reason": [reasons.get(str(p), "") for p in failed["image_path"]],
        }
    )
    decisions = pd.concat([result.decisions, unreadable], ignore_index=True)
    matches = result.matches.merge(readable[["annotation_id", "image_path"]], left_on="query", right_on="annotation_id")
    matches = matches.drop(columns="annotation_id")
    matches = pd.concat([matches, unreadable[["query", "image_path", "decision", "reason"]]], ignore_index=True)

    captures = identified_captures(readable, result.decisions)
    counts = count_individuals(captures, by=list(count_by), period=period, known_sides=gallery.entries)
    combined = count_individuals(captures, known_sides=gallery.entries)
    n_review = int((result.decisions["decision"] == "review").sum())
    counts_doc = {
        "note": "minimum = both-flank individuals + max(left-only, right-only), tightened by exclusions; "
        "maximum = all individuals. Captures awaiting review are not counted.",
        "captures": len(queries),
        "unreadable": len(failed),
        "awaiting_review": n_review,
        "combined": combined.drop(columns="individuals").to_dict("records")[0] if len(combined) else {},
        "groups": counts.to_dict("records"),
        "individuals": _evidence(captures),
    }
    outcome.files["matches"] = write_table(matches, out_dir / "matches.csv")
    outcome.files["decisions"] = write_table(decisions, out_dir / "decisions.csv")
    with atomic_write(out_dir / "counts.json") as f:
        json.dump(counts_doc, f, indent=2, default=str)
    outcome.files["counts"] = out_dir / "counts.json"
    decided = result.decisions["decision"].value_counts().to_dict()
    summary = (
        f"{len(queries)} captures: {decided.get(KNOWN, 0)} known, {decided.get('review', 0)} to review, "
        f"{decided.get(NEW, 0)} new, {len(failed)} unreadable. Gallery: {len(gallery)} entries of "
        f"{gallery.entries['individual_id'].nunique()} individuals."
    )
    table = pd.concat([combined.assign(**{c: "all" for c in count_by}), counts], ignore_index=True)
    table = table[[*count_by, *[c for c in table.columns if c not in count_by]]]
    pictures = (
        evidence_pictures(out_dir, result, readable, gallery, keypoint_config, outcome.problems)
        if evidence and keypoint_config is not None
        else {}
    )
    outcome.files["report"] = write_report(
        out_dir,
        result.decisions,
        result.matches,
        readable,
        gallery.entries,
        counts=table.drop(columns="individuals"),
        thresholds=thresholds,
        problems=outcome.problems,
        summary=summary,
        evidence=pictures,
        score_label=(scoring or scoring_of(gallery)).method,
    )
    return MatchResult(matches=matches, decisions=decisions), outcome


def score_queries(
    gallery: Gallery,
    queries: pd.DataFrame,
    embeddings: np.ndarray,
    thresholds: Thresholds,
    *,
    scoring: ScoreFusion | None = None,
    query_features: list[Features] | None = None,
    k: int = 50,
    top_n: int = 5,
    new_prefix: str = "NEW",
    problems: list[Problem] | None = None,
    progress: bool = True,
) -> tuple[MatchResult, KeypointConfig | None]:
    """Return the decisions for embedded query rows, scored as `scoring` says (default: the gallery's), and the
    keypoint settings used (None without keypoints).

    With keypoints, the queries' features are computed with the gallery's stored
    settings unless `query_features` (aligned with the rows) are given; unreadable
    pictures then just have no correspondences, reported in `problems`.
    """
    scoring = scoring_of(gallery) if scoring is None else scoring
    stored = gallery_keypoints(gallery) if scoring.uses_keypoints else None
    if scoring.uses_keypoints and stored is None:
        raise ReidError(
            f"score method {scoring.method} needs the gallery's keypoint features; rebuild it with keypoints enabled"
        )
    keypoint_config = stored[1] if stored is not None else None
    if keypoint_config is not None and query_features is None:
        query_features, more = extract_rows(queries, keypoint_config, progress=progress)
        if problems is not None:
            problems += more
    scorer = _scorer(
        scoring,
        embeddings,
        gallery.embeddings,
        query_features,
        stored[0] if stored else None,
        keypoint_config,
        progress,
    )
    result = match_captures(
        gallery, queries, embeddings, thresholds, k=k, top_n=top_n, new_prefix=new_prefix, scorer=scorer
    )
    return result, keypoint_config


EVIDENCE_DIR = "evidence"


def evidence_pictures(
    out_dir: Path,
    result: MatchResult,
    queries: pd.DataFrame,
    gallery: Gallery,
    config: KeypointConfig,
    problems: list[Problem],
) -> dict[tuple[str, int], str]:
    """Draw the verified correspondences of each encounter's first picture with each of its candidates' best
    gallery picture (what the report shows); return their paths relative to `out_dir`, by (query, gallery row)."""
    first = result.matches["query"].isin(set(result.decisions.drop_duplicates("encounter_id")["query"]))
    matches = result.matches[first]
    (out_dir / EVIDENCE_DIR).mkdir(exist_ok=True)
    position = {str(a): i for i, a in enumerate(queries["annotation_id"])}
    seen: dict[tuple[str, Any], tuple[np.ndarray, Features] | None] = {}

    def crop_and_features(row: pd.Series, key: tuple[str, Any]) -> tuple[np.ndarray, Features] | None:
        """Return the crop as drawn and its features as matched (with frame positions), once per picture."""
        if key not in seen:
            box = row[list(BBOX_COLUMNS)].to_numpy(dtype=float)
            try:
                crop = read_keypoint_crop(str(row["image_path"]), None if np.isnan(box).any() else box.tolist(), config)
            except ImageReadError as err:
                problems.append(Problem(err.path, "correspondences", err.reason))
                seen[key] = None
                return None
            features, _ = extract_rows(row.to_frame().T, config, progress=False)
            seen[key] = (crop, features[0])
        return seen[key]

    pictures = {}
    shown = matches[matches["gallery_row"] >= 0]
    pairs = shown[["query", "gallery_row"]].drop_duplicates()
    for n, (query, row) in enumerate(zip(pairs["query"].astype(str), pairs["gallery_row"].astype(int), strict=True)):
        query_side = crop_and_features(queries.iloc[position[query]], ("q", query))
        gallery_side = crop_and_features(gallery.entries.iloc[row], ("g", row))
        if query_side is None or gallery_side is None:
            continue
        found = match_keypoints(query_side[1], gallery_side[1], config)
        relative = f"{EVIDENCE_DIR}/pair{n:05d}.jpg"
        picture = draw_correspondences(query_side[0], gallery_side[0], found)
        Image.fromarray(picture).save(out_dir / relative, quality=85)
        pictures[(query, row)] = relative
    return pictures


def identified_captures(queries: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """Return the query rows with individual_id set to their decided ID (known or provisional new); review rows dropped."""
    decided = decisions.set_index("query")
    keep = decided["decision"].isin([KNOWN, NEW])
    captures = queries[queries["annotation_id"].isin(decided.index[keep])].copy()
    captures["individual_id"] = pd.array(
        decided.loc[captures["annotation_id"], "assigned_id"].to_numpy(), dtype="string"
    )
    return captures[list(COLUMN_NAMES)]


def _evidence(captures: pd.DataFrame) -> dict[str, list[str]]:
    return {str(i): sorted(rows["image_path"].astype(str)) for i, rows in captures.groupby("individual_id")}


def _content_hashes(rows: pd.DataFrame, problems: list[Problem], progress: bool) -> tuple[list[str], np.ndarray]:
    hashes, ok = [], np.zeros(len(rows), dtype=bool)
    for i, path in enumerate(tqdm(rows["image_path"], desc="hashing", unit="img", disable=not progress)):
        try:
            hashes.append(sha256_file(path))
            ok[i] = True
        except OSError as err:
            hashes.append("")
            problems.append(Problem(str(path), "", f"cannot read the file ({err.strerror}); check the path"))
    return hashes, ok


def write_table(table: pd.DataFrame, path: Path) -> Path:
    """Write a table as CSV, atomically; return the path."""
    with atomic_write(path) as f:
        table.to_csv(f, index=False)
    return path


def count_catalogue(
    catalogue: pd.DataFrame, *, by: tuple[str, ...] = ("country",), period: str | None = None
) -> pd.DataFrame:
    """Return minimum/maximum counts of a catalogue's identified captures per group, plus an `all` row."""
    combined = count_individuals(catalogue).assign(**{c: "all" for c in by})
    groups = count_individuals(catalogue, by=list(by), period=period)
    return pd.concat([combined, groups], ignore_index=True)


def thresholds_of(gallery: Gallery) -> Thresholds:
    """Return the thresholds calibrated for this gallery; raise ReidError if it was never calibrated."""
    data = gallery.extra_files.get(THRESHOLDS_FILE)
    if data is None:
        raise ReidError("this gallery has no calibrated thresholds yet; run `python infer.py mode=calibrate` first")
    return Thresholds(**json.loads(data))


def scoring_of(gallery: Gallery) -> ScoreFusion:
    """Return the score fusion calibrated for this gallery (embedding alone if none was stored)."""
    data = gallery.extra_files.get(FUSION_FILE)
    return ScoreFusion() if data is None else ScoreFusion.from_json(data)


def calibrate_gallery(
    gallery: Gallery,
    gallery_dir: str | Path,
    *,
    labelled: pd.DataFrame | None = None,
    embedder: Embedder | None = None,
    scoring: ScoreFusion | None = None,
    progress: bool = True,
    **options: Any,
) -> tuple[Thresholds, pd.DataFrame, list[Problem]]:
    """Calibrate the scores and thresholds on the gallery's own entries (or on `labelled` data); save them with it.

    `scoring` says which scores decide (embedding, keypoints or fused, and the
    shortlist); its calibrations are fitted here. Returns the thresholds, the
    per-encounter scores they were chosen on, and problems.
    """
    problems: list[Problem] = []
    scoring = scoring or ScoreFusion()
    stored = gallery_keypoints(gallery) if scoring.uses_keypoints else None
    if scoring.uses_keypoints and stored is None:
        raise ReidError(
            f"score method {scoring.method} needs keypoint features: rebuild the gallery with keypoints enabled"
        )
    features, keypoint_config = stored if stored is not None else (None, None)
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
        scoring=scoring,
        progress=progress,
        **options,
    )
    gallery.extra_files[THRESHOLDS_FILE] = json.dumps(asdict(thresholds), indent=2).encode()
    gallery.extra_files[FUSION_FILE] = fitted.to_json().encode()
    gallery.save(gallery_dir)
    return thresholds, scores, problems


def evaluate_against_truth(decisions: pd.DataFrame, truth: pd.DataFrame, enrolled: set[str], counts: dict) -> dict:
    """Return how the decisions compare with known true identities: per-query outcome rates and count bounds."""
    merged = decisions[decisions["decision"] != UNREADABLE].merge(
        truth[["annotation_id", "individual_id"]], left_on="query", right_on="annotation_id"
    )
    known = merged[merged["individual_id"].isin(enrolled)]
    unseen = merged[~merged["individual_id"].isin(enrolled)]

    def share(mask: pd.Series, of: pd.DataFrame) -> float:
        return round(float(mask.sum()) / len(of), 4) if len(of) else float("nan")

    true_ids = set(merged["individual_id"])
    return {
        "queries_of_enrolled_individuals": len(known),
        "correct_id": share((known["decision"] == KNOWN) & (known["assigned_id"] == known["individual_id"]), known),
        "wrong_id": share((known["decision"] == KNOWN) & (known["assigned_id"] != known["individual_id"]), known),
        "review_known": share(known["decision"] == "review", known),
        "false_new": share(known["decision"] == NEW, known),
        "queries_of_new_individuals": len(unseen),
        "false_merge": share(unseen["decision"] == KNOWN, unseen),
        "review_new": share(unseen["decision"] == "review", unseen),
        "called_new": share(unseen["decision"] == NEW, unseen),
        "true_individuals_in_queries": len(true_ids),
        "count_minimum": counts.get("minimum"),
        "count_maximum": counts.get("maximum"),
    }


def run_demo(
    population: pd.DataFrame,
    embedder: Embedder,
    run_dir: str | Path,
    *,
    unseen_fraction: float = 0.25,
    query_fraction: float = 0.3,
    seed: int = 0,
    index_kind: IndexKind = "flat",
    keypoints: KeypointConfig | None = None,
    scoring: ScoreFusion | None = None,
    calibration: dict[str, Any] | None = None,
    progress: bool = True,
    **match_options: Any,
) -> tuple[MatchResult, Outcome, dict]:
    """Run build, calibrate, match and count on a labelled population; return results, files and a truth check.

    Some individuals are left out of the gallery, so their captures should come
    out "new"; held-out encounters of the others should be recognised.
    """
    run_dir = Path(run_dir)
    split = split_catalogue(
        population, "open_set", unseen_fraction=unseen_fraction, test_fraction=query_fraction, seed=seed
    )
    reference = population[(split == "train").to_numpy()].reset_index(drop=True)
    queries = population[(split == "test").to_numpy()].reset_index(drop=True)
    gallery_dir = run_dir / "gallery"
    gallery, problems = build_gallery(
        reference, embedder, gallery_dir, index_kind=index_kind, keypoints=keypoints, progress=progress
    )
    thresholds, _, more = calibrate_gallery(
        gallery, gallery_dir, scoring=scoring, progress=progress, **(calibration or {})
    )
    result, outcome = match(
        queries,
        embedder,
        gallery,
        thresholds,
        run_dir,
        import_problems=problems + more,
        progress=progress,
        **match_options,
    )
    counts = json.loads(outcome.files["counts"].read_text())["combined"]
    truth = evaluate_against_truth(result.decisions, queries, set(gallery.entries["individual_id"]), counts)
    with atomic_write(run_dir / "evaluation.json") as f:
        json.dump(
            {"scoring": scoring_of(gallery).method, "thresholds": asdict(thresholds), "truth": truth}, f, indent=2
        )
    outcome.files["evaluation"] = run_dir / "evaluation.json"
    outcome.files["gallery"] = gallery_dir
    return result, outcome, truth


def write_counts(counts: pd.DataFrame, run_dir: str | Path) -> Path:
    """Write counts.csv and counts.json (with each group's individuals) into `run_dir`; return the JSON's path."""
    run_dir = Path(run_dir)
    write_table(counts, run_dir / "counts.csv")
    with atomic_write(run_dir / "counts.json") as f:
        json.dump(counts.to_dict("records"), f, indent=2, default=str)
    return run_dir / "counts.json"


def load_source(source: Any) -> tuple[pd.DataFrame, list[Problem]]:
    """Return (catalogue, problems) from an importer's result, a catalogue table or a catalogue CSV path."""
    if isinstance(source, ImportResult):
        return source.table, list(source.problems)
    if isinstance(source, pd.DataFrame):
        return validate(source, source="input table"), []
    if isinstance(source, str | Path):
        return load_catalogue(source), []
    raise ReidError(f"expected an import result, a catalogue table or a catalogue path, got {type(source).__name__}")


def find_embedder(path: str | Path | None, train_runs: str | Path, run_dir: str | Path) -> Embedder:
    """Return the embedder at `path`, else the newest under `train_runs`, else an untrained one (with a warning)."""
    if path:
        return load_embedder(path)
    exported = sorted(Path(train_runs).glob(f"*/embedder/{EMBEDDER_CONFIG_FILE}"), key=lambda p: p.stat().st_mtime)
    if exported:
        log.info("using the newest trained embedder: %s", exported[-1].parent)
        return load_embedder(exported[-1].parent)
    log.warning(
        "no trained embedder found under %s: using an UNTRAINED ResNet-18, whose matches are little better than "
        "chance. Run `python train.py` first, or set embedder=/path/to/embedder",
        train_runs,
    )
    torch.manual_seed(0)
    folder = export_embedder(
        create_embedder("resnet18", 128, img_size=128, crop_margin=0.05), Path(run_dir) / "embedder"
    )
    return load_embedder(folder)
