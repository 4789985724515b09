"""The flank embedder: a timm backbone, a linear projection and L2 normalisation.

`Embedder` always returns (B, D) L2-normalised embeddings, in training and in
evaluation; class weights (ArcFace centres) belong to the loss, not here. Its
`EmbedderConfig` is everything inference needs to rebuild it and to prepare
images the way it was trained: backbone, embedding size, input size, normalisation
and crop margin. `export_embedder` writes weights and config with a fingerprint,
`load_embedder` reads them back without any training code, and `embed_images`
turns catalogue rows into embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from timm.data.config import resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from reid.catalogue import BBOX_COLUMNS, image_problem
from reid.errors import Problem, ReidError
from reid.files import atomic_write
from reid.images import ImageReadError, read_image
from reid.transforms import eval_transform, image_hw

log = logging.getLogger(__name__)

EXPORT_FORMAT = "leopard-reid-embedder/1"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "embedder.json"
HUB_PREFIXES = ("hf-hub:", "timm/")
_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
_BACKBONE_PREFIXES = ("embedder.backbone.", "module.backbone.", "backbone.")
_WRAPPER_PREFIXES = ("module.", "model.")


@dataclass(frozen=True)
class EmbedderConfig:
    """What rebuilds an embedder offline and prepares its input images."""

    backbone: str
    """timm architecture name (never a hub name), so the model is rebuilt without a download."""
    embedding_dim: int
    img_size: int | tuple[int, int]
    """Crops are resized to img_size x img_size px, or to (height, width) px."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_margin: float = 0.0
    """Fraction of the box added on every side when cropping the flank."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of timm.create_model, such as img_size for a ViT."""
    weights: str = "none"
    """Where the backbone's initial weights came from (provenance only)."""
    parts: tuple[int, int] | None = None
    """(rows, columns): pool the feature map per cell of this grid instead of globally (CNN backbones)."""

    @property
    def max_side_px(self) -> int:
        """Return the longest side crops are decoded at: twice the input's longest side, so no crop is upscaled much."""
        return 2 * max(image_hw(self.img_size))

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EmbedderConfig:
        """Return the config from `to_dict` values; raise ReidError on missing or unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ReidError(f"embedder config has unknown keys {unknown}; it was written by a newer version")
        try:
            config = cls(**values)
        except TypeError as err:
            raise ReidError(f"embedder config is incomplete ({err})") from err
        return dataclasses.replace(
            config,
            img_size=_image_size(config.img_size),
            parts=_parts(config.parts),
            mean=_triple(config.mean),
            std=_triple(config.std),
            backbone_kwargs=dict(config.backbone_kwargs),
        )


class Embedder(nn.Module):
    """Map (B, 3, h, w) normalised images to (B, D) L2-normalised embeddings."""

    def __init__(self, config: EmbedderConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        if backbone is None:
            backbone = _timm_backbone(config.backbone, False, _backbone_args(config.backbone_kwargs, config.parts))
        self.backbone = backbone
        if config.parts is None:
            self.pool: nn.Module = nn.Identity()
            features = _feature_dim(backbone)
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(config.parts), nn.Flatten())
            features = _feature_dim(backbone, pooled=False) * config.parts[0] * config.parts[1]
        self.projection = nn.Linear(features, config.embedding_dim)

    @property
    def embedding_dim(self) -> int:
        """Return D."""
        return self.config.embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return (B, D) L2-normalised embeddings of (B, 3, h, w) images."""
        features = self.backbone(images)
        if self.config.parts is not None and features.ndim != 4:
            raise ReidError(f"{self.config.backbone} gives no feature map to pool by parts; use parts=null with it")
        return F.normalize(self.projection(self.pool(features)), dim=1)


