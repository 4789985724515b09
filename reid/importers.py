"""Importers: the formats people already have, turned into catalogue tables.

Each importer reads one format, builds plain records with catalogue column names,
passes them through `build_catalogue` and fills encounters, so every import ends in
the same validated table. A bad row is reported as a `Problem` (which file, where,
what is wrong and the fix) and skipped; only an input that is unusable as a whole
(file missing, not JSON, required columns missing, none of its images found) raises
`CatalogueError`. Importers never log: the caller reports the problems.

Image paths in the tables are absolute. Boxes are pixels (x, y, w, h) of the
EXIF-oriented image; normalised boxes are converted with the image's size.
Encounter IDs the source gives (sighting, sequence, event) are kept, prefixed with
their kind (and the country, when given) so they cannot collide with each other or
with the station/time encounters `assign_encounters` makes for the other rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from PIL import Image

from reid.catalogue import (
    BBOX_COLUMNS,
    COLUMN_NAMES,
    DEFAULT_ENCOUNTER_GAP_S,
    assign_encounters,
    build_catalogue,
    is_mask_file,
    load_catalogue,
    validate,
)
from reid.errors import CatalogueError, Problem, quoting_hint
from reid.images import ImageReadError, image_size

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
# camtrapR's imageRename: <Station>__<YYYY-MM-DD>__<HH-MM-SS>(<n>).JPG, optionally with __<Camera> after the station.
CAMTRAPR_FILENAME_PATTERN = (
    r"^(?P<station>.+?)__(?:.+?__)?(?P<date>\d{4}-\d{2}-\d{2})__(?P<time>\d{2}-\d{2}-\d{2})(?:\(\d+\))?\.\w+$"
)
COCO_UNKNOWN_NAME = "____"

_NAME_TOKEN = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_VIEWPOINT = re.compile(r"(?:up|down|top|bottom|front|back|left|right)+")
_YEAR_FIRST_DATE = re.compile(r"^(\d{4})[:/](\d{2})[:/](\d{2})")
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?")
_LABEL_ALIASES = {"path": "image_path", "sighting": "encounter_id"}
_LABEL_REQUIRED = ("image_path", "individual_id", "side")
_MEGADETECTOR_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}


class ImportResult(NamedTuple):
    """A catalogue table and every problem met while importing it."""

    table: pd.DataFrame
    problems: list[Problem]


def import_folders(
    root: str | Path, *, country: str | None = None, encounter_gap_s: float = DEFAULT_ENCOUNTER_GAP_S
) -> ImportResult:
    """Import a folder-per-individual tree, `root/<individual_id>/<image>`.

    The side comes from a word starting with `left` or `right` in the path below
    the individual's folder, words being split at non-letters and case changes:
    `IMG_12_left.jpg`, `left-flank.JPG`, `0630_leftphoto.jpg`, `KZ-0007/right/a.jpg`
    (but not `bright.jpg`). A name with both words is imported with side unknown
    and reported, so it can be renamed. Files that are not images, and images lying
    directly in `root`, are reported and skipped; hidden files are ignored. EXIF is
    not read: rows have no timestamp, so each image is its own encounter.
    """
    root = _existing_dir(root)
    problems: list[Problem] = []
    records: list[dict[str, Any]] = []
    for path, relative in _image_files(root, problems):
        where = f"image {relative.as_posix()}"
        if len(relative.parts) == 1:
            problems.append(
                Problem(
                    str(root),
                    where,
                    "image is not inside an individual's folder; move it to <root>/<individual_id>/ or remove it",
                )
            )
            continue
        below_individual = "/".join((*relative.parts[1:-1], path.stem))
        sides = _sides_in_name(below_individual)
        if len(sides) > 1:
            problems.append(
                Problem(
                    str(root),
                    where,
                    "file name says both left and right; imported with side unknown, rename it to keep one",
                )
            )
        records.append(
            {
                "image_path": str(path),
                "individual_id": relative.parts[0],
                "side": sides.pop() if len(sides) == 1 else "unknown",
                "country": country,
                "source": str(root),
                "source_row": where,
            }
        )
    return _finish(records, problems, source=root, encounter_gap_s=encounter_gap_s)


def import_labels_csv(
    path: str | Path,
    *,
    root: str | Path | None = None,
    country: str | None = None,
    encounter_gap_s: float = DEFAULT_ENCOUNTER_GAP_S,
) -> ImportResult:
    """Import a labels CSV with one row per image: `path, individual_id, side` and optional catalogue columns.

    Column names are matched ignoring case; `image_path` may stand for `path`, and
    `sighting` for `encounter_id` (its numbers become `sighting:<n>`). Other catalogue
    columns (`timestamp`, `station`, `sex`, box columns, `mask`, `latitude`, `longitude`,
    `country`, ...) are read when present, unknown columns ignored. Paths (of images and
    mask images) are relative to `root` (default: the CSV's folder). `country` fills rows with no country of
    their own. Rows are named by their line in the file (the header is line 1).
    """
    path = Path(path).resolve()
    base = _existing_dir(root) if root is not None else path.parent
    problems: list[Problem] = []
    header, rows = _read_csv(path, problems)
    columns = _label_columns(header)
    _require_columns(
        path,
        header,
        [c for c in _LABEL_REQUIRED if c not in columns.values()],
        needed=("path", "individual_id", "side"),
    )
    if not rows and not problems:
        raise CatalogueError(f"{path}: the file has a header but no rows; add one row per image below the header")
    sighting_numbers = any(
        name.strip().lower() == "sighting" for name, column in columns.items() if column == "encounter_id"
    )

    records: list[dict[str, Any]] = []
    missing: list[Path] = []
    for line, cells in rows:
        where = f"row {line}"
        values = {column: cells[name].strip() for name, column in columns.items()}
        if not values["image_path"]:
            problems.append(
                Problem(str(path), where, "path is empty; give the image file of this row or remove the row")
            )
            continue
        image = _resolve(values["image_path"], base)
        if not image.is_file():
            missing.append(image)
            problems.append(
                Problem(
                    str(path),
                    where,
                    f"image file not found: {image}; fix the path (relative to {base}) or remove the row",
                )
            )
            continue
        record: dict[str, Any] = {**values, "image_path": str(image), "source": str(path), "source_row": where}
        record["country"] = values.get("country") or country
        if is_mask_file(values.get("mask")):
            record["mask"] = str(_resolve(values["mask"], base))
        if sighting_numbers and values["encounter_id"]:
            record["encounter_id"] = _source_encounter("sighting", values["encounter_id"], record["country"])
        records.append(record)
    _raise_if_none_found(
        path, missing, records, hint=f"paths are read relative to {base}; pass root= the folder they are relative to"
    )
    return _finish(records, problems, source=path, encounter_gap_s=encounter_gap_s)


def import_coco(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    country: str | None = None,
    encounter_gap_s: float = DEFAULT_ENCOUNTER_GAP_S,
) -> ImportResult:
    """Import a Wild Me / LILA COCO file (such as Leopard ID 2022): one row per flank annotation.

    `viewpoint` gives the side: one containing `left` (`left`, `frontleft`, `upleft`)
    is left, one containing `right` is right, and a missing viewpoint is side unknown.
    Annotations whose viewpoint shows no flank (`front`, `back`, `up`, `down`, ...)
    are skipped, because the catalogue holds flank annotations only; they are
    reported as one problem per viewpoint value rather than one per annotation, so
    the real errors stay visible. An unrecognised viewpoint is reported and skipped.
    `name` is the individual (`____` = unknown); `bbox` is pixels [x, y, w, h];
    `segmentation` (polygons, or RLE plain or compressed) becomes the row's `mask`, so
    its features are taken on the animal alone; a malformed one is reported and the
    row imported without it.
    A `date_captured` that is not a date is reported and the row imported without a
    time. `seq_id` becomes the encounter, `location` the station. File names are
    relative to `image_root` (default: the JSON file's folder).
    """
    path = Path(path).resolve()
    base = _existing_dir(image_root) if image_root is not None else path.parent
    data = _read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise CatalogueError(
            f"{path}: not a COCO file (it needs 'images' and 'annotations' lists); check that this is the annotation JSON"
        )

    problems: list[Problem] = []
    used = {_coco_key(a.get("image_id")) for a in annotations if isinstance(a, dict)}
    image_rows: dict[str, dict[str, Any]] = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict) or _coco_key(image.get("id")) is None or not image.get("file_name"):
            problems.append(
                Problem(str(path), f"image #{index + 1}", "image entry needs an id and a file_name; fix or remove it")
            )
            continue
        key = _coco_key(image["id"])
        if key not in used:
            continue
        if key in image_rows:
            problems.append(
                Problem(
                    str(path),
                    f"image {image['id']}",
                    "image id is used twice in images[]; the first entry is kept, make the ids unique",
                )
            )
            continue
        image_rows[str(key)] = _coco_image(image, base, country, path, problems)

    records: list[dict[str, Any]] = []
    missing: list[Path] = []
    non_flank: dict[str, list[str]] = {}
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            problems.append(
                Problem(str(path), f"annotation #{index + 1}", "annotation is not a JSON object; fix or remove it")
            )
            continue
        name = annotation.get("id", f"#{index + 1}")
        where = f"annotation {name}"
        image_row = image_rows.get(str(_coco_key(annotation.get("image_id"))))
        if image_row is None:
            problems.append(
                Problem(
                    str(path),
                    where,
                    f"image_id {annotation.get('image_id')!r} is not in images[]; fix the image_id or add the image",
                )
            )
            continue
        try:
            side = _viewpoint_side(annotation.get("viewpoint"))
        except ValueError:
            problems.append(
                Problem(
                    str(path),
                    where,
                    f"viewpoint {annotation.get('viewpoint')!r} is not a viewpoint (left, right, frontleft, back, ...); fix it",
                )
            )
            continue
        if side is None:
            non_flank.setdefault(str(annotation["viewpoint"]), []).append(str(name))
            continue
        try:
            box = _coco_box(annotation.get("bbox"))
        except ValueError:
            problems.append(
                Problem(
                    str(path), where, f"bbox {annotation.get('bbox')!r} is not [x, y, width, height] in pixels; fix it"
                )
            )
            continue
        if not Path(image_row["image_path"]).is_file():
            missing.append(Path(image_row["image_path"]))
            problems.append(
                Problem(
                    str(path),
                    where,
                    f"image file not found: {image_row['image_path']}; fix image_root (now {base}) or the file_name",
                )
            )
            continue
        individual = str(annotation.get("name") or "").strip()
        try:
            mask = _coco_segmentation(annotation.get("segmentation"))
        except ValueError as err:
            mask = None
            problems.append(
                Problem(
                    str(path),
                    where,
                    f"segmentation {_brief(annotation.get('segmentation'))} {err}; imported without a mask (fix it to "
                    "take features on the animal alone)",
                )
            )
        records.append(
            {
                **image_row,
                **box,
                "mask": mask,
                "annotation_id": annotation.get("uuid"),
                "individual_id": None if individual == COCO_UNKNOWN_NAME else individual,
                "side": side,
                "source_row": where,
            }
        )
    for viewpoint, names in sorted(non_flank.items()):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        problems.append(
            Problem(
                str(path),
                f"annotations {shown}",
                f"viewpoint {viewpoint!r} shows no flank; {len(names)} annotations skipped (set the viewpoint to left or right where a flank is visible)",
            )
        )
    _raise_if_none_found(path, missing, records, hint="pass image_root= the folder the file_name paths are relative to")
    return _finish(records, problems, source=path, encounter_gap_s=encounter_gap_s)


def import_camtrap_dp(
    package_dir: str | Path,
    *,
    scientific_name: str | None = None,
    country: str | None = None,
    encounter_gap_s: float = DEFAULT_ENCOUNTER_GAP_S,
) -> ImportResult:
    """Import a Camtrap DP 1.0.2 package: one row per media-level animal observation.

    `package_dir` is the folder holding datapackage.json (or that file itself); the
    tables are found through its resources. With `scientific_name`, only that taxon
    is imported. Media are read from `filePath` relative to the package; for a URL,
    from `media/<fileName>` in the package, and a row whose file is not there is
    reported. The side comes from an `observationTags` entry `flank:left` or
    `flank:right` (else unknown), the station from the deployment's `locationID`
    (else its `deploymentID`), the encounter from `eventID`, the annotation ID from
    `observationID`. Normalised boxes become pixels of the image.
    """
    package = Path(package_dir).resolve()
    if package.is_file():
        package = package.parent
    descriptor_path = package / "datapackage.json"
    descriptor = _read_json(descriptor_path)
    problems: list[Problem] = []
    tables = {
        name: _read_camtrap_table(descriptor, descriptor_path, name, needed, problems)
        for name, needed in (
            ("deployments", ("deploymentID",)),
            ("media", ("mediaID", "filePath")),
            ("observations", ("observationID", "mediaID", "observationLevel", "observationType")),
        )
    }
    deployments = {row["deploymentID"]: row for _, row in tables["deployments"][1]}
    media = {row["mediaID"]: row for _, row in tables["media"][1]}
    observations_path = tables["observations"][0]
    wanted_taxon = scientific_name.strip().casefold() if scientific_name else None

    records: list[dict[str, Any]] = []
    missing: list[Path] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for _, observation in tables["observations"][1]:
        if observation["observationLevel"] != "media" or observation["observationType"] != "animal":
            continue
        if wanted_taxon is not None and observation.get("scientificName", "").strip().casefold() != wanted_taxon:
            continue
        where = f"observation {observation['observationID']}"

        def complain(message: str, where: str = where) -> None:
            problems.append(Problem(str(observations_path), where, message))

        medium = media.get(observation["mediaID"])
        if medium is None:
            complain(f"mediaID {observation['mediaID']!r} is not in media.csv; fix the mediaID or add the media row")
            continue
        deployment_id = observation.get("deploymentID") or medium.get("deploymentID", "")
        deployment = deployments.get(deployment_id)
        if deployment is None:
            complain(
                f"deploymentID {deployment_id!r} is not in deployments.csv; fix the deploymentID or add the deployment"
            )
            continue
        if not (medium.get("fileMediatype") or "image/").startswith("image/"):
            complain(
                f"media {medium['mediaID']} is {medium['fileMediatype']}, not an image; only still images can be imported"
            )
            continue
        image, fix = _camtrap_media_file(medium, package)
        if not image.is_file():
            missing.append(image)
            complain(fix)
            continue
        try:
            side = _flank_from_tags(observation.get("observationTags", ""))
        except ValueError as err:
            complain(f"observationTags: {err}")
            continue
        try:
            box = _camtrap_box(observation, image, sizes)
        except (ValueError, ImageReadError) as err:
            complain(str(err))
            continue
        records.append(
            {
                **box,
                "annotation_id": observation["observationID"],
                "image_path": str(image),
                "individual_id": observation.get("individualID"),
                "side": side,
                "sex": observation.get("sex"),
                "timestamp": medium.get("timestamp"),
                "station": deployment.get("locationID") or deployment_id,
                "latitude": deployment.get("latitude"),
                "longitude": deployment.get("longitude"),
                "country": country,
                "encounter_id": _source_encounter("event", observation["eventID"], country)
                if observation.get("eventID")
                else None,
                "source": str(observations_path),
                "source_row": where,
            }
        )
    _raise_if_none_found(package, missing, records, hint=f"download the media files into {package / 'media'}")
    return _finish(records, problems, source=observations_path, encounter_gap_s=encounter_gap_s)


def import_megadetector(
    results_json: str | Path,
    *,
    image_root: str | Path | None = None,
    min_confidence: float = 0.2,
    country: str | None = None,
    encounter_gap_s: float = DEFAULT_ENCOUNTER_GAP_S,
) -> ImportResult:
    """Import a MegaDetector results file (format 1.x): one row per animal detection with `conf >= min_confidence`.

    Rows have no individual and side unknown: they are captures to identify. Images
    MegaDetector could not read (`failure`) are reported; images with no animal
    above the threshold give no row and no problem. A detection without a
    `category`, or whose `conf` is not a number from 0 to 1, is reported (one
    problem per detection, naming the image) and skipped. File paths are relative to
    `image_root` (default: the JSON file's folder). Normalised boxes become pixels of
    the image. A per-image `datetime`, where a tool added one, becomes the timestamp.
    """
    path = Path(results_json).resolve()
    base = _existing_dir(image_root) if image_root is not None else path.parent
    data = _read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CatalogueError(
            f"{path}: not a MegaDetector results file (it needs an 'images' list); check that this is the detector's output JSON"
        )
    categories = data.get("detection_categories") or _MEGADETECTOR_CATEGORIES
    if not isinstance(categories, dict):
        raise CatalogueError(
            f"{path}: detection_categories is not a mapping like {_MEGADETECTOR_CATEGORIES}; fix the file"
        )
    animal = {str(key) for key, value in categories.items() if str(value).strip().lower() == "animal"}
    if not animal:
        raise CatalogueError(
            f"{path}: detection_categories {categories} has no 'animal' category; check that this is a MegaDetector file"
        )

    problems: list[Problem] = []
    records: list[dict[str, Any]] = []
    missing: list[Path] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for index, entry in enumerate(images):
        if not isinstance(entry, dict) or not entry.get("file"):
            problems.append(Problem(str(path), f"image #{index + 1}", "image entry has no 'file'; fix or remove it"))
            continue
        if not isinstance(entry["file"], str):
            problems.append(
                Problem(
                    str(path),
                    f"image #{index + 1}",
                    f"'file' is {_brief(entry['file'])}, not a path; write the image's path as text or remove the entry",
                )
            )
            continue
        where = f"image {entry['file']}"
        if entry.get("failure"):
            problems.append(
                Problem(
                    str(path),
                    where,
                    f"MegaDetector could not process this image ({entry['failure']}); check the file and run the detector on it again",
                )
            )
            continue
        listed = entry.get("detections") or []
        if not isinstance(listed, list):
            problems.append(
                Problem(
                    str(path),
                    where,
                    f"'detections' is {_brief(listed)}, not a list of detections; run the detector on this image again",
                )
            )
            continue
        detections = []
        for number, detection in enumerate(listed, start=1):
            problem = _megadetector_problem(detection)
            if problem:
                problems.append(Problem(str(path), f"{where} detection {number}", problem))
            elif str(detection["category"]) in animal and _number(detection["conf"], math.nan) >= min_confidence:
                detections.append((number, detection))
        if not detections:
            continue
        image = _resolve(entry["file"], base)
        if not image.is_file():
            missing.append(image)
            problems.append(
                Problem(
                    str(path),
                    where,
                    f"image file not found: {image}; pass image_root= the folder the paths are relative to (now {base})",
                )
            )
            continue

        def complain(message: str, where: str = where) -> None:
            problems.append(Problem(str(path), where, message))

        timestamp = _lenient_timestamp(entry.get("datetime"), complain)
        for number, detection in detections:
            try:
                box = _pixel_box(detection.get("bbox"), image, sizes)
            except (ValueError, ImageReadError) as err:
                problems.append(Problem(str(path), f"{where} detection {number}", str(err)))
                continue
            records.append(
                {
                    **box,
                    "image_path": str(image),
                    "side": "unknown",
                    "timestamp": timestamp,
                    "country": country,
                    "source": str(path),
                    "source_row": f"{where} detection {number}",
                }
            )
    _raise_if_none_found(path, missing, records, hint="pass image_root= the folder the image paths are relative to")
    return _finish(records, problems, source=path, encounter_gap_s=encounter_gap_s)


def import_xmp_tags(
    root: str | Path,
    *,
    individual_key: str = "individual",
    side_key: str = "side",
    filename_pattern: str | re.Pattern[str] = CAMTRAPR_FILENAME_PATTERN,
    country: str | None = None,
    encounter_gap_s: float = DEFAULT_ENCOUNTER_GAP_S,
) -> ImportResult:
    """Import camtrapR-style tagged images under `root` (searched recursively): one row per image.

    The individual is the XMP `HierarchicalSubject` entry `<individual_key>|<id>`
    (as camtrapR and digiKam write it), the side an optional `<side_key>|left` entry.
    An image without an individual tag is an unidentified capture: imported with
    individual unknown, not reported. An image with two different individual (or
    side) tags is imported with that field unknown and reported. Station and time
    come from the file name through `filename_pattern`, whose named groups `station`,
    `date` (year-month-day) and `time` (hour-minute-second) are each optional; a
    name that does not match is reported and the row imported without them.
    Unreadable files are reported and skipped.
    """
    root = _existing_dir(root)
    pattern = re.compile(filename_pattern)
    problems: list[Problem] = []
    records: list[dict[str, Any]] = []
    for path, relative in _image_files(root, problems):
        where = f"image {relative.as_posix()}"

        def complain(message: str, where: str = where) -> None:
            problems.append(Problem(str(root), where, message))

        try:
            subjects = _xmp_hierarchical_subjects(path)
        except ImageReadError as err:
            complain(err.reason)
            continue
        individuals = _tagged(subjects, individual_key)
        sides = {s.lower() for s in _tagged(subjects, side_key)}
        if len(individuals) > 1:
            complain(
                f"tagged with several individuals {sorted(individuals)}; imported as individual unknown, keep one tag per image"
            )
        if len(sides) > 1:
            complain(f"tagged with several sides {sorted(sides)}; imported with side unknown, keep one")
        station, timestamp = _station_and_time(path.name, pattern, complain)
        records.append(
            {
                "image_path": str(path),
                "individual_id": individuals.pop() if len(individuals) == 1 else None,
                "side": sides.pop() if len(sides) == 1 else "unknown",
                "station": station,
                "timestamp": timestamp,
                "country": country,
                "source": str(root),
                "source_row": where,
            }
        )
    return _finish(records, problems, source=root, encounter_gap_s=encounter_gap_s)


# ---- shared helpers ---------------------------------------------------------------------------


def _finish(
    records: list[dict[str, Any]], problems: list[Problem], *, source: Path, encounter_gap_s: float
) -> ImportResult:
    table, invalid = build_catalogue(records, source=str(source))
    return ImportResult(assign_encounters(table, gap_s=encounter_gap_s), problems + invalid)


def _existing_dir(folder: str | Path) -> Path:
    path = Path(folder).resolve()
    if not path.is_dir():
        raise CatalogueError(f"{path}: folder not found; check the path{quoting_hint(path)}")
    return path


def _resolve(text: str, base: Path) -> Path:
    """Return the absolute path of a path written in an input file, relative ones taken from `base`."""
    text = text.strip()
    if os.sep == "/":
        # Lists written on Windows use backslashes; no one names a camera-trap photo with one.
        text = text.replace("\\", "/")
    path = Path(text)
    return (path if path.is_absolute() else base / path).resolve()


def _raise_if_none_found(source: Path, missing: list[Path], records: list[dict[str, Any]], *, hint: str) -> None:
    if missing and not records:
        raise CatalogueError(
            f"{source}: none of the {len(missing)} image files was found (the first: {missing[0]}); {hint}"
        )


def _image_files(root: Path, problems: list[Problem]) -> Iterator[tuple[Path, Path]]:
    """Yield (path, path relative to root) of the image files under root; report the other files.

    Raises CatalogueError when root holds no file at all: an empty folder is a wrong path, never an empty import.
    """
    found = False
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        found = True
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(
                Problem(
                    str(root),
                    f"file {relative.as_posix()}",
                    f"not an image file (images end in {', '.join(sorted(IMAGE_EXTENSIONS))}); skipped",
                )
            )
            continue
        yield path, relative
    if not found:
        raise CatalogueError(
            f"{root}: the folder holds no files (none in it or below it); check the path, or copy the images there"
        )


def _sides_in_name(name: str) -> set[str]:
    """Return the sides named by words starting with left/right in a file name."""
    words = (token.lower() for token in _NAME_TOKEN.findall(name))
    return {side for word in words for side in ("left", "right") if word.startswith(side)}


def _source_encounter(kind: str, value: str, country: str | None) -> str:
    return f"{country}/{kind}:{value}" if country else f"{kind}:{value}"


def _brief(value: Any) -> str:
    """Return a value's repr, cut short: a message names a bad value, it does not print a whole file."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _lenient_timestamp(value: Any, complain: Callable[[str], None]) -> pd.Timestamp | None:
    """Return the time in UTC (naive times taken as UTC), None when empty or not a date and time (reported)."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    # EXIF and some exporters write the date as 2016:01:01 or 2016/01/01.
    iso = _YEAR_FIRST_DATE.sub(r"\1-\2-\3", text)
    try:
        if not _DATE_TIME.fullmatch(iso):
            raise ValueError(text)
        stamp = pd.Timestamp(iso)
    except ValueError:
        complain(
            f"date {text!r} is not a date and time like 2016-01-01 12:00:00; imported without a time, fix it to use the time"
        )
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _pixel_box(box: Any, image: Path, sizes: dict[Path, tuple[int, int]]) -> dict[str, float]:
    """Return the box columns in pixels for a box [x, y, w, h] in fractions of the image; raise ValueError or ImageReadError."""
    if not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4:
        raise ValueError(f"box {box!r} is not [x, y, width, height]; fix it")
    fractions = [_number(v, math.nan) for v in box]
    x, y, w, h = fractions
    # Tolerate rounding just past the edge; beyond that the box is in pixels or broken.
    if any(math.isnan(v) for v in fractions) or min(x, y) < -0.01 or w <= 0 or h <= 0 or x + w > 1.01 or y + h > 1.01:
        raise ValueError(f"box {list(box)} is not normalised to 0..1 of the image (x, y, width, height); fix it")
    if image not in sizes:
        sizes[image] = image_size(image)
    width, height = sizes[image]
    return dict(zip(BBOX_COLUMNS, (max(x, 0.0) * width, max(y, 0.0) * height, w * width, h * height), strict=True))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CatalogueError(f"{path}: file not found; check the path{quoting_hint(path)}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CatalogueError(f"{path}: not valid JSON ({err}); re-export it or fix the file") from err
    except RecursionError as err:
        raise CatalogueError(
            f"{path}: JSON nested too deeply to read (thousands of levels); re-export it or fix the file"
        ) from err
    except OSError as err:
        raise CatalogueError(f"{path}: cannot read the file ({err}); check it is readable") from err


def _read_csv(path: Path, problems: list[Problem]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Return (header, [(line number, row)]): rows with the wrong number of cells reported and left out."""
    if not path.is_file():
        raise CatalogueError(f"{path}: file not found; check the path{quoting_hint(path)}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise CatalogueError(f"{path}: not UTF-8 text ({err}); save it as 'CSV UTF-8'") from err
    except OSError as err:
        raise CatalogueError(f"{path}: cannot read the file ({err}); check it is readable") from err
    first_line = text.split("\n", 1)[0]
    # Spreadsheets in many locales save with ';' (or tabs) instead of ','.
    delimiter = max(",;\t", key=first_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader, [])]
        if not any(header):
            raise CatalogueError(f"{path}: the file is empty; it needs a header row naming its columns")
        rows: list[tuple[int, dict[str, str]]] = []
        end = reader.line_num
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if end > start and len(cells) != len(header):
                _raise_unclosed_quote(path, start, end)
            if len(cells) != len(header):
                problems.append(
                    Problem(
                        str(path),
                        f"row {reader.line_num}",
                        f"row has {len(cells)} cells but the header has {len(header)}; quote cells that contain '{delimiter}'",
                    )
                )
                continue
            rows.append((reader.line_num, dict(zip(header, cells, strict=True))))
    except csv.Error as err:
        raise CatalogueError(f"{path}: not a readable CSV (line {reader.line_num}: {err}); fix the file") from err
    return header, rows


def _raise_unclosed_quote(path: Path, start: int, end: int) -> None:
    """Raise CatalogueError for a record that ran over several lines because a quote on its first line was not closed."""
    raise CatalogueError(
        f'{path}: line {start}: a quote (") opens a cell that is not closed where the line ends, so lines {start} '
        f"to {end} were read as one row; close the quote (or remove it) and run again"
    )


def _require_columns(path: Path, header: list[str], missing: Sequence[str], *, needed: Sequence[str]) -> None:
    if missing:
        raise CatalogueError(f"{path}: missing columns {list(missing)}; it needs {list(needed)}, found {header}")


# ---- per-format helpers -------------------------------------------------------------------------


def _label_columns(header: list[str]) -> dict[str, str]:
    """Return {CSV column: catalogue column it fills}; an alias (path, sighting) yields to the real name."""
    keys = {name: name.strip().lower().replace(" ", "_") for name in header}
    columns = {}
    for name, key in keys.items():
        column = _LABEL_ALIASES.get(key, key)
        if column in COLUMN_NAMES and (column == key or column not in keys.values()):
            columns[name] = column
    return columns


def _megadetector_problem(detection: Any) -> str | None:
    """Return what makes a MegaDetector detection unusable (no category, a confidence outside 0..1), or None."""
    if not isinstance(detection, dict):
        return f"detection {_brief(detection)} is not a JSON object; run the detector on this image again"
    if detection.get("category") in (None, ""):
        return "detection has no 'category'; run the detector on this image again"
    conf = detection.get("conf")
    if isinstance(conf, bool) or not 0 <= _number(conf, math.nan) <= 1:
        shown = "missing" if conf is None else _brief(conf)
        return f"detection confidence 'conf' is {shown}, not a number from 0 to 1; run the detector on this image again"
    return None


def _coco_image(
    image: Mapping[str, Any], base: Path, country: str | None, path: Path, problems: list[Problem]
) -> dict[str, Any]:
    """Return the record fields an image gives its annotations; report a date or GPS it cannot use."""
    where = f"image {image['id']}"
    lat, lon = _number(image.get("gps_lat_captured"), math.nan), _number(image.get("gps_lon_captured"), math.nan)
    if lat == -1.0 and lon == -1.0:
        lat = lon = math.nan  # Wild Me writes (-1, -1) for "no GPS"
    date = image.get("date_captured") or image.get("datetime")
    timestamp = _lenient_timestamp(date, lambda message: problems.append(Problem(str(path), where, message)))
    seq_id = image.get("seq_id")
    return {
        "image_path": str(_resolve(str(image["file_name"]), base)),
        "timestamp": timestamp,
        "station": image.get("location"),
        "latitude": None if math.isnan(lat) else lat,
        "longitude": None if math.isnan(lon) else lon,
        "country": country,
        "encounter_id": _source_encounter("seq", str(seq_id), country) if seq_id not in (None, "") else None,
        "source": str(path),
    }


def _coco_key(value: Any) -> str | None:
    """Return an image ID as text (JSON files mix 1 and "1"); None when it is missing or not a scalar."""
    return str(value) if isinstance(value, str | int | float) and value != "" else None


def _viewpoint_side(viewpoint: Any) -> str | None:
    """Return left, right or unknown (no viewpoint given); None for a view with no flank. Raise ValueError for a non-viewpoint."""
    text = "" if viewpoint is None else str(viewpoint).strip().lower()
    if not text:
        return "unknown"
    if not _VIEWPOINT.fullmatch(text) or ("left" in text and "right" in text):
        raise ValueError(text)
    if "left" in text:
        return "left"
    return "right" if "right" in text else None


def _coco_box(bbox: Any) -> dict[str, float]:
    """Return the box columns of a COCO pixel box (none for a missing box); raise ValueError for a malformed one."""
    if bbox is None or (isinstance(bbox, list) and not bbox):
        return {}
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError(bbox)
    values = [_number(v, math.nan) for v in bbox]
    if any(math.isnan(v) for v in values):
        raise ValueError(bbox)
    return dict(zip(BBOX_COLUMNS, values, strict=True))


def _coco_segmentation(segmentation: Any) -> str | None:
    """Return a COCO segmentation as the catalogue's mask text (JSON), None for none; raise ValueError for a bad one."""
    if segmentation is None or segmentation == [] or segmentation == {}:
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        sized = isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
        runs = isinstance(counts, str) or (
            isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts)
        )
        if not sized or not runs:
            raise ValueError('is not COCO RLE ({"size": [height, width], "counts": [...] or "..."})')
        return json.dumps({"size": size, "counts": counts}, separators=(",", ":"))
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if (
                not isinstance(polygon, list)
                or len(polygon) < 6
                or len(polygon) % 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in polygon)
            ):
                raise ValueError("is not a list of polygons [[x1, y1, x2, y2, x3, y3, ...], ...] in pixels")
        return json.dumps(segmentation, separators=(",", ":"))
    raise ValueError("is neither polygons nor RLE")


def _read_camtrap_table(
    descriptor: Any, descriptor_path: Path, name: str, needed: Sequence[str], problems: list[Problem]
) -> tuple[Path, list[tuple[int, dict[str, str]]]]:
    """Return (file, rows) of a Camtrap DP resource, found through datapackage.json."""
    resources = descriptor.get("resources") if isinstance(descriptor, dict) else None
    if not isinstance(resources, list):
        raise CatalogueError(
            f"{descriptor_path}: 'resources' is {_brief(resources)}, not a list of the package's tables; "
            "check that this is a Camtrap DP datapackage.json"
        )
    resource = next((r for r in resources if isinstance(r, dict) and r.get("name") == name), None)
    if resource is None:
        raise CatalogueError(
            f"{descriptor_path}: no '{name}' resource; a Camtrap DP package has deployments, media and observations"
        )
    location = resource.get("path")
    if isinstance(location, list) and len(location) == 1:
        location = location[0]
    if not isinstance(location, str) or re.match(r"^[a-z][a-z0-9+.-]*://", location, re.IGNORECASE):
        raise CatalogueError(
            f"{descriptor_path}: resource '{name}' is not one local file (path {location!r}); download it into the package folder and set its path"
        )
    table_path = _resolve(location, descriptor_path.parent)
    header, rows = _read_csv(table_path, problems)
    _require_columns(table_path, header, [c for c in needed if c not in header], needed=needed)
    return table_path, rows


def _camtrap_media_file(medium: Mapping[str, str], package: Path) -> tuple[Path, str]:
    """Return (local file of a media row, message saying how to provide it when it is absent)."""
    file_path = medium["filePath"].strip()
    if re.match(r"^[a-z][a-z0-9+.-]*://", file_path, re.IGNORECASE):
        local = package / "media" / (medium.get("fileName") or Path(file_path).name)
        return local, f"media file not available locally: download {file_path} to {local}"
    local = _resolve(file_path, package)
    return local, f"media file not found: {local}; fix filePath (relative to {package}) or restore the file"


def _flank_from_tags(tags: str) -> str:
    """Return the side in Camtrap DP observationTags (`flank:left | ...`), unknown when absent; raise ValueError for another flank."""
    for tag in tags.split("|"):
        key, _, value = tag.partition(":")
        if key.strip().lower() == "flank":
            side = value.strip().lower()
            if side not in ("left", "right", "unknown"):
                raise ValueError(f"flank {value.strip()!r} is not left, right or unknown; fix the tag")
            return side
    return "unknown"


def _camtrap_box(observation: Mapping[str, str], image: Path, sizes: dict[Path, tuple[int, int]]) -> dict[str, float]:
    values = [observation.get(key, "").strip() for key in ("bboxX", "bboxY", "bboxWidth", "bboxHeight")]
    if not any(values):
        return {}
    if not all(values):
        raise ValueError("box is incomplete; give all of bboxX, bboxY, bboxWidth, bboxHeight or none")
    return _pixel_box(values, image, sizes)


def _xmp_hierarchical_subjects(path: Path) -> list[str]:
    """Return the XMP HierarchicalSubject entries of an image; raise ImageReadError when it cannot be read."""
    image_size(path)  # names the reason (empty, not an image, ...) the way every reader in the project does
    try:
        with Image.open(path) as im:
            xmp = im.getxmp()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(
            path, f"cannot read its XMP metadata ({err}); re-save the tags or re-copy the file"
        ) from err
    return _strings_under(xmp, "hierarchicalSubject")


def _strings_under(tree: Any, key: str) -> list[str]:
    """Return every string inside the values of `key` anywhere in a nested dict/list tree."""
    if isinstance(tree, dict):
        return [s for k, v in tree.items() for s in (_strings(v) if k == key else _strings_under(v, key))]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings_under(v, key)]
    return []


