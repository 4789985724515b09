"""Metric learning of flank embeddings with PyTorch Lightning.

- `FlankDataModule` splits a catalogue into training rows and a validation split of
  held-out individuals (their encounters divided into gallery and queries), checks
  every image once up front, and serves identity-balanced P x K training batches.
- `EmbeddingModule` trains an `Embedder` with a pytorch-metric-learning loss (and
  miner) and logs retrieval metrics (`val/top1`, `val/top5`, `val/mAP`: same-side
  search over the validation gallery) after every validation epoch.
- `fit_and_export` measures the untrained model, trains, reloads the best
  checkpoint, exports the embedder and measures the exported embedder.

Nothing here knows about Hydra or W&B: everything takes plain objects.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from reid.catalogue import BBOX_COLUMNS
from reid.errors import Problem, ReidError, report
from reid.files import atomic_write
from reid.images import ImageReadError
from reid.metrics import RetrievalResult, evaluate_retrieval
from reid.models import Embedder, EmbedderConfig, embed_images, export_embedder, load_embedder, read_crop
from reid.splits import SplitMethod, split_catalogue
from reid.transforms import FlankTransform, Transform, eval_transform, image_hw

log = logging.getLogger(__name__)

Identity = Literal["individual_side", "individual"]
ROLE_TRAIN, ROLE_GALLERY, ROLE_QUERY = "train", "gallery", "query"
METRIC_NAMES = ("top1", "top5", "mAP")
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class SplitSettings:
    """How a catalogue is divided into training rows and a validation gallery and queries.

    `method`, `test_fraction` and `unseen_fraction` choose the validation rows as
    `reid.splits.split_catalogue` does (`disjoint`: that fraction of individuals,
    never seen in training). The validation rows' encounters are then split
    closed-set: about `query_fraction` of each individual's encounters become
    queries, the rest the gallery (individuals with one encounter stay in the
    gallery as distractors).
    """

    method: SplitMethod = "disjoint"
    test_fraction: float = 0.3
    unseen_fraction: float = 0.3
    query_fraction: float = 0.5
    seed: int = 0


def identity_names(table: pd.DataFrame, identity: Identity = "individual_side") -> pd.Series:
    """Return each row's training identity: `individual_id`, or `individual_id/side` (the flanks differ)."""
    if identity == "individual":
        return table["individual_id"].astype("string")
    if identity == "individual_side":
        return table["individual_id"].astype("string") + "/" + table["side"].astype("string")
    raise ReidError(f"identity must be individual_side or individual, got {identity!r}")


def validation_roles(table: pd.DataFrame, split: SplitSettings) -> pd.Series:
    """Return a Series aligned with `table`: "train", "gallery", "query", or NA (unknown individual)."""
    first = split_catalogue(
        table, split.method, test_fraction=split.test_fraction, unseen_fraction=split.unseen_fraction, seed=split.seed
    )
    roles = first.map({"train": ROLE_TRAIN}).astype("string")
    held = table[first == "test"]
    if len(held):
        second = split_catalogue(held, "closed_set", test_fraction=split.query_fraction, seed=split.seed + 1)
        roles[held.index] = second.map({"train": ROLE_GALLERY, "test": ROLE_QUERY}).astype("string")
    return roles


def evaluate_split(
    embeddings: np.ndarray, table: pd.DataFrame, *, keep: int = 5
) -> tuple[RetrievalResult, np.ndarray, np.ndarray]:
    """Return (result, query rows, gallery rows) of same-side retrieval over a validation table.

    `embeddings` is (N, D), aligned with `table`, whose `role` column says gallery
    or query. Row arrays are positions in `table`; `result.top_ids` index the
    gallery rows.
    """
    roles = table["role"].astype(str).to_numpy()
    queries, gallery = np.flatnonzero(roles == ROLE_QUERY), np.flatnonzero(roles == ROLE_GALLERY)
    result = evaluate_retrieval(
        embeddings[queries], table.iloc[queries], embeddings[gallery], table.iloc[gallery], keep=keep
    )
    return result, queries, gallery


