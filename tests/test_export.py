"""tlops.export + tlops.onnx.metadata: one verified ONNX file, parity gate, metadata, sha256, int8, README snippet,
promotion gate against a real MLflow registry, and the export stage on a tiny trained workspace."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import ROOT, TINY, deep_update, make_images
from PIL import Image
from torch import nn

from tlops.core import paths
from tlops.core.config import parse_params
from tlops.core.errors import ModelIntegrityError, ParityError
from tlops.evaluate.evaluation import exported_classifier
from tlops.export import lineage, onnx_export, package, promotion, verify
from tlops.export.served import linear_layer
from tlops.inputs.images import PreprocessSpec
from tlops.inputs.model_input import preprocess_batches as iter_batches
from tlops.onnx import metadata, runtime
from tlops.tracking import registry, runs

SNIPPET = ROOT / "docs" / "onnx_snippet.py"
CLASSES = ["class_0", "class_1", "class_2"]


def tiny_params(**over):
    raw = deep_update(deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), over)
    return parse_params(raw)


def tiny_classifier(spec: PreprocessSpec | None = None, seed: int = 0) -> tuple[nn.Module, PreprocessSpec]:
    """The tiny_test backbone + a linear head, random init: the shape of the real fine-tuned model."""
    from tlops.models.backbones import create_backbone
    from tlops.models.classifier import Classifier
    from tlops.models.heads import build_head

    bb = create_backbone("tiny_test", weights="random", image_size=32)
    torch.manual_seed(seed)
    model = Classifier(bb.model, build_head("linear", bb.num_features, len(CLASSES), 8, 0.0)).eval()
    return model, spec or bb.spec


class ChannelScore(nn.Module):
    """Logits = 10 x mean of the input channels taken in `order`: on make_images, class c is channel c."""

    def __init__(self, order: tuple[int, int, int]):
        super().__init__()
        self.mix = nn.Conv2d(3, 3, 1, bias=False)
        self.mix.weight.data = torch.eye(3)[list(order)].reshape(3, 3, 1, 1) * 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).mean(dim=(2, 3))


def write_onnx(model: nn.Module, spec: PreprocessSpec, path: Path, **meta) -> Path:
    onnx_export.export_onnx(model, spec.input_size, path, opset=17)
    fields = {"backbone": "tiny_test", "data_version": "dv1", "git_commit": "abc", "run_id": "r1",
              "params_sha": "p" * 64, **meta}
    lineage.write_metadata(path, lineage.build_metadata(CLASSES, spec, **fields))
    return path


def batches(images, spec):
    return list(iter_batches([str(p) for p in images], spec, 10**7, batch=4))


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return make_images(tmp_path / "img", classes=3, per_class=3, size=40)


# ---------------------------------------------------------------- export, metadata, integrity


def test_export_is_one_self_contained_file_with_pinned_opset_and_dynamic_batch(tmp_path, images):
    model, spec = tiny_classifier()
    path = write_onnx(model, spec, tmp_path / "out" / "model.onnx")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = runtime.session(path, cpu_only=True)
    for n in (1, 5):
        x = np.zeros((n, 3, 32, 32), np.float32)
        assert sess.run(None, {"input": x})[0].shape == (n, 3)


def test_external_data_is_refused(tmp_path):
    model, spec = tiny_classifier()
    path = write_onnx(model, spec, tmp_path / "model.onnx")
    onnx.save(onnx.load(str(path)), str(tmp_path / "split.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="split.data", size_threshold=0)
    with pytest.raises(ModelIntegrityError, match="external data"):
        metadata.assert_self_contained(tmp_path / "split.onnx")


def test_parity_passes_on_the_exported_model_and_fails_on_an_altered_graph(tmp_path, images):
    model, spec = tiny_classifier()
    path = write_onnx(model, spec, tmp_path / "model.onnx")
    stats = verify.check_parity(path, model, batches(images, spec), atol=1e-3)
    assert stats["agreement"] == 1.0 and stats["max_abs_diff"] <= 1e-3 and stats["n"] == len(images)

    proto = onnx.load(str(path))  # perturb the head's weight matrix inside the ONNX file
    init = max((i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
               key=lambda i: int(np.prod(i.dims)) if len(i.dims) == 2 else 0)
    w = onnx.numpy_helper.to_array(init).copy()
    w[0] += 5.0
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(tmp_path / "altered.onnx"))
    with pytest.raises(ParityError, match=r"top-1 agreement .*max \|Δ\|") as err:
        verify.check_parity(tmp_path / "altered.onnx", model, batches(images, spec), atol=1e-3)
    assert "parity_atol = 0.001" in str(err.value)


def test_metadata_round_trip(tmp_path):
    spec = PreprocessSpec(32, "bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.875)
    model, _ = tiny_classifier()
    path = write_onnx(model, spec, tmp_path / "model.onnx", run_id="run-42")
    meta = metadata.read_metadata(path)
    # the export stage adds the reference, the temperature, the OOD threshold and the explanation's kind
    assert set(meta) == set(metadata.KEYS) - {metadata.DRIFT_REFERENCE, metadata.TEMPERATURE, metadata.OOD,
                                              metadata.EXPLAIN}
    assert metadata.labels_of(meta) == CLASSES
    assert metadata.spec_of(meta) == spec
    assert meta["tlops.input_size"] == "32" and meta["tlops.backbone"] == "tiny_test"
    assert meta["tlops.data_version"] == "dv1" and meta["tlops.git_commit"] == "abc"
    assert meta["tlops.mlflow_run_id"] == "run-42"
    assert meta["tlops.precision"] == "fp32" and meta["tlops.created"].startswith("20")
    # onnxruntime sees the same metadata (what serving and the README snippet read)
    assert runtime.session(path).get_modelmeta().custom_metadata_map == meta
    # rewriting replaces tlops.* keys and keeps foreign ones
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="other", value="kept")
    onnx.save(proto, str(path))
    lineage.write_metadata(path, {**meta, metadata.MLFLOW_RUN_ID: "run-43"})
    meta2 = metadata.read_metadata(path)
    assert meta2["other"] == "kept" and meta2["tlops.mlflow_run_id"] == "run-43" and len(meta2) == len(meta) + 1


def test_params_hash_depends_on_params():
    assert lineage.params_hash(tiny_params()) == lineage.params_hash(tiny_params())
    assert lineage.params_hash(tiny_params()) != lineage.params_hash(tiny_params(export={"opset": 18}))


def test_a_flipped_byte_is_caught_by_the_sha256_check(tmp_path):
    model, spec = tiny_classifier()
    path = write_onnx(model, spec, tmp_path / "model.onnx")
    digest = metadata.write_sha256(path)
    assert (tmp_path / "model.onnx.sha256").read_text() == f"{digest}  model.onnx\n"
    assert metadata.verify_sha256(path) == digest
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        metadata.verify_sha256(path)
    (tmp_path / "model.onnx.sha256").unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        metadata.verify_sha256(path)


def test_the_torch_free_unit_imports_no_torch_when_run():
    code = ("import sys, tlops.onnx.metadata, tlops.onnx.drift, tlops.onnx.runtime, tlops.inputs.images, "
            "tlops.inputs.model_input, tlops.inputs.dicom_render, tlops.core.config; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- the ONNX snippet of docs/serving.md


def test_the_serving_page_shows_exactly_the_tested_snippet():
    readme = (ROOT / "docs" / "serving.md").read_text()  # the page that shows it
    assert SNIPPET.read_text().strip() in readme


@pytest.mark.parametrize("rule, window", [("auto", None), ("minmax", None), ("window", (2048.0, 1500.0))])
def test_the_snippet_gives_the_same_predictions_as_tlops_preprocessing(tmp_path, monkeypatch, rule, window):
    # bicubic + crop_pct < 1 + non-square images exercise every step of the preprocessing; 16-bit scans its
    # intensity rule
    spec = PreprocessSpec(32, "bicubic", crop_pct=0.875, intensity=rule, window=window)
    model, _ = tiny_classifier(spec, seed=3)
    path = write_onnx(model, spec, tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    files = []
    for i, (w, h) in enumerate([(40, 40), (57, 33), (31, 80), (36, 37), (200, 120)]):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(files[-1])
    Image.fromarray(rng.integers(0, 255, (50, 45), dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    files.append(tmp_path / "gray.png")
    for i in range(3):  # 12-bit values in 16-bit PNGs, as scanners export them
        scan = rng.normal(1500 + 800 * i, 600, (44, 52)).clip(0, 4095).astype(np.uint16)
        Image.fromarray(scan).save(tmp_path / f"scan{i}.png")
        files.append(tmp_path / f"scan{i}.png")

    monkeypatch.setattr(sys, "argv", [str(SNIPPET), str(path), *map(str, files)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(SNIPPET), run_name="__main__")
    got = [line.split("\t") for line in out.getvalue().splitlines()]

    meta = metadata.read_metadata(path)
    logits = runtime.run_batches(runtime.session(path), iter_batches([str(f) for f in files], metadata.spec_of(meta), 10**7))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    want = [[str(f), CLASSES[int(p.argmax())], f"{p.max():.3f}"] for f, p in zip(files, probs, strict=True)]
    assert got == want


def test_readme_snippet_imports_neither_tlops_nor_torch():
    source = SNIPPET.read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import", "from"))]
    assert all("tlops" not in line and "torch" not in line for line in imports)


# ---------------------------------------------------------------- int8


class NearTie(nn.Module):
    """Logit j = 50 x mean(channel 0) + 0.05 x mean(channel j): right in fp32 (the common term cancels), but the
    class margins are far below one int8 step of a logit range that wide, so int8 ties them and flips predictions."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(3, 3, 1, bias=False)
        self.mix.weight.data = (50 * torch.eye(3)[[0, 0, 0]] + 0.05 * torch.eye(3)).reshape(3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).mean(dim=(2, 3))


