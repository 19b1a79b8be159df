"""Manifest images -> batches of model inputs: evaluation preprocessing exactly, seeded training augmentation.

Augmentation draws from a generator seeded by (seed, epoch, image index), never from a global one, so a
batch is the same whatever the worker count, and a resumed run sees the very images it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tlops.config import AugmentParams, FinetuneParams
from tlops.preprocess import INTERPOLATIONS, PreprocessSpec, load_image, normalize, preprocess, resize_crop


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


@dataclass
class ImageDataset(Dataset):
    """(path, label) items -> (float32 CHW tensor, label); with `augment` set, seeded training views."""

    items: list[tuple[str, int]]
    spec: PreprocessSpec
    max_pixels: int
    augment: AugmentParams | None = None
    seed: int = 0
    epoch: int = 0

    def at_epoch(self, epoch: int) -> ImageDataset:
        return replace(self, epoch=epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        img = load_image(Path(path), self.max_pixels)
        if self.augment is None:
            x = preprocess(img, self.spec)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            x = normalize(np.asarray(augment(img, self.spec, self.augment, rng), dtype=np.uint8), self.spec)
        return torch.from_numpy(x), label


def train_dataset(items: list[tuple[str, int]], spec: PreprocessSpec, max_pixels: int,
                  ft: FinetuneParams) -> ImageDataset:
    return ImageDataset(items, spec, max_pixels, augment=ft.augment, seed=ft.seed)


def train_loader(ds: ImageDataset, ft: FinetuneParams, epoch: int, device: torch.device) -> DataLoader:
    """Shuffled by (seed, epoch); drops a ragged last batch (a batch of one breaks BatchNorm in train mode)."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(ft.seed + epoch)).tolist()
    return _loader(ds.at_epoch(epoch), order, ft, device, drop_last=len(ds) > ft.batch_size)


def eval_loader(ds: ImageDataset, ft: FinetuneParams, device: torch.device) -> DataLoader:
    return _loader(ds, range(len(ds)), ft, device, drop_last=False)


def _loader(ds: Dataset, order: Iterable[int], ft: FinetuneParams, device: torch.device, drop_last: bool) -> DataLoader:
    # An own generator keeps DataLoader from drawing its worker base seed from the global one.
    return DataLoader(ds, batch_size=ft.batch_size, sampler=list(order), drop_last=drop_last,
                      num_workers=ft.num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, generator=torch.Generator().manual_seed(ft.seed))
