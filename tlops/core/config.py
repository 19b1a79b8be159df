"""Schema of params.yaml: the only source of hyperparameters.

The defaults here equal params.yaml's values (tests/test_config.py holds them to it), so a key left out of a
user's params.yaml means what the project's params.yaml says.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlops.core.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"
PARAMS_ENV = "TLOPS_PARAMS"

TEXT_SOURCES = ("textfolder", "csv")  # data sources of texts (tlops.inputs.text.SOURCES)
DEFAULT_IMAGE_BACKBONE = "efficientnet_lite0"
DEFAULT_TEXT_BACKBONE = "minilm_l6"


def is_text_backbone(name: str) -> bool:
    """minilm_l6 (packaged) and hf:<Hugging Face model id or local folder> are text encoders."""
    return name == DEFAULT_TEXT_BACKBONE or name.startswith("hf:")


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NearDuplicateParams(Section):
    phash_bits: Annotated[int, Field(ge=0, le=16)] = 4
    thumbnail_grey: Annotated[float, Field(ge=0.0, le=32.0)] = 1.5


class DataParams(Section):
    source: str = "digits"
    path: str | None = None
    download: bool = False
    max_pixels: PositiveInt = 40_000_000
    min_per_class: PositiveInt = 5
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15
    split_salt: str = "tlops"
    imbalance_ratio: Annotated[float, Field(ge=1.0)] = 3.0
    near_duplicates: NearDuplicateParams | None = NearDuplicateParams()
    intensity: Literal["auto", "minmax", "percentile", "window"] = "auto"
    window: tuple[float, Annotated[float, Field(gt=0.0)]] | None = None
    dicom_frames: Literal["middle", "all"] = "middle"
    group_by: str = "none"
    text_column: Annotated[str, Field(min_length=1)] = "text"  # csv: the column holding the text
    label_column: Annotated[str, Field(min_length=1)] = "label"  # csv: the column holding the class
    max_chars: PositiveInt = 20_000  # text: longer texts are kept, cut to this many characters (counted in the report)
    label_issues: Literal["report", "drop", "off"] = "report"  # the label audit's flags: report, or drop from training

    @property
    def modality(self) -> str:
        """What the source's items are: text (textfolder, csv) or image (everything else)."""
        return "text" if self.source in TEXT_SOURCES else "image"

    @field_validator("group_by")
    @classmethod
    def _group_rule(cls, v: str) -> str:
        if v in ("none", "patient"):
            return v
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"must be none, patient or a regular expression on the path ({e})") from None
        return v

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in ("digits", "imagefolder", *TEXT_SOURCES) or (v.startswith("torchvision:") and len(v) > 12):
            return v
        raise ValueError("must be digits, imagefolder, textfolder, csv or torchvision:<DatasetName>")

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.source == "imagefolder" and not self.path:
            raise ValueError("source imagefolder needs data.path (a folder of <class>/<image>)")
        if self.source == "textfolder" and not self.path:
            raise ValueError("source textfolder needs data.path (a folder of <class>/<text>.txt)")
        if self.source == "csv" and not self.path:
            raise ValueError("source csv needs data.path (a CSV file with text and label columns)")
        if self.intensity == "window" and self.window is None:
            raise ValueError("intensity window needs data.window: [center, width]")
        return self


class ModelParams(Section):
    backbone: str = "auto"  # auto: efficientnet_lite0 for images, minilm_l6 for text (Params resolves it)
    weights: str | None = None
    image_size: Annotated[int, Field(ge=16, le=1024)] | None = 96
    max_tokens: Annotated[int, Field(ge=8, le=4096)] = 128  # text: longer texts are cut to this many tokens

    @property
    def modality(self) -> str:
        """What the backbone reads: text (minilm_l6, hf:<id or folder>) or image (timm's)."""
        return "text" if is_text_backbone(self.backbone) else "image"


class FeaturesParams(Section):
    batch_size: PositiveInt = 64
    augment_views: Annotated[int, Field(ge=0, le=32)] = 2
    num_workers: PositiveInt | None = None
    num_threads: PositiveInt | None = None


class HeadParams(Section):
    kind: Literal["linear", "mlp"] = "linear"
    hidden: PositiveInt = 256
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    epochs: PositiveInt = 60
    batch_size: PositiveInt = 128
    lrs: Annotated[list[PositiveFloat], Field(min_length=1)] = [0.003, 0.01]
    weight_decays: Annotated[list[Annotated[float, Field(ge=0.0)]], Field(min_length=1)] = [1e-4, 1e-3]
    patience: PositiveInt = 10
    class_weighting: bool | Literal["auto"] = "auto"
    seed: int = 42


