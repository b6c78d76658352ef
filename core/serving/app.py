"""The HTTP API (FastAPI): /ping, /invocations and /model, with request ids, one log line a request and safe errors."""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from core.evaluation.calibration import chosen_threshold
from core.gpu import cpu_cores
from core.models.networks import file_digest, model_file
from core.serving.batcher import DynamicBatcher, QueueFull
from core.serving.inputs import IMAGE_TYPES, JSON_TYPE, BadInput, PhotoReader, fetch_s3, uri_list

log = logging.getLogger("binsight.serve")
MAX_BODY_BYTES = 10 * 1024 * 1024
REQUEST_ID = "X-Request-Id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


# One photo's answer. A toss-up (the two likeliest counts within 5 points) is "count or second_count": `tie` says so.
ANSWER_SCHEMA = {"type": "object", "required": ["count", "second_count", "tie", "probabilities", "confidence",
                                                "low_confidence", "model"], "properties": {
    "count": {"type": "integer", "description": "the likeliest count"},
    "second_count": {"type": ["integer", "null"], "description": "the other count when the two likeliest are a "
                                                                "toss-up (\"3 or 4\"), else null"},
    "tie": {"type": "boolean", "description": "whether the two likeliest counts are a toss-up"},
    "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
    "confidence": {"type": "number"}, "low_confidence": {"type": "boolean"}, "model": {"type": "string"},
    "uri": {"type": "string"}, "error": {"type": "string"}}}


class ServeError(Exception):
    """A request answered with an error status and a message for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _error_responses(*statuses: int) -> dict:
    """OpenAPI entries for the error answers a route gives: {"error": message, "request_id": id}."""
    schema = {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}, "request_id": {"type": ["string", "null"]}}}
    meaning = {400: "not a usable photo or list of URIs", 413: "the body is too large",
               415: "a content type not accepted", 503: "the model is still loading, or the service is busy"}
    return {status: {"description": meaning[status], "content": {"application/json": {"schema": schema}}}
            for status in statuses}


def _finite(value):
    """JSON-safe: NaN and infinities become null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Service:
    """A loaded model, its batcher, and how to turn photos into answers."""

    def __init__(self, model_path: str | Path, engine: str = "auto", max_batch: int = 16, window_ms: float = 5.0,
                 precision: str = "fp32"):
        from core.models.engines import load_fast_model

        self.model_path = model_file(model_path)
        self.model, self.meta = load_fast_model(self.model_path, engine=engine, precision=precision)
        self.classes = [int(c) for c in self.meta["classes"]]
        self.model_id = f"{self.model_path.parent.name}@{file_digest(self.model_path)}"
        self.reader = PhotoReader(self.meta)
        self.card: str | None = None
        self.threshold = chosen_threshold(self.meta, self.model_path.parent.name)
        self.batcher = DynamicBatcher(self.model.probabilities, max_batch=max_batch, window_ms=window_ms)
        # Photos are decoded on a few threads of our own, not on the server's pool of forty: every thread that
        # allocates photo-sized arrays gets its own malloc arena, and the server's memory grew with each one.
        self.decoders = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="binsight-decode")

    async def decode(self, data: bytes, name: str) -> np.ndarray:
        """A photo's bytes as the model's input array (BadInput when they are not a usable photo)."""
        return await asyncio.get_running_loop().run_in_executor(self.decoders, self.reader.array, data, name)

    def answer(self, probs: np.ndarray) -> dict:
        from core.models.inference import second_count

        best = int(np.argmax(probs))
        confidence = float(probs[best])
        other = second_count(dict(zip(self.classes, map(float, probs))))
        return {"count": self.classes[best], "second_count": other, "tie": other is not None,
                "probabilities": {str(c): float(p) for c, p in zip(self.classes, probs)},
                "confidence": confidence, "low_confidence": confidence < self.threshold, "model": self.model_id}

    async def probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        try:
            future = self.batcher.submit(np.stack(arrays))
        except QueueFull as exc:
            raise ServeError(503, f"the service is busy ({exc}); retry shortly") from None
        return await asyncio.wrap_future(future)

    def description(self) -> dict:
        from core.jobs.runs import final_test_metrics, read_run_metrics
        from core.models.preprocess import input_size, tta_views

        described = {"model": self.model_id, "path": str(self.model_path), "backbone": self.meta.get("backbone"),
                     "head": self.meta.get("head"), "classes": self.classes,
                     "input_size": list(input_size(self.meta)), "tta_views": list(tta_views(self.meta)),
                     "engine": self.model.engine, "precision": self.model.precision,
                     "engine_check": getattr(self.model, "check", None), "low_confidence_threshold": self.threshold,
                     "metrics": final_test_metrics(read_run_metrics(self.model_path.parent)),
                     "batching": self.batcher.stats()}
        if "temperature" in self.meta:
            described["temperature"] = self.meta["temperature"]
        if self.card is None:  # built once: from the run's own files, which do not change while it is served
            from core.evaluation.model_card import card_for_run

            self.card = card_for_run(self.model_path.parent, self.meta, model_id=self.model_id)
        described["model_card"] = self.card
        return _finite(described)

    def close(self) -> None:
        self.batcher.close()
        self.decoders.shutdown(wait=False, cancel_futures=True)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the body is {int(declared):,} bytes; at most {limit:,} are accepted")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(413, f"the body is over {limit:,} bytes; at most {limit:,} are accepted")
            chunks.append(chunk)
    except ClientDisconnect:  # the caller hung up mid-body: its mistake, not an internal error
        raise ServeError(400, f"the connection closed after {size:,} bytes of the body") from None
    return b"".join(chunks)


