"""The MLflow model registry: register an exported ONNX file, aliases, and the one resolver of `models:/` URIs.

Every registered version carries the file's sha256 as tag `sha256`; download_model_file checks it on every resolve,
so a tampered local copy is refused. mlflow is imported inside functions: importing this module costs nothing,
and the torch-free service imports it only when it serves from the registry.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlops.core import paths
from tlops.core.errors import ConfigError, ModelIntegrityError
from tlops.core.io import sha256_bytes, sha256_file
from tlops.core.secrets import redact
from tlops.onnx import runtime
from tlops.tracking.runs import client, experiment_id, registry_uri, stringify, tracking_uri

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
SCHEME = "models:/"
AUTH_ERRORS = ("UNAUTHENTICATED", "PERMISSION_DENIED")  # a tracking server's 401 and 403, as MLflow names them
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


@contextmanager
def _fluent_target(exp: str) -> Iterator[None]:
    """Point MLflow's fluent API (used by mlflow.onnx.log_model) at our store and experiment, then restore."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    os.environ["MLFLOW_EXPERIMENT_ID"] = exp
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _signature(onnx_path: Path, example: np.ndarray) -> tuple[Any, dict[str, np.ndarray]]:
    """(signature inferred from ONNX Runtime's outputs on `example`, the named input example)."""
    from mlflow.models import infer_signature

    sess = runtime.session(onnx_path, cpu_only=True)
    inputs = {sess.get_inputs()[0].name: example}
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))
    return infer_signature(inputs, outputs), inputs


def log_onnx_model(onnx_path: Path, input_example: np.ndarray, registered_model: str, run_id: str | None = None,
                   metadata: dict | None = None) -> str:
    """Log `onnx_path` with mlflow.onnx (signature + input example), register it, alias it `candidate`; return its
    version.

    The version gets the file's sha256 as tag `sha256`, which download_model_file checks.
    """
    import mlflow.onnx
    import onnx

    onnx_path = Path(onnx_path)
    proto = onnx.load_model(str(onnx_path))
    stored = proto.SerializeToString()  # mlflow.onnx re-serializes the proto: this is what the registry holds
    if sha256_bytes(stored) != sha256_file(onnx_path):
        log.warning("%s: protobuf re-serialization changed its bytes; the registry's copy differs from it", onnx_path)
    c = client()
    exp = c.get_run(run_id).info.experiment_id if run_id else experiment_id(c)
    # One row is enough to document the input; a full batch would bloat the MLmodel folder.
    signature, example = _signature(onnx_path, input_example[:1])
    with _fluent_target(exp):
        info = mlflow.onnx.log_model(
            proto, name="model", signature=signature, input_example=example,
            registered_model_name=registered_model, metadata=metadata, save_as_external_data=False,
            run_id=run_id, await_registration_for=0,
            # The flavor's known requirements: inferring them imports the model in a subprocess (~8 s).
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            onnx_execution_providers=runtime.providers())
    version = str(info.registered_model_version)
    set_version_tags(registered_model, version, {"sha256": sha256_bytes(stored), "source_file": str(onnx_path)})
    set_alias(registered_model, CANDIDATE, version)
    return version


def get_alias_version(name: str, alias: str) -> str | None:
    """Version of registered model `name` behind `alias`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str | int) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def set_version_tags(name: str, version: str | int, tags: dict[str, Any]) -> None:
    c = client()
    for k, v in stringify(tags).items():
        c.set_model_version_tag(name, str(version), k, v)


def get_version_tags(name: str, version: str | int) -> dict[str, str]:
    return dict(client().get_model_version(name, str(version)).tags)




def _version_of(c: MlflowClient, name: str, alias_or_version: str | int) -> str:
    from mlflow.exceptions import MlflowException

    ref = str(alias_or_version)
    try:
        mv = c.get_model_version(name, ref) if ref.isdigit() else c.get_model_version_by_alias(name, ref)
    except MlflowException as e:
        store = redact(c.tracking_uri)  # http://user:password@host works as a tracking URI: never print it
        if e.error_code in AUTH_ERRORS:
            raise ConfigError(f"models:/{name}@{ref}: {store} refused the credentials ({e.error_code}); set "
                              "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user that may read it"
                              ) from None
        raise ConfigError(f"models:/{name}@{ref}: no such registered model version or alias in {store}"
                          f" ({redact(e.message)})") from None
    return str(mv.version)


def download_model_file(name: str, alias_or_version: str | int, allow_unverified: bool = False) -> Path:
    """Local path of the `.onnx` file of a registered version (by alias or number), checked against its sha256.

    A version without the sha256 tag (registered through the MLflow UI or API, not by tlops) is refused unless
    allow_unverified, which is logged. Versions are immutable, so each is downloaded once into
    .tlops/registry/<store>/<name>/<version>/ (keyed by the registry too: version 1 on a tracking server is not
    version 1 in the local store).
    """
    import mlflow.artifacts

    c = client()
    version = _version_of(c, name, alias_or_version)
    target = paths.STATE_DIR / "registry" / sha256_bytes(registry_uri().encode())[:12] / name / version
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp),
                                                tracking_uri=c.tracking_uri, registry_uri=registry_uri())
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # lost a race with another downloader: theirs is as good as ours
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model_file = _onnx_data_path(target)
    expected = c.get_model_version(name, version).tags.get("sha256")
    if not expected:
        if not allow_unverified:
            raise ModelIntegrityError(f"{name} v{version} carries no sha256 tag (not registered by tlops), so its file "
                                      "cannot be verified; register it with tlops, or set serve.allow_unverified: "
                                      "true to serve it anyway")
        log.warning("serving %s v%s UNVERIFIED: it carries no sha256 tag and serve.allow_unverified is true",
                    name, version)
    elif sha256_file(model_file) != expected:
        raise ModelIntegrityError(f"{model_file}: sha256 differs from registered {name} v{version} ({expected})")
    return model_file


def _onnx_data_path(model_dir: Path) -> Path:
    """The ONNX file named by the onnx flavor of an MLmodel folder; ModelIntegrityError when the MLmodel is malformed
    or names a file outside its folder (an absolute path, ../)."""
    import yaml

    try:
        data = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))["flavors"]["onnx"]["data"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ModelIntegrityError(f"{model_dir}/MLmodel: no onnx flavor with a data file ({type(e).__name__})") \
            from None
    if not isinstance(data, str):
        raise ModelIntegrityError(f"{model_dir}/MLmodel: flavors.onnx.data must be a file name")
    root = model_dir.resolve()
    path = (root / data).resolve()
    if root not in path.parents:
        raise ModelIntegrityError(f"{model_dir}/MLmodel: flavors.onnx.data points outside the model's folder")
    return path


def is_model_uri(ref: str) -> bool:
    """Whether `ref` names a registry model (models:/...) rather than a file."""
    return ref.startswith(SCHEME)


def parse_model_uri(uri: str) -> tuple[str, str]:
    """(name, alias or version number) of `models:/<name>@<alias>` or `models:/<name>/<version>`; ConfigError else."""
    m = MODEL_URI.match(uri)
    if m is None:
        raise ConfigError(f"{uri!r}: not a registry model URI (expected models:/<name>@<alias> or "
                          "models:/<name>/<version>)")
    return m["name"], m["alias"] or m["version"]


def resolve_model_uri(uri: str, allow_unverified: bool = False) -> Path:
    """Local .onnx path for `models:/<name>@<alias>` or `models:/<name>/<version>`, checked against its sha256."""
    return download_model_file(*parse_model_uri(uri), allow_unverified=allow_unverified)
