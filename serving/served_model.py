"""The served model: where it comes from, loading it only after its sha256 checks out, running it, top-k."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from tlops.core.errors import ConfigError, ModelIntegrityError
from tlops.core.io import sha256_bytes
from tlops.inputs.images import PreprocessSpec
from tlops.inputs.text import TextSpec
from tlops.onnx import metadata, runtime

if TYPE_CHECKING:
    import onnxruntime as ort

REGISTRY_SCHEME = "models:/"


@dataclass(frozen=True)
class ModelSource:
    """Where the served model comes from: a file path, or a registry URI resolved again on every reload.

    A registry version must carry the sha256 tag tlops registers it with (a version registered through the MLflow UI
    or API has none) unless allow_unverified (serve.allow_unverified), which the log then says."""

    ref: str
    allow_unverified: bool = False

    def __post_init__(self) -> None:
        if self.is_registry:
            self._registry_name()  # a malformed models:/ URI fails here, naming the expected forms

    @property
    def is_registry(self) -> bool:
        return self.ref.startswith(REGISTRY_SCHEME)

    @property
    def name(self) -> str:
        """The model's name in the v2 API: the registered name, else the file stem."""
        return self._registry_name() if self.is_registry else Path(self.ref).stem

    def _registry_name(self) -> str:
        from tlops.tracking.registry import parse_model_uri

        try:
            return parse_model_uri(self.ref)[0]
        except ConfigError as e:
            raise ConfigError(f"serve.model {e}") from None

    def resolve(self) -> Path:
        """The local .onnx file for this source now (downloads from the registry if needed)."""
        if not self.is_registry:
            return Path(self.ref)
        from tlops.tracking.registry import resolve_model_uri

        return Path(resolve_model_uri(self.ref, allow_unverified=self.allow_unverified))

    def must_verify(self, path: Path) -> bool:
        """Whether `path` must match a sha256 sidecar: always for a file; from the registry, the resolver has
        already checked the version's registered sha256 (MLflow stores no sidecar), so only if one is there."""
        return not self.is_registry or metadata.sidecar_path(path).exists()

    def load(self, threads: int | None = None) -> LoadedModel:
        """Resolve and load, verifying the checksum as must_verify says."""
        path = self.resolve()
        return load_model(path, name=self.name, threads=threads, verify=self.must_verify(path))


def file_key(path: Path) -> tuple | None:
    """A cheap fingerprint of a model file and its sha256 sidecar: changes whenever either is rewritten."""
    try:
        st = path.stat()
    except OSError:
        return None
    try:
        recorded = metadata.sidecar_path(path).read_text(encoding="utf-8").strip()
    except OSError:
        recorded = ""
    return (str(path.resolve()), st.st_mtime_ns, st.st_size, recorded)


