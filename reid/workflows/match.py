"""Match a card of captures against the gallery (`infer.py mode=match`): search, re-score, decide, report.

The one downward line every matching run follows: the gallery's FAISS search
gives each query a shortlist of same-side entries, the scorer re-scores it (the
embedding's cosine, or calibrated keypoint evidence fused with it), and the pure
`reid.decisions.decide` turns the scores into ranked candidates and decisions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reid import __version__
from reid.catalogue import SEARCHED_SIDES, save_catalogue
from reid.census import count_bounds
from reid.decisions import (
    DECISION_COLUMNS,
    KNOWN,
    MATCH_COLUMNS,
    NEW,
    REVIEW,
    UNREADABLE,
    MatchResult,
    Thresholds,
    decide,
    identified_captures,
    typed_table,
)
from reid.errors import Problem, ReidError
from reid.evidence import evidence_pictures
from reid.files import atomic_write, write_csv
from reid.fusion import FusedScorer, ScoreFusion, lnbnn_ranker
from reid.gallery import Gallery, GalleryError
from reid.importers import Source, load_source
from reid.keypoints import Features, KeypointConfig
from reid.matchers import extract_rows
from reid.models import Embedder, embed_images, model_fingerprint
from reid.report import encounter_cards, write_report
from reid.review import CAPTURES_FILE, ENCOUNTERS_FILE, RunInfo
from reid.workflows.common import Outcome

UNCALIBRATED = Thresholds(known=np.inf, new=-np.inf)
"""Thresholds that decide nothing: every capture goes to review (a gallery that is not calibrated yet)."""


def make_scorer(
    gallery: Gallery,
    fusion: ScoreFusion,
    query_embeddings: np.ndarray,
    query_features: list[Features] | None = None,
    *,
    query_sides: np.ndarray | None = None,
    configured: KeypointConfig | None = None,
    lnbnn_exclude: list[np.ndarray] | None = None,
    progress: bool = False,
) -> FusedScorer:
    """Return the scorer of queries against this gallery as `fusion` says (its stored keypoints where needed).

    `configured` (the run's keypoint settings) must name the matcher the gallery's features were made with.
    """
    stored = gallery.require_keypoints(fusion, configured)
    if stored is None:
        return FusedScorer(fusion, query_embeddings, query_sides=query_sides, progress=progress)
    if query_features is None:
        raise ReidError(f"score method {fusion.method} needs the queries' keypoint features")
    ranker = (
        lnbnn_ranker(
            stored.features,
            gallery.entries["side"].fillna("unknown").to_numpy(dtype=object),
            index_kind=fusion.lnbnn_index,
            config=stored.config,
        )
        if fusion.uses_lnbnn
        else None
    )
    return FusedScorer(
        fusion,
        query_embeddings,
        query_features,
        stored.features,
        stored.config,
        query_sides=query_sides,
        lnbnn=ranker,
        lnbnn_exclude=lnbnn_exclude,
        progress=progress,
    )


def shortlist(
    gallery: Gallery,
    embeddings: np.ndarray,
    sides: np.ndarray,
    scorer: FusedScorer,
    depth: int,
    exclude: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (cosine, gallery rows), both (Q, K): each query's same-side shortlist from the fusion's ranker.

    The embedding's `depth` nearest entries (FAISS), the `depth` entries LNBNN votes for most (ties broken by
    the embedding), or the union of both (K up to 2 x depth). Rows `exclude` masks are -1.
    """
    ranker = scorer.fusion.ranker
    if ranker == "embedding":
        cosine, rows = gallery.search(embeddings, sides, depth)
        if exclude is not None:
            rows = np.where((rows >= 0) & exclude(rows), -1, rows)
        return np.where(rows >= 0, cosine, -np.inf), rows
    n_gallery = len(gallery)
    everything = np.broadcast_to(np.arange(n_gallery), (len(embeddings), n_gallery))
    gallery_sides = gallery.entries["side"].fillna("unknown").to_numpy(dtype=object)
    allowed = np.array([np.isin(gallery_sides, SEARCHED_SIDES[str(side)]) for side in sides]).reshape(
        len(embeddings), n_gallery
    )
    if exclude is not None:
        allowed &= ~exclude(everything)
    full_cosine = np.asarray(embeddings, np.float32) @ gallery.embeddings.T
    votes = scorer.lnbnn_votes()
    chosen = np.zeros_like(allowed)
    by_votes = np.lexsort((-np.where(allowed, full_cosine, -np.inf), -np.where(allowed, votes, -np.inf)), axis=1)
    by_votes = by_votes[:, :depth]
    np.put_along_axis(chosen, by_votes, True, axis=1)
    if ranker == "union":
        by_cosine = np.argsort(-np.where(allowed, full_cosine, -np.inf), axis=1, kind="stable")[:, :depth]
        np.put_along_axis(chosen, by_cosine, True, axis=1)
    chosen &= allowed
    width = max(1, int(chosen.sum(axis=1).max(initial=0)))
    # Each query's chosen rows first (in gallery order), then -1.
    order = np.argsort(~chosen, axis=1, kind="stable")[:, :width]
    rows = np.where(np.take_along_axis(chosen, order, axis=1), order, -1)
    cosine = np.where(rows >= 0, np.take_along_axis(full_cosine, np.clip(rows, 0, None), axis=1), -np.inf)
    return cosine, rows


def scored_candidates(
    gallery: Gallery,
    embeddings: np.ndarray,
    sides: np.ndarray,
    scorer: FusedScorer,
    *,
    k: int = 50,
    exclude: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores, gallery rows), both (Q, K): each query's same-side shortlist, re-scored by `scorer`.

    K is `k` for embedding scores and the fusion's shortlist (`shortlist`) when anything re-ranks.
    `exclude` maps (Q, K) rows to a mask of rows each query must not see
    (calibration leaves a query's own encounter or individual out this way).
    """
    depth = scorer.depth if scorer.fusion.reranks else k
    cosine, rows = shortlist(gallery, embeddings, sides, scorer, depth, exclude)
    return scorer.rescore(cosine, rows), rows


def score_queries(
    gallery: Gallery,
    queries: pd.DataFrame,
    embeddings: np.ndarray,
    thresholds: Thresholds,
    *,
    fusion: ScoreFusion | None = None,
    query_features: list[Features] | None = None,
    keypoints: KeypointConfig | None = None,
    k: int = 50,
    top_n: int = 5,
    new_prefix: str = "NEW",
    problems: list[Problem] | None = None,
    progress: bool = True,
) -> tuple[MatchResult, KeypointConfig | None]:
    """Return the decisions for embedded query rows, scored as `fusion` says (default: the gallery's), and the
    keypoint settings used (None without keypoints).

    With keypoints, the queries' features are computed with the gallery's stored
    settings unless `query_features` (aligned with the rows) are given; unreadable
    pictures then just have no correspondences, reported in `problems`. `keypoints`
    (the run's settings) must name the matcher the gallery's features were made with.
    """
    fusion = gallery.fusion if fusion is None else fusion
    stored = gallery.require_keypoints(fusion, keypoints)
    config = stored.config if stored is not None else None
    if config is not None and query_features is None:
        query_features, more = extract_rows(queries, config, progress=progress)
        if problems is not None:
            problems += more
    sides = queries["side"].fillna("unknown").to_numpy(dtype=object)
    scorer = make_scorer(gallery, fusion, embeddings, query_features, query_sides=sides, progress=progress)
    scores, rows = scored_candidates(gallery, embeddings, sides, scorer, k=k)
    result = decide(
        queries,
        scores,
        rows,
        gallery.entries["individual_id"].to_numpy(dtype=object),
        gallery.entries["annotation_id"].to_numpy(dtype=object),
        thresholds,
        top_n=top_n,
        new_prefix=new_prefix,
        similarity=scorer.similarity,
    )
    return result, config


def match(
    queries: pd.DataFrame,
    embedder: Embedder,
    gallery: Gallery,
    out_dir: str | Path,
    *,
    thresholds: Thresholds | None = None,
    k: int = 50,
    top_n: int = 5,
    new_prefix: str | None = None,
    count_by: tuple[str, ...] = ("country",),
    period: str | None = None,
    fusion: ScoreFusion | None = None,
    keypoints: KeypointConfig | None = None,
    evidence: bool = True,
    import_problems: list[Problem] | None = None,
    progress: bool = True,
) -> tuple[MatchResult, Outcome]:
    """Match query captures against the gallery and write matches.csv, decisions.csv, counts.json and report.html.

    Unreadable queries are listed (decision "unreadable", with the reason) and the
    run finishes with the rest. New individuals get provisional IDs
    `<new_prefix>-0001`, ...; by default the queries' country namespace, `KZ-NEW`.
    `thresholds` and `fusion` default to the gallery's calibrated ones; a gallery
    never calibrated still ranks candidates, and every capture goes to review. With
    keypoints and `evidence`, the report shows each candidate's verified correspondences.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    in_use = model_fingerprint(embedder)
    if in_use != gallery.embedder_fingerprint:
        raise GalleryError(
            f"the gallery was built with embedder {gallery.embedder_fingerprint[:12]}, but the embedder in use is "
            f"{in_use[:12]}; use the gallery's embedder or rebuild the gallery"
        )
    outcome = Outcome(problems=list(import_problems or []))
    if thresholds is None:
        thresholds = gallery.thresholds
    if thresholds is None:
        thresholds = UNCALIBRATED
        outcome.problems.append(
            Problem(
                "gallery",
                "thresholds",
                "not calibrated: candidates are ranked but every capture goes to review; run "
                "`python infer.py mode=calibrate` (on this gallery, or on another labelled catalogue with "
                "calibration_data=...)",
            )
        )
    outcome.problems += [Problem("gallery", "thresholds", note) for note in thresholds.notes]
    queries = queries.reset_index(drop=True)
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
        fusion=fusion,
        keypoints=keypoints,
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
            "decision": str(UNREADABLE),
            "reason": [reasons.get(str(p), "") for p in failed["image_path"]],
        }
    )
    decisions = typed_table(pd.concat([result.decisions, unreadable], ignore_index=True), DECISION_COLUMNS)
    matches = typed_table(pd.concat([result.matches, unreadable], ignore_index=True), MATCH_COLUMNS)

    table, counts_doc = _counts(readable, result.decisions, gallery.entries, thresholds, count_by, period)
    counts_doc = {"captures": len(queries), "unreadable": len(failed), **counts_doc}
    outcome.files["matches"] = write_csv(matches, out_dir / "matches.csv")
    outcome.files["decisions"] = write_csv(decisions, out_dir / "decisions.csv")
    with atomic_write(out_dir / "counts.json") as f:
        json.dump(counts_doc, f, indent=2, default=str)
    outcome.files["counts"] = out_dir / "counts.json"
    decided = result.decisions["decision"].value_counts().to_dict()
    summary = (
        f"{len(queries)} captures: {decided.get(KNOWN, 0)} known, {decided.get(REVIEW, 0)} to review, "
        f"{decided.get(NEW, 0)} new, {len(failed)} unreadable. Gallery: {len(gallery)} entries of "
        f"{gallery.entries['individual_id'].nunique()} individuals."
    )
    pictures = (
        evidence_pictures(out_dir, result, readable, gallery, keypoint_config, outcome.problems)
        if evidence and keypoint_config is not None
        else {}
    )
    cards = encounter_cards(
        out_dir,
        result.decisions,
        result.matches,
        readable,
        gallery.entries,
        evidence=pictures,
        problems=outcome.problems,
    )
    outcome.files.update(_review_inputs(out_dir, readable, cards, gallery))
    outcome.files["report"] = write_report(
        out_dir,
        cards,
        counts=table.drop(columns="individuals"),
        count_note=counts_doc["note"],
        thresholds=thresholds,
        problems=outcome.problems,
        summary=summary,
        score_label=(fusion or gallery.fusion).method,
    )
    return MatchResult(matches=matches, decisions=decisions), outcome


def _review_inputs(
    out_dir: Path, readable: pd.DataFrame, cards: list[dict[str, Any]], gallery: Gallery
) -> dict[str, Path]:
    """Write what `infer.py mode=review` and `mode=enrol` read back: the captures, the cards, the run's provenance."""
    save_catalogue(readable, out_dir / CAPTURES_FILE)
    with atomic_write(out_dir / ENCOUNTERS_FILE) as f:
        json.dump(cards, f, indent=1)
    info = RunInfo(
        run_id=uuid.uuid4().hex,
        gallery=str(gallery.folder or ""),
        gallery_id=gallery.identity,
        gallery_version=gallery.version or "",
        software_version=__version__,
    )
    return {"captures": out_dir / CAPTURES_FILE, "encounters": out_dir / ENCOUNTERS_FILE, "run": info.save(out_dir)}


def run_match(
    source: Source,
    embedder: Embedder,
    gallery_dir: str | Path,
    out_dir: str | Path,
    *,
    k: int = 50,
    top_n: int = 5,
    new_prefix: str | None = None,
    count_by: tuple[str, ...] = ("country",),
    period: str | None = None,
    keypoints: KeypointConfig | None = None,
    progress: bool = True,
) -> Outcome:
    """`infer.py mode=match`: match a source's captures against the gallery with its calibrated scoring.

    `keypoints` (the run's settings) must name the matcher the gallery's features were made with."""
    queries, problems = load_source(source)
    gallery = Gallery.load(gallery_dir, embedder_fingerprint=model_fingerprint(embedder))
    _, outcome = match(
        queries,
        embedder,
        gallery,
        out_dir,
        k=k,
        top_n=top_n,
        new_prefix=new_prefix,
        count_by=count_by,
        period=period,
        keypoints=keypoints,
        import_problems=problems,
        progress=progress,
    )
    return outcome


def _decided_and_unresolved(queries: pd.DataFrame, decisions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the captures decided known (individual_id = their ID) and the ones nobody has identified yet."""
    known_ids = set(decisions.loc[decisions["decision"] == KNOWN, "assigned_id"])
    identified = identified_captures(queries, decisions)
    decided = identified[identified["individual_id"].isin(known_ids)]
    open_rows = decisions["decision"].isin([REVIEW, NEW]).to_numpy()
    unresolved = queries[queries["annotation_id"].isin(set(decisions.loc[open_rows, "query"]))]
    # Provisional new IDs are not identities: the encounter stands for the animal until a person decides.
    decided_as = decisions.set_index("query").loc[unresolved["annotation_id"]]
    unresolved = unresolved.assign(
        encounter_id=pd.array(decided_as["encounter_id"].to_numpy(), dtype="string"),
        provisional_id=pd.array(decided_as["assigned_id"].to_numpy(), dtype="string"),
    )
    return decided, unresolved


def decision_counts(
    queries: pd.DataFrame,
    decisions: pd.DataFrame,
    *,
    count_by: tuple[str, ...] = ("country",),
    period: str | None = None,
    known_sides: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Return the count bounds (`census.count_bounds`) of matched queries: known decisions are decided, the rest open."""
    decided, unresolved = _decided_and_unresolved(queries, decisions)
    return count_bounds(decided, unresolved, by=count_by, period=period, known_sides=known_sides)


def _counts(
    queries: pd.DataFrame,
    decisions: pd.DataFrame,
    gallery_entries: pd.DataFrame,
    thresholds: Thresholds,
    count_by: tuple[str, ...],
    period: str | None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Return the count bounds per group (combined first) and counts.json's content."""
    decided, unresolved = _decided_and_unresolved(queries, decisions)
    table = count_bounds(decided, unresolved, by=count_by, period=period, known_sides=gallery_entries)
    combined = table.iloc[0]
    n_open = int(combined["awaiting_review"])
    note = (
        f"At least {combined['minimum']} and at most {combined['maximum']} individuals, if the "
        f"{decided['individual_id'].nunique()} known IDs are right ({thresholds.summary()}). "
        + (
            f"{n_open} encounters await a person (to review or provisionally new): each could be a known animal or "
            "another one; identifying them narrows the interval."
            if n_open
            else "Every encounter is identified."
        )
    )
    provisional = unresolved[unresolved["provisional_id"].fillna("") != ""]
    doc = {
        "note": note,
        "rule": "minimum = decided individuals (both-flank + max(left-only, right-only), tightened by exclusions) "
        "+ unresolved encounters that hard evidence keeps apart from every counted animal; maximum = decided "
        "individuals + every unresolved encounter",
        "awaiting_review": n_open,
        "combined": combined.drop(["individuals", *count_by, "period"], errors="ignore").to_dict(),
        "groups": table.iloc[1:].to_dict("records"),
        "thresholds": thresholds.rates(),
        "individuals": {str(i): sorted(rows["image_path"].astype(str)) for i, rows in decided.groupby("individual_id")},
        "provisional_new": {
            str(i): sorted(rows["image_path"].astype(str)) for i, rows in provisional.groupby("provisional_id")
        },
    }
    return table, doc
