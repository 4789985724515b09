"""The analyst's loop after a match: review in the browser, enrol what a person confirmed, recount.

    python infer.py mode=review      # the newest match run; review.run=outputs/infer/<run> for another
    python infer.py mode=enrol       # confirmed captures into the gallery, as a new version
    python infer.py mode=count count_from=review

Enrolment applies only what reviewers agree on: captures confirmed as a catalogue
individual are added under its ID; each new individual of the review gets the
next free ID of its namespace (`KZ-0012`). It checks the whole review log first:
one bad row and nothing is enrolled. Re-running it adds nothing twice.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from reid.census import count_bounds
from reid.errors import Problem, ReidError
from reid.files import sha256_file, write_csv
from reid.gallery import Gallery, current_version, entry_key, gallery_lock
from reid.models import Embedder, model_fingerprint
from reid.review import (
    NEW_LABEL,
    MatchRun,
    ReviewError,
    encounter_states,
    find_match_run,
    reviewed_captures,
)
from reid.workflows.build import build_gallery
from reid.workflows.common import Outcome, write_counts

log = logging.getLogger(__name__)

ENROLLED_COLUMNS = ["encounter_id", "image_path", "side", "review_label", "individual_id", "status"]
"""enrolled.csv: one row per confirmed capture, the ID it was enrolled under, and whether it was added now."""


def run_review(
    runs_dir: str | Path,
    run: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    open_browser: bool = True,
    reviewer: str = "",
) -> Outcome:
    """`infer.py mode=review`: serve the review page of a match run (the newest by default) until Ctrl-C."""
    # Flask is needed only to serve the page.
    from reid.review_app import create_app, serve

    folder = find_match_run(runs_dir, run)
    loaded = MatchRun.load(folder)
    entries = _gallery_entries(loaded)
    problems = []
    if entries is None:
        problems.append(
            Problem(loaded.info.gallery, "", "gallery not found: typed IDs are not checked against the catalogue")
        )
        log.warning("%s", problems[-1])
    app = create_app(folder, gallery_entries=entries, reviewer=reviewer)
    serve(app, host=host, port=port, open_browser=open_browser)
    return Outcome({"review log": loaded.log().path}, problems)


def enrol_reviewed(
    run_dir: str | Path,
    embedder: Embedder,
    gallery_dir: str | Path | None = None,
    *,
    namespace: str | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[Problem]]:
    """Add a match run's confirmed captures to the gallery it was matched against; return what was enrolled.

    The returned table has one row per capture: its encounter, the review's label
    and the catalogue ID it was enrolled under. Raises ReviewError, enrolling
    nothing, when the log has a bad row or belongs to another gallery.
    """
    run = MatchRun.load(run_dir)
    if run.info.kind != "match":
        raise ReviewError(
            f"{run.folder} reviews a partner's individuals: confirm them as aliases with `python share.py "
            f"mode=confirm candidates={run.folder} partner=<the partner folder>`"
        )
    gallery_dir = Path(gallery_dir or run.info.gallery)
    with gallery_lock(gallery_dir):
        gallery = Gallery.load(gallery_dir, embedder_fingerprint=model_fingerprint(embedder))
        if gallery.identity != run.info.gallery_id:
            raise ReviewError(
                f"{run.folder} was matched against another gallery ({run.info.gallery_id}) than {gallery_dir} "
                f"({gallery.identity}); enrol it into {run.info.gallery}, or match the card against this gallery"
            )
        states = encounter_states(run.log().read(known_ids=set(gallery.entries["individual_id"].dropna())))
        captures = run.captures()
        problems = [
            Problem(str(run.log().path), f"encounter {e}", f"reviewers disagree ({_answers(s.answers)}): not enrolled")
            for e, s in states.items()
            if s.status == "conflict"
        ]
        confirmed = []
        for encounter_id, rows in captures.groupby("encounter_id", sort=False):
            state = states.get(str(encounter_id))
            if state is None or state.status != "confirmed":
                continue
            rows = rows.assign(review_label=state.individual_id)
            confirmed.append(rows.assign(side=state.side) if state.side else rows)
        if not confirmed:
            return pd.DataFrame(columns=ENROLLED_COLUMNS), problems
        chosen = pd.concat(confirmed, ignore_index=True)
        keys = [_capture_key(row) for _, row in chosen.iterrows()]
        stored = _entries_by_key(gallery)
        ids = _catalogue_ids(chosen, keys, stored, namespace)
        chosen["individual_id"] = pd.array([ids[label] for label in chosen["review_label"]], dtype="string")
        before = [stored.get(k) if k else None for k in keys]
        fresh = np.array([b is None for b in before])
        more: list[Problem] = []
        if fresh.any():
            gallery, more = build_gallery(
                chosen[fresh].drop(columns="review_label"), embedder, gallery_dir, progress=progress
            )
        after = _entries_by_key(gallery)
    status = []
    for key, was, row in zip(keys, before, chosen.itertuples(), strict=True):
        if was is None:
            status.append("enrolled" if key in after else "not enrolled: see the problems")
        elif was == row.individual_id:
            status.append("already in the gallery")
        else:
            status.append(f"already in the gallery as {was}")
            more.append(
                Problem(
                    str(row.image_path),
                    f"encounter {row.encounter_id}",
                    f"the review says {row.review_label} but the gallery holds this picture as {was}: correct "
                    "the gallery or review the encounter again",
                )
            )
    enrolled = chosen.assign(status=status)[ENROLLED_COLUMNS]
    return enrolled, problems + more


def run_enrol(
    runs_dir: str | Path,
    run: str | None,
    embedder: Embedder,
    out_dir: str | Path,
    *,
    gallery_dir: str | Path | None = None,
    namespace: str | None = None,
    progress: bool = True,
) -> Outcome:
    """`infer.py mode=enrol`: enrol a match run's confirmed captures (the newest run by default)."""
    folder = find_match_run(runs_dir, run)
    gallery = Path(gallery_dir or MatchRun.load(folder).info.gallery)
    previous = current_version(gallery)
    enrolled, problems = enrol_reviewed(folder, embedder, gallery, namespace=namespace, progress=progress)
    added = enrolled[enrolled["status"] == "enrolled"]
    new = added.drop_duplicates("review_label")
    new = new[new["review_label"].astype(str).str.match(NEW_LABEL.pattern)]
    summary = {
        "enrolled": {
            "captures": len(added),
            "individuals": added["individual_id"].nunique(),
            "new individuals": len(new),
            **{str(r.review_label): r.individual_id for r in new.itertuples()},
            "already in the gallery": int(enrolled["status"].str.startswith("already").sum()),
        }
    }
    if len(added):
        summary["gallery"] = {
            "version": current_version(gallery),
            "to go back": f"write {previous} into {gallery / 'CURRENT'}",
            "next": "python infer.py mode=calibrate (the thresholds then use the new entries too)",
        }
    path = write_csv(enrolled, Path(out_dir) / "enrolled.csv")
    return Outcome({"enrolled": path}, problems, summary)


