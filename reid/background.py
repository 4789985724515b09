"""Where the animal is in a frame: user masks and a per-station background model, weight-free.

Local features on the scene behind an animal match the same scene behind another
animal. Where a row's foreground is known, its features are taken on the animal
alone (`reid.keypoints.extract_rows` and `reid.matchers.extract_rows` drop the
others); everywhere else they cover the whole crop, as without this module.

Three sources, the user's first:

- **User masks**, the catalogue's `mask` column: a mask image (non-zero = animal,
  transparent = background; the size of the image, or the same shape scaled), COCO
  polygons (`[[x1, y1, x2, y2, ...], ...]`) or COCO RLE (`{"size": [h, w], "counts":
  ...}`, plain or compressed) as JSON, in pixels of the EXIF-oriented image. A mask
  that cannot be used is one `Problem` naming the row, the mask and the fix; that row
  is then used without a mask.
- **The station model** (`background="station"`): a camera trap looks at one scene,
  so the frames of a station's other encounters show what the scene looks like
  without this animal. Day and infrared night frames (infrared ones are grey,
  R = G = B) are modelled apart. Each of the (at most 15, nearest in time) other
  encounters' middle frames is aligned to the encounter's own frame (a camera
  re-mounted between visits sees its scene shifted) and brought to its exposure (a
  smooth gain field, robustly fitted: day light and an infrared flash's fall-off
  differ between visits); the background is their per-pixel shortest-half mode,
  which holds where animals cover up to half of those frames (a plain median does
  not: animals that fill a third of the frame overlap). Pixels that differ from it
  by more than the frame's noise allows, cleaned up (opened, closed, holes filled,
  specks dropped) and dilated, are the animal. With fewer than 4 other encounters,
  or a mask that is implausible (under 0.5 % or over 60 % of the frame, or under 40 %
  of the animal's box), the row has no mask: a missed mask costs some background
  features, a wrong one would lose the animal.
- **GrabCut** (`background="grabcut"`), for pictures with no scene to compare: hand-held
  photographs, or a camera's first visits. The flank box is the animal's bound; a colour
  model of what lies inside it against one of what lies around it (OpenCV's GrabCut:
  Gaussian mixtures and a graph cut, Rother et al. 2004) splits the box into animal and
  scene. Where the box is the whole picture (no box), a thin band along the picture's
  edges is taken as the scene: the photographer framed the animal. Holes are filled (a
  coat's pale stripes or rosettes can look like the ground) and specks dropped. A mask
  that covers under 15 % or over 95 % of the box found nothing to split, and the row has
  no mask.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from reid.catalogue import BBOX_COLUMNS
from reid.errors import ReidError
from reid.images import ImageReadError, crop_box, image_size, map_pictures, read_image

__all__ = [
    "BACKGROUNDS",
    "Background",
    "FrameMask",
    "MaskError",
    "box_cover_too_low",
    "crop_mask",
    "decode_rle",
    "foreground_masks",
    "grabcut_masks",
    "is_infrared",
    "mask_value_problem",
    "read_user_mask",
    "station_masks",
]

log = logging.getLogger(__name__)

Background = Literal["none", "station", "grabcut"]
BACKGROUNDS: tuple[str, ...] = get_args(Background)

_WORK_SIDE_PX = 256  # frames are modelled at this long side: the mask is dilated far more than a pixel of it
_MASK_SIDE_PX = 1024  # polygons are drawn at most this long side
_INFRARED_SPREAD = 0.1  # mean (max - min channel) / mean level below this: an infrared (grey) frame
_MIN_OTHER_ENCOUNTERS = 4  # fewer other encounters at the station: no model (a mode of 3 frames is not robust)
_MAX_OTHER_ENCOUNTERS = 15
_MAX_CAMERA_SHIFT = 0.06  # of the frame's long side: how far a re-mounted camera's scene may have moved
_NOISE_SIGMAS = 3.0  # a pixel differs from the background by more than the frame's noise times this...
_MIN_DIFFERENCE = 24.0  # ... and by more than this (of 255, summed over channels in quadrature)
_MIN_FRAME_COVER, _MAX_FRAME_COVER = 0.005, 0.6
_MIN_BOX_COVER = 0.4  # a station mask covering less of the animal's box has missed it: no mask
_CLOSE_RADIUS, _DILATE_RADIUS, _MIN_SPECK = 0.03, 0.02, 0.005  # of the long side, the long side, the frame
_GRABCUT_SIDE_PX = 192  # the box and its surroundings are split at this long side
_GRABCUT_AROUND = 0.25  # of the box's size on each side: the surroundings the scene's colours are learnt from
_GRABCUT_BAND = 0.03  # of the picture's size: the scene along its edges, where the box reaches them
_GRABCUT_ITERATIONS = 4
_GRABCUT_SEED = 0  # of the k-means that starts its colour mixtures
_MIN_GRABCUT_COVER, _MAX_GRABCUT_COVER = 0.15, 0.95  # of the box: outside these, GrabCut found nothing to split


class MaskError(ReidError):
    """A user mask that cannot be used, with the reason and the fix."""


@dataclass(frozen=True)
class FrameMask:
    """Where the animal is in one full frame."""

    pixels: np.ndarray
    """(h, w) bool over the whole frame, at any scale of it (same shape as the frame, or scaled)."""
    origin: Literal["user", "station", "grabcut"]
    """Who said so: the catalogue's mask column, the station's background model, or GrabCut inside the box."""


def foreground_masks(
    rows: pd.DataFrame, *, background: Background = "none", user_masks: bool = True, progress: bool = False
) -> tuple[list[FrameMask | None], list[tuple[int, str]]]:
    """Return one FrameMask (or None: features everywhere) per row, and (row position, reason) of masks refused.

    A usable user mask wins; the station model (with `background="station"`) covers
    the other rows that have a station. Unreadable images are left to the caller,
    which reports them when it reads the crop.
    """
    masks: list[FrameMask | None] = [None] * len(rows)
    refused: list[tuple[int, str]] = []
    if user_masks and "mask" in rows.columns:
        paths = rows["image_path"].astype(str).tolist()
        for i, value in enumerate(rows["mask"].tolist()):
            if _blank(value):
                continue
            try:
                masks[i] = read_user_mask(str(value), paths[i])
            except MaskError as err:
                refused.append((i, str(err)))
            except (ImageReadError, OSError):
                pass  # the image itself is unreadable: reported once, when its crop is read
    if background in ("station", "grabcut"):
        wanted = np.array([m is None for m in masks], dtype=bool)
        model = station_masks if background == "station" else grabcut_masks
        for i, mask in enumerate(model(rows, wanted, progress=progress)):
            if mask is not None:
                masks[i] = mask
    elif background not in BACKGROUNDS:
        raise ReidError(f"background {background!r} is not one of {', '.join(BACKGROUNDS)}")
    return masks, refused


def mask_value_problem(value: str, reason: str) -> str:
    """Return the message of a refused mask: which mask, why, the fix, and what happens instead."""
    shown = value if len(value) <= 80 else value[:77] + "..."
    return f"mask {shown}: {reason}; the row is used without a mask (features from the whole box)"


def read_user_mask(value: str, image_path: str | Path) -> FrameMask:
    """Return the mask a catalogue `mask` value names for an image; raise MaskError saying what is wrong and the fix.

    `value` is a mask image's path, or COCO polygons or RLE as JSON (the text starts with `[` or `{`).
    """
    text = value.strip()
    width, height = image_size(image_path)
    if text[:1] in ("[", "{"):
        try:
            shape = json.loads(text)
        except json.JSONDecodeError as err:
            raise MaskError(
                mask_value_problem(
                    text,
                    f"is not valid JSON ({err.msg} at character {err.pos}); write polygons as "
                    "[[x1, y1, x2, y2, x3, y3, ...]] in pixels of the image, or give a mask image's path",
                )
            ) from None
        if isinstance(shape, dict):
            pixels = _rle_mask(shape, text, width, height)
        else:
            pixels = _polygon_mask(shape, text, width, height)
    else:
        pixels = _image_mask(text, width, height)
    if not pixels.any():
        raise MaskError(mask_value_problem(text, "marks no pixel as the animal; fix the mask or clear it"))
    return FrameMask(pixels, "user")


def crop_mask(
    mask: FrameMask, path: str | Path, box: Sequence[float] | None, margin: float, shape: tuple[int, int]
) -> np.ndarray:
    """Return the (H, W) bool mask of the crop `read_crop` cuts from the frame (box, margin) and shrinks to `shape`."""
    full_w, full_h = image_size(path)
    left, top, right, bottom = crop_box(path, box, margin, full_w, full_h)
    height, width = shape
    mask_h, mask_w = mask.pixels.shape
    # Crop pixel (u, v)'s centre in mask pixels, as an affine map from the crop to the mask.
    sx, sy = (right - left) / width * mask_w / full_w, (bottom - top) / height * mask_h / full_h
    tx = (left + 0.5 * (right - left) / width) * mask_w / full_w - 0.5
    ty = (top + 0.5 * (bottom - top) / height) * mask_h / full_h - 0.5
    to_mask = np.array([[sx, 0, tx], [0, sy, ty]], np.float32)
    cropped = cv2.warpAffine(
        mask.pixels.astype(np.float32),
        to_mask,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    inside: np.ndarray = cropped >= 0.5
    return inside


def box_cover_too_low(mask: FrameMask, inside: np.ndarray) -> bool:
    """Return whether a crop's mask is implausible for its origin: a station mask that missed most of the animal."""
    return mask.origin == "station" and float(inside.mean()) < _MIN_BOX_COVER


