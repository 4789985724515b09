"""Train a flank embedder with Hydra + Lightning; see conf/train.yaml for the options.

    python train.py                              # synthetic data, CPU, W&B offline
    python train.py experiment=nyala logger=csv  # ../shared/data/nyala-dev
    python train.py -m loss=arcface,triplet      # a sweep

The run folder (outputs/train/<date>_<time>/) gets the resolved config.yaml,
metrics.json (untrained and trained validation metrics), checkpoints/ and the
exported embedder/ that inference loads.
"""

from __future__ import annotations

import os
import sys

# Before albumentations is imported: it would ask PyPI for its latest version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reid.errors import ReidError, command_line_problem, report
from reid.images import set_threads
from reid.importers import load_source
from reid.training import fit_and_export


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train as configured; return the trained validation mAP (what a sweeper optimises)."""
    try:
        set_threads(cfg.threads)
    except ReidError as err:
        sys.exit(f"error: {err}")
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    table, problems = load_source(instantiate(cfg.data.source))
    report(problems, what="importing the training data")
    embedder = instantiate(cfg.model)
    preprocess = embedder.config
    train_transform = wire(cfg.augment, img_size=preprocess.img_size, mean=preprocess.mean, std=preprocess.std)
    datamodule = wire(
        cfg.datamodule,
        table=table,
        preprocess=preprocess,
        train_transform=train_transform,
        split=instantiate(cfg.split),
    )
    wired = {"num_classes": datamodule.num_identities, "embedding_size": preprocess.embedding_dim}
    # `in` on a config is False for ??? values: ask the keys.
    loss = wire(cfg.loss.criterion, **{k: v for k, v in wired.items() if k in cfg.loss.criterion.keys()})  # noqa: SIM118
    module = wire(
        cfg.module,
        embedder=embedder,
        loss=loss,
        miner=instantiate(cfg.loss.miner) if cfg.loss.miner else None,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
    )
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)

    summary = fit_and_export(trainer, module, datamodule, run_dir, extra={"config": str(run_dir / "config.yaml")})
    if summary is None:
        return None
    print(summary.to_text())
    print(f"run folder: {run_dir}")
    return summary.trained["mAP"]


def wire(node: DictConfig, **values: Any) -> Any:
    """Instantiate a config leaf with the values Python wires in (its ??? keys), passed through untouched."""
    # As a partial, Hydra leaves the objects alone instead of converting them to configs.
    return instantiate(node, _partial_=True)(**values)


if __name__ == "__main__":
    # Hydra's override parser fails on unquoted paths with spaces before any of our code runs.
    if problem := command_line_problem(sys.argv[1:]):
        sys.exit(f"error: {problem}")
    main()
