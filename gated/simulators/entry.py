"""Entry V1 API simulator: every endpoint of the spec on 127.0.0.1, as strict as the real API, for tests and dry runs.

It checks what the spec makes required (API-Authorization-Key, Bearer JWT with expiry, Content-Type,
Content-Encoding: gzip and Filename on uploads, required and enumerated body fields, unknown
fields) and answers with the spec's status codes and its error shape
`{"error": {"message": [...], "error": "Bad Request", "statusCode": 400}}`.

The spec names only the reason code "OK"; the simulator's refusals use these codes (Stop):
NOT_FOUND, WRONG_EVENT, VOIDED, TOO_EARLY, TOO_LATE, ALREADY_SCANNED, NOT_CHECKED_IN.

By hand, for an installer's dry run:
    python -m gated.simulators.entry --port 8080 --tickets config/entry-sim-tickets.csv
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo

from gated.simulators.base import Request, Response, Simulator, route

DEFAULT_API_KEY = "EXAMPLE-NOT-A-REAL-KEY-0000"  # the value in config/example-secrets/entry-api.key
MAX_SCANS_PER_UPLOAD = 100
_PHRASES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}


# --- JWT (HS256 with the standard library) ----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_encode(claims: dict[str, Any], key: bytes) -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def jwt_decode(token: str, key: bytes, now: float) -> dict[str, Any]:
    """The claims of a valid, unexpired token; ValueError saying what is wrong otherwise."""
    try:
        head, body, sig = token.split(".")
        header = json.loads(_unb64(head))
        claims = json.loads(_unb64(body))
        given = _unb64(sig)
    except (ValueError, TypeError) as e:
        raise ValueError("jwt malformed") from e
    if header.get("alg") != "HS256":
        raise ValueError("invalid algorithm")
    if not hmac.compare_digest(given, hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()):
        raise ValueError("invalid signature")
    if not isinstance(claims, dict) or not isinstance(claims.get("exp"), (int, float)):
        raise ValueError("jwt malformed")
    if now >= claims["exp"]:
        raise ValueError("jwt expired")
    return claims


# --- request bodies, checked the way a class-validator API does ---------------------------------


@dataclass(frozen=True)
class F:
    kind: str = "str"  # str | int | number | bool | date | datetime | list
    required: bool = False
    enum: tuple[str, ...] = ()
    nullable: bool = False


_INPUT = ("NFC", "Barcode", "Key", "Swipe")
CONTEXT = {
    "networkType": F(enum=("Wifi", "Mobile", "Wired"), nullable=True),
    "wifiSSID": F(nullable=True), "wifiBSSID": F(nullable=True), "wifiChannel": F("int", nullable=True),
    "mobileProvider": F(nullable=True), "networkSignal": F(nullable=True), "localIPAddress": F(nullable=True),
    "softwareMode": F(enum=("Handheld", "Pedestal"), nullable=True),
    "accessorySerialNumber": F(nullable=True), "accessoryFirmware": F(nullable=True),
    "accessoryModel": F(nullable=True), "accessoryMake": F(nullable=True),
    "deviceTimestamp": F("date"),
}
SESSION = {
    "venueCode": F(required=True), "dataAccountId": F(required=True), "serialNumber": F(required=True),
    "make": F(required=True), "model": F(required=True), "firmwareVersion": F(), "softwareVersion": F(),
    "macAddress": F(), "specialAreaId": F(), "specialAreaName": F(), "specialAreaMaxEntryPerTicket": F("int"),
    "specialAreaMaxCapacity": F("int"), "specialAreaRequireEntryExit": F("bool"), **CONTEXT,
}
LITE = {"dataAccountId": F(required=True), "serialNumber": F(required=True), "venueCode": F(required=True)}
VENUES = {"dataAccountId": F(required=True), "serialNumber": F(required=True), "make": F(required=True),
          "model": F(required=True), **CONTEXT}
PING = {"geoLocation": F(), "batteryPercentage": F("number"), "accessoryBatteryPercentage": F("number"),
        "testMode": F("bool"), **CONTEXT}
VALIDATE = {"token": F(required=True), "inputType": F(required=True, enum=_INPUT),
            "scanMode": F(required=True, enum=("Entry", "Exit")), "nfcType": F(enum=("Apple", "Google")),
            "barcodeType": F(enum=("Barcode", "QRCode")), "testMode": F("bool"), **CONTEXT}
LOOKUP = {"inputType": F(enum=_INPUT), "nfcType": F(enum=("Apple", "Google")),
          "barcodeType": F(enum=("Barcode", "QRCode")), **CONTEXT}
BATCH = {"serialNumber": F(required=True), "dataAccountId": F(required=True), "venueCd": F(required=True),
         "deviceStatus": F(), "scanMode": F(required=True, enum=("Entry", "Exit")), "eventId": F(required=True),
         "eventStartDate": F(), "eventEndDate": F(), "jwt": F(), "scans": F("list", required=True)}
OFFLINE_SCAN = {"token": F(required=True), "status": F(required=True, enum=("Admit", "Stop")),
                "scanTimestamp": F("datetime", required=True), "deviceTimestamp": F("datetime"),
                "inputType": F(required=True, enum=_INPUT), "barcodeType": F(enum=("Barcode", "QRCode")),
                "nfcType": F(enum=("Apple", "Google"))}


def check_body(body: Any, schema: dict[str, F], where: str = "") -> list[str]:
    """Every problem with a JSON object, in class-validator's words."""
    if not isinstance(body, dict):
        return [f"{where or 'body'} must be an object"]
    problems = [f"property {where}{name} should not exist" for name in body if name not in schema]
    for name, f in schema.items():
        value = body.get(name)
        if value is None:
            if f.required:
                problems.append(f"{where}{name} should not be empty")
            elif name in body and not f.nullable:
                problems.append(f"{where}{name} must not be null")
            continue
        if problem := _check_value(value, f):
            problems.append(f"{where}{name} {problem}")
    return problems


