"""Manifest images -> batches of model inputs: evaluation preprocessing exactly, seeded training augmentation.

A training view is a function of (seed, view, image content) alone: its generator is seeded by them, never drawn
from a global one. So a batch is the same whatever the worker count, a resumed run sees the very images it would
have seen, a view stays the same as the dataset grows, and the trunk cache (tlops/trunk.py) can compute it ahead.
Epoch e shows view e (finetune.views null) or view e mod finetune.views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tlops.config import AugmentParams, DataParams, FinetuneParams
from tlops.distributed import World
from tlops.images import WorkingImages
from tlops.preprocess import INTERPOLATIONS, PreprocessSpec, normalize, preprocess, resize_crop
from tlops.text import TextSpec, load_text, pad_ids


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


@dataclass
class ImageDataset(Dataset):
    """(path, label) items -> (float32 CHW tensor, label); with `augment` set, seeded training view `view`."""

    items: list[tuple[str, int]]
    images: WorkingImages
    augment: AugmentParams | None = None
    seed: int = 0
    view: int = 0

    def at_view(self, view: int) -> ImageDataset:
        return replace(self, view=view)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        img, spec = self.images.get(path), self.images.spec
        if self.augment is None:
            x = preprocess(img, spec)
        else:
            x = training_view(img, spec, self.augment, self.seed, self.view, self.images.sha256[path])
        return torch.from_numpy(x), label


@dataclass
class TextDataset(Dataset):
    """(path, label) items -> (int64 token ids, label); batches pad to their longest text (`collate`). Texts have no
    augmented views: every view is the text itself."""

    items: list[tuple[str, int]]
    ids: dict[str, np.ndarray]  # path -> token ids (TextSpec.encode)
    pad_id: int = 0

    def at_view(self, view: int) -> TextDataset:
        return self

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return torch.from_numpy(self.ids[path]), label

    def collate(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = pad_ids([ids.numpy() for ids, _ in batch], self.pad_id)
        return torch.from_numpy(x), torch.tensor([y for _, y in batch])


def text_dataset(items: list[tuple[str, int]], spec: TextSpec) -> TextDataset:
    """The texts of `items` tokenised once, as every consumer tokenises them (tlops.text)."""
    ids = spec.encode([load_text(p, spec.max_chars) for p, _ in items])
    return TextDataset(items, {p: x for (p, _), x in zip(items, ids, strict=True)}, spec.pad_id)


def train_dataset(items: list[tuple[str, int]], images: WorkingImages, ft: FinetuneParams) -> ImageDataset:
    return ImageDataset(items, images, augment=ft.augment, seed=ft.seed)


def epoch_order(n: int, ft: FinetuneParams, epoch: int) -> list[int]:
    """The order of the training images in an epoch: shuffled by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(ft.seed + epoch)).tolist()


def batches_of(order: list[int], batch_size: int) -> list[list[int]]:
    """The training batches of an epoch; a ragged last batch is dropped when there is more than one (a batch of
    one breaks BatchNorm in train mode)."""
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return out[:-1] if len(out) > 1 and len(out[-1]) < batch_size else out


def train_loader(ds: ImageDataset | TextDataset, ft: FinetuneParams, epoch: int, device: torch.device,
                 world: World | None = None) -> DataLoader:
    """The epoch's batches (epoch_order, batches_of) of view view_of(epoch); with several processes, this rank's
    slice of each global batch of processes x batch_size (tlops.distributed)."""
    size = world.size if world else 1
    batches = batches_of(epoch_order(len(ds), ft, epoch), ft.batch_size * size)
    if size > 1:
        batches = [world.slice(b) for b in batches]
    return DataLoader(ds.at_view(view_of(epoch, ft.views)), batch_sampler=batches, collate_fn=_collate(ds),
                      **_loading(ft, device))


def eval_loader(ds: ImageDataset | TextDataset, ft: FinetuneParams, device: torch.device) -> DataLoader:
    return DataLoader(ds, batch_size=ft.batch_size, shuffle=False, collate_fn=_collate(ds), **_loading(ft, device))


def _collate(ds: ImageDataset | TextDataset):  # noqa: ANN202 - DataLoader's collate_fn
    return ds.collate if isinstance(ds, TextDataset) else None


def _loading(ft: FinetuneParams, device: torch.device) -> dict:
    # An own generator keeps DataLoader from drawing its worker base seed from the global one.
    return {"num_workers": ft.num_workers, "pin_memory": device.type == "cuda", "persistent_workers": False,
            "generator": torch.Generator().manual_seed(ft.seed)}
