"""The web app: the page at `/`, the JSON API under /api/v1, /healthz, and an offline API reference at /docs.

Uploads are read from the request stream by our own bounded multipart reader: nothing is spooled to
disk (python-multipart/Starlette would spool files over 1 MB to a temporary file), nothing is logged,
and a body over the limit is refused while it streams. Inference runs in a small thread pool behind an
admission counter, so the event loop stays responsive and a saturated server answers 503 at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cxr.web import schemas as M
from cxr import settings as config
from cxr.images import read as images
log = logging.getLogger("cxr.web.app")
STATIC_DIR = Path(__file__).resolve().parent / "static"
UPLOAD_LABEL = "the uploaded file"  # never the client's file name: it may carry a patient's name
MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries allowed on top of the file itself

# python-multipart logs the offending bytes of a malformed body as warnings; it raises as well, and the
# client gets the error, so its parser gets a logger that drops everything: bodies never reach a log.
_PARSER_LOG = logging.getLogger("cxr.web.app.multipart")
_PARSER_LOG.propagate = False
_PARSER_LOG.addHandler(logging.NullHandler())
_PARSER_LOG.setLevel(logging.CRITICAL + 1)
NOT_CLINICAL = "Research software, not for clinical use: it does not replace a radiologist."

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"permissions-policy", b"camera=(self), microphone=(), geolocation=()"),
    (b"cross-origin-opener-policy", b"same-origin"),
]

# images.ImageError subclasses -> (HTTP status, code). Order matters: the first isinstance match wins.
IMAGE_ERRORS: list[tuple[type, int, str]] = [
    (images.EmptyImageError, 400, "empty_image"),
    (images.NotAnImageError, 400, "not_an_image"),
    (images.CorruptImageError, 400, "corrupt_image"),
    (images.ImageTooLargeError, 413, "image_too_large"),
    (images.UnsupportedImageError, 415, "unsupported_image"),
    (images.ImageTooSmallError, 422, "image_too_small"),
    (images.ImageError, 400, "unreadable_image"),
]


class ApiError(Exception):
    """A refusal: becomes `{error, message}` with its status. Raised anywhere a request is turned down."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self) -> JSONResponse:
        body = M.ErrorBody(error=self.code, message=self.message, **self.extra).model_dump(exclude_none=True)
        headers = {"Retry-After": "2"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


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


class Admission:
    """At most `slots` inferences at once and `queue` more waiting; beyond that, refuse straight away.

    A ticket is taken before the body is read, so the number of bodies held in memory is bounded too.
    """

    def __init__(self, slots: int, queue: int) -> None:
        if slots < 1 or queue < 0:
            raise ValueError(f"max_concurrency must be >= 1 and max_queue >= 0, got {slots} and {queue}")
        self.limit = slots + queue
        self.admitted = 0
        self.pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="cxr-infer")
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.admitted >= self.limit:
                raise ApiError(503, "busy", "The server is busy reading other films; try again in a few seconds.")
            self.admitted += 1

    def leave(self, *_) -> None:
        with self._lock:  # also called from inference threads, as a future's done-callback
            self.admitted -= 1

    async def run(self, fn, *args):
        """fn(*args) on an inference thread, the event loop serving meanwhile; then leave().

        The ticket is given back when the work ends, not when the request does: a request cancelled while
        its film is being read must not free a place the thread still occupies.
        """
        future = self.pool.submit(fn, *args)
        future.add_done_callback(self.leave)  # before wrap_future's: the count is right when we resume
        return await asyncio.wrap_future(future)


# ------------------------------------------------------------------------------------------ uploads


