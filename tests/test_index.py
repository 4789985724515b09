"""The FAISS index returns what brute-force numpy search returns, and survives a save/load."""

from __future__ import annotations

import numpy as np
import pytest

from reid.errors import ReidError
from reid.index import EmbeddingIndex


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_matches_bruteforce() -> None:
    rng = np.random.default_rng(0)
    gallery, queries = _unit(rng, 200, 32), _unit(rng, 15, 32)
    index = EmbeddingIndex.build(gallery)
    scores, ids = index.search(queries, 10)
    expected = queries @ gallery.T
    order = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    assert ids.dtype == np.int64 and ids.shape == (15, 10)
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, axis=1), atol=1e-5)


def test_ids_follow_insertion_order_across_adds() -> None:
    rng = np.random.default_rng(1)
    first, second = _unit(rng, 5, 8), _unit(rng, 5, 8)
    index = EmbeddingIndex(8)
    index.add(first)
    index.add(second)
    _, ids = index.search(second[[3]], 1)
    assert len(index) == 10 and ids[0, 0] == 8


def test_k_is_clipped_to_the_index_size() -> None:
    rng = np.random.default_rng(2)
    index = EmbeddingIndex.build(_unit(rng, 3, 4))
    scores, ids = index.search(_unit(rng, 2, 4), 10)
    assert scores.shape == ids.shape == (2, 3)
    empty_scores, empty_ids = EmbeddingIndex(4).search(_unit(rng, 2, 4), 5)
    assert empty_scores.shape == empty_ids.shape == (2, 0)


def test_save_and_load_give_the_same_results(tmp_path) -> None:
    rng = np.random.default_rng(3)
    index = EmbeddingIndex.build(_unit(rng, 50, 16))
    queries = _unit(rng, 4, 16)
    index.save(tmp_path / "gallery.faiss")
    loaded = EmbeddingIndex.load(tmp_path / "gallery.faiss")
    assert loaded.dim == 16 and len(loaded) == 50
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_refused_with_the_shape(tmp_path) -> None:
    index = EmbeddingIndex(4)
    with pytest.raises(ReidError, match=r"\(N, 4\)"):
        index.add(np.zeros((3, 5), np.float32))
    with pytest.raises(ReidError, match="NaN"):
        index.add(np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ReidError, match="not found"):
        EmbeddingIndex.load(tmp_path / "missing.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ReidError, match="not a FAISS index"):
        EmbeddingIndex.load(tmp_path / "junk.faiss")


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_eight_bit_codes_find_the_true_neighbours_with_scores_near_the_exact_ones(kind: str) -> None:
    rng = np.random.default_rng(6)
    n = 12_000  # above MIN_APPROXIMATE, below which every kind is exact
    # Clustered, as local descriptors of the same coat patch are: 1,200 clusters of 10.
    data = np.repeat(_unit(rng, n // 10, 64), 10, axis=0) + 0.5 * _unit(rng, n, 64)
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    queries = data[:40] + 0.05 * _unit(rng, 40, 64)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    coded = EmbeddingIndex.build(data, kind=kind, eight_bit=True)  # type: ignore[arg-type]
    assert coded.kind == kind
    assert coded.memory_bytes() < EmbeddingIndex.build(data, kind=kind).memory_bytes()  # type: ignore[arg-type]
    scores, ids = coded.search(queries, 10)
    exact = queries @ data.T
    truth = np.argsort(-exact, axis=1)[:, :10]
    assert np.mean([len(set(r) & set(t)) / 10 for r, t in zip(ids, truth, strict=True)]) > 0.8
    assert (ids[:, 0] == np.arange(40)).mean() > 0.9
    assert np.abs(scores - np.take_along_axis(exact, ids, axis=1)).max() < 0.02


def test_an_ivf_index_scans_a_share_of_its_lists_up_to_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    data = _unit(rng, 12_000, 16)  # 109 lists of about 110 vectors
    assert _probed_lists(EmbeddingIndex.build(data, kind="ivf")) == 7  # a sixteenth of 109, rounded up
    monkeypatch.setattr("reid.index.IVF_MAX_SCANNED", 400)
    capped = EmbeddingIndex.build(data, kind="ivf")
    assert _probed_lists(capped) == 3  # 400 vectors of 110 a list
    # Still a search: each vector finds itself in its own list.
    assert (capped.search(data[:50], 1)[1][:, 0] == np.arange(50)).mean() > 0.9


def _probed_lists(index: EmbeddingIndex) -> int:
    """Return how many inverted lists the IVF index searches per query."""
    return int(index._index.nprobe)  # type: ignore[attr-defined]
