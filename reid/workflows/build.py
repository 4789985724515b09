"""Build or extend a gallery of known individuals from a labelled catalogue (`infer.py mode=build`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from reid.errors import Problem
from reid.files import sha256_file
from reid.gallery import Gallery, StoredKeypoints, check_same_matcher, current_version, gallery_lock
from reid.importers import Source, load_source
from reid.index import IndexKind
from reid.keypoints import KeypointConfig
from reid.matchers import extract_rows
from reid.models import Embedder, embed_images, model_fingerprint
from reid.workflows.common import Outcome


def build_gallery(
    catalogue: pd.DataFrame,
    embedder: Embedder,
    gallery_dir: str | Path,
    *,
    index_kind: IndexKind = "flat",
    keypoints: KeypointConfig | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[Gallery, list[Problem]]:
    """Create or extend the gallery in `gallery_dir` with the catalogue's identified rows; return it and the problems.

    An existing gallery is extended, never rebuilt: it must have been built with
    the same embedder. Rows without an individual, unreadable images and images
    already enrolled are reported and skipped. With `keypoints`, every entry's
    keypoint features are computed once and stored with the gallery; a gallery
    that has features keeps extending them with its own settings, and refuses a
    `keypoints` of another matcher. The gallery is
    locked against other writers from before it is read until it is saved.
    """
    with gallery_lock(gallery_dir):
        return _build_locked(catalogue, embedder, Path(gallery_dir), index_kind, keypoints, batch_size, progress)


def _build_locked(
    catalogue: pd.DataFrame,
    embedder: Embedder,
    gallery_dir: Path,
    index_kind: IndexKind,
    keypoints: KeypointConfig | None,
    batch_size: int,
    progress: bool,
) -> tuple[Gallery, list[Problem]]:
    fingerprint = model_fingerprint(embedder)
    if current_version(gallery_dir) is None:
        gallery = Gallery.empty(fingerprint, embedder.embedding_dim, index_kind)
    else:
        gallery = Gallery.load(gallery_dir, embedder_fingerprint=fingerprint)
    problems = [
        Problem(
            str(r.source or r.image_path), str(r.source_row or ""), "no individual_id: not enrolled; identify it first"
        )
        for r in catalogue[catalogue["individual_id"].isna()].itertuples()
    ]
    rows = catalogue[catalogue["individual_id"].notna()].reset_index(drop=True)
    hashes, readable = _content_hashes(rows, problems, progress)
    rows = rows[readable].reset_index(drop=True)
    hashes = [h for h, ok in zip(hashes, readable, strict=True) if ok]
    known = set(gallery.entries["content_hash"].dropna())
    fresh = np.array([h not in known for h in hashes], dtype=bool)
    result = embed_images(embedder, rows[fresh], batch_size=batch_size, progress=progress)
    problems += result.problems
    embedded = rows[fresh][result.ok]
    chosen = [h for h, f in zip(hashes, fresh, strict=True) if f]
    chosen = [h for h, ok in zip(chosen, result.ok, strict=True) if ok]
    stored = gallery.keypoints
    if stored is not None:
        check_same_matcher(stored.config, keypoints)
    n_before = len(gallery)
    problems += gallery.add(embedded, result.embeddings, chosen)
    if stored is not None or keypoints is not None:
        features, config = stored if stored is not None else ([], keypoints)
        assert config is not None
        added, more = extract_rows(gallery.entries.iloc[n_before:], config, progress=progress)
        problems += more
        gallery.keypoints = StoredKeypoints([*features, *added], config)
    n_dup = int((~fresh).sum())
    if n_dup:
        problems.append(Problem(str(gallery_dir), "", f"{n_dup} images already in the gallery were skipped"))
    gallery.save(gallery_dir)
    return gallery, problems


def run_build(
    source: Source,
    embedder: Embedder,
    gallery_dir: str | Path,
    *,
    index_kind: IndexKind = "flat",
    keypoints: KeypointConfig | None = None,
    progress: bool = True,
) -> Outcome:
    """`infer.py mode=build`: build or extend the gallery from a source; return its folder and the problems."""
    catalogue, problems = load_source(source)
    _, more = build_gallery(
        catalogue, embedder, gallery_dir, index_kind=index_kind, keypoints=keypoints, progress=progress
    )
    return Outcome({"gallery": Path(gallery_dir)}, problems + more)


def _content_hashes(rows: pd.DataFrame, problems: list[Problem], progress: bool) -> tuple[list[str], np.ndarray]:
    hashes, ok = [], np.zeros(len(rows), dtype=bool)
    for i, path in enumerate(tqdm(rows["image_path"], desc="hashing", unit="img", disable=not progress)):
        try:
            hashes.append(sha256_file(path))
            ok[i] = True
        except OSError as err:
            hashes.append("")
            problems.append(Problem(str(path), "", f"cannot read the file ({err.strerror}); check the path"))
    return hashes, ok
