"""`tlops drift-check`: read a running service's GET /drift and, past its threshold, start the pipeline deployment
with adapt.target set to the folder the operator names (--target, or serve.log_inputs), so the next model is adapted
to the traffic it now meets. The service's clients chose what that folder holds, so the run waits for a person's
approval in the Prefect UI unless --auto-approve. A Prefect flow: run it once, or on an interval (`--every 900`).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import httpx
from prefect import flow
from prefect.input import RunInput

from tlops.core.errors import ConfigError, TlopsError
from tlops.core.secrets import read_keys

log = logging.getLogger(__name__)

APPROVAL_POLL_S = 10  # how often a paused check looks for the answer
DAY_S = 24 * 3600


class Approval(RunInput):
    """Start the adaptation run? Look at a sample of the folder first: the service's clients chose its files."""

    approve: bool = False


def service_key(api_key_env: str | None, api_key_file: str | None) -> str | None:
    """The key drift-check presents (serve.api_key_env or serve.api_key_file, the first key); None when neither."""
    keys = read_keys(api_key_env, api_key_file, what="serve.api_key_env" if api_key_env else "serve.api_key_file")
    return keys[0] if keys else None


def tls_verify(ca: str | None) -> ssl.SSLContext | bool:
    """The system's CAs, or only the PEM file `ca` (a service certificate from a private CA)."""
    if ca is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--ca {ca}: not a readable PEM CA certificate ({type(e).__name__})") from None


def read_drift(url: str, key: str | None = None, ca: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The service's /drift answer; TlopsError naming the URL when it cannot be read."""
    endpoint = f"{url.rstrip('/')}/drift"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(endpoint, headers=headers, timeout=timeout, verify=tls_verify(ca))
    except httpx.HTTPError as e:
        raise TlopsError(f"cannot read {endpoint}: {e}") from None
    if r.status_code in (401, 403):
        raise TlopsError(f"{endpoint} answered {r.status_code}: " + (
            "it refused the key of serve.api_key_env / serve.api_key_file" if key else
            "it wants an API key: set serve.api_key_env or serve.api_key_file in the params"))
    try:
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


def folder_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) under `folder`, subfolders included; (0, 0) when it does not exist."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def approval_request(url: str, scores: dict[str, Any], deployment: str, set_params: dict[str, Any]) -> str:
    """What the person approving reads in the Prefect UI (Markdown): the drift, the folder, its size."""
    folder = set_params["adapt.target"]
    files, size = folder_size(Path(folder))
    return (f"**{url} has drifted**: {describe(scores)}.\n\n"
            f"Approve to start `{deployment}` with adapt.method={set_params['adapt.method']} and adapt.target = "
            f"`{folder}`: {files} files, {size / 1e6:.1f} MB ({size} bytes).\n\n"
            "The service's clients chose these files: look at a sample before approving. Leave approve off (or let "
            "the wait run out) to start nothing.")


def ask_approval(description: str, timeout_s: int) -> str:
    """'approved', 'rejected' or 'timed out': pause this flow run until a person answers in the Prefect UI."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    try:
        answer = pause_flow_run(wait_for_input=Approval.with_initial_data(description=description),
                                timeout=timeout_s, poll_interval=APPROVAL_POLL_S)
    except FlowPauseTimeout:
        return "timed out"
    return "approved" if answer.approve else "rejected"


@flow(name="drift-check", log_prints=True)
def drift_check_flow(url: str = "http://127.0.0.1:8080", deployment: str = "pipeline/nightly", method: str = "auto",
                     target: str | None = None, dry_run: bool = False, auto_approve: bool = False,
                     approval_timeout: int = DAY_S, api_key_env: str | None = None, api_key_file: str | None = None,
                     ca: str | None = None) -> dict[str, Any]:
    """One check: past the threshold, and once a person approves (or auto_approve), start `deployment` with
    adapt.target = `target`. The key is read here, by reference, so it never becomes a flow-run parameter."""
    scores = read_drift(url, service_key(api_key_env, api_key_file), ca)
    result: dict[str, Any] = {"drifted": bool(scores.get("drifted")), "scores": scores, "flow_run_id": None}
    print(f"{url}: {describe(scores)}: {'DRIFTED' if result['drifted'] else 'no drift'}")
    if not result["drifted"]:
        return result
    if scores.get("input_kind") == "text":  # adaptation reads images: drifted text traffic needs new labels
        result["action"] = "retrain"
        print("a text model is not adapted to unlabeled traffic (adapt.method must be none for text): label a sample "
              f"of the logged texts ({target or 'serve.log_inputs is off'}), add them to data.path and run the "
              "pipeline again")
        return result
    if not target:
        raise ConfigError("the service reports drift but no folder of its inputs is named: set serve.log_inputs (the "
                          "folder the service keeps its inputs in), or pass --target <folder of target-domain images>")
    result["set_params"] = {"adapt.target": str(Path(target).resolve()), "adapt.method": method}
    if dry_run:
        print(f"would start {deployment} with {result['set_params']}")
        return result
    if already_pending(result, deployment):
        return result
    if auto_approve:
        result["approval"] = "auto"
    else:
        print(f"waiting up to {approval_timeout} s for a person to approve the run in the Prefect UI")
        result["approval"] = ask_approval(approval_request(url, scores, deployment, result["set_params"]),
                                          approval_timeout)
        if result["approval"] != "approved":
            print(f"{result['approval']}: started nothing")
            return result
        if already_pending(result, deployment):  # another check's run, approved while this one waited
            return result
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"set_params": result["set_params"], "refresh": True}, timeout=0)
    result["flow_run_id"] = str(run.id)
    print(f"started {deployment} (flow run {run.id}, {result['approval']}) with {result['set_params']}")
    return result


def already_pending(result: dict[str, Any], deployment: str) -> bool:
    """Whether `deployment` has a run with these set_params that has not finished; if so, `result` names it."""
    waiting = pending_run(deployment, result["set_params"])
    if waiting is None:
        return False
    # drift persists until that run's model is served: one run is enough
    result["flow_run_id"], result["already_pending"] = waiting, True
    print(f"{deployment} already has a run adapting to {result['set_params']['adapt.target']} that has not "
          f"finished (flow run {waiting})")
    return True


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
