"""Across the border: two synthetic catalogues with animals in both, shared, matched, aliased and counted once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reid.aliases import CONFIRM_COLUMN, confirm_aliases, load_aliases, merged_catalogue, merged_counts
from reid.catalogue import build_catalogue, load_catalogue
from reid.census import count_individuals
from reid.errors import ReidError
from reid.evidence import EVIDENCE_DIR
from reid.fusion import ScoreFusion
from reid.gallery import Gallery
from reid.keypoints import KeypointConfig
from reid.models import create_embedder, export_embedder, load_embedder, model_fingerprint
from reid.sharing import export_catalogue, import_catalogue
from reid.synthetic import SyntheticConfig, country_catalogues, generate, load_individuals
from reid.workflows import build_gallery, calibrate_gallery, find_shared_individuals, partner_gallery

POPULATION = SyntheticConfig(
    n_individuals=14,
    encounters_per_flank=(2, 3),
    frames_per_encounter=(2, 3),
    image_size=(256, 192),
    both_countries_share=0.3,
    one_side_share=0.15,
    stations=(("KZ", 2), ("TM", 3)),
    seed=5,
)


def _embedder(folder: Path, seed: int):
    torch.manual_seed(seed)
    return load_embedder(export_embedder(create_embedder("resnet18", 32, img_size=64), folder))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """Two teams' galleries of one synthetic population, calibrated on their own entries, and the truth."""
    root = tmp_path_factory.mktemp("border")
    generate(root / "data", POPULATION, progress=False)
    table = load_catalogue(root / "data" / "catalogue.csv")
    truth = load_individuals(root / "data" / "individuals.csv")
    catalogues = country_catalogues(table, truth)
    embedder = _embedder(root / "embedder", 0)
    galleries = {}
    for country, catalogue in catalogues.items():
        folder = root / f"gallery-{country}"
        gallery, problems = build_gallery(catalogue, embedder, folder, keypoints=KeypointConfig(), progress=False)
        assert not [p for p in problems if "already" not in p.message]
        calibrate_gallery(gallery, folder, fusion=ScoreFusion("fused", 500), progress=False)
        galleries[country] = folder
    return {
        "root": root,
        "table": table,
        "truth": truth,
        "catalogues": catalogues,
        "galleries": galleries,
        "embedder": embedder,
    }


@pytest.mark.slow
def test_shared_individuals_are_found_aliased_and_counted_once(world, tmp_path: Path) -> None:
    truth = world["truth"]
    archive = export_catalogue(
        world["galleries"]["TM"],
        tmp_path / "tm.tar.gz",
        organisation="Turkmen team",
        namespace="TM",
        crops=True,
        progress=False,
    )
    imported = import_catalogue(archive, tmp_path / "partners", progress=False)
    local = Gallery.load(world["galleries"]["KZ"])
    partner, pictures, problems = partner_gallery(imported, world["embedder"], progress=False)
    assert problems == []
    candidates, files, _ = find_shared_individuals(
        local, partner, pictures, tmp_path / "review", local_name="KZ", partner_name="TM", progress=False
    )
    assert files["report"].is_file() and files["candidates"].is_file()
    assert len(list((tmp_path / "review" / EVIDENCE_DIR).glob("*.jpg"))) > 0

    shared = truth[(truth["kz_id"] != "") & (truth["tm_id"] != "")]
    true_pairs = set(zip(shared["tm_id"], shared["kz_id"], strict=True))
    assert len(true_pairs) >= 3
    top = candidates.pairs[candidates.pairs["rank"] == 1]
    # Every shared animal is put before the reviewer with the right local ID as its first candidate...
    assert true_pairs <= set(zip(top["partner_id"], top["local_id"], strict=True))
    # ... and every pair proposed as "known" is right.
    known = top[top["decision"] == "known"]
    assert set(zip(known["partner_id"], known["local_id"], strict=True)) <= true_pairs

    # The reviewer confirms the true pairs among the proposals (as they would after looking at the report).
    reviewed = candidates.pairs.copy()
    is_true = np.array(
        [(p, q) in true_pairs for p, q in zip(reviewed["partner_id"], reviewed["local_id"], strict=True)]
    )
    reviewed[CONFIRM_COLUMN] = np.where(is_true & (reviewed["rank"] == 1), "yes", "")
    aliases_path = tmp_path / "aliases.csv"
    aliases, skipped = confirm_aliases(
        aliases_path, reviewed, confirmed_by="A. Analyst", local_namespace="KZ", partner_namespace="TM"
    )
    assert skipped == [] and len(aliases) == len(true_pairs)
    loaded = load_aliases(aliases_path)
    assert set(zip(loaded["partner_id"], loaded["local_id"], strict=True)) == true_pairs
    assert (loaded["confirmed_by"] == "A. Analyst").all() and loaded["confirmed_at"].notna().all()
    # Confirming again adds nothing; IDs in the catalogues themselves are untouched.
    _, skipped = confirm_aliases(
        aliases_path, reviewed, confirmed_by="A. Analyst", local_namespace="KZ", partner_namespace="TM"
    )
    assert len(skipped) == len(true_pairs)
    assert set(Gallery.load(imported.folder).entries["individual_id"]) == set(
        world["catalogues"]["TM"]["individual_id"]
    )

    # Merged minimum count equals the truth: the same count over the true identities of every capture.
    kz, tm = world["catalogues"]["KZ"], world["catalogues"]["TM"]
    merged = merged_counts(kz, tm, loaded)
    all_truth = world["table"][world["table"]["country"].isin(["KZ", "TM"])]
    expected = count_individuals(all_truth).iloc[0]
    combined = merged[merged["country"] == "all"].iloc[0]
    assert (combined["minimum"], combined["maximum"]) == (expected["minimum"], expected["maximum"])
    # Without the aliases the shared animals would be counted twice (in the maximum at least).
    unmerged = merged_counts(kz, tm, load_aliases(tmp_path / "none.csv"))
    assert unmerged[unmerged["country"] == "all"].iloc[0]["maximum"] == expected["maximum"] + len(true_pairs)


