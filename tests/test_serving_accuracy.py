"""Shared preprocessing, end to end: the service answering /predict over the test split reproduces the evaluate
stage's fine-tuned accuracy, and agrees image by image with `tlops predict` (local ONNX Runtime)."""

from __future__ import annotations

import json
import uuid

import yaml
from serving_support import ThreadServer, serve_params, wait_for

from serving.client import http_accuracy
from serving.predict import predict_files
from tlops.core import paths
from tlops.data.manifest import load_manifest
from tlops.tracking import runs


def test_predict_over_the_test_split_reproduces_the_evaluated_accuracy(trained, monkeypatch):
    from tasks.evaluate import evaluate
    from tasks.export import export

    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(runs.PARENT_ENV, raising=False)
    raw = yaml.safe_load((trained / "params.yaml").read_text())
    raw["export"].update(registered_model=f"test-serving-{uuid.uuid4().hex[:8]}", int8=False)
    (trained / "params.yaml").write_text(yaml.safe_dump(raw))
    evaluate.fn()
    export.fn()
    metrics = json.loads(paths.METRICS.read_text())
    test_rows = load_manifest(paths.MANIFEST).rows_in("test")
    assert metrics["test_images"] == len(test_rows) > 0

    with ThreadServer(serve_params(max_pixels=10**7), str(paths.ONNX)) as server:
        wait_for(f"{server.url}/v2/health/ready")
        got = http_accuracy(server.url, [(r.path, r.label) for r in test_rows], batch_size=4)
    assert got["n"] == len(test_rows)
    # within one image of evaluate (PyTorch on the same spec); the ONNX parity gate makes it exact in practice
    assert abs(got["correct"] - round(metrics["finetuned"]["accuracy"] * got["n"])) <= 1

    local = predict_files(str(paths.ONNX), [r.path for r in test_rows], top_k=1)
    local_correct = sum(res["top_k"][0]["label"] == r.label for res, r in zip(local, test_rows, strict=True))
    assert local_correct == got["correct"]
