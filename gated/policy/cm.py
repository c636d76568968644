"""Decide with CM.com's Ticket Scan API: check in/out online ("scan direct") or from the downloaded barcodes.

Both strategies keep the service's barcode list in a list file beside the store: `direct` asks the
API per scan and falls back to the list when it does not answer; `local` ("scan locally" in CM.com's
words) always decides from the list, and every scan decided from it is uploaded afterwards with Post
Upload.

The list is downloaded in full (X-PAGINATION-LIMIT/PAGE) and then as deltas (X-COMPARE-TIMESTAMP = the
integer start time of the previous sync). Each stored barcode keeps the server's `count_checked_in`
and the time its page was fetched; a decision adds the local check-ins that the server had not
counted at that time (made later, or still waiting for upload), so a delta never erases them.

Long because the session, the online check-in, the list sync and the upload all run on one login
and one service's list; the pure rules (statuses, rows, service choice) sit apart at the top.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import hashlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from gated import device, reload
from gated.config import Config
from gated.errors import BackendRejected, ConfigError, GatedError, Unreachable
from gated.model import Decision, Reason, Scan, ScanMode, Source, Verdict
from gated.policy.answer import INT64_MAX, INT64_MIN, cut, integer, jwt_claims, text
from gated.policy.base import Backend, UploadResult
from gated.policy.http import (
    LIST_PAGE_LIMIT,
    HttpBackend,
    api_message,
    error_text,
    json_answer,
    json_body,
    make_client,
    parse_json,
    request,
)
from gated.schema import Key
from gated.secrets import read_secret
from gated.store import Store, StoreThread
from gated.timeparse import parse_time
from gated.tokens import redact, token_hash

log = logging.getLogger(__name__)

SCHEMA = {
    "username": Key("str", help="the CM.com scan user's name"),
    "password_file": Key("secret", help="a file holding the scan user's password (owner-only, chmod 600)"),
    "device_info": Key("str", default="",
                       help="the X-DEVICE-INFO value from CM.com; default built from [lane] serial and the system"),
    "service_uuid": Key("str", default="", help="the scan service to use, by uuid"),
    "service_name": Key("str", default="", help="the scan service to use, by name"),
    "strategy": Key("str", default="direct", choices=("direct", "local"),
                    help='"direct": ask the API per scan; "local": decide from the downloaded barcodes, upload later'),
    "page_size": Key("int", default=500, minimum=1, maximum=500, help="barcodes per download page"),
}

# The API's scan status codes and messages, verbatim from the spec; {x} parts are filled in.
# gated/simulators/cm.py keeps its own copy on purpose: the simulator stands for CM.com, so a wrong
# edit here must show up as a difference in the tests, not be shared by both sides.
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
REASONS = {40: Reason.UNKNOWN, 45: Reason.PRODUCT_NOT_ALLOWED, 50: Reason.ALREADY_USED, 60: Reason.EXPIRED,
           100: Reason.OK, 200: Reason.OK, 210: Reason.ALREADY_USED, 220: Reason.NOT_CHECKED_IN,
           230: Reason.UNKNOWN}
ADMIT_CODES = {100, 200}
CHECKOUT_CODES = {200, 210, 220, 230}

UNLIMITED = 1_000_000  # max_entries for a barcode without a check-in limit
MAX_BARCODE = 4096  # no scan is longer (the gate refuses longer input as malformed)
RENEW_MARGIN = 60.0  # renew the JWT this long before it expires (a quarter of a shorter life), not on a 401
FULL_RELOAD_SECONDS = 6 * 3600.0  # deltas never tell of barcodes removed from a service
EARLIEST_TRUSTED = 1704067200.0  # a clock before 2024 never synced: no delta from its timestamps
SLOW = httpx.Timeout(30.0, connect=5.0)  # login, pages, uploads: off the scan path
MARK_WAIT_SECONDS = 5.0
# How far CM.com's check-in time of an online request may be from the scan's own time and still be
# that request: the deadline, the server's queue, and the two clocks' difference.
LOST_ANSWER_WINDOW = 60.0
LOST_ANSWER_PAGES = 20  # at most this many pages of changes are read for that check
JWT_KEY, SERVICE_KEY, SYNC_KEY = "cm:jwt", "cm:service", "cm:sync"


# --- pure helpers ---------------------------------------------------------------------------

def scan_user(claims: dict[str, Any]) -> str | None:
    """The scan user's uuid: `sub`, or `user.uuid` (the spec allows either)."""
    user = claims.get("user")
    for value in (claims.get("sub"), user.get("uuid") if isinstance(user, dict) else None):
        if isinstance(value, str) and value:
            return value
    return None


def default_device_info(serial: str) -> str:
    """X-DEVICE-INFO in CM.com's shape: DEVICE_ID:…,MANUFACTURER:…,MODEL:…,OS:…,OS_VERSION:…"""
    manufacturer, model = device.hardware()
    fields = {"DEVICE_ID": serial, "MANUFACTURER": manufacturer, "MODEL": model,
              "OS": platform.system() or "Linux", "OS_VERSION": device.os_version() or platform.release()}
    return ",".join(f"{k}:{_header_safe(v)}" for k, v in fields.items())


def _header_safe(value: str) -> str:
    # "," and ":" separate the fields; HTTP headers carry ASCII only.
    text = "".join(c if 32 <= ord(c) < 127 and c not in ",:" else " " for c in str(value))
    return " ".join(text.split()) or "unknown"