class Outputs(NamedTuple):
    """One model run: the (calibrated) logits (N, classes) and what else the model exports: the pooled embedding
    (N, D), the OOD score (N,), and, when asked for, the explanation (N, classes, h, w) or (N, classes, tokens)."""

    logits: np.ndarray
    embedding: np.ndarray | None = None
    ood_score: np.ndarray | None = None
    explanation: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A verified ONNX Runtime session with the labels and preprocessing recorded in its metadata."""

    name: str
    version: str            # first 12 hex digits of the file's sha256: content-addressed, changes with the model
    sha256: str
    path: Path
    session: ort.InferenceSession = field(repr=False)
    labels: tuple[str, ...]
    spec: PreprocessSpec | TextSpec
    input_name: str
    output_name: str
    metadata: dict[str, str] = field(repr=False)
    key: tuple | None = None
    embedding_name: str | None = None  # the pooled-embedding output, when the export has one
    embedding_dim: int | None = None
    ood_name: str | None = None        # the OOD score output, when the export has one with a threshold
    ood_threshold: float | None = None
    explanation_name: str | None = None  # the explanation output, when the export has an exact one
    explanation_kind: str = ""           # "image" | "text" | ""

    def unknown(self, ood_score: np.ndarray | None) -> np.ndarray | None:
        """Whether each input is unlike the training data (its OOD score above the model's threshold)."""
        if ood_score is None or self.ood_threshold is None:
            return None
        return ood_score > self.ood_threshold

    @property
    def task(self) -> tuple[str, tuple[str, ...]]:
        """(input kind, labels): what the model reads and answers; a model of another task is not a drop-in."""
        return metadata.input_kind_of(self.metadata), self.labels

    @property
    def is_text(self) -> bool:
        """A text model: its input is int64 token ids (N, L), its spec a tlops.inputs.text.TextSpec (with the
        tokenizer)."""
        return isinstance(self.spec, TextSpec)

    @property
    def input_shape(self) -> list[int]:
        """[-1, 3, S, S] (text: [-1, -1]): -1 for a dynamic axis, as the v2 metadata API writes it."""
        if self.is_text:
            return [-1, -1]
        return [-1, 3, self.spec.input_size, self.spec.input_size]

    def join(self, xs: list[np.ndarray]) -> np.ndarray:
        """Several requests' inputs as one batch: stacked (text: each padded to the longest sequence of them)."""
        if self.is_text:
            return self.spec.pad([row for x in xs for row in x])  # a row's own padding stays padding
        return np.concatenate(xs)

    def run(self, x: np.ndarray, explain: bool = False) -> Outputs:
        """float32 (N, 3, S, S) (text: int64 ids) -> Outputs: logits, the embedding and OOD score when the model has
        them, the explanation only when asked (ONNX Runtime then runs the explanation's nodes too; otherwise it
        leaves them out)."""
        wanted = {"logits": self.output_name, "embedding": self.embedding_name, "ood_score": self.ood_name,
                  "explanation": self.explanation_name if explain else None}
        names = {field: name for field, name in wanted.items() if name}
        return Outputs(**dict(zip(names, self.session.run(list(names.values()), {self.input_name: x}), strict=True)))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) -> logits float32 (N, classes), the embedding not computed."""
        return self.session.run([self.output_name], {self.input_name: x})[0]


def load_model(path: str | os.PathLike, name: str | None = None, threads: int | None = None,
               verify: bool = True) -> LoadedModel:
    """Verify the file against its recorded sha256, then open it with ONNX Runtime and read its metadata.

    Raises ConfigError when the file is missing and ModelIntegrityError when it fails its checksum, is not
    a loadable ONNX model, or lacks the tlops metadata (labels, preprocessing) or the expected tensors.
    """
    path = Path(path)
    key = file_key(path)
    if not path.is_file():
        raise ConfigError(f"model {path}: no such file (export it first with `tlops run`, or fix serve.model)")
    digest = metadata.verify_sha256(path) if verify else None
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if digest is not None and actual != digest:  # replaced between the check and the read
        raise ModelIntegrityError(f"{path}: changed while loading (sha256 {actual}, verified {digest}); retry")
    try:
        metadata.assert_self_contained(data, name=str(path))
    except ModelIntegrityError:
        raise
    except Exception as e:  # onnx's parser refuses what is not an ONNX protobuf
        raise ModelIntegrityError(f"{path}: not a loadable ONNX model ({type(e).__name__})") from None
    try:
        # Idle threads sleep rather than spin: the event loop and the decoding threads need those cores.
        session = runtime.session(data, threads=threads, spinning=False)
    except Exception as e:  # ORT raises its own exception types for every kind of bad file
        raise ModelIntegrityError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    labels, spec = metadata.labels_of(meta), metadata.spec_of(meta)
    input_name, output_name, embedding = _check_signature(session, spec, len(labels), path)
    names = {o.name for o in session.get_outputs()}
    ood = metadata.ood_of(meta) if metadata.OOD_SCORE in names else None
    kind = metadata.explanation_of(meta) if metadata.EXPLANATION in names else ""
    return LoadedModel(name=name or path.stem, version=actual[:12], sha256=actual, path=path, session=session,
                       labels=tuple(labels), spec=spec, input_name=input_name, output_name=output_name,
                       metadata=meta, key=key, embedding_name=embedding and embedding[0],
                       embedding_dim=embedding and embedding[1],
                       ood_name=metadata.OOD_SCORE if ood else None,
                       ood_threshold=float(ood["threshold"]) if ood else None,
                       explanation_name=metadata.EXPLANATION if kind else None, explanation_kind=kind)


def _check_signature(session: ort.InferenceSession, spec: PreprocessSpec | TextSpec, classes: int, path: Path
                     ) -> tuple[str, str, tuple[str, int] | None]:
    """The model must take one float (N,3,S,S) input matching its preprocessing and give (N,classes) out first;
    a second output named `embedding` (N, D) is the pooled embedding. Returns (input, logits, (embedding, D))."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelIntegrityError(f"{path}: expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}")
    inp, out = inputs[0], outputs[0]
    emb = next((o for o in outputs[1:] if o.name == metadata.EMBEDDING), None)
    embedding = None
    if emb is not None:
        if len(emb.shape) != 2 or not isinstance(emb.shape[1], int):
            raise ModelIntegrityError(f"{path}: output {emb.name} has shape {emb.shape}; expected [N, D]")
        embedding = (emb.name, emb.shape[1])
    dims = inp.shape
    if isinstance(spec, TextSpec):
        if inp.type != "tensor(int64)" or len(dims) != 2:
            raise ModelIntegrityError(f"{path}: input {inp.name} is {inp.type} {dims}; expected int64 [N, L] token ids "
                                      "as the tlops.input_kind metadata (text) says")
    elif inp.type != "tensor(float)" or len(dims) != 4 or [d for d in dims[1:]] != [3, spec.input_size,
                                                                                    spec.input_size]:
        s = spec.input_size
        raise ModelIntegrityError(f"{path}: input {inp.name} is {inp.type} {dims}; expected float [N, 3, {s}, {s}] "
                                  "as the tlops.preprocess metadata says")
    if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != classes):
        raise ModelIntegrityError(f"{path}: output {out.name} has shape {out.shape}; expected [N, {classes}] "
                                  "(one logit per label in tlops.labels)")
    return inp.name, out.name, embedding