def is_infrared(frame: np.ndarray) -> bool:
    """Return whether an (H, W, 3) RGB frame is an infrared night frame: nearly grey (R = G = B) throughout."""
    data = frame[::4, ::4].astype(np.float32)
    spread = float((data.max(axis=2) - data.min(axis=2)).mean())
    return spread < _INFRARED_SPREAD * (float(data.mean()) + 1.0)


def station_masks(
    rows: pd.DataFrame, wanted: np.ndarray | None = None, *, progress: bool = False
) -> list[FrameMask | None]:
    """Return each row's foreground in its frame by the station's background model (module docstring), or None.

    Rows need `image_path` and `station`; `encounter_id` (else each row is its own
    encounter), `timestamp` (the nearest encounters in time are preferred) and the box
    columns (for the box check) are used where present. `wanted` (bool per row) limits
    which rows get a mask; every row of a station serves as a reference.
    """
    n = len(rows)
    wanted = np.ones(n, dtype=bool) if wanted is None else np.asarray(wanted, dtype=bool)
    masks: list[FrameMask | None] = [None] * n
    if "station" not in rows.columns or not wanted.any():
        return masks
    stations = rows["station"].astype(object).where(rows["station"].notna(), None).tolist()
    encounters = (
        rows["encounter_id"].astype(object).where(rows["encounter_id"].notna(), None).tolist()
        if "encounter_id" in rows.columns
        else [None] * n
    )
    encounter_of = [str(e) if e is not None else f"row:{i}" for i, e in enumerate(encounters)]
    if "timestamp" in rows.columns:
        stamps = pd.to_datetime(rows["timestamp"], utc=True)
        seconds = np.where(stamps.notna(), stamps.astype("int64") / 1e9, np.nan)
    else:
        seconds = np.full(n, np.nan)
    paths = rows["image_path"].astype(str).tolist()
    by_station: dict[str, list[int]] = {}
    for i, station in enumerate(stations):
        if station is not None:
            by_station.setdefault(str(station), []).append(i)
    todo = {s: members for s, members in by_station.items() if wanted[members].any()}
    made = 0
    with tqdm(total=sum(len(m) for m in todo.values()), desc="background", unit="img", disable=not progress) as bar:
        for members in todo.values():
            frames: dict[int, np.ndarray] = {}
            for i in members:
                # An unreadable image is reported by the caller, when it reads the crop.
                with contextlib.suppress(ImageReadError, OSError):
                    frames[i] = read_image(paths[i], max_side_px=_WORK_SIDE_PX)
                bar.update()
            # Day and infrared night apart, and frames of one size together (a camera may change resolution).
            groups: dict[tuple[bool, tuple[int, ...]], list[int]] = {}
            for i, frame in frames.items():
                groups.setdefault((is_infrared(frame), frame.shape), []).append(i)
            for group in groups.values():
                for i, mask in _group_masks(group, frames, encounter_of, seconds, wanted).items():
                    masks[i] = _plausible(mask)
                    made += masks[i] is not None
    log.info("station background model: masks for %d of %d rows", made, int(wanted.sum()))
    return masks


