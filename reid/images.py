"""The one image reader: every pixel the project uses comes through `read_image`.

It applies the EXIF orientation, converts any mode (grayscale, palette, CMYK,
RGBA, 16-bit) to 8-bit RGB, crops to a box with a margin, downscales large images
while decoding (JPEG draft mode) and refuses decompression bombs. Files that cannot
be used raise `ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm
from tqdm.contrib.concurrent import thread_map

from reid.errors import ReidError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 200_000_000  # about a 16k x 12k frame; larger is almost surely an error or an attack
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
Item = TypeVar("Item")
Result = TypeVar("Result")


class ImageReadError(ReidError):
    """An image that cannot be used, with the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def map_pictures(
    work: Callable[[Item], Result], items: Sequence[Item], *, desc: str, progress: bool = False
) -> list[Result]:
    """Return [work(item) for item in items], in order, worked on by as many threads as OpenCV uses.

    That is one per core, or the run's `threads` setting (`set_threads`).
    PIL's decoding and OpenCV release the GIL, so two cores describe pictures nearly
    twice as fast (GrabCut and RootSIFT of nyala-dev pictures: 410 ms a picture, 220 ms
    on two threads). `work` must not share mutable state between items.
    """
    workers = max(1, cv2.getNumThreads())
    if workers == 1 or len(items) < 2:
        return [work(item) for item in tqdm(items, desc=desc, unit="img", disable=not progress)]
    return list(
        thread_map(work, items, max_workers=workers, desc=desc, unit="img", disable=not progress, tqdm_class=tqdm)
    )


def set_threads(threads: int | None) -> None:
    """Compute on `threads` CPU threads (None or 0: one per core): torch, FAISS, OpenCV and the pictures
    described at once (`map_pictures`). Two runs sharing 2 cores should take 1 each: two processes of 2
    busy threads each slow each other down many times over."""
    if threads is None or threads == 0:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ReidError(
            f"threads={threads!r}: give a whole number of CPU threads (1, 2, ...), or null for one per core"
        )
    # Imported here: reading a picture should not load FAISS or torch.
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    cv2.setNumThreads(threads)


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Return (width, height) of the image as displayed (after EXIF orientation), reading only its header."""
    with _open(path, max_pixels) as im:
        width, height = im.size
        if _orientation(im) in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
    return width, height


def read_image(
    path: str | Path,
    bbox: Sequence[float] | None = None,
    *,
    margin: float = 0.0,
    max_side_px: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Return the image (or its box) as an (H, W, 3) uint8 RGB array.

    `bbox` is (x, y, width, height) in pixels of the EXIF-oriented full image;
    `margin` widens it by that fraction of its size on every side (clipped to the
    image). With `max_side_px` the result is shrunk to fit that size (never enlarged).
    """
    with _open(path, max_pixels) as im:
        raw_w = im.size[0]
        if max_side_px is not None and im.format == "JPEG":
            _draft(im, path, bbox, margin, max_side_px)
        try:
            im.load()
            # Read after load: PNG and TIFF keep EXIF after the pixel data.
            orientation = _orientation(im)
            im = _oriented(im, orientation, path)
            im = _to_rgb(im)
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageReadError(
                path, f"file is truncated or corrupt ({err}); re-copy it from the camera card"
            ) from err
        scale = im.size[0 if orientation not in _TRANSPOSED_ORIENTATIONS else 1] / raw_w
        full_w, full_h = round(im.size[0] / scale), round(im.size[1] / scale)
        crop = crop_box(path, bbox, margin, full_w, full_h)
        if scale != 1.0:
            crop = (
                int(crop[0] * scale),
                int(crop[1] * scale),
                max(int(crop[0] * scale) + 1, min(im.size[0], round(crop[2] * scale))),
                max(int(crop[1] * scale) + 1, min(im.size[1], round(crop[3] * scale))),
            )
        if crop != (0, 0, im.size[0], im.size[1]):
            im = im.crop(crop)
        if max_side_px is not None and max(im.size) > max_side_px:
            factor = max_side_px / max(im.size)
            size = (max(1, round(im.size[0] * factor)), max(1, round(im.size[1] * factor)))
            im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(im, dtype=np.uint8)


def _draft(im: Image.Image, path: str | Path, bbox: Sequence[float] | None, margin: float, max_side_px: int) -> None:
    """Make a JPEG decode at a reduced scale where the crop still comes out at least max_side_px long."""
    full_w, full_h = im.size
    if _orientation(im) in _TRANSPOSED_ORIENTATIONS:
        full_w, full_h = full_h, full_w
    left, top, right, bottom = crop_box(path, bbox, margin, full_w, full_h)
    scale = max(right - left, bottom - top) / max_side_px
    if scale >= 2:
        im.draft("RGB", (int(im.size[0] / scale) + 1, int(im.size[1] / scale) + 1))


def _open(path: str | Path, max_pixels: int) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found; check the path or remove the row")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes); re-copy it from the camera card")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError as err:
        raise ImageReadError(
            path, "not an image file PIL can read (JPEG, PNG, TIFF, ...); remove it or convert it"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"image is too large to decode safely ({err})") from err
    except OSError as err:
        raise ImageReadError(path, f"file is truncated or corrupt ({err}); re-copy it from the camera card") from err
    if im.size[0] * im.size[1] > max_pixels:
        im.close()
        raise ImageReadError(
            path,
            f"image is {im.size[0]} x {im.size[1]} pixels, over the limit of {max_pixels}; downscale it or raise max_pixels",
        )
    if im.size[0] == 0 or im.size[1] == 0:
        im.close()
        raise ImageReadError(path, "image has no pixels")
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1


def _oriented(im: Image.Image, orientation: int, path: str | Path) -> Image.Image:
    if orientation in (1, 0):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception as err:
        log.warning("%s: could not apply EXIF orientation %s (%s); using the image as stored", path, orientation, err)
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Cameras store 10- to 16-bit data in 16-bit containers: stretch the range used.
        data = np.asarray(im, dtype=np.float64)
        low, high = float(data.min()), float(data.max())
        scaled = (data - low) * (255.0 / (high - low)) if high > low else np.zeros_like(data)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def crop_box(
    path: str | Path, bbox: Sequence[float] | None, margin: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """Return (left, top, right, bottom) px of the box widened by `margin`, clipped to a width x height image.

    None or NaN is the whole image; a box without area or outside the image raises ImageReadError naming `path`.
    """
    if bbox is None or any(np.isnan(float(v)) for v in bbox):
        return (0, 0, width, height)
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ImageReadError(path, f"box {list(bbox)} has no area; fix the box in the catalogue")
    x0, y0 = x - margin * w, y - margin * h
    x1, y1 = x + w + margin * w, y + h + margin * h
    left, top = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    right, bottom = min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1)))
    if right - left < 1 or bottom - top < 1:
        raise ImageReadError(
            path, f"box {list(bbox)} lies outside the {width} x {height} image; fix the box in the catalogue"
        )
    return (left, top, right, bottom)
