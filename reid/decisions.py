"""Decisions from scores: per-individual scores, encounter pooling, calibrated thresholds, provisional new IDs.

Everything here is pure: it takes already scored arrays and tables and returns
decisions, so a notebook or a test can call it without a gallery, a model or a file.
The workflow that searches and re-scores lives in `reid.workflows.match`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from reid.catalogue import COLUMN_NAMES
from reid.errors import ReidError


class Decision(StrEnum):
    """What the software says about one capture (or one encounter)."""

    KNOWN = "known"
    """A known individual: the top candidate scored at least the `known` threshold."""
    REVIEW = "review"
    """A person must look: the top score lies between the thresholds."""
    NEW = "new"
    """No known individual is close: a provisional new individual."""
    UNREADABLE = "unreadable"
    """The picture could not be read; the reason is given."""


KNOWN, REVIEW, NEW, UNREADABLE = Decision.KNOWN, Decision.REVIEW, Decision.NEW, Decision.UNREADABLE

MATCH_COLUMNS: Mapping[str, str] = {
    "query": "string",
    "image_path": "string",
    "rank": "Int64",
    "individual_id": "string",
    "score": "float64",
    "query_score": "float64",
    "decision": "string",
    "gallery_row": "Int64",
    "gallery_annotation": "string",
    "reason": "string",
}
"""matches.csv: one row per query and candidate rank (unreadable queries: one row with the reason)."""

DECISION_COLUMNS: Mapping[str, str] = {
    "query": "string",
    "image_path": "string",
    "side": "string",
    "sides_searched": "string",
    "encounter_id": "string",
    "n_in_encounter": "Int64",
    "decision": "string",
    "assigned_id": "string",
    "top_individual": "string",
    "top_score": "float64",
    "reason": "string",
}
"""decisions.csv: one row per query capture; the decision and assigned ID are its encounter's."""


