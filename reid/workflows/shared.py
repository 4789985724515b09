"""Across the border: find the individuals two catalogues share, confirm them, count once (`share.py`).

Matching one catalogue against the other proposes pairs (same side only; both
flanks' evidence pooled per individual) for people to review in a report; only
pairs a person confirms enter the alias table (`reid.aliases`). The `run_*`
functions are `share.py`'s modes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from reid import __version__
from reid.aliases import CONFIRM_COLUMN, confirm_aliases, load_aliases, merged_catalogue
from reid.catalogue import COLUMN_NAMES
from reid.census import count_table
from reid.decisions import KNOWN, NEW, REVIEW, MatchResult, Thresholds
from reid.ecology import write_camtrap_dp, write_capture_histories
from reid.errors import Problem, ReidError
from reid.evidence import evidence_pictures
from reid.files import atomic_write, write_csv
from reid.fusion import ScoreFusion
from reid.gallery import Gallery, StoredKeypoints
from reid.keypoints import Features, KeypointConfig
from reid.matchers import extract_rows
from reid.models import Embedder, embed_images, model_fingerprint
from reid.report import encounter_cards, write_report
from reid.review import ENCOUNTERS_FILE, MatchRun, RunInfo, encounter_states
from reid.sharing import ImportedCatalogue, export_catalogue, import_catalogue, load_imported
from reid.workflows.common import Outcome, write_counts
from reid.workflows.match import UNCALIBRATED, score_queries


@dataclass
class SharedCandidates:
    """Proposed equivalences between a partner's individuals and local ones, with what the report needs."""

    pairs: pd.DataFrame
    """One row per partner individual and local candidate: partner_id, local_id, rank, score, decision, sides, confirmed."""
    result: MatchResult
    """The underlying match of the partner's pictures (queries) against the local gallery."""
    partner_pictures: pd.DataFrame
    """Catalogue rows of the partner's pictures used as queries (crops when shipped)."""


def partner_gallery(
    imported: ImportedCatalogue, embedder: Embedder, *, keypoints: KeypointConfig | None = None, progress: bool = True
) -> tuple[Gallery, pd.DataFrame, list[Problem]]:
    """Return the partner's gallery in the local embedder's terms, the pictures behind it, and problems.

    A partner who used the same embedder is used as received. Otherwise its
    entries are re-embedded from the flank crops it shipped (and their keypoint
    features recomputed with `keypoints`); without crops it is refused, saying what
    to ask for.
    """
    gallery, manifest = imported.gallery, imported.manifest
    pictures = imported.crops if imported.crops is not None else gallery.entries[list(COLUMN_NAMES)]
    local = model_fingerprint(embedder)
    if gallery.embedder_fingerprint == local:
        return gallery, pictures.reset_index(drop=True), []
    owner = f"{manifest.get('organisation', '?')} ({manifest.get('namespace', '?')})"
    if imported.crops is None:
        raise ReidError(
            f"{imported.folder}: {owner} built their catalogue with embedder {gallery.embedder_fingerprint[:12]}, "
            f"yours is {local[:12]}, and their archive has no flank crops to re-embed; ask them to export again "
            "with crops (`python share.py mode=export export.crops=true`), or use their embedder"
        )
    crops = imported.crops.reset_index(drop=True)
    embedded = embed_images(embedder, crops, progress=progress)
    problems = list(embedded.problems)
    kept = crops[embedded.ok].reset_index(drop=True)
    hashes = gallery.entries.set_index("annotation_id")["content_hash"]
    entries = kept.assign(content_hash=pd.array(hashes.loc[kept["annotation_id"]].to_numpy(), dtype="string"))
    reembedded = Gallery(entries, embedded.embeddings, local, gallery.index_kind, created=gallery.created)
    if keypoints is not None:
        features, more = extract_rows(kept, keypoints, progress=progress)
        problems += more
        reembedded.keypoints = StoredKeypoints(features, keypoints)
    return reembedded, kept, problems