class AuditParams(Section):
    folds: Annotated[int, Field(ge=2, le=20)] = 5  # heads trained for out-of-fold probabilities of the training items
    l2: Annotated[float, Field(ge=0.0)] = 0.003  # the L2 penalty of those (linear) heads


class AugmentParams(Section):
    random_resized_crop: tuple[Fraction | Literal[1.0], Fraction | Literal[1.0]] | None = (0.8, 1.0)
    hflip: bool = False

    @field_validator("random_resized_crop")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError("must be [min_scale, max_scale] with min_scale <= max_scale")
        return v


class FinetuneParams(Section):
    epochs: PositiveInt = 4
    unfreeze_groups: Annotated[int, Field(ge=0)] = 3
    unfreeze_every: Annotated[int, Field(ge=0)] = 0
    lr: PositiveFloat = 1e-3
    lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    head_lr: PositiveFloat = 1e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    patience: PositiveInt = 3
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # auto (or absent): by modality (Params)
    batchnorm: Literal["frozen", "train"] = "frozen"
    batch_size: PositiveInt = 32
    class_weighting: bool | Literal["auto"] = "auto"
    augment: AugmentParams = AugmentParams()
    views: PositiveInt | None = None
    trunk_cache: bool = True
    trunk_cache_max_gb: PositiveFloat = 2.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 0
    num_threads: PositiveInt | None = None
    seed: int = 42
    processes: PositiveInt | Literal["auto"] = 1  # data-parallel ranks (torch.distributed); auto: one per GPU


class EvaluateParams(Section):
    metric: Literal["auto", "accuracy", "balanced_accuracy", "macro_f1"] = "auto"
    promote_min_delta: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    worst_k: PositiveInt = 16
    calibrate: bool = True  # a temperature fitted on the validation split, kept only if it lowers the validation ECE
    far_out: str = "auto"  # inputs of no known class for the OOD score: auto | digits | photos | docstrings | a folder


class ExportParams(Section):
    opset: Annotated[int, Field(ge=13, le=21)] = 17
    parity_atol: PositiveFloat = 1e-3
    int8: bool = True
    int8_max_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.005
    calibration_images: PositiveInt = 128
    registered_model: Annotated[str, Field(min_length=1)] = "tlops-classifier"


class AdaptParams(Section):
    method: Literal["none", "adabn", "self_training", "mcc", "auto"] = "none"
    target: str | None = None
    test_fraction: Fraction = 0.2
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 2e-3
    head_lr: PositiveFloat = 2e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    class_share: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    target_weight: Annotated[float, Field(ge=0.0)] = 1.0
    mcc_temperature: PositiveFloat = 2.5
    batchnorm: Literal["source", "mixed"] = "source"
    unfreeze_groups: Annotated[int, Field(ge=0)] | None = None
    max_source_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    race_min_epochs: Annotated[int, Field(ge=0)] = 1
    seed: int = 42

    @model_validator(mode="after")
    def _needs_target(self) -> AdaptParams:
        if self.method != "none" and not self.target:
            raise ValueError(f"method {self.method} needs adapt.target (a folder of target-domain images)")
        return self


