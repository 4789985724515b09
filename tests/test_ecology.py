"""Exports for ecologists: Camtrap DP packages and secr / multimark capture histories.

The capture histories are compared with files written by hand from the fixture
below (tests/data/ecology/README.md shows the working); the Camtrap DP package is
validated offline against the official schemas in ../shared and read back through
the project's own importer.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from reid.catalogue import build_catalogue
from reid.ecology import (
    CAMTRAP_DP_FIELDS,
    CAMTRAP_DP_SCHEMA_FILES,
    CAPTURE_METHODS,
    SAMPLING_DESIGNS,
    export_camtrap_dp,
    local_metres,
    multimark_histories,
    multimark_known,
    secr_capture_history,
    validate_camtrap_dp,
    write_multimark,
    write_secr,
)
from reid.errors import CatalogueError
from reid.importers import import_camtrap_dp

EXPECTED = Path(__file__).parent / "data" / "ecology"
STATIONS = {"S1": (43.62, 53.96), "S2": (43.71, 53.96), "S3": (43.62, 54.08)}
IMAGE_SIZE = (200, 100)
# annotation, image, individual, side, time (UTC), station, encounter, sex, box (x, y, w, h) in pixels
_ROWS = [
    ("a01", "s1_cam_a_0501.png", "KZ-0001", "left", "2023-05-01T21:10:00", "S1", "S1/e1", "male", (50, 20, 100, 60)),
    ("a02", "s1_cam_b_0501.png", "KZ-0001", "right", "2023-05-01T21:10:02", "S1", "S1/e1", "male", (20, 10, 150, 80)),
    ("a03", "s2_0502_0230.png", "KZ-0002", "left", "2023-05-02T02:30:00", "S2", "S2/e2", "female", None),
    ("a04", "s3_0502_2315.png", "KZ-0002", "right", "2023-05-02T23:15:00", "S3", "S3/e3", "female", None),
    ("a05", "s3_0503_2000a.png", "KZ-0003", "left", "2023-05-03T20:00:00", "S3", "S3/e4", None, None),
    ("a06", "s3_0503_2000b.png", "KZ-0003", "left", "2023-05-03T20:00:05", "S3", "S3/e4", None, None),
    ("a07", "s1_0503_2350.png", "KZ-0001", "right", "2023-05-03T23:50:00", "S1", "S1/e5", "male", None),
    ("a08", "s3_0504_0300.png", None, "unknown", "2023-05-04T03:00:00", "S3", "S3/e6", None, (0, 0, 200, 100)),
    ("a09", "s2_0504_2200a.png", "KZ-0001", "left", "2023-05-04T22:00:00", "S2", "S2/e7", "male", None),
    ("a10", "s2_0504_2200b.png", "KZ-0001", "unknown", "2023-05-04T22:00:30", "S2", "S2/e7", "male", None),
    ("a11", "s2_0504_2300.png", "KZ-0003", "left", "2023-05-04T23:00:00", "S2", "S2/e8", None, None),
    ("a12", "s1_0505_0100.png", "KZ-0002", "right", "2023-05-05T01:00:00", "S1", "S1/e9", "female", None),
]


def _records(folder: Path) -> list[dict]:
    records = []
    for annotation, image, individual, side, time, station, encounter, sex, box in _ROWS:
        path = folder / image
        if not path.exists():
            Image.new("RGB", IMAGE_SIZE, (120, 100, 60)).save(path)
        lat, lon = STATIONS[station]
        records.append(
            {
                "annotation_id": annotation,
                "image_path": str(path),
                "individual_id": individual,
                "side": side,
                "timestamp": time,
                "station": station,
                "country": "KZ",
                "encounter_id": encounter,
                "sex": sex,
                "latitude": lat,
                "longitude": lon,
                **(dict(zip(("bbox_x", "bbox_y", "bbox_w", "bbox_h"), box, strict=True)) if box else {}),
            }
        )
    return records


@pytest.fixture
def survey(tmp_path: Path) -> pd.DataFrame:
    """Return the hand-made catalogue: 3 leopards, 3 stations, 12 annotations over 5 days."""
    folder = tmp_path / "images"
    folder.mkdir()
    table, problems = build_catalogue(_records(folder))
    assert problems == []
    return table


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any network connection fail, so a test proves it needs none."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _schemas(shared_dir: Path) -> Path:
    return shared_dir / "data" / "camtrap-dp-1.0.2"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict[str, str]], fields: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _box(observation: dict[str, str]) -> tuple[str, ...]:
    return tuple(observation[k] for k in ("bboxX", "bboxY", "bboxWidth", "bboxHeight"))


# ---- capture histories ---------------------------------------------------------------------------


def test_secr_left_flank_daily_history_matches_hand_written_files(survey: pd.DataFrame, tmp_path: Path) -> None:
    captures, traps = secr_capture_history(survey)
    write_secr(captures, traps, tmp_path / "capt.txt", tmp_path / "traps.txt")

    assert (tmp_path / "capt.txt").read_text() == (EXPECTED / "secr_left_daily_captures.txt").read_text()
    assert (tmp_path / "traps.txt").read_text() == (EXPECTED / "secr_traps.txt").read_text()


def test_secr_right_flank_two_day_occasions_match_hand_written_file(survey: pd.DataFrame, tmp_path: Path) -> None:
    captures, traps = secr_capture_history(survey, side="right", occasion_days=2, session="2023")
    write_secr(captures, traps, tmp_path / "capt.txt", tmp_path / "traps.txt")

    assert (tmp_path / "capt.txt").read_text() == (EXPECTED / "secr_right_2day_captures.txt").read_text()
    assert (tmp_path / "traps.txt").read_text() == (EXPECTED / "secr_traps.txt").read_text()


def test_secr_traps_include_stations_that_photographed_no_leopard(survey: pd.DataFrame) -> None:
    _, traps = secr_capture_history(survey, stations={"S4": (43.65, 54.00)})

    assert list(traps["Detector"]) == ["S1", "S2", "S3", "S4"]
    # S4 moves the centroid, so only its presence and the others' spacing are checked here.
    s1, s2 = traps.set_index("Detector").loc[["S1", "S2"]].to_numpy()
    assert abs((s2[1] - s1[1]) - (6667 + 3332)) <= 2


def test_secr_rejects_identifiers_it_cannot_read(survey: pd.DataFrame) -> None:
    renamed = survey.assign(station=survey["station"].replace({"S1": "Station 1"}))

    with pytest.raises(CatalogueError, match="'Station 1'"):
        secr_capture_history(renamed)


def test_multimark_codes_match_hand_written_files(survey: pd.DataFrame, tmp_path: Path) -> None:
    write_multimark(multimark_histories(survey), tmp_path / "daily.csv")
    write_multimark(multimark_histories(survey, occasion_days=2), tmp_path / "2day.csv")

    assert (tmp_path / "daily.csv").read_text() == (EXPECTED / "multimark_daily.csv").read_text()
    assert (tmp_path / "2day.csv").read_text() == (EXPECTED / "multimark_2day.csv").read_text()


def test_multimark_code_4_needs_both_flanks_in_one_image_or_encounter(survey: pd.DataFrame) -> None:
    # Give KZ-0002's day-2 right flank the encounter of its left flank: now seen together.
    together = survey.assign(encounter_id=survey["encounter_id"].mask(survey["annotation_id"] == "a04", "S2/e2"))
    # Put KZ-0001's paired-camera images in different encounters: both flanks that day, but apart.
    apart = survey.assign(encounter_id=survey["encounter_id"].mask(survey["annotation_id"] == "a02", "S1/other"))

    assert multimark_histories(together).loc["KZ-0002", 2] == 4
    assert multimark_histories(apart).loc["KZ-0001", 1] == 3


def test_multimark_known_marks_histories_the_catalogue_links(survey: pd.DataFrame) -> None:
    known = multimark_known(multimark_histories(survey))

    assert known.to_dict() == {"KZ-0001": 1, "KZ-0002": 1, "KZ-0003": 0}


def test_occasions_follow_start_and_count(survey: pd.DataFrame) -> None:
    same_instant = multimark_histories(survey, start="2023-05-01T05:00:00+05:00")
    later = multimark_histories(survey, start="2023-05-03", n_occasions=4)

    pd.testing.assert_frame_equal(same_instant, multimark_histories(survey))
    assert later.columns.tolist() == [1, 2, 3, 4]
    assert later.to_dict("index") == {
        "KZ-0001": {1: 2, 2: 1, 3: 0, 4: 0},
        "KZ-0002": {1: 0, 2: 0, 3: 2, 4: 0},
        "KZ-0003": {1: 1, 2: 1, 3: 0, 4: 0},
    }


def test_identified_capture_without_time_is_named_not_dropped(survey: pd.DataFrame) -> None:
    broken = survey.assign(timestamp=survey["timestamp"].mask(survey["annotation_id"] == "a05"))

    with pytest.raises(CatalogueError, match=r"annotation a05.*no timestamp"):
        multimark_histories(broken)
    with pytest.raises(CatalogueError, match=r"annotation a05.*no timestamp"):
        secr_capture_history(broken)


def test_local_metres_match_meridian_arc_length() -> None:
    # 0.01 degree of latitude at 43.65 N: meridian radius 6 367 800 m x 0.01 x pi / 180 = 1111.4 m.
    east, north = local_metres([43.645, 43.655], [54.0, 54.0])

    assert east.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert north[1] - north[0] == pytest.approx(1111.4, abs=0.5)


# ---- Camtrap DP -----------------------------------------------------------------------------------


def test_field_description_matches_official_schemas(shared_dir: Path) -> None:
    for name, file in CAMTRAP_DP_SCHEMA_FILES.items():
        schema = json.loads((_schemas(shared_dir) / file).read_text())
        assert CAMTRAP_DP_FIELDS[name] == tuple(field["name"] for field in schema["fields"]), name
    profile = json.loads((_schemas(shared_dir) / "camtrap-dp-profile.json").read_text())
    project = profile["allOf"][1]["properties"]["project"]["properties"]
    assert tuple(project["samplingDesign"]["enum"]) == SAMPLING_DESIGNS
    assert tuple(project["captureMethod"]["items"]["enum"]) == CAPTURE_METHODS


def test_export_validates_offline_against_official_schemas(
    survey: pd.DataFrame, tmp_path: Path, shared_dir: Path, offline: None
) -> None:
    package = export_camtrap_dp(survey, tmp_path / "package", organisation="Ustyurt leopard survey")

    assert validate_camtrap_dp(package, _schemas(shared_dir)) == []


def test_validator_accepts_the_standards_own_example(shared_dir: Path, offline: None) -> None:
    assert validate_camtrap_dp(_schemas(shared_dir) / "example", _schemas(shared_dir)) == []


def test_broken_packages_are_reported_invalid(
    survey: pd.DataFrame, tmp_path: Path, shared_dir: Path, offline: None
) -> None:
    clean = export_camtrap_dp(survey, tmp_path / "clean", organisation="Ustyurt leopard survey")
    observations = _read_csv(clean / "observations.csv")
    fields = list(CAMTRAP_DP_FIELDS["observations"])

    bad_type = Path(shutil.copytree(clean, tmp_path / "bad_type"))
    _write_csv(
        bad_type / "observations.csv", [{**observations[0], "observationType": "animl"}, *observations[1:]], fields
    )
    no_column = Path(shutil.copytree(clean, tmp_path / "no_column"))
    _write_csv(
        no_column / "observations.csv",
        [{k: v for k, v in row.items() if k != "observationType"} for row in observations],
        [f for f in fields if f != "observationType"],
    )
    unknown_media = Path(shutil.copytree(clean, tmp_path / "unknown_media"))
    _write_csv(
        unknown_media / "observations.csv", [{**observations[0], "mediaID": "nowhere"}, *observations[1:]], fields
    )
    no_project = Path(shutil.copytree(clean, tmp_path / "no_project"))
    descriptor = json.loads((no_project / "datapackage.json").read_text())
    del descriptor["project"]
    (no_project / "datapackage.json").write_text(json.dumps(descriptor))

    assert any("animl" in e and "observationType" in e for e in validate_camtrap_dp(bad_type, _schemas(shared_dir)))
    assert any("observationType" in e for e in validate_camtrap_dp(no_column, _schemas(shared_dir)))
    assert any("nowhere" in e for e in validate_camtrap_dp(unknown_media, _schemas(shared_dir)))
    assert any("'project' is a required property" in e for e in validate_camtrap_dp(no_project, _schemas(shared_dir)))


def test_export_generalises_coordinates_by_default(survey: pd.DataFrame, tmp_path: Path) -> None:
    package = export_camtrap_dp(survey, tmp_path / "package", organisation="Ustyurt leopard survey")
    deployments = {row["deploymentID"]: row for row in _read_csv(package / "deployments.csv")}
    descriptor = json.loads((package / "datapackage.json").read_text())

    assert {k: (d["latitude"], d["longitude"]) for k, d in deployments.items()} == {
        "S1": ("43.6", "54.0"),
        "S2": ("43.7", "54.0"),
        "S3": ("43.6", "54.1"),
    }
    # Half a 0.1 degree step each way at the equator: hypot(0.05, 0.05) x 111 320 m = 7871.5 m.
    assert {d["coordinateUncertainty"] for d in deployments.values()} == {"7872"}
    assert descriptor["coordinatePrecision"] == 0.1
    assert "53.96" not in (package / "deployments.csv").read_text()


def test_export_keeps_exact_coordinates_only_on_request(survey: pd.DataFrame, tmp_path: Path) -> None:
    package = export_camtrap_dp(
        survey, tmp_path / "package", organisation="Ustyurt leopard survey", exact_coordinates=True
    )
    deployments = {row["deploymentID"]: row for row in _read_csv(package / "deployments.csv")}

    assert {k: (float(d["latitude"]), float(d["longitude"])) for k, d in deployments.items()} == STATIONS
    assert {d["coordinateUncertainty"] for d in deployments.values()} == {""}
    assert "coordinatePrecision" not in json.loads((package / "datapackage.json").read_text())


def test_export_tables_hold_individuals_flanks_boxes_and_deployment_periods(
    survey: pd.DataFrame, tmp_path: Path
) -> None:
    package = export_camtrap_dp(survey, tmp_path / "package", organisation="Ustyurt leopard survey")
    observations = {row["observationID"]: row for row in _read_csv(package / "observations.csv")}
    deployments = {row["deploymentID"]: row for row in _read_csv(package / "deployments.csv")}
    media = _read_csv(package / "media.csv")
    descriptor = json.loads((package / "datapackage.json").read_text())

    assert len(media) == 12 and len(observations) == 12
    # 50/200, 20/100, 100/200, 60/100 and 20/200, 10/100, 150/200, 80/100
    assert _box(observations["a01"]) == ("0.25", "0.2", "0.5", "0.6")
    assert _box(observations["a02"]) == ("0.1", "0.1", "0.75", "0.8")
    assert observations["a01"]["observationTags"] == "flank:left"
    assert observations["a02"]["observationTags"] == "flank:right"
    assert observations["a10"]["observationTags"] == ""
    assert observations["a08"]["individualID"] == ""
    assert (observations["a01"]["eventID"], observations["a01"]["sex"]) == ("S1/e1", "male")
    assert (observations["a05"]["scientificName"], observations["a05"]["sex"]) == ("Panthera pardus saxicolor", "")
    assert (deployments["S1"]["deploymentStart"], deployments["S1"]["deploymentEnd"]) == (
        "2023-05-01T21:10:00Z",
        "2023-05-05T01:00:00Z",
    )
    assert descriptor["project"]["individualAnimals"] is True
    assert descriptor["temporal"] == {"start": "2023-05-01", "end": "2023-05-05"}


def test_export_reads_back_with_same_individuals_and_sides(survey: pd.DataFrame, tmp_path: Path) -> None:
    package = export_camtrap_dp(survey, tmp_path / "package", organisation="Ustyurt leopard survey", copy_media=True)

    table, problems = import_camtrap_dp(package)

    def identities(t: pd.DataFrame) -> dict[str, tuple[str, str]]:
        return {
            a: ("" if pd.isna(i) else i, s)
            for a, i, s in zip(t["annotation_id"], t["individual_id"], t["side"], strict=True)
        }

    assert problems == []
    assert identities(table) == identities(survey)
    boxed = table.set_index("annotation_id").loc["a01", ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].tolist()
    assert boxed == pytest.approx([50, 20, 100, 60])


def test_export_names_rows_it_cannot_place(survey: pd.DataFrame, tmp_path: Path) -> None:
    broken = survey.assign(station=survey["station"].mask(survey["annotation_id"] == "a03"))

    with pytest.raises(CatalogueError, match=r"annotation a03.*no station"):
        export_camtrap_dp(broken, tmp_path / "package", organisation="Ustyurt leopard survey")
    assert not (tmp_path / "package").exists()


def test_export_refuses_copying_images_with_gps_when_generalising(survey: pd.DataFrame, tmp_path: Path) -> None:
    tagged = Path(survey.loc[0, "image_path"]).with_name("tagged.jpg")
    exif = Image.Exif()
    exif.get_ifd(0x8825)[1] = "N"  # GPSLatitudeRef: enough to mark a GPS block
    Image.new("RGB", IMAGE_SIZE).save(tagged, exif=exif)
    with_gps = survey.assign(image_path=survey["image_path"].mask(survey["annotation_id"] == "a03", str(tagged)))

    with pytest.raises(CatalogueError, match=r"tagged\.jpg.*GPS"):
        export_camtrap_dp(with_gps, tmp_path / "package", organisation="Ustyurt leopard survey", copy_media=True)
    export_camtrap_dp(
        with_gps, tmp_path / "exact", organisation="Ustyurt leopard survey", copy_media=True, exact_coordinates=True
    )
    assert (tmp_path / "exact" / "media" / "tagged.jpg").is_file()
