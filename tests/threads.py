"""Requests released together from several threads, for tests of concurrent writers."""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask


def race(app: Flask, url: str, bodies: list[Any], headers: dict[str, str]) -> list[Any]:
    """POST each body to ``url`` from a thread of its own, all released at once."""
    barrier = threading.Barrier(len(bodies))
    responses: list[Any] = [None] * len(bodies)

    def send(index: int) -> None:
        client = app.test_client()
        barrier.wait()
        responses[index] = client.post(url, json=bodies[index], headers=headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return responses