def find_shared_individuals(
    local: Gallery,
    partner: Gallery,
    partner_pictures: pd.DataFrame,
    out_dir: str | Path,
    *,
    thresholds: Thresholds | None = None,
    fusion: ScoreFusion | None = None,
    top_n: int = 3,
    local_name: str = "local",
    partner_name: str = "partner",
    progress: bool = True,
) -> tuple[SharedCandidates, dict[str, Path], list[Problem]]:
    """Propose which partner individuals are local ones; write candidates.csv and a review report.html.

    Each partner individual's pictures are one "encounter": their per-individual
    scores are pooled over both flanks, each flank searched only against the same
    flank of the local gallery, and scored and decided as infer.py does with the
    local gallery's calibrated scoring and thresholds. Decision "known" proposes an
    equivalence, "review" asks a person to look, "new" means no local animal is close.
    Returns the candidates, the files written and the problems met.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(partner_pictures) != len(partner):
        raise ReidError(f"{len(partner_pictures)} partner pictures for {len(partner)} gallery entries")
    if partner.embedder_fingerprint != local.embedder_fingerprint:
        raise ReidError(
            f"the partner's embeddings come from embedder {partner.embedder_fingerprint[:12]}, the local gallery's "
            f"from {local.embedder_fingerprint[:12]}; re-embed the partner first (`partner_gallery`)"
        )
    problems: list[Problem] = []
    if thresholds is None:
        thresholds = local.thresholds
    if thresholds is None:
        thresholds = UNCALIBRATED
        problems.append(
            Problem(
                "local gallery",
                "thresholds",
                "not calibrated: every pair goes to review; run `infer.py mode=calibrate`",
            )
        )
    fusion = fusion or local.fusion
    queries = partner_pictures.reset_index(drop=True).copy()
    queries["encounter_id"] = pd.array(partner.entries["individual_id"].to_numpy(), dtype="string")
    queries["annotation_id"] = pd.array(partner.entries["annotation_id"].to_numpy(), dtype="string")
    result, config = score_queries(
        local,
        queries,
        partner.embeddings,
        thresholds,
        fusion=fusion,
        query_features=_same_features(partner, local),
        top_n=top_n,
        problems=problems,
        progress=progress,
    )
    first = result.decisions.drop_duplicates("encounter_id").set_index("encounter_id")
    sides = queries.groupby("encounter_id")["side"].agg(lambda s: "+".join(sorted(set(s))))
    ranked = result.matches[result.matches["query"].isin(first["query"])]
    partner_of = dict(zip(queries["annotation_id"], queries["encounter_id"], strict=True))
    partner_ids = [partner_of[q] for q in ranked["query"]]
    pairs = pd.DataFrame(
        {
            "partner_id": partner_ids,
            "local_id": ranked["individual_id"].to_numpy(),
            "rank": ranked["rank"].to_numpy(),
            "score": ranked["score"].to_numpy(),
            "decision": [
                first.loc[p, "decision"] if r == 1 else "" for p, r in zip(partner_ids, ranked["rank"], strict=True)
            ],
            "partner_sides": [sides.loc[p] for p in partner_ids],
            CONFIRM_COLUMN: "",
        }
    )
    candidates = SharedCandidates(pairs.reset_index(drop=True), result, queries)
    files = {"candidates": write_candidates(candidates, out_dir / "candidates.csv")}
    pictures = evidence_pictures(out_dir, result, queries, local, config, problems) if config is not None else {}
    decided = first["decision"].value_counts().to_dict()
    summary = (
        f"{partner_name}: {len(first)} individuals ({len(queries)} pictures) matched against {local_name}: "
        f"{len(local)} pictures of {local.entries['individual_id'].nunique()} individuals. Proposed shared: "
        f"{decided.get(KNOWN, 0)}; to review: {decided.get(REVIEW, 0)}; no close local animal: "
        f"{decided.get(NEW, 0)}. Confirm pairs on the review page (`python infer.py mode=review "
        f"review.run={out_dir}`) or by writing yes in the `confirmed` column of candidates.csv, then run "
        "`python share.py mode=confirm`. Nothing is renamed until then."
    )
    cards = encounter_cards(
        out_dir, result.decisions, result.matches, queries, local.entries, evidence=pictures, problems=problems
    )
    with atomic_write(out_dir / ENCOUNTERS_FILE) as f:
        json.dump(cards, f, indent=1)
    files["run"] = RunInfo(
        run_id=uuid.uuid4().hex,
        gallery=str(local.folder or ""),
        gallery_id=local.identity,
        gallery_version=local.version or "",
        software_version=__version__,
        kind="shared",
        partner=partner_name,
    ).save(out_dir)
    files["report"] = write_report(
        out_dir,
        cards,
        thresholds=thresholds,
        problems=problems,
        title=f"Shared individuals: {partner_name} vs {local_name}",
        summary=summary,
        score_label=fusion.method,
    )
    return candidates, files, problems


def _same_features(partner: Gallery, local: Gallery) -> list[Features] | None:
    """Return the partner's stored keypoint features if they were made with the local gallery's settings."""
    theirs, ours = partner.keypoints, local.keypoints
    if theirs is None or ours is None or theirs.config != ours.config:
        return None
    return list(theirs.features)


def write_candidates(candidates: SharedCandidates, path: str | Path) -> Path:
    """Write the proposed pairs as CSV for review: fill `confirmed` with yes for the pairs you confirm."""
    return write_csv(candidates.pairs, path)


def run_export(
    gallery_dir: str | Path,
    out: str | Path,
    *,
    organisation: str,
    namespace: str,
    precision_deg: float = 0.1,
    exact_coordinates: bool = False,
    crops: bool = True,
    progress: bool = True,
) -> Outcome:
    """`share.py mode=export`: write the local catalogue as an archive for a partner."""
    archive = export_catalogue(
        gallery_dir,
        out,
        organisation=organisation,
        namespace=namespace,
        precision_deg=precision_deg,
        exact_coordinates=exact_coordinates,
        crops=crops,
        progress=progress,
    )
    return Outcome({"archive": archive})


def run_import(archive: str | Path | None, partners_dir: str | Path, *, progress: bool = True) -> Outcome:
    """`share.py mode=import`: install a partner's archive under `partners_dir`/<namespace>."""
    if not archive:
        raise ReidError("mode=import needs archive=/path/to/partner-catalogue.tar.gz")
    return Outcome({"partner": import_catalogue(archive, partners_dir, progress=progress).folder})


