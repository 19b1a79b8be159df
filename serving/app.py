"""The inference service: FastAPI under uvicorn, ONNX Runtime behind a micro-batcher, torch-free.

Routes: the Open Inference Protocol v2 REST API (/v2/..., with binary tensor data), POST /predict for image files,
GET /drift, GET /metrics; the same protocol over gRPC on serve.grpc_port (serving.grpc_server), sharing the model,
batcher, limits and metrics. Every answered sample feeds the drift monitor (tlops.drift); with serve.log_inputs a
sample of the received images is kept for adaptation (serving.input_log).
The model loads in the background after startup: liveness answers 200 at once, readiness 503 until a model
has passed its sha256 check and a warm-up run. Reloads (SIGHUP, or the source changing on a poll every
serve.reload_s) load, verify and warm the new model off the request path and swap it in with one assignment;
a model that fails is rejected and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import protocol
from serving.batcher import Closed, MicroBatcher, QueueFull
from serving.input_log import InputLog
from serving.metrics import Metrics
from serving.middleware import BodyLimit, RequestMetrics
from serving.model import LoadedModel, ModelSource, Outputs, file_key, load_model, top_labels, warm_up
from serving.protocol import ApiError
from tlops import drift, onnx_meta
from tlops.config import ServeParams
from tlops.preprocess import PreprocessSpec
from tlops.runtime import softmax
from tlops.text import TextSpec

log = logging.getLogger("serving")

MAX_IMAGES = 256  # per /predict request; the body limit bounds bytes, this bounds decode work


class Service:
    """One running service: the model being served, the batcher, the metrics, and how to reload."""

    def __init__(self, params: ServeParams, source: ModelSource) -> None:
        self.params, self.source = params, source
        self.model: LoadedModel | None = None
        self.status = "loading"  # why the service is not ready, while it is not
        self.metrics = Metrics()
        self.batcher = MicroBatcher(params.max_batch, params.max_wait_ms / 1000, params.max_queue,
                                    on_batch=self.metrics.observe_batch)
        # Decoding runs here, a few at a time, so decompressed images in memory stay bounded.
        self.decode_pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                              thread_name_prefix="tlops-decode")
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rejected_key: tuple | None = None
        self._last_error: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self.drift: drift.Monitor | None = None  # of the model being served (its reference statistics)
        self.input_log = (InputLog(params.log_inputs, params.log_sample, params.log_max_bytes)
                          if params.log_inputs else None)
        self.grpc_server: Any = None
        self.grpc_port: int | None = None

    @property
    def ready(self) -> bool:
        return self.model is not None

    async def reload(self, force: bool = False) -> bool:
        """Load, verify and warm what the source names now and swap it in; keep the old model if that fails.

        Without `force` (the poller), an unchanged file or the same file that was already rejected is skipped.
        Returns True when a new model was swapped in.
        """
        async with self._lock:
            key = None
            try:
                path = await asyncio.to_thread(self.source.resolve)
                key = file_key(path)
                if not force and key is not None and key in (self.model and self.model.key, self._rejected_key):
                    return False
                new = await asyncio.to_thread(self._load_and_warm, path)
                monitor = (drift.Monitor.from_metadata(new.metadata, self.params.drift_window,
                                                       self.params.drift_threshold)
                           if self.params.drift_window else None)
            except Exception as e:  # anything wrong with the new model: reject it, keep serving
                self._reject(key, e)
                return False
            old, self.model = self.model, new  # the swap: in-flight batches keep the session they started with
            self.drift = monitor
            self.status, self._rejected_key, self._last_error = "ready", None, None
            self.metrics.model_loaded(new.name, new.version, new.sha256, new.metadata)
            log.info("serving %s version %s from %s%s", new.name, new.version, new.path,
                     f" (was {old.version})" if old else "")
            if old is not None and old.task != new.task:  # clients' label indices and inputs change meaning
                self.metrics.task_changes.inc()
                log.warning("model %s version %s is of another task than version %s it replaces: %s -> %s",
                            new.name, new.version, old.version, onnx_meta.describe_task(old.task),
                            onnx_meta.describe_task(new.task))
            return True

    def _load_and_warm(self, path: Path) -> LoadedModel:
        model = load_model(path, name=self.source.name, threads=self.params.threads,
                           verify=self.source.must_verify(path))
        warm_up(model, tuple(sorted({1, self.params.max_batch})))
        return model

    def _reject(self, key: tuple | None, e: Exception) -> None:
        repeated = str(e) == self._last_error  # a poller retrying a missing file logs it once, not every poll
        self._rejected_key, self._last_error = key, str(e)
        self.metrics.model_rejected()
        if self.model is None:
            self.status = f"no model loaded: {e}"
        if not repeated:
            keeps = f"still serving version {self.model.version}" if self.model else "not ready"
            log.error("model from %s rejected: %s (%s)", self.source.ref, e, keeps)

    def request_reload(self) -> concurrent.futures.Future:
        """Schedule a forced reload from another thread (tests, embedders); the future gives reload()'s result."""
        if self._loop is None:
            raise RuntimeError("the service is not running")
        return asyncio.run_coroutine_threadsafe(self.reload(force=True), self._loop)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.params.reload_s)
            await self.reload(force=False)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self._loop, self._lock = asyncio.get_running_loop(), asyncio.Lock()
        await self.batcher.start()
        if self.params.grpc_port is not None:
            from serving import grpc_server

            self.grpc_server, self.grpc_port = await grpc_server.start(
                self, self.params.host, self.params.grpc_port, self.params.max_body_bytes)
        self._spawn(self.reload(force=True))
        if self.params.reload_s > 0:
            self._spawn(self._poll())
        sighup = self._install_sighup()
        try:
            yield
        finally:
            if sighup:
                self._loop.remove_signal_handler(signal.SIGHUP)
            for task in self._tasks:
                task.cancel()
            if self.grpc_server is not None:  # in-flight RPCs get the same grace as HTTP requests
                await self.grpc_server.stop(math.ceil(self.params.timeout_ms / 1000) + 5)
            await self.batcher.close()  # uvicorn has finished in-flight requests by now; drain what is left
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
            log.info("stopped")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _install_sighup(self) -> bool:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
            return False  # signals reach only the main thread (tests run the server in a thread)
        try:
            self._loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload(force=True)))
        except (NotImplementedError, RuntimeError, ValueError):
            return False
        return True

    def model_for(self, name: str, version: str | None = None) -> LoadedModel:
        """The served model if `name` (and `version`) name it; 404 for another model, 503 while not ready."""
        if name != self.source.name:
            raise ApiError(404, f"model {name!r} not found; this server serves {self.source.name!r}")
        model = self.model
        if model is None:
            raise ApiError(503, f"model {name!r} is not ready: {self.status}")
        if version is not None and version != model.version:
            raise ApiError(404, f"version {version!r} of {name!r} not found; serving version {model.version}")
        return model

    async def infer(self, model: LoadedModel, prepare: Callable[[], tuple[Any, np.ndarray]]
                    ) -> tuple[Any, Outputs, LoadedModel]:
        """Decode off the event loop, then run through the batcher; 503 when full, 504 past serve.timeout_ms.
        The answer feeds the drift monitor of the model that gave it."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.params.timeout_ms / 1000):
                extra, x = await loop.run_in_executor(self.decode_pool, prepare)
                self.metrics.queue_depth.set(self.batcher.depth + 1)
                y, used = await self.batcher.submit(model, x)
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry shortly", reason="queue_full") from None
        except Closed as e:
            raise ApiError(503, str(e), reason="shutting_down") from None
        except TimeoutError:
            raise ApiError(504, f"no answer within serve.timeout_ms={self.params.timeout_ms:g}",
                           reason="timeout") from None
        finally:
            self.metrics.queue_depth.set(self.batcher.depth)
        monitor = self.drift
        if monitor is not None and used is self.model:
            monitor.observe(y.logits, y.embedding)
        return extra, y, used

    def keep_inputs(self, req: protocol.InferRequest) -> None:
        """serve.log_inputs: keep the request's images (image and image_bytes tensors); runs in a decode thread."""
        if self.input_log is None:
            return
        try:
            self._keep_tensors(req)
        except Exception:  # keeping inputs is a side job: it never fails the request
            log.exception("serve.log_inputs: could not keep a request's inputs")

    def _keep_tensors(self, req: protocol.InferRequest) -> None:
        for t in req.inputs:
            if t.name in (protocol.FILE_INPUT, protocol.TEXT_INPUT):
                for data in t.data.ravel():
                    self.input_log.keep_file(bytes(data), text=t.name == protocol.TEXT_INPUT)
            elif t.name == protocol.IMAGE_INPUT:
                shape = [1, *t.shape] if len(t.shape) == 3 else t.shape
                for img in t.data.reshape(shape).astype(np.uint8, copy=False):
                    self.input_log.keep_pixels(img)

    def drift_scores(self) -> dict[str, Any]:
        """GET /drift's answer; the gauges are set from it too."""
        monitor = self.drift
        if monitor is None:
            why = ("drift monitoring is off (serve.drift_window: 0)" if not self.params.drift_window else
                   "no model loaded" if self.model is None else "the model carries no drift reference (re-export it)")
            scores = {"window": 0, "prediction": None, "embedding": None, "confidence": None,
                      "threshold": self.params.drift_threshold, "drifted": False, "error": why}
        else:
            scores = monitor.scores()
        if self.input_log is not None:
            scores["log_inputs"] = str(self.input_log.folder)
            scores["logged"] = self.input_log.kept
        if self.model is not None:
            scores["input_kind"] = onnx_meta.input_kind_of(self.model.metadata)
        self.metrics.drift_scores(scores)
        return scores


