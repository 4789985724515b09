"""The persistent gallery: same-side search against brute force, versioned atomic saves, verification."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reid.catalogue import build_catalogue
from reid.gallery import CURRENT_FILE, Gallery, GalleryError, StoredKeypoints, read_manifest
from reid.keypoints import Features, KeypointConfig


def _unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _entries(n: int, sides: list[str] | None = None, start: int = 0) -> pd.DataFrame:
    sides = sides or ["left", "right", "unknown"] * (n // 3 + 1)
    rows = [
        dict(
            annotation_id=f"a{start + i}",
            image_path=f"/x/{start + i}.jpg",
            individual_id=f"KZ-{(start + i) % 7:04d}",
            side=sides[i],
            timestamp="2021-01-01T00:00:00Z",
        )
        for i in range(n)
    ]
    table, problems = build_catalogue(rows)
    assert problems == []
    return table


def _gallery(n: int = 60, seed: int = 0) -> tuple[Gallery, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = _unit(rng, n)
    gallery = Gallery.empty("fp-test", emb.shape[1])
    assert gallery.add(_entries(n), emb, [f"h{i}" for i in range(n)]) == []
    return gallery, emb


def test_same_side_search_matches_bruteforce() -> None:
    gallery, emb = _gallery()
    rng = np.random.default_rng(1)
    queries = _unit(rng, 9)
    sides = ["left", "right", "unknown"] * 3
    scores, rows = gallery.search(queries, sides, k=5)
    gallery_sides = gallery.entries["side"].to_numpy()
    for q, side in enumerate(sides):
        allowed = {"left": {"left", "unknown"}, "right": {"right", "unknown"}, "unknown": {"left", "right", "unknown"}}[
            side
        ]
        candidates = np.flatnonzero(np.isin(gallery_sides, list(allowed)))
        sims = emb[candidates] @ queries[q]
        expected = candidates[np.argsort(-sims)[:5]]
        assert rows[q].tolist() == expected.tolist()
        np.testing.assert_allclose(scores[q], np.sort(sims)[::-1][:5], rtol=1e-5)
        assert set(gallery_sides[rows[q]]) <= allowed


def test_small_gallery_returns_missing_neighbours_as_minus_one() -> None:
    gallery, _ = _gallery(n=3)
    scores, rows = gallery.search(_unit(np.random.default_rng(2), 1), ["left"], k=4)
    assert (rows[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()


def test_the_same_image_is_never_enrolled_twice() -> None:
    gallery, emb = _gallery(n=6)
    again = gallery.add(_entries(2, start=100), emb[:2], ["h0", "new"])
    assert len(gallery) == 7
    assert len(again) == 1 and "already in the gallery" in again[0].message


def test_save_load_round_trip_and_versioning(tmp_path: Path) -> None:
    gallery, emb = _gallery()
    first = gallery.save(tmp_path / "g")
    loaded = Gallery.load(tmp_path / "g", embedder_fingerprint="fp-test")
    np.testing.assert_array_equal(loaded.embeddings, emb)
    pd.testing.assert_frame_equal(loaded.entries, gallery.entries)
    loaded.add(_entries(3, start=500), _unit(np.random.default_rng(3), 3), ["x1", "x2", "x3"])
    second = loaded.save(tmp_path / "g")
    assert first.name == "v000001" and second.name == "v000002"
    assert (tmp_path / "g" / CURRENT_FILE).read_text().strip() == "v000002"
    manifest = read_manifest(tmp_path / "g")
    assert manifest["counts"]["entries"] == 63 and manifest["created"] == gallery.created
    assert len(Gallery.load(tmp_path / "g")) == 63


def test_gallery_from_another_embedder_is_refused(tmp_path: Path) -> None:
    gallery, _ = _gallery()
    gallery.save(tmp_path / "g")
    with pytest.raises(GalleryError, match=r"built with embedder fp-test.*embedder in use is other"):
        Gallery.load(tmp_path / "g", embedder_fingerprint="other")


def test_tampered_or_missing_files_are_detected(tmp_path: Path) -> None:
    gallery, _ = _gallery()
    version = gallery.save(tmp_path / "g")
    entries = version / "entries.csv"
    entries.write_text(entries.read_text().replace("KZ-0001", "KZ-0002", 1))
    with pytest.raises(GalleryError, match="checksum mismatch"):
        Gallery.load(tmp_path / "g")
    (version / "embeddings.npy").unlink()
    with pytest.raises(GalleryError, match="missing gallery file"):
        Gallery.load(tmp_path / "g")
    with pytest.raises(GalleryError, match="no gallery here"):
        Gallery.load(tmp_path / "elsewhere")


def test_a_crash_while_saving_keeps_the_previous_gallery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gallery, _ = _gallery()
    gallery.save(tmp_path / "g")
    gallery.add(_entries(3, start=900), _unit(np.random.default_rng(4), 3), ["y1", "y2", "y3"])

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        gallery.save(tmp_path / "g")
    monkeypatch.undo()
    assert len(Gallery.load(tmp_path / "g")) == 60


def test_embeddings_are_never_unpickled(tmp_path: Path) -> None:
    gallery, _ = _gallery()
    version = gallery.save(tmp_path / "g")
    # An object array needs pickle to load; a gallery whose checksums were forged to match must still be refused.
    np.save(version / "embeddings.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    manifest = json.loads((version / "manifest.json").read_text())
    from reid.files import sha256_file

    manifest["files"]["embeddings.npy"] = sha256_file(version / "embeddings.npy")
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((GalleryError, ValueError)):
        Gallery.load(tmp_path / "g")


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_true_neighbours(kind: str) -> None:
    rng = np.random.default_rng(5)
    n = 12_000  # above MIN_APPROXIMATE, below which every kind is exact
    # Embeddings cluster by individual, as re-ID embeddings do: 1,200 animals with 10 pictures each.
    centres = np.repeat(_unit(rng, n // 10, dim=32), 10, axis=0)
    emb = centres + 0.3 * _unit(rng, n, dim=32) / np.sqrt(32) * 4
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    gallery = Gallery.empty("fp", 32, index_kind=kind)  # type: ignore[arg-type]
    gallery.add(_entries(n, sides=["left"] * n), emb, [f"h{i}" for i in range(n)])
    queries = emb[:50] + 0.05 * _unit(rng, 50, dim=32)
    _, rows = gallery.search(queries / np.linalg.norm(queries, axis=1, keepdims=True), ["left"] * 50, k=10)
    assert gallery._index_for("left")[0].kind == kind
    exact = np.argsort(-(emb @ queries.T).T, axis=1)[:, :10]
    recall = np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, exact, strict=True)])
    assert recall > 0.8
    assert (rows[:, 0] == np.arange(50)).mean() > 0.9


def test_stored_keypoints_are_decoded_once_and_again_after_a_change() -> None:
    gallery = Gallery.empty("fp", 4)
    gallery.add(
        build_catalogue([dict(image_path="/x/a.jpg", individual_id="A", side="left")])[0],
        np.eye(1, 4, dtype=np.float32),
        ["h1"],
    )
    xy = np.zeros((2, 2), np.float32)
    gallery.keypoints = StoredKeypoints([Features(xy, np.ones((2, 128), np.float32), (10, 20))], KeypointConfig())
    first = gallery.keypoints
    assert first is not None and gallery.keypoints is first  # one decode for every later use
    gallery.keypoints = StoredKeypoints(first.features, KeypointConfig(max_features=100))
    assert gallery.keypoints is not first and gallery.keypoints.config.max_features == 100
