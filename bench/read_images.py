"""Print images per second for read + crop + resize through `reid.images.read_image`.

    python bench/read_images.py                      # synthetic data and ../shared/data/nyala-dev
    python bench/read_images.py --size 224 --repeat 3

Runs single-threaded, as one DataLoader worker would.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from reid.catalogue import load_catalogue
from reid.images import ImageReadError, read_image
from reid.importers import import_labels_csv
from reid.synthetic import SyntheticConfig, ensure_dataset

REPO = Path(__file__).resolve().parents[1]


def images_per_second(table: pd.DataFrame, size: int, margin: float, repeat: int) -> tuple[float, int]:
    """Return (images per second, failures) reading every row of `table` `repeat` times."""
    boxes = table[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].to_numpy(dtype=float)
    failures = 0
    start = time.perf_counter()
    for _ in range(repeat):
        for path, box in zip(table["image_path"], boxes, strict=True):
            try:
                read_image(path, None if np.isnan(box).any() else box, margin=margin, max_side_px=size)
            except ImageReadError:
                failures += 1
    return repeat * len(table) / (time.perf_counter() - start), failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="longest side of the output, px")
    parser.add_argument("--margin", type=float, default=0.1, help="box margin, fraction of the box")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--nyala", type=Path, default=REPO.parent / "shared" / "data" / "nyala-dev")
    args = parser.parse_args()

    data = {"synthetic": load_catalogue(ensure_dataset(REPO / "data" / "synthetic", SyntheticConfig()))}
    if (args.nyala / "labels.csv").is_file():
        data["nyala-dev"] = import_labels_csv(args.nyala / "labels.csv").table
    else:
        print(f"{args.nyala} is absent: nyala-dev skipped")
    print(f"read + crop + resize to {args.size} px, 1 thread")
    for name, table in data.items():
        rate, failures = images_per_second(table, args.size, args.margin, args.repeat)
        print(f"{name:>10}: {len(table):5d} images  {rate:7.1f} images/s  ({failures} failures)")


if __name__ == "__main__":
    main()
