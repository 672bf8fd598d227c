"""Request bodies of unknown length (chunked) held to ``MAX_REQUEST_BYTES`` too.

A body with a ``Content-Length`` over the limit is refused (413) before it is read.
A chunked one has no length: werkzeug reads it through a stream limited to
``max_content_length`` that stops *quietly* at the limit, so a larger body would be
read cut short, and answered as broken JSON (400) or a wrong digest (422) instead
of 413. Here, reading a byte beyond the limit is the 413.
"""

from __future__ import annotations

from typing import IO, Any

from flask import Request, current_app
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream


class BodyLimit(LimitedStream):
    """At most ``limit`` bytes; the one after them raises ``RequestEntityTooLarge``."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__(stream, limit + 1, is_max=True)
        self.max_bytes = limit

    def readinto(self, b: Any) -> int | None:  # type: ignore[override]
        size = super().readinto(b)
        if self.tell() > self.max_bytes:
            raise RequestEntityTooLarge()
        return size


class CourierRequest(Request):
    @property
    def max_content_length(self) -> int | None:
        """Flask's, its app taken out of ``current_app`` once: read twice when a body
        is (``stream``, then werkzeug's), each look-up through the proxy costing a push
        about 9,000 instructions (``courier_api.logs._start_request``)."""
        if self._max_content_length is not None:
            return self._max_content_length
        if not current_app:
            return super().max_content_length
        return current_app._get_current_object().config["MAX_CONTENT_LENGTH"]  # type: ignore[attr-defined,no-any-return]

    @max_content_length.setter
    def max_content_length(self, value: int | None) -> None:
        self._max_content_length = value

    @cached_property
    def stream(self) -> IO[bytes]:
        limit = self.max_content_length
        if (
            self.content_length is None
            and limit is not None
            and "wsgi.input_terminated" in self.environ  # a server that ends the stream
        ):
            return BodyLimit(self.environ["wsgi.input"], limit)  # type: ignore[return-value]
        stream: IO[bytes] = super().stream
        return stream