def create_app(model_path: str | Path, engine: str = "auto", max_batch: int = 16, window_ms: float = 5.0,
               max_body_bytes: int = MAX_BODY_BYTES, precision: str = "fp32") -> FastAPI:
    """The service for one model file; the model is loaded (and exported to ONNX) before the first request."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = await run_in_threadpool(Service, model_path, engine, max_batch, window_ms, precision)
        log.info("serving %s with %s %s (batches of up to %d photos, %.0f ms window)", app.state.service.model_id,
                 app.state.service.model.engine, app.state.service.model.precision, max_batch, window_ms)
        try:
            yield
        finally:
            app.state.service.close()

    app = FastAPI(title="Binsight prediction service", lifespan=lifespan,
                  description="Counts the objects in warehouse bin photos (SageMaker inference-container API).")
    app.state.service = None

    @app.middleware("http")
    async def request_id_and_log(request: Request, call_next):
        given = request.headers.get(REQUEST_ID, "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        request.state.outcome = ""
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 — the caller gets a 500 with the id; the server keeps going
            log.exception("request %s failed", request_id)
            request.state.outcome = f"internal error: {exc.__class__.__name__}"
            response = JSONResponse({"error": "internal error", "request_id": request_id}, status_code=500)
        response.headers[REQUEST_ID] = request_id
        log.info("%s %s %s %d %.1fms %s", request_id, request.method, request.url.path, response.status_code,
                 (time.perf_counter() - started) * 1000, request.state.outcome)
        return response

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        request.state.outcome = exc.message
        return JSONResponse({"error": exc.message, "request_id": getattr(request.state, "request_id", None)},
                            status_code=exc.status)

    def service(request: Request) -> Service:
        if request.app.state.service is None:
            raise ServeError(503, "the model is still loading")
        return request.app.state.service

    @app.get("/ping", summary="200 when the model is loaded", responses=_error_responses(503))
    async def ping(request: Request):
        service(request)
        return {"status": "ok"}

    @app.get("/model", summary="the loaded model: backbone, classes, test metrics, calibration, model card (Markdown)",
             responses=_error_responses(503))
    async def model(request: Request):
        return service(request).description()

    @app.post("/invocations", summary="count the objects in a photo, or in photos given as s3:// URIs",
              responses=_error_responses(400, 413, 415, 503) | {200: {"description": "the count of the photo, or of "
                                                                  "each photo of the list", "content": {
                  "application/json": {"schema": {"anyOf": [ANSWER_SCHEMA, {"type": "object", "properties": {
                      "results": {"type": "array", "items": {"type": "object", "properties": ANSWER_SCHEMA[
                          "properties"]}}, "model": {"type": "string"}}}]}}}}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                  "image/png": {"schema": {"type": "string", "format": "binary"}},
                  "application/x-image": {"schema": {"type": "string", "format": "binary"}},
                  JSON_TYPE: {"schema": {"type": "array", "items": {"type": "string"}},
                              "example": ["s3://aft-vbi-pds/bin-images/523.jpg"]}}}})
    async def invocations(request: Request):
        served = service(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in IMAGE_TYPES and kind != JSON_TYPE:
            raise ServeError(415, f"content type {kind or '(none)'!r} is not accepted: send a photo "
                                  f"(image/jpeg, image/png, application/x-image) or a JSON list of s3:// URIs")
        body = await read_body(request, max_body_bytes)
        try:
            if kind == JSON_TYPE:
                return await _predict_uris(served, request, uri_list(body))
            array = await served.decode(body, "photo")
        except BadInput as exc:
            raise ServeError(400, str(exc)) from None
        result = served.answer((await served.probabilities([array]))[0])
        request.state.outcome = f"count {result['count']} ({result['confidence']:.2f})"
        return result

    return app


async def _predict_uris(served: Service, request: Request, uris: list[str]) -> dict:
    found = await run_in_threadpool(fetch_s3, uris)
    results: list[dict] = [{"uri": uri} for uri in uris]
    arrays, rows = [], []
    for row, uri in enumerate(uris):
        where = found[uri]
        if isinstance(where, str):
            results[row]["error"] = where
            continue
        try:
            data = await run_in_threadpool(Path(where).read_bytes)
            arrays.append(await served.decode(data, Path(where).name))
            rows.append(row)
        except BadInput as exc:
            results[row]["error"] = str(exc)
        except OSError as exc:
            results[row]["error"] = f"{Path(where).name}: cannot be read ({exc.strerror or exc})"
    if arrays:
        for row, probs in zip(rows, await served.probabilities(arrays)):
            results[row].update(served.answer(probs))
    request.state.outcome = f"{len(rows)} of {len(uris)} photos predicted"
    return {"results": results, "model": served.model_id}
