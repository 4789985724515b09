"""Minimum-count bounds against hand-worked examples of the side rule and its exclusions."""

from __future__ import annotations

import pandas as pd

from reid.catalogue import build_catalogue
from reid.census import count_bounds, count_individuals


def _captures(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (individual, side, encounter, station, time, sex, country)."""
    records = [
        dict(
            image_path=f"/x/{n}.jpg",
            individual_id=ind,
            side=side,
            encounter_id=enc,
            station=station,
            timestamp=time,
            sex=sex,
            country=country,
        )
        for n, (ind, side, enc, station, time, sex, country) in enumerate(rows)
    ]
    table, problems = build_catalogue(records)
    assert problems == []
    return table


def _row(counts: pd.DataFrame) -> dict:
    return counts.drop(columns=["individuals"]).iloc[0].to_dict()


def test_one_sided_animals_may_pair_up() -> None:
    # B = {A}, L = {L1, L2, L3}, R = {R1}: minimum 1 + max(3, 1) = 4, maximum 1 + 3 + 1 = 5.
    table = _captures(
        [
            ("A", "left", "e1", "S1", "2021-01-01T00:00Z", None, "KZ"),
            ("A", "right", "e2", "S1", "2021-01-02T00:00Z", None, "KZ"),
            ("L1", "left", "e3", "S1", "2021-01-03T00:00Z", None, "KZ"),
            ("L2", "left", "e4", "S2", "2021-01-04T00:00Z", None, "KZ"),
            ("L3", "left", "e5", "S2", "2021-01-05T00:00Z", None, "KZ"),
            ("R1", "right", "e6", "S2", "2021-01-06T00:00Z", None, "KZ"),
        ]
    )
    counts = count_individuals(table)
    assert _row(counts) == dict(n_both=1, n_left_only=3, n_right_only=1, minimum=4, maximum=5)
    assert counts["individuals"][0] == "A;L1;L2;L3;R1"


def test_same_encounter_different_sex_and_simultaneous_sightings_exclude_pairs() -> None:
    # L = {L1, L2}, R = {R1, R2}. Without exclusions the minimum is 2.
    # L1-R1: same encounter; L1-R2: different sexes; L2-R1: same minute at different stations.
    # Only L2-R2 can be one animal, so the minimum is 4 - 1 = 3.
    table = _captures(
        [
            ("L1", "left", "e1", "S1", "2021-01-01T00:00:00Z", "female", "KZ"),
            ("R1", "right", "e1", "S1", "2021-01-01T00:00:05Z", None, "KZ"),
            ("R2", "right", "e2", "S1", "2021-02-01T00:00Z", "male", "KZ"),
            ("L2", "left", "e3", "S2", "2021-03-01T00:00:00Z", None, "KZ"),
            ("R1", "right", "e4", "S3", "2021-03-01T00:00:30Z", None, "KZ"),
        ]
    )
    assert _row(count_individuals(table)) == dict(n_both=0, n_left_only=2, n_right_only=2, minimum=3, maximum=4)
    # Without the time rule L2 could pair with R1 or R2, but L1 still pairs with neither: minimum stays 3.
    assert _row(count_individuals(table, simultaneous_s=0))["minimum"] == 3


def test_simultaneous_sightings_at_different_stations_are_two_animals() -> None:
    table = _captures(
        [
            ("L", "left", "e1", "S1", "2021-03-01T00:00:00Z", None, "KZ"),
            ("R", "right", "e2", "S2", "2021-03-01T00:04:00Z", None, "KZ"),
        ]
    )
    assert _row(count_individuals(table, simultaneous_s=300))["minimum"] == 2
    assert _row(count_individuals(table, simultaneous_s=60))["minimum"] == 1


def test_flanks_known_from_the_catalogue_make_an_animal_two_sided() -> None:
    table = _captures(
        [
            ("KZ-1", "left", "e1", "S1", "2021-01-01T00:00Z", None, "KZ"),
            ("KZ-2", "right", "e2", "S1", "2021-01-02T00:00Z", None, "KZ"),
        ]
    )
    assert _row(count_individuals(table))["minimum"] == 1
    catalogue = _captures([("KZ-1", "right", "c1", "S9", "2019-01-01T00:00Z", None, "KZ")])
    counts = count_individuals(table, known_sides=catalogue)
    assert _row(counts) == dict(n_both=1, n_left_only=0, n_right_only=1, minimum=2, maximum=2)


def test_counts_per_country_and_period() -> None:
    table = _captures(
        [
            ("A", "left", "e1", "S1", "2021-01-10T00:00Z", None, "KZ"),
            ("B", "right", "e2", "S1", "2021-01-11T00:00Z", None, "KZ"),
            ("A", "left", "e3", "T1", "2021-05-01T00:00Z", None, "TM"),
            ("C", "left", "e4", "T1", "2021-05-02T00:00Z", None, "TM"),
            ("C", "right", "e5", "T1", "2021-05-03T00:00Z", None, "TM"),
        ]
    )
    counts = count_individuals(table, by=["country"], period="QS")
    assert counts[["country", "period", "minimum", "maximum"]].values.tolist() == [
        ["KZ", "2021Q1", 1, 2],
        ["TM", "2021Q2", 2, 2],
    ]
    # Combined: A, B, C; C is two-sided, A left-only, B right-only: 1 + max(1, 1) = 2 .. 3.
    assert _row(count_individuals(table))["minimum"] == 2


def test_unknown_individuals_are_not_counted() -> None:
    table = _captures([("A", "left", "e1", "S1", "2021-01-01T00:00Z", None, "KZ")])
    extra, _ = build_catalogue([dict(image_path="/x/u.jpg", side="left")])
    counts = count_individuals(pd.concat([table, extra], ignore_index=True))
    assert _row(counts)["maximum"] == 1


def test_count_bounds_count_decided_animals_and_only_what_hard_evidence_keeps_apart() -> None:
    decided = _captures(
        [
            ("A", "left", "e1", "S1", "2021-01-01T00:00Z", "female", "KZ"),
            ("A", "right", "e2", "S1", "2021-01-02T00:00Z", "female", "KZ"),
            ("B", "left", "e3", "S2", "2021-01-03T00:00Z", None, "KZ"),
            ("C", "right", "e4", "S3", "2021-01-04T00:00Z", None, "TM"),
        ]
    )
    # Unresolved: u1 is a male seen at S4 while B was at S2 (not A: other sex; not B: elsewhere at that time; but
    # C?  nothing says no). u2 has no evidence at all. u3 is a male at S5 the moment C was at S3: not C, not A,
    # but possibly B or u1.
    unresolved = _captures(
        [
            (None, "left", "u1", "S4", "2021-01-03T00:01Z", "male", "KZ"),
            (None, "right", "u2", "S1", "2021-02-01T00:00Z", None, "KZ"),
            (None, "left", "u3", "S5", "2021-01-04T00:02Z", "male", "TM"),
        ]
    )
    unresolved["image_path"] = unresolved["image_path"].str.replace("/x/", "/card/")  # other pictures
    table = count_bounds(decided, unresolved, by=("country",))
    combined = table.iloc[0]
    # Decided: A both flanks, B left-only, C right-only, B and C may be one animal: 1 + 2 - 1 = 2. No unresolved
    # encounter is kept apart from every counted animal (u1 could be C, u3 could be B), so the minimum stays 2;
    # the maximum lets each be another animal: 3 + 3 = 6.
    assert (combined["country"], combined["minimum"], combined["maximum"]) == ("all", 2, 6)
    assert (combined["decided_individuals"], combined["awaiting_review"]) == (3, 3)
    by_country = table.iloc[1:].set_index("country")
    # KZ: A, B decided (B left-only): 2; u1 is neither A (sex) nor B (time and place): 2 + 1 = 3. At most 2 + 2.
    assert by_country.loc["KZ", ["minimum", "maximum", "awaiting_review"]].tolist() == [3, 4, 2]
    # TM: C decided; u3 was elsewhere when C was seen: 1 + 1 = 2, at most 1 + 1 = 2 (the interval is closed).
    assert by_country.loc["TM", ["minimum", "maximum", "awaiting_review"]].tolist() == [2, 2, 1]


def test_count_bounds_without_unresolved_encounters_equal_the_census() -> None:
    decided = _captures(
        [
            ("A", "left", "e1", "S1", "2021-01-01T00:00Z", None, "KZ"),
            ("B", "right", "e2", "S1", "2021-01-02T00:00Z", None, "KZ"),
        ]
    )
    bounds = count_bounds(decided, decided.iloc[0:0], by=())
    census = count_individuals(decided).iloc[0]
    assert (bounds.iloc[0]["minimum"], bounds.iloc[0]["maximum"]) == (census["minimum"], census["maximum"]) == (1, 2)
