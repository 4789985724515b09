"""Every option file of every config group composes and instantiates; sweeps expand."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from reid.models import Embedder
from reid.training import FlankDataModule, SplitSettings
from reid.transforms import FlankTransform, image_hw

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("data", "split", "model", "loss", "optim", "augment", "trainer", "logger", "experiment")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    # paths.* come from the running Hydra app; compose() has none, so tests set them.
    return compose(
        "train", overrides=[f"paths.root={tmp_path}", f"paths.run_dir={tmp_path / 'run'}", "progress=false", *overrides]
    )


def _wire(node: DictConfig, **values: object) -> object:
    return instantiate(node, _partial_=True)(**values)


def _binds(node: DictConfig) -> None:
    """Check that the leaf's target exists and takes its arguments, without calling it."""
    values = {k: v for k, v in OmegaConf.to_container(node, resolve=False).items() if not k.startswith("_")}
    inspect.signature(get_method(node._target_)).bind(**values)


def test_every_group_has_its_options() -> None:
    assert {"synthetic", "labels_csv", "coco", "camtrap_dp"} <= set(_options("data"))
    assert {"arcface", "subcenter_arcface", "triplet"} <= set(_options("loss"))
    assert {"cpu", "gpu", "ddp"} <= set(_options("trainer"))
    assert {"wandb", "csv"} <= set(_options("logger"))
    assert {"synthetic", "nyala", "megadescriptor"} <= set(_options("experiment"))
    for group in GROUPS:
        assert _options(group), group


def test_default_config_trains_on_synthetic_data_on_cpu(hydra_conf, tmp_path) -> None:
    cfg = _compose(tmp_path)
    assert cfg.data.source._target_ == "reid.synthetic.ensure_dataset"
    assert cfg.trainer.accelerator == "cpu" and cfg.logger.offline is True
    assert cfg.model.pretrained is False
    # The wired values fail loudly if Python forgets them.
    assert OmegaConf.is_missing(cfg.loss.criterion, "num_classes")
    assert OmegaConf.is_missing(cfg.datamodule, "table")


@pytest.mark.parametrize("option", _options("split"))
def test_split_options_instantiate(hydra_conf, tmp_path, option: str) -> None:
    settings = instantiate(_compose(tmp_path, f"split={option}").split)
    assert isinstance(settings, SplitSettings) and settings.method == option


@pytest.mark.parametrize("option", _options("model"))
def test_model_options_instantiate(hydra_conf, tmp_path, option: str) -> None:
    model = instantiate(_compose(tmp_path, f"model={option}").model)
    assert isinstance(model, Embedder)
    x = torch.randn(2, 3, *image_hw(model.config.img_size))
    assert model.eval()(x).shape == (2, model.config.embedding_dim)


@pytest.mark.parametrize("option", _options("loss"))
def test_loss_options_instantiate_and_compute(hydra_conf, tmp_path, option: str) -> None:
    cfg = _compose(tmp_path, f"loss={option}")
    wired = {"num_classes": 5, "embedding_size": 8}
    loss = _wire(cfg.loss.criterion, **{k: v for k, v in wired.items() if k in cfg.loss.criterion.keys()})  # noqa: SIM118
    miner = instantiate(cfg.loss.miner) if cfg.loss.miner else None
    embeddings = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    labels = torch.arange(20) % 5
    value = loss(embeddings, labels, miner(embeddings, labels) if miner else None)
    assert torch.isfinite(value)


@pytest.mark.parametrize("option", _options("optim"))
def test_optim_options_instantiate(hydra_conf, tmp_path, option: str) -> None:
    cfg = _compose(tmp_path, f"optim={option}")
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(optimizer, torch.optim.Optimizer)
    if cfg.optim.get("scheduler"):
        scheduler = instantiate(cfg.optim.scheduler)(optimizer, total_steps=10)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("option", _options("augment"))
