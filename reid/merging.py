"""Across the border: find the individuals two catalogues share, record confirmed aliases, count once.

Each team keeps its own IDs (`KZ-0007`, `TM-0031`). Matching one catalogue
against the other proposes pairs (same side only; both flanks' evidence pooled per
individual) for people to review in a report; only pairs a person confirms enter
the alias table, with who confirmed them and when. Nothing is renamed: merged
counts read the alias table, so an animal known to both teams counts once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from reid.analysis import (
    build_gallery,
    calibrate_gallery,
    evidence_pictures,
    gallery_keypoints,
    score_queries,
    scoring_of,
    thresholds_of,
    write_table,
)
from reid.catalogue import COLUMN_NAMES
from reid.census import count_individuals
from reid.ecology import (
    export_camtrap_dp,
    multimark_histories,
    secr_capture_history,
    validate_camtrap_dp,
    write_multimark,
    write_secr,
)
from reid.errors import Problem, ReidError
from reid.files import atomic_write
from reid.fusion import KEYPOINTS_FILE, ScoreFusion
from reid.gallery import Gallery
from reid.keypoints import Features, KeypointConfig, extract_rows, features_to_bytes
from reid.matching import KNOWN, NEW, REVIEW, MatchResult, Thresholds
from reid.models import Embedder, embed_images, model_fingerprint
from reid.report import write_report
from reid.sharing import ImportedCatalogue, export_catalogue, import_catalogue
from reid.synthetic import country_catalogues

ALIAS_COLUMNS = (
    "local_id",
    "partner_id",
    "local_namespace",
    "partner_namespace",
    "score",
    "sides",
    "confirmed_by",
    "confirmed_at",
    "note",
)
CONFIRM_COLUMN = "confirmed"
YES = {"yes", "y", "true", "1", "x"}


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
        reembedded.extra_files[KEYPOINTS_FILE] = features_to_bytes(features, keypoints)
    return reembedded, kept, problems


def find_shared_individuals(
    local: Gallery,
    partner: Gallery,
    partner_pictures: pd.DataFrame,
    out_dir: str | Path,
    *,
    thresholds: Thresholds | None = None,
    scoring: ScoreFusion | None = None,
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
    thresholds = thresholds or thresholds_of(local)
    scoring = scoring or scoring_of(local)
    problems: list[Problem] = []
    queries = partner_pictures.reset_index(drop=True).copy()
    queries["encounter_id"] = pd.array(partner.entries["individual_id"].to_numpy(), dtype="string")
    queries["annotation_id"] = pd.array(partner.entries["annotation_id"].to_numpy(), dtype="string")
    result, config = score_queries(
        local,
        queries,
        partner.embeddings,
        thresholds,
        scoring=scoring,
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
        f"{decided.get(NEW, 0)}. Confirm pairs by writing yes in the `confirmed` column of candidates.csv, then "
        "run `python share.py mode=confirm`. Nothing is renamed until then."
    )
    files["report"] = write_report(
        out_dir,
        result.decisions,
        result.matches,
        queries,
        local.entries,
        thresholds=thresholds,
        problems=problems,
        title=f"Shared individuals: {partner_name} vs {local_name}",
        summary=summary,
        evidence=pictures,
        score_label=scoring.method,
    )
    return candidates, files, problems


def _same_features(partner: Gallery, local: Gallery) -> list[Features] | None:
    """Return the partner's stored keypoint features if they were made with the local gallery's settings."""
    theirs, ours = gallery_keypoints(partner), gallery_keypoints(local)
    if theirs is None or ours is None or theirs[1] != ours[1]:
        return None
    return theirs[0]


def write_candidates(candidates: SharedCandidates, path: str | Path) -> Path:
    """Write the proposed pairs as CSV for review: fill `confirmed` with yes for the pairs you confirm."""
    with atomic_write(path) as f:
        candidates.pairs.to_csv(f, index=False)
    return Path(path)


def empty_aliases() -> pd.DataFrame:
    """Return an alias table with no rows."""
    return pd.DataFrame({c: pd.Series(dtype="string") for c in ALIAS_COLUMNS}).astype({"score": float})


def load_aliases(path: str | Path) -> pd.DataFrame:
    """Read the alias table (empty if the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return empty_aliases()
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ReidError(f"{path}: not a readable alias table ({err}); restore it from a backup") from err
    missing = [c for c in ALIAS_COLUMNS if c not in table.columns]
    if missing:
        raise ReidError(f"{path}: alias table without columns {missing}; restore it from a backup")
    table = table[list(ALIAS_COLUMNS)].replace("", pd.NA).astype("string")
    # The score is a record of the evidence, not a key: an unreadable one is kept as missing.
    table["score"] = pd.to_numeric(table["score"], errors="coerce")
    return table


def confirm_aliases(
    aliases_path: str | Path,
    reviewed: pd.DataFrame,
    *,
    confirmed_by: str,
    local_namespace: str,
    partner_namespace: str,
    note: str = "",
    when: datetime | None = None,
) -> tuple[pd.DataFrame, list[Problem]]:
    """Add the reviewed pairs marked confirmed (`confirmed` = yes) to the alias table; return it and what was skipped.

    A pair already recorded is skipped; an ID already aliased to another ID of the
    same partner catalogue is refused (one of the catalogues then holds one animal
    twice, which its keepers must resolve first). The table is written atomically.
    """
    if not str(confirmed_by).strip():
        raise ReidError('say who confirmed the pairs (confirmed_by="name"): the alias table records it')
    missing = [c for c in ("partner_id", "local_id", CONFIRM_COLUMN) if c not in reviewed.columns]
    if missing:
        raise ReidError(f"the reviewed pairs have no columns {missing}; use the candidates.csv written by mode=shared")
    aliases = load_aliases(aliases_path)
    stamp = (when or datetime.now(UTC)).isoformat(timespec="seconds")
    problems: list[Problem] = []
    rows = []
    confirmed = reviewed[reviewed[CONFIRM_COLUMN].fillna("").astype(str).str.strip().str.lower().isin(YES)]
    for pair in confirmed.itertuples(index=False):
        local_id, partner_id = str(pair.local_id), str(pair.partner_id)
        same_partner = aliases["partner_namespace"] == partner_namespace
        linked = aliases[same_partner & ((aliases["local_id"] == local_id) | (aliases["partner_id"] == partner_id))]
        if ((linked["local_id"] == local_id) & (linked["partner_id"] == partner_id)).any():
            problems.append(Problem(str(aliases_path), f"{local_id} = {partner_id}", "already recorded; skipped"))
            continue
        if len(linked):
            other = linked.iloc[0]
            raise ReidError(
                f"{local_id} = {partner_id} conflicts with the recorded {other['local_id']} = {other['partner_id']} "
                f"(confirmed by {other['confirmed_by']}); one catalogue holds one animal under two IDs: merge them "
                "there first, or correct the alias table"
            )
        rows.append(
            {
                "local_id": local_id,
                "partner_id": partner_id,
                "local_namespace": local_namespace,
                "partner_namespace": partner_namespace,
                "score": float(getattr(pair, "score", np.nan)),
                "sides": str(getattr(pair, "partner_sides", "")),
                "confirmed_by": str(confirmed_by),
                "confirmed_at": stamp,
                "note": note,
            }
        )
        aliases = pd.concat([aliases, pd.DataFrame([rows[-1]]).astype({"score": float})], ignore_index=True)
    if rows or not Path(aliases_path).exists():
        with atomic_write(aliases_path) as f:
            aliases.to_csv(f, index=False)
    return aliases, problems


def merged_catalogue(local: pd.DataFrame, partner: pd.DataFrame, aliases: pd.DataFrame) -> pd.DataFrame:
    """Return both catalogues' captures as one table where aliased individuals share one ID (the local one).

    Each partner ID with a confirmed alias is written as its local ID; the others
    keep their own namespaced IDs, so no two different animals share an ID and no
    ID is changed in either catalogue itself.
    """
    to_local = dict(zip(aliases["partner_id"].astype(str), aliases["local_id"].astype(str), strict=True))
    partner = partner[list(COLUMN_NAMES)].copy()
    partner["individual_id"] = pd.array(
        [to_local.get(str(i), i) if not pd.isna(i) else i for i in partner["individual_id"]], dtype="string"
    )
    clash = set(local["individual_id"].dropna()) & set(partner["individual_id"].dropna()) - set(to_local.values())
    if clash:
        raise ReidError(
            f"IDs {sorted(clash)[:5]} are used by both catalogues for animals not recorded as aliases; IDs must be "
            "namespaced by their catalogue (KZ-..., TM-...)"
        )
    return pd.concat([local[list(COLUMN_NAMES)], partner], ignore_index=True)


def merged_counts(
    local: pd.DataFrame, partner: pd.DataFrame, aliases: pd.DataFrame, *, by: tuple[str, ...] = ("country",)
) -> pd.DataFrame:
    """Return minimum/maximum counts per group and for everything combined, counting aliased animals once."""
    merged = merged_catalogue(local, partner, aliases)
    combined = count_individuals(merged).assign(**{c: "all" for c in by})
    return pd.concat([combined, count_individuals(merged, by=list(by))], ignore_index=True)


def write_capture_histories(
    catalogue: pd.DataFrame,
    out_dir: str | Path,
    *,
    occasion_days: float = 1,
    start: str | None = None,
    session: str = "1",
) -> dict[str, Path]:
    """Write secr capture and trap files (one pair per flank) and multimark histories into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for side in ("left", "right"):
        captures, traps = secr_capture_history(
            catalogue, occasion_days=occasion_days, start=start, side=side, session=session
        )
        files[f"secr_{side}"] = out_dir / f"secr_captures_{side}.txt"
        files[f"secr_traps_{side}"] = out_dir / f"secr_traps_{side}.txt"
        write_secr(captures, traps, files[f"secr_{side}"], files[f"secr_traps_{side}"])
    files["multimark"] = out_dir / "multimark.csv"
    write_multimark(multimark_histories(catalogue, occasion_days=occasion_days, start=start), files["multimark"])
    return files


def write_camtrap_dp(
    catalogue: pd.DataFrame,
    out_dir: str | Path,
    *,
    organisation: str,
    schemas_dir: str | Path | None,
    precision_deg: float = 0.1,
    exact_coordinates: bool = False,
) -> tuple[Path, list[Problem]]:
    """Export the catalogue as a Camtrap DP package and validate it offline; return it and any validation errors."""
    package = export_camtrap_dp(
        catalogue, out_dir, organisation=organisation, precision_deg=precision_deg, exact_coordinates=exact_coordinates
    )
    if schemas_dir is None or not Path(schemas_dir).is_dir():
        return package, [
            Problem(
                str(package),
                "validation",
                f"not validated: no Camtrap DP schemas at {schemas_dir}; set "
                "camtrap_dp_schemas to a folder with the official table schemas",
            )
        ]
    return package, [Problem(str(package), "validation", error) for error in validate_camtrap_dp(package, schemas_dir)]


def run_demo(
    population: pd.DataFrame,
    individuals: pd.DataFrame,
    embedder: Embedder,
    run_dir: str | Path,
    *,
    schemas_dir: str | Path | None = None,
    shortlist: int = 200,
    progress: bool = True,
) -> tuple[dict[str, Path], dict, list[Problem]]:
    """Run every sharing step on a synthetic population seen by two teams; return files, a truth check, problems.

    Each team (KZ, TM) builds and calibrates its own gallery with its own IDs; TM
    exports an archive, KZ imports it, matches it, and (standing in for the person
    who reviews the report) confirms the pairs decided "known"; merged counts and
    the ecology exports follow. The truth check compares with the true identities.
    """
    run_dir = Path(run_dir)
    problems: list[Problem] = []
    catalogues = country_catalogues(population, individuals)
    missing = {"KZ", "TM"} - set(catalogues)
    if missing:
        raise ReidError(f"the demo population has no {sorted(missing)} captures; use stations in KZ and TM")
    folders = {}
    for country in ("KZ", "TM"):
        folders[country] = run_dir / f"gallery-{country}"
        gallery, more = build_gallery(
            catalogues[country], embedder, folders[country], keypoints=KeypointConfig(), progress=progress
        )
        problems += more
        calibrate_gallery(gallery, folders[country], scoring=ScoreFusion("fused", shortlist), progress=progress)
    files: dict[str, Path] = {}
    files["archive"] = export_catalogue(
        folders["TM"],
        run_dir / "TM-catalogue.tar.gz",
        organisation="Turkmen team (demo)",
        namespace="TM",
        crops=True,
        progress=progress,
    )
    imported = import_catalogue(files["archive"], run_dir / "partners", progress=progress)
    partner, pictures, more = partner_gallery(imported, embedder, progress=progress)
    problems += more
    local = Gallery.load(folders["KZ"])
    candidates, written, more = find_shared_individuals(
        local, partner, pictures, run_dir, local_name="KZ", partner_name="TM", progress=progress
    )
    files.update(written)
    problems += more
    reviewed = candidates.pairs.assign(**{CONFIRM_COLUMN: np.where((candidates.pairs["decision"] == KNOWN), "yes", "")})
    files["aliases"] = run_dir / "aliases.csv"
    aliases, _ = confirm_aliases(
        files["aliases"],
        reviewed,
        confirmed_by="demo: every pair decided known",
        local_namespace="KZ",
        partner_namespace="TM",
        note="synthetic demo; a person confirms pairs in real use",
    )
    counts = merged_counts(catalogues["KZ"], catalogues["TM"], aliases)
    files["counts"] = write_table(counts.drop(columns="individuals"), run_dir / "merged_counts.csv")
    files.update(write_capture_histories(merged_catalogue(catalogues["KZ"], catalogues["TM"], aliases), run_dir))
    files["camtrap_dp"], more = write_camtrap_dp(
        catalogues["KZ"], run_dir / "camtrap-dp-KZ", organisation="Kazakh team (demo)", schemas_dir=schemas_dir
    )
    problems += more
    shared = individuals[(individuals["kz_id"] != "") & (individuals["tm_id"] != "")]
    true_pairs = set(zip(shared["tm_id"], shared["kz_id"], strict=True))
    found = set(zip(aliases["partner_id"], aliases["local_id"], strict=True))
    truth = count_individuals(population[population["country"].isin(["KZ", "TM"])]).iloc[0]
    combined = counts[counts["country"] == "all"].iloc[0]
    check = {
        "shared_individuals_true": len(true_pairs),
        "aliases_confirmed": len(found),
        "aliases_right": len(found & true_pairs),
        "aliases_wrong": len(found - true_pairs),
        "merged_minimum": int(combined["minimum"]),
        "true_minimum": int(truth["minimum"]),
        "merged_maximum": int(combined["maximum"]),
        "true_individuals": int(population["individual_id"].nunique()),
    }
    with atomic_write(run_dir / "truth_check.json") as f:
        json.dump(check, f, indent=2)
    files["truth_check"] = run_dir / "truth_check.json"
    return files, check, problems