def create_app(params: ServeParams, model: str | None = None) -> FastAPI:
    """The ASGI app serving `model` (default: params.model); app.state.service holds its Service."""
    service = Service(params, ModelSource(model or params.model))
    app = FastAPI(title="tlops inference", lifespan=service.lifespan)
    app.state.service = service
    _add_routes(app, service)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=params.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: also counts 413s and 500s
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v2")
    async def server_metadata() -> Response:
        return JSONResponse(protocol.server_metadata())

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if service.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": service.status}, status_code=503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return JSONResponse(protocol.model_metadata(service.model_for(name, version)))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        model = service.model_for(name, version)
        return JSONResponse({"name": model.name, "ready": True})

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        model = service.model_for(name, version)
        body = await request.body()
        header_length = request.headers.get(protocol.HEADER_LENGTH)

        def prepare() -> tuple[protocol.InferRequest, np.ndarray]:
            req = protocol.parse_rest_request(body, header_length)
            x = protocol.decode_inputs(req, model, service.params.max_pixels,
                                          service.params.max_text_chars)
            service.keep_inputs(req)
            return req, x

        req, out, used = await service.infer(model, prepare)
        tensors = protocol.output_tensors(used, req.output_names(), out.logits, out.embedding)
        content, headers = protocol.rest_response(used, req, tensors)
        return Response(content, headers=headers)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        model = service.model_for(service.source.name)
        k = _top_k_param(request.query_params.get("top_k"), service.params.top_k)
        files = await (_text_payloads(request) if model.is_text else _image_payloads(request))
        names = [name for name, _ in files]

        def prepare() -> tuple[None, np.ndarray]:
            if model.is_text:
                x = decode_texts(files, model.spec, service.params.max_text_chars)
            else:
                x = decode_images(files, model.spec, service.params.max_pixels)
            if service.input_log is not None:
                try:
                    for _, data in files:
                        service.input_log.keep_file(data, text=model.is_text)
                except Exception:  # keeping inputs is a side job: it never fails the request
                    log.exception("serve.log_inputs: could not keep a request's inputs")
            return None, x

        _, out, used = await service.infer(model, prepare)
        probs = softmax(out.logits)
        key = "index" if model.is_text and all(n is None for n in names) else "filename"
        return JSONResponse({"model_name": used.name, "model_version": used.version,
                             "predictions": [{key: i if key == "index" else n, "top_k": top_labels(p, used.labels, k)}
                                             for i, (n, p) in enumerate(zip(names, probs))]})

    @app.get("/drift")
    async def drift_now() -> Response:
        return JSONResponse(service.drift_scores())

    @app.get("/metrics")
    async def metrics() -> Response:
        service.drift_scores()  # the drift gauges are computed when scraped, not on every request
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)