def test_augment_options_instantiate(hydra_conf, tmp_path, option: str) -> None:
    cfg = _compose(tmp_path, f"augment={option}")
    transform = _wire(cfg.augment, img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert isinstance(transform, FlankTransform)
    assert transform(torch.zeros(20, 40, 3, dtype=torch.uint8).numpy()).shape == (3, 32, 32)


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_options_instantiate(hydra_conf, tmp_path, option: str) -> None:
    cfg = _compose(tmp_path, f"trainer={option}")
    # P x K batches are drawn per process by the data module: Lightning must not re-shard them.
    assert cfg.trainer.use_distributed_sampler is False
    # No GPU is assumed: the GPU options are built on the CPU with everything else as configured.
    cpu = ["trainer.accelerator=cpu", "trainer.precision=32-true"] if cfg.trainer.accelerator != "cpu" else []
    trainer = instantiate(_compose(tmp_path, f"trainer={option}", *cpu).trainer, logger=False)
    assert isinstance(trainer, pl.Trainer)


@pytest.mark.parametrize("option", _options("logger"))
def test_logger_options_instantiate(hydra_conf, tmp_path, option: str) -> None:
    logger = instantiate(_compose(tmp_path, f"logger={option}").logger)
    assert isinstance(logger, pl.loggers.Logger)
    assert str(tmp_path / "run") in str(logger.save_dir)


def test_wandb_is_offline_by_default(hydra_conf, tmp_path) -> None:
    logger = instantiate(_compose(tmp_path, "logger=wandb").logger)
    assert logger._offline is True  # WandbLogger then runs wandb in offline mode: no network, no prompt


def test_synthetic_data_option_instantiates(hydra_conf, tmp_path) -> None:
    cfg = _compose(tmp_path, "data=synthetic", "data.source.config.n_individuals=3")
    path = instantiate(cfg.data.source)
    assert Path(path) == tmp_path / "data" / "synthetic" / "catalogue.csv" and Path(path).is_file()


def test_labels_csv_data_option_instantiates(hydra_conf, tmp_path, flank_catalogue) -> None:
    labels = flank_catalogue[["image_path", "individual_id", "side"]].rename(columns={"image_path": "path"})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    cfg = _compose(tmp_path, "data=labels_csv", f"data.source.path={tmp_path / 'labels.csv'}")
    result = instantiate(cfg.data.source)
    assert len(result.table) == len(flank_catalogue) and not result.problems


def test_coco_data_option_instantiates(hydra_conf, tmp_path, flank_catalogue) -> None:
    rows = flank_catalogue.head(4)
    coco = {
        "images": [{"id": i, "file_name": p} for i, p in enumerate(rows["image_path"])],
        "annotations": [
            {"id": i, "image_id": i, "bbox": [12, 10, 96, 48], "viewpoint": side, "name": name}
            for i, (side, name) in enumerate(zip(rows["side"], rows["individual_id"], strict=True))
        ],
        "categories": [{"id": 1, "name": "leopard"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    cfg = _compose(tmp_path, "data=coco", f"data.source.path={tmp_path / 'coco.json'}")
    assert len(instantiate(cfg.data.source).table) == 4


def test_camtrap_dp_data_option_binds(hydra_conf, tmp_path) -> None:
    cfg = _compose(tmp_path, "data=camtrap_dp", "data.source.package_dir=/some/package")
    _binds(cfg.data.source)


@pytest.mark.parametrize("option", _options("experiment"))
def test_experiment_presets_compose_and_bind(hydra_conf, tmp_path, option: str) -> None:
    cfg = _compose(tmp_path, f"experiment={option}")
    for leaf in (cfg.data.source, cfg.model, cfg.split, cfg.trainer):
        _binds(leaf)


def test_nyala_preset_reads_the_shared_labels_with_an_open_set_split(hydra_conf, tmp_path) -> None:
    cfg = _compose(tmp_path, "experiment=nyala")
    assert cfg.data.source.path == f"{tmp_path}/../shared/data/nyala-dev/labels.csv"
    assert cfg.split.method == "open_set"


def test_megadescriptor_preset_fine_tunes_the_hub_model(hydra_conf, tmp_path) -> None:
    cfg = _compose(tmp_path, "experiment=megadescriptor")
    assert cfg.model.backbone == "hf-hub:BVRA/MegaDescriptor-L-384" and cfg.model.pretrained is True
    assert cfg.model.img_size == 384 and cfg.trainer.accelerator == "gpu"


def test_datamodule_and_module_wire_from_the_config(hydra_conf, tmp_path, flank_catalogue) -> None:
    cfg = _compose(tmp_path, "model=tiny", "datamodule.batch_size=8", "datamodule.m_per_class=2")
    embedder = instantiate(cfg.model)
    pre = embedder.config
    datamodule = _wire(
        cfg.datamodule,
        table=flank_catalogue,
        preprocess=pre,
        train_transform=_wire(cfg.augment, img_size=pre.img_size, mean=pre.mean, std=pre.std),
        split=instantiate(cfg.split),
    )
    assert isinstance(datamodule, FlankDataModule) and datamodule.num_identities > 0
    loss = _wire(cfg.loss.criterion, num_classes=datamodule.num_identities, embedding_size=pre.embedding_dim)
    module = _wire(
        cfg.module,
        embedder=embedder,
        loss=loss,
        miner=None,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler),
    )
    assert isinstance(module, pl.LightningModule) and module.embedder is embedder


def test_sweep_overrides_expand_into_composable_runs(hydra_conf, tmp_path) -> None:
    parsed = OverridesParser.create().parse_overrides(["loss=arcface,triplet", "seed=0,1", "model=tiny"])
    runs = [run for batch in BasicSweeper.split_arguments(parsed, None) for run in batch]
    assert len(runs) == 4
    seen = {(c.loss.criterion._target_.rsplit(".", 1)[-1], c.seed) for c in (_compose(tmp_path, *r) for r in runs)}
    assert seen == {(loss, seed) for loss in ("ArcFaceLoss", "TripletMarginLoss") for seed in (0, 1)}


def test_resolved_config_has_no_dangling_interpolations(hydra_conf, tmp_path) -> None:
    cfg = _compose(tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert "${" not in json.dumps(container)
