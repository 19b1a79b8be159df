"""Where each stage reads and writes, relative to the project root; dvc.yaml declares the same paths.

tests/test_config.py checks that the two agree, so a path is changed in both or in neither.
"""

from pathlib import Path

RAW = Path("data/raw")
MANIFEST = Path("data/prepared/manifest.csv")
DATA_REPORT = Path("reports/data.json")

FEATURES_DIR = Path("features")               # persist: a content-addressed cache that survives reruns
FEATURES_CACHE = FEATURES_DIR / "cache"
FEATURES_DATASET = FEATURES_DIR / "dataset.npz"
FEATURES_IMAGES = FEATURES_DIR / "images"         # working images, decoded once (tlops/images.py)

HEAD_DIR = Path("models/head")
HEAD_WEIGHTS = HEAD_DIR / "head.safetensors"
HEAD_INFO = HEAD_DIR / "head.json"
HEAD_HISTORY = Path("reports/head_history.csv")

FINETUNE_DIR = Path("models/finetuned")
FINETUNE_WEIGHTS = FINETUNE_DIR / "model.safetensors"    # the selected model: what export exports
FINETUNED_WEIGHTS = FINETUNE_DIR / "finetuned.safetensors"  # fine-tuning's best, when the head-only model won
FINETUNE_INFO = FINETUNE_DIR / "model.json"
FINETUNE_HISTORY = Path("reports/finetune_history.csv")
CHECKPOINT_DIR = Path("checkpoints/finetune")  # persist: resume after a crash
TRUNK_CACHE = CHECKPOINT_DIR / "trunk"          # the frozen trunk's outputs (tlops/trunk.py)

TARGET = Path("data/target")                     # adapt.target, materialised (DVC-tracked, its own data version)
TARGET_MANIFEST = Path("data/prepared/target.csv")  # target rows: split adapt (used unlabeled) | test (scoring only)
TARGET_REPORT = Path("reports/target.json")
ADAPT_DIR = Path("models/adapted")                 # the model evaluate scores and export exports
ADAPT_WEIGHTS = ADAPT_DIR / "model.safetensors"
ADAPT_INFO = ADAPT_DIR / "model.json"
ADAPT_CHECKPOINTS = Path("checkpoints/adapt")      # persist: resume after a crash, one folder per method
TARGET_IMAGES = ADAPT_CHECKPOINTS / "images"       # working images of the target (tlops/images.py)
ADAPT_REPORT = Path("reports/adapt.json")

LABEL_ISSUES = Path("reports/label_issues.csv")   # the audit stage's flags, most suspicious first (tlops.data.label_issues)
LABEL_AUDIT = Path("reports/label_audit.json")    # its counts
LABEL_ISSUES_DIR = Path("reports/label_issues")   # grid.png and suspects.md: the top suspects

METRICS = Path("reports/metrics.json")
CALIBRATION_DIR = Path("models/calibration")       # evaluate's measure of the exported model, which export builds in
CALIBRATION = CALIBRATION_DIR / "calibration.json"  # the temperature and the OOD threshold, with how they were chosen
OOD_FIT = CALIBRATION_DIR / "ood.npz"              # the OOD score's class means and shared precision matrix
VAL_PREDICTIONS = CALIBRATION_DIR / "val_predictions.npz"  # its class for each validation item: tune compares by it
HISTORY = Path("reports/history.csv")
CONFUSION = Path("reports/confusion.csv")
PLOTS_DIR = Path("reports/plots")

ONNX = Path("models/model.onnx")
ONNX_SHA256 = Path("models/model.onnx.sha256")
MODEL_CARD = Path("models/model_card.md")
INT8_DIR = Path("models/int8")
INT8_ONNX = INT8_DIR / "model.int8.onnx"
EXPORT_REPORT = Path("reports/export.json")

STATE_DIR = Path(".tlops")                     # workspace-local run state, not versioned
MLFLOW_DB = Path("mlflow.db")
MLFLOW_ARTIFACTS = Path("mlartifacts")
