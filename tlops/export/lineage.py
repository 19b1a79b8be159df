"""What an exported model carries about where it came from: labels, preprocessing, data version, commit, run, params
hash."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence

from tlops.core.config import Params, flatten
from tlops.core.io import atomic_path, sha256_json
from tlops.inputs.images import PreprocessSpec
from tlops.inputs.text import TextSpec
from tlops.onnx import metadata


def params_hash(params: Params) -> str:
    """sha256 of the flattened params: which configuration produced a model."""
    return sha256_json(flatten(params))


def build_metadata(classes: Sequence[str], spec: PreprocessSpec | TextSpec, backbone: str, data_version: str | None,
                   git_commit: str | None, run_id: str | None, params_sha: str, precision: str = "fp32",
                   created: str | None = None, selected: str = "finetuned", adapt_method: str = "none",
                   target_data_version: str | None = None) -> dict[str, str]:
    """The tlops.* metadata_props of an exported model (every value a string)."""
    created = created or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    text = {metadata.TOKENIZER: spec.tokenizer} if isinstance(spec, TextSpec) else {}
    return {
        metadata.LABELS: json.dumps(list(classes)),
        metadata.PREPROCESS: spec.to_json(),
        metadata.INPUT_SIZE: str(spec.input_size),
        metadata.BACKBONE: backbone,
        metadata.DATA_VERSION: data_version or "",
        metadata.GIT_COMMIT: git_commit or "",
        metadata.MLFLOW_RUN_ID: run_id or "",
        metadata.PARAMS_HASH: params_sha,
        metadata.CREATED: created,
        metadata.PRECISION: precision,
        metadata.INPUT_KIND: metadata.TEXT if text else metadata.IMAGE,
        metadata.SELECTED: selected,
        metadata.ADAPT_METHOD: adapt_method,
        metadata.TARGET_DATA_VERSION: target_data_version or "",
        **text,
    }


def write_metadata(path: str | os.PathLike, meta: dict[str, str]) -> None:
    """Replace the tlops.* metadata_props of the ONNX file at `path` (atomically), keeping other keys."""
    import onnx

    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(metadata.PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *meta.items()]:
        model.metadata_props.add(key=key, value=str(value))
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
