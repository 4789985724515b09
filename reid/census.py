"""Minimum and maximum numbers of individuals, honest about one-sided animals.

An animal known from both flanks (B) is distinct from every other. One known
only from the left (L) may be the unseen other side of one known only from the
right (R), so the honest range is B + max(L, R) .. B + L + R. A left-only and a
right-only animal cannot be the same when they were seen in the same image or
encounter, have different recorded sexes, or were photographed at about the same
time at different stations; each such exclusion can only raise the minimum,
which is B + L + R minus the largest set of disjoint pairs that could still be
one animal (a maximum bipartite matching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

DEFAULT_SIMULTANEOUS_S = 300.0


@dataclass(frozen=True)
class _Evidence:
    sides: frozenset[str]
    encounters: frozenset[str]
    images: frozenset[str]
    sexes: frozenset[str]
    sightings: tuple[tuple[str, pd.Timestamp], ...]


def count_individuals(
    captures: pd.DataFrame,
    *,
    by: Sequence[str] = (),
    period: str | None = None,
    known_sides: pd.DataFrame | None = None,
    simultaneous_s: float = DEFAULT_SIMULTANEOUS_S,
) -> pd.DataFrame:
    """Return one row per group with n_both, n_left_only, n_right_only, minimum and maximum.

    `captures` has one row per identified capture (catalogue columns; rows with no
    `individual_id` are ignored). `by` names grouping columns (e.g. country,
    station); `period` is a pandas frequency (e.g. "QS", "YS") grouping by
    timestamp. `known_sides`, a table with `individual_id` and `side`, adds flanks
    known from elsewhere (the catalogue): an animal whose both flanks are known is
    never the other side of a one-sided one, even if one flank was seen here.
    """
    captures = captures[captures["individual_id"].notna()]
    keys: list[str | pd.Series] = list(by)
    names = list(by)
    if period is not None:
        keys.append(
            captures["timestamp"].dt.tz_localize(None).dt.to_period(_period_freq(period)).astype(str).rename("period")
        )
        names.append("period")
    extra = _sides_by_individual(known_sides) if known_sides is not None else {}
    rows = []
    groups = captures.groupby(keys, sort=True, dropna=False) if keys else [((), captures)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(names, key, strict=True)), **_bounds(group, extra, simultaneous_s)})
    columns = [*names, "n_both", "n_left_only", "n_right_only", "minimum", "maximum", "individuals"]
    return pd.DataFrame(rows, columns=columns)


def count_table(
    captures: pd.DataFrame,
    *,
    by: Sequence[str] = ("country",),
    period: str | None = None,
    known_sides: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Return `count_individuals` per group preceded by the combined row, whose group columns read "all"."""
    combined = count_individuals(captures, known_sides=known_sides).assign(**{c: "all" for c in by})
    groups = count_individuals(captures, by=by, period=period, known_sides=known_sides)
    table = pd.concat([combined, groups], ignore_index=True)
    return table[[*by, *[c for c in table.columns if c not in by]]]


def count_bounds(
    decided: pd.DataFrame,
    unresolved: pd.DataFrame,
    *,
    by: Sequence[str] = ("country",),
    period: str | None = None,
    known_sides: pd.DataFrame | None = None,
    simultaneous_s: float = DEFAULT_SIMULTANEOUS_S,
) -> pd.DataFrame:
    """Return bounds on the number of individuals that contain the truth whenever the decided IDs are right.

    `decided` holds captures whose `individual_id` is certain (decided known, or
    confirmed by a person); `unresolved` holds captures nobody has identified yet
    (to review, or only provisionally new), one `encounter_id` each animal. The
    minimum counts the decided individuals (B + max(L, R), tightened by exclusions)
    plus unresolved encounters that hard evidence keeps apart from every animal
    counted (seen together, different sex, the same time at another station); the
    maximum lets every unresolved encounter be another animal. One row per group,
    the combined row (group columns "all") first, with how many encounters await
    review: identifying them narrows the interval.
    """
    decided = decided[decided["individual_id"].notna()]
    # Each unresolved encounter stands for one animal of its own until someone identifies it.
    opened = unresolved["encounter_id"].fillna(unresolved["annotation_id"]).astype(str)
    unresolved = unresolved.assign(individual_id=("?" + opened).astype("string"))
    extra = _sides_by_individual(known_sides) if known_sides is not None else {}
    groups: list[tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]] = [({c: "all" for c in by}, decided, unresolved)]
    keys = list(by)
    if period is not None:
        keys.append("period")
        decided, unresolved = (
            t.assign(period=t["timestamp"].dt.tz_localize(None).dt.to_period(_period_freq(period)).astype(str))
            for t in (decided, unresolved)
        )
    if keys:
        both = pd.concat([decided[keys], unresolved[keys]]).drop_duplicates()
        for values in both.sort_values(keys).itertuples(index=False):
            key = dict(zip(keys, values, strict=True))

            def pick(t: pd.DataFrame, key: dict[str, Any] = key) -> pd.DataFrame:
                mask = np.ones(len(t), dtype=bool)
                for c, v in key.items():
                    mask &= (t[c].isna() if pd.isna(v) else t[c] == v).to_numpy(dtype=bool)
                return t[mask]

            groups.append((key, pick(decided), pick(unresolved)))
    rows = []
    for key, group_decided, group_unresolved in groups:
        counted = _bounds(group_decided, extra, simultaneous_s)
        apart = _kept_apart(group_decided, group_unresolved, simultaneous_s)
        n_open = int(group_unresolved["individual_id"].nunique())
        rows.append(
            {
                **key,
                "decided_individuals": len(_evidence(group_decided)),
                "awaiting_review": n_open,
                "minimum": counted["minimum"] + apart,
                "maximum": counted["maximum"] + n_open,
                "individuals": counted["individuals"],
            }
        )
    columns = [*keys, "decided_individuals", "awaiting_review", "minimum", "maximum", "individuals"]
    return pd.DataFrame(rows, columns=columns)


