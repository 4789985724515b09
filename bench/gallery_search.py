"""Print gallery search latency, memory and approximate recall for galleries of 10k, 100k and 1M entries.

    python bench/gallery_search.py                    # 10k, 100k, 1M; dim 128; 1,000 queries; k = 10
    python bench/gallery_search.py --sizes 10000 100000 --dim 256 --threads 2

Vectors are clustered like trained re-ID embeddings (10 pictures per individual,
cosine about 0.9 within one), L2-normalised; queries are new pictures of gallery
individuals. On unclustered random vectors IVF's recall is far lower. Latency is the wall time of one batch of queries divided by
the number of queries, and of single queries one at a time. Memory is the size of
the serialised index (what the index holds in RAM). Recall@10 compares the
approximate kinds against exact search.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from reid.images import set_threads
from reid.index import EmbeddingIndex


def clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Return (n, dim) L2-normalised vectors in clusters of 10 around random centres."""
    centres = rng.standard_normal((max(1, n // 10), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, 10, axis=0)[:n] + rng.standard_normal((n, dim), dtype=np.float32) * (0.5 / np.sqrt(dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"dim {args.dim}, {args.queries} queries, k={args.k}, {args.threads} threads")
    print(
        f"{'entries':>9} {'kind':>5} {'build s':>8} {'batch ms/q':>10} {'single ms/q':>11} {'index MB':>9} {'recall@10':>9}"
    )
    for n in args.sizes:
        gallery = clustered(n, args.dim, rng)
        picked = rng.choice(n, args.queries, replace=False)
        queries = gallery[picked] + rng.standard_normal((args.queries, args.dim), dtype=np.float32) * (
            0.3 / np.sqrt(args.dim)
        )
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact_ids = None
        for kind in ("flat", "ivf", "hnsw"):
            start = time.perf_counter()
            index = EmbeddingIndex.build(gallery, kind=kind)  # type: ignore[arg-type]
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            _, ids = index.search(queries, args.k)
            batch_ms = 1000 * (time.perf_counter() - start) / args.queries
            start = time.perf_counter()
            for q in queries[:100]:
                index.search(q[None], args.k)
            single_ms = 1000 * (time.perf_counter() - start) / 100
            size_mb = index.memory_bytes() / 1e6
            if kind == "flat":
                exact_ids, recall = ids, 1.0
            else:
                recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact_ids, strict=True)]))
            print(
                f"{n:>9} {index.kind:>5} {build_s:>8.1f} {batch_ms:>10.3f} {single_ms:>11.3f} {size_mb:>9.0f} {recall:>9.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
