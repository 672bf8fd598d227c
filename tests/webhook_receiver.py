"""A real HTTP receiver of webhooks on loopback, answering as each test programs it."""

from __future__ import annotations

import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    """What the receiver answers to one request."""

    status: int = 200
    body: bytes = b"ok"
    delay: float = 0.0  # seconds before answering (ended early when the receiver closes)
    headers: dict[str, str] = field(default_factory=dict)
    echo_header: str | None = None  # answer with this request header's value as the body


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int  # what it was answered

    @property
    def delivery_id(self) -> str:
        return self.headers.get("x-courier-delivery", "")


class Receiver:
    """``ThreadingHTTPServer`` on 127.0.0.1, port 0, in a thread.

    Answers are taken in order from ``answer(...)``, then ``default`` (200). It records
    every request, and its de-duplicated view (``messages``) holds each delivery it
    acknowledged once, keyed by ``X-Courier-Delivery``, as a careful receiver would.
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.messages: dict[str, bytes] = {}
        self.default = Answer()
        self._answers: deque[Answer] = deque()
        self._lock = threading.Lock()
        self.closing = threading.Event()
        self.arrived = threading.Event()  # set when a request comes in
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._lock:
                    answer = receiver._answers.popleft() if receiver._answers else receiver.default
                    received = Received(self.path, headers, body, answer.status)
                    receiver.requests.append(received)
                    if 200 <= answer.status < 300 and received.delivery_id:
                        receiver.messages.setdefault(received.delivery_id, body)
                receiver.arrived.set()
                if answer.delay:
                    receiver.closing.wait(answer.delay)
                payload = answer.body
                if answer.echo_header is not None:
                    payload = headers.get(answer.echo_header.lower(), "").encode()
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    for start in range(0, len(payload), 65536):
                        self.wfile.write(payload[start : start + 65536])
                except OSError:  # the client gave up (timeout, limit reached): fine
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hung up mid-answer

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def answer(self, *answers: Answer) -> None:
        """Answer the next requests so, in order (then ``default``)."""
        with self._lock:
            self._answers.extend(answers)

    def delivery_ids(self) -> list[str]:
        return [request.delivery_id for request in self.requests]

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def closed_port_url() -> str:
    """The URL of a loopback port nobody listens on: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
