"""The catalogue table: normalisation, row-level validation, round trips and encounters."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from reid.catalogue import (
    COLUMN_NAMES,
    assign_encounters,
    build_catalogue,
    generalise_coordinates,
    load_catalogue,
    save_catalogue,
    validate,
)
from reid.errors import CatalogueError


def _rows(root: Path) -> list[dict]:
    return [
        dict(
            image_path=str(root / "a.jpg"),
            individual_id="KZ-0001",
            side="L",
            timestamp="2021-04-05T19:08:33+05:00",
            station="S1",
            country="KZ",
            sex="F",
        ),
        dict(
            image_path=str(root / "b.jpg"),
            individual_id="KZ-0001",
            side="right",
            timestamp="2021-04-05T14:09:00Z",
            station="S1",
            country="KZ",
        ),
        dict(
            image_path=str(root / "c.jpg"),
            side="",
            bbox_x=1,
            bbox_y=2,
            bbox_w=30,
            bbox_h=40,
            latitude=43.5,
            longitude=55.2,
        ),
    ]


def test_build_normalises_sides_sexes_and_times(tmp_path: Path) -> None:
    table, problems = build_catalogue(_rows(tmp_path), source="t.csv")
    assert problems == []
    assert list(table.columns) == list(COLUMN_NAMES)
    assert table["side"].tolist() == ["left", "right", "unknown"]
    assert table["sex"].tolist() == ["female", "unknown", "unknown"]
    # 19:08:33 at +05:00 is 14:08:33 UTC, 27 s before the second image.
    assert table["timestamp"][0] == pd.Timestamp("2021-04-05T14:08:33Z")
    assert (table["timestamp"][1] - table["timestamp"][0]).total_seconds() == 27
    assert table["individual_id"].isna().tolist() == [False, False, True]
    assert table["annotation_id"].is_unique


def test_bad_rows_are_reported_by_row_and_dropped(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows += [
        dict(image_path=str(tmp_path / "d.jpg"), side="lft", source_row="row 5"),
        dict(image_path=str(tmp_path / "e.jpg"), side="left", timestamp="yesterday", source_row="row 6"),
        dict(image_path=str(tmp_path / "e2.jpg"), side="left", timestamp="12", source_row="row 12"),
        dict(
            image_path=str(tmp_path / "f.jpg"), side="left", bbox_x=1, bbox_y=1, bbox_w=0, bbox_h=5, source_row="row 7"
        ),
        dict(image_path=str(tmp_path / "g.jpg"), side="left", bbox_x=1, source_row="row 8"),
        dict(image_path=None, side="left", source_row="row 9"),
        dict(image_path=str(tmp_path / "h.jpg"), side="left", latitude=123, longitude=0, source_row="row 10"),
        dict(image_path=str(tmp_path / "i.jpg"), side="left", sex="unsure", source_row="row 11"),
    ]
    table, problems = build_catalogue(rows, source="labels.csv")
    assert len(table) == 3
    text = [str(p) for p in problems]
    assert any(t.startswith("labels.csv row 5: side 'lft' is not one of left, right, unknown") for t in text)
    assert any("row 6" in t and "ISO 8601" in t for t in text)
    assert any("row 12" in t and "ISO 8601" in t for t in text)
    assert any("row 7" in t and "positive" in t for t in text)
    assert any("row 8" in t and "incomplete" in t for t in text)
    assert any("row 9" in t and "image_path is empty" in t for t in text)
    assert any("row 10" in t and "outside" in t for t in text)
    assert any("row 11" in t and "sex" in t for t in text)


def test_duplicate_annotation_ids_keep_the_first(tmp_path: Path) -> None:
    rows = [
        dict(annotation_id="x1", image_path=str(tmp_path / "a.jpg"), side="left", source_row="row 2"),
        dict(annotation_id="x1", image_path=str(tmp_path / "b.jpg"), side="left", source_row="row 3"),
    ]
    table, problems = build_catalogue(rows)
    assert table["image_path"].tolist() == [str(tmp_path / "a.jpg")]
    assert len(problems) == 1 and "already used by row 2" in problems[0].message and problems[0].where == "row 3"


def test_two_boxes_in_one_image_get_distinct_ids(tmp_path: Path) -> None:
    box = dict(bbox_x=0, bbox_y=0, bbox_w=5, bbox_h=5)
    rows = [dict(image_path="/x/a.jpg", side="left", **box), dict(image_path="/x/a.jpg", side="right", **box)]
    table, problems = build_catalogue(rows)
    assert problems == [] and table["annotation_id"].tolist() == ["a.jpg", "a.jpg#1"]


def test_save_and_load_round_trip_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    rows = _rows(tmp_path / "images")
    table, _ = build_catalogue(rows, source="t.csv")
    save_catalogue(table, tmp_path / "catalogue.csv")
    text = (tmp_path / "catalogue.csv").read_text()
    assert str(tmp_path) not in text and "images/a.jpg" in text
    loaded = load_catalogue(tmp_path / "catalogue.csv")
    pd.testing.assert_frame_equal(loaded, table)
    # Moving the folder keeps the catalogue valid.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    assert load_catalogue(moved / "catalogue.csv")["image_path"][0] == str(moved / "images" / "a.jpg")


def test_load_names_the_bad_line_and_keeps_the_file(tmp_path: Path) -> None:
    table, _ = build_catalogue(_rows(tmp_path))
    path = tmp_path / "catalogue.csv"
    save_catalogue(table, path)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",right,", ",rigth,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CatalogueError, match=r"catalogue.csv row 3: side 'rigth'"):
        load_catalogue(path)


def test_load_refuses_missing_columns_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("path,individual\nx.jpg,1\n")
    with pytest.raises(CatalogueError, match="missing required columns"):
        load_catalogue(tmp_path / "c.csv")
    with pytest.raises(CatalogueError, match="not found"):
        load_catalogue(tmp_path / "absent.csv")


def test_failed_save_keeps_the_previous_catalogue(tmp_path: Path) -> None:
    table, _ = build_catalogue(_rows(tmp_path))
    path = tmp_path / "catalogue.csv"
    save_catalogue(table, path)
    before = path.read_bytes()
    broken = table.copy()
    broken["side"] = broken["side"].astype(object)
    broken.loc[0, "side"] = "sideways"
    with pytest.raises(CatalogueError):
        save_catalogue(broken, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["catalogue.csv"]


def test_validate_rejects_a_table_without_required_columns() -> None:
    with pytest.raises(CatalogueError, match="image_path"):
        validate(pd.DataFrame({"side": ["left"]}))


def test_encounters_chain_images_of_one_station_within_the_gap() -> None:
    times = ["00:00:00", "00:00:30", "00:01:20", "00:05:00", "00:00:10"]
    stations = ["S1", "S1", "S1", "S1", "S2"]
    rows = [
        dict(image_path=f"/x/{i}.jpg", side="left", station=s, country="KZ", timestamp=f"2021-01-01T{t}Z")
        for i, (t, s) in enumerate(zip(times, stations, strict=True))
    ]
    rows.append(
        dict(
            image_path="/x/given.jpg", side="left", station="S1", timestamp="2021-01-01T00:00:05Z", encounter_id="seq-9"
        )
    )
    rows.append(dict(image_path="/x/untimed.jpg", side="left", station="S1"))
    table, _ = build_catalogue(rows)
    enc = assign_encounters(table, gap_s=60)["encounter_id"].tolist()
    # 0 s, 30 s and 80 s chain (each gap <= 60 s); 300 s starts anew; another station is another encounter.
    assert enc[0] == enc[1] == enc[2] == "KZ/S1/20210101T000000Z"
    assert enc[3] == "KZ/S1/20210101T000500Z"
    assert enc[4] == "KZ/S2/20210101T000010Z"
    assert enc[5] == "seq-9"
    assert enc[6] == "image:untimed.jpg"
    assert assign_encounters(table, gap_s=20)["encounter_id"].nunique() == 7


def test_generalise_coordinates_rounds_to_the_precision_and_bounds_the_error():
    table = pd.DataFrame({"latitude": [43.2687, 43.35, None], "longitude": [54.0449, -0.04, 55.0]})
    rounded, uncertainty_m = generalise_coordinates(table, 0.1)
    assert rounded["latitude"].tolist()[:2] == [43.3, 43.4]
    assert rounded["longitude"].tolist() == [54.0, -0.0, 55.0]
    assert pd.isna(rounded["latitude"].iat[2])
    # Half a step of 0.1 degree in both directions at the equator: hypot(0.05, 0.05) * 111,320 m.
    assert uncertainty_m == 7872
    assert (abs(rounded["latitude"] - table["latitude"]).dropna() <= 0.05 + 1e-9).all()
    assert table["latitude"].iat[0] == 43.2687  # the input is not changed
