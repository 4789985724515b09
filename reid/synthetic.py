"""Synthetic leopard flanks and camera-trap captures: the project's built-in data set.

`generate` draws a population of leopards, plans when and at which camera station
each flank was photographed, renders every capture and writes a standard catalogue.
Everything follows from `SyntheticConfig` (its `seed` included): the same config
gives byte-identical files (with the same OpenCV and NumPy). `ensure_dataset` caches
one data set per folder; `contact_sheet` saves a grid of captures to look at.

Conventions:

- Flank coordinates: x runs from head to tail, y from spine to belly. Every flank of
  every animal has its own random coat; a right coat is not the mirror of the left
  one, because no leopard's is.
- A left flank is photographed with the head towards the left of the frame and a
  right flank with the head towards the right: what a camera beside the animal sees.
- IDs: the catalogue's `individual_id` is the truth ID (`LEO-0007`), so training and
  evaluation see one identity per animal. The two countries' catalogues know the
  animals they photographed under their own IDs (`KZ-0003`, `TM-0011`, numbered in
  order of first capture there); `individuals.csv` holds the mapping and
  `country_catalogues` applies it, so two catalogues share an animal exactly when
  their IDs map to the same truth ID.
- Clocks: timestamps are UTC; day and night are decided in local time (UTC+5 in both
  Mangystau and Turkmenistan), and the cameras stamp local time on the frame.

The data are hard on purpose: all animals share one palette family and body plan
and differ only in their rosettes, and captures vary in viewpoint, light, infrared
night exposure, motion blur, noise and occlusion by vegetation. Each station is a
fixed scene (a camera stays put), and most of an animal's visits are to its home
stations, as in real surveys: background is a cue a model must not learn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from reid.catalogue import BBOX_COLUMNS, load_catalogue, save_catalogue
from reid.errors import ReidError
from reid.files import atomic_write
from reid.images import read_image

__all__ = [
    "COUNTRY_AREAS",
    "GENERATOR_VERSION",
    "UTC_OFFSET_H",
    "SyntheticConfig",
    "contact_sheet",
    "country_catalogues",
    "ensure_dataset",
    "generate",
    "load_individuals",
]

GENERATOR_VERSION = 1  # bump when rendering changes, so cached data sets are rebuilt
CATALOGUE_FILE = "catalogue.csv"
INDIVIDUALS_FILE = "individuals.csv"
CONFIG_FILE = "config.json"
UTC_OFFSET_H = 5
# (lat_min, lat_max, lon_min, lon_max) where each country's stations are placed.
COUNTRY_AREAS: dict[str, tuple[float, float, float, float]] = {
    "KZ": (43.2, 43.8, 54.9, 56.1),  # Ustyurt plateau, Mangystau
    "TM": (38.0, 39.0, 56.0, 58.0),  # Kopetdag
}

Array = np.ndarray
_CANVAS_W, _CANVAS_H = 704, 368  # flank canvas, px; head at the left
_GROUND_Y = 352.0
_BODY_LENGTH_M = 1.6  # head and torso, what the box covers
_MIN_ENCOUNTER_SEPARATION_S = 600.0


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that decides the synthetic data set; equal configs give identical files."""

    n_individuals: int = 60
    encounters_per_flank: tuple[int, int] = (2, 5)  # inclusive range, per side seen
    frames_per_encounter: tuple[int, int] = (2, 5)  # inclusive range; a burst a few seconds apart
    image_size: tuple[int, int] = (320, 240)  # width, height, px
    both_countries_share: float = 0.1  # of individuals, photographed in two countries
    one_side_share: float = 0.2  # of individuals, photographed on one flank only
    night_share: float = 0.4  # of encounters, infrared night frames
    stations: tuple[tuple[str, int], ...] = (("KZ", 4), ("TM", 6))  # (country, camera stations)
    start_date: str = "2022-01-01"  # local date of the first day of the survey
    days: int = 730
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self) -> None:
        # Hydra and JSON hand over lists; tuples keep the config hashable and comparable.
        for name in ("encounters_per_flank", "frames_per_encounter", "image_size"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "stations", tuple((str(c), int(n)) for c, n in self.stations))
        problems = []
        if self.n_individuals < 1:
            problems.append(f"n_individuals must be at least 1, got {self.n_individuals}")
        for name in ("encounters_per_flank", "frames_per_encounter"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                problems.append(f"{name} must be (low, high) with 1 <= low <= high, got {(low, high)}")
        if self.frames_per_encounter[1] > 10:
            problems.append("frames_per_encounter above 10 would stretch a burst past 60 s")
        if min(self.image_size) < 64:
            problems.append(f"image_size must be at least 64 x 64 px, got {self.image_size}")
        for name in ("both_countries_share", "one_side_share", "night_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        countries = [c for c, _ in self.stations]
        unknown = sorted(set(countries) - set(COUNTRY_AREAS))
        if unknown or len(set(countries)) != len(countries) or any(n < 1 for _, n in self.stations) or not countries:
            problems.append(
                f"stations must list distinct countries among {sorted(COUNTRY_AREAS)} with at least one "
                f"station each, got {list(self.stations)}"
            )
        if self.both_countries_share > 0 and len(countries) < 2:
            problems.append("both_countries_share > 0 needs stations in two countries")
        if self.days < 1:
            problems.append(f"days must be at least 1, got {self.days}")
        try:
            pd.Timestamp(self.start_date)
        except ValueError:
            problems.append(f"start_date {self.start_date!r} is not a date like 2022-01-01")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality must be 1..100, got {self.jpeg_quality}")
        if problems:
            raise ReidError("invalid SyntheticConfig: " + "; ".join(problems))

    def to_json(self) -> str:
        """Return the config as JSON, with the generator version that renders it."""
        return json.dumps(
            {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}, indent=2, sort_keys=True
        )


# ----------------------------------------------------------------------------- public API


def generate(out_dir: str | Path, config: SyntheticConfig | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Render the data set into `out_dir` and return its catalogue table.

    Writes `images/<country>/<station>/*.jpg`, `catalogue.csv` (the project's
    standard catalogue; individual_id is the truth ID), `individuals.csv` (truth per
    individual, with each country's own ID) and `config.json`. The catalogue is
    written after every image, so a folder that has one is complete. `out_dir` must
    be new or empty; `ensure_dataset` manages a cached data set.
    """
    config = config or SyntheticConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReidError(
            f"{out_dir} is not empty; generate into a new or empty folder, or use ensure_dataset to refresh a cached data set"
        )
    width, height = config.image_size
    stations, individuals, encounters = _plan(config)
    scenes = {s.name: _scene(_rng(config.seed, 2, s.index), s.country, width, height) for s in stations}
    by_flank: dict[tuple[int, str], list[_Encounter]] = {}
    for encounter in encounters:
        by_flank.setdefault((encounter.individual, encounter.side), []).append(encounter)

    rows: list[dict[str, Any]] = []
    total = sum(e.n_frames for e in encounters)
    with tqdm(total=total, desc="synthetic leopards", unit="img", disable=not progress) as bar:
        for (index, side), flank_encounters in sorted(by_flank.items()):
            individual = individuals[index]
            coat = _coat(_rng(config.seed, 1, index, _SIDES.index(side)), individual.body, individual.palette)
            for encounter in flank_encounters:
                station = stations[encounter.station]
                scene = scenes[station.name]
                frames = _render_encounter(
                    _rng(config.seed, 3, encounter.index), encounter, individual.body, coat, scene, config
                )
                for k, (image, box) in enumerate(frames):
                    stamp = encounter.start + pd.Timedelta(seconds=encounter.frame_offsets_s[k])
                    name = f"{station.name}_{stamp.strftime('%Y%m%d_%H%M%S')}_{k + 1}"
                    path = out_dir / "images" / station.country / station.name / f"{name}.jpg"
                    _imprint(
                        image,
                        scene,
                        f"{station.name}  {(stamp + pd.Timedelta(hours=UTC_OFFSET_H)).strftime('%Y-%m-%d %H:%M:%S')}  {k + 1}/{encounter.n_frames}",
                    )
                    _write_jpeg(path, image, config.jpeg_quality)
                    rows.append(
                        {
                            "annotation_id": name,
                            "image_path": str(path),
                            "individual_id": individual.individual_id,
                            "side": side,
                            **dict(zip(BBOX_COLUMNS, box, strict=True)),
                            "timestamp": stamp,
                            "station": station.name,
                            "country": station.country,
                            # The ID `assign_encounters` would give the burst: both routes agree.
                            "encounter_id": f"{station.country}/{station.name}/{encounter.start.strftime('%Y%m%dT%H%M%SZ')}",
                            "sex": individual.sex,
                            "latitude": station.latitude,
                            "longitude": station.longitude,
                        }
                    )
                    bar.update()

    table = pd.DataFrame(rows).sort_values(["timestamp", "annotation_id"], kind="stable").reset_index(drop=True)
    # The rows were made here, not imported: they point at the catalogue itself, by line.
    table["source"] = CATALOGUE_FILE
    table["source_row"] = [str(i + 2) for i in range(len(table))]
    truth = _individuals_table(individuals, table, stations, config)
    with atomic_write(out_dir / INDIVIDUALS_FILE) as f:
        truth.to_csv(f, index=False)
    save_catalogue(table, out_dir / CATALOGUE_FILE)
    with atomic_write(out_dir / CONFIG_FILE) as f:
        f.write(config.to_json())
    return load_catalogue(out_dir / CATALOGUE_FILE)


def ensure_dataset(out_dir: str | Path, config: SyntheticConfig | None = None, *, progress: bool = True) -> Path:
    """Return the path of `out_dir/catalogue.csv`, generating the data set unless it is there for exactly `config`.

    The data set is rendered into a temporary sibling folder and renamed into place,
    so `out_dir` never holds half a data set. A folder that holds anything other than
    a synthetic data set is left alone (ReidError).
    """
    config = config or SyntheticConfig()
    out_dir = Path(out_dir)
    if _holds(out_dir, config):
        return out_dir / CATALOGUE_FILE
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file():
        raise ReidError(
            f"{out_dir} holds files that are not a synthetic data set; give an empty or new folder for the synthetic data"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".stale", dir=out_dir.parent))
    try:
        generate(fresh, config, progress=progress)
        if not _holds(out_dir, config):  # else another process got there first
            if out_dir.exists():
                os.replace(out_dir, stale)  # a rename onto an empty folder replaces it
            os.replace(fresh, out_dir)
    finally:
        # Only caches live here: what failed half-way is deleted, never left beside the data.
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return out_dir / CATALOGUE_FILE


def load_individuals(path: str | Path) -> pd.DataFrame:
    """Return the truth table `generate` wrote as individuals.csv (empty strings where a country never saw the animal)."""
    truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("n_encounters", "n_images"):
        truth[column] = truth[column].astype(int)
    return truth


def country_catalogues(table: pd.DataFrame, individuals: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Return one catalogue per country whose individual_id is that country's own ID (KZ-0003, ...).

    This is what each country's keepers would hold before exchanging catalogues: an
    animal photographed on both sides of the border has a different ID in each, and
    `individuals` (from `load_individuals`) says which IDs are the same animal.
    """
    catalogues = {}
    for country in sorted(table["country"].dropna().unique()):
        column = f"{country.lower()}_id"
        if column not in individuals.columns:
            raise ReidError(
                f"individuals table has no column {column}; pass the individuals.csv written with this catalogue"
            )
        own_id = individuals.set_index("individual_id")[column].replace("", pd.NA)
        rows = table[table["country"] == country].copy()
        rows["individual_id"] = rows["individual_id"].map(own_id).astype("string")
        unmapped = rows.loc[rows["individual_id"].isna(), "annotation_id"]
        if len(unmapped):
            raise ReidError(
                f"{len(unmapped)} {country} rows (first {unmapped.iloc[0]}) have no {column} in the individuals table; pass the individuals.csv written with this catalogue"
            )
        catalogues[country] = rows.reset_index(drop=True)
    return catalogues


def contact_sheet(
    table: pd.DataFrame, out_path: str | Path, n: int = 24, *, crop: bool = True, columns: int = 6
) -> Path:
    """Save a PNG grid of `n` captures spread over the table (flank crops, or whole frames with the box) and return its path."""
    out_path = Path(out_path)
    rows = table.iloc[np.unique(np.linspace(0, len(table) - 1, min(n, len(table))).round().astype(int))]
    tile_w, tile_h, caption_h = (192, 112, 14) if crop else (320, 240, 14)
    sheet = np.full((math.ceil(len(rows) / columns) * (tile_h + caption_h), columns * tile_w, 3), 255, np.uint8)
    for i, (_, row) in enumerate(rows.iterrows()):
        box = [float(row[c]) for c in BBOX_COLUMNS]
        if crop:
            image = read_image(row["image_path"], box, margin=0.05)
        else:
            image = read_image(row["image_path"]).copy()
            x, y, w, h = (round(v) for v in box)
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), (255, 40, 40), 1)
        factor = min(tile_w / image.shape[1], tile_h / image.shape[0])
        image = cv2.resize(
            image,
            (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor))),
            interpolation=cv2.INTER_AREA,
        )
        top, left = (i // columns) * (tile_h + caption_h), (i % columns) * tile_w
        sheet[top : top + image.shape[0], left : left + image.shape[1]] = image
        caption = f"{row['individual_id']} {row['side']} {row['station']}"
        cv2.putText(
            sheet, caption, (left + 2, top + tile_h + 11), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1, cv2.LINE_AA
        )
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ReidError(f"{out_path}: could not encode the contact sheet")
    with atomic_write(out_path, "wb") as f:
        f.write(encoded.tobytes())
    return out_path


# ----------------------------------------------------------------------------- planning

_SIDES = ("left", "right")
_HOME_STATION_SHARE = 0.85  # of an animal's encounters, at its home stations


@dataclass(frozen=True)
class _Station:
    index: int
    name: str
    country: str
    latitude: float
    longitude: float


@dataclass(frozen=True)
class _Body:
    """Flank canvas geometry of one animal, px; the torso is a superellipse around (cx, cy)."""

    cx: float
    cy: float
    half_length: float
    half_height: float
    head_r: float
    tail: float  # tail length factor

    def box(self) -> tuple[float, float, float, float]:
        """Return (x0, y0, x1, y1), the neutral torso + head box on the canvas."""
        a, b, r = self.half_length, self.half_height, self.head_r
        return (self.cx - a - 1.95 * r, self.cy - 0.55 * b - 1.25 * r, self.cx + a, self.cy + b)


@dataclass(frozen=True)
class _Individual:
    index: int
    individual_id: str
    sex: str
    body: _Body
    palette: tuple[float, float, float]
    home_stations: tuple[int, ...]


@dataclass(frozen=True)
class _Encounter:
    index: int
    individual: int
    side: str
    station: int
    start: pd.Timestamp
    night: bool
    frame_offsets_s: tuple[float, ...]

    @property
    def n_frames(self) -> int:
        return len(self.frame_offsets_s)


def _rng(*key: int) -> np.random.Generator:
    # One independent stream per purpose and object: rendering one flank never shifts another.
    return np.random.default_rng(np.random.SeedSequence([abs(int(k)) for k in key]))


def _plan(config: SyntheticConfig) -> tuple[list[_Station], list[_Individual], list[_Encounter]]:
    """Return (stations, individuals, encounters): who was photographed where, when, on which side."""
    rng = _rng(config.seed, 0)
    stations: list[_Station] = []
    for country, count in config.stations:
        lat0, lat1, lon0, lon1 = COUNTRY_AREAS[country]
        for k in range(count):
            lat, lon = round(float(rng.uniform(lat0, lat1)), 4), round(float(rng.uniform(lon0, lon1)), 4)
            stations.append(_Station(len(stations), f"{country}-CAM{k + 1:02d}", country, lat, lon))
    countries = [c for c, _ in config.stations]
    in_country = {c: [s.index for s in stations if s.country == c] for c in countries}
    weights = np.array([n for _, n in config.stations], float)

    n = config.n_individuals
    n_both = round(config.both_countries_share * n) if len(countries) > 1 else 0
    both = set(rng.choice(n, n_both, replace=False).tolist())
    one_sided = set(rng.choice(n, round(config.one_side_share * n), replace=False).tolist())
    start = pd.Timestamp(config.start_date).tz_localize(None).normalize()
    busy: dict[int, list[float]] = {s.index: [] for s in stations}
    individuals: list[_Individual] = []
    encounters: list[_Encounter] = []
    for i in range(n):
        sex = "male" if rng.random() < 0.5 else "female"
        if i in both:
            visited = [countries[k] for k in sorted(rng.choice(len(countries), 2, replace=False))]
        else:
            visited = [countries[int(rng.choice(len(countries), p=weights / weights.sum()))]]
        home: dict[str, list[int]] = {}
        for country in visited:
            pool = in_country[country]
            first = int(rng.integers(len(pool)))
            home[country] = sorted(
                {pool[first], pool[(first + 1) % len(pool)]} if rng.random() < 0.5 else {pool[first]}
            )
        sides = [_SIDES[int(rng.integers(2))]] if i in one_sided else list(_SIDES)
        shared_side = sides[int(rng.integers(len(sides)))]
        individuals.append(
            _Individual(
                i,
                f"LEO-{i + 1:04d}",
                sex,
                _draw_body(rng, sex),
                _draw_palette(rng),
                tuple(s for c in visited for s in home[c]),
            )
        )
        for side in sides:
            count = int(rng.integers(config.encounters_per_flank[0], config.encounters_per_flank[1] + 1))
            if len(visited) > 1 and side == shared_side:
                # Each cross-border animal shows one flank in both countries, so the countries can match it.
                count = max(count, 2)
                where = visited + [visited[int(rng.integers(2))] for _ in range(count - 2)]
            else:
                where = [visited[int(rng.integers(len(visited)))] for _ in range(count)]
            for country in where:
                pool = home[country] if rng.random() < _HOME_STATION_SHARE else in_country[country]
                station = pool[int(rng.integers(len(pool)))]
                night = bool(rng.random() < config.night_share)
                gaps = rng.integers(
                    1, 5, int(rng.integers(config.frames_per_encounter[0], config.frames_per_encounter[1] + 1)) - 1
                )
                offsets = (0.0, *np.cumsum(gaps).astype(float).tolist())
                moment = _free_moment(rng, busy[station], start, config.days, night, offsets[-1])
                encounters.append(_Encounter(len(encounters), i, side, station, moment, night, offsets))
    return stations, individuals, encounters


def _free_moment(
    rng: np.random.Generator, busy: list[float], start: pd.Timestamp, days: int, night: bool, duration_s: float
) -> pd.Timestamp:
    """Return a UTC start time at a station, well apart from its other bursts, and mark it busy."""
    for _ in range(10_000):
        # Local clock: day 06:30-19:00, night 20:00-05:00.
        hour = rng.uniform(20.0, 29.0) if night else rng.uniform(6.5, 19.0)
        local_s = float(rng.integers(days)) * 86400.0 + round(hour * 3600.0)
        utc_s = local_s - UTC_OFFSET_H * 3600.0
        if all(abs(utc_s - other) > _MIN_ENCOUNTER_SEPARATION_S + duration_s for other in busy):
            busy.append(utc_s)
            return (start + pd.Timedelta(seconds=utc_s)).tz_localize("UTC")
    raise ReidError(
        f"cannot fit {len(busy) + 1} encounters at one station into {days} days; raise days or add stations"
    )


def _draw_body(rng: np.random.Generator, sex: str) -> _Body:
    male = sex == "male"
    half_height = 62.0 * rng.uniform(0.95, 1.05) * (1.06 if male else 0.97)
    return _Body(
        cx=360.0,
        cy=_GROUND_Y - 2.6 * half_height,
        half_length=165.0 * rng.uniform(0.96, 1.04) * (1.03 if male else 0.98),
        half_height=half_height,
        head_r=40.0 * rng.uniform(0.95, 1.05) * (1.1 if male else 0.95),
        tail=float(rng.uniform(0.9, 1.1)),
    )


_TAWNY = np.array([0.80, 0.65, 0.45], np.float32)
_PALE = np.array([0.80, 0.75, 0.63], np.float32)  # Persian leopards run pale and greyish
_CREAM = np.array([0.93, 0.90, 0.82], np.float32)
_SPOT = np.array([0.12, 0.09, 0.07], np.float32)


def _draw_palette(rng: np.random.Generator) -> tuple[float, float, float]:
    red, green, blue = (_TAWNY + (_PALE - _TAWNY) * rng.uniform(0.15, 0.85)) * rng.uniform(0.97, 1.03, 3)
    return float(red), float(green), float(blue)


def _individuals_table(
    individuals: list[_Individual], table: pd.DataFrame, stations: list[_Station], config: SyntheticConfig
) -> pd.DataFrame:
    """Return the truth per individual, with each country's own ID in order of first capture there."""
    countries = [c for c, _ in config.stations]
    truth = pd.DataFrame(
        {
            "individual_id": [ind.individual_id for ind in individuals],
            "sex": [ind.sex for ind in individuals],
            "home_stations": [";".join(stations[s].name for s in ind.home_stations) for ind in individuals],
        }
    )
    grouped = table.groupby("individual_id")
    seen_in = grouped["country"].agg(lambda c: ";".join(k for k in countries if k in set(c)))
    sides = grouped["side"].agg(lambda s: ";".join(k for k in _SIDES if k in set(s)))
    truth["countries"] = truth["individual_id"].map(seen_in).fillna("")
    truth["sides"] = truth["individual_id"].map(sides).fillna("")
    truth["n_encounters"] = truth["individual_id"].map(grouped["encounter_id"].nunique()).fillna(0).astype(int)
    truth["n_images"] = truth["individual_id"].map(grouped.size()).fillna(0).astype(int)
    for country in countries:
        rows = table[table["country"] == country]
        first = rows.groupby("individual_id")["timestamp"].min().sort_values(kind="stable")
        own = {truth_id: f"{country}-{k + 1:04d}" for k, truth_id in enumerate(first.index)}
        truth[f"{country.lower()}_id"] = truth["individual_id"].map(own).fillna("")
    columns = ["individual_id", "sex", "countries", "sides", "home_stations", "n_encounters", "n_images"]
    return truth[columns + [f"{c.lower()}_id" for c in countries]]


def _holds(out_dir: Path, config: SyntheticConfig) -> bool:
    """Return whether `out_dir` holds a complete data set generated from exactly `config`."""
    try:
        stored = json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        stored == json.loads(config.to_json())
        and (out_dir / CATALOGUE_FILE).is_file()
        and (out_dir / INDIVIDUALS_FILE).is_file()
    )


