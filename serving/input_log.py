"""serve.log_inputs: keep a sample of the images the service receives, so they can become adapt.target.

Each kept image is one file named by its content's sha256 (the same image twice is one file), written to a hidden
temp name and renamed into place, so the folder never holds a half-written image. Which images are kept is decided by
their hash (serve.log_sample of them), so a resent image is kept or skipped the same way every time. The folder never
grows past serve.log_max_bytes: once full, nothing more is written and the service says so once in its log.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from tlops.io import FILE_MODE

log = logging.getLogger("serving.input_log")

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


class InputLog:
    def __init__(self, folder: str | os.PathLike, sample: float, max_bytes: int) -> None:
        self.folder, self.sample, self.max_bytes = Path(folder).resolve(), sample, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.used = sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file() and not f.name.startswith("."))
        self.kept = 0
        self._full_said = False
        self._writing: set[Path] = set()  # two requests with the same image: one writes it
        self._lock = threading.Lock()

    def sampled(self, digest: str) -> bool:
        return int(digest[:8], 16) < self.sample * 0x1_0000_0000

    def keep_file(self, data: bytes, text: bool = False) -> Path | None:
        """Keep an encoded image file (already decoded successfully by the caller), or a text as .txt, if sampled;
        its path or None."""
        digest = hashlib.sha256(data).hexdigest()
        if not self.sampled(digest):
            return None
        return self._write(digest, data, "txt" if text else _extension(data))

    def keep_pixels(self, image: np.ndarray) -> Path | None:
        """Keep an HxWxC uint8 image (a v2 `image` tensor) as PNG if sampled (decided on the pixels' hash)."""
        if not self.sampled(hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()):
            return None
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG")
        data = buf.getvalue()
        return self._write(hashlib.sha256(data).hexdigest(), data, "png")

    def _write(self, digest: str, data: bytes, ext: str) -> Path | None:
        path = self.folder / f"{digest[:32]}.{ext}"
        with self._lock:
            if path.exists() or path in self._writing:
                return path
            if self.used + len(data) > self.max_bytes:
                if not self._full_said:
                    log.warning("serve.log_inputs %s holds %d bytes; serve.log_max_bytes=%d reached, keeping no more "
                                "inputs", self.folder, self.used, self.max_bytes)
                    self._full_said = True
                return None
            self.used += len(data)
            self._writing.add(path)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, FILE_MODE)  # readable by the pipeline that adapts to them, as a plain write would be
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            with self._lock:
                self.used -= len(data)
                self._writing.discard(path)
            log.warning("could not keep an input in %s: %s", self.folder, e)
            return None
        with self._lock:
            self.kept += 1
            self._writing.discard(path)
        return path


def _extension(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return EXTENSIONS.get(img.format or "", (img.format or "img").lower())
    except Exception:  # noqa: BLE001 - the caller decoded it already; a name is all this is for
        return "img"
