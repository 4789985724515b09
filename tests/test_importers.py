"""Importers against small hand-written inputs (with bad rows) and the real fixtures in ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from reid.errors import CatalogueError, Problem
from reid.importers import (
    import_camtrap_dp,
    import_coco,
    import_folders,
    import_labels_csv,
    import_megadetector,
    import_xmp_tags,
)


def _jpeg(path: Path, size: tuple[int, int] = (64, 48), xmp: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 80, 70)).save(path, format="JPEG", **({"xmp": xmp} if xmp else {}))
    return path


def _xmp(*subjects: str) -> bytes:
    """Return an XMP packet with these lr:hierarchicalSubject entries, as camtrapR and digiKam write them."""
    items = "".join(f"<rdf:li>{s}</rdf:li>" for s in subjects)
    return (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:lr="http://ns.adobe.com/lightroom/1.0/">'
        f"<lr:hierarchicalSubject><rdf:Bag>{items}</rdf:Bag></lr:hierarchicalSubject>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def _by_name(table: pd.DataFrame) -> dict[str, pd.Series]:
    return {Path(str(row["image_path"])).name: row for _, row in table.iterrows()}


def _or_none(value: object) -> object:
    return None if pd.isna(value) else value


def _wheres(problems: list[Problem]) -> set[str]:
    return {p.where for p in problems}


def test_folders_take_individual_from_folder_and_side_from_name_words(tmp_path: Path) -> None:
    for name in (
        "KZ-0007/IMG_12_left.jpg",
        "KZ-0007/left-flank.JPG",
        "KZ-0007/0630_leftphoto.jpg",
        "KZ-0007/bright_RightSide.png",
        "TM-0031/bright.jpg",
        "TM-0031/IMGRight2.jpeg",
        "TM-0031/right/a.jpg",
        "TM-0031/left_and_right.jpg",
        "stray.jpg",
    ):
        _jpeg(tmp_path / name)
    (tmp_path / "TM-0031" / "notes.txt").write_text("seen twice")
    (tmp_path / "KZ-0007" / ".DS_Store").write_bytes(b"\0")

    table, problems = import_folders(tmp_path, country="KZ")

    rows = _by_name(table)
    assert {name: (row["individual_id"], row["side"]) for name, row in rows.items()} == {
        "IMG_12_left.jpg": ("KZ-0007", "left"),
        "left-flank.JPG": ("KZ-0007", "left"),
        "0630_leftphoto.jpg": ("KZ-0007", "left"),
        "bright_RightSide.png": ("KZ-0007", "right"),
        "bright.jpg": ("TM-0031", "unknown"),
        "IMGRight2.jpeg": ("TM-0031", "right"),
        "a.jpg": ("TM-0031", "right"),
        "left_and_right.jpg": ("TM-0031", "unknown"),
    }
    assert all(Path(p).is_absolute() for p in table["image_path"])
    assert set(table["country"]) == {"KZ"} and table["timestamp"].isna().all()
    assert table["encounter_id"].is_unique
    assert _wheres(problems) == {"image TM-0031/left_and_right.jpg", "file TM-0031/notes.txt", "image stray.jpg"}
    assert all(p.source == str(tmp_path.resolve()) for p in problems)


def test_folders_missing_root_raises_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="nowhere"):
        import_folders(tmp_path / "nowhere")


def test_labels_csv_reads_aliases_and_reports_bad_rows_by_line(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d, copy.jpg"):
        _jpeg(tmp_path / "images" / name)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "Path,individual_id,side,sighting,timestamp,station,orig_width\n"
        "images/a.jpg,60,left,630,2021-04-05T19:08:33+05:00,st1,1587\n"
        "images/b.jpg,60,R,630,,st1,1584\n"
        "images/missing.jpg,61,left,631,,,9\n"
        "images/c.jpg,61,lft,632,,,9\n"
        '"images/d, copy.jpg",,right,,,,9\n'
    )

    table, problems = import_labels_csv(csv_path, country="KZ")

    rows = _by_name(table)
    assert set(rows) == {"a.jpg", "b.jpg", "d, copy.jpg"}
    a, b, d = rows["a.jpg"], rows["b.jpg"], rows["d, copy.jpg"]
    assert (a["individual_id"], a["side"], b["side"], d["side"]) == ("60", "left", "right", "right")
    assert pd.isna(d["individual_id"])
    assert a["timestamp"] == pd.Timestamp("2021-04-05T14:08:33", tz="UTC")
    assert a["encounter_id"] == b["encounter_id"] == "KZ/sighting:630"
    assert d["encounter_id"] == "image:" + Path(d["image_path"]).name
    assert (a["station"], a["country"], a["source_row"]) == ("st1", "KZ", "row 2")
    assert _wheres(problems) == {"row 4", "row 5"}
    missing = next(p for p in problems if p.where == "row 4")
    assert "missing.jpg" in missing.message and "remove the row" in missing.message
    assert all(p.source == str(csv_path.resolve()) for p in problems)


def test_labels_csv_accepts_semicolons_image_path_and_a_root(tmp_path: Path) -> None:
    _jpeg(tmp_path / "photos" / "x.jpg")
    csv_path = tmp_path / "lists" / "labels.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("image_path;individual_id;side;encounter_id\nx.jpg;KZ-0001;l;burst-3\n")

    table, problems = import_labels_csv(csv_path, root=tmp_path / "photos")

    assert problems == []
    assert table["image_path"].tolist() == [str((tmp_path / "photos" / "x.jpg").resolve())]
    assert (table.at[0, "side"], table.at[0, "encounter_id"]) == ("left", "burst-3")


def test_labels_csv_without_required_columns_lists_found_and_needed(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,animal,side\na.jpg,60,left\n")
    with pytest.raises(CatalogueError) as raised:
        import_labels_csv(csv_path)
    message = str(raised.value)
    assert "labels.csv" in message and "'file', 'animal', 'side'" in message and "individual_id" in message


def test_labels_csv_whose_images_are_all_missing_raises_with_the_fix(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,individual_id,side\na.jpg,60,left\nb.jpg,61,right\n")
    with pytest.raises(CatalogueError, match=r"none of the 2 image files.*root="):
        import_labels_csv(csv_path)


def test_coco_maps_viewpoint_to_side_and_unknown_name(tmp_path: Path) -> None:
    _jpeg(tmp_path / "images" / "a.jpg")
    _jpeg(tmp_path / "images" / "b.jpg")
    coco = {
        "images": [
            {
                "id": 1,
                "file_name": "a.jpg",
                "date_captured": "2016-01-01 12:00:00",
                "gps_lat_captured": 43.5,
                "gps_lon_captured": 54.1,
            },
            {"id": 2, "file_name": "b.jpg", "date_captured": "sometime in May", "seq_id": "s9", "location": "cam3"},
            {"id": 3, "file_name": "missing.jpg", "date_captured": "2016-01-02T00:00:00+06:00"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [1, 2, 30, 20], "viewpoint": "left", "name": "KZ-1"},
            {"id": 2, "image_id": 1, "bbox": [3, 4, 10, 10], "viewpoint": "frontleft", "name": "____"},
            {"id": 3, "image_id": 2, "bbox": [0, 0, 64, 48], "viewpoint": "backright", "name": "KZ-2"},
            {"id": 4, "image_id": 2, "bbox": [0, 0, 8, 8], "viewpoint": "front", "name": "KZ-2"},
            {"id": 5, "image_id": 3, "bbox": [0, 0, 8, 8], "viewpoint": "left", "name": "KZ-3"},
            {"id": 6, "image_id": 99, "bbox": [0, 0, 8, 8], "viewpoint": "left", "name": "KZ-3"},
            {"id": 7, "image_id": 1, "bbox": [0, 0, 8, 8], "viewpoint": "sideways", "name": "KZ-3"},
            {"id": 8, "image_id": 1, "viewpoint": None, "name": "KZ-4"},
        ],
        "categories": [{"id": 0, "name": "leopard"}],
    }
    path = tmp_path / "annotations" / "instances.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco))

    table, problems = import_coco(path, image_root=tmp_path / "images")

    rows = {row["source_row"]: row for _, row in table.iterrows()}
    assert set(rows) == {"annotation 1", "annotation 2", "annotation 3", "annotation 8"}
    assert {k: r["side"] for k, r in rows.items()} == {
        "annotation 1": "left",
        "annotation 2": "left",
        "annotation 3": "right",
        "annotation 8": "unknown",
    }
    assert rows["annotation 1"]["individual_id"] == "KZ-1" and pd.isna(rows["annotation 2"]["individual_id"])
    one = rows["annotation 1"]
    assert [one[c] for c in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")] == [1, 2, 30, 20]
    assert (one["latitude"], one["longitude"]) == (43.5, 54.1)
    assert one["timestamp"] == pd.Timestamp("2016-01-01 12:00:00", tz="UTC")
    assert pd.isna(rows["annotation 8"]["bbox_x"])
    three = rows["annotation 3"]
    assert pd.isna(three["timestamp"]) and (three["station"], three["encounter_id"]) == ("cam3", "seq:s9")
    assert one["encounter_id"] == rows["annotation 2"]["encounter_id"] == "image:a.jpg"
    assert _wheres(problems) == {"image 2", "annotation 5", "annotation 6", "annotation 7", "annotations 4"}
    by_where = {p.where: p.message for p in problems}
    assert "sometime in May" in by_where["image 2"] and "imported without a time" in by_where["image 2"]
    assert "missing.jpg" in by_where["annotation 5"] and "image_root" in by_where["annotation 5"]
    assert "'front' shows no flank" in by_where["annotations 4"]


def test_coco_that_is_not_json_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(CatalogueError, match=r"broken\.json: not valid JSON"):
        import_coco(path)


def _write_camtrap_package(root: Path) -> None:
    _jpeg(root / "media" / "a.jpg", size=(64, 48))
    _jpeg(root / "media" / "b.jpg", size=(100, 50))
    _jpeg(root / "photos" / "d.jpg", size=(64, 48))
    descriptor = {
        "profile": "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/camtrap-dp-profile.json",
        "resources": [
            {"name": "deployments", "path": "deployments.csv"},
            {"name": "media", "path": "media.csv"},
            {"name": "observations", "path": "tables/obs.csv"},
        ],
    }
    (root / "datapackage.json").write_text(json.dumps(descriptor))
    (root / "deployments.csv").write_text(
        "deploymentID,locationID,locationName,latitude,longitude\ndep1,loc1,Upper valley,43.25,54.5\ndep2,,,43.0,54.0\n"
    )
    (root / "media.csv").write_text(
        "mediaID,deploymentID,timestamp,filePath,filePublic,fileName,fileMediatype\n"
        "m1,dep1,2021-04-05T19:08:33+05:00,media/a.jpg,true,a.jpg,image/jpeg\n"
        "m2,dep1,2021-04-05T19:08:40+05:00,https://example.org/assets/m2/file,true,b.jpg,image/jpeg\n"
        "m3,dep1,2021-04-05T19:09:00+05:00,https://example.org/assets/m3/file,true,c.jpg,image/jpeg\n"
        "m4,dep2,2021-04-06T01:00:00+05:00,photos/d.jpg,true,d.jpg,image/jpeg\n"
    )
    (root / "tables").mkdir()
    (root / "tables" / "obs.csv").write_text(
        "observationID,deploymentID,mediaID,eventID,observationLevel,observationType,scientificName,sex,individualID,"
        "bboxX,bboxY,bboxWidth,bboxHeight,observationTags\n"
        "o1,dep1,m1,e1,media,animal,Panthera pardus,female,KZ-0007,0.25,0.5,0.5,0.25,flank:left | swimDirection:across\n"
        "o2,dep1,m2,e1,media,animal,Panthera pardus,female,KZ-0007,,,,,flank:right\n"
        "o3,dep1,m3,e1,media,animal,Panthera pardus,,,,,,,\n"
        "o4,dep1,,e1,event,animal,Panthera pardus,,KZ-0007,,,,,\n"
        "o5,dep1,m1,e1,media,blank,,,,,,,,\n"
        "o6,dep2,m4,e2,media,animal,Vulpes vulpes,,,,,,,\n"
        "o7,dep1,m1,e1,media,animal,Panthera pardus,,,,,,,flank:front\n"
        "o8,dep2,m4,,media,animal,panthera pardus,male,,0.5,0,0.5,1,\n"
    )


def test_camtrap_dp_joins_media_and_deployments_with_pixel_boxes(tmp_path: Path) -> None:
    _write_camtrap_package(tmp_path)

    table, problems = import_camtrap_dp(tmp_path / "datapackage.json", scientific_name="Panthera pardus", country="KZ")

    rows = {row["annotation_id"]: row for _, row in table.iterrows()}
    assert set(rows) == {"o1", "o2", "o8"}
    o1, o2, o8 = rows["o1"], rows["o2"], rows["o8"]
    assert [o1[c] for c in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")] == [16, 24, 32, 12]
    assert [o8[c] for c in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")] == [32, 0, 32, 48]
    assert pd.isna(o2["bbox_x"]) and o2["image_path"] == str((tmp_path / "media" / "b.jpg").resolve())
    assert (o1["side"], o2["side"], o8["side"]) == ("left", "right", "unknown")
    assert (o1["individual_id"], o1["sex"], o8["sex"]) == ("KZ-0007", "female", "male")
    assert o1["timestamp"] == pd.Timestamp("2021-04-05T14:08:33", tz="UTC")
    assert (o1["station"], o1["latitude"], o1["longitude"], o8["station"]) == ("loc1", 43.25, 54.5, "dep2")
    assert o1["encounter_id"] == o2["encounter_id"] == "KZ/event:e1"
    assert o8["encounter_id"] == "KZ/dep2/20210405T200000Z"
    assert o1["source"] == str((tmp_path / "tables" / "obs.csv").resolve())
    assert _wheres(problems) == {"observation o3", "observation o7"}
    by_where = {p.where: p.message for p in problems}
    assert "download https://example.org/assets/m3/file" in by_where["observation o3"]
    assert str(tmp_path.resolve() / "media" / "c.jpg") in by_where["observation o3"]
    assert "flank 'front'" in by_where["observation o7"]


def test_megadetector_keeps_confident_animals_in_pixels(tmp_path: Path) -> None:
    _jpeg(tmp_path / "card" / "a.jpg", size=(64, 48))
    _jpeg(tmp_path / "card" / "sub" / "e.jpg", size=(200, 100))
    _jpeg(tmp_path / "card" / "c.jpg")
    results = {
        "info": {"format_version": "1.4"},
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "images": [
            {
                "file": "a.jpg",
                "datetime": "2021:04:05 19:08:33",
                "detections": [
                    {"category": "1", "conf": 0.9, "bbox": [0.25, 0.5, 0.5, 0.25]},
                    {"category": "2", "conf": 0.99, "bbox": [0, 0, 1, 1]},
                    {"category": "1", "conf": 0.1, "bbox": [0, 0, 1, 1]},
                ],
            },
            {"file": "b.jpg", "failure": "Failure image access", "detections": None},
            {"file": "c.jpg", "detections": []},
            {"file": "d.jpg", "detections": [{"category": "1", "conf": 0.8, "bbox": [0, 0, 1, 1]}]},
            {
                "file": "sub/e.jpg",
                "detections": [
                    {"category": "1", "conf": 0.5, "bbox": [0.1, 0.2, 0.3, 0.4]},
                    {"category": "1", "conf": 0.5, "bbox": [0.5, 0.5, 0.5, 0.5]},
                    {"category": "1", "conf": 0.7, "bbox": [10, 10, 30, 20]},
                ],
            },
        ],
    }
    path = tmp_path / "md.json"
    path.write_text(json.dumps(results))

    table, problems = import_megadetector(path, image_root=tmp_path / "card", min_confidence=0.2)

    boxes = sorted(
        (Path(str(r["image_path"])).name, r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"])
        for _, r in table.iterrows()
    )
    assert boxes == [("a.jpg", 16, 24, 32, 12), ("e.jpg", 20, 20, 60, 40), ("e.jpg", 100, 50, 100, 50)]
    assert table["individual_id"].isna().all() and set(table["side"]) == {"unknown"}
    rows = _by_name(table)
    assert rows["a.jpg"]["timestamp"] == pd.Timestamp("2021-04-05 19:08:33", tz="UTC")
    assert table.loc[table["image_path"].str.endswith("e.jpg"), "encounter_id"].nunique() == 1
    assert _wheres(problems) == {"image b.jpg", "image d.jpg", "image sub/e.jpg detection 3"}
    by_where = {p.where: p.message for p in problems}
    assert "Failure image access" in by_where["image b.jpg"]
    assert "not normalised" in by_where["image sub/e.jpg detection 3"]


def test_xmp_tags_give_individual_and_file_name_gives_station_and_time(tmp_path: Path) -> None:
    _jpeg(tmp_path / "StationA__2021-04-05__19-08-33(1).JPG", xmp=_xmp("individual|KZ-0007", "side|left"))
    _jpeg(tmp_path / "StationA__2021-04-05__19-08-50(2).JPG", xmp=_xmp("individual|KZ-0007"))
    _jpeg(tmp_path / "StationB__2021-04-06__01-00-00(1).JPG")
    _jpeg(
        tmp_path / "sub" / "StationB__2021-04-06__02-00-00(1).JPG", xmp=_xmp("individual|KZ-0007", "individual|KZ-0009")
    )
    _jpeg(tmp_path / "IMG_0001.JPG", xmp=_xmp("Species|Leopard", "individual|KZ-0009"))
    (tmp_path / "StationC__2021-04-07__03-00-00(1).JPG").write_bytes(b"not a picture")

    table, problems = import_xmp_tags(tmp_path, country="KZ")

    rows = _by_name(table)
    assert {name: (_or_none(r["individual_id"]), r["side"], _or_none(r["station"])) for name, r in rows.items()} == {
        "StationA__2021-04-05__19-08-33(1).JPG": ("KZ-0007", "left", "StationA"),
        "StationA__2021-04-05__19-08-50(2).JPG": ("KZ-0007", "unknown", "StationA"),
        "StationB__2021-04-06__01-00-00(1).JPG": (None, "unknown", "StationB"),
        "StationB__2021-04-06__02-00-00(1).JPG": (None, "unknown", "StationB"),
        "IMG_0001.JPG": ("KZ-0009", "unknown", None),
    }
    first, second = rows["StationA__2021-04-05__19-08-33(1).JPG"], rows["StationA__2021-04-05__19-08-50(2).JPG"]
    assert first["timestamp"] == pd.Timestamp("2021-04-05 19:08:33", tz="UTC")
    assert first["encounter_id"] == second["encounter_id"] == "KZ/StationA/20210405T190833Z"
    assert _wheres(problems) == {
        "image sub/StationB__2021-04-06__02-00-00(1).JPG",
        "image IMG_0001.JPG",
        "image StationC__2021-04-07__03-00-00(1).JPG",
    }
    by_where = {p.where: p.message for p in problems}
    assert "several individuals" in by_where["image sub/StationB__2021-04-06__02-00-00(1).JPG"]
    assert "filename_pattern" in by_where["image IMG_0001.JPG"]


def test_xmp_tags_of_the_camtrapr_leopard_cats_match_expected(shared_dir: Path) -> None:
    folder = shared_dir / "data" / "camtrapr-leopardcat"
    expected = pd.read_csv(folder / "expected.csv", dtype=str)

    table, problems = import_xmp_tags(folder / "images")

    assert problems == []
    got = {
        Path(str(r["image_path"])).name: (r["individual_id"], r["station"], r["timestamp"]) for _, r in table.iterrows()
    }
    want = {r.file: (r.xmp_individual, r.station, pd.Timestamp(r.timestamp, tz="UTC")) for r in expected.itertuples()}
    assert len(want) == 26 and got == want


def test_camtrap_dp_official_example_imports_local_media_and_reports_the_rest(shared_dir: Path) -> None:
    package = shared_dir / "data" / "camtrap-dp-1.0.2" / "example"

    table, problems = import_camtrap_dp(package)

    assert len(table) == 10 and table["image_path"].map(lambda p: Path(p).is_file()).all()
    assert table[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].notna().all().all()
    assert set(table["encounter_id"]) == {"event:7245a2aa"}
    assert len(problems) == 327 and all("media file not available locally: download" in p.message for p in problems)


def test_labels_csv_imports_nyala_dev_counts(shared_dir: Path) -> None:
    table, problems = import_labels_csv(shared_dir / "data" / "nyala-dev" / "labels.csv")

    assert problems == []
    assert (len(table), table["individual_id"].nunique()) == (1213, 179)
    assert table["side"].value_counts().to_dict() == {"right": 608, "left": 605}
    duplicates = table[table["image_path"].str.contains(r"\(1\)\.jpg$")]
    assert len(duplicates) == 8 and set(duplicates["individual_id"]) == {"218"}
