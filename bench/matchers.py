"""Local-feature matchers alone on real flank photos: top-1 / top-5 and CPU cost per extraction and per pair.

    python bench/matchers.py                                         # rootsift, xfeat, xfeat-lnbnn on nyala-dev
    python bench/matchers.py --methods rootsift-lnbnn xfeat-lighterglue
    python bench/matchers.py --methods aliked-lightglue --rerank xfeat-lnbnn --shortlist 10 --max-queries 120

Protocol (that of bench/accuracy.py, without an embedder). A seeded share of the
individuals (`--fraction`, a quarter by default: about 45 individuals and 300 pictures,
the size of the held-out split issue 11 measured on) is evaluated.
Closed set, per side: every picture is a query against all other pictures of its side
except those of its own sighting (encounter); it counts for top-k when its individual
has another such picture. A pair matcher scores every allowed picture and an individual
takes its best picture's score; LNBNN votes for individuals directly. Ties are broken
at random in expectation (a query whose scores are all 0 gets the chance share).
"Method-lnbnn" is HotSpotter's LNBNN vote over that matcher's features. With
`--rerank R --shortlist B`, each query's B best individuals by R are re-ordered by the
matcher (the slow learned ones cannot score a whole gallery here).

Features are cached per matcher in --out (features-<name>.npz) with their extraction
times, so later runs only score. Threads: 1 for torch and FAISS (--threads).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from reid.images import read_image, set_threads
from reid.matchers import LnbnnRanker, LocalFeatures, Matcher, create_matcher, load_features, save_features

ROOT = Path(__file__).resolve().parents[1]
TOPK = (1, 5)
# Extra neighbours LNBNN looks past a query's own picture: its exact copies take about one slot per descriptor.
LOOKAHEAD = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, default=ROOT.parent / "shared/data/nyala-dev/labels.csv")
    parser.add_argument("--methods", nargs="+", default=["rootsift", "xfeat", "xfeat-lnbnn"])
    parser.add_argument("--fraction", type=float, default=0.25, help="share of individuals evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=4, help="LNBNN neighbours that vote")
    parser.add_argument("--index-kind", default="flat", choices=["flat", "ivf", "hnsw"], help="LNBNN's FAISS index")
    parser.add_argument("--lnbnn-distance", default="euclidean", choices=["euclidean", "squared"])
    parser.add_argument("--max-features", type=int, default=1024, help="keypoints per crop for the learned matchers")
    parser.add_argument("--max-side-px", type=int, default=512, help="learned matchers shrink crops to this")
    parser.add_argument("--rerank", help="re-rank this method's shortlist (e.g. xfeat-lnbnn) instead of all pairs")
    parser.add_argument("--shortlist", type=int, default=10)
    parser.add_argument("--max-queries", type=int, help="evaluate only so many queries (seeded), for slow matchers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "matchers")
    args = parser.parse_args()
    set_threads(args.threads)
    if not args.labels.is_file():
        sys.exit(
            f"{args.labels} not found: pass --labels path/to/labels.csv (columns path, individual_id, side, sighting)"
        )
    args.out.mkdir(parents=True, exist_ok=True)

    table = load_table(args.labels, args.fraction, args.seed)
    allowed = allowed_pairs(table)
    ids = table["individual_id"].to_numpy(dtype=str)
    queries = np.flatnonzero((allowed & (ids[:, None] == ids[None, :])).any(axis=1))
    if args.max_queries is not None and args.max_queries < len(queries):
        queries = np.sort(np.random.default_rng(args.seed).choice(queries, args.max_queries, replace=False))
    print(
        f"{args.labels.parent.name}: {len(table)} pictures of {len(set(ids))} individuals "
        f"({args.fraction:.0%} of them, seed {args.seed}); {len(queries)} queries with a same-side match",
        flush=True,
    )

    rows = []
    shortlists = None
    if args.rerank:
        first, cost = evaluate(args.rerank, table, allowed, queries, args)
        rows.append({"method": args.rerank, **topk_accuracy(first, ids, queries), **cost})
        print(pd.DataFrame(rows[-1:]).to_markdown(index=False, floatfmt=".3f"), flush=True)
        shortlists = ranked_individuals(first)
    for method in args.methods:
        start = time.perf_counter()
        if shortlists is not None:
            scores, cost = evaluate(method, table, allowed, queries, args, ranked=shortlists, shortlist=args.shortlist)
            label = f"{method} re-ranking {args.rerank} top-{args.shortlist}"
        else:
            scores, cost = evaluate(method, table, allowed, queries, args)
            label = method
        metrics = topk_accuracy(scores, ids, queries)
        rows.append({"method": label, **metrics, **cost, "minutes": (time.perf_counter() - start) / 60})
        print(pd.DataFrame(rows[-1:]).to_markdown(index=False, floatfmt=".3f"), flush=True)
    result = pd.DataFrame(rows)
    print()
    print(result.to_markdown(index=False, floatfmt=".3f"))
    stamp = hashlib.sha1(" ".join(sys.argv[1:]).encode()).hexdigest()[:8]
    result.to_csv(args.out / f"results-{stamp}.csv", index=False)


def load_table(labels: Path, fraction: float, seed: int) -> pd.DataFrame:
    """Return the labels rows of a seeded share of the individuals, with absolute image paths."""
    table = pd.read_csv(labels, dtype={"individual_id": str})
    table["image_path"] = [str(labels.parent / p) for p in table["path"]]
    individuals = np.array(sorted(table["individual_id"].unique()))
    np.random.default_rng(seed).shuffle(individuals)
    chosen = set(individuals[: max(2, round(fraction * len(individuals)))])
    return table[table["individual_id"].isin(chosen)].reset_index(drop=True)


def allowed_pairs(table: pd.DataFrame) -> np.ndarray:
    """Return (N, N) bool: the pictures a query is compared with (its side, not its own sighting)."""
    sides = table["side"].astype(str).to_numpy()
    sighting = table["sighting"].astype(str).to_numpy() if "sighting" in table else np.arange(len(table)).astype(str)
    return (sides[:, None] == sides[None, :]) & (sighting[:, None] != sighting[None, :])


def base_matcher(method: str) -> str:
    """Return the matcher whose features a method uses (xfeat-lnbnn -> xfeat)."""
    return method.removesuffix("-lnbnn")


def build(name: str, args: argparse.Namespace) -> Matcher:
    """Return the matcher, the learned ones at the benchmark's feature count and crop size."""
    if name == "rootsift":
        return create_matcher(name)
    return create_matcher(name, max_features=args.max_features, max_side_px=args.max_side_px)


