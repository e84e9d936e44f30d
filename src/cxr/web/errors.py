"""Refusals: `ApiError` (raised anywhere a request is turned down) and the table of every status a route
can answer with, so /openapi.json documents exactly what the code raises."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from cxr import images
from cxr.web.schemas import ErrorBody

RETRY_AFTER_S = 2

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
    """A refusal: becomes `{error, message}` with its status."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self) -> JSONResponse:
        body = ErrorBody(error=self.code, message=self.message, **self.extra).model_dump(exclude_none=True)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def image_error(e: images.ImageError) -> ApiError:
    status, code = next((s, c) for cls, s, c in IMAGE_ERRORS if isinstance(e, cls))
    return ApiError(status, code, str(e))


def refusals(descriptions: dict[int, str]) -> dict[int | str, dict]:
    """responses= for a route: each status -> ErrorBody, with its description."""
    out: dict[int | str, dict] = {}
    for status, text in descriptions.items():
        out[status] = {"model": ErrorBody, "description": text}
        if status == 503:
            out[status]["headers"] = {"Retry-After": {
                "description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}
    return out


# Every request can be refused for its query string (FastAPI's validation, answered by app.invalid).
INVALID_REQUEST = refusals({422: "Invalid query parameters (invalid_request)"})
# What an admitted upload (deps.AdmittedUpload) can be refused with before a route's own code decides.
UPLOAD_REFUSALS = refusals({
    400: "No field 'file', malformed or cut-off multipart (missing_file, bad_multipart, incomplete_upload, "
         "client_disconnected)",
    408: "The upload took too long (upload_timeout)",
    413: "The upload is over the size limit (upload_too_large)",
    415: "The body is not multipart/form-data (not_multipart)",
    503: "Busy: all inference slots and the queue are full; retry after Retry-After seconds (busy)",
})
# What reading a film can be refused with (IMAGE_ERRORS above, and the gate).
FILM_REFUSALS = refusals({
    400: "Not an image, empty, corrupt or unreadable (not_an_image, empty_image, corrupt_image, "
         "unreadable_image)",
    413: "The image has too many pixels (image_too_large)",
    415: "An image format or codec that cannot be read (unsupported_image)",
    422: "Too small to be a film (image_too_small), or not a frontal chest X-ray (not_a_chest_xray, with "
         "gate_score)",
})
# Any route: the catch-all handler's answer; never a traceback.
INTERNAL = refusals({500: "Something went wrong on the server (internal)"})


def merged(*tables: dict[int | str, dict]) -> dict[int | str, dict]:
    """Several refusal tables as one responses=, descriptions of a shared status joined."""
    out: dict[int | str, dict] = {}
    for table in tables:
        for status, doc in table.items():
            if status in out:
                doc = {**out[status], "description": f"{out[status]['description']}; {doc['description']}"}
            out[status] = doc
    return out
