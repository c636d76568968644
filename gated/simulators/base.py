"""A small threaded HTTP server for the simulators: routing, JSON and gzip bodies, request log.

Loopback only. Each simulator subclasses `Simulator`, registers routes with `@route`, and keeps
its state in plain attributes guarded by `self.lock`; tests read `requests` to see what gated sent.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    raw: bytes  # body as received (possibly gzip)
    body: bytes  # body after Content-Encoding was undone
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode("utf-8"))


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes/str sent as is
    headers: dict[str, str] = field(default_factory=dict)


def route(method: str, pattern: str) -> Callable:
    """Register a handler for METHOD and a path regex with named groups, e.g. r"/scan/(?P<code>[^/]+)"."""

    def mark(fn: Callable) -> Callable:
        fn._route = (method, re.compile(pattern + r"$"))
        return fn

    return mark


class Simulator:
    """Start with `with Sim() as sim:` (or `start()`/`stop()`); `sim.url` is the base URL."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.lock = threading.RLock()
        self.requests: list[Request] = []
        self.stall = threading.Event()  # set: accept requests but never answer (fault tests)
        self.lose_answers = threading.Event()  # set: act on each request, then never answer it
        self.fail_status: int | None = None  # set: answer every request with this status
        self._routes = [getattr(self, n)._route + (getattr(self, n),) for n in dir(type(self))
                        if hasattr(getattr(type(self), n), "_route")]
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet: tests read sim.requests
                pass

            def _serve(self) -> None:
                sim._dispatch(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        # Headers and body leave in two writes: without TCP_NODELAY, Nagle holds the body until the
        # client's delayed ACK (~40 ms on Linux), a latency a real API behind its gateway does not add.
        Handler.disable_nagle_algorithm = True
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        accept = self.server.get_request

        def get_request() -> Any:
            conn, addr = accept()
            with self.lock:
                self._connections.add(conn)
            return conn, addr

        self.server.get_request = get_request

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Simulator:
        # A short poll interval: shutdown() waits for the next poll, and tests stop servers often.
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), name=type(self).__name__,
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop like a dead server: no new connections, and the kept-alive ones are cut as well."""
        self.stall.clear()
        self.lose_answers.clear()
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            conns, self._connections = list(self._connections), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its client

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def replace_route(self, original: Callable, handler: Callable) -> None:
        """Answer with `handler` where the route `original` (a bound method) answered: a test's odd answer."""
        if not any(fn == original for _, _, fn in self._routes):
            raise ValueError(f"{original!r} is not a route of this simulator")
        self._routes = [(m, p, handler if fn == original else fn) for m, p, fn in self._routes]

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = raw
        if h.headers.get("Content-Encoding", "").lower() == "gzip":
            try:
                body = gzip.decompress(raw)
            except (OSError, EOFError):
                return self._send(h, Response(400, {"message": "body is not valid gzip"}))
        split = urlsplit(h.path)
        req = Request(h.command, split.path, parse_qs(split.query),
                      {k.lower(): v for k, v in h.headers.items()}, raw, body)
        with self.lock:
            self.requests.append(req)
        if self.stall.is_set():
            _wait_until_cleared(self.stall)
            return
        if self.fail_status is not None:
            return self._send(h, Response(self.fail_status, {"message": "simulated failure"}))
        for method, pattern, fn in self._routes:
            m = pattern.match(req.path)
            if m and method == req.method:
                req.params = m.groupdict()
                try:
                    resp = fn(req)
                except Exception as e:  # noqa: BLE001 - a simulator bug must show as a 500, not hang
                    resp = Response(500, {"message": f"simulator error: {e}"})
                if self.lose_answers.is_set():  # done on the server; the client never hears of it
                    _wait_until_cleared(self.lose_answers)
                    return None
                return self._send(h, resp)
        self._send(h, Response(404, {"message": f"no route for {req.method} {req.path}"}))

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, resp: Response) -> None:
        body = resp.body
        headers = dict(resp.headers)
        if isinstance(body, (dict, list)) or body is None and resp.status != 204:
            body = json.dumps(body if body is not None else {}).encode()
            headers.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
        body = body or b""
        try:
            h.send_response(resp.status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _wait_until_cleared(event: threading.Event) -> None:
    """Hold a stalled request open until the test clears the stall (or the server stops)."""
    while event.is_set():
        threading.Event().wait(0.05)
