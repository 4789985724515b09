"""The image reader against every kind of bad or unusual input a camera card holds."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from reid.errors import ReidError
from reid.images import ImageReadError, image_size, read_image, set_threads


def _quadrants(width: int = 64, height: int = 48) -> np.ndarray:
    """Return an RGB image whose four quadrants have distinct colours, so orientation is checkable."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[: height // 2, : width // 2] = (255, 0, 0)
    img[: height // 2, width // 2 :] = (0, 255, 0)
    img[height // 2 :, : width // 2] = (0, 0, 255)
    img[height // 2 :, width // 2 :] = (255, 255, 255)
    return img


def test_reads_rgb_jpeg_as_uint8_rgb(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(_quadrants()).save(path)
    img = read_image(path)
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (255, 0, 0) and tuple(img[-1, -1]) == (255, 255, 255)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    stored = _quadrants()
    # What the camera meant: orientation 6 means "rotate 90 degrees clockwise to display".
    expected = {3: np.rot90(stored, 2), 6: np.rot90(stored, -1), 8: np.rot90(stored, 1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    img = read_image(path)
    assert img.shape == expected.shape
    assert image_size(path) == (expected.shape[1], expected.shape[0])
    assert np.abs(img.astype(int) - expected.astype(int)).mean() < 8


def test_box_refers_to_the_oriented_image(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(_quadrants(64, 48)).save(path, quality=95, exif=exif)
    # Displayed image is 48 wide x 64 tall; its top-left quadrant was the stored bottom-left (blue).
    crop = read_image(path, bbox=(2, 2, 20, 28))
    assert crop.shape == (28, 20, 3)
    assert np.abs(crop.mean(axis=(0, 1)) - (0, 0, 255)).max() < 10


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    path = tmp_path / "ir.png"
    Image.fromarray(np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)).save(path)
    img = read_image(path)
    assert img.shape == (48, 64, 3)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


def test_sixteen_bit_image_is_stretched_to_eight_bits(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    data = np.linspace(1000, 4095, 48 * 64).reshape(48, 64).astype(np.uint16)  # 12-bit data in 16 bits
    Image.fromarray(data).save(path)
    assert Image.open(path).mode.startswith("I")
    img = read_image(path)
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    assert (np.diff(img[..., 0].ravel().astype(int)) >= 0).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(_quadrants()).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    img = read_image(path)
    assert img.shape == (48, 64, 3)
    assert np.abs(img[5, 5].astype(int) - (255, 0, 0)).max() < 30


def test_rgba_and_palette_images_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 255
    rgba[:5, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[-1, -1]) == (0, 200, 0)
    Image.fromarray(_quadrants()).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (48, 64, 3)


def test_crop_with_margin_is_clipped_to_the_image(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(_quadrants()).save(path)
    assert read_image(path, bbox=(10, 10, 20, 10)).shape == (10, 20, 3)
    assert read_image(path, bbox=(10, 10, 20, 10), margin=0.25).shape == (10 + 2 * 3, 20 + 2 * 5, 3)
    assert read_image(path, bbox=(50, 40, 30, 30), margin=0.5).shape == (48 - 25, 64 - 35, 3)


def test_box_outside_the_image_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(_quadrants()).save(path)
    with pytest.raises(ImageReadError, match="outside the 64 x 48 image"):
        read_image(path, bbox=(100, 100, 10, 10))


def test_large_jpeg_is_downscaled_while_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    big = np.kron(_quadrants(64, 48), np.ones((50, 50, 1), dtype=np.uint8))  # 3200 x 2400
    Image.fromarray(big).save(path, quality=90)
    img = read_image(path, max_side_px=200)
    assert max(img.shape[:2]) == 200 and img.shape[:2] == (150, 200)
    crop = read_image(path, bbox=(1600, 1200, 1600, 1200), max_side_px=100)
    assert crop.shape[:2] == (75, 100)
    assert np.abs(crop.mean(axis=(0, 1)) - 255).max() < 10


def test_small_image_is_never_enlarged(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(_quadrants()).save(path)
    assert read_image(path, max_side_px=1000).shape == (48, 64, 3)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found") as info:
        read_image(tmp_path / "nope.jpg")
    assert info.value.path.endswith("nope.jpg")


def test_empty_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "empty.jpg")


def test_non_image_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(tmp_path / "notes.jpg")


def test_truncated_jpeg_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(path)


def test_corrupt_bytes_inside_a_png_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    Image.fromarray(_quadrants()).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start : start + 8] = b"\xff" * 8  # break the zlib stream of the pixel data
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError):
        read_image(path)


def test_oversized_image_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (4000, 3000)).save(path)  # a few kB on disk, 12 megapixels decoded
    assert path.stat().st_size < 10_000
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(path, max_pixels=10_000_000)
    with pytest.raises(ImageReadError, match="over the limit"):
        image_size(path, max_pixels=10_000_000)


@pytest.mark.parametrize("threads", [-1, "two", 1.5, True])
def test_a_bad_thread_count_is_refused_with_the_fix(threads: object) -> None:
    with pytest.raises(ReidError, match=r"give a whole number of CPU threads .* or null for one per core"):
        set_threads(threads)  # type: ignore[arg-type]


def test_no_thread_count_leaves_every_library_as_it_is() -> None:
    before = (torch.get_num_threads(), cv2.getNumThreads())
    set_threads(None)
    set_threads(0)
    assert (torch.get_num_threads(), cv2.getNumThreads()) == before
