"""The shared HTTP layer against a real server on 127.0.0.1: answers bounded in size and time, JSON read strictly."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from gated.errors import Unreachable
from gated.policy.answer import INT64_MAX, ident, integer, jwt_claims, text
from gated.policy.http import LIST_PAGE_LIMIT, SCAN_ANSWER_LIMIT, parse_json, request
from gated.timeparse import parse_time


class _Server:
    """Answers every GET with `reply(handler)`; `stop` ends a trickle."""

    def __init__(self, reply):
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    reply(self, outer)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    made = []

    def make(reply):
        made.append(_Server(reply))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _send(handler, body: bytes, **headers: str) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for k, v in headers.items():
        handler.send_header(k.replace("_", "-"), v)
    handler.end_headers()
    handler.wfile.write(body)


def _get(url: str, timeout: float = 0.5, **kw):
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            return await request(client, "GET", "/", **kw)

    return asyncio.run(go())


# --- size ----------------------------------------------------------------------------------------

_BOMB_UNPACKED = 256 * 1024 * 1024


def _bomb() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1024 * 1024)
    return b"".join(packer.compress(block) for _ in range(_BOMB_UNPACKED // len(block))) + packer.flush()


def test_a_gzip_bomb_is_refused_while_it_unpacks_not_after(serve):
    bomb = _bomb()  # ~250 kB that unpack to 256 MB
    server = serve(lambda h, _: _send(h, bomb, Content_Encoding="gzip"))
    tracemalloc.start()
    try:
        with pytest.raises(Unreachable, match="over 4096 kB"):
            _get(server.url, timeout=10, limit=LIST_PAGE_LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Read whole, it would take 256 MB (a 2 GB bomb: MemoryError); bounded, a few MB.
    assert peak < 3 * LIST_PAGE_LIMIT, f"peak {peak / 1e6:.0f} MB"


def test_a_scan_answer_larger_than_64_kB_is_a_failed_call_and_is_not_read(serve):
    sent = []

    def huge(handler, server):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")  # no Content-Length to refuse it by
        handler.end_headers()
        block = b"x" * 65536
        for _ in range(1600):  # 100 MB, as far as the client reads
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            sent.append(len(block))

    server = serve(huge)
    with pytest.raises(Unreachable, match="over 64 kB"):
        _get(server.url, timeout=5)
    assert sum(sent) < 100 * 1024 * 1024  # the client hung up long before the end


def test_a_declared_huge_answer_is_refused_before_reading_it(serve):
    def declared(handler, server):
        handler.send_response(200)
        handler.send_header("Content-Length", str(100 * 1024 * 1024))
        handler.end_headers()
        handler.wfile.write(b"{")
        server.stop.wait(5)

    server = serve(declared)
    started = time.monotonic()
    with pytest.raises(Unreachable, match="over 64 kB"):
        _get(server.url, timeout=5)
    assert time.monotonic() - started < 2


def test_an_answer_within_its_limit_is_returned_decoded(serve):
    body = b'{"status": "Admit"}' + b" " * (SCAN_ANSWER_LIMIT - 100)
    server = serve(lambda h, _: _send(h, gzip.compress(body), Content_Encoding="gzip"))
    response = _get(server.url)
    assert response.content == body and response.json() == {"status": "Admit"}


# --- time ----------------------------------------------------------------------------------------

def test_a_server_that_trickles_a_byte_at_a_time_cannot_hold_a_call_past_its_deadline(serve):
    def trickle(handler, server):
        handler.send_response(200)
        handler.send_header("Content-Length", "10000")
        handler.end_headers()
        while not server.stop.is_set():  # every byte well inside the per-read timeout
            handler.wfile.write(b" ")
            handler.wfile.flush()
            server.stop.wait(0.05)

    server = serve(trickle)
    started = time.monotonic()
    with pytest.raises(Unreachable, match="no complete answer within 1s"):
        _get(server.url, timeout=0.5)  # connect 0.5 s + one read timeout for the whole answer
    assert time.monotonic() - started < 3


# --- JSON ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b'{"status": "Stop", "status": "Admit"}',
    b'{"a": ' * 10_000 + b"1" + b"}" * 10_000,
    b'{"n": ' + b"9" * 5000 + b"}",
    b'{"status": "Admit", "n": NaN}',
    b'{"n": 1e999}',
    b'{"message": "\xff\xfe"}',
    b"",
    b"<html>400 Bad Request</html>",
], ids=["duplicate_keys", "deep_nesting", "digits_5000", "nan", "infinite", "invalid_utf8", "empty", "html"])
def test_json_outside_the_standard_is_a_failed_call(body):
    with pytest.raises(Unreachable):
        parse_json(body)


def test_a_lone_surrogate_escape_becomes_a_replacement_character_everywhere():
    value = parse_json(b'{"m": "a\\udcffb", "\\ud800k": ["\\udfff", {"n": "\\ud83d\\ude00"}]}')
    assert value == {"m": "a\ufffdb", "\ufffdk": ["\ufffd", {"n": "\U0001f600"}]}
    str(value).encode("utf-8")  # storable and printable: no UnicodeEncodeError


def test_fields_are_checked_for_type_and_range_and_cut():
    assert ident(2**63 - 1, "id") == str(INT64_MAX)
    with pytest.raises(Unreachable):
        ident(2**64, "eventId")
    with pytest.raises(Unreachable):
        integer(True, "count")
    with pytest.raises(Unreachable):
        text(5, "uuid")
    assert len(text("x" * 10_000, "message")) == 300


@pytest.mark.parametrize("value", [10**400, float("nan"), "nan", "inf", "1e999", float("inf"), {"t": 1}, [1],
                                   "9999-12-31T23:59:59-12:00", "x" * 1000, True])
def test_time_parsing_is_total_any_bad_value_is_a_value_error(value):
    with pytest.raises(ValueError):
        parse_time(value)


def _jwt(payload: bytes) -> str:
    import base64
    return "h." + base64.urlsafe_b64encode(payload).decode().rstrip("=") + ".s"


@pytest.mark.parametrize("exp", [b"1" + b"0" * 400, b"1e300", b"NaN", b"Infinity", b"-1e300", b"true", b'"soon"'])
def test_a_jwt_time_claim_that_is_no_time_is_dropped_so_no_backend_computes_with_it(exp):
    # CM.com's login did `now + (exp - iat)`: OverflowError for 10**400; Entry's pair printed exp: 1e300 crashed.
    claims = jwt_claims(_jwt(b'{"sub": "u", "iat": 1700000000, "exp": ' + exp + b"}"))
    assert claims == {"sub": "u", "iat": 1700000000}


def test_a_jwt_with_real_times_keeps_them():
    assert jwt_claims(_jwt(b'{"iat": 1700000000, "exp": 1700003600.5}')) == {"iat": 1700000000, "exp": 1700003600.5}
