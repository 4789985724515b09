"""Print training images/s of the Lightning pipeline against a plain PyTorch loop, and their ratio.

    python bench/train_throughput.py                     # the default model: resnet18, 64 x 176 px, 2 x 6 parts
    python bench/train_throughput.py --img-size 128 --parts none
    python bench/train_throughput.py --steps 60 --repeat 3 --backbone resnet10t

Both loops train the same model (same initial weights), with the same loss,
optimiser, scheduler, DataLoader (P x K sampler, augmentation, cached crops),
batch size and threads, on the built-in synthetic data. The Lightning run is the
pipeline of train.py (EmbeddingModule with its logging, progress bar on) with
validation and checkpoints off, so the ratio measures Lightning's overhead per
training step. The first steps of each run are warm-up and not timed; the best of
`--repeat` alternating runs is reported, since other processes share the machine.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytorch_lightning as pl
import torch
from pytorch_metric_learning.losses import ArcFaceLoss

from reid.catalogue import load_catalogue
from reid.images import set_threads
from reid.models import create_embedder
from reid.synthetic import SyntheticConfig, ensure_dataset
from reid.training import EmbeddingModule, FlankDataModule
from reid.transforms import train_transform

REPO = Path(__file__).resolve().parents[1]


class _StepTimer(pl.Callback):
    """Time training steps warmup .. warmup + timed - 1."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup


def build(args: argparse.Namespace, datamodule: FlankDataModule | None) -> tuple[EmbeddingModule, FlankDataModule]:
    """Return a freshly initialised module (same seed every time) and the data module."""
    pl.seed_everything(0, verbose=False)
    embedder = create_embedder(args.backbone, 128, img_size=args.img_size, crop_margin=0.05, parts=args.parts)
    if datamodule is None:
        table = load_catalogue(ensure_dataset(REPO / "data" / "synthetic", SyntheticConfig()))
        c = embedder.config
        datamodule = FlankDataModule(
            table,
            preprocess=c,
            train_transform=train_transform(c.img_size, c.mean, c.std, seed=0),
            batch_size=args.batch_size,
            num_workers=args.workers,
            samples_per_epoch=args.batch_size * (args.steps + args.warmup),
        )
        datamodule.setup("fit")
    loss = ArcFaceLoss(num_classes=datamodule.num_identities, embedding_size=128, margin=8, scale=16)
    module = EmbeddingModule(
        embedder,
        loss,
        optimizer=partial(torch.optim.AdamW, lr=2e-3),
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=2e-3),
    )
    return module, datamodule


def plain_loop(args: argparse.Namespace, datamodule: FlankDataModule) -> float:
    """Return images/s of a hand-written training loop."""
    module, _ = build(args, datamodule)
    model, loss_fn = module.embedder.train(), module.loss.train()
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps + args.warmup)
    start, steps = 0.0, 0
    for step, (images, labels) in enumerate(datamodule.train_dataloader()):
        if step == args.warmup:
            start = time.perf_counter()
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps = step + 1 - args.warmup
    return steps * args.batch_size / (time.perf_counter() - start)


def lightning_loop(args: argparse.Namespace, datamodule: FlankDataModule) -> float:
    """Return images/s of the Lightning pipeline."""
    module, _ = build(args, datamodule)
    timer = _StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=pl.loggers.CSVLogger(args.log_dir),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        use_distributed_sampler=False,
        deterministic=True,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.steps * args.batch_size / (timer.end - timer.start)


def _size(text: str) -> int | tuple[int, int]:
    values = tuple(int(v) for v in text.lower().split("x"))
    return values[0] if len(values) == 1 else (values[0], values[1])


def _parts(text: str) -> tuple[int, int] | None:
    if text.lower() == "none":
        return None
    rows, columns = (int(v) for v in text.lower().split("x"))
    return rows, columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--img-size", type=_size, default=(64, 176), help="HxW or one side, px")
    parser.add_argument("--parts", type=_parts, default=(2, 6), help="RxC grid of part pooling, or none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of each; the best is reported")
    parser.add_argument("--log-dir", default="/tmp/reid-bench-logs")
    args = parser.parse_args()
    set_threads(args.threads)

    _, datamodule = build(args, None)
    plain, lightning = [], []
    for _ in range(args.repeat):
        plain.append(plain_loop(args, datamodule))
        lightning.append(lightning_loop(args, datamodule))
    print(
        f"{args.backbone} at {args.img_size} px, parts {args.parts}, batch {args.batch_size}, {args.threads} threads, "
        f"{args.workers} workers, {args.steps} timed steps, best of {args.repeat}"
    )
    print(f"  plain PyTorch loop: {max(plain):7.1f} images/s   (runs: {', '.join(f'{v:.1f}' for v in plain)})")
    print(f"  Lightning pipeline: {max(lightning):7.1f} images/s   (runs: {', '.join(f'{v:.1f}' for v in lightning)})")
    ratio = max(lightning) / max(plain)
    print(f"  ratio Lightning / plain: {ratio:.3f}  (overhead {100 * (1 - ratio):.1f}%)")


if __name__ == "__main__":
    main()
