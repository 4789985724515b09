"""Splits keep encounters whole, hold out individuals where they say so, and are reproducible."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reid.catalogue import build_catalogue
from reid.errors import ReidError
from reid.splits import split_catalogue


def _table(encounters_per_individual: list[int], frames: int = 3, seed: int = 0) -> pd.DataFrame:
    rows = []
    day = 0
    for ind, n_enc in enumerate(encounters_per_individual):
        for e in range(n_enc):
            day += 1
            for f in range(frames):
                side = "left" if (e + f) % 2 else "right"
                rows.append(
                    dict(
                        image_path=f"/x/{ind}_{e}_{f}.jpg",
                        individual_id=f"KZ-{ind:04d}",
                        side=side,
                        encounter_id=f"E{ind}-{e}",
                        timestamp=pd.Timestamp("2020-01-01", tz="UTC") + pd.Timedelta(days=day, seconds=f),
                    )
                )
    rows.append(dict(image_path="/x/unknown.jpg", side="left", encounter_id="E-unknown"))
    table, problems = build_catalogue(rows)
    assert problems == []
    return table


def _sides_of(split: pd.Series, keys: pd.Series) -> pd.Series:
    return split.groupby(keys).agg(lambda s: frozenset(s.dropna()))


def test_disjoint_split_shares_no_individual() -> None:
    table = _table([3] * 20)
    split = split_catalogue(table, "disjoint", test_fraction=0.25, seed=1)
    sides = _sides_of(split, table["individual_id"])
    assert (sides.map(len) == 1).all()
    assert (sides == frozenset({"test"})).sum() == 5


def test_open_set_split_holds_out_unseen_individuals() -> None:
    table = _table([4] * 20)
    split = split_catalogue(table, "open_set", test_fraction=0.25, unseen_fraction=0.3, seed=2)
    sides = _sides_of(split, table["individual_id"])
    unseen = sides[sides == frozenset({"test"})]
    both = sides[sides == frozenset({"train", "test"})]
    assert len(unseen) == 6 and len(both) == 14
    # Seen individuals have one of their four encounters in test.
    test_encounters = table.loc[split == "test"].groupby("individual_id")["encounter_id"].nunique()
    assert (test_encounters[both.index] == 1).all()


def test_closed_set_keeps_every_test_individual_in_train() -> None:
    table = _table([1, 2, 3, 5, 8, 10])
    split = split_catalogue(table, "closed_set", test_fraction=0.5, seed=3)
    sides = _sides_of(split, table["individual_id"])
    assert all("train" in s for s in sides)
    assert sides["KZ-0000"] == frozenset({"train"})  # a single encounter cannot be on both sides
    per_ind = table.loc[split == "test"].groupby("individual_id")["encounter_id"].nunique()
    assert per_ind.to_dict() == {"KZ-0001": 1, "KZ-0002": 2, "KZ-0003": 3, "KZ-0004": 4, "KZ-0005": 5}


def test_by_time_split_puts_later_encounters_in_test() -> None:
    table = _table([3] * 10)
    split = split_catalogue(table, "by_time", test_fraction=0.2)
    assert table.loc[split == "train", "timestamp"].max() < table.loc[split == "test", "timestamp"].min()
    assert table.loc[split == "test", "encounter_id"].nunique() == 6


def test_by_time_split_needs_timestamps() -> None:
    table = _table([2, 2])
    table.loc[0, "timestamp"] = pd.NaT
    with pytest.raises(ReidError, match="needs a timestamp"):
        split_catalogue(table, "by_time")


def test_unknown_individuals_are_left_out() -> None:
    table = _table([2, 2])
    split = split_catalogue(table, "closed_set")
    assert split[table["individual_id"].isna()].isna().all()
    assert split[table["individual_id"].notna()].notna().all()


def test_split_is_reproducible_from_its_seed() -> None:
    table = _table([3] * 30)
    a = split_catalogue(table, "open_set", seed=7)
    assert a.equals(split_catalogue(table, "open_set", seed=7))
    assert not a.equals(split_catalogue(table, "open_set", seed=8))


def test_two_animals_in_one_encounter_stay_together() -> None:
    table = _table([2] * 10)
    # Individuals 0 and 1 were photographed together: their first encounters are one event.
    table.loc[table["encounter_id"] == "E1-0", "encounter_id"] = "E0-0"
    for seed in range(10):
        split = split_catalogue(table, "disjoint", test_fraction=0.5, seed=seed)
        assert split[table["individual_id"].isin(["KZ-0000", "KZ-0001"])].nunique() == 1


@settings(max_examples=40, deadline=None)
@given(
    encounters=st.lists(st.integers(1, 6), min_size=2, max_size=15),
    method=st.sampled_from(["closed_set", "open_set", "disjoint", "by_time"]),
    test_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_no_encounter_is_on_both_sides(encounters: list[int], method: str, test_fraction: float, seed: int) -> None:
    table = _table(encounters, frames=2)
    split = split_catalogue(table, method, test_fraction=test_fraction, seed=seed)  # type: ignore[arg-type]
    sides = _sides_of(split, table["encounter_id"])
    assert (sides.map(len) <= 1).all()
