"""Text classification through the one pipeline: data (textfolder, csv), validation, the tiny encoder, the stages,
ONNX export with the tokenizer inside, and the README's text snippet."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import runpy
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_stage_tasks, text_params, use_copy, write_params
from serving_support import ThreadServer, http, serve_params, wait_for
from text_support import TOPICS, make_texts

from tlops.core import paths
from tlops.core.config import parse_params
from tlops.core.errors import ConfigError
from tlops.data.manifest import load_manifest
from tlops.onnx import metadata, runtime

TEXT_SNIPPET = ROOT / "docs" / "onnx_text_snippet.py"

@pytest.fixture
def text_trained(text_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_copy(text_workspace, tmp_path / "text", monkeypatch)


def run_stages(ws: Path, stages: tuple[str, ...], mlflow_store: str) -> None:
    run_stage_tasks(ws, stages, mlflow_store, "text-tests")


# ---------------------------------------------------------------- params


def test_label_smoothing_auto_smooths_texts_only_and_a_value_is_kept():
    text = {"data": {"source": "textfolder", "path": "t"}}
    assert parse_params({**text, "finetune": {"label_smoothing": "auto"}}).finetune.label_smoothing == 0.1
    assert parse_params(text).finetune.label_smoothing == 0.1
    assert parse_params({"finetune": {"label_smoothing": "auto", "lr": 0.002}}).finetune.label_smoothing == 0.0
    assert parse_params({"finetune": {"lr": 0.002}}).finetune.lr == 0.002
    assert parse_params({**text, "finetune": {"label_smoothing": 0.05}}).finetune.label_smoothing == 0.05
    with pytest.raises(ConfigError, match="finetune.label_smoothing"):
        parse_params({"finetune": {"label_smoothing": "some"}})

def test_backbone_auto_follows_the_data_and_a_mismatch_names_both():
    assert parse_params({"data": {"source": "textfolder", "path": "t"}}).model.backbone == "minilm_l6"
    assert parse_params({}).model.backbone == "efficientnet_lite0"
    assert parse_params({"model": {"backbone": "auto"}}).model.backbone == "efficientnet_lite0"
    with pytest.raises(ConfigError, match="reads images but data.source textfolder gives texts"):
        parse_params({"data": {"source": "textfolder", "path": "t"}, "model": {"backbone": "resnet18"}})
    with pytest.raises(ConfigError, match="reads texts but data.source digits gives images"):
        parse_params({"model": {"backbone": "minilm_l6"}})
    with pytest.raises(ConfigError, match="adapt.method must be none for text"):
        parse_params({"data": {"source": "csv", "path": "t.csv"}, "adapt": {"method": "adabn", "target": "x"}})


# ---------------------------------------------------------------- data


def test_prepare_quarantines_each_bad_text_normalises_and_deduplicates(workspace: Path, encoder_dir: Path,
                                                                       mlflow_store: str) -> None:
    src = workspace.parent / "texts"
    make_texts(src, per_class=6)
    bad = {"animal/latin1.txt": ("caf\xe9 au lait".encode("latin-1"), "not_utf8"),
           "food/blank.txt": (b" \n\t \r\n", "empty_text"),
           "food/zero.txt": (b"", "empty_text"),
           "tool/binary.txt": (b"\x00\x01\x02PK\x03\x04", "binary")}
    for rel, (data, _) in bad.items():
        (src / rel).write_bytes(data)
    nfc, nfd = unicodedata.normalize("NFC", "café crème brûlée"), unicodedata.normalize("NFD", "café crème  brûlée")
    (src / "food/nfc.txt").write_text(nfc + "\n", encoding="utf-8")
    (src / "food/nfd.txt").write_text("\ufeff" + nfd.replace(" ", "\t ", 1), encoding="utf-8")  # BOM, NFD, tabs
    (src / "tool/long.txt").write_text("hammer " * 100, encoding="utf-8")
    write_params(workspace, text_params(src, encoder_dir, data={"max_chars": 200}))
    run_stages(workspace, ("ingest", "prepare"), mlflow_store)
    report = json.loads((workspace / "reports/data.json").read_text())
    got = {q["path"].removeprefix("data/raw/"): q["reason"] for q in report["quarantined"]}
    assert got == {rel: reason for rel, (_, reason) in bad.items()}
    assert report["duplicates"][0]["kept"].endswith("food/nfc.txt")
    assert report["duplicates"][0]["dropped"][0].endswith("food/nfd.txt")
    assert report["text"]["truncated"] == 1 and report["text"]["longest_chars"] == 200
    manifest = (workspace / paths.MANIFEST).read_text().splitlines()
    assert manifest[0] == "path,label,split,sha256,width,height"
    long_row = next(r for r in manifest if r.startswith("data/raw/tool/long.txt")).split(",")
    assert int(long_row[4]) == 200 and int(long_row[5]) == len(("hammer " * 100)[:200].split())


def test_split_is_stable_as_texts_are_added(workspace: Path, encoder_dir: Path, mlflow_store: str) -> None:
    src = workspace.parent / "texts"
    make_texts(src, per_class=8)
    write_params(workspace, text_params(src, encoder_dir))

    def splits() -> dict[str, str]:
        run_stages(workspace, ("ingest", "prepare"), mlflow_store)
        rows = (workspace / paths.MANIFEST).read_text().splitlines()[1:]
        return {r.split(",")[0]: r.split(",")[2] for r in rows}

    before = splits()
    for label, words in TOPICS.items():
        for i in range(12):
            (src / label / f"more_{i:03d}.txt").write_text(f"{label} {i}: {words[: 10 + 3 * i]}", "utf-8")
    after = splits()
    assert len(after) == len(before) + 36
    assert {p: after[p] for p in before} == before


def test_csv_source_renames_columns_and_refuses_what_cannot_be_a_class(workspace: Path, encoder_dir: Path,
                                                                       mlflow_store: str) -> None:
    rows = ["body,topic"] + [f'"{w} and {w}, {i}",{label}' for label, words in TOPICS.items()
                             for i, w in enumerate(words.split()[:6])] + ['"",tool']
    csv_path = workspace.parent / "texts.csv"
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    write_params(workspace, text_params(csv_path, encoder_dir, data={"source": "csv", "text_column": "body",
                                                                     "label_column": "topic"}))
    run_stages(workspace, ("ingest", "prepare"), mlflow_store)
    report = json.loads((workspace / "reports/data.json").read_text())
    assert report["totals"]["images"] == 18 and sorted(report["classes"]) == sorted(TOPICS)
    assert [q["reason"] for q in report["quarantined"]] == ["empty_text"]
    text = next((workspace / "data/raw/animal").glob("*.txt")).read_text("utf-8")
    assert " and " in text and "," in text  # the quoted field, comma and all
    csv_path.write_text("text,label\nhello,../escape\n", encoding="utf-8")
    write_params(workspace, text_params(csv_path, encoder_dir, data={"source": "csv"}))
    from tlops.core.config import load_params
    from tlops.core.errors import DataError
    from tlops.data.sources import ingest_source

    with pytest.raises(DataError, match="cannot name a class folder"):
        ingest_source(load_params().data)
    csv_path.write_text("words,label\nhello,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="no column 'text'"):
        ingest_source(load_params().data)


def test_features_cache_by_text_content(workspace: Path, encoder_dir: Path, mlflow_store: str, capsys) -> None:
    src = workspace.parent / "texts"
    make_texts(src, per_class=6)
    write_params(workspace, text_params(src, encoder_dir))
    run_stages(workspace, ("ingest", "prepare", "features"), mlflow_store)
    assert "18 extracted, 0 cached" in capsys.readouterr().out
    (src / "food" / "new.txt").write_text("soup and bread with honey", "utf-8")
    (src / "food" / "renamed.txt").write_bytes((src / "food" / "text_000.txt").read_bytes())
    (src / "food" / "text_000.txt").unlink()  # renamed: the same text, so the same cached feature
    run_stages(workspace, ("ingest", "prepare", "features"), mlflow_store)
    assert "1 extracted, 18 cached, 19 rows" in capsys.readouterr().out


# ---------------------------------------------------------------- the pipeline


def test_every_stage_runs_on_text(text_trained: Path) -> None:
    metrics = json.loads((text_trained / "reports/metrics.json").read_text())
    # a random-init tiny encoder: what it reaches is not the point here; that every stage ran on the texts and that the
    # report, the confusion table and the manifest agree is
    with open(text_trained / "reports/confusion.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_rows = load_manifest(text_trained / "data/prepared/manifest.csv").rows_in("test")
    assert len(rows) == metrics["test_images"] == len(test_rows) > 0
    assert metrics["exported"]["accuracy"] == pytest.approx(sum(r["actual"] == r["predicted"] for r in rows) / len(rows))
    assert sorted(r["actual"] for r in rows) == sorted(r.label for r in test_rows)
    assert metrics["baseline"]["model"] == "tfidf_logreg" and metrics["baseline"]["accuracy"] > 0.5
    worst = (text_trained / "reports/plots/worst.md").read_text()
    assert worst.startswith("# Most confident errors") and "| true | predicted |" in worst
    export = json.loads((text_trained / "reports/export.json").read_text())
    assert export["parity"]["agreement"] == 1.0 and export["parity"]["n"] == metrics["test_images"]
    assert export["int8"]["format"] == "dynamic" and export["int8"]["kept"]
    info = json.loads((text_trained / paths.FINETUNE_INFO).read_text())
    assert info["encoder_config"]["model_type"] == "bert" and info["preprocess"]["kind"] == "text"
    card = (text_trained / paths.MODEL_CARD).read_text()
    assert "Classifying texts" in card and "tlops.tokenizer" in card


def test_exported_file_alone_tokenises_and_classifies_like_pytorch(text_trained: Path) -> None:
    import torch

    from tlops.export.served import linear_layer
    from tlops.models.classifier import load_classifier

    meta = metadata.read_metadata(paths.ONNX)
    assert set(meta) == set(metadata.KEYS) | set(metadata.TEXT_KEYS)
    assert meta[metadata.INPUT_KIND] == "text"
    assert json.loads(meta[metadata.TOKENIZER])["model"]["type"] == "WordPiece"
    spec = metadata.spec_of(meta)
    texts = ["the dog and the cat", "  Soup\twith  bread\n", "hammer " * 60, "Café crème"]
    x = spec.batch(texts)  # what the service does with raw strings, from the file's own metadata
    assert x.shape[1] == spec.max_tokens == 24  # the long one is cut to model.max_tokens
    onnx_logits = runtime.session(paths.ONNX).run(["logits"], {"input": x})[0]
    model, info = load_classifier(paths.ADAPT_DIR)
    one_by_one = [runtime.session(paths.ONNX).run(["logits"], {"input": x[i : i + 1, : int((x[i] != 0).sum())]})[0]
                  for i in range(len(texts))]
    with torch.inference_mode():
        torch_logits = model(torch.from_numpy(x)).numpy() / metadata.temperature_of(meta)  # calibrated in the file
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(one_by_one), onnx_logits, atol=1e-4)  # padding changes nothing
    # each token's share of each logit, computed by the file: with the bias / T they sum to the logit
    assert metadata.explanation_of(meta) == "text"
    shares = runtime.session(paths.ONNX).run(["explanation"], {"input": x})[0]
    bias = linear_layer(model.head).bias.detach().numpy() / metadata.temperature_of(meta)
    np.testing.assert_allclose(shares.sum(-1) + bias, onnx_logits, atol=1e-4)
    padding = x == spec.pad_id
    assert padding.any() and (shares.transpose(0, 2, 1)[padding] == 0).all()  # padding decides nothing


def test_readme_shows_the_text_snippet_and_it_predicts_as_tlops(text_trained: Path, monkeypatch) -> None:
    assert TEXT_SNIPPET.read_text().strip() in (ROOT / "docs" / "text.md").read_text()
    imports = [line for line in TEXT_SNIPPET.read_text().splitlines() if line.startswith(("import", "from"))]
    assert all("tlops" not in line and "torch" not in line for line in imports)
    texts = ["dog cat horse", "bread and   cheese", "a saw, a drill and a vise " * 20, "the old wolf"]
    monkeypatch.setattr(sys, "argv", [str(TEXT_SNIPPET), str(paths.ONNX), *texts])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(TEXT_SNIPPET), run_name="__main__")
    got = [line.split("\t")[:2] for line in out.getvalue().splitlines()]
    spec = metadata.spec_of(metadata.read_metadata(paths.ONNX))
    logits = runtime.session(paths.ONNX).run(["logits"], {"input": spec.batch(texts)})[0]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = json.loads(metadata.read_metadata(paths.ONNX)[metadata.LABELS])
    assert got == [[labels[int(r.argmax())], f"{r.max():.3f}"] for r in p]


# ---------------------------------------------------------------- serving and predict


@pytest.fixture
def text_server(text_trained: Path):
    with ThreadServer(serve_params(max_text_chars=500, max_body_bytes=100_000), str(paths.ONNX)) as server:
        wait_for(f"{server.url}/v2/health/ready")
        yield server


def test_predict_answers_text_plain_json_and_text_files(text_server) -> None:
    url = f"{text_server.url}/predict"
    one = http().post(url, content="dog and cat and horse".encode(), headers={"content-type": "text/plain"})
    assert one.status_code == 200, one.text
    label = one.json()["predictions"][0]["top_k"][0]["label"]
    many = http().post(url, json={"texts": ["dog and cat and horse", "bread cheese"]})
    assert many.status_code == 200 and [p["index"] for p in many.json()["predictions"]] == [0, 1]
    assert many.json()["predictions"][0]["top_k"][0]["label"] == label
    files = http().post(url, files=[("file", ("a.txt", b"dog and cat and horse", "text/plain"))])
    assert files.json()["predictions"][0]["filename"] == "a.txt"
    assert files.json()["predictions"][0]["top_k"][0]["label"] == label


@pytest.mark.parametrize("kwargs, status, reason", [
    ({"content": b"caf\xe9", "headers": {"content-type": "text/plain"}}, 400, "not_utf8"),
    ({"content": b"   \n ", "headers": {"content-type": "text/plain"}}, 400, "empty_text"),
    ({"content": b"x" * 501, "headers": {"content-type": "text/plain"}}, 413, "text_too_long"),
    ({"content": b"PK\x03\x04\x00\x00", "headers": {"content-type": "text/plain"}}, 400, "binary"),
    ({"json": {"texts": []}}, 400, None),
    ({"json": {"texts": ["ok", 3]}}, 400, None),
    ({"json": {"texts": ["ok"] * 257}}, 400, "too_many_samples"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
])
def test_predict_refuses_bad_texts_clearly(text_server, kwargs, status, reason) -> None:
    r = http().post(f"{text_server.url}/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.json().get("reason") == reason and r.json()["error"]
    assert http().get(f"{text_server.url}/v2/health/ready").status_code == 200


def test_v2_bytes_text_input_json_and_binary(text_server) -> None:
    import tritonclient.http as thttp

    name = text_server.service.source.name
    meta = http().get(f"{text_server.url}/v2/models/{name}").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                              {"name": "input", "datatype": "INT64", "shape": [-1, -1]}]
    assert "tokenizer" not in meta["parameters"] and meta["parameters"]["input_kind"] == "text"
    texts = np.array([b"dog and cat", "brûlée and honey".encode(), b"a hammer"], dtype=object)
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": [t.decode() for t in texts]}],
            "outputs": [{"name": "logits"}, {"name": "label"}]}
    js = http().post(f"{text_server.url}/v2/models/{name}/infer", json=body).json()
    client = thttp.InferenceServerClient(text_server.url.removeprefix("http://"))
    inp = thttp.InferInput("text", [3], "BYTES")
    inp.set_data_from_numpy(texts)  # binary by default
    binary = client.infer(name, [inp], outputs=[thttp.InferRequestedOutput("logits"),
                                                thttp.InferRequestedOutput("label")])
    np.testing.assert_allclose(binary.as_numpy("logits"), np.array(js["outputs"][0]["data"]).reshape(3, -1),
                               atol=1e-5)
    assert [b.decode() for b in binary.as_numpy("label")] == js["outputs"][1]["data"]
    spec = metadata.spec_of(metadata.read_metadata(paths.ONNX))
    ids = thttp.InferInput("input", [1, 4], "INT64")
    ids.set_data_from_numpy(spec.batch(["dog and cat"])[:, :4].astype(np.int64))
    assert client.infer(name, [ids]).as_numpy("logits").shape == (1, 3)
    client.close()


def test_v2_refuses_image_inputs_and_bad_token_ids_on_a_text_model(text_server) -> None:
    name = text_server.service.source.name
    url = f"{text_server.url}/v2/models/{name}/infer"
    for inp, needle in [({"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12}, "reads text"),
                        ({"name": "input", "datatype": "INT64", "shape": [1, 2], "data": [0, 10**6]}, "token ids"),
                        ({"name": "input", "datatype": "INT64", "shape": [1, 99], "data": [1] * 99}, "max_tokens"),
                        ({"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}, "BYTES")]:
        r = http().post(url, json={"inputs": [inp]})
        assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_micro_batches_of_texts_pad_to_the_longest(text_trained: Path) -> None:
    from serving.served_model import load_model

    model = load_model(paths.ONNX)
    a, b = model.spec.batch(["dog"]), model.spec.batch(["bread cheese apple soup rice pasta salad"])
    joined = model.join([a, b])
    assert joined.shape == (2, b.shape[1]) and (joined[0, a.shape[1]:] == model.spec.pad_id).all()
    np.testing.assert_allclose(model.logits(joined), np.concatenate([model.logits(a), model.logits(b)]), atol=1e-5)


def test_tlops_predict_text_and_text_files(text_trained: Path) -> None:
    from typer.testing import CliRunner

    from tlops.cli import app

    (text_trained / "q.txt").write_text("bread and cheese", "utf-8")
    r = CliRunner().invoke(app, ["predict", "--text", "dog and cat", "--text", "  ", "q.txt", "--json",
                                 "--model", str(paths.ONNX)])
    results = json.loads(r.stdout)
    assert r.exit_code == 1  # the blank text is unusable
    assert results[0]["text"] == "dog and cat" and results[0]["top_k"][0]["label"] in TOPICS
    assert results[1]["reason"] == "empty_text" and results[2]["text"] == "q.txt"
    r = CliRunner().invoke(app, ["predict", "--text", "caf\udce9", "--json", "--model", str(paths.ONNX)])
    assert r.exit_code == 1 and json.loads(r.stdout)[0]["reason"] == "not_utf8"  # a Latin-1 argument, as Python sees it
    r = CliRunner().invoke(app, ["predict", "q.txt", "--json", "--model", str(paths.ONNX)])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["top_k"][0]["label"] == results[2]["top_k"][0]["label"]


# ---------------------------------------------------------------- the packaged encoder


def test_packaged_minilm_matches_its_config_and_embeds_paraphrases_closer() -> None:
    import torch

    from tlops.models.encoders import encoder_files, packaged_minilm

    files = packaged_minilm()
    cfg = files.config
    assert files.state["embeddings.word_embeddings.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert sum(k.startswith("encoder.layer.") and k.endswith("attention.self.query.weight") for k in files.state) == \
        cfg["num_hidden_layers"] == 6
    from tlops.models.backbones import create_backbone

    bb = create_backbone("minilm_l6")
    assert bb.num_features == 384 and len(bb.groups) == 7 and bb.spec.max_tokens == 128
    with torch.inference_mode():
        e = bb.model(torch.from_numpy(bb.spec.batch(["A man is eating food.", "A man is eating a piece of bread.",
                                                     "The stock market fell sharply today."])))
    e = torch.nn.functional.normalize(e, dim=1)
    assert float(e[0] @ e[1]) > 0.6 > 0.2 > float(e[0] @ e[2])
    assert encoder_files("minilm_l6", "random").state is None


def test_grpc_takes_bytes_texts(text_trained: Path) -> None:
    import tritonclient.grpc as tgrpc
    from serving_support import free_port

    port = free_port()
    with ThreadServer(serve_params(grpc_port=port), str(paths.ONNX)) as server:
        wait_for(f"{server.url}/v2/health/ready")
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        name = server.service.source.name
        inp = tgrpc.InferInput("text", [2], "BYTES")
        inp.set_data_from_numpy(np.array([b"dog and cat", b"bread"], dtype=object))
        result = client.infer(name, [inp], outputs=[tgrpc.InferRequestedOutput("label")])
        js = http().post(f"{server.url}/predict", json={"texts": ["dog and cat", "bread"]}).json()
        assert [b.decode() for b in result.as_numpy("label")] == [p["top_k"][0]["label"] for p in js["predictions"]]
        client.close()


def test_drift_on_text_traffic_asks_for_labels_not_adaptation(text_trained: Path) -> None:
    from flows.drift_check import drift_check_flow

    with ThreadServer(serve_params(drift_window=64, drift_threshold=0.01), str(paths.ONNX)) as server:
        wait_for(f"{server.url}/v2/health/ready")
        odd = [f"zq{i} xv{i * 7} !!! ###" for i in range(64)]  # nothing like the training texts
        assert http().post(f"{server.url}/predict", json={"texts": odd}).status_code == 200
        scores = http().get(f"{server.url}/drift").json()
        assert scores["input_kind"] == "text" and scores["window"] == 64 and scores["drifted"], scores
        result = drift_check_flow.fn(url=server.url)
    assert result["drifted"] and result["action"] == "retrain" and result["flow_run_id"] is None


def test_an_encoder_folder_without_weights_needs_weights_random(tmp_path: Path, encoder_dir: Path) -> None:
    import shutil

    from tlops.models.backbones import create_backbone

    folder = tmp_path / "no-weights"
    shutil.copytree(encoder_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no weights"):
        create_backbone(f"hf:{folder}")
    assert create_backbone(f"hf:{folder}", "random").weights_id == "random"
    same = create_backbone(f"hf:{encoder_dir}")
    assert same.spec.pad_id == 0 and same.model.pad_id == 0 and same.weights_id != "random"
