"""The web app: `create_app` puts the routes (cxr.web.routes) around one Predictor, with the security
headers and the error handlers that make every failure `{error, message}` JSON.

Uploads are read from the request stream by our own bounded multipart reader (cxr.web.uploads): nothing
is spooled to disk, nothing is logged, and a body over the limit is refused while it streams. Inference
runs in a small thread pool behind an admission counter (cxr.web.deps), so the event loop stays
responsive and a saturated server answers 503 at once.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cxr import settings as config
from cxr.images import capture
from cxr.web import render
from cxr.web.deps import Admission, Served, UploadLimits
from cxr.web.errors import ApiError
from cxr.web.routes import router

log = logging.getLogger("cxr.web.app")
STATIC_DIR = config.STATIC_DIR  # through importlib.resources: an installed wheel finds its page
NOT_CLINICAL = "Research software, not for clinical use: it does not replace a radiologist."

SECURITY_HEADERS = [
    # 'wasm-unsafe-eval' lets the offline page compile onnxruntime-web's WASM (its own files: no CDN);
    # COEP with COOP makes the page cross-origin isolated, which WASM threads (SharedArrayBuffer) need.
    (b"content-security-policy", b"default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
                                 b"worker-src 'self' blob:; img-src 'self' data: blob:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"permissions-policy", b"camera=(self), microphone=(), geolocation=()"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-embedder-policy", b"require-corp"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class SecurityHeaders:
    """Plain ASGI middleware (no BaseHTTPMiddleware: it buffers and breaks streaming) adding the headers."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = scope["path"].startswith("/api/")

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if api:  # results about a patient's film must not linger in shared caches
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(predictor=None, *, model: str | Path | None = None, max_concurrency: int = 1, max_queue: int = 8,
               max_upload_bytes: int = config.MAX_UPLOAD_BYTES, upload_timeout: float = 120.0,
               threads: int | None = None) -> FastAPI:
    """The app around one Predictor (loaded once here from `model`, None = bundled, unless given).

    max_concurrency inferences run at once (each uses `threads` torch threads); max_queue more wait; a
    further request gets 503. Raises errors.ModelError when the model cannot be loaded.
    """
    if predictor is None:
        from cxr.inference.predictor import Predictor

        predictor = Predictor(model, threads=threads)
    admission = Admission(max_concurrency, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        admission.open()
        # The film finder's imports load in the background: /healthz answers at once, the first photo is fast.
        threading.Thread(target=capture.warm_up, name="cxr-warm-up", daemon=True).start()
        yield
        admission.close()

    app = FastAPI(title="cxr", version=_version(), debug=False, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description=f"Chest X-ray findings (NIH ChestX-ray14). {NOT_CLINICAL}")
    app.state.predictor, app.state.admission = predictor, admission
    app.state.served = served(predictor, model)
    app.state.upload_limits = UploadLimits(max_upload_bytes, upload_timeout)
    _add_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    return app


def served(predictor, model: str | Path | None) -> Served:
    meta = predictor.meta
    # What is reported: every output, or P(Pneumothorax) alone for the 2-class model (the Predictor's rule).
    outputs = tuple(getattr(predictor, "findings", meta.outputs))
    name = render.model_name(meta, model if model is not None else getattr(predictor, "path", None))
    return Served(name, outputs, render.model_card(meta, name, outputs), render.summary(meta, name))


def _version() -> str:
    from cxr import __version__
    return __version__


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is `{error, message}` JSON; nothing ever shows a traceback or echoes the body."""

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.code)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: "No such page or endpoint; the API is under /api/v1 (see /docs).",
                   405: f"{request.method} is not allowed here; see /docs for each endpoint's method."}
        response = ApiError(exc.status_code, code, message.get(exc.status_code, str(exc.detail))).response()
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:3])
        return ApiError(422, "invalid_request", f"Invalid request ({where}); see /docs.").response()

    @app.exception_handler(ClientDisconnect)
    async def gone(request, exc):
        return ApiError(400, "client_disconnected", "The upload stopped before it ended; send it again.").response()

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "internal", "Something went wrong on the server; try again, "
                        "and report it if it keeps happening.").response()