def typed_table(rows: list[dict[str, Any]] | pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Return the rows as a table with exactly `columns` (name -> pandas dtype); absent columns are missing values."""
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    table = table.reindex(columns=list(columns))
    return table.astype(dict(columns))


@dataclass(frozen=True)
class Thresholds:
    """Score >= `known`: a known individual; score < `new`: a new one; in between: review.

    The error rates are those measured on the calibration data (NaN when not measured).
    """

    known: float
    new: float
    false_new_rate: float = float("nan")
    false_merge_rate: float = float("nan")
    review_rate: float = float("nan")
    n_known_queries: int = 0
    n_unseen_queries: int = 0

    def __post_init__(self) -> None:
        if self.new > self.known:
            raise ReidError(f"threshold new ({self.new}) must not exceed known ({self.known})")

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Return the decision ("known", "review" or "new") for each score."""
        scores = np.asarray(scores, dtype=float)
        return np.where(scores >= self.known, KNOWN, np.where(scores < self.new, NEW, REVIEW))

    def to_json(self) -> str:
        """Return the thresholds and their error rates as JSON (stored with the gallery)."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> Thresholds:
        """Read thresholds written by `to_json`."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as err:
            raise ReidError(f"not a thresholds file ({err}); run calibration again") from err


def individual_scores(neighbour_scores: np.ndarray, neighbour_individuals: np.ndarray) -> list[dict[str, float]]:
    """Return, per query, each retrieved individual's score: the best of its gallery entries.

    `neighbour_scores` and `neighbour_individuals` are (Q, k); empty strings mark
    missing neighbours (FAISS returns fewer than k when the gallery is small).
    """
    out = []
    for scores, individuals in zip(neighbour_scores, neighbour_individuals, strict=True):
        best: dict[str, float] = {}
        for score, individual in zip(scores, individuals, strict=True):
            if individual and float(score) > best.get(individual, -np.inf):
                best[individual] = float(score)
        out.append(best)
    return out


def pool_encounter(per_query: list[dict[str, float]]) -> dict[str, float]:
    """Return one score per individual for queries of one encounter (the same animal).

    The pooled score is the mean over the encounter's queries; a query that did not
    retrieve an individual contributes its own lowest retrieved score, an upper
    bound of what it would have given, so one good frame does not decide alone
    while a missing neighbour is not punished as a zero.
    """
    per_query = [q for q in per_query if q]
    if not per_query:
        return {}
    floors = [min(q.values()) for q in per_query]
    names = sorted({name for q in per_query for name in q})
    return {
        name: float(np.mean([q.get(name, floor) for q, floor in zip(per_query, floors, strict=True)])) for name in names
    }


def calibrate(
    known_top: np.ndarray,
    known_correct: np.ndarray,
    unseen_top: np.ndarray,
    *,
    max_false_merge: float = 0.05,
    max_false_new: float = 0.05,
) -> Thresholds:
    """Return thresholds chosen on labelled held-out decisions, with their error rates.

    `known_top` are the top pooled scores of queries whose individual is in the
    gallery (`known_correct`: whether that top individual is the right one);
    `unseen_top` those of queries whose individual is not. `known` is the lowest
    threshold that gives at most `max_false_merge` of unseen queries (and of wrong
    top candidates) a known ID; `new` the highest that calls at most
    `max_false_new` of known queries new. Where both cannot hold, the review band
    closes (new = known) and the rates say what was achieved.
    """
    known_top = np.asarray(known_top, dtype=float)
    known_correct = np.asarray(known_correct, dtype=bool)
    unseen_top = np.asarray(unseen_top, dtype=float)
    if len(known_top) == 0:
        raise ReidError("calibration needs queries of individuals that are in the gallery; hold out fewer individuals")
    # Scores that must not become "known": every unseen query and every known query whose top ID is wrong.
    impostors = np.sort(np.concatenate([unseen_top, known_top[~known_correct]]))
    if len(impostors) == 0:
        t_known = float(known_top.min())
    else:
        allowed = int(np.floor(max_false_merge * len(impostors)))
        # Strictly above the (allowed+1)-th highest impostor score.
        t_known = float(np.nextafter(impostors[len(impostors) - allowed - 1], np.inf))
    ordered = np.sort(known_top)
    allowed_new = int(np.floor(max_false_new * len(ordered)))
    t_new = float(ordered[allowed_new]) if allowed_new < len(ordered) else float(ordered[-1])
    t_new = min(t_new, t_known)
    return evaluate_thresholds(t_known, t_new, known_top, known_correct, unseen_top)


def evaluate_thresholds(
    t_known: float, t_new: float, known_top: np.ndarray, known_correct: np.ndarray, unseen_top: np.ndarray
) -> Thresholds:
    """Return `Thresholds` with the error rates they give on these held-out decisions."""
    known_top, unseen_top = np.asarray(known_top, dtype=float), np.asarray(unseen_top, dtype=float)
    known_correct = np.asarray(known_correct, dtype=bool)
    n_all = len(known_top) + len(unseen_top)
    review = int(
        ((known_top >= t_new) & (known_top < t_known)).sum() + ((unseen_top >= t_new) & (unseen_top < t_known)).sum()
    )
    return Thresholds(
        known=t_known,
        new=t_new,
        false_new_rate=float((known_top < t_new).mean()) if len(known_top) else float("nan"),
        false_merge_rate=float((unseen_top >= t_known).mean()) if len(unseen_top) else float("nan"),
        review_rate=review / n_all if n_all else float("nan"),
        n_known_queries=len(known_top),
        n_unseen_queries=len(unseen_top),
    )


def group_new_individuals(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """Return a cluster label per item: items whose average-linkage similarity reaches `threshold` share one.

    `similarity` is a symmetric (N, N) matrix of scores on the same scale as the
    thresholds, so two unmatched captures become one provisional individual
    exactly when they would have matched each other as known.
    """
    n = len(similarity)
    if n == 0:
        return np.zeros(0, dtype=int)
    if n == 1:
        return np.zeros(1, dtype=int)
    sim = (np.asarray(similarity, dtype=float) + np.asarray(similarity, dtype=float).T) / 2
    distance = np.clip(sim.max() - sim, 0, None)
    np.fill_diagonal(distance, 0)
    tree = linkage(squareform(distance, checks=False), method="average")
    return np.asarray(fcluster(tree, t=sim.max() - threshold, criterion="distance")) - 1


@dataclass
class MatchResult:
    """Ranked candidates and decisions for a set of query captures."""

    matches: pd.DataFrame
    """One row per query and rank (`MATCH_COLUMNS`)."""
    decisions: pd.DataFrame
    """One row per query (`DECISION_COLUMNS`): encounter, decision, assigned_id (known or provisional new ID)."""


Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""similarity(a, b): the (len(a), len(b)) scores between query captures a and b (indices into the queries),
on the scale of the thresholds."""


def decide(
    queries: pd.DataFrame,
    scores: np.ndarray,
    rows: np.ndarray,
    entry_individuals: np.ndarray,
    entry_annotations: np.ndarray,
    thresholds: Thresholds,
    *,
    top_n: int = 5,
    new_prefix: str = "NEW",
    similarity: Similarity | None = None,
) -> MatchResult:
    """Return ranked candidate individuals and a known / review / new decision for every query row.

    `scores` and `rows` are (Q, K): each query's scored gallery entries (row -1 or a
    non-finite score where there is none), in any order; `entry_individuals` and
    `entry_annotations` give each gallery row's individual and annotation. The
    queries table has `annotation_id`, `image_path`, `side` and `encounter_id`.
    Queries of one encounter are the same animal: their per-individual scores are
    pooled and they get one decision. Encounters decided "new" are grouped into
    provisional individuals `<new_prefix>-0001`, ... where `similarity` says two
    of them would match each other as known; without it each is its own.
    """
    if len(queries) != len(scores) or scores.shape != rows.shape:
        raise ReidError(f"{len(queries)} queries but scores {scores.shape} and rows {rows.shape}")
    queries = queries.reset_index(drop=True)
    # Re-scored candidates are re-ranked; equal scores keep the order they came in.
    order = np.argsort(-scores, axis=1, kind="stable")
    scores, rows = np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
    rows = np.where(np.isfinite(scores), rows, -1)
    # Row -1 (no neighbour) picks the appended "", which names no individual.
    padded = np.append(np.asarray(pd.Series(entry_individuals, dtype="string").fillna(""), dtype=object), "")
    neighbour_ids = padded[rows]
    per_query = individual_scores(scores, neighbour_ids)
    best_rows = _best_entries(scores, rows, neighbour_ids)
    sides = queries["side"].fillna("unknown").to_numpy(dtype=object)
    encounters = queries["encounter_id"].fillna("query:" + queries["annotation_id"]).to_numpy(dtype=object)

    decision_rows, match_rows = [], []
    encounter_order = list(dict.fromkeys(encounters))
    members = {e: np.flatnonzero(encounters == e) for e in encounter_order}
    pooled = {e: pool_encounter([per_query[i] for i in members[e]]) for e in encounter_order}
    top = {e: max(p.values()) if p else -np.inf for e, p in pooled.items()}
    decided = dict(zip(encounter_order, thresholds.decide(np.array([top[e] for e in encounter_order])), strict=True))
    new_ids = provisional_ids(
        [e for e in encounter_order if decided[e] == NEW], members, sides, thresholds.known, new_prefix, similarity
    )

    for e in encounter_order:
        ranked = sorted(pooled[e].items(), key=lambda item: (-item[1], item[0]))
        assigned = ranked[0][0] if decided[e] == KNOWN else new_ids.get(e, "")
        for i in members[e]:
            q = queries.iloc[i]
            decision_rows.append(
                {
                    "query": q["annotation_id"],
                    "image_path": q["image_path"],
                    "side": q["side"],
                    "sides_searched": "same side" if q["side"] in ("left", "right") else "both (side unknown)",
                    "encounter_id": e,
                    "n_in_encounter": len(members[e]),
                    "decision": str(decided[e]),
                    "assigned_id": assigned,
                    "top_individual": ranked[0][0] if ranked else "",
                    "top_score": ranked[0][1] if ranked else float("nan"),
                }
            )
            for rank, (individual, score) in enumerate(ranked[:top_n], start=1):
                evidence = [best_rows[j][individual] for j in members[e] if individual in best_rows[j]]
                entry = max(evidence)[1] if evidence else -1
                match_rows.append(
                    {
                        "query": q["annotation_id"],
                        "image_path": q["image_path"],
                        "rank": rank,
                        "individual_id": individual,
                        "score": score,
                        "query_score": per_query[i].get(individual, float("nan")),
                        "decision": str(decided[e]),
                        "gallery_row": entry,
                        "gallery_annotation": entry_annotations[entry] if entry >= 0 else "",
                    }
                )
    return MatchResult(
        matches=typed_table(match_rows, MATCH_COLUMNS), decisions=typed_table(decision_rows, DECISION_COLUMNS)
    )


def identified_captures(queries: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """Return the query rows with `individual_id` set to their decided ID (known or provisional new); others dropped."""
    decided = decisions.set_index("query")
    keep = decided["decision"].isin([KNOWN, NEW])
    captures = queries[queries["annotation_id"].isin(decided.index[keep])].copy()
    captures["individual_id"] = pd.array(
        decided.loc[captures["annotation_id"], "assigned_id"].to_numpy(), dtype="string"
    )
    return captures[list(COLUMN_NAMES)]


def _best_entries(scores: np.ndarray, rows: np.ndarray, individuals: np.ndarray) -> list[dict[str, tuple[float, int]]]:
    """Return, per query, each retrieved individual's best (score, gallery row): the picture that shows the match."""
    out = []
    for query_scores, query_rows, query_ids in zip(scores, rows, individuals, strict=True):
        best: dict[str, tuple[float, int]] = {}
        for score, row, individual in zip(query_scores, query_rows, query_ids, strict=True):
            if individual and (individual not in best or float(score) > best[individual][0]):
                best[individual] = (float(score), int(row))
        out.append(best)
    return out


def provisional_ids(
    new_encounters: list[str],
    members: Mapping[str, np.ndarray],
    sides: np.ndarray,
    threshold: float,
    prefix: str,
    similarity: Similarity | None,
) -> dict[str, str]:
    """Return a provisional individual ID per new encounter; encounters that would match each other share one.

    Two encounters of different known sides never share one (a left and a right
    flank cannot be matched). Without `similarity` every encounter is its own.
    """
    if not new_encounters:
        return {}
    n = len(new_encounters)
    pairwise = np.full((n, n), -np.inf)
    for a in range(n):
        for b in range(a, n):
            ia, ib = members[new_encounters[a]], members[new_encounters[b]]
            side_a, side_b = set(sides[ia]) - {"unknown"}, set(sides[ib]) - {"unknown"}
            if similarity is None or (side_a and side_b and not side_a & side_b):
                continue
            pair = similarity(ia, ib)
            # The gallery's score logic: each capture's best match in the other encounter, averaged.
            pairwise[a, b] = pairwise[b, a] = (pair.max(axis=1).mean() + pair.max(axis=0).mean()) / 2
    if similarity is None:
        labels = np.arange(n)
    else:
        finite = np.isfinite(pairwise)
        # Far below any score, so no average that includes a cannot-link pair reaches the threshold.
        floor = (pairwise[finite].min() if finite.any() else 0.0) - 1e6
        labels = group_new_individuals(np.where(finite, pairwise, floor), threshold)
    order = {label: k for k, label in enumerate(dict.fromkeys(labels.tolist()))}
    return {e: f"{prefix}-{order[label] + 1:04d}" for e, label in zip(new_encounters, labels.tolist(), strict=True)}
