"""Decisions from scores: per-individual aggregation, encounter pooling, calibration, new-individual grouping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from reid.decisions import (
    DECISION_COLUMNS,
    MATCH_COLUMNS,
    Thresholds,
    _running_design_effects,
    calibrate,
    decide,
    design_effect,
    evaluate_thresholds,
    group_new_individuals,
    individual_scores,
    lowest_safe_score,
    pool_encounter,
    rate_upper_bound,
)
from reid.errors import ReidError


def test_individual_score_is_the_best_of_its_entries() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.5, 0.4, 0.0, 0.0]])
    ids = np.array([["A", "B", "A", "C"], ["B", "B", "", ""]])
    assert individual_scores(scores, ids) == [{"A": 0.9, "B": 0.8, "C": 0.1}, {"B": 0.5}]


def test_encounter_pooling_averages_and_fills_missing_with_the_query_floor() -> None:
    pooled = pool_encounter([{"A": 0.9, "B": 0.5}, {"A": 0.7, "C": 0.6}, {}])
    # B is missing from query 2 (floor 0.6), C from query 1 (floor 0.5).
    assert pooled == pytest.approx({"A": 0.8, "B": 0.55, "C": 0.55})
    assert pool_encounter([{}]) == {}


def test_thresholds_decide_three_ways() -> None:
    t = Thresholds(known=0.8, new=0.5)
    assert t.decide(np.array([0.9, 0.8, 0.79, 0.5, 0.49])).tolist() == ["known", "known", "review", "review", "new"]
    with pytest.raises(ReidError):
        Thresholds(known=0.4, new=0.5)


def test_calibration_controls_wrong_ids_among_the_ids_given_on_hand_made_scores() -> None:
    # Ten calibration encounters at each score.
    known_top = np.repeat([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.62, 0.55, 0.3], 10)
    known_correct = np.repeat([True] * 9 + [False], 10)
    unseen_top = np.repeat([0.72, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1], 10)
    t = calibrate(known_top, known_correct, unseen_top, max_wrong_id=0.1, max_false_merge=0.1, max_false_new=0.1)
    # From the top: 0.95 .. 0.75 are 50 right IDs; the unseen 0.72 would make 10 wrong of 60 (17 %), and no lower
    # threshold gets back under 10 % (0.62: 10 of 90, 11 %; 0.6: 20 of 100): "known" sits just above 0.72.
    assert t.known == pytest.approx(0.72) and t.known > 0.72 and t.margin == 0.0
    # 10 of 100 known queries may be called new: "new" is the lowest score above the ten lowest, 0.55.
    assert t.new == pytest.approx(0.55)
    assert (t.wrong_ids, t.known_decisions) == (0, 50)
    assert (t.false_new, t.known_queries) == (10, 100)  # the 0.3s
    assert (t.false_merges, t.unseen_queries) == (0, 100)
    assert t.reviewed == 60  # known 0.7, 0.65, 0.62, 0.55; unseen 0.72, 0.6
    rates = t.rates()
    assert rates["wrong_id"]["upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 50))  # 0 of 50: 5.8 %
    assert not any("wrong id" in note for note in t.notes)  # 50 decisions support a 10 % target


def test_a_threshold_that_only_looks_safe_on_a_few_decisions_is_not_chosen() -> None:
    # Three right IDs and nothing else above the best impostor: 0 wrong of 3 is no evidence of a 10 % error rate
    # (its median-unbiased estimate is 1 - 0.5 ** (1 / 3) = 21 %), so nothing is decided known.
    unseen = np.array([0.7, *np.full(29, 0.2)])
    few = calibrate(np.array([0.9, 0.85, 0.8]), np.ones(3, bool), unseen, max_wrong_id=0.1)
    assert not few.decides_known
    # With 30 right IDs above it, the same picture supports the target (0 of 30: 2.3 %).
    many = calibrate(np.linspace(0.8, 0.9, 30), np.ones(30, bool), unseen, max_wrong_id=0.1)
    assert many.decides_known and many.known == pytest.approx(0.7) and many.wrong_ids == 0


def test_no_id_is_given_whose_own_probability_of_being_wrong_is_above_the_target() -> None:
    # 60 sure right IDs at 0.999 let 3 of 63 wrong at 0.9 through on average (4.8 % < 5 %), but an ID scored
    # 0.9 is itself wrong one time in ten: with calibrated scores, the threshold is at least 1 - 0.05.
    known_top = np.array([*np.full(60, 0.999), 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    known_correct = np.array([True] * 60 + [False, True, True, False, True, False])
    unseen_top = np.full(60, 0.3)
    average = calibrate(known_top, known_correct, unseen_top, max_wrong_id=0.1, max_false_merge=0.1)
    assert average.known <= 0.9 and (average.wrong_ids, average.known_decisions) == (3, 66)
    floored = calibrate(known_top, known_correct, unseen_top, max_wrong_id=0.1, max_false_merge=0.1, lowest_known=0.95)
    assert floored.known == pytest.approx(0.95) and (floored.wrong_ids, floored.known_decisions) == (0, 60)
    assert floored.decide(np.array([0.93, 0.96])).tolist()[1] == "known"


def test_a_margin_over_the_runner_up_is_used_where_it_lets_more_right_ids_through() -> None:
    # Two confident wrong IDs score high but barely lead their runner-up; the right ones lead clearly.
    known_top = np.repeat([0.95, 0.9, 0.88, 0.85, 0.8], 10)
    known_correct = np.repeat([False, True, False, True, True], 10)
    known_margin = np.repeat([0.01, 0.3, 0.02, 0.25, 0.2], 10)
    unseen_top, unseen_margin = np.repeat([0.5, 0.4], 10), np.repeat([0.05, 0.1], 10)
    plain = calibrate(known_top, known_correct, unseen_top, max_wrong_id=0.1, max_false_merge=0.1)
    assert not plain.decides_known and "nothing is decided known" in plain.notes[0]
    t = calibrate(
        known_top,
        known_correct,
        unseen_top,
        known_margin=known_margin,
        unseen_margin=unseen_margin,
        max_wrong_id=0.1,
        max_false_merge=0.1,
    )
    assert t.margin == pytest.approx(0.2) and t.known == pytest.approx(0.8)
    assert (t.wrong_ids, t.known_decisions) == (0, 30)
    assert t.decide(np.array([0.95, 0.95]), np.array([0.01, 0.5])).tolist() == ["review", "known"]


def test_no_threshold_meeting_the_targets_decides_nothing_known() -> None:
    t = calibrate(np.array([0.5, 0.6]), np.array([True, True]), np.array([0.9, 0.95]), max_false_merge=0.0)
    assert not t.decides_known and t.decide(np.array([1e9])).tolist() == ["review"]
    assert Thresholds.from_json(t.to_json()) == t  # an infinite threshold survives JSON


@pytest.mark.parametrize(("errors", "decisions"), [(0, 1), (0, 44), (1, 44), (3, 50), (20, 350), (49, 50)])
def test_error_bounds_are_exact_clopper_pearson(errors: int, decisions: int) -> None:
    # The upper bound p solves P(X <= errors | decisions, p) = 5 %: found here by bisection on the binomial CDF.
    low, high = errors / decisions, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if binom.cdf(errors, decisions, mid) > 0.05 else (low, mid)
    assert rate_upper_bound(errors, decisions) == pytest.approx(high, abs=1e-9)
    assert rate_upper_bound(0, 0) == 1.0 and rate_upper_bound(5, 5) == 1.0


@pytest.mark.parametrize(
    ("errors_per_group", "expected"),
    [
        # Four groups of four decisions. One group all wrong: the between-groups variance is 4/3 * (3^2 + 3 * 1^2)
        # / 16^2 = 0.0625 against the binomial 0.25 * 0.75 / 16 = 0.0117: 5.3, capped at the group size, 4.
        ([4, 0, 0, 0], 4.0),
        # 2, 1, 0, 0 wrong: 4/3 * (1.25^2 + 0.25^2 + 2 * 0.75^2) / 256 = 0.014323 against 3/16 * 13/16 / 16.
        ([2, 1, 0, 0], (4 / 3 * 2.75 / 256) / (3 / 16 * 13 / 16 / 16)),
        ([1, 1, 1, 1], 1.0),  # one wrong in each group: no clustering (a ratio of 0 reads 1)
        ([0, 0, 0, 0], 1.0),  # nothing to estimate from
    ],
)
def test_the_design_effect_of_decisions_grouped_by_individual(errors_per_group: list[int], expected: float) -> None:
    errors = np.concatenate([np.arange(4) < k for k in errors_per_group])
    groups = np.repeat(["A", "B", "C", "D"], 4)
    assert design_effect(errors, groups) == pytest.approx(expected, rel=1e-9)


def test_decisions_that_err_together_count_as_fewer_in_the_bound() -> None:
    # 4 errors in 100 decisions that count as 50 independent ones: the bound of 2 errors in 50, exactly.
    low, high = 2 / 50, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if binom.cdf(2, 50, mid) > 0.05 else (low, mid)
    assert rate_upper_bound(4, 100, design_effect=2.0) == pytest.approx(high, abs=1e-9)
    assert rate_upper_bound(4, 100, design_effect=2.0) > rate_upper_bound(4, 100)


def test_calibration_is_more_careful_when_its_errors_come_from_one_animal() -> None:
    # 80 right IDs of 40 animals (two encounters each) at 0.80 .. 0.99; 100 unseen encounters of 50 animals, six
    # of them merged at 0.90 .. 0.97. Made by six animals, 6 merges of 100 meet a 10 % target; made by one animal
    # (its station's background, say), they count as about one error: the data cannot show a rate below 10 %.
    known_top = np.linspace(0.8, 0.99, 80)
    known_ids = np.repeat([f"K{i}" for i in range(40)], 2)
    unseen_top = np.array([*np.linspace(0.9, 0.97, 6), *np.full(94, 0.3)])
    others = np.repeat([f"U{i}" for i in range(50)], 2)
    merged_first = [0, 2, 4, 6, 8, 10]  # one encounter of each of six animals
    spread = np.array([*others[merged_first], *np.delete(others, merged_first)])
    together = np.array([*["X"] * 6, *spread[6:]])
    options = dict(max_wrong_id=0.1, max_false_merge=0.1, max_false_new=0.1)
    plain = calibrate(known_top, np.ones(80, bool), unseen_top, **options)
    apart = calibrate(
        known_top, np.ones(80, bool), unseen_top, known_individuals=known_ids, unseen_individuals=spread, **options
    )
    clustered = calibrate(
        known_top, np.ones(80, bool), unseen_top, known_individuals=known_ids, unseen_individuals=together, **options
    )
    assert plain.false_merges == apart.false_merges == 6 and apart.design_effects["false_merge"] == 1.0
    assert apart.known == plain.known == pytest.approx(0.3)
    # One animal's six merges: no threshold that takes any of them; the IDs above them remain.
    assert clustered.false_merges == 0 and clustered.known > 0.97 and clustered.decides_known
    # At a threshold that took the six merges of one animal, the 100 unseen decisions count as 17 independent ones.
    at_plain = evaluate_thresholds(
        plain.known,
        plain.new,
        known_top,
        np.ones(80, bool),
        unseen_top,
        known_individuals=known_ids,
        unseen_individuals=together,
    )
    merged = at_plain.rates()["false_merge"]
    assert merged["design_effect"] == pytest.approx(design_effect(np.arange(100) < 6, together))
    assert merged["upper_bound"] == pytest.approx(rate_upper_bound(6, 100, design_effect=merged["design_effect"]))
    assert merged["upper_bound"] > plain.rates()["false_merge"]["upper_bound"]
    assert "false merge 6.0% (6/100, as 17 independent" in at_plain.summary()
    assert Thresholds.from_json(at_plain.to_json()) == at_plain


def test_running_design_effects_agree_with_the_design_effect_of_each_prefix() -> None:
    rng = np.random.default_rng(0)
    names, errors = rng.choice(list("ABCDEFG"), 60), rng.random(60) < 0.2
    expected = [design_effect(errors[: k + 1], names[: k + 1]) for k in range(60)]
    np.testing.assert_allclose(_running_design_effects(names, errors), expected, rtol=1e-9)
    # A fixed population of decisions whose errors arrive one by one (merges as the threshold falls).
    population, merged = rng.choice(list("ABCDEFGH"), 80), rng.random(80) < 0.15
    order = rng.permutation(80)
    expected = [
        design_effect(np.isin(np.arange(80), order[: k + 1][merged[order][: k + 1]]), population) for k in range(80)
    ]
    np.testing.assert_allclose(
        _running_design_effects(population[order], merged[order], population=population), expected, rtol=1e-9
    )


def test_thresholds_round_trip_through_json() -> None:
    t = Thresholds(known=0.8, new=0.5, margin=0.1, wrong_ids=2, known_decisions=40, notes=("a note",))
    assert Thresholds.from_json(t.to_json()) == t
    with pytest.raises(ReidError, match="run calibration again"):
        Thresholds.from_json("{")
    with pytest.raises(ReidError, match="design_effects is list"):
        Thresholds.from_json('{"known": 0.8, "new": 0.5, "design_effects": [2.0]}')
    with pytest.raises(ReidError, match="calibrate` again"):
        Thresholds.from_json('{"known": 0.8, "new": 0.5, "false_merge_rate": 0.02}')


def _queries(encounters: list[str], sides: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "annotation_id": [f"q{i}" for i in range(len(encounters))],
            "image_path": [f"/cards/q{i}.jpg" for i in range(len(encounters))],
            "side": sides,
            "encounter_id": encounters,
        }
    )


def test_decide_pools_an_encounter_and_ranks_individuals_from_scored_rows() -> None:
    # Gallery rows: 0, 1 = A; 2 = B; 3 = C. Candidates arrive unsorted; -1 marks a missing neighbour.
    individuals = np.array(["A", "A", "B", "C"], dtype=object)
    annotations = np.array(["g0", "g1", "g2", "g3"], dtype=object)
    rows = np.array([[2, 0, 1], [1, 3, -1], [3, 2, 0]])
    scores = np.array([[0.6, 0.9, 0.7], [0.8, 0.3, -np.inf], [0.2, 0.1, 0.15]])
    queries = _queries(["e1", "e1", "e2"], ["left", "left", "right"])
    result = decide(queries, scores, rows, individuals, annotations, Thresholds(known=0.8, new=0.4), top_n=2)
    # e1: query 0 has A 0.9, B 0.6; query 1 has A 0.8, C 0.3 (floor 0.3 for B, floor 0.6 for C in query 0).
    # Pooled: A 0.85, B (0.6 + 0.3) / 2 = 0.45, C (0.6 + 0.3) / 2 = 0.45. e2: C 0.2, A 0.15, B 0.1 -> new.
    decisions = result.decisions.set_index("query")
    assert decisions.loc["q0", "decision"] == "known" and decisions.loc["q0", "assigned_id"] == "A"
    assert decisions.loc["q1", "top_score"] == pytest.approx(0.85)
    assert decisions.loc["q2", "decision"] == "new" and decisions.loc["q2", "assigned_id"] == "NEW-0001"
    first = result.matches[result.matches["query"] == "q0"]
    assert first["individual_id"].tolist() == ["A", "B"]  # B before C: equal scores break by name
    assert first["gallery_annotation"].tolist() == ["g0", "g2"]  # the picture behind each candidate's best score
    assert list(result.matches.columns) == list(MATCH_COLUMNS)
    assert list(result.decisions.columns) == list(DECISION_COLUMNS)
    assert str(result.matches["rank"].dtype) == "Int64"


def test_decide_groups_new_encounters_with_the_similarity_it_is_given() -> None:
    queries = _queries(["e1", "e2", "e3"], ["left", "left", "right"])
    empty_rows = np.full((3, 1), -1)
    empty_scores = np.full((3, 1), -np.inf)
    same = {(0, 1), (1, 0), (0, 2), (2, 0)}  # e3 "matches" e1, but it is the other flank: never grouped

    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.array([[0.95 if (i, j) in same or i == j else 0.0 for j in b] for i in a])

    thresholds = Thresholds(known=0.9, new=0.5)
    args = (queries, empty_scores, empty_rows, np.array([], dtype=object), np.array([], dtype=object), thresholds)
    grouped = decide(*args, similarity=similarity).decisions["assigned_id"].tolist()
    assert grouped[0] == grouped[1] != grouped[2]
    alone = decide(*args).decisions["assigned_id"].tolist()
    assert len(set(alone)) == 3


def test_new_encounters_group_from_the_calibrated_grouping_threshold() -> None:
    queries = _queries(["e1", "e2"], ["left", "left"])
    args = (queries, np.full((2, 1), -np.inf), np.full((2, 1), -1), np.array([], object), np.array([], object))

    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.array([[1.0 if i == j else 0.8 for j in b] for i in a])

    strict = decide(*args, Thresholds(known=0.9, new=0.5), similarity=similarity).decisions
    calibrated = decide(*args, Thresholds(known=0.9, new=0.5, group=0.75), similarity=similarity).decisions
    assert strict["assigned_id"].nunique() == 2  # 0.8 would not match as known
    assert calibrated["assigned_id"].nunique() == 1  # but reaches the grouping threshold
    assert Thresholds.from_json(Thresholds(0.9, 0.5, group=float("inf")).to_json()).group == float("inf")


def test_the_grouping_threshold_keeps_pairs_of_different_animals_within_target() -> None:
    # Pairs from the top: 20 same-animal pairs at 0.99 .. 0.80, then one different at 0.79, 20 same at 0.78 .. 0.59,
    # then ten different at 0.5. With the one wrong pair, 1 of 41 (median-unbiased 4.1 %) meets 5 %;
    # the next ten wrong ones do not: the threshold sits just above 0.5.
    scores = np.array([*np.linspace(0.99, 0.80, 20), 0.79, *np.linspace(0.78, 0.59, 20), *np.full(10, 0.5)])
    wrong = np.array([False] * 20 + [True] + [False] * 20 + [True] * 10)
    threshold = lowest_safe_score(scores, wrong, 0.05)
    assert threshold is not None and 0.5 < threshold <= 0.59
    # At 4 %, 1 of 41 (4.1 %) is too many, 0 of 20 (3.4 %) is not: the threshold sits just above the wrong 0.79.
    stricter = lowest_safe_score(scores, wrong, 0.04)
    assert stricter is not None and 0.79 < stricter <= 0.80
    assert lowest_safe_score(np.array([0.9]), np.array([True]), 0.05) is None


def test_new_captures_group_when_they_would_match_each_other() -> None:
    sim = np.array(
        [
            [1.0, 0.9, 0.2, 0.1],
            [0.9, 1.0, 0.3, 0.2],
            [0.2, 0.3, 1.0, 0.85],
            [0.1, 0.2, 0.85, 1.0],
        ]
    )
    labels = group_new_individuals(sim, threshold=0.8)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]
    assert len(set(group_new_individuals(sim, threshold=0.95))) == 4
    assert len(set(group_new_individuals(sim, threshold=0.1))) == 1
    assert group_new_individuals(np.zeros((0, 0)), 0.5).tolist() == []
