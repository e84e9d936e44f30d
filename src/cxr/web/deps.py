"""What routes depend on: the app's one Predictor, what is served about its model, and admitted uploads.

An upload route declares `upload: AdmittedUpload` and calls `await upload.read()` then
`await upload.run(fn, ...)`: the admission ticket, the body's limits and the ticket's return on every
path (refusal, validation error, cancellation) come with it, so a second upload route copies nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from cxr.web.errors import ApiError
from cxr.web.schemas import ModelCard, ModelSummary
from cxr.web.uploads import read_upload


@dataclass(frozen=True)
class Served:
    """What the routes say about the model, worked out once when the app is made."""

    name: str
    outputs: tuple[str, ...]  # what is reported: every output, or P(Pneumothorax) alone for the 2-class task
    card: ModelCard
    summary: ModelSummary


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    timeout_s: float


class Admission:
    """At most `slots` inferences at once and `queue` more waiting; beyond that, refuse straight away.

    A ticket is taken before the body is read, so the number of bodies held in memory is bounded too.
    """

    def __init__(self, slots: int, queue: int) -> None:
        if slots < 1 or queue < 0:
            raise ValueError(f"max_concurrency must be >= 1 and max_queue >= 0, got {slots} and {queue}")
        self.limit, self.slots = slots + queue, slots
        self.admitted = 0
        self.pool, self._closed = self._new_pool(), False
        self._lock = threading.Lock()

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="cxr-infer")

    def open(self) -> None:
        """At the app's startup: a fresh pool if an earlier shutdown closed this one (one app, two servers)."""
        if self._closed:
            self.pool, self._closed = self._new_pool(), False

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._closed = True

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
        try:
            future = self.pool.submit(fn, *args)
        except BaseException:  # e.g. the pool shut down under us: the ticket must not leak
            self.leave()
            raise
        future.add_done_callback(self.leave)  # before wrap_future's: the count is right when we resume
        return await asyncio.wrap_future(future)


class Upload:
    """One request's upload: read() takes a ticket and the bytes, run() works on them off the event loop."""

    def __init__(self, request: Request, admission: Admission, limits: UploadLimits) -> None:
        self._request, self._admission, self._limits = request, admission, limits
        self._held = False

    async def read(self) -> bytes:
        """The multipart field `file`, in memory. 503 when the server is full, before a byte is read."""
        if self._held:
            raise RuntimeError("Upload.read() twice")
        self._admission.enter()
        self._held = True
        return await read_upload(self._request, self._limits.max_bytes, self._limits.timeout_s)

    async def run(self, fn, *args) -> Any:
        """fn(*args) on an inference thread; the ticket goes back when fn ends (see Admission.run)."""
        if not self._held:
            raise RuntimeError("Upload.run() before read(), or twice")
        self._held = False
        return await self._admission.run(fn, *args)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.leave()


def get_predictor(request: Request) -> Any:
    return request.app.state.predictor


def get_served(request: Request) -> Served:
    return request.app.state.served


async def admitted_upload(request: Request) -> AsyncIterator[Upload]:
    upload = Upload(request, request.app.state.admission, request.app.state.upload_limits)
    try:
        yield upload
    finally:  # refused, invalid or failed before run(): the ticket goes back here
        upload.release()


# openapi_extra= of an upload route: the body is read by Upload.read, not by a FastAPI parameter, so it is
# described by hand.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "A frontal chest X-ray: PNG, JPEG or DICOM"}},
        }}},
    }
}

# scope="function": the ticket is back before the response is sent, so a client that got its answer
# never sees its own request still counted.
AdmittedUpload = Annotated[Upload, Depends(admitted_upload, scope="function")]
PredictorDep = Annotated[Any, Depends(get_predictor)]
ServedDep = Annotated[Served, Depends(get_served)]