def warm_up(model: LoadedModel, batch_sizes: tuple[int, ...] = (1,)) -> float:
    """Run zeros through the model once per batch size (ORT plans memory per shape); return seconds taken."""
    t0 = time.perf_counter()
    for n in batch_sizes:
        x = model.spec.batch(["warm up"] * n) if model.is_text else np.zeros((n, *model.input_shape[1:]), np.float32)
        y = model.run(x).logits
        if y.shape != (n, len(model.labels)) or not np.isfinite(y).all():
            raise ModelIntegrityError(f"{model.path}: warm-up gave {y.shape} or non-finite logits for batch {n}")
    return time.perf_counter() - t0


def explained(model: LoadedModel, explanation: np.ndarray, logits: np.ndarray, ids: np.ndarray | None = None
              ) -> dict:
    """One input's explanation for its most probable class, as a JSON-able dict: an image's map over the model's
    input (the centre crop it sees), rows top to bottom; a text's tokens with their shares. The shares plus
    `bias` are the logit (calibrated: divided by the temperature)."""
    c = int(np.argmax(logits))
    share = np.asarray(explanation[c], np.float64)
    out: dict = {"label": model.labels[c], "index": c, "bias": round(float(logits[c] - share.sum()), 6)}
    if model.explanation_kind == "text" and ids is not None:
        ids = np.asarray(ids)[: len(share)]
        shares = share[: len(ids)][ids != model.spec.pad_id]
        out["tokens"] = [{"token": t, "share": round(float(v), 6)}
                         for t, v in zip(model.spec.tokens(ids), shares, strict=True)]
    else:
        out["map"] = np.round(share, 6).tolist()
        out["grid"] = list(share.shape)
        out["covers"] = _crop_covers(model.spec)
    return out


def _crop_covers(spec: PreprocessSpec) -> dict:
    """What part of an uploaded image the model sees (and a map covers): the centred square of this share of the
    shorter side, resized to the input size."""
    return {"centre_square_of_shorter_side": round(spec.input_size / spec.resize_size, 6)}


def predictions(model: LoadedModel, y: Outputs, k: int) -> list[dict]:
    """Each input's answer as /predict and `tlops predict` give it: the calibrated top-k and, when the model has them,
    the OOD score and its verdict (`unknown`: unlike the training data; top_k still names the closest classes)."""
    unknown = model.unknown(y.ood_score)
    out = []
    for i, p in enumerate(runtime.softmax(y.logits)):
        result = {"top_k": top_labels(p, model.labels, k)}
        if unknown is not None:
            result["ood_score"], result["unknown"] = float(y.ood_score[i]), bool(unknown[i])
        out.append(result)
    return out


def top_labels(probs: np.ndarray, labels: tuple[str, ...] | list[str], k: int) -> list[dict]:
    """The k most probable classes of one probability row, best first (calibrated: the model divides its logits by
    its temperature)."""
    k = max(1, min(k, len(probs)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "index": int(i), "probability": float(probs[i])} for i in order]
