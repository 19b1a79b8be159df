"""Either modality's file to its model input, by the spec the model records: an image spec's pixels or a text spec's
token ids."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from tlops.inputs.images import PreprocessSpec, decode, preprocess
from tlops.inputs.text import TextSpec, load_text, text_batches


def spec_from_dict(d: dict) -> PreprocessSpec | TextSpec:
    """The spec model.json records: an image's, or a text's (kind "text", with its tokenizer)."""
    return TextSpec.from_dict(d) if d.get("kind") == "text" else PreprocessSpec.from_dict(d)


def load_and_preprocess(source: str | os.PathLike | bytes, spec: PreprocessSpec | TextSpec,
                        max_pixels: int) -> np.ndarray:
    """Bytes or a file -> the model input, through the spec's working image (a text file: its token ids)."""
    if isinstance(spec, TextSpec):
        return spec.ids(load_text(source, spec.max_chars))
    return preprocess(decode(source, spec, max_pixels), spec)


def preprocess_batches(images: Sequence[str | os.PathLike], spec: PreprocessSpec | TextSpec, max_pixels: int,
                       batch: int = 64, load: Callable[[str], Image.Image] | None = None) -> Iterator[np.ndarray]:
    """Preprocessed float32 NCHW batches of the given image files, in order; `load` gives a file's working image
    (default: decode it; tlops.features.working_images.WorkingImages.get reads the decoded copy instead). Text files
    under a text spec: int64 token batches, each padded to its longest text."""
    if isinstance(spec, TextSpec):
        yield from text_batches(images, spec, batch)
        return
    load = load or (lambda p: decode(p, spec, max_pixels))
    for start in range(0, len(images), batch):
        yield np.stack([preprocess(load(str(p)), spec) for p in images[start : start + batch]])
