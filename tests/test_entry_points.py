"""infer.py and share.py: their configs compose, and every mode runs through its dispatch table on a tiny catalogue.

The configs are composed with Hydra's compose API and each mode is called the way
`main` calls it, in-process, with a tiny untrained embedder: fast enough for the
default test run. (test_infer.py and test_share_cli.py run the demos as commands.)
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import torch
from conftest import write_flank_catalogue
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from reid.gallery import Gallery
from reid.models import create_embedder, export_embedder
from reid.review import MatchRun

REPO = Path(__file__).resolve().parents[1]


def _entry_point(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"entry_{name}", REPO / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A labels CSV of 5 individuals (both flanks, 3 encounters each) and a tiny exported embedder."""
    root = tmp_path_factory.mktemp("entry")
    (root / "images").mkdir()
    table = write_flank_catalogue(root / "images", n_individuals=5)
    labels = table[["image_path", "individual_id", "side", "encounter_id", "timestamp", "station"]].copy()
    labels["bbox_x"], labels["bbox_y"], labels["bbox_w"], labels["bbox_h"] = (
        table["bbox_x"],
        table["bbox_y"],
        table["bbox_w"],
        table["bbox_h"],
    )
    labels["latitude"], labels["longitude"] = 43.51, 54.23  # one station on the Ustyurt plateau
    labels.to_csv(root / "labels.csv", index=False)
    torch.manual_seed(0)
    embedder = export_embedder(
        create_embedder("test_convnext", 16, img_size=64, crop_margin=0.05), root / "train" / "embedder"
    )
    return {"root": root, "labels": root / "labels.csv", "embedder": embedder}


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def _compose(name: str, world: dict[str, Path], run: str, *overrides: str) -> DictConfig:
    # paths.* come from the running Hydra app; compose() has none, so the test sets them.
    return compose(
        name,
        overrides=[
            f"paths.root={world['root']}",
            f"paths.run_dir={world['root'] / run}",
            f"paths.shared_data={REPO.parent / 'shared' / 'data'}",
            "progress=false",
            *overrides,
        ],
    )


def _run(module: ModuleType, cfg: DictConfig) -> object:
    Path(cfg.paths.run_dir).mkdir(parents=True, exist_ok=True)
    return module.MODES[cfg.mode](cfg)