class Distribution(Section):
    """One searched key of tune.space: {low, high} (log: sampled on a log scale; step: a grid) or {choices: [...]}.
    Integer bounds search integers."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: PositiveFloat | None = None
    choices: Annotated[list[Any], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low and high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together")
        return self


UNTUNED = ("tune", "serve", "schedule", "data.source", "data.path", "data.split_salt", "export.registered_model")


class TuneParams(Section):
    space: dict[str, Distribution] = {}
    head_trials: Annotated[int, Field(ge=0)] = 40
    trials: Annotated[int, Field(ge=0)] = 12
    budget_s: PositiveFloat = 3600
    concurrency: PositiveInt = 1
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: Annotated[int, Field(ge=0)] = 3
    min_gain_se: Annotated[float, Field(ge=0.0)] = 2.0
    storage: str | None = None
    study: str | None = None
    seed: int = 42


ROUTE_GROUPS = ("inference", "metadata", "metrics", "drift")  # what serve.api_key_routes may name; health is open


class ServeParams(Section):
    model: str = "models/model.onnx"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    top_k: PositiveInt = 5
    max_batch: PositiveInt = 32
    max_wait_ms: Annotated[float, Field(ge=0.0)] = 0  # > 0: a lone request waits this long for company
    max_queue: PositiveInt = 256
    max_inflight_samples: PositiveInt = 512  # decoded samples held at once, service-wide; past it: 503
    timeout_ms: PositiveFloat = 10_000
    max_body_bytes: PositiveInt = 10_000_000
    max_text_chars: PositiveInt = 100_000  # text models: a longer text is refused (413), not cut
    max_pixels: PositiveInt = 40_000_000
    max_request_pixels: PositiveInt = 100_000_000  # all images of one request together, read from their headers
    reload_s: Annotated[float, Field(ge=0.0)] = 30
    threads: PositiveInt | None = None
    grpc_port: Annotated[int, Field(ge=0, le=65535)] | None = 8081
    drift_window: Annotated[int, Field(ge=0)] = 500  # 0: off
    drift_threshold: PositiveFloat = 1.0
    log_inputs: str | None = None
    log_sample: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    log_max_bytes: PositiveInt = 1_000_000_000
    # Who may call: keys by reference (an environment variable's name, or a file), never the key itself.
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_key_routes: list[Literal["inference", "metadata", "metrics", "drift"]] = list(ROUTE_GROUPS)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: mutual TLS, clients must present a certificate this CA signed
    allowed_hosts: list[str] | None = None  # Host header names; None: localhost names on loopback, else any
    cors_origins: list[str] = []
    allow_unverified: bool = False  # serve a registry version that carries no sha256 tag (logged)
    # Connection limits: each bounds what one slow or greedy client can hold.
    limit_concurrency: PositiveInt = 512  # HTTP connections + requests at once; past it: 503
    header_timeout_s: PositiveFloat = 10  # a request's headers must arrive within this
    body_timeout_s: PositiveFloat = 30    # ... and its body within this
    keep_alive_s: PositiveFloat = 5
    grpc_max_concurrent_rpcs: PositiveInt = 256
    grpc_max_connection_age_s: PositiveFloat = 600
    grpc_max_connection_idle_s: PositiveFloat = 120

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be the name of an environment variable holding the key (e.g. TLOPS_API_KEY), "
                             "never the key itself")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> ServeParams:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both (PEM files) or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.max_inflight_samples < self.max_batch:
            raise ValueError(f"max_inflight_samples ({self.max_inflight_samples}) is below max_batch "
                             f"({self.max_batch}): a full batch could never be decoded")
        return self


class ScheduleParams(Section):
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    work_pool: Annotated[str, Field(min_length=1)] = "gpu"
    deployment: Annotated[str, Field(min_length=1)] = "nightly"
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "0"}
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_delay_s: Annotated[float, Field(ge=0.0)] = 10
    stage_timeout_s: PositiveFloat = 3600
    lock_timeout_s: Annotated[float, Field(ge=0.0)] = 0

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError("must be a 5-field cron expression such as '0 3 * * *'")
        return v


class Params(Section):
    @model_validator(mode="before")
    @classmethod
    def _modality_defaults(cls, raw: Any) -> Any:
        """The keys whose default depends on the modality, when auto (or absent):
        model.backbone: minilm_l6 for text, else efficientnet_lite0;
        finetune.label_smoothing: 0.1 for text, else 0.0. Smoothing leaves the fine-tuned logits in a shape no
        single temperature calibrates: test ECE after temperature scaling on Fashion-MNIST 5,000, seeds 42 and 1,
        0.034 and 0.031 with 0.1 against 0.020 and 0.019 without, accuracy 0.883 / 0.887 against 0.892 / 0.880;
        on WordNet glosses 0.1 is worth 1.8 accuracy points (0.921 against 0.903)."""
        if not isinstance(raw, dict):
            return raw
        data = raw.get("data")
        text = isinstance(data, dict) and data.get("source") in TEXT_SOURCES
        out = dict(raw)
        for section, key, value in (("model", "backbone", DEFAULT_TEXT_BACKBONE if text else DEFAULT_IMAGE_BACKBONE),
                                    ("finetune", "label_smoothing", 0.1 if text else 0.0)):
            part = {} if raw.get(section) is None else raw[section]
            if isinstance(part, dict) and part.get(key, "auto") == "auto":  # not a dict: the schema says so
                out[section] = {**part, key: value}
        return out

    @model_validator(mode="after")
    def _same_modality(self) -> Params:
        if self.data.modality != self.model.modality:
            raise ValueError(
                f"model.backbone {self.model.backbone} reads {self.model.modality}s but data.source "
                f"{self.data.source} gives {self.data.modality}s; use "
                + ("minilm_l6 or hf:<model id or folder>" if self.data.modality == "text" else "an image backbone")
                + " (or model.backbone: auto)")
        if self.data.modality == "text" and self.adapt.method != "none":
            raise ValueError("adapt.method must be none for text: domain adaptation reads images")
        for key in self.tune.space:
            if not _is_leaf(key):
                close = difflib.get_close_matches(key, list(flatten(Params())), n=1, cutoff=0.8)
                raise ValueError(f"tune.space: {key} is not a params key"
                                 + (f" (did you mean {close[0]}?)" if close else " (e.g. finetune.lr)"))
            if key.startswith(UNTUNED):
                raise ValueError(f"tune.space: {key} is not a key the search may set (never tune.*, serve.*, "
                                 f"schedule.*, the data's source or the model's registered name)")
        if self.data.modality == "text" and self.serve.max_text_chars < self.data.max_chars:
            raise ValueError(f"serve.max_text_chars ({self.serve.max_text_chars}) is below data.max_chars "
                             f"({self.data.max_chars}): the service would refuse texts that training kept")
        return self

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    features: FeaturesParams = FeaturesParams()
    head: HeadParams = HeadParams()
    audit: AuditParams = AuditParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    adapt: AdaptParams = AdaptParams()
    export: ExportParams = ExportParams()
    serve: ServeParams = ServeParams()
    schedule: ScheduleParams = ScheduleParams()
    tune: TuneParams = TuneParams()


def _is_leaf(key: str) -> bool:
    """True when `key` ("section.key") names a value of the schema (not a section)."""
    model: type[BaseModel] = Params
    *parents, last = key.split(".")
    for name in parents:
        field = model.model_fields.get(name)
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
        if ann is None:
            return False
        model = ann
    field = model.model_fields.get(last)
    if field is None:
        return False
    ann = field.annotation
    return not (isinstance(ann, type) and issubclass(ann, BaseModel))


def params_path(path: str | os.PathLike | None = None) -> Path:
    """The params file: the argument, else $TLOPS_PARAMS, else ./params.yaml."""
    return Path(path or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS)


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Read and validate params.yaml; raise ConfigError with one line naming the bad key."""
    p = params_path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: not found (run from the project root or pass --params)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_params(raw, source=str(p))