def _check_value(value: Any, f: F) -> str | None:
    if f.kind in ("str", "date", "datetime"):
        if not isinstance(value, str):
            return "must be a string"
        if f.required and not value:
            return "should not be empty"
        if f.enum and value not in f.enum:
            return f"must be one of the following values: {', '.join(f.enum)}"
        if f.kind in ("date", "datetime"):
            try:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                return "must be a valid ISO 8601 date string"
            if f.kind == "datetime" and moment.tzinfo is None:
                return "must be an ISO 8601 date and time with a UTC offset"
    elif f.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer number"
    elif f.kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number"
    elif f.kind == "bool" and not isinstance(value, bool):
        return "must be a boolean value"
    elif f.kind == "list" and not isinstance(value, list):
        return "must be an array"
    return None


def error(status: int, *messages: str) -> Response:
    """The spec's error shape."""
    return Response(status, {"error": {"message": list(messages), "error": _PHRASES.get(status, "Error"),
                                       "statusCode": status}})


# --- state ------------------------------------------------------------------------------------


@dataclass
class SimTicket:
    token: str
    event_id: str
    first_name: str = ""
    last_name: str = ""
    patron_id: str = ""
    status: str = "valid"  # valid | void
    level: str = ""
    section: str = ""
    row: str = ""
    seat: str = ""


def read_tickets(path: str, default_event: str) -> list[SimTicket]:
    """Tickets from a CSV file with a header: token (required), event_id, first_name, last_name,
    patron_id, status (valid|void), level, section, row, seat."""
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            token = (row.get("token") or "").strip()
            if token:
                fields = {k: (row.get(k) or "").strip() for k in SimTicket.__dataclass_fields__ if k != "token"}
                fields["event_id"] = fields["event_id"] or default_event
                fields["status"] = fields["status"] or "valid"
                out.append(SimTicket(token=token, **fields))
    return out


def default_events(account: str, tz: str, now: float) -> list[dict[str, Any]]:
    """One event scanning now: started an hour ago, scan window two hours before to six after."""
    def local(delta_hours: float) -> str:
        moment = datetime.fromtimestamp(now, ZoneInfo(tz)) + timedelta(hours=delta_hours)
        return moment.replace(tzinfo=None, microsecond=0).isoformat()

    return [{"eventName": "Simulated event", "eventId": f"{account}:SIM:EVT1",
             "startDateTime": local(-1), "endDateTime": local(5),
             "scanStartDateTime": local(-2), "scanEndDateTime": local(6),
             "barcodeMasks": [f"{account}##########"]}]


