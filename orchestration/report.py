"""What one pipeline run did, for people: the summary dict, the Prefect artifacts and the console table."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tlops.core import paths
from tlops.core.io import read_json
from tlops.core.secrets import without_credentials

log = logging.getLogger(__name__)

LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # where `make ui` / `tlops ui` serves the local store


@dataclass(frozen=True)
class StageRecord:
    """One stage in one run: state is ran | cached | skipped | failed | not run."""

    stage: str
    state: str
    seconds: float
    reason: str = ""
    outputs_changed: bool = False
    task_seconds: float = 0.0  # inside the stage's Prefect task call; 0 when it did not run


def outcome(records: list[StageRecord]) -> str:
    """failed | updated | no change (no stage changed an output: e.g. a refresh found the same data)."""
    if any(r.state == "failed" for r in records):
        return "failed"
    return "updated" if any(r.outputs_changed for r in records) else "no change"


def summarise(records: list[StageRecord], seconds: float, data_version: str | None,
              mlflow_run_id: str | None, mlflow_url: str | None, flow_run_id: str | None) -> dict[str, Any]:
    """The run's JSON-able summary: what `run_pipeline` returns and the artifact shows."""
    status = outcome(records)
    return {
        "status": status,
        "seconds": round(seconds, 3),
        "data_version": data_version,
        "stages": [asdict(r) for r in records],
        "metrics": _accuracies(),
        "promotion": _promotion() if status == "updated" else None,  # else it is an earlier run's decision
        "mlflow_run_id": mlflow_run_id,
        "mlflow_url": mlflow_url,
        "flow_run_id": flow_run_id,
    }


MODELS = (("head", "head-only"), ("finetuned", "fine-tuned"), ("adapted", "adapted"),
          ("target_source_only", "target: source-only"), ("target_adapted", "target: adapted"))


def _read(path: Path) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _accuracies() -> dict[str, float]:
    """Test accuracy of the head-only and the fine-tuned model, from reports/metrics.json."""
    metrics = _read(paths.METRICS)
    out = {k: metrics[k]["accuracy"] for k in ("head", "finetuned", "adapted")
           if isinstance(metrics.get(k), dict) and "accuracy" in metrics[k]}
    target = metrics.get("target") if isinstance(metrics.get("target"), dict) else {}
    out |= {f"target_{k}": target[k]["accuracy"] for k in ("source_only", "adapted")
            if isinstance(target.get(k), dict) and "accuracy" in target[k]}
    return out


def _promotion() -> dict | None:
    """The promotion gate's decision: reports/export.json, else reports/metrics.json, under `promotion`."""
    for path in (paths.EXPORT_REPORT, paths.METRICS):
        decision = _read(path).get("promotion")
        if decision:
            return decision if isinstance(decision, dict) else {"decision": decision}
    return None


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run: on the tracking server, or on `make ui` for a local store."""
    remote = tracking_uri.startswith(("http://", "https://"))
    base = without_credentials(tracking_uri).rstrip("/") if remote else LOCAL_MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def markdown(summary: dict[str, Any]) -> str:
    """The Prefect markdown artifact of one run."""
    lines = [f"# tlops pipeline: {summary['status']}", "",
             f"Data version: `{summary['data_version'] or 'unknown'}`  ", f"Wall time: {summary['seconds']:.1f} s", "",
             "| stage | state | seconds | why |", "|---|---|---:|---|"]
    lines += [f"| {s['stage']} | {s['state']} | {s['seconds']:.1f} | {s['reason']} |" for s in summary["stages"]]
    if summary["status"] == "no change":
        lines += ["", "**No change**: the data and every stage are as in dvc.lock; nothing was retrained."]
    if acc := summary["metrics"]:
        lines += ["", "| model (test split) | accuracy |", "|---|---:|"]
        lines += [f"| {label} | {acc[k]:.4f} |" for k, label in MODELS
                  if k in acc]
    if promo := summary["promotion"]:
        lines += ["", f"Promotion: {promotion_line(promo)}"]
    if summary["mlflow_url"]:
        lines += ["", f"MLflow: [parent run]({summary['mlflow_url']})"]
    return "\n".join(lines) + "\n"


def promotion_line(promo: dict) -> str:
    """The gate's decision in words, e.g. "promoted: v3 becomes champion (0.981 vs 0.975)"."""
    if "promoted" not in promo:
        return ", ".join(f"{k} = {v}" for k, v in promo.items())
    verdict = "promoted" if promo["promoted"] else "not promoted"
    return f"{verdict} ({promo['reason']})" if promo.get("reason") else verdict


def console_table(summary: dict[str, Any]) -> Any:
    """A compact rich table: stage, state, seconds; the outcome and accuracies as its caption."""
    from rich.table import Table

    table = Table(title=f"tlops pipeline: {summary['status']}", title_justify="left")
    for name, justify in (("stage", "left"), ("state", "left"), ("seconds", "right"), ("why", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    colours = {"ran": "green", "cached": "cyan", "skipped": "dim", "failed": "red", "not run": "dim"}
    for s in summary["stages"]:
        colour = colours.get(s["state"], "")
        table.add_row(s["stage"], f"[{colour}]{s['state']}[/]", f"{s['seconds']:.1f}", s["reason"])
    acc = summary["metrics"]
    caption = [f"{label} accuracy {acc[k]:.4f}" for k, label in MODELS
               if k in acc]
    if summary["promotion"]:
        caption.append(promotion_line(summary["promotion"]))
    table.caption = f"{summary['seconds']:.1f} s" + ("; " + "; ".join(caption) if caption else "")
    table.caption_justify = "left"
    return table


def publish(summary: dict[str, Any]) -> None:
    """Prefect artifacts of the run: the markdown summary and a link to the MLflow parent run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    # Artifacts are for people; failing to write one must never fail (or mask the failure of) the run.
    try:
        create_markdown_artifact(markdown=markdown(summary), key="tlops-pipeline",
                                 description=f"tlops pipeline: {summary['status']}")
        if summary["mlflow_url"]:
            create_link_artifact(link=summary["mlflow_url"], link_text="MLflow parent run", key="tlops-mlflow-run",
                                 description="The MLflow run of this pipeline run; stage runs nest under it")
    except Exception as e:  # noqa: BLE001
        log.warning("could not create the Prefect artifacts of this run: %s", e)
