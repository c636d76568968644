"""The `tibillet` backend: TiBillet's scan API online, its RSA-PSS signed QR codes offline.

TiBillet (Lespass) serves its scan API under `/scan/`, every path with a trailing slash. Its
`POST ticket/` marks scanned every ticket that is not scanned yet, canceled, inactive and unpaid
ones included; only `check_ticket/` and `list_tickets/` tell a ticket's status. So an entry scan
asks `check_ticket/` first and calls `ticket/` only for a ticket whose status is "valid and not
scanned"; an exit scan or `gated lookup` asks `check_ticket/` alone (nothing changes on the server).

Offline, the QR text `DATA:SIGNATURE` is verified against the configured event public keys, and
the statuses downloaded from `list_tickets/` (when `event_uuid` is set) deny canceled, unpaid,
inactive and already scanned tickets. The ticket's uuid is the anti-passback identity, because one
ticket can be printed as several valid code texts. Offline entries are replayed with `ticket/` once
the API answers, each after a `check_ticket/`, so a ticket canceled meanwhile is never marked
scanned; "already scanned" by this very device means an earlier replay got through.

The API key comes from `gated pair CODE` (`GET {prefix}{code}/pair/`, the prefix found by trying
the known places), kept in the store, or from `api_key_file`. A refused key (TiBillet answers an
unknown key with HTTP 500 and an HTML page) is named as such in the log, `gated pair` and
`gated doctor`; the gate decides offline and queued scans wait until the device is paired again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gated.config import Config
from gated.errors import BackendRejected, Unreachable
from gated.logs import clean
from gated.model import Decision, Reason, Scan, ScanMode, Source, admit, deny
from gated.policy.answer import ID_LIMIT, cut, ident, integer, mapping, text
from gated.policy.base import Backend, UploadResult
from gated.policy.http import (
    LIST_PAGE_LIMIT,
    HttpBackend,
    api_message,
    error_text,
    json_answer,
    json_body,
    pairing_answer,
    request,
)
from gated.policy.signatures import load_rsa_public_key, verify_tibillet
from gated.policy.tibillet_statuses import STATUS_REASONS, status_of, status_row
from gated.schema import Key
from gated.store import Store, StoreThread

log = logging.getLogger(__name__)

SCHEMA = {
    "path_prefix": Key("str", default="",
                       help='where the scan API lives under url; "" (default): found by `gated pair` '
                            '("/scan/" on TiBillet, "/api/scan/" in its French document)'),
    "public_keys": Key("pathlist", default=[], help="PEM public key files, one per event, for offline checks"),
    "event_uuid": Key("str", default="",
                      help="the event this lane admits: sent with each scan (TiBillet requires it) and "
                           "used to download its ticket statuses for offline decisions"),
    "api_key_file": Key("secret", default="", help="file holding the API key, instead of `gated pair`"),
}

KV_API_KEY = "tibillet:api_key"
KV_DEVICE_UUID = "tibillet:device_uuid"
KV_DEVICE_NAME = "tibillet:device_name"
KV_PATH_PREFIX = "tibillet:path_prefix"
SLOW_CALL_SECONDS = 10.0  # pairing, lists and uploads are not on a visitor's clock
# Where the scan API may live: TiBillet's own path first (the English document agrees), then the
# French document's. `gated pair` tries each, with and without the trailing slash.
PREFIXES = ("/scan/", "/api/scan/")
# Answers that mean "no pairing endpoint here" (try the next place): anything else is an answer.
NOT_HERE = (301, 302, 307, 308, 404, 405)
PAGE_SIZE = 200  # list_tickets' maximum
# Codes of the downloaded list checked against the configured keys to learn the lane event's own key
# (the QR names no event); a few are enough, and a hostile list cannot make a sync verify thousands.
KEY_PROBES = 5
MAX_CODE = 4096  # no scan is longer (the gate refuses longer input as malformed)
MAX_PAGES = 5000  # a million tickets: a total_pages beyond this is not an answer

class KeyRefused(Unreachable):
    """TiBillet refused the API key: deciding offline, but the fix is `gated pair`, not waiting."""


def _prefix(path: str) -> str:
    path = path.strip().strip("/")
    return f"/{path}/" if path else "/"


class TibilletBackend(HttpBackend):
    name = "tibillet"

    def __init__(self, config: Config):
        super().__init__(config)
        configured = self.options.get("path_prefix", "")
        self.prefix_override: str | None = _prefix(configured) if configured.strip() else None
        self.prefix = self.prefix_override or PREFIXES[0]
        self.event_uuid: str = self.options.get("event_uuid", "").strip()
        self.list_name = f"tibillet:{self.event_uuid}" if self.event_uuid else None
        self.api_key_file: str = self.options.get("api_key_file", "")
        self.keys: list[RSAPublicKey] = []
        self.key_events: list[str] = []  # the event each key belongs to: its file name without .pem
        self.key_ids: list[str] = []  # SHA-256 of each key, as the downloaded list's own key is kept
        self.key_problems: list[str] = []
        for path in self.options.get("public_keys", []):
            try:
                key = load_rsa_public_key(Path(path).read_bytes())
                self.keys.append(key)
                self.key_events.append(Path(path).stem)
                self.key_ids.append(hashlib.sha256(key.public_bytes(
                    Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest())
            except (OSError, ValueError) as e:
                self.key_problems.append(f"[backend.tibillet] public_keys: {path}: {e}; this event's codes "
                                         "cannot be checked offline")
        self.slow_seconds = SLOW_CALL_SECONDS
        self.api_key: str | None = None
        self.device_uuid: str | None = None
        self.key_refused: str | None = None  # why, while the server refuses the key (logged on the edge)
        self._no_list_said = False
        self._store: StoreThread | None = None

    def describe(self) -> str:
        paired = "API key loaded" if self.api_key else "not paired"
        statuses = f", statuses of event {self.event_uuid}" if self.event_uuid else ""
        return f"tibillet at {self.prefix} ({len(self.keys)} event key(s) for offline{statuses}, {paired})"

    async def start(self, store: StoreThread) -> None:
        self._store = store
        for problem in self.key_problems:
            log.error("%s", problem, extra={"GATED_EVENT": "config_problem"})
        await self._load_credentials()
        if self.api_key is None:
            log.warning("TiBillet: no API key yet; run `gated pair CODE` with the device's pairing code "
                        "(deciding offline until then)", extra={"GATED_EVENT": "not_paired"})

    async def _load_credentials(self) -> None:
        self.api_key = await self._credential(self._store, self.api_key_file, "[backend.tibillet] api_key_file",
                                              KV_API_KEY)
        if self._store is not None:
            self.device_uuid = await self._store.call(Store.get, KV_DEVICE_UUID) or self.device_uuid
            found = await self._store.call(Store.get, KV_PATH_PREFIX)
            if self.prefix_override is None and found:
                self.prefix = found

    def _headers(self) -> dict[str, str]:
        if not self.api_key:
            raise Unreachable("not paired: run `gated pair CODE` (or set [backend.tibillet] api_key_file)",
                              unsent=True)
        return {"Authorization": f"Api-Key {self.api_key}"}

    async def _call(self, method: str, endpoint: str, **kw: Any) -> httpx.Response:
        """An authenticated call; a refused key raises KeyRefused (403, or TiBillet's 500 for an unknown key)."""
        try:
            response = await request(self.client, method, self.prefix + endpoint, headers=self._headers(), **kw)
        except Unreachable as e:
            if str(e) == "HTTP 500" and endpoint == "check_api_scan/" and await self._key_is_the_fault(kw):
                raise KeyRefused("API key refused (HTTP 500 with it, 403 without: TiBillet's answer to an "
                                 "unknown key); pair again with `gated pair CODE`") from None
            raise
        if response.status_code in (401, 403):
            why = api_message(response, _said_in)
            raise KeyRefused(f"API key refused (HTTP {response.status_code}{': ' + why if why else ''}); "
                             "pair again with `gated pair CODE`")
        return response

    async def _key_is_the_fault(self, kw: dict[str, Any]) -> bool:
        """Whether the server that failed with our key answers without one: then the key is what it refused.

        TiBillet does not catch an unknown key and fails with HTTP 500; a server that is really
        down fails this one too. Asked only by the health check, never on a visitor's clock.
        """
        timeout = {"timeout": kw["timeout"]} if kw.get("timeout") is not None else {}
        try:
            bare = await request(self.client, "GET", self.prefix + "check_api_scan/", **timeout)
        except Unreachable:
            return False
        return bare.status_code == 403 and "application/json" in bare.headers.get("content-type", "")

    async def _post(self, endpoint: str, token: str, **kw: Any) -> httpx.Response:
        body = {"qrcode_data": token}
        if self.event_uuid and endpoint == "ticket/":
            body["event_uuid"] = self.event_uuid
        return await self._call("POST", endpoint, json=body, **kw)

    # --- online ------------------------------------------------------------------------

    async def validate(self, scan: Scan, scan_mode: ScanMode) -> Decision:
        # `ticket/` admits any ticket not yet scanned, canceled ones included: its status is asked
        # first (nothing changes on the server), and only a valid one is scanned. Two calls of
        # 10-25 ms each on a TiBillet server; both come out of the visitor's budget.
        checked = await self._post("check_ticket/", scan.token)
        refusal = self._checked(checked, scan_mode)
        if refusal is not None:
            return refusal
        return self._decision(await self._post("ticket/", scan.token))

    def _checked(self, response: httpx.Response, scan_mode: ScanMode) -> Decision | None:
        """The decision `check_ticket/`'s answer settles, or None: a valid ticket, to be scanned now."""
        body, ticket, said, uuid, who, event = _scan_answer(response)
        code = response.status_code
        if code != 200:
            return self._refusal(code, said, body)
        display = text(ticket.get("status"), "ticket status", limit=100)
        if body.get("success") is not True or not display or not uuid:
            # check_ticket's every 200 carries success true and a ticket with its status: anything
            # else is not its answer (another API version, a proxy's page). Decide offline.
            raise Unreachable("check_ticket answered 200 without a ticket status")
        common = dict(source=Source.ONLINE, backend=self.name, backend_code=cut(f"200 {display}", ID_LIMIT),
                      ticket_key=uuid, event_id=event, message=who or display)
        if scan_mode is ScanMode.EXIT:
            return admit(Reason.OK, **common)  # TiBillet has no exit scans: any ticket it knows may leave
        status = status_of(display)
        if status == "valid":
            return None
        return deny(STATUS_REASONS.get(status, Reason.REJECTED), **common)

    def _decision(self, response: httpx.Response) -> Decision:
        body, _, said, uuid, who, event = _scan_answer(response)
        code = response.status_code
        if code != 200:
            return self._refusal(code, said, body)
        if not isinstance(body.get("success"), bool):
            # Every 200 of the scan API says success true or false; without it this is not TiBillet's
            # answer (another API version, a proxy's page): decide offline rather than deny online.
            raise Unreachable("HTTP 200 without a success flag")
        common = dict(source=Source.ONLINE, backend=self.name, backend_code=cut(f"200 {said}".strip(), ID_LIMIT),
                      event_id=event, message=who or said, ticket_key=uuid)
        if body["success"] is True:
            return admit(Reason.OK, **common)
        if "already" in said.lower():  # scanned since check_ticket answered (another lane, same second)
            return deny(Reason.ALREADY_USED, **common)
        return deny(Reason.REJECTED, **common)

    def _refusal(self, code: int, said: str, body: dict[str, Any]) -> Decision:
        """A 4xx answer of check_ticket or ticket, as TiBillet words them ({"error": ...})."""
        lowered = said.lower()
        if code == 400 and "event uuid" in lowered:
            # The server wants the event named: a setting, not this visitor's ticket.
            raise Unreachable("TiBillet wants the event: set [backend.tibillet] event_uuid")
        _must_be_refusal(code, said, body)
        common = dict(source=Source.ONLINE, backend=self.name, backend_code=cut(f"{code} {said}".strip(), ID_LIMIT),
                      message=said)
        if code == 404:
            return deny(Reason.UNKNOWN, **common)
        if code == 406 and "event" in lowered:
            return deny(Reason.WRONG_EVENT, **common)
        if code == 400 and "signature" in lowered:
            return deny(Reason.INVALID_SIGNATURE, **common)
        return deny(Reason.MALFORMED, **common)  # 400 or 406

    async def probe(self) -> None:
        """The health check: `check_api_scan/` (TiBillet), or `test_api/` where only the documents' exists."""
        if not self.api_key or self.key_refused:
            await self._load_credentials()  # `gated pair` may have run meanwhile
        try:
            name = await self._check_key(self.client.timeout)
        except KeyRefused as e:
            if self.key_refused is None:
                log.warning("TiBillet refused the API key (%s); deciding offline until it accepts one", e,
                            extra={"GATED_EVENT": "key_refused"})
            self.key_refused = str(e)
            raise
        if self.key_refused is not None:
            log.info("TiBillet accepts the API key again (device %s)", name, extra={"GATED_EVENT": "key_accepted"})
            self.key_refused = None

    async def _check_key(self, timeout: Any) -> str:
        """The device name the server knows the key by; KeyRefused or Unreachable when it does not say."""
        response = await self._call("GET", "check_api_scan/", timeout=timeout)
        if response.status_code == 404:  # a server that follows the documents
            response = await self._call("GET", "test_api/", timeout=timeout)
            body = json_body(response)
            if response.status_code != 200 or not isinstance(body, dict):
                raise Unreachable(f"test_api answered HTTP {response.status_code}")
            info = mapping(body.get("device_info"), "device_info")
            self.device_uuid = ident(info.get("uuid"), "device uuid") or self.device_uuid
            return text(info.get("name"), "device name")
        body = json_body(response)
        if response.status_code != 200 or not isinstance(body, dict) or "scan_app" not in body:
            raise Unreachable(f"check_api_scan answered HTTP {response.status_code}")
        return text(body.get("scan_app"), "scan_app")

    async def lookup(self, token: str) -> list[str] | None:
        response = await self._post("check_ticket/", token)
        body = json_body(response)
        if response.status_code != 200 or not isinstance(body, dict):
            return [f"HTTP {response.status_code}: {error_text(response, _said_in, body)}"]  # never the body
        t = mapping(body.get("ticket"), "ticket")
        lines = [f"{k}: {t.get(k)}" for k in ("uuid", "status", "is_scanned", "event", "first_name", "last_name",
                                              "product", "price", "scanned_by")]
        reservation = mapping(body.get("reservation"), "reservation")
        lines.append(f"reservation: {reservation.get('uuid')} ({reservation.get('tickets_count')} tickets)")
        return lines

    # --- pairing -------------------------------------------------------------------------

    async def pair(self, store: StoreThread, token: str) -> str:
        """Find the scan API under [backend] url, pair with the code, store the key, check it."""
        self._store = store
        token, hinted = _pairing_code(token)
        if not token:
            raise BackendRejected("the pairing code is empty")
        if self.prefix_override is not None:
            places = [self.prefix_override]
        else:
            places = list(dict.fromkeys([p for p in (hinted, *PREFIXES) if p]))
        tried: list[str] = []
        found = None
        for prefix in places:
            for path in (f"{prefix}{quote(token, safe='=')}/pair/", f"{prefix}{quote(token, safe='=')}/pair"):
                response = await request(self.client, "GET", path, timeout=self.slow_seconds)
                shown = f"{prefix}…/pair{'/' if path.endswith('/') else ''}"
                if response.status_code not in NOT_HERE:
                    found = (prefix, shown, response)
                    break
                tried.append(f"{shown} HTTP {response.status_code}")
            if found is not None:
                break
        if found is None:
            raise BackendRejected(f"no TiBillet scan API under {self.config.backend.url} (tried {', '.join(tried)}): "
                                  "check [backend] url (the site's address) or set [backend.tibillet] path_prefix")
        prefix, shown, response = found
        body, key = pairing_answer(
            response, "api_key", _said_in,
            not_json=f"{shown} answered HTTP {response.status_code} with no JSON: not TiBillet's scan API; check "
                     "[backend] url (the site's address) or set [backend.tibillet] path_prefix",
            refused=f"TiBillet (scan API at {prefix}) refused the pairing code",
            fix="codes are single-use and expire: make a new one in the TiBillet admin")
        self.prefix = prefix
        self.api_key, self.device_uuid = key, cut(str(body.get("device_uuid") or ""), ID_LIMIT)
        name = cut(str(body.get("device_name") or ""))
        tenant = cut(str(body.get("tenant_name") or ""))
        kept = {KV_API_KEY: self.api_key, KV_DEVICE_UUID: self.device_uuid, KV_DEVICE_NAME: name}
        if self.prefix_override is None:
            kept[KV_PATH_PREFIX] = prefix
        stored = await self._keep_pairing(store, kept, "API key")
        where = "set by [backend.tibillet] path_prefix" if self.prefix_override else "found"
        lines = [f'paired with TiBillet{" (" + tenant + ")" if tenant else ""} as device "{name}" ({self.device_uuid})',
                 f"scan API at {self.config.backend.url.rstrip('/')}{prefix} ({where})", stored]
        if self.api_key_file:
            lines.append("note: [backend.tibillet] api_key_file is set and takes precedence over the paired key")
            self.api_key = await self._credential(store, self.api_key_file, "[backend.tibillet] api_key_file",
                                                  KV_API_KEY)
        which = "the key in api_key_file" if self.api_key_file else "the new key"
        try:
            lines.append(f'health check: {which} is accepted as device "{await self._check_key(self.slow_seconds)}"')
        except KeyRefused as e:
            raise BackendRejected(f"paired, but TiBillet refuses {which}: {e}") from None
        except Unreachable as e:
            lines.append(f"health check not answered ({e}); pairing is stored all the same")
        if not self.event_uuid:
            lines.append("next: set [backend.tibillet] event_uuid; TiBillet refuses entry scans without it")
        return "\n".join(clean(line) for line in lines)  # names from the server reach the terminal

    # --- offline -------------------------------------------------------------------------

    async def sync(self, store: StoreThread) -> None:
        """Download the event's ticket statuses (`list_tickets/`), whole, for offline decisions."""
        if self.list_name is None or not self.keys:
            return  # no event to list, or no keys to verify codes with: nothing offline would use it
        if not self.api_key:
            await self._load_credentials()
        rows: list[dict[str, Any]] = []
        own: dict[str, Any] = {"keys": set(), "probes": 0}
        page, pages = 1, 1
        while page <= pages:
            response = await self._call("POST", "list_tickets/", timeout=self.slow_seconds, limit=LIST_PAGE_LIMIT,
                                        json={"event_uuid": self.event_uuid, "page": page, "page_size": PAGE_SIZE,
                                              "order_by": "uuid", "order_dir": "asc"})
            if response.status_code == 404 and page == 1 and "json" not in response.headers.get("content-type", ""):
                if not self._no_list_said:  # a server that follows the documents: signatures alone
                    self._no_list_said = True
                    log.info("TiBillet offers no list_tickets: offline decisions rest on signatures alone",
                             extra={"GATED_EVENT": "offline_limit"})
                return
            body = await json_answer(response)
            if response.status_code != 200:
                said = api_message(response, _said_in, body)
                raise BackendRejected(f"list_tickets: HTTP {response.status_code}{': ' + said if said else ''}")
            if not isinstance(body, dict) or not isinstance(body.get("results"), list):
                raise Unreachable("list_tickets: a page without results")
            pages = integer(body.get("total_pages"), "total_pages", low=0, high=MAX_PAGES) or 0
            rows += filter(None, (status_row(item, self.event_uuid) for item in body["results"]))
            self._find_own_key(body["results"], own)
            page += 1
        if not own["keys"] and own["probes"]:
            log.warning("none of [backend.tibillet] public_keys signs the tickets of event %s: offline, its codes "
                        "are refused as invalid_signature; add this event's public key", self.event_uuid,
                        extra={"GATED_EVENT": "config_problem"})
        await store.call(Store.load_tickets, self.list_name, rows)
        await store.call(Store.put_data, self.list_name, {"tickets": len(rows), "keys": sorted(own["keys"])})
        not_valid = sum(1 for r in rows if r["status"] != "valid")
        log.info("TiBillet ticket statuses refreshed: %d ticket(s), %d not admissible", len(rows), not_valid,
                 extra={"GATED_EVENT": "sync"})

    def _find_own_key(self, items: list[Any], own: dict[str, Any]) -> None:
        """Which configured keys sign the lane event's tickets, from their `qrcode_data`: offline, a
        code signed by another configured key is another event's ticket, which TiBillet refuses online.

        A code counts only when it names the ticket it is listed with, and every probe is kept (a key
        rotated while both keys are configured: both are the event's)."""
        for item in items:
            if own["probes"] >= KEY_PROBES:
                return
            code = item.get("qrcode_data") if isinstance(item, dict) else None
            if isinstance(code, str) and len(code) <= MAX_CODE:
                own["probes"] += 1
                check = verify_tibillet(code, self.keys)
                if check.reason is Reason.OK and check.key_index is not None and check.uuid == item.get("uuid"):
                    own["keys"].add(self.key_ids[check.key_index])

    def data_age(self, store: Store, now: float) -> float | None:
        # The keys are configuration and cannot go stale; the downloaded statuses can. Without keys
        # there is nothing to decide with, and the configured fallback applies.
        if not self.keys:
            return None
        data = store.get_data(self.list_name) if self.list_name else None
        return max(0.0, now - data[1]) if data is not None else 0.0

    def statuses(self, store: Store, now: float) -> tuple[int, float] | None:
        """(tickets, seconds since) of the downloaded statuses, or None before the first download."""
        data = store.get_data(self.list_name) if self.list_name else None
        if data is None:
            return None
        return int(data[0].get("tickets") or 0), max(0.0, now - data[1])

    def decide_offline(self, store: Store, scan: Scan, scan_mode: ScanMode, now: float,
                       clock_trusted: bool) -> Decision:
        check = verify_tibillet(scan.token, self.keys)
        if check.reason is not Reason.OK:
            return deny(check.reason, backend=self.name, message=check.detail)
        event = self.key_events[check.key_index] if check.key_index is not None else None
        listed = store.ticket(self.list_name, check.uuid) if self.list_name and check.uuid else None
        if listed is None and self.list_name and scan_mode is ScanMode.ENTRY and check.key_index is not None:
            # Not in this event's list, and signed by a key that signs none of its listed tickets (of
            # the keys learned, those still configured: a key replaced since proves nothing).
            data = store.get_data(self.list_name)
            own = data[0].get("keys") if data is not None and isinstance(data[0], dict) else None
            own = {k for k in own if isinstance(k, str)} & set(self.key_ids) if isinstance(own, list) else set()
            if own and self.key_ids[check.key_index] not in own:
                return deny(Reason.WRONG_EVENT, backend=self.name, ticket_key=check.uuid, event_id=event,
                            message=f"a ticket of {event}, signed with its key; this lane admits event "
                                    f"{self.event_uuid}")
        if listed is not None and scan_mode is ScanMode.ENTRY and listed["status"] != "valid":
            status = listed["status"]
            return deny(STATUS_REASONS.get(status, Reason.REJECTED), backend=self.name, ticket_key=check.uuid,
                        event_id=event, message=f"{listed['name'] or check.uuid}: {status} in TiBillet's list")
        who = listed["name"] if listed is not None and listed["name"] else f"signed for {event}"
        return admit(Reason.OK, backend=self.name, ticket_key=check.uuid, event_id=event, message=who)

    # --- upload --------------------------------------------------------------------------

    async def upload(self, rows: list[dict[str, Any]]) -> UploadResult:
        """Replay offline entries with `ticket/`, one request each, after `check_ticket/` says the status."""
        if self.device_uuid is None:
            try:
                await self.probe()
            except Unreachable:
                pass  # decided per row below: without it, "already scanned" cannot be told apart

        async def send(row: dict[str, Any]) -> str | None:
            checked = await self._post("check_ticket/", row["token"], timeout=self.slow_seconds)
            ready = self._replay_check(checked)
            if ready is not True:
                return ready
            response = await self._post("ticket/", row["token"], timeout=self.slow_seconds)
            return self._upload_refusal(response)

        return await self.replay(rows, _replayable, send)  # a deny, an exit or nobody passed: nothing to replay

    def _replay_check(self, response: httpx.Response) -> str | None | bool:
        """True: scan it now; None: the server counts it already (our earlier replay); else why never."""
        body, ticket, said, _, _, _ = _scan_answer(response)  # no answer (a proxy's page): retried, not parked
        if response.status_code != 200:
            _must_be_refusal(response.status_code, said, body)
            return f"HTTP {response.status_code}: {said}"
        display = text(ticket.get("status"), "ticket status", limit=100)
        if body.get("success") is not True or not display:
            raise Unreachable("check_ticket answered 200 without a ticket status")
        status = status_of(display)
        if status == "valid":
            return True
        if status == "scanned":
            return self._scanned_by(ticket.get("scanned_by"))
        # `ticket/` would mark it scanned all the same: the offline admission stays ours alone.
        return f"not replayed: the ticket is {display} in TiBillet (admitted offline before the gate knew)"

    def _scanned_by(self, by: Any) -> str | None:
        by = ident(by, "scanned_by")
        if by is None or self.device_uuid is None or by == self.device_uuid:
            return None  # our own earlier replay (or the server does not say whose): counted once
        return f"already scanned by another device ({by}): the ticket entered twice"

    def _upload_refusal(self, response: httpx.Response) -> str | None:
        """None when the server now counts the scan, else why it never will; Unreachable when it did not say."""
        body, ticket, said, _, _, _ = _scan_answer(response)
        if response.status_code == 200 and body.get("success") is True:
            return None
        if response.status_code == 400 and "event uuid" in said.lower():
            raise Unreachable("TiBillet wants the event: set [backend.tibillet] event_uuid")  # kept, not parked
        if response.status_code == 200 and "already" in said.lower():
            return self._scanned_by(ticket.get("scanned_by"))
        if response.status_code != 200:
            _must_be_refusal(response.status_code, said, body)
        return f"HTTP {response.status_code}: {said}"


class _ScanAnswer(NamedTuple):
    body: dict[str, Any]
    ticket: dict[str, Any]
    said: str  # the server's words (`_said_in`)
    uuid: str | None  # the ticket's, the anti-passback identity
    who: str  # the holder's name
    event: str | None


def _scan_answer(response: httpx.Response) -> _ScanAnswer:
    """The answer of `check_ticket/` or `ticket/` (any status), its fields each checked.

    Anything but a JSON object, or a field of the wrong type, is not TiBillet's answer: Unreachable.
    """
    body = json_body(response)
    if not isinstance(body, dict):
        raise Unreachable(f"HTTP {response.status_code} with an unexpected JSON shape")
    ticket = mapping(body.get("ticket"), "ticket")
    said = _said_in(body)
    uuid = ticket.get("uuid")
    if uuid is not None and not isinstance(uuid, str):  # the anti-passback identity: text only
        raise Unreachable("ticket uuid is not text")
    who = " ".join(text(ticket.get(k), k, limit=100) for k in ("first_name", "last_name")).strip()
    return _ScanAnswer(body, ticket, said, ident(uuid, "ticket uuid"), who, ident(ticket.get("event"), "ticket event"))


def _must_be_refusal(code: int, said: str, body: dict[str, Any]) -> None:
    """Unreachable unless a non-200 answer is TiBillet refusing the ticket: 400, 404 or 406 with its
    error field. Any other (429 throttled, 413 from a proxy) is about the request: decide offline,
    replay later; never a deny, never parked."""
    if code not in (400, 404, 406):
        raise Unreachable(f"HTTP {code}{': ' + said if said else ''}")
    if "error" not in body and "detail" not in body:
        raise Unreachable(f"HTTP {code} without TiBillet's error field")


def _said_in(body: Any) -> str:
    """The server's words: `message`, or TiBillet's `error`, or DRF's `detail` (objects kept as text).

    TiBillet's error shape: `_scan_answer` reads a scan answer's message with it, and `api_message`
    an error's text; "" when the body is not an object.
    """
    if not isinstance(body, dict):
        return ""
    said = next((body[k] for k in ("message", "error", "detail") if body.get(k)), None)
    if said is None and body and all(isinstance(v, list) for v in body.values()):
        said = body  # DRF's validation errors: {"event_uuid": ["Must be a valid UUID."]}
    return cut(str(said)) if isinstance(said, (dict, list)) else text(said, "message")


def _pairing_code(given: str) -> tuple[str, str | None]:
    """(code, prefix it names) from a pairing code or the admin's pairing link `https://site/scan/CODE/pair`."""
    given = given.strip()
    if not given.startswith(("http://", "https://")):
        return given, None
    parts = [p for p in urlsplit(given).path.split("/") if p]
    if len(parts) >= 2 and parts[-1] == "pair":
        return unquote(parts[-2]), _prefix("/".join(parts[:-2]))
    return given, None


def _replayable(row: dict[str, Any]) -> bool:
    return (row["verdict"] == "admit" and row["scan_mode"] == "entry" and row["passed"] != 0
            and bool(row["token"]))


def create(config: Config) -> Backend:
    return TibilletBackend(config)
