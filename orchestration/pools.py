"""Work pools beyond `process`: the Kubernetes base job template with a GPU request, for the deployments in
orchestration/pools/prefect.yaml. The pools themselves are Prefect's (prefect-docker, prefect-kubernetes workers);
tlops only adds what their default templates lack: a `gpu_count` variable that becomes the container's
`nvidia.com/gpu` limit.

    python -m orchestration.pools > orchestration/pools/k8s-gpu-job-template.json   # after a prefect-kubernetes upgrade
    prefect work-pool create gpu-k8s --type kubernetes --base-job-template orchestration/pools/k8s-gpu-job-template.json
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

K8S_TEMPLATE = Path(__file__).parent / "pools" / "k8s-gpu-job-template.json"
SCALE_OUT_YAML = Path(__file__).parent / "pools" / "prefect.yaml"


def kubernetes_gpu_template() -> dict[str, Any]:
    """prefect-kubernetes' default base job template plus `gpu_count` -> resources.limits["nvidia.com/gpu"]."""
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    template["variables"]["properties"]["gpu_count"] = {
        "title": "GPU count", "type": "integer", "minimum": 0, "default": 1,
        "description": "NVIDIA GPUs the flow run's pod requests (resources.limits nvidia.com/gpu)"}
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    return template


if __name__ == "__main__":
    print(json.dumps(kubernetes_gpu_template(), indent=2, sort_keys=True))