def create_embedder(
    backbone: str,
    embedding_dim: int,
    *,
    pretrained: bool | str | os.PathLike[str] | None = False,
    img_size: int | Sequence[int] | None = None,
    crop_margin: float = 0.0,
    parts: Sequence[int] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> Embedder:
    """Return a new embedder whose projection is freshly initialised.

    `backbone` is a timm model name (`resnet18`) or hub name (`hf-hub:BVRA/MegaDescriptor-L-384`).
    `pretrained` chooses the backbone's initial weights:

    - False: random initialisation (no download);
    - True: timm's default weights for `backbone` (downloads unless cached);
    - "hf-hub:<repo>" or "timm/<repo>": weights of that hub repository (downloads);
    - a path to a `.safetensors`, `.pth`, `.pt` or `.bin` file: a state dict of the
      backbone, read without unpickling arbitrary objects. Classifier weights in the
      file are ignored; any other mismatch is an error naming the keys.

    `img_size` is one side of a square input or (height, width); a CNN takes any,
    a ViT needs its own size in `backbone_kwargs` too. It defaults to the
    backbone's own input size. Mean and std come from
    the backbone's pretrained config, so inputs are normalised as it was trained.

    With `parts` = (rows, columns), the backbone's feature map is average-pooled
    per cell of that grid and the cells are concatenated before the projection
    (part-based pooling, as in PCB re-identification): where on the flank a rosette
    lies is kept, which a global average throws away. Needs a CNN backbone.
    """
    kwargs = dict(backbone_kwargs or {})
    if embedding_dim < 1:
        raise ReidError(f"embedding_dim must be positive, got {embedding_dim}")
    grid = _parts(parts)
    build_kwargs = _backbone_args(kwargs, grid)
    if pretrained is None or isinstance(pretrained, bool):
        model = _timm_backbone(backbone, bool(pretrained), build_kwargs)
        weights = "timm:" + backbone if pretrained else "none"
    elif isinstance(pretrained, str) and pretrained.startswith(HUB_PREFIXES):
        repo = pretrained.removeprefix("hf-hub:")
        model = _timm_backbone(
            backbone, True, {**build_kwargs, "pretrained_cfg_overlay": {"source": "hf-hub", "hf_hub_id": repo}}
        )
        weights = "hf-hub:" + repo
    elif isinstance(pretrained, str | os.PathLike):
        model = _timm_backbone(backbone, False, build_kwargs)
        weights = load_backbone_weights(model, pretrained)
    else:
        raise ReidError(f"pretrained must be true, false, a hub name or a weights file, got {pretrained!r}")
    data_config = resolve_model_data_config(model)  # type: ignore[no-untyped-call]  # timm leaves it untyped
    config = EmbedderConfig(
        backbone=_architecture(model, backbone),
        embedding_dim=int(embedding_dim),
        img_size=_image_size(img_size if img_size is not None else data_config["input_size"][-2:]),
        mean=_triple(data_config["mean"]),
        std=_triple(data_config["std"]),
        crop_margin=float(crop_margin),
        backbone_kwargs=kwargs,
        weights=weights,
        parts=grid,
    )
    return Embedder(config, backbone=model)


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str]) -> str:
    """Load a local weights file into the backbone; return "file:<name> sha256:<hex>" for provenance.

    Accepts the backbone's state dict, one nested under `state_dict` or `model`
    (a training checkpoint) or wrapped with a `module.` prefix, or an exported
    embedder's weights (its `backbone.` part is used). `.safetensors` files are read
    as tensors only, other files with torch.load(weights_only=True).
    """
    path = Path(path)
    if not path.is_file():
        raise ReidError(f"{path}: weights file not found; give a .safetensors or .pth file, or pretrained=false")
    data = path.read_bytes()
    try:
        if path.suffix == ".safetensors":
            state: Any = load_safetensors(data)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ReidError(
            f"{path}: not a weights file that can be read safely ({reason}); save a state dict with "
            "safetensors.torch.save_file or torch.save(model.state_dict(), ...)"
        ) from err
    for key in _CHECKPOINT_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReidError(f"{path}: holds no state dict of tensors; save one with torch.save(model.state_dict(), ...)")
    state = _backbone_part(dict(state))
    expected = backbone.state_dict()
    classifier = _classifier_names(backbone)
    # A classifier head in the file is expected (num_classes=0 removes it here); anything else must fit exactly.
    state = {
        k: v
        for k, v in state.items()
        if k in expected or not any(k == name or k.startswith(name + ".") for name in classifier)
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise ReidError(f"{path}: weights do not fit this backbone ({detail}); check the backbone name")
    backbone.load_state_dict(state, strict=True)
    return f"file:{path.name} sha256:{hashlib.sha256(data).hexdigest()}"


def export_embedder(model: Embedder, path_dir: str | Path) -> Path:
    """Write `weights.safetensors` and `embedder.json` (config and fingerprint) into `path_dir`; return the folder.

    Both files are written atomically, weights first: a folder whose fingerprint
    checks out is complete.
    """
    path_dir = Path(path_dir)
    weights = _weights_bytes(model)
    config = model.config.to_dict()
    meta = {
        "format": EXPORT_FORMAT,
        "config": config,
        "fingerprint": fingerprint(weights, config),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    with atomic_write(path_dir / WEIGHTS_FILE, "wb") as f:
        f.write(weights)
    with atomic_write(path_dir / CONFIG_FILE) as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    return path_dir


def load_embedder(path_dir: str | Path, *, device: str | torch.device = "cpu") -> Embedder:
    """Return the exported embedder in `path_dir`, in eval mode; raise ReidError if files are missing or altered."""
    path_dir = Path(path_dir)
    hint = "point to the embedder/ folder of a training run, or export one with reid.models.export_embedder"
    config_path, weights_path = path_dir / CONFIG_FILE, path_dir / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise ReidError(f"{needed} not found; {hint}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReidError(f"{config_path}: not valid JSON ({err}); copy the embedder folder again") from err
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ReidError(f"{config_path}: format {found!r} is not {EXPORT_FORMAT!r}; {hint}")
    weights = weights_path.read_bytes()
    config_values = meta.get("config")
    if not isinstance(config_values, dict) or meta.get("fingerprint") != fingerprint(weights, config_values):
        raise ReidError(
            f"{path_dir}: fingerprint does not match the weights and config; the files were altered or copied "
            "from different exports: copy the whole embedder folder again"
        )
    model = Embedder(EmbedderConfig.from_dict(config_values))
    model.load_state_dict(load_safetensors(weights), strict=True)
    return model.to(device).eval()


def model_fingerprint(model: Embedder) -> str:
    """Return the fingerprint `export_embedder` would record for the model as it is now."""
    return fingerprint(_weights_bytes(model), model.config.to_dict())


def fingerprint(weights: bytes, config: Mapping[str, Any]) -> str:
    """Return the hex SHA-256 over the weights file's bytes and the config as canonical JSON."""
    digest = hashlib.sha256(weights)
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return digest.hexdigest()


def read_crop(path: str, bbox: np.ndarray | None, config: EmbedderConfig) -> np.ndarray:
    """Return the (H, W, 3) uint8 flank crop of one image, as `config` prepares it; raise ImageReadError."""
    box = None if bbox is None or np.isnan(bbox).any() else [float(v) for v in bbox]
    return read_image(path, box, margin=config.crop_margin, max_side_px=config.max_side_px)


@dataclass(frozen=True)
class Embeddings:
    """Embeddings of the catalogue rows that could be read, and what went wrong with the others."""

    embeddings: np.ndarray
    """(M, D) float32, L2-normalised: one row per True in `ok`, in table order."""
    ok: np.ndarray
    """(N,) bool over the table's rows: which rows were embedded."""
    problems: list[Problem]


@torch.no_grad()
def embed_images(
    model: Embedder,
    table: pd.DataFrame,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Embeddings:
    """Return the embeddings of the table's flank crops; unreadable images are reported, not fatal.

    `table` needs `image_path` and the box columns (an empty box is the whole
    image). Images are cropped, resized and normalised as the model's config says.
    `threads` sets torch's CPU threads for the call.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dataset = _CropDataset(table, model.config)
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_readable, shuffle=False
        )
        was_training = model.training
        model.eval()
        parts: list[np.ndarray] = []
        ok = np.zeros(len(table), dtype=bool)
        problems: list[Problem] = []
        with tqdm(total=len(table), desc="embedding", unit="img", disable=not progress) as bar:
            for images, rows, failures in loader:
                for row, error in failures:
                    problems.append(image_problem(table, row, error.path, error.reason))
                if len(rows):
                    parts.append(model(images.to(device)).float().cpu().numpy())
                    ok[rows] = True
                bar.update(len(rows) + len(failures))
        model.train(was_training)
    finally:
        torch.set_num_threads(previous_threads)
    dim = model.config.embedding_dim
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return Embeddings(embeddings=embeddings.astype(np.float32, copy=False), ok=ok, problems=problems)


class _CropDataset(Dataset[tuple[torch.Tensor | None, int, ImageReadError | None]]):
    """Item i: (image tensor, i) or (None, ImageReadError) when the image cannot be read."""

    def __init__(self, table: pd.DataFrame, config: EmbedderConfig) -> None:
        self.paths = table["image_path"].astype(str).tolist()
        self.boxes = table[list(BBOX_COLUMNS)].to_numpy(dtype=float)
        self.config = config
        self.transform = eval_transform(config.img_size, config.mean, config.std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, ImageReadError | None]:
        try:
            return self.transform(read_crop(self.paths[i], self.boxes[i], self.config)), i, None
        except ImageReadError as err:
            return None, i, err


def _collate_readable(
    items: list[tuple[torch.Tensor | None, int, ImageReadError | None]],
) -> tuple[torch.Tensor, np.ndarray, list[tuple[int, ImageReadError]]]:
    images = [image for image, _, _ in items if image is not None]
    rows = np.array([i for image, i, _ in items if image is not None], dtype=np.int64)
    failures = [(i, error) for image, i, error in items if image is None and error is not None]
    return (torch.stack(images) if images else torch.zeros(0)), rows, failures


def _weights_bytes(model: Embedder) -> bytes:
    # safetensors writes keys sorted and a fixed header, so equal weights give equal bytes.
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()})


def _timm_backbone(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ReidError(f"unknown backbone {name!r}; see timm.list_models() for names") from err
        raise
    except OSError as err:
        raise ReidError(
            f"cannot fetch {name!r} weights ({err}); offline, use pretrained=false or a local weights file"
        ) from err


def _architecture(backbone: nn.Module, name: str) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or name)


def _backbone_args(kwargs: Mapping[str, Any], parts: tuple[int, int] | None) -> dict[str, Any]:
    # Without global pooling a timm CNN returns its (B, C, h, w) feature map; weights are the same either way.
    return {**kwargs, "global_pool": ""} if parts is not None else dict(kwargs)


def _parts(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    cells = tuple(int(v) for v in value)
    if len(cells) != 2 or min(cells) < 1:
        raise ReidError(f"parts must be [rows, columns] of at least 1, or null, got {value!r}")
    return cells[0], cells[1]


def _feature_dim(backbone: nn.Module, *, pooled: bool = True) -> int:
    # timm's pooled output is head_hidden_size wide where a model has a pre-logits layer.
    size = getattr(backbone, "head_hidden_size", None) if pooled else None
    size = size or getattr(backbone, "num_features", None)
    if not isinstance(size, int):
        raise ReidError(f"{type(backbone).__name__} does not say its feature size; use a timm backbone")
    return size


def _classifier_names(backbone: nn.Module) -> set[str]:
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {*names, "fc", "head", "classifier", "head.fc"}


def _backbone_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the backbone's entries of a state dict that may be an embedder's, a training checkpoint's or wrapped."""
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _image_size(value: Any) -> int | tuple[int, int]:
    try:
        height, width = image_hw(value)
    except (TypeError, ValueError) as err:
        raise ReidError(f"img_size must be a positive number of px or [height, width], got {value!r}") from err
    return height if height == width else (height, width)


def _triple(values: Any) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ReidError(f"mean and std need 3 values (R, G, B), got {values}")
    return (values[0], values[1], values[2])


UNTRAINED = "untrained"
"""The `embedder=` value that asks for an untrained ResNet-18 on purpose (demos and smoke tests only)."""


def find_embedder(
    path: str | Path | None, train_runs: str | Path, scratch_dir: str | Path, *, fallback_untrained: bool = False
) -> Embedder:
    """Return the embedder at `path`, else the newest exported under `train_runs`.

    `path` = "untrained" gives an untrained ResNet-18 (exported into `scratch_dir`),
    whose matches are little better than chance: only for demos and smoke tests.
    Without a path and without a trained embedder this is refused, saying how to
    train one (a gallery built with an untrained network is useless), unless
    `fallback_untrained` (the demos) asks for the untrained one.
    """
    if path and str(path) != UNTRAINED:
        return load_embedder(path)
    if not path:
        exported = sorted(Path(train_runs).glob(f"*/embedder/{CONFIG_FILE}"), key=lambda p: p.stat().st_mtime)
        if not exported and not fallback_untrained:
            raise ReidError(
                f"no trained embedder under {train_runs}: run `python train.py` first, or set "
                f"embedder=/path/to/embedder (embedder={UNTRAINED} tries the pipeline with an untrained network)"
            )
        if exported:
            log.info("using the newest trained embedder: %s", exported[-1].parent)
            return load_embedder(exported[-1].parent)
    log.warning("embedder=%s: an UNTRAINED ResNet-18, whose matches are little better than chance", UNTRAINED)
    torch.manual_seed(0)
    folder = export_embedder(
        create_embedder("resnet18", 128, img_size=128, crop_margin=0.05), Path(scratch_dir) / "embedder"
    )
    return load_embedder(folder)
