"""Pictures of the evidence behind a match: verified keypoint correspondences of a query and its candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from reid.catalogue import BBOX_COLUMNS
from reid.decisions import MatchResult
from reid.errors import Problem
from reid.gallery import Gallery
from reid.images import ImageReadError
from reid.keypoints import Features, KeypointConfig, draw_correspondences
from reid.keypoints import match as match_keypoints
from reid.keypoints import read_crop as read_keypoint_crop
from reid.matchers import extract_rows

EVIDENCE_DIR = "evidence"


def evidence_pictures(
    out_dir: Path,
    result: MatchResult,
    queries: pd.DataFrame,
    gallery: Gallery,
    config: KeypointConfig,
    problems: list[Problem],
) -> dict[tuple[str, int], str]:
    """Draw the verified correspondences of each encounter's first picture with each of its candidates' best
    gallery picture (what the report shows); return their paths relative to `out_dir`, by (query, gallery row)."""
    first = result.matches["query"].isin(set(result.decisions.drop_duplicates("encounter_id")["query"]))
    matches = result.matches[first]
    (out_dir / EVIDENCE_DIR).mkdir(exist_ok=True)
    position = {str(a): i for i, a in enumerate(queries["annotation_id"])}
    seen: dict[tuple[str, Any], tuple[np.ndarray, Features] | None] = {}

    def crop_and_features(row: pd.Series, key: tuple[str, Any]) -> tuple[np.ndarray, Features] | None:
        """Return the crop as drawn and its features as matched (with frame positions), once per picture."""
        if key not in seen:
            box = row[list(BBOX_COLUMNS)].to_numpy(dtype=float)
            try:
                crop = read_keypoint_crop(str(row["image_path"]), None if np.isnan(box).any() else box.tolist(), config)
            except ImageReadError as err:
                problems.append(Problem(err.path, "correspondences", err.reason))
                seen[key] = None
                return None
            features, _ = extract_rows(row.to_frame().T, config, progress=False)
            seen[key] = (crop, features[0])
        return seen[key]

    pictures = {}
    shown = matches[matches["gallery_row"] >= 0]
    pairs = shown[["query", "gallery_row"]].drop_duplicates()
    for n, (query, row) in enumerate(zip(pairs["query"].astype(str), pairs["gallery_row"].astype(int), strict=True)):
        query_side = crop_and_features(queries.iloc[position[query]], ("q", query))
        gallery_side = crop_and_features(gallery.entries.iloc[row], ("g", row))
        if query_side is None or gallery_side is None:
            continue
        found = match_keypoints(query_side[1], gallery_side[1], config)
        relative = f"{EVIDENCE_DIR}/pair{n:05d}.jpg"
        picture = draw_correspondences(query_side[0], gallery_side[0], found)
        Image.fromarray(picture).save(out_dir / relative, quality=85)
        pictures[(query, row)] = relative
    return pictures
