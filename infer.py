"""Match camera-trap captures against the gallery of known individuals; see conf/infer.yaml.

    python infer.py                       # demo: build, calibrate, match and count on synthetic data
    python infer.py mode=build data=labels_csv data.source.path=kz/labels.csv data.source.country=KZ
    python infer.py mode=calibrate
    python infer.py mode=match data=megadetector data.source.results_json=card7/md.json
    python infer.py mode=count data=labels_csv data.source.path=kz/labels.csv
    python infer.py mode=review                  # review the newest match in the browser
    python infer.py mode=enrol                   # add what reviewers confirmed to the gallery
    python infer.py mode=count count_from=review # counts of the newest match after its review

Results go to outputs/infer/<date>_<time>/: matches.csv, decisions.csv, counts.json, report.html.
"""

from __future__ import annotations

import os
import sys

# Before albumentations is imported: it would ask PyPI for its latest version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reid import workflows
from reid.errors import ReidError, command_line_problem
from reid.models import Embedder, find_embedder
from reid.workflows import Outcome, run_mode


def embedder(cfg: DictConfig, *, demo: bool = False) -> Embedder:
    """Return the configured embedder (a demo may fall back to an untrained one, with a warning)."""
    return find_embedder(
        cfg.embedder, Path(cfg.paths.root) / "outputs" / "train", cfg.paths.run_dir, fallback_untrained=demo
    )


def matching(cfg: DictConfig) -> dict[str, Any]:
    """Return the options every matching mode shares."""
    return dict(k=cfg.k, top_n=cfg.top_n, new_prefix=cfg.new_prefix, count_by=tuple(cfg.count_by), period=cfg.period)


def calibration_data(cfg: DictConfig) -> Any:
    """Return the labelled source to calibrate on, or None for the gallery's own entries."""
    if cfg.calibrate_on not in ("gallery", "data"):
        raise ReidError(f"calibrate_on={cfg.calibrate_on} is not one of gallery, data")
    return instantiate(cfg.data.source) if cfg.calibrate_on == "data" else None


def count(cfg: DictConfig) -> Outcome:
    """Count a labelled source, or a match run after its review (`count_from`)."""
    if cfg.count_from == "review":
        return workflows.run_recount(
            runs_dir(cfg), cfg.review.run, cfg.paths.run_dir, count_by=tuple(cfg.count_by), period=cfg.period
        )
    if cfg.count_from != "data":
        raise ReidError(f"count_from={cfg.count_from} is not one of data, review")
    return workflows.run_count(
        instantiate(cfg.data.source), cfg.paths.run_dir, count_by=tuple(cfg.count_by), period=cfg.period
    )


def runs_dir(cfg: DictConfig) -> Path:
    """Return the folder of infer.py's runs, where mode=review, enrol and count find the newest match."""
    return Path(cfg.paths.root) / "outputs" / "infer"


MODES: dict[str, Callable[[DictConfig], Outcome]] = {
    "demo": lambda cfg: workflows.run_infer_demo(
        instantiate(cfg.demo.population),
        embedder(cfg, demo=True),
        cfg.paths.run_dir,
        unseen_fraction=cfg.demo.unseen_fraction,
        query_fraction=cfg.demo.query_fraction,
        index_kind=cfg.index_kind,
        keypoints=instantiate(cfg.keypoints),
        fusion=instantiate(cfg.scoring),
        calibration=instantiate(cfg.calibration),
        progress=cfg.progress,
        **matching(cfg),
    ),
    "build": lambda cfg: workflows.run_build(
        instantiate(cfg.data.source),
        embedder(cfg),
        cfg.gallery,
        index_kind=cfg.index_kind,
        keypoints=instantiate(cfg.keypoints),
        progress=cfg.progress,
    ),
    "calibrate": lambda cfg: workflows.run_calibrate(
        embedder(cfg),
        cfg.gallery,
        cfg.paths.run_dir,
        labelled=calibration_data(cfg),
        fusion=instantiate(cfg.scoring),
        settings=instantiate(cfg.calibration),
        keypoints=instantiate(cfg.keypoints),
        progress=cfg.progress,
    ),
    "match": lambda cfg: workflows.run_match(
        instantiate(cfg.data.source),
        embedder(cfg),
        cfg.gallery,
        cfg.paths.run_dir,
        keypoints=instantiate(cfg.keypoints),
        progress=cfg.progress,
        **matching(cfg),
    ),
    "review": lambda cfg: workflows.run_review(
        runs_dir(cfg),
        cfg.review.run,
        host=cfg.review.host,
        port=cfg.review.port,
        open_browser=cfg.review.open_browser,
        reviewer=cfg.review.reviewer,
    ),
    "enrol": lambda cfg: workflows.run_enrol(
        runs_dir(cfg),
        cfg.review.run,
        embedder(cfg),
        cfg.paths.run_dir,
        gallery_dir=cfg.review.gallery,
        namespace=cfg.review.namespace,
        progress=cfg.progress,
    ),
    "count": count,
}


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    """Run the configured mode and print where its results are."""
    OmegaConf.save(cfg, Path(cfg.paths.run_dir) / "config.yaml")
    run_mode(MODES, cfg.mode, cfg, threads=cfg.threads)


if __name__ == "__main__":
    # Hydra's override parser fails on unquoted paths with spaces before any of our code runs.
    if problem := command_line_problem(sys.argv[1:]):
        sys.exit(f"error: {problem}")
    main()