@pytest.mark.parametrize(("model", "kept"), [(ChannelScore((0, 1, 2)), True), (NearTie(), False)],
                         ids=["wide-margins-kept", "near-ties-rejected"])
def test_int8_gate_at_the_default_max_drop_keeps_a_faithful_model_and_rejects_one_int8_breaks(
        tmp_path, monkeypatch, images, model, kept):
    monkeypatch.chdir(tmp_path)
    spec = PreprocessSpec(input_size=32, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    write_onnx(model.eval(), spec, paths.ONNX)
    files, truth = [str(p) for p in images], [p.parent.name for p in images]
    fp32 = verify.score_onnx(paths.ONNX, files, truth, 10**7)
    assert fp32 == 1.0
    params = tiny_params(export={"int8": True})
    assert params.export.int8_max_drop == 0.005  # the project's default, not a forced bar
    result = package.export_int8(params, spec, fp32, files, truth, files)
    assert result["kept"] is kept and paths.INT8_ONNX.exists() is kept
    assert json.loads((paths.INT8_DIR / "quantization.json").read_text()) == json.loads(json.dumps(result))
    assert result["format"] == "QDQ" and result["speed"]["int8"]["latency_ms"] > 0
    if kept:
        assert result["int8_score"] == fp32
        assert metadata.read_metadata(paths.INT8_ONNX)["tlops.precision"] == "int8"
        assert metadata.verify_sha256(paths.INT8_ONNX) == result["sha256"]
        assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(paths.INT8_ONNX)).graph.node)
    else:
        assert result["drop"] > 0.1 and "rejected" in result["reason"]


