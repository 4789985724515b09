"""Leakage-free splits of a catalogue into a reference side and a test side.

Every split keeps each encounter whole (images of one burst are near
duplicates), is reproducible from its seed, and leaves rows of unknown
individuals out (they cannot be scored). Splits compose: a disjoint split gives
training and evaluation individuals; a closed-set split of the evaluation part
gives its gallery and queries.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from reid.errors import ReidError

SplitMethod = Literal["closed_set", "open_set", "disjoint", "by_time"]
TRAIN, TEST = "train", "test"


def split_catalogue(
    table: pd.DataFrame,
    method: SplitMethod,
    *,
    test_fraction: float = 0.3,
    unseen_fraction: float = 0.3,
    seed: int = 0,
) -> pd.Series:
    """Return a Series aligned with `table`: "train", "test", or NA for rows of unknown individuals.

    - `disjoint`: about `test_fraction` of the individuals go wholly to test.
    - `closed_set`: every individual with two or more encounters has about
      `test_fraction` of its encounters in test and at least one in train;
      individuals with a single encounter stay in train.
    - `open_set`: about `unseen_fraction` of the individuals go wholly to test
      (never seen in train); the rest are split as `closed_set`.
    - `by_time`: the earliest encounters go to train, the latest `test_fraction`
      of encounters to test (needs timestamps).
    """
    if not 0.0 <= test_fraction <= 1.0 or not 0.0 <= unseen_fraction <= 1.0:
        raise ReidError(
            f"split fractions must lie in 0..1, got test_fraction={test_fraction}, unseen_fraction={unseen_fraction}"
        )
    labelled = table[table["individual_id"].notna()]
    encounters = _encounter_keys(labelled)
    rng = np.random.default_rng(seed)
    if method == "disjoint":
        test_rows = _individuals_to_test(labelled, encounters, test_fraction, rng)
    elif method == "closed_set":
        test_rows = _closed_set(labelled, encounters, test_fraction, rng)
    elif method == "open_set":
        unseen = _individuals_to_test(labelled, encounters, unseen_fraction, rng)
        seen = labelled.index.difference(unseen)
        test_rows = unseen.union(_closed_set(labelled.loc[seen], encounters.loc[seen], test_fraction, rng))
    elif method == "by_time":
        test_rows = _by_time(labelled, encounters, test_fraction)
    else:
        raise ReidError(f"unknown split method {method!r}; use one of closed_set, open_set, disjoint, by_time")
    out = pd.Series(pd.NA, index=table.index, dtype="string")
    out[labelled.index] = TRAIN
    out[test_rows] = TEST
    return out


def _encounter_keys(table: pd.DataFrame) -> pd.Series:
    # Rows without an encounter are their own encounter, keyed by image.
    return table["encounter_id"].fillna("image:" + table["image_path"].astype(str)).astype(str)


def _components(table: pd.DataFrame, encounters: pd.Series) -> pd.Series:
    """Return a group key per row: individuals linked by a shared encounter form one group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, ids in table.groupby(encounters)["individual_id"]:
        names = sorted(set(ids))
        for other in names[1:]:
            parent[find(other)] = find(names[0])
    return table["individual_id"].map(lambda x: find(str(x)))


def _individuals_to_test(
    table: pd.DataFrame, encounters: pd.Series, fraction: float, rng: np.random.Generator
) -> pd.Index:
    groups = _components(table, encounters)
    names = np.array(sorted(groups.unique()))
    rng.shuffle(names)
    chosen = set(names[: _round_half_up(fraction * len(names))])
    return table.index[groups.isin(chosen)]


def _closed_set(table: pd.DataFrame, encounters: pd.Series, fraction: float, rng: np.random.Generator) -> pd.Index:
    members = table.groupby(encounters)["individual_id"].agg(lambda ids: sorted(set(ids)))
    order = np.array(sorted(members.index))
    rng.shuffle(order)
    total = encounters.groupby(table["individual_id"]).nunique()
    quota = np.minimum(np.floor(total * fraction + 0.5), total - 1)
    taken = pd.Series(0, index=total.index)
    chosen = []
    for encounter in order:
        ids = members[encounter]
        if all(taken[i] < quota[i] for i in ids):
            chosen.append(encounter)
            taken[ids] += 1
    return table.index[encounters.isin(set(chosen))]


def _by_time(table: pd.DataFrame, encounters: pd.Series, fraction: float) -> pd.Index:
    if table["timestamp"].isna().any():
        missing = int(table["timestamp"].isna().sum())
        raise ReidError(
            f"a by_time split needs a timestamp on every labelled row; {missing} rows have none: add them or use another split"
        )
    start = table.groupby(encounters)["timestamp"].min().sort_values(kind="stable")
    n_test = _round_half_up(fraction * len(start))
    test_encounters = set(start.index[len(start) - n_test :]) if n_test else set()
    return table.index[encounters.isin(test_encounters)]


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))
