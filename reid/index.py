"""Nearest-neighbour search over embeddings: the project's only FAISS import.

`EmbeddingIndex` searches by inner product, which on L2-normalised embeddings is
the cosine similarity. Three kinds, chosen by `EmbeddingIndex.build`:

- `flat`: exact (`IndexFlatIP`), the default; fast enough up to ~100k entries.
- `ivf`: inverted lists (`IndexIVFFlat`), about sqrt(N) of them, k-means-trained on
  a sample of the vectors it is built from; a sixteenth of them searched per query,
  but no more than `IVF_MAX_SCANNED` vectors: an LNBNN index of a 10,000-picture
  gallery holds over 5 million descriptors, and each query searches it with hundreds
  (there it probes about 1 list in 28). More lists search no fewer vectors at a
  share, and cost far more to train.
- `hnsw`: a navigable small-world graph (`IndexHNSWFlat`), no training.

Approximate kinds fall back to `flat` below `MIN_APPROXIMATE` vectors, where
exact search is as fast and they would only lose recall. Built with `eight_bit`,
they hold each vector as one byte per dimension (FAISS's scalar quantiser, its
range per dimension learnt from the vectors): a quarter of the memory and about
half the time to scan, for scores within 0.02 of the exact ones. LNBNN's
descriptor index is built so: on nyala-dev its ranking did not change.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from reid.errors import ReidError
from reid.files import atomic_write

IndexKind = Literal["flat", "ivf", "hnsw"]
MIN_APPROXIMATE = 10_000
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVF_PROBE_SHARE = 1 / 16  # of the lists searched per query
IVF_MAX_SCANNED = 200_000  # vectors scanned per query, at most: beyond 3.2 million, a smaller share of the lists
IVF_TRAIN_PER_LIST = 64  # training vectors per list, at most (FAISS would take up to 256)
EIGHT_BIT = faiss.ScalarQuantizer.QT_8bit


class EmbeddingIndex:
    """Exact cosine-similarity search over L2-normalised (N, D) embeddings; ids are insertion order."""

    def __init__(self, dim: int, *, _index: faiss.Index | None = None) -> None:
        if dim < 1:
            raise ReidError(f"embedding dimension must be positive, got {dim}")
        self._index = _index if _index is not None else faiss.IndexFlatIP(dim)

    @classmethod
    def build(cls, embeddings: np.ndarray, *, kind: IndexKind = "flat", eight_bit: bool = False) -> EmbeddingIndex:
        """Return an index of that kind holding the (N, D) embeddings (ids 0 .. N-1); `eight_bit`: module docstring."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise ReidError(f"embeddings must be (N, D), got shape {embeddings.shape}")
        n, dim = embeddings.shape
        if kind not in ("flat", "ivf", "hnsw"):
            raise ReidError(f"index kind {kind!r} is not one of flat, ivf, hnsw")
        if kind == "flat" or n < MIN_APPROXIMATE:
            index = cls(dim)
        elif kind == "hnsw":
            # FAISS's type stub wants a ScalarQuantizer for IndexHNSWSQ's second argument; it takes its type.
            graph = (
                faiss.IndexHNSWSQ(dim, EIGHT_BIT, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)  # type: ignore[arg-type]
                if eight_bit
                else faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            )
            graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            graph.hnsw.efSearch = HNSW_EF_SEARCH
            if eight_bit:
                graph.train(index_checked(embeddings, dim))
            index = cls(dim, _index=graph)
        else:
            nlist = max(1, min(int(math.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
            coarse = faiss.IndexFlatIP(dim)
            ivf = (
                # Codes of the vectors themselves, not of their residuals: one shared range, scanned fastest.
                faiss.IndexIVFScalarQuantizer(coarse, dim, nlist, EIGHT_BIT, faiss.METRIC_INNER_PRODUCT, False)
                if eight_bit
                else faiss.IndexIVFFlat(coarse, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            )
            # k-means on a sample: its cost grows with the points times the lists, and more points per list
            # than this barely move the centroids (a 10k-picture LNBNN index has millions of descriptors).
            sample = np.random.default_rng(0).permutation(n)[: IVF_TRAIN_PER_LIST * nlist]
            ivf.train(index_checked(embeddings[np.sort(sample)], dim))
            # A share of the lists, as long as that scans at most IVF_MAX_SCANNED vectors (n / nlist per list).
            ivf.nprobe = max(1, min(math.ceil(nlist * IVF_PROBE_SHARE), IVF_MAX_SCANNED * nlist // n))
            index = cls(dim, _index=ivf)
        if n:
            index.add(embeddings)
        return index

    @property
    def kind(self) -> IndexKind:
        """Return flat, ivf or hnsw."""
        if isinstance(self._index, faiss.IndexHNSW):
            return "hnsw"
        return "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"

    @property
    def dim(self) -> int:
        """Return the embedding dimension D."""
        return int(self._index.d)

    def memory_bytes(self) -> int:
        """Return the size of the index's data (its serialised form), in bytes."""
        return int(faiss.serialize_index(self._index).size)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, embeddings: np.ndarray) -> None:
        """Append (N, D) embeddings; they get ids len(self) .. len(self) + N - 1."""
        self._index.add(self._checked(embeddings, "embeddings"))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), both (Q, min(k, len(self))): each query's best matches, most similar first.

        Scores are float32 inner products; ids are int64 insertion positions.
        """
        queries = self._checked(queries, "queries")
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self._index.search(queries, k)
        return scores, ids.astype(np.int64, copy=False)

    def save(self, path: str | Path) -> None:
        """Write the index to `path` atomically."""
        data = faiss.serialize_index(self._index)
        with atomic_write(path, "wb") as f:
            f.write(data.tobytes())

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingIndex:
        """Return the index saved at `path`; raise ReidError if it is missing or not an index."""
        path = Path(path)
        if not path.is_file():
            raise ReidError(f"{path}: index file not found; build the index again or check the path")
        try:
            index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
        except RuntimeError as err:
            raise ReidError(f"{path}: not a FAISS index file ({err}); build the index again") from err
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ReidError(f"{path}: the index does not use inner-product similarity; build it with EmbeddingIndex")
        return cls(index.d, _index=index)

    def _checked(self, array: np.ndarray, name: str) -> np.ndarray:
        return index_checked(array, self.dim, name)


def index_checked(array: np.ndarray, dim: int, name: str = "embeddings") -> np.ndarray:
    """Return the array as contiguous float32 (N, dim); raise ReidError on a wrong shape or non-finite values."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ReidError(f"{name} must be (N, {dim}), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ReidError(f"{name} contain NaN or infinite values; check the model that made them")
    return array