def grabcut_masks(
    rows: pd.DataFrame, wanted: np.ndarray | None = None, *, progress: bool = False
) -> list[FrameMask | None]:
    """Return each wanted row's animal inside its flank box by GrabCut (module docstring), or None.

    Rows need `image_path`; the box columns (pixels of the EXIF-oriented image) are
    used where present, else the whole picture is the box. Unreadable images are left
    to the caller, which reports them when it reads the crop.
    """
    n = len(rows)
    wanted = np.ones(n, dtype=bool) if wanted is None else np.asarray(wanted, dtype=bool)
    masks: list[FrameMask | None] = [None] * n
    paths = rows["image_path"].astype(str).tolist()
    if all(column in rows.columns for column in BBOX_COLUMNS):
        boxes: list[Sequence[float] | None] = list(rows[list(BBOX_COLUMNS)].to_numpy(dtype=float))
    else:
        boxes = [None] * n

    def split(i: int) -> FrameMask | None:
        with contextlib.suppress(ImageReadError, OSError):
            return _grabcut(paths[i], boxes[i])
        return None

    wanted_rows = np.flatnonzero(wanted).tolist()
    for i, mask in zip(wanted_rows, map_pictures(split, wanted_rows, desc="grabcut", progress=progress), strict=True):
        masks[i] = mask
    # Quiet for the single pictures drawn as evidence: a report's hundreds of lines would bury the warnings.
    level = logging.INFO if progress else logging.DEBUG
    log.log(level, "grabcut: masks for %d of %d rows", sum(m is not None for m in masks), int(wanted.sum()))
    return masks


