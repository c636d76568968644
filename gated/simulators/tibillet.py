"""A TiBillet scan API on 127.0.0.1 for tests and benches, answering as the real server does.

It follows TiBillet/Lespass 1.8.28 (`BaseBillet/views_scan.py`, as observed in the TiBillet
peer's `observed/transcript.md`, kept outside this repository), not the API documents. Where
they differ:

- Paths live under `/scan/` with a trailing slash; the French document's `/api/scan/` and any
  other path answer 404 with an HTML page, and a path without its trailing slash answers 301.
- The key check is `GET check_api_scan/` → `{"scan_app": name}`. The documents' `test_api/`
  answers 403 `{"detail": "Authentication credentials were not provided."}` (pass
  `test_api=True` for a server as documented: then `test_api/` answers and `check_api_scan/` is 404).
- No key → 403 `{"detail": "No app associated with this key."}`; an archived device → 403
  `{"detail": "App is archived."}`; an unknown key → **HTTP 500 with an HTML page**.
- Pairing answers `tenant_name` too; a used or bad code → 400 `{"error": ...}`.
- `ticket/` needs `event_uuid` (400 "Event uuid is required", asked before anything else) and
  answers 406 "Event error" for another event's ticket. It **scans any ticket not yet scanned**,
  canceled, inactive and unpaid ones included, and answers `success: true`.
- `check_ticket/` shows the real status (`get_status_display()`, English or French) and
  `is_scanned`; without `qrcode_data` it answers 406 (400 on `ticket/`).
- `list_tickets/` pages an event's tickets with their status (at most 200 a page).
- Errors are `{"error": "..."}` with 400/404/406; JSON or form bodies are both read.

Codes are made here the way TiBillet makes them: URL-safe base64 of `{"uuid": ...}`,
RSA-PSS-SHA256 (max salt) over that text; each making signs anew, so a code differs every time.
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
from typing import Any
from urllib.parse import unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gated.policy.signatures import TIBILLET_PSS
from gated.simulators.base import Request, Response, Simulator, route

# Ticket.status codes and their display texts, as Lespass's models.py and its French catalogue have them.
CREATED, INACTIVE, VALID, SCANNED, CANCELED = "C", "N", "K", "S", "R"
DISPLAY = {
    "en": {CREATED: "Created", INACTIVE: "Inactive", VALID: "Valid and not scanned", SCANNED: "Valid and scanned",
           CANCELED: "Canceled"},
    "fr": {CREATED: "Créé", INACTIVE: "Inactive", VALID: "Valide et non scanné", SCANNED: "Valide et scanné",
           CANCELED: "Annulé"},
}
_NOT_FOUND_PAGE = "\n\n<!doctype html>\n<html lang=\"en\"><head><title>Page not found</title></head></html>\n"
_ERROR_PAGE = "\n\n<!doctype html>\n<html lang=\"en\"><head><title>Server error</title></head></html>\n"


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
    status: str = VALID
    scanned_by: str | None = None  # device uuid
    product: str = "Concert Ticket"
    price: str = "General Admission"
    reservation: str = field(default_factory=lambda: str(uuid.uuid4()))


def _html(status: int, page: str) -> Response:
    return Response(status, page, {"Content-Type": "text/html; charset=utf-8"})


class TibilletSim(Simulator):
    def __init__(self, prefix: str = "/scan/", *, language: str = "en", test_api: bool = False, **kw):
        super().__init__(**kw)
        self.prefix = prefix
        self.language = language  # the server's LANGUAGE_CODE: status texts are translated
        self.documented = test_api  # True: `test_api/` as the documents describe it, no `check_api_scan/`
        self.tenant = "Example Organization"
        self.events: dict[str, tuple[str, rsa.RSAPrivateKey]] = {}  # uuid -> (name, key)
        self.tickets: dict[str, Ticket] = {}
        self.pairing: dict[str, dict] = {}  # pairing code -> device
        self.keys: dict[str, str] = {}  # api key -> device uuid
        self.archived: set[str] = set()  # device uuids archived in the admin
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

    def issue(self, event_uuid: str, first_name: str = "Ada", last_name: str = "Lovelace",
              status: str = VALID) -> tuple[str, str]:
        """A new ticket in `status` (VALID, SCANNED, CANCELED, INACTIVE, CREATED): (uuid, QR text)."""
        t = Ticket(str(uuid.uuid4()), event_uuid, first_name, last_name, status)
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

    def status(self, ticket_uuid: str) -> str:
        with self.lock:
            return self.tickets[ticket_uuid].status

    # --- the API --------------------------------------------------------------------------

    def _device(self, req: Request) -> str | Response:
        """The device the request's key belongs to, or TiBillet's answer to a missing or bad key."""
        scheme, _, key = req.headers.get("authorization", "").partition(" ")
        if scheme != "Api-Key" or not key:
            return Response(403, {"detail": "No app associated with this key."})
        device = self.keys.get(key)
        if device is None:  # ScannerAPIKey.DoesNotExist is not caught: Django's error page
            return _html(500, _ERROR_PAGE)
        if device in self.archived:
            return Response(403, {"detail": "App is archived."})
        return device

    def _guard(self, req: Request) -> str | Response:
        if req.params.get("prefix") != self.prefix:
            return _html(404, _NOT_FOUND_PAGE)
        return self._device(req)

    @staticmethod
    def _data(req: Request) -> dict[str, Any]:
        """The body as DRF reads it: JSON, or a form (each field's first value)."""
        if req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return {k: v[0] for k, v in req.form().items()}
        try:
            body = req.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    @route("GET", r"(?P<prefix>/.*/)(?P<code>[^/]+)/pair/")
    def pair(self, req: Request) -> Response:
        if req.params["prefix"] != self.prefix:
            return _html(404, _NOT_FOUND_PAGE)
        with self.lock:
            device = self.pairing.get(unquote(req.params["code"]))
            if device is None:
                return Response(400, {"error": 'No ":" found in value'})
            if device["claimed"]:
                return Response(400, {"error": "No ScanApp matches the given query."})
            device["claimed"] = True
            api_key = f"{secrets.token_urlsafe(6)[:8]}.{secrets.token_urlsafe(24)[:32]}"
            self.keys[api_key] = device["uuid"]
        return Response(200, {"success": True, "tenant_name": self.tenant, "message": "Device successfully paired",
                              "api_key": api_key, "device_uuid": device["uuid"], "device_name": device["name"]})

    @route("GET", r"(?P<prefix>/.*/)(?P<code>[^/]+)/pair")
    def pair_without_slash(self, req: Request) -> Response:
        if req.params["prefix"] != self.prefix:
            return _html(404, _NOT_FOUND_PAGE)
        if self.documented:
            return self.pair(req)
        return Response(301, "", {"Location": f"{req.path}/", "Content-Type": "text/html; charset=utf-8"})

    def _device_name(self, device: str) -> str:
        return next((d["name"] for d in self.pairing.values() if d["uuid"] == device), "")

    @route("GET", r"(?P<prefix>/.*/)check_api_scan/")
    def check_api_scan(self, req: Request) -> Response:
        device = self._guard(req)
        if isinstance(device, Response):
            return device
        if self.documented:
            return _html(404, _NOT_FOUND_PAGE)
        return Response(200, {"scan_app": self._device_name(device)})

    @route("GET", r"(?P<prefix>/.*/)test_api/")
    def test_api(self, req: Request) -> Response:
        if not self.documented:  # caught by Lespass's unanchored `api/` route, whatever the key
            return Response(403, {"detail": "Authentication credentials were not provided."})
        device = self._guard(req)
        if isinstance(device, Response):
            return device
        return Response(200, {"success": True, "message": "API key is valid",
                              "device_info": {"uuid": device, "name": self._device_name(device), "claimed": True,
                                              "archived": False},
                              "server_info": {"tenant": self.tenant, "domain": "127.0.0.1",
                                              "timestamp": datetime.now(UTC).isoformat()}})

    def _find(self, code: str, event_uuid: str | None = None) -> Ticket | Response:
        """The ticket a QR text names, checked in the real server's order (under self.lock)."""
        try:
            data, signature = code.split(":")  # as the server does: exactly one colon
        except ValueError:
            return Response(400, {"error": "Invalid QR code format"})
        try:
            ticket_uuid = json.loads(base64.b64decode(data).decode("utf-8")).get("uuid")  # standard base64, as it
            if not ticket_uuid:
                return Response(400, {"error": "Ticket UUID not found in QR code data"})
        except (ValueError, binascii.Error, AttributeError) as e:
            return Response(400, {"error": f"Error decoding QR code data: {e}"})
        ticket = self.tickets.get(str(ticket_uuid))
        if ticket is None:
            return Response(404, {"error": "Ticket not found"})
        if event_uuid is not None and event_uuid != ticket.event:
            return Response(406, {"error": "Event error"})
        try:
            self.events[ticket.event][1].public_key().verify(_b64(signature), data.encode(), TIBILLET_PSS,
                                                             hashes.SHA256())
        except (InvalidSignature, ValueError, binascii.Error):
            return Response(400, {"error": "Invalid ticket signature"})
        return ticket

    def _ticket_json(self, t: Ticket) -> dict:
        return {"uuid": t.uuid, "status": DISPLAY[self.language][t.status], "event": self.events[t.event][0],
                "first_name": t.first_name, "last_name": t.last_name, "price": t.price, "product": t.product,
                "scanned_by": t.scanned_by, "custom_form": None}

    def _reservation(self, t: Ticket) -> dict:
        return {"uuid": t.reservation, "tickets_count": sum(1 for x in self.tickets.values()
                                                             if x.reservation == t.reservation)}

    @route("POST", r"(?P<prefix>/.*/)check_ticket/")
    def check_ticket(self, req: Request) -> Response:
        device = self._guard(req)
        if isinstance(device, Response):
            return device
        code = self._data(req).get("qrcode_data")
        if not code:
            return Response(406, {"error": "QR code data is required"})
        with self.lock:
            found = self._find(str(code))
            if isinstance(found, Response):
                return found
            ticket = self._ticket_json(found)
            ticket = {**ticket, "is_scanned": found.status == SCANNED}
            return Response(200, {"success": True, "message": "Ticket information retrieved", "ticket": ticket,
                                  "reservation": self._reservation(found)})

    @route("POST", r"(?P<prefix>/.*/)ticket/")
    def ticket(self, req: Request) -> Response:
        device = self._guard(req)
        if isinstance(device, Response):
            return device
        body = self._data(req)
        if not body.get("event_uuid"):
            return Response(400, {"error": "Event uuid is required"})
        if not body.get("qrcode_data"):
            return Response(400, {"error": "QR code data is required"})
        with self.lock:
            found = self._find(str(body["qrcode_data"]), str(body["event_uuid"]))
            if isinstance(found, Response):
                return found
            if found.status == SCANNED:
                answer = Response(200, {"success": False, "message": "Ticket already scanned",
                                        "ticket": self._ticket_json(found), "reservation": self._reservation(found)})
            else:  # canceled, inactive and unpaid tickets too: the real server checks nothing else
                found.status, found.scanned_by = SCANNED, device
                self.scans.append((device, found.uuid))
                answer = Response(200, {"success": True, "message": "Ticket successfully scanned",
                                        "ticket": self._ticket_json(found), "reservation": self._reservation(found)})
        while self.hold_answer.is_set():  # the scan is recorded; the client never hears back
            threading.Event().wait(0.02)
        return answer

    @route("POST", r"(?P<prefix>/.*/)list_tickets/")
    def list_tickets(self, req: Request) -> Response:
        device = self._guard(req)
        if isinstance(device, Response):
            return device
        body = self._data(req)
        event = body.get("event_uuid")
        page, size = body.get("page", 1), body.get("page_size", 40)
        problems = {}
        if not event:
            problems["event_uuid"] = ["This field is required."]
        else:
            try:
                event = str(uuid.UUID(str(event)))
            except ValueError:
                problems["event_uuid"] = ["Must be a valid UUID."]
        if not isinstance(page, int) or page < 1:
            problems["page"] = ["Ensure this value is greater than or equal to 1."]
        if not isinstance(size, int) or not 1 <= size <= 200:
            problems["page_size"] = ["Ensure this value is less than or equal to 200."]
        if problems:
            return Response(400, problems)
        with self.lock:
            chosen = [t for t in self.tickets.values() if t.event == event]
            if body.get("order_by") == "uuid":
                chosen.sort(key=lambda t: t.uuid, reverse=body.get("order_dir", "desc") == "desc")
            items = chosen[(page - 1) * size:page * size]
            results = [{"uuid": t.uuid, "first_name": t.first_name, "last_name": t.last_name,
                        "email": "buyer@example.org", "price": t.price, "product": t.product,
                        "reservation_uuid": t.reservation, "status": DISPLAY[self.language][t.status],
                        "reservation_datetime": "2026-12-07T19:11:19.582562Z",
                        "qrcode_data": make_code(self.events[t.event][1], t.uuid), "custom_form": None}
                       for t in items]
        return Response(200, {"success": True, "count": len(results), "total": len(chosen), "page": page,
                              "page_size": size, "total_pages": (len(chosen) + size - 1) // size,
                              "ordering": {"order_by": body.get("order_by", "reservation__datetime"),
                                           "order_dir": body.get("order_dir", "desc")},
                              "results": results})

    # Last in the route table (routes are taken in name order): Django's 404 page for anything else.
    @route("GET", r"/.*")
    def zz_not_found_get(self, req: Request) -> Response:
        return _html(404, _NOT_FOUND_PAGE)

    @route("POST", r"/.*")
    def zz_not_found_post(self, req: Request) -> Response:
        return _html(404, _NOT_FOUND_PAGE)


def main(argv: list[str] | None = None) -> None:
    """`python -m gated.simulators.tibillet`: a bench server printing a pairing code and signed tickets."""
    import argparse

    parser = argparse.ArgumentParser(description="TiBillet scan API simulator (loopback only)")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--prefix", default="/scan/", help='"/scan/" as TiBillet serves it')
    parser.add_argument("--public-key-out", metavar="PATH",
                        help="write the demo event's public key (PEM) here, for [backend.tibillet] public_keys")
    args = parser.parse_args(argv)
    sim = TibilletSim(args.prefix, port=args.port)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    event = sim.add_event("Demo Event", key)
    if args.public_key_out:
        with open(args.public_key_out, "wb") as f:
            f.write(public_pem(key))
    print(f"TiBillet simulator on {sim.url}{args.prefix}  (event_uuid = \"{event}\")")
    print(f"pairing code: {sim.new_device()}")
    for name in ("Ada", "Bob", "Cy"):
        print(f"ticket for {name}: {sim.issue(event, name)[1]}")
    print(f"canceled ticket: {sim.issue(event, 'Carl', 'Canceled', CANCELED)[1]}")
    sim.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        sim.stop()


if __name__ == "__main__":
    main()