def test_int8_disabled_says_so(tmp_path, monkeypatch, images):
    monkeypatch.chdir(tmp_path)
    model, spec = tiny_classifier()
    write_onnx(model, spec, paths.ONNX)
    off = package.export_int8(tiny_params(export={"int8": False}), spec, 1.0, [str(p) for p in images], [], [])
    assert off == {"enabled": False, "kept": False, "reason": "export.int8 is false"}
    assert json.loads((paths.INT8_DIR / "quantization.json").read_text()) == off


def test_int8_verdict_threshold():
    assert package.int8_verdict(0.900, 0.895, 0.005)[0]
    assert not package.int8_verdict(0.900, 0.894, 0.005)[0]
    assert package.int8_verdict(0.9, 0.95, 0.0)[0]


# ---------------------------------------------------------------- promotion gate


@pytest.mark.parametrize(("candidate", "champion", "delta", "promote"), [
    (0.5, None, 0.0, True),     # the first model becomes champion
    (0.5, None, 0.9, True),
    (0.8, 0.8, 0.0, False),     # equal: a re-export never ping-pongs
    (0.81, 0.8, 0.0, True),     # delta 0: any strict improvement
    (0.79, 0.8, 0.0, False),
    (0.82, 0.8, 0.02, True),    # delta > 0: at least delta (float error absorbed)
    (0.7 + 0.1, 0.7, 0.1, True),
    (0.81, 0.8, 0.02, False),
])
def test_decide_promotion(candidate, champion, delta, promote):
    decided, reason = promotion.decide_promotion(candidate, champion, delta)
    assert decided is promote and reason