def set_params(changes: dict[str, Any], path: str | os.PathLike | None = None, dry_run: bool = False) -> Params:
    """Write {"section.key": value} into the params file, as `dvc exp run --set-param` does: comments and order kept,
    the result validated before anything is written (ConfigError naming the bad key), then replaced atomically.
    dry_run: validate only (what a sweep or a tune checks for every trial before any starts); nothing written."""
    import io

    from ruamel.yaml import YAML  # round-trip YAML (comments kept); DVC's own dependency

    from tlops.core.io import write_text

    p = params_path(path)
    rt = YAML()
    rt.preserve_quotes = True
    try:
        doc = rt.load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: not found (run from the project root or pass --params)") from None
    for key, value in changes.items():
        node, *parts = doc, *key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    params = parse_params(yaml.safe_load(buf.getvalue()), source=f"{p} with {', '.join(changes)} set")
    if not dry_run:
        write_text(p, buf.getvalue())
    return params


def parse_params(raw: Any, source: str = DEFAULT_PARAMS) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e.errors()[0])}") from None


def _describe(err: dict) -> str:
    loc = [str(x) for x in err["loc"] if not str(x).startswith(("function-after", "tagged-union"))]
    # Drop pydantic's type-branch labels (e.g. "int", "constrained-int") inside unions.
    loc = [x for x in loc if not (x in ("int", "float", "str", "bool", "list", "tuple", "none") or "[" in x)]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)"
            else:
                hint = f" (known keys: {', '.join(parent.model_fields)})"
        return f"{key} is not a known key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key}: {msg}{shown}" if key else f"{msg}{shown}"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for name in loc:
        field = model.model_fields.get(name)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def flatten(params: Params) -> dict[str, Any]:
    """params as {"section.key": value}, for MLflow and hashing."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = obj

    walk("", params.model_dump(mode="json"))
    return out


def dotted_get(params: Params, key: str) -> Any:
    """Look up "section.key" in validated params; KeyError if absent."""
    obj: Any = params
    for part in key.split("."):
        if isinstance(obj, BaseModel):
            if part not in type(obj).model_fields:
                raise KeyError(key)
            obj = getattr(obj, part)
        elif isinstance(obj, dict):
            obj = obj[part]
        else:
            raise KeyError(key)
    return obj
