"""What an exported ONNX file carries and how to trust it: metadata keys, sha256 sidecar. Torch-free.

The export stage writes these; the ONNX Runtime service and the README snippet read them, so this module
imports onnx, tlops.core.io and tlops.inputs.images only (no torch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tlops.core.errors import ModelIntegrityError
from tlops.core.io import sha256_file, write_text
from tlops.inputs.images import PreprocessSpec
from tlops.inputs.text import TEXT, TextSpec

INPUT = "input"     # float32 NCHW, dynamic batch axis (text: int64 token ids (batch, sequence), padded with pad_id)
OUTPUT = "logits"   # float32 (batch, classes)
EMBEDDING = "embedding"  # float32 (batch, features): the pooled embedding the head reads (second output)
OOD_SCORE = "ood_score"  # float32 (batch,): how unlike the training data the input is; > tlops.ood's threshold: unknown
EXPLANATION = "explanation"  # float32 (batch, classes, h, w) per region, or (batch, classes, sequence) per token: each
                             # position's share of each logit (their sum + the head's bias / T is the logit)

PREFIX = "tlops."
LABELS = "tlops.labels"              # JSON list of class names, index = logit position
PREPROCESS = "tlops.preprocess"      # PreprocessSpec.to_json()
INPUT_SIZE = "tlops.input_size"
BACKBONE = "tlops.backbone"
DATA_VERSION = "tlops.data_version"
GIT_COMMIT = "tlops.git_commit"
MLFLOW_RUN_ID = "tlops.mlflow_run_id"
PARAMS_HASH = "tlops.params_hash"
CREATED = "tlops.created"
PRECISION = "tlops.precision"        # fp32 | int8
INPUT_KIND = "tlops.input_kind"      # image | text: what the model reads (another kind of model is never its rival)
TOKENIZER = "tlops.tokenizer"        # text: the tokenizer.json the input is tokenised with (tlops.text.TextSpec)
SELECTED = "tlops.selected"          # finetuned | head: which was better on validation, and so exported
ADAPT_METHOD = "tlops.adapt_method"  # none | adabn | self_training | mcc: the domain adaptation it carries
TARGET_DATA_VERSION = "tlops.target_data_version"  # DVC hash of data/target it was adapted to ("" when none)
DRIFT_REFERENCE = "tlops.drift_reference"  # JSON: the test split's output statistics (tlops.drift.reference)
TEMPERATURE = "tlops.temperature"    # the T the logits are divided by inside the graph (1.0: calibration kept none)
OOD = "tlops.ood"                    # JSON: {score, threshold, tpr, test_flagged, auroc}: when ood_score means unknown
EXPLAIN = "tlops.explanation"        # "image" | "text": what the explanation output holds; "" and why when it has none
KEYS = (LABELS, PREPROCESS, INPUT_SIZE, BACKBONE, DATA_VERSION, GIT_COMMIT, MLFLOW_RUN_ID, PARAMS_HASH, CREATED,
        PRECISION, INPUT_KIND, SELECTED, ADAPT_METHOD, TARGET_DATA_VERSION, DRIFT_REFERENCE, TEMPERATURE, OOD,
        EXPLAIN)  # every model's
TEXT_KEYS = (TOKENIZER,)  # a text model's, besides
IMAGE = "image"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """All metadata_props of an ONNX file as {key: value}, without loading external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def labels_of(meta: dict[str, str]) -> list[str]:
    """The class names stored in a model's metadata."""
    try:
        labels = json.loads(meta[LABELS])
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelIntegrityError(f"ONNX metadata {LABELS} is missing or not a JSON list ({e})") from None
    if not isinstance(labels, list) or not labels:
        raise ModelIntegrityError(f"ONNX metadata {LABELS} must be a non-empty JSON list, got {meta[LABELS]!r}")
    return [str(x) for x in labels]


def spec_of(meta: dict[str, str]) -> PreprocessSpec | TextSpec:
    """The preprocessing spec stored in a model's metadata (a text model's with its tokenizer)."""
    try:
        if input_kind_of(meta) == TEXT:
            return TextSpec.from_dict(json.loads(meta[PREPROCESS]), tokenizer=meta[TOKENIZER])
        return PreprocessSpec.from_json(meta[PREPROCESS])
    except (KeyError, ValueError, TypeError) as e:
        raise ModelIntegrityError(f"ONNX metadata {PREPROCESS} is missing or not a preprocessing spec ({e})") from None


