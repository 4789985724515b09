"""Accuracy benchmark: embedding alone, keypoint matcher alone, and both fused, on any labels CSV.

    python bench/accuracy.py                                  # ../shared/data/nyala-dev (trains an embedder first)
    python bench/accuracy.py --configs fast,weight_free,classic --embedder ...  # the conf/matching presets only
    python bench/accuracy.py --configs weight_free,classic --open-set --embedder ...  # their open-set decisions
    python bench/accuracy.py --synthetic --configs weight_free --backgrounds none,station   # with and without masks
    python bench/accuracy.py --labels path/to/labels.csv      # any labels CSV: path, individual_id, side, ...
    python bench/accuracy.py --synthetic                      # the built-in synthetic leopards
    python bench/accuracy.py --embedder outputs/train/<run>/embedder   # reuse a run trained with split=disjoint

Protocol. The embedder is trained (train.py, split=disjoint) on some individuals
and evaluated on the others only. Closed set, per side: every evaluation picture
is a query against all other pictures of its side, leaving out pictures of the
same sighting or encounter; top-1, top-5 and mAP are over the queries whose
individual has another picture. Each matcher's score is calibrated to
P(same individual) on one half of the evaluation individuals and applied to the
other half (cross-fitted, so no query is scored by a calibration fitted on it);
a shortlist of B is calibrated on top-B pairs, the pairs it re-ranks. Fused
re-ranks the embedding's top-B shortlist by the fused probability (`--rule`,
default the library's); "whole gallery" is B = all. Open set: per half,
thresholds are calibrated on the other half, a share of individuals is left out
of the gallery, and the false-new / false-merge rates and the minimum-count
bounds are compared with the truth.

Writes results.json, results.md, pairs.npz (pair scores), ranks.csv (CMC data),
calibration.json and examples/ (matched pairs with correspondences) into --out,
which notebooks/evaluation.ipynb reads.

Presets (--configs, conf/matching/*.yaml): each configuration runs the library's own
path (reid.workflows.match.shortlist, FusedScorer) on the closed set above: every
picture is a query against all other pictures of its side but its own encounter,
its shortlist re-scored and fused with calibrations cross-fitted on the other half
of the individuals; pictures outside the shortlist follow, by the embedding. Reported
per configuration: top-1, top-5, mAP, balanced top-1 (the mean over individuals of
their queries' top-1), ms per query (embedding, feature extraction, LNBNN over the
gallery, pair matching of the shortlist; measured, then with LNBNN's search timed
over galleries of --gallery-sizes pictures, these pictures' features repeated) and
feature bytes per gallery picture (keypoints.npz). With --backgrounds, each preset
runs once per keypoints.background (none: features on the whole box; station: the
per-station background model's masks; grabcut: the box split by colour;
reid.background), and the share of pictures whose features a mask restricted is
reported.
Writes configs.json and configs.md into --out; features are cached there per matcher.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from scipy.stats import beta

from reid.errors import ReidError
from reid.fusion import DEFAULT_CALIBRATION, FusedScorer, ScoreFusion, fit_calibration, fit_fusion, lnbnn_ranker
from reid.gallery import Gallery, StoredKeypoints
from reid.images import set_threads
from reid.importers import load_source
from reid.index import EmbeddingIndex
from reid.keypoints import (
    KeypointConfig,
    draw_correspondences,
    extract_rows,
    features_from_bytes,
    features_to_bytes,
    match,
    read_crop,
    score_pairs,
)
from reid.matchers import LnbnnRanker, local_features
from reid.matchers import extract_rows as extract_local_features
from reid.metrics import first_match_ranks, retrieval_metrics
from reid.models import create_embedder, embed_images, export_embedder, load_embedder
from reid.splits import split_catalogue
from reid.workflows.calibrate import CalibrationSettings, calibrate_thresholds
from reid.workflows.match import decision_counts, score_queries, shortlist

ROOT = Path(__file__).resolve().parents[1]
SHORTLISTS = (10, 25, 50, 100, 200)
OPEN_SET_TITLE = "Open set (thresholds calibrated on the other half of the individuals; decisions per encounter):"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--labels", type=Path, default=ROOT.parent / "shared/data/nyala-dev/labels.csv")
    source.add_argument("--synthetic", action="store_true", help="the built-in synthetic leopards")
    parser.add_argument("--synthetic-individuals", type=int, default=60)
    parser.add_argument("--embedder", type=Path, help="an exported embedder of a train.py run with split=disjoint")
    parser.add_argument("--untrained", action="store_true", help="no training: an untrained embedder (smoke runs)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--heldout", type=float, default=0.5, help="share of individuals held out of training")
    parser.add_argument(
        "--open-set-unseen", type=float, default=0.3, help="share of individuals left out of the gallery"
    )
    parser.add_argument("--keypoints", default="rootsift", choices=["rootsift", "sift", "orb", "akaze"])
    parser.add_argument("--rule", default=ScoreFusion().rule, choices=["mean", "log_odds"], help="fusion rule")
    parser.add_argument("--calibration", default=DEFAULT_CALIBRATION, choices=["auto", "logistic", "isotonic"])
    parser.add_argument("--shortlist", type=int, default=ScoreFusion().shortlist, help="B of the open-set run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--configs",
        help="comma-separated presets of conf/matching/ to compare (only them: the protocol above is skipped)",
    )
    parser.add_argument(
        "--open-set",
        action="store_true",
        help="with --configs: the open-set protocol (decisions, error rates, count intervals) for those presets",
    )
    parser.add_argument(
        "--gallery-sizes",
        type=gallery_sizes,
        default=(1000, 10000),
        help="with --configs: time LNBNN's search over galleries of these many pictures (the features repeated)",
    )
    parser.add_argument(
        "--backgrounds",
        help="with --configs: run each preset with each of these keypoints.background values (none,station,grabcut)",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    name = "synthetic" if args.synthetic else args.labels.parent.name
    out = args.out or ROOT / "outputs" / "bench" / f"accuracy-{name}"
    out.mkdir(parents=True, exist_ok=True)

    table, embedder_dir = prepare(args, out)
    embedder = load_embedder(embedder_dir)
    print(f"evaluation: {len(table)} pictures of {table['individual_id'].nunique()} individuals never seen in training")
    start = time.perf_counter()
    embedded = embed_images(embedder, table, progress=True)
    embed_ms = 1000 * (time.perf_counter() - start) / max(1, len(table))
    table, emb = table[embedded.ok].reset_index(drop=True), embedded.embeddings
    if args.configs and args.open_set:
        methods = preset_methods(args.configs.split(","), table, out)
        folds = individual_folds(table, args.seed)
        open_set = open_set_rates(table, emb, methods, folds, args.open_set_unseen, args.seed, args.calibration)
        (out / "open_set.json").write_text(json.dumps(open_set.to_dict("records"), indent=2))
        (out / "open_set.md").write_text(
            OPEN_SET_TITLE + "\n" + open_set.to_markdown(index=False, floatfmt=".3f") + "\n"
        )
        print((out / "open_set.md").read_text())
        return
    if args.configs:
        backgrounds = args.backgrounds.split(",") if args.backgrounds else None
        compare_configs(
            args.configs.split(","),
            table,
            emb,
            embed_ms,
            out,
            args.seed,
            args.calibration,
            backgrounds,
            args.gallery_sizes,
        )
        return
    config = KeypointConfig(method=args.keypoints)
    start = time.perf_counter()
    features, _ = extract_rows(table, config, progress=True)
    extract_ms = 1000 * (time.perf_counter() - start) / max(1, len(table))

    allowed = allowed_pairs(table)
    ids = table["individual_id"].to_numpy(dtype=object)
    cosine = emb @ emb.T
    inliers, pair_ms = all_pair_inliers(features, allowed, config)
    folds = individual_folds(table, args.seed)
    whole = allowed.shape[1]
    # Each shortlist size is calibrated on the pairs it re-ranks: the other fold's top-B pairs.
    fusion_options = dict(rule=args.rule, method=args.calibration)
    fused, calibrations = cross_fitted_fusion(cosine, inliers, allowed, ids, folds, whole, **fusion_options)
    other_rule = "log_odds" if args.rule == "mean" else "mean"
    other, _ = cross_fitted_fusion(
        cosine, inliers, allowed, ids, folds, whole, rule=other_rule, method=args.calibration
    )

    rows = []
    search_ms = faiss_ms(emb, len(table))
    n_gallery = float(allowed.sum(axis=1).mean())
    methods = {
        "embedding": (cosine, embed_ms + search_ms),
        "keypoints (whole gallery)": (inliers, extract_ms + n_gallery * pair_ms),
        f"fused {args.rule} (whole gallery)": (fused, embed_ms + extract_ms + search_ms + n_gallery * pair_ms),
        f"fused {other_rule} (whole gallery)": (other, embed_ms + extract_ms + search_ms + n_gallery * pair_ms),
    }
    for b in SHORTLISTS:
        fused_b, _ = cross_fitted_fusion(cosine, inliers, allowed, ids, folds, b, **fusion_options)
        methods[f"fused {args.rule}, shortlist B={b}"] = (
            rerank(cosine, fused_b, allowed, b),
            embed_ms + extract_ms + search_ms + min(b, n_gallery) * pair_ms,
        )
        methods[f"keypoints, shortlist B={b}"] = (
            rerank(cosine, inliers, allowed, b),
            embed_ms + extract_ms + search_ms + min(b, n_gallery) * pair_ms,
        )
    ranks = {}
    for method, (scores, ms) in methods.items():
        metrics = retrieval_metrics(scores, ids, ids, topk=(1, 5), allowed=allowed)
        ranks[method] = first_match_ranks(scores, ids, ids, allowed=allowed)
        scored = {k: metrics[k] for k in ("top1", "top5", "mAP")}
        rows.append({"method": method, **scored, "queries": int(metrics["queries"]), "ms_per_query": ms})
    closed = pd.DataFrame(rows)

    methods = open_set_methods(table, features, config, args.rule, args.shortlist, out)
    open_set = open_set_rates(table, emb, methods, folds, args.open_set_unseen, args.seed, args.calibration)
    growth = cost_growth(emb.shape[1], embed_ms, extract_ms, pair_ms)
    write_results(
        out, table, closed, open_set, growth, ranks, cosine, inliers, fused, allowed, ids, folds, calibrations
    )
    write_examples(out / "examples", table, cosine, inliers, allowed, ids, config)
    summary = {
        "data": str(args.labels if not args.synthetic else "synthetic"),
        "pictures": len(table),
        "individuals": int(table["individual_id"].nunique()),
        "embedder": str(embedder_dir),
        "keypoints": config.to_dict(),
        "ms": {"embed_per_picture": embed_ms, "keypoints_per_picture": extract_ms, "per_pair": pair_ms},
    }
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    print((out / "results.md").read_text())
    print(f"results: {out}")


def preset(name: str) -> tuple[KeypointConfig, ScoreFusion]:
    """Return the keypoint settings and scoring of a conf/matching preset (or a .yaml file of one), over
    conf/infer.yaml's defaults."""
    path = Path(name) if name.endswith(".yaml") else ROOT / "conf" / "matching" / f"{name}.yaml"
    if not path.is_file():
        sys.exit(f"--configs: no preset {path}; choose from {sorted(p.stem for p in path.parent.glob('*.yaml'))}")
    base, chosen = OmegaConf.load(ROOT / "conf" / "infer.yaml"), OmegaConf.load(path)
    keypoints = OmegaConf.merge(base.keypoints, chosen.get("keypoints", {}))
    scoring = OmegaConf.merge(base.scoring, chosen.get("scoring", {}))
    return instantiate(keypoints), instantiate(scoring)