def test_conflicting_alias_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "aliases.csv"
    first = pd.DataFrame({"partner_id": ["TM-0001"], "local_id": ["KZ-0001"], CONFIRM_COLUMN: ["yes"], "score": [0.9]})
    confirm_aliases(path, first, confirmed_by="A", local_namespace="KZ", partner_namespace="TM")
    before = path.read_bytes()
    clash = first.assign(local_id=["KZ-0002"])
    with pytest.raises(ReidError, match="conflicts with the recorded KZ-0001 = TM-0001"):
        confirm_aliases(path, clash, confirmed_by="B", local_namespace="KZ", partner_namespace="TM")
    assert path.read_bytes() == before
    with pytest.raises(ReidError, match="who confirmed"):
        confirm_aliases(path, first, confirmed_by=" ", local_namespace="KZ", partner_namespace="TM")
    unconfirmed = first.assign(**{CONFIRM_COLUMN: [""]}, local_id=["KZ-0003"], partner_id=["TM-0003"])
    aliases, _ = confirm_aliases(path, unconfirmed, confirmed_by="A", local_namespace="KZ", partner_namespace="TM")
    assert len(aliases) == 1  # only pairs marked yes are recorded


def test_merged_catalogue_uses_the_local_id_and_refuses_unnamespaced_clashes() -> None:
    def rows(ids: list[str], country: str) -> pd.DataFrame:
        table, _ = build_catalogue(
            [
                {"image_path": f"{country}{i}.jpg", "individual_id": v, "side": "left", "country": country}
                for i, v in enumerate(ids)
            ]
        )
        return table

    local, partner = rows(["KZ-1", "KZ-2"], "KZ"), rows(["TM-9", "TM-8"], "TM")
    aliases = pd.DataFrame({"partner_id": ["TM-9"], "local_id": ["KZ-1"]})
    merged = merged_catalogue(local, partner, aliases)
    assert merged["individual_id"].tolist() == ["KZ-1", "KZ-2", "KZ-1", "TM-8"]
    with pytest.raises(ReidError, match="namespaced"):
        merged_catalogue(local, rows(["KZ-2"], "TM"), aliases)


@pytest.mark.slow
def test_partner_with_another_embedder_is_re_embedded_from_crops_or_refused(world, tmp_path: Path) -> None:
    other = _embedder(tmp_path / "other", 1)
    with_crops = export_catalogue(
        world["galleries"]["TM"],
        tmp_path / "crops.tar.gz",
        organisation="TM team",
        namespace="TM",
        crops=True,
        progress=False,
    )
    imported = import_catalogue(with_crops, tmp_path / "a", progress=False)
    gallery, pictures, _ = partner_gallery(imported, other, keypoints=KeypointConfig(), progress=False)
    assert gallery.embedder_fingerprint == model_fingerprint(other)
    assert gallery.entries["individual_id"].tolist() == imported.gallery.entries["individual_id"].tolist()
    assert len(pictures) == len(gallery) and gallery.keypoints is not None

    bare = export_catalogue(
        world["galleries"]["TM"], tmp_path / "bare.tar.gz", organisation="TM team", namespace="TM", progress=False
    )
    imported = import_catalogue(bare, tmp_path / "b", progress=False)
    with pytest.raises(ReidError, match="export again with crops"):
        partner_gallery(imported, other, progress=False)


def test_hand_edited_alias_table_with_an_unreadable_score_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "aliases.csv"
    pd.DataFrame([{"local_id": "KZ-1", "partner_id": "TM-9", "score": "n/a", "confirmed_by": "A"}]).reindex(
        columns=[
            "local_id",
            "partner_id",
            "local_namespace",
            "partner_namespace",
            "score",
            "sides",
            "confirmed_by",
            "confirmed_at",
            "note",
        ]
    ).to_csv(path, index=False)
    aliases = load_aliases(path)
    assert aliases["local_id"].tolist() == ["KZ-1"] and aliases["score"].isna().all()
    with pytest.raises(ReidError, match="without columns"):
        pd.DataFrame({"local_id": ["KZ-1"]}).to_csv(path, index=False)
        load_aliases(path)
