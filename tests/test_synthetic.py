"""The synthetic data set: determinism, a valid catalogue, truth that matches it, bursts, coats and caching."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from reid import synthetic
from reid.catalogue import assign_encounters, load_catalogue
from reid.errors import ReidError
from reid.images import image_size, read_image
from reid.synthetic import (
    SyntheticConfig,
    contact_sheet,
    country_catalogues,
    ensure_dataset,
    generate,
    load_individuals,
)

SMALL = SyntheticConfig(
    n_individuals=6,
    encounters_per_flank=(1, 3),
    frames_per_encounter=(2, 4),
    image_size=(192, 144),
    both_countries_share=0.34,
    one_side_share=0.34,
    stations=(("KZ", 2), ("TM", 2)),
    seed=3,
)
TINY = SyntheticConfig(
    n_individuals=2,
    encounters_per_flank=(1, 1),
    frames_per_encounter=(2, 2),
    image_size=(96, 72),
    both_countries_share=0.0,
    one_side_share=0.5,
    stations=(("KZ", 1),),
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate(out, SMALL, progress=False)
    return out


@pytest.fixture(scope="module")
def table(dataset: Path) -> pd.DataFrame:
    return load_catalogue(dataset / "catalogue.csv")


@pytest.fixture(scope="module")
def individuals(dataset: Path) -> pd.DataFrame:
    return load_individuals(dataset / "individuals.csv")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", SMALL, progress=False)
    assert _files(tmp_path / "again") == _files(dataset)
    first = again["image_path"].iloc[0]
    assert np.array_equal(read_image(first), read_image(dataset / Path(first).relative_to(tmp_path / "again")))

    other = generate(tmp_path / "other", SyntheticConfig(**{**SMALL.__dict__, "seed": 4}), progress=False)
    assert (tmp_path / "other" / "catalogue.csv").read_bytes() != (dataset / "catalogue.csv").read_bytes()
    assert not np.array_equal(read_image(other["image_path"].iloc[0]), read_image(first))


def test_catalogue_is_complete_and_valid(table: pd.DataFrame) -> None:
    assert len(table) > 20
    assert table["annotation_id"].is_unique
    assert set(table["side"]) <= {"left", "right"}
    assert set(table["sex"]) <= {"female", "male"}
    assert set(table["country"]) == {"KZ", "TM"}
    for column in (
        "individual_id",
        "timestamp",
        "station",
        "encounter_id",
        "latitude",
        "longitude",
        "source",
        "source_row",
    ):
        assert table[column].notna().all(), column
    kz, tm = table[table["country"] == "KZ"], table[table["country"] == "TM"]
    assert kz["latitude"].between(43, 44).all() and kz["longitude"].between(54.5, 56.5).all()
    assert tm["latitude"].between(38, 39).all() and tm["longitude"].between(56, 58).all()


def test_every_box_lies_inside_its_image(table: pd.DataFrame) -> None:
    for row in table.itertuples():
        width, height = image_size(row.image_path)
        assert (width, height) == SMALL.image_size
        assert row.bbox_x >= 0 and row.bbox_y >= 0 and row.bbox_w > 0 and row.bbox_h > 0
        assert row.bbox_x + row.bbox_w <= width and row.bbox_y + row.bbox_h <= height


def test_individuals_table_matches_the_catalogue(table: pd.DataFrame, individuals: pd.DataFrame) -> None:
    assert list(individuals["individual_id"]) == sorted(table["individual_id"].unique())
    for truth in individuals.itertuples():
        rows = table[table["individual_id"] == truth.individual_id]
        assert truth.countries.split(";") == sorted(set(rows["country"]))
        assert truth.sides.split(";") == sorted(set(rows["side"]))
        assert truth.n_images == len(rows) and truth.n_encounters == rows["encounter_id"].nunique()
        assert set(rows["sex"]) == {truth.sex}
    home = table["individual_id"].map(individuals.set_index("individual_id")["home_stations"].str.split(";"))
    at_home = [station in stations for station, stations in zip(table["station"], home, strict=True)]
    assert np.mean(at_home) > 0.6
    both = individuals["countries"] == "KZ;TM"
    one_sided = ~individuals["sides"].str.contains(";")
    assert both.sum() == round(SMALL.both_countries_share * SMALL.n_individuals)
    assert one_sided.sum() == round(SMALL.one_side_share * SMALL.n_individuals)


def test_cross_border_individuals_show_one_flank_in_both_countries(
    table: pd.DataFrame, individuals: pd.DataFrame
) -> None:
    for truth_id in individuals.loc[individuals["countries"] == "KZ;TM", "individual_id"]:
        rows = table[table["individual_id"] == truth_id]
        assert (rows.groupby("side")["country"].nunique() == 2).any()


def test_country_catalogues_use_each_countrys_own_ids(table: pd.DataFrame, individuals: pd.DataFrame) -> None:
    catalogues = country_catalogues(table, individuals)
    assert set(catalogues) == {"KZ", "TM"}
    for country, catalogue in catalogues.items():
        assert len(catalogue) == (table["country"] == country).sum()
        assert catalogue["individual_id"].str.fullmatch(rf"{country}-\d{{4}}").all()
        # Numbered in order of first capture in that country.
        first_seen = catalogue.sort_values("timestamp").drop_duplicates("individual_id")["individual_id"]
        assert list(first_seen) == sorted(first_seen)
    truth_of = {
        own: truth
        for column in ("kz_id", "tm_id")
        for own, truth in zip(individuals[column], individuals["individual_id"], strict=True)
        if own
    }
    shared = set(truth_of[i] for i in catalogues["KZ"]["individual_id"]) & set(
        truth_of[i] for i in catalogues["TM"]["individual_id"]
    )
    assert shared == set(individuals.loc[individuals["countries"] == "KZ;TM", "individual_id"])


def test_bursts_are_seconds_apart_at_one_station_and_encounters_minutes_apart(table: pd.DataFrame) -> None:
    bursts = table.groupby("encounter_id")
    assert (bursts["station"].nunique() == 1).all() and (bursts["individual_id"].nunique() == 1).all()
    assert (bursts["side"].nunique() == 1).all()
    span_s = (bursts["timestamp"].max() - bursts["timestamp"].min()).dt.total_seconds()
    assert (span_s < 60).all() and bursts.size().between(*SMALL.frames_per_encounter).all()
    starts = bursts.agg(station=("station", "first"), start=("timestamp", "min"), end=("timestamp", "max"))
    for _, group in starts.sort_values("start").groupby("station"):
        gaps_s = (group["start"].iloc[1:].to_numpy() - group["end"].iloc[:-1].to_numpy()) / np.timedelta64(1, "s")
        assert (gaps_s > 60).all()


def test_assign_encounters_reproduces_the_generators_bursts(table: pd.DataFrame) -> None:
    cleared = table.assign(encounter_id=pd.array([pd.NA] * len(table), dtype="string"))
    derived = assign_encounters(cleared)["encounter_id"]
    pairs = pd.DataFrame({"given": table["encounter_id"], "derived": derived})
    assert (pairs.groupby("given")["derived"].nunique() == 1).all()
    assert (pairs.groupby("derived")["given"].nunique() == 1).all()


def test_night_frames_are_grey_and_taken_at_night(table: pd.DataFrame) -> None:
    local_hour = (table["timestamp"].dt.hour + synthetic.UTC_OFFSET_H) % 24
    night = ((local_hour >= 20) | (local_hour < 6)).to_numpy()
    assert night.any() and (~night).any()
    colour_spread = np.array([np.abs(np.diff(read_image(p).astype(float), axis=2)).mean() for p in table["image_path"]])
    assert colour_spread[night].max() < colour_spread[~night].min()


def test_left_and_right_coats_of_one_animal_are_independent_patterns() -> None:
    _, individuals, _ = synthetic._plan(SMALL)
    body, palette = individuals[0].body, individuals[0].palette

    def pattern(side: int, seed: int = SMALL.seed) -> np.ndarray:
        full, _ = synthetic._coat(synthetic._rng(seed, 1, 0, side), body, palette)
        grey = cv2.cvtColor(full, cv2.COLOR_RGB2GRAY).astype(np.float32)
        detail = grey - cv2.GaussianBlur(grey, (0, 0), 8)  # spots, not the shared belly gradient
        a, b = body.half_length, body.half_height
        return detail[int(body.cy - b) : int(body.cy + b), int(body.cx - a) : int(body.cx + a)].ravel()

    left, right = pattern(0), pattern(1)
    assert np.corrcoef(left, pattern(0))[0, 1] == pytest.approx(1.0)
    assert abs(np.corrcoef(left, right)[0, 1]) < 0.2


def test_ensure_dataset_generates_once_per_config(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    path = ensure_dataset(out, TINY, progress=False)
    assert path == out / "catalogue.csv"
    before = path.stat().st_mtime_ns, path.read_bytes()
    assert ensure_dataset(out, TINY, progress=False) == path
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before

    changed = SyntheticConfig(**{**TINY.__dict__, "seed": 1})
    ensure_dataset(out, changed, progress=False)
    assert path.read_bytes() != before[1]
    assert '"seed": 1' in (out / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary folders left behind


def test_ensure_dataset_leaves_a_foreign_folder_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ReidError, match="not a synthetic data set"):
        ensure_dataset(tmp_path, TINY, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_config_takes_lists_and_names_bad_values() -> None:
    from_yaml = SyntheticConfig(image_size=[160, 120], stations=[["KZ", 2]], both_countries_share=0.0)  # type: ignore[arg-type]
    assert from_yaml.image_size == (160, 120) and from_yaml.stations == (("KZ", 2),)
    with pytest.raises(ReidError, match="night_share"):
        SyntheticConfig(night_share=1.5)
    with pytest.raises(ReidError, match="stations"):
        SyntheticConfig(stations=(("XX", 2),))


def test_contact_sheet_writes_a_png(table: pd.DataFrame, tmp_path: Path) -> None:
    path = contact_sheet(table, tmp_path / "sheet.png", n=8)
    assert read_image(path).shape[1] == 6 * 192