def gallery_sizes(text: str) -> tuple[int, ...]:
    """Parse --gallery-sizes: positive whole numbers joined by commas."""
    try:
        sizes = tuple(int(n) for n in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give picture counts joined by commas, such as 1000,10000")
    return sizes


def scaled_lnbnn_ms(
    features: list, sides: np.ndarray, fusion: ScoreFusion, config: KeypointConfig, size: int, seed: int
) -> float:
    """Return the ms one query's LNBNN search takes over a gallery of `size` pictures: these pictures' features
    repeated (descriptors jittered, so no two are equal), searched as the preset says, by 40 of the pictures."""
    rng = np.random.default_rng(seed)
    picks = np.resize(np.arange(len(features)), size)
    gallery = []
    for i in picks.tolist():
        local = local_features(features[i])
        noisy = local.descriptors + rng.normal(0, 0.01, local.descriptors.shape).astype(local.descriptors.dtype)
        gallery.append(dataclasses.replace(local, descriptors=noisy))
    ranker = LnbnnRanker(
        gallery, [str(i) for i in range(size)], [str(s) for s in sides[picks]], index_kind=fusion.lnbnn_index
    )
    queries = rng.choice(len(features), size=min(40, len(features)), replace=False)
    start = time.perf_counter()
    for q in queries.tolist():
        ranker.picture_scores(local_features(features[q]), str(sides[q]), relative=True)
    return 1000 * (time.perf_counter() - start) / len(queries)


def cached_features(table: pd.DataFrame, config: KeypointConfig, out: Path) -> tuple[list, float, int]:
    """Return every picture's features, the ms per picture their extraction took, and keypoints.npz's bytes."""
    # The pictures and their masks are part of the key: another --labels must not reuse these features.
    pictures = table.reindex(columns=["image_path", "mask"]).astype(str).to_numpy().tolist()
    key = hashlib.sha256(json.dumps([config.to_dict(), pictures], sort_keys=True).encode()).hexdigest()[:10]
    path, timing = out / f"features-{config.method}-{key}.npz", out / f"features-{config.method}-{key}.json"
    if path.is_file() and timing.is_file() and json.loads(timing.read_text())["pictures"] == len(table):
        data = path.read_bytes()
        return features_from_bytes(data)[0], json.loads(timing.read_text())["ms_per_picture"], len(data)
    start = time.perf_counter()
    features, _ = extract_local_features(table, config, progress=True)
    ms = 1000 * (time.perf_counter() - start) / max(1, len(table))
    data = features_to_bytes(features, config)
    path.write_bytes(data)
    timing.write_text(json.dumps({"pictures": len(table), "ms_per_picture": ms}))
    return features, ms, len(data)


def compare_configs(
    names: list[str],
    table: pd.DataFrame,
    emb: np.ndarray,
    embed_ms: float,
    out: Path,
    seed: int,
    calibration: str,
    backgrounds: list[str] | None = None,
    gallery_sizes: tuple[int, ...] = (1000, 10000),
) -> None:
    """Run each preset (once per `backgrounds` value, if given) on the closed set (module docstring) and write
    configs.json and configs.md."""
    ids = table["individual_id"].to_numpy(dtype=object)
    allowed = allowed_pairs(table)
    folds = individual_folds(table, seed)
    encounters = table["encounter_id"].fillna("row:" + table["annotation_id"]).to_numpy(dtype=object)
    sides = table["side"].fillna("unknown").to_numpy(dtype=object)
    cosine_all = emb @ emb.T
    gallery = Gallery.empty("bench", emb.shape[1])
    gallery.add(table, emb, list(table["annotation_id"]))
    search_ms = faiss_ms(emb, len(table))
    rows = [
        {
            "configuration": "embedding alone",
            **ranking_metrics(cosine_all, ids, allowed),
            "ms_per_query": embed_ms + search_ms,
            # The embedding's search is a few ms even over 10,000 pictures (bench/gallery_search.py).
            **{f"ms_per_query_{size}": embed_ms + search_ms for size in gallery_sizes},
            "feature_bytes_per_picture": 4 * emb.shape[1],
        }
    ]
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"), flush=True)
    members = pd.Series(np.arange(len(table))).groupby(encounters).indices
    own = [np.asarray(members[e]) for e in encounters]
    votes_cache: dict[str, tuple[np.ndarray, float]] = {}
    runs = [(name, background) for name in names for background in (backgrounds or [None])]
    plain: dict[str, list] = {}
    for name, background in runs:
        config, fusion = preset(name)
        if background is not None:
            config = dataclasses.replace(config, background=background)
        features, extract_ms, n_bytes = cached_features(table, config, out)
        # Which pictures the station model restricted: their features differ from the preset's without it.
        if config.background == "none":
            plain[name] = features
        masked_share = (
            float(np.mean([not np.array_equal(a.xy, b.xy) for a, b in zip(features, plain[name], strict=True)]))
            if name in plain
            else float("nan")
        )
        # LNBNN's votes depend on the features alone: computed once per matcher, timed once.
        key = json.dumps([config.to_dict(), fusion.lnbnn_index, fusion.lnbnn_vote], sort_keys=True)
        cached_votes = votes_cache.get(key)
        scorer = FusedScorer(
            fusion.uncalibrated(),
            emb,
            features,
            features,
            config,
            query_sides=sides,
            lnbnn=lnbnn_ranker(features, sides, index_kind=fusion.lnbnn_index, config=config)
            if fusion.uses_lnbnn
            else None,
            lnbnn_exclude=own,
            precomputed_votes=None if cached_votes is None else cached_votes[0],
            progress=True,
        )
        lnbnn_ms = 0.0
        if fusion.uses_lnbnn:
            if cached_votes is None:
                start = time.perf_counter()
                votes_cache[key] = (scorer.lnbnn_votes(), 1000 * (time.perf_counter() - start) / len(table))
            lnbnn_ms = votes_cache[key][1]
        depth = fusion.shortlist if fusion.reranks else 50
        cosine, shortlisted = shortlist(
            gallery, emb, sides, scorer, depth, lambda found: encounters[found] == encounters[:, None]
        )
        start = time.perf_counter()
        inliers, votes = scorer.raw_scores(shortlisted)
        pair_ms = 1000 * (time.perf_counter() - start) / len(table)
        same = (shortlisted >= 0) & (ids[np.clip(shortlisted, 0, None)] == ids[:, None])
        fused = np.full(shortlisted.shape, -np.inf)
        for fold in (0, 1):
            fit = ((folds != fold)[:, None]) & (shortlisted >= 0)
            fitted = fit_fusion(
                fusion,
                cosine[fit],
                None if inliers is None else inliers[fit],
                None if votes is None else votes[fit],
                same[fit],
                method=calibration,  # type: ignore[arg-type]
            )
            inside = folds == fold
            fused[inside] = fitted.combine(
                cosine[inside],
                None if inliers is None else inliers[inside],
                None if votes is None else votes[inside],
            )
        # Shortlisted pictures by their fused score, every other one after them by the embedding.
        lift = np.nanmax(np.abs(cosine_all)) + 2.0
        scores = cosine_all - 2 * lift
        valid = shortlisted >= 0
        q, g = np.nonzero(valid)
        scores[q, shortlisted[q, g]] = fused[q, g]
        width = float(valid.sum(axis=1).mean())
        lnbnn_at = {
            size: scaled_lnbnn_ms(features, sides, fusion, config, size, seed) if fusion.uses_lnbnn else 0.0
            for size in gallery_sizes
        }
        ms = embed_ms + search_ms + extract_ms + lnbnn_ms + pair_ms
        rows.append(
            {
                "configuration": f"{Path(name).stem}: {config.method} {config.max_features}, {fusion.method}, "
                f"{fusion.ranker} B={fusion.shortlist}, LNBNN {fusion.lnbnn_index}"
                + (f", background {config.background}" if backgrounds else ""),
                **ranking_metrics(scores, ids, allowed),
                "ms_per_query": ms,
                **{
                    f"ms_per_query_{size}": embed_ms + search_ms + extract_ms + lnbnn + pair_ms
                    for size, lnbnn in lnbnn_at.items()
                },
                "feature_bytes_per_picture": n_bytes / max(1, len(table)),
                "shortlist_width": width,
                "ms_extract": extract_ms,
                "ms_lnbnn": lnbnn_ms,
                "ms_pairs": pair_ms,
                **({"masked_share": masked_share} if backgrounds else {}),
            }
        )
        print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"), flush=True)
    table_out = pd.DataFrame(rows)
    (out / "configs.json").write_text(json.dumps(table_out.to_dict("records"), indent=2))
    header = (
        f"Closed set, {len(table)} pictures of {len(set(ids))} individuals, same side, same-encounter pictures left "
        "out; ms_per_query_<N>: with LNBNN timed over a gallery of N pictures (these pictures' features, repeated):"
    )
    (out / "configs.md").write_text(header + "\n" + table_out.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(f"results: {out / 'configs.md'}")


def ranking_metrics(scores: np.ndarray, ids: np.ndarray, allowed: np.ndarray) -> dict[str, float]:
    """Return top-1, top-5, mAP and balanced top-1 (mean over individuals of their queries' top-1)."""
    metrics = retrieval_metrics(scores, ids, ids, topk=(1, 5), allowed=allowed)
    ranks = first_match_ranks(scores, ids, ids, allowed=allowed)
    asked = ranks > 0
    balanced = pd.Series(ranks[asked] == 1).groupby(ids[asked]).mean().mean()
    return {
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "mAP": metrics["mAP"],
        "balanced_top1": float(balanced),
        "queries": int(asked.sum()),
    }


def prepare(args: argparse.Namespace, out: Path) -> tuple[pd.DataFrame, Path]:
    """Return the evaluation catalogue (individuals the embedder never saw) and the embedder folder."""
    data = (
        ["data=synthetic", f"data.source.config.n_individuals={args.synthetic_individuals}"]
        if args.synthetic
        else [
            "data=labels_csv",
            f"data.source.path={args.labels.resolve()}",
        ]
    )
    if args.untrained:
        torch.manual_seed(args.seed)
        table = load_table(args)
        folder = export_embedder(create_embedder("resnet18", 128, img_size=128), out / "untrained-embedder")
        return table, folder
    embedder_dir = args.embedder
    if embedder_dir is None:
        run_dir = out / "train"
        experiment = "synthetic" if args.synthetic else "nyala"
        command = [
            sys.executable,
            "train.py",
            f"experiment={experiment}",
            *data,
            "split=disjoint",
            f"split.test_fraction={args.heldout}",
            f"trainer.max_epochs={args.epochs}",
            f"seed={args.seed}",
            "logger=csv",
            f"hydra.run.dir={run_dir}",
        ]
        print("training:", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
        embedder_dir = run_dir / "embedder"
    config = OmegaConf.load(embedder_dir.parent / "config.yaml")
    if config.split.method != "disjoint":
        sys.exit(f"{embedder_dir}: trained with split={config.split.method}; the benchmark needs split=disjoint")
    trained_on = load_source(instantiate(config.data.source))[0]
    held = split_catalogue(trained_on, "disjoint", test_fraction=config.split.test_fraction, seed=config.split.seed)
    seen = set(trained_on.loc[(held == "train").to_numpy(), "individual_id"].astype(str))
    # The pictures evaluated are --labels' (or the synthetic set's), so columns the training source lacks (a
    # mask) count; only individuals the embedder never saw are kept.
    table = load_table(args)
    unseen = ~table["individual_id"].astype(str).isin(seen).to_numpy()
    if not unseen.any():
        sys.exit(
            f"{embedder_dir}: trained on every individual of the pictures given; train with split=disjoint on them"
        )
    return table[unseen].reset_index(drop=True), embedder_dir


def load_table(args: argparse.Namespace) -> pd.DataFrame:
    """Return the whole catalogue (the untrained smoke run evaluates on every individual)."""
    if args.synthetic:
        from reid.synthetic import SyntheticConfig, ensure_dataset

        path = ensure_dataset(
            ROOT / "data" / f"synthetic-{args.synthetic_individuals}",
            SyntheticConfig(n_individuals=args.synthetic_individuals),
        )
        return load_source(path)[0]
    from reid.importers import import_labels_csv

    return load_source(import_labels_csv(args.labels))[0]


def allowed_pairs(table: pd.DataFrame) -> np.ndarray:
    """Return (N, N) bool: which pictures a query is compared with (its side, not itself, not its encounter)."""
    sides = table["side"].astype(str).to_numpy()
    encounters = table["encounter_id"].fillna("row:" + pd.Series(table.index.astype(str))).to_numpy(dtype=object)
    same_side = (sides[:, None] == sides[None, :]) | (sides[:, None] == "unknown") | (sides[None, :] == "unknown")
    return same_side & (encounters[:, None] != encounters[None, :])


def all_pair_inliers(features: list, allowed: np.ndarray, config: KeypointConfig) -> tuple[np.ndarray, float]:
    """Return the (N, N) inlier counts of allowed pairs (computed once per unordered pair) and the ms per pair."""
    upper = np.argwhere(np.triu(allowed, 1))
    start = time.perf_counter()
    counts = score_pairs(features, features, upper, config, progress=True)
    pair_ms = 1000 * (time.perf_counter() - start) / max(1, len(upper))
    inliers = np.zeros(allowed.shape)
    inliers[upper[:, 0], upper[:, 1]] = counts
    inliers[upper[:, 1], upper[:, 0]] = counts
    return inliers, pair_ms


def individual_folds(table: pd.DataFrame, seed: int) -> np.ndarray:
    """Return (N,) fold 0 or 1 per picture: half of the individuals each."""
    individuals = np.array(sorted(table["individual_id"].unique()))
    np.random.default_rng(seed).shuffle(individuals)
    second = set(individuals[len(individuals) // 2 :])
    return table["individual_id"].isin(second).to_numpy().astype(int)


def shortlist_mask(cosine: np.ndarray, allowed: np.ndarray, b: int) -> np.ndarray:
    """Return (N, N) bool: each query's top-`b` allowed pictures by embedding."""
    ranked = np.argsort(-np.where(allowed, cosine, -np.inf), axis=1, kind="stable")[:, :b]
    mask = np.zeros_like(allowed)
    np.put_along_axis(mask, ranked, True, axis=1)
    return mask & allowed


def cross_fitted_fusion(
    cosine: np.ndarray,
    inliers: np.ndarray,
    allowed: np.ndarray,
    ids: np.ndarray,
    folds: np.ndarray,
    shortlist: int,
    *,
    rule: str,
    method: str,
) -> tuple[np.ndarray, dict]:
    """Return (N, N) fused scores, each query's row scored by calibrations fitted on the other fold's top-B pairs."""
    fused = np.zeros_like(cosine)
    same = ids[:, None] == ids[None, :]
    shortlisted = shortlist_mask(cosine, allowed, shortlist)
    calibrations = {}
    for fold in (0, 1):
        inside = folds == fold
        fit = shortlisted & inside[:, None] & inside[None, :]
        fusion = ScoreFusion(
            "fused",
            rule=rule,  # type: ignore[arg-type]
            embedding=fit_calibration(cosine[fit], same[fit], method=method),  # type: ignore[arg-type]
            keypoints=fit_calibration(inliers[fit], same[fit], method=method, log_scale=True),  # type: ignore[arg-type]
        )
        calibrations[f"fitted_on_fold{fold}"] = json.loads(fusion.to_json())
        fused[~inside] = fusion.combine(cosine[~inside], inliers[~inside])
    return fused, calibrations


def rerank(first: np.ndarray, second: np.ndarray, allowed: np.ndarray, b: int) -> np.ndarray:
    """Return scores ranking each query's top-`b` by `first` re-ordered by `second`, the rest after, by `first`."""
    shortlist = shortlist_mask(first, allowed, b)
    # Shortlisted scores are lifted above every other one; the rest keep the first ranking.
    lift = np.nanmax(np.abs(first)) + np.nanmax(np.abs(second)) + 1
    rest = first - lift
    return np.where(shortlist, second, rest)


def faiss_ms(emb: np.ndarray, n: int) -> float:
    """Return the measured ms of one exact FAISS search of one query among n gallery pictures."""
    index = EmbeddingIndex.build(emb[:n])
    start = time.perf_counter()
    for q in emb[:200]:
        index.search(q[None], 10)
    return 1000 * (time.perf_counter() - start) / min(200, len(emb))


def cost_growth(dim: int, embed_ms: float, extract_ms: float, pair_ms: float) -> pd.DataFrame:
    """Return ms per query at growing gallery sizes: search measured on random vectors, keypoints N x per-pair time."""
    rng = np.random.default_rng(0)
    rows = []
    for n in (100, 1_000, 10_000, 100_000):
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        search = faiss_ms(vectors, n)
        row = {"gallery": n, "embedding": embed_ms + search, "keypoints (whole gallery)": extract_ms + n * pair_ms}
        for b in SHORTLISTS:
            row[f"fused B={b}"] = embed_ms + extract_ms + search + min(b, n) * pair_ms
        rows.append(row)
    return pd.DataFrame(rows)


def open_set_methods(
    table: pd.DataFrame, features: list, config: KeypointConfig, rule: str, shortlist: int, out: Path
) -> list[tuple[str, KeypointConfig, list, ScoreFusion]]:
    """Return the open set's methods: the embedding, the keypoint matcher and both fused (RootSIFT over the
    embedding's shortlist of `shortlist`), and the default preset of conf/infer.yaml as `python infer.py` runs it."""
    methods: list[tuple[str, KeypointConfig, list, ScoreFusion]] = [
        (method, config, features, ScoreFusion(method, shortlist, rule))  # type: ignore[arg-type]
        for method in ("embedding", "keypoints", "fused")
    ]
    defaults = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "infer.yaml").defaults)
    assert isinstance(defaults, list)
    chosen = next((d["matching"] for d in defaults if isinstance(d, dict) and "matching" in d), None)
    if chosen:
        preset_config, preset_fusion = preset(chosen)
        preset_features = features if preset_config == config else cached_features(table, preset_config, out)[0]
        methods.append((f"default ({chosen})", preset_config, preset_features, preset_fusion))
    return methods


def preset_methods(
    names: list[str], table: pd.DataFrame, out: Path
) -> list[tuple[str, KeypointConfig, list, ScoreFusion]]:
    """Return the named presets of conf/matching/ as open-set methods, with their (cached) features."""
    methods = []
    for name in names:
        config, fusion = preset(name)
        methods.append((Path(name).stem, config, cached_features(table, config, out)[0], fusion))
    return methods


def open_set_rates(
    table: pd.DataFrame,
    emb: np.ndarray,
    methods: list[tuple[str, KeypointConfig, list, ScoreFusion]],
    folds: np.ndarray,
    unseen: float,
    seed: int,
    calibration: str,
) -> pd.DataFrame:
    """Return per score method and fold: the decisions' measured error rates beside those the calibration promised,
    and whether the count interval contains the true number of individuals, overall and per country.

    `methods` are (name, keypoint config, every picture's features, scoring). Decisions are counted per
    encounter, as the calibration counts them (an encounter of five frames is one decision, not five); the measured
    wrong-ID share comes with its exact two-sided 95 % interval, to judge whether the stated bound covers it.
    """
    rows = []
    for method, method_config, method_features, fusion in methods:
        for fold in (0, 1):
            calib, test = folds != fold, folds == fold
            calib_rows, test_rows = table[calib].reset_index(drop=True), table[test].reset_index(drop=True)
            sub = [f for f, t in zip(method_features, calib, strict=True) if t]
            try:
                thresholds, _, scoring = calibrate_thresholds(
                    calib_rows,
                    emb[calib],
                    features=sub,
                    keypoint_config=method_config,
                    fusion=fusion,
                    settings=CalibrationSettings(method=calibration, seed=seed),  # type: ignore[arg-type]
                )
            except ReidError as err:  # too few labelled individuals in this half (a smoke run): say so, go on
                rows.append({"method": method, "fold": fold, "not_calibrated": str(err).split(";")[0]})
                continue
            split = split_catalogue(test_rows, "open_set", unseen_fraction=unseen, test_fraction=0.3, seed=seed)
            ref, qry = (split == "train").to_numpy(), (split == "test").to_numpy()
            test_emb = emb[test]
            test_features = [f for f, t in zip(method_features, test, strict=True) if t]
            gallery = Gallery.empty("bench", emb.shape[1])
            gallery.add(test_rows[ref], test_emb[ref], list(test_rows.loc[ref, "annotation_id"]))
            gallery.keypoints = StoredKeypoints(
                [f for f, r in zip(test_features, ref, strict=True) if r], method_config
            )
            queries = test_rows[qry].reset_index(drop=True)
            result, _ = score_queries(
                gallery,
                queries,
                test_emb[qry],
                thresholds,
                fusion=scoring,
                query_features=[f for f, q in zip(test_features, qry, strict=True) if q],
                new_prefix="NEW",
                progress=False,
            )
            decided = result.decisions.merge(
                queries[["annotation_id", "individual_id"]], left_on="query", right_on="annotation_id"
            )
            # One decision per encounter, as calibrated.
            decided = decided.drop_duplicates("encounter_id")
            known = decided["individual_id"].isin(set(gallery.entries["individual_id"]))
            ids_given = decided["decision"] == "known"
            right = ids_given & (decided["assigned_id"] == decided["individual_id"])
            wrong = int(ids_given.sum() - right.sum())
            measured_low, measured_high = exact_interval(wrong, int(ids_given.sum()))
            promised = thresholds.rates()["wrong_id"]
            by = ("country",) if queries["country"].notna().any() else ()
            counts = decision_counts(queries, result.decisions, count_by=by, known_sides=gallery.entries)
            truth = {"all": queries["individual_id"].nunique()}
            if by:
                truth |= queries.groupby("country")["individual_id"].nunique().to_dict()
            inside = [
                truth[str(row["country"]) if by else "all"] in range(int(row["minimum"]), int(row["maximum"]) + 1)
                for _, row in counts.iterrows()
            ]
            combined = counts.iloc[0]
            rows.append(
                {
                    "method": method,
                    "fold": fold,
                    "encounters": len(decided),
                    "ids_given": int(ids_given.sum()),
                    "ids_right": int(right.sum()),
                    "wrong_id_measured": wrong / ids_given.sum() if ids_given.any() else float("nan"),
                    "measured_95_low": measured_low,
                    "measured_95_high": measured_high,
                    "wrong_id_promised": promised["rate"],
                    "wrong_id_upper_bound": promised["upper_bound"],
                    "calibration_decisions": promised["decisions"],
                    "false_new": float(((decided["decision"] == "new") & known).sum() / max(1, known.sum())),
                    "false_merge": float((ids_given & ~known).sum() / max(1, (~known).sum())),
                    "review": float((decided["decision"] == "review").mean()),
                    "count_min": int(combined["minimum"]),
                    "count_max": int(combined["maximum"]),
                    "true_individuals": truth["all"],
                    "truth_inside_every_group": all(inside),
                }
            )
    return pd.DataFrame(rows)


def exact_interval(errors: int, decisions: int) -> tuple[float, float]:
    """Return the exact (Clopper-Pearson) two-sided 95 % interval of a share seen as errors/decisions."""
    if decisions == 0:
        return 0.0, 1.0
    low = 0.0 if errors == 0 else float(beta.ppf(0.025, errors, decisions - errors + 1))
    high = 1.0 if errors == decisions else float(beta.ppf(0.975, errors + 1, decisions - errors))
    return low, high


def write_results(
    out: Path, table, closed, open_set, growth, ranks, cosine, inliers, fused, allowed, ids, folds, calibrations
) -> None:
    upper = np.triu(allowed, 1)
    same = (ids[:, None] == ids[None, :])[upper]
    np.savez_compressed(
        out / "pairs.npz",
        cosine=cosine[upper],
        inliers=inliers[upper],
        fused=fused[upper],
        same=same,
        fold=folds[np.argwhere(upper)[:, 0]],
    )
    pd.DataFrame(ranks).assign(query=table["annotation_id"]).to_csv(out / "ranks.csv", index=False)
    (out / "calibration.json").write_text(json.dumps(calibrations, indent=2))
    results = {
        "closed_set": closed.to_dict("records"),
        "open_set": open_set.to_dict("records"),
        "cost_growth_ms_per_query": growth.to_dict("records"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        "Closed set, same side, same-encounter pictures left out:",
        closed.to_markdown(index=False, floatfmt=".3f"),
        "",
        OPEN_SET_TITLE,
        open_set.to_markdown(index=False, floatfmt=".3f"),
        "",
        "Cost per query (ms) as the gallery grows (search measured; keypoints = N x measured per-pair time):",
        growth.to_markdown(index=False, floatfmt=".1f"),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def write_examples(out: Path, table, cosine, inliers, allowed, ids, config: KeypointConfig, n: int = 4) -> None:
    """Save pictures of a few pairs with their verified correspondences: the best same and different pairs."""
    out.mkdir(exist_ok=True)
    same = ids[:, None] == ids[None, :]
    scored = np.where(np.triu(allowed, 1), inliers, -1)
    picks = []
    for label, mask in (("same", same), ("different", ~same)):
        flat = np.argsort(-np.where(mask, scored, -1), axis=None)[:n]
        picks += [(label, *np.unravel_index(i, scored.shape)) for i in flat]
    rows = []
    for k, (label, a, b) in enumerate(picks):
        crops = []
        for i in (a, b):
            r = table.iloc[i]
            box = r[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].to_numpy(dtype=float)
            crops.append(read_crop(str(r["image_path"]), None if np.isnan(box).any() else box, config))
        pair, _ = extract_rows(table.iloc[[a, b]], config, progress=False)
        found = match(pair[0], pair[1], config)
        name = f"{k:02d}_{label}.jpg"
        Image.fromarray(draw_correspondences(crops[0], crops[1], found)).save(out / name, quality=85)
        rows.append(
            {
                "file": name,
                "pair": label,
                "query": table["annotation_id"].iat[a],
                "gallery": table["annotation_id"].iat[b],
                "inliers": int(found.n_inliers),
                "cosine": float(cosine[a, b]),
            }
        )
    pd.DataFrame(rows).to_csv(out / "examples.csv", index=False)


if __name__ == "__main__":
    main()