@pytest.fixture
def manifest_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd with data/raw of generated images and its manifest (prepare), and a private experiment."""
    from tlops.data.prepare import prepare_data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(runs.PARENT_ENV, raising=False)
    make_images(paths.RAW, classes=3, per_class=8, size=40)
    prepare_data(paths.RAW, tiny_params().data, paths.MANIFEST, paths.DATA_REPORT)
    return tmp_path


def test_champion_alias_moves_only_when_the_threshold_is_met(manifest_ws):
    from tlops.data.manifest import load_manifest
    from tlops.export.promotion import promote

    name = f"test-promo-{uuid.uuid4().hex[:8]}"
    spec = PreprocessSpec(32, "bilinear")
    files, truth = package.labelled_test_images(load_manifest(paths.MANIFEST))
    bad = write_onnx(ChannelScore((0, 2, 1)), spec, manifest_ws / "bad.onnx")  # right on class_0 only
    good = write_onnx(ChannelScore((0, 1, 2)), spec, manifest_ws / "good.onnx")
    acc = {p: verify.score_onnx(p, files, truth, 10**7) for p in (bad, good)}
    margin = acc[good] - acc[bad]
    assert 0 < margin < 0.99

    def register_and_promote(path: Path, min_delta: float) -> dict:
        params = tiny_params(export={"registered_model": name}, evaluate={"promote_min_delta": min_delta})
        with runs.stage_run("export", params) as run:
            example = package.input_example(path, files[0], 10**7)
            version = registry.log_onnx_model(path, example, name, run_id=run.run_id)
            decision = promote(params, version, acc[path], run.run_id)
        assert registry.get_alias_version(name, registry.CANDIDATE) == version
        assert registry.get_version_tags(name, version)["promotion.promoted"] == str(decision["promoted"])
        assert runs.client().get_run(run.run_id).data.tags["promotion.reason"] == decision["reason"]
        return {**decision, "version": version}

    first = register_and_promote(bad, 0.0)
    assert first["promoted"] and first["champion_version"] is None
    assert registry.get_alias_version(name, registry.CHAMPION) == first["version"]

    short = register_and_promote(good, margin + 0.01)  # better, but not by enough
    assert not short["promoted"] and short["champion_score"] == pytest.approx(acc[bad])
    assert registry.get_alias_version(name, registry.CHAMPION) == first["version"]

    enough = register_and_promote(good, margin)  # better by exactly min_delta
    assert enough["promoted"] and enough["champion_version"] == first["version"]
    assert registry.get_alias_version(name, registry.CHAMPION) == enough["version"]

    same = register_and_promote(good, 0.0)  # identical re-export: equal accuracy, champion stays
    assert not same["promoted"] and same["champion_score"] == pytest.approx(acc[good])
    assert registry.get_alias_version(name, registry.CHAMPION) == enough["version"]


def test_the_gate_refuses_to_compare_a_champion_of_another_task(manifest_ws):
    from tlops.data.manifest import load_manifest
    from tlops.export.promotion import promote

    name = f"test-task-{uuid.uuid4().hex[:8]}"
    spec = PreprocessSpec(32, "bilinear")
    files, truth = package.labelled_test_images(load_manifest(paths.MANIFEST))
    digits = write_onnx(ChannelScore((0, 1, 2)), spec, manifest_ws / "digits.onnx")
    lineage.write_metadata(digits, {**metadata.read_metadata(digits), metadata.LABELS: json.dumps(["0", "1", "2"])})
    ours = write_onnx(ChannelScore((0, 1, 2)), spec, manifest_ws / "ours.onnx")
    params = tiny_params(export={"registered_model": name})
    with runs.stage_run("export", params) as run:
        example = package.input_example(ours, files[0], 10**7)
        v1 = registry.log_onnx_model(digits, example, name, run_id=run.run_id)
        registry.set_alias(name, registry.CHAMPION, v1)  # a model of other labels, which scores 0 on this split
        v2 = registry.log_onnx_model(ours, example, name, run_id=run.run_id)
        decision = promote(params, v2, verify.score_onnx(ours, files, truth, 10**7), run.run_id)
    assert not decision["promoted"] and not decision["comparable"] and decision["champion_score"] is None
    assert "another task" in decision["reason"] and "export.registered_model" in decision["reason"]
    assert registry.get_alias_version(name, registry.CHAMPION) == v1


# ---------------------------------------------------------------- the stage


def run_snippet(model: Path, images: list[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Predicted labels of docs/onnx_snippet.py, run as a script."""
    monkeypatch.setattr(sys, "argv", [str(SNIPPET), str(model), *images])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(SNIPPET), run_name="__main__")
    return [line.split("\t")[1] for line in out.getvalue().splitlines()]


