"""Work pools beyond `process`: orchestration/pools/prefect.yaml's Docker and Kubernetes deployments render with
prefect-docker's and prefect-kubernetes' own job-template code and validate against their schemas; the Kubernetes
template is prefect-kubernetes' default plus the GPU request; Dockerfile.train's dependency set resolves with pip."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT

from orchestration.pools import K8S_TEMPLATE, SCALE_OUT_YAML, kubernetes_gpu_template

DEPLOYMENTS = {d["name"]: d for d in yaml.safe_load(SCALE_OUT_YAML.read_text())["deployments"]}


def test_the_committed_kubernetes_template_is_prefect_kubernetes_default_plus_the_gpu():
    assert json.loads(K8S_TEMPLATE.read_text()) == kubernetes_gpu_template()


def _render(config_cls, template: dict, variables: dict):
    jsonschema.validate(variables, template["variables"])  # what the server checks when a deployment is created
    return asyncio.run(config_cls.from_template_and_values(template, variables))


def test_the_kubernetes_deployment_renders_a_job_with_one_gpu_and_the_shared_store_env():
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    spec = DEPLOYMENTS["nightly-k8s"]
    assert spec["entrypoint"] == "flows/pipeline.py:pipeline_flow" and spec["work_pool"]["name"] == "gpu-k8s"
    config = _render(KubernetesWorkerJobConfiguration, kubernetes_gpu_template(), spec["work_pool"]["job_variables"])
    container = config.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert container["image"].endswith("tlops-train:latest") and config.namespace == "tlops"
    env = {e["name"]: e["value"] for e in container["env"]} if isinstance(container["env"], list) else container["env"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://") and env["TLOPS_SYNC"] == "1"
    with pytest.raises(jsonschema.ValidationError):  # a typo in a variable is caught by the schema
        jsonschema.validate({"gpu_count": "two"}, kubernetes_gpu_template()["variables"])


def test_the_docker_deployment_renders_a_container_with_every_gpu():
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    spec = DEPLOYMENTS["nightly-docker"]
    config = _render(DockerWorkerJobConfiguration, DockerWorker.get_default_base_job_template(),
                     spec["work_pool"]["job_variables"])
    assert config.image == "tlops-train:latest"
    assert config.container_create_kwargs["device_requests"][0]["capabilities"] == [["gpu"]]
    assert config.env["MLFLOW_TRACKING_URI"].startswith("http://")


def test_the_scale_out_deployments_clone_pull_and_run_the_pipeline():
    pull = yaml.safe_load(SCALE_OUT_YAML.read_text())["pull"]
    steps = [next(iter(s)) for s in pull]
    assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory",
                     "prefect.deployments.steps.run_shell_script", "prefect.deployments.steps.run_shell_script"]
    assert "pip install --quiet --no-deps -e ." in pull[2]["prefect.deployments.steps.run_shell_script"]["script"]
    assert "dvc pull" in pull[3]["prefect.deployments.steps.run_shell_script"]["script"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dockerfile_train_dependencies_resolve_with_pip(tmp_path: Path):
    """Every `pip install` of Dockerfile.train, resolved (not downloaded) in a fresh venv: CUDA torch included."""
    text = (ROOT / "Dockerfile.train").read_text().replace("\\\n", " ")
    installs = [line.split("pip install", 1)[1].split("&&")[0] for line in text.splitlines()
                if line.startswith("RUN") and "pip install" in line]
    assert len(installs) == 2  # torch first (its own layer), then the project
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    requirements = [r.strip('"') for part in installs for r in part.split() if not r.startswith("-")]
    requirements = [str(ROOT) + r[1:] if r.startswith(".[") else r for r in requirements]
    report = tmp_path / "report.json"
    proc = subprocess.run([str(venv / "bin/pip"), "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                           str(report), *requirements], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert names["torch"] == "2.14.1" and any(re.match(r"nvidia-cuda-runtime", n) for n in names)
    assert {"tlops", "prefect-docker", "prefect-kubernetes", "dvc-s3", "transformers"} <= set(names)
