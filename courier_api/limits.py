"""What one request may carry: the limits the server answers 413 over, read in one place.

The push's event count (``MAX_EVENTS_PER_PUSH``), a request body's bytes
(``MAX_REQUEST_BYTES``, Flask's ``MAX_CONTENT_LENGTH``) and a proof image's bytes
(``MAX_BLOB_BYTES``) are enforced from these values, and the sign-in announces them
(``courier_api.api.auth``), so a PDA sizes its batches and photos before it sends them
rather than learning the limits from a 413.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app


@dataclass(frozen=True)
class RequestLimits:
    max_events_per_push: int
    max_request_bytes: int
    max_blob_bytes: int

    @property
    def max_image_bytes(self) -> int:
        """The largest image an upload stores: its body is a request body too."""
        return min(self.max_blob_bytes, self.max_request_bytes)

    def announced(self) -> dict[str, Any]:
        """The limits as the sign-in states them to a client."""
        return {
            "max_events_per_push": self.max_events_per_push,
            "max_request_bytes": self.max_request_bytes,
            "max_image_bytes": self.max_image_bytes,
        }


def request_limits(app: Flask | None = None) -> RequestLimits:
    """The limits in force in this app (its configuration, read at start-up); a caller
    that holds the app already passes it (a lookup through ``current_app`` costs a push
    some 9,000 instructions: ``courier_api.logs._start_request``)."""
    config = (app if app is not None else current_app).config
    return RequestLimits(
        max_events_per_push=int(config["MAX_EVENTS_PER_PUSH"]),
        max_request_bytes=int(config["MAX_CONTENT_LENGTH"]),
        max_blob_bytes=int(config["MAX_BLOB_BYTES"]),
    )
