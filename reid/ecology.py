"""Exports for ecologists: Camtrap DP packages, and capture histories for secr and multimark.

`export_camtrap_dp` writes a Camtrap DP 1.0.2 package (the TDWG camera-trap
exchange format) with `individualID` filled in and the flank in
`observationTags`; `validate_camtrap_dp` checks one offline against the official
schemas kept as local files. `secr_capture_history` and `multimark_histories`
turn identified captures into the inputs of the R packages secr (spatial
capture-recapture) and multimark (capture-recapture with two one-sided marks).

Location is sensitive: the Camtrap DP export generalises coordinates unless asked
not to. The secr trap file holds exact relative positions in metres (a density
analysis needs them), so treat it like exact coordinates.

Every table is checked before anything is written: rows that cannot be exported
(no station, no time, a station without coordinates, an unreadable image) raise
one `CatalogueError` naming each row and the fix, because a census quietly
missing captures is worse than no census. Rows that a format simply has no place
for (unidentified captures in a capture history) are left out by rule, as each
docstring says.
"""

from __future__ import annotations

import csv
import json
import math
import mimetypes
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
from PIL import Image

from reid.catalogue import generalise_coordinates, validate
from reid.errors import CatalogueError, Problem
from reid.files import atomic_write
from reid.images import ImageReadError, image_size

CAMTRAP_DP_VERSION = "1.0.2"
_CAMTRAP_DP_URL = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{CAMTRAP_DP_VERSION}/"
CAMTRAP_DP_PROFILE_URL = _CAMTRAP_DP_URL + "camtrap-dp-profile.json"
CAMTRAP_DP_PROFILE_FILE = "camtrap-dp-profile.json"
CAMTRAP_DP_SCHEMA_FILES = {
    "deployments": "deployments-table-schema.json",
    "media": "media-table-schema.json",
    "observations": "observations-table-schema.json",
}
# The fields of the Camtrap DP 1.0.2 tables, in the order of the official schemas
# (tests check this description against the schema files).
CAMTRAP_DP_FIELDS: dict[str, tuple[str, ...]] = {
    "deployments": (
        "deploymentID",
        "locationID",
        "locationName",
        "latitude",
        "longitude",
        "coordinateUncertainty",
        "deploymentStart",
        "deploymentEnd",
        "setupBy",
        "cameraID",
        "cameraModel",
        "cameraDelay",
        "cameraHeight",
        "cameraDepth",
        "cameraTilt",
        "cameraHeading",
        "detectionDistance",
        "timestampIssues",
        "baitUse",
        "featureType",
        "habitat",
        "deploymentGroups",
        "deploymentTags",
        "deploymentComments",
    ),
    "media": (
        "mediaID",
        "deploymentID",
        "captureMethod",
        "timestamp",
        "filePath",
        "filePublic",
        "fileName",
        "fileMediatype",
        "exifData",
        "favorite",
        "mediaComments",
    ),
    "observations": (
        "observationID",
        "deploymentID",
        "mediaID",
        "eventID",
        "eventStart",
        "eventEnd",
        "observationLevel",
        "observationType",
        "cameraSetupType",
        "scientificName",
        "count",
        "lifeStage",
        "sex",
        "behavior",
        "individualID",
        "individualPositionRadius",
        "individualPositionAngle",
        "individualSpeed",
        "bboxX",
        "bboxY",
        "bboxWidth",
        "bboxHeight",
        "classificationMethod",
        "classifiedBy",
        "classificationTimestamp",
        "classificationProbability",
        "observationTags",
        "observationComments",
    ),
}
DEFAULT_SCIENTIFIC_NAME = "Panthera pardus saxicolor"
# Vocabularies of the Camtrap DP 1.0.2 profile (project.samplingDesign, project.captureMethod).
SAMPLING_DESIGNS = ("simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted", "opportunistic")
CAPTURE_METHODS = ("activityDetection", "timeLapse")

# multimark's encounter types (McClintock et al. 2013, Ecology 94: 1464-1471).
MULTIMARK_NONE, MULTIMARK_LEFT, MULTIMARK_RIGHT, MULTIMARK_BOTH_APART, MULTIMARK_BOTH_AT_ONCE = 0, 1, 2, 3, 4

# WGS84 ellipsoid.
_WGS84_A_M = 6_378_137.0
_WGS84_F = 1 / 298.257223563
_WGS84_E2 = _WGS84_F * (2 - _WGS84_F)
_SECONDS_PER_DAY = 86_400.0
_MAX_LISTED = 20
_EXIF_GPS_IFD = 0x8825
_SECR_FORBIDDEN = set(" \t\r\n,#\"'")


# ---- Camtrap DP ---------------------------------------------------------------------------------


