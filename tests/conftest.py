"""Shared test fixtures. Environment variables are set before any library import reads them."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Return ../shared beside the repository; skip the test where it is absent."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: real-data tests run only where ../shared is checked out")
    return path


def _flank_pattern(rng, width: int, height: int):
    """Return an (H, W, 3) uint8 coat: dark spots of random size on a tawny ground."""
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width]
    coat = np.empty((height, width, 3), np.float32)
    coat[:] = (200, 160, 100)
    for _ in range(14):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, 8)
        coat[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (40, 30, 20)
    return coat


def write_flank_catalogue(root: Path, n_individuals: int = 8, *, seed: int = 0, jitter: float = 0.0):
    """Write random-pattern flank captures into `root`; return their catalogue.

    n_individuals x 2 sides x 3 encounters x 2 frames. Each flank has its own
    pattern; captures shift it, change its brightness and add noise, and sit in a
    larger frame with a box around the flank. `jitter` (0..1) adds harder changes:
    a small rotation and scale, grayscale night frames, stronger noise.
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    from reid.catalogue import build_catalogue

    rng = np.random.default_rng(seed)
    rows = []
    start = pd.Timestamp("2023-05-01", tz="UTC")
    for individual in range(n_individuals):
        for side in ("left", "right"):
            coat = _flank_pattern(rng, 96, 48)
            for encounter in range(3):
                stamp = start + pd.Timedelta(days=10 * individual + 3 * encounter + (side == "right"))
                for frame in range(2):
                    dx, dy = rng.integers(0, 8, size=2)
                    patch = Image.fromarray(np.clip(coat * rng.uniform(0.7, 1.2), 0, 255).astype(np.uint8))
                    if jitter:
                        size = (
                            round(96 * rng.uniform(1 - 0.1 * jitter, 1)),
                            round(48 * rng.uniform(1 - 0.1 * jitter, 1)),
                        )
                        patch = patch.rotate(rng.uniform(-8, 8) * jitter, resample=Image.Resampling.BILINEAR)
                        patch = patch.resize(size, Image.Resampling.BILINEAR).resize((96, 48))
                    canvas = np.full((80, 128, 3), 90, np.float32)
                    canvas[10 + dy : 58 + dy, 12 + dx : 108 + dx] = np.asarray(patch, np.float32)
                    if jitter and rng.random() < 0.4 * jitter:
                        canvas[:] = canvas.mean(axis=2, keepdims=True) * 0.6 + 40
                    canvas += rng.normal(0, 6 + 12 * jitter, canvas.shape)
                    path = root / f"KZ-{individual:04d}_{side}_{encounter}_{frame}.jpg"
                    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(path, quality=92)
                    rows.append(
                        {
                            "image_path": str(path),
                            "individual_id": f"KZ-{individual:04d}",
                            "side": side,
                            "bbox_x": 12 + dx,
                            "bbox_y": 10 + dy,
                            "bbox_w": 96,
                            "bbox_h": 48,
                            "timestamp": stamp + pd.Timedelta(seconds=frame),
                            "station": "CAM01",
                            "encounter_id": f"E{individual}-{side}-{encounter}",
                        }
                    )
    table, problems = build_catalogue(rows)
    assert problems == []
    return table


@pytest.fixture(scope="session")
def flank_catalogue(tmp_path_factory: pytest.TempPathFactory):
    """Return a small catalogue of random-pattern flank captures: 8 individuals x 2 sides x 3 encounters x 2 frames."""
    return write_flank_catalogue(tmp_path_factory.mktemp("flanks"))
