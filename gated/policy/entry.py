"""The `entry` backend: Entry V1 API online, event masks and scan windows offline, gzip batches upload.

Flow: start() reuses the session JWT kept in the store (key "entry:jwt") or creates one; sync() runs
Get Events at start and every sync interval and stores the events with their scan windows
("entry:events"), their barcode masks ("entry:masks") and the NFC wallet keys ("entry:nfc_keys") as
offline data; validate() asks Validate Scan within the deadline, renewing the session on 401 or
near its `exp` and asking again, so the scan in flight is still decided online; decide_offline()
matches the masks and scan windows when the API does not answer; upload() sends the scans decided
offline per event, at most 100 a request, as a raw gzip JSON array authorised by the API key.

Every request carries a fresh `PAC-Request-Id` (UUID v4), logged at DEBUG with its outcome and in
every fault line, so Entry's support can find the request.

Long because validation, offline data and upload share one session and one request path (fresh
request id, renewal on 401); the pure payload parsing is apart, in gated/policy/entry_data.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
import uuid
from collections.abc import Coroutine
from datetime import tzinfo
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from gated import device
from gated.config import Config
from gated.errors import BackendRejected, ConfigError, GatedError, Unreachable
from gated.logs import clean
from gated.model import Decision, InputKind, Reason, Scan, ScanMode, Source, admit, deny
from gated.policy.answer import ID_LIMIT, ident, jwt_claims, text
from gated.policy.base import Backend, UploadResult
from gated.policy.entry_data import (
    EntryEvent,
    entry_error,
    filename_stamp,
    local_iso,
    lookup_lines,
    map_reason,
    parse_events,
)
from gated.policy.http import (
    LIST_PAGE_LIMIT,
    SCAN_ANSWER_LIMIT,
    error_text,
    json_answer,
    json_body,
    make_client,
    request,
)
from gated.policy.masks import MaskSet
from gated.schema import Key
from gated.secrets import read_secret
from gated.store import Store, StoreThread
from gated.timeparse import parse_time
from gated.tokens import redact

log = logging.getLogger(__name__)

JWT_KEY = "entry:jwt"
EVENTS, MASKS, NFC_KEYS = "entry:events", "entry:masks", "entry:nfc_keys"
MAX_SCANS = 100  # the spec's limit per Offline Scan Upload request

PATHS = {
    "session": "/session", "session_lite": "/session/lite", "events": "/events", "venues": "/venues",
    "ping": "/ping", "validate": "/scan/validate", "lookup": "/scan/lookup/{barcode}", "upload": "/offline/{eventId}",
}

SCHEMA = {
    "api_key_file": Key("secret", help="file holding the API-Authorization-Key from Entry onboarding (chmod 600)"),
    "venue_code": Key("str", help='venue code from the venue profile, e.g. "TS"'),
    "data_account_id": Key("str", help='the 3-digit client identifier, e.g. "390"'),
    "make": Key("str", help='device maker sent with the session, e.g. "Raspberry Pi"'),
    "model": Key("str", help='device model sent with the session, e.g. "Pi 4 Model B"'),
    "software_mode": Key("str", default="Pedestal", choices=("Pedestal", "Handheld")),
    "lite": Key("bool", default=False,
                help="Create Session (Lite): Validate Scan is not allowed, so every scan is decided offline"),
    "test_mode": Key("bool", default=False, help="scans are processed by Entry in test mode"),
    "masks": Key("strlist", default=[], help="extra barcode masks accepted offline for every event"),
    "special_area_id": Key("str", default="", help="special area within the venue; empty: none"),
    "special_area_name": Key("str", default=""),
    "special_area_max_entry_per_ticket": Key("int", default=0, minimum=0, maximum=1_000_000, help="0: not sent"),
    "special_area_max_capacity": Key("int", default=0, minimum=0, maximum=10_000_000, help="0: not sent"),
    "special_area_require_entry_exit": Key("bool", default=False),
    **{f"path_{name}": Key("str", default=path, help="URL path relative to [backend] url")
       for name, path in PATHS.items()},
}

_MODE = {ScanMode.ENTRY: "Entry", ScanMode.EXIT: "Exit"}
_RETRY_LATER = (408, 425, 429)  # 4xx that mean "not now", not "never"
# How far Entry's scanTimestamp of an online request may be from the scan's own time and still be
# that request: the deadline, the server's queue, and the two clocks' difference.
LOST_ANSWER_WINDOW = 60.0


class EntryBackend(Backend):
    name = "entry"

    SCAN_MARGIN = 30.0  # renew inline when the JWT expires within this (capped at a quarter of its life)
    SYNC_MARGIN = 600.0  # renew in the background sync when it expires within this (capped at half)

    def __init__(self, config: Config):
        super().__init__(config)
        o = self.options
        self.api_key = read_secret(o.api_key_file, "[backend.entry] api_key_file")
        self.serial = config.lane.serial
        self.lite = bool(o.lite)
        if self.lite:
            # A LIMITED session may not call Validate Scan: decide offline and upload, as offline_first does.
            config.backend["offline_first"] = True
        self.test_mode = bool(o.test_mode)
        self.paths = {name: "/" + o[f"path_{name}"].lstrip("/") for name in PATHS}
        missing = [f"[backend.entry] path_{n} = \"{self.paths[n]}\": must contain {{{p}}}"
                   for n, p in (("lookup", "barcode"), ("upload", "eventId")) if f"{{{p}}}" not in self.paths[n]]
        if missing:
            raise ConfigError(config.path, missing)
        self.extra_masks = list(o.masks)
        self.max_entries = o.special_area_max_entry_per_ticket or 1
        self.slow_timeout = max(10.0, config.backend.timeout_seconds)  # sync, upload, lookup: off the scan path
        self.client = make_client(config)
        self.monotonic = time.monotonic  # a seam for tests: the JWT's remaining life is counted on it
        self.store: StoreThread | None = None
        self._token: str | None = None
        self._claims: dict[str, Any] = {}
        self._deadline: float | None = None  # monotonic time the JWT expires
        self._lifetime = 3600.0
        self._lock = asyncio.Lock()
        self._refused = False
        self._tasks: set[asyncio.Task] = set()
        self._venue_tz: str | None = None
        self._venues_asked = False
        self._summary = ""
        self._stamp: float | None = None  # offline_data.updated of the events now cached
        self._events: list[EntryEvent] = []
        self._names: dict[str, str] = {}  # upload Filename -> nonce of its first scan (collision guard)
        self._set_device(device.DeviceInfo(software_version=device.software_version()))

    def describe(self) -> str:
        extra = "".join(s for s, on in ((", lite session", self.lite), (", test mode", self.test_mode)) if on)
        return f"entry venue {self.options.venue_code} (account {self.options.data_account_id}{extra})"

    # --- device context ---------------------------------------------------------------------

    def _set_device(self, info: device.DeviceInfo) -> None:
        self.device = info
        ctx = {"networkType": info.network_type, "networkSignal": info.network_signal,
               "localIPAddress": info.local_ip, "softwareMode": self.options.software_mode}
        self._context_base = {k: v for k, v in ctx.items() if v is not None}

    def context(self) -> dict[str, Any]:
        """The device context fields every request carries, with the device's time now."""
        return {**self._context_base, "deviceTimestamp": local_iso(time.time())}

    async def _refresh_device(self) -> None:
        self._set_device(await asyncio.to_thread(device.read))

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, store: StoreThread) -> None:
        self.store = store
        await self._refresh_device()
        raw = await store.call(Store.get, JWT_KEY)
        if raw:
            try:
                saved = json.loads(raw)
            except ValueError:
                saved = {}
            if isinstance(saved, dict) and saved.get("identity") == self._identity():
                self._adopt(saved.get("jwt", ""), fresh=False)
        if self._token is None or self._expiring(self.SCAN_MARGIN):
            try:
                await self._renew(stale=self._token)
            except BackendRejected as e:
                self._note_refused(e)

    async def close(self) -> None:
        await self.close_tasks()
        await self.client.aclose()

    async def close_tasks(self) -> None:
        """Wait for the session writes still queued for the store."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- HTTP ---------------------------------------------------------------------------------

    async def _send(self, endpoint: str, path: str, headers: dict[str, str], *, body: Any = None,
                    content: bytes | None = None, timeout: float | None = None,
                    limit: int = SCAN_ANSWER_LIMIT) -> httpx.Response:
        rid = headers["PAC-Request-Id"]
        kwargs: dict[str, Any] = {"headers": headers, "limit": limit}
        if content is not None:
            kwargs["content"] = content
        else:
            kwargs["json"] = body if body is not None else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        started = time.monotonic()
        try:
            response = await request(self.client, "POST", path, **kwargs)
        except Unreachable as e:
            log.debug("Entry %s: %s after %.0f ms (PAC-Request-Id %s)", endpoint, e,
                      (time.monotonic() - started) * 1000, rid)
            raise
        log.debug("Entry %s: HTTP %d in %.1f ms (PAC-Request-Id %s)", endpoint, response.status_code,
                  (time.monotonic() - started) * 1000, rid)
        return response

    async def _call(self, endpoint: str, path: str, *, auth: str, body: Any = None, content: bytes | None = None,
                    headers: dict[str, str] | None = None, timeout: float | None = None,
                    limit: int = SCAN_ANSWER_LIMIT) -> httpx.Response:
        """One request with a fresh PAC-Request-Id; with auth="jwt" a 401 renews the session and asks again."""

        async def once() -> tuple[httpx.Response, str | None]:
            h = {"PAC-Request-Id": str(uuid.uuid4())}
            token = None
            if auth == "jwt":
                token = await self._session()
                h["Authorization"] = f"Bearer {token}"
            else:
                h["API-Authorization-Key"] = self.api_key
            h.update(headers or {})
            return await self._send(endpoint, path, h, body=body, content=content, timeout=timeout,
                                    limit=limit), token

        response, token = await once()
        if response.status_code == 401 and auth == "jwt":
            log.info("Entry %s: session refused (HTTP 401: %s, PAC-Request-Id %s); renewing it", endpoint,
                     _why(response), response.request.headers.get("PAC-Request-Id"),
                     extra={"GATED_EVENT": "session_renew"})
            await self._renew(stale=token)
            response, _ = await once()
        return response

    # --- the session (JWT) -------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """What a stored JWT was issued for: a changed config must not reuse another venue's session."""
        return {"url": self.config.backend.url, "venue": self.options.venue_code,
                "account": self.options.data_account_id, "serial": self.serial, "lite": self.lite}

    def _adopt(self, token: str, *, fresh: bool) -> None:
        claims = jwt_claims(token)
        if not token or not claims:
            return
        self._token, self._claims = token, claims
        exp, iat = claims.get("exp"), claims.get("iat")
        now = self.monotonic()
        if isinstance(exp, (int, float)) and isinstance(iat, (int, float)) and exp > iat:
            self._lifetime = float(exp - iat)
        if not isinstance(exp, (int, float)):
            self._deadline = None  # no exp: renewed on 401 only
        elif fresh and isinstance(iat, (int, float)):
            # Counted on the monotonic clock from issue: a gate whose wall clock is off still renews on time.
            self._deadline = now + (exp - iat)
        else:
            self._deadline = now + (exp - time.time())

    def _expiring(self, margin: float) -> bool:
        if self._deadline is None:
            return False
        cap = 0.25 if margin <= self.SCAN_MARGIN else 0.5
        return self.monotonic() >= self._deadline - min(margin, self._lifetime * cap)

    async def _session(self) -> str:
        if self._token is None or self._expiring(self.SCAN_MARGIN):
            return await self._renew(stale=self._token)
        return self._token

    async def _renew(self, stale: str | None) -> str:
        """Create a session (Lite when configured); one at a time, and not again if another just did."""
        async with self._lock:
            if self._token is not None and self._token != stale and not self._expiring(self.SCAN_MARGIN):
                return self._token
            o = self.options
            if self.lite:
                endpoint, path = "Create Session (Lite)", self.paths["session_lite"]
                body = {"dataAccountId": o.data_account_id, "serialNumber": self.serial, "venueCode": o.venue_code}
            else:
                endpoint, path = "Create Session", self.paths["session"]
                body = self._session_body()
            rid = str(uuid.uuid4())
            response = await self._send(endpoint, path, {"PAC-Request-Id": rid, "API-Authorization-Key": self.api_key},
                                        body=body)
            if response.status_code in (200, 201):
                data = json_body(response)
                token = data.get("jwt") if isinstance(data, dict) else None
                if not isinstance(token, str) or not jwt_claims(token):
                    raise Unreachable(f"{endpoint} answered without a usable jwt")
                self._adopt(token, fresh=True)
                self._persist()
                if self._refused:
                    self._refused = False
                    log.info("Entry session created again", extra={"GATED_EVENT": "session_ok"})
                return token
            what = ("API key refused" if response.status_code in (401, 403)
                    else "venue or device refused")
            fix = ("check [backend.entry] api_key_file" if response.status_code in (401, 403)
                   else "check [backend.entry] venue_code, data_account_id, make and model")
            raise BackendRejected(f"{endpoint}: {what} (HTTP {response.status_code}: {_why(response)}, "
                                  f"PAC-Request-Id {rid}); {fix}")

    def _session_body(self) -> dict[str, Any]:
        o, info = self.options, self.device
        body: dict[str, Any] = {"venueCode": o.venue_code, "dataAccountId": o.data_account_id,
                                "serialNumber": self.serial, "make": o.make, "model": o.model,
                                "softwareVersion": info.software_version}
        if info.firmware_version:
            body["firmwareVersion"] = info.firmware_version
        if info.mac_address:
            body["macAddress"] = info.mac_address
        if o.special_area_id:
            body["specialAreaId"] = o.special_area_id
            if o.special_area_name:
                body["specialAreaName"] = o.special_area_name
            if o.special_area_max_entry_per_ticket:
                body["specialAreaMaxEntryPerTicket"] = o.special_area_max_entry_per_ticket
            if o.special_area_max_capacity:
                body["specialAreaMaxCapacity"] = o.special_area_max_capacity
            body["specialAreaRequireEntryExit"] = o.special_area_require_entry_exit
        return body | self.context()

    def _persist(self) -> None:
        if self.store is None or self._token is None:
            return
        value = json.dumps({"jwt": self._token, "identity": self._identity()})
        # Not awaited: a renewal on the scan path must not wait for a commit; close() waits for it.
        self._spawn(self.store.call(Store.set, JWT_KEY, value))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and isinstance(t.exception(), GatedError):
                log.warning("Entry session not saved in the store: %s", t.exception())

        task.add_done_callback(done)

    def _note_refused(self, e: BackendRejected) -> None:
        if not self._refused:
            self._refused = True
            log.error("Entry session not created: %s; deciding offline until it is", e,
                      extra={"GATED_EVENT": "session_refused"})

    # --- online -------------------------------------------------------------------------------

    def _input_fields(self, kind: str, nfc_type: str | None) -> dict[str, str]:
        if kind == InputKind.NFC:
            out = {"inputType": "NFC"}
            if nfc_type and nfc_type.lower() in ("apple", "google"):
                out["nfcType"] = nfc_type.capitalize()
            return out
        return {"inputType": "Barcode", "barcodeType": "QRCode" if kind == InputKind.QR else "Barcode"}

    async def validate(self, scan: Scan, scan_mode: ScanMode) -> Decision:
        fields = self._input_fields(scan.input, scan.nfc_type)
        body = {"token": scan.token, "inputType": fields.pop("inputType"), "scanMode": _MODE[scan_mode], **fields,
                "testMode": self.test_mode, **self.context()}
        try:
            response = await self._call("Validate Scan", self.paths["validate"], auth="jwt", body=body)
        except BackendRejected as e:
            self._note_refused(e)
            raise Unreachable("no Entry session (see the error above)") from None
        code = response.status_code
        if code == 400:
            # The API judged the request itself (e.g. a token it cannot read): that is its verdict, but
            # only in Entry's error shape. A proxy's or portal's 400 page says nothing about the ticket.
            message = entry_error(json_body(response))
            if message is None:
                raise Unreachable("Validate Scan answered HTTP 400 without Entry's error shape")
            return deny(Reason.REJECTED, Source.ONLINE, backend=self.name, backend_code="HTTP 400", message=message)
        if not 200 <= code < 300:
            raise Unreachable(f"Validate Scan answered HTTP {code}")
        data = json_body(response)
        status = data.get("status") if isinstance(data, dict) else None
        if status not in ("Admit", "Stop"):
            raise Unreachable("Validate Scan answered without an Admit or Stop status")
        reason_code = text(data.get("reasonCode"), "Validate Scan reasonCode", limit=ID_LIMIT) or status
        kw = dict(backend=self.name, backend_code=reason_code, message=text(data.get("reasonMessage"),
                  "Validate Scan reasonMessage"), event_id=ident(data.get("eventId"), "Validate Scan eventId"))
        if status == "Admit":
            return admit(map_reason(status, reason_code), Source.ONLINE, ticket_key=scan.token, **kw)
        return deny(map_reason(status, reason_code), Source.ONLINE, **kw)

    async def probe(self) -> None:
        """Ping, the breaker's probe: any 2xx means Entry is back."""
        try:
            response = await self._call("Ping", self.paths["ping"], auth="jwt",
                                        body={"testMode": self.test_mode, **self.context()})
        except BackendRejected as e:
            self._note_refused(e)
            raise Unreachable("no Entry session") from None
        if not 200 <= response.status_code < 300:
            raise Unreachable(f"Ping answered HTTP {response.status_code}")

    # --- offline data -------------------------------------------------------------------------

    async def sync(self, store: StoreThread) -> None:
        """Get Events -> events, scan windows, masks and NFC keys as offline data."""
        if self.store is None:
            self.store = store
        await self._refresh_device()
        if self._token is None or self._expiring(self.SYNC_MARGIN):
            await self._renew(stale=self._token)  # renewed here, off the scan path, before it is due
        response = await self._call("Get Events", self.paths["events"], auth="jwt", body=self.context(),
                                    timeout=self.slow_timeout, limit=LIST_PAGE_LIMIT)
        if response.status_code != 200:
            raise BackendRejected(f"Get Events refused (HTTP {response.status_code}: {_why(response)}, "
                                  f"PAC-Request-Id {response.request.headers.get('PAC-Request-Id')})")
        data = await json_answer(response)
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            raise BackendRejected("Get Events answered without an events list")
        tz_name, tz = await self._timezone()
        events, masks, problems = parse_events(data["events"], tz)
        for problem in problems:
            log.warning("Entry Get Events: %s", problem)
        keys = data.get("nfcKeys") if isinstance(data.get("nfcKeys"), dict) else {}
        lists = {w: keys.get(w) if isinstance(keys.get(w), list) else [] for w in ("apple", "google")}
        nfc = {w: [k for k in lists[w] if isinstance(k, dict)] for w in ("apple", "google")}
        await store.call(_save, {"timezone": tz_name, "events": events}, masks, nfc)
        n_masks = sum(len(m) for m in masks.values())
        summary = (f"Entry offline data: {len(events)} events today ({', '.join(e['eventId'] for e in events)}), "
                   f"{n_masks} barcode masks, NFC keys: {len(nfc['apple'])} Apple, {len(nfc['google'])} Google")
        # Log the state when it changes, not every five minutes.
        log.log(logging.INFO if summary != self._summary else logging.DEBUG, "%s", summary,
                extra={"GATED_EVENT": "sync"})
        self._summary = summary

    async def _timezone(self) -> tuple[str | None, tzinfo | None]:
        """The venue's time zone, for event times without an offset: from the JWT, else Get Venues."""
        name = self._claims.get("venueTimezone") or self._venue_tz
        if not name and not self._venues_asked:
            self._venues_asked = True
            try:
                venue = next((v for v in await self.venues() if v.get("facilityCode") == self.options.venue_code), {})
                self._venue_tz = name = venue.get("venueTimezone")
            except (Unreachable, BackendRejected) as e:
                log.info("venue time zone unknown (%s); event times without offset are taken as local time", e)
        if not isinstance(name, str) or not name:
            return None, None
        try:
            return name, ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("venue time zone %r is unknown here; event times without offset are taken as local", name)
            return None, None

    def data_age(self, store: Store, now: float) -> float | None:
        row = store.db.conn.execute("SELECT updated FROM offline_data WHERE name = ?", (EVENTS,)).fetchone()
        return None if row is None else max(0.0, now - row[0])

    def _load(self, store: Store) -> list[EntryEvent]:
        """Today's events with compiled masks, rebuilt only when a sync stored new ones."""
        row = store.db.conn.execute("SELECT updated FROM offline_data WHERE name = ?", (EVENTS,)).fetchone()
        stamp = row[0] if row else None
        if stamp != self._stamp:
            stored = store.get_data(EVENTS)
            masks = (store.get_data(MASKS) or ({}, 0))[0]
            events = (stored[0] if stored else {}).get("events", [])
            self._events = [EntryEvent(e["eventId"], e.get("eventName", ""), e.get("startDateTime"),
                                       e.get("endDateTime"), e.get("scanStart"), e.get("scanEnd"),
                                       MaskSet([*masks.get(e["eventId"], []), *self.extra_masks]))
                            for e in events]
            self._stamp = stamp
        return self._events

    @staticmethod
    def event_for(events: list[EntryEvent], t: float | None) -> EntryEvent | None:
        """The event a scan at time t belongs to: whose scan window holds t, else the nearest one."""
        if not events:
            return None
        if t is None:
            return events[0]
        return min(events, key=lambda e: e.distance(t))

    def decide_offline(self, store: Store, scan: Scan, scan_mode: ScanMode, now: float,
                       clock_trusted: bool) -> Decision:
        events = self._load(store)
        if not events:
            return deny(Reason.UNKNOWN, backend=self.name, message="no Entry event today")
        token = scan.token
        matched = [(e, m) for e in events if (m := e.masks.match(token)) is not None]
        if not matched:
            current = self.event_for(events, now if clock_trusted else None)
            return deny(Reason.UNKNOWN, backend=self.name, event_id=current.event_id if current else None)
        kw = dict(backend=self.name, ticket_key=token, max_entries=self.max_entries)
        if clock_trusted:
            # An untrusted clock cannot judge a time window; the decider says so in the log.
            for event, mask in matched:
                if event.open_at(now):
                    return admit(Reason.OK, event_id=event.event_id, message=f"mask {mask}", **kw)
            event, mask = matched[0]
            early = event.scan_start is not None and now < event.scan_start
            return deny(Reason.NOT_YET_VALID if early else Reason.EXPIRED, event_id=event.event_id,
                        message=f"scanning {'opens' if early else 'closed'} at "
                                f"{local_iso(event.scan_start if early else event.scan_end)}", **kw)
        event, mask = matched[0]
        return admit(Reason.OK, event_id=event.event_id, message=f"mask {mask}", **kw)

    # --- upload -------------------------------------------------------------------------------

    async def upload(self, rows: list[dict[str, Any]]) -> UploadResult:
        """Offline Scan Upload: per event, at most 100 scans a request; 2xx or 409 sent, 4xx parked."""
        result = UploadResult()
        events = await self.store.call(self._load) if self.store is not None else []
        rows = await self._not_held_yet(rows, result)
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            event = None if row.get("event_id") else self.event_for(events, row["wall"])
            event_id = row.get("event_id") or (event.event_id if event else None)
            if not row.get("token"):
                result.parked[row["nonce"]] = "the ticket code is no longer stored; cannot upload"
            elif event_id is None:
                result.retry[row["nonce"]] = "no Entry event known yet (waiting for Get Events)"
            else:
                groups.setdefault(event_id, []).append(row)
        by_id = {e.event_id: e for e in events}
        chunks = [(eid, group[i:i + MAX_SCANS]) for eid, group in groups.items()
                  for i in range(0, len(group), MAX_SCANS)]
        for n, (event_id, chunk) in enumerate(chunks):
            try:
                await self._upload_chunk(event_id, chunk, by_id.get(event_id), result)
            except Unreachable as e:
                if not result.sent and not result.parked:
                    raise
                for _, later in chunks[n:]:  # what was sent stays sent; the rest waits for the next round
                    result.retry.update({r["nonce"]: str(e) for r in later})
                break
        return result

    async def _not_held_yet(self, rows: list[dict[str, Any]], result: UploadResult) -> list[dict[str, Any]]:
        """Leave out scans Entry already holds from an online request whose answer was lost.

        Entry takes no idempotency key, so such a scan uploaded again is a second record there (a
        ticket counted in twice). Ticket Lookup's scan history tells: the online scans from this
        device, same mode, within a minute of ours, must account for every request of this lane for
        the ticket within two minutes, answered or not; then all reached Entry. In any doubt the
        scan is uploaded: counted twice, never lost. Lookup failing leaves the round for later;
        refused or unknown, the scan is uploaded.
        """
        keep = []
        for row in rows:
            if not row.get("online_unanswered") or not row.get("token"):
                keep.append(row)
                continue
            try:
                held = await self._holds(row)
            except Unreachable as e:
                # The whole round waits: a batch's file name comes from its first scan, and a batch
                # that changes with the lookups' luck could reach Entry twice under two names.
                raise Unreachable(f"Ticket Lookup before upload: {e}") from None
            except BackendRejected as e:
                log.info("Ticket Lookup before upload refused (%s); uploading the scan", e)
                held = False
            if held:
                log.info("Entry already holds scan %s from its online request (its answer was lost); "
                         "not uploaded again", redact(row["token"]), extra={"GATED_EVENT": "upload"})
                result.sent.append(row["nonce"])
            else:
                keep.append(row)
        return keep

    async def _holds(self, row: dict[str, Any]) -> bool:
        path = self.paths["lookup"].replace("{barcode}", quote(row["token"], safe=""))
        body = {**self._input_fields(row["input"], row.get("nfc_type")), **self.context()}
        response = await self._call("Ticket Lookup", path, auth="jwt", body=body, timeout=self.slow_timeout,
                                    limit=LIST_PAGE_LIMIT)
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise BackendRejected(f"HTTP {response.status_code}: {_why(response)}")
        data = await json_answer(response)
        history = data.get("scanHistory") if isinstance(data, dict) else None
        mode = _MODE[ScanMode(row["scan_mode"])]
        near = 0
        for h in history if isinstance(history, list) else []:
            if not (isinstance(h, dict) and h.get("serialNumber") == self.serial and h.get("scanMode") == mode
                    and h.get("deviceStatus") != "Offline"):
                continue
            try:
                at = parse_time(h.get("scanTimestamp"))
            except ValueError:
                continue
            near += at is not None and abs(at - row["wall"]) <= LOST_ANSWER_WINDOW
        if not near or self.store is None:
            return False
        answered, unanswered = await self.store.call(Store.online_requests, row["token"], row["scan_mode"],
                                                     row["wall"], 2 * LOST_ANSWER_WINDOW)
        return near - answered >= max(unanswered, 1)

    async def _upload_chunk(self, event_id: str, rows: list[dict[str, Any]], event: EntryEvent | None,
                            result: UploadResult) -> None:
        await self.quiet.gap()  # the body is built and sent in one go: ~1 ms of the event loop
        batches: list[dict[str, Any]] = []
        for mode in dict.fromkeys(r["scan_mode"] for r in rows):
            batch: dict[str, Any] = {"serialNumber": self.serial, "dataAccountId": self.options.data_account_id,
                                     "venueCd": self.options.venue_code, "deviceStatus": "Offline",
                                     "scanMode": _MODE[ScanMode(mode)], "eventId": event_id}
            if event is not None and event.start_text:
                batch["eventStartDate"] = event.start_text
            if event is not None and event.end_text:
                batch["eventEndDate"] = event.end_text
            if self._token:
                batch["jwt"] = self._token
            batch["scans"] = [self._offline_scan(r) for r in rows if r["scan_mode"] == mode]
            batches.append(batch)
        body = gzip.compress(json.dumps(batches, separators=(",", ":")).encode(), compresslevel=6)
        filename = self._filename(rows[0])
        path = self.paths["upload"].replace("{eventId}", quote(event_id, safe=":"))
        response = await self._call("Offline Scan Upload", path, auth="key", content=body, timeout=self.slow_timeout,
                                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                                             "Filename": filename})
        nonces = [r["nonce"] for r in rows]
        code = response.status_code
        rid = response.request.headers.get("PAC-Request-Id")
        if 200 <= code < 300 or code == 409:
            # Entry confirms with {"message": "... successful at <file>"}: a 200 (or 409) from a captive
            # portal or a proxy is no confirmation, and marking those scans sent would lose them. Retry.
            body = json_body(response)
            if not isinstance(body, dict) or code != 409 and not isinstance(body.get("message"), str):
                raise Unreachable(f"Offline Scan Upload answered HTTP {code} without Entry's confirmation")
        if 200 <= code < 300 or code == 409:
            if code == 409:
                log.info("Entry already has upload %s (HTTP 409, PAC-Request-Id %s); counted as uploaded",
                         filename, rid, extra={"GATED_EVENT": "upload"})
            result.sent.extend(nonces)
        elif code in _RETRY_LATER:
            result.retry.update({n: f"HTTP {code}" for n in nonces})
        else:
            why = f"Offline Scan Upload refused: HTTP {code}: {_why(response)} (PAC-Request-Id {rid})"
            result.parked.update({n: why for n in nonces})

    def _offline_scan(self, row: dict[str, Any]) -> dict[str, Any]:
        stamp = local_iso(row["wall"])  # when it was scanned, not when it is uploaded
        scan = {"token": row["token"], "status": "Admit" if row["verdict"] == "admit" else "Stop",
                "scanTimestamp": stamp, "deviceTimestamp": stamp}
        return scan | self._input_fields(row["input"], row.get("nfc_type"))

    def _filename(self, first: dict[str, Any]) -> str:
        """{serialNumber}_{timestamp of the batch's first scan}.

        The same batch retried after a lost answer gets the same name, so Entry's store replaces the
        file instead of holding it twice; two batches never share a name (guarded below).
        """
        wall = first["wall"]
        while True:
            name = f"{self.serial}_{filename_stamp(wall)}"
            owner = self._names.setdefault(name, first["nonce"])
            if owner == first["nonce"]:
                break
            wall += 1e-6
        if len(self._names) > 10_000:
            self._names.pop(next(iter(self._names)))
        return name

    # --- tools: lookup, pair, venues ----------------------------------------------------------

    async def venues(self) -> list[dict[str, Any]]:
        """Get Venues for this data account (API key, no session needed)."""
        o = self.options
        body = {"dataAccountId": o.data_account_id, "serialNumber": self.serial, "make": o.make, "model": o.model,
                **self.context()}
        response = await self._call("Get Venues", self.paths["venues"], auth="key", body=body,
                                    timeout=self.slow_timeout, limit=LIST_PAGE_LIMIT)
        if response.status_code != 200:
            raise BackendRejected(f"Get Venues refused (HTTP {response.status_code}: {_why(response)})")
        data = await json_answer(response)
        venues = data.get("venues") if isinstance(data, dict) else None
        return [v for v in venues if isinstance(v, dict)] if isinstance(venues, list) else []

    async def lookup(self, token: str) -> list[str] | None:
        """Ticket Lookup: the ticket, its event and seat, and its scan history, as lines to print."""
        path = self.paths["lookup"].replace("{barcode}", quote(token, safe=""))
        body = {"inputType": "Barcode", "barcodeType": "Barcode", **self.context()}
        response = await self._call("Ticket Lookup", path, auth="jwt", body=body, timeout=self.slow_timeout,
                                    limit=LIST_PAGE_LIMIT)
        if response.status_code == 404:
            return [f"not known to Entry ({_why(response)})"]
        if response.status_code != 200:
            raise BackendRejected(f"Ticket Lookup refused (HTTP {response.status_code}: {_why(response)})")
        return lookup_lines(await json_answer(response))

    async def pair(self, store: StoreThread, token: str) -> str:
        """`gated pair VENUE_CODE`: check the venue against Get Venues, create the session, store the JWT."""
        self.store = store
        await self._refresh_device()
        o = self.options
        venues = await self.venues()
        venue = next((v for v in venues if v.get("facilityCode") == token), None)
        if venue is None:
            codes = ", ".join(str(v.get("facilityCode")) for v in venues) or "none"
            raise BackendRejected(f"venue {token} is not a venue of data account {o.data_account_id} "
                                  f"(its venues: {codes})")
        if token != o.venue_code:
            raise BackendRejected(f'[backend.entry] venue_code is "{o.venue_code}"; set venue_code = "{token}" in '
                                  f"{self.config.path}, then run gated pair {token} again")
        await self._renew(stale=self._token)
        await self.close_tasks()
        exp = self._claims.get("exp")
        until = local_iso(exp) if isinstance(exp, (int, float)) else "until Entry ends it"
        return clean(f"paired with Entry venue {token} ({venue.get('title', '')}, {venue.get('venueTimezone', '')}) "
                     f"as device {self.serial}; session valid until {until}, kept in {self.config.store.path}")


def _save(store: Store, events: dict[str, Any], masks: dict[str, list[str]], nfc: dict[str, list]) -> None:
    """One transaction: the scan path never sees new events with old masks."""
    with store.db.atomic():
        store.put_data(MASKS, masks)
        store.put_data(NFC_KEYS, nfc)
        store.put_data(EVENTS, events)


def _why(response: httpx.Response) -> str:
    """Why Entry refused a call: the message of its error shape, else the HTTP reason phrase."""
    return error_text(response, entry_error)


def create(config: Config) -> Backend:
    return EntryBackend(config)