def features_for(
    name: str, matcher: Matcher, table: pd.DataFrame, args: argparse.Namespace
) -> tuple[list[LocalFeatures], float]:
    """Return every picture's features (cached in --out) and the measured ms per extraction."""
    # LighterGlue reuses XFeat's features; the extraction options decide the file.
    options = {
        k: v
        for k, v in matcher.config().items()
        if k not in ("min_confidence", "glue_weights", "ratio", "ransac_px", "geometry")
    }
    key = hashlib.sha1(json.dumps([sorted(table["path"]), options], sort_keys=True).encode()).hexdigest()[:10]
    family = "xfeat" if name.startswith("xfeat") else name
    path = args.out / f"features-{family}-{key}.npz"
    timing = path.with_suffix(".json")
    if path.is_file() and timing.is_file():
        features, _ = load_features(path)
        return features, float(json.loads(timing.read_text())["ms_per_extract"])
    features, seconds = [], 0.0
    for i, image_path in enumerate(table["image_path"]):
        image = read_image(image_path)
        start = time.perf_counter()
        features.append(matcher.extract(image))
        seconds += time.perf_counter() - start
        if (i + 1) % 100 == 0:
            print(f"  {name}: extracted {i + 1}/{len(table)}", flush=True)
    ms = 1000 * seconds / max(1, len(table))
    save_features(path, features, matcher.name, matcher.config())
    timing.write_text(json.dumps({"ms_per_extract": ms}))
    return features, ms