def export_camtrap_dp(
    catalogue: pd.DataFrame,
    out_dir: str | Path,
    *,
    organisation: str,
    title: str = "Persian leopard camera-trap captures",
    precision_deg: float = 0.1,
    exact_coordinates: bool = False,
    scientific_name: str = DEFAULT_SCIENTIFIC_NAME,
    sampling_design: str = "targeted",
    capture_method: str = "activityDetection",
    copy_media: bool = False,
) -> Path:
    """Write the catalogue as a Camtrap DP 1.0.2 package in `out_dir`; return that folder.

    One deployment per station (`deploymentID` and `locationID` = station; start
    and end = its first and last capture, since the catalogue does not know when
    the camera was set up), one media row per image, one media-level `animal`
    observation per annotation: `individualID`, `eventID` = encounter, `sex`, the
    box normalised to 0..1 of the image and the flank as `observationTags`
    `flank:left` / `flank:right` (no tag for an unknown side). Unidentified
    annotations are exported with an empty `individualID`.

    Coordinates are rounded to `precision_deg` (recorded as `coordinatePrecision`
    and each deployment's `coordinateUncertainty` in metres); exact only with
    `exact_coordinates=True`. Media `filePath` is `media/<path relative to the
    images' common folder>`; with `copy_media` the images are copied there, and
    an image whose EXIF holds a GPS position is refused unless coordinates are
    exact, since it would undo the generalisation. The package declares
    `individualAnimals: true`, `observationLevel: ["media"]`, and
    `sampling_design` / `capture_method` (Camtrap DP vocabularies). `organisation`
    is the rights holder and contact. Every file is written atomically,
    datapackage.json last. Raise CatalogueError listing every row that cannot be
    exported (no station, no timestamp, a station without coordinates, a missing
    image, a box outside its image) before anything is written.
    """
    if not organisation.strip():
        raise CatalogueError("organisation is empty; name who holds the rights to the data and can be contacted")
    if sampling_design not in SAMPLING_DESIGNS:
        raise CatalogueError(f"sampling_design {sampling_design!r} is not one of {', '.join(SAMPLING_DESIGNS)}")
    if capture_method not in CAPTURE_METHODS:
        raise CatalogueError(f"capture_method {capture_method!r} is not one of {', '.join(CAPTURE_METHODS)}")
    table = validate(catalogue, source="catalogue")
    if table.empty:
        raise CatalogueError("the catalogue has no rows; there is nothing to export")
    out = Path(out_dir)
    errors: list[str] = []
    stations = _station_coordinates(table, errors, needed=set(table["station"].dropna()))
    for i in table.index[table["station"].isna()]:
        errors.append(f"{_where(table, i)}: no station; fill the station, or leave the row out of the export")
    for i in table.index[table["timestamp"].isna()]:
        errors.append(f"{_where(table, i)}: no timestamp; fill the capture time, or leave the row out of the export")
    errors.extend(_image_inconsistencies(table))
    root = _common_folder(table["image_path"])
    relative = {p: Path(os.path.relpath(p, root)).as_posix() for p in table["image_path"].unique()}
    boxes = _normalised_boxes(table, errors)
    if copy_media:
        for path in relative:
            if not Path(path).is_file():
                errors.append(f"image {path}: file not found; restore it or pass copy_media=False")
            elif not exact_coordinates and _has_gps(Path(path)):
                errors.append(
                    f"image {path}: its EXIF holds a GPS position, which would undo the coordinate generalisation; "
                    "strip it (exiftool -gps:all= FILE) or pass exact_coordinates=True"
                )
    _raise_if(errors, "export a Camtrap DP package")

    uncertainty_m: int | None = None
    if not exact_coordinates:
        stations, uncertainty_m = generalise_coordinates(stations, precision_deg)
    deployments = _deployment_rows(table, stations, uncertainty_m)
    media = _media_rows(table, relative, capture_method)
    observations = _observation_rows(table, relative, boxes, scientific_name)

    for name, rows in (("deployments", deployments), ("media", media), ("observations", observations)):
        _write_csv(out / f"{name}.csv", CAMTRAP_DP_FIELDS[name], rows)
    if copy_media:
        for path, rel in relative.items():
            with open(path, "rb") as source, atomic_write(out / "media" / rel, "wb") as target:
                shutil.copyfileobj(source, target)
    descriptor = _descriptor(
        deployments,
        title=title,
        organisation=organisation,
        scientific_name=scientific_name,
        sampling_design=sampling_design,
        capture_method=capture_method,
        precision_deg=None if exact_coordinates else precision_deg,
    )
    with atomic_write(out / "datapackage.json") as f:
        json.dump(descriptor, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return out


def validate_camtrap_dp(package_dir: str | Path, schemas_dir: str | Path) -> list[str]:
    """Return readable errors of a Camtrap DP 1.0.2 package (empty = valid), checked offline.

    `schemas_dir` holds the official camtrap-dp-profile.json and the three
    `*-table-schema.json` files. The package metadata is checked against the
    profile with jsonschema (its two remote references, the generic Data Package
    schema and GeoJSON, are left out: nothing is fetched); each table is checked
    by frictionless against the local copy of its schema (types, required and
    unique fields, enumerations, foreign keys between the tables), whatever
    schema URL datapackage.json names.
    """
    package = Path(package_dir)
    if package.is_file():
        package = package.parent
    schemas = Path(schemas_dir)
    descriptor_path = package / "datapackage.json"
    try:
        descriptor = json.loads(descriptor_path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        return [f"{descriptor_path}: file not found; a Camtrap DP package has a datapackage.json"]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{descriptor_path}: not valid JSON ({err})"]
    if not isinstance(descriptor, dict):
        return [f"{descriptor_path}: not a JSON object"]
    try:
        profile = _local_json(schemas / CAMTRAP_DP_PROFILE_FILE)
        table_schemas = {name: _local_json(schemas / file) for name, file in CAMTRAP_DP_SCHEMA_FILES.items()}
    except (OSError, json.JSONDecodeError) as err:
        raise CatalogueError(
            f"cannot read the Camtrap DP schemas in {schemas} ({err}); point schemas_dir at the official 1.0.2 files"
        ) from err
    return _metadata_errors(descriptor, profile) + _table_errors(descriptor, package, table_schemas)


# ---- capture histories ---------------------------------------------------------------------------


def secr_capture_history(
    catalogue: pd.DataFrame,
    *,
    occasion_days: float = 1,
    start: str | datetime | pd.Timestamp | None = None,
    n_occasions: int | None = None,
    side: Literal["left", "right", "any"] = "left",
    session: str = "1",
    stations: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (captures, traps) for secr: `Session ID Occasion Detector` and `Detector X Y`.

    Sides: a left and a right flank of an animal known from one side only cannot
    be linked, so one animal could enter twice. An secr analysis therefore uses
    one flank: `side="left"` (default) or `"right"` keeps identified captures of
    that flank, and the two give two estimates to compare. `side="any"` keeps all
    identified captures (unknown sides too); use it only where the catalogue links
    both flanks of every animal (e.g. paired cameras at every station), else
    one-sided animals may be counted twice.

    Occasions are `occasion_days` long from `start` (default: midnight UTC of the
    catalogue's first capture day; naive times are UTC), numbered from 1, and run
    through the catalogue's last capture unless `n_occasions` is given; captures
    outside that window are left out. The whole catalogue sets the default window,
    so left, right and multimark exports of one catalogue share their occasions.
    An animal is recorded at most once per occasion and station (a burst is one
    detection): read the files as proximity detectors,
    `read.capthist(captfile, trapfile, detector = "proximity", noccasions = K)`,
    with K = `captures.attrs["n_occasions"]`, which `write_secr` also puts in a
    comment (secr would otherwise end the survey at the last capture).

    Traps are every station in the catalogue, whatever was photographed there,
    plus `stations` ({name: (latitude, longitude)}) for stations that photographed
    no leopard, which secr needs as much as the others. X and Y are metres east
    and north of the stations' centroid on the local tangent plane of the WGS84
    ellipsoid (East-North-Up), rounded to the metre: within 100 km of the centroid
    distances are off by less than 0.02 %. Unidentified captures are left out.
    Raise CatalogueError naming the rows or stations that lack a time, a station
    or coordinates, or have identifiers secr cannot read (spaces, commas, '#').
    """
    if side not in ("left", "right", "any"):
        raise CatalogueError(f"side {side!r} is not one of left, right, any")
    table = validate(catalogue, source="catalogue")
    sides = ("left", "right", "unknown") if side == "any" else (side,)
    first, k = _occasion_window(table, occasion_days, start, n_occasions)
    rows = _identified(table, sides, "secr capture history", need_station=True)
    rows, occasions = _in_window(rows, first, occasion_days, k)
    if rows.empty:
        raise CatalogueError(
            f"no identified captures ({side} flank) in the {k} occasions from {_iso(first)}; "
            "check side, start and n_occasions"
        )
    errors: list[str] = []
    coordinates = _station_coordinates(table, errors, needed=set(table["station"].dropna()), extra=stations)
    _raise_if(errors, "write the secr trap file")
    captures = (
        pd.DataFrame(
            {
                "Session": session,
                "ID": rows["individual_id"].astype(str).to_numpy(),
                "Occasion": occasions.to_numpy(),
                "Detector": rows["station"].astype(str).to_numpy(),
            }
        )
        .drop_duplicates()
        .sort_values(["ID", "Occasion", "Detector"], kind="stable")
        .reset_index(drop=True)
    )
    x, y = local_metres(coordinates["latitude"], coordinates["longitude"])
    traps = pd.DataFrame(
        {
            "Detector": coordinates["station"].astype(str).to_numpy(),
            "X": np.round(x).astype(int),
            "Y": np.round(y).astype(int),
        }
    )
    bad = [
        f"{what} {value!r}"
        for what, values in (("session", [session]), ("individual_id", captures["ID"]), ("station", traps["Detector"]))
        for value in sorted(set(values))
        if _SECR_FORBIDDEN & set(value) or not value
    ]
    if bad:
        raise CatalogueError(
            "secr reads identifiers separated by blanks, so these cannot be written: "
            + ", ".join(bad)
            + "; rename them without spaces, tabs, commas, quotes or '#'"
        )
    captures.attrs = {"n_occasions": k, "occasion_days": occasion_days, "start": _iso(first), "side": side}
    return captures, traps


def write_secr(captures: pd.DataFrame, traps: pd.DataFrame, capture_path: str | Path, trap_path: str | Path) -> None:
    """Write the secr capture and trap files (blank-separated text, `#` comments), atomically.

    Read them in R with `read.capthist(capture_path, trap_path, detector =
    "proximity", noccasions = K)`; K is in the capture file's comment when the
    table came from `secr_capture_history`.
    """
    header = ["# Session ID Occasion Detector"]
    attrs = captures.attrs
    if "n_occasions" in attrs:
        days = f"{attrs['occasion_days']:g} day" + ("" if attrs["occasion_days"] == 1 else "s")
        flanks = "all flanks" if attrs["side"] == "any" else f"{attrs['side']} flanks"
        header.append(
            f"# {attrs['n_occasions']} occasions, {days} each, from {attrs['start']}; {flanks}; "
            f'read.capthist(..., detector = "proximity", noccasions = {attrs["n_occasions"]})'
        )
    lines = [f"{r.Session} {r.ID} {r.Occasion} {r.Detector}" for r in captures.itertuples(index=False)]
    _write_lines(capture_path, [*header, *lines])
    header = ["# Detector X Y", "# metres east (X) and north (Y) of the stations' centroid, WGS84 local tangent plane"]
    _write_lines(trap_path, [*header, *(f"{r.Detector} {r.X} {r.Y}" for r in traps.itertuples(index=False))])


def multimark_histories(
    catalogue: pd.DataFrame,
    *,
    occasion_days: float = 1,
    start: str | datetime | pd.Timestamp | None = None,
    n_occasions: int | None = None,
) -> pd.DataFrame:
    """Return multimark encounter histories: one row per individual, one column per occasion (1..K).

    Codes are multimark's encounter types (its `Enc.Mat`): 0 not seen, 1 left
    flank only, 2 right flank only, 3 both flanks in the occasion but never
    together, 4 both flanks together at least once. "Together" means in one image
    or one encounter (a burst, or the paired cameras of a station firing at once):
    only then do the photographs themselves prove the two flanks are one animal.
    Code 3 is not "both sides on two different days": it needs both flanks within
    one occasion, so the occasion length changes the codes.

    multimark (`data.type = "sometimes"` when codes 3 or 4 occur, else `"never"`)
    treats a history with no 4 as possibly two one-sided animals; rows whose
    flanks the catalogue links without a joint sighting in this window (both 1
    and 2, or a 3, but no 4) are known only from the catalogue: pass
    `known = multimark_known(histories)` to assert the catalogue's links.

    Occasions are set as in `secr_capture_history`. Rows are the identified
    individuals with a left or right capture in the window, sorted by ID; captures
    of unknown side cannot be typed and are left out, as are unidentified ones.
    Raise CatalogueError naming identified rows with no timestamp.
    """
    table = validate(catalogue, source="catalogue")
    first, k = _occasion_window(table, occasion_days, start, n_occasions)
    rows = _identified(table, ("left", "right"), "multimark history", need_station=False)
    rows, occasions = _in_window(rows, first, occasion_days, k)
    if rows.empty:
        raise CatalogueError(
            f"no identified left or right captures in the {k} occasions from {_iso(first)}; check start and n_occasions"
        )
    individuals = sorted(rows["individual_id"].astype(str).unique())
    codes = np.zeros((len(individuals), k), dtype=int)
    position = {individual: i for i, individual in enumerate(individuals)}
    groups = rows.assign(occasion=occasions.to_numpy()).groupby(["individual_id", "occasion"], sort=False)
    for key, group in groups:
        individual, occasion = cast(tuple[str, int], key)
        codes[position[str(individual)], int(occasion) - 1] = _multimark_code(group)
    histories = pd.DataFrame(codes, index=pd.Index(individuals, name="individual_id"), columns=range(1, k + 1))
    histories.attrs = {"n_occasions": k, "occasion_days": occasion_days, "start": _iso(first)}
    return histories


def multimark_known(histories: pd.DataFrame) -> pd.Series:
    """Return multimark's `known` vector: 1 for histories showing both flanks, whose link the catalogue asserts."""
    values = histories.to_numpy()
    both = ((values == MULTIMARK_LEFT).any(axis=1) & (values == MULTIMARK_RIGHT).any(axis=1)) | (
        values >= MULTIMARK_BOTH_APART
    ).any(axis=1)
    return pd.Series(both.astype(int), index=histories.index, name="known")


def write_multimark(histories: pd.DataFrame, path: str | Path) -> None:
    """Write histories as CSV (`individual_id` then one column per occasion), atomically.

    In R: `Enc.Mat <- as.matrix(read.csv(path, row.names = 1))`.
    """
    with atomic_write(path) as f:
        histories.to_csv(f, index=True, index_label="individual_id", lineterminator="\n")


def local_metres(
    latitude: Iterable[float], longitude: Iterable[float], origin: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (east, north) in metres on the WGS84 tangent plane at `origin` (default: the points' mean).

    The points go to Earth-centred coordinates on the ellipsoid and are rotated
    into the East-North-Up frame of the origin (an orthographic projection onto
    the tangent plane): exact in direction, with distances shortened by about
    (d / 6371 km)^2 / 2, under 0.02 % within 100 km. The mean of degrees as origin
    is fine for a survey area that does not straddle the antimeridian.
    """
    lat = np.radians(np.asarray(list(latitude), dtype=float))
    lon = np.radians(np.asarray(list(longitude), dtype=float))
    if origin is None:
        lat0, lon0 = float(lat.mean()), float(lon.mean())
    else:
        lat0, lon0 = math.radians(origin[0]), math.radians(origin[1])
    x, y, z = _ecef(lat, lon)
    x0, y0, z0 = _ecef(np.array([lat0]), np.array([lon0]))
    dx, dy, dz = x - x0, y - y0, z - z0
    east = -math.sin(lon0) * dx + math.cos(lon0) * dy
    north = -math.sin(lat0) * math.cos(lon0) * dx - math.sin(lat0) * math.sin(lon0) * dy + math.cos(lat0) * dz
    return east, north


# ---- helpers: checks ------------------------------------------------------------------------------


def _where(table: pd.DataFrame, i: Any) -> str:
    row = table.loc[i]
    origin = " ".join(str(row[c]) for c in ("source", "source_row") if not pd.isna(row[c]))
    return f"annotation {row['annotation_id']}" + (f" ({origin})" if origin else "")


def _raise_if(errors: list[str], what: str) -> None:
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED])
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        raise CatalogueError(f"cannot {what}, {len(errors)} problems:\n  {listed}{more}")


def _station_coordinates(
    table: pd.DataFrame,
    errors: list[str],
    *,
    needed: set[str],
    extra: Mapping[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """Return one row per station (station, latitude, longitude), sorted; report stations without one position."""
    known = table.dropna(subset=["station", "latitude", "longitude"])
    positions: dict[str, set[tuple[float, float]]] = {}
    for station, lat, lon in zip(known["station"], known["latitude"], known["longitude"], strict=True):
        positions.setdefault(str(station), set()).add((float(lat), float(lon)))
    for station, (lat, lon) in (extra or {}).items():
        positions.setdefault(str(station), set()).add((float(lat), float(lon)))
        needed = needed | {str(station)}
    rows = []
    for station in sorted(needed):
        found = positions.get(station, set())
        if not found:
            errors.append(
                f"station {station}: no latitude/longitude in any of its rows; fill them in the catalogue"
                + (" or pass stations=" if extra is not None else "")
            )
        elif len(found) > 1:
            shown = ", ".join(f"({lat:g}, {lon:g})" for lat, lon in sorted(found))
            errors.append(
                f"station {station}: rows give different positions {shown}; a station has one position, fix the rows "
                "(or give the cameras different station names)"
            )
        else:
            rows.append((station, *found.pop()))
    return pd.DataFrame(rows, columns=["station", "latitude", "longitude"])


def _image_inconsistencies(table: pd.DataFrame) -> list[str]:
    errors = []
    for path, group in table.groupby("image_path", sort=True):
        for column in ("station", "timestamp"):
            values = group[column].dropna().unique()
            if len(values) > 1:
                errors.append(
                    f"image {path}: its annotations give different {column}s ({', '.join(map(str, values))}); "
                    "one photograph has one station and time, fix the rows"
                )
    return errors


def _normalised_boxes(table: pd.DataFrame, errors: list[str]) -> dict[Any, tuple[float, float, float, float]]:
    """Return {row index: (x, y, w, h) as fractions of the image} for rows with a box; report unusable ones."""
    boxes: dict[Any, tuple[float, float, float, float]] = {}
    sizes: dict[str, tuple[int, int] | None] = {}
    boxed = table.dropna(subset=["bbox_x", "bbox_y", "bbox_w", "bbox_h"])
    for i, row in boxed.iterrows():
        path = str(row["image_path"])
        if path not in sizes:
            try:
                sizes[path] = image_size(path)
            except ImageReadError as err:
                sizes[path] = None
                errors.append(f"{_where(table, i)}: {err} (its size is needed to normalise the box)")
        size = sizes[path]
        if size is None:
            continue
        width, height = size
        x, y, w, h = (float(row[c]) for c in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        if x >= width or y >= height:
            errors.append(
                f"{_where(table, i)}: box starts at ({x:g}, {y:g}), outside the {width} x {height} image; fix the box"
            )
            continue
        # Boxes may run past the edge of the frame (an animal half out of view): clip to the image.
        fx, fy = x / width, y / height
        boxes[i] = (fx, fy, min(w / width, 1 - fx), min(h / height, 1 - fy))
    return boxes


def _has_gps(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return bool(im.getexif().get_ifd(_EXIF_GPS_IFD))
    except (OSError, ValueError, SyntaxError):
        return False


def _identified(table: pd.DataFrame, sides: Sequence[str], what: str, *, need_station: bool) -> pd.DataFrame:
    """Return identified rows of these sides; raise naming those without the time (or station) they need."""
    rows = table[table["individual_id"].notna() & table["side"].isin(sides)]
    errors = [
        f"{_where(table, i)}: identified capture with no timestamp; fill the capture time or leave the row out"
        for i in rows.index[rows["timestamp"].isna()]
    ]
    if need_station:
        errors += [
            f"{_where(table, i)}: identified capture with no station; fill the station or leave the row out"
            for i in rows.index[rows["station"].isna()]
        ]
    _raise_if(errors, f"build the {what}")
    return rows


# ---- helpers: occasions ----------------------------------------------------------------------------


def _occasion_window(
    table: pd.DataFrame, occasion_days: float, start: str | datetime | pd.Timestamp | None, n_occasions: int | None
) -> tuple[pd.Timestamp, int]:
    """Return (start of occasion 1 in UTC, number of occasions)."""
    if not (isinstance(occasion_days, int | float) and occasion_days > 0 and math.isfinite(occasion_days)):
        raise CatalogueError(f"occasion_days must be a positive number of days, got {occasion_days!r}")
    times = table["timestamp"].dropna()
    if start is None:
        if times.empty:
            raise CatalogueError("no row has a timestamp, so occasions cannot be set; fill the capture times")
        first = times.min().floor("D")
    else:
        try:
            first = pd.Timestamp(start)
        except ValueError as err:
            raise CatalogueError(f"start {start!r} is not a date and time like 2023-05-01T00:00:00+05:00") from err
        first = first.tz_localize("UTC") if first.tzinfo is None else first.tz_convert("UTC")
    if n_occasions is None:
        if times.empty or times.max() < first:
            raise CatalogueError(f"no capture on or after start {_iso(first)}; choose an earlier start")
        n_occasions = int((times.max() - first).total_seconds() // (occasion_days * _SECONDS_PER_DAY)) + 1
    elif not (isinstance(n_occasions, int) and n_occasions > 0):
        raise CatalogueError(f"n_occasions must be a positive whole number, got {n_occasions!r}")
    return first, n_occasions


def _in_window(
    rows: pd.DataFrame, first: pd.Timestamp, occasion_days: float, n_occasions: int
) -> tuple[pd.DataFrame, pd.Series]:
    """Return (rows within the occasions, their occasion numbers from 1)."""
    elapsed_s = (rows["timestamp"] - first).dt.total_seconds()
    occasion = (elapsed_s // (occasion_days * _SECONDS_PER_DAY)).astype(int) + 1
    inside = (elapsed_s >= 0) & (occasion <= n_occasions)
    return rows[inside], occasion[inside]


def _multimark_code(group: pd.DataFrame) -> int:
    sides = set(group["side"])
    if sides == {"left"}:
        return MULTIMARK_LEFT
    if sides == {"right"}:
        return MULTIMARK_RIGHT
    # Both flanks: together when one image or one encounter holds both.
    for key in ("image_path", "encounter_id"):
        keyed = group.dropna(subset=[key])
        if (keyed.groupby(key)["side"].nunique() > 1).any():
            return MULTIMARK_BOTH_AT_ONCE
    return MULTIMARK_BOTH_APART


# ---- helpers: Camtrap DP tables ------------------------------------------------------------------


def _deployment_rows(table: pd.DataFrame, stations: pd.DataFrame, uncertainty_m: int | None) -> list[dict[str, str]]:
    rows = []
    for station, lat, lon in stations.itertuples(index=False):
        at = table[table["station"] == station]
        countries = at["country"].dropna().unique()
        rows.append(
            {
                "deploymentID": station,
                "locationID": station,
                "latitude": _number(lat),
                "longitude": _number(lon),
                "coordinateUncertainty": "" if uncertainty_m is None else str(max(1, uncertainty_m)),
                "deploymentStart": _iso(at["timestamp"].min()),
                "deploymentEnd": _iso(at["timestamp"].max()),
                "deploymentTags": f"country:{countries[0]}" if len(countries) == 1 else "",
            }
        )
    return rows


def _media_rows(table: pd.DataFrame, relative: Mapping[str, str], capture_method: str) -> list[dict[str, str]]:
    images = table.drop_duplicates("image_path").sort_values(["timestamp", "image_path"], kind="stable")
    return [
        {
            "mediaID": relative[path],
            "deploymentID": str(station),
            "captureMethod": capture_method,
            "timestamp": _iso(timestamp),
            "filePath": f"media/{relative[path]}",
            "filePublic": "false",
            "fileName": Path(path).name,
            "fileMediatype": _media_type(path),
        }
        for path, station, timestamp in zip(
            images["image_path"].astype(str), images["station"], images["timestamp"], strict=True
        )
    ]


def _observation_rows(
    table: pd.DataFrame,
    relative: Mapping[str, str],
    boxes: Mapping[Any, tuple[float, float, float, float]],
    scientific_name: str,
) -> list[dict[str, str]]:
    rows = []
    for i in table.sort_values(["timestamp", "annotation_id"], kind="stable").index:
        row = table.loc[i]
        box = boxes.get(i)
        rows.append(
            {
                "observationID": row["annotation_id"],
                "deploymentID": row["station"],
                "mediaID": relative[row["image_path"]],
                "eventID": "" if pd.isna(row["encounter_id"]) else row["encounter_id"],
                "eventStart": _iso(row["timestamp"]),
                "eventEnd": _iso(row["timestamp"]),
                "observationLevel": "media",
                "observationType": "animal",
                "scientificName": scientific_name,
                "count": "1",
                "sex": row["sex"] if row["sex"] in ("female", "male") else "",
                "individualID": "" if pd.isna(row["individual_id"]) else row["individual_id"],
                **(
                    {}
                    if box is None
                    else dict(zip(("bboxX", "bboxY", "bboxWidth", "bboxHeight"), map(_fraction, box), strict=True))
                ),
                "observationTags": f"flank:{row['side']}" if row["side"] in ("left", "right") else "",
            }
        )
    return rows


def _descriptor(
    deployments: list[dict[str, str]],
    *,
    title: str,
    organisation: str,
    scientific_name: str,
    sampling_design: str,
    capture_method: str,
    precision_deg: float | None,
) -> dict[str, Any]:
    lats = [float(d["latitude"]) for d in deployments]
    lons = [float(d["longitude"]) for d in deployments]
    where = (
        "Coordinates are exact."
        if precision_deg is None
        else f"Coordinates are generalised to {precision_deg:g} degree to protect the animals from poaching."
    )
    descriptor: dict[str, Any] = {
        "resources": [
            {
                "name": name,
                "path": f"{name}.csv",
                "profile": "tabular-data-resource",
                "format": "csv",
                "mediatype": "text/csv",
                "encoding": "utf-8",
                "schema": _CAMTRAP_DP_URL + file,
            }
            for name, file in CAMTRAP_DP_SCHEMA_FILES.items()
        ],
        "profile": CAMTRAP_DP_PROFILE_URL,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "title": title,
        "description": f"Individually identified camera-trap captures (one observation per flank photograph). {where}",
        "contributors": [{"title": organisation, "role": "rightsHolder"}, {"title": organisation, "role": "contact"}],
        "project": {
            "title": title,
            "samplingDesign": sampling_design,
            "captureMethod": [capture_method],
            "individualAnimals": True,
            "observationLevel": ["media"],
        },
        "spatial": _spatial(lats, lons, 0.0 if precision_deg is None else precision_deg / 2),
        "temporal": {
            "start": min(d["deploymentStart"] for d in deployments)[:10],
            "end": max(d["deploymentEnd"] for d in deployments)[:10],
        },
        "taxonomic": [
            {
                "scientificName": scientific_name,
                "taxonRank": {1: "genus", 2: "species", 3: "subspecies"}.get(len(scientific_name.split()), "species"),
            }
        ],
    }
    if precision_deg is not None:
        descriptor["coordinatePrecision"] = precision_deg
    return descriptor


def _spatial(lats: Sequence[float], lons: Sequence[float], pad_deg: float) -> dict[str, Any]:
    """Return GeoJSON covering the deployments: their bounding box, widened by the rounding cell when generalised."""
    south, north = max(-90.0, min(lats) - pad_deg), min(90.0, max(lats) + pad_deg)
    west, east = max(-180.0, min(lons) - pad_deg), min(180.0, max(lons) + pad_deg)
    if south == north or west == east:
        points = sorted({(round(lon, 9), round(lat, 9)) for lat, lon in zip(lats, lons, strict=True)})
        if len(points) == 1:
            return {"type": "Point", "coordinates": list(points[0])}
        return {"type": "MultiPoint", "coordinates": [list(p) for p in points]}
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [[[round(v, 9) for v in corner] for corner in ring]]}


# ---- helpers: Camtrap DP validation ----------------------------------------------------------------


def _local_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _without_remote_refs(node: Any) -> Any:
    """Return a JSON schema with every reference outside the document removed (nothing is fetched)."""

    def remote(value: Any) -> bool:
        return isinstance(value, dict) and isinstance(value.get("$ref"), str) and not value["$ref"].startswith("#")

    if isinstance(node, dict):
        return {
            key: _without_remote_refs(value)
            for key, value in node.items()
            if not (key == "$ref" and isinstance(value, str) and not value.startswith("#"))
        }
    if isinstance(node, list):
        return [_without_remote_refs(value) for value in node if not (remote(value) and len(value) == 1)]
    return node


def _metadata_errors(descriptor: dict[str, Any], profile: dict[str, Any]) -> list[str]:
    from jsonschema import Draft4Validator, FormatChecker

    validator = Draft4Validator(_without_remote_refs(profile), format_checker=FormatChecker())
    errors = []
    for error in sorted(validator.iter_errors(descriptor), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, error.absolute_path)) or "(top level)"
        details = sorted({c.message for c in error.context or []})
        if details:
            # A oneOf failure repeats the whole object; what each alternative objected to says more.
            errors.append(f"datapackage.json {where}: fits none of the allowed forms ({'; '.join(details)})")
        else:
            errors.append(f"datapackage.json {where}: {error.message}")
    return errors


def _table_errors(descriptor: dict[str, Any], package: Path, schemas: Mapping[str, Any]) -> list[str]:
    from frictionless import FrictionlessException, Package

    resources = [r for r in descriptor.get("resources") or [] if isinstance(r, dict)]
    errors = []
    local = []
    for name in CAMTRAP_DP_SCHEMA_FILES:
        resource = next((r for r in resources if r.get("name") == name), None)
        path = resource.get("path") if resource else None
        if resource is None:
            errors.append(f"datapackage.json: no '{name}' resource")
        elif not isinstance(path, str) or "://" in path or Path(path).is_absolute() or ".." in Path(path).parts:
            errors.append(f"datapackage.json: resource '{name}' path {path!r} is not a file inside the package")
        elif not (package / path).is_file():
            errors.append(f"{package / path}: file not found (resource '{name}')")
        else:
            # The schema named by URL is swapped for its local copy; the package profile is checked above.
            local.append({"name": name, "path": path, "format": "csv", "encoding": "utf-8", "schema": schemas[name]})
    if errors:
        return errors
    try:
        report = Package({"resources": local}, basepath=str(package)).validate()
    except FrictionlessException as err:
        return [f"{package}: frictionless cannot read the package ({err.error.message})"]
    for task in report.tasks:
        for error in task.errors:
            errors.append(f"{task.name}.csv: {error.message}")
    for error in report.errors:
        errors.append(f"{package}: {error.message}")
    return errors


# ---- helpers: formatting and writing --------------------------------------------------------------


def _iso(stamp: pd.Timestamp | datetime) -> str:
    stamp = pd.Timestamp(stamp)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.floor("s").strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: float) -> str:
    return repr(float(value))


def _fraction(value: float) -> str:
    return f"{min(1.0, max(0.0, value)):.6f}".rstrip("0").rstrip(".") or "0"


def _media_type(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path)
    if guessed and guessed.startswith("image/"):
        return guessed
    return "image/" + (Path(path).suffix.lower().lstrip(".") or "jpeg")


def _common_folder(paths: pd.Series) -> str:
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths.unique()]
    return str(os.path.commonpath(folders))


def _ecef(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    prime_vertical = _WGS84_A_M / np.sqrt(1 - _WGS84_E2 * np.sin(lat) ** 2)
    return (
        prime_vertical * np.cos(lat) * np.cos(lon),
        prime_vertical * np.cos(lat) * np.sin(lon),
        prime_vertical * (1 - _WGS84_E2) * np.sin(lat),
    )


def _write_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, str]]) -> None:
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({field: row.get(field, "") for field in fields})


def _write_lines(path: str | Path, lines: Iterable[str]) -> None:
    with atomic_write(path) as f:
        for line in lines:
            f.write(line + "\n")


def write_capture_histories(
    catalogue: pd.DataFrame,
    out_dir: str | Path,
    *,
    occasion_days: float = 1,
    start: str | None = None,
    session: str = "1",
) -> dict[str, Path]:
    """Write secr capture and trap files (one pair per flank) and multimark histories into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for side in ("left", "right"):
        captures, traps = secr_capture_history(
            catalogue, occasion_days=occasion_days, start=start, side=side, session=session
        )
        files[f"secr_{side}"] = out_dir / f"secr_captures_{side}.txt"
        files[f"secr_traps_{side}"] = out_dir / f"secr_traps_{side}.txt"
        write_secr(captures, traps, files[f"secr_{side}"], files[f"secr_traps_{side}"])
    files["multimark"] = out_dir / "multimark.csv"
    write_multimark(multimark_histories(catalogue, occasion_days=occasion_days, start=start), files["multimark"])
    return files


def write_camtrap_dp(
    catalogue: pd.DataFrame,
    out_dir: str | Path,
    *,
    organisation: str,
    schemas_dir: str | Path | None,
    precision_deg: float = 0.1,
    exact_coordinates: bool = False,
) -> tuple[Path, list[Problem]]:
    """Export the catalogue as a Camtrap DP package and validate it offline; return it and any validation errors."""
    package = export_camtrap_dp(
        catalogue, out_dir, organisation=organisation, precision_deg=precision_deg, exact_coordinates=exact_coordinates
    )
    if schemas_dir is None or not Path(schemas_dir).is_dir():
        return package, [
            Problem(
                str(package),
                "validation",
                f"not validated: no Camtrap DP schemas at {schemas_dir}; set "
                "camtrap_dp_schemas to a folder with the official table schemas",
            )
        ]
    return package, [Problem(str(package), "validation", error) for error in validate_camtrap_dp(package, schemas_dir)]
