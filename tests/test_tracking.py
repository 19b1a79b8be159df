"""tlops.tracking against a real sqlite MLflow store: run tree, run status on failure and signals, registry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cmd

from tlops.core.config import Params
from tlops.core.errors import ConfigError, ModelIntegrityError
from tlops.tracking import registry, runs

PARAMS = Params()

# A stage as its own process: opens stage_run, records its parent id, then sleeps if asked (to be signalled).
STAGE_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tlops.core.config import Params
    from tlops.tracking.runs import stage_run

    stage = sys.argv[1]
    with stage_run(stage, Params()) as run:
        run.log_metrics({"x": 1.0})
        Path(stage + ".out").write_text(run.run_id + " " + run.parent_run_id)
        if len(sys.argv) > 2:
            time.sleep(float(sys.argv[2]))
""")


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace as cwd, with its own experiment and no inherited parent run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(runs.EXPERIMENT_ENV, f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(runs.PARENT_ENV, raising=False)
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    return tmp_path


def runs_by_name(ws: Path) -> dict[str, list]:
    c = runs.client()
    out: dict[str, list] = {}
    for run in c.search_runs([runs.experiment_id(c)], order_by=["attributes.start_time ASC"]):
        out.setdefault(run.info.run_name, []).append(run)
    return out


def get_run(run_id: str):
    return runs.client().get_run(run_id)


def start_stage(ws: Path, stage: str, sleep_s: float) -> subprocess.Popen:
    """Run stage.py in its own process and wait until it is inside stage_run."""
    proc = subprocess.Popen([sys.executable, "stage.py", stage, str(sleep_s)], cwd=ws,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (ws / f"{stage}.out").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "stage process never entered stage_run"
        time.sleep(0.05)
    return proc


def tiny_onnx(path: Path, seed: int = 0) -> Path:
    """A 3x4x4 -> 5 linear classifier built with onnx.helper (no torch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((48, 5)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 48], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, tlops.tracking; assert 'mlflow' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tracking_uri_defaults_to_workspace_sqlite_store(ws, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert runs.tracking_uri() == f"sqlite:///{ws / 'mlflow.db'}"
    cmd = runs.ui_command()
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{ws / 'mlflow.db'}"
    assert cmd[cmd.index("--default-artifact-root") + 1] == (ws / "mlartifacts").as_uri()
    assert cmd[cmd.index("--port") + 1] == "5000"


def test_stage_runs_nest_under_the_pipeline_run(ws):
    (ws / "report.json").write_text("{}")
    with runs.pipeline_run(PARAMS) as parent:
        assert os.environ[runs.PARENT_ENV] == parent.run_id
        with runs.stage_run("train_head", PARAMS) as run:
            for epoch, loss in enumerate([0.9, 0.5, 0.3]):
                run.log_metrics({"train_loss": loss}, step=epoch)
            run.log_artifact(ws / "report.json", "reports")
            run.log_artifact(ws / "missing.json")  # skipped with a warning, not an error
        with runs.stage_run("ingest", PARAMS) as run2:
            run2.set_tags({"data_version": "abc123.dir"})  # ingest knows the new version only at its end
    assert runs.PARENT_ENV not in os.environ

    p, child = get_run(parent.run_id), get_run(run.run_id)
    assert p.info.status == "FINISHED" and p.data.tags["tlops.kind"] == "pipeline"
    assert p.data.params["head.epochs"] == "60"
    assert p.data.tags["data_version"] == "abc123.dir"
    for r in (child, get_run(run2.run_id)):
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.data.tags["stage"] == "train_head" and child.data.tags["workspace"] == str(ws)
    assert child.data.tags["device"] in ("cpu", "cuda")
    assert child.data.params["finetune.lr"] == "0.001"
    history = runs.client().get_metric_history(run.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5), (2, 0.3)]
    assert [a.path for a in runs.client().list_artifacts(run.run_id, "reports")] == ["reports/report.json"]
    assert Path(child.info.artifact_uri.removeprefix("file://")).is_relative_to(ws / "mlartifacts")


def test_stages_without_dvc_or_pipeline_share_one_parent_per_process_never_left_running(ws):
    with runs.stage_run("a", PARAMS) as a:
        assert get_run(a.parent_run_id).info.status == "RUNNING"
    assert get_run(a.parent_run_id).info.status == "FINISHED"
    with runs.stage_run("b", PARAMS) as b:
        assert get_run(b.parent_run_id).info.status == "RUNNING"
    assert a.parent_run_id == b.parent_run_id
    assert get_run(b.parent_run_id).info.status == "FINISHED"


def test_a_leftover_parent_id_of_an_ended_pipeline_is_not_reused(ws, monkeypatch):
    with runs.pipeline_run(PARAMS) as old:
        pass
    monkeypatch.setenv(runs.PARENT_ENV, old.run_id)
    with runs.stage_run("a", PARAMS) as run:
        pass
    assert run.parent_run_id != old.run_id
    assert get_run(run.parent_run_id).info.status == "FINISHED"


def test_a_raising_stage_leaves_its_run_and_the_pipeline_failed(ws):
    with pytest.raises(ValueError), runs.pipeline_run(PARAMS) as parent:
        with runs.stage_run("finetune", PARAMS) as run:
            raise ValueError("loss is nan")
    assert get_run(run.run_id).info.status == "FAILED"
    assert get_run(parent.run_id).info.status == "FAILED"


def test_a_raising_stage_under_plain_dvc_repro_fails_its_shared_parent_too(ws):
    with pytest.raises(ValueError), runs.stage_run("prepare", PARAMS) as run:
        raise ValueError("bad data")
    assert get_run(run.run_id).info.status == "FAILED"
    assert get_run(run.parent_run_id).info.status == "FAILED"


def test_keyboard_interrupt_leaves_runs_killed(ws):
    with pytest.raises(KeyboardInterrupt), runs.pipeline_run(PARAMS) as parent:
        with runs.stage_run("features", PARAMS) as run:
            raise KeyboardInterrupt
    assert get_run(run.run_id).info.status == "KILLED"
    assert get_run(parent.run_id).info.status == "KILLED"


def test_sigterm_handler_is_restored_after_the_stage(ws):
    before = signal.getsignal(signal.SIGTERM)
    with runs.stage_run("a", PARAMS):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_existing_raising_sigterm_handler_is_kept_and_its_exception_means_killed(ws):
    class TerminationSignal(BaseException):  # what Prefect's flow engine raises on SIGTERM
        pass

    def prefect_like(signum, frame):
        raise TerminationSignal

    before = signal.signal(signal.SIGTERM, prefect_like)
    try:
        with pytest.raises(TerminationSignal), runs.stage_run("a", PARAMS) as run:
            assert signal.getsignal(signal.SIGTERM) is prefect_like
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert get_run(run.run_id).info.status == "KILLED"


def test_sigterm_to_a_stage_process_leaves_its_runs_killed(ws):
    proc = start_stage(ws, "finetune", sleep_s=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    run_id, parent_id = (ws / "finetune.out").read_text().split()
    assert get_run(run_id).info.status == "KILLED"
    assert get_run(parent_id).info.status == "KILLED"


def test_kill_9_leaves_running_runs_that_reaping_marks_killed(ws):
    proc = start_stage(ws, "train_head", sleep_s=60)
    with runs.stage_run("alive", PARAMS) as alive:
        proc.kill()
        proc.wait(timeout=30)
        run_id, parent_id = (ws / "train_head.out").read_text().split()
        assert get_run(run_id).info.status == "RUNNING"
        assert runs.reap_stale_runs() == 2  # the stage and its per-process parent, not the live run
        assert get_run(alive.run_id).info.status == "RUNNING"
    assert get_run(run_id).info.status == "KILLED"
    assert get_run(parent_id).info.status == "KILLED"
    assert runs.reap_stale_runs() == 0


@pytest.mark.parametrize("cmdline, expected", [
    (["/ws/.venv/bin/python", "/ws/.venv/bin/dvc", "repro"], True),
    (["dvc", "repro"], True),
    (["python", "-m", "dvc", "repro"], True),
    (["python", "-m", "tasks.prepare"], False),
    (["/bin/sh", "-c", "python -m tasks.prepare"], False),
])
def test_dvc_processes_are_recognised_from_their_command_line(cmdline, expected):
    assert runs._is_dvc(cmdline) is expected


@pytest.mark.slow
def test_stages_of_one_dvc_repro_share_a_parent_and_the_next_repro_gets_a_new_one(ws):
    (ws / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          first:
            cmd: python stage.py first
            deps: [stage.py]
            outs: [first.out]
          second:
            cmd: python stage.py second
            deps: [first.out]
            outs: [second.out]
    """))
    run_cmd(["git", "init", "-q"], ws)
    run_cmd([sys.executable, "-m", "dvc", "init", "-q"], ws)
    run_cmd([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], ws)

    def repro(*extra: str) -> tuple[str, str]:
        run_cmd([sys.executable, "-m", "dvc", "repro", "-q", *extra], ws)
        (first, p1), (second, p2) = ((ws / f"{s}.out").read_text().split() for s in ("first", "second"))
        assert p1 == p2, "both stages of one dvc repro must share one parent run"
        for run_id in (first, second):
            assert get_run(run_id).data.tags["mlflow.parentRunId"] == p1
        parent = get_run(p1)
        assert parent.info.status == "FINISHED" and parent.data.tags["tlops.launcher"] == "dvc"
        return p1, first

    parent1, _ = repro()
    parent2, _ = repro("--force")
    assert parent1 != parent2
    names = runs_by_name(ws)
    assert len(names["first"]) == len(names["second"]) == 2 and len(names["dvc repro"]) == 2


