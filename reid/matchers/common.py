"""Helpers the learned matchers share: shrinking a crop for a network, and mutual-nearest-neighbour verification."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid.errors import ReidError
from reid.keypoints import Features, KeypointConfig, match
from reid.matchers.base import LocalFeatures, check_image, local_weights

__all__ = ["load_state_dict", "mutual_nn_inliers", "shrink_to_tensor", "to_crop_pixels", "working_xy"]


def shrink_to_tensor(image: np.ndarray, max_side_px: int, device: str) -> tuple[torch.Tensor, float]:
    """Return the crop as a (1, 3, h, w) float tensor in 0..1, shrunk to `max_side_px`, and the crop/tensor scale.

    Crops are only ever shrunk: enlarging invents no pattern and costs time.
    """
    rgb = check_image(image)
    height, width = rgb.shape[:2]
    tensor = torch.from_numpy(np.array(rgb, copy=True)).to(device).permute(2, 0, 1)[None].float() / 255.0
    scale = max(height, width) / max_side_px
    if scale <= 1.0:
        return tensor, 1.0
    size = (max(1, round(height / scale)), max(1, round(width / scale)))
    shrunk = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    return shrunk, max(height, width) / max(size)


def to_crop_pixels(xy: np.ndarray, scale: float) -> np.ndarray:
    """Return (N, 2) float32 positions in the given crop's pixels from positions in the shrunk tensor's."""
    return ((np.asarray(xy, np.float32) + 0.5) * scale - 0.5).astype(np.float32)


def working_xy(features: LocalFeatures, max_side_px: int) -> np.ndarray:
    """Return the keypoints in px of the crop shrunk to `max_side_px`, where RANSAC thresholds are set."""
    long_side = max(features.image_size) if features.image_size != (0, 0) else 0
    if long_side <= max_side_px:
        return features.keypoints
    return (features.keypoints * (max_side_px / long_side)).astype(np.float32)


def mutual_nn_inliers(
    query: LocalFeatures,
    gallery: Sequence[LocalFeatures],
    *,
    max_side_px: int,
    ratio: float,
    ransac_px: float,
    geometry: str,
) -> np.ndarray:
    """Return (G,) float64 RANSAC inlier counts of mutual nearest neighbours (with Lowe's ratio test).

    The verification of reid.keypoints (mutual check, ratio test, RANSAC, no mirrored or
    4x-scaled model) applied to L2-normalised learned descriptors.
    """
    config = KeypointConfig(method="rootsift", ratio=ratio, ransac_px=ransac_px, geometry=geometry)  # type: ignore[arg-type]
    mine = Features(working_xy(query, max_side_px), query.descriptors, query.image_size)
    scores = np.zeros(len(gallery), dtype=np.float64)
    for j, other in enumerate(gallery):
        theirs = Features(working_xy(other, max_side_px), other.descriptors, other.image_size)
        scores[j] = match(mine, theirs, config).n_inliers
    return scores


def load_state_dict(weights: str | Path, *, what: str, device: str) -> dict[str, Any]:
    """Return the tensors of a local weights file (no pickled code is run); raise ReidError if it cannot be read."""
    path = local_weights(weights, what=what)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise ReidError(
            f"{what} weights file {path} could not be read ({type(err).__name__}: {err}); pass a PyTorch state dict"
        ) from err
    if not isinstance(state, dict):
        raise ReidError(f"{what} weights file {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state