def run_shared(
    gallery_dir: str | Path,
    partner_dir: str | Path | None,
    embedder: Embedder,
    out_dir: str | Path,
    *,
    top_n: int = 3,
    progress: bool = True,
) -> Outcome:
    """`share.py mode=shared`: propose which partner individuals are local ones (candidates.csv, report.html)."""
    if not partner_dir:
        raise ReidError("mode=shared needs partner=<an imported partner folder>, e.g. partner=partners/TM")
    local = Gallery.load(gallery_dir)
    stored = local.keypoints
    theirs, pictures, problems = partner_gallery(
        load_imported(partner_dir), embedder, keypoints=stored.config if stored else None, progress=progress
    )
    _, files, more = find_shared_individuals(
        local, theirs, pictures, out_dir, top_n=top_n, partner_name=Path(partner_dir).name, progress=progress
    )
    return Outcome(files, problems + more)


def run_confirm(
    aliases_path: str | Path,
    candidates: str | Path | None,
    partner_dir: str | Path | None,
    *,
    confirmed_by: str | None,
    namespace: str,
    note: str = "",
) -> Outcome:
    """`share.py mode=confirm`: add the pairs a person confirmed to the alias table: marked yes in candidates.csv,
    or, given the run folder of mode=shared, confirmed on the review page (`infer.py mode=review review.run=...`)."""
    if not candidates or not partner_dir or not (confirmed_by or Path(candidates).is_dir()):
        raise ReidError(
            "mode=confirm needs candidates=<the mode=shared run folder reviewed on the review page, or its "
            'candidates.csv with confirmed = yes>, partner=<its partner folder> and, for a CSV, confirmed_by="name"'
        )
    if Path(candidates).is_dir():
        by_reviewers = reviewed_pairs(candidates)
    elif Path(candidates).is_file():
        by_reviewers = {str(confirmed_by): pd.read_csv(candidates, dtype=str, keep_default_na=False)}
    else:
        raise ReidError(f"{candidates}: no such file; give the run folder or candidates.csv that mode=shared wrote")
    problems: list[Problem] = []
    for reviewers, reviewed in by_reviewers.items():
        _, more = confirm_aliases(
            aliases_path,
            reviewed,
            confirmed_by=str(confirmed_by or reviewers),
            local_namespace=namespace,
            partner_namespace=load_imported(partner_dir).manifest["namespace"],
            note=note,
        )
        problems += more
    return Outcome({"aliases": Path(aliases_path)}, problems)