def test_registered_onnx_model_gets_candidate_alias_and_champion_moves_only_when_set(ws):
    model1, model2 = tiny_onnx(ws / "m1.onnx", seed=1), tiny_onnx(ws / "m2.onnx", seed=2)
    example = np.zeros((4, 3, 4, 4), np.float32)
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    with runs.stage_run("export", PARAMS) as run:
        v1 = registry.log_onnx_model(model1, example, name, run_id=run.run_id, metadata={"labels": ["a", "b"]})
    assert registry.get_alias_version(name, "candidate") == v1
    assert registry.get_alias_version(name, "champion") is None
    assert registry.get_alias_version("no-such-model", "champion") is None

    registry.set_alias(name, "champion", v1)
    v2 = registry.log_onnx_model(model2, example, name)
    assert v2 != v1
    assert (registry.get_alias_version(name, "candidate"), registry.get_alias_version(name, "champion")) == (v2, v1)
    registry.set_alias(name, "champion", v2)
    assert registry.get_alias_version(name, "champion") == v2

    assert registry.download_model_file(name, v1).read_bytes() == model1.read_bytes()
    assert registry.resolve_model_uri(f"models:/{name}@champion").read_bytes() == model2.read_bytes()
    assert registry.resolve_model_uri(f"models:/{name}/{v1}").read_bytes() == model1.read_bytes()

    registry.set_version_tags(name, v2, {"promotion": "promoted", "accuracy": 0.9})
    assert registry.get_version_tags(name, v2)["accuracy"] == "0.9"
    runs.set_run_tags(run.run_id, {"promotion": "first model"})
    assert get_run(run.run_id).data.tags["promotion"] == "first model"


