"""A person's review of a match run: an append-only log of what reviewers said, and what it settles.

Every action on the review page (same as candidate N, another ID typed in, new
individual, not a flank / unusable, side is wrong, skip) is one row appended to
`review.csv` in the match run's folder and flushed to disk before the page shows
it. Nothing is rewritten: a changed mind is a later row, and each reviewer's
latest answer for an encounter counts. Reviewers who disagree on an encounter
are a conflict that enrolment and counts leave open until one of them changes
their answer. A new individual gets a label of this review (`new-3`), which
enrolment turns into a namespaced catalogue ID (`KZ-0012`).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd

from reid import __version__
from reid.catalogue import load_catalogue
from reid.decisions import KNOWN, UNREADABLE
from reid.errors import ReidError
from reid.files import atomic_write

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
"""What a match run was made against (gallery, its version, software version): review and enrol check it."""
CAPTURES_FILE = "captures.csv"
"""The run's readable query captures as a catalogue (boxes, sides, stations, times): what enrol adds."""
ENCOUNTERS_FILE = "encounters.json"
"""Per encounter: its pictures, decision and ranked candidates with thumbnails and correspondences."""
REVIEW_FILE = "review.csv"


class ReviewError(ReidError):
    """A review log or match run folder that cannot be used as it is."""


class Action(StrEnum):
    """What a reviewer can say about an encounter."""

    SAME = "same"
    """The same animal as one of the candidates (`candidate_rank`)."""
    OTHER = "other"
    """The same animal as an ID the reviewer typed: a catalogue ID or a new individual of this review."""
    NEW = "new"
    """An animal not in the catalogue: it gets a new label of this review."""
    UNUSABLE = "unusable"
    """Not a flank, or too poor to identify: not counted, not enrolled."""
    WRONG_SIDE = "wrong_side"
    """The side is the other one (left <-> right); the identity is still open."""
    SKIP = "skip"
    """Looked at, left for later."""


IDENTITY_ACTIONS = (Action.SAME, Action.OTHER, Action.NEW)

REVIEW_COLUMNS: Mapping[str, str] = {
    "action_id": "string",
    "time": "string",
    "reviewer": "string",
    "run_id": "string",
    "gallery_id": "string",
    "encounter_id": "string",
    "action": "string",
    "individual_id": "string",
    "candidate_rank": "Int64",
    "score": "float64",
    "side": "string",
    "software_version": "string",
}
"""review.csv: one row per reviewer action, in the order they were taken."""

NEW_LABEL = re.compile(r"^new-(\d+)$")


@dataclass(frozen=True)
class RunInfo:
    """What a match run was made against: review logs and enrolment must belong to the same run and gallery."""

    run_id: str
    gallery: str
    """The gallery folder the run searched."""
    gallery_id: str
    """The gallery's identity (when it was first built and with which embedder): the same across its versions."""
    gallery_version: str
    software_version: str
    created: str = field(default_factory=lambda: _now())
    kind: str = "match"
    """match (a card of captures: each encounter is one animal) or shared (a partner's individuals to confirm)."""
    partner: str = ""
    """A shared run: the partner catalogue's folder."""

    def save(self, run_dir: str | Path) -> Path:
        """Write run.json into the run folder; return its path."""
        path = Path(run_dir) / RUN_FILE
        with atomic_write(path) as f:
            json.dump(asdict(self), f, indent=2)
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> RunInfo:
        """Read a match run's run.json; raise ReviewError naming the folder and the fix."""
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise ReviewError(
                f"{run_dir} is not a match run of leopard-reid 0.3 or later (no {RUN_FILE}); "
                "match the card again with `python infer.py mode=match ...`"
            )
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise ReviewError(f"{path} is damaged ({err}); match the card again") from err