def _top_k_param(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ApiError(400, f"top_k must be a positive integer, got {raw!r}")
    return int(raw)


async def _image_payloads(request: Request) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of each image: every file part of a multipart body, else the raw body as one image."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [(None, await request.body())]
    form = await request.form(max_files=MAX_IMAGES, max_fields=MAX_IMAGES)
    try:
        files = [(v.filename, await v.read()) for _, v in form.multi_items() if isinstance(v, UploadFile)]
    finally:
        await form.close()
    if not files:
        raise ApiError(400, "multipart body has no file parts; send images as files (e.g. curl -F file=@a.jpg)")
    return files


async def _text_payloads(request: Request) -> list[tuple[str | None, bytes]]:
    """(filename or None, UTF-8 bytes) of each text: JSON {"texts": [...]} (or {"text": "..."}), text files of a
    multipart body, else the raw body (text/plain) as one text."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        return await _image_payloads(request)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None
    texts = body.get("texts", [body["text"]] if "text" in body else None) if isinstance(body, dict) else None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, 'send JSON {"texts": ["a text", ...]} (a non-empty list of strings), or one text as '
                            "text/plain")
    if len(texts) > MAX_IMAGES:
        raise ApiError(400, f"{len(texts)} texts in one request; at most {MAX_IMAGES}", reason="too_many_samples")
    return [(None, t.encode("utf-8", "surrogatepass")) for t in texts]


def decode_texts(files: list[tuple[str | None, bytes]], spec: TextSpec, max_text_chars: int) -> np.ndarray:
    """Tokenise /predict's texts; an error names the text (by file name or position)."""
    labels = [f"text {name or (f'#{i}' if len(files) > 1 else 'body')}" for i, (name, _) in enumerate(files)]
    return protocol.decode_texts([(label, data) for label, (_, data) in zip(labels, files)], spec, max_text_chars)


def decode_images(files: list[tuple[str | None, bytes]], spec: PreprocessSpec, max_pixels: int) -> np.ndarray:
    """Decode and preprocess /predict's images; an error names the file (or its position, or the body)."""
    labels = [f"image {name or (f'#{i}' if len(files) > 1 else 'body')}" for i, (name, _) in enumerate(files)]
    return protocol.decode_files([(label, data) for label, (_, data) in zip(labels, files)], spec, max_pixels)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers JSON {"error": ...} (the v2 protocol's error shape)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": "internal error (logged by the server)"}, status_code=500)


def serve(params: ServeParams, model: str | None = None) -> None:
    """Run the service under uvicorn on params.host:params.port until SIGINT/SIGTERM (blocking)."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for what, port in (("serve.port", params.port), ("serve.grpc_port", params.grpc_port)):
        _check_free(params.host, port, what)
    app = create_app(params, model)
    config = uvicorn.Config(app, host=params.host, port=params.port, access_log=False, log_level="info",
                            # after SIGTERM, in-flight requests get their full timeout to finish
                            timeout_graceful_shutdown=math.ceil(params.timeout_ms / 1000) + 5)
    uvicorn.Server(config).run()


def _check_free(host: str, port: int | None, what: str) -> None:
    """ConfigError naming the setting when `port` is taken: one line, before anything starts."""
    import socket

    from tlops.errors import ConfigError

    if not port:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"{what}={port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                          f"free it or choose another port") from None