def input_kind_of(meta: dict[str, str]) -> str:
    """What the model reads; models exported before the key existed read images."""
    return meta.get(INPUT_KIND) or IMAGE


def temperature_of(meta: dict[str, str]) -> float:
    """The calibration temperature built into the logits (1.0 for models exported before calibration)."""
    try:
        t = float(meta.get(TEMPERATURE) or 1.0)
    except ValueError:
        raise ModelIntegrityError(f"ONNX metadata {TEMPERATURE} is not a number: {meta[TEMPERATURE]!r}") from None
    if not t > 0:
        raise ModelIntegrityError(f"ONNX metadata {TEMPERATURE} must be > 0, got {t}")
    return t


def ood_of(meta: dict[str, str]) -> dict | None:
    """The OOD score's threshold and how it was set ({score, threshold, tpr, test_flagged, ...}); None when the model
    has no OOD fit (exported before it existed, or without one)."""
    if not meta.get(OOD):
        return None
    try:
        ood = json.loads(meta[OOD])
        float(ood["threshold"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelIntegrityError(f"ONNX metadata {OOD} is not an OOD threshold ({e})") from None
    return ood


def explanation_of(meta: dict[str, str]) -> str:
    """What the explanation output holds: "image" (maps), "text" (per token) or "" (the model has none)."""
    kind = meta.get(EXPLAIN, "")
    return kind if kind in ("image", "text") else ""


def task_of(meta: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """(input kind, labels): two models are rivals, and may be compared and swapped, only when these are equal."""
    return input_kind_of(meta), tuple(labels_of(meta))


def describe_task(task: tuple[str, tuple[str, ...]]) -> str:
    """A task in words, for logs and reasons: "image, 3 labels: cat, dog, eel"."""
    kind, labels = task
    shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
    return f"{kind}, {len(labels)} labels: {shown}"


def assert_self_contained(model: str | os.PathLike | bytes, name: str | None = None) -> None:
    """Raise ModelIntegrityError if any tensor of the model lives in an external data file: ONNX Runtime would read
    that file (relative to the working folder, for a model loaded from bytes), so a model is one file or nothing."""
    import onnx

    proto = (onnx.load_model_from_string(model) if isinstance(model, bytes)
             else onnx.load(str(model), load_external_data=False))
    external = [t.name for t in _tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ModelIntegrityError(
            f"{name or model}: {len(external)} tensors are stored as external data; the model must be one "
            "self-contained file")


def _tensors(proto: object) -> list:
    """Every TensorProto of a model: initializers, sparse initializers and node attributes, in every subgraph and
    function (onnx keeps its own walker private)."""
    found, graphs = [], [proto.graph]
    nodes = [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            found += list(g.initializer) + [s.values for s in g.sparse_initializer]
            nodes += list(g.node)
            continue
        for a in nodes.pop().attribute:
            found += ([a.t] if a.HasField("t") else []) + list(a.tensors)
            graphs += ([a.g] if a.HasField("g") else []) + list(a.graphs)
    return found


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """models/model.onnx -> models/model.onnx.sha256."""
    return Path(f"{onnx_path}.sha256")


def write_sha256(onnx_path: str | os.PathLike) -> str:
    """Hash the file and write `<hex>  <name>` (sha256sum format) beside it; return the hex digest."""
    digest = sha256_file(onnx_path)
    write_text(sidecar_path(onnx_path), f"{digest}  {Path(onnx_path).name}\n")
    return digest


def verify_sha256(onnx_path: str | os.PathLike, expected: str | None = None) -> str:
    """The file's sha256 if it matches `expected` (default: the sidecar's); else ModelIntegrityError."""
    if expected is None:
        sidecar = sidecar_path(onnx_path)
        try:
            expected = sidecar.read_text(encoding="utf-8").split()[0].lower()
        except (OSError, IndexError):
            raise ModelIntegrityError(f"{sidecar}: missing or empty; cannot verify {onnx_path}") from None
    actual = sha256_file(onnx_path)
    if actual != expected:
        raise ModelIntegrityError(f"{onnx_path}: sha256 is {actual}, expected {expected} (file changed or corrupt)")
    return actual