def _strings(tree: Any) -> list[str]:
    if isinstance(tree, str):
        return [tree]
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _strings(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return []


def _tagged(subjects: list[str], key: str) -> set[str]:
    """Return the distinct values of `key|value` entries (key matched ignoring case)."""
    values = set()
    for subject in subjects:
        head, _, value = subject.partition("|")
        if head.strip().lower() == key.lower() and value.strip():
            values.add(value.strip())
    return values


def _station_and_time(
    name: str, pattern: re.Pattern[str], complain: Callable[[str], None]
) -> tuple[str | None, pd.Timestamp | None]:
    match = pattern.search(name)
    if match is None:
        complain(
            f"file name does not match the pattern {pattern.pattern!r}; imported without station and time, rename it (camtrapR imageRename) or pass filename_pattern="
        )
        return None, None
    groups = match.groupdict()
    station = groups.get("station")
    if not groups.get("date"):
        return station, None
    date = "-".join(re.findall(r"\d+", groups["date"]))
    time = ":".join(re.findall(r"\d+", groups.get("time") or ""))
    return station, _lenient_timestamp(f"{date} {time}".strip(), complain)


Source = ImportResult | pd.DataFrame | str | Path
"""What an entry point's `data.source` gives: an importer's result, a catalogue table or a catalogue CSV path."""


def load_source(source: Source) -> tuple[pd.DataFrame, list[Problem]]:
    """Return (catalogue, problems) from an importer's result, a catalogue table or a catalogue CSV path.

    This is how every entry point turns its configured `data.source` into a catalogue.
    """
    if isinstance(source, ImportResult):
        return source.table, list(source.problems)
    if isinstance(source, pd.DataFrame):
        return validate(source, source="input table"), []
    if isinstance(source, str | Path):
        return load_catalogue(source), []
    raise CatalogueError(
        f"expected an import result, a catalogue table or a catalogue path, got {type(source).__name__}"
    )
