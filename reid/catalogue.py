"""The catalogue: one validated table with one row per flank annotation.

Every importer builds its rows as plain records and passes them through
`build_catalogue`, which normalises types, reports bad rows (naming the row and
the fix) and drops them, so every table in the project has the same columns,
dtypes and guarantees. Catalogues are saved as CSV, never pickled.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas._libs.tslibs.nattype import NaTType

from reid.errors import CatalogueError, Problem
from reid.files import atomic_write

SIDES = ("left", "right", "unknown")
# Which gallery sides a query of each side is searched against: flanks differ, so never left against right.
# An unknown-side entry could be either flank, and an unknown-side query searches everything.
SEARCHED_SIDES: dict[str, tuple[str, ...]] = {
    "left": ("left", "unknown"),
    "right": ("right", "unknown"),
    "unknown": SIDES,
}
SEXES = ("female", "male", "unknown")
BBOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
DEFAULT_ENCOUNTER_GAP_S = 60.0
METRES_PER_DEGREE = 111_320.0  # of latitude, and of longitude at the equator


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # "string", "float" or "timestamp"
    required: bool
    description: str


COLUMNS: tuple[Column, ...] = (
    Column("annotation_id", "string", True, "unique ID of this flank annotation"),
    Column("image_path", "string", True, "image file; in a saved catalogue, relative to the catalogue's folder"),
    Column("individual_id", "string", False, "namespaced individual ID such as KZ-0007; empty when unknown"),
    Column("side", "string", True, "flank shown: left, right or unknown"),
    Column("bbox_x", "float", False, "left edge of the flank box, pixels of the EXIF-oriented image"),
    Column("bbox_y", "float", False, "top edge of the flank box, pixels"),
    Column("bbox_w", "float", False, "box width, pixels; all four box columns empty = whole image"),
    Column("bbox_h", "float", False, "box height, pixels"),
    Column(
        "mask",
        "string",
        False,
        "where the animal is: a mask image (non-zero = animal; in a saved catalogue, relative to its folder), or "
        "COCO polygons [[x1, y1, x2, y2, ...], ...] or RLE as JSON, pixels of the image; empty = not known",
    ),
    Column("timestamp", "timestamp", False, "capture time, ISO 8601; held in UTC, naive times are taken as UTC"),
    Column("station", "string", False, "camera station (deployment or location)"),
    Column("country", "string", False, "catalogue namespace that owns the record: KZ, TM, ..."),
    Column("encounter_id", "string", False, "burst or event the image belongs to; filled by assign_encounters"),
    Column("sex", "string", False, "female, male or unknown"),
    Column("latitude", "float", False, "station latitude, WGS84 degrees"),
    Column("longitude", "float", False, "station longitude, WGS84 degrees"),
    Column("source", "string", False, "file the row was imported from"),
    Column("source_row", "string", False, "where in that file: row number, annotation or observation ID"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.required)

_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
_SIDE_ALIASES = {"l": "left", "r": "right", "": "unknown", "?": "unknown", "na": "unknown", "none": "unknown"}
_SEX_ALIASES = {"f": "female", "m": "male", "": "unknown", "?": "unknown", "na": "unknown", "none": "unknown"}


def build_catalogue(
    records: Iterable[Mapping[str, Any]] | pd.DataFrame, *, source: str = "", first_line: int | None = None
) -> tuple[pd.DataFrame, list[Problem]]:
    """Return (catalogue, problems): records normalised and validated, bad rows reported and dropped.

    Records carry catalogue column names; missing optional columns are left empty,
    other keys are ignored. `source` names the input in messages where a record has
    no `source` of its own; with `first_line`, messages name file lines (record i at
    line first_line + i) instead of `source_row`. Missing annotation IDs are derived
    from the image path relative to the images' common folder (`#k` for a k-th box).
    """
    frame = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    for name in COLUMN_NAMES:
        if name not in frame.columns:
            frame[name] = None
    frame = frame[list(COLUMN_NAMES)].reset_index(drop=True)
    raw = frame.astype(object).where(frame.notna(), None)
    if source:
        raw["source"] = [s if _present(s) else source for s in raw["source"]]

    problems: list[Problem] = []
    bad = np.zeros(len(raw), dtype=bool)

    def where(i: int) -> str:
        if first_line is not None:
            return f"row {first_line + i}"
        return str(raw.at[i, "source_row"] or f"record {i + 1}")

    def complain(i: int, message: str) -> None:
        bad[i] = True
        origin = source if first_line is not None else str(raw.at[i, "source"] or source)
        problems.append(Problem(origin, where(i), message))

    table = pd.DataFrame(index=raw.index)
    for column in COLUMNS:
        values = raw[column.name]
        if column.dtype == "string":
            table[column.name] = pd.array([_clean_string(v) for v in values], dtype="string")
        elif column.dtype == "float":
            parsed = pd.to_numeric(values.map(_clean_string), errors="coerce").astype(float)
            for i in np.flatnonzero(parsed.isna().to_numpy() & values.map(_present).to_numpy()).tolist():
                complain(i, f"{column.name} {values[i]!r} is not a number; write a number or leave it empty")
            table[column.name] = parsed
        else:
            table[column.name] = _parse_timestamps(
                values,
                lambda i, v: complain(
                    i, f"timestamp {v!r} is not ISO 8601 (like 2021-04-05T19:08:33+05:00); fix it or leave it empty"
                ),
            )

    for column in COLUMNS:
        if column.dtype != "string" or column.name in ("source", "source_row"):
            continue
        for i, value in enumerate(table[column.name]):
            if value is not pd.NA and (found := _CONTROL_CHARACTER.search(value)):
                character = "NUL" if found.group() == "\0" else f"U+{ord(found.group()):04X}"
                complain(
                    i,
                    f"{column.name} {value!r} contains an invisible control character ({character}); remove it",
                )

    table["side"] = _normalise_choice(table["side"], SIDES, _SIDE_ALIASES, "side", complain)
    table["sex"] = _normalise_choice(table["sex"], SEXES, _SEX_ALIASES, "sex", complain)

    for i in np.flatnonzero(table["image_path"].isna().to_numpy()).tolist():
        complain(i, "image_path is empty; give the image file of this annotation")

    box = table[list(BBOX_COLUMNS)].to_numpy(dtype=float)
    has_box = ~np.isnan(box)
    for i in np.flatnonzero(has_box.any(axis=1) & ~has_box.all(axis=1)).tolist():
        complain(i, "box is incomplete; give all of bbox_x, bbox_y, bbox_w, bbox_h or none")
    with np.errstate(invalid="ignore"):
        for i in np.flatnonzero(has_box.all(axis=1) & ((box[:, 2] <= 0) | (box[:, 3] <= 0))).tolist():
            complain(i, f"box width and height must be positive, got {box[i, 2]:g} x {box[i, 3]:g}")
        for i in np.flatnonzero(has_box.all(axis=1) & ((box[:, 0] < 0) | (box[:, 1] < 0))).tolist():
            complain(
                i,
                f"box corner ({box[i, 0]:g}, {box[i, 1]:g}) is negative; boxes are in pixels from the top-left corner",
            )
        lat, lon = table["latitude"].to_numpy(), table["longitude"].to_numpy()
        for i in np.flatnonzero((np.abs(lat) > 90) | (np.abs(lon) > 180)).tolist():
            complain(i, f"coordinates ({lat[i]:g}, {lon[i]:g}) are outside -90..90 / -180..180 degrees")

    missing_id = table["annotation_id"].isna().to_numpy() & table["image_path"].notna().to_numpy()
    if missing_id.any():
        paths = table["image_path"].astype(object)
        rank = paths.groupby(paths).cumcount()
        # Relative to the images' common folder, so an ID does not depend on where the data lives.
        root = os.path.commonpath([os.path.dirname(p) for p in paths[missing_id]])
        names = [Path(os.path.relpath(p, root)).as_posix() if isinstance(p, str) else "" for p in paths]
        derived = [p if k == 0 else f"{p}#{k}" for p, k in zip(names, rank, strict=True)]
        table.loc[missing_id, "annotation_id"] = pd.array(derived, dtype="string")[missing_id]
    first_row: dict[str, str] = {}
    for i, annotation_id in enumerate(table["annotation_id"]):
        if bad[i] or annotation_id is pd.NA:
            continue
        if annotation_id in first_row:
            complain(
                i, f"annotation_id {annotation_id!r} is already used by {first_row[annotation_id]}; IDs must be unique"
            )
        else:
            first_row[annotation_id] = where(i)

    _drop_conflicting_labels(table, bad, where, complain)
    return _typed(table.loc[~bad]).reset_index(drop=True), problems


def _drop_conflicting_labels(table: pd.DataFrame, bad: np.ndarray, where: Any, complain: Any) -> None:
    """Report and drop every row of an image (and box) that other rows label as a different individual.

    A picture shows one animal: which label is right cannot be guessed, so none is kept.
    """
    labelled = ~bad & table["individual_id"].notna().to_numpy() & table["image_path"].notna().to_numpy()
    box = table[list(BBOX_COLUMNS)].to_numpy(dtype=float)
    rows_of: dict[tuple[str, str], list[int]] = {}
    for i in np.flatnonzero(labelled).tolist():
        shown = "whole image" if np.isnan(box[i]).any() else "box " + ",".join(f"{v:g}" for v in box[i])
        rows_of.setdefault((str(table.at[i, "image_path"]), shown), []).append(i)
    for (image, shown), rows in rows_of.items():
        label = {i: str(table.at[i, "individual_id"]) for i in rows}
        if len(set(label.values())) < 2:
            continue
        for i in rows:
            others = "; ".join(f"{where(j)} says {label[j]}" for j in rows if j != i)
            complain(
                i,
                f"image {image} ({shown}) is labelled {label[i]} here but {others}; "
                "one picture shows one animal: correct the wrong label (none of these rows is used)",
            )


def image_problem(table: pd.DataFrame, i: int, image: str, reason: str) -> Problem:
    """Return the problem of table row i (by position) whose image cannot be used.

    Named by the file and line the row was imported from (`source`, `source_row`:
    "labels.csv row 5", a CSV line as everywhere else) when the table says so,
    else by the image file alone.
    """
    origin = [table[column].iat[i] if column in table.columns else None for column in ("source", "source_row")]
    if all(_present(value) for value in origin):
        return Problem(str(origin[0]), str(origin[1]), f"image {image}: {reason}")
    return Problem(str(image), "", reason)


def validate(table: pd.DataFrame, *, source: str = "catalogue", first_line: int | None = None) -> pd.DataFrame:
    """Return the table normalised; raise CatalogueError listing every bad row."""
    missing = [name for name in REQUIRED_COLUMNS if name not in table.columns]
    if missing:
        raise CatalogueError(
            f"{source}: missing required columns {missing}; a catalogue has the columns {list(COLUMN_NAMES)}"
        )
    clean, problems = build_catalogue(table, source=source, first_line=first_line)
    if problems:
        listed = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CatalogueError(f"{len(problems)} invalid rows in {source}:\n  {listed}{more}")
    return clean


def save_catalogue(table: pd.DataFrame, path: str | Path) -> None:
    """Write the catalogue as CSV, atomically; image paths under its folder are stored relative to it."""
    path = Path(path)
    table = validate(table, source=str(path))
    out = table.astype(object).where(table.notna(), None)
    root = path.parent.resolve()
    out["image_path"] = [_relative_to(Path(p), root) for p in table["image_path"]]
    out["mask"] = [_relative_to(Path(m), root) if is_mask_file(m) else m for m in out["mask"]]
    out["timestamp"] = [t.isoformat() if not pd.isna(t) else None for t in table["timestamp"]]
    with atomic_write(path) as f:
        out.to_csv(f, index=False)


def load_catalogue(path: str | Path) -> pd.DataFrame:
    """Read a catalogue CSV written by `save_catalogue`; raise CatalogueError naming every bad row."""
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"{path}: catalogue file not found; build one with an importer or check the path")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CatalogueError(f"{path}: not a readable CSV ({err}); restore it from a backup or re-import") from err
    table = validate(raw, source=str(path), first_line=2)
    root = path.parent.resolve()
    table["image_path"] = pd.array([str(_resolve(p, root)) for p in table["image_path"]], dtype="string")
    table["mask"] = pd.array(
        [str(_resolve(m, root)) if is_mask_file(m) else m for m in table["mask"].astype(object)], dtype="string"
    )
    return table


def is_mask_file(value: Any) -> bool:
    """Return whether a `mask` value names a mask image (not empty, not polygons or RLE written as JSON)."""
    text = _clean_string(value)
    return text is not None and text[0] not in "[{"


def generalise_coordinates(table: pd.DataFrame, precision_deg: float = 0.1) -> tuple[pd.DataFrame, int]:
    """Return a copy with latitude/longitude rounded to `precision_deg`, and the worst-case error in metres.

    Poaching makes exact camera positions sensitive: shared exports carry rounded
    coordinates and say how far off they may be (Camtrap DP's `coordinatePrecision`
    and `coordinateUncertainty`). The error bound is half a step in each direction
    at the equator, where a degree of longitude is longest.
    """
    if not precision_deg > 0:
        raise CatalogueError(f"coordinate precision must be a positive number of degrees, got {precision_deg}")
    out = table.copy()
    decimals = max(0, -math.floor(math.log10(precision_deg)) + 1)
    for column in ("latitude", "longitude"):
        if column in out.columns:
            steps = np.round(out[column].astype(float) / precision_deg)
            out[column] = (steps * precision_deg).round(decimals)
    uncertainty_m = math.ceil(math.hypot(precision_deg / 2, precision_deg / 2) * METRES_PER_DEGREE)
    return out, uncertainty_m


def assign_encounters(table: pd.DataFrame, gap_s: float = DEFAULT_ENCOUNTER_GAP_S) -> pd.DataFrame:
    """Return a copy whose empty encounter IDs are filled: same station, consecutive images within `gap_s`.

    Encounter IDs the source already gives (camera sequence or event IDs) are kept.
    Images with no station or no timestamp each form their own encounter.
    """
    table = table.copy()
    todo = table["encounter_id"].isna()
    if not todo.any():
        return table
    rows = table.loc[todo]
    ids = pd.Series(pd.NA, index=rows.index, dtype="string")
    timed = rows["station"].notna() & rows["timestamp"].notna()
    untimed = rows.index[~timed]
    if len(untimed):
        # Relative to the images' common folder, so the ID does not depend on where the data lives.
        paths = rows.loc[untimed, "image_path"].astype(str)
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        for i, p in zip(untimed, paths, strict=True):
            ids[i] = "image:" + Path(os.path.relpath(p, root)).as_posix()
    # Two boxes in one frame share its timestamp, so they always fall in one encounter.
    for (country, station), group in rows[timed].groupby([rows["country"].fillna(""), "station"], sort=True):
        group = group.sort_values("timestamp", kind="stable")
        new_event = group["timestamp"].diff().dt.total_seconds().fillna(math.inf) > gap_s
        event_start = group["timestamp"].where(new_event).ffill()
        prefix = f"{country}/{station}" if country else str(station)
        for i, start in zip(group.index, event_start, strict=True):
            ids[i] = f"{prefix}/{start.strftime('%Y%m%dT%H%M%SZ')}"
    table.loc[todo, "encounter_id"] = ids
    return table


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    for column in COLUMNS:
        values = table[column.name]
        if column.dtype == "string":
            out[column.name] = values.astype("string")
        elif column.dtype == "float":
            out[column.name] = values.astype(float)
        else:
            out[column.name] = pd.to_datetime(values, utc=True)
    return out


def _present(value: Any) -> bool:
    return _clean_string(value) is not None


def _clean_string(value: Any) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _parse_timestamps(values: pd.Series, complain: Any) -> pd.Series:
    parsed: list[pd.Timestamp | NaTType] = []
    for i, value in enumerate(values):
        if isinstance(value, pd.Timestamp | np.datetime64) or hasattr(value, "isoformat"):
            stamp = pd.Timestamp(value)
        elif (text := _clean_string(value)) is None:
            parsed.append(pd.NaT)
            continue
        else:
            try:
                # fromisoformat, not pd.Timestamp: the latter reads "12" or "2021" as a date.
                stamp = pd.Timestamp(datetime.fromisoformat(text))
            except (ValueError, TypeError):
                complain(i, value)
                parsed.append(pd.NaT)
                continue
        if pd.isna(stamp):
            parsed.append(pd.NaT)
            continue
        parsed.append(stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC"))
    return pd.Series(pd.to_datetime(pd.Series(parsed, dtype=object), utc=True).to_numpy(), index=values.index)


def _normalise_choice(
    values: pd.Series, allowed: tuple[str, ...], aliases: dict[str, str], name: str, complain: Any
) -> pd.Series:
    out = []
    for i, value in enumerate(values):
        key = "" if value is pd.NA else str(value).lower()
        choice = aliases.get(key, key)
        if choice not in allowed:
            complain(i, f"{name} {value!r} is not one of {', '.join(allowed)}")
        out.append(choice if choice in allowed else "unknown")
    return pd.Series(pd.array(out, dtype="string"), index=values.index)


def _relative_to(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (root / p).resolve()
