"""Image transforms for flank crops: the project's only albumentations import.

Both transforms take an (H, W, 3) uint8 RGB crop and return a (3, h, w) float
tensor normalised with the backbone's mean and std, where `img_size` is h = w or
(h, w). Crops are resized to that size, not letterboxed: padding would spend many
of the few pixels a CPU model sees on borders. A wide size such as (64, 176) fits
flank boxes (about 2.5:1) without stretching; a square one stretches them, the same
way in training and inference, so the model learns the pattern it will be shown.

Flank-safe: no transform mirrors the image. A mirrored left flank is a pattern no
leopard has, and the right flank of the same animal is a different pattern
altogether, so a flip is never label-preserving. Rotations and shears are small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

Transform = Callable[[np.ndarray], torch.Tensor]
ImageSize = int | tuple[int, int]
"""Side of a square input, or (height, width), px."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FlankTransform:
    """Call with an (H, W, 3) uint8 RGB crop; return a (3, h, w) float tensor."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return cast(torch.Tensor, self.compose(image=image)["image"])

    def reseed(self, seed: int) -> None:
        """Restart the random augmentations from `seed` (each DataLoader worker gets its own)."""
        self.compose.set_random_seed(seed)

    def __repr__(self) -> str:
        return f"FlankTransform({self.compose!r})"


def eval_transform(
    img_size: ImageSize, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> FlankTransform:
    """Return the deterministic transform: resize to img_size, normalise, to tensor."""
    return FlankTransform(A.Compose([_resize(img_size), *_normalise(mean, std)]))


def train_transform(
    img_size: ImageSize,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    geometry_p: float = 0.7,
    scale_range: tuple[float, float] = (0.85, 1.15),
    translate_fraction: float = 0.06,
    rotate_deg: float = 8.0,
    shear_deg: float = 5.0,
    perspective_p: float = 0.3,
    perspective_scale: tuple[float, float] = (0.02, 0.06),
    infrared_p: float = 0.3,
    blur_p: float = 0.25,
    noise_p: float = 0.25,
    color_p: float = 0.6,
    occlusion_p: float = 0.3,
    seed: int | None = None,
) -> FlankTransform:
    """Return the training transform: camera-trap degradations, then the eval transform's resize and normalise.

    - geometry: small scale, shift, rotation and shear (`geometry_p`), and a small
      perspective change (`perspective_p`): a flank seen a little off-axis.
    - infrared night shot (`infrared_p`): grayscale with lowered contrast.
    - blur (`blur_p`): motion blur or defocus; noise (`noise_p`): sensor noise.
    - colour (`color_p`): brightness, contrast and gamma.
    - occlusion (`occlusion_p`): a few dark rectangles, like vegetation in front.

    A probability of 0 turns that family off. `seed` makes the sequence of
    augmentations reproducible.
    """
    steps: list[Any] = [
        _resize(img_size),
        A.Affine(
            scale=scale_range,
            translate_percent=(-translate_fraction, translate_fraction),
            rotate=(-rotate_deg, rotate_deg),
            shear=(-shear_deg, shear_deg),
            border_mode=cv2.BORDER_REFLECT_101,
            p=geometry_p,
        ),
        A.Perspective(scale=perspective_scale, border_mode=cv2.BORDER_REFLECT_101, p=perspective_p),
        A.Sequential(
            [
                A.ToGray(num_output_channels=3, p=1.0),
                A.RandomBrightnessContrast(brightness_limit=(-0.1, 0.2), contrast_limit=(-0.5, -0.1), p=1.0),
            ],
            p=infrared_p,
        ),
        A.OneOf([A.MotionBlur(blur_limit=(3, 7)), A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.5, 1.5))], p=blur_p),
        A.GaussNoise(std_range=(0.02, 0.08), p=noise_p),
        A.OneOf(
            [
                A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25),
                A.RandomGamma(gamma_limit=(70, 140)),
            ],
            p=color_p,
        ),
        A.CoarseDropout(
            num_holes_range=(1, 3), hole_height_range=(0.1, 0.3), hole_width_range=(0.05, 0.2), fill=0, p=occlusion_p
        ),
    ]
    return FlankTransform(A.Compose([*steps, *_normalise(mean, std)], seed=seed))


def image_hw(img_size: ImageSize | Sequence[int]) -> tuple[int, int]:
    """Return (height, width) px of an image size given as one side or as (height, width)."""
    if isinstance(img_size, int | np.integer):
        return int(img_size), int(img_size)
    values = tuple(int(v) for v in img_size)
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"img_size must be a positive int or (height, width), got {img_size!r}")
    return values[0], values[1]


def _resize(img_size: ImageSize) -> A.Resize:
    height, width = image_hw(img_size)
    return A.Resize(height, width, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()]
