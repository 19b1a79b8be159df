"""Predictions to trust: the temperature, the OOD score and the explanation, as the exported module computes them
(tlops.evaluate.calibration, tlops.evaluate.ood, tlops.export.served)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tlops.evaluate import calibration, ood
from tlops.evaluate.metrics import expected_calibration_error
from tlops.export.served import Served, explanation_kind, linear_layer, served_outputs
from tlops.models.backbones import create_backbone
from tlops.models.classifier import Classifier
from tlops.models.heads import build_head
from tlops.onnx.runtime import softmax


def tiny_image_classifier(classes: int = 3, kind: str = "linear", seed: int = 0) -> Classifier:
    bb = create_backbone("tiny_test", weights="random", image_size=32)
    torch.manual_seed(seed)
    return Classifier(bb.model, build_head(kind, bb.num_features, classes, 8, 0.2)).eval()


# ---------------------------------------------------------------- calibration


def test_the_fitted_temperature_is_the_one_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 4
    y = np.array([rng.choice(5, p=p) for p in softmax(logits / 2.5)])  # labels drawn at temperature 2.5
    result = calibration.calibrate(logits[:2000], y[:2000], logits[2000:], y[2000:])
    assert result["temperature"] == pytest.approx(2.5, abs=0.25)
    before, after = result["test"]["before"], result["test"]["after"]
    assert after["ece"] < before["ece"] / 2 and after["classwise_ece"] < before["classwise_ece"]
    assert (np.argmax(logits / result["temperature"], 1) == np.argmax(logits, 1)).all()


def test_a_temperature_that_does_not_lower_the_ece_is_not_kept():
    y = np.arange(300) % 3
    logits = np.eye(3)[y] * 50.0  # right every time and sure of it: ECE 0 already
    result = calibration.calibrate(logits, y, logits, y)
    assert result["temperature"] == 1.0 and "T stays 1.0" in result["reason"]
    assert result["fitted"] != 1.0  # a temperature was fitted, and refused


def test_classwise_ece_by_hand():
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.3, 0.7], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    # class 0: bin of 0.8 (2 samples, 1 hit: |0.5 - 0.8|) and bin of 0.3 (2 samples, 0 hits: |0 - 0.3|)
    # class 1: bin of 0.2 (|0.5 - 0.2|) and bin of 0.7 (|1 - 0.7|); each weighted 1/2
    assert calibration.classwise_ece(probs, y) == pytest.approx(((0.3 + 0.3) / 2 + (0.3 + 0.3) / 2) / 2)
    assert expected_calibration_error(probs, y) == pytest.approx(0.5 * abs(0.5 - 0.8) + 0.5 * abs(1 - 0.7))


# ---------------------------------------------------------------- none of these


def test_mahalanobis_tells_far_inputs_and_flags_about_five_percent_of_known_ones():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 32)) * 3

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 3
        return centres[y] + rng.normal(size=(n, 32)), y

    train, y_train = sample(600)
    val, _ = sample(600)
    test, _ = sample(300)
    far = rng.normal(size=(200, 32)) * 3  # directions of no class
    # a second part: the same items seen at another depth, where the far-out set is ordinary
    deep = {name: rng.normal(size=(len(x), 8)) for name, x in (("train", train), ("val", val), ("test", test),
                                                                  ("far", far))}
    fit = ood.fit_parts([train, deep["train"]], y_train, 3, [val, deep["val"]])
    logits = lambda e: ood.normalised(e) @ ood.normalised(centres).T * 10  # noqa: E731 - a stand-in head
    measured = ood.measure(fit, ([val, deep["val"]], logits(val)), ([test, deep["test"]], logits(test)),
                           ([far, deep["far"]], logits(far)), "gaussian")
    kept = measured[measured["score"]]
    assert kept["auroc"] > 0.99 and kept["far_flagged"] > 0.9  # the larger part's distance counts
    assert 0.01 <= kept["test_flagged"] <= 0.12  # the threshold is the validation split's 95th percentile
    combined_val = ood.combined_score(fit, [val, deep["val"]])
    assert measured["threshold"] == kept["threshold"] == pytest.approx(np.quantile(combined_val, 0.95))
    alone = ood.mahalanobis_score(val, fit["means_0"], fit["precision_0"])
    assert measured["mahalanobis_embedding"]["threshold"] == pytest.approx(np.quantile(alone, 0.95))


# ---------------------------------------------------------------- the served module


def test_served_outputs_are_calibrated_scored_and_explained_exactly():
    model = tiny_image_classifier()
    x = torch.randn(6, 3, 32, 32)
    with torch.inference_mode():
        embedding = model.backbone(x).numpy()
        raw = model(x).numpy()
    fit = ood.fit_parts([embedding], np.arange(6) % 3, 3, [embedding])
    kind, why = explanation_kind(model, x[:2])
    assert kind == "image", why
    served = Served(model, temperature=2.0, ood=fit, explain=kind)
    out = served_outputs(served, [x.numpy()])
    assert np.allclose(softmax(out["logits"]), softmax(raw / 2.0), atol=1e-6)
    assert np.allclose(out["ood_score"], ood.combined_score(fit, [embedding]), rtol=1e-3, atol=1e-3)
    maps = out["explanation"]
    assert maps.shape == (6, 3, 8, 8)  # a class activation map per class over the 8x8 feature map
    bias = linear_layer(model.head).bias.detach().numpy() / 2.0
    assert np.allclose(maps.sum(axis=(2, 3)) + bias, out["logits"], atol=1e-5)


def test_text_shares_sum_to_the_logit_and_padding_gets_none(tmp_path):
    from text_support import make_encoder

    bb = create_backbone(f"hf:{make_encoder(tmp_path / 'enc')}", weights="random")
    torch.manual_seed(0)
    model = Classifier(bb.model, build_head("linear", bb.num_features, 3, 8, 0.0)).eval()
    ids = torch.from_numpy(bb.spec.batch(["the dog and the cat", "bread"]))
    kind, why = explanation_kind(model, ids)
    assert kind == "text", why
    served = Served(model, temperature=0.5, explain=kind)
    with torch.inference_mode():
        logits, _, _, shares = served(ids)
        raw = model(ids)
    assert torch.allclose(logits, raw / 0.5, atol=1e-5)
    bias = linear_layer(model.head).bias / 0.5
    assert torch.allclose(shares.sum(-1) + bias, logits, atol=1e-4)
    padding = ids == bb.spec.pad_id
    assert padding[1].any() and (shares[1][:, padding[1]] == 0).all()


def test_an_mlp_head_or_a_projection_after_pooling_has_no_explanation():
    mlp = tiny_image_classifier(kind="mlp")
    kind, why = explanation_kind(mlp, torch.randn(2, 3, 32, 32))
    assert kind is None and "MLP" in why
    assert "explanation" not in Served(mlp, explain=kind).outputs

    class Projected(nn.Module):  # pools, then projects (MobileNetV3's conv_head after pooling): not a plain mean
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.proj = inner, nn.Linear(32, 32)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.forward_features(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.proj(self.forward_features(x).mean(dim=(2, 3))))

    base = tiny_image_classifier()
    projected = Classifier(Projected(base.backbone), base.head).eval()
    kind, why = explanation_kind(projected, torch.randn(2, 3, 32, 32))
    assert kind is None and "projection after pooling" in why


def test_the_map_peaks_on_the_patch_that_decides_the_class():
    """Noise images whose class is only a coloured patch (1/16 of the image) at a random place: trained from scratch,
    the class activation map of the predicted class peaks on the patch (bench/trust.py measures the same on the
    pipeline's fine-tuned EfficientNet-Lite0)."""
    rng = np.random.default_rng(0)
    size, side, n = 64, 16, 480

    def make(count: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        x = rng.normal(0, 1.0, size=(count, 3, size, size)).astype(np.float32)
        y = np.arange(count) % 3
        at = rng.integers(0, size - side, size=(count, 2))
        for i in range(count):
            top, left = at[i]
            x[i, :, top:top + side, left:left + side] = -1.0
            x[i, y[i], top:top + side, left:left + side] = 2.0  # channel y bright, the others dark
        return torch.from_numpy(x), torch.from_numpy(y), at

    x, y, _ = make(n)
    model = tiny_image_classifier()
    model.train()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(6):
        for i in torch.randperm(n).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    model.eval()
    xt, yt, at = make(100)
    served = Served(model, explain="image")
    with torch.inference_mode():
        logits, _, _, maps = served(xt)
    assert (logits.argmax(1) == yt).float().mean() > 0.9
    grid = maps.shape[-1]
    cell = size / grid
    hits = 0
    for i in range(len(xt)):
        m = maps[i, int(logits[i].argmax())]
        r, c = divmod(int(m.argmax()), grid)
        top, left = at[i]
        # the peak cell's pixels overlap the patch
        hits += (r * cell < top + side and (r + 1) * cell > top and c * cell < left + side and (c + 1) * cell > left)
    assert hits / len(xt) >= 0.8


def test_a_timm_backbone_scores_two_depths_and_the_onnx_file_computes_the_same(tmp_path):
    from tlops.export.onnx_export import export_onnx
    from tlops.export.served import ood_depth, served_parts
    from tlops.export.verify import check_parity

    bb = create_backbone("efficientnet_lite0", weights="random", image_size=64)
    torch.manual_seed(0)
    model = Classifier(bb.model, build_head("linear", bb.num_features, 3, 8, 0.0)).eval()
    assert ood_depth(model.backbone) == 3  # EfficientNet's stride-16 stage
    x = np.random.default_rng(0).normal(size=(12, 3, 64, 64)).astype(np.float32)
    kind, why = explanation_kind(model, torch.from_numpy(x[:2]))
    assert kind == "image", why
    parts = served_parts(Served(model, explain=kind), [x])
    feats = [parts["part_0"], parts["part_1"]]
    assert feats[0].shape[1] == bb.num_features and feats[1].shape[1] == 112
    fit = ood.fit_parts(feats, np.arange(12) % 3, 3, feats)
    served = Served(model, temperature=1.5, ood=fit, explain=kind)
    path = export_onnx(served, 64, tmp_path / "model.onnx", 17, served.outputs)
    stats = check_parity(path, served, [x[:6], x[6:]], atol=1e-3)  # every output: logits, embedding, OOD, maps
    assert stats["agreement"] == 1.0 and set(stats["outputs"]) == {"embedding", "ood_score", "explanation"}
    out = served_outputs(served, [x])
    assert np.allclose(out["ood_score"], ood.combined_score(fit, feats), rtol=1e-3, atol=1e-2)
