"""Decisions from scores: per-individual scores, encounter pooling, calibrated thresholds, provisional new IDs.

Everything here is pure: it takes already scored arrays and tables and returns
decisions, so a notebook or a test can call it without a gallery, a model or a file.
The workflow that searches and re-scores lives in `reid.workflows.match`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from scipy.stats import beta

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
    "margin": "float64",
    "reason": "string",
}
"""decisions.csv: one row per query capture; the decision and assigned ID are its encounter's."""


def typed_table(rows: list[dict[str, Any]] | pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Return the rows as a table with exactly `columns` (name -> pandas dtype); absent columns are missing values."""
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    table = table.reindex(columns=list(columns))
    return table.astype(dict(columns))


CONFIDENCE = 0.95
"""The confidence of every error-rate bound the software states."""


SELECTION_CONFIDENCE = 0.5
"""Calibration judges a threshold by the median-unbiased estimate of its error rates: the rate at which seeing as
few errors as it saw is a coin flip. On many decisions this is the observed share; on few it leans to caution
(0 of 13 is 5.2 %, 0 of 5 is 13 %), which undoes the optimism of picking the best of many thresholds."""


def rate_upper_bound(errors: int, decisions: int, confidence: float = CONFIDENCE, design_effect: float = 1.0) -> float:
    """Return the exact one-sided (Clopper-Pearson) upper confidence bound of an error rate seen as errors/decisions.

    Decisions that err together (the encounters of one animal) count as `decisions / design_effect`
    independent ones (Korn & Graubard's effective sample size; `design_effect`). With no decisions nothing
    is known: the bound is 1.
    """
    effective = decisions / max(design_effect, 1.0)
    wrong = errors / max(design_effect, 1.0)
    if effective <= 0 or wrong >= effective:
        return 1.0
    return float(beta.ppf(confidence, wrong + 1, effective - wrong))


def design_effect(errors: np.ndarray, groups: np.ndarray) -> float:
    """Return by how much grouped decisions inflate the variance of their error share (Kish's design effect).

    `errors` (bool per decision) are grouped by `groups` (the individual each decision is about): encounters of
    one animal tend to be all right or all wrong together (its coat, its station's background), so they carry
    less evidence than as many independent decisions. The ratio of the between-groups variance of the share to
    the binomial one, from 1 (independent) up to the largest group's size (each group all right or all wrong).
    1 where it cannot be estimated: no error, no right decision, or a single group.
    """
    errors = np.asarray(errors, dtype=bool)
    share = float(errors.mean()) if len(errors) else 0.0
    names, group = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    if share in (0.0, 1.0) or len(names) < 2:
        return 1.0
    group_errors = np.bincount(group, weights=errors, minlength=len(names))
    group_sizes = np.bincount(group, minlength=len(names))
    between = len(names) / (len(names) - 1) * np.sum((group_errors - share * group_sizes) ** 2) / len(errors) ** 2
    binomial = share * (1 - share) / len(errors)
    return float(np.clip(between / binomial, 1.0, group_sizes.max()))


@dataclass(frozen=True)
class Thresholds:
    """Score >= `known` (and a lead of at least `margin` over the runner-up): a known individual;
    score < `new`: a new one; in between: review.

    The counts are what the thresholds gave on the calibration decisions, so every
    rate comes with the number of decisions it rests on and an upper confidence bound.
    """

    known: float
    new: float
    margin: float = 0.0
    """Least lead of the top individual's score over the runner-up's for a known decision (0: top score alone)."""
    wrong_ids: int = 0
    """Calibration queries decided known with a wrong ID (enrolled animals given another's ID, and merged new ones)."""
    known_decisions: int = 0
    false_new: int = 0
    """Calibration queries of enrolled animals decided new."""
    known_queries: int = 0
    false_merges: int = 0
    """Calibration queries of animals left out of the gallery decided known."""
    unseen_queries: int = 0
    reviewed: int = 0
    """Calibration queries (both kinds) sent to review."""
    max_wrong_id: float = 0.05
    max_false_new: float = 0.05
    max_false_merge: float = 0.05
    group: float | None = None
    """Score from which two encounters decided new become one provisional individual (calibrated on pairs of
    labelled encounters); None: the known threshold."""
    design_effects: dict[str, float] = field(default_factory=dict)
    """Per rate (wrong_id, false_new, false_merge), how much the calibration decisions err together by individual
    (`design_effect`): its bound counts the decisions as that many times fewer independent ones. 1 when absent."""
    notes: tuple[str, ...] = ()
    """What the analyst must know about these thresholds: targets the data cannot support, decisions switched off."""

    def __post_init__(self) -> None:
        if self.new > self.known:
            raise ReidError(f"threshold new ({self.new}) must not exceed known ({self.known})")
        object.__setattr__(self, "notes", tuple(self.notes))

    def decide(self, scores: np.ndarray, margins: np.ndarray | None = None) -> np.ndarray:
        """Return the decision ("known", "review" or "new") for each top score and its lead over the runner-up."""
        scores = np.asarray(scores, dtype=float)
        lead = np.full(scores.shape, np.inf) if margins is None else np.nan_to_num(margins, nan=np.inf)
        known = (scores >= self.known) & (lead >= self.margin)
        return np.where(known, KNOWN, np.where(scores < self.new, NEW, REVIEW))

    @property
    def decides_known(self) -> bool:
        """Whether any capture can be decided known (calibration found thresholds that meet the targets)."""
        return bool(np.isfinite(self.known))

    def rates(self) -> dict[str, dict[str, float | int]]:
        """Return each calibration error rate with its decisions, errors, upper bound and target."""
        return {
            name: {
                "rate": errors / decisions if decisions else float("nan"),
                "errors": errors,
                "decisions": decisions,
                "design_effect": self.design_effects.get(name, 1.0),
                "upper_bound": rate_upper_bound(errors, decisions, design_effect=self.design_effects.get(name, 1.0)),
                "target": target,
            }
            for name, errors, decisions, target in (
                ("wrong_id", self.wrong_ids, self.known_decisions, self.max_wrong_id),
                ("false_new", self.false_new, self.known_queries, self.max_false_new),
                ("false_merge", self.false_merges, self.unseen_queries, self.max_false_merge),
            )
        }

    def summary(self) -> str:
        """Return the rates as one line: rate (errors/decisions, 95 % upper bound) per kind of error."""
        parts = [
            f"{name.replace('_', ' ')} {r['rate']:.1%} ({r['errors']}/{r['decisions']}{as_independent(r)}, "
            f"{CONFIDENCE:.0%} upper bound {r['upper_bound']:.1%}, target {r['target']:.0%})"
            for name, r in self.rates().items()
        ]
        return "; ".join(parts)

    def to_json(self) -> str:
        """Return the thresholds and their calibration counts as JSON (stored with the gallery)."""
        values = asdict(self)
        values["notes"] = list(self.notes)
        values["design_effects"] = dict(self.design_effects)
        values["known"] = self.known if np.isfinite(self.known) else "inf"
        if self.group is not None and not np.isfinite(self.group):
            values["group"] = "inf"
        values["new"] = self.new if np.isfinite(self.new) else "-inf"
        return json.dumps(values, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> Thresholds:
        """Read thresholds written by `to_json`."""
        try:
            values = json.loads(text)
            if "false_merge_rate" in values:
                raise ReidError(
                    "thresholds calibrated by leopard-reid 0.1 state no error bounds; run "
                    "`python infer.py mode=calibrate` again"
                )
            values["known"], values["new"] = float(values["known"]), float(values["new"])
            if values.get("group") is not None:
                values["group"] = float(values["group"])
            effects = values.get("design_effects", {})
            if not isinstance(effects, dict):
                raise ValueError(f"design_effects is {type(effects).__name__}, not a mapping")
            values["design_effects"] = {str(name): float(effect) for name, effect in effects.items()}
            return cls(**values)
        except (ValueError, TypeError, KeyError) as err:
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
    known_margin: np.ndarray | None = None,
    unseen_margin: np.ndarray | None = None,
    known_individuals: np.ndarray | None = None,
    unseen_individuals: np.ndarray | None = None,
    max_wrong_id: float = 0.05,
    max_false_merge: float = 0.05,
    max_false_new: float = 0.05,
    min_decisions: int = 20,
    lowest_known: float = -np.inf,
) -> Thresholds:
    """Return thresholds chosen on labelled held-out decisions, with what they gave there.

    `known_top` are the top pooled scores of queries whose individual is in the
    gallery (`known_correct`: whether that top individual is the right one),
    `unseen_top` those of queries whose individual is not; the margins are each
    top score's lead over the runner-up. `known` (with `margin`) is the lowest
    threshold whose known decisions hold at most `max_wrong_id` wrong IDs (both
    kinds of query: the calibration weighs new animals as often as enrolled ones)
    and give at most `max_false_merge` of unseen queries an ID; among the margins tried, the one
    that lets the most right IDs through wins. `new` is the highest threshold that
    calls at most `max_false_new` of known queries new. When no threshold meets the
    targets, nothing is decided known (known = inf) and a note says so; a target
    that the number of decisions cannot support (its upper confidence bound is
    above it) gets a note too.

    With the individual each decision is about (`known_individuals`,
    `unseen_individuals`), decisions about one animal count as less than
    independent where they err together (`design_effect`): the bounds widen, and
    the threshold is chosen again with the wrong-ID and merge shares judged on
    that many fewer decisions.

    `known` is never below `lowest_known`: where scores are calibrated probabilities of
    being the same animal, 1 - `max_wrong_id`, so that no single ID is given whose own
    probability of being wrong is above the target, however many sure ones keep the
    average within it (the IDs just above an average-controlling threshold are the
    likeliest to be wrong).
    """
    known_top = np.nan_to_num(np.asarray(known_top, dtype=float), nan=-np.inf)
    known_correct = np.asarray(known_correct, dtype=bool)
    unseen_top = np.nan_to_num(np.asarray(unseen_top, dtype=float), nan=-np.inf)
    known_margin = np.full(len(known_top), np.inf) if known_margin is None else np.asarray(known_margin, float)
    unseen_margin = np.full(len(unseen_top), np.inf) if unseen_margin is None else np.asarray(unseen_margin, float)
    if len(known_top) == 0:
        raise ReidError("calibration needs queries of individuals that are in the gallery; label more encounters")
    for name, individuals, top in (("known", known_individuals, known_top), ("unseen", unseen_individuals, unseen_top)):
        if individuals is not None and len(individuals) != len(top):
            raise ReidError(f"{len(individuals)} {name}_individuals for {len(top)} {name} decisions")
    targets = dict(max_wrong_id=max_wrong_id, max_false_new=max_false_new, max_false_merge=max_false_merge)
    finite_margins = known_margin[np.isfinite(known_margin) & known_correct]
    tried = {0.0, *(np.quantile(finite_margins, [0.0, 0.05, 0.1, 0.2, 0.3]).tolist() if len(finite_margins) else [])}

    best: tuple[int, float, float] | None = None  # (right IDs, -threshold, margin)
    for margin in sorted(tried):
        threshold = _lowest_safe_threshold(
            known_top,
            known_correct,
            known_margin >= margin,
            unseen_top,
            unseen_margin >= margin,
            known_individuals=known_individuals,
            unseen_individuals=unseen_individuals,
            **targets,
        )
        if threshold is None:
            continue
        threshold = max(threshold, lowest_known)
        right = int(((known_top >= threshold) & (known_margin >= margin) & known_correct).sum())
        if right and (best is None or (right, -threshold) > best[:2]):
            best = (right, -threshold, margin)
    notes = []
    if best is None:
        t_known, margin = float("inf"), 0.0
        notes.append(
            f"no threshold keeps wrong IDs within {max_wrong_id:.0%} and merges within {max_false_merge:.0%} on the "
            "calibration data: nothing is decided known automatically; every match goes to review"
        )
    else:
        t_known, margin = -best[1], best[2]
    ordered = np.sort(known_top)
    allowed_new = int(np.floor(max_false_new * len(ordered)))
    t_new = float(ordered[allowed_new]) if allowed_new < len(ordered) else float(ordered[-1])
    t_new = min(t_new, t_known)
    thresholds = evaluate_thresholds(
        t_known,
        t_new,
        known_top,
        known_correct,
        unseen_top,
        margin=margin,
        known_margin=known_margin,
        unseen_margin=unseen_margin,
        notes=tuple(notes),
        known_individuals=known_individuals,
        unseen_individuals=unseen_individuals,
        **targets,
    )
    return replace(thresholds, notes=(*thresholds.notes, *_support_notes(thresholds, min_decisions)))


def _lowest_safe_threshold(
    known_top: np.ndarray,
    known_correct: np.ndarray,
    known_eligible: np.ndarray,
    unseen_top: np.ndarray,
    unseen_eligible: np.ndarray,
    *,
    max_wrong_id: float,
    max_false_new: float,
    max_false_merge: float,
    known_individuals: np.ndarray | None = None,
    unseen_individuals: np.ndarray | None = None,
) -> float | None:
    """Return the lowest score threshold whose known decisions keep both error shares within target, or None.

    Like a q-value: the share of wrong IDs is over all the IDs a threshold gives, so a
    threshold is judged by what an analyst would receive with it. Each share is its
    median-unbiased estimate (`SELECTION_CONFIDENCE`), not the raw fraction: of the
    many thresholds tried, the raw fraction picks one that looked lucky on few
    decisions (0 wrong of 5 meets any target), which then gives more wrong IDs than
    it promised. Given the individual each decision is about, decisions that err
    together count as fewer (`design_effect`, at each threshold tried).
    """
    scores = np.concatenate([known_top[known_eligible], unseen_top[unseen_eligible]])
    wrong = np.concatenate([~known_correct[known_eligible], np.ones(int(unseen_eligible.sum()), bool)])
    merge = np.concatenate([np.zeros(int(known_eligible.sum()), bool), np.ones(int(unseen_eligible.sum()), bool)])
    grouped = known_individuals is not None and unseen_individuals is not None
    if grouped:
        # Every individual a string (a missing one is its own group).
        known_names = np.asarray(known_individuals, dtype=object).astype(str)
        unseen_names = np.asarray(unseen_individuals, dtype=object).astype(str)
        names = np.concatenate([known_names[known_eligible], unseen_names[unseen_eligible]])
    keep = np.isfinite(scores)
    scores, wrong, merge = scores[keep], wrong[keep], merge[keep]
    if len(scores) == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    scores, wrong, merge = scores[order], wrong[order], merge[order]
    decided = np.arange(1, len(scores) + 1)
    unseen_total = max(len(unseen_top), 1)
    wrong_effect = merge_effect = np.ones(len(scores))
    if grouped:
        names = names[keep][order]
        wrong_effect = _running_design_effects(names, wrong)
        merge_effect = _running_design_effects(names, merge, population=unseen_names)
    wrong_share = _median_unbiased(np.cumsum(wrong) / wrong_effect, decided / wrong_effect)
    merged_share = _median_unbiased(np.cumsum(merge) / merge_effect, unseen_total / merge_effect)
    return _lowest_of(scores, (wrong_share <= max_wrong_id) & (merged_share <= max_false_merge))


def lowest_safe_score(scores: np.ndarray, wrong: np.ndarray, max_wrong: float) -> float | None:
    """Return the lowest threshold whose pairs at or above it are wrong no more than `max_wrong` of the time, or None.

    The share is judged by its median-unbiased estimate, as `calibrate` judges the known threshold.
    """
    scores, wrong = np.asarray(scores, dtype=float), np.asarray(wrong, dtype=bool)
    keep = np.isfinite(scores)
    scores, wrong = scores[keep], wrong[keep]
    order = np.argsort(-scores, kind="stable")
    scores, wrong = scores[order], wrong[order]
    share = _median_unbiased(np.cumsum(wrong), np.arange(1, len(scores) + 1))
    return _lowest_of(scores, share <= max_wrong)


def _lowest_of(scores: np.ndarray, safe: np.ndarray) -> float | None:
    """Return the lowest threshold over descending `scores` whose prefix is `safe`, or None when none is."""
    # Equal scores are decided together: a threshold sits after the last of a tie.
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    found = np.flatnonzero(last_of_tie & safe)
    if len(found) == 0:
        return None
    lowest = found[-1]
    # Just above the next lower score, not at the lowest one decided: a right match a little below every
    # calibration score is still taken, and nothing that broke the target is.
    return float(np.nextafter(scores[lowest + 1], np.inf)) if lowest + 1 < len(scores) else float(scores[lowest])


def _running_design_effects(
    names: np.ndarray, errors: np.ndarray, *, population: np.ndarray | None = None
) -> np.ndarray:
    """Return `design_effect` after each prefix of the decisions (about individuals `names`, wrong where `errors`).

    Without `population`, each decision joins the decisions judged (the IDs a threshold gives); with it, the
    decisions judged are fixed (every unseen encounter, one per entry of `population`) and only the errors come
    one by one. Kept as running sums, one pass.
    """
    codes = {name: k for k, name in enumerate(dict.fromkeys([*(population if population is not None else []), *names]))}
    size, wrong = np.zeros(len(codes)), np.zeros(len(codes))
    if population is not None:
        np.add.at(size, [codes[name] for name in population], 1.0)
    sum_size2, sum_wrong2, sum_cross = float((size**2).sum()), 0.0, 0.0
    groups, total, errs, largest = int((size > 0).sum()), float(size.sum()), 0, float(size.max(initial=0.0))
    effects = np.ones(len(names))
    for k, (name, error) in enumerate(zip(names, errors, strict=True)):
        c = codes[name]
        if population is None:  # the decision joins those judged
            groups += int(size[c] == 0)
            sum_size2 += 2 * size[c] + 1
            sum_cross += wrong[c]
            size[c] += 1
            total += 1
            largest = max(largest, size[c])
        if error:
            sum_wrong2 += 2 * wrong[c] + 1
            sum_cross += size[c]
            wrong[c] += 1
            errs += 1
        share = errs / total if total else 0.0
        if 0.0 < share < 1.0 and groups >= 2:
            between = groups / (groups - 1) * (sum_wrong2 - 2 * share * sum_cross + share**2 * sum_size2) / total**2
            effects[k] = min(max(between / (share * (1 - share) / total), 1.0), largest)
    return effects


def _median_unbiased(errors: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    """Return the one-sided Clopper-Pearson bound at `SELECTION_CONFIDENCE` of each errors/decisions (1 if all wrong)."""
    errors, decisions = np.asarray(errors, dtype=float), np.asarray(decisions, dtype=float)
    all_wrong = errors >= decisions
    bound = beta.ppf(SELECTION_CONFIDENCE, errors + 1, np.where(all_wrong, 1.0, decisions - errors))
    return np.where(all_wrong, 1.0, bound)


def as_independent(rate: Mapping[str, float | int]) -> str:
    """Return ", as N independent" where a rate's decisions err together enough to count as fewer, else ""."""
    effect = float(rate.get("design_effect", 1.0))
    return f", as {rate['decisions'] / effect:.0f} independent" if effect >= 1.05 else ""


def _support_notes(thresholds: Thresholds, min_decisions: int) -> list[str]:
    """Return a note for each error target that the number of calibration decisions cannot support."""
    notes = []
    for name, r in thresholds.rates().items():
        if name == "wrong_id" and not thresholds.decides_known:
            continue
        if r["decisions"] / r["design_effect"] < min_decisions or r["upper_bound"] > r["target"]:
            notes.append(
                f"{r['decisions']} calibration decisions{as_independent(r)}: the {CONFIDENCE:.0%} upper bound on {name.replace('_', ' ')} "
                f"is {r['upper_bound']:.0%}, {'above' if r['upper_bound'] > r['target'] else 'near'} the "
                f"{r['target']:.0%} target; label more encounters (or calibrate on a larger labelled catalogue) to "
                "support it"
            )
    return notes


def evaluate_thresholds(
    t_known: float,
    t_new: float,
    known_top: np.ndarray,
    known_correct: np.ndarray,
    unseen_top: np.ndarray,
    *,
    margin: float = 0.0,
    known_margin: np.ndarray | None = None,
    unseen_margin: np.ndarray | None = None,
    known_individuals: np.ndarray | None = None,
    unseen_individuals: np.ndarray | None = None,
    notes: tuple[str, ...] = (),
    **targets: float,
) -> Thresholds:
    """Return `Thresholds` with the counts of errors and decisions they give on these held-out decisions, and,
    given the individual each decision is about, how much those decisions err together (`design_effect`)."""
    known_top, unseen_top = np.asarray(known_top, dtype=float), np.asarray(unseen_top, dtype=float)
    known_correct = np.asarray(known_correct, dtype=bool)
    probe = Thresholds(t_known, t_new, margin)
    known_decided = probe.decide(known_top, known_margin)
    unseen_decided = probe.decide(unseen_top, unseen_margin)
    effects: dict[str, float] = {}
    if known_individuals is not None and unseen_individuals is not None:
        known_individuals = np.asarray(known_individuals, dtype=object)
        unseen_individuals = np.asarray(unseen_individuals, dtype=object)
        given_known, given_unseen = known_decided == KNOWN, unseen_decided == KNOWN
        effects = {
            "wrong_id": design_effect(
                np.concatenate([~known_correct[given_known], np.ones(int(given_unseen.sum()), bool)]),
                np.concatenate([known_individuals[given_known], unseen_individuals[given_unseen]]),
            ),
            "false_new": design_effect(known_decided == NEW, known_individuals),
            "false_merge": design_effect(given_unseen, unseen_individuals),
        }
    return Thresholds(
        known=t_known,
        new=t_new,
        margin=margin,
        wrong_ids=int(((known_decided == KNOWN) & ~known_correct).sum() + (unseen_decided == KNOWN).sum()),
        known_decisions=int((known_decided == KNOWN).sum() + (unseen_decided == KNOWN).sum()),
        false_new=int((known_decided == NEW).sum()),
        known_queries=len(known_top),
        false_merges=int((unseen_decided == KNOWN).sum()),
        unseen_queries=len(unseen_top),
        reviewed=int((known_decided == REVIEW).sum() + (unseen_decided == REVIEW).sum()),
        design_effects=effects,
        notes=notes,
        **targets,
    )


def group_new_individuals(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """Return a cluster label per item: items whose average-linkage similarity reaches `threshold` share one.

    `similarity` is a symmetric (N, N) matrix of scores on the same scale as the
    thresholds; `threshold` is the calibrated grouping threshold (`Thresholds.group`),
    or the known one.
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
    lead = {e: _lead(p) for e, p in pooled.items()}
    verdicts = thresholds.decide(
        np.array([top[e] for e in encounter_order]), np.array([lead[e] for e in encounter_order])
    )
    decided = dict(zip(encounter_order, verdicts, strict=True))
    grouping = thresholds.known if thresholds.group is None else thresholds.group
    new_ids = provisional_ids(
        [e for e in encounter_order if decided[e] == NEW], members, sides, grouping, new_prefix, similarity
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
                    "margin": lead[e],
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


def _lead(pooled: Mapping[str, float]) -> float:
    """Return the top individual's lead over the runner-up (inf when there is none; NaN when nothing was found)."""
    if not pooled:
        return float("nan")
    ordered = sorted(pooled.values(), reverse=True)
    return ordered[0] - ordered[1] if len(ordered) > 1 else float("inf")


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
