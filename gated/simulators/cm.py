"""A CM.com Ticket Scan API v2.0 on 127.0.0.1, faithful to the spec, for tests and benchmarks.

Implements Post User Login (HS512 JWT with `sub`/`user.uuid`, `iat`, `exp`), Get Scan Services,
Get Barcodes (X-PAGINATION-LIMIT ≤ 500, X-PAGINATION-PAGE, X-COMPARE-TIMESTAMP), Post Checkin,
Post Checkout and Post Upload. Like the real API it refuses what is wrong: no or malformed
X-DEVICE-INFO, a Content-Type other than application/json, a missing, forged, expired or revoked
token (401 with an Info Message), and bad bodies or headers (400 with an Info Message).

Behaviour the spec leaves open, chosen here and mirrored by gated's offline rules: a canceled
barcode or one not valid yet answers 45; a check-out does not give a check-in back; an upload
record equal to one already received (barcode, time, status) is kept once.

Large sets are generated lazily (`generate`): barcode `CM00000000` … exists without a dict per
barcode until it is scanned or changed, so 100,000 barcodes cost a few kilobytes.

Run alone: `python -m gated.simulators.cm --port 8081 --barcodes 100000`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gated.simulators.base import Request, Response, Simulator, route

PREFIX = "/scanapi/v2.0"
# The spec's scan status messages, copied (not imported) from gated/policy/cm.py on purpose: the
# simulator stands for CM.com, so a wrong edit to gated's table must show up in the tests.
MESSAGES = {
    40: "DENY - Ticket barcode unknown: not accepted at this check-in point",
    45: "DENY - Ticket is not allowed: this ticket type can not be scanned",
    50: "DENY - Ticket already scanned: {last_checked_in_time} UTC",
    60: "DENY - Ticket barcode is expired: on {expire_time} UTC",
    100: "ADMIT - Ticket is valid",
    200: "ADMIT - Ticket checked-out correctly",
    210: "DENY - Can not check-out ticket: ticket already checked-out",
    220: "DENY - Can not check-out ticket: no valid check-ins found",
    230: "DENY - Can not check-out ticket: barcode not in service",
}
TIME_FIELDS = ("expire_from", "checkin_valid_from", "checkin_valid_till", "last_checked_in_time",
               "last_checked_out_time")
_DEVICE = re.compile(r"^[A-Z_]+:[^,]*(,[A-Z_]+:[^,]*)*$")


@dataclass
class Hold:
    """Hold the answer to one barcode page: `reached` is set when it is asked for, `release` lets it go."""

    page: int
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


_SCRAMBLE = 19_937_563  # coprime to 10**8: n -> n * _SCRAMBLE mod 10**8 is a permutation of 8-digit codes
_UNSCRAMBLE = pow(_SCRAMBLE, -1, 10**8)


def generated_barcode(prefix: str, index: int, scrambled: bool = False) -> str:
    """The `index`-th generated barcode of `generate()`."""
    return f"{prefix}{index * _SCRAMBLE % 10**8 if scrambled else index:08d}"


def info(status: int, message: str) -> Response:
    """The spec's Info Message error shape."""
    return Response(status, {"info": {"message": message}})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _stamp(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts is not None else None


def blank_barcode(barcode_id: str) -> dict[str, Any]:
    """A barcode with every field of the spec's Barcode Object, at its example's defaults."""
    return {
        "barcode_id": barcode_id, "external_barcode_id": None, "batch_id": "CMORDER1", "ticket_type": "Regular Ticket",
        "ticket_type_hash_id": "00000000-0000-0000-0000-000000000001", "subtitle": None, "first_name": "John",
        "sur_name": "Doe", "city": None, "email": "john.doe@example.com", "mobile": "+31612345678", "serial_number": 1,
        "price": 10, "is_checkin_allowed": 1, "is_canceled": 0, "expire_from": None, "checkin_valid_from": None,
        "checkin_valid_till": None, "validation_max_checkins": 1, "remaining_scans": 1, "count_checked_in": 0,
        "last_checked_in_time": None, "last_checked_out_time": None, "section_id": None, "section": None,
        "row": None, "seat": None, "scan_status_code": None, "scan_status_message": None,
    }


class CMSimulator(Simulator):
    """State: one scan user, its services, their barcodes (time fields held as unix seconds)."""

    def __init__(self, *, username: str = "scanner", password: str = "letmein", token_ttl: float = 3600.0,
                 clock: Callable[[], float] = time.time, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.username, self.password = username, password
        self.user_uuid = str(uuid.uuid4())
        self.token_ttl = token_ttl
        self.clock = clock
        self._secret = os.urandom(32)
        self.revoked_before = 0.0  # tokens issued before this are refused (simulates expiry)
        self.logins = 0
        self.services: dict[str, dict[str, Any]] = {}
        self.barcodes: dict[str, dict[str, dict[str, Any]]] = {}  # service -> barcode_id -> row
        self.generated: dict[str, tuple[int, str, int, bool]] = {}  # service -> (count, prefix, updated, scrambled)
        self.updated: dict[tuple[str, str], int] = {}  # (service, barcode_id) -> unix time of last change
        self.uploads: list[dict[str, Any]] = []  # every upload record kept (duplicates dropped)
        self._upload_keys: set[tuple] = set()
        self.refuse_upload_of: set[str] = set()  # barcode ids whose upload answers 400 (fault tests)
        self.hold: Hold | None = None  # hold one page of Get Barcodes until released (tests)

    @property
    def api_url(self) -> str:
        return self.url + PREFIX

    # --- setup --------------------------------------------------------------------------------

    def add_service(self, name: str, service_uuid: str | None = None) -> str:
        service_uuid = service_uuid or str(uuid.uuid4())
        with self.lock:
            self.services[service_uuid] = {
                "uuid": service_uuid, "name": name, "description": f"scan service for: {name}", "setup": 2,
                "information_level": 1, "sync_interval": 120, "url": self.api_url + "/",
                "permissions": [{"uuid": str(uuid.uuid4()), "name": n, "description": f"can manually {n}"}
                                for n in ("checkin", "checkout", "lookup")],
                "ticket_types": [{"ticket_type_hash_id": "00000000-0000-0000-0000-000000000001",
                                  "ticket_type": "Regular Ticket", "total_available": 0}]}
            self.barcodes.setdefault(service_uuid, {})
        return service_uuid

    def add_barcode(self, service: str, barcode_id: str, **fields: Any) -> dict[str, Any]:
        """Add or change a barcode; time fields are unix seconds. Its change time is now."""
        with self.lock:
            row = self._row(service, barcode_id) or blank_barcode(barcode_id)
            unknown = set(fields) - set(row)
            if unknown:
                raise KeyError(f"not Barcode Object fields: {sorted(unknown)}")
            row.update(fields)
            self._touch(service, row)
            return row

    update_barcode = add_barcode

    def generate(self, service: str, count: int, prefix: str = "CM", *, scrambled: bool = False) -> None:
        """`count` valid single-entry barcodes PREFIX00000000 …, made on demand.

        `scrambled`: the n-th barcode is `generated_barcode(prefix, n, True)`, so pages come in no
        order of the codes, as a real ticket shop's do (codes are random, pages follow creation).
        """
        with self.lock:
            self.generated[service] = (count, prefix, int(self.clock()), scrambled)

    def barcode(self, service: str, barcode_id: str) -> dict[str, Any] | None:
        with self.lock:
            row = self._row(service, barcode_id)
            return dict(row) if row else None

    def expire_tokens(self) -> None:
        """Every token issued so far is refused from now on, as if it had expired."""
        with self.lock:
            self.revoked_before = self.clock() + 1e-6

    def _row(self, service: str, barcode_id: str) -> dict[str, Any] | None:
        rows = self.barcodes.get(service)
        if rows is None:
            return None
        if barcode_id in rows:
            return rows[barcode_id]
        if self._generated_index(service, barcode_id) is not None:
            rows[barcode_id] = blank_barcode(barcode_id)  # materialised on first touch
            return rows[barcode_id]
        return None

    def _generated_index(self, service: str, barcode_id: str) -> int | None:
        count, prefix, _, scrambled = self.generated.get(service, (0, "", 0, False))
        digits = barcode_id[len(prefix):]
        if not (count and barcode_id.startswith(prefix) and len(digits) == 8 and digits.isdigit()):
            return None
        index = int(digits) * _UNSCRAMBLE % 10**8 if scrambled else int(digits)
        return index if index < count else None

    def _touch(self, service: str, row: dict[str, Any]) -> None:
        self.barcodes.setdefault(service, {})[row["barcode_id"]] = row
        self.updated[(service, row["barcode_id"])] = int(self.clock())

    # --- authentication -----------------------------------------------------------------------

    def _token(self) -> str:
        now = self.clock()
        header = {"typ": "JWT", "alg": "HS512"}
        payload = {"iss": "https://cmtickets.com", "sub": self.user_uuid, "iat": now, "exp": now + self.token_ttl,
                   "user": {"uuid": self.user_uuid, "active": True}}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
        signature = hmac.new(self._secret, signing.encode(), hashlib.sha512).digest()
        return f"{signing}.{_b64(signature)}"

    def _claims(self, token: str) -> dict[str, Any] | None:
        try:
            head, body, sig = token.split(".")
            expected = hmac.new(self._secret, f"{head}.{body}".encode(), hashlib.sha512).digest()
            if not hmac.compare_digest(_b64(expected), sig):
                return None
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, TypeError):
            return None
        now = self.clock()
        if claims["exp"] <= now or claims["iat"] < self.revoked_before:
            return None
        return claims

    def _headers(self, req: Request) -> Response | None:
        """X-DEVICE-INFO and Content-Type, required on every endpoint."""
        device = req.headers.get("x-device-info", "")
        if not device or not _DEVICE.match(device) or not device.startswith("DEVICE_ID:"):
            return info(401, "Unauthorized: missing or malformed X-DEVICE-INFO header")
        if req.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return info(400, "Bad request: Content-Type must be application/json")
        return None

    def _auth(self, req: Request) -> tuple[dict[str, Any] | None, Response | None]:
        bad = self._headers(req)
        if bad:
            return None, bad
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None, info(401, "Unauthorized: no bearer token")
        with self.lock:
            claims = self._claims(token.strip())
        if claims is None:
            return None, info(401, "Unauthorized: token expired or invalid")
        return claims, None

    def _body(self, req: Request) -> tuple[dict[str, Any] | None, Response | None]:
        """The JSON body of a scan call, checked after the bearer token (whose user it must name)."""
        claims, bad = self._auth(req)
        if bad:
            return None, bad
        try:
            body = req.json()
        except ValueError:
            return None, info(400, "Bad request: body is not JSON")
        if not isinstance(body, dict):
            return None, info(400, "Bad request: body must be a JSON object")
        if body.get("user_uuid") != claims["sub"]:
            return None, info(400, "Bad request: user_uuid does not match the token")
        if body.get("service_uuid") not in self.services:
            return None, info(400, "Bad request: unknown service_uuid")
        return body, None

    # --- routes -------------------------------------------------------------------------------

    @route("POST", PREFIX + r"/userlogin")
    def login(self, req: Request) -> Response:
        bad = self._headers(req)
        if bad:
            return bad
        try:
            creds = req.json()["credentials"]
            username, password = creds["username"], creds["password"]
        except (ValueError, TypeError, KeyError):
            return info(401, "Unauthorized: credentials missing")
        if not (isinstance(username, str) and isinstance(password, str)
                and hmac.compare_digest(username.encode(), self.username.encode())
                and hmac.compare_digest(password.encode(), self.password.encode())):
            return info(401, "Unauthorized: invalid username or password")
        with self.lock:
            self.logins += 1
            token = self._token()
        return Response(200, {"login": {"message": "Successfully authenticated", "token": token}})

    @route("GET", PREFIX + r"/users/(?P<user>[^/]+)/services")
    def services_of(self, req: Request) -> Response:
        claims, bad = self._auth(req)
        if bad:
            return bad
        if req.params["user"] != claims["sub"]:
            return info(401, "Unauthorized: not this scan user's services")
        with self.lock:
            out = []
            for s in self.services.values():
                count = len(self.barcodes.get(s["uuid"], {})) + self.generated.get(s["uuid"], (0,))[0]
                out.append({**s, "count_total_available": count})
        return Response(200, {"services": out})

    @route("GET", PREFIX + r"/services/(?P<service>[^/]+)/barcodes")
    def get_barcodes(self, req: Request) -> Response:
        _, bad = self._auth(req)
        if bad:
            return bad
        service = req.params["service"]
        try:
            limit = int(req.headers["x-pagination-limit"])
            page = int(req.headers["x-pagination-page"])
            compare = req.headers.get("x-compare-timestamp")
            compare = int(compare) if compare is not None else None
        except (KeyError, ValueError):
            return info(400, "Bad request: X-PAGINATION-LIMIT and X-PAGINATION-PAGE must be integers, "
                             "X-COMPARE-TIMESTAMP a unix timestamp")
        if not 1 <= limit <= 500 or page < 1:
            return info(400, "Bad request: X-PAGINATION-LIMIT must be 1 to 500, X-PAGINATION-PAGE at least 1")
        hold = self.hold
        if hold is not None and hold.page == page:
            hold.reached.set()
            hold.release.wait(30)
        with self.lock:
            if service not in self.services:
                return info(401, "Unauthorized: not this scan user's service")
            count, prefix, gen_updated, scrambled = self.generated.get(service, (0, "", 0, False))
            gen = count if compare is None or gen_updated >= compare else 0
            extras = sorted(b for b in self.barcodes[service]
                            if (self._generated_index(service, b) is None or not gen)
                            and (compare is None or self.updated.get((service, b), 0) >= compare))
            total = gen + len(extras)
            pages = max(1, -(-total // limit))
            start = (page - 1) * limit
            rows = []
            for i in range(start, min(total, start + limit)):
                barcode_id = generated_barcode(prefix, i, scrambled) if i < gen else extras[i - gen]
                row = self.barcodes[service].get(barcode_id) or blank_barcode(barcode_id)
                rows.append(self._public(row))
        return Response(200, {
            "pagination": {"total_items": total, "total_pages": pages, "page_items": len(rows), "pages": {
                "current_page": page, "first_page": 1, "last_page": pages,
                "previous_page": page - 1 if page > 1 else None, "next_page": page + 1 if page < pages else None}},
            "barcodes": rows})

    @route("POST", PREFIX + r"/barcodes/checkin")
    def checkin(self, req: Request) -> Response:
        return self._scan(req, self._check_in)

    @route("POST", PREFIX + r"/barcodes/checkout")
    def checkout(self, req: Request) -> Response:
        return self._scan(req, self._check_out)

    def _scan(self, req: Request, rule: Callable[[str, str], tuple[int, dict[str, Any]]]) -> Response:
        body, bad = self._body(req)
        if bad:
            return bad
        barcode_id = body.get("barcode_id")
        if not isinstance(barcode_id, str) or not barcode_id:
            return info(400, "Bad request: barcode_id missing")
        with self.lock:
            code, row = rule(body["service_uuid"], barcode_id)
            out = self._public(row)
        out["scan_status_code"], out["scan_status_message"] = code, self._message(code, row)
        return Response(201, {"barcodes": [out]})

    def _check_in(self, service: str, barcode_id: str) -> tuple[int, dict[str, Any]]:
        row = self._row(service, barcode_id)
        if row is None:
            return 40, {"barcode_id": barcode_id}
        now = self.clock()
        if row["is_canceled"] or not row["is_checkin_allowed"]:
            return 45, row
        for name, ended in (("expire_from", lambda t: now >= t), ("checkin_valid_till", lambda t: now > t)):
            if row[name] is not None and ended(row[name]):
                return 60, {**row, "_expire_time": row[name]}
        if row["checkin_valid_from"] is not None and now < row["checkin_valid_from"]:
            return 45, row
        if self._remaining(row) is not None and self._remaining(row) <= 0:
            return 50, row
        self._count_in(service, row, now)
        return 100, row

    def _check_out(self, service: str, barcode_id: str) -> tuple[int, dict[str, Any]]:
        row = self._row(service, barcode_id)
        if row is None:
            return 230, {"barcode_id": barcode_id}
        if not row["count_checked_in"]:
            return 220, row
        last_in, last_out = row["last_checked_in_time"], row["last_checked_out_time"]
        if last_out is not None and (last_in is None or last_out >= last_in):
            return 210, row
        row["last_checked_out_time"] = self.clock()
        self._touch(service, row)
        return 200, row

    @staticmethod
    def _remaining(row: dict[str, Any]) -> int | None:
        if row["remaining_scans"] is not None:
            return row["remaining_scans"]
        limit = row["validation_max_checkins"]
        return limit - row["count_checked_in"] if limit else None

    def _count_in(self, service: str, row: dict[str, Any], at: float) -> None:
        row["count_checked_in"] += 1
        if row["remaining_scans"] is not None:
            row["remaining_scans"] -= 1
        last = row["last_checked_in_time"]
        row["last_checked_in_time"] = at if last is None else max(last, at)
        self._touch(service, row)

    @route("POST", PREFIX + r"/barcodes/upload")
    def upload(self, req: Request) -> Response:
        body, bad = self._body(req)
        if bad:
            return bad
        records = body.get("barcodes")
        if not isinstance(records, list) or not records:
            return info(400, "Bad request: barcodes must be a non-empty list")
        for i, r in enumerate(records):
            problem = self._record_problem(r)
            if problem:
                return info(400, f"Bad request: barcodes[{i}]: {problem}")
        service = body["service_uuid"]
        with self.lock:
            for r in records:
                key = (service, r["barcode_id"], r["checked_in_time"], r["status_code"])
                if key in self._upload_keys:
                    continue  # the same scan sent again (a retry after a lost answer)
                self._upload_keys.add(key)
                self.uploads.append({**r, "service_uuid": service})
                row = self._row(service, r["barcode_id"])
                if row is None:
                    continue
                if r["status_code"] == 100:
                    self._count_in(service, row, r["checked_in_time"])
                elif r["status_code"] == 200:
                    last = row["last_checked_out_time"]
                    row["last_checked_out_time"] = max(last or 0, r["checked_in_time"])
                    self._touch(service, row)
        return Response(201, {"info": {"message": "Barcodes Inserted successfully."}})

    def _record_problem(self, r: Any) -> str | None:
        if not isinstance(r, dict):
            return "must be an object"
        if not isinstance(r.get("barcode_id"), str) or not r["barcode_id"]:
            return "barcode_id missing"
        if r["barcode_id"] in self.refuse_upload_of:
            return "barcode refused"
        t = r.get("checked_in_time")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            return "checked_in_time must be a unix timestamp (integer)"
        if r.get("status_code") not in MESSAGES:
            return f"status_code must be one of {sorted(MESSAGES)}"
        if not isinstance(r.get("status_message"), str):
            return "status_message missing"
        return None

    # --- output -------------------------------------------------------------------------------

    def _message(self, code: int, row: dict[str, Any]) -> str:
        return MESSAGES[code].format(last_checked_in_time=_stamp(row.get("last_checked_in_time")),
                                     expire_time=_stamp(row.get("_expire_time")))

    @staticmethod
    def _public(row: dict[str, Any]) -> dict[str, Any]:
        if set(row) == {"barcode_id"}:  # unknown barcode: nothing to tell but the code itself
            return {**{k: None for k in blank_barcode("")}, "barcode_id": row["barcode_id"]}
        out = {k: v for k, v in row.items() if not k.startswith("_")}
        for name in TIME_FIELDS:
            out[name] = _stamp(out[name])
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gated.simulators.cm", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port (printed)")
    parser.add_argument("--barcodes", type=int, default=1000, help="generated barcodes CM00000000 …")
    parser.add_argument("--scrambled", action="store_true", help="barcodes in no order (see generate())")
    parser.add_argument("--username", default="scanner")
    parser.add_argument("--password", default="letmein")
    parser.add_argument("--service-name", default="Main Entrance")
    parser.add_argument("--token-ttl", type=float, default=3600.0, help="JWT lifetime in seconds")
    args = parser.parse_args(argv)
    sim = CMSimulator(username=args.username, password=args.password, token_ttl=args.token_ttl,
                      host=args.host, port=args.port)
    service = sim.add_service(args.service_name)
    sim.generate(service, args.barcodes, scrambled=args.scrambled)
    sim.start()
    print(f"{sim.api_url} user {args.username!r} service {args.service_name!r} ({service}), "
          f"{args.barcodes} barcodes CM00000000..", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
