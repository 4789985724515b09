"""End to end: enrol, calibrate, match and count on generated captures whose truth is known,
the HTML report in a real browser, and the infer.py entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reid.catalogue import build_catalogue
from reid.decisions import Thresholds
from reid.errors import ReidError
from reid.evidence import EVIDENCE_DIR
from reid.fusion import ScoreFusion
from reid.gallery import Gallery, GalleryError
from reid.keypoints import KeypointConfig
from reid.models import create_embedder, export_embedder, load_embedder
from reid.workflows import build_gallery, calibrate_gallery, match
from reid.workflows.calibrate import CalibrationSettings

REPO = Path(__file__).resolve().parents[1]


def _coat(seed: int) -> np.ndarray:
    """Return a distinct blotchy 64 x 128 RGB pattern: one flank of one animal."""
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 12, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((128, 64), Image.Resampling.BICUBIC))


def _capture(folder: Path, name: str, coat_seed: int, frame: int) -> str:
    rng = np.random.default_rng(1000 * coat_seed + frame)
    img = _coat(coat_seed).astype(float) * rng.uniform(0.9, 1.1) + rng.normal(0, 4, (64, 128, 3))
    path = folder / f"{name}.png"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return str(path)


def _table(folder: Path, plan: list[tuple[str, str, str, str, str, int]]) -> pd.DataFrame:
    """plan rows: (individual, side, encounter, station, time, frames); each flank has its own coat."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for individual, side, encounter, station, time, frames in plan:
        coat = sum(map(ord, individual)) * 7 + (side == "right")
        for f in range(frames):
            stamp = pd.Timestamp(time, tz="UTC") + pd.Timedelta(seconds=2 * f)
            rows.append(
                dict(
                    image_path=_capture(folder, f"{encounter}_{f}", coat, f + zlib.crc32(folder.name.encode()) % 97),
                    individual_id=individual,
                    side=side,
                    encounter_id=encounter,
                    station=station,
                    timestamp=stamp,
                    country="KZ",
                )
            )
    table, problems = build_catalogue(rows)
    assert problems == []
    return table


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    folder = export_embedder(create_embedder("resnet18", 64, img_size=64), tmp_path_factory.mktemp("emb") / "embedder")
    return load_embedder(folder)


@pytest.mark.parametrize("method", ["embedding", "keypoints", "fused"])
def test_end_to_end_decisions_and_counts_match_the_truth(tmp_path: Path, embedder, method: str) -> None:
    t0 = "2021-05-01T00:00:00"
    gallery_plan = [
        ("KZ-A", "left", "g1", "S1", "2021-01-01", 2),
        ("KZ-A", "right", "g2", "S1", "2021-01-02", 2),
        ("KZ-B", "left", "g3", "S2", "2021-01-03", 2),
        ("KZ-C", "right", "g4", "S2", "2021-01-04", 2),
        ("KZ-D", "left", "g5", "S1", "2021-01-05", 2),
        ("KZ-D", "right", "g6", "S1", "2021-01-06", 2),
    ]
    query_plan = [
        ("KZ-A", "left", "q1", "S1", "2021-05-01", 2),
        ("KZ-B", "left", "q2", "S2", "2021-05-02", 1),
        ("KZ-C", "right", "q3", "S2", "2021-05-03", 2),
        ("E", "left", "q4", "S3", t0, 2),  # a new animal, seen twice
        ("E", "left", "q5", "S3", "2021-05-09", 1),
        ("F", "right", "q6", "S1", "2021-05-02T00:00:30", 2),  # new; at S1 while B was at S2
    ]
    # Labelled animals of no interest, to calibrate the thresholds on: three encounters per flank.
    calibration_plan = [
        (f"CAL-{i}", side, f"c{i}{side[0]}{e}", "S9", f"2020-0{e + 1}-{i + 1:02d}", 2)
        for i in range(12)
        for side in ("left", "right")
        for e in range(3)
    ]
    reference = _table(tmp_path / "gallery_images", gallery_plan)
    queries = _table(tmp_path / "query_images", query_plan)
    labelled = _table(tmp_path / "calibration_images", calibration_plan)

    gallery, problems = build_gallery(
        reference, embedder, tmp_path / "gallery", keypoints=KeypointConfig(), progress=False
    )
    assert problems == [] and len(gallery) == 12
    thresholds, _, _ = calibrate_gallery(
        gallery,
        tmp_path / "gallery",
        labelled=labelled,
        embedder=embedder,
        fusion=ScoreFusion(method, shortlist=8),  # type: ignore[arg-type]
        settings=CalibrationSettings(max_false_merge=0.02),  # 0 of 72 merges: a 1 % median-unbiased estimate
        progress=False,
    )
    stored = Gallery.load(tmp_path / "gallery")
    assert stored.thresholds == thresholds
    assert stored.fusion.method == method and stored.fusion.calibrated

    truth_queries = queries.copy()
    queries["individual_id"] = pd.array([pd.NA] * len(queries), dtype="string")  # what an analyst brings
    result, outcome = match(queries, embedder, gallery, tmp_path / "run", thresholds=thresholds, progress=False)
    by_encounter = result.decisions.groupby("encounter_id").first()
    assert by_encounter.loc[["q1", "q2", "q3"], "assigned_id"].tolist() == ["KZ-A", "KZ-B", "KZ-C"]
    assert (by_encounter.loc[["q1", "q2", "q3"], "decision"] == "known").all()
    assert (by_encounter.loc[["q4", "q5", "q6"], "decision"] == "new").all()
    new_ids = by_encounter.loc[["q4", "q5", "q6"], "assigned_id"].tolist()
    assert new_ids[0] == new_ids[1] != new_ids[2] and all(i.startswith("KZ-NEW-") for i in new_ids)

    # Decided: A (both flanks known from the gallery), B left-only, C right-only: B and C may be one animal, so
    # at least 1 + 2 - 1 = 2. The three new encounters (q4, q5, q6) are unresolved: F (q6) was at S1 30 s after B
    # at S2, so it is not B, but it could be A or C: no addition. At most 3 + 3 = 6. The truth, 5, lies inside.
    counts = json.loads(outcome.files["counts"].read_text())
    assert (counts["combined"]["minimum"], counts["combined"]["maximum"]) == (2, 6)
    assert counts["awaiting_review"] == 3 and counts["combined"]["decided_individuals"] == 3
    assert set(counts["individuals"]) == {"KZ-A", "KZ-B", "KZ-C"} and set(counts["provisional_new"]) == set(new_ids)
    assert len(truth_queries["individual_id"].unique()) == 5  # the truth lies within the bounds

    matches = pd.read_csv(outcome.files["matches"])
    assert set(matches["query"]) == set(queries["annotation_id"])
    top = matches[matches["rank"] == 1].set_index("query")
    assert top.loc[queries.loc[queries["encounter_id"] == "q1", "annotation_id"], "individual_id"].eq("KZ-A").all()
    assert outcome.files["report"].is_file()