def test_every_infer_and_share_mode_runs_from_its_config(world: dict[str, Path], hydra_conf: None) -> None:
    infer, share = _entry_point("infer"), _entry_point("share")
    assert set(infer.MODES) == {"demo", "build", "calibrate", "match", "review", "enrol", "count"}
    assert set(share.MODES) == {
        "demo",
        "export",
        "import",
        "shared",
        "confirm",
        "count",
        "camtrap_dp",
        "capture_histories",
    }
    gallery = world["root"] / "gallery"
    data = ["data=labels_csv", f"data.source.path={world['labels']}", "data.source.country=KZ"]
    small = ["scoring.shortlist=20", "keypoints.max_side_px=128", "k=10", f"embedder={world['embedder']}"]

    built = _run(infer, _compose("infer", world, "build", "mode=build", *data, *small))
    assert Gallery.load(gallery).entries["individual_id"].nunique() == 5 and built.problems == []  # type: ignore[attr-defined]

    calibrated = _run(infer, _compose("infer", world, "calibrate", "mode=calibrate", *small))
    stored = Gallery.load(gallery)
    # The default preset (conf/matching/weight_free.yaml) fuses the embedding, RootSIFT and LNBNN.
    assert stored.thresholds is not None and stored.fusion.parts == ("embedding", "keypoints", "lnbnn")
    assert stored.fusion.calibrated and stored.fusion.ranker == "union"
    assert len(pd.read_csv(calibrated.files["scores"])) > 0  # type: ignore[attr-defined]

    matched = _run(infer, _compose("infer", world, "match", "mode=match", *data, *small))
    decisions = pd.read_csv(matched.files["decisions"])  # type: ignore[attr-defined]
    assert len(decisions) == len(stored) and set(decisions["decision"]) <= {"known", "review", "new"}
    matches = pd.read_csv(matched.files["matches"], dtype=str)  # type: ignore[attr-defined]
    assert matches["rank"].str.fullmatch(r"\d+").all()  # written as integers, not 1.0

    # The analyst confirms one encounter on the review page (its log row, written as the page writes it), then
    # enrols it and recounts; mode=review itself is run as a command by test_review.py.
    review_run = [f"review.run={world['root'] / 'match'}"]
    first = decisions.iloc[0]
    run = MatchRun.load(world["root"] / "match")
    run.log().append(reviewer="ana", encounter_id=first["encounter_id"], action="new")
    enrolled = _run(infer, _compose("infer", world, "enrol", "mode=enrol", *review_run, *small))
    # This card holds the gallery's own pictures: they are reported as already there, not enrolled twice.
    assert enrolled.summary["enrolled"]["captures"] == 0  # type: ignore[attr-defined]
    assert enrolled.summary["enrolled"]["already in the gallery"] == first["n_in_encounter"]  # type: ignore[attr-defined]
    recounted = _run(infer, _compose("infer", world, "recount", "mode=count", "count_from=review", *review_run))
    assert recounted.files["individuals"].is_file()  # type: ignore[attr-defined]

    counted = _run(infer, _compose("infer", world, "count", "mode=count", *data))
    counts = json.loads(counted.files["counts"].read_text())  # type: ignore[attr-defined]
    assert counts[0]["country"] == "all" and counts[0]["minimum"] == counts[0]["maximum"] == 5

    local = [f"gallery={gallery}", "organisation='Kazakh team'", "namespace=KZ", f"embedder={world['embedder']}"]
    assert (world["root"] / "calibrate" / "config.yaml").exists() is False  # main() writes it; MODES does not
    exported = _run(share, _compose("share", world, "export", "mode=export", *local))
    archive = exported.files["archive"]  # type: ignore[attr-defined]
    imported = _run(share, _compose("share", world, "import", "mode=import", f"archive={archive}", *local[:1])).files[
        "partner"
    ]  # type: ignore[attr-defined]
    assert (imported / "IMPORTED.json").is_file()
    proposed = _run(share, _compose("share", world, "shared", "mode=shared", f"partner={imported}", *local))
    candidates = pd.read_csv(proposed.files["candidates"], dtype=str, keep_default_na=False)  # type: ignore[attr-defined]
    # The partner holds the same pictures: a reviewer confirms each animal with itself.
    reviewed = candidates.assign(
        confirmed=(candidates["local_id"] == candidates["partner_id"]).map({True: "yes", False: ""})
    )
    reviewed.to_csv(world["root"] / "reviewed.csv", index=False)
    aliases = world["root"] / "aliases.csv"
    confirm = [f"partner={imported}", f"aliases={aliases}", *local]
    _run(
        share,
        _compose(
            "share",
            world,
            "confirm",
            "mode=confirm",
            f"candidates={world['root'] / 'reviewed.csv'}",
            "confirmed_by='Test Reviewer'",
            *confirm,
        ),
    )
    assert len(pd.read_csv(aliases)) == 5
    merged = _run(share, _compose("share", world, "count", "mode=count", *confirm))
    combined = json.loads(merged.files["counts"].read_text())[0]  # type: ignore[attr-defined]
    assert (combined["minimum"], combined["maximum"]) == (5, 5)  # every animal aliased: counted once
    histories = _run(share, _compose("share", world, "histories", "mode=capture_histories", *local))
    assert histories.files["multimark"].is_file()  # type: ignore[attr-defined]
    package = _run(share, _compose("share", world, "camtrap", "mode=camtrap_dp", *local))
    assert package.files["camtrap_dp"].is_dir()  # type: ignore[attr-defined]


def test_an_unknown_mode_and_calibration_source_are_named(world: dict[str, Path], hydra_conf: None) -> None:
    infer = _entry_point("infer")
    cfg = _compose("infer", world, "bad", "mode=calibrate", "calibrate_on=elsewhere", f"embedder={world['embedder']}")
    with pytest.raises(Exception, match="calibrate_on=elsewhere is not one of gallery, data"):
        _run(infer, cfg)
