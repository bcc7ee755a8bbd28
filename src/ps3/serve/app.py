"""The HTTP service (FastAPI): ``POST /v1/encode``, ``POST /v1/look_closer``, ``GET /healthz``,
``GET /metrics``. The contract is in ``docs/serve.md``.

Every request is answered with 200 or a JSON ``{"error": ...}`` naming the field and what to
send: 400 (bad image or parameter), 404 (unknown or expired session), 413 (upload or pixel count
over the limits), 503 with ``Retry-After`` (every queue slot held), 504 (the request outlived
``request_timeout_s``). A client that disconnects while waiting gives its slot back and its job
leaves the queue.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher
from .engine import Budget, Engine, Job, JobResult, RequestError, content_digest
from .metrics import Metrics
from .sessions import Session, SessionStore
from .wire import dump_output

log = logging.getLogger("ps3.serve")

ENCODE_FIELDS = {"image", "num_look_close", "num_token_look_close", "prompt", "only_select_first_n_scale", "session"}
LOOK_CLOSER_FIELDS = {"session", "prompt", "num_look_close", "num_token_look_close", "only_select_first_n_scale"}
MAX_PROMPT_CHARS = 4096


@dataclass
class Limits:
    max_upload_bytes: int = 64 * 2**20
    request_timeout_s: float = 60.0
    retry_after_s: int = 1


def _int_field(form, name: str, allow_all: bool = False):
    value = form.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"{name} must be a form field, not a file")
    text = value.strip().lower()
    if allow_all and text == "all":
        return "all"
    try:
        number = int(text)
    except ValueError:
        raise RequestError(400, f"{name} must be a non-negative integer{' or all' if allow_all else ''}, "
                                f"got {value[:40]!r}") from None
    if number < 0 or number > 10**9:
        raise RequestError(400, f"{name} must be a non-negative integer below 10^9, got {number}")
    return number


def _text_field(form, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"{name} must be a form field (text), not a file")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(400, f"{name} is {len(value)} characters: send at most {MAX_PROMPT_CHARS}")
    return value


def _check_fields(form, allowed: set[str]) -> None:
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise RequestError(400, f"unknown form field {unknown[0]!r}: send only {sorted(allowed)}")


def _budget(form) -> Budget:
    looks = _int_field(form, "num_look_close", allow_all=True)
    tokens = _int_field(form, "num_token_look_close", allow_all=True)
    first_n = _int_field(form, "only_select_first_n_scale")
    return Budget(looks, tokens, first_n)


class Service:
    """The state the routes share: engine, batcher, sessions, metrics and limits."""

    def __init__(self, engine: Engine, batcher: Batcher, sessions: SessionStore, limits: Limits, metrics: Metrics):
        self.engine, self.batcher, self.sessions, self.limits, self.metrics = engine, batcher, sessions, limits, metrics
        # Images are decoded in worker threads, a few at a time: more would not finish sooner on
        # the cores there are, and every extra thread keeps its own malloc arena of freed buffers.
        self._decoders = anyio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))

    async def form(self, request: Request, allowed: set[str]):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_upload_bytes + 2**20:
            raise RequestError(413, f"image: the upload is {int(length)} bytes, more than the limit of "
                                    f"{self.limits.max_upload_bytes}: send a smaller file")
        try:
            form = await request.form(max_files=1, max_fields=len(allowed) + 1, max_part_size=64 * 1024)
        except Exception as exc:  # malformed multipart body, too many fields, …
            detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
            raise RequestError(400, f"the body must be a multipart form ({detail})") from exc
        _check_fields(form, allowed)
        return form

    async def read_image(self, form) -> bytes:
        upload = form.get("image")
        if upload is None:
            raise RequestError(400, "image: missing; send the image file as the multipart field 'image'")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "image must be a file part (multipart filename=...), not a text field")
        data = await upload.read(self.limits.max_upload_bytes + 1)
        if len(data) > self.limits.max_upload_bytes:
            raise RequestError(413, f"image: the upload is over the limit of {self.limits.max_upload_bytes} bytes: "
                                    "send a smaller file")
        if not data:
            raise RequestError(400, "image: the file is empty; send a JPEG, PNG, WebP or TIFF image")
        return data

    async def image_job(self, key: tuple, data: bytes, budget: Budget, prompt: str | None,
                        old_maps: list[torch.Tensor] | None = None) -> Job:
        """A job for an image: from the cache when it holds the image, decoded otherwise."""
        engine = self.engine
        if prompt is not None and not engine.has_text:
            raise RequestError(400, "prompt: this model has no text tower and tokenizer; leave prompt out for "
                                    "bottom-up selection")
        cached = engine.cache.get(key)
        if cached is not None:
            pixels, size = cached.pixels, cached.image_size
        else:
            pixels, size = await anyio.to_thread.run_sync(engine.decode, data, limiter=self._decoders)
        input_size = tuple(pixels.shape[-2:])
        budget = engine.canonical(budget, input_size)
        engine.check_budget(budget, input_size)
        return Job(key, budget, prompt, pixels=pixels, image_size=size,
                   cached=cached, old_maps=old_maps)

    async def run_job(self, request: Request, job: Job) -> JobResult | None:
        """Queue the job and wait for it; None when the client went away (the job is dropped)."""
        self.batcher.submit(job)
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=self.limits.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result in done:
            return result.result()
        self.batcher.cancel(job)
        if gone in done:
            return None
        raise RequestError(504, f"the request took longer than --request-timeout-s={self.limits.request_timeout_s:g}; "
                                "retry later or ask for fewer tokens")

    def respond(self, job: Job, result: JobResult, maps: list[torch.Tensor], new_maps=None,
                session: str | None = None) -> Response:
        engine = self.engine
        meta = {"tokens": str(result.last_hidden_state.shape[1]), "model": engine.model_name,
                "dtype": engine.dtype_name, "image_size": json.dumps(list(job.cached.image_size))}
        if session is not None:
            meta["session"] = session
        body = dump_output(result.last_hidden_state, maps, new_maps, meta)
        return Response(body, media_type="application/octet-stream")

    async def encode(self, request: Request) -> Response | None:
        form = await self.form(request, ENCODE_FIELDS)
        try:
            budget, prompt = _budget(form), _text_field(form, "prompt")
            keep = (_text_field(form, "session") or "0").strip().lower()
            if keep not in ("0", "1", "true", "false"):
                raise RequestError(400, f"session must be 1 (keep the image for look_closer) or 0, got {keep[:20]!r}")
            data = await self.read_image(form)
        finally:
            await form.close()  # removes the spooled upload
        job = await self.image_job(self.engine.key(content_digest(data)), data, budget, prompt)
        result = await self.run_job(request, job)
        if result is None:
            return None
        sid = None
        if keep in ("1", "true"):
            maps = [m.bool() for m in result.selection_maps] or self.engine.empty_maps(job.cached.pixels.shape[-2:])
            sid = self.sessions.add(Session(job.key, data, prompt, maps))
        return self.respond(job, result, result.selection_maps, session=sid)

    async def look_closer(self, request: Request) -> Response | None:
        form = await self.form(request, LOOK_CLOSER_FIELDS)
        sid = _text_field(form, "session")
        if not sid:
            raise RequestError(400, "session: missing; send the id an encode with session=1 returned")
        budget, prompt = _budget(form), _text_field(form, "prompt")
        session = self.sessions.get(sid)
        if session is None:
            raise RequestError(404, f"session {sid[:64]!r} is unknown or expired: encode the image again with "
                                    "session=1")
        async with session.lock:  # turns of one session run one after the other
            prompt = prompt if prompt is not None else session.prompt
            job = await self.image_job(session.key, session.data, budget, prompt, old_maps=session.maps)
            result = await self.run_job(request, job)
            if result is None:
                return None
            new = result.selection_maps or [torch.zeros_like(m) for m in session.maps]
            session.maps = [old | m.bool() for old, m in zip(session.maps, new)]
            session.prompt = prompt
            return self.respond(job, result, [m for m in session.maps], new_maps=new, session=sid)


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="ps3 serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = service.metrics

    async def answer(endpoint: str, request: Request, handler) -> Response:
        start = time.perf_counter()
        status = 500
        admitted = service.batcher.admit()
        try:
            if not admitted:
                status = 503
                return JSONResponse({"error": f"the server is busy (all {service.batcher.max_queue} queue slots held): "
                                              f"retry after {service.limits.retry_after_s} s"},
                                    503, headers={"Retry-After": str(service.limits.retry_after_s)})
            response = await handler(request)
            if response is None:  # the client left
                status = 499
                return Response(status_code=499)
            status = response.status_code
            return response
        except RequestError as exc:
            status = exc.status
            return JSONResponse({"error": str(exc)}, exc.status)
        except Exception as exc:
            log.exception("internal error in %s", endpoint)
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"[:500]}, 500)
        finally:
            if admitted:
                service.batcher.release()
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    @app.post("/v1/encode")
    async def encode(request: Request):
        return await answer("encode", request, service.encode)

    @app.post("/v1/look_closer")
    async def look_closer(request: Request):
        return await answer("look_closer", request, service.look_closer)

    @app.get("/healthz")
    async def healthz():
        if service.batcher.alive:
            return {"status": "ok", "model": service.engine.model_name, "dtype": service.engine.dtype_name}
        return JSONResponse({"error": "the encoder worker is not running"}, 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    return app