def recount(
    run_dir: str | Path, *, count_by: tuple[str, ...] = ("country",), period: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Return a match run's count bounds after its review, the individuals with their supporting captures, and
    the encounters still awaiting a person.

    Confirmed captures and uncontradicted known decisions are decided; every other
    encounter is one possible animal more (`census.count_bounds`). Unusable
    captures are not counted.
    """
    run = MatchRun.load(run_dir)
    states = encounter_states(run.log().read())
    decided, unresolved = reviewed_captures(run.captures(), run.decisions, states)
    gallery = _gallery_entries(run)
    table = count_bounds(decided, unresolved, by=count_by, period=period, known_sides=gallery)
    confirmed = {e for e, s in states.items() if s.status == "confirmed"}
    individuals = (
        decided.assign(
            how=["confirmed" if str(e) in confirmed else "decided known" for e in decided["encounter_id"]],
            timestamp=decided["timestamp"].astype(str),
        )
        .groupby("individual_id")
        .agg(
            how=("how", lambda s: "+".join(sorted(set(s)))),
            sides=("side", lambda s: "+".join(sorted(set(s)))),
            encounters=("encounter_id", "nunique"),
            captures=("image_path", lambda s: ";".join(sorted(s.astype(str)))),
        )
        .reset_index()
    )
    # Every unresolved encounter (to review, provisionally new, or disputed) awaits a person.
    return table, individuals, sorted(unresolved["encounter_id"].dropna().astype(str).unique())


def run_recount(
    runs_dir: str | Path,
    run: str | None,
    out_dir: str | Path,
    *,
    count_by: tuple[str, ...] = ("country",),
    period: str | None = None,
) -> Outcome:
    """`infer.py mode=count count_from=review`: counts of a match run (the newest by default) after its review."""
    folder = find_match_run(runs_dir, run)
    table, individuals, pending = recount(folder, count_by=count_by, period=period)
    combined = table.iloc[0]
    files = {
        "counts": write_counts(table, out_dir),
        "individuals": write_csv(individuals, Path(out_dir) / "individuals.csv"),
    }
    summary = {
        "individuals": {
            "minimum": combined["minimum"],
            "maximum": combined["maximum"],
            "decided": combined["decided_individuals"],
            "encounters awaiting review": len(pending),
        }
    }
    return Outcome(files, [], summary)


def _catalogue_ids(
    chosen: pd.DataFrame, keys: list[str | None], stored: dict[str, str], namespace: str | None
) -> dict[str, str]:
    """Return the catalogue ID of each review label: catalogue IDs stay; a new individual keeps the ID an earlier
    enrolment of any of its captures gave it, else gets the next free `<namespace>-NNNN`."""
    ids = {label: label for label in chosen["review_label"] if not NEW_LABEL.match(label)}
    taken = set(stored.values())
    for label, rows in chosen.groupby("review_label", sort=False):
        if label in ids:
            continue
        earlier = {stored[k] for k in (keys[i] for i in rows.index) if k in stored}
        if earlier:
            ids[str(label)] = sorted(earlier)[0]
            continue
        prefix = namespace or _namespace(rows)
        pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)$")
        number = max((int(m.group(1)) for m in map(pattern.match, taken) if m), default=0) + 1
        ids[str(label)] = f"{prefix}-{number:04d}"
        taken.add(ids[str(label)])
    return ids


def _capture_key(row: pd.Series) -> str | None:
    """Return a capture's gallery entry key (image content and box), None when its image cannot be read."""
    try:
        return entry_key(sha256_file(row["image_path"]), row)
    except OSError:
        return None


def _entries_by_key(gallery: Gallery) -> dict[str, str]:
    return {
        entry_key(h, row): str(row["individual_id"])
        for h, (_, row) in zip(gallery.entries["content_hash"], gallery.entries.iterrows(), strict=True)
    }


def _namespace(rows: pd.DataFrame) -> str:
    countries = set(rows["country"].dropna().astype(str))
    if len(countries) != 1:
        raise ReviewError(
            f"cannot tell which catalogue a new individual belongs to (countries: {', '.join(sorted(countries)) or 'none'}"
            "); set the namespace of new IDs: review.namespace=KZ"
        )
    return countries.pop()


def _gallery_entries(run: MatchRun) -> pd.DataFrame | None:
    try:
        return Gallery.load(run.info.gallery).entries
    except (ReidError, OSError):  # the run's gallery moved: counts then know only the run's own sides
        return None


def _answers(answers: tuple[tuple[str, str, str], ...]) -> str:
    return "; ".join(f"{reviewer}: {action} {individual}".strip() for reviewer, action, individual in answers)
