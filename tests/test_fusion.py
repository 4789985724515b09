"""Score calibration and fusion: monotone, saved and loaded exactly, and re-ranking consistent with the matcher alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import logit

from reid.errors import ReidError
from reid.fusion import Calibration, FusedScorer, ScoreFusion, fit_calibration, fit_fusion
from reid.gallery import Gallery
from reid.keypoints import KeypointConfig, extract_rows, score_pairs


def _pairs(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    same = rng.random(n) < 0.3
    scores = np.where(same, rng.normal(0.7, 0.1, n), rng.normal(0.4, 0.1, n))
    return scores, same


@pytest.mark.parametrize("method", ["logistic", "isotonic"])
def test_calibration_is_monotone_and_separates_same_from_different(method: str) -> None:
    scores, same = _pairs(np.random.default_rng(0))
    calibration = fit_calibration(scores, same, method=method)  # type: ignore[arg-type]
    grid = np.linspace(-0.5, 1.5, 500)
    probs = calibration(grid)
    assert np.all(np.diff(probs) >= 0)
    assert calibration(np.array([0.8]))[0] > 0.9 > 0.1 > calibration(np.array([0.3]))[0]
    floor = 1 / (min(calibration.n_same, calibration.n_different) + 2)
    assert probs.min() == pytest.approx(floor) and probs.max() == pytest.approx(1 - floor)  # never certain
    if method == "logistic":
        inside = (probs > floor) & (probs < 1 - floor)
        assert np.all(np.diff(probs[inside]) > 0)  # strictly: it never creates ties


def test_count_calibration_works_on_log_counts_and_missing_scores_give_zero() -> None:
    rng = np.random.default_rng(1)
    same = rng.random(300) < 0.4
    inliers = np.where(same, rng.poisson(30, 300), rng.poisson(4, 300)).astype(float)
    calibration = fit_calibration(inliers, same, log_scale=True)
    assert calibration(np.array([40.0]))[0] > 0.95 and calibration(np.array([2.0]))[0] < 0.1
    assert calibration(np.array([-np.inf, np.nan])).tolist() == [0.0, 0.0]


def test_calibration_refuses_too_few_pairs_and_flattens_a_score_that_does_not_rise(caplog) -> None:
    with pytest.raises(ReidError, match="at least 2 same-individual"):
        fit_calibration(np.array([0.9, 0.1, 0.2]), np.array([True, False, False]))
    flat = fit_calibration(np.array([0.1, 0.2, 0.8, 0.9]), np.array([True, True, False, False]), method="logistic")
    assert "does not rise" in caplog.text
    # Uninformative: every score gets the balanced prior, so in a fusion the other matcher decides alone.
    np.testing.assert_allclose(flat(np.array([0.0, 0.5, 1.0])), 0.5)


def test_fusion_saved_and_loaded_gives_identical_scores() -> None:
    rng = np.random.default_rng(2)
    cosine, same = _pairs(rng)
    inliers = np.where(same, rng.poisson(25, len(same)), rng.poisson(5, len(same))).astype(float)
    for method in ("logistic", "isotonic"):
        fusion = ScoreFusion(
            "fused",
            shortlist=20,
            embedding=fit_calibration(cosine, same, method=method),  # type: ignore[arg-type]
            keypoints=fit_calibration(inliers, same, method=method, log_scale=True),  # type: ignore[arg-type]
        )
        loaded = ScoreFusion.from_json(fusion.to_json())
        assert loaded == fusion
        np.testing.assert_array_equal(loaded.combine(cosine, inliers), fusion.combine(cosine, inliers))
    with pytest.raises(ReidError, match="score-fusion"):
        ScoreFusion.from_json('{"method": "fused"}')
    with pytest.raises(ReidError, match="not one of"):
        ScoreFusion("magic")  # type: ignore[arg-type]


def test_a_fusion_stored_before_relative_lnbnn_votes_keeps_the_raw_votes_it_was_calibrated_on() -> None:
    fresh = ScoreFusion("embedding+lnbnn", shortlist=10, ranker="union")
    assert fresh.lnbnn_vote == "relative"
    assert ScoreFusion.from_json(fresh.to_json()).lnbnn_vote == "relative"
    stored = json.loads(fresh.to_json())
    del stored["lnbnn_vote"]  # as leopard-reid 0.3 wrote it
    assert ScoreFusion.from_json(json.dumps(stored)).lnbnn_vote == "raw"
    with pytest.raises(ReidError, match=r"scoring\.lnbnn_vote='scaled' is not one of relative, raw"):
        ScoreFusion("lnbnn", lnbnn_vote="scaled")  # type: ignore[arg-type]


def test_uncalibrated_keeps_every_setting_and_drops_what_was_fitted() -> None:
    rng = np.random.default_rng(4)
    cosine, same = _pairs(rng)
    settings = ScoreFusion("embedding+lnbnn", 30, "stacked", "union", "ivf", "raw")
    fitted = fit_fusion(settings, cosine, None, cosine * 10, same)
    assert fitted.calibrated and fitted.lnbnn_vote == "raw"
    assert fitted.uncalibrated() == settings


def test_fused_score_is_the_mean_of_the_calibrated_probabilities() -> None:
    rng = np.random.default_rng(3)
    cosine, same = _pairs(rng)
    inliers = np.where(same, rng.poisson(25, len(same)), rng.poisson(5, len(same))).astype(float)
    emb, kp = fit_calibration(cosine, same), fit_calibration(inliers, same, log_scale=True)
    fused = ScoreFusion("fused", embedding=emb, keypoints=kp, rule="mean").combine(cosine, inliers)
    np.testing.assert_allclose(fused, (emb(cosine) + kp(inliers)) / 2)

    # Separation of same from different pairs is at least that of the better single score here.
    def auc(scores: np.ndarray) -> float:
        return float((scores[same][:, None] > scores[~same][None, :]).mean())

    assert auc(fused) >= max(auc(cosine), auc(inliers)) - 0.01


def test_shortlist_as_large_as_the_gallery_ranks_like_the_matcher_alone(flank_catalogue) -> None:
    table = flank_catalogue[flank_catalogue["side"] == "left"].reset_index(drop=True)
    gallery_rows, query_rows = np.arange(len(table)) % 3 != 0, np.arange(len(table)) % 3 == 0
    config = KeypointConfig(max_side_px=200)
    features, problems = extract_rows(table, config, progress=False)
    assert problems == []
    rng = np.random.default_rng(4)
    embeddings = rng.standard_normal((len(table), 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    gallery = Gallery.empty("test", 16)
    gallery.add(table[gallery_rows], embeddings[gallery_rows], list(table.loc[gallery_rows, "annotation_id"]))
    query_features = [f for f, q in zip(features, query_rows, strict=True) if q]
    gallery_features = [f for f, g in zip(features, gallery_rows, strict=True) if g]
    n = len(gallery)
    scorer = FusedScorer(
        ScoreFusion("keypoints", shortlist=n),
        embeddings[query_rows],
        query_features,
        gallery_features,
        config,
    )
    cosine, rows = gallery.search(embeddings[query_rows], ["left"] * int(query_rows.sum()), n)
    rescored = scorer.rescore(cosine, rows)
    pairs = np.array([(q, g) for q in range(int(query_rows.sum())) for g in range(n)])
    alone = score_pairs(query_features, gallery_features, pairs, config).reshape(-1, n)
    for q in range(len(rows)):
        # Every gallery entry is re-scored, with exactly the matcher's own score for it...
        np.testing.assert_array_equal(rescored[q][np.argsort(rows[q])], alone[q])
        # ... so the re-ranked order is the matcher's order (ties aside).
        reranked = rows[q][np.argsort(-rescored[q], kind="stable")]
        assert np.all(np.diff(alone[q][reranked]) <= 0)
    assert alone.max() > 10  # the queries do find their own flanks


def test_log_odds_rule_adds_the_evidence_and_ignores_an_uninformative_matcher() -> None:
    identity = Calibration("logistic", coef=1.0, intercept=0.0, n_same=10**6, n_different=10**6)  # P = sigmoid(score)
    cosine, inliers = np.array([np.log(9.0), 0.0]), np.array([0.0, np.log(4.0)])  # P 0.9 / 0.5 and 0.5 / 0.8
    mean = ScoreFusion("fused", embedding=identity, keypoints=identity, rule="mean").combine(cosine, inliers)
    log_odds = ScoreFusion("fused", embedding=identity, keypoints=identity, rule="log_odds").combine(cosine, inliers)
    np.testing.assert_allclose(mean, [0.7, 0.65])
    # Odds 9 x 1 = 9 -> 0.9; odds 1 x 4 = 4 -> 0.8: a 50/50 matcher changes nothing.
    np.testing.assert_allclose(log_odds, [0.9, 0.8])
    with pytest.raises(ReidError, match="fusion rule"):
        ScoreFusion("fused", rule="max")  # type: ignore[arg-type]


def _scored_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return cosine similarities that carry no identity, inlier counts that do, and whether each pair is the same."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.3
    inliers = np.where(same, rng.poisson(12, n), rng.poisson(3, n)).astype(float)
    return rng.normal(0.0, 0.2, n), inliers, same


def test_stacked_fusion_counts_two_copies_of_one_score_once() -> None:
    # LNBNN votes that are the keypoint scores again: log_odds counts the same evidence twice, stacked once.
    cosine, inliers, same = _scored_pairs(4000, 0)
    copies = dict(method="logistic")
    naive = fit_fusion(ScoreFusion("keypoints+lnbnn", rule="log_odds"), cosine, inliers, inliers, same, **copies)
    stacked = fit_fusion(ScoreFusion("keypoints+lnbnn", rule="stacked"), cosine, inliers, inliers, same, **copies)
    assert len(stacked.weights) == 2 and sum(stacked.weights) == pytest.approx(1.0, abs=0.05)
    alone = stacked.keypoints(inliers)  # the calibrated probability of one copy
    np.testing.assert_allclose(stacked.combine(cosine, inliers, inliers), alone, atol=0.02)
    doubled = naive.combine(cosine, inliers, inliers)
    assert np.abs(logit(doubled) - 2 * logit(np.clip(alone, 1e-6, 1 - 1e-6))).max() < 1e-6
    again = ScoreFusion.from_json(stacked.to_json())
    np.testing.assert_allclose(again.combine(cosine, inliers, inliers), stacked.combine(cosine, inliers, inliers))


def test_stacked_fusion_gives_no_negative_weight_and_needs_its_weights() -> None:
    cosine, inliers, same = _scored_pairs(3000, 1)
    # An embedding that falls as identity rises (a misfit model): its calibration is flat, its weight not below 0.
    backwards = np.where(same, -1.0, 1.0) * np.abs(cosine)
    fitted = fit_fusion(ScoreFusion("embedding+keypoints", rule="stacked"), backwards, inliers, None, same)
    assert all(w >= 0 for w in fitted.weights) and fitted.weights[1] > 0.5
    assert fitted.calibrated and not ScoreFusion("embedding+keypoints", rule="stacked").calibrated
    unweighted = ScoreFusion(
        "embedding+keypoints", rule="stacked", embedding=fitted.embedding, keypoints=fitted.keypoints
    )
    with pytest.raises(ReidError, match="stacked needs its weights"):
        unweighted.combine(cosine, inliers)