# ----------------------------------------------------------------------------- coats


def _coat(rng: np.random.Generator, body: _Body, palette: tuple[float, float, float]) -> tuple[Array, Array]:
    """Return the flank's coat on the canvas at full and half resolution, (H, W, 3) uint8 RGB each."""
    h, w = _CANVAS_H, _CANVAS_W
    b = body.half_height
    v = (np.arange(h, dtype=np.float32)[:, None] - (body.cy - b)) / (2 * b)  # 0 at the spine, 1 at the belly line
    colour = np.empty((h, w, 3), np.float32)
    colour[:] = np.asarray(palette, np.float32)
    colour *= (0.88 + 0.12 * _smoothstep(0.0, 0.55, v))[..., None]
    belly = 0.8 * _smoothstep(0.66, 1.0, v) * (1 - _smoothstep(1.05, 1.5, v)) + 0.3 * _smoothstep(1.05, 1.5, v)
    colour += (_CREAM - colour) * belly[..., None]

    centres, radii = _spot_layout(rng, body)
    rosette = radii > 0.6 * _rosette_radius(body)
    inner = _mask(
        _ellipse_polygons(
            centres[rosette],
            0.8 * radii[rosette] * rng.uniform(1.0, 1.3, rosette.sum()),
            0.75 * radii[rosette],
            rng.normal(0, 0.3, rosette.sum()),
        ),
        (h, w),
    )
    spots = np.maximum(
        _mask(_ring_polygons(rng, centres[rosette], radii[rosette]), (h, w)),
        _mask(_blob_polygons(rng, centres[~rosette], 0.8 * radii[~rosette]), (h, w)),
    )
    colour *= 1 - (cv2.GaussianBlur(inner, (0, 0), 2.0) * rng.uniform(0.55, 0.9))[..., None] * (
        1 - np.array([0.88, 0.8, 0.7], np.float32)
    )
    pigment = cv2.GaussianBlur(spots, (0, 0), 0.9) * (0.88 + 0.12 * np.clip(_noise(rng, h, w, (6, 24)), -1, 1))
    colour += (_SPOT - colour) * pigment[..., None]
    # Fur: blotchy tone plus fine hair streaks lying along the body.
    streaks = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigmaX=2.5, sigmaY=0.6)
    colour *= (1 + 0.06 * _noise(rng, h, w, (8, 32, 96)) + 0.12 * streaks)[..., None]
    full = (np.clip(colour, 0, 1) * 255).round().astype(np.uint8)
    return full, cv2.pyrDown(full)


