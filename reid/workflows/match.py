"""Match a card of captures against the gallery (`infer.py mode=match`): search, re-score, decide, report.

The one downward line every matching run follows: the gallery's FAISS search
gives each query a shortlist of same-side entries, the scorer re-scores it (the
embedding's cosine, or calibrated keypoint evidence fused with it), and the pure
`reid.decisions.decide` turns the scores into ranked candidates and decisions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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
from reid.fusion import FusedScorer, ScoreFusion
from reid.gallery import Gallery, GalleryError
from reid.importers import Source, load_source
from reid.keypoints import Features, KeypointConfig, extract_rows
from reid.models import Embedder, embed_images, model_fingerprint
from reid.report import write_report
from reid.workflows.common import Outcome

UNCALIBRATED = Thresholds(known=np.inf, new=-np.inf)
"""Thresholds that decide nothing: every capture goes to review (a gallery that is not calibrated yet)."""


def make_scorer(
    gallery: Gallery,
    fusion: ScoreFusion,
    query_embeddings: np.ndarray,
    query_features: list[Features] | None = None,
    *,
    progress: bool = False,
) -> FusedScorer:
    """Return the scorer of queries against this gallery as `fusion` says (its stored keypoints where needed)."""
    stored = gallery.require_keypoints(fusion)
    if stored is None:
        return FusedScorer(fusion, query_embeddings, progress=progress)
    if query_features is None:
        raise ReidError(f"score method {fusion.method} needs the queries' keypoint features")
    return FusedScorer(fusion, query_embeddings, query_features, stored.features, stored.config, progress=progress)


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

    K is `k` for embedding scores and the fusion's shortlist when keypoints re-rank.
    `exclude` maps the (Q, K) rows found to a mask of rows each query must not see
    (calibration leaves a query's own encounter or individual out this way).
    """
    depth = scorer.depth if scorer.fusion.uses_keypoints else k
    cosine, rows = gallery.search(embeddings, sides, depth)
    if exclude is not None:
        rows = np.where((rows >= 0) & exclude(rows), -1, rows)
    return scorer.rescore(cosine, rows), rows


def score_queries(
    gallery: Gallery,
    queries: pd.DataFrame,
    embeddings: np.ndarray,
    thresholds: Thresholds,
    *,
    fusion: ScoreFusion | None = None,
    query_features: list[Features] | None = None,
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
    pictures then just have no correspondences, reported in `problems`.
    """
    fusion = gallery.fusion if fusion is None else fusion
    stored = gallery.require_keypoints(fusion)
    config = stored.config if stored is not None else None
    if config is not None and query_features is None:
        query_features, more = extract_rows(queries, config, progress=progress)
        if problems is not None:
            problems += more
    scorer = make_scorer(gallery, fusion, embeddings, query_features, progress=progress)
    sides = queries["side"].fillna("unknown").to_numpy(dtype=object)
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
    outcome.files["report"] = write_report(
        out_dir,
        result.decisions,
        result.matches,
        readable,
        gallery.entries,
        counts=table.drop(columns="individuals"),
        count_note=counts_doc["note"],
        thresholds=thresholds,
        problems=outcome.problems,
        summary=summary,
        evidence=pictures,
        score_label=(fusion or gallery.fusion).method,
    )
    return MatchResult(matches=matches, decisions=decisions), outcome


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
    progress: bool = True,
) -> Outcome:
    """`infer.py mode=match`: match a source's captures against the gallery with its calibrated scoring."""
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
