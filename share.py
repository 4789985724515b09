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
import sys

# Before albumentations is imported: it would ask PyPI for its latest version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reid import workflows
from reid.errors import command_line_problem
from reid.models import Embedder, find_embedder
from reid.workflows import Outcome, run_mode


def embedder(cfg: DictConfig, *, demo: bool = False) -> Embedder:
    """Return the configured embedder (the demo may fall back to an untrained one, with a warning)."""
    return find_embedder(
        cfg.embedder, Path(cfg.paths.root) / "outputs" / "train", cfg.paths.run_dir, fallback_untrained=demo
    )


MODES: dict[str, Callable[[DictConfig], Outcome]] = {
    "demo": lambda cfg: workflows.run_share_demo(
        instantiate(cfg.demo.population),
        embedder(cfg, demo=True),
        cfg.paths.run_dir,
        schemas_dir=cfg.camtrap_dp_schemas,
        shortlist=cfg.demo.shortlist,
        progress=cfg.progress,
    ),
    "export": lambda cfg: workflows.run_export(
        cfg.gallery,
        cfg.export.out,
        organisation=cfg.organisation,
        namespace=cfg.namespace,
        precision_deg=cfg.export.precision_deg,
        exact_coordinates=cfg.export.exact_coordinates,
        crops=cfg.export.crops,
        progress=cfg.progress,
    ),
    "import": lambda cfg: workflows.run_import(cfg.archive, cfg.partners, progress=cfg.progress),
    "shared": lambda cfg: workflows.run_shared(
        cfg.gallery, cfg.partner, embedder(cfg), cfg.paths.run_dir, top_n=cfg.top_n, progress=cfg.progress
    ),
    "confirm": lambda cfg: workflows.run_confirm(
        cfg.aliases, cfg.candidates, cfg.partner, confirmed_by=cfg.confirmed_by, namespace=cfg.namespace, note=cfg.note
    ),
    "count": lambda cfg: workflows.run_merged_count(
        cfg.gallery, cfg.partner, cfg.aliases, cfg.paths.run_dir, count_by=tuple(cfg.count_by)
    ),
    "camtrap_dp": lambda cfg: workflows.run_camtrap_dp(
        cfg.gallery,
        cfg.paths.run_dir,
        organisation=cfg.organisation,
        schemas_dir=cfg.camtrap_dp_schemas,
        precision_deg=cfg.export.precision_deg,
        exact_coordinates=cfg.export.exact_coordinates,
    ),
    "capture_histories": lambda cfg: workflows.run_capture_histories(
        cfg.gallery,
        cfg.partner,
        cfg.aliases,
        cfg.paths.run_dir,
        occasion_days=cfg.occasion_days,
        start=cfg.occasion_start,
        session=cfg.secr_session,
    ),
}


@hydra.main(version_base="1.3", config_path="conf", config_name="share")
def main(cfg: DictConfig) -> None:
    """Run the configured mode and print where its results are."""
    OmegaConf.save(cfg, Path(cfg.paths.run_dir) / "config.yaml")
    run_mode(MODES, cfg.mode, cfg, threads=cfg.threads)


if __name__ == "__main__":
    # Hydra's override parser fails on unquoted paths with spaces before any of our code runs.
    if problem := command_line_problem(sys.argv[1:]):
        sys.exit(f"error: {problem}")
    main()
