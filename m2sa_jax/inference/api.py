"""The HTTP API: ``/api/segment``, ``/api/segment_batch``, ``/api/health``, ``/api/model``.

Uploads are parsed from the request body in memory (never spooled to disk) after
:class:`BodyLimit` has capped its size; every refusal is JSON ``{"error": message}`` with a 4xx
status that says why (400 unreadable input, 401 key, 413 too large, 415 not multipart,
422 bad field, 503 busy or starting, 504 timed out).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from m2sa_jax.inference.batching import QueueFull, RequestTimeout
from m2sa_jax.inference.engine import InputError
from m2sa_jax.inference.formats import MASK_FORMATS, decode_upload, mask_records

if TYPE_CHECKING:
    from m2sa_jax.inference.service import Service


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: request bodies under ``prefix`` above ``limit`` bytes get a 413, whether
    announced by Content-Length or found while streaming; nothing past the limit is read."""

    def __init__(self, app, limit: int, prefix: str = "/api/"):
        self.app, self.limit, self.prefix = app, limit, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        message = (f"the request body is larger than this server's limit of "
                   f"{self.limit / 2**20:g} MiB; send a smaller image")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(413, message)(scope, receive, send)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await error_response(413, message)(scope, receive, send)


def _multipart_schema(batch: bool) -> dict:
    many = {"type": "array", "items": {"type": "string", "format": "binary"}}
    one_file = {"type": "string", "format": "binary"}
    props: dict[str, Any] = {
        "image": dict(many if batch else one_file, description=(
            "image file(s): one for all questions, or one per question in order" if batch
            else "the image (JPEG, PNG, WebP, ...)")),
        "question": ({"type": "array", "items": {"type": "string"}} if batch else
                     {"type": "string", "description": "what to ask about the image"}),
        "max_new_tokens": {"type": "integer", "description": "cap on the answer's tokens"},
        "masks": {"type": "string", "enum": list(MASK_FORMATS), "default": "rle",
                  "description": "COCO RLE, base64 PNG, or no masks"},
    }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["image", "question"], "properties": props}}}}}


def api_router(service: "Service") -> APIRouter:
    settings = service.settings

    def check_key(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})

    router = APIRouter(prefix="/api", dependencies=[Depends(check_key)])

    async def read_form(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ApiError(415, f"send multipart/form-data (fields: image = a file, question = "
                           f"text), not {ctype.split(';')[0] or 'a body without Content-Type'}")
        parser = MultiPartParser(request.headers, request.stream(),
                                 max_files=settings.max_items_per_request,
                                 max_fields=2 * settings.max_items_per_request + 4,
                                 max_part_size=4 * settings.max_question_chars + 1024)
        parser.spool_max_size = settings.max_body_bytes + 1    # uploads stay in memory
        try:
            return await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, f"malformed multipart body: {e}") from None

    async def images_of(form) -> list[tuple[bytes, str]]:
        out = []
        for k, value in enumerate(form.getlist("image")):
            if not isinstance(value, UploadFile):
                raise ApiError(400, "image: send the image as a file part (curl -F "
                               "image=@photo.jpg); this server never opens a file by name")
            out.append((await value.read(), f"image {value.filename or k + 1!r}"))
        if not out:
            raise ApiError(422, "image: missing; send the image as a file part named 'image'")
        return out

    def options(form) -> tuple[int | None, str]:
        raw = form.get("max_new_tokens")
        max_new = None
        if raw not in (None, ""):
            if not isinstance(raw, str) or not raw.strip().lstrip("-").isdigit():
                raise ApiError(422, f"max_new_tokens: expected an integer, got {raw!r}")
            max_new = int(raw)
        fmt = form.get("masks") or "rle"
        if fmt not in MASK_FORMATS:
            raise ApiError(422, f"masks: {fmt!r} is not one of {', '.join(MASK_FORMATS)}")
        return max_new, fmt

    def prepare(pairs, max_new):
        items, decoded = [], {}
        for (data, name), question in pairs:
            if not isinstance(question, str):
                raise ApiError(422, "question: send the question as a text field")
            key = hashlib.sha256(data).hexdigest()       # same bytes: one decode, one encoding
            rgb = decoded.get(key)
            if rgb is None:
                rgb = decoded[key] = decode_upload(data, name, service.max_image_pixels)
            items.append(service.engine.prepare(rgb, question, max_new_tokens=max_new,
                                                image_key=key))
        return items

    def respond(done, fmt, total) -> list[dict]:
        out = []
        for result, queued in done:
            h, w = result.mask_logits.shape[1:]
            model_ms = sum(v for k, v in result.timings.items() if k.endswith("_ms"))
            out.append({"question": result.question, "answer": result.answer,
                        "labels": result.labels, "masks": mask_records(result, fmt),
                        "height": int(h), "width": int(w),
                        "timings": {"queue_ms": round(1e3 * queued, 1),
                                    "model_ms": round(model_ms, 1),
                                    "total_ms": round(1e3 * total, 1),
                                    "batch_size": result.timings["batch_size"]}})
        return out

    async def run(pairs, max_new, fmt) -> list[dict]:
        service.require_ready()
        t0 = time.perf_counter()
        items = await run_in_threadpool(prepare, pairs, max_new)
        done = await service.segment_async(items)
        return await run_in_threadpool(respond, done, fmt, time.perf_counter() - t0)

    @router.post("/segment", openapi_extra=_multipart_schema(False),
                 summary="Answer one question about one image, with one mask per [SEG]")
    async def segment(request: Request):
        form = await read_form(request)
        images = await images_of(form)
        questions = form.getlist("question")
        if len(images) != 1 or len(questions) != 1:
            raise ApiError(422, f"/api/segment takes one image and one question (got "
                           f"{len(images)} and {len(questions)}); use /api/segment_batch for more")
        max_new, fmt = options(form)
        return (await run([(images[0], questions[0])], max_new, fmt))[0]

    @router.post("/segment_batch", openapi_extra=_multipart_schema(True),
                 summary="Several questions: about one image, or one image per question")
    async def segment_batch(request: Request):
        form = await read_form(request)
        images = await images_of(form)
        questions = form.getlist("question")
        if not questions:
            raise ApiError(422, "question: missing; send one or more fields named 'question'")
        if len(questions) > settings.max_items_per_request:
            raise ApiError(413, f"{len(questions)} questions is above this server's limit of "
                           f"{settings.max_items_per_request} per request")
        if len(images) not in (1, len(questions)):
            raise ApiError(422, f"{len(images)} images for {len(questions)} questions: send one "
                           f"image for all questions, or one per question in the same order")
        max_new, fmt = options(form)
        pairs = [(images[0] if len(images) == 1 else images[k], q) for k, q in enumerate(questions)]
        return {"results": await run(pairs, max_new, fmt)}

    @router.get("/health", summary="Ready (200) or still compiling / failed (503)")
    async def health():
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @router.get("/model", summary="What is loaded: kind, variant, dtype, parameter count, limits")
    async def model():
        return service.model_info()

    return router


def install_error_handlers(app) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request, exc: InputError):
        return error_response(exc.status, str(exc))

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc: QueueFull):
        return error_response(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestTimeout)
    async def _timeout(request, exc: RequestTimeout):
        return error_response(504, str(exc))
