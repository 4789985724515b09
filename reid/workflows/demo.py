"""The demos: every step of `infer.py` and of `share.py` on synthetic leopards whose true identities are known.

The only place outside tests where the synthetic generator meets the workflows:
each demo ends with a truth check that compares what the software decided with
the truth.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reid.aliases import CONFIRM_COLUMN, confirm_aliases, merged_catalogue, merged_counts
from reid.census import count_individuals
from reid.decisions import KNOWN, NEW, UNREADABLE, Thresholds
from reid.ecology import write_camtrap_dp, write_capture_histories
from reid.errors import Problem, ReidError
from reid.files import atomic_write, write_csv
from reid.fusion import ScoreFusion
from reid.gallery import Gallery
from reid.importers import Source, load_source
from reid.index import IndexKind
from reid.keypoints import KeypointConfig
from reid.models import Embedder
from reid.sharing import export_catalogue, import_catalogue
from reid.splits import split_catalogue
from reid.synthetic import country_catalogues, load_individuals
from reid.workflows.build import build_gallery
from reid.workflows.calibrate import CalibrationSettings, calibrate_gallery
from reid.workflows.common import Outcome
from reid.workflows.match import match
from reid.workflows.shared import find_shared_individuals, partner_gallery


def evaluate_against_truth(
    decisions: pd.DataFrame, truth: pd.DataFrame, enrolled: set[str], counts: Mapping[str, Any]
) -> dict[str, Any]:
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


def run_infer_demo(
    population: Source,
    embedder: Embedder,
    run_dir: str | Path,
    *,
    unseen_fraction: float = 0.25,
    query_fraction: float = 0.3,
    seed: int = 0,
    index_kind: IndexKind = "flat",
    keypoints: KeypointConfig | None = None,
    fusion: ScoreFusion | None = None,
    calibration: CalibrationSettings | None = None,
    k: int = 50,
    top_n: int = 5,
    new_prefix: str | None = None,
    count_by: tuple[str, ...] = ("country",),
    period: str | None = None,
    progress: bool = True,
) -> Outcome:
    """Run build, calibrate, match and count on a labelled population; return the files, problems and truth check.

    Some individuals are left out of the gallery, so their captures should come
    out "new"; held-out encounters of the others should be recognised.
    """
    population, problems = load_source(population)
    run_dir = Path(run_dir)
    split = split_catalogue(
        population, "open_set", unseen_fraction=unseen_fraction, test_fraction=query_fraction, seed=seed
    )
    reference = population[(split == "train").to_numpy()].reset_index(drop=True)
    queries = population[(split == "test").to_numpy()].reset_index(drop=True)
    gallery_dir = run_dir / "gallery"
    gallery, more = build_gallery(
        reference, embedder, gallery_dir, index_kind=index_kind, keypoints=keypoints, progress=progress
    )
    problems += more
    thresholds: Thresholds | None = None
    try:
        thresholds, _, more = calibrate_gallery(
            gallery, gallery_dir, fusion=fusion, settings=calibration, progress=progress
        )
    except ReidError as err:  # a population too small to calibrate still matches: everything goes to review
        more = [Problem(str(gallery_dir), "calibration", str(err))]
    result, outcome = match(
        queries,
        embedder,
        gallery,
        run_dir,
        thresholds=thresholds,
        k=k,
        top_n=top_n,
        new_prefix=new_prefix,
        count_by=count_by,
        period=period,
        import_problems=problems + more,
        progress=progress,
    )
    counts = json.loads(outcome.files["counts"].read_text())
    truth = evaluate_against_truth(result.decisions, queries, set(gallery.entries["individual_id"]), counts["combined"])
    truth["count_holds_truth_everywhere"] = _holds_truth(counts, queries, count_by) if period is None else None
    with atomic_write(run_dir / "evaluation.json") as f:
        used = asdict(thresholds) if thresholds is not None else None
        json.dump({"scoring": gallery.fusion.method, "thresholds": used, "truth": truth}, f, indent=2)
    outcome.files["evaluation"] = run_dir / "evaluation.json"
    outcome.files["gallery"] = gallery_dir
    outcome.summary = {"truth check": truth}
    return outcome


def _holds_truth(counts: Mapping[str, Any], queries: pd.DataFrame, count_by: tuple[str, ...]) -> bool:
    """Return whether the count interval holds the true number of individuals overall and in every group."""
    true_all = queries["individual_id"].nunique()
    true_by = queries.groupby(list(count_by))["individual_id"].nunique() if count_by else pd.Series(dtype=int)
    inside = counts["combined"]["minimum"] <= true_all <= counts["combined"]["maximum"]
    for group in counts["groups"]:
        key = tuple(group[c] for c in count_by)
        truth = true_by.get(key if len(key) > 1 else key[0], 0)
        inside &= group["minimum"] <= truth <= group["maximum"]
    return bool(inside)


def run_share_demo(
    dataset: Path,
    embedder: Embedder,
    run_dir: str | Path,
    *,
    schemas_dir: str | Path | None = None,
    shortlist: int = 200,
    progress: bool = True,
) -> Outcome:
    """Run every sharing step on a synthetic population seen by two teams; return files, a truth check, problems.

    Each team (KZ, TM) builds and calibrates its own gallery with its own IDs; TM
    exports an archive, KZ imports it, matches it, and (standing in for the person
    who reviews the report) confirms the pairs decided "known"; merged counts and
    the ecology exports follow. The truth check compares with the true identities.
    """
    run_dir = Path(run_dir)
    individuals = load_individuals(Path(dataset).parent / "individuals.csv")
    population, problems = load_source(dataset)
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
        calibrate_gallery(gallery, folders[country], fusion=ScoreFusion("fused", shortlist), progress=progress)
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
    files["counts"] = write_csv(counts.drop(columns="individuals"), run_dir / "merged_counts.csv")
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
    return Outcome(files, problems, {"truth check": check})
