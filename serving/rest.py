"""The HTTP adapter: FastAPI routes over the data plane. Each route reads its request, hands the data plane a Job and
a way to answer; the work and its limits are serving.dataplane's.

Routes: the Open Inference Protocol v2 REST API (/v2/..., with binary tensor data), POST /predict for image files
and texts, GET /drift, GET /metrics, and GET / (a page to try the model in a browser, serving.page). Route groups
(serve.api_key_routes): inference (infer, /predict), metadata (/v2, model metadata), metrics, drift; health (live,
ready, model ready) and the page (it holds nothing; its calls carry the key) are always open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import page, protocol, rest_codec
from serving.dataplane import NOT_LOADED, FileJob, Job, Service, TensorJob
from serving.protocol import ApiError
from serving.security import Guard
from serving.served_model import LoadedModel, Outputs, explained, predictions

MAX_IMAGES = protocol.MAX_SAMPLES  # per /predict request; the body limit bounds bytes, this bounds decode work
MAX_TOP_K = 1000


def add_routes(app: FastAPI, service: Service, guard: Guard) -> None:
    def group(name: str) -> Any:
        async def check(request: Request) -> None:
            if guard.requires_key(name) and not guard.authorized(request.headers.get("authorization")):
                raise ApiError(401, "this route needs the service's API key: send Authorization: Bearer <key>",
                               reason="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="tlops"'})
        return [Depends(check)]

    @app.get("/v2", dependencies=group("metadata"))
    async def server_metadata() -> Response:
        return JSONResponse(protocol.server_metadata())

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if service.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": NOT_LOADED}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/v2/models/{name}", dependencies=group("metadata"))
    @app.get("/v2/models/{name}/versions/{version}", dependencies=group("metadata"))
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return JSONResponse(protocol.model_metadata(service.model_for(name, version)))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        model = service.model_for(name, version)
        return JSONResponse({"name": model.name, "ready": True})

    @app.post("/v2/models/{name}/infer", dependencies=group("inference"))
    @app.post("/v2/models/{name}/versions/{version}/infer", dependencies=group("inference"))
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        model = service.model_for(name, version)
        body = await request.body()
        header_length = request.headers.get(rest_codec.HEADER_LENGTH)

        def respond(job: Job, used: LoadedModel, y: Outputs) -> tuple[bytes, dict[str, str]]:
            req = job.req
            return rest_codec.response(used, req, protocol.output_tensors(used, req.output_names(), y))

        content, headers = await service.run(
            model, lambda: TensorJob(rest_codec.parse_request(body, header_length)), respond)
        return Response(content, headers=headers)

    @app.post("/predict", dependencies=group("inference"))
    async def predict(request: Request) -> Response:
        model = service.model_for(service.source.name)
        k = _top_k_param(request.query_params.get("top_k"), service.params.top_k)
        explain = _explain_param(request.query_params.get("explain"), model)
        files = await (_text_payloads(request) if model.is_text else _file_payloads(request))
        names = [name for name, _ in files]
        noun = "text" if model.is_text else "image"
        labelled = [(f"{noun} {name or (f'#{i}' if len(files) > 1 else 'body')}", data)
                    for i, (name, data) in enumerate(files)]
        key = "index" if model.is_text and all(n is None for n in names) else "filename"

        def respond(job: Job, used: LoadedModel, y: Outputs) -> bytes:
            results = []
            for i, (n, answer) in enumerate(zip(names, predictions(used, y, k))):
                result = {key: i if key == "index" else n, **answer}
                if y.explanation is not None:
                    ids = job.ids[i] if job.ids is not None else None
                    result["explanation"] = explained(used, y.explanation[i], y.logits[i], ids)
                results.append(result)
            return orjson.dumps({"model_name": used.name, "model_version": used.version, "predictions": results})

        content = await service.run(model, lambda: FileJob(labelled, model.is_text, explain), respond)
        return Response(content, media_type="application/json")

    @app.get("/", include_in_schema=False)
    async def home() -> Response:  # open like health: it holds nothing; the calls it makes need the key
        return HTMLResponse(page.page_html(service.source.name), headers=page.HEADERS)

    @app.get("/page.js", include_in_schema=False)
    async def page_script() -> Response:
        return Response(page.JS, media_type="text/javascript", headers=page.HEADERS)

    @app.get("/page.css", include_in_schema=False)
    async def page_style() -> Response:
        return Response(page.CSS, media_type="text/css", headers=page.HEADERS)

    @app.get("/drift", dependencies=group("drift"))
    async def drift_now() -> Response:
        return JSONResponse(service.drift_scores())

    @app.get("/metrics", dependencies=group("metrics"))
    async def metrics() -> Response:
        service.drift_scores()  # the drift gauges are computed when scraped, not on every request
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)


def _explain_param(raw: str | None, model: LoadedModel) -> bool:
    if raw is None or raw.lower() in ("false", "0"):
        return False
    if raw.lower() not in ("true", "1"):
        raise ApiError(400, f"explain must be true or false, got {protocol.shown(raw)}")
    if not model.explanation_name:
        raise ApiError(400, "explain: this model has no explanation output (an MLP head, or a backbone that projects "
                       "after pooling; see its model card)")
    return True


def _top_k_param(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_TOP_K:
        raise ApiError(400, f"top_k must be an integer 1..{MAX_TOP_K}, got {protocol.shown(raw)}")
    return int(raw)


async def _file_payloads(request: Request) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of each file: every file part of a multipart body, else the raw body as one file."""
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
        return await _file_payloads(request)
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


def add_error_handlers(app: FastAPI, log: Callable[..., None]) -> None:
    """Every error answers JSON {"error": ...} (the v2 protocol's error shape); nothing of a 500 reaches the client."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)

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
        log("unexpected error on %s %s", request.method, request.scope.get("route") and request.scope["route"].path,
            exc_info=e)
        return JSONResponse({"error": "internal error (logged by the server)"}, status_code=500)
