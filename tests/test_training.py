"""Training end to end: batches, splits, a smoke run, export round trips, learning, reproducibility, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_metric_learning.losses import ArcFaceLoss

from reid.models import create_embedder, embed_images, load_embedder
from reid.training import (
    EmbeddingModule,
    FlankDataModule,
    IdentityBalancedSampler,
    SplitSettings,
    fit_and_export,
    identity_names,
)
from reid.transforms import train_transform

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _datamodule(table: pd.DataFrame, embedder, **kwargs) -> FlankDataModule:
    pre = embedder.config
    settings = {
        "split": SplitSettings("disjoint", test_fraction=0.25),
        "batch_size": 8,
        "m_per_class": 2,
        "progress": False,
    }
    return FlankDataModule(
        table,
        preprocess=pre,
        train_transform=train_transform(pre.img_size, pre.mean, pre.std, seed=0),
        **{**settings, **kwargs},
    )


def _module(embedder, datamodule: FlankDataModule, lr: float = 3e-3) -> EmbeddingModule:
    loss = ArcFaceLoss(num_classes=datamodule.num_identities, embedding_size=embedder.embedding_dim, scale=30)
    return EmbeddingModule(embedder, loss, optimizer=lambda params: torch.optim.AdamW(params, lr=lr))


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    settings = dict(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True
    )
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/mAP", mode="max")]
    return pl.Trainer(default_root_dir=tmp_path, num_sanity_val_steps=0, callbacks=callbacks, **{**settings, **kwargs})


def _tiny_embedder(seed: int = 0):
    torch.manual_seed(seed)
    return create_embedder("test_convnext", 32, img_size=48)


def test_sampler_draws_p_by_k_batches_reproducibly() -> None:
    labels = np.repeat(np.arange(10), 5)
    sampler = IdentityBalancedSampler(labels, 4, 16, 48, seed=3)
    order = list(sampler)
    assert len(order) == 48
    for start in range(0, 48, 16):
        _, counts = np.unique(labels[order[start : start + 16]], return_counts=True)
        assert counts.tolist() == [4, 4, 4, 4]
    assert list(IdentityBalancedSampler(labels, 4, 16, 48, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    other_rank = IdentityBalancedSampler(labels, 4, 16, 48, seed=3, rank=1, world_size=2)
    assert len(other_rank) == 32 and list(other_rank) != order[:32]


def test_sampler_refuses_a_batch_larger_than_the_identities_allow() -> None:
    with pytest.raises(Exception, match=r"lower datamodule\.batch_size"):
        IdentityBalancedSampler(np.repeat(np.arange(3), 4), 4, 16, 32)


def test_identity_is_individual_and_side_by_default(flank_catalogue) -> None:
    names = identity_names(flank_catalogue)
    assert names.iloc[0] == f"{flank_catalogue.individual_id.iloc[0]}/{flank_catalogue.side.iloc[0]}"
    assert names.nunique() == 2 * identity_names(flank_catalogue, "individual").nunique()


def test_validation_holds_out_whole_individuals_split_into_gallery_and_queries(flank_catalogue) -> None:
    datamodule = _datamodule(flank_catalogue, _tiny_embedder())
    train_ids = set(datamodule.train_table["individual_id"])
    val = datamodule.val_table
    assert train_ids.isdisjoint(set(val["individual_id"]))
    assert set(val["role"]) == {"gallery", "query"}
    # Encounters stay whole: none has rows in both roles.
    assert (val.groupby("encounter_id")["role"].nunique() == 1).all()
    assert datamodule.num_identities == 2 * len(train_ids)


def test_unreadable_images_are_reported_up_front_not_mid_epoch(flank_catalogue, tmp_path) -> None:
    table = flank_catalogue.copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"garbage")
    table.loc[0, "image_path"] = str(broken)
    table.loc[len(table) - 1, "image_path"] = str(tmp_path / "gone.jpg")
    datamodule = _datamodule(table, _tiny_embedder())
    datamodule.setup("fit")
    assert len(datamodule.problems) == 2
    assert {Path(p.source).name for p in datamodule.problems} == {"broken.jpg", "gone.jpg"}
    assert str(broken) not in set(datamodule.train_table["image_path"]) | set(datamodule.val_table["image_path"])
    assert len(datamodule.train_set) + len(datamodule.val_set) == len(table) - 2


def test_fast_dev_run_smoke(flank_catalogue, tmp_path) -> None:
    embedder = _tiny_embedder()
    datamodule = _datamodule(flank_catalogue, embedder)
    module = _module(embedder, datamodule)
    trainer = _trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.state.finished
    assert {"val/top1", "val/top5", "val/mAP"} <= set(trainer.callback_metrics)


def test_exported_embedder_round_trips_and_matches_the_trained_module(flank_catalogue, tmp_path) -> None:
    pl.seed_everything(0)
    embedder = _tiny_embedder()
    datamodule = _datamodule(flank_catalogue, embedder)
    module = _module(embedder, datamodule)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=3)
    summary = fit_and_export(trainer, module, datamodule, tmp_path / "run")
    assert summary is not None
    loaded = load_embedder(summary.embedder_dir)
    trained = module.embedder.state_dict()
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in trained.items())
    images = torch.stack([datamodule.val_set[i][0] for i in range(6)])
    module.eval()
    with torch.no_grad():
        from_module, from_export = module(images), loaded(images)
    assert torch.equal(from_module, from_export)
    # Inference's reader gives the same embeddings as training validation's loader.
    rows = datamodule.val_table.head(6)
    np.testing.assert_allclose(embed_images(loaded, rows, progress=False).embeddings, from_export.numpy(), atol=1e-6)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["trained"] == summary.trained and set(metrics["untrained"]) == {"top1", "top5", "mAP"}
    # The exported embedder is the best checkpoint: its metrics are the best validation's.
    assert summary.trained["mAP"] == pytest.approx(float(trainer.checkpoint_callback.best_model_score), abs=1e-6)


def _short_run(table: pd.DataFrame, tmp_path: Path, epochs: int, seed: int = 0, **kwargs):
    pl.seed_everything(seed)
    embedder = _tiny_embedder(seed)
    datamodule = _datamodule(table, embedder, **kwargs)
    module = _module(embedder, datamodule)
    return fit_and_export(_trainer(tmp_path, max_epochs=epochs), module, datamodule, tmp_path / "run")


def test_the_same_run_gives_the_same_metrics(flank_catalogue, tmp_path) -> None:
    first = _short_run(flank_catalogue, tmp_path / "a", epochs=2)
    second = _short_run(flank_catalogue, tmp_path / "b", epochs=2)
    assert first is not None and second is not None
    assert first.trained == second.trained and first.untrained == second.untrained
    assert first.fingerprint == second.fingerprint


def _chance_top1(val_table: pd.DataFrame) -> float:
    """Return the expected top-1 of a random ranking: per query, the share of its same-side gallery that matches."""
    gallery = val_table[val_table["role"] == "gallery"]
    shares = []
    for row in val_table[val_table["role"] == "query"].itertuples():
        same_side = gallery[gallery["side"] == row.side]
        relevant = int((same_side["individual_id"] == row.individual_id).sum())
        if relevant:
            shares.append(relevant / len(same_side))
    return float(np.mean(shares))


@pytest.mark.slow
def test_a_short_run_on_synthetic_flanks_beats_chance_widely(tmp_path) -> None:
    from conftest import write_flank_catalogue

    # 30 individuals with rotated, rescaled, noisy and night-grey captures; 9 held out.
    (tmp_path / "flanks").mkdir()
    table = write_flank_catalogue(tmp_path / "flanks", 30, seed=1, jitter=1.0)
    pl.seed_everything(0)
    embedder = create_embedder("resnet10t", 64, img_size=[48, 96], crop_margin=0.05)
    datamodule = _datamodule(
        table, embedder, split=SplitSettings("disjoint", test_fraction=0.3), batch_size=32, m_per_class=4
    )
    loss = ArcFaceLoss(num_classes=datamodule.num_identities, embedding_size=64, margin=8, scale=16)
    module = EmbeddingModule(
        embedder,
        loss,
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4),
        scheduler=lambda optimizer, total_steps: torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=2e-3, total_steps=total_steps, pct_start=0.15
        ),
    )
    summary = fit_and_export(_trainer(tmp_path, max_epochs=25), module, datamodule, tmp_path / "run")
    assert summary is not None
    chance = _chance_top1(datamodule.val_table)
    print(summary.to_text(), f"chance top-1 {chance:.3f}")
    assert summary.trained["top1"] > 3 * chance
    assert summary.trained["mAP"] > summary.untrained["mAP"]


def _train_py(tmp_path: Path, *overrides: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"hydra.run.dir={tmp_path / 'run'}",
        "progress=false",
        *overrides,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def _labels_csv(table: pd.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "labels.csv"
    table.rename(columns={"image_path": "path"})[
        ["path", "individual_id", "side", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "encounter_id"]
    ].to_csv(path, index=False)
    return path


def test_train_py_fast_dev_run_writes_the_run_folder(flank_catalogue, tmp_path) -> None:
    labels = _labels_csv(flank_catalogue, tmp_path)
    done = _train_py(
        tmp_path,
        "model=tiny",
        "logger=csv",
        "data=labels_csv",
        f"data.source.path={labels}",
        "datamodule.batch_size=8",
        "datamodule.m_per_class=2",
        "trainer.fast_dev_run=true",
        "threads=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert "untrained" in done.stdout and "embedder:" in done.stdout
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    load_embedder(run / "embedder")


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_with_gloo(flank_catalogue, tmp_path) -> None:
    labels = _labels_csv(flank_catalogue, tmp_path)
    done = _train_py(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_epochs=2",
        "model=tiny",
        "logger=csv",
        "data=labels_csv",
        f"data.source.path={labels}",
        "datamodule.batch_size=8",
        "datamodule.m_per_class=2",
        "threads=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gloo" in done.stderr + done.stdout or "distributed_backend" in done.stderr + done.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Each of the two processes drew its own half of an epoch: 2 epochs of 96 crops at 8 a batch.
    train_images = metrics["train_images"]
    assert metrics["steps"] == 2 * -(-train_images // 2 // 8)
    load_embedder(tmp_path / "run" / "embedder")


@pytest.mark.slow
def test_wandb_offline_run_logs_metrics_and_image_strips(flank_catalogue, tmp_path) -> None:
    labels = _labels_csv(flank_catalogue, tmp_path)
    done = _train_py(
        tmp_path,
        "model=tiny",
        "logger=wandb",
        "data=labels_csv",
        f"data.source.path={labels}",
        "datamodule.batch_size=8",
        "datamodule.m_per_class=2",
        "trainer.max_epochs=1",
        "threads=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = list(runs[0].rglob("*.png"))
    assert media, "no query/top-match strips were logged"
    assert len({Image.open(path).size for path in media}) == 1  # one size, or W&B's UI shows them wrongly
    assert "Images sizes do not match" not in done.stdout + done.stderr
