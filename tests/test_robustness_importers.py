"""Malformed inputs end in a one-line message naming the file, row or setting and the fix; nothing is dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from reid.catalogue import build_catalogue
from reid.errors import CatalogueError, Problem
from reid.importers import import_camtrap_dp, import_coco, import_folders, import_labels_csv, import_megadetector


def _jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (90, 80, 70)).save(path, format="JPEG")
    return path


def _megadetector(tmp_path: Path, images: list[object]) -> Path:
    path = tmp_path / "md.json"
    path.write_text(json.dumps({"detection_categories": {"1": "animal"}, "images": images}))
    return path


def _by_where(problems: list[Problem]) -> dict[str, str]:
    return {p.where: p.message for p in problems}


def test_megadetector_entries_of_the_wrong_type_are_reported_not_a_traceback(tmp_path: Path) -> None:
    _jpeg(tmp_path / "a.jpg")
    good = {"file": "a.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0, 0, 1, 1]}]}
    path = _megadetector(tmp_path, [{"file": 123, "detections": []}, {"file": "b.jpg", "detections": 5}, good])

    table, problems = import_megadetector(path)

    assert len(table) == 1
    by_where = _by_where(problems)
    assert "'file' is 123, not a path" in by_where["image #1"]
    assert "'detections' is 5, not a list" in by_where["image b.jpg"]
    assert all(p.source == str(path.resolve()) for p in problems)


@pytest.mark.parametrize(
    ("detection", "said"),
    [
        ({"category": "1", "bbox": [0, 0, 1, 1]}, "'conf' is missing"),
        ({"category": "1", "conf": -0.2, "bbox": [0, 0, 1, 1]}, "'conf' is -0.2, not a number from 0 to 1"),
        ({"category": "1", "conf": 1.7, "bbox": [0, 0, 1, 1]}, "'conf' is 1.7, not a number from 0 to 1"),
        ({"category": "1", "conf": "high", "bbox": [0, 0, 1, 1]}, "'conf' is 'high'"),
        ({"conf": 0.9, "bbox": [0, 0, 1, 1]}, "no 'category'"),
    ],
)
def test_megadetector_detections_without_a_usable_conf_or_category_are_reported(
    tmp_path: Path, detection: dict, said: str
) -> None:
    _jpeg(tmp_path / "a.jpg")
    keep = {"category": "1", "conf": 0.9, "bbox": [0, 0, 0.5, 0.5]}
    path = _megadetector(tmp_path, [{"file": "a.jpg", "detections": [keep, detection]}])

    table, problems = import_megadetector(path)

    assert len(table) == 1 and table["bbox_w"].tolist() == [32]
    assert [p.where for p in problems] == ["image a.jpg detection 2"]
    assert said in problems[0].message and "run the detector on this image again" in problems[0].message


def test_camtrap_dp_whose_resources_are_not_a_list_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "datapackage.json").write_text(json.dumps({"resources": 5}))
    with pytest.raises(CatalogueError, match=r"datapackage\.json: 'resources' is 5, not a list"):
        import_camtrap_dp(tmp_path)


@pytest.mark.parametrize("importer", [import_coco, import_megadetector])
def test_deeply_nested_json_is_refused_naming_the_file(tmp_path: Path, importer) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CatalogueError, match=r"deep\.json: JSON nested too deeply to read"):
        importer(path)


def test_one_image_labelled_as_two_individuals_drops_both_rows_and_names_them(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        _jpeg(tmp_path / name)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,individual_id,side\na.jpg,KZ-1,left\nb.jpg,KZ-2,left\na.jpg,KZ-3,left\n")

    table, problems = import_labels_csv(csv_path)

    assert table["individual_id"].tolist() == ["KZ-2"]
    by_where = _by_where(problems)
    assert set(by_where) == {"row 2", "row 4"}
    assert "is labelled KZ-1 here but row 4 says KZ-3" in by_where["row 2"]
    assert "is labelled KZ-3 here but row 2 says KZ-1" in by_where["row 4"]


def test_two_animals_in_one_image_are_not_a_conflict() -> None:
    rows = [
        {
            "image_path": "/x/a.jpg",
            "individual_id": "KZ-1",
            "side": "left",
            "bbox_x": 0,
            "bbox_y": 0,
            "bbox_w": 9,
            "bbox_h": 9,
        },
        {
            "image_path": "/x/a.jpg",
            "individual_id": "KZ-2",
            "side": "left",
            "bbox_x": 20,
            "bbox_y": 0,
            "bbox_w": 9,
            "bbox_h": 9,
        },
        {"image_path": "/x/b.jpg", "individual_id": "KZ-1", "side": "left"},
        {"image_path": "/x/b.jpg", "individual_id": "KZ-1", "side": "left"},
    ]
    table, problems = build_catalogue(rows)
    assert problems == [] and len(table) == 4


def test_a_nul_byte_inside_an_id_is_refused_with_its_row(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        _jpeg(tmp_path / name)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,individual_id,side\na.jpg,KZ-1,left\nb.jpg,KZ-\x001,left\n")

    table, problems = import_labels_csv(csv_path)

    assert table["individual_id"].tolist() == ["KZ-1"]
    assert [p.where for p in problems] == ["row 3"]
    assert "individual_id 'KZ-\\x001' contains an invisible control character (NUL)" in problems[0].message


def test_an_unclosed_quote_is_refused_naming_the_line_where_it_opened(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        _jpeg(tmp_path / name)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        'path,individual_id,side\na.jpg,KZ-1,left\n"b.jpg,KZ-2,left\nc.jpg,KZ-3,right\nd.jpg,KZ-4,left\n'
    )
    with pytest.raises(CatalogueError, match=r"labels\.csv: line 3: a quote .* lines 3 to 5 were read as one row"):
        import_labels_csv(csv_path)


def test_a_quoted_cell_over_two_lines_is_still_read(tmp_path: Path) -> None:
    _jpeg(tmp_path / "a.jpg")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text('path,individual_id,side,notes\na.jpg,KZ-1,left,"seen twice,\nat dusk"\n')
    table, problems = import_labels_csv(csv_path)
    assert problems == [] and table["individual_id"].tolist() == ["KZ-1"]


def test_a_labels_csv_with_a_header_and_no_rows_is_refused(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,individual_id,side\n\n")
    with pytest.raises(CatalogueError, match=r"labels\.csv: the file has a header but no rows"):
        import_labels_csv(csv_path)


def test_an_empty_folder_is_refused_not_imported_as_nothing(tmp_path: Path) -> None:
    (tmp_path / "cards").mkdir()
    with pytest.raises(CatalogueError, match=r"cards: the folder holds no files"):
        import_folders(tmp_path / "cards")


def test_a_folder_of_non_images_is_reported_file_by_file(tmp_path: Path) -> None:
    (tmp_path / "cards" / "KZ-1").mkdir(parents=True)
    (tmp_path / "cards" / "KZ-1" / "notes.txt").write_text("x")
    table, problems = import_folders(tmp_path / "cards")
    assert len(table) == 0 and [p.where for p in problems] == ["file KZ-1/notes.txt"]


def test_a_path_cut_at_a_space_hints_at_quoting(tmp_path: Path) -> None:
    (tmp_path / "Camera Trap 2023").mkdir()
    with pytest.raises(CatalogueError) as refused:
        import_labels_csv(tmp_path / "Camera")
    message = str(refused.value)
    assert "looks cut at a space" in message and f"'setting=\"{tmp_path / 'Camera Trap 2023'}/...\"'" in message
    with pytest.raises(CatalogueError) as refused:
        import_camtrap_dp(tmp_path / "Camera")
    assert "looks cut at a space" in str(refused.value)
    with pytest.raises(CatalogueError) as refused:
        import_folders(tmp_path / "Elsewhere")
    assert "looks cut" not in str(refused.value)


def test_unreadable_images_of_a_labels_csv_are_named_by_their_csv_line(tmp_path: Path) -> None:
    from reid.keypoints import KeypointConfig, extract_rows
    from reid.models import create_embedder, embed_images

    _jpeg(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,individual_id,side\na.jpg,KZ-1,left\nbroken.jpg,KZ-2,left\n")
    table, problems = import_labels_csv(csv_path)
    assert problems == []

    embedded = embed_images(create_embedder("test_convnext", 16, img_size=48), table, progress=False)
    _, keypoint_problems = extract_rows(table, KeypointConfig(), progress=False)

    for problem in (*embedded.problems, *keypoint_problems):
        assert (problem.source, problem.where) == (str(csv_path.resolve()), "row 3")
        assert problem.message.startswith(f"image {tmp_path.resolve() / 'broken.jpg'}: ")