def test_unreadable_queries_are_listed_and_the_run_finishes(tmp_path: Path, embedder) -> None:
    reference = _table(tmp_path / "g", [("KZ-A", "left", "g1", "S1", "2021-01-01", 2)])
    gallery, _ = build_gallery(reference, embedder, tmp_path / "gallery", progress=False)
    queries = _table(tmp_path / "q", [("KZ-A", "left", "q1", "S1", "2021-05-01", 2)])
    broken = tmp_path / "q" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    extra, _ = build_catalogue([dict(image_path=str(broken), side="left")])
    queries = pd.concat([queries, extra], ignore_index=True)
    thresholds = Thresholds(known=0.9, new=0.5)
    result, outcome = match(queries, embedder, gallery, tmp_path / "run", thresholds=thresholds, progress=False)
    row = result.decisions.set_index("query").loc[extra["annotation_id"][0]]
    assert row["decision"] == "unreadable" and "truncated or corrupt" in row["reason"]
    assert "broken.jpg" in outcome.files["report"].read_text()


def test_gallery_of_another_embedder_is_refused_naming_both(tmp_path: Path, embedder) -> None:
    reference = _table(tmp_path / "g", [("KZ-A", "left", "g1", "S1", "2021-01-01", 1)])
    gallery, _ = build_gallery(reference, embedder, tmp_path / "gallery", progress=False)
    torch.manual_seed(1)
    other = create_embedder("resnet18", 64, img_size=64)
    with pytest.raises(GalleryError, match=r"built with embedder [0-9a-f]{12}.*in use is [0-9a-f]{12}"):
        build_gallery(reference, other, tmp_path / "gallery", progress=False)
    with pytest.raises(GalleryError):
        match(reference, other, gallery, tmp_path / "run", thresholds=Thresholds(0.9, 0.5), progress=False)


