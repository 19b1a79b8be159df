"""Image files to model inputs: decoding (formats, EXIF, high bit depth, DICOM), resize, crop, normalise. Torch-free:
training, export parity and the service share it."""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlops.core.errors import DataError
from tlops.inputs.intensity import HIGH_BIT_MODES, INTENSITY_RULES, Intensity, box_reduce, to_8bit

EXIF_ORIENTATION = 0x0112

# The formats an image may come in (DICOM besides, by its own reader): Pillow opens nothing else, so a file that
# names another format (EPS, which would start Ghostscript; PSD, ICO, ...) is not_an_image (phone MPOs open as JPEG).
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
FORMAT_NAMES = "PNG, JPEG, WebP, BMP, TIFF, GIF or DICOM"
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(DataError):
    """An image that cannot be used; `reason` is a short stable code for reports and HTTP errors."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input: decode at working size, resize shorter side, centre crop, normalise.

    decode_size > 0: the image is decoded at the smallest reduced scale whose shorter side is still at least
    decode_size (JPEG: DCT scaling, Pillow's draft; other formats: Image.reduce by a whole factor), then resized
    exactly as below. A phone photo then costs a fraction of its full decode, and every consumer (training,
    evaluation, export parity, the service, the README snippet) starts from the same pixels. 0: full decode.
    """

    input_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0
    layout: str = "NCHW"
    color: str = "RGB"
    decode_size: int = 0
    intensity: str = "auto"  # how images of more than 8 bits (16-bit PNG/TIFF, float TIFF, DICOM) become 8-bit
    window: tuple[float, float] | None = None  # [center, width]: overrides DICOM headers; the `window` rule's

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if self.intensity not in INTENSITY_RULES:
            raise ValueError(f"intensity {self.intensity!r} is not one of {INTENSITY_RULES}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if self.window is not None:
            object.__setattr__(self, "window", (float(self.window[0]), float(self.window[1])))

    @property
    def rule(self) -> Intensity:
        return Intensity(self.intensity, self.window)

    @property
    def resize_size(self) -> int:
        return int(round(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["window"] = list(self.window) if self.window is not None else None
        d["resize_size"] = self.resize_size
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def identity(self) -> dict:
        """What makes its inputs what they are (cache keys): the whole spec."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "layout", "color", "decode_size",
                "intensity", "window")
        return cls(**{k: d[k] for k in keys if k in d})  # keys a model predates take their defaults

    @classmethod
    def from_json(cls, s: str) -> PreprocessSpec:
        return cls.from_dict(json.loads(s))


def load_image(source: str | os.PathLike | bytes, max_pixels: int, min_short: int = 0,
               intensity: Intensity = Intensity()) -> Image.Image:
    """Decode an image completely and return it as 8-bit RGB, EXIF orientation applied.

    min_short > 0: decode at the smallest reduced scale whose shorter side is still >= min_short (JPEG: DCT scaling;
    others: a whole-factor box reduction after decoding). Every byte is still read, so a truncated or corrupt file
    fails either way. Images of more than 8 bits become 8-bit by `intensity`; DICOM files (tlops.inputs.dicom) by their
    header's rules first. Raises ImageError with reason empty_file, not_an_image, too_many_pixels, truncated,
    corrupt, or for DICOM no_pixels and unsupported_compression.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
    else:
        name = str(source)
        data = Path(source).read_bytes()
    if not data:
        raise ImageError("empty_file", f"{name} is zero bytes")
    from tlops.inputs import dicom

    if dicom.is_dicom(data, name):
        return _load_dicom(data, name, max_pixels, min_short, intensity)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("too_many_pixels", f"{name} declares {w}x{h} pixels, over the limit of {max_pixels}")
            if min_short and img.format in ("JPEG", "MPO") and min(w, h) >= 2 * min_short:
                scale = min_short / min(w, h)
                img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))  # DCT scaling: 1/2, 1/4 or 1/8
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"{name} is not a readable image ({FORMAT_NAMES})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
        raise ImageError(reason, f"{name}: {e}") from None
    try:
        turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn: width and height swap
        rgb = to_rgb(img, intensity, min_short)
    except (OSError, ValueError) as e:
        raise ImageError("corrupt", f"{name}: cannot convert mode {img.mode} to RGB ({e})") from None
    rgb.info["decoded_from"] = (h, w) if turned else (w, h)  # the full size, oriented as the result is
    return rgb


def declared_pixels(data: bytes) -> int:
    """How many pixels an encoded image (or a DICOM file's samples) will decode to, read from its header only; raises
    ImageError as load_image would for a file that is empty, of another format or unreadable."""
    from tlops.inputs import dicom

    if not data:
        raise ImageError("empty_file", "<bytes> is zero bytes")
    if dicom.is_dicom(data):
        try:
            return dicom.declared_pixels(data)
        except dicom.DicomError as e:
            raise ImageError(e.reason, e.detail) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:  # reads the header only
                w, h = img.size
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"not a readable image ({FORMAT_NAMES})") from None
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("corrupt", f"unreadable image header ({type(e).__name__})") from None
    return w * h


