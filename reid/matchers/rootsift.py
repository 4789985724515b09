"""RootSIFT + ratio test + RANSAC behind the matcher interface: reid.keypoints, weight-free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from reid.keypoints import Features, KeypointConfig, extract, match
from reid.matchers.base import LocalFeatures, Matcher, check_image, resolve_device
from reid.matchers.common import to_crop_pixels, working_xy

__all__ = ["RootSiftMatcher"]


class RootSiftMatcher(Matcher):
    """RootSIFT keypoints scored by RANSAC inliers of mutual ratio-test matches (reid.keypoints, no weights).

    `keypoint_config` holds every option of reid.keypoints; its method must give float
    descriptors (rootsift or sift). Crops larger than its `max_side_px` are shrunk first,
    as `reid.keypoints.read_crop` does.
    """

    name = "rootsift"
    dim = 128

    def __init__(self, keypoint_config: KeypointConfig | None = None, *, device: str = "cpu") -> None:
        from reid.errors import ReidError

        self.keypoint_config = keypoint_config or KeypointConfig()
        if self.keypoint_config.method not in ("rootsift", "sift"):
            raise ReidError(
                f"RootSiftMatcher needs method rootsift or sift (float descriptors), got {self.keypoint_config.method!r}; "
                "use reid.keypoints directly for binary ORB or AKAZE features"
            )
        resolve_device(device)
        # OpenCV's SIFT runs on the CPU whatever device the other matchers use.
        self.device = "cpu"

    def config(self) -> dict[str, Any]:
        """Return the reid.keypoints options as JSON-ready values."""
        return self.keypoint_config.to_dict()

    def extract(self, image: np.ndarray) -> LocalFeatures:
        """Return RootSIFT features of the crop, keypoints in its pixels."""
        rgb = check_image(image)
        height, width = rgb.shape[:2]
        scale = max(height, width) / self.keypoint_config.max_side_px
        if scale > 1.0:
            size = (max(1, round(width / scale)), max(1, round(height / scale)))
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
            scale = max(height, width) / max(size)
        else:
            scale = 1.0
        found = extract(rgb, self.keypoint_config)
        return LocalFeatures(to_crop_pixels(found.xy, scale), found.descriptors, (height, width))

    def score(self, query: LocalFeatures, gallery: Sequence[LocalFeatures]) -> np.ndarray:
        """Return (G,) float64 RANSAC inlier counts."""
        self.check_features(query)
        side = self.keypoint_config.max_side_px
        mine = Features(working_xy(query, side), query.descriptors, query.image_size)
        scores = np.zeros(len(gallery), dtype=np.float64)
        for j, other in enumerate(gallery):
            self.check_features(other)
            theirs = Features(working_xy(other, side), other.descriptors, other.image_size)
            scores[j] = match(mine, theirs, self.keypoint_config).n_inliers
        return scores
