"""The embedder's contract, local weights files, export/load round trips and batch embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from reid.errors import ReidError
from reid.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    create_embedder,
    embed_images,
    export_embedder,
    find_embedder,
    load_embedder,
    model_fingerprint,
)

torch.set_num_threads(1)


def _tiny(**kwargs):
    torch.manual_seed(0)
    return create_embedder("test_convnext", 16, img_size=48, **kwargs)


@pytest.mark.parametrize("training", [True, False])
def test_embedder_returns_l2_normalised_b_by_d(training: bool) -> None:
    model = _tiny().train(training)
    out = model(torch.randn(3, 3, 48, 48))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_config_records_backbone_size_and_normalisation() -> None:
    config = create_embedder("resnet10t", 24, img_size=64, crop_margin=0.1).config
    assert config.backbone == "resnet10t" and config.embedding_dim == 24 and config.img_size == 64
    assert config.mean == pytest.approx((0.485, 0.456, 0.406)) and config.crop_margin == 0.1
    assert config.weights == "none"
    assert create_embedder("test_convnext", 8).config.img_size == 160  # the backbone's own input size


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads_into_the_backbone(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    source = timm.create_model("test_convnext", num_classes=10)  # with a classifier, as published weights are
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_embedder("test_convnext", 16, pretrained=str(path), img_size=48)
    loaded = model.backbone.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)
    assert model.config.weights.startswith(f"file:weights{suffix} sha256:")


def test_a_file_for_another_backbone_is_refused_with_the_keys(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}, path)
    with pytest.raises(ReidError, match="do not fit this backbone"):
        create_embedder("test_convnext", 16, pretrained=str(path))


def test_a_pickled_object_is_not_unpickled(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": object()}, path)
    with pytest.raises(ReidError, match="read safely"):
        create_embedder("test_convnext", 16, pretrained=str(path))


def test_missing_weights_file_names_the_fix(tmp_path) -> None:
    with pytest.raises(ReidError, match="weights file not found"):
        create_embedder("test_convnext", 16, pretrained=str(tmp_path / "nope.safetensors"))


def test_export_round_trip_is_bit_exact(tmp_path) -> None:
    model = create_embedder("resnet10t", 16, img_size=48).eval()  # batch-norm buffers included
    with torch.no_grad():
        model(torch.randn(4, 3, 48, 48))
    export_embedder(model, tmp_path / "embedder")
    loaded = load_embedder(tmp_path / "embedder")
    assert loaded.config == model.config and not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = torch.randn(5, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    meta = json.loads((tmp_path / "embedder" / CONFIG_FILE).read_text())
    assert meta["fingerprint"] == model_fingerprint(model) == model_fingerprint(loaded)


def test_altered_or_missing_export_files_are_refused(tmp_path) -> None:
    folder = export_embedder(_tiny(), tmp_path / "embedder")
    meta_path = folder / CONFIG_FILE
    meta = json.loads(meta_path.read_text())
    meta["config"]["embedding_dim"] = 17
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ReidError, match="fingerprint does not match"):
        load_embedder(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ReidError, match=f"{WEIGHTS_FILE} not found"):
        load_embedder(folder)
    with pytest.raises(ReidError, match="not found"):
        load_embedder(tmp_path / "elsewhere")


def test_embed_images_reports_unreadable_images_and_embeds_the_rest(flank_catalogue, tmp_path) -> None:
    table = flank_catalogue.head(6).copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    table.loc[2, "image_path"] = str(broken)
    table.loc[4, "image_path"] = str(tmp_path / "missing.jpg")
    model = _tiny()
    result = embed_images(model, table, batch_size=4, progress=False)
    assert result.ok.tolist() == [True, True, False, True, False, True]
    assert result.embeddings.shape == (4, 16) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, rtol=1e-5)
    # A table that does not say where its rows came from names the image alone.
    assert sorted(p.source for p in result.problems) == [str(broken), str(tmp_path / "missing.jpg")]
    # The same rows embedded alone give the same vectors: batches do not mix.
    alone = embed_images(model, table.iloc[[5]], progress=False).embeddings
    np.testing.assert_allclose(alone[0], result.embeddings[3], atol=1e-5)


def test_a_wide_input_size_round_trips_through_export(tmp_path) -> None:
    model = create_embedder("resnet10t", 8, img_size=[32, 96])
    assert model.config.img_size == (32, 96) and model.config.max_side_px == 192
    assert model(torch.randn(2, 3, 32, 96)).shape == (2, 8)
    loaded = load_embedder(export_embedder(model, tmp_path / "embedder"))
    assert loaded.config.img_size == (32, 96)
    with pytest.raises(ReidError, match="img_size"):
        create_embedder("resnet10t", 8, img_size=[32, 96, 3])


def test_part_pooling_keeps_a_grid_of_the_feature_map(tmp_path) -> None:
    model = create_embedder("resnet10t", 8, img_size=[64, 160], parts=[1, 3])
    assert model.config.parts == (1, 3)
    assert model.projection.in_features == 3 * 512
    x = torch.randn(2, 3, 64, 160)
    assert model(x).shape == (2, 8)
    loaded = load_embedder(export_embedder(model.eval(), tmp_path / "embedder"))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_without_a_trained_embedder_work_is_refused_unless_untrained_is_asked_for(tmp_path) -> None:
    runs = tmp_path / "outputs" / "train"
    with pytest.raises(ReidError, match=r"no trained embedder under .*run `python train.py` first.*embedder=untrained"):
        find_embedder(None, runs, tmp_path / "scratch")
    # Asked for by name, or by a demo: an untrained network, with a warning.
    assert find_embedder("untrained", runs, tmp_path / "a").embedding_dim == 128
    assert find_embedder(None, runs, tmp_path / "b", fallback_untrained=True).embedding_dim == 128
    # The newest exported run wins over any fallback.
    torch.manual_seed(3)
    trained = export_embedder(create_embedder("resnet18", 32, img_size=64), runs / "2026-01-01" / "embedder")
    found = find_embedder(None, runs, tmp_path / "c", fallback_untrained=True)
    assert model_fingerprint(found) == model_fingerprint(load_embedder(trained))