def _rosette_radius(body: _Body) -> float:
    return 0.24 * body.half_height


def _spot_radius(body: _Body, x: Array, y: Array) -> Array:
    """Return the spot radius, px, at canvas points: rosettes mid-flank, small solid spots elsewhere."""
    a, b, r0 = body.half_length, body.half_height, _rosette_radius(body)
    u = np.clip((x - (body.cx - a)) / (2 * a), 0, 1)
    v = (y - (body.cy - b)) / (2 * b)
    torso = (
        r0
        * np.interp(v, [-0.1, 0.1, 0.28, 0.72, 0.86, 1.05], [0.28, 0.32, 0.95, 1.0, 0.5, 0.45])
        * (0.85 + 0.15 * np.sin(np.pi * u))
    )
    inside = ((x - body.cx) / a) ** 2 + ((y - body.cy) / b) ** 2
    weight = np.clip((1.25 - inside) / 0.45, 0, 1)
    down = np.clip((y - (body.cy + b)) / (_GROUND_Y - body.cy - b), 0, 1)
    elsewhere = r0 * (0.34 - 0.14 * down) * np.where(x < body.cx - a, 0.7, 1.0)
    return weight * torso + (1 - weight) * elsewhere


def _spot_layout(rng: np.random.Generator, body: _Body) -> tuple[Array, Array]:
    """Return (centres (N, 2), radii (N,)): a Poisson-disk-like spot layout, big spots placed first."""
    h, w = _CANVAS_H, _CANVAS_W
    envelope: Array = np.zeros((h, w), np.uint8)
    for phase in np.linspace(0, 2 * np.pi, 4, endpoint=False):
        for head_drop, sway in ((-10.0, -25.0), (30.0, 25.0)):
            near, far, _, _ = _silhouette(body, _Pose(phase, 0.45, head_drop, sway))
            envelope = np.maximum(envelope, (_mask(near + far, (h, w), overlapping=True) * 255).astype(np.uint8))
    envelope = cv2.dilate(envelope, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15)))
    area = float((envelope > 0).sum())
    smallest = 0.2 * _rosette_radius(body)
    n = int(area / (smallest * smallest * 6))
    xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
    keep = envelope[ys.astype(int), xs.astype(int)] > 0
    xs, ys = xs[keep], ys[keep]
    radii = _spot_radius(body, xs, ys) * rng.uniform(0.85, 1.15, len(xs))
    spacing = 1.45  # exclusion radius over spot radius; gaps of about half a radius
    occupied = np.zeros((h, w), np.uint8)
    chosen = []
    for i in np.argsort(-radii, kind="stable"):
        x, y, half = int(xs[i]), int(ys[i]), int(0.8 * radii[i])
        if occupied[max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1].any():
            continue
        chosen.append(i)
        cv2.circle(occupied, (x, y), int(spacing * radii[i] + 0.5), 1, -1)
    chosen_idx = np.array(chosen, int)
    return np.stack([xs[chosen_idx], ys[chosen_idx]], axis=1), radii[chosen_idx]


