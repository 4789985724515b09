"""Transforms never mirror a flank, and the evaluation transform is deterministic."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from reid.transforms import eval_transform, train_transform


def _asymmetric_image() -> np.ndarray:
    """Return a 60 x 120 image: bright left half, dark right half."""
    image = np.full((60, 120, 3), 20, np.uint8)
    image[:, :60] = 235
    return image


def _walk(transform: object):
    yield transform
    for child in getattr(transform, "transforms", []) or []:
        yield from _walk(child)


def test_train_transform_keeps_left_and_right() -> None:
    transform = train_transform(64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=0)
    image = _asymmetric_image()
    for _ in range(200):
        out = transform(image)
        gray = out.mean(dim=0)
        assert gray[:, :32].mean() > gray[:, 32:].mean()


def test_no_mirroring_transform_in_the_pipeline() -> None:
    mirroring = (A.HorizontalFlip, A.VerticalFlip, A.Transpose, A.D4, A.RandomRotate90, A.SquareSymmetry)
    for transform in _walk(train_transform(64).compose):
        assert not isinstance(transform, mirroring), transform


def test_eval_transform_is_deterministic_and_shaped() -> None:
    image = np.random.default_rng(0).integers(0, 256, (50, 140, 3), dtype=np.uint8)
    transform = eval_transform(96, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    first, second = transform(image), eval_transform(96, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))(image)
    assert first.shape == (3, 96, 96) and first.dtype == torch.float32
    assert torch.equal(first, second) and torch.equal(first, transform(image))


def test_train_transform_is_reproducible_from_its_seed() -> None:
    image = np.random.default_rng(1).integers(0, 256, (50, 140, 3), dtype=np.uint8)
    a, b = train_transform(64, seed=7), train_transform(64, seed=7)
    outputs_a = [a(image) for _ in range(5)]
    outputs_b = [b(image) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(outputs_a, outputs_b, strict=True))
    assert not torch.equal(outputs_a[0], outputs_a[1])
    a.reseed(7)
    assert torch.equal(a(image), outputs_a[0])


def test_all_augmentations_off_equals_the_eval_transform() -> None:
    image = np.random.default_rng(2).integers(0, 256, (50, 140, 3), dtype=np.uint8)
    off = dict(geometry_p=0, perspective_p=0, infrared_p=0, blur_p=0, noise_p=0, color_p=0, occlusion_p=0)
    assert torch.equal(train_transform(64, **off)(image), eval_transform(64)(image))


def test_transforms_take_height_and_width() -> None:
    image = np.random.default_rng(3).integers(0, 256, (50, 140, 3), dtype=np.uint8)
    assert eval_transform((48, 128))(image).shape == (3, 48, 128)
    assert train_transform((48, 128), seed=0)(image).shape == (3, 48, 128)
