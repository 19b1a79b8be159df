"""serve.log_inputs: keep a sample of the images the service receives, so they can become adapt.target.

Each kept image is one file named by its content's sha256 (the same image twice is one file), written to a hidden
temp name and renamed into place, so the folder never holds a half-written image, and readable by its owner and group
only. Which images are kept is decided by an HMAC of their content under a key of this service's (serve.log_sample of
them): a resent image is kept or skipped the same way every time, and a client that cannot know the key cannot craft
images that are always kept (with a plain hash, appending bytes until the hash falls in the kept share takes ~10
tries). The key is a file beside the folder, never inside it (the folder is copied into the pipeline's data). A DICOM
input is kept as its pixels (the 8-bit image the model saw), never with its header. The folder never grows past
serve.log_max_bytes: once full, nothing more is written and the service says so once in its log.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
import tempfile
import threading
from pathlib import Path

import numpy as np

from tlops.core.io import FILE_MODE

KEPT_MODE = FILE_MODE & 0o770  # the pipeline's group may read them; nobody else
FOLDER_MODE = 0o750

log = logging.getLogger("serving.input_log")

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


class InputLog:
    def __init__(self, folder: str | os.PathLike, sample: float, max_bytes: int) -> None:
        self.folder, self.sample, self.max_bytes = Path(folder).resolve(), sample, max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, FOLDER_MODE)
        self._key = _sampling_key(self.folder.parent / f".{self.folder.name}.sample-key")
        self.used = sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file() and not f.name.startswith("."))
        self.kept = 0
        self._full_said = False
        self._writing: set[Path] = set()  # two requests with the same image: one writes it
        self._lock = threading.Lock()

    def sampled(self, data: bytes) -> bool:
        """Whether content is in the kept share: decided by its HMAC under the service's key."""
        mac = hmac.new(self._key, data, hashlib.sha256).digest()
        return int.from_bytes(mac[:4], "big") < self.sample * 0x1_0000_0000

    def keep_file(self, data: bytes, text: bool = False) -> Path | None:
        """Keep an encoded image file (already decoded successfully by the caller), or a text as .txt, if sampled;
        its path or None. A DICOM file is kept as the PNG of its pixels."""
        if not self.sampled(data):
            return None
        if not text:
            from tlops.inputs import dicom, dicom_render

            if dicom.is_dicom(data):
                return self._keep_png(dicom_render.grey8(data))
        return self._write(hashlib.sha256(data).hexdigest(), data, "txt" if text else _extension(data))

    def keep_pixels(self, image: np.ndarray) -> Path | None:
        """Keep an HxWxC uint8 image (a v2 `image` tensor) as PNG if sampled (decided on its pixels)."""
        if not self.sampled(np.ascontiguousarray(image).tobytes()):
            return None
        return self._keep_png(image)

    def _keep_png(self, image: np.ndarray) -> Path | None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(buf, "PNG")
        data = buf.getvalue()
        return self._write(hashlib.sha256(data).hexdigest(), data, "png")

    def _write(self, digest: str, data: bytes, ext: str) -> Path | None:
        path = self.folder / f"{digest[:32]}.{ext}"
        with self._lock:
            if path.exists() or path in self._writing:
                return path
            if self.used + len(data) > self.max_bytes:
                if not self._full_said:
                    log.warning("serve.log_inputs holds %d bytes; serve.log_max_bytes=%d reached, keeping no more "
                                "inputs", self.used, self.max_bytes)
                    self._full_said = True
                return None
            self.used += len(data)
            self._writing.add(path)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, KEPT_MODE)  # readable by the pipeline that adapts to them, not by every user
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            with self._lock:
                self.used -= len(data)
                self._writing.discard(path)
            log.warning("serve.log_inputs: could not keep an input (%s)", e.strerror or type(e).__name__)
            return None
        with self._lock:
            self.kept += 1
            self._writing.discard(path)
        return path


def _sampling_key(path: Path) -> bytes:
    """This service's sampling key: read from `path`, or made and written there (owner-only) on first use."""
    try:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")  # mkstemp: mode 0600
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.replace(tmp, path)
    return key


def _extension(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return EXTENSIONS.get(img.format or "", (img.format or "img").lower())
    except Exception:  # noqa: BLE001 - the caller decoded it already; a name is all this is for
        return "img"
