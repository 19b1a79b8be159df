"""Manifest images -> batches of model inputs: evaluation preprocessing exactly, seeded training augmentation.

A training view is a function of (seed, view, image content) alone: its generator is seeded by them, never drawn
from a global one. So a batch is the same whatever the worker count, a resumed run sees the very images it would
have seen, a view stays the same as the dataset grows, and the trunk cache (tlops/trunk.py) can compute it ahead.
Epoch e shows view e (finetune.views null) or view e mod finetune.views."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tlops.core.config import AugmentParams, FinetuneParams
from tlops.features.working_images import WorkingImages
from tlops.inputs.images import preprocess
from tlops.inputs.text import TextSpec, load_text, pad_ids
from tlops.training.augment import training_view, view_of
from tlops.training.distributed import World


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
    """The texts of `items` tokenised once, as every consumer tokenises them (tlops.inputs.text)."""
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
    slice of each global batch of processes x batch_size (tlops.training.distributed)."""
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
