"""Uploads: the multipart field `file` read from the request stream into memory, bounded while it streams.

Our own reader, not python-multipart's form parser through Starlette: that spools files over 1 MB to a
temporary file, and an upload (a patient's film) must never touch the disk. Nothing here logs a body.
"""

from __future__ import annotations

import logging

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from cxr.web.errors import ApiError

MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries allowed on top of the file itself

# python-multipart logs the offending bytes of a malformed body as warnings; it raises as well, and the
# client gets the error, so its parser gets a logger that drops everything: bodies never reach a log.
_PARSER_LOG = logging.getLogger("cxr.web.uploads.multipart")
_PARSER_LOG.propagate = False
_PARSER_LOG.addHandler(logging.NullHandler())
_PARSER_LOG.setLevel(logging.CRITICAL + 1)


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
                raise too_big(self.limit)
            self.data += data[start:end]

    def _part_end(self) -> None:
        self._in_file = False

    def _end(self) -> None:
        self.ended = True


def too_big(limit: int) -> ApiError:
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
        raise too_big(limit)  # refused before a single byte of the body is read
    part = _FilePart(limit)
    try:
        parser = MultipartParser(boundary, part.callbacks())
        parser.logger = _PARSER_LOG
        received = 0
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_limit:  # Content-Length absent (chunked) or a lie
                    raise too_big(limit)
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
