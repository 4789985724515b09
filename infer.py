"""Match camera-trap captures against the gallery of known individuals; see conf/infer.yaml.

    python infer.py                       # demo: build, calibrate, match and count on synthetic data
    python infer.py mode=build data=labels_csv data.source.path=kz/labels.csv data.source.country=KZ
    python infer.py mode=calibrate
    python infer.py mode=match data=megadetector data.source.results_json=card7/md.json
    python infer.py mode=count data=labels_csv data.source.path=kz/labels.csv

Results go to outputs/infer/<date>_<time>/: matches.csv, decisions.csv, counts.json, report.html.
"""

from __future__ import annotations

import os

# Before albumentations is imported: it would ask PyPI for its latest version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reid import analysis
from reid.errors import Problem, ReidError, run_and_report
from reid.fusion import ScoreFusion
from reid.gallery import Gallery
from reid.keypoints import KeypointConfig
from reid.models import model_fingerprint

log = logging.getLogger("infer")


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    """Run the configured mode and print where its results are."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.paths.run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    run_and_report(lambda: run(cfg, run_dir), what=f"mode={cfg.mode}")


def run(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Path], list[Problem]]:
    """Return (files written, problems) of the configured mode."""
    if cfg.mode not in ("demo", "build", "calibrate", "match", "count"):
        raise ReidError(f"mode={cfg.mode} is not one of demo, build, calibrate, match, count")
    matching = dict(
        k=cfg.k, top_n=cfg.top_n, new_prefix=cfg.new_prefix, count_by=tuple(cfg.count_by), period=cfg.period
    )
    calibration = OmegaConf.to_container(cfg.calibration)
    use_gallery = calibration.pop("use_gallery")  # type: ignore[union-attr]
    calibration["calibration_method"] = cfg.scoring.calibration  # type: ignore[index]
    keypoints = KeypointConfig.from_dict(OmegaConf.to_container(cfg.keypoints)) if cfg.keypoints else None
    scoring = ScoreFusion(cfg.scoring.method, cfg.scoring.shortlist, cfg.scoring.rule)
    if cfg.mode == "count":
        table, problems = analysis.load_source(instantiate(cfg.data.source))
        counts = analysis.count_catalogue(table, by=tuple(cfg.count_by), period=cfg.period)
        return {"counts": analysis.write_counts(counts, run_dir)}, problems
    embedder = analysis.find_embedder(cfg.embedder, Path(cfg.paths.root) / "outputs" / "train", run_dir)
    if cfg.mode == "demo":
        population, problems = analysis.load_source(instantiate(cfg.demo.population))
        _, outcome, truth = analysis.run_demo(
            population,
            embedder,
            run_dir,
            unseen_fraction=cfg.demo.unseen_fraction,
            query_fraction=cfg.demo.query_fraction,
            index_kind=cfg.index_kind,
            keypoints=keypoints,
            scoring=scoring,
            calibration=calibration,
            progress=cfg.progress,
            **matching,
        )
        print("truth check:", ", ".join(f"{k}={v}" for k, v in truth.items()))
        return outcome.files, problems + outcome.problems
    if cfg.mode == "build":
        table, problems = analysis.load_source(instantiate(cfg.data.source))
        _, more = analysis.build_gallery(
            table, embedder, cfg.gallery, index_kind=cfg.index_kind, keypoints=keypoints, progress=cfg.progress
        )
        return {"gallery": Path(cfg.gallery)}, problems + more
    gallery = Gallery.load(cfg.gallery, embedder_fingerprint=model_fingerprint(embedder))
    if cfg.mode == "calibrate":
        labelled, problems = (None, []) if use_gallery else analysis.load_source(instantiate(cfg.data.source))
        thresholds, scores, more = analysis.calibrate_gallery(
            gallery,
            cfg.gallery,
            labelled=labelled,
            embedder=embedder,
            scoring=scoring,
            progress=cfg.progress,
            **calibration,
        )
        print(thresholds)
        return {
            "gallery": Path(cfg.gallery),
            "scores": analysis.write_table(scores, run_dir / "calibration.csv"),
        }, problems + more
    queries, problems = analysis.load_source(instantiate(cfg.data.source))
    _, outcome = analysis.match(
        queries,
        embedder,
        gallery,
        analysis.thresholds_of(gallery),
        run_dir,
        import_problems=problems,
        progress=cfg.progress,
        **matching,
    )
    return outcome.files, outcome.problems


if __name__ == "__main__":
    main()
