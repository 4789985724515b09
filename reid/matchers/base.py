"""The matcher contract: local features of one crop, a matcher that extracts and scores them, their file format.

A matcher turns an RGB flank crop into `LocalFeatures` once (stored with the gallery)
and scores a query's features against a list of gallery features: one raw score per
gallery picture, higher is more alike (inlier or match counts), to be calibrated
downstream. Weights come from an installed package or a local file, never from the
network: `local_weights` refuses URLs.
"""

from __future__ import annotations

import io
import json
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from reid.errors import ReidError
from reid.files import atomic_write

__all__ = [
    "FEATURES_FORMAT",
    "Device",
    "LocalFeatures",
    "Matcher",
    "check_image",
    "features_from_arrays",
    "features_to_arrays",
    "load_features",
    "local_weights",
    "resolve_device",
    "save_features",
]

Device = Literal["cpu", "cuda"]
FEATURES_FORMAT = "leopard-reid-local-features/1"
_ARRAYS = ("keypoints", "descriptors", "scores", "has_scores", "offsets", "image_sizes", "meta")


@dataclass
class LocalFeatures:
    """Keypoints of one flank crop, their descriptors and (where the detector gives them) their scores."""

    keypoints: np.ndarray
    """(N, 2) float32 positions (x, y), px of the crop as it was given to `Matcher.extract`."""
    descriptors: np.ndarray
    """(N, D) float32 descriptors, L2-normalised by every matcher in this package."""
    image_size: tuple[int, int]
    """(height, width) of the crop given to `extract`, px; (0, 0) for a crop that could not be read."""
    scores: np.ndarray | None = None
    """(N,) float32 detector confidences, or None where the detector has none."""

    def __post_init__(self) -> None:
        keypoints = np.asarray(self.keypoints, dtype=np.float32).reshape(-1, 2)
        descriptors = np.asarray(self.descriptors, dtype=np.float32)
        if descriptors.ndim != 2 or len(descriptors) != len(keypoints):
            raise ReidError(
                f"descriptors must be (N, D) with one row per keypoint, got {descriptors.shape} for "
                f"{len(keypoints)} keypoints; return them from the same extraction"
            )
        self.keypoints = np.ascontiguousarray(keypoints)
        self.descriptors = np.ascontiguousarray(descriptors)
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
            if len(scores) != len(keypoints):
                raise ReidError(f"scores must be (N,) with N = {len(keypoints)} keypoints, got {scores.shape}")
            self.scores = np.ascontiguousarray(scores)
        height, width = (int(v) for v in self.image_size)
        self.image_size = (height, width)

    def __len__(self) -> int:
        """Return the number of keypoints."""
        return len(self.keypoints)

    @property
    def dim(self) -> int:
        """Return the descriptor width D."""
        return int(self.descriptors.shape[1])

    @classmethod
    def empty(cls, dim: int, image_size: tuple[int, int] = (0, 0)) -> LocalFeatures:
        """Return features with no keypoints (an unreadable crop, or a crop with no texture)."""
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), image_size)


class Matcher(ABC):
    """Extract local features once per crop; score a query against gallery features.

    Subclasses set `name` (the registry key), `dim` (descriptor width) and `device`.
    """

    name: str = ""
    dim: int = 0
    device: Device = "cpu"

    @abstractmethod
    def extract(self, image: np.ndarray) -> LocalFeatures:
        """Return the local features of one (H, W, 3) uint8 RGB (or (H, W) gray) crop, keypoints in its pixels."""

    @abstractmethod
    def score(self, query: LocalFeatures, gallery: Sequence[LocalFeatures]) -> np.ndarray:
        """Return (G,) float64 raw scores of the query against each gallery picture, higher is more alike."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Return the JSON-ready options that made the features; stored beside them and checked on load."""

    def score_pair(self, query: LocalFeatures, gallery: LocalFeatures) -> float:
        """Return the raw score of one pair."""
        return float(self.score(query, [gallery])[0])

    def check_features(self, features: LocalFeatures) -> None:
        """Raise ReidError unless the features have this matcher's descriptor width."""
        if features.dim != self.dim:
            raise ReidError(
                f"matcher {self.name!r} needs {self.dim}-wide descriptors, got {features.dim}; extract query and "
                "gallery with the same matcher"
            )

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({options})"


