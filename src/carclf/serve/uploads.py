"""The request body, read as it streams in: multipart/form-data parsed into memory (never spooled to disk), each
file refused as soon as it passes ``max_file_bytes``, the bytes of all uploads in flight capped by an
:class:`UploadBudget`, the whole body due within ``body_timeout_s``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from carclf.serve.settings import ApiError, ClientGone, ServeSettings


class Photo(NamedTuple):
    """One uploaded file: its name (the multipart filename, else the field's name) and its bytes."""

    name: str
    data: bytes


class UploadBudget:
    """The request-body bytes held by all uploads in flight, capped at ``limit``: a request takes its bytes as they
    arrive and gives them back when it is answered; one that would pass the cap is refused with 503. All calls
    come from the event loop's thread, so no lock is needed."""

    def __init__(self, limit: int, gauge) -> None:
        self.limit, self.gauge, self.held = limit, gauge, 0

    def check(self, n: int) -> None:
        """503 if ``n`` more bytes would not fit now (a request's declared length, refused before reading it)."""
        if self.held + n > self.limit:
            raise ApiError(503, "busy", f"uploads in progress hold {self.held:,} of {self.limit:,} bytes "
                           "(--max-upload-mb); retry shortly", retry_after_s=1)

    def take(self, n: int) -> None:
        self.check(n)
        self.held += n
        self.gauge.set(self.held)

    def give(self, n: int) -> None:
        self.held -= n
        self.gauge.set(self.held)

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        """One request's share of the budget: all it took is given back when the block ends, answered or not."""
        lease = Lease(self)
        try:
            yield lease
        finally:
            self.give(lease.held)


class Lease:
    """The bytes one request holds of an :class:`UploadBudget`."""

    def __init__(self, budget: UploadBudget) -> None:
        self.budget, self.held = budget, 0

    def check(self, n: int) -> None:
        self.budget.check(n)

    def take(self, n: int) -> None:
        self.budget.take(n)
        self.held += n


class MultipartUploads:
    """A multipart/form-data body parsed while it streams in, into memory (python-multipart's streaming parser,
    as Starlette's ``request.form()`` uses it, but without spooling files to disk): the files' bytes, refused as
    soon as one passes ``max_file_bytes`` or there are more than ``max_files``. Fields without a filename are
    ignored (at most 64 KiB each, ``max_files + 8`` of them)."""

    MAX_FIELD = 64 * 1024

    def __init__(self, content_type: str, settings: ServeSettings) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        self._options = parse_options_header
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiError(400, "bad_multipart", "the multipart Content-Type has no boundary")
        self.settings = settings
        self.files: list[Photo] = []
        self._fields = 0
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._name, self._data, self._is_file = "", bytearray(), False
        callbacks = {"on_part_begin": self._part_begin, "on_part_data": self._part_data,
                     "on_part_end": self._part_end, "on_header_field": self._header_field,
                     "on_header_value": self._header_val, "on_header_end": self._header_end,
                     "on_headers_finished": self._headers_finished}
        try:
            self.parser = MultipartParser(boundary, callbacks)
        except Exception as exc:  # noqa: BLE001 - a bad boundary is the client's
            raise ApiError(400, "bad_multipart", f"bad multipart boundary: {exc}") from None

    def write(self, chunk: bytes) -> None:
        from python_multipart.exceptions import FormParserError

        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise ApiError(400, "bad_multipart", f"invalid multipart data: {exc}") from None

    def finish(self) -> list[Photo]:
        from python_multipart.multipart import MultipartState

        if self.parser.state != MultipartState.END:
            raise ApiError(400, "bad_multipart", "the multipart body ends before its closing boundary")
        return self.files

    def _part_begin(self) -> None:
        self._disposition, self._data = b"", bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = self._options(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "bad_multipart", 'a multipart part has no Content-Disposition "name"')
        self._is_file = b"filename" in options
        key = _decode_name(options[b"name"])
        if self._is_file:
            if len(self.files) >= self.settings.max_files:
                raise ApiError(413, "too_many_files", f"more than {self.settings.max_files} files in one request; "
                               "send fewer per request")
            self._name = _decode_name(options[b"filename"]) or key
        else:
            self._fields += 1
            if self._fields > self.settings.max_files + 8:
                raise ApiError(400, "bad_multipart", f"more than {self.settings.max_files + 8} form fields")
            self._name = key

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.settings.max_file_bytes if self._is_file else self.MAX_FIELD
        if len(self._data) + end - start > limit:
            if self._is_file:
                raise ApiError(413, "file_too_large", f"'{self._name}' is over {limit:,} bytes, the limit per photo "
                               "(--max-file-mb); refused without reading the rest", filename=self._name)
            raise ApiError(400, "bad_multipart", f"form field '{self._name}' is over {limit:,} bytes")
        self._data += data[start:end]

    def _part_end(self) -> None:
        if self._is_file:
            self.files.append(Photo(self._name, bytes(self._data)))
        self._data = bytearray()


def _decode_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


BODY_DONE = "carclf.body_done"  # scope key: the request's body has been read to its end


async def read_uploads(request, settings: ServeSettings, lease: Lease) -> list[Photo]:
    """The files of a multipart ``request`` (a Starlette Request, or anything with its ``headers``, ``receive``
    and ``scope``), read within ``settings.body_timeout_s`` (408 beyond), each body chunk taken from ``lease``;
    :class:`ClientGone` when the client disconnects first. Marks the scope :data:`BODY_DONE` once all is read."""
    uploads = MultipartUploads(request.headers.get("content-type", ""), settings)
    length = request.headers.get("content-length", "")
    if length.isdigit():
        lease.check(int(length))
    receive = request.receive
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    lease.take(len(chunk))
                    uploads.write(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {settings.body_timeout_s:g} s "
                       "(--body-timeout)") from None
    request.scope[BODY_DONE] = True
    return uploads.finish()
