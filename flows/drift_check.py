"""`tlops drift-check`: read a running service's GET /drift and, past its threshold, start the pipeline deployment
with adapt.target set to the inputs the service logged (serve.log_inputs), so the next model is adapted to the
traffic it now meets. A Prefect flow: run it once, or on an interval (`tlops drift-check --every 900`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
from prefect import flow

from tlops.errors import ConfigError, TlopsError

log = logging.getLogger(__name__)


def read_drift(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """The service's /drift answer; TlopsError naming the URL when it cannot be read."""
    endpoint = f"{url.rstrip('/')}/drift"
    try:
        r = httpx.get(endpoint, timeout=timeout)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise TlopsError(f"cannot read {endpoint}: {e}") from None


def describe(scores: dict[str, Any]) -> str:
    def fmt(key: str) -> str:
        v = scores.get(key)
        return "-" if v is None else f"{v:.3f}"

    return (f"window {scores.get('window', 0)}: embedding shift {fmt('embedding')} (threshold {fmt('threshold')}), "
            f"prediction JS {fmt('prediction')}, confidence drop {fmt('confidence')}")


@flow(name="drift-check", log_prints=True)
def drift_check_flow(url: str = "http://127.0.0.1:8080", deployment: str = "pipeline/nightly", method: str = "auto",
                     target: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """One check: past the threshold, start `deployment` with adapt.target = the logged inputs (or `target`)."""
    scores = read_drift(url)
    result: dict[str, Any] = {"drifted": bool(scores.get("drifted")), "scores": scores, "flow_run_id": None}
    print(f"{url}: {describe(scores)}: {'DRIFTED' if result['drifted'] else 'no drift'}")
    if not result["drifted"]:
        return result
    if scores.get("input_kind") == "text":  # adaptation reads images: drifted text traffic needs new labels
        result["action"] = "retrain"
        print("a text model is not adapted to unlabeled traffic (adapt.method must be none for text): label a sample "
              f"of the logged texts ({scores.get('log_inputs') or 'serve.log_inputs is off'}), add them to data.path "
              "and run the pipeline again")
        return result
    folder = target or scores.get("log_inputs")
    if not folder:
        raise ConfigError("the service reports drift but keeps none of its inputs: start it with serve.log_inputs "
                          "set, or pass --target <folder of target-domain images>")
    result["set_params"] = {"adapt.target": str(Path(folder).resolve()), "adapt.method": method}
    if dry_run:
        print(f"would start {deployment} with {result['set_params']}")
        return result
    waiting = pending_run(deployment, result["set_params"])
    if waiting is not None:  # drift persists until that run's model is served: one run is enough
        result["flow_run_id"], result["already_pending"] = waiting, True
        print(f"{deployment} already has a run adapting to {folder} that has not finished (flow run {waiting})")
        return result
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"set_params": result["set_params"], "refresh": True}, timeout=0)
    result["flow_run_id"] = str(run.id)
    print(f"started {deployment} (flow run {run.id}) with {result['set_params']}")
    return result


def pending_run(deployment: str, set_params: dict[str, Any]) -> str | None:
    """The id of a run of `deployment` with these set_params that is scheduled, pending or running, if any."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[target.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]))))
    same = [r for r in runs if (r.parameters or {}).get("set_params") == set_params]
    return str(same[0].id) if same else None
