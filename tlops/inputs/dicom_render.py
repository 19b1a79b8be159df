"""DICOM pixels to the 8-bit image the backbone reads, by the header's own rules in the order the standard applies them
(PS3.3 C.11)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from tlops.inputs.dicom import DicomError, check_size, dimensions, pixels, read

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def to_grey8(ds: Dataset, arr: np.ndarray, rule: str, window: tuple[float, float] | None) -> np.ndarray:
    """Stored values -> uint8 by the Modality LUT, then the VOI (see the module docstring), MONOCHROME1 inverted;
    DicomError("corrupt") when a header value it needs is malformed (the value itself is never repeated)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _to_grey8(ds, arr, rule, window)
    except DicomError:
        raise
    except Exception as e:  # noqa: BLE001 - a text slope, an empty LUT sequence, ...: the file is broken
        raise DicomError("corrupt", f"a header value needed to map the pixels is malformed ({type(e).__name__})") \
            from None


def _to_grey8(ds: Dataset, arr: np.ndarray, rule: str, window: tuple[float, float] | None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from tlops.inputs.intensity import to_8bit, window_to_8bit

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return _colour8(ds, arr, photometric)
    values = np.asarray(apply_modality_lut(arr, ds), np.float32)
    if window is not None:
        out = window_to_8bit(values, *window)
    elif "VOILUTSequence" in ds:
        lut = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), np.float32)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
        out = np.clip(np.rint(lut * np.float32(255.0 / (2 ** bits - 1))), 0, 255).astype(np.uint8)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        out = window_to_8bit(values, center, max(width, 1.0)) if width > 0 else to_8bit(values, "minmax")
    else:
        out = to_8bit(values, rule, stored_range=_stored_range(ds) if rule == "auto" else None)
    return 255 - out if photometric == "MONOCHROME1" else out


def _colour8(ds: Dataset, arr: np.ndarray, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    from tlops.inputs.intensity import to_8bit

    if photometric == "PALETTE COLOR":  # pixel_array gives YBR as RGB already, palette indices as they are
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:  # noqa: BLE001 - a broken palette is a broken file
            raise DicomError("corrupt", f"its colour palette cannot be applied ({type(e).__name__})") from None
    if arr.dtype == np.uint8:
        return arr
    bits = int(getattr(ds, "BitsStored", 0) or 0)
    peak = float(2 ** bits - 1) if arr.dtype.kind == "u" and bits > 8 and "PALETTE" not in photometric else None
    return to_8bit(arr, "minmax" if peak is None else "auto", stored_range=(0.0, peak or 1.0))


def _first(value: object) -> float:
    """Window Center/Width may hold several values (several presets): the first is the default one."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _stored_range(ds: Dataset) -> tuple[float, float] | None:
    """The range the stored bits can hold, through the modality rescale: what `auto` maps to 0..255."""
    try:
        bits = int(ds.BitsStored)
    except (AttributeError, TypeError, ValueError):
        return None
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return ends[0], ends[1]


def grey8(data: bytes, rule: str = "auto", window: tuple[float, float] | None = None, frame: int | None = None,
          max_pixels: int | None = None, min_short: int = 0) -> np.ndarray:
    """A DICOM file's bytes -> uint8 (H, W) grey or (H, W, 3) colour; DicomError with a reason when it cannot.
    max_pixels is checked against the header (Rows x Columns, and the bytes its samples and bits take) before any
    pixel is decoded. min_short > 0: a grey image is box-reduced by the largest whole factor that keeps its shorter
    side >= min_short before its values become floats."""
    ds = read(data)
    rows, cols = dimensions(ds)
    if max_pixels is not None:
        check_size(ds, rows, cols, max_pixels)
    arr = pixels(ds, frame)
    factor = min(rows, cols) // min_short if min_short else 1
    if arr.ndim == 2 and factor >= 2:
        from tlops.inputs.intensity import box_reduce

        arr = box_reduce(arr, factor)
    return to_grey8(ds, arr, rule, window)