def check_image(image: np.ndarray) -> np.ndarray:
    """Return the crop as (H, W, 3) uint8 RGB; raise ReidError on anything else."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ReidError(
            f"extract needs an (H, W, 3) uint8 RGB or (H, W) uint8 crop, got {image.dtype} {image.shape}; "
            "read it with reid.images.read_image"
        )
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image


def resolve_device(device: str) -> Device:
    """Return 'cpu' or 'cuda'; raise ReidError for an unknown name or a CUDA device that is not there."""
    if device not in ("cpu", "cuda"):
        raise ReidError(f"device {device!r} is not one of cpu, cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ReidError("device 'cuda' was asked for but torch sees no CUDA device; use device='cpu'")
    return device  # type: ignore[return-value]


def local_weights(weights: str | Path, *, what: str) -> Path:
    """Return the path of a local weights file; raise ReidError for a URL or a missing file.

    These machines cannot download at run time, so a URL is refused rather than fetched.
    """
    text = str(weights)
    if "://" in text or text.startswith(("hf-hub:", "hf_hub:")):
        raise ReidError(
            f"{what} weights {text!r} are not a local file: nothing is downloaded at run time. Download the file "
            "once on a machine with internet, copy it here and pass its path, or leave weights unset to use the "
            "weights bundled with the installed package"
        )
    path = Path(text).expanduser()
    if not path.is_file():
        raise ReidError(
            f"{what} weights file {path} not found; check the path, or leave weights unset for the bundled ones"
        )
    return path


def features_to_arrays(
    features: Sequence[LocalFeatures], matcher: str, config: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Return the features as plain arrays (no objects, no pickles), with the matcher's name and config.

    keypoints (T, 2) float32, descriptors (T, D) float32, scores (T,) float32 (NaN where absent),
    has_scores (M,) bool, offsets (M + 1,) int64 (picture i owns rows offsets[i]:offsets[i+1]),
    image_sizes (M, 2) int64 (height, width), meta (1,) str: JSON {format, matcher, config, dim}.
    """
    dims = {item.dim for item in features}
    if len(dims) > 1:
        raise ReidError(f"features of one gallery must share one descriptor width, got {sorted(dims)}")
    dim = dims.pop() if dims else int(config.get("dim", 0))
    counts = np.array([len(item) for item in features], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
    keypoints = np.concatenate([item.keypoints for item in features]) if features else np.zeros((0, 2), np.float32)
    descriptors = (
        np.concatenate([item.descriptors for item in features]) if features else np.zeros((0, dim), np.float32)
    )
    scores = (
        np.concatenate(
            [item.scores if item.scores is not None else np.full(len(item), np.nan, np.float32) for item in features]
        )
        if features
        else np.zeros(0, np.float32)
    )
    header = {"format": FEATURES_FORMAT, "matcher": matcher, "dim": dim, "config": dict(config)}
    return {
        "keypoints": keypoints.astype(np.float32, copy=False),
        "descriptors": descriptors.astype(np.float32, copy=False),
        "scores": scores.astype(np.float32, copy=False),
        "has_scores": np.array([item.scores is not None for item in features], dtype=bool),
        "offsets": offsets,
        "image_sizes": np.array([item.image_size for item in features], dtype=np.int64).reshape(-1, 2),
        "meta": np.array([json.dumps(header, sort_keys=True)]),
    }


def features_from_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[list[LocalFeatures], dict[str, Any]]:
    """Return the features and the header {format, matcher, dim, config} that `features_to_arrays` made."""
    fix = "extract the gallery's features again with its matcher"
    missing = sorted(set(_ARRAYS) - set(arrays))
    if missing:
        raise ReidError(f"local-feature arrays lack {missing}; {fix}")
    meta = np.asarray(arrays["meta"])
    if meta.dtype.kind != "U" or meta.shape != (1,):
        raise ReidError(f"local-feature meta is {meta.dtype} {meta.shape}, not one JSON string; {fix}")
    try:
        header = json.loads(str(meta[0]))
    except json.JSONDecodeError as err:
        raise ReidError(f"local-feature meta is not JSON ({err}); {fix}") from err
    if not isinstance(header, dict) or header.get("format") != FEATURES_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ReidError(f"local features have format {found!r}, expected {FEATURES_FORMAT!r}; {fix}")
    keypoints, descriptors = np.asarray(arrays["keypoints"]), np.asarray(arrays["descriptors"])
    scores, has_scores = np.asarray(arrays["scores"]), np.asarray(arrays["has_scores"])
    offsets, sizes = np.asarray(arrays["offsets"]), np.asarray(arrays["image_sizes"])
    total, dim = len(keypoints), int(header.get("dim", -1))
    problems = []
    if keypoints.dtype != np.float32 or keypoints.shape != (total, 2):
        problems.append(f"keypoints are {keypoints.dtype} {keypoints.shape}, not (T, 2) float32")
    if descriptors.dtype != np.float32 or descriptors.shape != (total, dim):
        problems.append(f"descriptors are {descriptors.dtype} {descriptors.shape}, not ({total}, {dim}) float32")
    if scores.shape != (total,):
        problems.append(f"scores are {scores.shape}, not ({total},)")
    n = len(sizes)
    if sizes.shape != (n, 2) or has_scores.shape != (n,) or offsets.shape != (n + 1,):
        problems.append(f"image_sizes {sizes.shape}, has_scores {has_scores.shape}, offsets {offsets.shape} disagree")
    elif offsets.dtype.kind not in "iu" or offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
        problems.append(f"offsets do not split the {total} keypoints into {n} pictures")
    if problems:
        raise ReidError("local features are damaged: " + "; ".join(problems) + f"; {fix}")
    features = [
        LocalFeatures(
            keypoints[offsets[i] : offsets[i + 1]],
            descriptors[offsets[i] : offsets[i + 1]],
            (int(sizes[i, 0]), int(sizes[i, 1])),
            scores[offsets[i] : offsets[i + 1]] if has_scores[i] else None,
        )
        for i in range(n)
    ]
    return features, header


def save_features(path: str | Path, features: Sequence[LocalFeatures], matcher: str, config: Mapping[str, Any]) -> Path:
    """Write the features as one .npz (no pickles) atomically; return the path."""
    buffer = io.BytesIO()
    np.savez(buffer, **features_to_arrays(features, matcher, config))  # type: ignore[arg-type]
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())
    return Path(path)


def load_features(path: str | Path) -> tuple[list[LocalFeatures], dict[str, Any]]:
    """Return the features and header saved by `save_features`; raise ReidError on a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise ReidError(f"{path}: local-feature file not found; extract the gallery's features again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError, TypeError) as err:
        raise ReidError(f"{path}: not a .npz of local features ({err}); extract the gallery's features again") from err
    try:
        return features_from_arrays(arrays)
    except ReidError as err:
        raise ReidError(f"{path}: {err}") from err
