"""A hostile HTTP server on 127.0.0.1: it passes every request on to a simulator, except the ones it targets.

A targeted request (method and path matching `target`, a regex on "METHOD /path") gets the current
`shape` instead of the simulator's answer: something a proxy, a captive portal, a broken or a
malicious server could send. Requests not targeted pass through, so a backend logs in, pairs and
downloads its data as usual and meets the bad answer exactly in the call under test.

Shapes (`SHAPES`): a proxy's HTML 400; JSON of wrong types, with an integer of 2**64, with a lone
surrogate escape, with duplicate keys (the deny first, the admit last); nesting 10,000 deep; a
5,000-digit integer; NaN; a body of 100 MB (sent only as far as the client reads); a gzip bomb;
a trickle of one byte every `drip` seconds; invalid UTF-8; an empty body; JSON null, an array and
a string at the top level. The typed shapes are per backend (`BODIES`), each aimed at a field that
backend reads, so a backend that skipped a check would meet it.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
import zlib
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_BIG = 2**64

# Per backend, per typed shape: a 200 answer whose shape is right but one value is not. Most are
# an admit in every other respect, so an unchecked field would let a visitor in.
BODIES: dict[str, dict[str, str]] = {
    "entry": {
        "wrong_types": '{"status": "Admit", "reasonCode": "OK", "reasonMessage": ["Good"], "eventId": {"id": 1}}',
        "int_2_64": f'{{"status": "Admit", "reasonCode": "OK", "reasonMessage": "Good", "eventId": {_BIG}}}',
        "surrogate": '{"status": "Stop", "reasonCode": "VOID", "reasonMessage": "void \\udcff ticket"}',
        "duplicate_keys": '{"status": "Stop", "reasonCode": "OK", "status": "Admit"}',
    },
    "pretix": {
        "wrong_types": '{"status": "ok", "position": "Ada", "list": {"event": ["democon"]}}',
        "int_2_64": f'{{"status": "ok", "list": {{"event": {_BIG}}}}}',
        "surrogate": '{"status": "error", "reason": "canceled", "reason_explanation": "\\udcff",'
                     ' "position": {"attendee_name": "Ada \\udcff"}}',
        "duplicate_keys": '{"status": "error", "reason": "canceled", "status": "ok"}',
    },
    "pretixdroid": {
        "wrong_types": '{"status": ["ok"]}',
        "int_2_64": f'{{"status": "error", "reason": {_BIG}}}',
        "surrogate": '{"status": "error", "reason": "unknown_ticket \\udcff"}',
        "duplicate_keys": '{"status": "error", "reason": "unpaid", "status": "ok"}',
    },
    "tibillet": {
        "wrong_types": '{"success": true, "ticket": {"uuid": 5}}',
        "int_2_64": f'{{"success": true, "ticket": {{"uuid": "5a3e", "event": {_BIG}}}}}',
        "surrogate": '{"success": false, "message": "already scanned \\udcff", "ticket": {"first_name": "\\udcff"}}',
        "duplicate_keys": '{"success": false, "message": "no", "success": true, "ticket": {"uuid": "5a3e"}}',
    },
    "cm": {
        "wrong_types": '{"barcodes": [{"barcode_id": "FAULT-0000", "scan_status_code": "100",'
                       ' "scan_status_message": ["ADMIT"]}]}',
        "int_2_64": f'{{"barcodes": [{{"barcode_id": "FAULT-0000", "scan_status_code": 100,'
                    f' "validation_max_checkins": {_BIG}}}]}}',
        "surrogate": '{"barcodes": [{"barcode_id": "FAULT-0000", "scan_status_code": 40,'
                     ' "scan_status_message": "DENY \\udcff"}], "info": {"message": "\\udcff"}}',
        "duplicate_keys": '{"barcodes": [{"barcode_id": "FAULT-0000", "scan_status_code": 40,'
                          ' "scan_status_code": 100}]}',
    },
}
TYPED = ("wrong_types", "int_2_64", "surrogate", "duplicate_keys")
GENERIC = ("html_400", "deep_nesting", "digits_5000", "nan", "huge_body", "gzip_bomb", "trickle",
           "invalid_utf8", "empty", "json_null", "json_array", "json_string")
SHAPES = TYPED + GENERIC

_HTML_400 = (b"<html><head><title>400 Bad Request</title></head><body><center><h1>400 Bad Request</h1>"
             b"</center><hr><center>nginx</center></body></html>\r\n")
HUGE = 100 * 1024 * 1024  # the "huge_body" answer's declared and (as far as read) sent size
BOMB_UNPACKED = 256 * 1024 * 1024  # the gzip bomb unpacks to this; ~250 kB on the wire


@cache
def gzip_bomb() -> bytes:
    """A gzip body of zeros that unpacks to BOMB_UNPACKED bytes (built once: ~0.7 s)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1024 * 1024)
    parts = [packer.compress(block) for _ in range(BOMB_UNPACKED // len(block))]
    return b"".join(parts) + packer.flush()


def body_for(backend: str, shape: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a shape that is sent whole."""
    if shape in TYPED:
        return 200, "application/json", BODIES[backend][shape].encode()
    fixed = {
        "html_400": (400, "text/html", _HTML_400),
        "deep_nesting": (200, "application/json", b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        "digits_5000": (200, "application/json", b'{"status": "ok", "success": true, "n": ' + b"9" * 5000 + b"}"),
        "nan": (200, "application/json", b'{"status": "Admit", "success": true, "scan_status_code": NaN}'),
        "invalid_utf8": (200, "application/json", b'{"status": "Admit", "reasonMessage": "\xff\xfe"}'),
        "empty": (200, "application/json", b""),
        "json_null": (200, "application/json", b"null"),
        "json_array": (200, "application/json", b'["Admit", "ok", true]'),
        "json_string": (200, "application/json", b'"Admit"'),
    }
    return fixed[shape]


class HostileServer:
    """`HostileServer(upstream_port, backend)`; `.url`; `.aim(target_regex, shape)`; `.hits`; `.close()`."""

    def __init__(self, upstream_port: int, backend: str, *, drip: float = 0.1):
        self.upstream_port = upstream_port
        self.backend = backend
        self.drip = drip
        self.target: re.Pattern[str] | None = None
        self.shape = ""
        self.hits = 0  # targeted requests answered with the shape
        self.closed = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                if server.target is not None and server.target.search(f"{self.command} {path}"):
                    server.hits += 1
                    server.answer(self)
                else:
                    server.forward(self, body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def aim(self, target: str | None, shape: str = "") -> None:
        """Answer requests matching `target` ("METHOD /path" regex) with `shape`; None: pass all."""
        self.target = re.compile(target) if target else None
        self.shape = shape

    def forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(handler.command, handler.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            handler.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    handler.send_header(k, v)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        finally:
            conn.close()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        shape = self.shape
        try:
            if shape == "huge_body":
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(HUGE))
                handler.end_headers()
                handler.wfile.write(b'{"status": "Admit", "pad": "')
                block = b"x" * 65536
                for _ in range(HUGE // len(block)):  # stops when the client hangs up
                    handler.wfile.write(block)
                handler.close_connection = True
                return
            if shape == "gzip_bomb":
                bomb = gzip_bomb()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Encoding", "gzip")
                handler.send_header("Content-Length", str(len(bomb)))
                handler.end_headers()
                handler.wfile.write(bomb)
                return
            if shape == "trickle":
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", "100000")
                handler.end_headers()
                handler.wfile.flush()
                while not self.closed.is_set():  # one byte per drip: no single read ever times out
                    handler.wfile.write(b" ")
                    handler.wfile.flush()
                    time.sleep(self.drip)
                handler.close_connection = True
                return
            status, kind, body = body_for(self.backend, shape)
            handler.send_response(status)
            handler.send_header("Content-Type", kind)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True  # the client gave up on it: what a bounded reader should do

    def close(self) -> None:
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()