def _utc(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts is not None else "unknown"


def _info_words(body: Any) -> str | None:
    """The text of CM.com's Info Message ({"info": {"message": …}}), the shape of its refusals."""
    info = body.get("info") if isinstance(body, dict) else None
    return info.get("message") if isinstance(info, dict) else None


def _info(response: httpx.Response) -> str:
    """Why CM.com refused a call: its Info Message, else the HTTP reason phrase."""
    return error_text(response, _info_words)


@dataclass(frozen=True)
class Barcode:
    """What the store keeps of one barcode for offline decisions (no names, e-mail or phone)."""

    barcode_id: str
    allowed: bool
    canceled: bool
    expire_from: float | None
    valid_from: float | None
    valid_till: float | None
    max_checkins: int | None  # None: no limit
    remaining: int | None
    count: int  # check-ins the server had counted when the row was fetched
    last_in: float | None
    last_out: float | None
    fetched: float  # when the page holding this row was requested
    bad: bool = False  # a time field could not be read: deny rather than guess


@dataclass(frozen=True)
class Local:
    """This lane's admissions of a barcode that the server had not counted when its row was fetched."""

    entries: int = 0
    last_in: float | None = None
    last_out: float | None = None


def ticket_rows(raw: dict[str, Any], service: str, fetched: float) -> list[dict[str, Any]]:
    """Store rows for one API barcode: one per code that may be scanned (barcode_id, external id)."""
    barcode = raw.get("barcode_id")
    if not isinstance(barcode, str) or not barcode or len(barcode) > MAX_BARCODE:
        return []  # no scan can ever match it
    bad = False

    def when(name: str) -> float | None:
        nonlocal bad
        try:
            return parse_time(raw.get(name))
        except (ValueError, TypeError):
            bad = True
            return None

    absurd = False

    def number(name: str) -> int | None:
        nonlocal absurd
        value = raw.get(name)
        try:
            n = None if value is None or value == "" else int(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if not (n is None or INT64_MIN <= n <= INT64_MAX):
            absurd = True
        return n

    max_checkins = number("validation_max_checkins") or None  # 0 or null: no limit
    data = {
        "allowed": bool(number("is_checkin_allowed") if raw.get("is_checkin_allowed") is not None else 1),
        "canceled": bool(number("is_canceled") or 0),
        "expire_from": when("expire_from"), "max": max_checkins, "remaining": number("remaining_scans"),
        "count": number("count_checked_in") or 0, "last_in": when("last_checked_in_time"),
        "last_out": when("last_checked_out_time"), "fetched": fetched,
    }
    if absurd:
        # A count beyond SQLite's range is no real barcode's: the row is skipped, so a delta keeps
        # the row held before, and in a full list the code is unknown (denied).
        return []
    valid_from, valid_till = when("checkin_valid_from"), when("checkin_valid_till")
    data["bad"] = bad
    status = "bad_data" if bad else "canceled" if data["canceled"] else "ok" if data["allowed"] else "not_allowed"
    # A lone surrogate in a name was replaced when the page was parsed (parse_json): the row is kept.
    ticket_type = raw.get("ticket_type")
    row = {"token": barcode, "ticket_key": barcode, "name": cut(ticket_type) if isinstance(ticket_type, str) else None,
           "valid_from": valid_from, "valid_until": valid_till, "status": status,
           "max_entries": max_checkins or UNLIMITED, "event_id": service, "data": json.dumps(data)}
    rows = [row]
    external = raw.get("external_barcode_id")
    if isinstance(external, str) and external and external != barcode and len(external) <= MAX_BARCODE:
        rows.append({**row, "token": external})  # same ticket_key: one ticket, two codes
    return rows


def barcode_from(ticket: dict[str, Any]) -> Barcode:
    d = json.loads(ticket["data"])
    return Barcode(ticket["ticket_key"], d["allowed"], d["canceled"], d["expire_from"], ticket["valid_from"],
                   ticket["valid_until"], d["max"], d["remaining"], d["count"], d["last_in"], d["last_out"],
                   d["fetched"], d.get("bad", False))


def checkin_status(b: Barcode, local: Local, now: float, clock_trusted: bool) -> tuple[int, Reason, str]:
    """The status the server would give a check-in now, from the barcode's fields and local check-ins.

    The spec has no code of its own for a canceled barcode or one not valid yet: both get 45 ("not
    allowed"), with the precise Reason beside it.
    """
    if b.bad:
        return 45, Reason.REJECTED, MESSAGES[45]
    if b.canceled:
        return 45, Reason.CANCELED, MESSAGES[45]
    if not b.allowed:
        return 45, Reason.PRODUCT_NOT_ALLOWED, MESSAGES[45]
    if clock_trusted:  # an unsynced clock would expire every ticket: skip windows, as the Decider says
        for ends, passed in ((b.expire_from, lambda t: now >= t), (b.valid_till, lambda t: now > t)):
            if ends is not None and passed(ends):
                return 60, Reason.EXPIRED, MESSAGES[60].format(expire_time=_utc(ends))
        if b.valid_from is not None and now < b.valid_from:
            return 45, Reason.NOT_YET_VALID, MESSAGES[45]
    left = None
    if b.max_checkins is not None:
        left = b.max_checkins - b.count - local.entries
    if b.remaining is not None:
        left = min(left, b.remaining - local.entries) if left is not None else b.remaining - local.entries
    if left is not None and left <= 0:
        last = max((t for t in (b.last_in, local.last_in) if t is not None), default=None)
        return 50, Reason.ALREADY_USED, MESSAGES[50].format(last_checked_in_time=_utc(last))
    return 100, Reason.OK, MESSAGES[100]


def checkout_status(b: Barcode, local: Local) -> tuple[int, Reason, str]:
    """The status the server would give a check-out now (a check-out does not give a check-in back)."""
    if b.count + local.entries <= 0:
        return 220, Reason.NOT_CHECKED_IN, MESSAGES[220]
    last_in = max((t for t in (b.last_in, local.last_in) if t is not None), default=None)
    last_out = max((t for t in (b.last_out, local.last_out) if t is not None), default=None)
    if last_out is not None and (last_in is None or last_out >= last_in):
        return 210, Reason.ALREADY_USED, MESSAGES[210]
    return 200, Reason.OK, MESSAGES[200]


def uncounted(store: Store, barcode: str, fetched: float) -> Local:
    """Admissions of this barcode that the server's row (fetched at `fetched`) does not include.

    Online check-ins reached the server when they were made; offline ones when their upload was
    confirmed. Uploads are paused while a sync downloads, so "confirmed before the page was
    requested" is exactly "counted in it". Admissions shared by other lanes (no scan row here) count
    from the time they were made.
    """
    rows = store.db.conn.execute(
        "SELECT a.direction, a.wall, s.source, s.upload, s.uploaded_at FROM admissions a "
        "LEFT JOIN scans s ON s.nonce = a.nonce WHERE a.key_hash = ?", (token_hash(barcode),)).fetchall()
    entries, last_in, last_out = 0, None, None
    for direction, wall, source, upload, uploaded_at in rows:
        if source == "offline":
            counted = upload == "sent" and uploaded_at is not None and uploaded_at < fetched
        else:
            counted = wall < fetched
        if counted:
            continue
        if direction == "entry":
            entries += 1
            last_in = wall if last_in is None else max(last_in, wall)
        else:
            last_out = wall if last_out is None else max(last_out, wall)
    return Local(entries, last_in, last_out)


def upload_status(row: dict[str, Any]) -> tuple[int, str]:
    """(status_code, status_message) for Post Upload from a recorded scan.

    A scan decided by gated's own policy rather than the barcode rules (anti-passback across lanes,
    the `[offline] fallback`) keeps the API vocabulary by taking the nearest code.
    """
    entry = row["scan_mode"] == "entry"
    admitted = row["verdict"] == "admit"
    try:
        code = int(row["backend_code"])
    except (TypeError, ValueError):
        code = None
    if code in MESSAGES and (code in ADMIT_CODES) == admitted and (code in CHECKOUT_CODES) != entry:
        return code, row["message"] or MESSAGES[code].format(last_checked_in_time="unknown", expire_time="unknown")
    if admitted:
        code = 100 if entry else 200
    elif entry:
        code = {"already_used": 50, "expired": 60, "unknown": 40}.get(row["reason"], 45)
    else:
        code = {"already_used": 210, "not_checked_in": 220}.get(row["reason"], 230)
    return code, MESSAGES[code].format(last_checked_in_time="unknown", expire_time="unknown")


def choose_service(services: list[dict[str, Any]], uuid: str, name: str, username: str,
                   path: str = "") -> dict[str, Any]:
    """The configured scan service, or ConfigError naming the key and listing what the user has."""
    usable = [s for s in services if isinstance(s, dict) and isinstance(s.get("uuid"), str)]
    listing = ", ".join(f'"{s.get("name", "")}" (uuid {s["uuid"]})' for s in usable) or "none"
    found = [s for s in usable if (not uuid or s["uuid"] == uuid) and (not name or s.get("name") == name)]
    if (uuid or name) and len(found) == 1:
        return found[0]
    if not uuid and not name and len(usable) == 1:
        return usable[0]
    if uuid or name:
        key = " and ".join(f"{k} = \"{v}\"" for k, v in (("service_uuid", uuid), ("service_name", name)) if v)
        what = "several scan services match" if found else "no such scan service"
        problem = f"[backend.cm] {key}: {what} for CM.com scan user \"{username}\". Available: {listing}."
    elif usable:
        problem = (f"[backend.cm] service_uuid: missing; CM.com scan user \"{username}\" has {len(usable)} scan "
                   f"services, name one with service_uuid or service_name. Available: {listing}.")
    else:
        problem = (f"[backend.cm] CM.com scan user \"{username}\" has no scan service; ask the event's "
                   "organiser to add the user to one.")
    raise ConfigError(path or "[backend.cm]", [problem])


# --- the backend ----------------------------------------------------------------------------

class CMBackend(HttpBackend):
    name = "cm"

    def __init__(self, config: Config):
        super().__init__(config)
        o = self.options
        self.username: str = o.username
        self.strategy: str = o.strategy
        # "Scan locally": the Decider decides every scan offline, and since the backend is online
        # the pipeline queues each of them for Post Upload.
        self.offline_first = self.strategy == "local"
        self.page_size: int = o.page_size
        self.want_uuid: str = o.service_uuid
        self.want_name: str = o.service_name
        self.device_info: str = o.device_info or default_device_info(config.lane.serial)
        self.who = f"{config.backend.url}|{self.username}"
        self.jwt: str | None = None
        self.jwt_renew_at = 0.0  # local clock: when to log in again before using the token
        self.user_uuid: str | None = None
        self.service_uuid: str | None = None
        self.service_name = ""
        self._password: str | None = None
        self._resolved = False
        self._auth_lock = asyncio.Lock()
        self._upload_lock = asyncio.Lock()  # uploads pause while a sync downloads (see uncounted())
        self._unmarked: set[str] = set()  # the last upload's nonces, until the Uploader marked them sent
        self._store: StoreThread | None = None
        self._tasks: set[asyncio.Task] = set()
        self._auth_failed = False
        self.last_reload: dict[str, Any] = {}  # the last full reload's result (benchmarks read its peak RSS)

    @property
    def client(self) -> httpx.AsyncClient:
        """HttpBackend's lazily made client, with the headers CM.com requires on every request."""
        if self._client is None:
            self._client = make_client(self.config, headers={"X-DEVICE-INFO": self.device_info,
                                                             "Content-Type": "application/json",
                                                             "Accept": "application/json"})
        return self._client

    def describe(self) -> str:
        service = f'service "{self.service_name}"' if self.service_name else "service not chosen yet"
        way = "scan direct" if self.strategy == "direct" else "scan locally"
        return f"cm ({self.username}, {service}, {way})"

    # --- session ----------------------------------------------------------------------------

    async def start(self, store: StoreThread) -> None:
        """Read the password, reuse a stored JWT and service, log in and pick the service.

        Raises ConfigError (password file, service missing), BackendRejected (login refused) or
        Unreachable (the gate then starts offline with what the store holds).
        """
        self._store = store
        self._password = read_secret(self.options.password_file, "[backend.cm] password_file")
        # A session belongs to the API, the user and the password it was made with: a changed
        # password logs in afresh at start, so a wrong one is found now, not at the token's expiry.
        digest = hashlib.sha256(f"gated-cm|{self.who}|{self._password}".encode()).hexdigest()[:16]
        self.who = f"{self.who}|{digest}"
        saved_jwt, saved_service = await store.call(_load_session, self.who, self._service_key())
        if saved_jwt and saved_jwt["renew_at"] > time.time():
            self.jwt, self.jwt_renew_at, self.user_uuid = saved_jwt["token"], saved_jwt["renew_at"], saved_jwt["user"]
        if saved_service:
            self.service_uuid, self.service_name = saved_service["uuid"], saved_service["name"]
        try:
            await self._ready()
        except BackendRejected as e:  # the installer's to fix, like any config problem: nothing starts
            raise ConfigError(self.config.path, [f"[backend.cm] username, password_file: {e}"]) from None
        log.info("CM.com scan user %s logged in; scan service \"%s\" (%s), %s", self.username, self.service_name,
                 self.service_uuid, "scan direct" if self.strategy == "direct" else "scan locally",
                 extra={"GATED_EVENT": "backend_ready", "GATED_BACKEND": self.name})

    async def ticket_count(self) -> int | None:
        """The scan service's `count_total_available`, as CM.com lists the user's services."""
        await self._ready()
        response = await self._call("GET", lambda: f"users/{self.user_uuid}/services", timeout=SLOW,
                                    limit=LIST_PAGE_LIMIT)
        body = await json_answer(response)
        services = body.get("services") if isinstance(body, dict) else None
        for s in services if response.status_code == 200 and isinstance(services, list) else ():
            if not isinstance(s, dict) or s.get("uuid") != self.service_uuid:
                continue
            count = s.get("count_total_available")
            return count if isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**62 else None
        return None

    def offline_count(self, store: Store) -> int | None:
        return store.ticket_count(self.name)

    def _service_key(self) -> str:
        return f"{self.who}|{self.want_uuid}|{self.want_name}"

    async def _ready(self) -> None:
        """Logged in and the service chosen (again after a start that found the API unreachable)."""
        if self._resolved:
            return
        if self._password is None:
            self._password = read_secret(self.options.password_file, "[backend.cm] password_file")
        response = await self._call("GET", lambda: f"users/{self.user_uuid}/services", timeout=SLOW,
                                    limit=LIST_PAGE_LIMIT)
        if response.status_code != 200:
            raise Unreachable(f"scan services answered HTTP {response.status_code}")
        body = await json_answer(response)
        services = body.get("services") if isinstance(body, dict) else None
        chosen = choose_service(services if isinstance(services, list) else [], self.want_uuid, self.want_name,
                                self.username, self.config.path)
        self.service_uuid, self.service_name = chosen["uuid"], str(chosen.get("name") or "")
        self._resolved = True
        if self._auth_failed:
            self._auth_failed = False
            log.info("CM.com usable again: scan service \"%s\"", self.service_name,
                     extra={"GATED_EVENT": "backend_ready", "GATED_BACKEND": self.name})
        self._persist(SERVICE_KEY, {"key": self._service_key(), "uuid": self.service_uuid,
                                    "name": self.service_name})
        if self.strategy == "direct" and self.config.lane.scan_mode == "exit":
            names = {p.get("name") for p in chosen.get("permissions") or [] if isinstance(p, dict)}
            if names and "checkout" not in names:
                log.warning("scan service \"%s\" gives no checkout permission, but this lane checks out",
                            self.service_name, extra={"GATED_EVENT": "backend_config"})

    async def _login(self, stale: str | None) -> None:
        async with self._auth_lock:
            if self.jwt and self.jwt != stale and self.jwt_renew_at > time.time():
                return  # renewed by another request meanwhile
            if self._password is None:  # the reload process reads it only when its token runs out
                self._password = read_secret(self.options.password_file, "[backend.cm] password_file")
            response = await request(self.client, "POST", "userlogin", timeout=SLOW, json={
                "credentials": {"username": self.username, "password": self._password}})
            if response.status_code in (400, 401, 403):
                raise BackendRejected(f"CM.com refused the login of scan user \"{self.username}\" "
                                      f"({_info(response)}); check the user name and the password in the file")
            if response.status_code != 200:
                raise Unreachable(f"login answered HTTP {response.status_code}")
            body = json_body(response)
            login = body.get("login") if isinstance(body, dict) else None
            token = login.get("token") if isinstance(login, dict) else None
            if not isinstance(token, str) or not token:
                raise Unreachable("login answered without a token")
            claims = jwt_claims(token)
            if claims is None:
                raise Unreachable("login answered with a token that is not a JWT with claims")
            user = scan_user(claims)
            if user is None:
                raise Unreachable("the login token names no scan user (neither sub nor user.uuid)")
            now = time.time()
            exp, iat = claims.get("exp"), claims.get("iat")
            # Lifetime measured from issue time, so a Pi clock that is off does not renew every call.
            if isinstance(exp, (int, float)) and isinstance(iat, (int, float)) and exp > iat:
                life = exp - iat
            elif isinstance(exp, (int, float)) and exp > now:
                life = exp - now
            else:
                life = 86400.0  # no usable expiry: a day, and a 401 renews it sooner
            renew_at = now + life - min(RENEW_MARGIN, life / 4)
            self.jwt, self.jwt_renew_at, self.user_uuid = token, renew_at, user
            self._persist(JWT_KEY, {"who": self.who, "token": token, "user": user, "renew_at": renew_at})

    async def _call(self, method: str, path: Any, *, headers: dict[str, str] | None = None,
                    **kwargs: Any) -> httpx.Response:
        """An authenticated request; a 401 renews the JWT once, a second 401 is BackendRejected."""
        for attempt in range(2):
            if self.jwt is None or self.jwt_renew_at <= time.time():
                await self._login(stale=self.jwt)
            token = self.jwt
            url = path() if callable(path) else path
            response = await request(self.client, method, url,
                                     headers={**(headers or {}), "Authorization": f"bearer {token}"}, **kwargs)
            if response.status_code != 401:
                return response
            if attempt == 0:
                await self._login(stale=token)
        self._resolved = False  # refused with a fresh token: the service itself may be gone; look again
        raise BackendRejected(f"CM.com answered 401 to a fresh login ({_info(response)})")

    def _persist(self, key: str, value: dict[str, Any]) -> None:
        """Write session state to the store in the background: never a commit on a visitor's scan."""
        if self._store is None:
            return
        task = asyncio.get_running_loop().create_task(self._store.call(Store.set, key, json.dumps(value)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refused(self, error: GatedError) -> Unreachable:
        """Credentials or service refused while gated runs: decide offline, say it once at ERROR."""
        if not self._auth_failed:
            self._auth_failed = True
            log.error("CM.com not usable, deciding offline: %s", error, extra={"GATED_EVENT": "backend_refused"})
        else:
            log.debug("CM.com still not usable: %s", error)
        text = "; ".join(error.problems) if isinstance(error, ConfigError) else str(error)
        return Unreachable(f"refused: {text}")

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await super().close()

    # --- scan direct --------------------------------------------------------------------------

    async def validate(self, scan: Scan, scan_mode: ScanMode) -> Decision:
        try:
            await self._ready()
            path = "barcodes/checkin" if scan_mode is ScanMode.ENTRY else "barcodes/checkout"
            response = await self._call("POST", path, json={
                "user_uuid": self.user_uuid, "service_uuid": self.service_uuid, "barcode_id": scan.token})
        except (BackendRejected, ConfigError) as e:
            raise self._refused(e) from None
        if response.status_code == 400:
            # A definite answer, in CM.com's Info Message shape: the API refuses this request. Final,
            # like any deny it gives. Any other 400 (a proxy's page) says nothing about the ticket.
            message = api_message(response, _info_words)
            if message is None:
                raise Unreachable("check-in answered HTTP 400 without CM.com's Info Message")
            return Decision(Verdict.DENY, Reason.REJECTED, Source.ONLINE, backend=self.name,
                            backend_code="400", message=message, event_id=self.service_uuid)
        if response.status_code not in (200, 201):
            raise Unreachable(f"check-in answered HTTP {response.status_code}")
        body = json_body(response)
        barcodes = body.get("barcodes") if isinstance(body, dict) else None
        first = barcodes[0] if isinstance(barcodes, list) and barcodes and isinstance(barcodes[0], dict) else None
        if first is None:
            raise Unreachable("check-in answered without a barcode")
        # Every field used is checked here: a wrong type means this is not CM.com's answer.
        code = integer(first.get("scan_status_code"), "scan_status_code", low=0, high=999)
        if code is None:
            raise Unreachable("check-in answered without a scan status")
        message = text(first.get("scan_status_message"), "scan_status_message") or MESSAGES.get(code, "")
        if code in REASONS:
            verdict = Verdict.ADMIT if code in ADMIT_CODES else Verdict.DENY
            reason = REASONS[code]
        else:  # a code newer than the spec: the message says which way it went
            verdict = Verdict.ADMIT if message.startswith("ADMIT") else Verdict.DENY
            reason = Reason.OK if verdict is Verdict.ADMIT else Reason.REJECTED
        barcode = text(first.get("barcode_id"), "barcode_id", limit=MAX_BARCODE) or scan.token
        max_entries = integer(first.get("validation_max_checkins"), "validation_max_checkins", low=0) or UNLIMITED
        return Decision(verdict, reason, Source.ONLINE, backend=self.name, message=message,
                        backend_code=str(code), ticket_key=barcode, event_id=self.service_uuid,
                        max_entries=min(max_entries, UNLIMITED))

    async def probe(self) -> None:
        """The cheapest authenticated call: the user's scan services."""
        try:
            self._resolved = False
            await self._ready()
        except (BackendRejected, ConfigError) as e:
            raise self._refused(e) from None

    async def not_passed(self, row: dict[str, Any]) -> None:
        """Nobody passed: check the ticket out on the server if the check-in reached it already.

        An offline check-in still queued needs nothing now: its upload carries a check-out record.
        """
        if row["verdict"] != "admit" or row["scan_mode"] != "entry":
            return
        if row["source"] == "offline" and row["upload"] != "sent" or row["source"] not in ("online", "offline"):
            return
        barcode = row["ticket_key"] or row["token"]
        try:
            await self._ready()
            response = await self._call("POST", "barcodes/checkout", timeout=SLOW, json={
                "user_uuid": self.user_uuid, "service_uuid": self.service_uuid, "barcode_id": barcode})
        except (BackendRejected, ConfigError) as e:
            raise self._refused(e) from None
        if response.status_code not in (200, 201):
            raise BackendRejected(f"check-out answered HTTP {response.status_code} ({_info(response)})")
        body = json_body(response)
        barcodes = body.get("barcodes") if isinstance(body, dict) else None
        first = barcodes[0] if isinstance(barcodes, list) and barcodes else None
        code = first.get("scan_status_code") if isinstance(first, dict) else None
        log.info("check-in of %s annulled with a check-out (status %s)", redact(barcode), code,
                 extra={"GATED_EVENT": "annul", "GATED_BACKEND_CODE": str(code)})

    # --- scan locally -------------------------------------------------------------------------

    def data_age(self, store: Store, now: float) -> float | None:
        state = _json(store.get(SYNC_KEY))
        if not state or (self.service_uuid and state.get("service") != self.service_uuid):
            return None  # nothing yet, or the list of another service
        return max(0.0, now - state["synced_at"])

    def decide_offline(self, store: Store, scan: Scan, scan_mode: ScanMode, now: float,
                       clock_trusted: bool) -> Decision:
        entry = scan_mode is ScanMode.ENTRY
        ticket = store.ticket(self.name, scan.token)
        if ticket is not None and self.service_uuid and ticket["event_id"] != self.service_uuid:
            ticket = None
        if ticket is None:
            code = 40 if entry else 230
            return Decision(Verdict.DENY, REASONS[code], Source.OFFLINE, backend=self.name, message=MESSAGES[code],
                            backend_code=str(code), event_id=self.service_uuid)
        b = barcode_from(ticket)
        local = uncounted(store, b.barcode_id, b.fetched)
        code, reason, message = checkin_status(b, local, now, clock_trusted) if entry else checkout_status(b, local)
        return Decision(Verdict.ADMIT if code in ADMIT_CODES else Verdict.DENY, reason, Source.OFFLINE,
                        backend=self.name, message=message, backend_code=str(code), ticket_key=b.barcode_id,
                        event_id=ticket["event_id"], max_entries=b.max_checkins or UNLIMITED)

    async def sync(self, store: StoreThread, *, full: bool = False) -> None:
        """Download the barcode list: in full the first time (and every few hours), else the changes.

        A full list is downloaded by a child process into a new list file (gated.reload), which
        scans start to read only once it is complete; changes are written into the current one.
        """
        try:
            await self._ready()
        except (BackendRejected, ConfigError) as e:
            raise self._refused(e) from None
        async with self._upload_lock:
            await self._wait_for_marks(store)
            state = _json(await store.call(Store.get, SYNC_KEY)) or {}
            started = time.time()
            full = (full or state.get("service") != self.service_uuid or "compare" not in state
                    or not await store.call(Store.list_usable, self.name)
                    or started - state.get("full_at", 0.0) > FULL_RELOAD_SECONDS or started < EARLIEST_TRUSTED)
            if full:
                count, canceled = await self._download_full(store)
            else:
                count, canceled = await self._download_delta(store, int(state["compare"]))
            state = {"service": self.service_uuid, "compare": int(started),
                     "full_at": started if full else state["full_at"], "synced_at": time.time()}
            await store.call(Store.set, SYNC_KEY, json.dumps(state))
        # A delta with nothing in it is the normal case every interval: not worth a line at INFO.
        log.log(logging.INFO if full or count else logging.DEBUG, "CM.com barcodes %s: %d %s%s in %.1fs",
                "loaded" if full else "updated", count, "barcodes" if full else "changed",
                f", {canceled} canceled" if canceled else "", time.time() - started,
                extra={"GATED_EVENT": "sync", "GATED_BACKEND": self.name})

    async def _wait_for_marks(self, store: StoreThread) -> None:
        """Let the Uploader record the last confirmed upload as sent before a page is requested."""
        deadline = time.monotonic() + MARK_WAIT_SECONDS
        while self._unmarked and time.monotonic() < deadline:
            pending = await store.call(_still_pending, sorted(self._unmarked))
            self._unmarked = set(pending)
            if pending:
                await asyncio.sleep(0.02)
        self._unmarked = set()

    async def _page(self, page: int, compare: int | None) -> tuple[bytes, float]:
        headers = {"X-PAGINATION-LIMIT": str(self.page_size), "X-PAGINATION-PAGE": str(page)}
        if compare is not None:
            headers["X-COMPARE-TIMESTAMP"] = str(compare)
        fetched = time.time()
        try:
            response = await self._call("GET", f"services/{self.service_uuid}/barcodes", headers=headers,
                                        timeout=SLOW, limit=LIST_PAGE_LIMIT)
        except (BackendRejected, ConfigError) as e:
            raise self._refused(e) from None
        if response.status_code == 400:
            raise BackendRejected(f"barcode download refused: {_info(response)}")
        if response.status_code != 200:
            raise Unreachable(f"barcode download answered HTTP {response.status_code}")
        return response.content, fetched

    async def _download_full(self, store: StoreThread) -> tuple[int, int]:
        """The whole list, downloaded and written by a child process (gated.reload explains why)."""
        result = await reload.run_in_child({"config": self.config, "state": self.reload_state(),
                                            "store": str(store.store.path)})
        self.last_reload = result
        return result["barcodes"], result["canceled"]

    def reload_state(self) -> dict[str, Any]:
        """What the reload process needs to go on with this session: no new login, no new service lookup."""
        return {"who": self.who, "jwt": self.jwt, "jwt_renew_at": self.jwt_renew_at, "user_uuid": self.user_uuid,
                "service_uuid": self.service_uuid, "service_name": self.service_name}

    def restore_state(self, state: dict[str, Any]) -> None:
        """In the reload process: take over the daemon's session (see reload_state)."""
        self.who, self.jwt, self.jwt_renew_at = state["who"], state["jwt"], state["jwt_renew_at"]
        self.user_uuid, self.service_uuid, self.service_name = (state["user_uuid"], state["service_uuid"],
                                                                state["service_name"])
        self._resolved = True

    async def reload_here(self, store: StoreThread) -> dict[str, Any]:
        """In the reload process: download every page into a new generation of the list."""
        count, canceled = await self._download_pages(store)
        return {"barcodes": count, "canceled": canceled, "peak_rss_mb": reload.peak_rss_mb(),
                "written_mb": reload.written_mb()}

    async def _download_pages(self, store: StoreThread) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        service = self.service_uuid
        seen = {"barcodes": 0, "canceled": 0}

        def fetch(page: int) -> concurrent.futures.Future:
            return asyncio.run_coroutine_threadsafe(self._page(page, None), loop)

        def rows() -> Iterator[dict[str, Any]]:
            # Runs in the reload process, on its store thread inside Store.load_tickets; each page is
            # fetched on the event loop, the next one while this one is parsed and written here. The
            # daemon stopping ends the whole process, so a page is simply waited for.
            page, last = 1, 1
            coming = fetch(1)
            while page <= last:
                content, fetched = coming.result()
                barcodes, last = _parse_page(content)
                del content
                if barcodes and page < last:
                    coming = fetch(page + 1)
                # An httpx Response and its stream refer to each other, so each page's body (300-400 kB)
                # would wait for a full collection; freeing it here keeps one page in memory at a time.
                gc.collect(1)
                for raw in barcodes:
                    out = ticket_rows(raw, service, fetched)
                    seen["barcodes"] += bool(out)
                    seen["canceled"] += bool(out) and out[0]["status"] == "canceled"
                    yield from out
                if not barcodes:
                    break
                page += 1

        await store.call(Store.load_tickets, self.name, rows(), self.page_size)
        return seen["barcodes"], seen["canceled"]

    async def _download_delta(self, store: StoreThread, compare: int) -> tuple[int, int]:
        page, last, count, canceled = 1, 1, 0, 0
        while page <= last:
            content, fetched = await self._page(page, compare)
            n, c, last = await store.call(_upsert_page, self.name, content, self.service_uuid, fetched)
            count, canceled = count + n, canceled + c
            if not n:
                break
            page += 1
        return count, canceled

    async def upload(self, rows: list[dict[str, Any]]) -> UploadResult:
        """Post Upload of scans decided offline, with the time they were made (unix seconds, UTC).

        The API takes no nonce, so a batch sent again after a crash carries the same barcode, time
        and status: the server keeps one. A 400 is narrowed down to the scans it refuses.
        """
        try:
            await self._ready()
        except (BackendRejected, ConfigError) as e:
            raise self._refused(e) from None  # not the scans' fault: keep them queued
        result = UploadResult()
        batch: list[tuple[str, list[dict[str, Any]]]] = []
        async with self._upload_lock:
            held = await self._counted_already(rows)
        for row in rows:
            barcode = row["ticket_key"] or row["token"]
            if not barcode:
                result.parked[row["nonce"]] = "ticket code no longer stored; cannot upload"
                continue
            code, message = upload_status(row)
            at = int(row["wall"])
            records = [{"barcode_id": barcode, "checked_in_time": at, "status_code": code, "status_message": message}]
            if row["nonce"] in held:
                log.info("CM.com already counted the check-in of %s from its online request (its answer "
                         "was lost); not uploaded again", redact(barcode), extra={"GATED_EVENT": "upload"})
                records = []
            if row["passed"] == 0 and code == 100:  # admitted, nobody passed: check out again
                records.append({"barcode_id": barcode, "checked_in_time": at, "status_code": 200,
                                "status_message": MESSAGES[200]})
            if records:
                batch.append((row["nonce"], records))
            else:
                result.sent.append(row["nonce"])
        async with self._upload_lock:
            await self._post_upload(batch, result)
        self._unmarked = set(result.sent)
        return result

    async def _counted_already(self, rows: list[dict[str, Any]]) -> set[str]:
        """Nonces of admitted scans CM.com counted from an online request whose answer was lost.

        The API has no idempotency key and no lookup, so uploading such a scan would count the
        check-in twice. The changes since the earliest of them (Get Barcodes with a compare time)
        tell, but only the barcode's last check-in (check-out) time: it is taken for that scan only
        when it is within a minute of it and no other admission of the ticket, on this lane or one
        that shared it, is within two. In any doubt the scan is uploaded: counted twice, never lost.
        Unreachable leaves every scan queued for the next round.
        """
        suspects = [r for r in rows if r.get("online_unanswered") and r["verdict"] == "admit"
                    and (r["ticket_key"] or r["token"])]
        if not suspects or self._store is None:
            return set()
        wanted = {r["ticket_key"] or r["token"] for r in suspects}
        since = int(min(r["wall"] for r in suspects) - LOST_ANSWER_WINDOW)
        latest: dict[str, dict[str, Any]] = {}
        page, last = 1, 1
        try:
            while page <= last:
                if page > LOST_ANSWER_PAGES:  # hours of a busy venue's changes: not worth it, upload
                    log.info("more than %d pages of CM.com changes since the oldest scan to check; uploading "
                             "the scans", LOST_ANSWER_PAGES)
                    return set()
                content, _ = await self._page(page, since)
                barcodes, last = _parse_page(content)
                latest |= {b["barcode_id"]: b for b in barcodes if b.get("barcode_id") in wanted}
                if not barcodes:
                    break
                page += 1
        except BackendRejected as e:  # no evidence: upload them
            log.info("CM.com changes not readable before upload (%s); uploading the scans", e)
            return set()
        held = set()
        for r in suspects:
            key = r["ticket_key"] or r["token"]
            b = latest.get(key)
            try:
                at = b and parse_time(b.get("last_checked_in_time" if r["scan_mode"] == "entry"
                                            else "last_checked_out_time"))
            except ValueError:
                at = None
            if not at or abs(at - r["wall"]) > LOST_ANSWER_WINDOW:
                continue
            others = await self._store.call(Store.admissions_near, key, r["scan_mode"], r["wall"],
                                            2 * LOST_ANSWER_WINDOW, r["nonce"])
            if not others:
                held.add(r["nonce"])
        return held

    async def _post_upload(self, batch: list[tuple[str, list[dict[str, Any]]]], result: UploadResult) -> None:
        if not batch:
            return
        await self.quiet.gap()  # the JSON body is built and sent in one go
        try:
            response = await self._call("POST", "barcodes/upload", timeout=SLOW, json={
                "user_uuid": self.user_uuid, "service_uuid": self.service_uuid,
                "barcodes": [r for _, records in batch for r in records]})
        except (BackendRejected, ConfigError) as e:
            raise self._refused(e) from None
        if response.status_code in (200, 201):
            # Only CM.com's Upload Confirmation Object ({"info": {...}}) says the scans are in: a 200 from
            # a captive portal or a proxy is no confirmation, and taking it for one would lose them.
            body = json_body(response)
            if not isinstance(body, dict) or not isinstance(body.get("info"), dict):
                raise Unreachable(f"upload answered HTTP {response.status_code} without CM.com's confirmation")
            result.sent += [nonce for nonce, _ in batch]
            return
        if response.status_code != 400:
            raise Unreachable(f"upload answered HTTP {response.status_code}")
        if len(batch) > 1:  # find the scans it refuses; send the others
            for item in batch:
                await self._post_upload([item], result)
            return
        text = _info(response)
        if any(word in text.lower() for word in ("duplicate", "already")):
            result.sent.append(batch[0][0])  # the server has it: that is what we wanted
        else:
            result.parked[batch[0][0]] = f"refused by CM.com: {text}"


# --- store-thread helpers (run with StoreThread.call) ----------------------------------------

def _json(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _load_session(store: Store, who: str, service_key: str) -> tuple[dict | None, dict | None]:
    jwt = _json(store.get(JWT_KEY))
    service = _json(store.get(SERVICE_KEY))
    return (jwt if jwt and jwt.get("who") == who else None,
            service if service and service.get("key") == service_key else None)


def _still_pending(store: Store, nonces: list[str]) -> list[str]:
    marks = ",".join("?" * len(nonces))
    return [r[0] for r in store.db.conn.execute(
        f"SELECT nonce FROM scans WHERE upload = 'pending' AND nonce IN ({marks})", nonces)]  # noqa: S608


def _parse_page(content: bytes) -> tuple[list[dict[str, Any]], int]:
    """(barcodes, last page) of one Get Barcodes answer; Unreachable when it is not one."""
    body = parse_json(content, "barcode page")
    barcodes = body.get("barcodes") if isinstance(body, dict) else None
    if not isinstance(barcodes, list):
        raise Unreachable("barcode page without a barcodes list")
    pagination = body.get("pagination") if isinstance(body.get("pagination"), dict) else {}
    pages = pagination.get("pages") if isinstance(pagination.get("pages"), dict) else {}
    last = pages.get("last_page", pagination.get("total_pages", 1))
    return [b for b in barcodes if isinstance(b, dict)], last if isinstance(last, int) else 1


def _upsert_page(store: Store, backend: str, content: bytes, service: str, fetched: float) -> tuple[int, int, int]:
    barcodes, last = _parse_page(content)
    rows = [r for raw in barcodes for r in ticket_rows(raw, service, fetched)]
    store.upsert_tickets(backend, rows)
    firsts = [r for r in rows if r["token"] == r["ticket_key"]]
    return len(firsts), sum(r["status"] == "canceled" for r in firsts), last


def create(config: Config) -> Backend:
    return CMBackend(config)
