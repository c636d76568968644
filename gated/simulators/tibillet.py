"""A TiBillet scan API on 127.0.0.1 for tests and benches: pairing, test_api, check_ticket, ticket.

Shapes follow specs/tibillet-scan-api.*.md and TiBillet's views_scan.py: `Api-Key` auth (403 when
missing or wrong), JSON bodies only, `{"error": ...}` with 400/404/406 for bad codes, HTTP 200 with
`success: false` for a ticket already scanned. The path prefix is configurable ("/api/scan/" in
the French spec and current servers, "/scan/" in the English one). Codes are made here the way
TiBillet makes them: URL-safe base64 of `{"uuid": ...}`, RSA-PSS-SHA256 (max salt) over that text.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gated.policy.signatures import TIBILLET_PSS
from gated.simulators.base import Request, Response, Simulator, route


def make_code(private_key: rsa.RSAPrivateKey, ticket_uuid: str, *, padding: bool = True) -> str:
    """The QR text TiBillet prints: `DATA:SIGNATURE`, both URL-safe base64."""
    data = base64.urlsafe_b64encode(json.dumps({"uuid": ticket_uuid}).encode()).decode()
    if not padding:
        data = data.rstrip("=")
    signature = private_key.sign(data.encode("utf-8"), TIBILLET_PSS, hashes.SHA256())
    sig = base64.urlsafe_b64encode(signature).decode()
    return f"{data}:{sig.rstrip('=') if not padding else sig}"


def public_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Ticket:
    uuid: str
    event: str  # event uuid
    first_name: str = ""
    last_name: str = ""
    scanned_by: str | None = None  # device uuid
    product: str = "Concert Ticket"
    price: str = "General Admission"
    reservation: str = field(default_factory=lambda: str(uuid.uuid4()))


class TibilletSim(Simulator):
    def __init__(self, prefix: str = "/api/scan/", *, require_event_uuid: bool = False, **kw):
        super().__init__(**kw)
        self.prefix = prefix
        self.require_event_uuid = require_event_uuid  # current servers want it with each `ticket`
        self.events: dict[str, tuple[str, rsa.RSAPrivateKey]] = {}  # uuid -> (name, key)
        self.tickets: dict[str, Ticket] = {}
        self.pairing: dict[str, dict] = {}  # pairing code -> device
        self.keys: dict[str, str] = {}  # api key -> device uuid
        self.scans: list[tuple[str, str]] = []  # (device uuid, ticket uuid) of every check-in made
        self.hold_answer = threading.Event()  # set: do the work, then hold the answer (a lost response)

    def start(self) -> TibilletSim:
        # Poll for shutdown every 20 ms rather than the default 0.5 s: tests stop many servers.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    # --- test helpers ---------------------------------------------------------------------

    def add_event(self, name: str, key: rsa.RSAPrivateKey) -> str:
        event_uuid = str(uuid.uuid4())
        self.events[event_uuid] = (name, key)
        return event_uuid

    def issue(self, event_uuid: str, first_name: str = "Ada", last_name: str = "Lovelace") -> tuple[str, str]:
        """A new ticket: (uuid, QR text)."""
        t = Ticket(str(uuid.uuid4()), event_uuid, first_name, last_name)
        with self.lock:
            self.tickets[t.uuid] = t
        return t.uuid, make_code(self.events[event_uuid][1], t.uuid)

    def new_device(self, name: str = "Entrance Scanner") -> str:
        """A device created in the admin; returns its single-use pairing code."""
        device_uuid = str(uuid.uuid4())
        # Like TiBillet's: URL-safe base64 of a signed text (so it never starts with "-").
        code = base64.urlsafe_b64encode(f"{device_uuid}:{secrets.token_urlsafe(12)}".encode()).decode()
        with self.lock:
            self.pairing[code] = {"uuid": device_uuid, "name": name, "claimed": False}
        return code

    # --- the API --------------------------------------------------------------------------

    def _prefix_ok(self, req: Request) -> bool:
        return req.params.get("prefix") == self.prefix

    def _device(self, req: Request) -> str | None:
        scheme, _, key = req.headers.get("authorization", "").partition(" ")
        return self.keys.get(key) if scheme == "Api-Key" else None

    def _guard(self, req: Request, json_body: bool) -> Response | str:
        if not self._prefix_ok(req):
            return Response(404, "<h1>Not Found</h1>", {"Content-Type": "text/html"})
        device = self._device(req)
        if device is None:
            return Response(403, {"detail": "You do not have permission to perform this action."})
        if json_body and not req.headers.get("content-type", "").startswith("application/json"):
            return Response(415, {"detail": f'Unsupported media type "{req.headers.get("content-type")}" in request.'})
        return device

    @route("GET", r"(?P<prefix>/.*/)(?P<code>[^/]+)/pair")
    def pair(self, req: Request) -> Response:
        if not self._prefix_ok(req):
            return Response(404, "<h1>Not Found</h1>", {"Content-Type": "text/html"})
        with self.lock:
            device = self.pairing.get(unquote(req.params["code"]))
            if device is None or device["claimed"]:
                return Response(400, {"error": "No ScanApp matches the given query."})
            device["claimed"] = True
            api_key = secrets.token_urlsafe(24)
            self.keys[api_key] = device["uuid"]
        return Response(200, {"success": True, "message": "Device successfully paired", "api_key": api_key,
                              "device_uuid": device["uuid"], "device_name": device["name"]})

    @route("GET", r"(?P<prefix>/.*/)test_api/")
    def test_api(self, req: Request) -> Response:
        device = self._guard(req, json_body=False)
        if isinstance(device, Response):
            return device
        name = next((d["name"] for d in self.pairing.values() if d["uuid"] == device), "")
        return Response(200, {"success": True, "message": "API key is valid",
                              "device_info": {"uuid": device, "name": name, "claimed": True, "archived": False},
                              "server_info": {"tenant": "Example Organization", "domain": "127.0.0.1",
                                              "timestamp": datetime.now(UTC).isoformat()}})

    def _find(self, req: Request) -> Ticket | Response:
        try:
            body = req.json()
        except ValueError:
            return Response(400, {"detail": "JSON parse error"})
        code = body.get("qrcode_data") if isinstance(body, dict) else None
        if not code:
            return Response(400, {"error": "QR code data is required"})
        try:
            data, signature = code.split(":")  # as the server does: exactly one colon
        except ValueError:
            return Response(400, {"error": "Invalid QR code format"})
        try:
            ticket_uuid = json.loads(_b64(data)).get("uuid")
        except (ValueError, binascii.Error, AttributeError) as e:
            return Response(400, {"error": f"Error decoding QR code data: {e}"})
        if not ticket_uuid:
            return Response(400, {"error": "Ticket UUID not found in QR code data"})
        ticket = self.tickets.get(ticket_uuid)
        if ticket is None:
            return Response(404, {"error": "Ticket not found"})
        if self.require_event_uuid or body.get("event_uuid") is not None:
            if not body.get("event_uuid"):
                return Response(400, {"error": "Event uuid is required"})
            if body["event_uuid"] != ticket.event:
                return Response(406, {"error": "Event error"})
        try:
            self.events[ticket.event][1].public_key().verify(_b64(signature), data.encode(), TIBILLET_PSS,
                                                             hashes.SHA256())
        except (InvalidSignature, ValueError, binascii.Error):
            return Response(400, {"error": "Invalid ticket signature"})
        return ticket

    def _ticket_json(self, t: Ticket, scanned_by: bool) -> dict:
        out = {"uuid": t.uuid, "status": "Valid and scanned" if t.scanned_by else "Valid and not scanned",
               "event": self.events[t.event][0], "first_name": t.first_name, "last_name": t.last_name,
               "price": t.price, "product": t.product}
        if scanned_by:
            out["scanned_by"] = t.scanned_by
        return out

    @route("POST", r"(?P<prefix>/.*/)check_ticket/")
    def check_ticket(self, req: Request) -> Response:
        device = self._guard(req, json_body=True)
        if isinstance(device, Response):
            return device
        with self.lock:
            found = self._find(req)
            if isinstance(found, Response):
                return found
            ticket = self._ticket_json(found, scanned_by=True) | {"is_scanned": found.scanned_by is not None}
            return Response(200, {"success": True, "message": "Ticket information retrieved", "ticket": ticket,
                                  "reservation": {"uuid": found.reservation, "tickets_count": 1}})

    @route("POST", r"(?P<prefix>/.*/)ticket/")
    def ticket(self, req: Request) -> Response:
        device = self._guard(req, json_body=True)
        if isinstance(device, Response):
            return device
        with self.lock:
            found = self._find(req)
            if isinstance(found, Response):
                return found
            reservation = {"uuid": found.reservation, "tickets_count": 1}
            if found.scanned_by is not None:
                answer = Response(200, {"success": False, "message": "Ticket already scanned",
                                        "ticket": self._ticket_json(found, scanned_by=True),
                                        "reservation": reservation})
            else:
                found.scanned_by = device
                self.scans.append((device, found.uuid))
                answer = Response(200, {"success": True, "message": "Ticket successfully scanned",
                                        "ticket": self._ticket_json(found, scanned_by=False),
                                        "reservation": reservation})
        while self.hold_answer.is_set():  # the scan is recorded; the client never hears back
            threading.Event().wait(0.02)
        return answer


def main(argv: list[str] | None = None) -> None:
    """`python -m gated.simulators.tibillet`: a bench server printing a pairing code and signed tickets."""
    import argparse

    parser = argparse.ArgumentParser(description="TiBillet scan API simulator (loopback only)")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--prefix", default="/api/scan/", help='"/api/scan/" or "/scan/"')
    parser.add_argument("--public-key-out", metavar="PATH",
                        help="write the demo event's public key (PEM) here, for [backend.tibillet] public_keys")
    args = parser.parse_args(argv)
    sim = TibilletSim(args.prefix, port=args.port)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    event = sim.add_event("Demo Event", key)
    if args.public_key_out:
        with open(args.public_key_out, "wb") as f:
            f.write(public_pem(key))
    print(f"TiBillet simulator on {sim.url}{args.prefix}  (event {event})")
    print(f"pairing code: {sim.new_device()}")
    for name in ("Ada", "Bob", "Cy"):
        print(f"ticket for {name}: {sim.issue(event, name)[1]}")
    sim.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        sim.stop()


if __name__ == "__main__":
    main()