class EntrySimulator(Simulator):
    """The Entry V1 API. Tests read `requests`, `sessions`, `files`, `arrivals`; they may change
    `api_key`, `events`, `tickets`, `clock`, or call `revoke_sessions()`, besides the base's
    `stall` and `fail_status`."""

    def __init__(self, *, api_key: str = DEFAULT_API_KEY, data_account_id: str = "390",
                 venues: list[dict[str, str]] | None = None, events: list[dict[str, Any]] | None = None,
                 tickets: Iterable[SimTicket] = (), nfc_keys: dict[str, list] | None = None,
                 jwt_ttl: float = 3600.0, base_path: str = "", clock: Callable[[], float] = time.time,
                 verbose: bool = False, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.api_key = api_key
        self.account = data_account_id
        self.venues = venues or [{"facilityCode": "TS", "title": "Titan Stadium",
                                  "venueTimezone": "America/Los_Angeles"}]
        self.clock = clock
        self.events = events if events is not None else default_events(
            data_account_id, self.venues[0]["venueTimezone"], clock())
        self.tickets = {t.token: t for t in tickets}
        self.nfc_keys = nfc_keys if nfc_keys is not None else {"apple": [], "google": []}
        self.jwt_ttl = jwt_ttl
        self.base_path = base_path.rstrip("/")
        self.verbose = verbose
        self._key = secrets.token_bytes(32)
        self.sessions: dict[str, dict[str, Any]] = {}  # jti -> claims of every live session
        self.sessions_created = 0
        self.inside: dict[str, bool] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.files: dict[str, list[dict[str, Any]]] = {}  # Filename -> batches (a re-upload replaces)
        self.arrivals: Counter[tuple[str, str, str]] = Counter()  # (eventId, token, scanTimestamp)
        self.upload_requests = 0
        self.rejected_uploads: list[str] = []
        self.statuses: list[tuple[str, str, int]] = []  # (method, path, status) of every answer

    # --- helpers the tests use -----------------------------------------------------------

    def revoke_sessions(self) -> None:
        """Every JWT issued so far now gets 401, as after a server-side expiry or key rotation."""
        with self.lock:
            self.sessions.clear()

    def received_scans(self) -> list[dict[str, Any]]:
        """Every offline scan in the stored files, with its batch's eventId and scanMode."""
        with self.lock:
            return [{**s, "eventId": b["eventId"], "scanMode": b["scanMode"]}
                    for batches in self.files.values() for b in batches for s in b["scans"]]

    def requests_to(self, suffix: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path.endswith(suffix)]

    # --- plumbing ------------------------------------------------------------------------

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        if self.base_path:
            if not h.path.startswith(self.base_path + "/"):
                h.rfile.read(int(h.headers.get("Content-Length") or 0))
                return self._send(h, error(404, f"Cannot {h.command} {h.path}"))
            h.path = h.path[len(self.base_path):]
        super()._dispatch(h)

    def _send(self, h: BaseHTTPRequestHandler, resp: Response) -> None:  # type: ignore[override]
        with self.lock:
            self.statuses.append((h.command, h.path, resp.status))
        if self.verbose:
            print(f"{time.strftime('%H:%M:%S')} {h.command} {h.path} -> {resp.status}", flush=True)
        Simulator._send(h, resp)

    @staticmethod
    def _parse(req: Request) -> tuple[Any, Response | None]:
        if not req.headers.get("content-type", "").startswith("application/json"):
            return None, error(400, "Content-Type must be application/json")
        try:
            return req.json(), None
        except (ValueError, UnicodeDecodeError):
            return None, error(400, "Unexpected token in JSON body")

    def _json(self, req: Request, schema: dict[str, F]) -> tuple[Any, Response | None]:
        body, bad = self._parse(req)
        if bad:
            return None, bad
        body = {} if body is None else body
        problems = check_body(body, schema)
        return body, (error(400, *problems) if problems else None)

    def _api_key_problem(self, req: Request) -> Response | None:
        given = req.headers.get("api-authorization-key")
        if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return error(401, "Invalid API-Authorization-Key")
        return None

    def _session(self, req: Request, *, full: bool) -> tuple[dict[str, Any] | None, Response | None]:
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return None, error(401, "Missing Authorization: Bearer token")
        try:
            claims = jwt_decode(token, self._key, self.clock())
        except ValueError as e:
            return None, error(401, str(e))
        with self.lock:
            if claims.get("jti") not in self.sessions:
                return None, error(401, "jwt expired")
        if full and claims.get("integratorType") == "LIMITED":
            return None, error(401, "A LIMITED session may only call Get Events and Ticket Lookup")
        return claims, None

    def _issue(self, body: dict[str, Any], *, lite: bool) -> Response:
        venue = next((v for v in self.venues if v["facilityCode"] == body["venueCode"]), None)
        if venue is None or body["dataAccountId"] != self.account:
            return error(404, f"Venue {body['venueCode']} not found for data account {body['dataAccountId']}")
        now = int(self.clock())
        claims = {"deviceId": int(hashlib.sha256(body["serialNumber"].encode()).hexdigest()[:6], 16),
                  "serialNumber": body["serialNumber"], "venueName": venue["title"],
                  "venueCode": venue["facilityCode"], "dataAccountId": self.account,
                  "deviceType": (body.get("softwareMode") or "Handheld").lower(),
                  "venueTimezone": venue["venueTimezone"], "jti": str(uuid.uuid4()),
                  "iat": now, "exp": now + int(self.jwt_ttl)}
        if lite:
            claims["integratorType"] = "LIMITED"
        with self.lock:
            self.sessions[claims["jti"]] = claims
            self.sessions_created += 1
        return Response(200 if lite else 201, {"jwt": jwt_encode(claims, self._key)})

    def _event(self, event_id: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("eventId") == event_id), None)

    def _venue_time(self, text: str | None) -> float | None:
        if not text:
            return None
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=ZoneInfo(self.venues[0]["venueTimezone"]))
        return moment.timestamp()

    # --- the endpoints -------------------------------------------------------------------

    @route("POST", r"/session")
    def create_session(self, req: Request) -> Response:
        if bad := self._api_key_problem(req):
            return bad
        body, bad = self._json(req, SESSION)
        return bad or self._issue(body, lite=False)

    @route("POST", r"/session/lite")
    def create_session_lite(self, req: Request) -> Response:
        if bad := self._api_key_problem(req):
            return bad
        body, bad = self._json(req, LITE)
        return bad or self._issue(body, lite=True)

    @route("POST", r"/events")
    def get_events(self, req: Request) -> Response:
        _, bad = self._session(req, full=False)
        if bad:
            return bad
        _, bad = self._json(req, CONTEXT)
        if bad:
            return bad
        with self.lock:
            return Response(200, {"nfcKeys": self.nfc_keys, "events": list(self.events)})

    @route("POST", r"/venues")
    def get_venues(self, req: Request) -> Response:
        if bad := self._api_key_problem(req):
            return bad
        body, bad = self._json(req, VENUES)
        if bad:
            return bad
        return Response(200, {"venues": self.venues if body["dataAccountId"] == self.account else []})

    @route("POST", r"/ping")
    def ping(self, req: Request) -> Response:
        _, bad = self._session(req, full=True)
        if bad:
            return bad
        _, bad = self._json(req, PING)
        return bad or Response(200, {})

    @route("POST", r"/scan/validate")
    def validate_scan(self, req: Request) -> Response:
        claims, bad = self._session(req, full=True)
        if bad:
            return bad
        body, bad = self._json(req, VALIDATE)
        if bad:
            return bad
        return Response(200, self._decide(body, claims))

    def _decide(self, body: dict[str, Any], claims: dict[str, Any]) -> dict[str, Any]:
        token, mode, test = body["token"], body["scanMode"], bool(body.get("testMode"))
        now = self.clock()
        with self.lock:
            ticket = self.tickets.get(token)
            event = self._event(ticket.event_id) if ticket else None
            start = self._venue_time(event.get("scanStartDateTime")) if event else None
            end = self._venue_time(event.get("scanEndDateTime")) if event else None
            inside = self.inside.get(token, False)
            if ticket is None:
                status, code, text = "Stop", "NOT_FOUND", "Ticket not found"
            elif event is None:
                status, code, text = "Stop", "WRONG_EVENT", "Ticket is not for an event scanning today"
            elif ticket.status == "void":
                status, code, text = "Stop", "VOIDED", "Ticket voided"
            elif start is not None and now < start:
                status, code, text = "Stop", "TOO_EARLY", "Scanning has not started"
            elif end is not None and now > end:
                status, code, text = "Stop", "TOO_LATE", "Scanning has ended"
            elif mode == "Entry" and inside:
                status, code, text = "Stop", "ALREADY_SCANNED", "Ticket already scanned"
            elif mode == "Exit" and not inside:
                status, code, text = "Stop", "NOT_CHECKED_IN", "Ticket has not entered"
            else:
                status, code, text = "Admit", "OK", "Good Ticket" if mode == "Entry" else "Exit recorded"
                if not test:
                    self.inside[token] = mode == "Entry"
            if not test:
                self.history.setdefault(token, []).append({
                    "deviceType": claims.get("deviceType"), "serialNumber": claims.get("serialNumber"),
                    "checkpointName": "Simulated checkpoint", "reasonMessage": text,
                    "scanMode": mode, "testMode": test, "venueName": claims.get("venueName"),
                    "scanTimestamp": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "venueCode": claims.get("venueCode"), "inputType": body["inputType"], "reasonCode": code,
                    "status": status, "deviceStatus": "Online", "softwareMode": body.get("softwareMode"),
                    **{k: body[k] for k in ("barcodeType", "nfcType") if k in body}})
        answer = {"status": status, "reasonCode": code, "reasonMessage": text, "token": token, "testMode": test}
        if ticket is not None:
            answer |= {"eventId": ticket.event_id, "eventName": (event or {}).get("eventName", ""),
                       "ticket": token, "patronId": ticket.patron_id, "firstName": ticket.first_name,
                       "lastName": ticket.last_name, "seatInfo": _seat(ticket)}
        return answer

    @route("POST", r"/scan/lookup/(?P<barcode>[^/]+)")
    def ticket_lookup(self, req: Request) -> Response:
        claims, bad = self._session(req, full=False)
        if bad:
            return bad
        _, bad = self._json(req, LOOKUP)
        if bad:
            return bad
        token = unquote(req.params["barcode"])
        with self.lock:
            ticket = self.tickets.get(token)
            if ticket is None:
                return error(404, "Ticket not found")
            event = self._event(ticket.event_id) or {}
            history = list(self.history.get(token, []))
        tz = self.venues[0]["venueTimezone"]
        offset = datetime.fromtimestamp(self.clock(), ZoneInfo(tz)).strftime("%z")
        return Response(200, {
            "eventId": ticket.event_id, "eventName": event.get("eventName", ""),
            "eventStartDateTime": event.get("startDateTime"), "eventEndDateTime": event.get("endDateTime"),
            "venue": {"name": claims.get("venueName"), "code": claims.get("venueCode")},
            "offset": f"{offset[:3]}:{offset[3:]}", "timeZone": tz, "token": token, "ticket": token,
            "patronId": ticket.patron_id, "firstName": ticket.first_name, "lastName": ticket.last_name,
            "seatInfo": _seat(ticket), "scanHistory": history})

    @route("POST", r"/offline/(?P<event_id>[^/]+)")
    def offline_upload(self, req: Request) -> Response:
        response = self._offline_upload(req)
        if response.status >= 400:
            with self.lock:
                self.rejected_uploads.append(json.dumps(response.body))
        return response

    def _offline_upload(self, req: Request) -> Response:
        if bad := self._api_key_problem(req):
            return bad
        event_id = unquote(req.params["event_id"])
        if not re.fullmatch(r"\d{3}:[^:]+:[^:]+", event_id):
            return error(400, "eventId must be in the format {dataAccountId:seasonCd:eventCd}")
        if req.headers.get("content-encoding", "").lower() != "gzip":
            return error(400, "Content-Encoding must be gzip (raw gzip binary body)")
        filename = req.headers.get("filename", "")
        if not filename:
            return error(400, "Filename header is required ({serialNumber_timestamp})")
        batches, bad = self._parse(req)
        if bad:
            return bad
        if not isinstance(batches, list) or not batches:
            return error(400, "Body must be a non-empty JSON array of offline scan batches")
        problems, total = [], 0
        for i, batch in enumerate(batches):
            problems += check_body(batch, BATCH, f"[{i}].")
            if not isinstance(batch, dict):
                continue
            if batch.get("eventId") not in (None, event_id):
                problems.append(f"[{i}].eventId {batch['eventId']} does not match the path's {event_id}")
            if batch.get("dataAccountId") not in (None, self.account):
                problems.append(f"[{i}].dataAccountId {batch['dataAccountId']} is not this client's")
            serial = batch.get("serialNumber")
            if isinstance(serial, str) and not (filename.startswith(serial + "_") and len(filename) > len(serial) + 1):
                problems.append(f"Filename {filename} is not in the format {{serialNumber_timestamp}}")
            scans = batch.get("scans") if isinstance(batch.get("scans"), list) else []
            total += len(scans)
            for j, scan in enumerate(scans):
                problems += check_body(scan, OFFLINE_SCAN, f"[{i}].scans[{j}].")
        if total > MAX_SCANS_PER_UPLOAD:
            problems.insert(0, f"The request payload is limited to {MAX_SCANS_PER_UPLOAD} scans; got {total}")
        if problems:
            return error(400, *problems)
        with self.lock:
            self.upload_requests += 1
            seen = {(b["eventId"], s["token"], s["scanTimestamp"]) for b in self.files.get(filename, [])
                    for s in b["scans"]}
            self.files[filename] = batches  # same key, same object: S3 replaces it
            for b in batches:
                for s in b["scans"]:
                    key = (b["eventId"], s["token"], s["scanTimestamp"])
                    self.arrivals[key] += 1
                    if key not in seen and s["status"] == "Admit":
                        self.inside[s["token"]] = b["scanMode"] == "Entry"
        season, _, code = event_id.partition(":")[2].partition(":")
        day = datetime.fromtimestamp(self.clock(), UTC).strftime("%Y-%m-%d")
        return Response(200, {"message": "Entry Offline Scan - Upload to S3 bucket entry-offline-scans successful "
                                         f"at incoming/{self.account}/{season}/{code}/{day}/{filename}.json"})