def _ring_polygons(rng: np.random.Generator, centres: Array, radii: Array) -> Array:
    """Return (B, 2K, 2) polygons: rosettes as broken rings of 3-6 curved dark blobs."""
    n = len(radii)
    blobs = rng.integers(3, 7, n)
    owner = np.repeat(np.arange(n), blobs)
    sizes = rng.gamma(4.0, size=owner.size)
    totals = np.bincount(owner, sizes, minlength=n)
    first = np.concatenate([[0], np.cumsum(blobs)[:-1]])
    cumulative = np.cumsum(sizes)
    end = (cumulative - np.repeat(cumulative[first] - sizes[first], blobs)) / totals[owner]
    start = end - sizes / totals[owner]
    fill = rng.uniform(0.55, 0.85, owner.size)
    phase = rng.uniform(0, 2 * np.pi, n)[owner]
    a0 = 2 * np.pi * (start + (end - start) * (1 - fill) / 2) + phase
    a1 = 2 * np.pi * (end - (end - start) * (1 - fill) / 2) + phase
    # A quarter of the rosettes are open: one blob missing.
    open_ring = (rng.random(n) < 0.25)[owner] & (np.arange(owner.size) == first[owner])
    radius = radii[owner] * rng.uniform(0.9, 1.05, owner.size)
    thickness = radii[owner] * rng.uniform(0.3, 0.45, n)[owner] * rng.uniform(0.8, 1.2, owner.size)
    stretch = rng.uniform(1.0, 1.35, n)[owner]
    angle = rng.normal(0, 0.3, n)[owner]
    s = np.linspace(0, 1, 7)
    t = a0[:, None] + (a1 - a0)[:, None] * s
    profile = 0.3 + 0.7 * np.sin(np.pi * s) ** 0.7
    outer = radius[:, None] + thickness[:, None] * profile / 2
    inner = radius[:, None] - thickness[:, None] * profile / 2
    r = np.concatenate([outer, inner[:, ::-1]], axis=1)
    t = np.concatenate([t, t[:, ::-1]], axis=1)
    local = np.stack([r * np.cos(t) * stretch[:, None], r * np.sin(t)], axis=-1)
    return np.asarray(_place(local, angle, centres[owner])[~open_ring])


def _blob_polygons(rng: np.random.Generator, centres: Array, radii: Array) -> Array:
    """Return (N, K, 2) polygons: irregular solid spots."""
    n, k = len(radii), 10
    t = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(-0.2, 0.2, (n, k))
    r = radii[:, None] * rng.uniform(0.75, 1.2, (n, k))
    stretch = rng.uniform(1.0, 1.6, n)
    local = np.stack([r * np.cos(t) * stretch[:, None], r * np.sin(t)], axis=-1)
    return _place(local, rng.uniform(0, np.pi, n), centres)


def _ellipse_polygons(centres: Array, rx: Array, ry: Array, angle: Array, k: int = 16) -> Array:
    """Return (N, k, 2) polygons of ellipses."""
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    local = np.stack([np.asarray(rx)[:, None] * np.cos(t), np.asarray(ry)[:, None] * np.sin(t)], axis=-1)
    return _place(local, np.asarray(angle, float), np.asarray(centres, float))


def _place(local: Array, angle: Array, centres: Array) -> Array:
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = local[..., 0], local[..., 1]
    return np.stack([c * x - s * y + centres[:, None, 0], s * x + c * y + centres[:, None, 1]], axis=-1)


def _mask(polygons: Sequence[Array] | Array, shape: tuple[int, int], *, overlapping: bool = False) -> Array:
    """Return an (H, W) float32 0..1 antialiased mask of filled polygons."""
    mask = np.zeros(shape, np.uint8)
    points = [np.round(np.asarray(p) * 8).astype(np.int32) for p in polygons]
    # One fillPoly call is fast but cuts holes where polygons overlap.
    for group in ([p] for p in points) if overlapping else [points]:
        if group:
            cv2.fillPoly(mask, group, 255, cv2.LINE_AA, shift=3)
    return mask.astype(np.float32) / 255


# ----------------------------------------------------------------------------- bodies


@dataclass(frozen=True)
class _Pose:
    phase: float  # gait phase, radians
    stride: float  # leg swing amplitude, radians; about 0 when standing
    head_drop: float  # canvas px
    tail_sway: float  # canvas px


