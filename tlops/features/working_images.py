"""Working images, decoded once: every manifest image at its spec's working size (uint8 RGB), content-addressed.

The features stage writes them into features/images (shards of .npz members, one per image); fine-tuning and
evaluation read them there, so no stage decodes a full-size photo twice and no epoch decodes at all. An image
missing from the store (a fresh clone that pulled only DVC's cached outputs) is decoded the same way on the spot:
the store is a cache of `tlops.inputs.images.decode`, never a second definition of it.
"""

from __future__ import annotations

import logging
import os
import threading
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from tlops.core import paths
from tlops.core.errors import DataError
from tlops.core.io import atomic_path, sha256_bytes, sha256_json
from tlops.data.manifest import Manifest
from tlops.inputs.images import PreprocessSpec, decode

log = logging.getLogger(__name__)

DECODE_RULE = 2  # bump when tlops.inputs.images.decode changes what it returns: every stored image is then stale


class WorkingImages:
    """The working images of one spec; `get(path)` returns an image as tlops.inputs.images.decode would.

    With `writer` set (the features stage), an image decoded because the store lacked it is kept until `flush()`
    writes every such image as one new shard.
    """

    def __init__(self, root: Path, spec: PreprocessSpec, max_pixels: int, sha256: dict[str, str],
                 writer: bool = False) -> None:
        self.root, self.spec, self.max_pixels, self.sha256 = Path(root), spec, max_pixels, dict(sha256)
        self.writer = writer
        self._keys: dict[str, str] = {}
        self._index: dict[str, Path] | None = None
        self._open: dict[Path, np.lib.npyio.NpzFile] = {}
        self._new: dict[str, np.ndarray] = {}
        self._decoding: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()  # decoding threads share the open shards, whose zip reads are not thread-safe

    def __getstate__(self) -> dict:  # for DataLoader worker processes: they reopen the shards themselves
        return {k: v for k, v in self.__dict__.items() if k not in ("_index", "_open", "_lock", "_new", "_decoding")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _index=None, _open={}, _new={}, _decoding={}, _lock=threading.Lock())

    def key(self, path: str) -> str:
        """The content address of an image's working copy: its bytes, the working size, the decode rule."""
        if path not in self._keys:
            self._keys[path] = sha256_json({"image": self.sha256[path], "decode_size": self.spec.decode_size,
                                            "rule": DECODE_RULE, "intensity": self.spec.intensity,
                                            "window": self.spec.window})[:40]
        return self._keys[path]

    def index(self) -> dict[str, Path]:
        """key -> shard holding it, over every readable shard."""
        with self._lock:
            if self._index is None:
                index = {}
                for shard in sorted(self.root.glob("shard-*.npz")):
                    try:
                        with zipfile.ZipFile(shard) as z:
                            index.update({n.removesuffix(".npy"): shard for n in z.namelist()})
                    except (OSError, zipfile.BadZipFile) as e:  # a damaged shard costs a decode, not the stage
                        log.warning("working images: ignoring unreadable shard %s (%s)", shard, e)
                self._index = index
            return self._index

    def get(self, path: str) -> Image.Image:
        """The working image of a manifest path: from the store, else decoded now (same pixels)."""
        key = self.key(path)
        shard = self.index().get(key)
        if shard is not None:
            with self._lock:
                if shard not in self._open:
                    self._open[shard] = np.load(shard)
                array = self._open[shard][key]
            return Image.fromarray(array)
        with self._lock:
            once = self._decoding.setdefault(key, threading.Lock())
        with once:  # views of one image are prepared side by side: the first thread decodes, the others wait
            if (array := self._new.get(key)) is not None:
                return Image.fromarray(array)
            try:
                img = decode(path, self.spec, self.max_pixels)
            except FileNotFoundError as e:
                raise DataError(f"{e.filename} is in the manifest but not on disk; rerun the prepare stage") from None
            if self.writer:
                self._new[key] = np.asarray(img)
        return img

    def flush(self) -> int:
        """Write the images decoded since the last flush as one shard; returns how many."""
        with self._lock:
            new, self._new, self._decoding = self._new, {}, {}
        if not new:
            return 0
        keys = sorted(new)
        shard = self.root / f"shard-{sha256_bytes(chr(10).join(keys).encode())[:16]}.npz"
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(shard) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no .npz suffix
            np.savez(f, **{k: new[k] for k in keys})
        with self._lock:
            self._index = None
        return len(new)

    def ensure(self, paths: Sequence[str], workers: int | None = None) -> int:
        """Decode the images not in the store yet (`workers` threads; Pillow decodes without the GIL) and write them;
        returns how many were decoded."""
        missing = sorted({p for p in paths if self.key(p) not in self.index()})
        if missing:
            with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
                list(pool.map(self.get, missing))
        return self.flush()


def for_manifest(manifest: Manifest, spec: PreprocessSpec, max_pixels: int,
                 root: Path = paths.FEATURES_IMAGES, writer: bool = False) -> WorkingImages:
    """The working images of a manifest's rows for a spec, in the features stage's store."""
    return WorkingImages(root, spec, max_pixels, {r.path: r.sha256 for r in manifest.rows}, writer)