def reviewed_pairs(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Return the candidate pairs of a shared run with `confirmed` = yes where its review confirmed them, grouped
    by who confirmed them ("ana; ben")."""
    run = MatchRun.load(run_dir)
    if run.info.kind != "shared":
        raise ReidError(f"{run_dir} is a match run, not a mode=shared run: enrol it with `infer.py mode=enrol`")
    candidates = pd.read_csv(Path(run_dir) / "candidates.csv", dtype=str, keep_default_na=False)
    states = encounter_states(run.log().read(known_ids=set(candidates["local_id"])))
    groups: dict[str, pd.DataFrame] = {}
    for partner_id, state in states.items():
        same = (candidates["partner_id"] == partner_id) & (candidates["local_id"] == state.individual_id)
        if state.status != "confirmed" or not same.any():
            continue
        reviewers = "; ".join(sorted({reviewer for reviewer, _, _ in state.answers}))
        pair = candidates[same].head(1).assign(**{CONFIRM_COLUMN: "yes"})
        groups[reviewers] = pd.concat([groups.get(reviewers, pair.iloc[0:0]), pair], ignore_index=True)
    return groups


def merged_entries(gallery_dir: str | Path, partner_dir: str | Path | None, aliases_path: str | Path) -> pd.DataFrame:
    """Return the local catalogue's captures, merged with a partner's through the alias table when one is given."""
    local = Gallery.load(gallery_dir).entries
    if not partner_dir:
        return local
    return merged_catalogue(local, Gallery.load(partner_dir).entries, load_aliases(aliases_path))


def run_merged_count(
    gallery_dir: str | Path,
    partner_dir: str | Path | None,
    aliases_path: str | Path,
    out_dir: str | Path,
    *,
    count_by: tuple[str, ...] = ("country",),
) -> Outcome:
    """`share.py mode=count`: minimum/maximum counts, each aliased animal once when a partner is given."""
    counts = count_table(merged_entries(gallery_dir, partner_dir, aliases_path), by=count_by)
    return Outcome({"counts": write_counts(counts, out_dir)})


def run_capture_histories(
    gallery_dir: str | Path,
    partner_dir: str | Path | None,
    aliases_path: str | Path,
    out_dir: str | Path,
    *,
    occasion_days: float = 1,
    start: str | None = None,
    session: str = "1",
) -> Outcome:
    """`share.py mode=capture_histories`: secr and multimark inputs of the (merged) catalogue."""
    catalogue = merged_entries(gallery_dir, partner_dir, aliases_path)
    return Outcome(
        write_capture_histories(catalogue, out_dir, occasion_days=occasion_days, start=start, session=session)
    )


def run_camtrap_dp(
    gallery_dir: str | Path,
    out_dir: str | Path,
    *,
    organisation: str,
    schemas_dir: str | Path | None,
    precision_deg: float = 0.1,
    exact_coordinates: bool = False,
) -> Outcome:
    """`share.py mode=camtrap_dp`: the local catalogue as a Camtrap DP package, validated offline."""
    package, problems = write_camtrap_dp(
        Gallery.load(gallery_dir).entries,
        Path(out_dir) / "camtrap-dp",
        organisation=organisation,
        schemas_dir=schemas_dir,
        precision_deg=precision_deg,
        exact_coordinates=exact_coordinates,
    )
    return Outcome({"camtrap_dp": package}, problems)