def test_enrolling_again_adds_nothing_twice(tmp_path: Path, embedder) -> None:
    reference = _table(tmp_path / "g", [("KZ-A", "left", "g1", "S1", "2021-01-01", 2)])
    build_gallery(reference, embedder, tmp_path / "gallery", progress=False)
    more = _table(tmp_path / "g2", [("KZ-B", "right", "g2", "S1", "2021-01-02", 1)])
    gallery, problems = build_gallery(pd.concat([reference, more]), embedder, tmp_path / "gallery", progress=False)
    assert len(gallery) == 3
    assert any("already in the gallery" in p.message for p in problems)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_report_opens_offline_in_chromium_with_every_image(tmp_path: Path, embedder) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    reference = _table(
        tmp_path / "g", [("KZ-A", "left", "g1", "S1", "2021-01-01", 2), ("KZ-B", "right", "g2", "S1", "2021-01-02", 2)]
    )
    gallery, _ = build_gallery(reference, embedder, tmp_path / "gallery", keypoints=KeypointConfig(), progress=False)
    queries = _table(
        tmp_path / "q", [("KZ-A", "left", "q1", "S1", "2021-05-01", 2), ("X", "right", "q2", "S1", "2021-05-02", 1)]
    )
    _, outcome = match(
        queries,
        embedder,
        gallery,
        tmp_path / "run",
        thresholds=Thresholds(0.99, 0.5),
        fusion=ScoreFusion("keypoints"),
        progress=False,
    )
    assert len(list((tmp_path / "run" / EVIDENCE_DIR).glob("*.jpg"))) == 2  # one per shown candidate
    page = outcome.files["report"]
    # A copy of the page with a probe that records, after load, how many images it has and which failed.
    probe = (
        "<script>window.addEventListener('load', () => {"
        "const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);"
        "document.body.setAttribute('data-images', document.images.length);"
        "document.body.setAttribute('data-broken', bad.join(' '));});</script>"
    )
    checked = page.with_name("probe.html")
    checked.write_text(page.read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert 'data-images="' in dom, dom[:500]
    n_images = int(dom.split('data-images="')[1].split('"')[0])
    assert n_images >= 3 + 2 + 2  # three query pictures, the candidates' pictures, the correspondences
    assert 'data-broken=""' in dom


@pytest.mark.slow
def test_infer_py_demo_runs_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "infer.py"),
        f"hydra.run.dir={out}",
        "progress=false",
        f"paths.data={tmp_path / 'data'}",
        f"paths.root={tmp_path}",
        "demo.population.config.n_individuals=8",
        "+demo.population.config.encounters_per_flank=[2,3]",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("matches.csv", "decisions.csv", "counts.json", "report.html", "evaluation.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert "UNTRAINED" in done.stdout + done.stderr  # Hydra logs to stdout
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["truth"]["true_individuals_in_queries"] >= 1


def test_a_gallery_of_one_photo_per_individual_still_matches_and_sends_everything_to_review(
    tmp_path: Path, embedder
) -> None:
    plan = [(f"KZ-{i}", "left", f"g{i}", "S1", f"2021-01-0{i + 1}", 1) for i in range(4)]
    gallery, _ = build_gallery(_table(tmp_path / "g", plan), embedder, tmp_path / "gallery", progress=False)
    with pytest.raises(
        ReidError, match=r"at least 5 labelled individuals seen in two or more encounters; these data have 0"
    ):
        calibrate_gallery(gallery, tmp_path / "gallery", progress=False)
    queries = _table(tmp_path / "q", [("KZ-1", "left", "q1", "S1", "2021-05-01", 2)])
    result, outcome = match(queries, embedder, Gallery.load(tmp_path / "gallery"), tmp_path / "run", progress=False)
    assert set(result.decisions["decision"]) == {"review"}
    assert (result.matches["rank"] == 1).sum() == 2  # ranked candidates all the same
    assert any("not calibrated" in p.message and "every capture goes to review" in p.message for p in outcome.problems)
    counts = json.loads(outcome.files["counts"].read_text())
    # Nothing decided, one encounter awaiting review: it is at least one animal, and at most one.
    assert (counts["combined"]["minimum"], counts["combined"]["maximum"], counts["awaiting_review"]) == (1, 1, 1)


def test_match_with_no_readable_capture_lists_them_and_finishes(tmp_path: Path, embedder) -> None:
    gallery, _ = build_gallery(
        _table(tmp_path / "g", [("KZ-A", "left", "g1", "S1", "2021-01-01", 1)]),
        embedder,
        tmp_path / "gallery",
        progress=False,
    )
    broken = tmp_path / "q" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    queries, _ = build_catalogue([dict(image_path=str(broken), side="left")])
    for run, table in (("all-broken", queries), ("empty", queries.iloc[0:0])):
        result, outcome = match(
            table, embedder, gallery, tmp_path / run, thresholds=Thresholds(0.9, 0.5), progress=False
        )
        assert set(result.decisions["decision"]) <= {"unreadable"} and outcome.files["report"].is_file()
        assert len(pd.read_csv(outcome.files["decisions"])) == len(table)


@pytest.mark.parametrize(
    ("setting", "value"), [("max_wrong_id", 1.5), ("max_false_new", -0.1), ("k", 0), ("min_individuals", 1)]
)
def test_calibration_settings_out_of_range_are_named(setting: str, value: float) -> None:
    with pytest.raises(ReidError, match=rf"calibration\.{setting}="):
        CalibrationSettings(**{setting: value})  # type: ignore[arg-type]