def test_registry_copy_with_a_flipped_byte_is_refused(ws):
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    version = registry.log_onnx_model(tiny_onnx(ws / "m.onnx"), np.zeros((1, 3, 4, 4), np.float32), name)
    path = registry.download_model_file(name, "candidate")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        registry.download_model_file(name, version)


def test_a_version_without_the_sha256_tag_is_refused_unless_allowed_and_then_logged(ws, caplog):
    import mlflow.onnx
    import onnx

    name = f"ui-{uuid.uuid4().hex[:6]}"  # registered as through MLflow's own API or UI: no sha256 tag
    with runs.stage_run("export", PARAMS) as run, registry._fluent_target(get_run(run.run_id).info.experiment_id):
        info = mlflow.onnx.log_model(onnx.load(str(tiny_onnx(ws / "m.onnx"))), name="model",
                                     registered_model_name=name, run_id=run.run_id, await_registration_for=0)
    version = str(info.registered_model_version)
    with pytest.raises(ModelIntegrityError, match="no sha256 tag"):
        registry.resolve_model_uri(f"models:/{name}/{version}")
    path = registry.resolve_model_uri(f"models:/{name}/{version}", allow_unverified=True)
    assert path.is_file() and "UNVERIFIED" in caplog.text


@pytest.mark.parametrize("data", ["../../../../etc/passwd", "/etc/passwd", "../outside.onnx"])
def test_an_mlmodel_naming_a_file_outside_its_folder_is_refused(tmp_path, data):
    folder = tmp_path / "a" / "b" / "model"
    folder.mkdir(parents=True)
    (tmp_path / "a" / "b" / "outside.onnx").write_bytes(b"x")
    (folder / "MLmodel").write_text(f"flavors:\n  onnx:\n    data: {data}\n")
    with pytest.raises(ModelIntegrityError, match="outside the model's folder"):
        registry._onnx_data_path(folder)
    (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    assert registry._onnx_data_path(folder) == (folder / "model.onnx").resolve()


def test_bad_registry_uris_name_the_expected_form(ws):
    with pytest.raises(ConfigError, match="models:/<name>@<alias>"):
        registry.resolve_model_uri("models:/just-a-name")
    with pytest.raises(ConfigError, match="no such registered model"):
        registry.resolve_model_uri("models:/no-such-model@champion")