def test_export_stage_verifies_registers_and_promotes_only_a_better_model(trained, monkeypatch):
    from tasks.evaluate import evaluate
    from tasks.export import export
    from tlops.data.manifest import load_manifest

    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(runs.PARENT_ENV, raising=False)
    name = f"test-export-{uuid.uuid4().hex[:8]}"
    raw = yaml.safe_load((trained / "params.yaml").read_text())
    (trained / "params.yaml").write_text(yaml.safe_dump(deep_update(raw, {"export": {
        "registered_model": name, "int8": True}})))
    evaluate.fn()
    first = export.fn()

    report = json.loads(paths.EXPORT_REPORT.read_text())
    metrics = json.loads(paths.METRICS.read_text())
    assert report["parity"]["agreement"] == 1.0 and report["parity"]["max_abs_diff"] <= 1e-3
    assert report["parity"]["n"] == metrics["test_images"]
    assert report["sha256"] == metadata.verify_sha256(paths.ONNX) == first["sha256"]
    assert report["test_accuracy"] == pytest.approx(metrics["finetuned"]["accuracy"])
    int8 = report["int8"]  # the gate at the default max drop: kept exactly when int8 stays within it
    assert int8["kept"] == (int8["drop"] <= 0.005 + 1e-9) == paths.INT8_ONNX.exists()
    assert (paths.INT8_DIR / "quantization.json").exists()
    assert report["promotion"]["promoted"] and report["registered"] == {"name": name, "version": first["version"]}

    meta = metadata.read_metadata(paths.ONNX)
    manifest = load_manifest(paths.MANIFEST)
    assert metadata.labels_of(meta) == manifest.classes
    assert meta["tlops.data_version"] == metrics["data_version"]
    assert runs.client().get_run(meta["tlops.mlflow_run_id"]).info.run_name == "export"
    assert meta["tlops.git_commit"] == runs.git_commit()
    card = paths.MODEL_CARD.read_text()
    assert metrics["data_version"] in card and "head only" in card and "Limits" in card

    # the pooled embedding is the second output, and the test split's statistics are the drift reference
    from serving.served_model import load_model
    from tlops.onnx import drift

    served = load_model(paths.ONNX)
    assert served.embedding_name == metadata.EMBEDDING and served.embedding_dim > 0
    assert report["drift_reference"]["split"] == "source val+test"
    assert report["drift_reference"]["images"] == metrics["test_images"] + len(manifest.rows_in("val"))
    monitor = drift.Monitor.from_metadata(meta, window=500, threshold=0.5)
    x = np.concatenate(list(iter_batches(package.labelled_test_images(manifest)[0], served.spec, 10**7)))
    y = served.run(x)
    monitor.observe(y.logits, y.embedding, served.unknown(y.ood_score))  # the test split, in its own reference
    scores = monitor.scores()
    assert not scores["drifted"] and scores["embedding"] < 0.5
    assert scores["unknown"] == pytest.approx(report["ood"]["test_flagged"])  # the service counts what evaluate did

    # calibrated, with "none of these" and an exact explanation, inside the file
    t = metadata.temperature_of(meta)
    assert t == pytest.approx(metrics["calibration"]["temperature"]) and report["calibration"]["temperature"] == t
    assert (y.ood_score > served.ood_threshold).mean() == pytest.approx(metrics["ood"]["mahalanobis"]["test_flagged"])
    assert served.explanation_kind == "image" and y.explanation is None  # computed only when asked
    explained = served.run(x[:4], explain=True)
    bias = linear_layer(exported_classifier()[0].head).bias.detach().numpy() / t
    assert np.allclose(explained.explanation.sum(axis=(2, 3)) + bias, explained.logits, atol=1e-4)

    # the README snippet reproduces the fine-tuned test accuracy of reports/metrics.json
    images, truth = package.labelled_test_images(manifest)
    predicted = run_snippet(paths.ONNX, images, monkeypatch)
    assert np.mean([p == t for p, t in zip(predicted, truth, strict=True)]) == pytest.approx(
        metrics["finetuned"]["accuracy"])

    assert registry.get_alias_version(name, registry.CHAMPION) == first["version"]
    second = export.fn()  # the same model again: new candidate, champion unchanged
    assert not second["promoted"] and second["version"] != first["version"]
    assert registry.get_alias_version(name, registry.CANDIDATE) == second["version"]
    assert registry.get_alias_version(name, registry.CHAMPION) == first["version"]
    promotion = json.loads(paths.EXPORT_REPORT.read_text())["promotion"]
    assert promotion["champion_version"] == first["version"] and promotion["champion_after"] == first["version"]


def test_export_stage_fails_on_parity_and_keeps_the_previous_model(trained, monkeypatch):
    from tasks.evaluate import evaluate
    from tasks.export import export

    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(runs.PARENT_ENV, raising=False)
    paths.ONNX.parent.mkdir(parents=True, exist_ok=True)
    paths.ONNX.write_bytes(b"previous model")
    raw = yaml.safe_load((trained / "params.yaml").read_text())
    (trained / "params.yaml").write_text(yaml.safe_dump(deep_update(raw, {"export": {"parity_atol": 1e-12}})))
    evaluate.fn()  # the temperature and the OOD fit the export builds in
    with pytest.raises(ParityError, match="max"):
        export.fn()
    assert paths.ONNX.read_bytes() == b"previous model"
    found = runs.client().search_runs([runs.experiment_id(runs.client())], "attributes.run_name = 'export'")
    assert [r.info.status for r in found] == ["FAILED"]
