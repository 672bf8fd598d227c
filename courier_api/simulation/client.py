"""The simulation's way to the API: in this process (WSGI) or over HTTP to a server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from flask import Flask


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # the decoded JSON, or None
    retry_after: int | None = None  # seconds, from a 429's or 503's Retry-After

    def ok(self, *expected: int) -> Any:
        """The body, when the status is one of ``expected`` (default 200 and 201)."""
        if self.status not in (expected or (200, 201)):
            raise SimulationError(f"the API answered {self.status}: {self.body}")
        return self.body


class SimulationError(RuntimeError):
    """The API did not answer as a PDA, a manager or a channel would expect."""


class Transport(Protocol):
    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        content_type: str | None = None,
        token: str | None = None,
    ) -> Answer: ...


class InProcess:
    """Through the app's whole WSGI stack (routing, auth, validation, errors), no socket.

    Requests run on a thread of their own: each then gets its own app context and
    database session, also when the caller runs inside one (a CLI command).
    """

    def __init__(self, app: Flask) -> None:
        self.client = app.test_client()
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulation")

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        content_type: str | None = None,
        token: str | None = None,
    ) -> Answer:
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        def call() -> Answer:
            response = self.client.open(
                path,
                method=method,
                json=json_body,
                data=content,
                content_type=content_type,
                headers=headers,
            )
            return Answer(
                response.status_code,
                response.get_json(silent=True),
                _seconds(response.headers.get("Retry-After")),
            )

        return self.thread.submit(call).result()

    def close(self) -> None:
        self.thread.shutdown()


class OverHttp:
    """To a running server (``courier-api simulate --url``)."""

    def __init__(self, base_url: str, timeout: float = 60) -> None:
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        content_type: str | None = None,
        token: str | None = None,
    ) -> Answer:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if content_type:
            headers["Content-Type"] = content_type
        response = self.client.request(
            method,
            path,
            content=json.dumps(json_body).encode() if json_body is not None else content,
            headers={"Content-Type": "application/json", **headers}
            if json_body is not None
            else headers,
        )
        try:
            body = response.json()
        except ValueError:
            body = None
        return Answer(response.status_code, body, _seconds(response.headers.get("Retry-After")))

    def close(self) -> None:
        self.client.close()


def _seconds(header: str | None) -> int | None:
    return int(header) if header and header.isdigit() else None