def _seat(ticket: SimTicket) -> dict[str, str]:
    return {"level": ticket.level, "section": ticket.section, "row": ticket.row, "seat": ticket.seat,
            "altSeatLocationText": ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gated.simulators.entry",
                                     description="Entry V1 API simulator for dry runs (loopback only).")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tickets", metavar="FILE", help="CSV: token,event_id,first_name,last_name,"
                        "patron_id,status,level,section,row,seat (only token is required)")
    parser.add_argument("--events", metavar="FILE", help="JSON list of events in the Get Events shape "
                        "(default: one event scanning now, mask ACCOUNT##########)")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="the API-Authorization-Key to accept "
                        "(default: the fake key in config/example-secrets/entry-api.key)")
    parser.add_argument("--data-account", default="390", help="the 3-digit dataAccountId (default 390)")
    parser.add_argument("--venue", default="TS", help="venue code (default TS)")
    parser.add_argument("--timezone", default="America/Los_Angeles", help="the venue's time zone")
    parser.add_argument("--jwt-ttl", type=float, default=3600.0, help="session lifetime in seconds")
    args = parser.parse_args(argv)
    venues = [{"facilityCode": args.venue, "title": f"Venue {args.venue}", "venueTimezone": args.timezone}]
    events = None
    if args.events:
        with open(args.events, encoding="utf-8") as f:
            events = json.load(f)
    now = time.time()
    events = events if events is not None else default_events(args.data_account, args.timezone, now)
    tickets = read_tickets(args.tickets, events[0]["eventId"]) if args.tickets and events else []
    sim = EntrySimulator(api_key=args.api_key, data_account_id=args.data_account, venues=venues, events=events,
                         tickets=tickets, jwt_ttl=args.jwt_ttl, verbose=True, port=args.port)
    print(f"Entry V1 simulator at {sim.url}: venue {args.venue}, data account {args.data_account}, "
          f"{len(tickets)} tickets, {len(events)} events")
    for e in events:
        print(f"  event {e.get('eventId')}: scan {e.get('scanStartDateTime')} .. {e.get('scanEndDateTime')} "
              f"({args.timezone}), masks {e.get('barcodeMasks', [])}")
    print(f'Set [backend] url = "{sim.url}" in the gate\'s config. Ctrl-C stops.', flush=True)
    try:
        sim.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sim.server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
