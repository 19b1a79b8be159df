"""A request's samples as the model's input: v2 tensors, encoded image files, texts. Every cost is checked before it
is paid: samples and pixels from shapes and image headers before anything is decoded, the deadline between images.

Decoding is tlops.inputs.images's and tlops.inputs.text's, the very code training used, so the service sees what the
model was
trained on. Every problem raises ApiError naming the input and what would be right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.limits import Deadline
from serving.protocol import (
    BYTES,
    CHANNELS,
    FILE_INPUT,
    IMAGE_INPUT,
    MAX_SAMPLES,
    TENSOR_INPUT,
    TEXT_INPUT,
    ApiError,
    InferRequest,
    Tensor,
    check_output_names,
    shown,
)
from serving.served_model import LoadedModel
from tlops.inputs.images import ImageError, PreprocessSpec, declared_pixels, preprocess_uint8
from tlops.inputs.model_input import load_and_preprocess
from tlops.inputs.text import TextError, TextSpec

INTEGER_TYPES = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")


@dataclass(frozen=True)
class Limits:
    """What one request may hold (serve.*): pixels per image and in all, characters per text."""

    max_pixels: int
    max_request_pixels: int
    max_text_chars: int


def decode_request(req: InferRequest, model: LoadedModel, limits: Limits, deadline: Deadline) -> np.ndarray:
    """The request's samples as the model's input, every input tensor's batch in order: float32 (N, 3, S, S) for an
    image model, int64 token ids (N, L) padded to the longest text for a text model."""
    check_output_names(req, model)
    check_samples(req.declared_samples())
    if model.is_text:
        parts = [_text_samples(t, model, limits, deadline) for t in req.inputs]
    else:
        pixels = sum(_declared_pixels(t) for t in req.inputs)
        if pixels > limits.max_request_pixels:
            raise _too_many_pixels(pixels, limits)
        parts = [_samples(t, model, limits, deadline) for t in req.inputs]
    return parts[0] if len(parts) == 1 else model.join(parts)


def check_samples(n: int) -> None:
    if n > MAX_SAMPLES:  # before decoding: each sample becomes a 3 x S x S float input, however small it came
        raise ApiError(400, f"the request holds {n} samples; at most {MAX_SAMPLES} per request",
                       reason="too_many_samples")


def _too_many_pixels(pixels: int, limits: Limits) -> ApiError:
    return ApiError(413, f"the request's images hold {pixels} pixels together, over serve.max_request_pixels = "
                         f"{limits.max_request_pixels}; send fewer or smaller images per request",
                    reason="too_many_pixels")


def _declared_pixels(t: Tensor) -> int:
    """Pixels an `image` tensor declares (its files are counted from their headers in decode_files)."""
    if t.name != IMAGE_INPUT or len(t.shape) not in (3, 4):
        return 0
    shape = [1, *t.shape] if len(t.shape) == 3 else t.shape
    return shape[0] * shape[1] * shape[2]


def _samples(t: Tensor, model: LoadedModel, limits: Limits, deadline: Deadline) -> np.ndarray:
    if t.name == TENSOR_INPUT:
        return _fp32_tensor(t, model)
    if t.name == IMAGE_INPUT:
        return _pixel_images(t, model, limits, deadline)
    if t.name == FILE_INPUT:
        return _image_files(t, model, limits, deadline)
    raise ApiError(400, f"unknown input {shown(t.name)}; send '{TENSOR_INPUT}' (FP32 {model.input_shape}), "
                        f"'{IMAGE_INPUT}' (UINT8 [N,H,W,C] or [H,W,C]) or '{FILE_INPUT}' (BYTES [N] of image files)")


def _text_samples(t: Tensor, model: LoadedModel, limits: Limits, deadline: Deadline) -> np.ndarray:
    if t.name == TEXT_INPUT:
        if t.datatype != BYTES:
            raise ApiError(400, f"input '{TEXT_INPUT}' must have datatype BYTES (UTF-8 texts), got {shown(t.datatype)}")
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1) or t.shape[0] < 1:
            raise ApiError(400, f"input '{TEXT_INPUT}' has shape {t.shape}; expected [N] or [N, 1], one text each")
        return decode_texts([(f"input '{TEXT_INPUT}' element {i}", bytes(data))
                             for i, data in enumerate(t.data.ravel())], model.spec, limits.max_text_chars, deadline)
    if t.name == TENSOR_INPUT:
        return _token_tensor(t, model)
    raise ApiError(400, f"input {shown(t.name)}: this model reads text; send '{TEXT_INPUT}' (BYTES [N] of UTF-8 "
                        f"texts) or '{TENSOR_INPUT}' (INT64 [N, L] token ids of its tokenizer)")


def _token_tensor(t: Tensor, model: LoadedModel) -> np.ndarray:
    spec = model.spec
    if t.datatype not in ("INT64", "INT32"):
        raise ApiError(400, f"input '{TENSOR_INPUT}' of a text model holds token ids: datatype INT64, "
                            f"got {shown(t.datatype)}")
    if len(t.shape) != 2 or min(t.shape) < 1 or t.shape[1] > spec.max_tokens:
        raise ApiError(400, f"input '{TENSOR_INPUT}' has shape {t.shape}; expected [N, L] with N >= 1 and "
                            f"1 <= L <= {spec.max_tokens} (model.max_tokens)")
    ids = np.ascontiguousarray(t.data, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
        raise ApiError(400, f"input '{TENSOR_INPUT}': token ids must be 0..{spec.vocab_size - 1} (the tokenizer's "
                            "vocabulary)")
    return ids


def decode_texts(texts: list[tuple[str, bytes]], spec: TextSpec, max_text_chars: int,
                 deadline: Deadline | None = None) -> np.ndarray:
    """(what to call it in an error, UTF-8 bytes) -> token ids (N, L) padded to the longest, tokenised as in training
    (tlops.inputs.text); 400 for a text that is not UTF-8 or empty, 413 for one over max_text_chars."""
    cleaned = []
    for label, data in texts:
        if deadline is not None:
            deadline.check()
        if len(data) > 4 * max_text_chars:  # more bytes than any text of max_text_chars characters has
            raise ApiError(413, f"{label}: {len(data)} bytes, over serve.max_text_chars = {max_text_chars} "
                                "characters", reason="text_too_long")
        try:
            raw = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"{label}: not_utf8: byte {e.start} is not UTF-8", reason="not_utf8") from None
        if len(raw) > max_text_chars:
            raise ApiError(413, f"{label}: {len(raw)} characters, over serve.max_text_chars = {max_text_chars}",
                           reason="text_too_long")
        try:
            cleaned.append(spec.clean(raw))
        except TextError as e:
            raise ApiError(400, f"{label}: {e.reason}: {e.detail}", reason=e.reason) from None
    return spec.pad(spec.encode(cleaned))


def _fp32_tensor(t: Tensor, model: LoadedModel) -> np.ndarray:
    want = model.input_shape
    if t.datatype != "FP32":
        raise ApiError(400, f"input '{TENSOR_INPUT}' must have datatype FP32, got {shown(t.datatype)}")
    if len(t.shape) != 4 or t.shape[0] < 1 or t.shape[1:] != want[1:]:
        dims = ", ".join(map(str, want[1:]))
        raise ApiError(400, f"input '{TENSOR_INPUT}' has shape {t.shape}; expected [N, {dims}] with N >= 1")
    if not np.isfinite(t.data).all():
        raise ApiError(400, f"input '{TENSOR_INPUT}' contains NaN or infinity")
    return np.ascontiguousarray(t.data, np.float32)


def _pixel_images(t: Tensor, model: LoadedModel, limits: Limits, deadline: Deadline) -> np.ndarray:
    if t.datatype not in INTEGER_TYPES:
        raise ApiError(400, f"input '{IMAGE_INPUT}' must have datatype UINT8 (or another integer type with values "
                            f"0..255), got {shown(t.datatype)}")
    shape = [1, *t.shape] if len(t.shape) == 3 else t.shape
    if len(shape) != 4 or min(shape) < 1 or shape[3] not in CHANNELS:
        raise ApiError(400, f"input '{IMAGE_INPUT}' has shape {t.shape}; expected [N, H, W, C] or [H, W, C] "
                            f"with C in {CHANNELS} (HWC layout, RGB order)")
    if shape[1] * shape[2] > limits.max_pixels:
        raise ApiError(400, f"input '{IMAGE_INPUT}' images are {shape[1]}x{shape[2]} pixels, over the limit of "
                            f"{limits.max_pixels}", reason="too_many_pixels")
    a = t.data.reshape(shape)
    if a.dtype != np.uint8 and a.size and (a.min() < 0 or a.max() > 255):
        raise ApiError(400, f"input '{IMAGE_INPUT}' data must be integers 0..255 (pixel values)")
    a = a.astype(np.uint8, copy=False)
    out = _batch(len(a), model.spec)
    for i, img in enumerate(a):
        deadline.check()
        out[i] = preprocess_uint8(img, model.spec)
    return out


def _image_files(t: Tensor, model: LoadedModel, limits: Limits, deadline: Deadline) -> np.ndarray:
    if t.datatype != BYTES:
        raise ApiError(400, f"input '{FILE_INPUT}' must have datatype BYTES, got {shown(t.datatype)}")
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1) or t.shape[0] < 1:
        raise ApiError(400, f"input '{FILE_INPUT}' has shape {t.shape}; expected [N] or [N, 1], one image file each")
    return decode_files([(f"input '{FILE_INPUT}' element {i}", bytes(data)) for i, data in enumerate(t.data.ravel())],
                        model.spec, limits, deadline)


def decode_files(files: list[tuple[str, bytes]], spec: PreprocessSpec, limits: Limits, deadline: Deadline
                 ) -> np.ndarray:
    """(what to call it in an error, encoded image) -> the model's input. Every file's header is read first: a
    request of another format (415) or more pixels than serve.max_request_pixels (413) costs no decoding. Then one
    image is decoded at a time (one full-size image in memory), the deadline checked before each."""
    total = 0
    for label, data in files:
        total += _header_pixels(label, data)
        if total > limits.max_request_pixels:
            raise _too_many_pixels(total, limits)
    out = _batch(len(files), spec)
    for i, (label, data) in enumerate(files):
        deadline.check()
        try:
            out[i] = load_and_preprocess(data, spec, limits.max_pixels)
        except ImageError as e:
            raise _image_error(label, e) from None
        except Exception as e:  # noqa: BLE001 - a decoder's own bug on a hostile file is the file's fault: a 400
            raise ApiError(400, f"{label}: corrupt: cannot be decoded ({type(e).__name__})", reason="corrupt") from None
    return out


def _header_pixels(label: str, data: bytes) -> int:
    try:
        return declared_pixels(data)
    except ImageError as e:
        raise _image_error(label, e) from None
    except Exception as e:  # noqa: BLE001 - as in decode_files
        raise ApiError(400, f"{label}: corrupt: unreadable header ({type(e).__name__})", reason="corrupt") from None


def _image_error(label: str, e: ImageError) -> ApiError:
    status = 415 if e.reason == "not_an_image" else 400
    return ApiError(status, f"{label}: {e.reason}: {e.detail}", reason=e.reason)


def _batch(n: int, spec: PreprocessSpec) -> np.ndarray:
    """The model's input for n images, filled in place: no list of arrays and no stacked copy of it."""
    return np.empty((n, 3, spec.input_size, spec.input_size), np.float32)
