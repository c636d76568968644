"""A small HTTP-aware TCP proxy that puts one fault at a time between gated and a simulator (loopback only).

Toxiproxy is in neither Debian nor PyPI (shared/notes/test-rig.md §7), so this stands in for it. It
reads each HTTP/1.1 request off the client connection and then, by the current `mode`:

    pass          forward to the simulator and return its answer
    stall         read the request, never answer (the simulator never sees it)
    delay         forward, and return the answer `delay` s after the request came (a slow but working API)
    slow_body     forward; send the answer's headers at once, then its body one byte every `drip` s
    reset         read the request, then reset the connection (RST, SO_LINGER 0)
    status:<n>    answer <n> itself: 500 with a JSON error, 502/503 with a proxy's HTML page
    html          answer 200 with an HTML page (a captive portal or a misrouted URL)
    truncated     forward; return the first half of the answer's body (a valid HTTP message, broken JSON)
    invalid_json  answer 200, Content-Type application/json, with a body that is not JSON
    shape_object  answer 200 with a JSON object of another API version (none of the expected fields)
    shape_list    answer 200 with a JSON list where an object is expected
    tls_plain     (TLS proxies) speak plain HTTP to a TLS client, as a misconfigured port does
    tls_untrusted (TLS proxies) present a self-signed certificate gated has no reason to trust

Faults apply per request, so a kept-alive connection cannot slip past one: every mode change also
closes the connections open so far (and releases stalled ones). The proxy runs its own event loop
on a thread; the test drives it with `set(mode)` and reads `requests`/`faulted`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MODES = ("pass", "stall", "delay", "slow_body", "reset", "status:500", "status:502", "status:503", "html", "truncated",
         "invalid_json", "shape_object", "shape_list", "tls_plain", "tls_untrusted")

_HTML_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway"
             b"</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
_PORTAL = (b"<!DOCTYPE html><html><head><title>Welcome</title></head><body><h1>Welcome to Venue Wi-Fi</h1>"
           b"<p>Accept the terms to continue.</p><form method=post><button>OK</button></form></body></html>")
_CANNED = {
    "status:500": (500, "Internal Server Error", "application/json", b'{"detail": "Internal server error"}'),
    "status:502": (502, "Bad Gateway", "text/html", _HTML_502),
    "status:503": (503, "Service Unavailable", "text/html", _HTML_502.replace(b"502 Bad Gateway",
                                                                               b"503 Service Temporarily Unavailable")),
    "html": (200, "OK", "text/html; charset=utf-8", _PORTAL),
    # A Python dict's repr: words a parser might latch onto, in a body that is not JSON.
    "invalid_json": (200, "OK", "application/json",
                     b"{'status': 'ok', 'success': True, 'reasonCode': 'OK', 'status_code': 100}"),
    "shape_object": (200, "OK", "application/json", b'{"data": [], "meta": {"api_version": 3}}'),
    "shape_list": (200, "OK", "application/json", b'[{"status": "Admit"}]'),
}


@dataclass
class Exchange:
    """One request as the proxy saw it, and what the fault did with it."""

    method: str
    path: str
    mode: str


class FaultProxy:
    """`FaultProxy(upstream_port)`; `.url` for gated; `.set(mode)`; `.close()`. TLS when `tls` is given."""

    def __init__(self, upstream_port: int, *, tls: TlsMaterial | None = None, drip: float = 0.05,
                 delay: float = 0.5):
        self.upstream = ("127.0.0.1", upstream_port)
        self.tls = tls
        self.drip = drip
        self.delay = delay
        self.mode = "pass"
        self.requests: list[Exchange] = []
        self._lock = threading.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("fault proxy did not start")

    # --- control (from the test's thread) --------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        """Switch the fault; connections opened under the previous mode are closed first."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        if mode.startswith("tls_") and self.tls is None:
            raise ValueError(f"{mode} needs a TLS proxy")
        asyncio.run_coroutine_threadsafe(self._switch(mode), self.loop).result(5)

    def faulted(self) -> list[Exchange]:
        """Requests that met a fault (anything but pass)."""
        with self._lock:
            return [r for r in self.requests if r.mode != "pass"]

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self._switch("pass")  # closing the connections ends their tasks
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            _, late = await asyncio.wait(tasks, timeout=2) if tasks else (set(), set())
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the proxy's own loop ------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._changed = asyncio.Event()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _switch(self, mode: str) -> None:
        self.mode = mode
        self._changed.set()  # wakes stalled and dripping answers, which then close
        self._changed = asyncio.Event()
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.tls is not None:
                if self.mode.startswith("tls_"):  # no request gets through: count the connection
                    with self._lock:
                        self.requests.append(Exchange("TLS", "handshake", self.mode))
                if self.mode == "tls_plain":
                    await reader.read(4096)  # the ClientHello, which a plain HTTP server cannot parse
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    return
                context = self.tls.untrusted_context if self.mode == "tls_untrusted" else self.tls.server_context
                await writer.start_tls(context)
            while await self._exchange(reader, writer):
                pass
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away or refused our certificate: that is the point of some modes
        except asyncio.CancelledError:
            pass  # close(): asyncio's stream callback would log a cancelled handler as an error
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        body = await reader.readexactly(_content_length(head))
        mode, changed = self.mode, self._changed
        method, path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        with self._lock:
            self.requests.append(Exchange(method, path, mode))
        if mode == "stall":
            await changed.wait()
            return False
        if mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if mode in _CANNED:
            status, phrase, kind, text = _CANNED[mode]
            writer.write(_response(status, phrase, [("Content-Type", kind)], text))
            await writer.drain()
            return True
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        status_line, headers, answer = await self._forward(head + body)
        if mode == "delay":
            try:
                await asyncio.wait_for(changed.wait(), max(0.0, arrived + self.delay - loop.time()))
                return False  # the fault ended: drop the answer, as a stall does
            except TimeoutError:
                pass
        if mode == "truncated":
            answer = answer[: len(answer) // 2]
        if mode == "slow_body":
            writer.write(_response_head(status_line, headers, len(answer)) + answer[:1])
            await writer.drain()
            for i in range(1, len(answer)):
                try:
                    await asyncio.wait_for(changed.wait(), self.drip)
                    return False  # the fault ended: drop the half-sent answer
                except TimeoutError:
                    writer.write(answer[i:i + 1])
                    await writer.drain()
            return True
        writer.write(_response_head(status_line, headers, len(answer)) + answer)
        await writer.drain()
        return not any(k.lower() == "connection" and v.lower() == "close" for k, v in headers)

    async def _forward(self, request: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(request)
            await up_writer.drain()
            head = await up_reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
            length = _content_length(head, None)
            body = await up_reader.readexactly(length) if length is not None else await up_reader.read()
            return lines[0], headers, body
        finally:
            up_writer.close()


def _content_length(head: bytes, default: int | None = 0) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return default


def _response_head(status_line: str, headers: list[tuple[str, str]], length: int) -> bytes:
    kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
    lines = [status_line, *(f"{k}: {v}" for k, v in kept), f"Content-Length: {length}", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _response(status: int, phrase: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    return _response_head(f"HTTP/1.1 {status} {phrase}", headers, len(body)) + body


# --- TLS material: a test CA, a server certificate it signed, and a stranger's self-signed one -----


@dataclass
class TlsMaterial:
    ca_file: Path  # the CA gated is told to trust ([backend] ca_file)
    server_context: ssl.SSLContext  # a certificate for 127.0.0.1 signed by that CA
    untrusted_context: ssl.SSLContext  # a self-signed certificate for 127.0.0.1
    other_ca_file: Path  # a CA that signed nothing this proxy presents


def make_tls_material(folder: Path) -> TlsMaterial:
    """Write a CA, a server certificate and key, and an unrelated self-signed certificate into `folder`."""
    ca_key, ca_cert = _self_signed("gated test CA", ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate(server_key.public_key(), "127.0.0.1", ca_cert.subject, ca_key, ca=False)
    stranger_key, stranger_cert = _self_signed("127.0.0.1", ca=False)
    other_key, other_ca = _self_signed("another CA", ca=True)

    ca_file = folder / "test-ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    other_ca_file = folder / "other-ca.pem"
    other_ca_file.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    return TlsMaterial(ca_file, _server_context(folder, "server", server_key, [server_cert, ca_cert]),
                       _server_context(folder, "stranger", stranger_key, [stranger_cert]), other_ca_file)


def _self_signed(name: str, *, ca: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return key, _certificate(key.public_key(), name, subject, key, ca=ca)


def _certificate(public_key, common_name: str, issuer: x509.Name, signer, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


def _server_context(folder: Path, name: str, key, chain: list[x509.Certificate]) -> ssl.SSLContext:
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context
