"""Training views of an image: the working size, random resized crop and flips, seeded per image and view so that every
run (and the features stage's cached views) sees the same pixels. PIL and numpy only."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from PIL import Image

from tlops.core.config import AugmentParams, DataParams
from tlops.inputs.images import INTERPOLATIONS, PreprocessSpec, normalize, resize_crop
from tlops.inputs.text import TextSpec


def working_spec(spec: PreprocessSpec | TextSpec, augment: AugmentParams, data: DataParams | None = None
                 ) -> PreprocessSpec | TextSpec:
    """The spec with the working size training needs (the random crop of the smallest area must not upsample) and
    data's intensity rule for images of more than 8 bits; both travel with the model to the service. A text spec
    gets data.max_chars, the cut prepare made."""
    if isinstance(spec, TextSpec):
        return replace(spec, max_chars=data.max_chars) if data is not None else spec
    need = spec.resize_size
    if augment.random_resized_crop is not None:
        need = max(need, math.ceil(spec.input_size / math.sqrt(augment.random_resized_crop[0])))
    if data is None:
        return replace(spec, decode_size=need)
    return replace(spec, decode_size=need, intensity=data.intensity, window=data.window)


def view_of(epoch: int, views: int | None) -> int:
    """The augmented view that epoch `epoch` (0-based) trains on."""
    return epoch % views if views else epoch


def training_view(img: Image.Image, spec: PreprocessSpec, params: AugmentParams, seed: int, view: int,
                  sha256: str) -> np.ndarray:
    """Augmented view `view` of an image as a float32 CHW model input, drawn from (seed, view, content)."""
    rng = np.random.default_rng([seed, view, int(sha256[:16], 16)])
    return normalize(np.asarray(augment(img, spec, params, rng), dtype=np.uint8), spec)


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], interpolation: str,
                        rng: np.random.Generator) -> Image.Image:
    """A crop covering a random `scale` fraction of the area, aspect 3/4..4/3, resized to size x size.

    The crop box is in sub-pixel coordinates, so even an 8x8 image gets a smooth range of crops.
    """
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if cw <= w and ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            break
    else:  # no fitting crop in 10 draws (a very elongated image): the centred square
        cw = ch = min(w, h)
        left, top = (w - cw) / 2, (h - ch) / 2
    return img.resize((size, size), INTERPOLATIONS[interpolation], box=(left, top, left + cw, top + ch))


def augment(img: Image.Image, spec: PreprocessSpec, params: AugmentParams, rng: np.random.Generator) -> Image.Image:
    """Training view of an image: random resized crop (else the eval resize+crop), optional horizontal flip."""
    if params.random_resized_crop is not None:
        img = random_resized_crop(img, spec.input_size, params.random_resized_crop, spec.interpolation, rng)
    else:
        img = resize_crop(img, spec)
    if params.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img
