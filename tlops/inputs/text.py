"""The one text preprocessing: decoding, normalisation, tokenisation, padding. Torch-free (numpy, tokenizers).

The analogue of tlops.inputs.images for text: prepare validates with `decode_text`, the features, finetune, evaluate
and export stages and the ONNX Runtime service all turn a text into model input through `TextSpec`, so training
and serving see the same token ids. A text model's ONNX input is one int64 tensor (N, L) of token ids padded with
`pad_id` to the longest text of the batch; the attention mask is `ids != pad_id`, computed inside the model, so a
caller (the service, the README snippet) tokenises and pads and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlops.core.errors import DataError
from tlops.core.io import sha256_bytes

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TEXT = "text"
SOURCES = ("textfolder", "csv")  # data.source values whose items are texts
SUFFIX = ".txt"
NORMALIZATION = "nfc_whitespace"  # Unicode NFC, every whitespace run one space, stripped
_WHITESPACE = re.compile(r"\s+")


class TextError(DataError):
    """A text that cannot be used; `reason` is a short stable code for reports and HTTP errors."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def normalize(text: str) -> str:
    """Unicode NFC, whitespace runs (newlines, tabs, non-breaking spaces) to one space, ends stripped."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def decode_text(data: bytes, name: str = "<text>", max_chars: int | None = None) -> tuple[str, bool]:
    """UTF-8 bytes (a BOM allowed) -> (normalised text, whether it was cut to max_chars).

    TextError reasons: not_utf8, empty_text (nothing but whitespace), binary (NUL or other control characters).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TextError("not_utf8", f"{name} is not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    return clean_text(text, name, max_chars)


def clean_text(text: str, name: str, max_chars: int | None = None) -> tuple[str, bool]:
    """A decoded text -> (normalised text, whether it was cut to max_chars); TextError binary or empty_text."""
    check_not_binary(text, name)
    text = normalize(text)
    if not text:
        raise TextError("empty_text", f"{name} is empty or whitespace only")
    if max_chars and len(text) > max_chars:
        return text[:max_chars].rstrip(), True
    return text, False


def pad_ids(seqs: Sequence[np.ndarray], pad_id: int) -> np.ndarray:
    """Token id arrays -> (N, longest) int64, padded with pad_id (the model's mask is ids != pad_id)."""
    width = max((len(s) for s in seqs), default=1) or 1
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def check_not_binary(text: str, name: str) -> None:
    """TextError `binary` for a text holding control characters other than whitespace (NUL, escape, ...)."""
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r\f\v\x1c\x1d\x1e\x1f\x85" for c in text):
        raise TextError("binary", f"{name} holds control characters (a binary file?)")


def load_text(source: str | os.PathLike | bytes, max_chars: int | None = None) -> str:
    """A text file (or its bytes) -> the normalised text every consumer uses (cut to max_chars)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_text(bytes(source), "<bytes>", max_chars)[0]
    return decode_text(Path(source).read_bytes(), str(source), max_chars)[0]


def text_sha256(text: str) -> str:
    """The content hash of a normalised text: what splits it, deduplicates it and keys its cached features."""
    return sha256_bytes(text.encode("utf-8"))


@lru_cache(maxsize=8)
def _tokenizer(json_text: str) -> Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json_text)
    tok.no_truncation()  # tlops truncates to max_tokens itself (keeping the final [SEP]) ...
    tok.no_padding()  # ... and pads each batch to its longest text
    return tok


@dataclass(frozen=True)
class TextSpec:
    """How a text becomes model input: normalise, cut to max_chars, tokenise (tokenizer.json), keep max_tokens.

    Recorded in model.json and the ONNX metadata (tlops.preprocess, with the tokenizer itself in tlops.tokenizer),
    so that the service tokenises exactly as training did.
    """

    tokenizer: str = field(repr=False)  # the tokenizer.json text (a `tokenizers` Tokenizer)
    max_tokens: int = 128
    max_chars: int | None = None
    pad_id: int = 0
    kind: str = TEXT
    normalization: str = NORMALIZATION

    @property
    def tokenizer_sha256(self) -> str:
        return sha256_bytes(self.tokenizer.encode("utf-8"))

    @property
    def vocab_size(self) -> int:
        return _tokenizer(self.tokenizer).get_vocab_size()

    @property
    def input_size(self) -> int:  # the longest input, where image code asks for the input's side
        return self.max_tokens

    def to_dict(self, with_tokenizer: bool = True) -> dict:
        d = {"kind": self.kind, "max_tokens": self.max_tokens, "max_chars": self.max_chars, "pad_id": self.pad_id,
             "normalization": self.normalization, "tokenizer_sha256": self.tokenizer_sha256}
        return {**d, "tokenizer": self.tokenizer} if with_tokenizer else d

    def identity(self) -> dict:
        """What makes its inputs what they are, small enough to hash per item (the tokenizer by its sha256)."""
        return self.to_dict(with_tokenizer=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(with_tokenizer=False), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, tokenizer: str | None = None) -> TextSpec:
        tok = tokenizer if tokenizer is not None else d.get("tokenizer")
        if not tok:
            raise ValueError("a text spec needs its tokenizer")
        spec = cls(tokenizer=tok, max_tokens=int(d.get("max_tokens", 128)), max_chars=d.get("max_chars"),
                   pad_id=int(d.get("pad_id", 0)))
        if d.get("tokenizer_sha256") not in (None, spec.tokenizer_sha256):
            raise ValueError("the tokenizer does not match the spec's tokenizer_sha256")
        if d.get("normalization", NORMALIZATION) != NORMALIZATION:
            raise ValueError(f"unknown text normalization {d.get('normalization')!r}")
        return spec

    def ids(self, text: str) -> np.ndarray:
        """One normalised text -> int64 token ids, at most max_tokens (the final special token kept)."""
        return self.encode([text])[0]

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Normalised texts -> their int64 token ids, each cut to max_tokens keeping the closing special token."""
        tok = _tokenizer(self.tokenizer)
        out = []
        for enc in tok.encode_batch(list(texts)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if len(ids) > self.max_tokens:
                special = enc.special_tokens_mask
                tail = ids[-1:] if special and special[-1] else ids[:0]
                ids = np.concatenate([ids[: self.max_tokens - len(tail)], tail])
            out.append(ids)
        return out

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """The tokens of ids, as the tokenizer spells them ("[CLS]", "ell", "##o"), padding left out."""
        tok = _tokenizer(self.tokenizer)
        return [tok.id_to_token(int(i)) or "" for i in ids if int(i) != self.pad_id]

    def pad(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """Token id arrays -> (N, longest) int64, padded with this spec's pad_id."""
        return pad_ids(seqs, self.pad_id)

    def batch(self, texts: Sequence[str]) -> np.ndarray:
        """Raw texts (normalised here, cut to max_chars) -> the padded int64 model input."""
        return self.pad(self.encode([self.clean(t) for t in texts]))

    def clean(self, text: str) -> str:
        """Normalise and cut a raw text as prepare did; TextError for a binary one, or when nothing is left."""
        return clean_text(text, "the text", self.max_chars)[0]


def text_batches(files: Sequence[str | os.PathLike], spec: TextSpec, batch: int = 64) -> Iterator[np.ndarray]:
    """Padded int64 token batches of text files, in order (each batch padded to its own longest text)."""
    for start in range(0, len(files), batch):
        texts = [load_text(f, spec.max_chars) for f in files[start : start + batch]]
        yield spec.pad(spec.encode(texts))