def find_match_run(runs_dir: str | Path, run: str | Path | None = None) -> Path:
    """Return the match run folder `run` (a path), or the newest run under `runs_dir` that has a run.json."""
    if run not in (None, "", "latest"):
        RunInfo.load(str(run))  # says why when it is not a run folder
        return Path(str(run))
    found = sorted(Path(runs_dir).glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ReviewError(
            f"no match run under {runs_dir}; run `python infer.py mode=match ...` first, or name one with "
            "review.run=outputs/infer/<date>_<time>"
        )
    return found[-1].parent


@dataclass
class MatchRun:
    """A match run folder as the review reads it."""

    folder: Path
    info: RunInfo
    decisions: pd.DataFrame
    encounters: list[dict[str, Any]]
    """Cards of `reid.report.encounter_cards`, one per encounter."""

    @classmethod
    def load(cls, folder: str | Path) -> MatchRun:
        """Read a match run: run.json, decisions.csv and encounters.json."""
        folder = Path(folder)
        info = RunInfo.load(folder)
        try:
            encounters = json.loads((folder / ENCOUNTERS_FILE).read_text())
            if info.kind == "shared":  # a partner's individuals: the cards say everything there is
                decisions = pd.DataFrame(
                    [
                        {"query": q["annotation_id"], "encounter_id": c["encounter_id"], "decision": c["decision"]}
                        for c in encounters
                        for q in c["queries"]
                    ],
                    columns=["query", "encounter_id", "decision"],
                )
            else:
                decisions = pd.read_csv(folder / "decisions.csv", dtype=str, keep_default_na=False)
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as err:
            raise ReviewError(f"{folder}: the run folder is incomplete ({err}); run its match again") from err
        return cls(folder, info, decisions.replace("", None), encounters)

    def captures(self) -> pd.DataFrame:
        """Return the run's readable captures (catalogue rows) with the encounter each was matched in."""
        captures = load_catalogue(self.folder / CAPTURES_FILE)
        readable = self.decisions[self.decisions["decision"] != UNREADABLE]
        encounter = dict(zip(readable["query"], readable["encounter_id"], strict=True))
        return captures.assign(
            encounter_id=pd.array([encounter.get(a) for a in captures["annotation_id"]], dtype="string")
        )

    def log(self) -> ReviewLog:
        """Return the run's review log."""
        return ReviewLog(self.folder / REVIEW_FILE, self.info)


class ReviewLog:
    """review.csv: appended one row per action, flushed before it counts; read and checked whole."""

    _lock = threading.Lock()

    def __init__(self, path: str | Path, run: RunInfo) -> None:
        self.path, self.run = Path(path), run

    def read(self, *, known_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Return the log's rows (`REVIEW_COLUMNS`), checked; raise ReviewError naming the first bad row and the fix.

        With `known_ids` (the catalogue's individual IDs), an ID that is neither one
        of them nor a new individual of this review is an error too.
        """
        if not self.path.is_file():
            return _typed([])
        try:
            # utf-8-sig: a spreadsheet that saved the log may have put a byte-order mark in front.
            text = self.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ReviewError(
                f"{self.path}: not UTF-8 text (byte {err.start}); save it again as CSV UTF-8, or restore it"
            ) from err
        if text and not text.endswith("\n"):
            # A machine that stopped mid-write leaves a partial last row: it never counted, so drop it.
            log.warning("%s: the last row was cut off (the machine stopped while writing it); ignored", self.path)
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        missing = [c for c in REVIEW_COLUMNS if c not in (reader.fieldnames or [])]
        if text and missing:
            raise ReviewError(
                f"{self.path}: columns {', '.join(missing)} are missing; restore the header line "
                f"({','.join(REVIEW_COLUMNS)})"
            )
        labels: set[str] = set()
        known = set(known_ids) if known_ids is not None else None
        for line, row in enumerate(rows, start=2):
            _check_row(row, self.path, line, self.run, labels, known)
        return _typed(rows)

    def append(self, *, reviewer: str, encounter_id: str, action: str, **fields: Any) -> dict[str, Any]:
        """Write one action at once (atomic append, fsync); return the row as written.

        A `new` action gets the next free label `new-<n>` of this review, chosen
        while the log is locked, so two browser tabs never hand out the same one.
        """
        if not str(reviewer).strip():
            raise ReviewError("enter your name as reviewer first: every action records who made it")
        try:
            action = Action(action)
        except ValueError as err:
            raise ReviewError(f"action {action!r} is not one of {', '.join(Action)}") from err
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.seek(0)
                data = f.read()
                if data and not data.endswith(b"\n"):
                    # A partial last row (the machine stopped mid-write) never counted: cut it before appending.
                    f.truncate(data.rfind(b"\n") + 1)
                    data = data[: data.rfind(b"\n") + 1]
                existing = data.decode("utf-8")
                if action is Action.NEW:
                    used = [int(m.group(1)) for m in map(NEW_LABEL.match, _column(existing, "individual_id")) if m]
                    fields["individual_id"] = f"new-{max(used, default=0) + 1}"
                row = {
                    **dict.fromkeys(REVIEW_COLUMNS, ""),
                    **{k: "" if v is None else v for k, v in fields.items() if k in REVIEW_COLUMNS},
                    "action_id": uuid.uuid4().hex,
                    "time": _now(),
                    "reviewer": str(reviewer).strip(),
                    "run_id": self.run.run_id,
                    "gallery_id": self.run.gallery_id,
                    "encounter_id": encounter_id,
                    "action": str(action),
                    "software_version": __version__,
                }
                _check_row({k: str(v) for k, v in row.items()}, self.path, None, self.run, set(), None)
                out = io.StringIO()
                writer = csv.DictWriter(out, fieldnames=list(REVIEW_COLUMNS), lineterminator="\n")
                if not existing:
                    writer.writeheader()
                writer.writerow(row)
                f.write(out.getvalue().encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return row


@dataclass(frozen=True)
class EncounterState:
    """What the review settled for one encounter."""

    status: str
    """open (nobody answered), confirmed, unusable or conflict."""
    individual_id: str | None = None
    """Confirmed: the catalogue ID or new-individual label the reviewers agree on."""
    side: str | None = None
    """The side a reviewer corrected it to, or None."""
    answers: tuple[tuple[str, str, str], ...] = ()
    """Each reviewer's current answer: (reviewer, action, individual_id)."""
    skipped: bool = False


def encounter_states(log_rows: pd.DataFrame) -> dict[str, EncounterState]:
    """Return each reviewed encounter's state: every reviewer's latest answer counts; disagreement is a conflict."""
    states = {}
    for encounter_id, rows in log_rows.groupby("encounter_id", sort=False):
        answers: dict[str, tuple[str, str]] = {}
        side = None
        for row in rows.astype(object).where(rows.notna(), "").to_dict("records"):
            if row["action"] in IDENTITY_ACTIONS or row["action"] == Action.UNUSABLE:
                answers[str(row["reviewer"])] = (str(row["action"]), str(row["individual_id"]))
            elif row["action"] == Action.WRONG_SIDE and row["side"]:
                side = str(row["side"])
        said = {("unusable" if a == Action.UNUSABLE else "id", i) for a, i in answers.values()}
        if not said:
            status, individual = "open", None
        elif len(said) > 1:
            status, individual = "conflict", None
        else:
            kind, individual_id = said.pop()
            status, individual = ("unusable", None) if kind == "unusable" else ("confirmed", individual_id)
        states[str(encounter_id)] = EncounterState(
            status,
            individual,
            side,
            tuple((r, a, i) for r, (a, i) in answers.items()),
            skipped=bool((rows["action"] == Action.SKIP).any()),
        )
    return states


def reviewed_captures(
    captures: pd.DataFrame, decisions: pd.DataFrame, states: Mapping[str, EncounterState]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (decided, unresolved) captures after the review, for `census.count_bounds`.

    Decided: captures of encounters a person confirmed (their individual_id is the
    confirmed ID or new-individual label) and of encounters the software decided
    known that nobody contradicted. Unresolved: the rest, one animal per encounter,
    except captures called unusable, which are not counted. Side corrections apply.
    """
    decision = decisions.drop_duplicates("encounter_id").set_index("encounter_id")
    decided, unresolved = [], []
    for encounter_id, rows in captures.groupby("encounter_id", sort=False, dropna=True):
        state = states.get(str(encounter_id), EncounterState("open"))
        if state.side is not None:
            rows = rows.assign(side=state.side)
        software = decision.loc[encounter_id] if encounter_id in decision.index else None
        if state.status == "confirmed":
            decided.append(rows.assign(individual_id=state.individual_id))
        elif state.status == "unusable":
            continue
        elif state.status == "open" and software is not None and software["decision"] == KNOWN:
            decided.append(rows.assign(individual_id=software["assigned_id"]))
        else:
            unresolved.append(rows)
    empty = captures.iloc[0:0]
    return (
        pd.concat(decided, ignore_index=True) if decided else empty,
        pd.concat(unresolved, ignore_index=True) if unresolved else empty,
    )


def _check_row(
    row: Mapping[str, str | None],
    path: Path,
    line: int | None,
    run: RunInfo,
    labels: set[str],
    known: set[str] | None,
) -> None:
    """Raise ReviewError if a log row is not one this review could have written (`labels` collects new labels)."""
    where = f"{path} row {line}" if line is not None else "this action"

    def bad(message: str) -> ReviewError:
        return ReviewError(f"{where}: {message}")

    def value(name: str) -> str:
        return (row.get(name) or "").strip()

    if value("run_id") != run.run_id or value("gallery_id") != run.gallery_id:
        raise bad(
            f"made for another match run or gallery (run {value('run_id') or '?'}, gallery "
            f"{value('gallery_id') or '?'}; this run is {run.run_id} against gallery {run.gallery_id}); "
            "review this run's captures in its own folder, or delete the row"
        )
    action = value("action")
    if action not in set(Action):
        raise bad(f"action {action!r} is not one of {', '.join(Action)}; correct or delete the row")
    if not value("encounter_id") or not value("reviewer"):
        raise bad("encounter_id and reviewer must be filled in; correct or delete the row")
    individual = value("individual_id")
    if action in IDENTITY_ACTIONS:
        if not individual:
            raise bad(f"action {action} needs an individual_id; correct or delete the row")
        if action == Action.NEW:
            if not NEW_LABEL.match(individual):
                raise bad(f"a new individual's label must look like new-1, not {individual!r}; correct the row")
            labels.add(individual)
        elif known is not None and individual not in known and individual not in labels:
            raise bad(
                f"individual {individual!r} is neither in the catalogue nor a new individual made earlier in this "
                "review; correct the ID or delete the row"
            )
    if action == Action.WRONG_SIDE and value("side") not in ("left", "right"):
        raise bad("a side correction needs side left or right; correct or delete the row")
    rank = value("candidate_rank")
    if rank and not rank.isdigit():
        raise bad(f"candidate_rank {rank!r} is not a whole number; correct or delete the row")
    try:
        float(value("score") or 0)
    except ValueError:
        raise bad(f"score {value('score')!r} is not a number; correct or delete the row") from None


def _column(text: str, name: str) -> list[str]:
    return [row.get(name) or "" for row in csv.DictReader(io.StringIO(text))] if text else []


def _typed(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=list(REVIEW_COLUMNS)).replace("", None)
    return table.astype(dict(REVIEW_COLUMNS))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