def _kept_apart(decided: pd.DataFrame, unresolved: pd.DataFrame, simultaneous_s: float) -> int:
    """Return how many unresolved encounters hard evidence keeps apart from every decided animal and each other.

    Greedy: a set of animals that pairwise cannot be the same forces that many
    distinct animals, so any such set is a sound addition to the minimum.
    """
    counted = list(_evidence(decided).values())
    added = 0
    for candidate in _evidence(unresolved).values():
        if not any(_could_be_same(candidate, other, simultaneous_s) for other in counted):
            counted.append(candidate)
            added += 1
    return added


def _bounds(captures: pd.DataFrame, extra: dict[str, set[str]], simultaneous_s: float) -> dict[str, Any]:
    evidence = _evidence(captures)
    sides = {i: set(e.sides) | extra.get(i, set()) for i, e in evidence.items()}
    both = sorted(i for i, s in sides.items() if {"left", "right"} <= s)
    left = sorted(i for i, s in sides.items() if "left" in s and "right" not in s)
    right = sorted(i for i, s in sides.items() if "right" in s and "left" not in s)
    unsided = sorted(i for i, s in sides.items() if not s & {"left", "right"})
    # An individual with no known flank cannot be told apart from anyone: count it like a one-sided one.
    left = left + unsided
    could_pair = np.array(
        [[_could_be_same(evidence[a], evidence[b], simultaneous_s) for b in right] for a in left], dtype=bool
    )
    pairs = _max_matching(could_pair)
    return {
        "n_both": len(both),
        "n_left_only": len(left),
        "n_right_only": len(right),
        "minimum": len(both) + len(left) + len(right) - pairs,
        "maximum": len(both) + len(left) + len(right),
        "individuals": ";".join(sorted(evidence)),
    }


def _evidence(captures: pd.DataFrame) -> dict[str, _Evidence]:
    out = {}
    for individual, rows in captures.groupby("individual_id", sort=True):
        out[str(individual)] = _Evidence(
            sides=frozenset(rows["side"].dropna()) & {"left", "right"},
            encounters=frozenset(rows["encounter_id"].dropna()),
            images=frozenset(rows["image_path"].dropna()),
            sexes=frozenset(rows["sex"].dropna()) - {"unknown"},
            sightings=tuple(
                (str(s), t)
                for s, t in zip(rows["station"], rows["timestamp"], strict=True)
                if pd.notna(s) and pd.notna(t)
            ),
        )
    return out


def _could_be_same(a: _Evidence, b: _Evidence, simultaneous_s: float) -> bool:
    if a.encounters & b.encounters or a.images & b.images:
        return False
    if len(a.sexes) == 1 and len(b.sexes) == 1 and a.sexes != b.sexes:
        return False
    for station_a, time_a in a.sightings:
        for station_b, time_b in b.sightings:
            if station_a != station_b and abs((time_a - time_b).total_seconds()) <= simultaneous_s:
                return False
    return True


def _max_matching(could_pair: np.ndarray) -> int:
    """Return the size of a maximum matching in a bipartite graph given as a boolean matrix."""
    if could_pair.size == 0:
        return 0
    rows, cols = linear_sum_assignment(could_pair.astype(float), maximize=True)
    return int(could_pair[rows, cols].sum())


def _sides_by_individual(table: pd.DataFrame) -> dict[str, set[str]]:
    known = table[table["individual_id"].notna()]
    return {str(i): set(s) & {"left", "right"} for i, s in known.groupby("individual_id")["side"]}


def _period_freq(period: str) -> str:
    # Period frequencies differ from offset aliases for start-anchored names ("QS" -> "Q").
    return {"QS": "Q", "YS": "Y", "MS": "M", "AS": "Y"}.get(period, period)
