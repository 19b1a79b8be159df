"""How values of more than 8 bits (16-bit PNG/TIFF, float TIFF, DICOM) become the 0..255 the backbone reads.

One rule for training, evaluation, export metadata (PreprocessSpec.intensity/window), the service and
`tlops predict`; numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INTENSITY_RULES = ("auto", "minmax", "percentile", "window")
PERCENTILES = (0.5, 99.5)
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass(frozen=True)
class Intensity:
    """The rule that maps values of more than 8 bits to 0..255 (8-bit images are never changed):

    auto: the stored bit range when it is known (DICOM BitsStored through its rescale), else as percentile;
    minmax: the image's own minimum..maximum; percentile: its 0.5th..99.5th percentile (a few hot or dead pixels
    do not set the scale); window: data.window [center, width], DICOM's linear VOI function. For DICOM, the header's
    VOI LUT or Window Center/Width come before the rule, and data.window before both.
    """

    rule: str = "auto"
    window: tuple[float, float] | None = None


def box_reduce(values: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) values -> float32 (H // factor, W // factor) block means: a large high-bit image shrinks before any
    full-size float copy of it exists (the edge rows and columns that do not fill a block are dropped)."""
    if factor < 2:
        return values
    h, w = (values.shape[0] // factor) * factor, (values.shape[1] // factor) * factor
    blocks = values[:h, :w].reshape(h // factor, factor, w // factor, factor)  # a view: no copy
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def window_to_8bit(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear window (PS3.3 C.11.2.1.2.1): center - width/2 .. center + width/2 -> 0..255."""
    v = np.array(values, np.float32)  # one float32 copy, changed in place below
    if width <= 1:
        return np.where(v < center - 0.5, 0, 255).astype(np.uint8)
    return _scaled(v, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)


def _scaled(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 values -> uint8, lo..hi onto 0..255, in place."""
    np.clip(v, lo, hi, out=v)
    v -= lo
    v *= 255.0 / (hi - lo)
    np.rint(v, out=v)
    return v.astype(np.uint8)


def to_8bit(values: np.ndarray, rule: str = "auto", window: tuple[float, float] | None = None,
            stored_range: tuple[float, float] | None = None) -> np.ndarray:
    """High-bit-depth values -> uint8 by `rule` (see Intensity); NaN counts as the low end. A flat image (nothing
    to stretch) keeps its level within its type's range (16 bits for integers, 0..1 for floats). Computed in float32
    on one copy of the values."""
    raw = np.asarray(values)
    if rule == "window":
        if window is None:
            raise ValueError("intensity rule 'window' needs data.window: [center, width]")
        return window_to_8bit(raw, *window)
    v = np.array(raw, np.float32)
    finite = v
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        np.nan_to_num(v, copy=False, nan=-np.inf)
        finite = v[np.isfinite(v)]
    if finite.size == 0:
        return np.zeros(v.shape, np.uint8)
    if rule == "auto" and stored_range is not None:
        lo, hi = stored_range
    elif rule == "minmax":
        lo, hi = float(finite.min()), float(finite.max())
    else:  # percentile, and auto without a known range
        lo, hi = (float(x) for x in np.percentile(finite, PERCENTILES))
    if hi <= lo:
        lo, hi = 0.0, (1.0 if raw.dtype.kind == "f" and hi <= 1.0 else 65535.0 if hi <= 65535 else hi)
    return _scaled(v, lo, hi)
