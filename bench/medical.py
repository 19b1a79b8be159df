"""Medical images worked example: generated 12-bit DICOM scans, several per patient, split by image or by patient.

    python bench/medical.py [--workdir DIR] [--patients 80] [--per-patient 5]

The scans (generated, never committed): each patient's "anatomy" is one of scikit-learn's digits (a public image
set), upscaled to 64 px and stored as 12-bit CT-like values (rescale intercept -1024, a header window), moved a
few pixels and re-noised in every one of the patient's scans; half the patients have a lesion (a faint blob at a
random place in each scan). A few patients' scans are MONOCHROME1, one file is truncated, and the files are named by
patient the way PACS exports often are. The diagnosis is the patient's, so every scan of a patient carries the same
label: a model can score on a scan of a patient it has seen by recognising the patient's anatomy instead of the
lesion. `tlops run` twice, in fresh clones of the project, `data.group_by: none` then `patient`; prints each run's
test score, the patients in more than one split, and the groups per split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import make_project, timed_run  # noqa: E402

SIZE = 64
WINDOW = (1000.0, 2000.0)  # header window center/width, in modality units (after the rescale)


def scans(out: Path, patients: int = 120, per_patient: int = 8, seed: int = 0) -> dict[str, str]:
    """Write out/<normal|lesion>/<Lastname>_<Firstname>_<k>.dcm; returns {PatientID: label}."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from tlops.inputs import dicom

    digits = load_digits().images
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = {}
    for pid in range(patients):
        label = ("normal", "lesion")[pid % 2]
        anatomy = np.asarray(Image.fromarray((digits[rng.integers(len(digits))] * 255 / 16).astype(np.uint8))
                             .resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float64) / 255
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_patient):
            dy, dx = rng.integers(-3, 4, 2)
            tissue = np.roll(anatomy, (dy, dx), axis=(0, 1))
            hu = 40 + 900 * tissue + rng.normal(0, 60, (SIZE, SIZE))  # modality units (HU-like)
            if label == "lesion":
                cy, cx = rng.integers(12, SIZE - 12, 2)
                hu += 300 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0 ** 2))
            stored, photometric, window = np.clip(np.rint(hu + 1024), 0, 4095), "MONOCHROME2", WINDOW
            if pid % 7 == 3:  # MONOCHROME1 (high values shown dark): stored inverted, so it looks the same decoded
                stored, photometric, window = 4095 - stored, "MONOCHROME1", (2047 - WINDOW[0], WINDOW[1])
            data = dicom.encode(stored, bits_stored=12, intercept=-1024, window=window, photometric=photometric,
                                uid_seed=f"{seed}-{pid}-{k}", PatientName=f"Testpatient^Number{pid:03d}",
                                PatientID=f"MRN{900000 + pid}", Modality="CT")
            (folder / f"Testpatient_Number{pid:03d}_{k}.dcm").write_bytes(data)
        labels[f"MRN{900000 + pid}"] = label
    whole = (out / "lesion" / "Testpatient_Number001_0.dcm").read_bytes()
    (out / "lesion" / "Testpatient_Number001_cut.dcm").write_bytes(whole[: len(whole) - 500])
    return labels


def straddling(project: Path) -> tuple[int, int]:
    """(patients in more than one split, patients) from the manifest, reading each scan's PatientID."""
    from tlops.inputs import dicom

    splits: dict[str, set[str]] = defaultdict(set)
    for line in (project / "data/prepared/manifest.csv").read_text().splitlines()[1:]:
        path, _, split = line.split(",")[:3]
        pid = str(dicom.read((project / path).read_bytes(), stop_before_pixels=True).PatientID)
        splits[pid].add(split)
    return sum(len(s) > 1 for s in splits.values()), len(splits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--patients", type=int, default=120)
    ap.add_argument("--per-patient", type=int, default=8)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tlops-medical-"))
    data = work / "scans"
    if not data.exists():
        scans(data, args.patients, args.per_patient)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    print(f"{args.patients} patients x {args.per_patient} scans of {SIZE}x{SIZE}, 12-bit, in {data}")
    print("| data.group_by | test accuracy (head / fine-tuned / exported) | test scans | patients in 2+ splits "
          "| patients per split (train/val/test) | quarantined | `tlops run` s |")
    print("|---|---|---:|---:|---|---|---:|")
    for rule in ("none", "patient"):
        project = work / f"group-{rule}"
        if not project.exists():
            make_project(project)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["data"].update({"source": "imagefolder", "path": str(data), "group_by": rule})
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        wall = timed_run(project, env, f"medical-{rule}")
        metrics = json.loads((project / "reports/metrics.json").read_text())
        exported = json.loads((project / "reports/export.json").read_text())
        report = json.loads((project / "reports/data.json").read_text())
        crossing, total = straddling(project)
        groups = report.get("groups") or {}
        per_split = "/".join(str(groups.get(s, "-")) for s in ("train", "val", "test")) if groups else "-"
        quarantined = ", ".join(q["reason"] for q in report["quarantined"]) or "none"
        print(f"| {rule} | {metrics['head']['accuracy']:.4f} / {metrics['finetuned']['accuracy']:.4f} / "
              f"{exported['test_accuracy']:.4f} | {metrics['test_images']} | {crossing} of {total} | {per_split} | "
              f"{quarantined} | {wall:.0f} |")


if __name__ == "__main__":
    main()