def _silhouette(body: _Body, pose: _Pose) -> tuple[list[Array], list[Array], list[Array], Array]:
    """Return (near-side polygons, far-side polygons, dark face marks, torso + head outline points) on the canvas."""
    cx, cy, a, b, r = body.cx, body.cy, body.half_length, body.half_height, body.head_r
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = cx + a * np.sign(c) * np.abs(c) ** (2 / 2.6)
    y = cy + b * np.sign(s) * np.abs(s) ** (2 / 2.6)
    top = y < cy
    y = y - top * (0.16 * b * _gauss(x, cx - 0.6 * a, 45) + 0.1 * b * _gauss(x, cx + 0.55 * a, 50))
    y = y - ~top * (0.28 * b * _smoothstep(cx - 0.1 * a, cx + 0.75 * a, x) - 0.1 * b * _gauss(x, cx - 0.5 * a, 60))
    torso = np.stack([x, y], axis=1)

    hx, hy = cx - a - 0.75 * r, cy - 0.55 * b + pose.head_drop
    neck = np.array(
        [
            (cx - 0.7 * a, cy - b + 4),
            (hx + 0.35 * r, hy - 0.78 * r),
            (hx + 0.25 * r, hy + 0.85 * r),
            (cx - 0.88 * a, cy + 0.7 * b),
        ]
    )
    head = _ellipse_polygons(
        np.array([[hx, hy], [hx - 0.72 * r, hy + 0.3 * r]]),
        np.array([1.0 * r, 0.55 * r]),
        np.array([0.88 * r, 0.42 * r]),
        np.zeros(2),
        24,
    )
    ear = np.array(
        [
            (hx - 0.05 * r, hy - 0.65 * r),
            (hx + 0.12 * r, hy - 1.2 * r),
            (hx + 0.22 * r, hy - 1.25 * r),
            (hx + 0.5 * r, hy - 0.6 * r),
        ]
    )
    far_ear = ear + np.array([-0.32 * r, 0.04 * r])
    marks = list(
        _ellipse_polygons(
            np.array([[hx - 0.38 * r, hy - 0.12 * r], [hx - 1.2 * r, hy + 0.12 * r]]),
            np.array([0.14 * r, 0.11 * r]),
            np.array([0.08 * r, 0.09 * r]),
            np.array([-0.2, 0.0]),
            12,
        )
    )
    marks.append(
        np.array(
            [
                (hx - 1.22 * r, hy + 0.45 * r),
                (hx - 0.7 * r, hy + 0.52 * r),
                (hx - 0.7 * r, hy + 0.58 * r),
                (hx - 1.2 * r, hy + 0.5 * r),
            ]
        )
    )

    near: list[Array] = []
    far: list[Array] = [far_ear]
    # Lateral-sequence walk, as cats walk: near fore, near hind, far fore, far hind.
    gait = 2 * np.pi * np.array([0.25, 0.0, 0.75, 0.5])
    for k, offset in enumerate(gait):
        target = near if k < 2 else far
        shift = np.array([0.05 * a, -0.04 * b]) if k >= 2 else np.zeros(2)
        phase = pose.phase + offset
        swing = pose.stride * np.sin(phase)
        lift = pose.stride * 1.4 * max(0.0, float(np.cos(phase)))
        if k % 2 == 0:
            shoulder = np.array([cx - 0.6 * a, cy + 0.2 * b]) + shift
            length = _GROUND_Y - shoulder[1]
            target += _limb(
                shoulder, [(swing, 0.5 * length, 0.7 * b, 0.42 * b), (swing - lift, 0.5 * length, 0.4 * b, 0.34 * b)], b
            )
        else:
            hip = np.array([cx + 0.62 * a, cy - 0.1 * b]) + shift
            length = _GROUND_Y - hip[1]
            segments = [
                (0.45 + swing, 0.43 * length, 1.1 * b, 0.5 * b),
                (-0.55 + swing, 0.38 * length, 0.42 * b, 0.3 * b),
                (0.08 + swing - lift, 0.3 * length, 0.3 * b, 0.32 * b),
            ]
            target += _limb(hip, segments, b)
    near += [torso, neck, *head, ear, _tail(body, pose)]
    outline = np.concatenate([torso, head[0], head[1], ear])
    return near, far, marks, outline


def _limb(root: Array, segments: list[tuple[float, float, float, float]], b: float) -> list[Array]:
    """Return polygons of a leg: tapered segments (angle from vertical, towards the head positive; length; widths) and a paw."""
    polygons = []
    p = root
    for angle, length, w0, w1 in segments:
        direction = np.array([-np.sin(angle), np.cos(angle)])
        normal = np.array([direction[1], -direction[0]])
        q = p + length * direction
        polygons.append(np.array([p + normal * w0 / 2, q + normal * w1 / 2, q - normal * w1 / 2, p - normal * w0 / 2]))
        polygons.append(_ellipse_polygons(q[None], np.array([w1 / 2]), np.array([w1 / 2]), np.zeros(1), 12)[0])
        p = q
    polygons.append(
        _ellipse_polygons(
            np.array([[p[0] - 0.12 * b, p[1] - 0.06 * b]]), np.array([0.3 * b]), np.array([0.14 * b]), np.zeros(1), 16
        )[0]
    )
    return polygons


def _tail(body: _Body, pose: _Pose) -> Array:
    """Return the tail polygon: hangs from the rump and curls up at the tip."""
    a, b = body.half_length, body.half_height
    p0 = np.array([body.cx + 0.9 * a, body.cy - 0.55 * b])
    control = p0 + np.array(
        [
            (0, 0),
            (0.3 * a, 0.3 * b),
            (0.35 * a + pose.tail_sway, 2.6 * b * body.tail),
            (0.75 * a * body.tail + pose.tail_sway, 2.3 * b * body.tail),
        ]
    )
    t = np.linspace(0, 1, 24)[:, None]
    curve = (
        (1 - t) ** 3 * control[0]
        + 3 * (1 - t) ** 2 * t * control[1]
        + 3 * (1 - t) * t**2 * control[2]
        + t**3 * control[3]
    )
    tangent = np.gradient(curve, axis=0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1) / np.linalg.norm(tangent, axis=1, keepdims=True)
    width = (0.36 - 0.08 * t) * b
    return np.concatenate([curve + normal * width / 2, (curve - normal * width / 2)[::-1]])


def _smoothstep(edge0: float, edge1: float, x: Array) -> Array:
    t = np.clip((x - edge0) / (edge1 - edge0), 0, 1)
    return t * t * (3 - 2 * t)


def _gauss(x: Array, centre: float, width: float) -> Array:
    return np.exp(-(((x - centre) / width) ** 2))