def _load_dicom(data: bytes, name: str, max_pixels: int, min_short: int, intensity: Intensity) -> Image.Image:
    from tlops.inputs import dicom, dicom_render

    try:
        rows, cols = dicom.dimensions(dicom.read(data, stop_before_pixels=True))
        arr = dicom_render.grey8(data, intensity.rule, intensity.window, max_pixels=max_pixels, min_short=min_short)
    except dicom.DicomError as e:
        raise ImageError(e.reason, f"{name}: {e.detail}") from None
    img = Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
    rgb = reduce_to(img.convert("RGB"), min_short)
    rgb.info["decoded_from"] = (cols, rows)
    return rgb


def reduce_to(img: Image.Image, min_short: int) -> Image.Image:
    """Box-reduce by the largest whole factor that keeps the shorter side >= min_short (0: unchanged)."""
    factor = min(img.size) // min_short if min_short else 1
    return img.reduce(factor) if factor >= 2 else img


def decode(source: str | os.PathLike | bytes, spec: PreprocessSpec, max_pixels: int) -> Image.Image:
    """The working image of `source` for `spec`: decoded at the spec's working size, RGB, oriented."""
    return load_image(source, max_pixels, spec.decode_size, spec.rule)


def to_rgb(img: Image.Image, intensity: Intensity = Intensity(), min_short: int = 0) -> Image.Image:
    """EXIF-orient and convert any mode (CMYK, L, RGBA, P, ...) to 8-bit RGB; more than 8 bits (16-bit, 32-bit
    integer or float grey) by the intensity rule. min_short > 0: box-reduced as reduce_to says, before the copies
    that conversion makes (high-bit values before they become floats, grey before it becomes three channels)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_BIT_MODES:
        values = box_reduce(np.asarray(img), min(img.size) // min_short if min_short else 1)
        img = Image.fromarray(to_8bit(values, intensity.rule, intensity.window), mode="L")
    if img.mode in ("L", "RGB"):
        img = reduce_to(img, min_short)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return reduce_to(img.convert("RGB") if img.mode != "RGB" else img, min_short)


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to spec.resize_size, then centre-crop spec.input_size square."""
    w, h = img.size
    short = spec.resize_size
    scale = short / min(w, h)
    nw, nh = max(short, int(round(w * scale))), max(short, int(round(h * scale)))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), INTERPOLATIONS[spec.interpolation])
    s = spec.input_size
    left, top = (nw - s) // 2, (nh - s) // 2
    return img.crop((left, top, left + s, top + s))


def normalize(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HxWx3 uint8 (or NxHxWx3) -> float32 CHW (or NCHW) scaled to [0,1] and normalised."""
    x = rgb.astype(np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An RGB PIL image -> float32 array (3, input_size, input_size), ready for the model."""
    return normalize(np.asarray(resize_crop(img, spec), dtype=np.uint8), spec)


def preprocess_uint8(arr: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """An HxWx3 (or HxW) uint8 array -> float32 (3, S, S): the path for raw image tensors."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HxWxC uint8 image with C in 1, 3, 4; got shape {tuple(arr.shape)}")
    img = to_rgb(Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr), min_short=spec.decode_size)
    return preprocess(img, spec)