class _FilePart:
    """Collects the first multipart part named `file` into memory, counting bytes against the limit."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data, self.found, self.ended = limit, bytearray(), False, False
        self._field, self._value, self._headers, self._in_file = b"", b"", {}, False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._in_file = {}, False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._in_file = params.get(b"name") == b"file" and not self.found
        self.found = self.found or self._in_file

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            if len(self.data) + (end - start) > self.limit:
                raise _too_big(self.limit)
            self.data += data[start:end]

    def _part_end(self) -> None:
        self._in_file = False

    def _end(self) -> None:
        self.ended = True


def _too_big(limit: int) -> ApiError:
    return ApiError(413, "upload_too_large",
                    f"The upload is larger than {limit / 2**20:.0f} MB; send the film as PNG or JPEG "
                    "(NIH films are 1024 x 1024 and a few hundred kB).")


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(415, "not_multipart", "Send the film as multipart/form-data in a field named 'file' "
                       "(e.g. curl -F file=@film.png .../api/v1/predict).")
    return params[b"boundary"]


async def read_upload(request: Request, limit: int, timeout: float) -> bytes:
    """The bytes of the multipart field `file`, held in memory only, refused past `limit` bytes."""
    boundary = _boundary(request)
    body_limit = limit + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise _too_big(limit)  # refused before a single byte of the body is read
    part = _FilePart(limit)
    try:
        parser = MultipartParser(boundary, part.callbacks())
        parser.logger = _PARSER_LOG
        received = 0
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_limit:  # Content-Length absent (chunked) or a lie
                    raise _too_big(limit)
                parser.write(chunk)
    except FormParserError:
        raise ApiError(400, "bad_multipart", "The upload is not well-formed multipart/form-data; "
                       "send the film in a field named 'file'.") from None
    except TimeoutError:
        raise ApiError(408, "upload_timeout", f"The upload took longer than {timeout:.0f} s; "
                       "try again on a better connection or send a smaller file.") from None
    if not part.found:
        raise ApiError(400, "missing_file", "No field named 'file' in the upload; send the film as 'file'.")
    if not part.ended:
        raise ApiError(400, "incomplete_upload", "The upload was cut off before its end; send it again.")
    return bytes(part.data)


# ------------------------------------------------------------------------------------------ inference


def _image_error(e: images.ImageError) -> ApiError:
    status, code = next((s, c) for cls, s, c in IMAGE_ERRORS if isinstance(e, cls))
    return ApiError(status, code, str(e))


def infer(predictor, data: bytes, heatmaps, preview: bool, model: M.ModelSummary) -> dict:
    """On an inference thread: predict, refuse or encode. Returns the JSON body of a 200.

    The film is decoded here first: its errors become refusals, it gives the preview, and a film larger
    than api_models.FILM_MAX_SIDE is handed to the Predictor downscaled (see there why).
    """
    try:
        gray = images.read_image(data, name=UPLOAD_LABEL)
        size = (gray.shape[1], gray.shape[0])
        data, gray = M.bounded_film(data, gray)
        pred = predictor.predict_one(data, name=UPLOAD_LABEL, heatmaps=heatmaps)
    except images.ImageError as e:
        raise _image_error(e) from None
    if pred.error:
        raise ApiError(400, "unreadable_image", str(pred.error))
    if pred.refused:
        raise ApiError(422, "not_a_chest_xray",
                       f"{pred.refused} This does not look like a frontal chest X-ray, so it was not read. "
                       "Send a frontal (PA or AP) chest film, photographed flat and filling the frame.",
                       gate_score=M._number(pred.gate_score))
    return M.prediction_out(pred, model, gray if preview else None, size).model_dump(exclude_none=True)


# ------------------------------------------------------------------------------------------ the app


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
    meta = predictor.meta
    # What is reported: every output, or P(Pneumothorax) alone for the 2-class model (the Predictor's rule).
    outputs = list(getattr(predictor, "findings", meta.outputs))
    name = M.model_name(meta, model if model is not None else getattr(predictor, "path", None))
    card, summary = M.model_card(meta, name, outputs), M.summary(meta, name)
    admission = Admission(max_concurrency, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        admission.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cxr", version=_version(), debug=False, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description=f"Chest X-ray findings (NIH ChestX-ray14). {NOT_CLINICAL}")
    app.state.predictor, app.state.admission = predictor, admission
    _add_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html")

    @app.get("/healthz", response_model=M.Health, tags=["service"])
    def healthz() -> M.Health:
        return M.Health(model=name)

    @app.get("/api/v1/model", response_model=M.ModelCard, tags=["model"])
    def model_info() -> M.ModelCard:
        """The model card: name, training data, validation AUCs, intended use."""
        return card

    @app.post("/api/v1/predict", response_model=M.PredictOut, tags=["predict"], responses=_REFUSALS,
              openapi_extra=_UPLOAD_SCHEMA)
    async def predict(request: Request,
                      heatmaps: str | None = Query(None, description="'all' or a comma list of findings"),
                      preview: bool = Query(False, description="Include the film as read (PNG, <= 512 px)")):
        """Read one film (multipart field `file`: PNG, JPEG or DICOM): 14 independent likelihoods."""
        try:
            wanted = M.parse_heatmaps(heatmaps, outputs)
        except ValueError as e:
            raise ApiError(400, "bad_heatmaps", str(e)) from None
        admission.enter()
        try:
            data = await read_upload(request, max_upload_bytes, upload_timeout)
        except BaseException:
            admission.leave()
            raise
        start = time.perf_counter()
        body = await admission.run(infer, predictor, data, wanted, preview, summary)  # leaves when done
        log.debug("predict: %.0f ms", 1000 * (time.perf_counter() - start))
        return JSONResponse(body)

    return app


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
        return JSONResponse({"error": "internal", "message": "Something went wrong on the server; try again, "
                             "and report it if it keeps happening."}, status_code=500)


_REFUSALS = {
    400: {"model": M.ErrorBody, "description": "Not an image, corrupt, empty, or no field 'file'"},
    408: {"model": M.ErrorBody, "description": "The upload took too long"},
    413: {"model": M.ErrorBody, "description": "Upload or image too large"},
    415: {"model": M.ErrorBody, "description": "Not multipart, or an image format/codec that cannot be read"},
    422: {"model": M.ErrorBody, "description": "Not a frontal chest X-ray (gate), or too small"},
    503: {"model": M.ErrorBody, "description": "Busy: all inference slots and the queue are full; retry"},
}

# The body is read by read_upload, not by a FastAPI parameter, so describe it for /openapi.json by hand.
_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "A frontal chest X-ray: PNG, JPEG or DICOM"}},
        }}},
    }
}