def _noise(rng: np.random.Generator, h: int, w: int, cells: Sequence[int]) -> Array:
    """Return (H, W) float32 smooth fractal noise with unit standard deviation; `cells` are feature sizes, px."""
    total = np.zeros((h, w), np.float32)
    for cell in cells:
        small = rng.standard_normal((h // cell + 3, w // cell + 3)).astype(np.float32)
        big = cv2.resize(small, ((w // cell + 3) * cell, (h // cell + 3) * cell), interpolation=cv2.INTER_CUBIC)
        total += big[cell : cell + h, cell : cell + w] * math.sqrt(cell)
    return total / max(float(total.std()), 1e-6)


# ----------------------------------------------------------------------------- scenes

_SCENE_MARGIN = 12  # px of scene around the frame: cameras are remounted a little off between visits
_HFOV_DEG = 50.0
_SKY_DISTANCE_M = 1000.0
# Reflectance palettes: (ground, rock, shrub, cliff) per country.
_LANDSCAPES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "KZ": ((0.78, 0.73, 0.62), (0.86, 0.83, 0.76), (0.46, 0.46, 0.38), (0.88, 0.85, 0.78)),  # chalk cliffs, saxaul
    "TM": ((0.60, 0.53, 0.42), (0.56, 0.53, 0.49), (0.24, 0.30, 0.21), (0.52, 0.48, 0.42)),  # rocky slopes, juniper
}


@dataclass(frozen=True)
class _Scene:
    """One camera station's fixed view: reflectance, distance per pixel and the camera's geometry."""

    rgb: Array  # (H + 2m, W + 2m, 3) float32 reflectance
    distance_m: Array  # (H + 2m, W + 2m) float32
    object_m: Array  # (H + 2m, W + 2m) float32 distance of rocks and shrubs, inf elsewhere: what can hide an animal
    horizon_y: float  # frame px
    camera_height_m: float
    focal_px: float
    stamp_at: str  # where the camera prints its info bar: top, bottom or none


def _scene(rng: np.random.Generator, country: str, width: int, height: int) -> _Scene:
    """Return a station's background: sky or far cliffs, textured ground in perspective, rocks and shrubs."""
    m = _SCENE_MARGIN
    h, w = height + 2 * m, width + 2 * m
    ground_col, rock_col, shrub_col, cliff_col = (
        np.array(c, np.float32) * np.float32(rng.uniform(0.9, 1.1)) * rng.uniform(0.98, 1.02, 3).astype(np.float32)
        for c in _LANDSCAPES[country]
    )
    focal = width / (2 * math.tan(math.radians(_HFOV_DEG / 2)))
    camera_h = float(rng.uniform(0.5, 1.0))
    horizon = float(rng.uniform(0.22, 0.45) * height)
    hy = horizon + m
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)

    # Ground plane seen from the camera: pixel rows map to distances, textured in metres.
    below = np.maximum(ys - hy, 0.5)
    distance = np.minimum(camera_h * focal / below, 300.0)
    lateral = (xs - w / 2) * distance / focal
    texture = _ground_texture(rng, ground_col)
    texel_m = 0.02
    map_x = (lateral / texel_m + 256).astype(np.float32)  # the texture seam falls 5 m to either side, out of view
    map_y = (distance / texel_m).astype(np.float32)
    sharp = cv2.remap(texture, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
    soft = cv2.remap(cv2.GaussianBlur(texture, (0, 0), 6), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
    far = _smoothstep(3.0, 12.0, distance)[..., None]
    rgb = sharp * (1 - far) + soft * far

    sky_top, sky_low = np.array([0.55, 0.68, 0.88], np.float32), np.array([0.84, 0.87, 0.9], np.float32)
    sky = sky_top + (sky_low - sky_top) * np.clip(ys / max(hy, 1), 0, 1)[..., None]
    is_sky = ys < hy
    rgb = np.where(is_sky[..., None], sky, rgb)
    distance = np.where(is_sky, _SKY_DISTANCE_M, distance)

    # Far cliffs or slopes above the horizon; sometimes they fill most of the sky.
    ridge_height = rng.uniform(0.1, 0.9) * hy
    ridge = hy - ridge_height * (0.65 + 0.35 * _noise(rng, 1, w, (48, 160))[0].clip(-2, 2) / 2)
    is_cliff = is_sky & (ys >= ridge[None, :])
    layers = np.sin(ys * rng.uniform(0.5, 1.2) + 1.5 * _noise(rng, h, w, (24, 96)))
    gullies = _noise(rng, 1, w, (3, 9))[0][None, :] * _smoothstep(-0.5, 1.5, _noise(rng, h, w, (32,)))
    strata = 1 + 0.05 * layers - 0.06 * np.maximum(gullies, 0) + 0.05 * _noise(rng, h, w, (2, 8))
    cliff = (cliff_col * 0.7 + sky_low * 0.3) * strata[..., None]
    rgb = np.where(is_cliff[..., None], cliff, rgb)
    distance = np.where(is_cliff, 150.0, distance)

    # Rocks and shrubs, far ones first.
    # Skewed towards the horizon, where a metre of ground takes fewer rows.
    things = [("rock", float(hy + 4 + (h + 20 - hy) * rng.uniform() ** 1.5)) for _ in range(int(rng.integers(1, 7)))]
    things += [
        ("shrub", float(hy + 4 + (h + 10 - hy) * rng.uniform() ** 1.3))
        for _ in range(int(rng.integers(2, 9 if country == "KZ" else 14)))
    ]
    objects = np.full((h, w), np.inf, np.float32)
    for kind, base_y in sorted(things, key=lambda t: t[1]):
        at = camera_h * focal / max(base_y - hy, 0.5)
        size_px = float(rng.uniform(0.2, 0.8) if kind == "rock" else rng.uniform(0.25, 0.9)) * focal / at
        size_px = min(size_px, 0.45 * width)  # a camera that a bush fills is moved
        base_x = float(rng.uniform(-0.1, 1.1) * w)
        if kind == "rock":
            layer, alpha = _rock(rng, (h, w), base_x, base_y, size_px, rock_col)
        else:
            layer, alpha = _shrub(rng, (h, w), base_x, base_y, size_px, shrub_col)
        rgb = rgb * (1 - alpha[..., None]) + layer * alpha[..., None]
        distance = np.where(alpha > 0.5, min(at, 300.0), distance)
        objects = np.where(alpha > 0.5, min(at, 300.0), objects)
    stamp_at = ("bottom", "top", "none")[int(rng.choice(3, p=[0.6, 0.25, 0.15]))]
    return _Scene(rgb.astype(np.float32), distance.astype(np.float32), objects, horizon, camera_h, focal, stamp_at)


def _ground_texture(rng: np.random.Generator, colour: Array) -> Array:
    """Return a (512, 512, 3) float32 tileable-enough ground texture: soil tone, pebbles, cracks."""
    n = 512
    tone = 1 + 0.12 * _noise(rng, n, n, (8, 32, 128)) + 0.05 * rng.standard_normal((n, n)).astype(np.float32)
    texture = colour * tone[..., None]
    count = 900
    centres = rng.uniform(0, n, (count, 2))
    sizes = rng.uniform(1.5, 6.0, count)
    pebbles = _ellipse_polygons(centres, sizes, sizes * rng.uniform(0.5, 0.9, count), rng.uniform(0, np.pi, count), 8)
    shade = rng.uniform(0.7, 1.2, count)
    for level in (0.75, 0.95, 1.15):
        pick = np.abs(shade - level) < 0.1
        m = _mask(pebbles[pick], (n, n))
        texture = texture * (1 - m[..., None]) + (colour * level) * m[..., None]
    return texture.astype(np.float32)


def _rock(
    rng: np.random.Generator, shape: tuple[int, int], x: float, base_y: float, size: float, colour: Array
) -> tuple[Array, Array]:
    """Return (reflectance layer, alpha) of a top-lit rock resting on the ground at (x, base_y)."""
    h, w = shape
    k = 40
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    half_h = size * rng.uniform(0.25, 0.5)
    cy = base_y - half_h * 0.8
    bumps = sum(rng.normal(0, 0.12 / f) * np.cos(f * t + rng.uniform(0, 2 * np.pi)) for f in range(1, 6))
    r = np.clip(1 + bumps + rng.normal(0, 0.02, k), 0.6, 1.3)
    points = np.stack([x + size / 2 * r * np.cos(t), np.minimum(cy + half_h * r * np.sin(t), base_y)], axis=1)
    alpha = _mask([points], shape)
    ys = np.arange(h, dtype=np.float32)[:, None]
    light = 1.1 - 0.5 * np.clip((ys - (cy - half_h)) / (2 * half_h), 0, 1)
    grain = 1 + 0.1 * _noise(rng, h, w, (2, 6, 24))
    layer = colour * (light * grain)[..., None]
    crack = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        p = np.array([x + rng.uniform(-0.3, 0.3) * size, cy + rng.uniform(-0.5, 0.3) * half_h])
        q = p + rng.normal(0, 0.2 * size, 2)
        cv2.line(crack, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 255, 1, cv2.LINE_AA)
    layer *= 1 - 0.3 * cv2.GaussianBlur(crack.astype(np.float32) / 255, (0, 0), 0.8)[..., None]
    # A contact shadow under the rock darkens the ground, not the rock.
    shadow = _mask(
        _ellipse_polygons(
            np.array([[x + 0.1 * size, base_y]]), np.array([0.55 * size]), np.array([0.08 * size + 1]), np.zeros(1)
        ),
        shape,
    )
    shadow = cv2.GaussianBlur(shadow, (0, 0), 1 + size / 40)
    alpha_all = np.maximum(alpha, 0.45 * shadow * (1 - alpha))
    layer = np.where(alpha[..., None] > 0, layer, 0.0)
    return layer.astype(np.float32), alpha_all.astype(np.float32)


def _shrub(
    rng: np.random.Generator, shape: tuple[int, int], x: float, base_y: float, size: float, colour: Array
) -> tuple[Array, Array]:
    """Return (reflectance layer, alpha) of a shrub: a ragged dome of leafy clutter on woody stems."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    height = size * rng.uniform(0.5, 0.8)
    dome = ((xs - x) / (0.5 * size)) ** 2 + ((ys - base_y + 0.25 * height) / height) ** 2
    cell = max(2, int(size / 12))
    ragged = dome + 0.3 * _noise(rng, h, w, (cell, 3 * cell)) + 0.2 * _noise(rng, h, w, (2, 4))
    alpha = np.clip((1.0 - ragged) / 0.15, 0, 1) * (1 - _smoothstep(base_y - 0.1 * height, base_y + 0.05 * height, ys))
    underside = 0.35 * np.clip((ys - (base_y - height)) / height, 0, 1)  # lit from above
    leaves = 0.8 + 0.3 * _noise(rng, h, w, (2, cell)) - underside
    layer = colour * np.clip(leaves, 0.2, 1.6)[..., None]
    stems = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        top = (x + rng.uniform(-0.35, 0.35) * size, base_y - rng.uniform(0.3, 0.7) * height)
        cv2.line(stems, (int(x), int(base_y)), (int(top[0]), int(top[1])), 255, max(1, int(size / 45)), cv2.LINE_AA)
    s = (stems.astype(np.float32) / 255) * (1 - alpha)
    layer = layer * (1 - s[..., None]) + np.array([0.33, 0.28, 0.23], np.float32) * s[..., None]
    alpha = np.maximum(alpha, s)
    return layer.astype(np.float32), alpha.astype(np.float32)


# ----------------------------------------------------------------------------- captures

_NIGHT_REFERENCE_M = 3.0  # distance the infrared flash exposes for
_BOX_EDGE_SHARE = 0.3  # of the box width, the most that may leave the frame sideways


def _render_encounter(
    rng: np.random.Generator,
    encounter: _Encounter,
    body: _Body,
    coat: tuple[Array, Array],
    scene: _Scene,
    config: SyntheticConfig,
) -> list[tuple[Array, tuple[float, float, float, float]]]:
    """Return the burst's frames: (H, W, 3) uint8 RGB without the info bar, and the torso + head box (x, y, w, h), px."""
    width, height = config.image_size
    m = _SCENE_MARGIN
    ox, oy = (int(v) for v in rng.integers(0, 2 * m + 1, 2))
    background = scene.rgb[oy : oy + height, ox : ox + width]
    background_m = scene.distance_m[oy : oy + height, ox : ox + width]
    in_front = scene.object_m[oy : oy + height, ox : ox + width]
    horizon = scene.horizon_y + m - oy

    x0, y0, x1, y1 = body.box()
    box_w, box_h = x1 - x0, y1 - y0
    share = float(rng.uniform(0.42, 0.82))  # of the frame width, the box of a flank seen square-on
    distance_m = scene.focal_px * _BODY_LENGTH_M / (share * width)
    scale = share * width / box_w  # frame px per canvas px
    yaw = float(np.clip(rng.normal(0, 0.3), -0.7, 0.7))
    roll = float(rng.normal(0, 0.04))
    pitch = math.atan2(scene.camera_height_m - 0.55, distance_m)
    moving = rng.random() < 0.75
    heading = -1.0 if encounter.side == "left" else 1.0  # animals walk head first
    step = heading * (float(rng.uniform(0.03, 0.1)) if moving else float(rng.normal(0, 0.01))) * width
    n = encounter.n_frames
    low, high = _BOX_EDGE_SHARE * share * width, width - _BOX_EDGE_SHARE * share * width
    if n > 1 and abs(step) * (n - 1) > high - low:
        step = math.copysign((high - low) / (n - 1), step)
    span = abs(step) * (n - 1)
    first_x = float(rng.uniform(low, high - span)) + (span if step < 0 else 0.0)
    feet_y = horizon + scene.camera_height_m * scene.focal_px / distance_m
    centre_y = feet_y - scale * (_GROUND_Y - (y0 + y1) / 2)
    centre_y = float(np.clip(centre_y, 0.55 * box_h * scale, height - 0.55 * box_h * scale))
    stride = float(rng.uniform(0.2, 0.45)) if moving else float(rng.uniform(0.0, 0.08))
    phase, phase_step = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.8, 1.8))
    head_drop, sway = float(rng.uniform(-8, 30)), float(rng.uniform(-25, 25))
    blur_px = float(rng.uniform(2.0, 8.0)) if moving and rng.random() < (0.55 if encounter.night else 0.15) else 0.0
    blur_angle = float(rng.normal(0, 0.15))
    vegetation = _vegetation(rng, width, height) if rng.random() < 0.4 else None
    expose = _night_exposure(rng, width, height) if encounter.night else _day_exposure(rng, width, height, encounter)
    noise_sigma = float(rng.uniform(0.02, 0.045) if encounter.night else rng.uniform(0.006, 0.02))

    frames = []
    hidden: Array | None = None
    for k in range(n):
        pose = _Pose(
            phase + k * phase_step, stride, head_drop + float(rng.normal(0, 3)), sway + float(rng.normal(0, 6))
        )
        frame_scale = scale * (1 + float(rng.normal(0, 0.02)))
        homography = _homography(
            body,
            encounter.side == "right",
            yaw + float(rng.normal(0, 0.03)),
            pitch,
            roll,
            distance_m / _BODY_LENGTH_M * box_w,
            frame_scale,
            (first_x + k * step, centre_y),
        )
        colour, alpha, outline = _render_animal(
            coat, body, pose, homography, (height, width), frame_scale, lit_from_above=not encounter.night
        )
        if hidden is None:
            # Rocks and shrubs nearer than the animal hide it, unless they would hide most of it.
            hidden = (in_front < distance_m).astype(np.float32)
            if float((alpha * hidden).sum()) > 0.4 * float(alpha.sum()):
                hidden = np.zeros_like(hidden)
            hidden = cv2.GaussianBlur(hidden, (0, 0), 0.7)
        colour, alpha = colour * (1 - hidden[..., None]), alpha * (1 - hidden)
        rgb = background.copy()
        if not encounter.night:
            rgb *= 1 - 0.45 * _ground_shadow(body, homography, (height, width))[..., None]
        if blur_px:
            kernel = _motion_kernel(blur_px, blur_angle)
            colour, alpha = cv2.filter2D(colour, -1, kernel), cv2.filter2D(alpha, -1, kernel)
        rgb = rgb * (1 - alpha[..., None]) + colour
        distance = background_m * (1 - alpha) + distance_m * alpha
        if vegetation is not None:
            plants, cover = _draw_vegetation(vegetation, float(rng.normal(0, 1)), (height, width))
            rgb = rgb * (1 - cover[..., None]) + plants
            distance = distance * (1 - cover) + 1.0 * cover
        image = expose(rgb, distance)
        # Sensor noise: fine luminance grain plus coarser colour blotches from demosaicing.
        chroma = cv2.resize(
            rng.standard_normal((height // 2, width // 2, 3), np.float32),
            (width, height),
            interpolation=cv2.INTER_LINEAR,
        )
        image = image + noise_sigma * (rng.standard_normal((height, width, 1), np.float32) + 0.4 * chroma)
        frames.append(((np.clip(image, 0, 1) * 255).round().astype(np.uint8), _clipped_box(outline, width, height)))
    return frames


def _homography(
    body: _Body,
    flip: bool,
    yaw: float,
    pitch: float,
    roll: float,
    depth: float,
    scale: float,
    anchor: tuple[float, float],
) -> Array:
    """Return the 3x3 map from canvas to frame: the flank as a plane turned in 3-D, seen in perspective from `depth` canvas px."""
    x0, y0, x1, y1 = body.box()
    mirror = -1.0 if flip else 1.0
    to_centre = np.array([[mirror, 0, -mirror * (x0 + x1) / 2], [0, 1, -(y0 + y1) / 2], [0, 0, 1]])
    cy, sy, cp, sp, cr, sr = (
        math.cos(yaw),
        math.sin(yaw),
        math.cos(pitch),
        math.sin(pitch),
        math.cos(roll),
        math.sin(roll),
    )
    turn = (
        np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
        @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    )
    project = np.diag([depth, depth, 1.0]) @ np.column_stack([turn[:, 0], turn[:, 1], [0.0, 0.0, depth]])
    place = np.array([[scale, 0, anchor[0]], [0, scale, anchor[1]], [0, 0, 1]])
    return np.asarray(place @ project @ to_centre)


def _project(polygons: Sequence[Array], homography: Array) -> list[Array]:
    return [
        cv2.perspectiveTransform(np.asarray(p, np.float64).reshape(-1, 1, 2), homography).reshape(-1, 2)
        for p in polygons
    ]


def _render_animal(
    coat: tuple[Array, Array],
    body: _Body,
    pose: _Pose,
    homography: Array,
    shape: tuple[int, int],
    scale: float,
    *,
    lit_from_above: bool,
) -> tuple[Array, Array, Array]:
    """Return (colour premultiplied by alpha (H, W, 3), alpha (H, W), torso + head outline (N, 2) in frame px)."""
    full, half = coat
    # Warp from the pyramid level nearest the frame's scale: bilinear warps alias when shrinking more than 2x.
    texture, warp = (half, homography @ np.diag([2.0, 2.0, 1.0])) if scale < 0.6 else (full, homography)
    colour = (
        cv2.warpPerspective(
            texture, warp, (shape[1], shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        ).astype(np.float32)
        / 255
    )
    near, far, marks, outline = _silhouette(body, pose)
    near_alpha = _mask(_project(near, homography), shape, overlapping=True)
    far_alpha = _mask(_project(far, homography), shape, overlapping=True)
    depth = cv2.distanceTransform((near_alpha > 0.5).astype(np.uint8), cv2.DIST_L2, 3) / max(
        scale * body.half_height, 1.0
    )
    shade = np.where(near_alpha > 0.02, 0.6 + 0.4 * np.clip(depth / 0.5, 0, 1) ** 0.6, 0.55)
    frame_outline = _project([outline], homography)[0]
    if lit_from_above:
        top, bottom = float(frame_outline[:, 1].min()), float(frame_outline[:, 1].max())
        rows = np.arange(shape[0], dtype=np.float32)[:, None]
        shade = shade * (1.1 - 0.3 * np.clip((rows - top) / max(2 * (bottom - top), 1.0), 0, 1))
    colour *= shade[..., None]
    dark = _mask(_project(marks, homography), shape, overlapping=True)[..., None]
    colour = colour * (1 - dark) + 0.05 * dark
    alpha = np.maximum(near_alpha, far_alpha)
    return colour * alpha[..., None], alpha, frame_outline


def _ground_shadow(body: _Body, homography: Array, shape: tuple[int, int]) -> Array:
    """Return an (H, W) 0..1 soft shadow under the animal's feet."""
    a = body.half_length
    ((left, right),) = _project(
        [np.array([(body.cx - 0.95 * a, _GROUND_Y), (body.cx + 0.95 * a, _GROUND_Y)])], homography
    )
    length = float(np.linalg.norm(right - left))
    ellipse = _ellipse_polygons(
        ((left + right) / 2)[None],
        np.array([length / 2]),
        np.array([0.07 * length + 1]),
        np.array([math.atan2(*(right - left)[::-1])]),
    )
    return cv2.GaussianBlur(_mask(ellipse, shape), (0, 0), 1 + 0.04 * length)


def _motion_kernel(length_px: float, angle: float) -> Array:
    size = math.ceil(length_px) | 1
    kernel = np.zeros((size, size), np.float32)
    c = size // 2
    dx, dy = math.cos(angle) * length_px / 2, math.sin(angle) * length_px / 2
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1, cv2.LINE_AA)
    return np.asarray(kernel / kernel.sum())


def _clipped_box(outline: Array, width: int, height: int) -> tuple[float, float, float, float]:
    """Return the (x, y, w, h) box of the outline in whole pixels, clipped to the frame."""
    x0 = int(np.clip(math.floor(outline[:, 0].min()), 0, width - 1))
    y0 = int(np.clip(math.floor(outline[:, 1].min()), 0, height - 1))
    x1 = int(np.clip(math.ceil(outline[:, 0].max()), x0 + 1, width))
    y1 = int(np.clip(math.ceil(outline[:, 1].max()), y0 + 1, height))
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


@dataclass(frozen=True)
class _Plants:
    """Foreground vegetation of one encounter, close to the camera: grass blades and a branch."""

    blades: Array  # (N, 6): base x, base y, height, lean, thickness, tone
    branch: Array | None  # (K, 2) polyline, or None
    colour: Array
    defocus: float


def _vegetation(rng: np.random.Generator, width: int, height: int) -> _Plants:
    n = int(rng.integers(8, 45))
    centre = rng.uniform(0.1, 0.9) * width
    blades = np.column_stack(
        [
            centre + rng.normal(0, 0.25 * width, n),
            np.full(n, height + 4.0),
            rng.uniform(0.15, 0.7, n) * height,
            rng.normal(0, 0.12, n) * height,
            rng.integers(1, 4, n).astype(float),
            rng.uniform(0.7, 1.2, n),
        ]
    )
    branch = None
    if rng.random() < 0.35:
        edge = 0.0 if rng.random() < 0.5 else float(width)
        start = np.array([edge, rng.uniform(0.1, 0.8) * height])
        heading = np.array([1.0 if edge == 0 else -1.0, rng.normal(0, 0.4)])
        steps = rng.normal(0, 0.12, (8, 2)) + heading
        branch = start + np.cumsum(steps * rng.uniform(0.05, 0.1) * width, axis=0)
        branch = np.vstack([start, branch])
    colour = np.array([(0.80, 0.74, 0.52), (0.70, 0.66, 0.45), (0.55, 0.60, 0.36)][int(rng.integers(3))], np.float32)
    return _Plants(blades, branch, colour, float(rng.uniform(0.4, 1.4)))


def _draw_vegetation(plants: _Plants, sway: float, shape: tuple[int, int]) -> tuple[Array, Array]:
    """Return (colour premultiplied by alpha, alpha) of the vegetation, tips moved by the wind `sway`."""
    rgb: Array = np.zeros((*shape, 3), np.float32)
    alpha: Array = np.zeros(shape, np.float32)
    s = np.linspace(0, 1, 7)[:, None]
    for x, y, h, lean, thickness, tone in plants.blades:
        tip = np.array([x + lean + 0.02 * sway * h, y - h])
        bend = np.array([x + 0.3 * lean, y - 0.6 * h])
        points = (1 - s) ** 2 * np.array([x, y]) + 2 * (1 - s) * s * bend + s**2 * tip
        polyline = [np.round(points * 8).astype(np.int32)]
        cv2.polylines(
            rgb, polyline, False, tuple(float(c) for c in plants.colour * tone), int(thickness), cv2.LINE_AA, shift=3
        )
        cv2.polylines(alpha, polyline, False, 1.0, int(thickness), cv2.LINE_AA, shift=3)
    if plants.branch is not None:
        points = plants.branch + np.array([0.0, 0.5 * sway])
        line = [np.round(points * 8).astype(np.int32)]
        cv2.polylines(rgb, line, False, (0.36, 0.31, 0.26), 3, cv2.LINE_AA, shift=3)
        cv2.polylines(alpha, line, False, 1.0, 3, cv2.LINE_AA, shift=3)
        for p in points[1::2]:
            leaves = _ellipse_polygons(
                p[None] + np.array([[0.0, -3.0]]), np.array([5.0]), np.array([2.5]), np.array([0.6]), 10
            )
            leaf = _mask(leaves, shape)
            rgb = rgb * (1 - leaf[..., None]) + np.array([0.3, 0.34, 0.24], np.float32) * leaf[..., None]
            alpha = np.maximum(alpha, leaf)
    rgb = cv2.GaussianBlur(rgb, (0, 0), plants.defocus)
    alpha = cv2.GaussianBlur(np.clip(alpha, 0, 1), (0, 0), plants.defocus)
    return rgb, alpha


def _day_exposure(rng: np.random.Generator, width: int, height: int, encounter: _Encounter) -> Any:
    """Return a function (reflectance, distance) -> image in 0..1: sun, colour cast, contrast, sometimes dappled shade."""
    local_hour = (encounter.start.hour + UTC_OFFSET_H) % 24
    low_sun = local_hour < 8 or local_hour >= 17
    cast = np.exp(rng.normal(0, 0.04, 3)).astype(np.float32) * (
        np.array([1.08, 1.0, 0.86], np.float32) if low_sun else 1.0
    )
    gain = float(rng.uniform(0.75, 1.2))
    contrast = float(rng.uniform(0.85, 1.2))
    gamma = float(rng.uniform(0.85, 1.15))
    dapple = 0.35 * _smoothstep(0.2, 0.9, _noise(rng, height, width, (5, 14))) if rng.random() < 0.15 else None

    def expose(rgb: Array, distance: Array) -> Array:
        # Dappled shade from an unseen tree falls on near things, not on the sky or far cliffs.
        shade = 1.0 - dapple * (distance < 20) if dapple is not None else np.ones(distance.shape, np.float32)
        out = rgb * cast * (gain * shade)[..., None]
        out = np.clip((out - 0.45) * contrast + 0.45, 0, 1)
        return np.asarray(out ** (1 / gamma))

    return expose


def _night_exposure(rng: np.random.Generator, width: int, height: int) -> Any:
    """Return a function (reflectance, distance) -> image in 0..1: infrared flash with distance falloff, vignetting, low contrast."""
    gain = float(rng.uniform(0.7, 1.1)) * (float(rng.uniform(1.4, 2.0)) if rng.random() < 0.15 else 1.0)
    contrast = float(rng.uniform(0.7, 0.95))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width * (0.5 + rng.normal(0, 0.05)), height * (0.55 + rng.normal(0, 0.05))
    spread = float(rng.uniform(0.45, 0.75)) * width
    vignette = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * spread**2))
    tint = np.array([1.0, 0.97, 1.04], np.float32) if rng.random() < 0.3 else np.ones(3, np.float32)

    def expose(rgb: Array, distance: Array) -> Array:
        # Foliage reflects near infrared strongly: green things glow at night.
        ir = rgb @ np.array([0.42, 0.38, 0.2], np.float32) + 0.6 * np.maximum(rgb[..., 1] - rgb[..., 0], 0)
        light = np.clip((_NIGHT_REFERENCE_M / np.maximum(distance, 0.3)) ** 2, 0, 2.2) * vignette
        out = 1 - np.exp(-1.3 * ir * light * gain)
        out = cv2.GaussianBlur(out, (0, 0), 0.6)  # infrared focuses behind the visible-light focus
        mean = float(out.mean())
        out = 0.05 + 0.9 * (mean + contrast * (out - mean))
        return np.asarray(out[..., None] * tint)

    return expose


def _imprint(image: Array, scene: _Scene, text: str) -> None:
    """Print the camera's info bar (station, local time, frame in burst) on the frame, in place."""
    if scene.stamp_at == "none":
        return
    bar = 13
    top = 0 if scene.stamp_at == "top" else image.shape[0] - bar
    image[top : top + bar] = 0
    cv2.putText(image, text, (3, top + bar - 3), cv2.FONT_HERSHEY_PLAIN, 0.8, (235, 235, 235), 1, cv2.LINE_AA)


def _write_jpeg(path: Path, image: Array, quality: int) -> None:
    # Plain writes: images go into a fresh folder and the catalogue, written last, is what marks it complete.
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ReidError(f"{path}: could not encode the image as JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