# ----------------------------------------------------------------------------- internals


def _grabcut(path: str, box: Sequence[float] | None) -> FrameMask | None:
    """Return the animal's pixels in the frame of `path` (a mask at a working scale of it), or None."""
    full_w, full_h = image_size(path)
    left, top, right, bottom = crop_box(path, box, 0.0, full_w, full_h)
    # The box and its surroundings, read at a scale that brings the box's long side near the working size.
    around = crop_box(path, (left, top, right - left, bottom - top), _GRABCUT_AROUND, full_w, full_h)
    scale = min(1.0, _GRABCUT_SIDE_PX / max(right - left, bottom - top))
    region = read_image(
        path,
        (around[0], around[1], around[2] - around[0], around[3] - around[1]),
        max_side_px=max(1, round(scale * max(around[2] - around[0], around[3] - around[1]))),
    )
    height, width = region.shape[:2]
    sx, sy = width / (around[2] - around[0]), height / (around[3] - around[1])
    # The box in region pixels, kept a band inside the picture's edges: GrabCut learns the scene outside it.
    band_x, band_y = _GRABCUT_BAND * full_w * sx, _GRABCUT_BAND * full_h * sy
    x0 = max((left - around[0]) * sx, band_x if left <= 0 else 0.0)
    y0 = max((top - around[1]) * sy, band_y if top <= 0 else 0.0)
    x1 = min((right - around[0]) * sx, width - band_x if right >= full_w else float(width))
    y1 = min((bottom - around[1]) * sy, height - band_y if bottom >= full_h else float(height))
    rect = (round(x0), round(y0), round(x1) - round(x0), round(y1) - round(y0))
    if min(height, width) < 16 or rect[2] < 8 or rect[3] < 8 or (rect[2] >= width and rect[3] >= height):
        return None  # too small to split, or nothing outside the box to learn the scene from
    image = cv2.cvtColor(region, cv2.COLOR_RGB2BGR)
    # GrabCut seeds its colour mixtures by k-means from OpenCV's random generator (one per thread): seeded
    # here, a picture's mask does not depend on which pictures came before it, nor on which thread split it.
    cv2.setRNGSeed(_GRABCUT_SEED)
    labels = np.zeros((height, width), np.uint8)
    background_model, foreground_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    animal = None
    # One iteration at a time: the mixtures can collapse onto a corner of the animal, so the last split that
    # still looks like an animal is kept.
    for step in range(_GRABCUT_ITERATIONS):
        mode = cv2.GC_INIT_WITH_RECT if step == 0 else cv2.GC_EVAL
        try:
            cv2.grabCut(image, labels, rect, background_model, foreground_model, 1, mode)
        except cv2.error:
            break  # a flat picture: one colour cannot be modelled by two mixtures
        split = _solid(((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8))
        cover = float(split[rect[1] : rect[1] + rect[3], rect[0] : rect[0] + rect[2]].mean())
        if not _MIN_GRABCUT_COVER <= cover <= _MAX_GRABCUT_COVER:
            break
        animal = split
    if animal is None:
        return None
    # Placed in the whole frame at the region's scale.
    frame_w, frame_h = max(1, round(full_w * sx)), max(1, round(full_h * sy))
    pixels = np.zeros((frame_h, frame_w), dtype=bool)
    ox, oy = round(around[0] * sx), round(around[1] * sy)
    h, w = min(height, frame_h - oy), min(width, frame_w - ox)
    pixels[oy : oy + h, ox : ox + w] = animal[:h, :w]
    return FrameMask(pixels, "grabcut")


def _solid(raw: np.ndarray) -> np.ndarray:
    """Return (H, W) bool: the large pieces of a uint8 0/1 mask, holes filled (module docstring)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
    big = np.zeros(count, dtype=bool)
    big[1:] = stats[1:, cv2.CC_STAT_AREA] >= _MIN_SPECK * raw.size
    solid = big[labels].astype(np.uint8)
    # Fill holes: what the border's background cannot reach is inside the animal.
    outside = np.pad(solid, 1)
    cv2.floodFill(outside, None, (0, 0), 1)
    solid[outside[1:-1, 1:-1] == 0] = 1
    filled: np.ndarray = solid > 0
    return filled


def _blank(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _image_mask(text: str, width: int, height: int) -> np.ndarray:
    path = Path(text)
    try:
        data = read_image(path)
    except ImageReadError as err:
        raise MaskError(
            mask_value_problem(text, f"{err.reason.split(';')[0]}; fix the path in the mask column")
        ) from None
    mask_h, mask_w = data.shape[:2]
    # A mask drawn on a scaled copy of the image is as good, when its shape is the image's.
    if (mask_w, mask_h) != (width, height) and abs(mask_w / mask_h - width / height) > 1.0 / min(mask_w, mask_h):
        raise MaskError(
            mask_value_problem(
                text, f"is {mask_w} x {mask_h} px but the image is {width} x {height}; make the mask the image's size"
            )
        )
    pixels: np.ndarray = data.max(axis=2) > 0
    return pixels


def _polygon_mask(shape: Any, text: str, width: int, height: int) -> np.ndarray:
    fix = "write polygons as [[x1, y1, x2, y2, x3, y3, ...], ...] in pixels of the image (COCO segmentation)"
    if isinstance(shape, list) and shape and all(_is_number(v) for v in shape):
        shape = [shape]  # one polygon written flat
    if not isinstance(shape, list) or not shape:
        raise MaskError(mask_value_problem(text, f"is not a list of polygons; {fix}"))
    scale = min(1.0, _MASK_SIDE_PX / max(width, height))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    pixels = np.zeros(size, np.uint8)
    shift = 4  # sub-pixel vertices
    polygons = []
    for k, polygon in enumerate(shape):
        if (
            not isinstance(polygon, list)
            or len(polygon) < 6
            or len(polygon) % 2
            or not all(_is_number(v) and math.isfinite(v) for v in polygon)
        ):
            raise MaskError(
                mask_value_problem(
                    text, f"polygon {k + 1} is not an even list of at least 3 points' x, y numbers; {fix}"
                )
            )
        points = np.asarray(polygon, np.float64).reshape(-1, 2) * scale - 0.5
        polygons.append(np.round(points * (1 << shift)).astype(np.int32))
    cv2.fillPoly(pixels, polygons, 1, lineType=cv2.LINE_8, shift=shift)
    return pixels.astype(bool)


def _rle_mask(shape: dict[str, Any], text: str, width: int, height: int) -> np.ndarray:
    size, counts = shape.get("size"), shape.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_number(v) for v in size)) or counts is None:
        raise MaskError(
            mask_value_problem(text, 'is not COCO RLE ({"size": [height, width], "counts": ...}) nor polygons')
        )
    rle_h, rle_w = int(size[0]), int(size[1])
    if (rle_w, rle_h) != (width, height):
        raise MaskError(
            mask_value_problem(
                text, f"RLE size is {rle_w} x {rle_h} px but the image is {width} x {height}; encode it on the image"
            )
        )
    try:
        return decode_rle(counts, rle_h, rle_w)
    except ValueError as err:
        raise MaskError(mask_value_problem(text, f"{err}; re-export the segmentation")) from None


def decode_rle(counts: str | Sequence[int], height: int, width: int) -> np.ndarray:
    """Return the (height, width) bool mask of COCO run-length counts (a list, or pycocotools' compressed string).

    Runs alternate background and animal, starting with background, down the
    columns (column-major order); raise ValueError when they do not fill the image.
    """
    runs = _rle_from_string(counts) if isinstance(counts, str) else list(counts)
    if not all(_is_number(v) and float(v).is_integer() and v >= 0 for v in runs):
        raise ValueError("RLE counts must be whole numbers of at least 0")
    total = height * width
    if sum(int(v) for v in runs) != total:
        raise ValueError(f"RLE counts add up to {sum(int(v) for v in runs)} pixels, not the image's {total}")
    values = np.zeros(len(runs), bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(runs, dtype=np.int64))
    return flat.reshape(width, height).T.copy()


def _rle_from_string(text: str) -> list[int]:
    """Return the counts of pycocotools' compressed RLE string (its maskApi.c rleFrString)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("compressed RLE string ends inside a number")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE string has the character {text[p]!r}, outside its alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _group_masks(
    group: list[int],
    frames: dict[int, np.ndarray],
    encounters: list[str],
    seconds: np.ndarray,
    wanted: np.ndarray,
) -> dict[int, np.ndarray]:
    """Return {row: (h, w) bool foreground} for the wanted rows of one station's frames of one kind and size."""
    members: dict[str, list[int]] = {}
    for i in group:
        members.setdefault(encounters[i], []).append(i)
    # One frame per encounter (its middle one) stands for it: a burst's frames would vote for its animal together.
    middle = {e: rows[len(rows) // 2] for e, rows in members.items()}
    if len(middle) - 1 < _MIN_OTHER_ENCOUNTERS:
        return {}
    shape = frames[group[0]].shape
    if min(shape[:2]) < 32:
        return {}  # too small a picture to model a scene in
    window = cv2.createHanningWindow((shape[1], shape[0]), cv2.CV_32F)
    sigma = max(shape[:2]) / 32
    detail = {i: _detail(frames[i], sigma) for i in middle.values()}
    max_shift = _MAX_CAMERA_SHIFT * max(shape[:2])
    shifts: dict[tuple[int, int], tuple[float, float]] = {}
    inside = np.ones(shape[:2], np.float32)

    def references(encounter: str) -> tuple[int, list[int]]:
        own = middle[encounter]
        others = [i for e, i in middle.items() if e != encounter]
        apart = np.abs(seconds[others] - seconds[own])
        # Nearest in time first (the scene changes with the seasons); unknown times last, in row order.
        order = np.lexsort((np.arange(len(others)), np.where(np.isnan(apart), np.inf, apart)))
        return own, [others[j] for j in order[:_MAX_OTHER_ENCOUNTERS]]

    def aligned(own: int, chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Return the (K, H, W, 3) references moved onto `own`'s view and exposure, and (K, H, W) where each
        shows the scene: inside its frame after the move."""
        reference = frames[own].astype(np.float32)
        stack, scene = [], []
        for other in chosen:
            if (own, other) not in shifts:
                dx, dy = _camera_shift(detail[own], detail[other], window, max_shift)
                shifts[(own, other)], shifts[(other, own)] = (dx, dy), (-dx, -dy)
            dx, dy = shifts[(own, other)]
            move = np.array([[1, 0, -dx], [0, 1, -dy]], np.float32)
            moved = cv2.warpAffine(
                frames[other].astype(np.float32), move, (shape[1], shape[0]), borderMode=cv2.BORDER_REPLICATE
            )
            stack.append(_exposed_like(moved, reference))
            # Replicated edges are not the scene.
            shown = cv2.warpAffine(inside, move, (shape[1], shape[0]), borderValue=0.0) >= 0.5
            scene.append(shown)
        return np.stack(stack), np.stack(scene)

    found: dict[int, np.ndarray] = {}
    for encounter, rows in members.items():
        targets = [i for i in rows if wanted[i]]
        if not targets:
            continue
        own, chosen = references(encounter)
        stack, shown = aligned(own, chosen)
        scene = _shortest_half_mode(stack)
        trusted = shown.sum(axis=0) * 2 >= len(chosen)
        for i in targets:
            found[i] = _foreground(frames[i].astype(np.float32), scene, trusted)
    return found


def _detail(frame: np.ndarray, sigma: float) -> np.ndarray:
    """Return the frame's grey detail (minus its blurred self): what aligns scenes whatever the light."""
    grey = frame.astype(np.float32).mean(axis=2)
    # A band: finer than sigma (the light's slow changes) and coarser than a pixel (sensor noise, JPEG blocks),
    # which phase correlation, weighing every frequency alike, would otherwise follow.
    detail: np.ndarray = cv2.GaussianBlur(grey, (0, 0), 1.5) - cv2.GaussianBlur(grey, (0, 0), sigma)
    return detail


def _camera_shift(own: np.ndarray, other: np.ndarray, window: np.ndarray, max_px: float) -> tuple[float, float]:
    """Return (dx, dy) px by which the other frame's scene sits moved against this one's, at most `max_px` each way.

    Phase correlation, its peak searched near zero only: two frames share the scene
    where it was (the camera moved little), while their animals, elsewhere and
    different, could give a stronger peak far off.
    """
    own_f, other_f = np.fft.rfft2(own * window), np.fft.rfft2(other * window)
    cross = other_f * np.conj(own_f)
    cross /= np.abs(cross) + 1e-6
    surface = np.fft.irfft2(cross, s=own.shape)
    height, width = own.shape
    dy = np.fft.fftfreq(height) * height
    dx = np.fft.fftfreq(width) * width
    surface[(np.abs(dy)[:, None] > max_px) | (np.abs(dx)[None, :] > max_px)] = -np.inf
    y, x = np.unravel_index(int(np.argmax(surface)), surface.shape)
    # Sub-pixel: the vertex of a parabola through the peak and its neighbours, in each direction.
    return float(dx[x]) + _vertex(surface[y, x - 1], surface[y, x], surface[y, (x + 1) % width]), float(
        dy[y]
    ) + _vertex(surface[y - 1, x], surface[y, x], surface[(y + 1) % height, x])


def _vertex(before: float, peak: float, after: float) -> float:
    """Return the offset (-0.5..0.5) of the top of the parabola through three equally spaced values."""
    if not (np.isfinite(before) and np.isfinite(after)):
        return 0.0
    curvature = before - 2 * peak + after
    return float(np.clip(0.5 * (before - after) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0


_DESIGN: dict[tuple[int, int], list[np.ndarray]] = {}


def _smooth_terms(height: int, width: int) -> list[np.ndarray]:
    """Return the (H, W) terms of a quadratic surface over the frame: 1, x, y, x^2, xy, y^2."""
    if (height, width) not in _DESIGN:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        xs, ys = xs / width - 0.5, ys / height - 0.5
        _DESIGN[(height, width)] = [np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys]
    return _DESIGN[(height, width)]


def _exposed_like(frame: np.ndarray, target: np.ndarray, step: int = 4) -> np.ndarray:
    """Return `frame` brought to `target`'s exposure: per channel, target ~ frame x a smooth gain field + offset.

    Fitted by least squares on every `step`-th pixel, twice more on those within two
    robust sigmas, so the animals of either frame do not pull the fit.
    """
    terms = _smooth_terms(*frame.shape[:2])
    sampled = [t[::step, ::step].ravel() for t in terms]
    out = np.empty_like(frame)
    for c in range(frame.shape[2]):
        source = frame[..., c]
        values = source[::step, ::step].ravel()
        design = np.stack([values * t for t in sampled] + [sampled[0]], axis=1).astype(np.float64)
        goal = target[::step, ::step, c].ravel().astype(np.float64)
        keep = np.ones(len(goal), dtype=bool)
        coef: np.ndarray = np.zeros(design.shape[1])
        for _ in range(3):
            if keep.sum() < 4 * design.shape[1]:
                break
            chosen = design[keep]
            # The normal equations, lightly regularised: a flat frame leaves the gain's shape undetermined.
            normal = chosen.T @ chosen + 1e-6 * np.eye(design.shape[1]) * len(chosen)
            coef = np.linalg.solve(normal, chosen.T @ goal[keep])
            residual = goal - design @ coef
            sigma = 1.4826 * float(np.median(np.abs(residual[keep]))) + 1e-3
            keep = np.abs(residual) < 2.0 * sigma
        gain = sum(float(k) * t for k, t in zip(coef[:-1], terms, strict=True))
        out[..., c] = source * gain + float(coef[-1])
    return out


def _shortest_half_mode(stack: np.ndarray) -> np.ndarray:
    """Return the per-pixel middle of the shortest interval holding half of the (K, ...) values (the shorth)."""
    k = len(stack)
    half = max(2, math.ceil(k / 2)) if k > 1 else 1
    ordered = np.sort(stack, axis=0)
    widths = ordered[half - 1 :] - ordered[: k - half + 1]
    start = widths.argmin(axis=0)[None]
    low = np.take_along_axis(ordered, start, axis=0)[0]
    high = np.take_along_axis(ordered, start + half - 1, axis=0)[0]
    mode: np.ndarray = (low + high) / 2
    return mode


def _foreground(frame: np.ndarray, scene: np.ndarray, trusted: np.ndarray) -> np.ndarray:
    """Return the (H, W) bool pixels of `frame` that are not `scene`, cleaned up and dilated; only `trusted` ones
    (where the scene was seen) can differ."""
    expected = _exposed_like(scene, frame)
    difference = np.sqrt(((frame - expected) ** 2).sum(axis=2))
    difference = cv2.GaussianBlur(difference, (0, 0), 1.0)
    difference[~trusted] = 0.0
    middle = float(np.median(difference))
    noise = 1.4826 * float(np.median(np.abs(difference - middle)))
    raw = (difference > max(_MIN_DIFFERENCE, middle + _NOISE_SIGMAS * noise)).astype(np.uint8)
    side = max(frame.shape[:2])
    raw = cv2.morphologyEx(raw, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    raw = cv2.morphologyEx(raw, cv2.MORPH_CLOSE, _disc(_CLOSE_RADIUS * side))
    solid = _solid(raw).astype(np.uint8)
    grown: np.ndarray = cv2.dilate(solid, _disc(_DILATE_RADIUS * side)) > 0
    return grown


def _disc(radius: float) -> np.ndarray:
    r = max(1, round(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _plausible(pixels: np.ndarray) -> FrameMask | None:
    """Return the station mask, or None when it covers too little or too much of the frame to be an animal."""
    cover = float(pixels.mean())
    if not _MIN_FRAME_COVER <= cover <= _MAX_FRAME_COVER:
        return None
    return FrameMask(pixels, "station")
