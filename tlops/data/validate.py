"""Which files can be used: every image decoded and every text cleaned once, the rest quarantined with a reason; the
class counts a classifier needs."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tlops.core.errors import DataError
from tlops.core.folders import visible_files
from tlops.core.io import sha256_bytes
from tlops.data.manifest import DICOM_SOURCES
from tlops.inputs.images import ImageError, load_image
from tlops.inputs.intensity import Intensity
from tlops.inputs.text import TextError, decode_text, text_sha256


@dataclass(frozen=True)
class Checked:
    """An image that decoded fully, with the two fingerprints that find its copies."""

    path: str
    label: str
    sha256: str  # of the file's bytes
    width: int
    height: int
    pixels: str = ""  # sha256 of the decoded RGB pixels: the same picture in PNG, BMP, TIFF, ... has one
    phash: int = 0  # 64-bit perceptual hash: re-encoded and resized copies differ from it in a few bits
    thumbnail: bytes = b""  # 16x16 grey: flat pictures, whose perceptual hash is unstable, still match on it
    group: str = ""  # sha256 naming the group (data.group_by: a patient, a path pattern) it splits with; "": none
    truncated: bool = False  # a text cut to data.max_chars


def original_paths(raw_dir: Path) -> dict[str, str]:
    """{manifest path: the file's path in the source} for the DICOM files ingest renamed (DICOM_SOURCES)."""
    sources = Path(raw_dir) / DICOM_SOURCES
    if not sources.exists():
        return {}
    return {_display(Path(raw_dir) / new): old for new, old in json.loads(sources.read_text(encoding="utf-8")).items()}


def find_candidates(raw_dir: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """(path, label) of every visible file in a class folder, and quarantine entries for files outside one."""
    candidates, stray = [], []
    for f in visible_files(raw_dir):
        rel = f.relative_to(raw_dir)
        if len(rel.parts) < 2:
            stray.append({"path": _display(f), "reason": "no_class_folder",
                          "detail": f"{_display(f)} is not inside a <class>/ folder"})
        else:
            candidates.append((_display(f), rel.parts[0]))
    return candidates, stray


def _display(path: Path) -> str:
    """A path as the manifest stores it: relative to the project root (cwd) when under it, POSIX slashes."""
    if path.is_absolute():
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:
            pass
    return path.as_posix()


# prepare decodes at this working size: enough for the fingerprints, and a phone photo costs an eighth of its decode
THUMBNAIL = 16  # side of the grey thumbnail near-duplicate detection compares
CHECK_SHORT = 256


def check_images(candidates: list[tuple[str, str]], max_pixels: int, intensity: Intensity = Intensity(),
                 group_by: str = "none", originals: dict[str, str] | None = None) -> tuple[list[Checked], list[dict]]:
    """Decode every candidate completely (at working size); the ones that fail become {path, reason, detail}
    entries. Pixel identity and the perceptual fingerprints are taken at that size; group_by names each image's
    group (group_of)."""
    import imagehash

    good, bad = [], []
    for path, label in candidates:
        try:
            data = Path(path).read_bytes()
            img = load_image(path, max_pixels, CHECK_SHORT, intensity)  # every byte decoded, at working size
            width, height = img.info["decoded_from"]
            pixels = sha256_bytes(f"{width}x{height}:".encode() + img.tobytes())
            thumbnail = img.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX).tobytes()
            good.append(Checked(path, label, sha256_bytes(data), width, height, pixels,
                                int(str(imagehash.phash(img)), 16), thumbnail,
                                group_of((originals or {}).get(path, path), data, group_by)))
        except ImageError as e:
            bad.append({"path": path, "reason": e.reason, "detail": e.detail})
        except OSError as e:
            bad.append({"path": path, "reason": "unreadable", "detail": f"{path}: {e}"})
        except Exception as e:  # a decoder bug on one hostile file must not stop the stage
            bad.append({"path": path, "reason": "corrupt", "detail": f"{path}: {type(e).__name__}: {e}"})
    return good, bad


def check_texts(candidates: list[tuple[str, str]], max_chars: int, group_by: str = "none"
                ) -> tuple[list[Checked], list[dict]]:
    """Read every candidate as one UTF-8 text (tlops.inputs.text.decode_text: NFC, whitespace); the ones that fail
    become {path, reason, detail} entries. A text over max_chars is kept, cut, and has `truncated` set on its entry. Its
    hash is the normalised text's, so copies that differ in encoding details or whitespace are one text."""
    good, bad = [], []
    for path, label in candidates:
        try:
            data = Path(path).read_bytes()
            text, cut = decode_text(data, path, max_chars)
            good.append(Checked(path, label, text_sha256(text), len(text), len(text.split()),
                                group=group_of(path, data, group_by), truncated=cut))
        except TextError as e:
            bad.append({"path": path, "reason": e.reason, "detail": e.detail})
        except OSError as e:
            bad.append({"path": path, "reason": "unreadable", "detail": f"{path}: {e}"})
    return good, bad


def group_of(path: str, data: bytes, rule: str) -> str:
    """The sha256 naming the group an image splits with: its DICOM patient (PatientID, else StudyInstanceUID) for
    "patient", the regex's first group (else its whole match) in the path for a pattern; "" for none or no match.
    A hash, so that no patient identifier is ever written down."""
    if rule == "none":
        return ""
    if rule == "patient":
        from tlops.inputs import dicom

        return (dicom.patient_key(data) or "") if dicom.is_dicom(data, path) else ""
    m = re.search(rule, path)
    if m is None:
        return ""
    return sha256_bytes(f"path:{m.group(1) if m.groups() else m.group(0)}".encode())


def check_classes(kept: list[Checked], label_of: dict[str, str], quarantined: list[dict], min_per_class: int,
                  raw_dir: Path) -> None:
    """DataError unless there are >= 2 classes, each with at least min_per_class valid images."""
    valid = Counter(c.label for c in kept)
    if len(valid) < 2:
        found = ", ".join(sorted(valid)) or "none"
        raise DataError(f"{raw_dir}: {len(valid)} class(es) with valid images ({found}); a classifier needs "
                        f"at least 2 class folders {raw_dir}/<class>/<image>")
    bad = Counter(label_of[q["path"]] for q in quarantined if q["path"] in label_of)
    small = [f"class {label!r} has {valid[label]} valid image(s) ({bad[label]} quarantined)"
             for label in sorted(set(label_of.values())) if valid[label] < min_per_class]
    if small:
        raise DataError(f"{raw_dir}: {'; '.join(small)}; data.min_per_class is {min_per_class}")
