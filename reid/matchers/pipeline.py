"""The one path from catalogue rows to stored local features and pair scores, for every configured matcher.

A `KeypointConfig` names the matcher (`method`): the weight-free OpenCV ones
(rootsift, sift, orb, akaze) are reid.keypoints' own; the learned ones (xfeat,
xfeat-lighterglue, aliked-lightglue, disk-lightglue) extract with the networks of
this package and store their features in the same `reid.keypoints.Features` (float32
unit descriptors, positions in px of the crop shrunk to `max_side_px`, and frame
positions for the static-background filter), so the gallery, the scorer and the
calibration keep one code path whatever the matcher. XFeat's pairs are verified like
RootSIFT's (mutual neighbours, ratio test, RANSAC); the glue matchers count their
confident matches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from reid.catalogue import BBOX_COLUMNS, image_problem
from reid.errors import Problem, ReidError
from reid.images import ImageReadError
from reid.keypoints import (
    GLUE_METHODS,
    LEARNED_METHODS,
    Features,
    KeypointConfig,
    animal_pixels,
    empty_features,
    frame_positions,
    on_animal,
    read_crop,
    row_masks,
)
from reid.keypoints import extract_rows as extract_weight_free
from reid.keypoints import score_pairs as score_verified_pairs
from reid.matchers.base import LocalFeatures, Matcher
from reid.matchers.registry import create_matcher

__all__ = ["extract_rows", "local_features", "matcher_for", "score_pairs"]


@functools.lru_cache(maxsize=4)
def matcher_for(config: KeypointConfig) -> Matcher:
    """Return the learned matcher a config names, built once per config (its weights loaded from the package)."""
    if config.method not in LEARNED_METHODS:
        raise ReidError(f"method {config.method!r} is weight-free: reid.keypoints extracts and matches it")
    # The crop is already shrunk to max_side_px by read_crop: the network sees it as it is.
    options: dict[str, object] = {"max_features": config.max_features, "max_side_px": config.max_side_px}
    if config.method in ("xfeat", "xfeat-lighterglue"):
        options |= {"ratio": config.ratio, "ransac_px": config.ransac_px, "geometry": config.geometry}
    if config.method in GLUE_METHODS:
        options["min_confidence"] = config.min_confidence
    return create_matcher(config.method, **options)


def extract_rows(
    rows: pd.DataFrame, config: KeypointConfig, *, progress: bool = True
) -> tuple[list[Features], list[Problem]]:
    """Return one Features per catalogue row, in row order, and the problems met, for any configured matcher.

    As `reid.keypoints.extract_rows`: an unreadable row gets empty features and a
    Problem naming it, and the run goes on. Where a row's animal is known (a user mask,
    or the station background model, as the config says), only keypoints on it are kept.
    """
    if config.method not in LEARNED_METHODS:
        return extract_weight_free(rows, config, progress=progress)
    if "image_path" not in rows.columns:
        raise ReidError("extract_rows needs an image_path column; pass catalogue rows")
    matcher = matcher_for(config)
    paths = rows["image_path"].astype(str).tolist()
    if all(column in rows.columns for column in BBOX_COLUMNS):
        boxes: list[Sequence[float] | None] = list(rows[list(BBOX_COLUMNS)].to_numpy(dtype=float))
    else:
        boxes = [None] * len(paths)
    masks, problems = row_masks(rows, config, progress=progress)
    features: list[Features] = []
    for i, (path, box) in enumerate(
        tqdm(zip(paths, boxes, strict=True), total=len(paths), desc=config.method, unit="img", disable=not progress)
    ):
        try:
            crop = read_crop(path, box, config)
        except ImageReadError as err:
            problems.append(image_problem(rows, i, err.path, err.reason))
            features.append(empty_features(config.method))
            continue
        except OSError as err:
            reason = err.strerror or str(err)
            problems.append(image_problem(rows, i, path, f"cannot read the file ({reason}); check the path"))
            features.append(empty_features(config.method))
            continue
        found = _in_roi(matcher.extract(crop), config)
        animal = animal_pixels(rows, i, masks[i], path, box, config, crop.shape[:2], problems)
        if animal is not None:
            found = _on_animal(found, animal)
        item = Features(found.keypoints, found.descriptors, found.image_size)
        item.frame_xy = frame_positions(path, box, config, item)
        features.append(item)
    return features, problems


def score_pairs(
    queries: Sequence[Features],
    gallery: Sequence[Features],
    pairs: np.ndarray,
    config: KeypointConfig,
    *,
    progress: bool = False,
) -> np.ndarray:
    """Return (P,) float64 raw scores of the (P, 2) (query index, gallery index) pairs with the configured matcher.

    Verified inlier counts for the weight-free methods and XFeat; confident-match
    counts for the glue matchers.
    """
    if config.method not in GLUE_METHODS:
        return score_verified_pairs(list(queries), list(gallery), pairs, config, progress=progress)
    # The bounds and shape checks are reid.keypoints' own: run them on no work.
    pairs = np.asarray(pairs)
    score_verified_pairs(list(queries), list(gallery), pairs[:0] if pairs.ndim == 2 else pairs, config)
    matcher = matcher_for(config)
    scores = np.zeros(len(pairs), dtype=np.float64)
    order = np.argsort(pairs[:, 0], kind="stable") if len(pairs) else np.zeros(0, np.int64)
    groups = np.split(order, np.flatnonzero(np.diff(pairs[order, 0])) + 1) if len(order) else []
    for group in tqdm(groups, desc="matching", unit="query", disable=not progress):
        query = local_features(queries[int(pairs[group[0], 0])])
        scores[group] = matcher.score(query, [local_features(gallery[int(j)]) for j in pairs[group, 1]])
    return scores


def local_features(features: Features) -> LocalFeatures:
    """Return stored features as a matcher's LocalFeatures (float descriptors; positions in px of the stored crop)."""
    if features.descriptors.dtype != np.float32:
        raise ReidError(
            f"{features.descriptors.dtype} (binary) descriptors cannot serve a learned matcher or LNBNN; use "
            "keypoints.method rootsift, sift or a learned one"
        )
    return LocalFeatures(features.xy, features.descriptors, features.size)


def _on_animal(found: LocalFeatures, animal: np.ndarray) -> LocalFeatures:
    """Return the features whose keypoints lie on the animal's pixels of the crop (the network saw the whole crop)."""
    if not len(found):
        return found
    keep = on_animal(found.keypoints, animal)
    scores = found.scores[keep] if found.scores is not None else None
    return LocalFeatures(found.keypoints[keep], found.descriptors[keep], found.image_size, scores)


def _in_roi(found: LocalFeatures, config: KeypointConfig) -> LocalFeatures:
    """Return the features whose keypoints lie inside the config's region of interest."""
    if config.roi == (0.0, 0.0, 1.0, 1.0) or not len(found):
        return found
    height, width = found.image_size
    x0, y0, x1, y1 = config.roi
    xy = found.keypoints
    inside = (xy[:, 0] >= x0 * width) & (xy[:, 0] < x1 * width) & (xy[:, 1] >= y0 * height) & (xy[:, 1] < y1 * height)
    scores = found.scores[inside] if found.scores is not None else None
    return LocalFeatures(xy[inside], found.descriptors[inside], found.image_size, scores)
