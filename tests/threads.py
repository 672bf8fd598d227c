"""Requests released together from several threads, for tests of concurrent writers."""

from __future__ import annotations

import threading
import time
from typing import Any

from flask import Flask


def race(app: Flask, url: str, bodies: list[Any], headers: dict[str, str]) -> list[Any]:
    """POST each body to ``url`` from a thread of its own, all released at once."""
    return race_requests(app, [("POST", url, body, headers) for body in bodies])


def race_requests(
    app: Flask,
    requests: list[tuple[str, str, Any, dict[str, str]]],
    delays: list[float] | None = None,
) -> list[Any]:
    """Send each ``(method, url, json body, headers)`` from a thread of its own, all
    released at once (each after its ``delays`` seconds); the responses in order."""
    barrier = threading.Barrier(len(requests))
    responses: list[Any] = [None] * len(requests)

    def send(index: int) -> None:
        method, url, body, headers = requests[index]
        client = app.test_client()
        barrier.wait()
        if delays:
            time.sleep(delays[index])
        responses[index] = client.open(url, method=method, json=body, headers=headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return responses