class FlankDataset(Dataset[tuple[torch.Tensor, int]]):
    """Item i: (transformed (3, h, w) crop, target i) for the table's rows."""

    def __init__(
        self,
        table: pd.DataFrame,
        targets: np.ndarray,
        transform: Transform,
        preprocess: EmbedderConfig,
        crops: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.paths = table["image_path"].astype(str).tolist()
        self.boxes = table[list(BBOX_COLUMNS)].to_numpy(dtype=float)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.preprocess = preprocess
        self.crops = crops

    def __len__(self) -> int:
        return len(self.paths)

    def crop(self, i: int) -> np.ndarray:
        """Return row i's (H, W, 3) uint8 crop before the transform."""
        if self.crops is not None:
            return self.crops[i]
        return read_crop(self.paths[i], self.boxes[i], self.preprocess)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.crop(i)), int(self.targets[i])


class IdentityBalancedSampler(MPerClassSampler):  # type: ignore[misc]  # pytorch-metric-learning is untyped
    """pytorch-metric-learning's P x K sampler, reproducible from (seed, epoch, rank).

    Each batch holds batch_size / m_per_class identities with m_per_class crops
    each. Every process of a distributed run draws its own batches, and an epoch is
    `samples_per_epoch` crops over all processes together.
    """

    def __init__(
        self,
        labels: np.ndarray,
        m_per_class: int,
        batch_size: int,
        samples_per_epoch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        identities = len(np.unique(labels))
        if batch_size % m_per_class or m_per_class * identities < batch_size:
            raise ReidError(
                f"a batch of {batch_size} with {m_per_class} crops per identity needs batch_size divisible by "
                f"m_per_class and at least {batch_size // max(m_per_class, 1)} training identities (there are "
                f"{identities}); lower datamodule.batch_size or raise datamodule.m_per_class"
            )
        per_process = max(batch_size, math.ceil(samples_per_epoch / world_size / batch_size) * batch_size)
        super().__init__(labels, m_per_class, batch_size=batch_size, length_before_new_iter=per_process)
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of `epoch` next (Lightning calls this before every epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # pml draws from a module-level RNG; swapping in our own makes the batches depend
        # only on (seed, epoch, rank), so runs and resumed runs repeat and ranks differ.
        saved = pml_common.NUMPY_RANDOM
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0]
        pml_common.NUMPY_RANDOM = np.random.RandomState(state)
        try:
            self.labels = sorted(self.labels)  # type: ignore[has-type]
            return cast(Iterator[int], super().__iter__())
        finally:
            pml_common.NUMPY_RANDOM = saved


class FlankDataModule(pl.LightningDataModule):
    """Training batches and the validation gallery/queries of one catalogue.

    The split and the training labels are fixed when the module is built, so
    `num_identities` is known before the loss is; images are decoded in `setup`.
    Rows of unknown individuals are left out; with `identity="individual_side"`,
    rows of unknown side are left out of training (their identity is unknown) but
    kept in validation, where they are searched against both sides.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        *,
        preprocess: EmbedderConfig,
        train_transform: Transform,
        split: SplitSettings | None = None,
        identity: Identity = "individual_side",
        batch_size: int = 32,
        m_per_class: int = 4,
        samples_per_epoch: int | None = None,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        cache_images: bool = True,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.split = split or SplitSettings()
        self.preprocess = preprocess
        self.train_transform = train_transform
        self.eval_transform = eval_transform(preprocess.img_size, preprocess.mean, preprocess.std)
        self.identity: Identity = identity
        self.batch_size, self.m_per_class, self.eval_batch_size = batch_size, m_per_class, eval_batch_size
        self.num_workers, self.cache_images, self.seed, self.progress = num_workers, cache_images, seed, progress

        roles = validation_roles(table, self.split)
        names = identity_names(table, identity)
        trainable = (roles == ROLE_TRAIN).fillna(False)
        if identity == "individual_side":
            unknown_side = trainable & (table["side"] == "unknown")
            if unknown_side.any():
                log.info("%d training rows of unknown side are left out of training", int(unknown_side.sum()))
            trainable &= ~unknown_side
        self.train_table = table[trainable.to_numpy()].reset_index(drop=True)
        self.identities: list[str] = sorted(names[trainable.to_numpy()].unique().tolist())
        position = {name: i for i, name in enumerate(self.identities)}
        self.train_labels = np.array([position[n] for n in names[trainable.to_numpy()]], dtype=np.int64)
        val_rows = roles.isin([ROLE_GALLERY, ROLE_QUERY]).fillna(False).to_numpy()
        self.val_table = table[val_rows].assign(role=roles[val_rows]).reset_index(drop=True)
        if not len(self.train_table):
            raise ReidError("no training rows: the catalogue has no labelled individuals left after the split")
        if not (self.val_table["role"] == ROLE_QUERY).any():
            raise ReidError(
                "the validation split has no queries: held-out individuals need two or more encounters; "
                "raise split.test_fraction or use more data"
            )
        samples = samples_per_epoch or len(self.train_table)
        self.samples_per_epoch = max(samples, batch_size)
        self.problems: list[Problem] = []
        self.train_set: FlankDataset | None = None
        self.val_set: FlankDataset | None = None

    @property
    def num_identities(self) -> int:
        """Return the number of training identities (labels are 0 .. num_identities - 1)."""
        return len(self.identities)

    def setup(self, stage: str | None = None) -> None:
        """Decode every image once; unreadable ones are reported and left out."""
        if self.train_set is not None:
            return
        train_crops, train_ok = self._load(self.train_table, "training")
        val_crops, val_ok = self._load(self.val_table, "validation")
        report(self.problems, what="reading training images")
        self.train_table = self.train_table[train_ok].reset_index(drop=True)
        self.train_labels = self.train_labels[train_ok]
        self.val_table = self.val_table[val_ok].reset_index(drop=True)
        self.train_set = FlankDataset(
            self.train_table, self.train_labels, self.train_transform, self.preprocess, train_crops
        )
        self.val_set = FlankDataset(
            self.val_table, np.arange(len(self.val_table)), self.eval_transform, self.preprocess, val_crops
        )

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, int]]:
        """Return P x K batches of (images (B, 3, h, w), labels (B,))."""
        assert self.train_set is not None, "call setup() first"
        trainer = self.trainer
        sampler = IdentityBalancedSampler(
            self.train_labels,
            self.m_per_class,
            self.batch_size,
            self.samples_per_epoch,
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        return self._loader(self.train_set, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, int]]:
        """Return batches of (images (B, 3, h, w), row positions in `val_table` (B,)), in table order."""
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set, self.eval_batch_size)

    def _loader(self, dataset: FlankDataset, batch_size: int, **kwargs: Any) -> DataLoader[tuple[torch.Tensor, int]]:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            worker_init_fn=_seed_worker,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def _load(self, table: pd.DataFrame, what: str) -> tuple[list[np.ndarray] | None, np.ndarray]:
        crops: list[np.ndarray] = []
        ok = np.zeros(len(table), dtype=bool)
        boxes = table[list(BBOX_COLUMNS)].to_numpy(dtype=float)
        rows = zip(table["image_path"].astype(str), boxes, strict=True)
        for i, (path, box) in enumerate(
            tqdm(rows, total=len(table), desc=f"reading {what} images", unit="img", disable=not self.progress)
        ):
            try:
                crop = read_crop(path, box, self.preprocess)
            except ImageReadError as err:
                self.problems.append(Problem(err.path, "", f"{err.reason}; left out of {what}"))
                continue
            ok[i] = True
            if self.cache_images:
                crops.append(crop)
        return (crops if self.cache_images else None), ok


class EmbeddingModule(pl.LightningModule):
    """Train an embedder with a metric-learning loss; validate by same-side retrieval.

    `loss` is a pytorch-metric-learning loss called as loss(embeddings, labels,
    indices_tuple); its own parameters (ArcFace class centres) are trained with the
    embedder's and stay here, never in the exported embedder. `optimizer` builds
    the optimiser from parameters; `scheduler`, if given, is called as
    scheduler(optimizer, total_steps=...) and stepped every batch.
    """

    def __init__(
        self,
        embedder: Embedder,
        loss: nn.Module,
        *,
        miner: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        strips: int = 4,
    ) -> None:
        super().__init__()
        self.embedder = embedder
        self.loss = loss
        self.miner = miner
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        self.scheduler_factory = scheduler
        self.strips = strips
        self._val_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_validation: RetrievalResult | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return (B, D) L2-normalised embeddings."""
        return cast(torch.Tensor, self.embedder(images))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        embeddings = self.embedder(images)
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss(embeddings, labels, pairs)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        self.log("train/lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]), on_step=True, on_epoch=False)
        return cast(torch.Tensor, loss)

    def on_validation_epoch_start(self) -> None:
        self._val_parts = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, rows = batch
        self._val_parts.append((rows.detach(), self.embedder(images).detach().float()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_parts:
            return
        rows = torch.cat([r for r, _ in self._val_parts])
        embeddings = torch.cat([e for _, e in self._val_parts])
        self._val_parts = []
        if self.trainer.world_size > 1:
            # Whether or not a distributed sampler split the rows, gathering and removing
            # repeats gives every process the same full set.
            rows = cast(torch.Tensor, self.all_gather(rows)).reshape(-1)
            embeddings = cast(torch.Tensor, self.all_gather(embeddings)).reshape(-1, embeddings.shape[-1])
        rows_np, first = np.unique(rows.cpu().numpy(), return_index=True)
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, FlankDataModule):
            raise ReidError("EmbeddingModule validates with a FlankDataModule: pass datamodule= to the trainer")
        table = datamodule.val_table.iloc[rows_np].reset_index(drop=True)
        result, queries, gallery = evaluate_split(embeddings.cpu().numpy()[first], table)
        self.last_validation = result
        metrics = {f"val/{name}": result.metrics[name] for name in METRIC_NAMES}
        self.log_dict({k: (0.0 if math.isnan(v) else v) for k, v in metrics.items()}, prog_bar=True)
        self._log_strips(datamodule, rows_np, queries, gallery, result)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(list(self.embedder.parameters()) + list(self.loss.parameters()))
        if self.scheduler_factory is None:
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _log_strips(
        self,
        datamodule: FlankDataModule,
        rows: np.ndarray,
        queries: np.ndarray,
        gallery: np.ndarray,
        result: RetrievalResult,
    ) -> None:
        """Send a few query | top-3 match image strips to loggers that take images (W&B)."""
        loggers: list[Any] = [logger for logger in self.loggers if callable(getattr(logger, "log_image", None))]
        if not loggers or not self.strips or not self.trainer.is_global_zero or datamodule.val_set is None:
            return
        names = datamodule.val_table["individual_id"].astype(str).tolist()
        sides = datamodule.val_table["side"].astype(str).tolist()
        strips, captions = [], []
        for q in range(min(self.strips, len(queries))):
            query_row = int(rows[queries[q]])
            matches = [int(rows[gallery[g]]) for g in result.top_ids[q, :3] if g >= 0]
            same: list[bool | None] = [names[m] == names[query_row] for m in matches]
            crops = [datamodule.val_set.crop(r) for r in (query_row, *matches)]
            strips.append(image_strip(crops, [None, *same], image_hw(datamodule.preprocess.img_size)[0]))
            scores = ", ".join(f"{s:.2f}" for s in result.top_scores[q, : len(matches)])
            captions.append(
                f"query {names[query_row]} ({sides[query_row]}) | top: {', '.join(names[m] for m in matches)} ({scores})"
            )
        for logger in loggers:
            logger.log_image(key="val/matches", images=strips, caption=captions, step=self.global_step)


def image_strip(
    crops: Sequence[np.ndarray], correct: Sequence[bool | None], height_px: int, *, tiles: int = 4
) -> np.ndarray:
    """Return an (H, W, 3) uint8 strip of `tiles` framed crops side by side: green (match), red (not), grey (query).

    Every strip of one `height_px` has the same size (W = tiles x 2 H plus frames): each
    crop is fitted into a 2:1 tile, and missing matches are left blank. W&B shows
    images of different sizes in one panel incorrectly (and says so every epoch).
    """
    frame, width_px = 4, 2 * height_px
    strip = np.full((height_px + 2 * frame, tiles * (width_px + 2 * frame), 3), 255, np.uint8)
    for k, (crop, flag) in enumerate(list(zip(crops, correct, strict=True))[:tiles]):
        h, w = crop.shape[:2]
        scale = min(width_px / w, height_px / h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        tile = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
        left = k * (width_px + 2 * frame)
        strip[:, left : left + width_px + 2 * frame] = (
            (128, 128, 128) if flag is None else ((40, 180, 60) if flag else (220, 40, 40))
        )
        y, x = frame + (height_px - size[1]) // 2, left + frame + (width_px - size[0]) // 2
        strip[frame : frame + height_px, left + frame : left + frame + width_px] = 0
        strip[y : y + size[1], x : x + size[0]] = tile
    return strip


@dataclass
class TrainingSummary:
    """What a training run measured and where it put the results."""

    untrained: dict[str, float]
    trained: dict[str, float]
    embedder_dir: str
    fingerprint: str
    best_checkpoint: str
    epochs: int
    steps: int
    fit_seconds: float
    total_seconds: float
    train_images: int
    train_identities: int
    val_gallery: int
    val_queries: int
    unreadable_images: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_text(self) -> str:
        """Return a short human-readable report."""
        lines = [
            f"trained {self.epochs} epochs ({self.steps} steps) in {self.fit_seconds / 60:.1f} min on "
            f"{self.train_images} images of {self.train_identities} identities",
            f"validation: {self.val_queries} queries against {self.val_gallery} gallery images of held-out individuals, same side",
            f"{'':>10} {'top-1':>7} {'top-5':>7} {'mAP':>7}",
        ]
        for name, values in (("untrained", self.untrained), ("trained", self.trained)):
            lines.append(f"{name:>10} " + " ".join(f"{values.get(k, float('nan')):7.3f}" for k in METRIC_NAMES))
        lines.append(f"embedder: {self.embedder_dir}")
        if self.unreadable_images:
            lines.append(f"{self.unreadable_images} unreadable images were left out (see the warnings above)")
        return "\n".join(lines)


def fit_and_export(
    trainer: pl.Trainer,
    module: EmbeddingModule,
    datamodule: FlankDataModule,
    run_dir: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
) -> TrainingSummary | None:
    """Validate the untrained model, train, export the best embedder to run_dir/embedder and measure it.

    Writes run_dir/metrics.json. Returns the summary on the main process and None on
    the other processes of a distributed run.
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    untrained = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - fit_start
    if not trainer.is_global_zero:
        return None
    callback = trainer.checkpoint_callback
    best = str(getattr(callback, "best_model_path", "") or "")
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    embedder_dir = export_embedder(module.embedder, run_dir / "embedder")
    exported = load_embedder(embedder_dir)
    trained = evaluate_embedder(exported, datamodule.val_table, progress=datamodule.progress)
    summary = TrainingSummary(
        untrained=untrained,
        trained=trained,
        embedder_dir=str(embedder_dir),
        fingerprint=json.loads((embedder_dir / "embedder.json").read_text())["fingerprint"],
        best_checkpoint=best,
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        fit_seconds=fit_seconds,
        total_seconds=time.perf_counter() - start,
        train_images=len(datamodule.train_table),
        train_identities=datamodule.num_identities,
        val_gallery=int((datamodule.val_table["role"] == ROLE_GALLERY).sum()),
        val_queries=int((datamodule.val_table["role"] == ROLE_QUERY).sum()),
        unreadable_images=len(datamodule.problems),
        extra=dict(extra or {}),
    )
    with atomic_write(run_dir / "metrics.json") as f:
        json.dump(asdict(summary), f, indent=2)
        f.write("\n")
    return summary


def evaluate_embedder(
    embedder: Embedder, val_table: pd.DataFrame, *, batch_size: int = 64, progress: bool = True
) -> dict[str, float]:
    """Return top-k and mAP of an embedder on a validation table (with `role`), reading images as inference does."""
    result = embed_images(embedder, val_table, batch_size=batch_size, progress=progress)
    report(result.problems, what="embedding validation images")
    retrieval, _, _ = evaluate_split(result.embeddings, val_table[result.ok].reset_index(drop=True))
    return retrieval.metrics


def _metrics(results: list[Mapping[str, float]]) -> dict[str, float]:
    values = results[0] if results else {}
    return {name: float(values.get(f"val/{name}", float("nan"))) for name in METRIC_NAMES}


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker base_seed + worker_id, drawn from the seeded main process;
    # albumentations keeps its own RNG, which would otherwise repeat in every worker.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 - what third-party code in the worker draws from
    random.seed(seed)
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if isinstance(transform, FlankTransform):
        transform.reseed(seed)
