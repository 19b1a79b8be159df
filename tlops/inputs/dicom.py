"""DICOM files by their header, with pydicom: reading, frames, the stored pixels, sizes, patient grouping keys, single-
frame copies. No tag value ever leaves this module except as a sha256 (patient_key): errors name the problem, never
the header."""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

PREAMBLE = 128  # bytes before the "DICM" magic of a Part 10 file


class DicomError(Exception):
    """A DICOM file that cannot become an image: reason (a stable code) and a detail with no header values."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def is_dicom(data: bytes, name: str = "") -> bool:
    """A Part 10 file (the DICM magic after the preamble), or a .dcm file (some writers omit the preamble)."""
    return data[PREAMBLE:PREAMBLE + 4] == b"DICM" or name.lower().endswith(".dcm")


def _quiet() -> None:
    """pydicom reports odd values by warning and logging them, and a value can be a patient's name: keep it quiet."""
    import logging

    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def read(data: bytes, stop_before_pixels: bool = False) -> Dataset:
    """The dataset of a DICOM file's bytes; DicomError when it is not readable as DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _quiet()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise DicomError("not_an_image", "not a readable DICOM file") from None
    except (EOFError, OSError) as e:
        raise DicomError("truncated", f"the DICOM file ends early ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on hostile files; the message may hold values
        raise DicomError("corrupt", f"not a readable DICOM file ({type(e).__name__})") from None


def frames(ds: Dataset) -> int:
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def pixels(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """The stored pixel array of one frame (default: the middle one): (H, W) grey or (H, W, 3) colour."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("no_pixels", "the DICOM file has no pixel data (a report, plan or other non-image object)")
    n = frames(ds)
    index = n // 2 if frame is None else frame
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array if n == 1 else _frame(ds, index)
    except NotImplementedError:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown")
        raise DicomError("unsupported_compression", f"no decoder for transfer syntax {name} (install "
                                                    "pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)") from None
    except (ValueError, EOFError, IndexError) as e:
        text = str(e).lower()
        if "less than expected" in text or "truncat" in text or "end of" in text:
            raise DicomError("truncated", "the pixel data is shorter than Rows x Columns x frames needs") from None
        raise DicomError("corrupt", f"pixel data cannot be decoded ({type(e).__name__})") from None
    except RuntimeError:  # pydicom: every installed decoder plugin refused the compressed stream
        raise DicomError("undecodable", "no installed decoder could decode the compressed pixel data") from None
    except Exception as e:  # noqa: BLE001 - decoder plugins raise their own types
        raise DicomError("corrupt", f"pixel data cannot be decoded ({type(e).__name__})") from None
    return arr


def _frame(ds: Dataset, index: int) -> np.ndarray:
    """One frame of a multi-frame dataset (pydicom decodes only that frame)."""
    from pydicom.pixels import pixel_array

    return pixel_array(ds, index=index)


def dimensions(ds: Dataset) -> tuple[int, int]:
    """(Rows, Columns) of the header; DicomError("corrupt") when either is not a whole number (never repeating it)."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except Exception:  # noqa: BLE001 - a text VR, a multi-value, a broken element: the header is malformed
        raise DicomError("corrupt", "Rows or Columns in the header is not a whole number") from None
    if rows < 0 or cols < 0:
        raise DicomError("corrupt", "Rows or Columns in the header is negative")
    return rows, cols


def check_size(ds: Dataset, rows: int, cols: int, max_pixels: int) -> None:
    """DicomError("too_many_pixels") when one frame holds more than max_pixels pixels, or more bytes than an 8-bit
    RGBA image of max_pixels (samples per pixel and bits allocated counted)."""
    try:
        samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
        bits = max(1, int(ds.get("BitsAllocated", 16) or 16))
    except Exception:  # noqa: BLE001 - as in dimensions()
        raise DicomError("corrupt", "SamplesPerPixel or BitsAllocated in the header is not a whole number") from None
    size = rows * cols * samples * -(-bits // 8)
    if rows * cols > max_pixels or size > 4 * max_pixels:
        raise DicomError("too_many_pixels", f"declares {cols}x{rows} pixels of {samples} samples x {bits} bits, "
                                            f"over the limit of {max_pixels} pixels")


def declared_pixels(data: bytes) -> int:
    """Rows x Columns x samples per pixel of a DICOM file, from its header only (no pixel decoded)."""
    ds = read(data, stop_before_pixels=True)
    rows, cols = dimensions(ds)
    try:
        samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
    except Exception:  # noqa: BLE001 - as in dimensions()
        raise DicomError("corrupt", "SamplesPerPixel in the header is not a whole number") from None
    return rows * cols * samples


def patient_key(data: bytes) -> str | None:
    """sha256 of the PatientID (else the StudyInstanceUID) of a DICOM file; None when it has neither.

    Only the hash leaves this function: it groups a patient's images into one split without recording who.
    """
    try:
        ds = read(data, stop_before_pixels=True)
    except DicomError:
        return None
    for tag in ("PatientID", "StudyInstanceUID"):
        value = str(getattr(ds, tag, "") or "").strip()
        if value:
            return hashlib.sha256(f"{tag}:{value}".encode()).hexdigest()
    return None


def split_frames(data: bytes, max_pixels: int = 40_000_000) -> list[bytes]:
    """A multi-frame DICOM file as one single-frame file per frame (uncompressed, explicit VR little endian); a
    single-frame, unreadable or oversized file unchanged (validation decides about it later)."""
    from pydicom.uid import ExplicitVRLittleEndian

    try:
        ds = read(data)
        n = frames(ds)
        if n <= 1 or "PixelData" not in ds or int(ds.Rows) * int(ds.Columns) * n > max_pixels:
            return [data]
        whole = ds.pixel_array  # (frames, H, W[, 3]); YBR decoded to RGB
    except Exception:  # noqa: BLE001 - left whole: prepare decodes it and quarantines it with its reason
        return [data]
    out = []
    for k in range(n):
        single = ds.copy()
        frame = np.ascontiguousarray(whole[k])
        single.NumberOfFrames = 1
        if frame.ndim == 3:
            single.PhotometricInterpretation, single.PlanarConfiguration = "RGB", 0
        single.PixelData = frame.tobytes()
        single.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buf = io.BytesIO()
        single.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def encode(pixels: np.ndarray, bits_stored: int = 12, photometric: str = "MONOCHROME2", slope: float = 1.0,
           intercept: float = 0.0, window: tuple[float, float] | None = None, frames: int = 1,
           uid_seed: str | None = None, **tags: str) -> bytes:
    """A minimal uncompressed Secondary Capture DICOM file of unsigned grey `pixels` ((H, W), or (frames, H, W)),
    with the given rescale, window and tags (PatientName=..., PatientID=...): for tests and worked examples.
    uid_seed: the SOP Instance UID derived from it (the same bytes every time), else a random one."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.asarray(pixels, np.uint16)
    meta = FileMetaDataset()
    uid = generate_uid(entropy_srcs=[uid_seed]) if uid_seed is not None else generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = arr.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