def evaluate(
    method: str,
    table: pd.DataFrame,
    allowed: np.ndarray,
    queries: np.ndarray,
    args: argparse.Namespace,
    ranked: dict[int, list[str]] | None = None,
    shortlist: int = 0,
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """Return each query's {individual: score} and the costs (ms per extraction, per pair or per query).

    With `ranked` (each query's individuals in a first stage's order), a pair matcher scores
    only the first `shortlist` of them; the rest keep the first stage's order below them.
    """
    name = base_matcher(method)
    matcher = build(name, args)
    features, extract_ms = features_for(name, matcher, table, args)
    ids = table["individual_id"].to_numpy(dtype=str)
    scores: dict[int, dict[str, float]] = {}
    if method.endswith("-lnbnn"):
        sides = table["side"].astype(str).to_numpy()
        sighting = table["sighting"].astype(str).to_numpy()
        rankers = {}
        start = time.perf_counter()
        for side in sorted(set(sides)):
            members = np.flatnonzero(sides == side)
            rankers[side] = (
                members,
                LnbnnRanker(
                    [features[i] for i in members],
                    ids[members],
                    k=args.k,
                    index_kind=args.index_kind,
                    distance=args.lnbnn_distance,
                ),
            )
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        for n, q in enumerate(queries):
            members, ranker = rankers[sides[q]]
            own = np.flatnonzero(sighting[members] == sighting[q])
            votes = ranker.individual_scores(features[q], exclude=own, lookahead=LOOKAHEAD)
            scores[int(q)] = dict(zip(ranker.individuals, votes.tolist(), strict=True))
            if (n + 1) % 100 == 0:
                print(f"  {method}: {n + 1}/{len(queries)} queries", flush=True)
        query_ms = 1000 * (time.perf_counter() - start) / max(1, len(queries))
        return scores, {"ms_extract": extract_ms, "ms_per_query": query_ms, "index_build_s": build_s}

    # Pair matchers: each allowed pair once (scores are near symmetric), or only the shortlists.
    pair_scores: dict[tuple[int, int], float] = {}
    wanted = set()
    for q in queries:
        gallery = np.flatnonzero(allowed[q])
        if ranked is not None:
            gallery = gallery[np.isin(ids[gallery], ranked[int(q)][:shortlist])]
        wanted.update((min(q, g), max(q, g)) for g in gallery.tolist())
    by_query: dict[int, list[int]] = {}
    for a, b in sorted(wanted):
        by_query.setdefault(a, []).append(b)
    start = time.perf_counter()
    done = 0
    for a, others in by_query.items():
        values = matcher.score(features[a], [features[b] for b in others])
        pair_scores.update({(a, b): float(v) for b, v in zip(others, values, strict=True)})
        done += len(others)
        if done // 20000 != (done - len(others)) // 20000:
            print(f"  {method}: {done}/{len(wanted)} pairs", flush=True)
    pair_ms = 1000 * (time.perf_counter() - start) / max(1, len(wanted))
    for q in queries:
        best: dict[str, float] = {}
        gallery = np.flatnonzero(allowed[q])
        if ranked is not None:
            gallery = gallery[np.isin(ids[gallery], ranked[int(q)][:shortlist])]
        for g in gallery.tolist():
            value = pair_scores[(min(q, g), max(q, g))]
            best[ids[g]] = max(best.get(ids[g], -np.inf), value)
        if ranked is not None:
            # Individuals outside the shortlist rank below it, in the first stage's order.
            best.update({i: -1.0 - r for r, i in enumerate(ranked[int(q)]) if i not in best})
        scores[int(q)] = best
    n_pairs = len(wanted)
    return scores, {"ms_extract": extract_ms, "ms_per_pair": pair_ms, "pairs": float(n_pairs)}


def ranked_individuals(scores: dict[int, dict[str, float]]) -> dict[int, list[str]]:
    """Return each query's individuals, best-scored first."""
    return {q: sorted(s, key=lambda i: -s[i]) for q, s in scores.items()}


def topk_accuracy(scores: dict[int, dict[str, float]], ids: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """Return top-k accuracy (ties broken at random, in expectation), its mean over individuals, and the query count."""
    hits: dict[int, list[float]] = {k: [] for k in TOPK}
    for q in queries:
        s = scores[int(q)]
        if ids[q] not in s:
            for k in TOPK:
                hits[k].append(0.0)
            continue
        truth = s[ids[q]]
        values = np.array(list(s.values()))
        greater = int((values > truth).sum())
        ties = int((values == truth).sum()) - 1
        for k in TOPK:
            hits[k].append(float(np.clip((k - greater) / (ties + 1), 0.0, 1.0)))
    result: dict[str, float] = {}
    for k in TOPK:
        per_query = pd.Series(hits[k], index=ids[queries])
        result[f"top{k}"] = float(per_query.mean())
        result[f"balanced_top{k}"] = float(per_query.groupby(level=0).mean().mean())
    result["queries"] = float(len(queries))
    return result


if __name__ == "__main__":
    main()
