"""The HTTP API over the prediction pipeline, as a pharmacy app calls it.

  GET  /health             liveness (no key needed)
  GET  /ready              models loaded: stage, engine, device, classes, class-map hash, model files (503 before)
  POST /v1/predict         one photo (multipart field `image`), ?mode=single|combo|auto
  POST /v1/predict/batch   up to serve.max_batch_images photos (field `images`): a result or an error per photo
  GET  /metrics            Prometheus text: requests, errors and latency per endpoint and mode

Safe by default: every route but /health needs a key in `X-API-Key` (401 otherwise); a body over
serve.max_request_mb is refused with 413 before it is read; a bad photo is a 415/422 with the reason; a model
failure is a 500 with an error id that is also in the log; at most serve.max_concurrency photos are processed at
once and at most serve.max_waiting requests wait (503 beyond).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Set, Tuple

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse

from pillsnap.config import ServeConfig
from pillsnap.infer.engines import InferenceSetupError
from pillsnap.serve.metrics import ApiMetrics
from pillsnap.serve.uploads import UploadRejected, decode_upload

log = logging.getLogger(__name__)
Mode = Literal["single", "combo", "auto"]
Loader = Callable[[], Tuple[Any, Dict[str, Any]]]  # -> (Predictor, facts for /ready)


@dataclass
class ServeState:
    predictor: Any = None
    facts: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    waiting: int = 0


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body larger than `limit` bytes gets 413, whether its Content-Length says so or not."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(self.limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"request body larger than serve.max_request_mb ({limit / 2**20:g} MiB)"},
                        status_code=413)


def create_app(load: Loader, cfg: ServeConfig, api_keys: Set[str]) -> FastAPI:
    if cfg.require_api_key and not api_keys:
        raise ValueError("serve.require_api_key=true but no API key is configured: set serve.api_keys_file or "
                         "PILLSNAP_API_KEYS (or serve.require_api_key=false on a trusted network)")
    state, metrics = ServeState(), ApiMetrics()
    slots = asyncio.Semaphore(cfg.max_concurrency)

    def load_models() -> None:
        try:
            state.predictor, state.facts = load()
            log.info("serve: ready (%s)", state.facts)
        except Exception as e:  # noqa: BLE001 - /ready reports it; the process stays up to say why
            state.error = f"{type(e).__name__}: {e}"
            log.exception("serve: loading the models failed")

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load_models, name="pillsnap-load-models", daemon=True).start()
        yield

    app = FastAPI(title="PillSnap API", version="1", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=int(cfg.max_request_mb * 2**20))

    def authorised(request: Request) -> None:
        key = request.headers.get("x-api-key", "")
        if api_keys and not any(hmac.compare_digest(key, k) for k in api_keys):
            metrics.error(request.url.path, "unauthorised")
            raise HTTPException(401, "missing or invalid X-API-Key")

    def ready_predictor():
        if state.predictor is None:
            raise HTTPException(503, f"models not ready: {state.error or 'loading'}")
        return state.predictor

    async def run(endpoint: str, work: Callable[[], Any]) -> Any:
        """`work` in a worker thread once one of serve.max_concurrency slots is free; 503 when too many wait."""
        if state.waiting >= cfg.max_waiting:
            metrics.error(endpoint, "busy")
            raise HTTPException(503, f"busy: {state.waiting} requests are waiting (serve.max_waiting)")
        state.waiting += 1
        try:
            await slots.acquire()
        finally:
            state.waiting -= 1
        try:
            return await run_in_threadpool(work)
        finally:
            slots.release()

    def predict_one(predictor, image, mode: Optional[str], name: str) -> Dict[str, Any]:
        try:
            return predictor.predict(image, mode, name=name)
        except InferenceSetupError as e:  # e.g. combo on a stage without a detector: the caller's choice
            raise UploadRejected(422, str(e)) from None

    @app.get("/health")
    def health() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", dependencies=[Depends(authorised)])
    def ready():
        if state.predictor is None:
            return JSONResponse({"ready": False, "reason": state.error or "loading"}, status_code=503)
        return {"ready": True, **state.facts}

    @app.post("/v1/predict", dependencies=[Depends(authorised)])
    async def predict(image: UploadFile = File(...), mode: Optional[Mode] = Query(None)):
        endpoint, started = "/v1/predict", time.perf_counter()
        predictor = ready_predictor()
        used = mode or predictor.default_mode
        data = await image.read()
        try:
            # decoding is CPU work too: it runs in the worker thread with the prediction, off the event loop
            result = await run(endpoint, lambda: predict_one(predictor, decode_upload(data, cfg.max_image_pixels, cfg.min_image_side),
                                                              mode, image.filename or ""))
        except UploadRejected as e:
            metrics.observe(endpoint, used, e.status, time.perf_counter() - started)
            return JSONResponse({"error": e.reason, "image": image.filename}, status_code=e.status)
        except HTTPException:
            raise
        except Exception:  # noqa: BLE001 - a model failure: logged with an id the caller can quote
            return _internal_error(metrics, endpoint, used, started, image.filename)
        metrics.observe(endpoint, used, 200, time.perf_counter() - started)
        return JSONResponse(result)  # plain JSON: the answer is JSON-ready, FastAPI's re-encoding would only cost

    @app.post("/v1/predict/batch", dependencies=[Depends(authorised)])
    async def predict_batch(images: List[UploadFile] = File(...), mode: Optional[Mode] = Query(None)):
        endpoint, started = "/v1/predict/batch", time.perf_counter()
        predictor = ready_predictor()
        used = mode or predictor.default_mode
        if len(images) > cfg.max_batch_images:
            metrics.observe(endpoint, used, 422, time.perf_counter() - started)
            return JSONResponse({"error": f"{len(images)} photos; at most serve.max_batch_images="
                                          f"{cfg.max_batch_images} per request"}, status_code=422)
        answers = []
        for index, upload in enumerate(images):
            data = await upload.read()
            try:
                answer = await run(endpoint, lambda: predict_one(predictor, decode_upload(data, cfg.max_image_pixels, cfg.min_image_side),
                                                                 mode, upload.filename or ""))
            except UploadRejected as e:
                metrics.error(endpoint, f"bad_photo_{e.status}")
                answer = {"index": index, "image": upload.filename, "status": e.status, "error": e.reason}
            except HTTPException:
                raise
            except Exception:  # noqa: BLE001
                error_id = uuid.uuid4().hex[:12]
                log.exception("serve: model failure %s on %s", error_id, upload.filename)
                metrics.error(endpoint, "model_failure")
                answer = {"index": index, "image": upload.filename, "status": 500, "error": "model failure",
                          "error_id": error_id}
            answers.append(answer)
        metrics.observe(endpoint, used, 200, time.perf_counter() - started)
        return JSONResponse({"results": answers, "latency_ms": (time.perf_counter() - started) * 1000})

    @app.get("/metrics", dependencies=[Depends(authorised)])
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    return app


def _internal_error(metrics: ApiMetrics, endpoint: str, mode: str, started: float, name: Optional[str]):
    error_id = uuid.uuid4().hex[:12]
    log.exception("serve: model failure %s on %s", error_id, name)
    metrics.observe(endpoint, mode, 500, time.perf_counter() - started)
    metrics.error(endpoint, "model_failure")
    return JSONResponse({"error": "model failure; see the server log", "error_id": error_id}, status_code=500)
