"""The keypoint matcher against coats whose true transform and identity are known by construction."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid.errors import ReidError
from reid.keypoints import (
    Correspondences,
    Features,
    KeypointConfig,
    draw_correspondences,
    extract,
    extract_rows,
    features_from_bytes,
    features_to_bytes,
    match,
    read_crop,
    score_pairs,
)

AKAZE_AVAILABLE = hasattr(cv2, "AKAZE_create") or hasattr(getattr(cv2, "xfeatures2d", None), "AKAZE_create")
DESCRIPTOR_KIND = {
    "rootsift": (np.float32, 128),
    "sift": (np.float32, 128),
    "orb": (np.uint8, 32),
    "akaze": (np.uint8, 61),
}


def _coat(seed: int, width: int = 300, height: int = 150, n_spots: int = 70) -> np.ndarray:
    """Return an (H, W, 3) uint8 coat: dark spots of random size and place on a tawny ground, one per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    coat = np.empty((height, width, 3), np.uint8)
    coat[:] = (200, 160, 100)
    for _ in range(n_spots):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, 9)
        coat[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (40, 30, 20)
    return coat


def _recaptured(image: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the image seen again (rotated 10 deg, scaled 0.85, darker, noisy) and the (2, 3) map of its pixels."""
    height, width = image.shape[:2]
    transform = cv2.getRotationMatrix2D((width / 2, height / 2), 10.0, 0.85)
    warped = cv2.warpAffine(image, transform, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    noise = np.random.default_rng(seed).normal(0.0, 4.0, warped.shape)
    return np.clip(warped * 0.8 + noise, 0, 255).astype(np.uint8), transform


def _random_features(method: str, n: int, seed: int) -> Features:
    rng = np.random.default_rng(seed)
    dtype, width = DESCRIPTOR_KIND[method]
    descriptors: np.ndarray
    if dtype is np.uint8:
        descriptors = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
    else:
        descriptors = rng.random((n, width), dtype=np.float32)
    xy = (rng.random((n, 2)) * 300).astype(np.float32)
    return Features(xy=xy, descriptors=descriptors, size=(150 + n, 300))


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize("geometry", ["affine", "homography"])
def test_matcher_recovers_a_known_rotation_scale_and_lighting_change(geometry: str) -> None:
    config = KeypointConfig(geometry=geometry)  # type: ignore[arg-type]
    coat = _coat(1)
    recaptured, transform = _recaptured(coat, seed=2)
    corr = match(extract(coat, config), extract(recaptured, config), config)
    assert corr.n_inliers >= 40
    assert corr.query_xy.shape == corr.gallery_xy.shape == (corr.n_inliers, 2)
    # The known map, not the fitted one, takes every verified query point onto its gallery point.
    mapped = corr.query_xy @ transform[:, :2].T + transform[:, 2]
    error_px = np.linalg.norm(mapped - corr.gallery_xy, axis=1)
    assert np.median(error_px) < 1.0
    assert np.percentile(error_px, 90) < 3.0


def test_matcher_rejects_other_individuals() -> None:
    config = KeypointConfig()
    recaptured, _ = _recaptured(_coat(1), seed=2)
    gallery = extract(recaptured, config)
    same = match(extract(_coat(1), config), gallery, config).n_inliers
    others = [match(extract(_coat(seed), config), gallery, config).n_inliers for seed in (3, 4, 5, 6)]
    assert max(others) <= 10
    assert max(others) * 5 < same


def test_a_mirrored_coat_is_not_a_match() -> None:
    # Round spots look alike mirrored, so an unconstrained affine map would fit a mirror image;
    # a same-side flank is never seen mirrored.
    config = KeypointConfig()
    coat = _coat(1)
    mirrored = np.ascontiguousarray(coat[:, ::-1])
    assert match(extract(coat, config), extract(mirrored, config), config).n_inliers == 0


def test_upright_describes_each_place_once_at_angle_zero() -> None:
    coat = _coat(1)
    upright, turning = KeypointConfig(upright=True), KeypointConfig()
    found = extract(coat, upright)
    # SIFT describes a place once per strong gradient orientation; upright, once.
    assert len({tuple(p) for p in np.round(found.xy, 2)}) == len(found) > 40
    assert len({tuple(p) for p in np.round(extract(coat, turning).xy, 2)}) < len(extract(coat, turning))
    # A flank photographed a little tilted still matches; one turned on its side only rotation-invariant SIFT follows.
    recaptured, _ = _recaptured(coat, seed=2)
    assert match(found, extract(recaptured, upright), upright).n_inliers >= 30
    turned = np.ascontiguousarray(np.rot90(coat))
    assert match(extract(coat, turning), extract(turned, turning), turning).n_inliers >= 30
    assert match(found, extract(turned, upright), upright).n_inliers < 10
    # Galleries stored before the option existed read back as rotation-invariant.
    stored = {k: v for k, v in KeypointConfig().to_dict().items() if k != "upright"}
    assert KeypointConfig.from_dict(stored).upright is False


@pytest.mark.parametrize("method", ["orb", "akaze", "sift"])
def test_other_methods_are_selectable_and_match(method: str) -> None:
    if method == "akaze" and not AKAZE_AVAILABLE:
        pytest.skip("this OpenCV build has no AKAZE (OpenCV 5 ships it in opencv-contrib only)")
    config = KeypointConfig(method=method)  # type: ignore[arg-type]
    coat = _coat(1)
    recaptured, transform = _recaptured(coat, seed=2)
    query, gallery = extract(coat, config), extract(recaptured, config)
    dtype, width = DESCRIPTOR_KIND[method]
    assert query.descriptors.dtype == dtype and query.descriptors.shape == (len(query.xy), width)
    same = match(query, gallery, config)
    other = match(extract(_coat(3), config), gallery, config)
    assert same.n_inliers >= 20
    assert other.n_inliers * 4 < same.n_inliers
    mapped = same.query_xy @ transform[:, :2].T + transform[:, 2]
    assert np.median(np.linalg.norm(mapped - same.gallery_xy, axis=1)) < 1.5


@pytest.mark.skipif(AKAZE_AVAILABLE, reason="this OpenCV build has AKAZE")
def test_akaze_without_opencv_contrib_names_the_package_to_install() -> None:
    with pytest.raises(ReidError, match="opencv-contrib-python-headless"):
        extract(_coat(1), KeypointConfig(method="akaze"))


def test_features_keep_at_most_max_features_strongest() -> None:
    few = extract(_coat(1), KeypointConfig(max_features=50))
    many = extract(_coat(1), KeypointConfig(max_features=2000))
    assert len(few) == 50 < len(many)
    # The strongest 50 are among all the keypoints found without the cap.
    distance_px = np.linalg.norm(few.xy[:, None] - many.xy[None], axis=2).min(axis=1)
    assert distance_px.max() < 1e-3


def test_roi_drops_features_outside_it() -> None:
    coat = _coat(1)
    whole = extract(coat, KeypointConfig())
    left_half = extract(coat, KeypointConfig(roi=(0.0, 0.0, 0.5, 1.0)))
    assert 0 < len(left_half) < len(whole)
    assert left_half.xy[:, 0].max() < coat.shape[1] / 2
    assert left_half.size == whole.size == coat.shape[:2]


def test_too_few_keypoints_for_the_model_give_no_inliers() -> None:
    config = KeypointConfig()
    features = extract(_coat(1), config)
    three = Features(features.xy[:3], features.descriptors[:3], features.size)
    assert match(three, features, config).n_inliers == 0
    assert match(features, three, config).n_inliers == 0
    empty = Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), (0, 0))
    assert match(empty, features, config).n_inliers == 0


def test_descriptors_of_different_methods_are_not_matched() -> None:
    config = KeypointConfig()
    with pytest.raises(ReidError, match="same KeypointConfig"):
        match(extract(_coat(1), config), extract(_coat(1), KeypointConfig(method="orb")), config)


def test_score_pairs_gives_each_pairs_inlier_count() -> None:
    config = KeypointConfig()
    coats = [_coat(1), _recaptured(_coat(1), seed=2)[0], _coat(3)]
    features = [extract(coat, config) for coat in coats]
    pairs = np.array([[0, 1], [0, 2], [1, 0], [2, 2]])
    scores = score_pairs(features, features, pairs, config)
    expected = [match(features[i], features[j], config).n_inliers for i, j in pairs]
    assert scores.shape == (4,) and scores.dtype == np.float64
    assert scores.tolist() == expected
    assert scores[3] == len(features[2])  # a crop against itself: every keypoint verifies
    assert score_pairs(features, features, np.zeros((0, 2), np.int64), config).shape == (0,)
    with pytest.raises(ReidError, match="gallery index 3"):
        score_pairs(features, features, np.array([[0, 3]]), config)


@pytest.mark.parametrize("method", ["rootsift", "sift", "orb", "akaze"])
def test_features_round_trip_through_bytes_exactly(method: str) -> None:
    config = KeypointConfig(method=method, max_features=300, roi=(0.1, 0.0, 0.9, 1.0))  # type: ignore[arg-type]
    features = [_random_features(method, 5, seed=0), _random_features(method, 0, seed=1)]
    features.append(_random_features(method, 17, seed=2))
    loaded, loaded_config = features_from_bytes(features_to_bytes(features, config))
    assert loaded_config == config
    assert len(loaded) == len(features)
    for before, after in zip(features, loaded, strict=True):
        assert after.size == before.size
        assert after.xy.dtype == before.xy.dtype and np.array_equal(after.xy, before.xy)
        assert after.descriptors.dtype == before.descriptors.dtype
        assert np.array_equal(after.descriptors, before.descriptors)


def test_no_features_round_trip_too() -> None:
    loaded, config = features_from_bytes(features_to_bytes([], KeypointConfig()))
    assert loaded == [] and config == KeypointConfig()


def test_features_of_another_method_are_not_stored() -> None:
    with pytest.raises(ReidError, match="extract them with this config"):
        features_to_bytes([_random_features("orb", 4, seed=0)], KeypointConfig())


def _stored_arrays() -> dict[str, np.ndarray]:
    data = features_to_bytes([_random_features("rootsift", 6, seed=0)], KeypointConfig())
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


@pytest.mark.parametrize(
    "tamper",
    [
        "object_descriptors",
        "object_meta",
        "truncated",
        "not_npz",
        "single_npy",
        "bad_offsets",
        "other_format",
        "bad_config",
        "missing_sizes",
    ],
)
def test_tampered_or_pickled_feature_files_are_refused(tamper: str) -> None:
    arrays = _stored_arrays()
    if tamper == "object_descriptors":
        arrays["descriptors"] = np.array([object()] * 6, dtype=object)
    elif tamper == "object_meta":
        arrays["meta"] = np.array([{"format": "x"}], dtype=object)
    elif tamper == "bad_offsets":
        arrays["offsets"] = np.array([0, 9], np.int64)
    elif tamper == "other_format":
        header = json.loads(str(arrays["meta"][0]))
        arrays["meta"] = np.array([json.dumps({**header, "format": "something-else/9"})])
    elif tamper == "bad_config":
        header = json.loads(str(arrays["meta"][0]))
        arrays["meta"] = np.array([json.dumps({**header, "config": {**header["config"], "method": "surf"}})])
    elif tamper == "missing_sizes":
        del arrays["sizes"]
    data = _npz(**arrays)
    if tamper == "truncated":
        data = data[: len(data) // 2]
    elif tamper == "not_npz":
        data = b"\x80\x04 a pickle, not an npz"
    elif tamper == "single_npy":
        buffer = io.BytesIO()
        np.save(buffer, arrays["xy"])
        data = buffer.getvalue()
    with pytest.raises(ReidError, match="rebuild the keypoint file"):
        features_from_bytes(data)


def test_extract_rows_reports_unreadable_files_and_goes_on(flank_catalogue: pd.DataFrame, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    good = flank_catalogue.head(2)
    rows = pd.concat([good, good.head(1), good.head(1)], ignore_index=True)
    rows.loc[2, "image_path"] = str(tmp_path / "missing.jpg")
    rows.loc[3, "image_path"] = str(broken)
    features, problems = extract_rows(rows, KeypointConfig(), progress=False)
    assert len(features) == 4
    # Boxed crops come out at the box's size (the boxes are smaller than max_side_px).
    for item, (_, row) in zip(features[:2], good.iterrows(), strict=True):
        assert item.size == (row["bbox_h"], row["bbox_w"]) and len(item) > 0
    assert [len(item) for item in features[2:]] == [0, 0]
    assert features[2].descriptors.shape == (0, 128) and features[2].size == (0, 0)
    assert [(problem.source, problem.where) for problem in problems] == [
        (str(tmp_path / "missing.jpg"), ""),
        (str(broken), ""),
    ]
    assert "not found" in problems[0].message and "not an image" in problems[1].message


def test_pictures_described_on_two_threads_come_out_as_on_one(flank_catalogue: pd.DataFrame, tmp_path: Path) -> None:
    rows = flank_catalogue.head(6).reset_index(drop=True)
    rows.loc[[1, 4], "image_path"] = [str(tmp_path / "first.jpg"), str(tmp_path / "second.jpg")]
    threads = cv2.getNumThreads()
    try:
        described = []
        for n in (1, 2):
            cv2.setNumThreads(n)
            described.append(extract_rows(rows, KeypointConfig(background="grabcut"), progress=False))
    finally:
        cv2.setNumThreads(threads)
    (one, one_problems), (two, two_problems) = described
    assert (
        [p.source for p in one_problems] == [p.source for p in two_problems] == rows.loc[[1, 4], "image_path"].tolist()
    )
    assert [len(item) for item in one] == [len(item) for item in two] and min(len(one[i]) for i in (0, 2, 3, 5)) > 0
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.xy, b.xy)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)


def test_rows_without_boxes_use_the_whole_image(tmp_path: Path) -> None:
    path = tmp_path / "flank.png"
    Image.fromarray(_coat(1, width=600, height=300)).save(path)
    config = KeypointConfig()
    rows = pd.DataFrame({"image_path": [str(path), str(path)], "bbox_x": [np.nan, 300.0]})
    rows = rows.assign(bbox_y=[np.nan, 0.0], bbox_w=[np.nan, 300.0], bbox_h=[np.nan, 300.0])
    (whole, boxed), problems = extract_rows(rows, config, progress=False)
    assert problems == []
    assert whole.size == (200, 400)  # shrunk to max_side_px
    assert boxed.size == (300, 300)
    assert read_crop(path, None, config).shape == (200, 400, 3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "surf"}, "method 'surf' is not one of rootsift, sift, orb, akaze"),
        ({"max_features": 0}, "max_features must be a whole number of at least 10"),
        ({"max_side_px": 32}, "max_side_px must be a whole number of at least 64"),
        ({"crop_margin": -0.1}, "crop_margin must be between 0 and 1"),
        ({"roi": (0.6, 0.0, 0.4, 1.0)}, "roi must be"),
        ({"roi": (0.0, 0.0, 1.0)}, "roi must be"),
        ({"ratio": 1.5}, "ratio must be above 0 and at most 1"),
        ({"ransac_px": 0}, "ransac_px must be a positive number"),
        ({"camera_shift": 0.5}, "camera_shift must be a fraction of the frame"),
        ({"geometry": "similarity"}, "geometry 'similarity' is not one of affine, homography"),
        ({"upright": "yes"}, "upright must be true or false"),
        ({"upright": True, "method": "orb"}, "upright applies to rootsift and sift only, not 'orb'"),
    ],
)
def test_invalid_config_names_the_fix(values: dict, message: str) -> None:
    with pytest.raises(ReidError, match="invalid KeypointConfig: " + ".*" + message.replace("(", r"\(")):
        KeypointConfig(**values)


def test_config_round_trips_through_json() -> None:
    config = KeypointConfig(method="orb", roi=(0.1, 0.2, 0.9, 1.0), ratio=0.75, geometry="homography")
    assert KeypointConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ReidError, match="unknown keys"):
        KeypointConfig.from_dict({**config.to_dict(), "nfeatures": 100})


def test_drawing_puts_the_crops_side_by_side_at_one_height() -> None:
    query = _coat(1)
    gallery = np.ascontiguousarray(_coat(1)[::3, ::3])  # 50 x 100 px: drawn at 150 x 300
    corr = Correspondences(2, np.array([[10, 10], [200, 100]], np.float32), np.array([[5, 5], [60, 30]], np.float32))
    picture = draw_correspondences(query, gallery, corr)
    assert picture.shape == (150, 300 + 8 + 300, 3) and picture.dtype == np.uint8
    plain = draw_correspondences(query, gallery, Correspondences(0, corr.query_xy[:0], corr.gallery_xy[:0]))
    assert np.array_equal(plain[:, :300], query)
    # Lines cross the white gap between the crops only where there are matches.
    assert np.all(plain[:, 300:308] == 255) and not np.all(picture[:, 300:308] == 255)


def _camera_frame(path: Path, coat: np.ndarray, at: tuple[int, int], camera: tuple[int, int] = (0, 0)) -> None:
    """Save a 480 x 320 frame of one fixed camera: the same textured background (moved by `camera` px when the
    camera was re-mounted), the coat pasted at `at`."""
    background = cv2.resize(
        np.random.default_rng(99).integers(0, 256, (40, 60, 3), dtype=np.uint8),
        (480, 320),
        interpolation=cv2.INTER_NEAREST,
    )
    frame = np.roll(background, camera[::-1], axis=(0, 1)).copy()
    x, y = at
    frame[y : y + coat.shape[0], x : x + coat.shape[1]] = coat
    Image.fromarray(frame).save(path)


def _two_animals_at_one_camera(tmp_path: Path, camera: tuple[int, int] = (0, 0)) -> list[Features]:
    """Return the features of animal A, then animal B and A again on a later visit (the camera moved by `camera`).

    Boxes generous enough to hold as much background as coat, as loose animal boxes do.
    """
    coat_a, coat_b = _coat(1, 200, 100), _coat(2, 200, 100)
    _camera_frame(tmp_path / "a.png", coat_a, (40, 60))
    _camera_frame(tmp_path / "b.png", coat_b, (200, 150), camera=camera)  # another animal, elsewhere in the frame
    _camera_frame(tmp_path / "a_again.png", coat_a, (220, 170), camera=camera)  # the first animal again, moved
    rows = pd.DataFrame(
        {
            "image_path": [str(tmp_path / n) for n in ("a.png", "b.png", "a_again.png")],
            "bbox_x": [0.0, 120.0, 140.0],
            "bbox_y": [0.0, 80.0, 100.0],
            "bbox_w": [340.0, 360.0, 340.0],
            "bbox_h": [260.0, 240.0, 220.0],
        }
    )
    features, problems = extract_rows(rows, KeypointConfig(), progress=False)
    assert problems == [] and all(f.frame_xy is not None for f in features)
    return features


def test_a_fixed_cameras_background_does_not_match_but_the_animal_does(tmp_path: Path) -> None:
    keeping = KeypointConfig(static_background=0.0)
    features = _two_animals_at_one_camera(tmp_path)
    # Without the check, the shared background makes two different animals a strong match.
    assert match(features[0], features[1], keeping).n_inliers > 20
    assert match(features[0], features[1], KeypointConfig()).n_inliers < 8
    assert match(features[0], features[2], KeypointConfig()).n_inliers > 30
    # The animal moved by (180, 110) px in the frame; crop C starts at (140, 100), crop A at (0, 0), neither shrunk.
    found = match(features[0], features[2], KeypointConfig())
    assert np.median(np.abs(found.gallery_xy - (found.query_xy + np.array([40, 10])))) < 2
    # Frame positions are the crop positions put back in the 480 x 320 frame.
    np.testing.assert_allclose(features[2].frame_xy * (480, 320), features[2].xy + np.array([140, 100]), atol=0.01)
    restored, _ = features_from_bytes(features_to_bytes(features, KeypointConfig()))
    np.testing.assert_array_equal(restored[2].frame_xy, features[2].frame_xy)


def test_a_camera_moved_between_visits_still_does_not_match_its_background(tmp_path: Path) -> None:
    # The second visit's frames see the scene 14 px right and 9 px down (3 % of the frame): beyond the
    # same-place tolerance, so only the moved-together rule tells the scene from the animals.
    features = _two_animals_at_one_camera(tmp_path, camera=(14, 9))
    same_place_only = KeypointConfig(camera_shift=0.0)
    assert match(features[0], features[1], same_place_only).n_inliers > 20  # the moved scene matches itself
    assert match(features[0], features[1], KeypointConfig()).n_inliers < 8
    found = match(features[0], features[2], KeypointConfig())
    assert found.n_inliers > 30  # the animal moved by (180, 110) px: kept
    assert np.median(np.abs(found.gallery_xy - (found.query_xy + np.array([40, 10])))) < 2


def test_an_animal_that_moved_little_is_not_taken_for_a_moved_camera_beyond_the_limit(tmp_path: Path) -> None:
    # The same animal 60 px (12 % of the frame) further on, the camera not moved: beyond `camera_shift`, so kept.
    coat = _coat(4, 200, 100)
    _camera_frame(tmp_path / "a.png", coat, (100, 100))
    _camera_frame(tmp_path / "b.png", coat, (160, 100))
    rows = pd.DataFrame(
        {
            "image_path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
            "bbox_x": [90.0, 150.0],
            "bbox_y": [90.0, 90.0],
            "bbox_w": [220.0, 220.0],
            "bbox_h": [120.0, 120.0],
        }
    )
    features, _ = extract_rows(rows, KeypointConfig(), progress=False)
    assert match(features[0], features[1], KeypointConfig()).n_inliers > 30
    # Told that cameras move by up to 15 %, the same displacement is taken for the scene: a missed match, not a wrong one.
    assert match(features[0], features[1], KeypointConfig(camera_shift=0.15)).n_inliers < 8


def test_pictures_without_a_box_keep_matches_at_the_same_place(tmp_path: Path) -> None:
    # Ready-made flank crops: the same rosettes sit at the same place of two crops, and must still match.
    coat = _coat(3)
    Image.fromarray(coat).save(tmp_path / "a.png")
    Image.fromarray(np.clip(coat * 0.9 + 5, 0, 255).astype(np.uint8)).save(tmp_path / "b.png")
    features, _ = extract_rows(
        pd.DataFrame({"image_path": [str(tmp_path / "a.png"), str(tmp_path / "b.png")]}),
        KeypointConfig(),
        progress=False,
    )
    assert features[0].frame_xy is None
    assert match(features[0], features[1], KeypointConfig()).n_inliers > 30
