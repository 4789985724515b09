"""Share catalogues across the border and export for ecology tools; see conf/share.yaml.

    python share.py                                   # demo: every step on two synthetic catalogues
    python share.py mode=export organisation="Kazakh team" namespace=KZ
    python share.py mode=import archive=TM-catalogue.tar.gz
    python share.py mode=shared partner=partners/TM
    python share.py mode=confirm partner=partners/TM candidates=outputs/share/<run>/candidates.csv confirmed_by="A. Analyst" namespace=KZ
    python share.py mode=count partner=partners/TM
    python share.py mode=camtrap_dp organisation="Kazakh team"
    python share.py mode=capture_histories occasion_days=7

Results go to outputs/share/<date>_<time>/.
"""

from __future__ import annotations

import os

# Before albumentations is imported: it would ask PyPI for its latest version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import logging
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from reid import analysis, merging, sharing
from reid.errors import Problem, ReidError, run_and_report
from reid.gallery import Gallery
from reid.synthetic import SyntheticConfig, ensure_dataset, load_individuals

log = logging.getLogger("share")
MODES = ("demo", "export", "import", "shared", "confirm", "count", "camtrap_dp", "capture_histories")


@hydra.main(version_base="1.3", config_path="conf", config_name="share")
def main(cfg: DictConfig) -> None:
    """Run the configured mode and print where its results are."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.paths.run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    run_and_report(lambda: run(cfg, run_dir), what=f"mode={cfg.mode}")


def run(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Path], list[Problem]]:
    """Return (files written, problems) of the configured mode."""
    if cfg.mode not in MODES:
        raise ReidError(f"mode={cfg.mode} is not one of {', '.join(MODES)}")
    train_runs = Path(cfg.paths.root) / "outputs" / "train"
    if cfg.mode == "demo":
        data = ensure_dataset(
            Path(cfg.paths.data) / "synthetic-share",
            SyntheticConfig(**OmegaConf.to_container(cfg.demo.population)),  # type: ignore[arg-type]
            progress=cfg.progress,
        )
        population, _ = analysis.load_source(data)
        files, check, problems = merging.run_demo(
            population,
            load_individuals(data.parent / "individuals.csv"),
            analysis.find_embedder(cfg.embedder, train_runs, run_dir),
            run_dir,
            schemas_dir=cfg.camtrap_dp_schemas,
            shortlist=cfg.demo.shortlist,
            progress=cfg.progress,
        )
        print("truth check:", ", ".join(f"{k}={v}" for k, v in check.items()))
        return files, problems
    if cfg.mode == "import":
        if not cfg.archive:
            raise ReidError("mode=import needs archive=/path/to/partner-catalogue.tar.gz")
        imported = sharing.import_catalogue(cfg.archive, cfg.partners, progress=cfg.progress)
        return {"partner": imported.folder}, []
    if cfg.mode == "confirm":
        if not cfg.candidates or not cfg.confirmed_by or not cfg.partner:
            raise ReidError(
                "mode=confirm needs candidates=<reviewed candidates.csv>, partner=<its partner folder> and "
                'confirmed_by="name"'
            )
        if not Path(cfg.candidates).is_file():
            raise ReidError(f"{cfg.candidates}: no such file; give the candidates.csv that mode=shared wrote")
        _, problems = merging.confirm_aliases(
            cfg.aliases,
            pd.read_csv(cfg.candidates, dtype=str, keep_default_na=False),
            confirmed_by=cfg.confirmed_by,
            local_namespace=cfg.namespace,
            partner_namespace=sharing.load_imported(cfg.partner).manifest["namespace"],
            note=cfg.note,
        )
        return {"aliases": Path(cfg.aliases)}, problems
    gallery = Gallery.load(cfg.gallery)
    if cfg.mode == "export":
        path = sharing.export_catalogue(
            cfg.gallery,
            cfg.export.out,
            organisation=cfg.organisation,
            namespace=cfg.namespace,
            precision_deg=cfg.export.precision_deg,
            exact_coordinates=cfg.export.exact_coordinates,
            crops=cfg.export.crops,
            progress=cfg.progress,
        )
        return {"archive": path}, []
    if cfg.mode == "camtrap_dp":
        package, problems = merging.write_camtrap_dp(
            gallery.entries,
            run_dir / "camtrap-dp",
            organisation=cfg.organisation,
            schemas_dir=cfg.camtrap_dp_schemas,
            precision_deg=cfg.export.precision_deg,
            exact_coordinates=cfg.export.exact_coordinates,
        )
        return {"camtrap_dp": package}, problems
    partner = _partner(cfg)
    catalogue = gallery.entries
    if partner is not None:
        catalogue = merging.merged_catalogue(gallery.entries, partner.entries, merging.load_aliases(cfg.aliases))
    if cfg.mode == "capture_histories":
        return merging.write_capture_histories(
            catalogue, run_dir, occasion_days=cfg.occasion_days, start=cfg.occasion_start, session=cfg.secr_session
        ), []
    if cfg.mode == "count":
        counts = analysis.count_catalogue(catalogue, by=tuple(cfg.count_by))
        return {"counts": analysis.write_counts(counts, run_dir)}, []
    # mode=shared
    if partner is None:
        raise ReidError("mode=shared needs partner=<an imported partner folder>, e.g. partner=partners/TM")
    imported = sharing.load_imported(cfg.partner)
    embedder = analysis.find_embedder(cfg.embedder, train_runs, run_dir)
    keypoints = analysis.gallery_keypoints(gallery)
    theirs, pictures, problems = merging.partner_gallery(
        imported, embedder, keypoints=keypoints[1] if keypoints else None, progress=cfg.progress
    )
    _, files, more = merging.find_shared_individuals(
        gallery,
        theirs,
        pictures,
        run_dir,
        top_n=cfg.top_n,
        partner_name=Path(cfg.partner).name,
        progress=cfg.progress,
    )
    return files, problems + more


def _partner(cfg: DictConfig) -> Gallery | None:
    return Gallery.load(cfg.partner) if cfg.partner else None


if __name__ == "__main__":
    main()
